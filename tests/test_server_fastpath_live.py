"""The /fw fast path in a running server: it serves real DTLS clients, keeps no
per-request state, follows release changes, and answers like aiocoap on the wire."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import CON
from server_helpers import (
    CLASS_A,
    CLASS_B,
    DeviceSpec,
    Setup,
    ThreadedServer,
    coaps_client,
    fetch_blocks,
    get,
    make_image,
    make_setup,
    run,
    threaded_server,
)

from otacoap.server.coap.dedup import BoundedMessageManager
from otacoap.server.fastpath import FirmwareFastPath

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore:DTLS module did not shut down"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    s = make_setup(
        tmp_path_factory.mktemp("fastlive"),
        devices=[DeviceSpec("t1"), DeviceSpec("t2"), DeviceSpec("s1", CLASS_B)],
    )
    s.publish(s.release(CLASS_A, 1, make_image("live-1", 20_000)))
    s.publish(s.release(CLASS_B, 1, make_image("live-b", 3000)))
    return s


@pytest.fixture(scope="module")
def server(setup: Setup) -> Iterator[ThreadedServer]:
    with threaded_server(setup.data, plain_coap=True, plain_port=0, plain_identity="t2") as srv:
        yield srv


def _fast(server: ThreadedServer) -> FirmwareFastPath:
    fast = server.server.fastpath
    assert fast is not None
    return fast


def _served(server: ThreadedServer) -> int:
    return int(server.call(lambda: _fast(server).served))  # type: ignore[call-overload]


def _dedup_size(server: ThreadedServer) -> int:
    def size() -> int:
        ctx = server.server.context
        assert ctx is not None
        mman = ctx.request_interfaces[0].token_interface
        assert isinstance(mman, BoundedMessageManager)
        return len(mman.dedup)

    return int(server.call(size))  # type: ignore[call-overload]


def test_dtls_clients_are_served_by_the_fast_path_without_dedup_entries(
    setup: Setup, server: ThreadedServer
) -> None:
    image = setup.release(CLASS_A, 1, make_image("live-1", 20_000))
    before, dedup_before = _served(server), _dedup_size(server)

    async def go() -> bytes:
        async with coaps_client(server.port, "t1", setup.devices["t1"].psk) as ctx:
            return await fetch_blocks(ctx, server.uri + image.image_uri)

    assert run(go()) == image.image
    assert _served(server) - before == 20  # every block, none through aiocoap
    assert _dedup_size(server) == dedup_before  # nothing remembered per block


def test_refusals_still_come_from_the_resource(setup: Setup, server: ThreadedServer) -> None:
    image = setup.release(CLASS_A, 1, make_image("live-1", 20_000))
    before = _served(server)

    async def go() -> tuple[Code, Code]:
        async with coaps_client(server.port, "s1", setup.devices["s1"].psk) as ctx:
            wrong = await get(ctx, server.uri + image.image_uri, block2=(0, 0, 6))
        async with coaps_client(server.port, "t1", setup.devices["t1"].psk) as ctx:
            past = await get(ctx, server.uri + image.image_uri, block2=(20, 0, 6))
        return wrong.code, past.code

    assert run(go()) == (Code.NOT_FOUND, Code.BAD_REQUEST)
    assert _served(server) == before


def _exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.send(data)
    return sock.recv(4096)


def test_plain_answers_are_the_same_with_and_without_the_fast_path(
    setup: Setup, server: ThreadedServer
) -> None:
    """On the wire, via the --insecure-plain-identity listener (device t2)."""
    image = setup.release(CLASS_A, 1, make_image("live-1", 20_000))
    plain = server.server.plain
    assert plain is not None
    fast = _fast(server)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.server.plain_port))
    mid = 0x4000
    before = _served(server)
    try:
        for block2 in [(0, 0, 6), (19, 0, 6), (7, 0, 2), None, (20, 0, 6)]:
            answers = []
            for enabled in (True, False):
                server.call(lambda on=enabled: setattr(plain, "fast", fast if on else None))
                msg = aiocoap.Message(code=Code.GET, uri_path=("fw", image.image_id))
                msg.mtype, msg.mid, msg.token = CON, mid, b"\x07\x08"
                mid += 1
                if block2 is not None:
                    msg.opt.block2 = block2
                raw = _exchange(sock, msg.encode())
                answers.append(raw[:2] + raw[4:])  # all but the Message ID
            assert answers[0] == answers[1], block2
        assert _served(server) - before == 4  # all but the block past the end
    finally:
        server.call(lambda: setattr(plain, "fast", fast))
        sock.close()


def test_a_new_release_moves_the_fast_path_with_it(setup: Setup, server: ThreadedServer) -> None:
    old = setup.release(CLASS_A, 1, make_image("live-1", 20_000))
    new = setup.release(CLASS_A, 2, make_image("live-2", 5000))

    async def first_block(uri: str) -> aiocoap.Message:
        async with coaps_client(server.port, "t1", setup.devices["t1"].psk) as ctx:
            return await get(ctx, server.uri + uri, block2=(0, 0, 6))

    assert run(first_block(old.image_uri)).code == Code.CONTENT  # type: ignore[attr-defined]
    setup.publish(new)
    deadline = time.monotonic() + 10
    while run(first_block(old.image_uri)).code != Code.NOT_FOUND:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the server kept serving the old image"
        time.sleep(0.2)
    before = _served(server)

    async def whole() -> bytes:
        async with coaps_client(server.port, "t1", setup.devices["t1"].psk) as ctx:
            return await fetch_blocks(ctx, server.uri + new.image_uri)

    assert run(whole()) == new.image
    assert _served(server) - before == 5


def test_one_session_sees_the_release_change_too(setup: Setup, server: ThreadedServer) -> None:
    """The verdict cached on a DTLS session is dropped when the release moves.

    Runs last in this module (seq 10 and 11 stay above the earlier tests' releases)."""
    current = setup.release(CLASS_A, 10, make_image("live-10", 5000))
    new = setup.release(CLASS_A, 11, make_image("live-11", 3000))
    setup.publish(current)

    async def go() -> bytes:
        async with coaps_client(server.port, "t1", setup.devices["t1"].psk) as ctx:
            deadline = time.monotonic() + 10
            while (
                await get(ctx, server.uri + current.image_uri, block2=(0, 0, 6))
            ).code != Code.CONTENT:
                assert time.monotonic() < deadline, "the new release never showed"
                await asyncio.sleep(0.2)
            setup.publish(new)
            deadline = time.monotonic() + 10
            while (
                await get(ctx, server.uri + current.image_uri, block2=(0, 0, 6))
            ).code != Code.NOT_FOUND:
                assert time.monotonic() < deadline, "the session kept the old image"
                await asyncio.sleep(0.2)
            return await fetch_blocks(ctx, server.uri + new.image_uri)

    assert run(go()) == new.image
