"""Explicit Block2 transfers (RFC 7959 §2), one block in flight, every response checked.

Kept apart from the agent on purpose: a later issue adds a windowed variant (W Block2
requests outstanding); it can replace this class behind the same `blocks()` iterator
without touching the writer or the agent.

What it enforces:
* the device asks for each block by NUM and checks the answer with
  core.blockwise.check_response against the size the *signed manifest* states, never
  Size2: NUM other than asked, SZX 7, a larger block than asked, bytes past the image
  size, a short non-final block, M=1 past the end (ATTACKS.md #11, #12, #24, #25);
* the server may lower the block size (RFC 7959 §2.3); later requests then use it;
* the ETag must not change mid-transfer (RFC 7252 §5.10.6): a changed resource is a
  different image;
* per-block retries with exponential backoff, an overall deadline, and a minimum-
  throughput watchdog (ATTACKS.md #14, Uptane §5.4 "monitor the download speed"), all
  on the injected clock; after a few consecutive failures the transport is reset so a
  dead DTLS session is replaced.

It yields (offset, payload) strictly in order and holds one block at a time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from otacoap.core import blockwise
from otacoap.core.errors import LimitExceeded, TransferError

from .transport import NOT_FOUND, Clock, Response, Transport, TransportError, code_class, code_str


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

    def __post_init__(self) -> None:
        blockwise.size_of(self.szx)
        if self.attempts < 1 or self.request_timeout <= 0 or self.deadline <= 0:
            raise ValueError("attempts, request_timeout and deadline must be positive")
        if self.watchdog_window <= 0 or self.min_throughput < 0:
            raise ValueError("watchdog window must be positive, throughput non-negative")


class NotFound(TransferError):
    """4.04: the server has nothing there for this device."""


class ServerUnreachable(TransferError):
    """No usable answer after every retry."""


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
        self._start = clock.now()
        self._window_start = self._start
        self._window_bytes = 0

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

    # -- one block -----------------------------------------------------------------------

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

    def _check(self, resp: Response, offset: int) -> tuple[bool, int]:
        """Validate one response for the block starting at `offset`; return (more, szx)."""
        if resp.block2 is None:
            # No Block2 option: the whole body in one response. Only acceptable for
            # the first block (RFC 7959 §2.2: the server may answer without blocks).
            if offset != 0:
                raise blockwise.BlockError("response without Block2 in the middle of a transfer")
            num, more, szx = 0, False, self._szx
        else:
            num, more, szx = resp.block2
        asked_num = offset // blockwise.size_of(self._szx)
        n = len(resp.payload)
        if self._total is not None:
            blockwise.check_response(
                asked_num=asked_num,
                asked_szx=self._szx,
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
                if szx > self._szx:
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

    async def blocks(self, start: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (offset, payload) from `start` (a multiple of the block size) to the end."""
        if start % blockwise.size_of(self._szx):
            raise ValueError("resume offset must be a multiple of the block size")
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
