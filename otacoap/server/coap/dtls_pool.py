"""The server's DTLS session table, built on aiocoap's tinydtls_server internals.

- `BoundedDTLSSocket`: aiocoap's `_DatagramServerSocketSimpleDTLS` has `max_sockets =
  64` and a `_maybe_purge_sockets`, but nothing ever calls it, so every source address
  (spoofable, ATTACKS.md #29/#30) keeps a tinydtls context forever. We keep three
  pools apart: peers that have not proved their address, handshakes in progress, and
  authenticated sessions; each is capped, idle peers expire, and only a peer that
  completed a PSK handshake may push out an authenticated session (an evicted device
  just handshakes again). Sessions whose key was revoked are ended (`revoke`).
- `SessionAddress`: a peer that knows how far its handshake got and which identity it
  presented, repeats our final flight when the client repeats its own (RFC 6347
  §4.2.4), and leaves with a close_notify.
- `Decrypting`: aiocoap cancels and re-creates a handshake-retransmission task for
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
from typing import Any

from aiocoap import error
from aiocoap.transports.tinydtls import DTLS_EVENT_CONNECTED, LEVEL_FATAL, LEVEL_NOALERT
from aiocoap.transports.tinydtls_server import (
    GoingThroughMessageDecryption,
    _AddressDTLS,
    _DatagramServerSocketSimpleDTLS,
)

from .sockets import bind_exclusive

log = logging.getLogger(__name__)


class _NoRetransmission:
    """Stands in for aiocoap's per-session retransmission task when none is needed."""

    @staticmethod
    def cancel() -> bool:
        return False


_NO_RETRANSMISSION = _NoRetransmission()
_APPLICATION_DATA = 23  # RFC 6347 §4.1 / RFC 5246 §6.2.1: ContentType application_data


def _discard(data: bytes, addr: Any) -> None:
    """The send function of an evicted peer (SessionAddress.evict)."""


class Decrypting(GoingThroughMessageDecryption):
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


class SessionAddress(_AddressDTLS):
    """A DTLS peer that remembers how far its handshake got and when it last spoke.

    Its tinydtls callbacks go straight to their destinations: aiocoap's `_read` reaches
    the plaintext interface through two adapter calls and `_write` the socket through
    two more, on every record.
    """

    # Set when tinydtls reports the handshake complete (both Finished messages
    # verified: the peer holds the PSK of the identity it presented).
    established = False
    # The PSK identity the peer presented in its ClientKeyExchange (RFC 4279 §2), for
    # counting failed handshakes; None before that.
    psk_identity: bytes | None = None
    # Set once tinydtls answers with a ServerHello rather than a HelloVerifyRequest:
    # the peer echoed our cookie, so it can receive at its address (RFC 6347 §4.2.1).
    cookie_verified = False
    seen = 0.0  # the socket's clock at this peer's last datagram
    # Our last handshake flight (ChangeCipherSpec, Finished), kept until the peer's
    # first application data shows it arrived; see `repeat_final_flight`.
    final_flight: list[bytes] | None = None
    _repeats = 0
    # Whether the client's ClientKeyExchange, then its ChangeCipherSpec, arrived (in
    # that order): its next epoch-1 handshake record is its Finished (RFC 6347 §4.2.4,
    # the client's final flight, one record per datagram from tinydtls).
    _client_kx = False
    _client_ccs = False
    MAX_REPEATS = 4

    def __init__(self, protocol: Any, underlying_address: Any) -> None:
        super().__init__(protocol, underlying_address)
        self._plaintext = protocol._message_interface._plaintext_interface
        self._sendto = protocol._transport.sendto
        self._peer = underlying_address
        # aiocoap's SecurityStore asks its `_server_credentials` for the PSK; asking us
        # first records which identity the peer presented.
        self._psk_store._server_credentials = self

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, Any]:
        self.psk_identity = bytes(identity)
        psk: bytes
        psk, claims = self._protocol._server_credentials.find_dtls_psk(identity)
        return psk, claims

    @property
    def claims(self) -> Any:
        """What the PSK lookup recorded for this peer (None: no known identity yet)."""
        return self._psk_store._claims

    def _event(self, level: int, code: int) -> None:
        if level == LEVEL_NOALERT and code == DTLS_EVENT_CONNECTED:
            if not self.established:
                self._protocol._established(self)
            return
        if level == LEVEL_FATAL and self.cookie_verified and not self.established:
            self._protocol._handshake_failed(self, "alert")
        super()._event(level, code)

    def _read(self, sender: Any, data: bytes) -> int:
        # tinydtls only hands us plaintext after the Finished messages verified.
        if not self.established:
            self._protocol._established(self)
        if self.final_flight is not None:  # it arrived: no repeat needed
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

    def client_finished_in(self, data: bytes) -> bool:
        """Whether `data` holds the client's Finished, arrived after its
        ClientKeyExchange and ChangeCipherSpec: then tinydtls has the keys to check it,
        and a Finished that does not verify means the wrong key, not a lost or
        reordered datagram (RFC 6347 §4.1 record headers, 13 bytes each)."""
        i, n = 0, len(data)
        while i + 13 <= n:
            ctype, epoch0 = data[i], data[i + 3 : i + 5] == b"\x00\x00"
            if ctype == 22 and epoch0 and i + 13 < n and data[i + 13] == 16:
                self._client_kx = True
            elif ctype == 20 and epoch0 and self._client_kx:
                self._client_ccs = True
            elif ctype == 22 and not epoch0 and self._client_ccs:
                return True
            i += 13 + int.from_bytes(data[i + 11 : i + 13], "big")
        return False

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
        # Nothing more goes out to this peer. tinydtls sends a close_notify to every
        # peer left in a context when the context is freed (dtls_free_context), which
        # happens whenever the garbage collector breaks the cycle between this address
        # and its DTLSSocket: a handshake dropped for a bad key, crowding or idleness
        # got a plaintext alert at some random later moment, or none (ATTACKS.md #30
        # wants the same silence for every failed handshake).
        self._sendto = _discard
        self._inject_error(error.LibraryShutdown(f"DTLS session dropped ({why})"))

    def _inject_error(self, e: Exception) -> None:
        protocol = self._protocol
        for pool in (protocol._unverified, protocol._handshaking):
            if pool.get(self._peer) is self:
                del pool[self._peer]
        # KeyError: already removed from the session table (evicted, then alerted).
        with contextlib.suppress(KeyError):
            super()._inject_error(e)


