"""The server's CoAP listeners: DTLS on exactly `--port`, plain CoAP behind the loud flag.

Why not `Context.create_server_context(transports=["tinydtls_server"])`: that public
path (and AIOCOAP_SERVER_TRANSPORT=tinydtls_server) binds DTLS at *bind port + 1*, so
port 0 would become port 1, and it keeps aiocoap's unbounded tables. We build the same
stack by hand instead (TokenManager -> MessageManager -> message interface, exactly
what `Context._append_tokenmanaged_messagemanaged_transport` does) with our bounded
parts (`dedup.BoundedMessageManager`, `dtls_pool.BoundedDTLSSocket`).

A fast path hook (`FastPath`, see otacoap/server/fastpath.py): each message interface
offers the plaintext CoAP datagram to it first; a request it answers never reaches
aiocoap's MessageManager, TokenManager or Site. Anything it declines goes on as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from aiocoap.message import Message
from aiocoap.messagemanager import MessageManager
from aiocoap.protocol import Context
from aiocoap.tokenmanager import TokenManager
from aiocoap.transports.simplesocketserver import MessageInterfaceSimpleServer
from aiocoap.transports.tinydtls_server import MessageInterfaceTinyDTLSServer

from .dedup import BoundedMessageManager
from .dtls_pool import BoundedDTLSSocket, SharedDTLSSocket
from .sockets import PlainSocket, SharedPlainSocket, bound_port, set_local_hostinfo

log = logging.getLogger(__name__)


class FastPath(Protocol):
    def handle(self, remote: Any, datagram: bytes) -> bytes | None:
        """The response to send for a plaintext CoAP datagram, or None to decline."""
        ...


class _FastPathFirst:
    """Message-interface mixin: offer each plaintext datagram to `fast` first."""

    fast: FastPath | None = None
    _mman: Any

    def _received_datagram(self, address: Any, datagram: bytes) -> None:
        fast = self.fast
        if fast is not None and self._mman is not None:  # _mman None: shutting down
            try:
                response = fast.handle(address, datagram)
            except Exception:  # a fast-path bug must not lose the request
                log.exception("fast path failed; handing the request to aiocoap")
                response = None
            if response is not None:
                address.send(response)
                return
        try:
            super()._received_datagram(address, datagram)  # type: ignore[misc]
        except UnicodeDecodeError:
            # aiocoap decodes string options (Uri-Path, Uri-Query, ...) as UTF-8 in
            # Message.decode but drops only UnparsableMessage; a non-UTF-8 value escaped
            # as an unhandled exception and a traceback per datagram (found by the Block1
            # fuzz harness, ATTACKS.md #43). Dropped like any unparsable message.
            log.warning("ignoring a CoAP message with a non-UTF-8 string option")


class DTLSServerInterface(_FastPathFirst, MessageInterfaceTinyDTLSServer):
    _serversocket = BoundedDTLSSocket
    _pool: BoundedDTLSSocket

    @classmethod
    async def create_bound(
        cls,
        bind: tuple[str, int],
        mman: MessageManager,
        log: logging.Logger,
        loop: asyncio.AbstractEventLoop,
        server_credentials: Any,
        max_sessions: int,
        idle_timeout: float = BoundedDTLSSocket.idle_timeout,
        max_handshakes: int = BoundedDTLSSocket.max_handshakes,
        on_failed_handshake: Callable[[str, bytes | None, str], None] | None = None,
    ) -> DTLSServerInterface:
        """Listen for DTLS on exactly `bind` (port 0: the OS picks)."""
        self = cls(mman, log, loop)
        self._pool = await cls._serversocket.create(bind, log, loop, self)
        self._pool._server_credentials = server_credentials
        self._pool.max_sockets = max_sessions
        self._pool.idle_timeout = idle_timeout
        self._pool.max_handshakes = max_handshakes
        self._pool.on_failed_handshake = on_failed_handshake
        set_local_hostinfo(self._pool, bind[0])
        return self

    @property
    def port(self) -> int:
        return bound_port(self._pool)

    @property
    def session_count(self) -> int:
        """Authenticated sessions (their PSK handshake completed)."""
        return self._pool.session_count

    @property
    def handshake_count(self) -> int:
        """Handshakes in progress (past the cookie exchange; their own pool and cap)."""
        return self._pool.handshake_count

    @property
    def handshakes_completed(self) -> int:
        return self._pool.handshakes_completed

    def revoke(self, is_current: Callable[[Any], bool]) -> int:
        """End the sessions whose claims `is_current` refuses (a revoked key)."""
        return self._pool.revoke(is_current)

    @property
    def unverified_count(self) -> int:
        """Peers that have not echoed a cookie yet (their own pool, same cap)."""
        return self._pool.unverified_count

    @property
    def dropped(self) -> dict[str, int]:
        """Sessions dropped so far, by why: idle, full (pushed out by a newly
        authenticated session), spoofable (an unverified peer pushed out by another),
        handshakes (a handshake pushed out by another) or revoked (its key was)."""
        return dict(self._pool.dropped)


class SharedDTLSServerInterface(DTLSServerInterface):
    """A worker's DTLS listener under `serve --workers N` (SO_REUSEPORT, on purpose)."""

    _serversocket = SharedDTLSSocket


class PlainServerInterface(_FastPathFirst, MessageInterfaceSimpleServer):
    """Unencrypted CoAP, only with --insecure-plain-coap."""

    _serversocket = PlainSocket

    @classmethod
    async def create_bound(
        cls,
        bind: tuple[str, int],
        mman: MessageManager,
        log: logging.Logger,
        loop: asyncio.AbstractEventLoop,
    ) -> PlainServerInterface:
        self = cls(mman, log, loop)
        self._pool = await cls._serversocket.create(bind, log, loop, self)
        set_local_hostinfo(self._pool, bind[0])
        return self

    @property
    def port(self) -> int:
        return bound_port(self._pool)

    def send(self, message: Message) -> None:
        # An unauthenticated source address may be spoofed: error answers go out bare,
        # without diagnostic text, so no reply is much larger than its request
        # (RFC 7252 §11.3, ATTACKS.md #29).
        if message.code.is_response() and not message.code.is_successful():
            message.payload = b""
        super().send(message)


class SharedPlainServerInterface(PlainServerInterface):
    """A worker's plain CoAP listener under `serve --workers N` (SO_REUSEPORT)."""

    _serversocket = SharedPlainSocket


async def add_transport(
    ctx: Context,
    create: Callable[[MessageManager], Any],
    max_entries: int,
    lifetime: float,
) -> Any:
    """Wire a message interface under `ctx` like aiocoap does, with our MessageManager."""
    tman = TokenManager(ctx)
    mman = BoundedMessageManager(tman, max_entries, lifetime)
    interface = await create(mman)
    mman.message_interface = interface
    tman.token_interface = mman
    ctx.request_interfaces.append(tman)
    return interface


async def shutdown(ctx: Context) -> None:
    """Shut `ctx` down, unless no interface was ever added (aiocoap cannot shut that down)."""
    if ctx.request_interfaces:
        await ctx.shutdown()
