"""Issue 13 §4: a release that updates two components installs both, or neither.

A two-component device (layout.aux_slot_size > 0) holds, per A/B slot, component 0's
image and component 1's image in its own region; the one envelope in the slot's envelope
area vouches for both, and the one `active` field of the state record switches both
(docs/decisions/multi-component.md). These tests run the real agent and bootloader
against the in-process server (and once over DTLS against the H1 rig); the power cuts
at every flash operation are in test_power_cut_update.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest
from evil_server import (
    FAST,
    EvilServer,
    Rig,
    Script,
    make_rig,
    manifest_bytes,
    multi_envelope,
    run_device,
    sign,
)

from device_sim.agent import DeviceAgent, Outcome, RunResult
from device_sim.bootloader import Bootloader
from device_sim.device_state import StateFile
from device_sim.firmware import make_image
from device_sim.flash import FlashFaults, PowerCut
from device_sim.inprocess import InProcessServer, InProcessTransport
from device_sim.layout import FlashLayout, Identity, open_flash
from otacoap.cli import main as cli_main
from otacoap.core import build, ids, suit
from otacoap.core.errors import ReportReason

AUX_SLOT = 16 * 1024


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def two_component_rig(tmp: Path, **kw: object) -> Rig:
    return make_rig(tmp, seq=5, slot_size=32 * 1024, aux_slot_size=AUX_SLOT, **kw)  # type: ignore[arg-type]


def serve(rig: Rig, main: bytes, aux: bytes, seq: int) -> InProcessServer:
    server = InProcessServer(envelope=multi_envelope(rig.key, main, aux, seq))
    server.add_image(ids.image_uri(sha(main)), main)
    server.add_image(ids.image_uri(sha(aux)), aux)
    return server


async def run_in_process(rig: Rig, server: InProcessServer, **kw: object) -> RunResult:
    device = DeviceAgent(
        rig.path, "coaps://in-process", config=FAST, transport=InProcessTransport(server), **kw
    )  # type: ignore[arg-type]
    try:
        return await device.run_once()
    finally:
        await device.close()


def factory_pair(rig: Rig) -> tuple[bytes, bytes]:
    return sha(rig.factory), sha(rig.factory_aux)


def test_a_two_component_release_installs_both_and_both_switch(tmp_path: Path) -> None:
    rig = two_component_rig(tmp_path)
    assert rig.running_pair() == factory_pair(rig)
    main6, aux6 = make_image(20_000, version=6), make_image(9_000, version=6, seed=3)
    main7, aux7 = make_image(18_000, version=7), make_image(12_000, version=7, seed=4)

    async def go() -> None:
        server = serve(rig, main6, aux6, 6)
        result = await run_in_process(rig, server)
        assert result.outcome == Outcome.UPDATED, result
        assert (result.sequence_number, result.running_slot) == (6, 1)
        assert rig.running_pair() == (sha(main6), sha(aux6))
        assert server.states() == [
            "downloading",
            "downloaded",
            "installing",
            "installed",
            "confirmed",
        ]
        # and back into slot 0's pair with the next release
        result = await run_in_process(rig, serve(rig, main7, aux7, 7))
        assert (result.outcome, result.sequence_number, result.running_slot) == (
            Outcome.UPDATED,
            7,
            0,
        )
        assert rig.running_pair() == (sha(main7), sha(aux7))

    asyncio.run(go())
    flash, identity = open_flash(rig.path)
    try:
        state = StateFile(flash, identity.layout).load()
    finally:
        flash.close()
    running = state.slots[state.running]
    assert running is not None and running.extra == ((len(aux7), sha(aux7)),)


@pytest.mark.parametrize("wrong", ["main", "aux"])
def test_one_wrong_image_installs_neither(tmp_path: Path, wrong: str) -> None:
    """The server hands out other bytes for one image: nothing switches, typed reason,
    and not a byte of the running pair (slot 0, its region and envelope) changes."""
    rig = two_component_rig(tmp_path)
    main, aux = make_image(20_000, version=6), make_image(9_000, version=6, seed=3)
    target = main if wrong == "main" else aux
    evil = bytearray(target)
    evil[len(evil) // 2] ^= 0x55
    running = [rig.area(name) for name in ("slot0", "aux0", "envelope0")]
    before = rig.path.read_bytes()

    async def go() -> None:
        server = serve(rig, main, aux, 6)
        server.add_image(ids.image_uri(sha(target)), bytes(evil))
        result = await run_in_process(rig, server)
        assert result.outcome == Outcome.FAILED, result
        assert result.reason == ReportReason.CONDITION_FAILED
        assert (result.sequence_number, result.running_slot) == (5, 0)
        assert rig.running_pair() == factory_pair(rig)
        failed = [r for r in server.reports if r.state.value == "failed"]
        assert failed and failed[-1].reason == ReportReason.CONDITION_FAILED
        assert rig.info()["download"] is None, "a wrong image is not resumed (#10)"
        after = rig.path.read_bytes()
        for start, length in running:
            assert after[start : start + length] == before[start : start + length]
        # the honest images afterwards: both arrive, both switch
        server.add_image(ids.image_uri(sha(target)), target)
        again = await run_in_process(rig, server)
        assert again.outcome == Outcome.UPDATED
        assert rig.running_pair() == (sha(main), sha(aux))

    asyncio.run(go())


def test_a_release_of_one_component_is_refused_before_any_payload_byte(tmp_path: Path) -> None:
    rig = two_component_rig(tmp_path)
    image = make_image(20_000, version=6)
    server = InProcessServer(envelope=sign(manifest_bytes(image=image, seq=6), rig.key))
    server.add_image(ids.image_uri(sha(image)), image)
    fetched: list[str] = []
    server.on_request = lambda path, _block2: fetched.append(path)

    result = asyncio.run(run_in_process(rig, server))
    assert result.outcome == Outcome.REJECTED
    assert result.reason == ReportReason.COMPONENT_UNAUTHORISED
    assert "components together" in result.detail
    assert not [p for p in fetched if p.startswith("/fw/")]
    assert rig.running_pair() == factory_pair(rig) and rig.info()["sequence_number"] == 5


def test_components_in_another_order_are_refused(tmp_path: Path) -> None:
    """Index i is region i: a release naming component 1 first must not write it into 0."""
    rig = two_component_rig(tmp_path)
    main, aux = make_image(20_000, version=6), make_image(9_000, version=6, seed=3)
    release = build.Release(
        sha(aux),
        len(aux),
        "acme.example",
        "thermostat-t1",
        6,
        component=build.SECOND_COMPONENT,
        more=(build.ComponentImage(sha(main), len(main), component=build.MAIN_COMPONENT),),
    )
    envelope = suit.encode_envelope(build.build_envelope(release, rig.key))
    server = InProcessServer(envelope=envelope)
    result = asyncio.run(run_in_process(rig, server))
    assert result.outcome == Outcome.REJECTED
    assert result.reason == ReportReason.COMPONENT_UNAUTHORISED


def test_single_component_devices_refuse_a_two_component_release(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    main, aux = make_image(20_000, version=6), make_image(9_000, version=6, seed=3)
    result = asyncio.run(run_in_process(rig, serve(rig, main, aux, 6)))
    assert result.outcome == Outcome.REJECTED
    assert result.reason == ReportReason.COMPONENT_UNAUTHORISED
    assert rig.boots() == (0, sha(rig.factory))


def test_dependencies_are_refused_with_a_clear_reason(tmp_path: Path) -> None:
    """SUIT dependencies (process-dependency) stay out of scope: refused before a fetch."""
    rig = make_rig(tmp_path, seq=5)
    image = make_image(5_000, version=6)
    body = cbor2.loads(manifest_bytes(image=image, seq=6))
    common = cbor2.loads(body[suit.M_COMMON])
    common[suit.C_DEPENDENCIES] = {1: {}}
    # With a dependency the index space has two entries: every sequence selects one.
    common[suit.C_SHARED_SEQUENCE] = cbor2.dumps(
        [suit.CMD_SET_COMPONENT_INDEX, 0, *cbor2.loads(common[suit.C_SHARED_SEQUENCE])]
    )
    body[suit.M_COMMON] = cbor2.dumps(common)
    for key in (suit.M_INSTALL, suit.M_VALIDATE, suit.M_INVOKE):
        body[key] = cbor2.dumps([suit.CMD_SET_COMPONENT_INDEX, 0, *cbor2.loads(body[key])])
    server = InProcessServer(envelope=sign(cbor2.dumps(body, canonical=True), rig.key))
    server.add_image(ids.image_uri(sha(image)), image)
    result = asyncio.run(run_in_process(rig, server))
    assert result.outcome == Outcome.REJECTED
    assert "dependencies" in result.detail and "not supported" in result.detail
    assert [r.state.value for r in server.reports] == ["rejected"]


def test_secure_boot_refuses_a_second_image_changed_after_staging(tmp_path: Path) -> None:
    """ATTACKS.md #18 for component 1: the bootloader checks both images of a candidate."""
    rig = two_component_rig(tmp_path)
    main, aux = make_image(20_000, version=6), make_image(9_000, version=6, seed=3)
    server = serve(rig, main, aux, 6)

    async def stage() -> Outcome:
        device = DeviceAgent(rig.path, "coaps://in-process", transport=InProcessTransport(server))
        try:
            device.power_on()
            assert device.agent is not None
            return (await device.agent.check_and_update()).outcome
        finally:
            await device.close()

    assert asyncio.run(stage()) == Outcome.STAGED
    start, _ = rig.area("aux1")
    data = bytearray(rig.path.read_bytes())
    data[start + 100] ^= 0x01
    rig.path.write_bytes(bytes(data))
    flash, _ = open_flash(rig.path)
    try:
        boot = Bootloader(flash).boot()
    finally:
        flash.close()
    assert "candidate-invalid" in boot.events and boot.slot == 0
    assert rig.running_pair() == factory_pair(rig)
    assert rig.info()["sequence_number"] == 5


