"""Publishing while the server runs: RFC 7641 notifications on /m, operator Block1
uploads over DTLS (RFC 7959 §2.3, RFC 9175 Request-Tag), caps and refusals
(ATTACKS.md #26, #27, #34, #36, #37)."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from server_helpers import (
    CLASS_A,
    CLASS_B,
    DeviceSpec,
    ServerProcess,
    Setup,
    cli,
    cli_ok,
    coaps_client,
    fetch_blocks,
    make_image,
    make_setup,
    request,
    run,
    running_server,
    squeeze,
)

from otacoap.core import protocol
from otacoap.operator.client import post_blockwise

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore:DTLS module did not shut down"),
]

CONFIG = """
[server]
observe_poll_interval = 0.2
[publish]
max_image_size = 200000
[uploads]
max_concurrent = 3
max_per_peer = 2
idle_timeout = 2.0
busy_max_age = 9
"""


@dataclass
class World:
    setup: Setup
    server: ServerProcess

    @property
    def ops(self) -> bytes:
        return self.setup.operators["ops"]

    def tmp_files(self) -> list[str]:
        return sorted(p.name for p in (self.setup.data / "blobs" / "tmp").iterdir())

    def releases(self) -> str:
        return cli_ok("release", "list", "--all", "--data", self.setup.data)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    setup = make_setup(
        tmp_path_factory.mktemp("publish"),
        devices=[DeviceSpec("t1"), DeviceSpec("s1", CLASS_B)],
        operators=["ops"],
        config=CONFIG,
    )
    setup.publish(setup.release(CLASS_A, 1, make_image("a1", 4000)))
    setup.publish(setup.release(CLASS_B, 1, make_image("b1", 2000)))
    with running_server(setup.data) as server:
        yield World(setup, server)


async def _observe(ctx: aiocoap.Context, uri: str) -> tuple[aiocoap.Message, object]:
    req = ctx.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0), handle_blockwise=False)
    first = await asyncio.wait_for(req.response, 5)
    return first, req.observation.__aiter__()


async def _next(notifications: object, timeout: float) -> aiocoap.Message:
    return await asyncio.wait_for(notifications.__anext__(), timeout)  # type: ignore[attr-defined]


def _upload_msg(
    uri: str, chunk: bytes, num: int, more: bool, tag: bytes, szx: int = 6
) -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.POST, uri=uri, payload=chunk, block1=(num, more, szx))
    msg.opt.content_format = protocol.CF_IMAGE
    msg.opt.request_tag = [tag]
    return msg


def test_observers_are_notified_of_a_cli_and_a_network_publish(world: World) -> None:
    s = world.setup
    v2 = s.release(CLASS_A, 2, make_image("a2", 5000))
    v3 = s.release(CLASS_A, 3, make_image("a3", 70_000))

    async def go() -> None:
        async with (
            coaps_client(world.server.port, "t1", s.devices["t1"].psk) as t1,
            coaps_client(world.server.port, "s1", s.devices["s1"].psk) as s1,
        ):
            first, notes = await _observe(t1, world.server.uri + "/m")
            assert first.code == Code.CONTENT and first.opt.observe == 0
            _, other = await _observe(s1, world.server.uri + "/m")
            # A publish by another process: noticed by polling the DB (data_version).
            await asyncio.to_thread(s.publish, v2)
            note = await _next(notes, 5)
            assert note.payload == v2.envelope and note.opt.observe >= 1
            # A publish over the network, as an operator, by the CLI client.
            result = await asyncio.to_thread(
                cli,
                "publish", "--server", world.server.uri, "--identity", "ops",
                "--psk", world.ops.hex(), v3.envelope_path, v3.image_path,
            )  # fmt: skip
            assert result.code == 0, result.err
            assert f"seq 3: image {v3.image_uri}" in result.out
            note = await _next(notes, 5)
            assert note.payload == v3.envelope
            # The other class saw nothing.
            with pytest.raises(TimeoutError):
                await _next(other, 0.5)
            assert await fetch_blocks(t1, world.server.uri + v3.image_uri) == v3.image

    run(go())
    assert "operator:ops  publish  acme-devices.example/thermostat-t1 seq 3  ok" in squeeze(
        cli_ok("audit", "list", "--data", world.setup.data)
    )
    assert world.tmp_files() == []


def test_a_refused_network_publish_leaves_nothing(world: World) -> None:
    s = world.setup
    image = make_image("stale", 3000)
    stale = s.release(CLASS_A, 1, image)  # seq 1 is not above the current one

    async def go() -> tuple[aiocoap.Message, aiocoap.Message]:
        async with coaps_client(world.server.port, "operator:ops", world.ops) as ctx:
            up = await post_blockwise(
                ctx, world.server.uri + "/admin/image", io.BytesIO(image), len(image),
                content_format=protocol.CF_IMAGE, timeout=5,
            )  # fmt: skip
            rel = await post_blockwise(
                ctx, world.server.uri + "/admin/release", io.BytesIO(stale.envelope),
                len(stale.envelope), content_format=protocol.CF_ENVELOPE, timeout=5,
            )  # fmt: skip
            return up, rel

    before = world.releases()
    up, rel = run(go())  # type: ignore[misc]
    assert up.code == Code.CHANGED
    assert cbor2.loads(up.payload) == [hashlib.sha256(image).digest(), 3000]
    assert rel.code == Code.CONFLICT and b"current release" in rel.payload
    assert world.releases() == before
    assert world.tmp_files() == []
    assert not (s.data / "blobs" / hashlib.sha256(image).hexdigest()).exists()
    audit = cli_ok("audit", "list", "--data", s.data, "--limit", "3")
    assert "operator:ops  publish  envelope sha256:" in squeeze(audit) and "refused" in audit


def test_an_envelope_without_its_uploaded_image_is_refused(world: World) -> None:
    rel = world.setup.release(CLASS_A, 10, make_image("never-uploaded", 100))

    async def go() -> aiocoap.Message:
        async with coaps_client(world.server.port, "operator:ops", world.ops) as ctx:
            return await post_blockwise(
                ctx, world.server.uri + "/admin/release", io.BytesIO(rel.envelope),
                len(rel.envelope), content_format=protocol.CF_ENVELOPE, timeout=5,
            )  # fmt: skip

    r = run(go())
    assert r.code == Code.NOT_FOUND and b"/admin/image" in r.payload  # type: ignore[union-attr]


def test_oversize_uploads_get_4_13_and_nothing_is_published(world: World) -> None:
    before = world.releases()

    async def go() -> None:
        async with coaps_client(world.server.port, "operator:ops", world.ops) as ctx:
            uri = world.server.uri + "/admin/image"
            # Declared too large up front (RFC 7959 §4 Size1).
            msg = _upload_msg(uri, b"x" * 1024, 0, True, b"big1")
            msg.opt.size1 = 2_000_000_000
            r = await request(ctx, msg)
            assert r.code == Code.REQUEST_ENTITY_TOO_LARGE and r.opt.size1 == 200_000
            # Not declared: cut off once the running total passes the cap.
            codes = []
            for num in range(200):
                r = await request(ctx, _upload_msg(uri, b"x" * 1024, num, True, b"big2"))
                codes.append(r.code)
                if r.code != Code.CONTINUE:
                    break
            assert codes[-1] == Code.REQUEST_ENTITY_TOO_LARGE and r.opt.size1 == 200_000
            assert len(codes) == 196  # 195 blocks fit into 200000 bytes
            # The dropped body cannot be continued.
            r = await request(ctx, _upload_msg(uri, b"x" * 1024, 196, True, b"big2"))
            assert r.code == Code.REQUEST_ENTITY_INCOMPLETE

    run(go())
    assert world.tmp_files() == []
    assert world.releases() == before


def test_interleaved_request_tags_do_not_splice(world: World) -> None:
    a, b = make_image("tag-a", 5000), make_image("tag-b", 5000)

    async def go() -> list[aiocoap.Message]:
        async with coaps_client(world.server.port, "operator:ops", world.ops) as ctx:
            uri = world.server.uri + "/admin/image"
            finals = []
            for num in range(5):
                more = num < 4
                for tag, body in ((b"A", a), (b"B", b)):
                    chunk = body[num * 1024 : (num + 1) * 1024]
                    r = await request(ctx, _upload_msg(uri, chunk, num, more, tag))
                    assert r.code == (Code.CONTINUE if more else Code.CHANGED), r
                    assert r.opt.block1.block_number == num
                    if not more:
                        finals.append(r)
            # Same tag, block 2 before block 1: never spliced, 4.08.
            r = await request(ctx, _upload_msg(uri, a[:1024], 0, True, b"C"))
            assert r.code == Code.CONTINUE
            r = await request(ctx, _upload_msg(uri, a[2048:3072], 2, True, b"C"))
            assert r.code == Code.REQUEST_ENTITY_INCOMPLETE
            r = await request(ctx, _upload_msg(uri, a[1024:2048], 1, True, b"C"))
            assert r.code == Code.REQUEST_ENTITY_INCOMPLETE
            return finals

    fa, fb = run(go())  # type: ignore[misc]
    assert cbor2.loads(fa.payload)[0] == hashlib.sha256(a).digest()
    assert cbor2.loads(fb.payload)[0] == hashlib.sha256(b).digest()


def test_wrong_operator_psk_fails_with_one_line(world: World) -> None:
    rel = world.setup.release(CLASS_A, 20, make_image("x", 100))
    result = cli(
        "publish", "--server", world.server.uri, "--identity", "ops", "--psk", "11" * 16,
        "--timeout", "2", rel.envelope_path, rel.image_path,
    )  # fmt: skip
    assert result.code == 1
    assert result.err.startswith("otacoap publish: error: ") and result.err.count("\n") == 1
    assert "seq 20" not in world.releases()


def test_concurrent_reassemblies_are_capped_with_5_03(world: World) -> None:
    """Last in this module: it fills the reassembly slots until they time out."""
    uri = world.server.uri + "/admin/image"

    def partial_uploads() -> set[str]:
        return {n for n in world.tmp_files() if n.startswith("upload-")}

    staged_before = partial_uploads()  # images staged by earlier tests, awaiting envelopes

    async def go() -> None:
        async with coaps_client(world.server.port, "operator:ops", world.ops) as ctx:
            for tag in (b"1", b"2"):
                r = await request(ctx, _upload_msg(uri, b"x" * 1024, 0, True, tag))
                assert r.code == Code.CONTINUE
            r = await request(ctx, _upload_msg(uri, b"x" * 1024, 0, True, b"3"))
            assert r.code == Code.SERVICE_UNAVAILABLE and r.opt.max_age == 9
        # Another peer still fits (3 in total) ...
        async with coaps_client(world.server.port, "operator:ops", world.ops) as ctx:
            r = await request(ctx, _upload_msg(uri, b"x" * 1024, 0, True, b"4"))
            assert r.code == Code.CONTINUE
        in_flight = partial_uploads() - staged_before
        assert len(in_flight) == 3
        # ... and then the server is full for everyone.
        async with coaps_client(world.server.port, "operator:ops", world.ops) as ctx:
            r = await request(ctx, _upload_msg(uri, b"x" * 1024, 0, True, b"5"))
            assert r.code == Code.SERVICE_UNAVAILABLE
            # Idle uploads time out (2 s here) and free their slots and temp files.
            await asyncio.sleep(2.2)
            r = await request(ctx, _upload_msg(uri, b"y" * 1024, 0, False, b"6"))
            assert r.code == Code.CHANGED  # a complete image, now staged
        assert not in_flight & partial_uploads()

    run(go())
