"""What the agent needs from the network and from time, as small interfaces.

The agent talks to a `Transport` (one request, one response; no block-wise assembly,
no caching) and reads time from a `Clock`. The CoAP/DTLS transport (device_sim.coap)
and the in-process one (device_sim.inprocess) implement the same interface, so the
power-cut and memory harnesses can run thousands of updates without sockets, while the
end-to-end tests run the very same agent over real DTLS.

Time is injected (DESIGN principle 4, ATTACKS.md H4): deadlines, the slow-retrieval
watchdog and retry backoff use `Clock`. Per-request timeouts are wall-clock timeouts
of the transport itself (a network does not run on fake time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from otacoap.core.coap_numbers import code_class


class TransportError(Exception):
    """No usable response: timeout, DTLS failure, unreachable. The caller may retry."""


class HandshakeTimeout(TransportError):
    """No response, and the DTLS handshake of the session never completed: the server
    answers but does not accept this identity and key (or the handshake was lost)."""


@dataclass(frozen=True)
class Response:
    """One CoAP response, reduced to what the device looks at."""

    code: int
    payload: bytes = b""
    block2: tuple[int, bool, int] | None = None  # (NUM, M, SZX) exactly as received
    size2: int | None = None
    etag: bytes | None = None

    @property
    def successful(self) -> bool:
        return code_class(self.code) == 2


class Transport(Protocol):
    """One device's channel to its server (the base URI is the envelope's origin)."""

    @property
    def base_uri(self) -> str: ...

    async def get(
        self, path: str, *, block2: tuple[int, int, int] | None, timeout: float
    ) -> Response: ...

    async def post(
        self, path: str, payload: bytes, *, content_format: int, timeout: float
    ) -> Response: ...

    # Optional, looked up with getattr by the windowed fetcher (so wrappers and fakes
    # written before it keep working):
    #
    #   async def get_nonconfirmable(self, path, *, block2, timeout) -> Response
    #
    # the same GET as a NON request, which a CoAP message layer neither queues behind
    # other requests (NSTART) nor retransmits. A transport with a CoAP message layer
    # should offer it, and a wrapper around one should forward it; without it the
    # windowed fetcher uses `get`, which is right only for transports that have no
    # message layer of their own (in-process, test fakes).

    def observe(self, path: str) -> AsyncIterator[Response]: ...

    async def reset(self) -> None:
        """Forget connection state (e.g. start a new DTLS session on the next request)."""
        ...

    async def close(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    """Monotonic time and real sleeping."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """Virtual time for tests: sleeping advances the clock at once (ATTACKS.md H4)."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = start
        self.slept = 0.0

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        self._t += seconds

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self._t += seconds
        self.slept += seconds
        await asyncio.sleep(0)
