"""H3 (ATTACKS.md #6, #44, #45, #46, #50): power cuts during a whole update.

Like MCUboot's `run_perm_with_fails`: first count the flash operations of a clean
update (download, stage, trial boot, confirm, reports), then cut power after every
single op k = 1..total, clean and torn, reboot from the persisted flash and check the
oracles right after the cut and again once the device has finished:

* O2 bootable: a fresh bootloader boots (secure boot passes) - else "bricked";
* O1 the running image is one the device accepted (old or new) - else "wrong-image";
* O3 the trusted sequence number is old or new and never goes down;
* the device ends on the new image with the new sequence number.

Then `try_random_fails`-style runs: 200 seeds, several random cuts (clean or torn) in
one update of a larger image, with the same oracles and a bound on erases per sector.
The network is not under test here, so the device talks to the in-process server
(same Transport interface as DTLS; the DTLS path is tested separately).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from evil_server import Rig, make_rig, manifest_bytes, multi_envelope, sign

from device_sim.agent import AgentConfig, DeviceAgent, Outcome
from device_sim.bootloader import BootError, Bootloader
from device_sim.device_state import StateError, StateFile
from device_sim.fetcher import FetchConfig
from device_sim.firmware import make_image
from device_sim.flash import FlashFaults, PowerCut, SimFlash
from device_sim.inprocess import InProcessServer, InProcessTransport
from device_sim.layout import open_flash
from otacoap.core import ids

SMALL = AgentConfig(fetch=FetchConfig(szx=4), checkpoint_bytes=1024)  # 256-byte blocks


@dataclass
class Tally:
    cut_points: int = 0
    bricked: int = 0
    wrong_image: int = 0
    seq_down: int = 0
    not_finished: int = 0
    max_sector_erases: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.cut_points} cut points tried, {self.bricked} bricked, "
            f"{self.wrong_image} wrong-image, {self.seq_down} seq-down, "
            f"{self.not_finished} unfinished"
        )


class Harness:
    def __init__(self, rig: Rig, image: bytes, seq: int, config: AgentConfig) -> None:
        self.rig = rig
        self.config = config
        self.new = hashlib.sha256(image).digest()
        self.seq = seq
        envelope = sign(manifest_bytes(image=image, seq=seq), rig.key)
        self.server = InProcessServer(envelope=envelope)
        self.server.add_image(ids.image_uri(self.new), image)
        rig.accept(image)
        self.pristine = rig.path.read_bytes()
        self.old_seq = rig.info()["sequence_number"]

    def reset(self) -> None:
        self.rig.path.write_bytes(self.pristine)
        self.server.reports.clear()
        self.server.last_counter = 0

    async def run(self, faults: FlashFaults | None = None) -> tuple[Outcome | None, SimFlash]:
        """One power-on until done or until the power is cut; returns the flash used."""
        device = DeviceAgent(
            self.rig.path,
            "coaps://in-process",
            config=self.config,
            transport=InProcessTransport(self.server),
            faults=faults,
        )
        try:
            result = await device.run_once()
        except PowerCut:
            flash = device.flash
            device.abandon()
            assert flash is not None
            return None, flash
        flash = device.flash
        await device.close()
        assert flash is not None
        return result.outcome, flash

    def observe(self, tally: Tally, last_seq: int) -> int:
        """Oracles right after a cut: boots, accepted image, seq not lowered."""
        try:
            flash, identity = open_flash(self.rig.path)
            try:
                boot = Bootloader(flash).boot()  # a real power-on; may finish a revert
                seq = StateFile(flash, identity.layout).load().sequence
            finally:
                flash.close()
        except (BootError, StateError) as exc:
            tally.bricked += 1
            tally.notes.append(str(exc))
            return last_seq
        if boot.info.image_digest not in self.rig.accepted:
            tally.wrong_image += 1
        if seq < last_seq or seq not in (self.old_seq, self.seq):
            tally.seq_down += 1
        return seq

    async def every_op_cuts(
        self,
        tally: Tally,
        total: int,
        after_cut: Callable[[bool, int], Awaitable[None]] | None = None,
    ) -> None:
        """Cut the power after each of the `total` ops of a clean update, clean then torn,
        from the pristine flash: the oracles (and `after_cut(torn, seq)`), then `finish`."""
        for torn in (False, True):
            for k in range(1, total + 1):
                self.reset()
                outcome, _ = await self.run(FlashFaults(cut_after=k, torn=torn))
                assert outcome is None, f"op {k} of {total} was not reached"
                tally.cut_points += 1
                seq = self.observe(tally, self.old_seq)
                if after_cut is not None:
                    await after_cut(torn, seq)
                await self.finish(tally, seq)

    async def random_cuts(
        self,
        tally: Tally,
        total: int,
        seeds: int,
        most: int = 5,
        after_cut: Callable[[int], None] | None = None,
    ) -> None:
        """For each seed: from the pristine flash, 2 to `most` random cuts (clean or torn,
        within the `total` ops of a clean update) in a row, the oracles (and `after_cut`
        with the sequence number found) after each, then `finish`."""
        for seed in range(seeds):
            rng = random.Random(seed)
            self.reset()
            last_seq = self.old_seq
            for _ in range(rng.randint(2, most)):
                faults = FlashFaults(cut_after=rng.randint(1, total), torn=rng.random() < 0.5)
                outcome, _ = await self.run(faults)
                if outcome is not None:
                    break  # finished before the cut point came
                tally.cut_points += 1
                last_seq = self.observe(tally, last_seq)
                if after_cut is not None:
                    after_cut(last_seq)
            await self.finish(tally, last_seq)

    async def finish(self, tally: Tally, last_seq: int) -> None:
        """Power on without faults until the device settles; it must end on the new image."""
        for _ in range(4):
            outcome, flash = await self.run()
            tally.max_sector_erases = max(tally.max_sector_erases, max(flash.sector_erases))
            if outcome in (Outcome.UPDATED, Outcome.UP_TO_DATE):
                break
        _slot, digest = self.rig.boots()
        info = self.rig.info()
        if digest != self.new or info["sequence_number"] != self.seq:
            tally.not_finished += 1
            tally.notes.append(f"ended on {digest.hex()[:8]} seq {info['sequence_number']}")
        if info["sequence_number"] < last_seq:
            tally.seq_down += 1


def test_power_cut_after_every_flash_op(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5, sector_size=1024, slot_size=16 * 1024, factory_size=3000)
    image = make_image(6 * 1024 + 100, version=6)
    h = Harness(rig, image, 6, SMALL)
    tally = Tally()
    rollback_refused = 0

    async def go() -> int:
        outcome, flash = await h.run()
        assert outcome == Outcome.UPDATED
        total = flash.ops
        assert total > 60, "the whole update is under test, not just the download"
        old_manifest = rig.factory_envelope
        refused = 0

        async def replay_old(torn: bool, seq: int) -> None:
            nonlocal refused
            if not torn and seq == h.seq:
                # ATTACKS.md #6: image 6 was committed; the genuine seq-5 manifest
                # replayed now must be refused (its number is below the trusted one).
                new_envelope = h.server.envelope
                h.server.envelope = old_manifest
                replay, _ = await h.run()
                h.server.envelope = new_envelope
                assert replay == Outcome.REJECTED
                assert h.rig.boots()[1] == h.new
                refused += 1

        await h.every_op_cuts(tally, total, replay_old)
        return refused

    rollback_refused = asyncio.run(go())
    print(f"\nexhaustive: {tally.line()}; seq-5 replay refused after {rollback_refused} cuts")
    assert tally.cut_points > 120
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]
    assert rollback_refused > 0


def test_random_repeated_power_cuts(tmp_path: Path) -> None:
    """ATTACKS.md #46: several random cuts per update, 200 seeds; wear stays bounded."""
    rig = make_rig(tmp_path, seq=5, slot_size=96 * 1024, factory_size=20_000)
    image = make_image(64 * 1024 + 300, version=6)
    config = AgentConfig(fetch=FetchConfig(szx=6), checkpoint_bytes=8 * 1024)
    h = Harness(rig, image, 6, config)
    tally = Tally()

    async def go() -> tuple[int, int]:
        outcome, flash = await h.run()
        assert outcome == Outcome.UPDATED
        total, clean_wear = flash.ops, max(flash.sector_erases)
        await h.random_cuts(tally, total, 200)
        return total, clean_wear

    total, clean_wear = asyncio.run(go())
    print(
        f"\nrandom (200 seeds, {total} ops per clean update): {tally.line()}; "
        f"max erases of one sector: {tally.max_sector_erases} in a recovery run, "
        f"{clean_wear} in a clean update"
    )
    assert tally.cut_points > 300
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]
    # No erase loops: finishing after cuts wears a sector no more than a clean update.
    assert tally.max_sector_erases <= clean_wear


