"""The campaign rules of otacoap/core/campaign.py, without a store: parsing, waves,
and the progression of a campaign as a pure function of counts and time."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacoap.core.campaign import (
    CampaignError,
    CampaignState,
    Policy,
    Progress,
    WaveCounts,
    WaveSize,
    approved,
    assign_waves,
    cancelled,
    cumulative_counts,
    evaluate,
    joiner_wave,
    parse_duration,
    parse_share,
    parse_target,
    parse_waves,
    parse_window,
    paused,
    resumed,
)

# --------------------------------------------------------------------------- parsing


def test_waves_parse_percentages_and_counts_and_end_with_everyone() -> None:
    assert parse_waves("1%,10%,50%,100%") == (
        WaveSize(1, True),
        WaveSize(10, True),
        WaveSize(50, True),
        WaveSize(100, True),
    )
    assert parse_waves("2,20") == (WaveSize(2, False), WaveSize(20, False), WaveSize(100, True))


@pytest.mark.parametrize("bad", ["", "0%", "101%", "-1", "x", "10%,5%", "1,,2", "nan%"])
def test_bad_waves_are_refused_with_one_message(bad: str) -> None:
    with pytest.raises(CampaignError):
        parse_waves(bad)


def test_durations_shares_and_windows() -> None:
    assert parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200
    assert parse_duration("1d") == 86400
    assert parse_duration("45") == 45
    assert parse_share("90%") == pytest.approx(0.9)
    assert parse_share("0.25") == 0.25
    w = parse_window("22:00-04:00")
    assert w.contains(23 * 3600) and w.contains(86400 + 3 * 3600)
    assert not w.contains(12 * 3600)
    day = parse_window("09:30-17:00")
    assert day.contains(10 * 3600) and not day.contains(17 * 3600) and not day.contains(9 * 3600)
    for bad in ("1x", "-3m"):
        with pytest.raises(CampaignError):
            parse_duration(bad)
    for bad in ("0%", "1.5", "x"):
        with pytest.raises(CampaignError):
            parse_share(bad)
    for bad in ("25:00-01:00", "10:00-10:00", "10-12"):
        with pytest.raises(CampaignError):
            parse_window(bad)


def test_target_terms_are_tags_and_device_ids() -> None:
    assert parse_target("all").whole_class
    t = parse_target("site=berlin,ring=canary,dev-2,dev-1")
    assert t.tags == (("ring", "canary"), ("site", "berlin"))
    assert t.device_ids == ("dev-1", "dev-2")
    assert t.matches("dev-1", {"site": "berlin", "ring": "canary", "x": "y"})
    assert not t.matches("dev-1", {"site": "berlin"})
    assert not t.matches("dev-3", {"site": "berlin", "ring": "canary"})
    with pytest.raises(CampaignError):
        parse_target("bad key=1")


# --------------------------------------------------------------------------- waves


def test_canary_percentage_of_a_small_fleet_is_one_device() -> None:
    assert cumulative_counts(parse_waves("1%,10%,50%,100%"), 10) == [1, 1, 5, 10]
    assert cumulative_counts(parse_waves("2,100%"), 1) == [1, 1]


@settings(max_examples=60, deadline=None)
@given(
    campaign=st.integers(1, 10_000),
    devices=st.sets(st.text("abcdefgh0123456789-", min_size=1, max_size=8), max_size=60),
    waves=st.lists(st.integers(1, 100), min_size=1, max_size=5).map(sorted),
)
def test_wave_membership_is_deterministic_stable_and_sized(
    campaign: int, devices: set[str], waves: list[int]
) -> None:
    sizes = parse_waves(",".join(f"{w}%" for w in waves))
    first = assign_waves(campaign, devices, sizes)
    assert first == assign_waves(campaign, sorted(devices, reverse=True), sizes)
    assert set(first) == devices
    counts = cumulative_counts(sizes, len(devices))
    for i, c in enumerate(counts):
        assert sum(1 for w in first.values() if w <= i) == c
    # Adding a device never moves another one to an earlier wave... and a device's wave
    # is recorded once by the store, so it never moves at all; joiners go to a later wave.
    assert joiner_wave(1, len(sizes)) == min(1, len(sizes) - 1)


# --------------------------------------------------------------------------- progress


def _progress(**kw: object) -> Progress:
    base = Progress(state=CampaignState.RUNNING, opened=1, wave_count=3)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_first_wave_admits_only_its_pending_members_within_max_downloads() -> None:
    waves = [WaveCounts(pending=2), WaveCounts(pending=5), WaveCounts(pending=10)]
    d = evaluate(Policy(), _progress(), waves, 0.0)
    assert d.admit == 2 and d.progress.opened == 1
    d = evaluate(Policy(max_downloads=1), _progress(), waves, 0.0)
    assert d.admit == 1
    busy = [WaveCounts(pending=1, admitted=1), *waves[1:]]
    assert evaluate(Policy(max_downloads=1), _progress(), busy, 0.0).admit == 0


def test_a_failure_in_the_canary_halts_and_says_why() -> None:
    waves = [WaveCounts(succeeded=0, failed=1), WaveCounts(pending=5), WaveCounts(pending=10)]
    d = evaluate(Policy(failure_threshold=0.5), _progress(), waves, 0.0)
    assert d.progress.state is CampaignState.HALTED
    assert d.admit == 0
    assert "wave 1 has 1 of 1 devices failed" in d.progress.halt_reason
    assert d.events[0][0] == "campaign.halt"
    # halted: nothing more happens until resume, which acknowledges the failure
    assert evaluate(Policy(), d.progress, waves, 1.0).admit == 0
    again = resumed(d.progress, waves)
    assert again.state is CampaignState.RUNNING
    nxt = evaluate(Policy(failure_threshold=0.5, success_threshold=0.5), again, waves, 2.0)
    assert nxt.progress.state is CampaignState.RUNNING


def test_success_threshold_soak_then_next_wave_then_finish() -> None:
    policy = Policy(success_threshold=1.0, soak=60.0)
    waves = [WaveCounts(succeeded=2), WaveCounts(pending=3), WaveCounts()]
    d = evaluate(policy, _progress(), waves, 100.0)
    assert d.progress.reached_at == 100.0 and d.progress.opened == 1
    assert [e for e, _ in d.events] == ["campaign.wave-reached"]
    d2 = evaluate(policy, d.progress, waves, 159.0)
    assert d2.progress.opened == 1 and d2.admit == 0
    d3 = evaluate(policy, d.progress, waves, 160.0)
    assert d3.progress.opened == 2 and d3.admit == 3
    done = [WaveCounts(succeeded=2), WaveCounts(succeeded=3), WaveCounts()]
    d4 = evaluate(policy, d3.progress, done, 170.0)
    d5 = evaluate(policy, d4.progress, done, 231.0)
    # the empty third wave needs no soak; the campaign finishes
    assert d5.progress.state is CampaignState.FINISHED


def test_urgent_ignores_soak_and_window_but_still_halts() -> None:
    night = parse_window("02:00-03:00")
    waves = [WaveCounts(succeeded=1), WaveCounts(pending=3), WaveCounts()]
    normal = evaluate(Policy(soak=3600, window=night), _progress(), waves, 12 * 3600.0)
    assert normal.progress.opened == 1 and normal.admit == 0
    urgent = evaluate(Policy(soak=3600, window=night, urgent=True), _progress(), waves, 43200.0)
    assert urgent.progress.opened == 2 and urgent.admit == 3
    bad = [WaveCounts(failed=1), WaveCounts(pending=3), WaveCounts()]
    halted = evaluate(Policy(urgent=True), _progress(), bad, 0.0)
    assert halted.progress.state is CampaignState.HALTED


def test_window_closes_admission_only() -> None:
    window = parse_window("02:00-03:00")
    waves = [WaveCounts(pending=3), WaveCounts(), WaveCounts()]
    assert evaluate(Policy(window=window), _progress(), waves, 2.5 * 3600).admit == 3
    assert evaluate(Policy(window=window), _progress(), waves, 4 * 3600).admit == 0


def test_approval_gates_each_next_wave() -> None:
    policy = Policy(approve=True)
    waves = [WaveCounts(succeeded=1), WaveCounts(pending=2), WaveCounts(pending=2)]
    d = evaluate(policy, _progress(), waves, 0.0)
    assert d.progress.opened == 1
    ok = approved(d.progress)
    d2 = evaluate(policy, ok, waves, 1.0)
    assert d2.progress.opened == 2 and d2.admit == 4 - 2  # wave 2's pending


def test_operator_transitions_refuse_what_cannot_be() -> None:
    p = _progress()
    assert paused(p).state is CampaignState.PAUSED
    assert evaluate(Policy(), paused(p), [WaveCounts(pending=1)] * 3, 0.0).admit == 0
    assert resumed(paused(p), [WaveCounts()] * 3).state is CampaignState.RUNNING
    assert cancelled(p).state is CampaignState.CANCELLED
    with pytest.raises(CampaignError):
        resumed(p, [])
    with pytest.raises(CampaignError):
        paused(cancelled(p))
    with pytest.raises(CampaignError):
        approved(_progress(opened=3))


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    outcomes=st.lists(st.sampled_from("sfpa"), max_size=40),
    failure=st.sampled_from([0.1, 0.5, 1.0]),
)
def test_no_wave_opens_before_its_predecessor_reaches_and_halts_are_final_until_resume(
    sizes: list[int], outcomes: list[str], failure: float
) -> None:
    """Whatever the reports, the campaign never opens a wave early, never admits when
    not running, and never admits more than pending members of open waves."""
    policy = Policy(success_threshold=1.0, failure_threshold=failure)
    p = Progress(CampaignState.RUNNING, 1, len(sizes))
    members = [[s, 0, 0, 0] for s in sizes]  # pending, admitted, succeeded, failed
    now = 0.0
    for o in outcomes:
        waves = [WaveCounts(*m) for m in members]
        d = evaluate(policy, p, waves, now)
        if d.progress.opened > p.opened:
            prev = waves[p.opened - 1]
            assert prev.succeeded >= prev.size
        if d.progress.state is not CampaignState.RUNNING:
            assert d.admit == 0
        assert d.admit <= sum(w.pending for w in waves[: d.progress.opened])
        p = d.progress
        # apply one admission and one outcome in the open waves
        for m in members[: p.opened]:
            if d.admit and m[0]:
                m[0] -= 1
                m[1] += 1
                break
        for m in members[: p.opened]:
            if m[1] and o in "sf":
                m[1] -= 1
                m[2 if o == "s" else 3] += 1
                break
        now += 1.0


def test_block_rate_budget_admits_one_at_a_time_and_only_when_measured_below() -> None:
    waves = [WaveCounts(pending=5), WaveCounts(), WaveCounts()]
    policy = Policy(block_rate=100.0)
    assert evaluate(policy, _progress(), waves, 0.0, None).admit == 0  # not measured
    assert evaluate(policy, _progress(), waves, 0.0, 150.0).admit == 0  # over budget
    assert evaluate(policy, _progress(), waves, 0.0, 20.0).admit == 1
    assert evaluate(Policy(), _progress(), waves, 0.0, 1e9).admit == 5  # no budget
    with pytest.raises(CampaignError):
        Policy(block_rate=0.0)
