#!/usr/bin/env bash
# The main job end to end: set-up (idempotent), then server + device update over DTLS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
