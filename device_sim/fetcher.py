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
  W chosen by `otacoap.core.congestion.CongestionController` (AIMD window, CoCoA-style
  RTO, pure). See that class and `_windowed` / `_Window` for the rules;
  device_sim/README.md has the design in prose. The envelope (size unknown, capped) is
  always fetched lock-step: a window must never ask for blocks past the end of a
  resource, and only the signed manifest says where the end is.

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
from otacoap.core.congestion import CongestionController
from otacoap.core.errors import LimitExceeded, TransferError

from .transport import Clock, HandshakeTimeout, Response, Transport, TransportError

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


class ResourceNotFound(TransferError):
    """4.04: the server has nothing there for this device."""


class ServerUnreachable(TransferError):
    """No usable answer after every retry."""


class HandshakeFailed(TransferError):
    """A fresh DTLS session could not complete its handshake either: the server does
    not accept this device's identity and key. Retrying until the watchdog fires would
    only hide that (and report "slow retrieval")."""


class SlowRetrieval(TransferError):
    """Throughput stayed below the watchdog's minimum (ATTACKS.md #14)."""


class DeadlineExceeded(TransferError):
    """The whole transfer took longer than its deadline."""


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
        handshakes = 0  # consecutive exchanges lost to a handshake that never completed
        delay = self._cfg.backoff_initial
        while True:
            self._check_time()
            self.requests += 1
            try:
                resp = await self._t.get(
                    self._path, block2=(num, 0, self._szx), timeout=self._timeout()
                )
            except HandshakeTimeout as exc:
                failure = str(exc)
                handshakes += 1
                if handshakes > self._cfg.reset_after_failures:  # a new session failed too
                    raise HandshakeFailed(
                        "DTLS handshake failed: check the device's identity and key "
                        "(the server answers but does not complete the handshake)",
                        detail="dtls handshake failed",
                    ) from exc
            except TransportError as exc:
                failure = str(exc)
                handshakes = 0
            else:
                if resp.successful:
                    return resp
                if resp.code == NOT_FOUND:
                    raise ResourceNotFound(f"{self._path}: 4.04 Not Found")
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

        One round of the loop: hand over what is contiguous, then the timeout step
        (`_Window.expire`), the send step (`_Window.send`), a wait, and the receive
        step (`_Window.receive`).
        """
        assert self._total is not None
        if start >= self._total:
            return
        w = _Window(self, start)
        self.controller = w.cc
        try:
            while True:
                self._check_time()
                while (ready := w.take_head()) is not None:
                    payload, more = ready
                    n = len(payload)
                    self.bytes += n
                    self._window_bytes += n
                    handed = w.loop.time()
                    yield w.head, payload
                    w.paused += w.loop.time() - handed
                    w.head += n
                    if not more:
                        return
                    self._check_time()
                await w.expire()
                w.send()
                await w.wait(self._time_to_check())
                w.receive()
        finally:
            await w.cancel_all()


# -- the windowed transfer's state and steps ------------------------------------------------


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
    due: float = math.inf  # network time of the next (re)transmission; inf = parked
    armed: bool = False  # `due` is a retransmission timer of a sent request
    stamp: int = 0  # CongestionController stamp of the latest request
    live: list[_Attempt] = field(default_factory=list)
    payload: bytes | None = None
    more: bool = True
    failure: str = "no response"


class _Window:
    """The state of one windowed transfer and its three steps: send, receive, timeout.

    `BlockFetcher._windowed` owns the loop and the hand-over to the consumer; this class
    owns the table of blocks asked for and the requests alive, and it counts into the
    fetcher's statistics. The congestion rules themselves are the pure
    `otacoap.core.congestion.CongestionController`: this class only tells it what
    happened (a request sent, answered, timed out, a session reset) and asks it how
    many requests may be out and when one counts as lost.

    Memory is bounded by the window, never by the image: at most `max_window` blocks
    in `table` (each with at most `attempts` live requests), and no per-iteration
    allocation that outlives the iteration. In particular the wait reuses one loop
    timer instead of scheduling and cancelling one per iteration: asyncio keeps a
    cancelled TimerHandle in its heap until about a hundred have piled up (its
    cleanup threshold), which made the measured peak swing by ~18 KB with the timing.
    """

    def __init__(self, fetcher: BlockFetcher, start: int) -> None:
        cfg = fetcher._cfg
        assert fetcher._total is not None
        self.f = fetcher
        self.cfg = cfg
        self.total = fetcher._total
        self.loop = asyncio.get_running_loop()
        self.request = fetcher._sender()
        self.cc = CongestionController(
            cfg.max_window,
            initial_window=cfg.window,
            rto_initial=cfg.rto_initial,
            rto_min=cfg.rto_min,
            rto_max=cfg.rto_max,
        )
        self.silence_limit = cfg.reset_after_failures * cfg.request_timeout
        self.head = start  # the next offset the writer needs
        self.nxt = start  # the next offset never asked for yet
        self.table: dict[int, _Block] = {}  # asked and not yet handed over, by offset
        self.tasks: dict[asyncio.Task[tuple[Response, float]], _Attempt] = {}
        # Finished requests in completion order, and the future the loop sleeps on:
        # one done-callback per request instead of asyncio.wait, which re-registers
        # callbacks on every pending request and allocates fresh sets on every call
        # (about 1 KiB per window slot, measured with tracemalloc).
        self.completed: deque[asyncio.Task[tuple[Response, float]]] = deque()
        self.waker: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.probing = True  # only the head block may be asked (see the first rule)
        # Network time: the loop's clock minus the time the consumer held the stream
        # (between a yield and the next request for a block). The device writing and
        # hashing a block is not the network being slow: answers that arrived
        # meanwhile wait in the socket until the loop runs again, so counting that
        # time would fire retransmission timers for answers already received and
        # halve the window for nothing. RTT samples leave it out for the same reason.
        self.paused = 0.0
        self.last_heard = self.clock()

    def clock(self) -> float:
        return self.loop.time() - self.paused

    def unanswered(self) -> int:
        return sum(1 for b in self.table.values() if b.payload is None)

    def take_head(self) -> tuple[bytes, bool] | None:
        """The next block for the writer, (payload, more), if it has arrived."""
        ready = self.table.get(self.head)
        if ready is None or ready.payload is None:
            return None
        del self.table[self.head]
        return ready.payload, ready.more

    def unreachable(self, block: _Block) -> ServerUnreachable:
        return ServerUnreachable(
            f"block {block.num} of {self.f._path}: no answer after {block.tries} attempts "
            f"({block.failure})",
            detail=block.failure,
        )

    # -- send ------------------------------------------------------------------------------

    async def _attempt(self, num: int, szx: int) -> tuple[Response, float]:
        sent = self.clock()
        resp = await self.request(self.f._path, block2=(num, 0, szx), timeout=self.f._timeout())
        return resp, self.clock() - sent

    def _on_done(self, task: asyncio.Task[tuple[Response, float]]) -> None:
        self.completed.append(task)
        if self.waker is not None:
            _wake(self.waker)

    def launch(self, block: _Block, now: float) -> None:
        """Send one request for `block` and arm its retransmission timer."""
        f, cc = self.f, self.cc
        block.tries += 1
        f.requests += 1
        if block.tries > 1:
            f.retries += 1
        else:
            block.base_rto = cc.rto
        block.stamp = cc.on_send()
        task = self.loop.create_task(self._attempt(block.num, block.szx))
        task.add_done_callback(self._on_done)
        att = _Attempt(block, task)
        block.live.append(att)
        self.tasks[task] = att
        block.due = now + cc.retransmit_after(block.base_rto, block.tries)
        block.armed = True

    def send(self) -> None:
        """Open the window: new blocks, in order, inside the buffer bound."""
        now = self.clock()
        size = blockwise.size_of(self.f._szx)
        while (
            self.nxt < self.total
            and self.nxt < self.head + self.cfg.max_window * size
            and (self.nxt == self.head if self.probing else self.unanswered() < self.cc.window)
        ):
            block = _Block(self.nxt, self.nxt // size, self.f._szx)
            self.table[self.nxt] = block
            self.launch(block, now)
            self.nxt += size
        self.f.peak_in_flight = max(self.f.peak_in_flight, self.unanswered())

    # -- timeout ---------------------------------------------------------------------------

    async def expire(self) -> None:
        """Retransmission timers (a timeout is a loss, then ask again) and the silence
        after which the DTLS session is presumed dead."""
        cc, now = self.cc, self.clock()
        for b in sorted(self.table.values(), key=lambda b: b.offset):
            if b.payload is not None or b.due > now:
                continue
            if b.armed:
                b.armed = False
                b.timeouts += 1
                cc.on_loss(b.stamp, repeated=b.timeouts > 1)
            if b.tries >= self.cfg.attempts:
                if not b.live:
                    raise self.unreachable(b)
                b.due = math.inf  # the live requests' end decides
            elif self.probing and b.offset != self.head:
                b.due = math.inf  # parked until the window opens again
            else:
                self.launch(b, now)
        # A long silence: the DTLS session is probably dead (server restart, NAT
        # rebinding); start a new one, probing with the head block alone.
        if self.unanswered() and now - self.last_heard >= self.silence_limit:
            await self.cancel_all()
            await self.f._t.reset()
            self.f.resets += 1
            cc.on_reset()
            self.probing = True
            now = self.last_heard = self.clock()
            for b in self.table.values():
                if b.payload is None:
                    b.armed = False
                    b.due = now if b.offset == self.head else math.inf

    # -- wait ------------------------------------------------------------------------------

    def _on_timer(self) -> None:
        self.timer = None
        if self.waker is not None:
            _wake(self.waker)

    async def wait(self, time_to_check: float) -> None:
        """Sleep until an answer, the next retransmission timer, the silence limit or
        the next deadline/watchdog check (`time_to_check`, on the injected clock).

        The loop timer is kept when it fires no later than needed (an early wake-up
        only costs one more round) and replaced only when something is due sooner.
        """
        if self.completed:
            return
        now = self.clock()
        wake = min([b.due for b in self.table.values() if b.payload is None] + [math.inf])
        if self.unanswered():
            wake = min(wake, self.last_heard + self.silence_limit)
        at = self.loop.time() + min(max(0.0, wake - now), time_to_check + 0.001)
        if self.timer is None or self.timer.when() > at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(at, self._on_timer)
        self.waker = self.loop.create_future()
        try:
            await self.waker
        finally:
            self.waker = None

    # -- receive ---------------------------------------------------------------------------

    def receive(self) -> None:
        """Answers, in the order they completed."""
        while self.completed:
            task = self.completed.popleft()
            att = self.tasks.pop(task, None)
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
                self._failed(b, str(exc))
                continue
            resp, rtt = task.result()
            self.last_heard = self.clock()
            self._answered(b, resp, rtt)

    def _failed(self, b: _Block, failure: str) -> None:
        b.failure = failure
        if b.payload is None and b.tries >= self.cfg.attempts and not b.live:
            raise self.unreachable(b)

    def _answered(self, b: _Block, resp: Response, rtt: float) -> None:
        f, cc = self.f, self.cc
        if not resp.successful:
            if resp.code == NOT_FOUND:
                raise ResourceNotFound(f"{f._path}: 4.04 Not Found")
            if code_class(resp.code) == 4:
                raise TransferError(f"{f._path}: server refused with {code_str(resp.code)}")
            self._failed(b, f"server error {code_str(resp.code)}")
            return
        # ATTACKS.md #22/#24/#25: checked against the request it answers, stale or
        # not; any violation ends the transfer.
        more, szx = f._check(resp, b.offset, b.szx)
        if self.table.get(b.offset) is not b or b.payload is not None:
            f.stale += 1  # a duplicate or late answer: already have it
            cc.on_rtt(rtt)
            return
        cc.on_answer(rtt)
        for alive in b.live:
            alive.task.cancel()
        if self.probing:
            self.probing = False
            for parked in self.table.values():
                if parked.payload is None and not parked.live:
                    parked.due = min(parked.due, self.last_heard)
        if szx < f._szx:
            # RFC 7959 §2.3: the server lowered the block size. Rare, so the simple
            # way: keep this block if it is the next one the writer needs, drop
            # everything else and go on at the new size.
            f._szx = szx
            for block in self.table.values():
                for a in block.live:
                    a.task.cancel()
            self.table.clear()
            if b.offset == self.head:
                b.payload, b.more = resp.payload, more
                self.table[self.head] = b
                self.nxt = self.head + len(resp.payload)
            else:
                self.nxt = self.head
            return
        b.payload, b.more = resp.payload, more
        buffered = sum(1 for o, x in self.table.items() if x.payload is not None and o != self.head)
        f.peak_buffered = max(f.peak_buffered, buffered)

    async def cancel_all(self) -> None:
        """End every request still alive (a reset, the end, or a consumer that stopped)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending = list(self.tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self.tasks.clear()
        self.completed.clear()
        for b in self.table.values():
            b.live.clear()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
