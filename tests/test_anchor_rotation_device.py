"""A device rotating and revoking its author keys through signed anchor lists (ATTACKS.md #20).

In process (the network is tested over DTLS in test_device_attacks.py): a device
provisioned with a root key walks /a, commits each accepted list in one power-safe
state save, refuses manifests signed by a revoked key from then on (even with a higher
sequence number), keeps booting an image whose signer was revoked, and survives a
power cut at every flash operation of the anchor commit.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from evil_server import Rig, make_rig, manifest_bytes, sign

from device_sim.agent import AgentConfig, DeviceAgent, Outcome, RunResult
from device_sim.bootloader import Bootloader
from device_sim.device_state import StateFile, worst_case_record_size
from device_sim.fetcher import FetchConfig
from device_sim.firmware import make_image
from device_sim.flash import FlashFaults, PowerCut
from device_sim.inprocess import InProcessServer, InProcessTransport
from device_sim.layout import MIN_STATE_COPY_SIZE, open_flash
from device_sim.record_store import OVERHEAD
from otacoap.core import anchor_list, cose, ids
from otacoap.core.anchor_list import AnchorList
from otacoap.core.errors import ReportReason

FAST = AgentConfig(fetch=FetchConfig(szx=6, attempts=2, backoff_initial=0.01), report_timeout=0.5)
VENDOR = ids.vendor_id("acme.example")
CLASS = ids.class_id(VENDOR, "thermostat-t1")

ROOT = cose.generate_key("es256")
ROOT2 = cose.generate_key("ed25519")
OLD = cose.generate_key("es256")  # the provisioned author key, revoked below
NEW = cose.generate_key("ed25519")


def ck(key: cose.SigningKey) -> anchor_list.Key:
    return anchor_list.compact_key(key.public)


def anchors(
    version: int,
    authors: list[cose.SigningKey],
    roots: list[cose.SigningKey] | None = None,
    signers: list[cose.SigningKey] | None = None,
    freshness: list[cose.SigningKey] | None = None,
) -> bytes:
    roots = roots or [ROOT]
    contents = AnchorList(
        version,
        VENDOR,
        CLASS,
        tuple(ck(k) for k in roots),
        1,
        tuple(ck(k) for k in authors),
        tuple(ck(k) for k in freshness or []),
    )
    return anchor_list.sign(contents, signers or roots)


def rig_with_root(tmp: Path, **kw: object) -> Rig:
    return make_rig(tmp, seq=5, key=OLD, roots=(ROOT,), **kw)  # type: ignore[arg-type]


def release(server: InProcessServer, key: cose.SigningKey, seq: int, version: int = 6) -> bytes:
    image = make_image(5000, version=version, seed=version)
    server.envelope = sign(manifest_bytes(image=image, seq=seq), key)
    server.add_image(ids.image_uri(hashlib.sha256(image).digest()), image)
    return image


def run(rig: Rig, server: InProcessServer, **kw: object) -> RunResult:
    async def go() -> RunResult:
        device = DeviceAgent(
            rig.path,
            "coaps://in-process",
            transport=InProcessTransport(server),
            **kw,  # type: ignore[arg-type]
        )
        try:
            return await device.run_once()
        finally:
            await device.close()

    return asyncio.run(go())


def state_of(rig: Rig):  # type: ignore[no-untyped-def]
    flash, identity = open_flash(rig.path)
    try:
        return StateFile(flash, identity.layout).load()
    finally:
        flash.close()


def test_provisioned_roots_give_anchor_version_zero(tmp_path: Path) -> None:
    rig = rig_with_root(tmp_path)
    assert rig.info()["anchor_version"] == 0
    assert state_of(rig).anchors.authors == (ck(OLD),)


def test_device_without_roots_never_asks_for_anchors_or_freshness(tmp_path: Path) -> None:
    """Existing provisioning keeps today's behaviour: no /a, no /t, no new reports."""
    rig = make_rig(tmp_path, seq=5, key=OLD)
    server = InProcessServer(anchor_lists={1: anchors(1, [NEW])})
    release(server, OLD, 6)
    result = run(rig, server, config=FAST)
    assert result.outcome == Outcome.UPDATED and result.freshness is None
    assert server.anchor_requests == server.freshness_requests == 0
    assert all(r.anchor_version is None for r in server.reports)
    assert rig.info()["anchor_version"] is None


