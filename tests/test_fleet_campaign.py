"""The fleet simulator rolling a release out as a campaign (issue 11 §3), against the
REAL server over real DTLS.

A bad release (it fails its health check at first boot on every device) must halt the
campaign inside its canary wave, and no device outside that wave may be touched: its
flash still runs the factory image, and the server never admitted it. A good release
must go through every wave. Both are checked independently of the simulator's own
report: flash files read as the bootloader reads them, and the server's store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import make_setup, running_server  # noqa: E402

from device_sim.fleet import cli as fleet_cli  # noqa: E402
from device_sim.fleet.options import FleetError  # noqa: E402
from device_sim.fleet.run import bad_devices  # noqa: E402
from device_sim.provision import inspect  # noqa: E402
from otacoap.fsutil import atomic_write  # noqa: E402
from otacoap.store import DataDir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fleet(tmp_path: Path, server_uri: str, data: Path, key: Path, *extra: str) -> Any:
    return subprocess.run(
        [
            sys.executable, "-m", "device_sim.fleet",
            "--server", server_uri, "--data", str(data), "--key", str(key),
            "--image-size", "4096", "--concurrency", "10", "--seed", "3",
            "--timeout", "60", "--max-time", "80", "--poll-interval", "0.5",
            "--work", str(tmp_path / "work"), *extra,
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip


def _setup(tmp_path: Path) -> tuple[Any, Path]:
    setup = make_setup(tmp_path)
    key = tmp_path / "author.pem"
    atomic_write(key, setup.key.pem, mode=0o600)
    return setup, key


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_bad_release_halts_in_the_canary_wave_and_touches_nobody_else(tmp_path: Path) -> None:
    setup, key = _setup(tmp_path)
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    with running_server(setup.data) as server:
        done = _fleet(
            tmp_path, server.uri, setup.data, key,
            "--devices", "24", "--bad-fraction", "1",
            "--campaign", "--waves 2,50%,100% --failure-threshold 5%",
            "--report", str(out_json), "--plot", str(out_png),
        )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr  # not all updated
    assert "Traceback" not in done.stderr
    report = json.loads(out_json.read_text())
    camp = report["campaign"]
    assert camp["state"] == "halted", camp
    assert "wave 1" in camp["halt_reason"]
    assert camp["opened"] == 1
    waves = camp["per_wave"]
    assert [w["size"] for w in waves] == [2, 10, 12]
    assert waves[0]["reverted"] >= 1 and waves[0]["updated"] == 0
    assert waves[1]["untouched"] == 10 and waves[2]["untouched"] == 12
    assert waves[0]["opened_seconds"] is not None and waves[1]["opened_seconds"] is None
    per = report["per_device"]
    assert {d["wave"] for d in per} == {1, 2, 3}
    outside = [d for d in per if d["wave"] != 1]
    assert len(outside) == 22
    for d in outside:
        assert d["outcome"] == "untouched" and d["member_state"] == "pending", d
        assert d["flash_sequence"] == 1 and d["blocks"] == 0
    assert report["untouched"] == 22

    # Independently: every flash outside the canary still runs the factory image, and
    # the server holds no report at all from those devices.
    settings = report["settings"]
    flashes = {p.stem: p for p in (tmp_path / "work").rglob("*.flash")}
    assert len(flashes) == 24
    store = DataDir(setup.data).open_store()
    try:
        for d in per:
            info = inspect(flashes[d["device"]])
            assert info["running_sequence_number"] == 1 and info["boot_status"] == "confirmed"
            assert info["image_digest"] != settings["image_sha256"]
            reports = store.list_reports(d["device"], 50)
            if d["wave"] == 1:
                assert any(r.state == "reverted" for r in reports), d
            else:
                # Never offered the release: not even its sequence number was seen.
                assert info["sequence_number"] == 1 and info["download"] is None, info
                assert reports == [], (d["device"], reports)
    finally:
        store.close()
    assert out_png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_good_release_goes_through_every_wave(tmp_path: Path) -> None:
    setup, key = _setup(tmp_path)
    out_json = tmp_path / "c.json"
    with running_server(setup.data) as server:
        done = _fleet(
            tmp_path, server.uri, setup.data, key,
            "--devices", "20",
            "--campaign", "--waves 1%,10%,100% --failure-threshold 5% --max-downloads 6",
            "--report", str(out_json), "--json",
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["completed"] == 20 and summary["untouched"] == 0
    report = json.loads(out_json.read_text())
    camp = report["campaign"]
    assert camp["state"] == "finished", camp
    assert camp["opened"] == camp["wave_count"] == 3
    assert [w["size"] for w in camp["per_wave"]] == [1, 1, 18]
    assert sum(w["updated"] for w in camp["per_wave"]) == 20
    assert camp["peak_admitted"] <= 6
    opened = [w["opened_seconds"] for w in camp["per_wave"]]
    completed = [w["completed_seconds"] for w in camp["per_wave"]]
    assert None not in opened and None not in completed
    assert opened == sorted(opened)
    assert all(c >= o for o, c in zip(opened, completed, strict=True))
    for d in report["per_device"]:
        assert d["outcome"] == "updated" and d["server_confirmed"] and d["flash_sequence"] == 2
        assert d["member_state"] == "succeeded" and d["wave"] in (1, 2, 3)


def test_bad_fraction_picks_an_exact_deterministic_share() -> None:
    devices = [f"dev-{i}" for i in range(200)]
    bad = bad_devices(devices, 0.1, 7)
    assert len(bad) == 20 and bad == bad_devices(devices, 0.1, 7)
    assert bad != bad_devices(devices, 0.1, 8)
    assert bad_devices(devices, 0.0, 7) == frozenset()
    assert bad_devices(devices, 1.0, 7) == frozenset(devices)


def _args(tmp_path: Path, *extra: str) -> Any:
    import argparse

    p = argparse.ArgumentParser()
    fleet_cli.add_arguments(p)
    key = tmp_path / "k.pem"
    key.write_text("x")
    (tmp_path / "data").mkdir(exist_ok=True)
    base = ["--server", "coaps://127.0.0.1:5684", "--devices", "3", "--key", str(key)]
    return p.parse_args([*base, "--data", str(tmp_path / "data"), *extra])


def test_campaign_string_parses_like_campaign_create(tmp_path: Path) -> None:
    opts = fleet_cli.options_from_args(
        _args(tmp_path, "--campaign", "--waves 1%,10%,100% --failure-threshold 5% --soak 1m")
    )
    plan = opts.campaign
    assert [str(w) for w in plan.waves] == ["1%", "10%", "100%"]
    assert plan.policy.failure_threshold == 0.05 and plan.policy.soak == 60.0
    # The same refusals, in one line, as `otacoap campaign create`.
    for bad, words in (
        ("--failure-threshold 0", "--failure-threshold"),
        ("--waves 0%", "wave"),
        ("--bogus 1", "unrecognized"),
        ("--waves '1%", "quotation"),
    ):
        with pytest.raises(FleetError, match=words) as exc:
            fleet_cli.options_from_args(_args(tmp_path, "--campaign", bad))
        assert "\n" not in str(exc.value)
