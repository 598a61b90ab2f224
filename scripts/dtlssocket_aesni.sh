#!/usr/bin/env bash
# Rebuild DTLSSocket (tinydtls) in .venv with patches/tinydtls-aesni.patch: tinydtls's
# AES block function uses the CPU's AES instructions when it has them (the record
# cipher was ~18 % of the server's CPU, bench/RESULTS.md "Per-core cost against
# libcoap"), and so does its AES-CCM for the whole blocks of a record. Idempotent: does
# nothing when the installed module already carries the patch's marker. The patch is
# self-tested (FIPS-197 and RFC 3610 vectors, and the instructions against tinydtls's
# own table code on 100,000 blocks and CCM records of 0-1,100 octets) before anything
# is installed.
#
#   bash scripts/dtlssocket_aesni.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.2.3
SHA256=f06cbe32df8562dbbccbe274aaf27d2773e8492a86c41c334b3a0a70a50037cf
MARKER=otacoap-tinydtls-aesni-2
PY=.venv/bin/python

die() { echo "dtlssocket_aesni: $*" >&2; exit 1; }

[ -x "$PY" ] || die ".venv is missing: run scripts/bootstrap.sh first"
if [ "$(uname -m)" != x86_64 ]; then
  echo "dtlssocket_aesni: not x86_64: keeping tinydtls's table AES"
  exit 0
fi
so=$("$PY" -c 'import DTLSSocket.dtls as d; print(d.__file__)') ||
  die "DTLSSocket is not installed in .venv"
if [ "${1:-}" != --force ] && grep -qa "$MARKER" "$so"; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "dtlssocket_aesni: building DTLSSocket $VERSION with AES-NI (log: .venv/dtlssocket-aesni.log)"
"$PY" - "$VERSION" "$SHA256" "$work/sdist.tar.gz" <<'EOF' || die "cannot fetch the DTLSSocket sdist"
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
EOF
tar xzf "$work/sdist.tar.gz" -C "$work"
src="$work/dtlssocket-$VERSION"
patch -p1 -s -d "$src" <patches/tinydtls-aesni.patch || die "the patch does not apply"

td="$src/DTLSSocket/tinydtls"
gcc -O2 -DDTLSv12 -DWITH_SHA256 -D_GNU_SOURCE -DNDEBUG -I "$td" -I "$td/aes" \
  -o "$work/selftest" patches/tinydtls-aesni-selftest.c "$td/ccm.c" \
  "$td/aes/rijndael.c" "$td/aes/rijndael_wrap.c" 2>/dev/null || die "the self-test does not build"
with_ni=$("$work/selftest") || die "self-test failed with AES-NI: $with_ni"
without=$(OTACOAP_TINYDTLS_AESNI=0 "$work/selftest") || die "self-test failed: $without"
[ "$with_ni" = "$without" ] || die "AES-NI and table AES disagree ($with_ni != $without)"

"$PY" -m pip install --disable-pip-version-check --no-deps --force-reinstall "$src" \
  >.venv/dtlssocket-aesni.log 2>&1 || {
  tail -20 .venv/dtlssocket-aesni.log >&2
  die "pip install of the patched DTLSSocket failed"
}
so=$("$PY" -c 'import DTLSSocket.dtls as d; print(d.__file__)')
grep -qa "$MARKER" "$so" || die "installed, but $so does not carry $MARKER"
echo "dtlssocket_aesni: installed ($so)"
