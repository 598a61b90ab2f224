"""Power cuts during a delta install (issue 13 §2, §5): the H3 harness of
tests/test_power_cut_update.py on a delta release.

Exhaustive (every flash operation, clean and torn) on a small synthetic pair; random
repeated cuts on a real pair from ../shared/delta. Oracles as there (0 bricked, 0 wrong
images, 0 sequence regressions, every device ends on the new image), plus the delta's
own: the source slot (the running image the patch reads) is never written, so after
every cut it still holds exactly the old image.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from delta_rig import DELTA_DIR, DeltaRelease, delta_release, make_delta_rig, pair, synthetic_pair
from encdelta_rig import EncryptedDeltaRelease
from evil_server import Rig
from test_power_cut_update import SMALL, Harness, Tally

from device_sim.agent import AgentConfig, Outcome
from device_sim.fetcher import FetchConfig
from device_sim.inprocess import InProcessServer


class DeltaHarness(Harness):
    """The power-cut harness serving a delta release (patch + full fallback), or the
    (encrypted) `release` given."""

    def __init__(
        self,
        rig: Rig,
        source: bytes,
        image: bytes,
        seq: int,
        config: AgentConfig,
        release: DeltaRelease | EncryptedDeltaRelease | None = None,
    ) -> None:
        self.rig = rig
        self.config = config
        self.new = hashlib.sha256(image).digest()
        self.seq = seq
        self.source = source
        self.release = release or delta_release(rig.key, source, image, seq)
        self.server = InProcessServer(envelope=self.release.envelope)
        self.release.serve(self.server)
        self.fetched: dict[str, int] = {}
        self.server.on_request = self._count
        rig.accept(image)
        self.pristine = rig.path.read_bytes()
        self.old_seq = rig.info()["sequence_number"]

    def _count(self, path: str, block2: tuple[int, int, int] | None) -> None:
        self.fetched[path] = self.fetched.get(path, 0) + 1

    def source_intact(self) -> bool:
        """The running slot at the start (slot 0) still holds the source image."""
        return self.rig.slot_bytes(0)[: len(self.source)] == self.source


async def cut_at_every_op(h: DeltaHarness, total: int, tally: Tally) -> int:
    """`Harness.every_op_cuts`; the number of cuts after which the old image was running
    but its slot was no longer intact."""
    source_written = 0

    async def check_source(torn: bool, seq: int) -> None:
        nonlocal source_written
        if seq == h.old_seq and not h.source_intact():
            source_written += 1

    await h.every_op_cuts(tally, total, check_source)
    return source_written


async def cut_at_random(h: DeltaHarness, total: int, tally: Tally, seeds: int) -> int:
    """`Harness.random_cuts` with 2 to 4 cuts a seed; counted as in `cut_at_every_op`."""
    source_written = 0

    def check_source(seq: int) -> None:
        nonlocal source_written
        if seq == h.old_seq and not h.source_intact():
            source_written += 1

    await h.random_cuts(tally, total, seeds, most=4, after_cut=check_source)
    return source_written


async def clean_delta_run(h: DeltaHarness) -> int:
    """One update without cuts: by delta (no full-image byte), the source slot intact;
    the flash ops it took."""
    outcome, flash = await h.run()
    assert outcome == Outcome.UPDATED
    assert h.fetched.get(h.release.image_path, 0) == 0, "the clean run used the delta"
    assert h.fetched[h.release.patch_path] > 0
    assert h.source_intact()
    return flash.ops


def test_power_cut_at_every_flash_op_of_a_delta_install(tmp_path: Path) -> None:
    old, new = synthetic_pair(6000)
    rig = make_delta_rig(tmp_path, old, sector_size=1024, slot_size=16 * 1024)
    h = DeltaHarness(rig, old, new, 6, SMALL)
    tally = Tally()

    async def go() -> tuple[int, int]:
        total = await clean_delta_run(h)
        return total, await cut_at_every_op(h, total, tally)

    total, source_written = asyncio.run(go())
    print(f"\ndelta exhaustive ({total} ops per clean install): {tally.line()}")
    assert tally.cut_points == 2 * total and total > 30
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]
    assert source_written == 0


@pytest.mark.skipif(not DELTA_DIR.is_dir(), reason="../shared/delta not available")
@pytest.mark.parametrize(("name", "seeds"), [("programmer", 40), ("pybv11", 12)])
def test_random_power_cuts_during_a_delta_install_of_a_real_pair(
    tmp_path: Path, name: str, seeds: int
) -> None:
    old, new = pair(name)
    slot = -(-max(len(old), len(new)) // 4096) * 4096 + 4096
    rig = make_delta_rig(tmp_path, old, slot_size=slot)
    config = AgentConfig(fetch=FetchConfig(szx=6), checkpoint_bytes=16 * 1024)
    h = DeltaHarness(rig, old, new, 6, config)
    tally = Tally()

    async def go() -> tuple[int, int]:
        total = await clean_delta_run(h)
        return total, await cut_at_random(h, total, tally, seeds)

    total, source_written = asyncio.run(go())
    print(f"\ndelta random ({name}, {seeds} seeds, {total} ops per clean install): {tally.line()}")
    assert tally.cut_points >= seeds
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]
    assert source_written == 0
