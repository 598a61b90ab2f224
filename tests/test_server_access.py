"""The one authorisation rule of /m and /fw (otacoap.server.access), and that the /fw
resource and the /fw fast path both answer by it and by nothing else.

Campaigns will change who may read which image; these tests pin today's rule (a device
reads its release's image: pinned, else its class's current one; operators read none)
and that replacing the rule in its one place changes both /fw paths alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import CON
from server_helpers import (
    CLASS_A,
    CLASS_B,
    DeviceSpec,
    ReleaseFiles,
    SessionRemote,
    cli_ok,
    make_image,
    make_setup,
)

from otacoap.server import access
from otacoap.server.fastpath import FirmwareFastPath
from otacoap.server.resources import FirmwareResource
from otacoap.server.store_view import StoreView
from otacoap.store import DataDir, ImageRecord, Principal, Role


@dataclass
class World:
    state: StoreView
    a1: ReleaseFiles  # pinned's release
    a2: ReleaseFiles  # class A's current release

    def principal(self, identity: str) -> Principal:
        """The principal a DTLS session with this PSK identity claims."""
        found = self.state.psks.find_dtls_psk(identity.encode())[1]
        assert isinstance(found, Principal)
        return found


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    setup = make_setup(
        tmp_path_factory.mktemp("access"),
        devices=[DeviceSpec("t1"), DeviceSpec("pinned"), DeviceSpec("b1", CLASS_B)],
        operators=["ops"],
    )
    a1 = setup.release(CLASS_A, 1, make_image("access-1", 3000))
    a2 = setup.release(CLASS_A, 2, make_image("access-2", 3000))
    setup.publish(a1)
    setup.publish(a2)
    cli_ok("release", "assign", "--data", setup.data, "pinned", "1")
    datadir = DataDir(setup.data)
    state = StoreView(datadir, datadir.config())
    try:
        yield World(state, a1, a2)
    finally:
        asyncio.run(state.close())


def _image_id(image: ImageRecord | None) -> str | None:
    return image.image_id if image is not None else None


def test_a_device_reads_its_class_current_image(world: World) -> None:
    t1 = world.principal("t1")
    assert _image_id(access.readable_image(world.state, t1)) == world.a2.image_id
    release = access.release_of(world.state, t1)
    assert release is not None and release.sequence_number == 2


def test_a_pinned_device_reads_its_pinned_image(world: World) -> None:
    pinned = world.principal("pinned")
    assert _image_id(access.readable_image(world.state, pinned)) == world.a1.image_id


def test_no_release_no_image(world: World) -> None:
    b1 = world.principal("b1")
    assert access.release_of(world.state, b1) is None
    assert access.readable_image(world.state, b1) is None


def test_operators_and_unknown_devices_read_nothing(world: World) -> None:
    ops = world.principal("operator:ops")
    assert ops.role is Role.OPERATOR
    assert access.readable_image(world.state, ops) is None
    ghost = Principal(Role.DEVICE, "ghost")
    assert access.readable_image(world.state, ghost) is None


# -- both /fw paths ask the rule, and only the rule ---------------------------------------


def _request(image_id: str) -> bytes:
    msg = aiocoap.Message(code=Code.GET, uri_path=("fw", image_id), block2=(0, False, 6))
    msg.mtype, msg.mid, msg.token = CON, 7, b"\x01"
    return bytes(msg.encode())


def _resource_code(state: StoreView, remote: SessionRemote, data: bytes) -> Code:
    async def go() -> Code:
        request = aiocoap.Message.decode(data, remote)
        request.opt.uri_path = request.opt.uri_path[1:]  # what Site hands the resource
        response = await FirmwareResource(state).render(request)
        await asyncio.sleep(0)  # let the refusal's audit entry be scheduled and run
        return response.code  # type: ignore[no-any-return]

    return asyncio.run(go())


def _verdicts(world: World, identity: str) -> dict[str, tuple[bool, Code]]:
    """For each published image: (fast path answers, resource's code)."""
    remote = SessionRemote([world.principal(identity)])
    fast = FirmwareFastPath(world.state)
    try:
        out = {}
        for rel in (world.a1, world.a2):
            data = _request(rel.image_id)
            out[rel.image_id] = (
                fast.handle(remote, data) is not None,
                _resource_code(world.state, remote, data),
            )
        return out
    finally:
        fast.close()


def test_fast_path_and_resource_agree_with_the_rule(world: World) -> None:
    a1, a2 = world.a1.image_id, world.a2.image_id
    assert _verdicts(world, "t1") == {a1: (False, Code.NOT_FOUND), a2: (True, Code.CONTENT)}
    assert _verdicts(world, "pinned") == {a1: (True, Code.CONTENT), a2: (False, Code.NOT_FOUND)}
    assert _verdicts(world, "operator:ops") == {
        a1: (False, Code.NOT_FOUND),
        a2: (False, Code.NOT_FOUND),
    }


def test_changing_the_rule_in_its_one_place_changes_both_paths(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in for a campaign rule: every device reads the seq 1 image."""
    first = access.readable_image(world.state, world.principal("pinned"))
    assert first is not None

    def campaign_rule(state: StoreView, principal: Principal) -> ImageRecord | None:
        return first if principal.role is Role.DEVICE else None

    monkeypatch.setattr(access, "readable_image", campaign_rule)
    a1, a2 = world.a1.image_id, world.a2.image_id
    for device in ("t1", "b1"):
        assert _verdicts(world, device) == {
            a1: (True, Code.CONTENT),
            a2: (False, Code.NOT_FOUND),
        }, device
