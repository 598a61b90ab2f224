"""The fleet simulator (device_sim.fleet) against the REAL server over real DTLS.

The lossy-fleet test is the issue's acceptance test: 50 devices through the netem
proxy at 5% loss must all end up updated, and "updated" is checked here again,
independently of the simulator's own verification: every flash file read the way the
bootloader reads it, and every device's "confirmed" report in the server's store.
The report and the plot must say what happened (fields consistent with the per-device
entries, a real PNG). The figures module is tested on synthetic data without a
network, and bad command lines must end in one line on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import (  # noqa: E402
    VENDOR,
    DeviceSpec,
    Setup,
    make_setup,
    running_server,
)

from device_sim.fleet import cli as fleet_cli  # noqa: E402
from device_sim.fleet.options import FleetError  # noqa: E402
from device_sim.fleet.preparation import image_bytes  # noqa: E402
from device_sim.fleet.report import (  # noqa: E402
    DeviceOutcome,
    FleetDeviceOutcome,
    FleetReport,
    FleetRunReport,
    percentile,
)
from device_sim.provision import inspect  # noqa: E402
from otacoap.core import cose  # noqa: E402
from otacoap.fsutil import atomic_write  # noqa: E402
from otacoap.store import DataDir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _key_file(setup: Setup, base: Path) -> Path:
    path = base / "author.pem"
    atomic_write(path, setup.key.pem, mode=0o600)
    return path


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (PNG spec §11.2.2)."""
    assert data[:8] == PNG_MAGIC, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _check_report_consistent(report: dict[str, Any]) -> list[dict[str, Any]]:
    per = report["per_device"]
    assert isinstance(per, list)
    done = [d for d in per if d["outcome"] == "updated"]
    assert report["devices"] == len(per)
    assert report["completed"] == len(done)
    assert report["failed"] == len(per) - len(done)
    assert report["success_rate"] == pytest.approx(len(done) / len(per))
    assert report["blocks"] == sum(d["blocks"] for d in per)
    assert report["bytes"] == sum(d["bytes"] for d in per)
    assert report["retransmissions"] == sum(d["retransmissions"] for d in per)
    times = [d["seconds"] for d in done]
    for key, p in (("p50_seconds", 50), ("p95_seconds", 95), ("p99_seconds", 99)):
        assert report[key] == percentile(times, p)
    assert report["p50_seconds"] <= report["p95_seconds"] <= report["p99_seconds"]
    assert report["p99_seconds"] <= report["max_seconds"] <= report["wall_seconds"]
    wall = report["wall_seconds"]
    assert report["blocks_per_second"] == pytest.approx(report["blocks"] / wall)
    return per