def test_revoked_key_is_refused_even_with_a_higher_sequence_number(tmp_path: Path) -> None:
    rig = rig_with_root(tmp_path)
    server = InProcessServer(anchor_lists={1: anchors(1, [NEW])})
    release(server, OLD, 1000)  # signed by the revoked key, far above the trusted 5
    result = run(rig, server, config=FAST)
    assert result.outcome == Outcome.REJECTED
    assert result.reason == ReportReason.UNAUTHORISED
    assert server.states()[:2] == ["anchors-updated", "rejected"]
    assert [r.anchor_version for r in server.reports] == [1, 1]
    assert rig.info()["sequence_number"] == 5 and rig.info()["anchor_version"] == 1
    # The new author key is accepted.
    image = release(server, NEW, 6, version=7)
    assert run(rig, server, config=FAST).outcome == Outcome.UPDATED
    assert rig.boots()[1] == hashlib.sha256(image).digest()
    # Later still, the old key stays revoked whatever the sequence number.
    release(server, OLD, 99, version=8)
    assert run(rig, server, config=FAST).outcome == Outcome.REJECTED
    assert rig.info()["sequence_number"] == 6


def test_same_manifest_is_accepted_before_the_rotation(tmp_path: Path) -> None:
    """Control for the case above: without the list, the old key's manifest installs."""
    rig = rig_with_root(tmp_path)
    server = InProcessServer()
    release(server, OLD, 1000)
    assert run(rig, server, config=FAST).outcome == Outcome.UPDATED


def test_image_signed_by_a_revoked_key_still_boots(tmp_path: Path) -> None:
    """Revoking the key that signed the running image must not brick the device."""
    rig = rig_with_root(tmp_path)
    server = InProcessServer()
    release(server, OLD, 6)
    assert run(rig, server, config=FAST).outcome == Outcome.UPDATED
    running = rig.boots()
    server.anchor_lists = {1: anchors(1, [NEW])}
    server.envelope = None
    assert run(rig, server, config=FAST).outcome == Outcome.UP_TO_DATE
    state = state_of(rig)
    assert state.anchors.version == 1 and state.anchors.grace == ck(OLD)
    assert rig.boots() == running  # secure boot of the running slot still passes
    assert rig.info()["bootable"]
    # ... but the grace key vouches for nothing new: a candidate signed by it is refused.
    release(server, OLD, 7, version=9)
    assert run(rig, server, config=FAST).outcome == Outcome.REJECTED


def test_rotation_signed_only_by_the_new_root_is_refused(tmp_path: Path) -> None:
    rig = rig_with_root(tmp_path)
    server = InProcessServer(anchor_lists={1: anchors(1, [NEW], roots=[ROOT2])})
    release(server, OLD, 6)
    result = run(rig, server, config=FAST)
    assert result.outcome == Outcome.UPDATED  # the old key is still trusted
    assert "rejected" in server.states()
    refusal = next(r for r in server.reports if r.state.value == "rejected")
    assert refusal.reason == ReportReason.UNAUTHORISED and "anchor list" in refusal.detail
    assert rig.info()["anchor_version"] == 0

    async def again() -> list[int]:
        device = DeviceAgent(rig.path, "coaps://in-process", transport=InProcessTransport(server))
        counts = []
        try:
            for _ in range(3):
                await device.run_once()
                counts.append(len(server.reports))
        finally:
            await device.close()
        return counts

    # The refusal is remembered: asking again costs no report (one per power-on at most).
    counts = asyncio.run(again())
    assert counts[1] == counts[2]
    refusals = [r for r in server.reports if "anchor list" in r.detail]
    assert len(refusals) == 2  # once per power-on


