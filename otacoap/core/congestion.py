"""The windowed Block2 transfer's congestion control: an AIMD window and an RTO estimator.

Pure (DESIGN principles 1 and 4): the caller passes every measured round-trip time
and says when a request went out, was answered or timed out; nothing here reads a
clock, sleeps or touches a socket, so the rules are tested as a table of events in,
windows and timers out (tests/test_congestion.py). device_sim.fetcher drives it from
its event loop.

References: RFC 5681 (AIMD, slow start, loss window), RFC 6582 (NewReno: one reduction
per congestion event), RFC 6298 (RTO estimator), RFC 7252 §4.7/§4.8 (NSTART,
ACK_TIMEOUT), draft-ietf-core-cocoa (RTO blending and variable backoff).
"""

from __future__ import annotations


def backoff_factor(rto: float) -> float:
    """CoCoA's variable backoff factor: short RTOs back off faster, long ones slower.

    A fixed factor of 2 (RFC 6298 §5.5) lets a 0.2 s RTO retry five times in 6 s,
    which is a burst on a link that is merely slow; a 3 s RTO doubled is 48 s before
    the fifth retry. CoCoA (draft-ietf-core-cocoa §4.2) uses 3 below 1 s, 1.5 above 3 s.
    """
    if rto < 1.0:
        return 3.0
    if rto > 3.0:
        return 1.5
    return 2.0


class CongestionController:
    """How many Block2 requests may be outstanding, and when one counts as lost.

    Window (AIMD, the TCP rules of RFC 5681 applied to requests instead of bytes):
    * slow start: +1 per answered request while below ssthresh (doubles per round
      trip), then congestion avoidance: +1 per window of answers;
    * never above `max_window` (RFC 7252 §4.7 NSTART, raised under this controller as
      §4.8.1 allows; RFC 9177 §7.2 uses a burst of MAX_PAYLOADS = 10 the same way);
    * a request whose retransmission timer expires halves the window (multiplicative
      decrease), at most once per window of requests: losses of requests sent before
      the last reduction are the same congestion event (RFC 6582 NewReno's rule);
    * a *retransmission* that times out again, or a new DTLS session, drops the window
      to 1 (RFC 5681 §3.1 loss window): the link may be gone, probe it with one request.

    RTO (RFC 6298 §2 with CoCoA's blending): every request is its own exchange with its
    own token, so every answer is an unambiguous RTT sample of the request it answers
    (no Karn ambiguity, RFC 6298 §3: CoCoA's "strong" estimator, K = 4). The RTO moves
    halfway towards SRTT + 4 RTTVAR on each sample (CoCoA's RTO_overall), starts at 2 s
    (RFC 7252 §4.8 ACK_TIMEOUT) and stays within [rto_min, rto_max]. CoCoA's "weak"
    estimator exists for CON retransmissions, whose answer cannot be matched to one
    transmission; here the earlier attempt stays alive after a retransmission, so a
    late answer still yields a strong sample and the RTO follows a slower link.

    Sans-I/O: the caller passes measured RTTs and stamps; nothing here reads a clock.
    """

    ALPHA = 1 / 8  # RFC 6298 §2.3
    BETA = 1 / 4
    K = 4

    def __init__(
        self,
        max_window: int,
        *,
        initial_window: int = 2,
        rto_initial: float = 2.0,
        rto_min: float = 0.2,
        rto_max: float = 8.0,
    ) -> None:
        if max_window < 1 or initial_window < 1:
            raise ValueError("windows must be at least 1")
        self.max_window = max_window
        self.rto_min, self.rto_max = rto_min, rto_max
        self.cwnd = float(min(initial_window, max_window))
        self.ssthresh = float(max_window)
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = self._clamp(rto_initial)
        self._seq = 0  # stamp of the last request sent
        self._recovery = 0  # losses of requests stamped <= this were already answered for
        self._answered = 0  # answers counted towards the next +1 in congestion avoidance
        self.samples = 0
        self.losses = 0
        self.reductions = 0
        self.peak_window = self.window

    def _clamp(self, rto: float) -> float:
        return min(self.rto_max, max(self.rto_min, rto))

    @property
    def window(self) -> int:
        return max(1, min(self.max_window, int(self.cwnd)))

    def on_send(self) -> int:
        """Stamp a request (first transmission or retransmission) as it goes out.

        Stamps order requests so that `on_loss` can tell a loss of the current
        congestion event from a new one (RFC 6582 §3.2 "recover").
        """
        self._seq += 1
        return self._seq

    def on_answer(self, rtt: float) -> None:
        """A valid answer to one request, `rtt` seconds after that request was sent."""
        self.on_rtt(rtt)
        if self.cwnd < self.ssthresh:
            self.cwnd += 1.0  # slow start
        else:
            # Congestion avoidance: +1 once a whole window has been answered (counted,
            # like RFC 3465 byte counting, rather than +1/W per answer, which falls
            # short of +1 per round trip).
            self._answered += 1
            if self._answered >= self.window:
                self._answered = 0
                self.cwnd += 1.0
        self.cwnd = min(self.cwnd, float(self.max_window))
        self.peak_window = max(self.peak_window, self.window)

    def on_rtt(self, rtt: float) -> None:
        """An RTT sample only: an answer that came after another one for the same block
        (the retransmission was spurious) measures the path but earns no window."""
        rtt = max(0.0, rtt)
        if self.srtt is None:  # RFC 6298 §2.2: the first measurement
            self.srtt, self.rttvar = rtt, rtt / 2
        else:  # RFC 6298 §2.3; RTTVAR first, with the old SRTT
            self.rttvar = (1 - self.BETA) * self.rttvar + self.BETA * abs(self.srtt - rtt)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * rtt
        estimate = self.srtt + self.K * self.rttvar
        self.rto = self._clamp(0.5 * estimate + 0.5 * self.rto)  # CoCoA: RTO_overall
        self.samples += 1

    def on_loss(self, stamp: int, *, repeated: bool = False) -> bool:
        """The request stamped `stamp` timed out; True if the window was reduced."""
        self.losses += 1
        if repeated:
            self._reduce(loss_window=True)
            return True
        if stamp <= self._recovery:
            return False  # same congestion event as the last reduction
        self._reduce(loss_window=False)
        return True

    def on_reset(self) -> None:
        """A new DTLS session: nothing is known about the path any more."""
        self._reduce(loss_window=True)

    def _reduce(self, *, loss_window: bool) -> None:
        self.ssthresh = max(1.0, self.cwnd / 2)
        self.cwnd = 1.0 if loss_window else self.ssthresh
        self._answered = 0
        self._recovery = self._seq
        self.reductions += 1

    def retransmit_after(self, base_rto: float, transmissions: int) -> float:
        """Timer for a request's `transmissions`-th transmission (1 = the first one)."""
        return min(self.rto_max, base_rto * backoff_factor(base_rto) ** (transmissions - 1))