class PairHarness(Harness):
    """A two-component release (issue 13 §4): both images or neither, at every cut.

    On top of the Harness oracles, the running slot's *pair* (component 0's image and
    component 1's, both hashed from flash) must be the old pair or the new pair: an old
    image next to a new one counts as a wrong image.
    """

    def __init__(
        self, rig: Rig, images: tuple[bytes, bytes], seq: int, config: AgentConfig
    ) -> None:
        self.rig = rig
        self.config = config
        main, aux = images
        self.new = hashlib.sha256(main).digest()
        self.new_pair = (self.new, hashlib.sha256(aux).digest())
        self.old_pair = rig.running_pair()
        self.seq = seq
        self.server = InProcessServer(envelope=multi_envelope(rig.key, main, aux, seq))
        self.server.add_image(ids.image_uri(self.new), main)
        self.server.add_image(ids.image_uri(self.new_pair[1]), aux)
        rig.accept(main)
        self.pristine = rig.path.read_bytes()
        self.old_seq = rig.info()["sequence_number"]

    def observe(self, tally: Tally, last_seq: int) -> int:
        seq = super().observe(tally, last_seq)
        if tally.bricked == 0:
            # after the real power-on in super(): what runs now is a whole pair
            pair = self.rig.running_pair()
            if pair not in (self.old_pair, self.new_pair):
                tally.wrong_image += 1
                tally.notes.append(f"mixed pair {pair[0].hex()[:8]}/{pair[1].hex()[:8]}")
        return seq

    async def finish(self, tally: Tally, last_seq: int) -> None:
        await super().finish(tally, last_seq)
        if self.rig.running_pair() != self.new_pair:
            tally.not_finished += 1


