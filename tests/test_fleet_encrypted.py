"""`python -m device_sim.fleet --encrypt` (issue 13 §5): a fleet updated by an encrypted
release through the real server over DTLS. The server's blob store holds only the
ciphertext; every device ends on the plaintext image, confirmed in the server's store.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import make_setup, running_server  # noqa: E402

from otacoap.fsutil import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.network
@pytest.mark.timeout(180)
def test_fleet_updates_with_an_encrypted_release(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    key = tmp_path / "author.pem"
    atomic_write(key, setup.key.pem, mode=0o600)
    out_json = tmp_path / "fleet.json"
    with running_server(setup.data) as server:
        done = subprocess.run(
            [
                sys.executable, "-m", "device_sim.fleet",
                "--server", server.uri, "--data", str(setup.data), "--key", str(key),
                "--devices", "6", "--image-size", "8192", "--concurrency", "6",
                "--timeout", "60", "--max-time", "120", "--encrypt",
                "--report", str(out_json),
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=170,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out_json.read_text())
    assert report["completed"] == 6
    per = report["per_device"]
    assert all(d["server_confirmed"] and d["flash_sequence"] == 2 for d in per)
    # The published blob is the ciphertext, not the image the devices now run.
    image_sha256 = report["settings"]["image_sha256"]
    assert report["settings"]["encrypted"] is True
    blobs = [p.read_bytes() for p in (setup.data / "blobs").rglob("*") if p.is_file()]
    assert blobs and all(hashlib.sha256(b).hexdigest() != image_sha256 for b in blobs)


def test_encrypt_needs_a_generated_release(tmp_path: Path) -> None:
    # (Network publishing, --operator, encrypts too since issue 13 §5's --delta work:
    # tests/test_fleet_delta_encrypt.py; a given --release is still refused.)
    done = subprocess.run(
        [
            sys.executable, "-m", "device_sim.fleet", "--server", "coaps://127.0.0.1:1",
            "--operator", "op", "--operator-psk", "00" * 16, "--devices-file", "x",
            "--class-info", "c", "--key", "k", "--devices", "1", "--encrypt",
            "--release", "env.suit", "image.bin",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "--encrypt" in done.stderr
