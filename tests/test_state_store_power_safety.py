"""The state store must never lose the device's state, whatever the flash does.

The promise under test: once a save has completed, ``load()`` returns that record or a
newer one, through power cuts at every op (clean and torn), corruption of any byte of
the newest copy, and failed or dropped writes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.flash import FlashError, FlashFaults, PowerCut, SimFlash
from device_sim.record_store import (
    HEADER_SIZE,
    MAGIC,
    OVERHEAD,
    StateStore,
    StateStoreError,
    encode_record,
)

SECTOR = 256
COPY = 2 * SECTOR
OFFSET = SECTOR  # a non-zero offset catches copy-address arithmetic mistakes
SIZE = 6 * SECTOR


def make(path: Path, write_align: int = 4, **store_kw: int) -> tuple[SimFlash, StateStore]:
    flash = SimFlash.create(path, SIZE, sector_size=SECTOR, write_align=write_align)
    return flash, StateStore(flash, OFFSET, COPY, **store_kw)


def reopen(path: Path, write_align: int = 4) -> tuple[SimFlash, StateStore]:
    flash = SimFlash.open(path, sector_size=SECTOR, write_align=write_align)
    return flash, StateStore(flash, OFFSET, COPY)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    flash, s = make(tmp_path / "flash.bin")
    yield s
    flash.close()


# -- basics ------------------------------------------------------------------------------


def test_fresh_flash_loads_none(store: StateStore) -> None:
    assert store.load() is None
    assert store.copy_counters() == (None, None)


def test_round_trip_and_counter_increases(store: StateStore) -> None:
    payloads = [b"", b"a", b"\xff" * 40, bytes(range(256)), b"\x00" * store.max_payload]
    for i, p in enumerate(payloads, start=1):
        assert store.save(p) == i
        assert store.load() == (i, p)


def test_saves_alternate_copies(store: StateStore) -> None:
    store.save(b"one")
    assert store.copy_counters() == (1, None)
    store.save(b"two")
    assert store.copy_counters() == (1, 2)
    store.save(b"three")
    assert store.copy_counters() == (3, 2)
    store.save(b"four")
    assert store.copy_counters() == (3, 4)


def test_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    flash, s = make(path)
    s.save(b"hello")
    s.save(b"world")
    flash.close()
    flash, s = reopen(path)
    with flash:
        assert s.load() == (2, b"world")
        assert s.save(b"again") == 3


def test_payload_too_large(store: StateStore) -> None:
    assert store.max_payload == COPY - OVERHEAD
    with pytest.raises(ValueError):
        store.save(b"\x00" * (store.max_payload + 1))
    assert store.load() is None


def test_load_reads_flash_every_time(store: StateStore, tmp_path: Path) -> None:
    store.save(b"old")
    store.save(b"new")
    assert store.load() == (2, b"new")
    # Damage behind the store's back: a cache would keep answering "new".
    flash = SimFlash.open(tmp_path / "flash.bin", sector_size=SECTOR)
    with flash:
        flash.erase(store.copy_offset(1), SECTOR)
    assert store.load() == (1, b"old")


@pytest.mark.parametrize(
    ("offset", "copy_size"),
    [(1, COPY), (0, SECTOR + 4), (0, 0), (SIZE - COPY, COPY), (-SECTOR, COPY)],
)
def test_constructor_validates_geometry(store: StateStore, offset: int, copy_size: int) -> None:
    flash = store.flash
    with pytest.raises(ValueError):
        StateStore(flash, offset, copy_size)


def test_counter_exhaustion_refused(store: StateStore) -> None:
    flash = store.flash
    flash.write(store.copy_offset(0), encode_record(0xFFFFFFFF, b"last", flash.write_align))
    assert store.load() == (0xFFFFFFFF, b"last")
    with pytest.raises(StateStoreError, match="exhausted"):
        store.save(b"more")
    assert store.load() == (0xFFFFFFFF, b"last")


def test_save_only_erases_the_sectors_it_needs(store: StateStore) -> None:
    flash = store.flash
    store.save(b"x")
    flash.reset_counters()
    store.save(b"y" * 300)  # 317 bytes: two sectors of copy 1
    first = OFFSET // SECTOR
    assert flash.sector_erases[first : first + 4] == [0, 0, 1, 1]
    assert flash.ops == 3  # erase, body write, commit write


# -- corruption ------------------------------------------------------------------------


def flip_byte(path: Path, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_corrupting_any_byte_of_newest_falls_back_to_older(tmp_path: Path, mask: int) -> None:
    path = tmp_path / "f.bin"
    flash, s = make(path, write_align=8)
    s.save(b"first")
    s.save(b"second")
    payload = b"third-payload-" * 2 + b"!!"  # 30 bytes: 47-byte record + 1 pad byte
    s.save(payload)
    assert s.copy_counters() == (3, 2)
    newest = s.copy_offset(0)
    record_len = OVERHEAD + len(payload)
    padded = len(encode_record(3, payload, 8))
    assert padded == record_len + 1
    flash.close()
    for i in range(padded):
        flip_byte(path, newest + i, mask)
        flash, s = reopen(path, write_align=8)
        with flash:
            got = s.load()
        flip_byte(path, newest + i, mask)  # restore
        if i < record_len:
            assert got == (2, b"second"), f"byte {i}"
        else:
            assert got == (3, payload), f"padding byte {i} must not matter"


def test_corrupting_older_copy_keeps_newest(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    flash, s = make(path)
    s.save(b"a")
    s.save(b"b")
    flash.close()
    flip_byte(path, OFFSET + HEADER_SIZE, 0x01)
    flash, s = reopen(path)
    with flash:
        assert s.load() == (2, b"b")
        # The next save overwrites the damaged copy, not the only good one.
        assert s.save(b"c") == 3
        assert s.copy_counters() == (3, 2)


def test_both_copies_corrupt_is_indistinguishable_from_fresh(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    flash, s = make(path)
    s.save(b"a")
    s.save(b"b")
    flash.close()
    flip_byte(path, OFFSET, 0x01)
    flip_byte(path, OFFSET + COPY, 0x01)
    flash, s = reopen(path)
    with flash:
        assert s.load() is None


# -- power cuts --------------------------------------------------------------------------


def ops_of_save(path: Path, write_align: int, prior: list[bytes], new: bytes) -> int:
    flash, s = make(path, write_align)
    with flash:
        for p in prior:
            s.save(p)
        flash.reset_counters()
        s.save(new)
        return flash.ops


@pytest.mark.parametrize("write_align", [1, 4, 8, 16])
@pytest.mark.parametrize("n_prior", [0, 1, 2, 3])
@pytest.mark.parametrize("new_len", [0, 40, 300])
def test_power_cut_at_every_op_of_save(
    tmp_path: Path, write_align: int, n_prior: int, new_len: int
) -> None:
    # Old records alternate in size so the target copy holds leftovers of either size.
    prior = [bytes([0x10 + i]) * (300 if i % 2 else 20) for i in range(n_prior)]
    new = bytes((i * 7 + 3) & 0xFF for i in range(new_len))
    old = (n_prior, prior[-1]) if prior else None
    path = tmp_path / "f.bin"
    n_ops = ops_of_save(path, write_align, prior, new)
    assert n_ops >= 2
    for torn in (False, True):
        for k in range(1, n_ops + 2):
            flash, s = make(path, write_align)
            for p in prior:
                s.save(p)
            flash.reset_counters()
            flash.faults = FlashFaults(cut_after=k, torn=torn)
            try:
                s.save(new)
            except PowerCut:
                assert k <= n_ops
            else:
                assert k == n_ops + 1
            flash.close()

            flash, s = reopen(path, write_align)
            with flash:
                got = s.load()
                if k <= n_ops:
                    # The commit write is the last op, so any cut leaves the old record.
                    assert got == old, (torn, k)
                    if (k > 1 or torn) and not (torn and k == n_ops):
                        # Once the erase has begun and until the commit lands, the target
                        # has no magic at all: its rejection never depends on the CRC
                        # happening to mismatch. (A clean cut at op 1 leaves the older
                        # record intact, magic included.)
                        target = s.copy_offset(n_prior % 2)
                        assert flash.read(target, len(MAGIC)) != MAGIC, (torn, k)
                else:
                    assert got == (n_prior + 1, new)
                # The device recovers: the next save works on whatever was left behind.
                after = s.save(b"after")
                assert after == n_prior + (2 if k > n_ops else 1)
                assert s.load() == (after, b"after")


@pytest.mark.parametrize("torn", [False, True])
def test_power_cut_during_recovery_save_still_safe(tmp_path: Path, torn: bool) -> None:
    """Two interrupted saves in a row hit the same copy; the good one must survive both."""
    path = tmp_path / "f.bin"
    flash, s = make(path)
    s.save(b"a")
    s.save(b"b")
    flash.faults = FlashFaults(cut_after=2, torn=torn)
    with pytest.raises(PowerCut):
        s.save(b"c")
    flash.close()
    for k in (1, 2, 3):
        flash, s = reopen(path)
        flash.faults = FlashFaults(cut_after=k, torn=torn)
        with pytest.raises(PowerCut):
            s.save(b"d")
        flash.close()
        flash, s = reopen(path)
        with flash:
            assert s.load() == (2, b"b")


# -- failed and dropped writes -----------------------------------------------------------


def test_dropped_writes_are_caught_by_readback_and_retried(tmp_path: Path) -> None:
    flash, s = make(tmp_path / "f.bin", attempts=30)
    with flash:
        flash.faults = FlashFaults(drop_write_probability=0.3, seed=42)
        for i in range(20):
            payload = f"state {i}".encode()
            assert s.save(payload) == i + 1
            assert s.load() == (i + 1, payload)
        assert flash.dropped_writes > 0


def test_failed_writes_are_retried(tmp_path: Path) -> None:
    flash, s = make(tmp_path / "f.bin", attempts=30)
    with flash:
        flash.faults = FlashFaults(fail_write_probability=0.3, seed=3)
        for i in range(20):
            assert s.save(bytes([i]) * 10) == i + 1
        assert flash.failed_writes > 0
        assert s.load() == (20, bytes([19]) * 10)


@pytest.mark.parametrize(
    "faults",
    [FlashFaults(fail_write_probability=1.0), FlashFaults(drop_write_probability=1.0)],
    ids=["fail", "drop"],
)
def test_persistent_write_failure_keeps_old_record(tmp_path: Path, faults: FlashFaults) -> None:
    flash, s = make(tmp_path / "f.bin")
    with flash:
        s.save(b"good")
        s.save(b"better")
        flash.faults = faults
        with pytest.raises(StateStoreError):
            s.save(b"never")
        assert s.load() == (2, b"better")
        flash.faults = FlashFaults()
        assert s.save(b"finally") == 3


def test_flash_errors_are_not_masked(store: StateStore) -> None:
    store.flash.close()
    with pytest.raises(FlashError):
        store.load()


# -- random sequences ----------------------------------------------------------------------

step = st.tuples(
    st.binary(max_size=320),
    st.one_of(st.none(), st.tuples(st.integers(1, 4), st.booleans())),
)


@settings(max_examples=150, deadline=None)
@given(
    write_align=st.sampled_from([1, 2, 4, 8, 16]),
    steps=st.lists(step, min_size=1, max_size=8),
)
def test_random_saves_and_cuts(
    write_align: int, steps: list[tuple[bytes, tuple[int, bool] | None]]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.bin"
        flash, s = make(path, write_align)
        expected: tuple[int, bytes] | None = None
        try:
            for payload, cut in steps:
                counter = expected[0] + 1 if expected else 1
                flash.reset_counters()
                if cut is not None:
                    flash.faults = FlashFaults(cut_after=cut[0], torn=cut[1])
                try:
                    assert s.save(payload) == counter
                    expected = (counter, payload)
                    flash.faults = FlashFaults()
                except PowerCut:
                    flash.close()
                    flash, s = reopen(path, write_align)
                    got = s.load()
                    assert got in (expected, (counter, payload))
                    expected = got
                assert s.load() == expected
        finally:
            flash.close()
        flash, s = reopen(path, write_align)
        with flash:
            assert s.load() == expected
