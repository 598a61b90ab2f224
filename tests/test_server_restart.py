"""Restarts: graceful (SIGTERM) and SIGKILL (ATTACKS.md #49). What was acknowledged is
still there, the audit chain verifies, and a download resumes at its block."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from server_helpers import (
    CLASS_A,
    DeviceSpec,
    cli_ok,
    coaps_client,
    fetch_blocks,
    get,
    make_image,
    make_setup,
    request,
    run,
    squeeze,
    start_server,
)

from otacoap.core import protocol
from otacoap.core.report import Report, State

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore:DTLS module did not shut down"),
]


def _report(counter: int, state: State = State.DOWNLOADING) -> aiocoap.Message:
    return aiocoap.Message(
        code=Code.POST,
        payload=Report(counter=counter, state=state).encode(),
        content_format=protocol.CF_REPORT,
    )


def test_graceful_restart_keeps_everything_and_resumes_the_download(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")], operators=["ops"])
    psk = setup.devices["t1"].psk
    rel = setup.release(CLASS_A, 7, make_image("resume", 40_000))
    setup.publish(rel)
    image_uri = rel.image_uri

    server = start_server(setup.data)
    port = server.port
    try:

        async def first_half() -> bytes:
            async with coaps_client(port, "t1", psk) as ctx:
                got = b""
                for num in range(15):
                    r = await get(ctx, server.uri + image_uri, block2=(num, 0, 6))
                    got += r.payload
                msg = _report(1)
                msg.set_request_uri(server.uri + "/r")
                assert (await request(ctx, msg)).code == Code.CHANGED
                return got

        head = run(first_half())
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0 and "stopped" in server.lines
    assert "shutting down" in server.log()
    assert list((setup.data / "blobs" / "tmp").iterdir()) == []

    server = start_server(setup.data, port=port)  # same port, as a device would expect
    try:
        assert server.port == port

        async def second_half() -> tuple[bytes, bytes, Code]:
            async with coaps_client(port, "t1", psk) as ctx:
                m = await get(ctx, server.uri + "/m")
                tail = await fetch_blocks(ctx, server.uri + image_uri, start=15)
                msg = _report(1, State.INSTALLED)  # counter 1 was accepted before the restart
                msg.set_request_uri(server.uri + "/r")
                replay = (await request(ctx, msg)).code
                return m.payload, tail, replay

        envelope, tail, replay = run(second_half())  # type: ignore[misc]
    finally:
        server.stop()
    assert envelope == rel.envelope
    assert head + tail == rel.image  # type: ignore[operator]
    assert replay == Code.CONFLICT
    assert "  t1  1  downloading  " in squeeze(cli_ok("report", "list", "--data", setup.data))
    (t1,) = json.loads(cli_ok("device", "list", "--data", setup.data, "--json"))
    assert (t1["id"], t1["class"], t1["last_report_counter"], t1["state"]) == (
        "t1",
        "acme-devices.example/thermostat-t1",
        1,
        "downloading",
    )
    assert "audit log OK" in cli_ok("audit", "verify", "--data", setup.data)


def test_sigkill_loses_no_acknowledged_report_and_no_half_upload_survives(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")], operators=["ops"])
    psk, ops = setup.devices["t1"].psk, setup.operators["ops"]
    setup.publish(setup.release(CLASS_A, 1, make_image("k", 1000)))
    server = start_server(setup.data)
    try:

        async def work() -> list[Code]:
            codes = []
            async with coaps_client(server.port, "operator:ops", ops) as octx:
                msg = aiocoap.Message(
                    code=Code.POST, uri=server.uri + "/admin/image", payload=b"x" * 1024,
                    content_format=protocol.CF_IMAGE, block1=(0, True, 6),
                )  # fmt: skip
                assert (await request(octx, msg)).code == Code.CONTINUE
            async with coaps_client(server.port, "t1", psk) as ctx:
                for counter in range(1, 21):
                    msg = _report(counter)
                    msg.set_request_uri(server.uri + "/r")
                    codes.append((await request(ctx, msg)).code)
            return codes

        codes = run(work())
        assert codes == [Code.CHANGED] * 20
        assert [p.name[:7] for p in (setup.data / "blobs" / "tmp").iterdir()] == ["upload-"]
    finally:
        server.stop(signal.SIGKILL)
    # Every acknowledged report is on disk, right after kill -9.
    listing = json.loads(cli_ok("report", "list", "--data", setup.data, "--limit", "100", "--json"))
    assert [r["counter"] for r in listing] == list(range(1, 21))
    assert "audit log OK" in cli_ok("audit", "verify", "--data", setup.data)
    server = start_server(setup.data)
    try:
        # The half-done upload of the killed server is gone; nothing was published.
        assert list((setup.data / "blobs" / "tmp").iterdir()) == []
        assert [
            r["seq"] for r in json.loads(cli_ok("release", "list", "--data", setup.data, "--json"))
        ] == [1]
    finally:
        server.stop()


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    server = start_server(setup.data)
    try:
        with pytest.raises(RuntimeError, match="already using"):
            start_server(setup.data, timeout=10)
    finally:
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_cleanly(tmp_path: Path, sig: int) -> None:
    setup = make_setup(tmp_path)
    server = start_server(setup.data)
    assert server.stop(sig, timeout=10) == 0
    assert server.lines[-1] == "stopped"
    assert "Traceback" not in server.log()
