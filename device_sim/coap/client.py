"""The device's CoAP-over-DTLS transport (aiocoap's tinydtls client, PSK per device).

Every request is a single exchange with `handle_blockwise=False`: aiocoap's automatic
block-wise assembly would buffer whole bodies (unbounded memory, ATTACKS.md #12) and
would hide the Block2 options the device must check itself (RFC 7959 §2.2-2.4). The
DTLS PSK identity is the device id and the key its PSK (RFC 7252 §9.1.3.1); identity
comes only from the session, never from a URI or payload.

Block2 GETs of a windowed transfer go out as NON requests (`get_nonconfirmable`); every
other request is a CON, retransmitted by aiocoap (RFC 7252 §4.2).

`reset()` throws the client context away, so the next request starts a new DTLS
session: after a server restart or a long outage the old session is dead on the server
side, and only a new handshake recovers. Each context's DTLS connections get a
handshake retransmission timer that survives tinydtls' clock re-basing
(`dtls_retransmit`): without it, a lost client flight in any session after the first
hung that handshake for good. A response carrying a critical option the device does
not process is rejected (`critical_options`, RFC 7252 §5.4.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiocoap
from aiocoap import GET, POST, Message

from ..transport import HandshakeTimeout, Response, TransportError
from .critical_options import reject_unrecognized_critical
from .dtls_retransmit import Handshakes, harden_dtls
from .request_cleanup import abandon, release

_log = logging.getLogger(__name__)

# aiocoap leaves each finished request in a reference cycle (Request, its runner
# coroutine and pipe, still holding the response and its payload). Python's cyclic GC
# frees them, but only when a collection reaches the generation they were promoted to,
# so between full collections they pile up in proportion to the number of blocks. A
# young-generation collection every few exchanges bounds that garbage to those few
# exchanges, which is what keeps the device's memory flat for any image size.
COLLECT_EVERY = 4


# RFC 7252 §4.3: reliability False makes aiocoap send the request as NON.
_NON = aiocoap.Unreliable()


def normalize_base(uri: str) -> str:
    """coaps://HOST:PORT with no path; anything else is refused (coaps only, RFC 7252 §9)."""
    parts = urlsplit(uri)
    if parts.scheme != "coaps":
        raise ValueError(f"server URI must be coaps://HOST:PORT, not {uri!r}")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"server URI must be coaps://HOST:PORT, not {uri!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {uri!r}") from exc
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"coaps://{host}:{port}" if port else f"coaps://{host}"


def _convert(msg: Message) -> Response:
    """The device's view of a response, once its options pass RFC 7252 §5.4.1."""
    reject_unrecognized_critical(msg)
    b2 = msg.opt.block2
    block2 = (b2.block_number, bool(b2.more), b2.size_exponent) if b2 is not None else None
    etag = msg.opt.etag
    return Response(
        code=int(msg.code),
        payload=bytes(msg.payload),
        block2=block2,
        size2=msg.opt.size2,
        etag=bytes(etag) if etag is not None else None,
    )


class CoapTransport:
    """One device's DTLS channel to its server."""

    def __init__(
        self,
        base_uri: str,
        device_id: str,
        psk: bytes,
        *,
        collect_every: int | None = COLLECT_EVERY,
    ) -> None:
        self._base = normalize_base(base_uri)
        self._collect_every = collect_every
        self._identity = device_id
        self._psk = psk
        self._ctx: aiocoap.Context | None = None
        self._handshakes = Handshakes()
        self._lock = asyncio.Lock()
        self._remote: Any = None  # keeps aiocoap's weakly pooled DTLS session alive
        self.resets = 0
        self._exchanges = 0

    @property
    def base_uri(self) -> str:
        return self._base

    async def _context(self) -> aiocoap.Context:
        async with self._lock:
            if self._ctx is None:
                ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
                self._handshakes = harden_dtls(ctx)
                ctx.client_credentials.load_from_dict(
                    {
                        f"{self._base}/*": {
                            "dtls": {
                                "psk": {"hex": self._psk.hex()},
                                "client-identity": {"ascii": self._identity},
                            }
                        }
                    }
                )
                self._ctx = ctx
            return self._ctx

    async def _exchange(self, msg: Message, timeout: float) -> Response:
        ctx = await self._context()
        request = None
        try:
            request = ctx.request(msg, handle_blockwise=False)
            raw = await asyncio.wait_for(asyncio.shield(request.response), timeout)
        except TimeoutError as exc:
            if self._handshakes.incomplete():
                raise HandshakeTimeout(
                    f"DTLS handshake did not complete within {timeout:.1f} s"
                ) from exc
            raise TransportError(f"no response within {timeout:.1f} s") from exc
        except (aiocoap.error.Error, OSError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if request is not None:
                abandon(request)
                release(request)
        self._remote = raw.remote
        response = _convert(raw)
        del raw, request
        self._exchanges += 1
        if self._collect_every and self._exchanges % self._collect_every == 0:
            gc.collect(1)
        return response

    async def get(
        self, path: str, *, block2: tuple[int, int, int] | None, timeout: float
    ) -> Response:
        kwargs: dict[str, Any] = {}
        if block2 is not None:
            kwargs["block2"] = block2
        return await self._exchange(Message(code=GET, uri=self._base + path, **kwargs), timeout)

    async def get_nonconfirmable(
        self, path: str, *, block2: tuple[int, int, int] | None, timeout: float
    ) -> Response:
        """GET as a NON request (RFC 7252 §4.3): sent at once, never retransmitted here.

        For the windowed Block2 transfer (device_sim.fetcher): aiocoap's message layer
        keeps one CON outstanding per peer (NSTART = 1, RFC 7252 §4.7) and queues the
        rest, and retransmits every CON itself (§4.2). A window of CONs would go out
        one at a time and be retransmitted by two layers. As NON, the fetcher's
        congestion controller alone decides how many requests are out and when one
        is asked again. The server answers a NON request with a NON response (§5.2.3).
        """
        kwargs: dict[str, Any] = {"transport_tuning": _NON}
        if block2 is not None:
            kwargs["block2"] = block2
        return await self._exchange(Message(code=GET, uri=self._base + path, **kwargs), timeout)

    async def post(
        self, path: str, payload: bytes, *, content_format: int, timeout: float
    ) -> Response:
        msg = Message(
            code=POST, uri=self._base + path, payload=payload, content_format=content_format
        )
        return await self._exchange(msg, timeout)

    async def observe(self, path: str) -> AsyncIterator[Response]:
        """RFC 7641: register, yield the first response and then every notification."""
        ctx = await self._context()
        request = ctx.request(
            Message(code=GET, uri=self._base + path, observe=0), handle_blockwise=False
        )
        try:
            try:
                first = await request.response
            except (aiocoap.error.Error, OSError) as exc:
                raise TransportError(f"observe failed: {exc}") from exc
            yield _convert(first)
            if request.observation is None:
                return
            try:
                async for note in request.observation:
                    yield _convert(note)
            except (aiocoap.error.Error, OSError) as exc:
                raise TransportError(f"observation ended: {exc}") from exc
        finally:
            obs = request.observation
            if obs is not None and not obs.cancelled:
                obs.cancel()

    async def reset(self) -> None:
        self.resets += 1
        await self.close()

    async def close(self) -> None:
        async with self._lock:
            ctx, self._ctx, self._remote = self._ctx, None, None
        if ctx is not None:
            with contextlib.suppress(Exception):
                await ctx.shutdown()
