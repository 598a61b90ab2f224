"""aiocoap transports with bounds: DTLS-only listener on the port we say, a capped
DTLS session table and a capped duplicate-detection cache.

Why not `Context.create_server_context(transports=["tinydtls_server"])`: that public
path (and AIOCOAP_SERVER_TRANSPORT=tinydtls_server) binds DTLS at *bind port + 1*
(`MessageInterfaceSimpleServer.create_server` adds COAPS_PORT - COAP_PORT), so port 0
would become port 1, and it keeps aiocoap's unbounded tables. We build the same
stack by hand instead (TokenManager -> MessageManager -> message interface, exactly
what `Context._append_tokenmanaged_messagemanaged_transport` does) with subclasses:

- `_BoundedDTLSSocket`: aiocoap's `_DatagramServerSocketSimpleDTLS` has `max_sockets =
  64` and a `_maybe_purge_sockets`, but nothing ever calls it, so every source address
  (spoofable, ATTACKS.md #29/#30) keeps a tinydtls context forever. We keep peers
  that have not proved their address apart from sessions, cap both, and expire idle
  ones; an evicted device just handshakes again.
- `BoundedMessageManager`: RFC 7252 §4.5 duplicate detection keeps every request's
  response for EXCHANGE_LIFETIME (247 s) in `_recent_messages` plus one timer handle
  each, so memory grows with the request rate (2.5-4 KB per request). We keep the same
  semantics in an LRU with a hard entry cap and lazy expiry (no per-entry timers).
  Under the cap nothing changes; beyond it the oldest entries are forgotten early,
  which can only turn a late retransmission into a re-executed request. Our state-
  changing requests are idempotent under that (a repeated report is recognised).
- A fast path hook (`FastPath`, see fastpath.py): each message interface offers the
  plaintext CoAP datagram to it first; a request it answers never reaches aiocoap's
  MessageManager, TokenManager or Site. Anything it declines goes on as before.
- `_Decrypting`: aiocoap cancels and re-creates a handshake-retransmission task for
  every incoming datagram, even on established sessions where tinydtls has nothing to
  retransmit; we ask tinydtls first and only create the task when it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from aiocoap import error
from aiocoap.message import Message
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.types import CON
from aiocoap.protocol import Context
from aiocoap.tokenmanager import TokenManager
from aiocoap.transports.simplesocketserver import (
    MessageInterfaceSimpleServer,
    _DatagramServerSocketSimple,
)
from aiocoap.transports.tinydtls_server import (
    GoingThroughMessageDecryption,
    MessageInterfaceTinyDTLSServer,
    _AddressDTLS,
    _DatagramServerSocketSimpleDTLS,
)

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
        super()._received_datagram(address, datagram)  # type: ignore[misc]


class _NoRetransmission:
    """Stands in for aiocoap's per-session retransmission task when none is needed."""

    @staticmethod
    def cancel() -> bool:
        return False


_NO_RETRANSMISSION = _NoRetransmission()


class _Decrypting(GoingThroughMessageDecryption):  # type: ignore[misc]
    """aiocoap's DTLS decryption adapter without a new task per datagram."""

    def _received_datagram(self, address: Any, data: bytes) -> None:
        task = address._retransmission_task
        if task is not _NO_RETRANSMISSION:
            task.cancel()
        dtls = address._dtls_socket
        dtls.handleMessage(address._dtls_session, data)
        # aiocoap's task starts with this same call and ends at once when it is 0,
        # which is always the case once the handshake is over.
        if dtls.checkRetransmit() == 0:
            address._retransmission_task = _NO_RETRANSMISSION
        else:
            address._retransmission_task = asyncio.create_task(
                address._run_retransmissions(), name="DTLS server handshake retransmissions"
            )


class DedupCache:
    """(remote, message id) -> stored response, with lifetime and an entry cap."""

    def __init__(self, max_entries: int, lifetime: float, clock: Callable[[], float]) -> None:
        self._entries: OrderedDict[Any, list[Any]] = OrderedDict()
        self._max = max_entries
        self._lifetime = lifetime
        self._clock = clock
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self) -> None:
        now = self._clock()
        entries = self._entries
        # Insertion order is arrival order and the lifetime is fixed, so expired
        # entries are always at the front.
        while entries:
            first = next(iter(entries.values()))
            if first[0] > now:
                break
            entries.popitem(last=False)

    def lookup(self, key: Any) -> tuple[bool, Message | None]:
        self._expire()
        entry = self._entries.get(key)
        return (False, None) if entry is None else (True, entry[1])

    def add(self, key: Any) -> None:
        self._expire()
        while len(self._entries) >= self._max:
            self._entries.popitem(last=False)
            self.evicted += 1
        self._entries[key] = [self._clock() + self._lifetime, None]

    def store_response(self, key: Any, response: Message) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry[1] = response