def test_a_cut_in_the_second_image_resumes_it_and_keeps_the_first(tmp_path: Path) -> None:
    rig = two_component_rig(tmp_path)
    main, aux = make_image(20_000, version=6), make_image(15_000, version=6, seed=3)
    server = serve(rig, main, aux, 6)
    pristine = rig.path.read_bytes()
    requests: list[tuple[str, int]] = []
    server.on_request = lambda path, b2: requests.append((path, b2[0] if b2 else -1))

    ops = 0

    async def attempt(faults: FlashFaults | None) -> Outcome | None:
        nonlocal ops
        device = DeviceAgent(
            rig.path,
            "coaps://in-process",
            config=replace(FAST, checkpoint_bytes=4096),
            transport=InProcessTransport(server),
            faults=faults,
        )
        try:
            outcome = (await device.run_once()).outcome
            assert device.flash is not None
            ops = device.flash.ops
            return outcome
        except PowerCut:
            device.abandon()
            return None
        finally:
            await device.close()

    async def go() -> None:
        nonlocal ops
        assert await attempt(None) == Outcome.UPDATED
        # Find a cut that leaves component 1 partly durable (beyond a checkpoint).
        while True:
            rig.path.write_bytes(pristine)
            assert await attempt(FlashFaults(cut_after=ops)) is None
            download = rig.info()["download"]
            inside = len(main) + 4096, len(main) + len(aux)
            if download is not None and inside[0] <= download["bytes"] < inside[1]:
                break
            ops -= 10
            assert ops > 0, "no cut point inside component 1"
        durable = download["bytes"]
        requests.clear()
        assert await attempt(None) == Outcome.UPDATED
        fw = [(p, n) for p, n in requests if p.startswith("/fw/")]
        assert not [p for p, _ in fw if p == ids.image_uri(sha(main))], "image 0 re-fetched"
        first_aux_block = min(n for p, n in fw if p == ids.image_uri(sha(aux)))
        assert first_aux_block * 1024 == durable - len(main) > 0
        assert rig.running_pair() == (sha(main), sha(aux))

    asyncio.run(go())


