"""A state record whose CRC is valid but whose CBOR is wrong is refused, never crashed on.

The record store's CRC only says the bytes are the ones a save wrote; buggy firmware or a
deliberate flash write can still store a record that lacks a field or has a field of the
wrong type (issue 10 §4). The bootloader is the last line: such a record must raise the
typed `StateError`, and when it is the newest copy the older valid copy is used, exactly
as for a copy with a bad CRC (ATTACKS.md #45: never guess, never factory defaults).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from evil_server import make_rig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_sim.bootloader import Bootloader
from device_sim.device_state import DeviceState, StateError, StateFile
from device_sim.flash import FlashFaults, PowerCut, SimFlash
from device_sim.layout import Identity, open_flash
from device_sim.record_store import encode_record
from otacoap.core import cbor
from otacoap.core.update_record import BootStatus, Download, SlotInfo, Trial

# -- a record that passes the CRC but not the decoder ----------------------------------------


def _valid_state() -> DeviceState:
    d = b"\x11" * 32
    return DeviceState(
        sequence=7,
        sequence_digest=d,
        active=0,
        boot=BootStatus.PENDING,
        slots=(SlotInfo(100, d, 7, d, 50, d), SlotInfo(200, d, 8, d, 60, d)),
        download=Download(d, 1, 10, 200, 60, d),
        trial=Trial(d, 1),
        report_counter=3,
        reports=(b"r1", b"r2"),
        reports_lost=1,
    )


def _record_map() -> dict[str, Any]:
    v = cbor.loads(_valid_state().encode())
    assert isinstance(v, dict)
    return v


def _without(key: str) -> bytes:
    v = _record_map()
    del v[key]
    return cbor.dumps(v)


def _with(key: str, value: Any) -> bytes:
    v = _record_map()
    v[key] = value
    return cbor.dumps(v)


BAD_RECORDS = {
    "missing slots": _without("slots"),
    "missing seq": _without("seq"),
    "missing boot": _without("boot"),
    "missing queue": _without("q"),
    "missing rc": _without("rc"),
    "missing dl": _without("dl"),
    "missing trial": _without("trial"),
    "missing active": _without("active"),
    "missing seqd": _without("seqd"),
    "boot is a list": _with("boot", [1]),
    "boot is a map": _with("boot", {1: 2}),
    "seq is text": _with("seq", "7"),
    "seq is negative": _with("seq", -1),
    "seq is a bool": _with("seq", True),
    "active is 2": _with("active", 2),
    "slot entry is text": _with("slots", ["x", None]),
    "slot has a text size": _with("slots", [["a", b"", 1, None, 1, b""], None]),
    "download too short": _with("dl", [b"", 0]),
    "trial is a map": _with("trial", {0: 1}),
    "queue holds text": _with("q", ["report"]),
    "rl is text": _with("rl", "lost"),
    "record is a list": cbor.dumps([1, 2, 3]),
    "record is an int": cbor.dumps(1),
    "format 2": _with("v", 2),
    "not cbor": b"\xff\x00",
    "empty": b"",
}


def test_the_valid_record_round_trips() -> None:
    state = _valid_state()
    assert DeviceState.decode(state.encode()) == state


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_a_record_that_decodes_badly_raises_the_typed_state_error(name: str) -> None:
    with pytest.raises(StateError):
        DeviceState.decode(BAD_RECORDS[name])


# -- in flash: the newest copy decodes badly ------------------------------------------------


def _plant_newest(flash: SimFlash, identity: Identity, payload: bytes) -> int:
    """Write `payload` with a valid CRC as the newest copy; returns the copy it went to."""
    sf = StateFile(flash, identity.layout)
    counters = sf.store.copy_counters()
    valid = [(c, i) for i, c in enumerate(counters) if c is not None]
    counter, newest = max(valid)
    target = 1 - newest
    base = sf.store.copy_offset(target)
    flash.erase(base, identity.layout.state_copy_size)
    flash.write(base, encode_record(counter + 1, payload, flash.write_align))
    assert sf.store.copy_counters()[target] == counter + 1, "the CRC is valid"
    return target


@pytest.mark.parametrize("name", ["missing slots", "boot is a list", "seq is text"])
def test_a_newest_copy_that_decodes_badly_falls_back_to_the_older_valid_copy(
    tmp_path: Path, name: str
) -> None:
    rig = make_rig(tmp_path, seq=9)
    flash, identity = open_flash(rig.path)
    with flash:
        good = StateFile(flash, identity.layout).load()
        _plant_newest(flash, identity, BAD_RECORDS[name])
        loaded = StateFile(flash, identity.layout).load()
        assert loaded == good, "the older valid copy is used"
        assert loaded.sequence == 9
        result = Bootloader(flash).boot()
        assert result.slot == good.active


def test_the_next_save_overwrites_the_bad_copy_and_keeps_the_good_one(tmp_path: Path) -> None:
    """After falling back, a save must not erase the only decodable copy.

    The store's rule "overwrite the copy that is not the newest" would pick the good,
    older copy here; a power cut in that save would leave no decodable record at all.
    """
    rig = make_rig(tmp_path, seq=9)
    flash, identity = open_flash(rig.path)
    with flash:
        sf = StateFile(flash, identity.layout)
        good = sf.load()
        bad = _plant_newest(flash, identity, BAD_RECORDS["missing slots"])
        size = identity.layout.state_copy_size
        good_bytes = flash.read(sf.store.copy_offset(1 - bad), size)
        before = sf.store.copy_counters()
        sf.save(sf.load())
        after = sf.store.copy_counters()
        assert flash.read(sf.store.copy_offset(1 - bad), size) == good_bytes, (
            "the only decodable copy was not touched"
        )
        assert after[bad] is not None and after[bad] > (before[bad] or 0)
        assert sf.load() == good
        # The new record went where the bad one was: alone, it loads the same state.
        flash.erase(sf.store.copy_offset(1 - bad), size)
        assert sf.load() == good


def test_a_power_cut_anywhere_in_that_save_leaves_a_decodable_record(tmp_path: Path) -> None:
    """Cut power at every flash op of the save that follows a fallback (clean and torn)."""
    rig = make_rig(tmp_path, seq=9)
    flash, identity = open_flash(rig.path)
    with flash:
        good = StateFile(flash, identity.layout).load()
        _plant_newest(flash, identity, BAD_RECORDS["seq is text"])
    image = rig.path.read_bytes()
    newer = replace(good, report_counter=good.report_counter + 1)
    for torn in (False, True):
        k = 0
        while True:
            k += 1
            rig.path.write_bytes(image)
            flash, identity = open_flash(rig.path)
            with flash:
                sf = StateFile(flash, identity.layout)
                state = sf.load()
                flash.reset_counters()
                flash.faults = FlashFaults(cut_after=k, torn=torn)
                try:
                    sf.save(newer)
                    done = True
                except PowerCut:
                    done = False
            flash, identity = open_flash(rig.path)  # power back: reboot
            with flash:
                after = StateFile(flash, identity.layout).load()
                assert after in (state, newer), f"cut at op {k} (torn={torn})"
            if done:
                assert k > 2, "the save took several flash ops"
                break


def test_both_copies_decode_badly_fails_closed(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=9)
    flash, identity = open_flash(rig.path)
    with flash:
        sf = StateFile(flash, identity.layout)
        sf.save(sf.load())  # two valid copies
        _plant_newest(flash, identity, BAD_RECORDS["missing seq"])
        _plant_newest(flash, identity, BAD_RECORDS["boot is a map"])
        with pytest.raises(StateError, match="no valid state"):
            sf.load()
        with pytest.raises(StateError):
            Bootloader(flash).boot()  # never "factory defaults, seq 0"


# -- the decoder over any input --------------------------------------------------------------

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
    | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=7)
        | st.dictionaries(st.text(max_size=6) | st.integers(-2, 30), children, max_size=6)
    ),
    max_leaves=20,
)
KEYS = sorted(_record_map())


@st.composite
def mutated_records(draw: st.DrawFn) -> bytes:
    """A valid record with some keys dropped and some values replaced by any CBOR value."""
    v = _record_map()
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        del v[key]
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        v[key] = draw(cbor_values)
    return cbor.dumps(v)


def _decode_or_typed_error(data: bytes) -> None:
    try:
        state = DeviceState.decode(data)
    except StateError:
        return
    # Whatever decodes is a state that encodes again (no half-typed fields slip through).
    assert isinstance(state, DeviceState)
    assert DeviceState.decode(state.encode()) == state


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_records())
def test_decoder_on_mutated_records_returns_a_state_or_the_typed_error(data: bytes) -> None:
    _decode_or_typed_error(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_on_any_bytes_returns_a_state_or_the_typed_error(data: bytes) -> None:
    _decode_or_typed_error(data)


@settings(max_examples=300, deadline=None)
@given(cbor_values)
def test_decoder_on_any_cbor_value_returns_a_state_or_the_typed_error(value: Any) -> None:
    _decode_or_typed_error(cbor.dumps(value))