class BoundedMessageManager(MessageManager):
    """aiocoap's MessageManager with a bounded duplicate-detection cache."""

    def __init__(self, token_manager: TokenManager, max_entries: int, lifetime: float) -> None:
        super().__init__(token_manager)
        self.dedup = DedupCache(max_entries, lifetime, token_manager.loop.time)
        self._recent_messages = None  # type: ignore[assignment]  # replaced by self.dedup

    def _deduplicate_message(self, message: Message) -> bool:
        """RFC 7252 §4.5: a CON with a known (endpoint, Message ID) gets the same response."""
        key = (message.remote, message.mid)
        known, response = self.dedup.lookup(key)
        if known:
            if message.mtype is CON and response is not None:
                self.log.info("Duplicate CON received, sending old response again")
                self._send_initially(response)
            else:
                self.log.info("Duplicate message received, no response to send (yet)")
            return True
        self.dedup.add(key)
        return False

    def _store_response_for_duplicates(self, message: Message) -> None:
        self.dedup.store_response((message.remote, message.mid), message)


class _SessionAddress(_AddressDTLS):  # type: ignore[misc]
    """A DTLS peer that remembers how far its handshake got and when it last spoke.

    Its tinydtls callbacks go straight to their destinations: aiocoap's `_read` reaches
    the plaintext interface through two adapter calls and `_write` the socket through
    two more, on every record.
    """

    established = False
    # Set once tinydtls answers with a ServerHello rather than a HelloVerifyRequest:
    # the peer echoed our cookie, so it can receive at its address (RFC 6347 §4.2.1).
    cookie_verified = False
    seen = 0.0  # the socket's clock at this peer's last datagram
    # Our last handshake flight (ChangeCipherSpec, Finished), kept until the peer's
    # first application data shows it arrived; see `repeat_final_flight`.
    final_flight: list[bytes] | None = None
    _repeats = 0
    MAX_REPEATS = 4

    def __init__(self, protocol: Any, underlying_address: Any) -> None:
        super().__init__(protocol, underlying_address)
        self._plaintext = protocol._message_interface._plaintext_interface
        self._sendto = protocol._transport.sendto
        self._peer = underlying_address

    def _read(self, sender: Any, data: bytes) -> int:
        # tinydtls only hands us plaintext after the Finished messages verified.
        self.established = True
        self.final_flight = None
        self._plaintext._received_datagram(self, data)
        return len(data)

    def _write(self, recipient: Any, data: bytes) -> int:
        # DTLS record header is 13 bytes; content type 22 = handshake, then the
        # handshake type: 2 = ServerHello (RFC 6347 §4.1, §4.2.2).
        if not self.established and len(data) > 13:
            if not self.cookie_verified and data[0] == 22 and data[13] == 2:
                self.cookie_verified = True
            elif data[0] == 20:  # ChangeCipherSpec: our final flight starts
                self.final_flight = [data]
            elif data[0] == 22 and self.final_flight is not None and len(self.final_flight) < 4:
                self.final_flight.append(data)  # the Finished, encrypted under epoch 1
        self._sendto(data, self._peer)
        return len(data)

    def repeat_final_flight(self, data: bytes) -> bool:
        """Send our last flight again if `data` is the peer repeating its own.

        RFC 6347 §4.2.4: a server whose final flight (ChangeCipherSpec, Finished) was
        lost must retransmit it when the client retransmits its final flight; tinydtls
        does not, so that handshake hung until the device gave up on the session
        (about a quarter of first sessions at 5 % loss). The client's flight starts
        with a ClientKeyExchange (handshake type 16) in epoch 0, which a finished
        handshake never expects again. At most MAX_REPEATS times per session, so a
        replayed record cannot make us a reflector.
        """
        if not (len(data) > 13 and data[0] == 22 and data[3:5] == b"\x00\x00"):
            return False
        if data[13] != 16 or self.final_flight is None or self._repeats >= self.MAX_REPEATS:
            return False
        self._repeats += 1
        for record in self.final_flight:
            self._sendto(record, self._peer)
        return True

    def evict(self, why: str) -> None:
        """Drop this session, telling an established peer with a close_notify alert
        (RFC 6347 §4.2.7 / RFC 5246 §7.2.1) so its next request re-handshakes instead
        of timing out."""
        if self.established:
            try:
                self._dtls_socket.close(self._dtls_session)
            except Exception:  # best effort: the peer may already be gone
                log.debug("close_notify to %s failed", self.hostinfo, exc_info=True)
        self._inject_error(error.LibraryShutdown(f"DTLS session dropped ({why})"))

    def _inject_error(self, e: Exception) -> None:
        unverified = self._protocol._unverified
        if unverified.get(self._peer) is self:
            del unverified[self._peer]
        # KeyError: already removed from the session table (evicted, then alerted).
        with contextlib.suppress(KeyError):
            super()._inject_error(e)


