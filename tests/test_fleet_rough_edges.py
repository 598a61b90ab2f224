"""The fleet simulator's rough edges (issue 12 §2): it must not leave devices behind
in a real data directory when asked (`--cleanup`), must refuse before registering
anything when its outputs cannot be written or no server runs on the data directory,
and must still write a partial report when interrupted with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import make_setup, running_server  # noqa: E402

from otacoap.fsutil import atomic_write  # noqa: E402
from otacoap.store import DataDir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FLEET = [sys.executable, "-m", "device_sim.fleet"]


def _setup(tmp_path: Path) -> tuple[Any, Path]:
    setup = make_setup(tmp_path)
    key = tmp_path / "author.pem"
    atomic_write(key, setup.key.pem, mode=0o600)
    return setup, key


def _devices(data: Path) -> list[str]:
    store = DataDir(data).open_store()
    try:
        return [d.id for d in store.list_devices()]
    finally:
        store.close()


def _one_line_error(done: Any, needle: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


@pytest.mark.network
@pytest.mark.timeout(200)
def test_cleanup_removes_the_registered_devices_and_cancels_the_campaign(tmp_path: Path) -> None:
    setup, key = _setup(tmp_path)
    before = _devices(setup.data)
    out_json = tmp_path / "r.json"
    with running_server(setup.data) as server:
        done = subprocess.run(
            [
                *FLEET, "--server", server.uri, "--data", str(setup.data), "--key", str(key),
                "--devices", "6", "--image-size", "4096", "--timeout", "60", "--max-time", "80",
                "--bad-fraction", "1", "--poll-interval", "0.5",
                "--campaign", "--waves 1,100%", "--cleanup", "--report", str(out_json),
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=150,
        )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    report = json.loads(out_json.read_text())
    assert report["campaign"]["state"] == "halted"  # as the run saw it
    assert report["server"]["cleanup"] == {"devices_removed": 6, "campaign_cancelled": True}
    assert _devices(setup.data) == before
    store = DataDir(setup.data).open_store()
    try:
        campaign = store.campaign_status(report["campaign"]["id"]).campaign
        removed = [
            e
            for e in store.audit_entries()
            if e.action == "device.remove" and e.actor == "fleet-simulator"
        ]
    finally:
        store.close()
    assert campaign.progress.state == "cancelled"
    assert sorted(e.subject for e in removed) == sorted(d["device"] for d in report["per_device"])


@pytest.mark.parametrize(
    ("option", "where", "needle"),
    [
        ("--report", "missing/r.json", "no such directory"),
        ("--plot", "missing/p.png", "no such directory"),
        ("--report", ".", "is a directory"),
        ("--work", "afile/sub", "cannot create or write"),
    ],
)
def test_unwritable_outputs_are_refused_before_registering(
    tmp_path: Path, option: str, where: str, needle: str
) -> None:
    setup, key = _setup(tmp_path)
    (tmp_path / "afile").write_text("x")
    before = _devices(setup.data)
    done = subprocess.run(
        [
            *FLEET, "--server", "coaps://127.0.0.1:9", "--data", str(setup.data),
            "--key", str(key), "--devices", "3", option, str(tmp_path / where),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    _one_line_error(done, needle)
    assert _devices(setup.data) == before


def test_no_server_on_the_data_directory_is_refused_before_registering(tmp_path: Path) -> None:
    setup, key = _setup(tmp_path)
    before = _devices(setup.data)
    cmd = [
        *FLEET, "--server", "coaps://127.0.0.1:9", "--data", str(setup.data),
        "--key", str(key), "--devices", "3",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    _one_line_error(done, "otacoap serve")
    # A server ran once and stopped (its lock file stays): still refused.
    with running_server(setup.data):
        pass
    assert (setup.data / "serve.lock").exists()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    _one_line_error(done, "no 'otacoap serve' is running")
    assert _devices(setup.data) == before


@pytest.mark.network
@pytest.mark.timeout(200)
@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_writes_a_partial_report_and_exits_130(tmp_path: Path, processes: int) -> None:
    """Ctrl-C (SIGINT to the fleet's own process, as a terminal sends it) mid-run: the
    report still appears, with the devices done so far and the rest "interrupted"; with
    worker processes too (the parent stops them and gathers what they had done)."""
    setup, key = _setup(tmp_path)
    out_json = tmp_path / "partial.json"
    with running_server(setup.data) as server:
        proc = subprocess.Popen(
            [
                *FLEET, "--server", server.uri, "--data", str(setup.data), "--key", str(key),
                "--devices", "400", "--image-size", "64K", "--concurrency", "2",
                "--processes", str(processes),
                "--progress", "--report", str(out_json), "--cleanup",
            ],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith("fleet: running 400 devices"):
                    break
            time.sleep(5.0)  # let a few devices finish, then press Ctrl-C
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads(out_json.read_text())
    outcomes = [d["outcome"] for d in report["per_device"]]
    assert len(outcomes) == 400
    assert report["settings"]["interrupted"] is True
    assert outcomes.count("updated") >= 1, report["per_device"][:5]
    if processes == 2:  # both workers' finished devices made it into the report
        assert {d["worker"] for d in report["per_device"] if d["outcome"] == "updated"} == {0, 1}
    assert outcomes.count("interrupted") >= 1
    assert set(outcomes) <= {"updated", "interrupted"}
    assert report["interrupted"] == outcomes.count("interrupted")
    # --cleanup still ran: nothing left behind.
    assert not any(d.startswith("fl") for d in _devices(setup.data))
    assert os.path.exists(out_json)