def _pair_rig(tmp: Path, **kw: int) -> Rig:
    return make_rig(tmp, seq=5, factory_size=3000, factory_aux_size=1500, **kw)


def test_power_cut_after_every_flash_op_of_a_two_component_update(tmp_path: Path) -> None:
    """The exhaustive harness over a release of two images: 0 bricked, 0 wrong images
    (mixed pairs included), 0 sequence regressions, and it always ends on the new pair."""
    rig = _pair_rig(tmp_path, sector_size=1024, slot_size=16 * 1024, aux_slot_size=8 * 1024)
    images = (make_image(6 * 1024 + 100, version=6), make_image(3 * 1024 + 50, version=6, seed=3))
    h = PairHarness(rig, images, 6, SMALL)
    tally = Tally()

    async def go() -> int:
        outcome, flash = await h.run()
        assert outcome == Outcome.UPDATED
        total = flash.ops
        assert total > 80, "both images, stage, trial and confirm are under test"
        await h.every_op_cuts(tally, total)
        return total

    total = asyncio.run(go())
    print(f"\nexhaustive, two components ({total} ops): {tally.line()}")
    assert tally.cut_points == 2 * total
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]


def test_random_repeated_power_cuts_of_a_two_component_update(tmp_path: Path) -> None:
    """ATTACKS.md #46 for two images: several random cuts per update, 100 seeds."""
    rig = _pair_rig(tmp_path, slot_size=64 * 1024, aux_slot_size=32 * 1024)
    images = (make_image(40_000, version=6), make_image(20_000 + 300, version=6, seed=3))
    config = AgentConfig(fetch=FetchConfig(szx=6), checkpoint_bytes=8 * 1024)
    h = PairHarness(rig, images, 6, config)
    tally = Tally()

    async def go() -> tuple[int, int]:
        outcome, flash = await h.run()
        assert outcome == Outcome.UPDATED
        total, clean_wear = flash.ops, max(flash.sector_erases)
        await h.random_cuts(tally, total, 100)
        return total, clean_wear

    total, clean_wear = asyncio.run(go())
    print(f"\nrandom, two components (100 seeds, {total} ops): {tally.line()}")
    assert tally.cut_points > 150
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]
    assert tally.max_sector_erases <= clean_wear


