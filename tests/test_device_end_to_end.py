"""End to end over real DTLS with the REAL server: provision, publish, update, confirm.

Everything through the command lines a user would type: `otacoap init / trust add /
device add / publish / serve` (via tests/server_helpers.py) and `python -m device_sim
provision / run / status`. The server's own store must then hold the device's whole
report sequence, and a release published while the device watches /m (RFC 7641
Observe) must be installed without waiting for a poll.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import (  # noqa: E402
    CLASS_A,
    DeviceSpec,
    device_cli,
    device_provision,
    device_reports,
    device_run_once,
    make_image,
    make_setup,
    running_server,
)

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "e2e-dev-1"
PSK = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")


def status(flash: Path) -> dict[str, object]:
    done = device_cli("status", "--flash", str(flash), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def reports(data: Path) -> list[tuple[str, int, int | None]]:
    return [(r.state, r.reason, r.sequence_number) for r in device_reports(data, DEVICE)]


def test_provision_publish_update_confirm_and_watch(tmp_path: Path, store_url: str) -> None:
    """On both store backends (conftest.store_url): on PostgreSQL the server notices the
    release another process published through the store's change counter."""
    setup = make_setup(
        tmp_path, devices=[DeviceSpec(DEVICE, CLASS_A, psk=PSK)], store_url=store_url
    )
    factory = setup.release(CLASS_A, 1, make_image("factory", 3000))
    flash = tmp_path / "device.flash"
    device_provision(flash, setup, DEVICE, factory)
    assert status(flash)["sequence_number"] == 1

    v2 = setup.release(CLASS_A, 2, make_image("v2", 40_000))
    setup.publish(v2)
    with running_server(setup.data) as server:
        outcome = device_run_once(flash, server.uri)
        assert outcome["outcome"] == "updated" and outcome["sequence_number"] == 2
        info = status(flash)
        assert info["sequence_number"] == 2 and info["boot_status"] == "confirmed"
        assert info["image_digest"] == hashlib.sha256(v2.image).hexdigest()
        assert info["queued_reports"] == 0
        assert reports(setup.data) == [
            ("downloading", 0, 2),
            ("downloaded", 0, 2),
            ("installing", 0, 2),
            ("installed", 0, 2),
            ("confirmed", 0, 2),
        ]

        # Nothing new: a second run is a no-op.
        again = device_cli("run", "--flash", str(flash), "--server", server.uri)
        assert again.returncode == 0 and again.stdout.startswith("up-to-date"), again.stdout

        # --watch: a release published while the device observes /m arrives by Observe,
        # well before the (60 s) fallback poll.
        watcher = subprocess.Popen(
            [
                sys.executable, "-m", "device_sim", "run", "--flash", str(flash),
                "--server", server.uri, "--watch", "--max-time", "25", "--json",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert watcher.stdout is not None
            first = json.loads(watcher.stdout.readline())
            assert first["outcome"] == "up-to-date"
            v3 = setup.release(CLASS_A, 3, make_image("v3", 20_000))
            published = time.monotonic()
            setup.publish(v3)
            update: dict[str, object] = {}
            for line in watcher.stdout:  # bounded by --max-time
                update = json.loads(line)
                if update["outcome"] != "up-to-date":
                    break
            latency = time.monotonic() - published
            assert update["outcome"] == "updated" and update["sequence_number"] == 3, update
            assert latency < 15, f"update took {latency:.1f} s: not driven by Observe?"
        finally:
            watcher.terminate()
            watcher.wait(timeout=15)
        info = status(flash)
        assert info["sequence_number"] == 3
        assert info["image_digest"] == hashlib.sha256(v3.image).hexdigest()
        assert [r for r in reports(setup.data) if r[2] == 3][-1] == ("confirmed", 0, 3)