def test_root_rotation_signed_by_old_and_new_roots_is_accepted(tmp_path: Path) -> None:
    rig = rig_with_root(tmp_path)
    server = InProcessServer(
        anchor_lists={
            1: anchors(1, [OLD], roots=[ROOT2], signers=[ROOT, ROOT2]),
            2: anchors(2, [NEW], roots=[ROOT2]),
        }
    )
    run(rig, server, config=FAST)
    assert rig.info()["anchor_version"] == 2
    assert state_of(rig).anchors.roots == (ck(ROOT2),)


@pytest.mark.parametrize("served", [0, 1, 3])
def test_wrong_version_is_refused(tmp_path: Path, served: int) -> None:
    """The server must answer v+1: a replayed older list or a skipped version is refused."""
    rig = rig_with_root(tmp_path)
    server = InProcessServer(anchor_lists={1: anchors(1, [OLD])})
    run(rig, server, config=FAST)
    assert rig.info()["anchor_version"] == 1
    server.anchor_lists = {2: anchors(max(served, 1), [NEW])}
    run(rig, server, config=FAST)
    assert rig.info()["anchor_version"] == 1
    assert server.reports[-1].state.value == "rejected"


def test_endless_rotation_chain_is_walked_a_bounded_number_per_check(tmp_path: Path) -> None:
    rig = rig_with_root(tmp_path)
    n = 3 * anchor_list.MAX_ROTATIONS_PER_CHECK
    server = InProcessServer(anchor_lists={v: anchors(v, [OLD]) for v in range(1, n + 1)})
    run(rig, server, config=FAST)
    assert rig.info()["anchor_version"] == anchor_list.MAX_ROTATIONS_PER_CHECK
    assert server.anchor_requests == anchor_list.MAX_ROTATIONS_PER_CHECK
    run(rig, server, config=FAST)
    assert rig.info()["anchor_version"] == 2 * anchor_list.MAX_ROTATIONS_PER_CHECK


def test_state_record_with_anchors_fits_the_smallest_state_copy() -> None:
    assert worst_case_record_size() <= MIN_STATE_COPY_SIZE - OVERHEAD


def test_power_cut_at_every_flash_op_of_an_anchor_commit(tmp_path: Path) -> None:
    """H3 for the anchor commit: the old list or the new one, bootable, never a mix."""
    rig = rig_with_root(tmp_path, sector_size=1024, slot_size=16 * 1024)
    server = InProcessServer()
    release(server, OLD, 6)
    assert run(rig, server, config=FAST).outcome == Outcome.UPDATED  # running an OLD image
    server.envelope = None
    server.anchor_lists = {1: anchors(1, [NEW]), 2: anchors(2, [NEW, OLD])}
    pristine = rig.path.read_bytes()

    async def once(faults: FlashFaults | None) -> int | None:
        device = DeviceAgent(
            rig.path,
            "coaps://in-process",
            config=FAST,
            transport=InProcessTransport(server),
            faults=faults,
        )
        try:
            await device.run_once()
        except PowerCut:
            ops = None
            device.abandon()
            return ops
        ops = device.flash.ops if device.flash else None
        await device.close()
        return ops

    total = asyncio.run(once(None))
    assert total is not None and total >= 4
    assert rig.info()["anchor_version"] == 2
    seen: set[int] = set()
    for torn in (False, True):
        for k in range(1, total + 1):
            rig.path.write_bytes(pristine)
            server.reports.clear()
            server.last_counter = 0
            asyncio.run(once(FlashFaults(cut_after=k, torn=torn)))
            flash, _ = open_flash(rig.path)
            try:
                Bootloader(flash).boot()  # O2: boots after the cut
            finally:
                flash.close()
            version = state_of(rig).anchors.version
            assert version in (0, 1, 2)
            seen.add(version)
            asyncio.run(once(None))  # power on again: the walk completes
            assert rig.info()["anchor_version"] == 2
            assert rig.info()["bootable"]
    assert seen == {0, 1, 2}, "the cuts fell before, between and after the commits"


