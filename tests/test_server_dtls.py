"""The server over real DTLS on loopback: libcoap interop, stateless Block2, identity
from the session (ATTACKS.md #24, #25, #30, #32, #33)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from server_helpers import (
    CLASS_A,
    CLASS_B,
    DeviceSpec,
    ReleaseFiles,
    ServerProcess,
    Setup,
    cli_ok,
    coap_client,
    coaps_client,
    dtls_relay,
    fetch_blocks,
    get,
    make_image,
    make_setup,
    request,
    run,
    running_server,
    squeeze,
)

from otacoap.core import protocol
from otacoap.core.errors import ReportReason
from otacoap.core.report import Report, State

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore:DTLS module did not shut down"),
]

LIB_PSK = b"libcoap-secret-1"  # libcoap 4.3.1 takes -k as text


@dataclass
class World:
    setup: Setup
    server: ServerProcess
    a: ReleaseFiles
    b: ReleaseFiles

    def psk(self, device: str) -> bytes:
        return self.setup.devices[device].psk


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("dtls")
    setup = make_setup(
        base,
        devices=[
            DeviceSpec("t1"),
            DeviceSpec("t2"),
            DeviceSpec("s1", CLASS_B),
            DeviceSpec("lib1", psk=LIB_PSK),
            DeviceSpec("gone"),
        ],
        operators=["ops"],
    )
    a = setup.release(CLASS_A, 1, make_image("class-a", 110_000))  # 108 blocks of 1024
    b = setup.release(CLASS_B, 1, make_image("class-b", 3000))
    setup.publish(a)
    setup.publish(b)
    with running_server(setup.data) as server:
        yield World(setup, server, a, b)


def test_libcoap_fetches_the_image_byte_identically(world: World, tmp_path: Path) -> None:
    out = tmp_path / "fw.bin"
    result = coap_client(
        world.server.uri + world.a.image_uri, "lib1", LIB_PSK, "-b", "1024", out=out
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == world.a.image


def test_libcoap_can_start_at_block_100(world: World, tmp_path: Path) -> None:
    """libcoap 4.3.1 fetches just the one block when given a start block (`-b 100,1024`),
    so resume block by block, each request its own session: the server keeps no state."""
    total = len(world.a.image)
    pieces = []
    for num in range(100, -(-total // 1024)):
        out = tmp_path / f"b{num}"
        result = coap_client(
            world.server.uri + world.a.image_uri, "lib1", LIB_PSK, "-b", f"{num},1024", out=out
        )
        assert result.returncode == 0, result.stderr
        pieces.append(out.read_bytes())
    assert b"".join(pieces) == world.a.image[100 * 1024 :]


def test_explicit_block2_from_any_block_and_any_size(world: World) -> None:
    image, uri = world.a.image, world.server.uri + world.a.image_uri

    async def go() -> None:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            assert await fetch_blocks(ctx, uri, start=100) == image[100 * 1024 :]
            # 16-byte blocks (SZX 0), starting in the middle.
            r = await get(ctx, uri, block2=(4000, 0, 0))
            assert r.code == Code.CONTENT and r.payload == image[64000:64016]
            assert r.opt.block2.block_number == 4000 and r.opt.block2.more
            assert r.opt.size2 == len(image)
            assert r.opt.etag == protocol.etag_for(world.a.digest)
            assert r.opt.content_format == protocol.CF_IMAGE
            # No Block2 option: the server starts block-wise itself with 1024 bytes.
            r = await get(ctx, uri)
            assert r.payload == image[:1024] and r.opt.block2 == (0, 1, 6)
            # Last block: short, M=0.
            r = await get(ctx, uri, block2=(107, 0, 6))
            assert r.payload == image[107 * 1024 :] and not r.opt.block2.more

    run(go())


@pytest.mark.parametrize("block2", [(108, 0, 6), (6875, 0, 0), ((1 << 20) - 1, 0, 6), (0, 0, 7)])
def test_blocks_past_the_end_or_reserved_szx_are_4_00(
    world: World, block2: tuple[int, int, int]
) -> None:
    async def go() -> None:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            r = await get(ctx, world.server.uri + world.a.image_uri, block2=block2)
            assert r.code == Code.BAD_REQUEST, (block2, r)
            assert r.payload != world.a.image[-len(r.payload) :] or not r.payload

    run(go())


def test_each_device_gets_its_own_class_manifest(world: World) -> None:
    async def go() -> None:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            r = await get(ctx, world.server.uri + "/m")
            assert r.code == Code.CONTENT and r.payload == world.a.envelope
            assert r.opt.content_format == protocol.CF_ENVELOPE
            etag = r.opt.etag
            again = aiocoap.Message(code=Code.GET, uri=world.server.uri + "/m")
            again.opt.etags = [etag]
            r = await request(ctx, again)
            assert r.code == Code.VALID and r.payload == b"" and r.opt.etag == etag
        async with coaps_client(world.server.port, "s1", world.psk("s1")) as ctx:
            r = await get(ctx, world.server.uri + "/m")
            assert r.code == Code.CONTENT and r.payload == world.b.envelope

    run(go())


def test_a_device_cannot_read_another_class_image(world: World) -> None:
    a_id = world.a.image_id
    variants = [
        world.a.image_uri,
        "/fw/" + a_id.upper(),
        "/fw/" + a_id + "/",
        "/fw/" + a_id + "%2F",
        "/fw/" + a_id[:-1],
        "/fw/" + a_id + "0",
        "/fw/%66%77/" + a_id,
        "/fw",
        "/fw/" + world.a.digest.hex(),
    ]

    async def go() -> None:
        async with coaps_client(world.server.port, "s1", world.psk("s1")) as ctx:
            for path in variants:
                r = await get(ctx, world.server.uri + path)
                assert r.code == Code.NOT_FOUND, (path, r.code)
                assert world.a.image[:32] not in r.payload
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            r = await get(ctx, world.server.uri + world.b.image_uri)
            assert r.code == Code.NOT_FOUND
        # An operator is no device: no manifest, no image.
        async with coaps_client(
            world.server.port, "operator:ops", world.setup.operators["ops"]
        ) as ctx:
            assert (await get(ctx, world.server.uri + "/m")).code == Code.NOT_FOUND
            r = await get(ctx, world.server.uri + world.a.image_uri)
            assert r.code == Code.NOT_FOUND

    run(go())
    audit = cli_ok("audit", "list", "--data", world.setup.data, "--limit", "500")
    assert "device:s1  fw.get" in squeeze(audit) and "refused" in audit


def _post(uri: str, payload: bytes, cf: int | None = protocol.CF_REPORT) -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.POST, uri=uri, payload=payload)
    if cf is not None:
        msg.opt.content_format = cf
    return msg


def test_reports_are_attributed_to_the_session_identity(world: World) -> None:
    uri = world.server.uri + "/r"
    first = Report(counter=1, state=State.DOWNLOADING, bytes_received=1024).encode()

    async def go() -> None:
        async with coaps_client(world.server.port, "t2", world.psk("t2")) as ctx:
            assert (await request(ctx, _post(uri, first))).code == Code.CHANGED
            # An exact retransmission is acknowledged but not counted twice.
            assert (await request(ctx, _post(uri, first))).code == Code.CHANGED
            other = Report(counter=1, state=State.INSTALLED).encode()
            assert (await request(ctx, _post(uri, other))).code == Code.CONFLICT
            stale = Report(counter=0, state=State.CONFIRMED).encode()
            assert (await request(ctx, _post(uri, stale))).code == Code.CONFLICT
            # Claiming to be someone else in the body is not part of the format.
            forged = cbor2.dumps({-4: 5, -1: "installed", "device": "s1"})
            assert (await request(ctx, _post(uri, forged))).code == Code.BAD_REQUEST
            r = await request(ctx, _post(uri, b"{}", cf=0))
            assert r.code == Code.UNSUPPORTED_CONTENT_FORMAT
            r = await request(ctx, _post(uri, b"\x00" * 1100))
            assert r.code == Code.REQUEST_ENTITY_TOO_LARGE and r.opt.size1 == 1024
            failed = Report(counter=2, state=State.FAILED, reason=ReportReason.CONDITION_FAILED)
            assert (await request(ctx, _post(uri, failed.encode()))).code == Code.CHANGED
        async with coaps_client(
            world.server.port, "operator:ops", world.setup.operators["ops"]
        ) as ctx:
            assert (await request(ctx, _post(uri, first))).code == Code.FORBIDDEN

    run(go())
    listing = json.loads(cli_ok("report", "list", "--data", world.setup.data, "--json"))
    rows = [(r["counter"], r["state"], r["reason"]) for r in listing if r["device"] == "t2"]
    assert rows == [(1, "downloading", "ok"), (2, "failed", "condition_failed")]
    assert all(r["device"] != "s1" for r in listing)
    assert "last report counter: -" in cli_ok("device", "show", "--data", world.setup.data, "s1")


def test_wrong_psk_or_unknown_identity_gets_no_data(world: World, tmp_path: Path) -> None:
    before = cli_ok("report", "list", "--data", world.setup.data)

    async def attempt(identity: str, psk: bytes) -> str:
        async with coaps_client(world.server.port, identity, psk) as ctx:
            try:
                r = await request(
                    ctx,
                    _post(world.server.uri + "/r", Report(99, State.CONFIRMED).encode()),
                    timeout=2,
                )
            except (TimeoutError, aiocoap.error.Error) as exc:
                return type(exc).__name__
            return f"answered {r.code}"

    async def go() -> list[str]:
        # The real device keeps working while the attempts run (ATTACKS.md #30).
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            attempts = asyncio.gather(
                attempt("t1", os.urandom(16)),
                attempt("nobody", os.urandom(16)),
                attempt("x" * 40, os.urandom(16)),
            )
            r = await get(ctx, world.server.uri + "/m")
            assert r.code == Code.CONTENT
            return list(await attempts)

    t0 = time.monotonic()
    outcomes = run(go())
    assert time.monotonic() - t0 < 10
    assert not any(o.startswith("answered") for o in outcomes), outcomes  # type: ignore[union-attr]
    out = tmp_path / "stolen.bin"
    result = coap_client(
        world.server.uri + world.a.image_uri, "lib1", b"wrong-secret-123", out=out, timeout=2
    )
    assert not out.exists() or out.read_bytes() == b"", result
    assert cli_ok("report", "list", "--data", world.setup.data) == before


def test_devices_get_4_03_on_admin_and_nothing_is_created(world: World) -> None:
    tmp = world.setup.data / "blobs" / "tmp"

    async def go() -> None:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            for path in ("/admin/image", "/admin/release"):
                msg = _post(world.server.uri + path, b"x" * 64, cf=protocol.CF_IMAGE)
                msg.opt.block1 = (0, True, 2)
                r = await request(ctx, msg)
                assert r.code == Code.FORBIDDEN
            r = await get(ctx, world.server.uri + "/admin")
            assert r.code == Code.NOT_FOUND

    run(go())
    assert list(tmp.iterdir()) == []
    assert "device:t1  admin" in squeeze(
        cli_ok("audit", "list", "--data", world.setup.data, "--limit", "500")
    )


def test_well_known_core_lists_the_device_resources(world: World) -> None:
    async def go() -> bytes:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            r = await get(ctx, world.server.uri + "/.well-known/core")
            assert r.code == Code.CONTENT and r.opt.content_format == 40
            return bytes(r.payload)

    links = run(go()).decode()  # type: ignore[union-attr]
    assert '</m>;ct="60";rt="otacoap.manifest";obs' in links
    assert "</r>" in links and "admin" not in links


def test_the_manifest_is_block2_too_when_asked_for_small_blocks(world: World) -> None:
    async def go() -> bytes:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            return await fetch_blocks(ctx, world.server.uri + "/m", szx=0)

    assert run(go()) == world.a.envelope


def test_a_removed_device_loses_access_on_its_open_session(world: World) -> None:
    async def code_of(ctx: aiocoap.Context, uri: str) -> Code | None:
        # No answer at all (the session may be dropped with the device) is also no access.
        try:
            return (await get(ctx, uri, timeout=10.0)).code
        except (TimeoutError, aiocoap.error.Error):
            return None

    async def go() -> list[Code | None]:
        async with coaps_client(world.server.port, "gone", world.psk("gone")) as ctx:
            codes = [await code_of(ctx, world.server.uri + "/m")]
            await asyncio.to_thread(cli_ok, "device", "remove", "--data", world.setup.data, "gone")
            for _ in range(40):  # the server polls the DB about once a second
                code = await code_of(ctx, world.server.uri + "/m")
                if code != Code.CONTENT:
                    break
                await asyncio.sleep(0.1)
            codes.append(code)
            codes.append(await code_of(ctx, world.server.uri + world.a.image_uri))
            return codes

    codes = run(go(), timeout=180.0)
    assert codes[0] == Code.CONTENT
    assert all(c in (Code.UNAUTHORIZED, None) for c in codes[1:]), codes


def test_a_lost_server_finished_is_sent_again_when_the_client_repeats_its_flight(
    world: World,
) -> None:
    """RFC 6347 §4.2.4: a server whose last flight (ChangeCipherSpec, Finished) was
    lost must send it again when the client retransmits its own final flight. A relay
    drops exactly that flight of the first handshake; the device's request must still
    succeed on that handshake, in about one client retransmission (~1-2 s), not after
    the device gives up on the session."""
    from device_sim.coap import CoapTransport

    async def go() -> tuple[float, int, int]:
        loop = asyncio.get_running_loop()
        state = {"dropping": True, "dropped": 0, "client_hellos": 0}

        def forward(data: bytes, from_server: bool) -> bool:
            # DTLS record header: type, version, epoch (bytes 3-4), ... (RFC 6347 §4.1).
            if not from_server:
                if data[0] == 22 and data[3:5] == b"\x00\x00" and data[13] == 1:
                    state["client_hellos"] += 1
                return True
            # The server's final flight: ChangeCipherSpec (20), then Finished
            # (handshake, 22) in epoch 1.
            final = data[0] == 20 or (data[0] == 22 and data[3:5] == b"\x00\x01")
            if state["dropping"] and final:
                state["dropped"] += 1
                state["dropping"] = state["dropped"] < 2
                return False
            return True

        async with dtls_relay(world.server.port, forward) as port:
            transport = CoapTransport(f"coaps://127.0.0.1:{port}", "t2", world.psk("t2"))
            try:
                t0 = loop.time()
                resp = await transport.get("/m", block2=(0, 0, 6), timeout=10.0)
                assert resp.code == Code.CONTENT
                return loop.time() - t0, state["dropped"], state["client_hellos"]
            finally:
                await transport.close()

    took, dropped, hellos = run(go())
    assert dropped >= 1, "the relay saw the server's final flight"
    assert hellos <= 2, "one handshake (ClientHello, then again with the cookie)"
    assert took < 6.0
