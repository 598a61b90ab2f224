"""The /fw fast path answers exactly what aiocoap's FirmwareResource path would, byte for
byte, and declines everything else (otacoap/server/fastpath.py).

The oracle is the slow path itself: aiocoap decodes the request, FirmwareResource
renders it, and aiocoap encodes the piggybacked ACK. No sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import ACK, CON, NON
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import (
    CLASS_A,
    CLASS_B,
    DeviceSpec,
    SessionRemote,
    Setup,
    make_image,
    make_setup,
)

from otacoap.server.fastpath import FirmwareFastPath
from otacoap.server.resources import FirmwareResource
from otacoap.server.store_view import StoreView
from otacoap.store import DataDir

IMAGE_SIZE = 5000  # 5 blocks of 1024, the last one short


@dataclass
class World:
    setup: Setup
    state: StoreView
    fast: FirmwareFastPath
    image: bytes
    image_id: str
    other_id: str

    def remote(self, identity: str) -> SessionRemote:
        _, principal = self.state.psks.find_dtls_psk(identity.encode())
        return SessionRemote([principal])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    setup = make_setup(
        tmp_path_factory.mktemp("fastpath"),
        devices=[DeviceSpec("t1"), DeviceSpec("s1", CLASS_B)],
        operators=["ops"],
    )
    image = make_image("fast", IMAGE_SIZE)
    a = setup.release(CLASS_A, 1, image)
    b = setup.release(CLASS_B, 1, make_image("other", 3000))
    setup.publish(a)
    setup.publish(b)
    datadir = DataDir(setup.data)
    state = StoreView(datadir, datadir.config())
    fast = FirmwareFastPath(state)
    try:
        yield World(setup, state, fast, image, a.image_id, b.image_id)
    finally:
        fast.close()
        asyncio.run(state.close())


def request(
    path: str,
    *,
    block2: tuple[int, int, int] | None = None,
    mtype: Any = CON,
    code: Code = Code.GET,
    mid: int = 0x1234,
    token: bytes = b"\x01\x02",
    payload: bytes = b"",
    **options: Any,
) -> bytes:
    msg = aiocoap.Message(code=code, payload=payload)
    msg.mtype, msg.mid, msg.token = mtype, mid, token
    msg.opt.uri_path = tuple(path.strip("/").split("/"))
    if block2 is not None:
        msg.opt.block2 = block2
    for name, value in options.items():
        setattr(msg.opt, name, value)
    return msg.encode()


def oracle(world: World, remote: SessionRemote, data: bytes) -> bytes:
    """The slow path's answer: aiocoap decode, FirmwareResource's rendering, encode."""
    req = aiocoap.Message.decode(data, remote)
    assert req.code == Code.GET and req.mtype is CON
    assert req.opt.uri_path == ("fw", world.image_id)
    # As aiocoap's Site hands it to the resource: the resource's own path stripped.
    stripped = req.copy(uri_path=req.opt.uri_path[1:])
    resp = asyncio.run(FirmwareResource(world.state).render(stripped))
    assert resp.code == Code.CONTENT
    resp.mtype, resp.mid, resp.token = ACK, req.mid, req.token
    return bytes(resp.encode())


def fw(world: World) -> str:
    return f"fw/{world.image_id}"


@pytest.mark.parametrize("szx", range(7))
def test_every_block_at_every_size_matches_aiocoap(world: World, szx: int) -> None:
    remote = world.remote("t1")
    size = 16 << szx
    blocks = -(-IMAGE_SIZE // size)
    nums = sorted({0, 1, blocks // 2, blocks - 2, blocks - 1} - {-1})
    for num in nums:
        data = request(fw(world), block2=(num, 0, szx))
        got = world.fast.handle(remote, data)
        assert got is not None, (num, szx)
        assert got == oracle(world, remote, data)
        reply = aiocoap.Message.decode(got)
        assert reply.payload == world.image[num * size : (num + 1) * size]


@pytest.mark.parametrize(
    "variant",
    [
        {},  # no Block2: the server starts block-wise itself (RFC 7959 §2.4)
        {"block2": (2, 0, 6), "token": b""},
        {"block2": (3, 0, 6), "token": b"12345678"},
        {"block2": (0, 1, 6)},  # M set in a request has no meaning; ignored
        {"block2": (1, 0, 6), "uri_host": "example.com"},
        {"block2": (1, 0, 6), "uri_port": 1234},
        {"block2": (1, 0, 6), "size2": 0},  # "please tell me the size"
        {"block2": (200, 0, 0)},  # 16-byte blocks deep inside
    ],
)
def test_request_variants_match_aiocoap(world: World, variant: dict[str, Any]) -> None:
    remote = world.remote("t1")
    data = request(fw(world), **variant)
    got = world.fast.handle(remote, data)
    assert got is not None
    assert got == oracle(world, remote, data)


def test_a_lower_remote_block_limit_is_honoured(world: World) -> None:
    remote = world.remote("t1")
    remote.maximum_block_size_exp = 4
    data = request(fw(world), block2=(1, 0, 6))
    got = world.fast.handle(remote, data)
    assert got is not None and got == oracle(world, remote, data)
    assert aiocoap.Message.decode(got).opt.block2 == (4, 1, 4)  # same offset, 256 bytes


def test_a_duplicate_is_answered_again_identically(world: World) -> None:
    """RFC 7252 §4.5 relaxed for an idempotent GET: no per-request memory."""
    remote = world.remote("t1")
    data = request(fw(world), block2=(1, 0, 6))
    assert world.fast.handle(remote, data) == world.fast.handle(remote, data) is not None


@pytest.mark.parametrize(
    ("identity", "data_fn"),
    [
        ("t1", lambda w: request(fw(w), block2=(1, 0, 6), mtype=NON)),
        ("t1", lambda w: request(fw(w), block2=(1, 0, 6), code=Code.POST)),
        ("t1", lambda w: request(fw(w), block2=(1, 0, 6), code=Code.FETCH)),
        ("t1", lambda w: request(fw(w), block2=(1, 0, 6), payload=b"x")),
        ("t1", lambda w: request(fw(w), block2=(1, 0, 6), observe=0)),
        ("t1", lambda w: request(fw(w), block2=(1, 0, 6), etags=[b"12345678"])),
        ("t1", lambda w: request(fw(w), block2=(1, 0, 6), accept=42)),
        ("t1", lambda w: request(fw(w), block2=(1, 0, 6), uri_query=["a"])),
        ("t1", lambda w: request(fw(w), block2=(1, 0, 6), no_response=0)),
        ("t1", lambda w: request(fw(w) + "/x", block2=(1, 0, 6))),
        ("t1", lambda w: request(fw(w).upper().replace("FW", "fw"), block2=(1, 0, 6))),
        ("t1", lambda w: request("fw", block2=(1, 0, 6))),
        ("t1", lambda w: request(f"m/{w.image_id}", block2=(1, 0, 6))),
        ("t1", lambda w: request(f"fw/{w.other_id}", block2=(1, 0, 6))),  # not its image
        ("t1", lambda w: request(fw(w), block2=(5, 0, 6))),  # starts past the end
        ("t1", lambda w: request(fw(w), block2=(0, 0, 7))),  # SZX 7 is reserved
        ("t1", lambda w: request(fw(w), block2=((1 << 20) - 1, 0, 6))),
        ("s1", lambda w: request(fw(w), block2=(0, 0, 6))),  # another class's image
        ("operator:ops", lambda w: request(fw(w), block2=(0, 0, 6))),
    ],
)
def test_everything_else_is_left_to_aiocoap(world: World, identity: str, data_fn: Any) -> None:
    assert world.fast.handle(world.remote(identity), data_fn(world)) is None


def test_no_identity_no_fast_answer(world: World) -> None:
    data = request(fw(world), block2=(0, 0, 6))
    assert world.fast.handle(SessionRemote([None]), data) is None
    assert world.fast.handle(SessionRemote([], scheme="coap"), data) is None


def test_malformed_bytes_are_left_to_aiocoap(world: World) -> None:
    remote = world.remote("t1")
    good = request(fw(world), block2=(1, 0, 6))
    for bad in (
        b"",
        good[:3],
        good[:-1],  # Block2 value cut short
        good[:10],  # inside the path
        bytes([0x49]) + good[1:],  # TKL 9 is reserved
        bytes([0x80]) + good[1:],  # version 2
        good[:6] + bytes([0xF0]) + good[7:],  # option delta 15 is reserved
        good + b"\xff",  # payload marker without payload
    ):
        assert world.fast.handle(remote, bad) is None, bad.hex()


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    num=st.integers(0, 6),
    szx=st.integers(0, 7),
    flips=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 3),
    extra=st.binary(max_size=4),
)
def test_mutated_requests_never_get_a_wrong_fast_answer(
    world: World, num: int, szx: int, flips: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    """Whatever bytes arrive: no exception, and any fast answer equals aiocoap's."""
    remote = world.remote("t1")
    data = bytearray(request(fw(world), block2=(num, 0, min(szx, 6))))
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    raw = bytes(data[: len(data) - cut]) + extra
    got = world.fast.handle(remote, raw)
    if got is not None:
        assert got == oracle(world, remote, raw)