def test_anchor_list_arrives_block_by_block(tmp_path: Path) -> None:
    """A list larger than a block (64-byte blocks here) is reassembled under Block2."""
    rig = rig_with_root(tmp_path)
    big = anchors(1, [NEW, OLD], roots=[ROOT, ROOT2], signers=[ROOT, ROOT2])
    assert len(big) > 4 * 64
    server = InProcessServer(anchor_lists={1: big})
    small = AgentConfig(fetch=FetchConfig(szx=2, attempts=2, backoff_initial=0.01))
    run(rig, server, config=small)
    assert rig.info()["anchor_version"] == 1


def test_oversized_or_garbage_answers_on_a_are_not_committed(tmp_path: Path) -> None:
    rig = rig_with_root(tmp_path)
    server = InProcessServer(anchor_lists={1: b"\x00" * (anchor_list.MAX_ANCHOR_LIST_SIZE + 1)})
    release(server, OLD, 6)
    assert run(rig, server, config=FAST).outcome == Outcome.UPDATED  # the check goes on
    assert rig.info()["anchor_version"] == 0
    server.anchor_lists = {1: b"\xa1\x00\x00"}
    server.envelope = None
    run(rig, server, config=FAST)
    assert rig.info()["anchor_version"] == 0
    assert server.reports[-2].state.value == "rejected"  # the garbage list, then freshness
    assert "anchor list" in server.reports[-2].detail


def test_an_envelope_refused_for_its_signer_is_verified_again_after_a_rotation(
    tmp_path: Path,
) -> None:
    """RefusalMemory (issue 15 §2) must not outlive the keys a refusal was judged with.

    A release signed by an author key the device does not trust yet is refused and
    remembered. Once an anchor list adds that key, the same envelope is no longer a
    refused one: without forgetting, a `run --watch` device would answer it "refused
    before" until it rebooted.
    """
    rig = rig_with_root(tmp_path)
    server = InProcessServer()
    image = release(server, NEW, 6)  # NEW is not an author key of version 0

    async def go() -> list[RunResult]:
        device = DeviceAgent(
            rig.path, "coaps://in-process", transport=InProcessTransport(server), config=FAST
        )
        try:
            first = await device.run_once()
            server.anchor_lists = {1: anchors(1, [OLD, NEW])}
            return [first, await device.run_once()]
        finally:
            await device.close()

    first, second = asyncio.run(go())
    assert first.outcome == Outcome.REJECTED and first.reason == ReportReason.UNAUTHORISED
    assert second.outcome == Outcome.UPDATED, second
    assert rig.info()["anchor_version"] == 1
    assert rig.boots()[1] == hashlib.sha256(image).digest()


def test_an_anchor_list_refused_out_of_turn_is_judged_again_after_a_rotation(
    tmp_path: Path,
) -> None:
    """A server holding the PSK answers /a?v=0 with the genuine list 2: refused (not
    version 1) and remembered. After list 1 is committed, list 2 is exactly the next
    one; a memory that outlived the rotation would keep the device from ever taking
    it (and the revocation it carries) until a reboot."""
    rig = rig_with_root(tmp_path)
    server = InProcessServer()
    v2 = anchors(2, [NEW])  # revokes OLD
    server.anchor_lists = {1: v2}  # /a?v=0 answers list 2: out of turn

    async def go() -> None:
        device = DeviceAgent(
            rig.path, "coaps://in-process", transport=InProcessTransport(server), config=FAST
        )
        try:
            await device.run_once()
            assert rig.info()["anchor_version"] == 0
            server.anchor_lists = {1: anchors(1, [OLD, NEW]), 2: v2}
            await device.run_once()
        finally:
            await device.close()

    asyncio.run(go())
    assert rig.info()["anchor_version"] == 2
    assert state_of(rig).anchors.authors == (ck(NEW),)
