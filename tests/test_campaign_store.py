"""Rollout campaigns in the real SQLite store: membership, admission, outcomes from the
stored reports, halts, supersession, restarts, and every transition in the audit log."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_helpers import CLASS_A, CLASS_B, DeviceSpec, Setup, make_image, make_setup

from otacoap.core import suit
from otacoap.core.campaign import (
    CampaignError,
    CampaignState,
    MemberState,
    Policy,
    Target,
    parse_waves,
)
from otacoap.core.report import Report, State
from otacoap.store import DataDir, Publisher, ReleaseRecord, SQLiteStore

N = 10
ACTOR = "test"


@pytest.fixture
def setup(tmp_path: Path, store_url: str) -> Setup:
    """Both backends: SQLite, and PostgreSQL (conftest.store_url)."""
    devices = [DeviceSpec(f"t{i:02d}") for i in range(N)] + [DeviceSpec("s1", CLASS_B)]
    s = make_setup(tmp_path, devices=devices, store_url=store_url)
    s.publish(s.release(CLASS_A, 10, make_image("v10", 3000)))  # the baseline, rollout all
    return s


def _open(setup: Setup, clock: list[float] | None = None) -> SQLiteStore:
    d = DataDir(setup.data)
    store = d.open_store()
    if clock is not None:
        store._clock = lambda: clock[0]
    return store


def _stage(setup: Setup, store: SQLiteStore, seq: int, name: str) -> ReleaseRecord:
    """`publish --rollout none`: stored, served to nobody until a campaign says so."""
    rel = setup.release(CLASS_A, seq, make_image(name, 3000))
    d = DataDir(setup.data)
    return Publisher(store, d.blobs, d.config().publish).publish_file(
        rel.envelope, rel.image_path, ACTOR, make_current=False
    )


def _report(store: SQLiteStore, device: str, state: State, seq: int, installed: int) -> None:
    dev = store.get_device(device)
    assert dev is not None
    counter = (dev.last_counter or 0) + 1
    report = Report(counter, state, sequence_number=seq, installed_sequence=installed)
    store.record_report(device, report, report.encode())


def _served(store: SQLiteStore, device: str) -> int | None:
    rel = store.release_for_device(device)
    return rel.sequence_number if rel else None


def _audit_actions(store: SQLiteStore) -> list[str]:
    return [e.action for e in store.audit_entries()]


def _admitted(store: SQLiteStore, cid: int) -> list[str]:
    return [m.device_id for m in store.campaign_members(cid) if m.state is MemberState.ADMITTED]


def test_staged_release_reaches_nobody_until_its_campaign_admits_the_canary(setup: Setup) -> None:
    store = _open(setup)
    rel = _stage(setup, store, 11, "v11")
    assert {_served(store, f"t{i:02d}") for i in range(N)} == {10}
    c = store.create_campaign(rel.id, Target(), parse_waves("10%,100%"), Policy(), ACTOR)
    assert c.progress.opened == 1 and c.state == "running"
    assert store.tick_campaigns() == ["campaign.admit"]
    canary = _admitted(store, c.id)
    assert len(canary) == 1
    for i in range(N):
        d = f"t{i:02d}"
        assert _served(store, d) == (11 if d in canary else 10)
    assert _served(store, "s1") is None  # other class untouched
    # Ticking again admits nobody twice.
    assert store.tick_campaigns() == []
    assert _admitted(store, c.id) == canary
    assert "campaign.create" in _audit_actions(store)
    store.close()


def test_bad_release_halts_in_the_canary_and_names_device_and_reason(setup: Setup) -> None:
    store = _open(setup)
    rel = _stage(setup, store, 11, "bad")
    c = store.create_campaign(
        rel.id, Target(), parse_waves("10%,100%"), Policy(failure_threshold=0.5), ACTOR
    )
    store.tick_campaigns()
    (canary,) = _admitted(store, c.id)
    _report(store, canary, State.DOWNLOADING, 11, 10)
    assert store.tick_campaigns() == []
    _report(store, canary, State.REVERTED, 11, 10)
    assert "campaign.halt" in store.tick_campaigns()
    status = store.campaign_status(c.id)
    assert status.campaign.progress.state is CampaignState.HALTED
    assert canary in status.campaign.progress.halt_reason
    assert "reverted" in status.campaign.progress.halt_reason
    assert "failure threshold" in status.campaign.progress.halt_reason
    # Nobody else was admitted, and the canary is no longer served the bad release.
    assert {_served(store, f"t{i:02d}") for i in range(N)} == {10}
    assert all(m.state is MemberState.PENDING for m in status.members if m.device_id != canary)
    halt = [e for e in store.audit_entries() if e.action == "campaign.halt"]
    assert len(halt) == 1 and canary in halt[0].detail
    # Still halted on later ticks; cancel ends it.
    assert store.tick_campaigns() == []
    store.cancel_campaign(c.id, ACTOR)
    assert store.get_campaign(c.id).progress.state is CampaignState.CANCELLED  # type: ignore[union-attr]
    with pytest.raises(CampaignError):
        store.resume_campaign(c.id, ACTOR)
    store.close()


def test_good_release_completes_every_wave_and_becomes_current(setup: Setup) -> None:
    store = _open(setup)
    rel = _stage(setup, store, 11, "good")
    c = store.create_campaign(
        rel.id, Target(), parse_waves("10%,50%,100%"), Policy(success_threshold=1.0), ACTOR
    )
    for _ in range(10):
        store.tick_campaigns()
        for d in _admitted(store, c.id):
            _report(store, d, State.CONFIRMED, 11, 11)
        if store.get_campaign(c.id).progress.state is CampaignState.FINISHED:  # type: ignore[union-attr]
            break
    status = store.campaign_status(c.id)
    assert status.campaign.progress.state is CampaignState.FINISHED
    assert [w.succeeded for w in status.waves] == [1, 4, 5]
    assert store.current_release(rel.class_key).sequence_number == 11  # type: ignore[union-attr]
    actions = _audit_actions(store)
    for action in ("campaign.create", "campaign.wave-open", "campaign.wave-reached",
                   "campaign.finish", "release.current"):  # fmt: skip
        assert action in actions
    assert actions.count("campaign.wave-open") == 2
    store.close()


def test_state_survives_a_restart_and_nobody_is_admitted_twice(setup: Setup) -> None:
    store = _open(setup)
    rel = _stage(setup, store, 11, "good")
    c = store.create_campaign(rel.id, Target(), parse_waves("30%,100%"), Policy(), ACTOR)
    store.tick_campaigns()
    first = _admitted(store, c.id)
    assert len(first) == 3
    _report(store, first[0], State.CONFIRMED, 11, 11)
    store.close()  # the "server" goes away before evaluating that report
    store = _open(setup)
    store.tick_campaigns()
    members = {m.device_id: m for m in store.campaign_members(c.id)}
    assert members[first[0]].state is MemberState.SUCCEEDED
    assert sorted(_admitted(store, c.id)) == sorted(first[1:])
    admits = [e for e in store.audit_entries() if e.action == "campaign.admit"]
    assert len(admits) == 1
    store.close()


def test_max_downloads_admits_one_at_a_time(setup: Setup) -> None:
    store = _open(setup)
    rel = _stage(setup, store, 11, "good")
    c = store.create_campaign(rel.id, Target(), parse_waves("100%"), Policy(max_downloads=2), ACTOR)
    store.tick_campaigns()
    a = _admitted(store, c.id)
    assert len(a) == 2
    _report(store, a[0], State.CONFIRMED, 11, 11)
    store.tick_campaigns()
    b = _admitted(store, c.id)
    assert len(b) == 2 and a[0] not in b and a[1] in b
    store.close()


def test_a_silent_device_times_out_as_a_failure(setup: Setup) -> None:
    clock = [1_000_000.0]
    store = _open(setup, clock)
    rel = _stage(setup, store, 11, "good")
    c = store.create_campaign(
        rel.id,
        Target(),
        parse_waves("10%,100%"),
        Policy(timeout=600, failure_threshold=1.0),
        ACTOR,
    )
    store.tick_campaigns()
    (canary,) = _admitted(store, c.id)
    clock[0] += 599
    assert store.tick_campaigns() == []
    clock[0] += 2
    assert "campaign.halt" in store.tick_campaigns()
    (m,) = [m for m in store.campaign_members(c.id) if m.device_id == canary]
    assert m.state is MemberState.FAILED and "timed out" in m.reason
    store.close()


def test_tag_target_joiners_and_leavers(setup: Setup) -> None:
    store = _open(setup)
    for d in ("t00", "t01", "t02"):
        store.set_device_tags(d, {"ring": "beta"}, ACTOR)
    rel = _stage(setup, store, 11, "good")
    c = store.create_campaign(
        rel.id, Target(tags=(("ring", "beta"),)), parse_waves("1,100%"), Policy(), ACTOR
    )
    members = {m.device_id: m for m in store.campaign_members(c.id)}
    assert set(members) == {"t00", "t01", "t02"}
    assert sorted(m.wave for m in members.values()) == [0, 1, 1]
    # A device that joins the filter during the campaign goes to a later wave.
    store.set_device_tags("t05", {"ring": "beta"}, ACTOR)
    store.add_device(
        "t99", "acme-devices.example", CLASS_A, b"k" * 16, ACTOR, tags={"ring": "beta"}
    )
    store.tick_campaigns()
    members = {m.device_id: m for m in store.campaign_members(c.id)}
    assert members["t05"].wave == 1 and members["t99"].wave == 1
    # A pending member that leaves the filter leaves the campaign.
    pending = "t99"
    assert members[pending].state is MemberState.PENDING
    store.remove_device_tags(pending, ["ring"], ACTOR)
    store.tick_campaigns()
    assert {m.device_id: m for m in store.campaign_members(c.id)}[pending].state is MemberState.LEFT
    assert store.device_tags("t05") == {"ring": "beta"}
    assert {"device.tag", "device.untag"} <= set(_audit_actions(store))
    store.close()


def test_a_newer_campaign_supersedes_the_older_for_its_devices(setup: Setup) -> None:
    store = _open(setup)
    r11 = _stage(setup, store, 11, "v11")
    a = store.create_campaign(r11.id, Target(), parse_waves("10%,100%"), Policy(), ACTOR)
    store.tick_campaigns()
    (canary,) = _admitted(store, a.id)
    r12 = _stage(setup, store, 12, "v12")
    b = store.create_campaign(
        r12.id, Target(device_ids=("t01", "t02", canary)), parse_waves("100%"), Policy(), ACTOR
    )
    old = {m.device_id: m.state for m in store.campaign_members(a.id)}
    for d in ("t01", "t02", canary):
        assert old[d] is MemberState.SUPERSEDED
    assert "campaign.supersede" in _audit_actions(store)
    store.tick_campaigns()
    assert sorted(_admitted(store, b.id)) == sorted({"t01", "t02", canary})
    assert _served(store, canary) == 12
    # The older campaign never takes them back.
    store.tick_campaigns()
    assert {m.device_id: m.state for m in store.campaign_members(a.id)}[canary] is (
        MemberState.SUPERSEDED
    )
    store.close()


def test_approval_pause_resume_and_cancel_are_audited(setup: Setup) -> None:
    store = _open(setup)
    rel = _stage(setup, store, 11, "good")
    c = store.create_campaign(
        rel.id, Target(), parse_waves("10%,100%"), Policy(approve=True), ACTOR
    )
    store.tick_campaigns()
    (canary,) = _admitted(store, c.id)
    _report(store, canary, State.CONFIRMED, 11, 11)
    store.tick_campaigns()
    assert store.get_campaign(c.id).progress.opened == 1  # type: ignore[union-attr]
    store.approve_campaign(c.id, ACTOR)
    store.pause_campaign(c.id, ACTOR)
    store.tick_campaigns()
    assert _admitted(store, c.id) == []
    store.resume_campaign(c.id, ACTOR)
    store.tick_campaigns()
    assert len(_admitted(store, c.id)) == N - 1
    store.cancel_campaign(c.id, ACTOR)
    # Admitted but unfinished devices go back to what they had; the canary keeps 11.
    assert _served(store, canary) == 11
    assert {_served(store, f"t{i:02d}") for i in range(N)} - {11} == {10}
    actions = _audit_actions(store)
    for action in ("campaign.approve", "campaign.pause", "campaign.resume", "campaign.cancel"):
        assert action in actions
    store.verify_audit()
    store.close()


def test_rebuilt_envelope_of_an_old_image_gets_a_new_sequence_number(setup: Setup) -> None:
    from otacoap.core.build import rebuild_envelope

    store = _open(setup)
    r10 = store.current_release(store.get_device("t00").class_key)  # type: ignore[union-attr]
    assert r10 is not None
    data = rebuild_envelope(r10.envelope, 12, setup.key)
    env = suit.decode_envelope(data)
    assert env.manifest.sequence_number == 12
    old = suit.decode_envelope(r10.envelope)
    assert env.manifest.common == old.manifest.common
    store.close()


def test_a_failed_download_keeps_the_release_served_and_a_late_confirm_succeeds(
    setup: Setup,
) -> None:
    store = _open(setup)
    rel = _stage(setup, store, 11, "good")
    c = store.create_campaign(
        rel.id, Target(), parse_waves("20%,100%"), Policy(failure_threshold=1.0), ACTOR
    )
    store.tick_campaigns()
    a, b = _admitted(store, c.id)
    _report(store, a, State.FAILED, 11, 10)  # a link problem mid-download
    _report(store, b, State.REJECTED, 11, 10)  # the device refused the envelope
    store.tick_campaigns()
    states = {m.device_id: m.state for m in store.campaign_members(c.id)}
    assert states[a] is MemberState.FAILED and states[b] is MemberState.FAILED
    assert _served(store, a) == 11, "a failed download may resume"
    assert _served(store, b) == 10, "a rejected release is withdrawn"
    _report(store, a, State.CONFIRMED, 11, 11)
    store.tick_campaigns()
    states = {m.device_id: m.state for m in store.campaign_members(c.id)}
    assert states[a] is MemberState.SUCCEEDED
    store.close()


def test_fleet_operator_role_starts_and_follows_a_campaign(setup: Setup) -> None:
    """The seam the fleet simulator uses (device_sim/fleet/operator_role.py)."""
    from device_sim.fleet.operator_role import campaign_progress, start_campaign, tag_devices

    store = _open(setup)
    _stage(setup, store, 11, "good")
    store.close()
    tag_devices(setup.data, {"t00": {"ring": "a"}})
    cid = start_campaign(
        setup.data,
        "acme-devices.example",
        CLASS_A,
        11,
        waves="10%,100%",
        max_downloads=5,
        timeout=600.0,
    )
    progress = campaign_progress(setup.data, cid)
    assert progress["state"] == "running" and progress["policy"]["max_downloads"] == 5
    assert [w["size"] for w in progress["per_wave"]] == [1, N - 1]
    assert sum(m["state"] == "admitted" for m in progress["members"]) == 1
    tagged = start_campaign(setup.data, "acme-devices.example", CLASS_A, 11, target="ring=a",
                            waves="100%")  # fmt: skip
    assert [m["device"] for m in campaign_progress(setup.data, tagged)["members"]] == ["t00"]


def test_block_rate_campaign_admits_only_on_a_measured_rate_below_budget(setup: Setup) -> None:
    store = _open(setup)
    rel = _stage(setup, store, 11, "good")
    c = store.create_campaign(rel.id, Target(), parse_waves("100%"), Policy(block_rate=50.0), ACTOR)
    store.tick_campaigns()  # the CLI's evaluation measures nothing: admits nobody
    assert _admitted(store, c.id) == []
    store.tick_campaigns(block_rates={rel.image.digest: 80.0})
    assert _admitted(store, c.id) == []
    store.tick_campaigns(block_rates={})  # nothing served: well below the budget
    store.tick_campaigns(block_rates={rel.image.digest: 10.0})
    assert len(_admitted(store, c.id)) == 2
    assert store.get_campaign(c.id).policy.block_rate == 50.0  # type: ignore[union-attr]
    store.close()


def test_a_removed_device_leaves_the_campaign_instead_of_failing_it(setup: Setup) -> None:
    clock = [1_000_000.0]
    store = _open(setup, clock)
    rel = _stage(setup, store, 11, "good")
    c = store.create_campaign(rel.id, Target(), parse_waves("10%,100%"), Policy(timeout=60), ACTOR)
    store.tick_campaigns()
    (canary,) = _admitted(store, c.id)
    store.remove_device(canary, ACTOR)
    clock[0] += 120
    store.tick_campaigns()
    states = {m.device_id: m for m in store.campaign_members(c.id)}
    assert states[canary].state is MemberState.LEFT and states[canary].reason == "device removed"
    assert store.get_campaign(c.id).progress.state is CampaignState.RUNNING  # type: ignore[union-attr]
    store.close()


def test_a_campaign_whose_devices_were_all_taken_over_is_superseded_not_finished(
    setup: Setup,
) -> None:
    store = _open(setup)
    r11 = _stage(setup, store, 11, "v11")
    a = store.create_campaign(r11.id, Target(), parse_waves("10%,100%"), Policy(), ACTOR)
    r12 = _stage(setup, store, 12, "v12")
    store.create_campaign(r12.id, Target(), parse_waves("100%"), Policy(), ACTOR)
    assert "campaign.superseded" in store.tick_campaigns()
    old = store.get_campaign(a.id)
    assert old is not None and old.progress.state is CampaignState.SUPERSEDED
    assert "campaign.finish" not in _audit_actions(store)
    assert store.current_release(r11.class_key).sequence_number == 10  # type: ignore[union-attr]
    store.close()