# --------------------------------------------------------------------------- network


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lossy_fleet_of_50_all_update_verified_on_flash_and_server(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    key = _key_file(setup, tmp_path)
    out_json, out_png, work = tmp_path / "fleet.json", tmp_path / "fleet.png", tmp_path / "work"
    with running_server(setup.data) as server:
        done = subprocess.run(
            [
                sys.executable, "-m", "device_sim.fleet",
                "--server", server.uri, "--data", str(setup.data), "--key", str(key),
                "--devices", "50", "--image-size", "8K", "--block-size", "1024",
                "--loss", "0.05", "--concurrency", "25", "--seed", "5",
                "--timeout", "150", "--max-time", "240", "--work", str(work),
                "--report", str(out_json), "--plot", str(out_png), "--json",
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=280,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr == "", "progress must stay off when stderr is not a terminal"
    summary = json.loads(done.stdout)
    assert summary["devices"] == 50 and summary["completed"] == 50

    report = json.loads(out_json.read_text())
    per = _check_report_consistent(report)
    assert report["success_rate"] == 1.0
    settings = report["settings"]
    assert settings["impairment"]["loss"] == 0.05 and settings["release_seq"] == 2
    # The loss really happened on the way: the proxy dropped datagrams both ways.
    assert report["network"]["c2s"]["dropped"] > 0 and report["network"]["s2c"]["dropped"] > 0
    # Every device fetched the whole image (a retried attempt may fetch blocks again).
    assert all(d["blocks"] >= 8 and d["bytes"] >= 8192 for d in per)

    # Independent check 1: every flash, read as the bootloader does.
    image_sha = settings["image_sha256"]
    flashes = sorted(work.rglob("*.flash"))
    assert len(flashes) == 50
    for path in flashes:
        info = inspect(path)
        assert info["class_info"] == settings["class_info"]
        assert info["sequence_number"] == 2 and info["image_digest"] == image_sha
        assert info["boot_status"] == "confirmed" and info["bootable"]

    # Independent check 2: the server's store holds each device's confirmed report.
    store = DataDir(setup.data).open_store()
    try:
        for d in per:
            states = [(r.state, r.sequence_number) for r in store.list_reports(d["device"], 50)]
            assert ("confirmed", 2) in states, (d["device"], states)
        devices = [dev for dev in store.list_devices() if dev.class_info == settings["class_info"]]
    finally:
        store.close()
    assert len(devices) == 50
    assert report["server"]["devices_confirmed"] == 50
    assert report["server"]["reports_by_state"]["confirmed"] == 50

    width, height = _png_size(out_png.read_bytes())
    assert 300 <= width <= 4000 and 200 <= height <= 4000


@pytest.mark.network
@pytest.mark.timeout(180)
def test_two_processes_and_progress_log(tmp_path: Path) -> None:
    """--processes splits the fleet over spawned workers; results are merged, and an
    explicitly requested progress log on a non-terminal stays a few lines."""
    setup = make_setup(tmp_path)
    key = _key_file(setup, tmp_path)
    out_json = tmp_path / "fleet.json"
    with running_server(setup.data) as server:
        done = subprocess.run(
            [
                sys.executable, "-m", "device_sim.fleet",
                "--server", server.uri, "--data", str(setup.data), "--key", str(key),
                "--devices", "12", "--image-size", "4096", "--concurrency", "6",
                "--processes", "2", "--timeout", "60", "--max-time", "120",
                "--report", str(out_json), "--progress",
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=170,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out_json.read_text())
    per = _check_report_consistent(report)
    assert report["completed"] == 12 and report["settings"]["processes"] == 2
    assert {d["worker"] for d in per} == {0, 1}
    assert all(d["server_confirmed"] and d["flash_sequence"] == 2 for d in per)
    lines = done.stderr.splitlines()
    assert any("running 12 devices in 2 processes" in line for line in lines)
    assert "\r" not in done.stderr and len(lines) < 40, done.stderr
    assert done.stdout.startswith("fleet: 12/12 updated (100.0%)")


@pytest.mark.network
@pytest.mark.timeout(180)
def test_operator_mode_publishes_over_the_network(tmp_path: Path) -> None:
    """Without store access: devices registered beforehand, the release uploaded as an
    operator over DTLS, success judged from flash and acknowledged reports."""
    klass = "fleet-net-test"
    specs = [DeviceSpec(f"netdev-{i}", klass) for i in range(4)]
    setup = make_setup(tmp_path, devices=specs, operators=["ops"])
    key = _key_file(setup, tmp_path)
    devices_file = tmp_path / "devices.txt"
    devices_file.write_text(
        "# id psk\n" + "".join(f"{d.id} {d.psk.hex()}\n" for d in setup.devices.values())
    )
    out_json = tmp_path / "fleet.json"
    with running_server(setup.data) as server:
        done = subprocess.run(
            [
                sys.executable, "-m", "device_sim.fleet",
                "--server", server.uri, "--key", str(key), "--devices", "4",
                "--operator", "ops", "--operator-psk", setup.operators["ops"].hex(),
                "--devices-file", str(devices_file), "--class-info", klass,
                "--vendor-domain", specs[0].vendor_domain, "--image-size", "3000",
                "--timeout", "60", "--report", str(out_json),
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=170,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out_json.read_text())
    _check_report_consistent(report)
    assert report["completed"] == 4
    assert "not available" in report["server"]["store"]
    assert all(
        d["server_confirmed"] is None and d["queued_reports"] == 0 for d in report["per_device"]
    )
    store = DataDir(setup.data).open_store()
    try:
        for spec in specs:
            states = [r.state for r in store.list_reports(spec.id, 50)]
            assert "confirmed" in states
        (release,) = [
            r for r in store.list_releases(current_only=True) if r.class_label.endswith(klass)
        ]
        assert release.sequence_number == 2 and release.published_by == "operator:ops"
    finally:
        store.close()


@pytest.mark.network
@pytest.mark.timeout(180)
def test_given_release_is_published_and_installed(tmp_path: Path) -> None:
    """--release ENVELOPE IMAGE: that exact release (seq 5 here) is what every device
    ends up running; the factory gets seq 4."""
    setup = make_setup(tmp_path)
    key = _key_file(setup, tmp_path)
    klass = "fleet-given-release"
    release = setup.release(klass, 5, bytes(range(256)) * 20)
    out_json = tmp_path / "fleet.json"
    with running_server(setup.data) as server:
        done = subprocess.run(
            [
                sys.executable, "-m", "device_sim.fleet",
                "--server", server.uri, "--data", str(setup.data), "--key", str(key),
                "--devices", "3", "--class-info", klass, "--vendor-domain", VENDOR,
                "--timeout", "60",
                "--release", str(release.envelope_path), str(release.image_path),
                "--report", str(out_json),
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=170,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out_json.read_text())
    assert report["completed"] == 3 and report["settings"]["release_seq"] == 5
    assert report["settings"]["image_sha256"] == release.digest.hex()
    assert all(d["flash_sequence"] == 5 and d["server_confirmed"] for d in report["per_device"])

    # A release signed by a key the devices would not trust is refused up front.
    other = make_setup(tmp_path / "other")
    foreign = other.release(klass, 6, b"x" * 100)
    bad = _cli(
        "--server", "coaps://127.0.0.1:1", "--data", str(setup.data), "--key", str(key),
        "--devices", "1", "--class-info", klass, "--vendor-domain", VENDOR,
        "--release", str(foreign.envelope_path), str(foreign.image_path),
    )  # fmt: skip
    assert bad.returncode == 1 and "not signed by --key" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.network
@pytest.mark.timeout(120)
def test_sigterm_mid_run_cleans_up(tmp_path: Path) -> None:
    """Stopped half-way (as a CI runner would), the run still closes its proxies and
    agents and removes the temporary flash directory."""
    setup = make_setup(tmp_path)
    key = _key_file(setup, tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with running_server(setup.data) as server:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "device_sim.fleet",
                "--server", server.uri, "--data", str(setup.data), "--key", str(key),
                "--devices", "200", "--image-size", "64K", "--concurrency", "5",
                "--loss", "0.05", "--progress",
            ],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TMPDIR": str(scratch)},
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # wait until the devices are running
                if "running 200 devices" in line:
                    break
            assert any(scratch.iterdir()), "the flash files live in a temp dir"
            time.sleep(2.0)
            proc.terminate()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode != 0
    assert list(scratch.iterdir()) == []


# --------------------------------------------------------------------------- figures


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
    assert percentile(values, 50) == 5.0
    assert percentile(values, 95) == 10.0
    assert percentile(values, 99) == 10.0
    assert percentile(values, 10) == 1.0
    assert percentile(values, 0) == 1.0  # rank is at least 1
    assert percentile(values, 100) == 10.0
    assert percentile([], 50) is None
    assert percentile([3.5], 99) == 3.5
    hundred = [float(v) for v in range(1, 101)]
    assert [percentile(hundred, p) for p in (50, 95, 99)] == [50.0, 95.0, 99.0]


def _synthetic() -> FleetReport:
    devices = [DeviceOutcome(f"d{i}", "updated", "", float(i), 1000, 4, i % 2) for i in range(1, 9)]
    devices += [
        DeviceOutcome("t1", "timeout", "device deadline", None, 200, 1, 3),
        DeviceOutcome("f1", "failed", "unreachable"),
    ]
    return FleetReport(devices, wall_seconds=10.0, image_size=1000, settings={"k": 1})


def test_summary_on_synthetic_data(tmp_path: Path) -> None:
    report = _synthetic()
    s = report.summary()
    assert (s["devices"], s["completed"], s["failed"]) == (10, 8, 2)
    assert s["success_rate"] == 0.8
    assert (s["p50_seconds"], s["p95_seconds"], s["p99_seconds"]) == (4.0, 8.0, 8.0)
    assert s["max_seconds"] == 8.0
    assert s["blocks"] == 8 * 4 + 1 and s["blocks_per_second"] == pytest.approx(3.3)
    assert s["bytes"] == 8200 and s["retransmissions"] == 4 + 3
    assert s["failure_reasons"] == {"device deadline": 1, "unreachable": 1}

    path = tmp_path / "r.json"
    report.write_json(path)
    loaded = json.loads(path.read_text())
    assert loaded["settings"] == {"k": 1} and len(loaded["per_device"]) == 10
    _check_report_consistent(loaded)

    empty = FleetReport([], wall_seconds=0.0, image_size=1).summary()
    assert empty["success_rate"] == 0.0 and empty["p50_seconds"] is None

    png = tmp_path / "r.png"
    report.write_plot(png)
    width, height = _png_size(png.read_bytes())
    assert (width, height) == (800, 450)


def test_fleet_run_report_adds_update_times() -> None:
    devices: list[DeviceOutcome] = [
        FleetDeviceOutcome(
            f"d{i}", "updated", seconds=10.0 + i, duration=float(i), attempts=1 + (i == 3)
        )
        for i in range(1, 5)
    ]
    devices.append(FleetDeviceOutcome("x", "unconfirmed", "no report", duration=None, timeouts=2))
    s = FleetRunReport(devices, 20.0, 4096, network={"c2s": {"dropped": 1}}).summary()
    assert s["completed"] == 4 and s["success_rate"] == 0.8
    assert (s["update_p50_seconds"], s["update_p99_seconds"]) == (2.0, 4.0)
    assert s["p50_seconds"] == 12.0 and s["devices_retried"] == 1 and s["timeouts"] == 2
    full = FleetRunReport(devices, 20.0, 4096, network={"c2s": {"dropped": 1}}).to_json()
    assert full["network"] == {"c2s": {"dropped": 1}} and full["per_device"][0]["duration"] == 1.0


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_sim.fleet", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--loss", "2"], "probability"),
        (["--devices", "0"], "must be positive"),
        (["--block-size", "100"], "invalid choice"),
        (["--image-size", "lots"], "not a size"),
        (["--concurrency", "-3"], "must be positive"),
        (["--operator", "ops"], "not both"),
        (["--data", "/nonexistent/dir", "--server", "coap://127.0.0.1:1"], "coaps://"),
    ],
)
def test_bad_arguments_give_one_line_and_nonzero_exit(
    tmp_path: Path, extra: list[str], needle: str
) -> None:
    key = tmp_path / "k.pem"
    key.write_text("not a key")
    data = tmp_path / "data"
    data.mkdir()
    args = ["--server", "coaps://127.0.0.1:5684", "--devices", "3", "--key", str(key)]
    args += ["--data", str(data)]
    done = _cli(*args, *extra)
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("python -m device_sim.fleet")
    assert needle in lines[0] and "Traceback" not in done.stderr


def test_missing_store_access_and_bad_key_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    good = tmp_path / "good.pem"
    atomic_write(good, cose.generate_key("es256").pem, mode=0o600)
    base = ["--server", "coaps://127.0.0.1:5684", "--devices", "3", "--key", str(good)]
    cases = [
        (base, "--data DIR"),
        ([*base, "--operator", "ops", "--operator-psk", "00" * 16], "already be registered"),
        ([*base[:-1], str(tmp_path / "nokey.pem"), "--data", str(tmp_path)], "no such file"),
        ([*base[:-1], str(bad), "--data", str(tmp_path)], "private key"),
        ([*base, "--data", str(tmp_path)], "not an otacoap data directory"),
    ]
    for args, needle in cases:
        done = _cli(*args)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, done.stderr)


def test_register_adds_the_fleet_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="python -m device_sim")
    sub = parser.add_subparsers(dest="command")
    fleet_cli.register(sub)
    argv = ["fleet", "--server", "coaps://127.0.0.1:1", "--devices", "7", "--key", "k.pem"]
    argv += ["--data", "d", "--loss", "0.1", "--processes", "2", "--release", "e.suit", "i.bin"]
    args = parser.parse_args(argv)
    assert args.handler is fleet_cli.cmd_fleet
    assert (args.devices, args.loss, args.processes) == (7, 0.1, 2)
    assert args.release == [Path("e.suit"), Path("i.bin")]
    with pytest.raises(FleetError, match="--class-info"):
        fleet_cli.options_from_args(args)


def test_release_image_digest_is_what_devices_must_show() -> None:
    """The generated images are deterministic per label and differ between factory and
    release (a device still on the factory image can never pass verification)."""
    a = image_bytes("x:release", 5000)
    assert a == image_bytes("x:release", 5000) and len(a) == 5000
    assert hashlib.sha256(a).digest() != hashlib.sha256(image_bytes("x:factory", 5000)).digest()
