"""Power cuts during an *encrypted* install (issue 13 §5), on a sealed device whose
slots are encrypted at rest under its hardware key: the exhaustive and random harnesses
of tests/test_power_cut_update.py, same oracles (0 bricked, 0 wrong images, 0 sequence
regressions, every run ends on the new image).

A128CTR (the streaming mode) resumes from its checkpoints; A128GCM restarts from zero
after a cut. Both are cut at every flash operation (clean and torn).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from evil_server import make_rig, manifest_bytes, sign
from test_power_cut_update import SMALL, Harness, Tally

from device_sim.agent import AgentConfig, Outcome
from device_sim.fetcher import FetchConfig
from device_sim.firmware import make_image
from otacoap.core import encryption, ids

KEK = bytes(range(16, 32))


def encrypted_harness(
    tmp_path: Path, image: bytes, alg: int, config: AgentConfig, **rig_kw: object
) -> Harness:
    rig = make_rig(tmp_path, seq=5, decryption_keks=(KEK,), seal=True, **rig_kw)  # type: ignore[arg-type]
    h = Harness(rig, image, 6, config)
    info, ciphertext = encryption.encrypt(image, [encryption.KekRecipient(KEK)], os.urandom, alg)
    uri = ids.image_uri(hashlib.sha256(ciphertext).digest())
    h.server.envelope = sign(
        manifest_bytes(image=image, seq=6, uri=uri, encryption_info=info), rig.key
    )
    h.server.add_image(uri, ciphertext)
    return h


@pytest.mark.parametrize("alg", [encryption.A128CTR, encryption.A128GCM], ids=["ctr", "gcm"])
def test_power_cut_after_every_flash_op_of_an_encrypted_install(tmp_path: Path, alg: int) -> None:
    image = make_image(6 * 1024 + 100, version=6)
    h = encrypted_harness(
        tmp_path, image, alg, SMALL, sector_size=1024, slot_size=16 * 1024, factory_size=3000
    )
    tally = Tally()

    async def go() -> None:
        outcome, flash = await h.run()
        assert outcome == Outcome.UPDATED
        assert image[:256] not in h.rig.path.read_bytes(), "slots are encrypted at rest"
        total = flash.ops
        assert total > (60 if alg == encryption.A128CTR else 40)  # GCM: no checkpoints
        await h.every_op_cuts(tally, total)

    asyncio.run(go())
    print(f"\nencrypted exhaustive ({encryption.ALG_NAMES[alg]}): {tally.line()}")
    assert tally.cut_points > 80
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]


def test_random_repeated_power_cuts_of_an_encrypted_install(tmp_path: Path) -> None:
    image = make_image(64 * 1024 + 300, version=6)
    config = AgentConfig(fetch=FetchConfig(szx=6), checkpoint_bytes=8 * 1024)
    h = encrypted_harness(
        tmp_path, image, encryption.A128CTR, config, slot_size=96 * 1024, factory_size=20_000
    )
    tally = Tally()

    async def go() -> None:
        outcome, flash = await h.run()
        assert outcome == Outcome.UPDATED
        await h.random_cuts(tally, flash.ops, 60)

    asyncio.run(go())
    print(f"\nencrypted random (60 seeds): {tally.line()}")
    assert tally.cut_points > 90
    assert (tally.bricked, tally.wrong_image, tally.seq_down, tally.not_finished) == (
        0,
        0,
        0,
        0,
    ), tally.notes[:5]
