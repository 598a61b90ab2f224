"""Properties of campaigns in the real SQLite store under random histories.

Whatever the reports (confirmed, reverted, failed, silence), joiners, operator actions
and the passing of time: no device is admitted twice, a member's wave never changes,
no device of a wave that is not open is admitted, --max-downloads is never exceeded,
a halted or paused campaign admits nobody, and the store reopened at any point (a
restart) carries on from the same state.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacoap.core import ids
from otacoap.core.campaign import (
    CampaignError,
    CampaignState,
    MemberState,
    Policy,
    Target,
    parse_waves,
)
from otacoap.core.report import Report, State
from otacoap.store import DataDir, ImageRecord, ReleaseCandidate, SQLiteStore

VENDOR, CLASS = "acme.example", "sensor"
ACTOR = "prop"

_op = st.one_of(
    st.tuples(st.just("report"), st.integers(0, 30), st.sampled_from(["confirmed", "reverted",
                                                                      "failed", "downloading"])),
    st.tuples(st.just("time"), st.integers(1, 400)),
    st.tuples(st.just("join"), st.integers(0, 1000)),
    st.tuples(st.just("pause")),
    st.tuples(st.just("resume")),
    st.tuples(st.just("approve")),
    st.tuples(st.just("restart")),
)  # fmt: skip


def _release(store: SQLiteStore, seq: int) -> int:
    key = ids.class_key_of(VENDOR, CLASS)
    image = hashlib.sha256(f"img{seq}".encode()).digest()
    latest = store.latest_release(key)
    rel = store.commit_release(
        ReleaseCandidate(
            key[0], key[1], f"{VENDOR}/{CLASS}", seq, hashlib.sha256(b"m%d" % seq).digest(),
            b"envelope%d" % seq, ImageRecord(image, 100), "k", latest.id if latest else None,
        ),
        ACTOR,
        make_current=seq == 1,
    )  # fmt: skip
    return rel.id


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    n=st.integers(1, 12),
    waves=st.sampled_from(["10%,50%,100%", "1,100%", "2,5", "100%"]),
    max_downloads=st.sampled_from([None, 1, 3]),
    approve=st.booleans(),
    ops=st.lists(_op, max_size=40),
)
def test_random_histories_keep_the_campaign_invariants(
    n: int,
    waves: str,
    max_downloads: int | None,
    approve: bool,
    ops: list[tuple],  # type: ignore[type-arg]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = DataDir(Path(tmp) / "d")
        data.init()
        clock = [1_000_000.0]

        def open_store() -> SQLiteStore:
            s = data.open_store()
            s._clock = lambda: clock[0]
            return s

        store = open_store()
        devices = [f"p{i:03d}" for i in range(n)]
        for d in devices:
            store.add_device(d, VENDOR, CLASS, b"k" * 16, ACTOR)
        _release(store, 1)
        rid = _release(store, 2)
        policy = Policy(success_threshold=0.5, failure_threshold=0.5, timeout=300,
                        max_downloads=max_downloads, approve=approve)  # fmt: skip
        cid = store.create_campaign(rid, Target(), parse_waves(waves), policy, ACTOR).id
        first_wave: dict[str, int] = {}
        admitted_ever: set[str] = set()
        counters: dict[str, int] = {}
        try:
            for op in [("tick",), *ops, ("tick",)]:
                kind = op[0]
                if kind == "report":
                    members = store.campaign_members(cid)
                    active = [m for m in members if m.state is MemberState.ADMITTED]
                    if active:
                        m = active[op[1] % len(active)]
                        counters[m.device_id] = counters.get(m.device_id, 0) + 1
                        installed = 2 if op[2] == "confirmed" else 1
                        r = Report(counters[m.device_id], State(op[2]), sequence_number=2,
                                   installed_sequence=installed)  # fmt: skip
                        store.record_report(m.device_id, r, r.encode())
                elif kind == "time":
                    clock[0] += op[1]
                elif kind == "join":
                    d = f"j{op[1]:04d}"
                    if store.get_device(d) is None:
                        store.add_device(d, VENDOR, CLASS, b"k" * 16, ACTOR)
                elif kind == "restart":
                    store.close()
                    store = open_store()
                elif kind in ("pause", "resume", "approve"):
                    with contextlib.suppress(CampaignError):
                        getattr(store, f"{kind}_campaign")(cid, ACTOR)
                before = store.get_campaign(cid)
                assert before is not None
                store.tick_campaigns()
                after = store.get_campaign(cid)
                assert after is not None
                members = store.campaign_members(cid)
                admitted_now = {m.device_id for m in members if m.state is MemberState.ADMITTED}
                newly = {
                    m.device_id
                    for m in members
                    if m.admitted_at is not None and m.device_id not in admitted_ever
                }
                if before.progress.state is not CampaignState.RUNNING:
                    assert not newly, "a halted, paused or ended campaign admitted a device"
                admitted_ever |= newly
                for m in members:
                    assert first_wave.setdefault(m.device_id, m.wave) == m.wave
                    if m.admitted_at is not None:
                        assert m.wave < after.progress.opened
                if max_downloads is not None:
                    assert len(admitted_now) <= max_downloads
                assert after.progress.opened <= after.progress.wave_count
            # No device admitted twice: one admission entry names it at most once.
            names: list[str] = []
            for e in store.audit_entries():
                if e.action == "campaign.admit":
                    names += e.detail.split(": ", 1)[1].split()
            assert len(names) == len(set(names))
            assert set(names) == admitted_ever
            store.verify_audit()
        finally:
            store.close()
