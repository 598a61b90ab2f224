"""SimFlash must behave like NOR flash, or crash tests built on it prove nothing.

Each test pins one rule a real part enforces (erase granularity, program only clears
bits, alignment) or one fault the update logic must survive (power cut, failed or
dropped write), including the exact op a power cut lands on.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_sim.flash import (
    ERASED,
    FlashError,
    FlashFaults,
    FlashWriteError,
    PowerCut,
    SimFlash,
    sha256_region,
)

SECTOR = 256
SIZE = 8 * SECTOR


@pytest.fixture
def flash(tmp_path: Path) -> Iterator[SimFlash]:
    f = SimFlash.create(tmp_path / "flash.bin", SIZE, sector_size=SECTOR, write_align=4)
    yield f
    f.close()


def blank(n: int) -> bytes:
    return bytes([ERASED]) * n


# -- creation and geometry -------------------------------------------------------------


def test_create_makes_erased_file_of_exact_size(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with SimFlash.create(path, SIZE, sector_size=SECTOR) as f:
        assert f.size == SIZE
        assert f.num_sectors == 8
        assert f.read(0, SIZE) == blank(SIZE)
    assert path.stat().st_size == SIZE
    assert path.read_bytes() == blank(SIZE)


@pytest.mark.parametrize(
    ("size", "sector_size", "write_align"),
    [(1000, 256, 4), (0, 256, 4), (512, 256, 3), (512, 0, 4), (512, 256, 0)],
)
def test_create_rejects_bad_geometry(
    tmp_path: Path, size: int, sector_size: int, write_align: int
) -> None:
    with pytest.raises(ValueError):
        SimFlash.create(tmp_path / "f.bin", size, sector_size=sector_size, write_align=write_align)


def test_open_rejects_file_not_multiple_of_sector(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(blank(300))
    with pytest.raises(ValueError):
        SimFlash.open(path, sector_size=SECTOR)


def test_context_manager_closes_and_closed_flash_refuses(tmp_path: Path) -> None:
    with SimFlash.create(tmp_path / "f.bin", SIZE, sector_size=SECTOR) as f:
        pass
    assert f.closed
    with pytest.raises(FlashError, match="closed"):
        f.read(0, 4)
    with pytest.raises(FlashError, match="closed"):
        f.write(0, b"\0" * 4)
    f.close()  # idempotent


# -- NOR semantics -----------------------------------------------------------------------


def test_erase_sets_whole_sector_to_ff(flash: SimFlash) -> None:
    flash.write(0, b"\x00" * SECTOR)
    flash.write(SECTOR, b"\x00" * 8)
    flash.erase(0, SECTOR)
    assert flash.read(0, SECTOR) == blank(SECTOR)
    assert flash.read(SECTOR, 8) == b"\x00" * 8  # neighbour untouched


def test_multi_sector_erase(flash: SimFlash) -> None:
    flash.write(0, b"\x00" * (3 * SECTOR))
    flash.erase(SECTOR, 2 * SECTOR)
    assert flash.read(0, SECTOR) == b"\x00" * SECTOR
    assert flash.read(SECTOR, 2 * SECTOR) == blank(2 * SECTOR)


def test_write_can_only_clear_bits(flash: SimFlash) -> None:
    flash.write(0, b"\xf0\xf0\xf0\xf0")
    flash.write(0, b"\x30\x30\x30\x30")  # 0xF0 & 0x30 == 0x30: only clears bits
    assert flash.read(0, 4) == b"\x30" * 4
    flash.write(0, b"\x30\x30\x30\x30")  # rewriting identical data is fine on NOR
    assert flash.read(0, 4) == b"\x30" * 4


def test_write_to_unerased_location_raises_and_changes_nothing(flash: SimFlash) -> None:
    flash.write(8, b"\x00\x00\x00\x00")
    before = flash.read(0, 16)
    with pytest.raises(FlashError, match="write to unerased location"):
        flash.write(0, b"\x00" * 8 + b"\x01\x00\x00\x00")  # sets a bit at offset 8
    # Even the erased part of that write was not programmed: refusal is atomic.
    assert flash.read(0, 16) == before
    flash.write(0, b"\xf0\xff\xff\xff")
    with pytest.raises(FlashError, match="write to unerased location"):
        flash.write(0, b"\x0f\xff\xff\xff")


def test_unerased_check_spans_io_chunks(tmp_path: Path) -> None:
    size = 256 * 1024
    with SimFlash.create(tmp_path / "f.bin", size, sector_size=4096) as f:
        f.write(200 * 1024, b"\x00" * 4)
        with pytest.raises(FlashError, match="0x32000"):
            f.write(0, b"\x01" * size)
        assert f.read(0, 4) == blank(4)


def test_invalid_commands_are_not_counted(flash: SimFlash) -> None:
    flash.write(0, b"\x00" * 4)
    flash.reset_counters()
    with pytest.raises(FlashError):
        flash.write(0, b"\x01\x00\x00\x00")
    with pytest.raises(FlashError):
        flash.erase(1, SECTOR)
    assert flash.ops == 0


@pytest.mark.parametrize(
    ("offset", "length"),
    [(2, 4), (0, 3), (4, 6), (0, 0)],
)
def test_write_alignment(flash: SimFlash, offset: int, length: int) -> None:
    with pytest.raises(FlashError, match="aligned"):
        flash.write(offset, b"\x00" * length)


def test_write_align_one_allows_any_offset(tmp_path: Path) -> None:
    with SimFlash.create(tmp_path / "f.bin", SIZE, sector_size=SECTOR, write_align=1) as f:
        f.write(3, b"\x01\x02\x03")
        assert f.read(2, 5) == b"\xff\x01\x02\x03\xff"


@pytest.mark.parametrize(
    ("offset", "length"),
    [(1, SECTOR), (0, SECTOR - 1), (0, SECTOR + 4), (SECTOR, 0), (-SECTOR, SECTOR)],
)
def test_erase_must_be_whole_sectors(flash: SimFlash, offset: int, length: int) -> None:
    with pytest.raises(FlashError):
        flash.erase(offset, length)


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f.read(SIZE - 4, 8),
        lambda f: f.read(-4, 4),
        lambda f: f.read(0, -1),
        lambda f: f.read(SIZE + 4, 0),
        lambda f: f.write(SIZE, b"\0" * 4),
        lambda f: f.write(SIZE - 4, b"\0" * 8),
        lambda f: f.write(-4, b"\0" * 4),
        lambda f: f.erase(SIZE, SECTOR),
        lambda f: f.erase(SIZE - SECTOR, 2 * SECTOR),
    ],
)
def test_bounds_checked(flash: SimFlash, call: Callable[[SimFlash], object]) -> None:
    with pytest.raises(FlashError, match="outside"):
        call(flash)
    assert flash.ops == 0


def test_read_at_end_and_empty_read(flash: SimFlash) -> None:
    assert flash.read(SIZE - 4, 4) == blank(4)
    assert flash.read(SIZE, 0) == b""


def test_write_accepts_bytearray_and_memoryview(flash: SimFlash) -> None:
    flash.write(0, bytearray(b"\x01\x02\x03\x04"))
    flash.write(4, memoryview(b"\x05\x06\x07\x08\x09\x0a\x0b\x0c")[:4])
    assert flash.read(0, 8) == bytes(range(1, 9))


# -- counters --------------------------------------------------------------------------


def test_counters_and_sector_wear(flash: SimFlash) -> None:
    flash.erase(0, 2 * SECTOR)
    flash.write(0, b"\x00" * 8)
    flash.write(SECTOR, b"\x00" * 12)
    flash.erase(SECTOR, SECTOR)
    flash.read(0, SIZE)  # reads are not ops
    assert flash.ops == 4
    assert flash.erase_count == 2
    assert flash.write_count == 2
    assert flash.bytes_written == 20
    assert flash.sector_erases == [1, 2, 0, 0, 0, 0, 0, 0]
    flash.reset_counters()
    assert (flash.ops, flash.erase_count, flash.write_count, flash.bytes_written) == (0, 0, 0, 0)
    assert flash.sector_erases == [0] * 8


# -- persistence -------------------------------------------------------------------------


def test_every_op_is_visible_to_a_reopen_without_close(flash: SimFlash) -> None:
    flash.write(8, b"\x12\x34\x56\x78")
    flash.erase(SECTOR, SECTOR)
    # A second handle opened while the first still exists sees the data: each op flushed.
    with SimFlash.open(flash.path, sector_size=SECTOR) as again:
        assert again.read(8, 4) == b"\x12\x34\x56\x78"
        assert again.read(0, 8) == blank(8)


def test_persistence_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with SimFlash.create(path, SIZE, sector_size=SECTOR) as f:
        f.write(SECTOR, b"data")
    with SimFlash.open(path, sector_size=SECTOR) as f:
        assert f.read(SECTOR, 4) == b"data"
        assert f.ops == 0  # counters start fresh on every open


# -- power cuts ------------------------------------------------------------------------


def test_power_cut_is_not_a_flash_error() -> None:
    assert not issubclass(PowerCut, FlashError)
    assert issubclass(FlashWriteError, FlashError)


def run_script(f: SimFlash) -> None:
    """Four ops: erase, write, write, erase."""
    f.erase(0, SECTOR)
    f.write(0, b"\x01" * 16)
    f.write(16, b"\x02" * 16)
    f.erase(SECTOR, SECTOR)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_clean_power_cut_at_op_k(tmp_path: Path, k: int) -> None:
    path = tmp_path / "f.bin"
    with SimFlash.create(path, SIZE, sector_size=SECTOR) as f:
        f.write(SECTOR, b"\x00" * 4)  # so the final erase has a visible effect
        f.reset_counters()
        f.faults.cut_after = k
        with pytest.raises(PowerCut, match=f"op {k}"):
            run_script(f)
        assert f.dead
        assert f.ops == k
        # The dead device refuses everything, reads included.
        with pytest.raises(PowerCut):
            f.write(64, b"\x00" * 4)
        with pytest.raises(PowerCut):
            f.erase(0, SECTOR)
        with pytest.raises(PowerCut):
            f.read(0, 4)
        assert f.ops == k
    with SimFlash.open(path, sector_size=SECTOR) as f:
        assert f.read(0, 16) == (b"\x01" * 16 if k > 2 else blank(16))
        assert f.read(16, 16) == (b"\x02" * 16 if k > 3 else blank(16))
        assert f.read(SECTOR, 4) == b"\x00" * 4  # op 4 never ran or was the cut one


def test_cut_after_beyond_script_does_nothing(flash: SimFlash) -> None:
    flash.faults.cut_after = 5
    run_script(flash)
    assert not flash.dead
    with pytest.raises(PowerCut, match="op 5"):
        flash.write(64, b"\x00" * 4)


def test_cut_counts_from_reset_counters(flash: SimFlash) -> None:
    run_script(flash)
    flash.reset_counters()
    flash.faults.cut_after = 1
    with pytest.raises(PowerCut, match="op 1"):
        flash.write(64, b"\x00" * 4)
    assert flash.dead


def test_cut_after_already_passed_cuts_next_op(flash: SimFlash) -> None:
    run_script(flash)
    flash.faults.cut_after = 2
    with pytest.raises(PowerCut):
        flash.write(64, b"\x00" * 4)


def test_reset_counters_does_not_revive(flash: SimFlash) -> None:
    flash.faults.cut_after = 1
    with pytest.raises(PowerCut):
        flash.erase(0, SECTOR)
    flash.reset_counters()
    flash.faults.cut_after = None
    with pytest.raises(PowerCut):
        flash.erase(0, SECTOR)


@pytest.mark.parametrize(
    ("write_align", "length", "programmed"),
    [(4, 16, 8), (4, 12, 4), (4, 4, 0), (1, 7, 3), (8, 24, 8)],
)
def test_torn_write_programs_aligned_first_half(
    tmp_path: Path, write_align: int, length: int, programmed: int
) -> None:
    path = tmp_path / "f.bin"
    with SimFlash.create(path, SIZE, sector_size=SECTOR, write_align=write_align) as f:
        f.faults = FlashFaults(cut_after=1, torn=True)
        with pytest.raises(PowerCut):
            f.write(0, b"\x00" * length)
        assert f.bytes_written == programmed
    with SimFlash.open(path, sector_size=SECTOR, write_align=write_align) as f:
        assert f.read(0, length) == b"\x00" * programmed + blank(length - programmed)


def test_torn_single_sector_erase_erases_first_half(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with SimFlash.create(path, SIZE, sector_size=SECTOR) as f:
        f.write(0, b"\x00" * SECTOR)
        f.reset_counters()
        f.faults.cut_after = 1
        f.faults.torn = True
        with pytest.raises(PowerCut):
            f.erase(0, SECTOR)
        assert f.sector_erases[0] == 1  # a partial erase still wears the sector
    with SimFlash.open(path, sector_size=SECTOR) as f:
        half = SECTOR // 2
        assert f.read(0, half) == blank(half)
        assert f.read(half, half) == b"\x00" * half


def test_torn_multi_sector_erase_stops_mid_range(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with SimFlash.create(path, SIZE, sector_size=SECTOR) as f:
        f.write(0, b"\x00" * (4 * SECTOR))
        f.reset_counters()
        f.faults = FlashFaults(cut_after=1, torn=True)
        with pytest.raises(PowerCut):
            f.erase(0, 3 * SECTOR)
        assert f.sector_erases[:4] == [1, 1, 0, 0]
    with SimFlash.open(path, sector_size=SECTOR) as f:
        cut = 3 * SECTOR // 2
        assert f.read(0, cut) == blank(cut)
        assert f.read(cut, 4 * SECTOR - cut) == b"\x00" * (4 * SECTOR - cut)


def test_clean_cut_leaves_erase_target_untouched(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with SimFlash.create(path, SIZE, sector_size=SECTOR) as f:
        f.write(0, b"\x00" * SECTOR)
        f.faults.cut_after = 2
        with pytest.raises(PowerCut):
            f.erase(0, SECTOR)
        assert f.sector_erases[0] == 0
    assert Path(path).read_bytes()[:SECTOR] == b"\x00" * SECTOR


def test_invalid_fault_settings_rejected(flash: SimFlash) -> None:
    with pytest.raises(ValueError):
        FlashFaults(fail_write_probability=1.5)
    with pytest.raises(ValueError):
        FlashFaults(fail_write_probability=0.6, drop_write_probability=0.6)
    flash.faults.cut_after = 0
    with pytest.raises(ValueError):
        flash.erase(0, SECTOR)


# -- failed and dropped writes -----------------------------------------------------------


def test_failed_write_raises_and_changes_nothing(flash: SimFlash) -> None:
    flash.faults = FlashFaults(fail_write_probability=1.0)
    with pytest.raises(FlashWriteError):
        flash.write(0, b"\x00" * 8)
    assert flash.read(0, 8) == blank(8)
    assert (flash.failed_writes, flash.write_count, flash.bytes_written) == (1, 1, 0)
    flash.faults.fail_write_probability = 0.0
    flash.write(0, b"\x00" * 8)  # the location is still erased, so a retry works
    assert flash.read(0, 8) == b"\x00" * 8


def test_dropped_write_is_silent_and_readback_catches_it(flash: SimFlash) -> None:
    flash.faults = FlashFaults(drop_write_probability=1.0)
    flash.write(0, b"\x00" * 8)  # no exception
    assert flash.read(0, 8) != b"\x00" * 8
    assert (flash.dropped_writes, flash.write_count, flash.bytes_written) == (1, 1, 0)


def fault_pattern(path: Path, seed: int) -> list[str]:
    faults = FlashFaults(fail_write_probability=0.3, drop_write_probability=0.3, seed=seed)
    outcome = []
    with SimFlash.create(path, SIZE, sector_size=SECTOR, faults=faults) as f:
        for i in range(64):
            try:
                f.write(i * 4, b"\x00" * 4)
            except FlashWriteError:
                outcome.append("fail")
                continue
            outcome.append("ok" if f.read(i * 4, 4) == b"\x00" * 4 else "drop")
        assert f.failed_writes == outcome.count("fail")
        assert f.dropped_writes == outcome.count("drop")
    return outcome


def test_random_faults_are_reproducible_from_seed(tmp_path: Path) -> None:
    a = fault_pattern(tmp_path / "a.bin", seed=7)
    b = fault_pattern(tmp_path / "b.bin", seed=7)
    c = fault_pattern(tmp_path / "c.bin", seed=8)
    assert a == b
    assert a != c
    assert {"ok", "fail", "drop"} <= set(a)


def test_reseed_replays_fault_sequence(flash: SimFlash) -> None:
    flash.faults = FlashFaults(fail_write_probability=0.5, seed=1)
    first = [flash.faults.rng.random() for _ in range(5)]
    flash.faults.reseed(1)
    assert [flash.faults.rng.random() for _ in range(5)] == first


def test_power_cut_takes_precedence_over_random_faults(flash: SimFlash) -> None:
    flash.faults = FlashFaults(cut_after=1, fail_write_probability=1.0)
    with pytest.raises(PowerCut):
        flash.write(0, b"\x00" * 4)


# -- hashing and memory ------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "length", "chunk"), [(0, SIZE, 4096), (4, 1000, 300)])
def test_sha256_region_matches_hashlib(
    flash: SimFlash, offset: int, length: int, chunk: int
) -> None:
    flash.write(0, bytes(range(256)) * 4)
    expected = hashlib.sha256(flash.read(offset, length)).digest()
    assert sha256_region(flash, offset, length, chunk=chunk) == expected


def test_sha256_region_bounds(flash: SimFlash) -> None:
    with pytest.raises(FlashError):
        sha256_region(flash, SIZE - 4, 8)
    with pytest.raises(ValueError):
        sha256_region(flash, 0, 4, chunk=0)
    assert sha256_region(flash, 0, 0) == hashlib.sha256().digest()


def test_16_mib_image_uses_bounded_memory(tmp_path: Path) -> None:
    size = 16 * 1024 * 1024
    tracemalloc.start()
    try:
        with SimFlash.create(tmp_path / "big.bin", size) as f:
            f.write(size - 4096, b"\x00" * 4096)
            f.erase(0, 64 * 1024)
            digest = sha256_region(f, 0, size, chunk=64 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    expected = hashlib.sha256(b"\xff" * (size - 4096) + b"\x00" * 4096).digest()
    assert digest == expected