async def _bind_exclusive(
    cls: Any, bind: tuple[str, int], log: logging.Logger, loop: Any, interface: Any
) -> Any:
    """aiocoap's `_DatagramServerSocketSimple.create`, minus SO_REUSEPORT.

    With SO_REUSEPORT a second server on the same port binds without error and the
    kernel splits datagrams between the two, which breaks DTLS sessions at random; we
    want "address already in use" instead.
    """
    ready = loop.create_future()
    await loop.create_datagram_endpoint(
        lambda: cls(ready.set_result, interface, log), local_addr=bind, reuse_port=False
    )
    self = await ready
    self._loop = loop
    return self


class _BoundedDTLSSocket(_DatagramServerSocketSimpleDTLS):  # type: ignore[misc]
    """aiocoap's DTLS server socket with two bounded pools and idle expiry.

    Peers that have not echoed a cookie (spoofable: a ClientHello costs the sender
    nothing, ATTACKS.md #29) live in their own pool of `max_sockets` and only ever
    displace each other, least recently heard first. A peer that proves its address
    (RFC 6347 §4.2.1) moves to the session pool of `max_sockets`; if that is full, the
    least recently used *established* session gives way (close_notify; the device
    just handshakes again), never a handshake in progress unless nothing else is left.
    One pool shared by both, as before, livelocked: once it held `max_sockets`
    finished sessions, every newcomer was "half-open" and evicted the previous
    newcomer, so no new device could ever get in.

    Sessions also expire when idle (`idle_timeout` once established, HANDSHAKE_IDLE
    before), checked at most once a second as datagrams arrive: `_connections` is kept
    in last-heard order, so the sweep stops at the first peer heard recently.
    """

    _Address = _SessionAddress
    max_sockets = 256
    idle_timeout = 300.0
    # A handshake peer silent this long has given up: tinydtls' client retransmits
    # with a doubling timer from 1 s and stops after 7 tries (RFC 6347 §4.2.4.1).
    HANDSHAKE_IDLE = 60.0
    SWEEP_EVERY = 1.0
    clock: Callable[[], float] = staticmethod(time.monotonic)  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unverified: OrderedDict[Any, _SessionAddress] = OrderedDict()
        self._next_sweep = 0.0
        self.dropped: dict[str, int] = {"idle": 0, "full": 0, "spoofable": 0}

    @classmethod
    async def create(cls, bind: Any, log: Any, loop: Any, message_interface: Any) -> Any:
        # As in aiocoap: incoming datagrams go through the per-peer DTLS state first.
        wrapped = _Decrypting(message_interface)
        return await _bind_exclusive(cls, bind, log, loop, wrapped)

    def datagram_received(self, data: bytes, sockaddr: Any) -> None:
        # aiocoap's, plus the pools and the idle sweep.
        now = self.clock()
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_EVERY
            self._expire(now)
        conns = self._connections
        address = conns.get(sockaddr)
        if address is None:
            unverified = self._unverified
            while len(unverified) >= self.max_sockets:
                self._drop(next(iter(unverified.values())), "spoofable")
            address = conns[sockaddr] = unverified[sockaddr] = self._Address(self, sockaddr)
        else:
            conns.move_to_end(sockaddr)
        address.seen = now
        if address.cookie_verified:
            if address.final_flight is not None and address.repeat_final_flight(data):
                return
            self._message_interface._received_datagram(address, data)
            return
        unverified = self._unverified
        if sockaddr in unverified:  # always, unless a callback dropped it meanwhile
            unverified.move_to_end(sockaddr)
        self._message_interface._received_datagram(address, data)
        if address.cookie_verified and unverified.pop(sockaddr, None) is address:
            self._admit(address)

    def _admit(self, newcomer: _SessionAddress) -> None:
        """Make room in the session pool for a peer that just proved its address."""
        conns = self._connections
        while len(conns) - len(self._unverified) > self.max_sockets:
            victim = next((a for a in conns.values() if a.established), None)
            if victim is None:  # only handshakes: the longest-silent one, not the newcomer
                victim = next(a for a in conns.values() if a.cookie_verified)
            if victim is newcomer:
                break
            self._drop(victim, "full")

    def _expire(self, now: float) -> None:
        floor = min(self.idle_timeout, self.HANDSHAKE_IDLE)
        expired = []
        for address in self._connections.values():
            idle = now - address.seen
            if idle < floor:
                break  # last-heard order: everyone after has spoken more recently
            if idle >= (self.idle_timeout if address.established else self.HANDSHAKE_IDLE):
                expired.append(address)
        for address in expired:
            self._drop(address, "idle")

    def _drop(self, victim: _SessionAddress, why: str) -> None:
        self.dropped[why] += 1
        # Debug only: a spoofed flood would otherwise write a line per datagram. The
        # server logs the counters once a minute instead (OtaServer.load_figures).
        log.debug("dropping %s DTLS session with %s (%s)", _stage(victim), victim.hostinfo, why)
        victim.evict(why)
        key = victim._peer
        if self._connections.get(key) is victim:  # defensive: never loop forever
            del self._connections[key]
        if self._unverified.get(key) is victim:
            del self._unverified[key]


