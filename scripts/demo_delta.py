"""Delta update end to end: MicroPython v1.9.4 -> v1.10 (ESP8266) by delta over DTLS.

    OTACOAP_SHARED=../shared .venv/bin/python scripts/demo_delta.py

Only the command lines a user has (as scripts/demo.py). The device starts on a small
factory image, installs MicroPython v1.9.4 (release 2, full image), and then v1.10
(release 3), which the operator publishes with a delta from v1.9.4: the server serves
the delta because the device reported v1.9.4 installed, and the device fetches the
70 KB patch instead of the 615 KB image. Everything lives in demo-delta-run/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from demo import _wait_listening, firmware, run, step  # noqa: E402

OTACOAP = [sys.executable, "-c", "import sys; from otacoap.cli import main; sys.exit(main())"]
DEVICE_SIM = [sys.executable, "-m", "device_sim"]
SHARED = Path(os.environ.get("OTACOAP_SHARED", ROOT.parent / "shared"))
VENDOR = "acme-devices.example"
CLASS = "esp8266-board"
DEVICE = "esp-0001"


def main() -> int:
    old_bin = SHARED / "delta" / "micropython-esp8266-v1.9.4.bin"
    new_bin = SHARED / "delta" / "micropython-esp8266-v1.10.bin"
    if not old_bin.is_file() or not new_bin.is_file():
        raise SystemExit(f"demo: {old_bin.parent} not found (set OTACOAP_SHARED)")
    work = ROOT / "demo-delta-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    data, flash = work / "data", work / "device.flash"
    w = lambda name: str(work / name)  # noqa: E731 - tiny local helper
    key = ["--key", w("author")]
    ident = ["--vendor-domain", VENDOR, "--class-info", CLASS]

    step("operator: data directory, signing key, trust anchor, device")
    run([*OTACOAP, "init", str(data)])
    run([*OTACOAP, "keygen", "--out", w("author")])
    run([*OTACOAP, "trust", "add", "--data", str(data), w("author.pub")])
    psk = os.urandom(16).hex()
    run([*OTACOAP, "device", "add", "--data", str(data), DEVICE, *ident, "--psk", psk])

    step("factory image (release 1) into the device's flash")
    (work / "factory.bin").write_bytes(firmware("factory", 8 * 1024))
    m = [*OTACOAP, "manifest", "build", *ident, *key]
    run([*m, "--image", w("factory.bin"), "--seq", "1", "-o", w("factory.suit")])
    run([*DEVICE_SIM, "provision", "--flash", str(flash), "--id", DEVICE, "--psk", psk,
         *ident, "--trust", w("author.pub"), "--factory-image", w("factory.bin"),
         "--factory-envelope", w("factory.suit"), "--slot-size", "640K"])  # fmt: skip

    step("operator: release 2 = MicroPython v1.9.4, release 3 = v1.10 with a delta from it")
    run([*m, "--image", str(old_bin), "--seq", "2", "-o", w("r2.suit")])
    run([*m, "--image", str(new_bin), "--seq", "3", "-o", w("r3.suit")])
    run([*m, "--image", str(new_bin), "--seq", "3", "--delta-from", str(old_bin),
         "-o", w("r3-from-r2.suit")])  # fmt: skip
    run([*OTACOAP, "publish", "--data", str(data), w("r2.suit"), str(old_bin)])

    server = subprocess.Popen(
        [*OTACOAP, "serve", "--data", str(data), "--bind", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        uri = _wait_listening(server)
        step(f"device: release 2, the full image ({old_bin.stat().st_size} bytes)")
        t0 = time.monotonic()
        run([*DEVICE_SIM, "run", "--flash", str(flash), "--server", uri, "--once"])
        full_s = time.monotonic() - t0

        step("operator: publish release 3 with its delta")
        run([*OTACOAP, "publish", "--data", str(data), w("r3.suit"), str(new_bin),
             "--delta", w("r3-from-r2.suit"), w("r3-from-r2.suit.patch")])  # fmt: skip
        time.sleep(1.5)  # the server notices the new release at its next store poll

        step("device: release 3 by delta")
        t0 = time.monotonic()
        run([*DEVICE_SIM, "run", "--flash", str(flash), "--server", uri, "--once"])
        delta_s = time.monotonic() - t0
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()

    step("what happened")
    run([*OTACOAP, "report", "list", "--data", str(data), "--device", DEVICE])
    after = json.loads(run([*DEVICE_SIM, "status", "--flash", str(flash), "--json"], show=False))
    import hashlib

    ok = (
        after["sequence_number"] == 3
        and after["image_digest"] == hashlib.sha256(new_bin.read_bytes()).hexdigest()
    )
    patch = (work / "r3-from-r2.suit.patch").stat().st_size
    print(f"\n  release 2 (full, {old_bin.stat().st_size} B) in {full_s:.1f} s; "
          f"release 3 (delta, {patch} B patch) in {delta_s:.1f} s")  # fmt: skip
    print("\nDEMO OK: v1.10 installed by delta" if ok else "\nDEMO FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