class BoundedDTLSSocket(_DatagramServerSocketSimpleDTLS):
    """aiocoap's DTLS server socket with three bounded pools and idle expiry.

    - Peers that have not echoed a cookie (spoofable: a ClientHello costs the sender
      nothing, ATTACKS.md #29) live in their own pool of `max_sockets` and only ever
      displace each other, least recently heard first.
    - A peer that proves its address (RFC 6347 §4.2.1) moves to the handshake pool of
      `max_handshakes`, where, again, handshakes only displace each other. Proving an
      address is cheap too (any host can), and a PSK it does not hold gets it no
      further: before, such peers counted as admitted and pushed out the least
      recently heard *authenticated* session, so a few hundred random identities kept
      a device handshaking again and again (issue 10 §2).
    - Only a peer whose PSK handshake completed (tinydtls verified both Finished
      messages) enters the session pool of `max_sockets`; if that is full, the least
      recently heard authenticated session gives way (close_notify; the device just
      handshakes again). A stranger never gets there, however many addresses it uses.

    Sessions also expire when idle (`idle_timeout` once established, HANDSHAKE_IDLE
    before), checked at most once a second as datagrams arrive: `_connections` is kept
    in last-heard order, so the sweep stops at the first peer heard recently.

    Handshakes that fail are dropped and reported to `on_failed_handshake(source
    host, identity or None, reason)`: "bad key" (the client's Finished did not verify:
    a wrong PSK, or an unknown identity's decoy), "alert" (tinydtls gave up with a
    fatal alert, e.g. an oversized identity), "timeout" (silent for HANDSHAKE_IDLE) or
    "crowded out" (by newer handshakes).
    """

    _Address = SessionAddress
    max_sockets = 256
    max_handshakes = 256
    idle_timeout = 300.0
    # A handshake peer silent this long has given up: tinydtls' client retransmits
    # with a doubling timer from 1 s and stops after 7 tries (RFC 6347 §4.2.4.1).
    HANDSHAKE_IDLE = 60.0
    SWEEP_EVERY = 1.0
    clock: Callable[[], float] = staticmethod(time.monotonic)
    on_failed_handshake: Callable[[str, bytes | None, str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unverified: OrderedDict[Any, SessionAddress] = OrderedDict()
        self._handshaking: OrderedDict[Any, SessionAddress] = OrderedDict()
        self._next_sweep = 0.0
        self.dropped: dict[str, int] = {
            "idle": 0,
            "full": 0,
            "spoofable": 0,
            "handshakes": 0,
            "revoked": 0,
            "bad_key": 0,
        }
        self.handshakes_completed = 0

    reuse_port = False  # True only in SharedDTLSSocket (serve --workers)

    @classmethod
    async def create(cls, bind: Any, log: Any, loop: Any, message_interface: Any) -> Any:
        # As in aiocoap: incoming datagrams go through the per-peer DTLS state first.
        wrapped = Decrypting(message_interface)
        return await bind_exclusive(cls, bind, log, loop, wrapped)

    def datagram_received(self, data: bytes, sockaddr: Any) -> None:
        # aiocoap's, plus the pools and the idle sweep.
        now = self.clock()
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_EVERY
            self._expire(now)
        conns = self._connections
        address: SessionAddress | None = conns.get(sockaddr)
        if address is None:
            unverified = self._unverified
            while len(unverified) >= self.max_sockets:
                self._drop(next(iter(unverified.values())), "spoofable")
            address = conns[sockaddr] = unverified[sockaddr] = self._Address(self, sockaddr)
        else:
            conns.move_to_end(sockaddr)
        address.seen = now
        if address.established:  # the common case first (established implies cookie_verified)
            if address.final_flight is not None and address.repeat_final_flight(data):
                return
            if (
                len(data) > 13
                and data[0] == _APPLICATION_DATA
                and len(data) == 13 + ((data[11] << 8) | data[12])
                and address._retransmission_task is _NO_RETRANSMISSION
            ):
                # One application-data record (RFC 6347 §4.1: a 13-byte header, then
                # as many bytes as its length field says): tinydtls decrypts it and
                # hands us the plaintext, and has no handshake flight to retransmit
                # after it, so `Decrypting`'s retransmission check is skipped.
                address._dtls_socket.handleMessage(address._dtls_session, data)
                return
            self._message_interface._received_datagram(address, data)
            return
        if address.cookie_verified:
            if address.final_flight is not None and address.repeat_final_flight(data):
                return
            if sockaddr in self._handshaking:
                self._handshaking.move_to_end(sockaddr)
            finished = address.client_finished_in(data)
            self._message_interface._received_datagram(address, data)
            if finished and not address.established and conns.get(sockaddr) is address:
                # tinydtls drops a Finished it cannot decrypt or verify without a word
                # (RFC 6347 §4.1.2.7: invalid records are discarded), so the peer would
                # hold its handshake slot until HANDSHAKE_IDLE: a wrong key, or an
                # unknown identity's decoy. It can never succeed: count it, drop it.
                self._drop(address, "bad_key")
            return
        unverified = self._unverified
        if sockaddr in unverified:  # always, unless a callback dropped it meanwhile
            unverified.move_to_end(sockaddr)
        self._message_interface._received_datagram(address, data)
        if address.cookie_verified and unverified.pop(sockaddr, None) is address:
            self._start_handshake(address)

    def _start_handshake(self, newcomer: SessionAddress) -> None:
        """A peer proved its address: room for it among the handshakes, never among
        the authenticated sessions."""
        handshaking = self._handshaking
        while len(handshaking) >= self.max_handshakes:
            self._drop(next(iter(handshaking.values())), "handshakes")
        handshaking[newcomer._peer] = newcomer

    def _established(self, peer: SessionAddress) -> None:
        """tinydtls completed `peer`'s PSK handshake: it may now take a session slot."""
        peer.established = True
        self.handshakes_completed += 1
        if self._handshaking.get(peer._peer) is peer:
            del self._handshaking[peer._peer]
        conns = self._connections
        while len(conns) - len(self._unverified) - len(self._handshaking) > self.max_sockets:
            victim = next((a for a in conns.values() if a.established and a is not peer), None)
            if victim is None:
                break
            self._drop(victim, "full")

    def _handshake_failed(self, peer: SessionAddress, reason: str) -> None:
        report = self.on_failed_handshake
        if report is not None:
            try:
                report(peer._peer[0], peer.psk_identity, reason)
            except Exception:  # counting must never break the DTLS callback
                log.exception("counting a failed handshake failed")

    def revoke(self, is_current: Callable[[Any], bool]) -> int:
        """End every session (and handshake) whose recorded claims `is_current` no
        longer accepts: its key was removed or replaced (issue 10 §1). The peer gets a
        close_notify; its next datagram finds no session and gets no data."""
        stale = [
            a
            for a in self._connections.values()
            if a.cookie_verified and a.claims is not None and not is_current(a.claims)
        ]
        for address in stale:
            self._drop(address, "revoked")
        return len(stale)

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

    def _drop(self, victim: SessionAddress, why: str) -> None:
        self.dropped[why] += 1
        # Debug only: a spoofed flood would otherwise write a line per datagram. The
        # server logs the counters once a minute instead (OtaServer.load_figures).
        log.debug("dropping %s DTLS session with %s (%s)", _stage(victim), victim.hostinfo, why)
        if victim.cookie_verified and not victim.established and why in _FAILURES:
            self._handshake_failed(victim, _FAILURES[why])
        victim.evict(why)
        key = victim._peer
        if self._connections.get(key) is victim:  # defensive: never loop forever
            del self._connections[key]
        for pool in (self._unverified, self._handshaking):
            if pool.get(key) is victim:
                del pool[key]

    @property
    def session_count(self) -> int:
        """Authenticated sessions: peers whose PSK handshake completed."""
        return len(self._connections) - len(self._unverified) - len(self._handshaking)

    @property
    def handshake_count(self) -> int:
        """Peers past the cookie exchange whose handshake has not completed yet."""
        return len(self._handshaking)

    @property
    def unverified_count(self) -> int:
        """Peers that have not echoed a cookie yet (their own pool, same cap)."""
        return len(self._unverified)


# Why a handshake was dropped -> the reason its failure is counted under.
_FAILURES = {"idle": "timeout", "handshakes": "crowded out", "bad_key": "bad key"}


def _stage(address: SessionAddress) -> str:
    if address.established:
        return "established"
    return "handshaking" if address.cookie_verified else "unverified"


class SharedDTLSSocket(BoundedDTLSSocket):
    """One worker's DTLS socket of `serve --workers N`: bound with SO_REUSEPORT so the
    workers share the port (docs/decisions/several-workers.md); nowhere else."""

    reuse_port = True
