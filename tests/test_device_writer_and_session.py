"""The sans-I/O pieces of the device: the image writer and the two state-machine tables.

The writer is exercised on a real SimFlash (its NOR rules catch a writer that
programs unerased bytes or forgets an erase), including dropped and failed writes
(ATTACKS.md #48) and a resume that must re-hash the flash prefix (#23).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.flash import FlashFaults, FlashWriteError, SimFlash
from otacoap.core import suit
from otacoap.core.boot_status import BOOT_TRANSITIONS, BootEvent, boot_step
from otacoap.core.errors import ConditionFailed, ReportReason, TransferError
from otacoap.core.report import State
from otacoap.core.update_machine import (
    TERMINAL,
    TRANSITIONS,
    Phase,
    Step,
    update_step,
)
from otacoap.core.update_record import BootStatus, TransitionError
from otacoap.core.writer import ImageWriter, StagingError, WriterPhase, hash_region

SECTOR = 1024
BASE = 2 * SECTOR
CAPACITY = 16 * SECTOR


def flash_at(tmp: Path, faults: FlashFaults | None = None) -> SimFlash:
    return SimFlash.create(tmp / "f.bin", 20 * SECTOR, sector_size=SECTOR, faults=faults)


def writer(flash: SimFlash, image: bytes, resume_at: int = 0, **kw: object) -> ImageWriter:
    return ImageWriter(
        flash,
        base=BASE,
        capacity=CAPACITY,
        size=len(image),
        digest=suit.SuitDigest.of(image),
        resume_at=resume_at,
        retryable=(FlashWriteError,),
        **kw,  # type: ignore[arg-type]
    )


def feed(w: ImageWriter, image: bytes, start: int, block: int = 256) -> None:
    for pos in range(start, len(image), block):
        w.write(image[pos : pos + block])


# -- writer -----------------------------------------------------------------------------


def test_writer_streams_erases_each_sector_once_and_pads_with_erased(tmp_path: Path) -> None:
    flash = flash_at(tmp_path)
    flash.write(BASE, b"\x00" * 16)  # stale data in the slot must not matter
    image = bytes(range(256)) * 13 + b"xyz"  # ends in a partial write unit
    w = writer(flash, image)
    feed(w, image, 0)
    w.finish()
    assert w.phase == WriterPhase.COMPLETE
    assert flash.read(BASE, len(image)) == image
    assert flash.read(BASE + len(image), 1) == b"\xff", "padding programs nothing"
    touched = range(BASE // SECTOR, (BASE + len(image) - 1) // SECTOR + 1)
    assert [flash.sector_erases[s] for s in touched] == [1] * len(touched)
    assert flash.sector_erases[0] == flash.sector_erases[1] == 0, "nothing outside the slot"
    assert hash_region(flash, BASE, len(image)) == hashlib.sha256(image).digest()


def test_writer_refuses_bytes_past_the_size_and_is_sticky(tmp_path: Path) -> None:
    flash = flash_at(tmp_path)
    image = b"a" * 1000
    w = writer(flash, image)
    w.write(image[:512])
    with pytest.raises(TransferError):
        w.write(b"b" * 512)  # 1024 > 1000
    assert w.phase == WriterPhase.FAILED
    with pytest.raises(StagingError):
        w.write(b"c" * 4)
    with pytest.raises(StagingError):
        w.finish()


def test_writer_refuses_an_unaligned_middle_block(tmp_path: Path) -> None:
    w = writer(flash_at(tmp_path), b"a" * 1000)
    with pytest.raises(TransferError):
        w.write(b"a" * 3)


def test_writer_detects_wrong_bytes_and_short_images(tmp_path: Path) -> None:
    flash = flash_at(tmp_path)
    image = b"a" * 4000
    w = writer(flash, image)
    feed(w, b"b" + image[1:], 0)
    with pytest.raises(ConditionFailed):
        w.finish()
    assert w.phase == WriterPhase.FAILED
    w2 = writer(flash_at(tmp_path / ".." / tmp_path.name), image)
    feed(w2, image[:2048], 0)
    with pytest.raises(TransferError, match="ended after 2048"):
        w2.finish()


def test_resume_rehashes_the_flash_prefix(tmp_path: Path) -> None:
    flash = flash_at(tmp_path)
    image = hashlib.sha256(b"x").digest() * 200  # 6400 bytes
    w = writer(flash, image)
    feed(w, image[: 3 * SECTOR + 512], 0)  # half of the 4th sector beyond the checkpoint
    resumed = writer(flash, image, resume_at=3 * SECTOR)
    feed(resumed, image, 3 * SECTOR)
    resumed.finish()
    assert flash.read(BASE, len(image)) == image
    # A corrupted prefix is caught: the hash is not carried over, it is recomputed.
    raw = bytearray(flash.read(BASE, SECTOR))
    raw[10] = 0
    flash.erase(BASE, SECTOR)
    flash.write(BASE, bytes(raw))
    again = writer(flash, image, resume_at=3 * SECTOR)
    feed(again, image, 3 * SECTOR)
    with pytest.raises(ConditionFailed):
        again.finish()


def test_resume_offset_must_be_a_sector_boundary(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        writer(flash_at(tmp_path), b"a" * 4000, resume_at=100)


def test_dropped_and_failed_writes_are_retried_or_reported(tmp_path: Path) -> None:
    image = hashlib.sha256(b"y").digest() * 100
    flash = flash_at(tmp_path, FlashFaults(drop_write_probability=0.3, seed=1))
    w = writer(flash, image, write_attempts=8)
    feed(w, image, 0, block=64)
    w.finish()
    assert flash.dropped_writes > 0
    assert flash.read(BASE, len(image)) == image
    broken = flash_at(tmp_path / ".." / tmp_path.name, FlashFaults(fail_write_probability=1.0))
    w2 = writer(broken, image)
    with pytest.raises(StagingError, match="failed 3 times"):
        w2.write(image[:64])
    assert w2.phase == WriterPhase.FAILED


def test_image_larger_than_the_slot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TransferError):
        writer(flash_at(tmp_path), b"a" * (CAPACITY + 1))


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=6 * SECTOR),
    block=st.sampled_from([16, 64, 256, 1024]),
    cut=st.integers(min_value=0, max_value=6),
)
def test_any_block_size_and_resume_point_gives_the_exact_image(
    tmp_path_factory: pytest.TempPathFactory, size: int, block: int, cut: int
) -> None:
    tmp = tmp_path_factory.mktemp("w")
    flash = flash_at(tmp)
    image = (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]
    stop = min(cut * SECTOR, size - size % SECTOR if size % SECTOR else size)
    w = writer(flash, image)
    feed(w, image[:stop], 0, block)
    w2 = writer(flash, image, resume_at=stop - stop % SECTOR if stop < size else stop)
    feed(w2, image, w2.offset, block)
    w2.finish()
    assert flash.read(BASE, size) == image
    flash.close()


# -- the update session -----------------------------------------------------------------


def test_session_happy_path_and_reports() -> None:
    phase, reports = Phase.IDLE, []
    for step in (Step.CHECK, Step.ACCEPTED, Step.FETCH_STARTED, Step.FETCH_DONE, Step.STAGED):
        t = update_step(phase, step)
        reports.append(t.report)
        phase = t.target
    assert reports == [None, None, State.DOWNLOADING, State.DOWNLOADED, None]
    assert phase == Phase.STAGED and phase in TERMINAL


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_phases_are_sticky(terminal: Phase) -> None:
    assert not any(src == terminal for src, _ in TRANSITIONS)
    for step in Step:
        with pytest.raises(TransitionError):
            update_step(terminal, step)


def test_refusals_always_carry_a_reason() -> None:
    for (src, step), (_, report) in TRANSITIONS.items():
        if report in (State.REJECTED, State.FAILED):
            assert update_step(src, step).reason != ReportReason.OK


def test_no_payload_before_the_trust_gate() -> None:
    """FETCH_STARTED is only reachable from VERIFIED (RFC 9124 FAIL_EARLY)."""
    sources = {src for (src, step) in TRANSITIONS if step == Step.FETCH_STARTED}
    assert sources == {Phase.VERIFIED}
    checking = update_step(Phase.IDLE, Step.CHECK).target
    with pytest.raises(TransitionError):
        update_step(checking, Step.FETCH_STARTED)


def test_boot_table() -> None:
    assert boot_step(BootStatus.CONFIRMED, BootEvent.STAGE) == (
        BootStatus.PENDING,
        State.INSTALLING,
    )
    assert boot_step(BootStatus.TESTING, BootEvent.CONFIRM)[0] == BootStatus.CONFIRMED
    # Only a trial ends in CONFIRMED via confirm/revert; nothing confirms from PENDING.
    assert (BootStatus.PENDING, BootEvent.CONFIRM) not in BOOT_TRANSITIONS
    for status in BootStatus:
        for event in BootEvent:
            if (status, event) not in BOOT_TRANSITIONS:
                with pytest.raises(TransitionError):
                    boot_step(status, event)
