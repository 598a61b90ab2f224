"""The windowed transfer's congestion controller as a pure object (otacoap.core.congestion).

No event loop and no clock: every test feeds events (send, answer after RTT, loss,
reset) and reads the window and the timers back. What each test pins, and why:
* slow start doubles per round trip up to max_window, a loss halves the window once per
  congestion event (RFC 5681 §3.1, RFC 6582), a repeated loss or a reset probes with
  one request (the loss window);
* the RTO follows RFC 6298 §2 with CoCoA's blending and stays within its bounds;
* the backoff table (draft-ietf-core-cocoa §4.2);
* invariants over arbitrary event sequences (hypothesis): 1 <= window <= max_window,
  rto within [rto_min, rto_max], ssthresh >= 1, one reduction per event at most.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacoap.core.congestion import CongestionController, backoff_factor


def test_window_grows_on_a_clean_link_and_halves_once_per_loss_event() -> None:
    cc = CongestionController(8, initial_window=2)
    rtt = 0.1
    windows = []
    for _ in range(5):  # one round trip per round: send a window, answer all of it
        for _ in [cc.on_send() for _ in range(cc.window)]:
            cc.on_answer(rtt)
        windows.append(cc.window)
    assert windows[:3] == [4, 8, 8], "slow start doubles per round trip up to max_window"
    assert cc.peak_window == 8 and cc.reductions == 0

    # One congestion event: every request of the same flight times out.
    flight = [cc.on_send() for _ in range(cc.window)]
    assert cc.on_loss(flight[0]) is True
    assert cc.window == 4 and cc.ssthresh == 4
    assert [cc.on_loss(s) for s in flight[1:]] == [False] * 7, "same event: no second halving"
    assert cc.window == 4

    # Congestion avoidance: +1 per window of answers, not per answer.
    for _ in range(4):
        cc.on_answer(rtt)
    assert cc.window == 5
    for _ in range(5):
        cc.on_answer(rtt)
    assert cc.window == 6

    # A loss of a request sent after the reduction is a new event: halve again.
    assert cc.on_loss(cc.on_send()) is True and cc.window == 3
    # A retransmission that is lost again: the link may be gone, probe with one request.
    assert cc.on_loss(cc.on_send(), repeated=True) is True and cc.window == 1
    cc.on_reset()
    assert cc.window == 1


def test_rto_follows_measured_rtt_within_bounds() -> None:
    cc = CongestionController(8, rto_initial=2.0, rto_min=0.2, rto_max=8.0)
    assert cc.rto == 2.0, "RFC 7252 §4.8 ACK_TIMEOUT before any sample"
    cc.on_answer(0.1)
    assert cc.srtt == pytest.approx(0.1) and cc.rttvar == pytest.approx(0.05)
    # CoCoA: halfway between the old RTO and SRTT + 4 RTTVAR.
    assert cc.rto == pytest.approx(0.5 * (0.1 + 4 * 0.05) + 0.5 * 2.0)
    for _ in range(30):
        cc.on_answer(0.1)
    assert cc.rto == pytest.approx(0.2), "a steady 100 ms link converges to rto_min"
    for _ in range(30):
        cc.on_rtt(20.0)
    assert cc.rto == 8.0, "clamped at rto_max"
    # CoCoA variable backoff: fast below 1 s, slow above 3 s.
    assert (backoff_factor(0.2), backoff_factor(2.0), backoff_factor(4.0)) == (3.0, 2.0, 1.5)
    assert [cc.retransmit_after(0.2, n) for n in (1, 2, 3, 4, 5)] == pytest.approx(
        [0.2, 0.6, 1.8, 5.4, 8.0]
    )


@pytest.mark.parametrize(
    ("rto", "factor"),
    [(0.0, 3.0), (0.999, 3.0), (1.0, 2.0), (2.0, 2.0), (3.0, 2.0), (3.001, 1.5), (60.0, 1.5)],
)
def test_backoff_factor_table(rto: float, factor: float) -> None:
    """draft-ietf-core-cocoa §4.2: 3 below 1 s, 2 from 1 s to 3 s, 1.5 above 3 s."""
    assert backoff_factor(rto) == factor


@pytest.mark.parametrize(
    ("events", "window", "ssthresh", "reductions"),
    [
        # (event, argument) rows from a fresh controller of max 8, initial window 2.
        ([], 2, 8.0, 0),
        ([("answer", 0.1)] * 2, 4, 8.0, 0),  # slow start: +1 per answer
        ([("answer", 0.1)] * 20, 8, 8.0, 0),  # capped at max_window
        ([("send", None), ("loss", 1)], 1, 1.0, 1),  # halving 2 -> ssthresh 1
        ([("answer", 0.1)] * 6 + [("send", None), ("loss", 1)], 4, 4.0, 1),
        # The same event twice: the second loss (stamp <= recovery point) is ignored.
        ([("answer", 0.1)] * 6 + [("send", None)] * 2 + [("loss", 1), ("loss", 2)], 4, 4.0, 1),
        # A repeated loss is the loss window whatever the event.
        ([("answer", 0.1)] * 6 + [("send", None), ("repeat", 1)], 1, 4.0, 1),
        ([("answer", 0.1)] * 6 + [("reset", None)], 1, 4.0, 1),
        # An RTT sample alone (a stale answer) earns no window.
        ([("rtt", 0.1)] * 10, 2, 8.0, 0),
    ],
)
def test_event_table(
    events: list[tuple[str, float | None]], window: int, ssthresh: float, reductions: int
) -> None:
    cc = CongestionController(8, initial_window=2)
    for kind, arg in events:
        _apply(cc, kind, arg)
    assert (cc.window, cc.ssthresh, cc.reductions) == (window, ssthresh, reductions)


def test_constructor_refuses_a_window_below_one() -> None:
    with pytest.raises(ValueError):
        CongestionController(0)
    with pytest.raises(ValueError):
        CongestionController(4, initial_window=0)
    assert CongestionController(4, initial_window=9).window == 4, "capped at max_window"


def _apply(cc: CongestionController, kind: str, arg: float | None) -> None:
    if kind == "send":
        cc.on_send()
    elif kind == "answer":
        assert arg is not None
        cc.on_answer(arg)
    elif kind == "rtt":
        assert arg is not None
        cc.on_rtt(arg)
    elif kind == "loss":
        cc.on_loss(int(arg or 0))
    elif kind == "repeat":
        cc.on_loss(int(arg or 0), repeated=True)
    elif kind == "reset":
        cc.on_reset()
    else:  # pragma: no cover - a typo in a table row
        raise AssertionError(kind)


_EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.none()),
        st.tuples(st.just("answer"), st.floats(-1.0, 100.0)),
        st.tuples(st.just("rtt"), st.floats(-1.0, 100.0)),
        st.tuples(st.just("loss"), st.integers(0, 200).map(float)),
        st.tuples(st.just("repeat"), st.integers(0, 200).map(float)),
        st.tuples(st.just("reset"), st.none()),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    max_window=st.integers(1, 64),
    initial=st.integers(1, 70),
    rto_min=st.floats(0.01, 1.0),
    span=st.floats(0.0, 10.0),
    events=_EVENTS,
)
def test_invariants_hold_for_any_event_sequence(
    max_window: int,
    initial: int,
    rto_min: float,
    span: float,
    events: list[tuple[str, float | None]],
) -> None:
    rto_max = rto_min + span
    cc = CongestionController(
        max_window, initial_window=initial, rto_initial=2.0, rto_min=rto_min, rto_max=rto_max
    )
    for kind, arg in events:
        before = cc.reductions
        _apply(cc, kind, arg)
        assert 1 <= cc.window <= max_window
        assert cc.window <= cc.peak_window <= max_window
        assert rto_min <= cc.rto <= rto_max
        assert cc.ssthresh >= 1.0
        assert cc.reductions - before <= 1, "one event reduces the window at most once"
        if cc.srtt is not None:
            assert cc.srtt >= 0.0 and cc.rttvar >= 0.0
        for n in (1, 2, 5):
            assert 0.0 < cc.retransmit_after(cc.rto, n) <= rto_max
