"""The report outbox can never brick a device (issue: "a compromised server can brick a
device for good through its report outbox").

The attack, as it was found: a server holding only the device's PSK serves envelopes the
device must refuse, crafted so that each refusal message is long (a COSE `alg` that is a
text string of 180 four-byte characters); it answers every report with 5.03, so the
reports stay queued; then it serves a genuine newer release. The outbox was bounded by
count only and details were cut by characters, so the trial boot's state save no longer
fit, raised an uncaught ValueError, and every later power-on failed before any network
traffic, while `status` still said "bootable".
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest
from aiocoap.numbers.codes import Code
from evil_server import (
    EvilServer,
    Script,
    envelope_bytes,
    make_rig,
    manifest_bytes,
    release,
    run_device,
    stage,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.agent import Outcome
from device_sim.bootloader import Bootloader
from device_sim.device_state import (
    MAX_OUTBOX_BYTES,
    MAX_QUEUED_REPORTS,
    DeviceState,
    StateFile,
    worst_case_record_size,
)
from device_sim.firmware import make_image
from device_sim.flash import SimFlash
from device_sim.layout import MIN_STATE_COPY_SIZE, FlashLayout, open_flash
from device_sim.provision import inspect
from device_sim.record_store import OVERHEAD, RecordTooLarge, StateStore
from otacoap.core import cose, ids, trust
from otacoap.core.boot_status import report_for
from otacoap.core.errors import AlgorithmError, ReportReason
from otacoap.core.report import MAX_DETAIL, State, decode_report
from otacoap.core.update_record import BootStatus, SlotInfo

LONG_ALG = "\U0001d54f" * 180  # 180 four-byte UTF-8 characters: 720 bytes


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 90.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout)

    asyncio.run(bounded())


def long_alg_envelope(seq: int) -> bytes:
    """An envelope whose COSE protected header names an absurd text `alg`."""
    image = make_image(2000, version=seq, seed=seq)
    manifest = manifest_bytes(image=image, seq=seq)
    protected = cbor2.dumps({cose.H_ALG: LONG_ALG})
    block = cbor2.dumps(cbor2.CBORTag(cose.TAG_SIGN1, [protected, {}, None, b"\x00" * 64]))
    return envelope_bytes(manifest, [block])


def state_record_size(path: Path) -> int:
    flash, identity = open_flash(path)
    try:
        loaded = StateFile(flash, identity.layout).store.load()
        assert loaded is not None
        return len(loaded[1])
    finally:
        flash.close()


# -- the reproduction ---------------------------------------------------------------------


@pytest.mark.network
@pytest.mark.timeout(120)
def test_hostile_server_with_the_psk_cannot_brick_the_device_through_its_outbox(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, seq=5)
    script = Script(report_code=Code.SERVICE_UNAVAILABLE)

    async def go() -> None:
        async with EvilServer(script=script) as server:
            for i in range(12):
                script.envelope = long_alg_envelope(10 + i)
                result, _ = await run_device(rig, server.base_uri)
                assert result.outcome == Outcome.REJECTED
                assert LONG_ALG[:4] not in result.detail, "attacker text copied"
            assert server.block_requests == 0
            assert server.reports == [], "every report was answered 5.03"
            queued = rig.info()
            assert queued["queued_reports"] >= 1
            assert state_record_size(rig.path) <= worst_case_record_size()

            # Now a genuine newer release, and still 5.03 for every report.
            image = make_image(9000, version=6, seed=6)
            script.envelope, _ = release(rig.key, image, 6)
            script.images[ids.image_uri(hashlib.sha256(image).digest())] = image
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome == Outcome.UPDATED, result
            assert result.sequence_number == 6

            info = rig.info()
            assert info["bootable"] is True, info["problem"]
            assert rig.boots()[1] == hashlib.sha256(image).digest()
            assert state_record_size(rig.path) <= worst_case_record_size()

            # An honest server at last: the outbox drains, and the device says how
            # many reports it had to drop on the way.
            script.report_code = Code.CHANGED
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome == Outcome.UP_TO_DATE
            assert rig.info()["queued_reports"] == 0
            got = server.reports
            assert got and [r.counter for r in got] == sorted(r.counter for r in got)
            lost = rig.info()["reports_lost"]
            assert got[-1].lost == lost
            # Every report ever made was either delivered or counted as lost.
            assert got[-1].counter == len(got) + lost

    run(go)
    for _ in range(3):  # and it keeps booting, power-on after power-on
        assert rig.boots()[1] == rig.boots()[1]


def test_a_refusal_never_repeats_what_the_attacker_wrote() -> None:
    key = cose.generate_key("es256")
    policy = trust.TrustPolicy(anchors=(key.public,))
    with pytest.raises(AlgorithmError) as caught:
        trust.accept(long_alg_envelope(3), policy)
    message = str(caught.value)
    assert LONG_ALG[:1] not in message
    assert "text string of 180 characters" in message
    assert len(message.encode()) < 120


# -- the record always fits -----------------------------------------------------------------


def test_worst_case_record_fits_the_smallest_state_copy() -> None:
    assert worst_case_record_size() <= MIN_STATE_COPY_SIZE - OVERHEAD


def _base_state() -> DeviceState:
    digest = b"\x11" * 32
    slot = SlotInfo(3000, digest, 5, digest, 400, digest)
    return DeviceState(5, digest, 0, BootStatus.CONFIRMED, (slot, None))


details = st.text(max_size=400) | st.just(LONG_ALG) | st.just("\x00\ud800" * 100)
events = st.lists(
    st.one_of(
        st.tuples(st.just("report"), st.sampled_from(list(State)), details),
        st.tuples(st.just("sent"), st.integers(0, 20), st.just("")),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(events)
def test_any_sequence_of_refusals_and_reports_fits_the_record(
    steps: list[tuple[str, object, str]],
) -> None:
    state = _base_state()
    made = sent = 0
    for kind, arg, detail in steps:
        if kind == "report":
            assert isinstance(arg, State)
            state = state.with_report(
                report_for(state, arg, state.slots[0], ReportReason.UNAUTHORISED, detail)
            )
            made += 1
            body = decode_report(state.reports[-1])
            assert len(body.detail.encode()) <= MAX_DETAIL
            assert body.lost == state.reports_lost
        else:
            assert isinstance(arg, int)
            n = min(arg, len(state.reports))
            state = replace(state, reports=state.reports[n:])
            sent += n
        assert len(state.reports) <= MAX_QUEUED_REPORTS
        assert sum(len(r) for r in state.reports) <= MAX_OUTBOX_BYTES
        assert len(state.encode()) <= worst_case_record_size()
        # Nothing vanishes unaccounted: queued + sent + lost = made.
        assert len(state.reports) + sent + state.reports_lost == made == state.report_counter


def test_save_makes_room_by_dropping_the_oldest_reports(tmp_path: Path) -> None:
    flash = SimFlash.create(tmp_path / "f", 8 * 4096)
    layout = FlashLayout(slot_size=4096)
    file = StateFile(flash, layout)
    # A record that could not come from with_report: 9 KB of queued reports.
    bloated = replace(_base_state(), reports=tuple(bytes([i]) * 1000 for i in range(9)))
    saved = file.save(bloated)
    assert saved.reports == bloated.reports[len(bloated.reports) - len(saved.reports) :]
    assert saved.reports_lost == 9 - len(saved.reports) > 0
    assert file.load() == saved

    tiny = StateStore(flash, 0, 4096)
    with pytest.raises(RecordTooLarge):
        tiny.save(b"\x00" * 5000)


# -- status tells the truth -------------------------------------------------------------------


def test_status_says_not_bootable_when_the_next_boot_would_fail(tmp_path: Path) -> None:
    """The running trial verifies, but the next boot reverts to a slot that does not."""
    rig = make_rig(tmp_path, seq=5)
    stage(rig, make_image(6000, version=6, seed=6), 6)  # asserts the outcome STAGED
    flash, _ = open_flash(rig.path)
    try:
        boot = Bootloader(flash).boot()  # trial boot: TESTING, running the candidate
    finally:
        flash.close()
    assert boot.test_mode
    # Damage the old (active) slot: a restart now reverts onto an image that fails.
    start, _ = rig.area(f"slot{1 - boot.slot}")
    with open(rig.path, "r+b") as f:
        f.seek(start + 100)
        f.write(b"\x00" * 16)
    info = inspect(rig.path)
    assert info["boot_status"] == "testing"
    assert info["bootable"] is False
    assert "does not verify" in info["problem"]