@pytest.mark.network
def test_two_component_update_over_dtls(tmp_path: Path) -> None:
    """The same release end to end over DTLS-PSK on loopback (the H1 rig serves both)."""
    rig = two_component_rig(tmp_path)
    main, aux = make_image(30_000, version=6), make_image(11_000, version=6, seed=3)
    images = {ids.image_uri(sha(main)): main, ids.image_uri(sha(aux)): aux}

    async def go() -> None:
        script = Script(envelope=multi_envelope(rig.key, main, aux, 6), images=images)
        async with EvilServer(script=script) as server:
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome == Outcome.UPDATED, result
            assert server.states()[-1] == "confirmed"

    asyncio.run(asyncio.wait_for(go(), 90))
    assert rig.running_pair() == (sha(main), sha(aux))


def test_single_component_layouts_are_unchanged() -> None:
    """Identities written before keep their offsets: aux regions come after slot 1."""
    single = FlashLayout(slot_size=64 * 1024)
    assert "aux" not in single.to_cbor() and single.components == 1
    double = FlashLayout(slot_size=64 * 1024, aux_slot_size=AUX_SLOT)
    for name, area in single.areas().items():
        assert double.areas()[name] == area
    assert double.areas()["aux0"][0] == single.total_size
    assert double.total_size == single.total_size + 2 * AUX_SLOT
    assert FlashLayout.from_cbor(double.to_cbor()) == double
    identity = Identity(
        "d",
        b"k" * 16,
        "acme.example",
        "c",
        (b"x",),
        double,
    )
    assert identity.layout.components == 2


def test_manifest_build_takes_two_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main, aux = tmp_path / "app.bin", tmp_path / "data.bin"
    main.write_bytes(make_image(10_000, version=6))
    aux.write_bytes(make_image(4_000, version=6, seed=3))
    out = tmp_path / "rel.suit"
    code = cli_main(
        [
            "manifest", "build", "--image", str(main), "--image", str(aux),
            "--vendor-domain", "acme.example", "--class-info", "thermostat-t1",
            "--seq", "6", "-o", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    envelope = suit.decode_envelope(out.read_bytes())
    assert envelope.manifest.common.components == build.DEVICE_COMPONENTS
    assert "component 1" in capsys.readouterr().out
    code = cli_main(
        [
            "manifest", "build", "--image", str(main), "--image", str(aux), "--image", str(aux),
            "--vendor-domain", "acme.example", "--class-info", "thermostat-t1",
            "--seq", "6", "-o", str(tmp_path / "x.suit"),
        ]
    )  # fmt: skip
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at most 2 images" in err
