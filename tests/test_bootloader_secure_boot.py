"""The bootloader: secure boot, trial boot, confirm or revert, and the sequence policy.

Runs the real agent against the in-process server (the network is not under test
here; the DTLS tests are in test_device_agent_dtls.py). Each test checks the oracles of
ATTACKS.md: the device boots (O2), runs only images it accepted (O1), its trusted
sequence number never goes down (O3), and every outcome is reported (O5).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from evil_server import Rig, make_rig, release

from device_sim.agent import DeviceAgent, Outcome, UpdateAgent
from device_sim.bootloader import BootError, Bootloader
from device_sim.device_state import StateFile
from device_sim.firmware import Behaviour, make_image
from device_sim.flash import FlashFaults, PowerCut
from device_sim.inprocess import InProcessServer, InProcessTransport
from device_sim.layout import open_flash
from otacoap.core import ids
from otacoap.core.update_record import BootStatus


def serve(rig: Rig, image: bytes, seq: int) -> InProcessServer:
    envelope, _ = release(rig.key, image, seq)
    server = InProcessServer(envelope=envelope)
    server.add_image(ids.image_uri(hashlib.sha256(image).digest()), image)
    return server


def run(rig: Rig, server: InProcessServer) -> Outcome:
    async def go() -> Outcome:
        device = DeviceAgent(rig.path, "coaps://x", transport=InProcessTransport(server))
        try:
            return (await device.run_once()).outcome
        finally:
            await device.close()

    return asyncio.run(go())


def stage(rig: Rig, server: InProcessServer) -> Outcome:
    """Check and download, stopping at PENDING (no reboot yet)."""

    async def go() -> Outcome:
        flash, identity = open_flash(rig.path)
        try:
            Bootloader(flash).boot()
            agent = UpdateAgent(flash, identity, InProcessTransport(server))
            return (await agent.check_and_update()).outcome
        finally:
            flash.close()

    return asyncio.run(go())


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_update_trial_boots_then_confirms_and_commits_the_sequence(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    new = make_image(9000, version=6)
    server = serve(rig, new, 6)
    assert stage(rig, server) == Outcome.STAGED
    info = rig.info()
    assert info["boot_status"] == "pending" and info["sequence_number"] == 5
    assert info["running_slot"] == 0, "nothing runs the candidate before the bootloader"
    assert run(rig, server) == Outcome.UP_TO_DATE  # power-on: trial boot, confirm
    info = rig.info()
    assert info["boot_status"] == "confirmed" and info["sequence_number"] == 6
    assert rig.boots() == (1, digest(new))
    assert server.states() == ["downloading", "downloaded", "installing", "installed", "confirmed"]
    assert [r.installed_sequence for r in server.reports] == [5, 5, 5, 5, 6]


def test_failed_health_check_reverts_and_gives_the_release_up(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    bad = make_image(9000, version=6, behaviour=Behaviour.UNHEALTHY)
    server = serve(rig, bad, 6)
    assert run(rig, server) == Outcome.REVERTED
    info = rig.info()
    assert rig.boots() == (0, digest(rig.factory)), "old image runs again"
    # ATTACKS.md #47 policy: the trusted number stays at the failed release's value.
    assert info["sequence_number"] == 6 and info["running_sequence_number"] == 5
    revert = server.reports[-1]
    assert revert.state.value == "reverted" and not revert.ok
    assert "health check failed" in revert.detail
    requests = server.block_requests
    assert run(rig, server) == Outcome.REJECTED, "a given-up release is never retried"
    assert server.block_requests == requests
    assert server.reports[-1].state.value == "rejected"
    # A newer release still installs.
    good = make_image(9000, version=7)
    assert run(rig, serve(rig, good, 7)) == Outcome.UPDATED
    assert rig.boots() == (1, digest(good)) and rig.info()["sequence_number"] == 7


def test_crashing_image_is_retried_then_given_up(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5, max_trial_boots=3)
    crash = make_image(9000, version=6, behaviour=Behaviour.CRASH)
    server = serve(rig, crash, 6)
    outcomes = [run(rig, server) for _ in range(4)]
    assert outcomes == [Outcome.REVERTED] * 3 + [Outcome.REJECTED]
    assert rig.boots() == (0, digest(rig.factory))
    assert rig.info()["sequence_number"] == 6
    # Only the first trial downloaded; the retries found the image still staged.
    assert server.block_requests == -(-9000 // 1024)
    reverted = [r for r in server.reports if r.state.value == "reverted"]
    assert len(reverted) == 3 and "given up" in reverted[-1].detail


def test_unconfirmed_restart_reverts_but_the_release_is_retried(tmp_path: Path) -> None:
    """A power cut in the trial window is not a verdict on the image."""
    rig = make_rig(tmp_path, seq=5)
    new = make_image(9000, version=6)
    server = serve(rig, new, 6)
    assert stage(rig, server) == Outcome.STAGED
    flash, _ = open_flash(rig.path)
    boot = Bootloader(flash).boot()  # trial boot ... and power is lost before confirm
    flash.close()
    assert boot.test_mode and boot.slot == 1
    assert rig.info()["boot_status"] == "testing"
    assert run(rig, server) == Outcome.UPDATED  # revert at power-on, retry, confirm
    assert rig.boots() == (1, digest(new))
    states = server.states()
    assert "reverted" in states and states[-1] == "confirmed"
    assert rig.info()["sequence_number"] == 6


@pytest.mark.parametrize("target", ["slot", "envelope"])
def test_candidate_modified_after_staging_is_refused_at_boot(tmp_path: Path, target: str) -> None:
    """ATTACKS.md #18: TOCTOU between "verified" and "boot": secure boot catches it."""
    rig = make_rig(tmp_path, seq=5)
    new = make_image(9000, version=6)
    server = serve(rig, new, 6)
    assert stage(rig, server) == Outcome.STAGED
    start, _ = rig.area("slot1" if target == "slot" else "envelope1")
    flip_byte(rig.path, start + 100)
    before = rig.slot_bytes(0)
    server.envelope = None  # the release is withdrawn: nothing to re-download
    assert run(rig, server) == Outcome.UP_TO_DATE
    assert rig.boots() == (0, digest(rig.factory))
    assert rig.slot_bytes(0) == before
    assert rig.info()["sequence_number"] == 5
    failed = next(r for r in server.reports if r.state.value == "failed")
    assert "secure boot" in failed.detail and not failed.ok


