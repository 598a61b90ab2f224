"""A fleet without --work keeps only its running devices' flash files on disk
(issue 14 §4): each device makes its flash when it starts and removes it once its
outcome is recorded, so a 100,000-device run needs the disk of `--concurrency`
devices, not of the fleet. Every device is still verified from its own flash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import make_setup, running_server  # noqa: E402

from otacoap.fsutil import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.network
@pytest.mark.timeout(240)
def test_flash_files_on_disk_stay_within_the_concurrency(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    key = tmp_path / "author.pem"
    atomic_write(key, setup.key.pem, mode=0o600)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out_json = tmp_path / "fleet.json"
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.wait(0.02):
            peak = max(peak, sum(1 for _ in scratch.rglob("*.flash")))

    watcher = threading.Thread(target=watch, daemon=True)
    with running_server(setup.data) as server:
        watcher.start()
        try:
            done = subprocess.run(
                [
                    sys.executable, "-m", "device_sim.fleet",
                    "--server", server.uri, "--data", str(setup.data), "--key", str(key),
                    "--devices", "24", "--image-size", "4096", "--concurrency", "3",
                    "--timeout", "60", "--max-time", "180", "--report", str(out_json),
                ],
                cwd=ROOT, capture_output=True, text=True, timeout=220,
                env={**os.environ, "TMPDIR": str(scratch)},
            )  # fmt: skip
        finally:
            stop.set()
            watcher.join(timeout=5)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out_json.read_text())
    per = report["per_device"]
    assert report["completed"] == 24 and len(per) == 24
    # Verified from flash before its file went: the run image and sequence were read.
    assert all(d["outcome"] == "updated" and d["flash_sequence"] == 2 for d in per)
    assert all(d["flash_image_ok"] and d["server_confirmed"] for d in per)
    assert 1 <= peak <= 3, f"{peak} flash files at once with --concurrency 3"
    assert list(scratch.iterdir()) == []