def test_newer_manifest_discards_a_partial_download(tmp_path: Path) -> None:
    """ATTACKS.md #50: v6 is 60% down when the device dies; v7 is published meanwhile."""
    rig = make_rig(tmp_path, seq=5, slot_size=64 * 1024)
    v6 = make_image(40_000, version=6)
    v7 = make_image(40_000, version=7)
    config = AgentConfig(fetch=FetchConfig(szx=6), checkpoint_bytes=4096)
    h = Harness(rig, v6, 6, config)
    h7 = hashlib.sha256(v7).digest()
    rig.accept(v7)

    async def go() -> None:
        served = 0

        def count(path: str, block2: tuple[int, int, int] | None) -> None:
            nonlocal served
            if path.startswith("/fw/"):
                served += 1

        h.server.on_request = count
        # Find the op count at which ~60% of v6 is in flash.
        outcome, flash = await h.run()
        total = flash.ops
        h.reset()
        outcome, _ = await h.run(FlashFaults(cut_after=int(total * 0.45)))
        assert outcome is None
        partial = rig.info()["download"]
        assert partial is not None and partial["bytes"] >= 16 * 1024
        h.server.envelope = sign(manifest_bytes(image=v7, seq=7), rig.key)
        h.server.add_image(ids.image_uri(h7), v7)
        served = 0
        outcome, _ = await h.run()
        assert outcome == Outcome.UPDATED
        assert served == -(-len(v7) // 1024), "v7 was fetched from block 0"
        assert rig.boots()[1] == h7 and rig.info()["sequence_number"] == 7
        states = [(r.state.value, r.sequence_number) for r in h.server.reports]
        assert ("installed", 6) not in states, "no mixed or older image was ever staged"

    asyncio.run(go())


def test_torn_state_record_at_every_byte_falls_back(tmp_path: Path) -> None:
    """ATTACKS.md #45: damage every byte of the newest state record in turn."""
    rig = make_rig(tmp_path, seq=5)
    flash, identity = open_flash(rig.path)
    sf = StateFile(flash, identity.layout)
    state = sf.load()
    sf.save(replace(state, report_counter=41))  # newest copy: counter 41, seq 5
    c0, c1 = sf.store.copy_counters()
    newest = 0 if (c0 or 0) > (c1 or 0) else 1
    length = len(state.encode()) + 13
    base = identity.layout.state_offset + newest * identity.layout.state_copy_size
    flash.close()
    pristine = rig.path.read_bytes()
    for i in range(length):
        data = bytearray(pristine)
        data[base + i] ^= 0xFF
        rig.path.write_bytes(bytes(data))
        info = rig.info()
        assert info["sequence_number"] == 5, "never a default that accepts seq 0"
        assert info["report_counter"] in (0, 41)
        assert rig.boots()[0] == 0