def _stage(address: _SessionAddress) -> str:
    if address.established:
        return "established"
    return "handshaking" if address.cookie_verified else "unverified"


class DTLSServerInterface(_FastPathFirst, MessageInterfaceTinyDTLSServer):  # type: ignore[misc]
    _serversocket = _BoundedDTLSSocket

    @classmethod
    async def create_bound(
        cls,
        bind: tuple[str, int],
        mman: MessageManager,
        log: logging.Logger,
        loop: asyncio.AbstractEventLoop,
        server_credentials: Any,
        max_sessions: int,
        idle_timeout: float = _BoundedDTLSSocket.idle_timeout,
    ) -> DTLSServerInterface:
        """Listen for DTLS on exactly `bind` (port 0: the OS picks)."""
        self = cls(mman, log, loop)
        self._pool = await cls._serversocket.create(bind, log, loop, self)
        self._pool._server_credentials = server_credentials
        self._pool.max_sockets = max_sessions
        self._pool.idle_timeout = idle_timeout
        _fix_hostinfo(self._pool, bind[0])
        return self

    @property
    def port(self) -> int:
        return int(self._pool._transport.get_extra_info("sockname")[1])

    @property
    def session_count(self) -> int:
        """Peers past the cookie exchange: handshaking or established."""
        return len(self._pool._connections) - len(self._pool._unverified)

    @property
    def unverified_count(self) -> int:
        """Peers that have not echoed a cookie yet (their own pool, same cap)."""
        return len(self._pool._unverified)

    @property
    def dropped(self) -> dict[str, int]:
        """Sessions dropped so far, by why: idle, full (pushed out by a newcomer whose
        address was proven) or spoofable (an unverified peer pushed out by another)."""
        return dict(self._pool.dropped)


class _PlainSocket(_DatagramServerSocketSimple):  # type: ignore[misc]
    @classmethod
    async def create(cls, bind: Any, log: Any, loop: Any, message_interface: Any) -> Any:
        return await _bind_exclusive(cls, bind, log, loop, message_interface)


class PlainServerInterface(_FastPathFirst, MessageInterfaceSimpleServer):  # type: ignore[misc]
    """Unencrypted CoAP, only with --insecure-plain-coap."""

    _serversocket = _PlainSocket

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
        _fix_hostinfo(self._pool, bind[0])
        return self

    @property
    def port(self) -> int:
        return int(self._pool._transport.get_extra_info("sockname")[1])

    def send(self, message: Message) -> None:
        # An unauthenticated source address may be spoofed: error answers go out bare,
        # without diagnostic text, so no reply is much larger than its request
        # (RFC 7252 §11.3, ATTACKS.md #29).
        if message.code.is_response() and not message.code.is_successful():
            message.payload = b""
        super().send(message)


def _fix_hostinfo(pool: Any, host: str) -> None:
    from aiocoap.util import hostportjoin

    port = pool._transport.get_extra_info("sockname")[1]
    pool.hostinfo_local = hostportjoin(host, port)


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
