"""The main job end to end, on the embedded SQLite default, with only the CLIs a user has.

An operator initialises a data directory, makes a signing key, registers a device and
publishes release 2; a device provisioned with factory release 1 is updated over
DTLS (127.0.0.1), boots the new image in test mode, confirms it, and reports each step.
Everything lives in demo-run/ (made afresh each run, so running twice is safe).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OTACOAP = str(BIN / "otacoap")
DEVICE_SIM = [sys.executable, "-m", "device_sim"]

VENDOR = "acme-devices.example"
CLASS = "thermostat-t1"
DEVICE = "thermostat-0001"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(cmd: list[str], *, show: bool = True) -> str:
    shown = " ".join(cmd).replace(str(ROOT) + "/", "").replace(str(BIN) + "/", "")
    if show:
        print("$ " + shown, flush=True)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if result.stdout.strip() and show:
        print("  " + result.stdout.strip().replace("\n", "\n  "), flush=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"demo: step failed (exit {result.returncode}): {shown}")
    return result.stdout


def firmware(version: str, size: int) -> bytes:
    """A deterministic stand-in firmware image for `version`."""
    out = bytearray(f"ACME thermostat firmware {version}\n".encode())
    n = 0
    while len(out) < size:
        out += hashlib.sha256(f"{version}:{n}".encode()).digest()
        n += 1
    return bytes(out[:size])


def main() -> int:
    work = ROOT / "demo-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    data, flash = work / "data", work / "device.flash"
    rel = lambda p: str(p.relative_to(ROOT))  # noqa: E731 - tiny local helper
    started = time.monotonic()

    step("operator: data directory, signing key, trust anchor, device")
    run([OTACOAP, "init", rel(data)])
    run([OTACOAP, "keygen", "--alg", "es256", "--out", rel(work / "author")])
    run([OTACOAP, "trust", "add", "--data", rel(data), rel(work / "author.pub")])
    # The PSK goes through a 0600 file, never the command line (ps, shell history).
    psk_file = work / "device.psk"
    fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(16).hex() + "\n")
    run(
        [
            OTACOAP,
            "device",
            "add",
            "--data",
            rel(data),
            DEVICE,
            "--vendor-domain",
            VENDOR,
            "--class-info",
            CLASS,
            "--psk-file",
            rel(psk_file),
        ]
    )

    step("factory: release 1 provisioned into the device's flash")
    v1, v2 = firmware("1.0.0", 48 * 1024), firmware("2.0.0", 64 * 1024 + 123)
    (work / "fw-1.bin").write_bytes(v1)
    (work / "fw-2.bin").write_bytes(v2)
    run(
        [
            OTACOAP,
            "manifest",
            "build",
            "--image",
            rel(work / "fw-1.bin"),
            "--vendor-domain",
            VENDOR,
            "--class-info",
            CLASS,
            "--seq",
            "1",
            "--key",
            rel(work / "author"),
            "-o",
            rel(work / "fw-1.suit"),
        ]
    )
    run(
        [
            *DEVICE_SIM,
            "provision",
            "--flash",
            rel(flash),
            "--id",
            DEVICE,
            "--psk-file",
            rel(psk_file),
            "--vendor-domain",
            VENDOR,
            "--class-info",
            CLASS,
            "--trust",
            rel(work / "author.pub"),
            "--factory-image",
            rel(work / "fw-1.bin"),
            "--factory-envelope",
            rel(work / "fw-1.suit"),
        ]
    )
    before = json.loads(run([*DEVICE_SIM, "status", "--flash", rel(flash), "--json"], show=False))

    step("operator: build, sign and publish release 2")
    run(
        [
            OTACOAP,
            "manifest",
            "build",
            "--image",
            rel(work / "fw-2.bin"),
            "--vendor-domain",
            VENDOR,
            "--class-info",
            CLASS,
            "--seq",
            "2",
            "--key",
            rel(work / "author"),
            "-o",
            rel(work / "fw-2.suit"),
        ]
    )
    run([OTACOAP, "manifest", "verify", rel(work / "fw-2.suit"), "--key", rel(work / "author.pub")])
    run([OTACOAP, "publish", "--data", rel(data), rel(work / "fw-2.suit"), rel(work / "fw-2.bin")])
    run([OTACOAP, "release", "list", "--data", rel(data)])

    step("server: otacoap serve over DTLS on 127.0.0.1")
    server = subprocess.Popen(
        [OTACOAP, "-v", "serve", "--data", rel(data), "--bind", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        uri = _wait_listening(server)
        print(f"  {uri}", flush=True)

        step("device: check, download, verify, install, reboot, confirm")
        t0 = time.monotonic()
        run([*DEVICE_SIM, "run", "--flash", rel(flash), "--server", uri, "--once"])
        update_seconds = time.monotonic() - t0
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()

    step("what happened")
    after = json.loads(run([*DEVICE_SIM, "status", "--flash", rel(flash), "--json"], show=False))
    run([OTACOAP, "report", "list", "--data", rel(data), "--device", DEVICE])
    run([OTACOAP, "audit", "verify", "--data", rel(data)])
    want = hashlib.sha256(v2).hexdigest()
    ok = after["sequence_number"] == 2 and after["image_digest"] == want
    print(
        f"\n  device {DEVICE}: sequence {before['sequence_number']} -> "
        f"{after['sequence_number']}, running image sha256 {after['image_digest'][:16]}..."
    )
    print(
        f"  release 2: {len(v2)} bytes over DTLS in {update_seconds:.1f} s "
        f"(whole demo {time.monotonic() - started:.1f} s)"
    )
    print(
        "\nDEMO OK: the device runs and has confirmed release 2"
        if ok
        else "\nDEMO FAILED: the device does not run release 2"
    )
    return 0 if ok else 1


def _wait_listening(server: subprocess.Popen[str], timeout: float = 30) -> str:
    assert server.stdout is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = server.stdout.readline()
        if not line:
            raise SystemExit("demo: the server exited before it was ready")
        if "listening on coaps://" in line:
            uri = line.split("listening on ", 1)[1].split()[0]
            threading.Thread(
                target=lambda: [None for _ in server.stdout or ()], daemon=True
            ).start()
            return uri.rstrip(".,")
    raise SystemExit("demo: the server did not start in time")


if __name__ == "__main__":
    sys.exit(main())
