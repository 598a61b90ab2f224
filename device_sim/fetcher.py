"""Explicit Block2 transfers (RFC 7959 §2), lock-step or windowed, every response checked.

Kept apart from the agent on purpose: the agent consumes `blocks()`, an iterator of
(offset, payload) strictly in order, and does not care how many requests are in flight.

What it enforces, in both modes:
* the device asks for each block by NUM and checks the answer with
  core.blockwise.check_response against the size the *signed manifest* states, never
  Size2: NUM other than asked, SZX 7, a larger block than asked, bytes past the image
  size, a short non-final block, M=1 past the end (ATTACKS.md #11, #12, #24, #25);
* the server may lower the block size (RFC 7959 §2.3); later requests then use it;
* the ETag must not change mid-transfer (RFC 7252 §5.10.6): a changed resource is a
  different image;
* per-block retries with backoff, an overall deadline, and a minimum-throughput
  watchdog (ATTACKS.md #14, Uptane §5.4 "monitor the download speed"), the last two
  on the injected clock; a dead DTLS session is replaced by resetting the transport.

Two modes, chosen by `FetchConfig.max_window`:

* `max_window == 1` (the default): RFC 7959 lock-step, one confirmable request at a
  time; CoAP retransmits a CON itself (RFC 7252 §4.2), the fetcher retries a failed
  exchange after a backoff on the injected clock. This is exactly the code path of
  before the window existed, so it stays the baseline.
* `max_window > 1` and a known size (the image): up to W Block2 requests outstanding,
  W chosen by `CongestionController` (AIMD window, CoCoA-style RTO). See that class
  and `_windowed` for the rules; device_sim/README.md has the design in prose. The
  envelope (size unknown, capped) is always fetched lock-step: a window must never ask
  for blocks past the end of a resource, and only the signed manifest says where the
  end is.

Memory: lock-step holds one block; windowed holds at most `max_window` blocks (the
requests never reach further than `max_window` blocks past the next block the writer
needs, so out-of-order arrivals wait in a buffer of at most `max_window - 1` blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from otacoap.core import blockwise
from otacoap.core.coap_numbers import NOT_FOUND, code_class, code_str
from otacoap.core.errors import LimitExceeded, TransferError

from .transport import Clock, Response, Transport, TransportError

# A window this wide already hides a 1 s round trip at 16 KiB/s with 1 KiB blocks; more
# would only buy memory (the buffer is up to max_window blocks) and server load.
MAX_WINDOW = 64
# What `device_sim run` (one device, one process) uses by default. FetchConfig itself
# stays at 1, RFC 7959 lock-step, the baseline the attack tests pin request by request;
# so does the fleet simulator (many devices share one process's CPU). Measured at 100 ms
# RTT for 1 MiB (bench/RESULTS.md): 7.6x faster than lock-step at 0 % loss, 10x at 2 %;
# the peak over DTLS grows from ~40 KB to ~104 KB (8 blocks plus 8 requests' state).
DEFAULT_MAX_WINDOW = 8


@dataclass(frozen=True)
class FetchConfig:
    """Transfer limits; safe defaults, passed in explicitly (DESIGN principle 8)."""

    szx: int = 6  # 1024-byte blocks (RFC 7959 §2.2)
    request_timeout: float = 5.0  # wall-clock seconds per exchange
    attempts: int = 6  # per block, before giving up
    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    deadline: float = 900.0  # whole transfer
    min_throughput: float = 256.0  # bytes/s, averaged over watchdog_window
    watchdog_window: float = 30.0
    reset_after_failures: int = 2  # consecutive failed exchanges -> new DTLS session
    # Windowed transfer. max_window 1 is RFC 7959 lock-step (CON, one block in flight);
    # > 1 keeps up to that many NON Block2 requests outstanding under the congestion
    # controller. Default 1: see device_sim/README.md "Windowed block transfer".
    max_window: int = 1
    window: int = 2  # initial window once the first block is in (capped at max_window)
    # RTO estimator (RFC 6298 §2, CoCoA). The initial value is RFC 7252 §4.8 ACK_TIMEOUT.
    rto_initial: float = 2.0
    rto_min: float = 0.2
    rto_max: float = 8.0

    def __post_init__(self) -> None:
        blockwise.size_of(self.szx)
        if self.attempts < 1 or self.request_timeout <= 0 or self.deadline <= 0:
            raise ValueError("attempts, request_timeout and deadline must be positive")
        if self.watchdog_window <= 0 or self.min_throughput < 0:
            raise ValueError("watchdog window must be positive, throughput non-negative")
        if not 1 <= self.max_window <= MAX_WINDOW or self.window < 1:
            raise ValueError(f"max_window must be 1..{MAX_WINDOW} and window at least 1")
        if not 0 < self.rto_min <= self.rto_max or self.rto_initial <= 0:
            raise ValueError("need 0 < rto_min <= rto_max and a positive rto_initial")


class NotFound(TransferError):
    """4.04: the server has nothing there for this device."""


class ServerUnreachable(TransferError):
    """No usable answer after every retry."""


class SlowRetrieval(TransferError):
    """Throughput stayed below the watchdog's minimum (ATTACKS.md #14)."""


