"""A network publish as an operator experiences it (issue 12 §2): a long upload shows
its progress, and Ctrl-C ends it with one line, exit 130, and the server drops the
partial upload at once instead of keeping it until the idle timeout."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import OTACOAP_CMD, ROOT, DeviceSpec, make_setup, running_server

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

CONFIG = """
[publish]
max_image_size = 33554432
[uploads]
idle_timeout = 600.0
"""


def _publish_cmd(uri: str, psk: bytes, envelope: Path, image: Path) -> list[str]:
    psk_file = envelope.parent / "ops.psk"
    psk_file.write_text(psk.hex())
    return [*OTACOAP_CMD, "publish", "--server", uri, "--identity", "ops", "--psk-file",
            str(psk_file), str(envelope), str(image)]  # fmt: skip


def _partial_uploads(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "blobs" / "tmp").glob("upload-*"))


@contextlib.contextmanager
def _slow_link(port: int) -> Iterator[str]:
    """A netem proxy adding 4 ms each way, so a 2 MiB upload takes about 20 s (over
    loopback it could end before the test interrupts it)."""
    proxy = subprocess.Popen(
        [sys.executable, "-m", "device_sim.netem", "--upstream", f"127.0.0.1:{port}",
         "--delay", "4"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None
        line = proxy.stdout.readline()
        match = re.search(r"listening on (\S+):(\d+)", line)
        assert match, line
        yield f"coaps://{match.group(1)}:{match.group(2)}"
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)


def test_progress_then_ctrl_c_withdraws_the_partial_upload(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")], operators=["ops"], config=CONFIG)
    release = setup.release("thermostat-t1", 2, os.urandom(2 << 20))
    with running_server(setup.data) as server, _slow_link(server.port) as uri:
        proc = subprocess.Popen(
            _publish_cmd(uri, setup.operators["ops"], release.envelope_path, release.image_path),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        seen: list[str] = []
        # Progress arrives as lines (stderr is not a terminal): wait for the first one.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("uploading ") and "(0 %)" not in line:
                break
        assert any("MiB" in s and " %)" in s for s in seen), seen
        assert _partial_uploads(setup.data), "the upload was in progress on the server"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        err = "".join(seen) + err
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        assert err.rstrip().splitlines()[-1] == (
            "otacoap publish: interrupted; the partial upload was withdrawn from the server"
        )
        # Withdrawn at once (the idle timeout is 10 minutes here).
        deadline = time.monotonic() + 10
        while _partial_uploads(setup.data) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _partial_uploads(setup.data) == []
        assert (
            "upload image from operator:ops cancelled by its operator"
            in server.log_path.read_text()
        )


def test_a_small_publish_stays_quiet(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")], operators=["ops"], config=CONFIG)
    release = setup.release("thermostat-t1", 2, os.urandom(5000))
    with running_server(setup.data) as server:
        result = subprocess.run(
            _publish_cmd(server.uri, setup.operators["ops"], release.envelope_path,
                         release.image_path),
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "uploading" not in result.stderr and "published" in result.stdout
