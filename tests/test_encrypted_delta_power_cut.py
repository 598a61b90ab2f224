"""Power cuts during an *encrypted* delta install (issue 13 §3b, §5), on a sealed device
(both slots encrypted at rest under its hardware key): the H3 harness of
tests/test_power_cut_update.py as tests/test_delta_power_cut.py runs it, serving an
encrypted delta with the encrypted full image as its fallback.

Exhaustive (every flash operation, clean and torn, A128CTR and A128GCM) on a small
synthetic pair; random repeated cuts on the programmer pair of ../shared/delta. Oracles:
0 bricked, 0 wrong images, 0 sequence regressions, every device ends on the new image,
and the source slot (the running image the patch reads) is never written: after every
cut that left the old image running its raw (at-rest encrypted) bytes are unchanged.
A cut delta restarts from its first patch byte under the same manifest (neither the
LZMA state nor GCM's GHASH is in flash), so resuming needs nothing but the record.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from delta_rig import DELTA_DIR, pair, synthetic_pair
from encdelta_rig import EncryptedDeltaRelease, encrypted_delta_release, make_encdelta_rig
from evil_server import Rig
from test_delta_power_cut import DeltaHarness, clean_delta_run, cut_at_every_op, cut_at_random
from test_power_cut_update import SMALL, Tally

from device_sim.agent import AgentConfig
from device_sim.fetcher import FetchConfig
from otacoap.core import encryption

ALGS = pytest.mark.parametrize(
    "alg", [encryption.A128CTR, encryption.A128GCM], ids=["a128ctr", "a128gcm"]
)


class EncryptedDeltaHarness(DeltaHarness):
    """The power-cut harness serving an encrypted delta (patch + encrypted fallback)."""

    release: EncryptedDeltaRelease

    def __init__(
        self, rig: Rig, source: bytes, image: bytes, seq: int, config: AgentConfig, alg: int
    ) -> None:
        release = encrypted_delta_release(rig.key, source, image, seq, alg=alg)
        super().__init__(rig, source, image, seq, config, release)
        self.source_raw = rig.slot_bytes(0)

    def source_intact(self) -> bool:
        """Slot 0 (the running image at the start) holds exactly its original bytes."""
        return self.rig.slot_bytes(0) == self.source_raw


async def _clean_run(h: EncryptedDeltaHarness) -> int:
    ops = await clean_delta_run(h)
    notes = [r.detail for r in h.server.reports if r.state.value == "downloaded"]
    assert notes and notes[-1].startswith("delta+encrypted-"), notes
    assert h.release.image[:256] not in h.rig.path.read_bytes(), "encrypted at rest"
    return ops


@ALGS
def test_power_cut_at_every_flash_op_of_an_encrypted_delta_install(
    tmp_path: Path, alg: int
) -> None:
    old, new = synthetic_pair(6000)
    rig = make_encdelta_rig(tmp_path, old, sector_size=1024, slot_size=16 * 1024)
    h = EncryptedDeltaHarness(rig, old, new, 6, SMALL, alg)
    tally = Tally()

    async def go() -> tuple[int, int]:
        total = await _clean_run(h)
        return total, await cut_at_every_op(h, total, tally)

    total, source_written = asyncio.run(go())
    name = encryption.ALG_NAMES[alg]
    print(f"\nencrypted delta exhaustive ({name}, {total} ops per install): {tally.line()}")
    assert tally.cut_points == 2 * total and total > 30
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]
    assert source_written == 0
    # Every resume after a cut went on by (encrypted) delta: the fallback never ran.
    assert h.fetched.get(h.release.image_path, 0) == 0, h.fetched


@pytest.mark.skipif(not DELTA_DIR.is_dir(), reason="../shared/delta not available")
@pytest.mark.parametrize(("alg", "seeds"), [(encryption.A128CTR, 60), (encryption.A128GCM, 30)])
def test_random_power_cuts_during_an_encrypted_delta_install_of_the_programmer_pair(
    tmp_path: Path, alg: int, seeds: int
) -> None:
    old, new = pair("programmer")
    slot = -(-max(len(old), len(new)) // 4096) * 4096 + 4096
    rig = make_encdelta_rig(tmp_path, old, slot_size=slot)
    config = AgentConfig(fetch=FetchConfig(szx=6), checkpoint_bytes=16 * 1024)
    h = EncryptedDeltaHarness(rig, old, new, 6, config, alg)
    tally = Tally()

    async def go() -> tuple[int, int]:
        total = await _clean_run(h)
        return total, await cut_at_random(h, total, tally, seeds)

    total, source_written = asyncio.run(go())
    name = encryption.ALG_NAMES[alg]
    print(f"\nencrypted delta random ({name}, {seeds} seeds, {total} ops): {tally.line()}")
    assert tally.cut_points >= seeds
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]
    assert source_written == 0