class DeadlineExceeded(TransferError):
    """The whole transfer took longer than its deadline."""


# -- the congestion controller (sans-I/O) ------------------------------------------------


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

    Sans-I/O: the caller passes measured RTTs; nothing here reads a clock, so the
    unit tests drive it with a FakeClock.
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
        """Stamp a request (first transmission or retransmission) as it goes out."""
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


# -- one block in a windowed transfer --------------------------------------------------


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(eq=False)
class _Attempt:
    """One request for a block (a block may have several alive: see `_windowed`)."""

    block: _Block
    task: asyncio.Task[tuple[Response, float]]


@dataclass(eq=False)
class _Block:
    offset: int
    num: int
    szx: int
    tries: int = 0  # requests sent for this block
    timeouts: int = 0
    base_rto: float = 0.0  # the RTO when it was first sent (CoCoA backs off from it)
    due: float = math.inf  # loop time of the next (re)transmission; inf = parked
    armed: bool = False  # `due` is a retransmission timer of a sent request
    stamp: int = 0  # CongestionController stamp of the latest request
    live: list[_Attempt] = field(default_factory=list)
    payload: bytes | None = None
    more: bool = True
    failure: str = "no response"


class BlockFetcher:
    """Fetch one resource block by block: the image (known size) or the envelope (capped)."""

    def __init__(
        self,
        transport: Transport,
        path: str,
        *,
        clock: Clock,
        config: FetchConfig,
        total: int | None = None,
        cap: int | None = None,
    ) -> None:
        if (total is None) == (cap is None):
            raise ValueError("give either the exact total (image) or a cap (envelope)")
        self._t = transport
        self._path = path
        self._clock = clock
        self._cfg = config
        self._total = total
        self._cap = cap
        self._szx = config.szx
        self._etag: bytes | None = None
        self.requests = 0
        self.retries = 0
        self.bytes = 0
        # Windowed mode only (stay 0 / None in lock-step):
        self.controller: CongestionController | None = None
        self.stale = 0  # answers for a block already received (duplicates, late ones)
        self.resets = 0
        self.peak_buffered = 0  # blocks received out of order and waiting for the writer
        self.peak_in_flight = 0  # blocks requested and not yet answered
        self._start = clock.now()
        self._window_start = self._start
        self._window_bytes = 0

    @property
    def windowed(self) -> bool:
        """Whether `blocks()` keeps several requests outstanding (see the module doc)."""
        return self._cfg.max_window > 1 and self._total is not None

    # -- timing --------------------------------------------------------------------------

    def _check_time(self) -> None:
        now = self._clock.now()
        if now - self._start > self._cfg.deadline:
            raise DeadlineExceeded(
                f"transfer deadline of {self._cfg.deadline:.0f} s exceeded", detail="deadline"
            )
        elapsed = now - self._window_start
        if elapsed >= self._cfg.watchdog_window:
            rate = self._window_bytes / elapsed
            if rate < self._cfg.min_throughput:
                raise SlowRetrieval(
                    f"slow retrieval: {rate:.0f} B/s, below {self._cfg.min_throughput:.0f} B/s",
                    detail="slow retrieval",
                )
            self._window_start, self._window_bytes = now, 0

    def _timeout(self) -> float:
        left = self._cfg.deadline - (self._clock.now() - self._start)
        return max(0.05, min(self._cfg.request_timeout, left))

    def _time_to_check(self) -> float:
        """Seconds (on the injected clock) until the deadline or watchdog must be looked at."""
        now = self._clock.now()
        deadline = self._cfg.deadline - (now - self._start)
        watchdog = self._cfg.watchdog_window - (now - self._window_start)
        return max(0.0, min(deadline, watchdog))

    # -- one block, lock-step --------------------------------------------------------------

    async def _request(self, offset: int) -> Response:
        size = blockwise.size_of(self._szx)
        num = offset // size
        attempt = 0
        consecutive = 0
        delay = self._cfg.backoff_initial
        while True:
            self._check_time()
            self.requests += 1
            try:
                resp = await self._t.get(
                    self._path, block2=(num, 0, self._szx), timeout=self._timeout()
                )
            except TransportError as exc:
                failure = str(exc)
            else:
                if resp.successful:
                    return resp
                if resp.code == NOT_FOUND:
                    raise NotFound(f"{self._path}: 4.04 Not Found")
                if code_class(resp.code) == 4:
                    raise TransferError(f"{self._path}: server refused with {code_str(resp.code)}")
                failure = f"server error {code_str(resp.code)}"
            attempt += 1
            consecutive += 1
            self.retries += 1
            if attempt >= self._cfg.attempts:
                raise ServerUnreachable(
                    f"block {num} of {self._path}: no answer after {attempt} attempts ({failure})",
                    detail=failure,
                )
            if consecutive >= self._cfg.reset_after_failures:
                await self._t.reset()
                consecutive = 0
            await self._clock.sleep(delay)
            delay = min(delay * 2, self._cfg.backoff_max)

    def _check(self, resp: Response, offset: int, asked_szx: int | None = None) -> tuple[bool, int]:
        """Validate one response for the block starting at `offset`; return (more, szx).

        `asked_szx` is the SZX of the request this response answers (default: the
        current one); a windowed transfer passes the one its request carried.
        """
        asked = self._szx if asked_szx is None else asked_szx
        if resp.block2 is None:
            # No Block2 option: the whole body in one response. Only acceptable for
            # the first block (RFC 7959 §2.2: the server may answer without blocks).
            if offset != 0:
                raise blockwise.BlockError("response without Block2 in the middle of a transfer")
            num, more, szx = 0, False, asked
        else:
            num, more, szx = resp.block2
        asked_num = offset // blockwise.size_of(asked)
        n = len(resp.payload)
        if self._total is not None:
            blockwise.check_response(
                asked_num=asked_num,
                asked_szx=asked,
                num=num,
                szx=szx,
                more=more,
                payload_len=n,
                offset=offset,
                total=self._total,
            )
        else:
            size = blockwise.size_of(szx)  # RFC 7959 §2.2: SZX 7 is reserved
            if resp.block2 is not None:
                if szx > asked:
                    raise blockwise.BlockError("server raised the block size")
                if num * size != offset:
                    raise blockwise.BlockError(f"response is block {num}, not the one asked for")
                if n > size or (more and n != size):
                    raise blockwise.BlockError("block payload does not match its size")
            assert self._cap is not None
            if offset + n > self._cap:
                raise LimitExceeded(f"{self._path} is larger than the {self._cap}-byte cap")
        if resp.etag is not None:
            if self._etag is None:
                self._etag = resp.etag
            elif resp.etag != self._etag:
                raise TransferError(f"{self._path} changed during the transfer (ETag)")
        return more, szx

    # -- the stream ----------------------------------------------------------------------

    @property
    def etag(self) -> bytes | None:
        """The ETag the resource was served with (None before the first block)."""
        return self._etag

    def blocks(self, start: int = 0) -> AsyncGenerator[tuple[int, bytes], None]:
        """Yield (offset, payload) from `start` (a multiple of the block size) to the end.

        Use it under `contextlib.aclosing` so a consumer that stops early (a flash
        error, a power cut) also ends the requests still in flight at once.
        """
        if start % blockwise.size_of(self._szx):
            raise ValueError("resume offset must be a multiple of the block size")
        if self.windowed:
            return self._windowed(start)
        return self._lockstep(start)

    async def _lockstep(self, start: int) -> AsyncGenerator[tuple[int, bytes], None]:
        """RFC 7959 lock-step: ask for block N, check it, hand it over, ask for N+1."""
        offset = start
        if self._total is not None and offset >= self._total:
            return
        while True:
            resp = await self._request(offset)
            more, szx = self._check(resp, offset)
            n = len(resp.payload)
            self.bytes += n
            self._window_bytes += n
            # RFC 7959 §2.3: a smaller block size from the server applies from now on.
            self._szx = min(self._szx, szx)
            yield offset, resp.payload
            offset += n
            if not more:
                return
            if n == 0:
                raise blockwise.BlockError("empty block with M=1")

    # -- the stream, windowed ----------------------------------------------------------------

    def _sender(self) -> Callable[..., Awaitable[Response]]:
        """NON requests where the transport offers them (see Transport.get_nonconfirmable).

        aiocoap keeps at most one CON outstanding per peer (NSTART = 1: further CONs
        wait in its message layer's backlog) and retransmits each CON itself; a window
        of CONs would be serialised and retransmitted by two layers at once. As NON
        requests, each block request is sent at once and retransmitted only by this
        fetcher, on its own RTO. A transport without that method has no CoAP message
        layer (in-process, test fakes), so its plain `get` is the same thing.
        """
        non = getattr(self._t, "get_nonconfirmable", None)
        return non if callable(non) else self._t.get

    async def _windowed(self, start: int) -> AsyncGenerator[tuple[int, bytes], None]:
        """Up to W requests outstanding; blocks handed over strictly in order.

        Rules, each for a reason:
        * the first block (and the first after a new DTLS session) is asked alone:
          its answer fixes the block size (RFC 7959 §2.3) and the ETag, and after a
          reset it carries the handshake; only then does the window open;
        * a new block is requested while fewer than W blocks are unanswered and it
          lies less than `max_window` blocks past the next block the writer needs,
          which bounds the out-of-order buffer to `max_window - 1` blocks;
        * each request is its own exchange (new token); when its retransmission
          timer (RTO, backed off per block) fires, the block is asked again and the
          older request stays alive until its own `request_timeout`: whichever
          answer comes first is used, later ones are checked and dropped as stale;
        * every answer is checked by `_check` for the NUM and SZX of the request it
          answers (ATTACKS.md #24/#25/#22): a violation aborts the whole transfer;
        * after `reset_after_failures * request_timeout` seconds without any answer
          (as long as that many failed lock-step exchanges), the transport is reset;
        * the RTO timers run on the event loop's clock (like the transport's own
          timeouts: a network does not run on fake time), paused while the consumer
          holds a block; the deadline and the watchdog stay on the injected clock.
        """
        assert self._total is not None
        total = self._total
        cfg = self._cfg
        if start >= total:
            return
        loop = asyncio.get_running_loop()
        send = self._sender()
        cc = self.controller = CongestionController(
            cfg.max_window,
            initial_window=cfg.window,
            rto_initial=cfg.rto_initial,
            rto_min=cfg.rto_min,
            rto_max=cfg.rto_max,
        )
        silence_limit = cfg.reset_after_failures * cfg.request_timeout
        head = start  # the next offset the writer needs
        nxt = start  # the next offset never asked for yet
        table: dict[int, _Block] = {}  # asked and not yet handed over, by offset
        tasks: dict[asyncio.Task[tuple[Response, float]], _Attempt] = {}
        # Finished requests in completion order, and the future the loop sleeps on:
        # one done-callback per request instead of asyncio.wait, which re-registers
        # callbacks on every pending request and allocates fresh sets on every call
        # (about 1 KiB per window slot, measured with tracemalloc).
        completed: deque[asyncio.Task[tuple[Response, float]]] = deque()
        waker: list[asyncio.Future[None]] = []

        def on_done(task: asyncio.Task[tuple[Response, float]]) -> None:
            completed.append(task)
            if waker:
                _wake(waker[0])

        probing = True  # only the head block may be asked (see the first rule)
        # Network time: the loop's clock minus the time the consumer held the stream
        # (between a yield and the next request for a block). The device writing and
        # hashing a block is not the network being slow: answers that arrived
        # meanwhile wait in the socket until the loop runs again, so counting that
        # time would fire retransmission timers for answers already received and
        # halve the window for nothing. RTT samples leave it out for the same reason.
        paused = 0.0

        def clock() -> float:
            return loop.time() - paused

        last_heard = clock()

        async def attempt(num: int, szx: int) -> tuple[Response, float]:
            sent = clock()
            resp = await send(self._path, block2=(num, 0, szx), timeout=self._timeout())
            return resp, clock() - sent

        def launch(block: _Block, now: float) -> None:
            block.tries += 1
            self.requests += 1
            if block.tries > 1:
                self.retries += 1
            else:
                block.base_rto = cc.rto
            block.stamp = cc.on_send()
            task = loop.create_task(attempt(block.num, block.szx))
            task.add_done_callback(on_done)
            att = _Attempt(block, task)
            block.live.append(att)
            tasks[task] = att
            block.due = now + cc.retransmit_after(block.base_rto, block.tries)
            block.armed = True

        def unreachable(block: _Block) -> ServerUnreachable:
            return ServerUnreachable(
                f"block {block.num} of {self._path}: no answer after {block.tries} attempts "
                f"({block.failure})",
                detail=block.failure,
            )

        def unanswered() -> int:
            return sum(1 for b in table.values() if b.payload is None)

        async def cancel_all() -> None:
            pending = list(tasks)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            tasks.clear()
            completed.clear()
            for b in table.values():
                b.live.clear()

        try:
            while True:
                self._check_time()
                # 1. Hand over what is contiguous (the hash and the writer see bytes in
                #    order only).
                while (ready := table.get(head)) is not None and ready.payload is not None:
                    del table[head]
                    payload, more = ready.payload, ready.more
                    n = len(payload)
                    self.bytes += n
                    self._window_bytes += n
                    handed = loop.time()
                    yield head, payload
                    paused += loop.time() - handed
                    head += n
                    if not more:
                        return
                    self._check_time()
                now = clock()

                # 2. Retransmission timers: a timeout is a loss (window), then ask again.
                for b in sorted(table.values(), key=lambda b: b.offset):
                    if b.payload is not None or b.due > now:
                        continue
                    if b.armed:
                        b.armed = False
                        b.timeouts += 1
                        cc.on_loss(b.stamp, repeated=b.timeouts > 1)
                    if b.tries >= cfg.attempts:
                        if not b.live:
                            raise unreachable(b)
                        b.due = math.inf  # the live requests' end decides
                    elif probing and b.offset != head:
                        b.due = math.inf  # parked until the window opens again
                    else:
                        launch(b, now)

                # 3. A long silence: the DTLS session is probably dead (server restart,
                #    NAT rebinding); start a new one, probing with the head block alone.
                if unanswered() and now - last_heard >= silence_limit:
                    await cancel_all()
                    await self._t.reset()
                    self.resets += 1
                    cc.on_reset()
                    probing = True
                    now = last_heard = clock()
                    for b in table.values():
                        if b.payload is None:
                            b.armed = False
                            b.due = now if b.offset == head else math.inf

                # 4. Open the window: new blocks, in order, inside the buffer bound.
                size = blockwise.size_of(self._szx)
                while (
                    nxt < total
                    and nxt < head + cfg.max_window * size
                    and (nxt == head if probing else unanswered() < cc.window)
                ):
                    block = _Block(nxt, nxt // size, self._szx)
                    table[nxt] = block
                    launch(block, now)
                    nxt += size
                self.peak_in_flight = max(self.peak_in_flight, unanswered())

                # 5. Wait for an answer, the next timer, or the next deadline/watchdog check.
                wake = min([b.due for b in table.values() if b.payload is None] + [math.inf])
                if unanswered():
                    wake = min(wake, last_heard + silence_limit)
                timeout = min(max(0.0, wake - now), self._time_to_check() + 0.001)
                if not completed:
                    wake_up = loop.create_future()
                    waker.append(wake_up)
                    timer = loop.call_later(timeout, _wake, wake_up)
                    try:
                        await wake_up
                    finally:
                        timer.cancel()
                        waker.clear()

                # 6. Answers, in the order they completed.
                while completed:
                    task = completed.popleft()
                    att = tasks.pop(task, None)
                    if att is None:
                        continue  # ended by cancel_all
                    b = att.block
                    with contextlib.suppress(ValueError):
                        b.live.remove(att)
                    if task.cancelled():
                        continue
                    exc = task.exception()
                    if exc is not None:
                        if not isinstance(exc, TransportError):
                            raise exc
                        b.failure = str(exc)
                        if b.payload is None and b.tries >= cfg.attempts and not b.live:
                            raise unreachable(b)
                        continue
                    resp, rtt = task.result()
                    last_heard = clock()
                    if not resp.successful:
                        if resp.code == NOT_FOUND:
                            raise NotFound(f"{self._path}: 4.04 Not Found")
                        if code_class(resp.code) == 4:
                            raise TransferError(
                                f"{self._path}: server refused with {code_str(resp.code)}"
                            )
                        b.failure = f"server error {code_str(resp.code)}"
                        if b.payload is None and b.tries >= cfg.attempts and not b.live:
                            raise unreachable(b)
                        continue
                    # ATTACKS.md #22/#24/#25: checked against the request it answers,
                    # stale or not; any violation ends the transfer.
                    more, szx = self._check(resp, b.offset, b.szx)
                    if table.get(b.offset) is not b or b.payload is not None:
                        self.stale += 1  # a duplicate or late answer: already have it
                        cc.on_rtt(rtt)
                        continue
                    cc.on_answer(rtt)
                    for other in b.live:
                        other.task.cancel()
                    if probing:
                        probing = False
                        for parked in table.values():
                            if parked.payload is None and not parked.live:
                                parked.due = min(parked.due, last_heard)
                    if szx < self._szx:
                        # RFC 7959 §2.3: the server lowered the block size. Rare, so the
                        # simple way: keep this block if it is the next one the writer
                        # needs, drop everything else and go on at the new size.
                        self._szx = szx
                        for other in table.values():
                            for a in other.live:
                                a.task.cancel()
                        table.clear()
                        if b.offset == head:
                            b.payload, b.more = resp.payload, more
                            table[head] = b
                            nxt = head + len(resp.payload)
                        else:
                            nxt = head
                        continue
                    b.payload, b.more = resp.payload, more
                    buffered = sum(
                        1 for o, x in table.items() if x.payload is not None and o != head
                    )
                    self.peak_buffered = max(self.peak_buffered, buffered)
        finally:
            await cancel_all()