def test_modified_running_image_does_not_boot(tmp_path: Path) -> None:
    """Secure boot on every boot: a changed active image is never executed."""
    rig = make_rig(tmp_path)
    start, _ = rig.area("slot0")
    flip_byte(rig.path, start + 5)
    flash, _ = open_flash(rig.path)
    with pytest.raises(BootError):
        Bootloader(flash).boot()
    flash.close()


@pytest.mark.parametrize("torn", [False, True])
def test_power_cut_at_every_op_of_the_revert(tmp_path: Path, torn: bool) -> None:
    """ATTACKS.md #47 with H3: the revert itself survives a cut at any op."""
    rig = make_rig(tmp_path, seq=5)
    new = make_image(5000, version=6)
    assert stage(rig, serve(rig, new, 6)) == Outcome.STAGED
    flash, _ = open_flash(rig.path)
    Bootloader(flash).boot()  # now TESTING, never confirmed
    flash.close()
    testing = rig.path.read_bytes()
    k, cuts = 1, 0
    while True:
        rig.path.write_bytes(testing)
        flash, _ = open_flash(rig.path, faults=FlashFaults(cut_after=k, torn=torn))
        try:
            boot = Bootloader(flash).boot()
        except PowerCut:
            cuts += 1
            flash.close()
            # After the cut: either still TESTING (reverts on the next boot) or reverted.
            flash, identity = open_flash(rig.path)
            state = StateFile(flash, identity.layout).load()
            flash.close()
            assert state.boot in (BootStatus.TESTING, BootStatus.CONFIRMED)
            assert state.sequence == 5
            assert rig.boots() == (0, digest(rig.factory))
            k += 1
            continue
        flash.close()
        assert boot.slot == 0 and not boot.test_mode
        break
    assert cuts >= 3, "the revert takes an erase and writes"
