#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (as root) or an existing checkout:
# installs the system packages DTLSSocket and the interop tests need, only when missing,
# then creates .venv and installs otacoap with its development extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in autoconf automake libtool libcoap3-bin postgresql; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: missing system packages: ${need[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "bootstrap: installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [[ " ${need[*]} " == *" postgresql "* ]]; then
    # The store tests start their own server (tests/pg_server.py); the package's
    # "main" cluster is not needed: stop it and keep it from starting at boot.
    for c in /etc/postgresql/*/main; do
      [ -d "$c" ] || continue
      v=$(basename "$(dirname "$c")")
      pg_ctlcluster "$v" main stop 2>/dev/null || true
      echo manual >"$c/start.conf"
    done
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.otacoap-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing otacoap and its dependencies into .venv (log: .venv/install.log)"
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check -e '.[dev]'; } \
       >.venv/install.log 2>&1; then
    tail -20 .venv/install.log >&2
    echo "bootstrap: pip install failed (full log: .venv/install.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi

# DTLSSocket with the project's patches: AES on the CPU's instructions, less per record
# (docs/decisions/tinydtls-aesni.md);
# does nothing once installed.
bash scripts/dtlssocket_build.sh
