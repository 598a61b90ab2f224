#!/usr/bin/env bash
# Rebuild DTLSSocket (tinydtls) in .venv with the project's two patches:
# - patches/tinydtls-aesni.patch: tinydtls's AES (block function, key schedule and the
#   whole blocks of AES-CCM) on the CPU's AES instructions when it has them
#   (docs/decisions/tinydtls-aesni.md);
# - patches/dtlssocket-per-record.patch: less work per record outside AES, the record
#   callbacks' peer address made in C, and a one-peer context found without hashing
#   (docs/decisions/tinydtls-aesni.md, "Per record, outside AES").
# The AES code is self-tested (FIPS-197 and RFC 3610 vectors, and the instructions
# against tinydtls's own table code on 100 key schedules, 100,000 blocks and CCM
# records of 0-1,100 octets) before anything is installed. Idempotent: does nothing
# when the installed module already carries both patches' markers.
#
#   bash scripts/dtlssocket_build.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.2.3
SHA256=f06cbe32df8562dbbccbe274aaf27d2773e8492a86c41c334b3a0a70a50037cf
MARKERS=(otacoap-dtlssocket-per-record-1)
# The AES-NI code (and its marker) is compiled for x86-64 only; elsewhere tinydtls
# keeps its table AES.
if [ "$(uname -m)" = x86_64 ]; then MARKERS+=(otacoap-tinydtls-aesni-3); fi
PATCHES=(patches/tinydtls-aesni.patch patches/dtlssocket-per-record.patch)
PY=.venv/bin/python

die() { echo "dtlssocket_build: $*" >&2; exit 1; }

has_markers() {
  local marker
  for marker in "${MARKERS[@]}"; do grep -qa "$marker" "$1" || return 1; done
}

[ -x "$PY" ] || die ".venv is missing: run scripts/bootstrap.sh first"
so=$("$PY" -c 'import DTLSSocket.dtls as d; print(d.__file__)') ||
  die "DTLSSocket is not installed in .venv"
if [ "${1:-}" != --force ] && has_markers "$so"; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "dtlssocket_build: building DTLSSocket $VERSION with the project's patches (log: .venv/dtlssocket-build.log)"
"$PY" - "$VERSION" "$SHA256" "$work/sdist.tar.gz" <<'PYEOF' || die "cannot fetch the DTLSSocket sdist"
"""Fetch the pinned sdist through PyPI's simple index (PEP 503) and check its digest."""
import hashlib, re, sys, urllib.request
version, sha256, dest = sys.argv[1:]
try:
    with urllib.request.urlopen("https://pypi.org/simple/dtlssocket/", timeout=60) as r:
        page = r.read().decode()
    name = re.escape(f"dtlssocket-{version}.tar.gz")
    url = re.search(rf'href="([^"#]*/{name})#', page).group(1)
    with urllib.request.urlopen(url, timeout=120) as r:
        data = r.read()
except Exception as e:  # one line, not a traceback: the caller says what failed
    sys.exit(f"{type(e).__name__}: {e}")
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit("sdist digest mismatch")
with open(dest, "wb") as f:
    f.write(data)
PYEOF
tar xzf "$work/sdist.tar.gz" -C "$work"
src="$work/dtlssocket-$VERSION"
for p in "${PATCHES[@]}"; do
  patch -p1 -s -d "$src" <"$p" || die "$p does not apply"
done

# The AES self-test: with the instructions (where the CPU has them) and with the table
# code, which must agree.
td="$src/DTLSSocket/tinydtls"
gcc -O2 -DDTLSv12 -DWITH_SHA256 -D_GNU_SOURCE -DNDEBUG -I "$td" -I "$td/aes" \
  -o "$work/selftest" patches/tinydtls-aesni-selftest.c "$td/ccm.c" \
  "$td/aes/rijndael.c" "$td/aes/rijndael_wrap.c" 2>/dev/null || die "the self-test does not build"
with_ni=$("$work/selftest") || die "self-test failed with AES-NI: $with_ni"
without=$(OTACOAP_TINYDTLS_AESNI=0 "$work/selftest") || die "self-test failed: $without"
[ "$with_ni" = "$without" ] || die "AES-NI and table AES disagree ($with_ni != $without)"

"$PY" -m pip install --disable-pip-version-check --no-deps --force-reinstall "$src" \
  >.venv/dtlssocket-build.log 2>&1 || {
  tail -20 .venv/dtlssocket-build.log >&2
  die "pip install of the patched DTLSSocket failed"
}
so=$("$PY" -c 'import DTLSSocket.dtls as d; print(d.__file__)')
has_markers "$so" || die "installed, but $so does not carry ${MARKERS[*]}"
echo "dtlssocket_build: installed ($so)"
