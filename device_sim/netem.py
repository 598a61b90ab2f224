"""A seeded UDP impairment proxy on loopback, in the spirit of Linux `tc netem`.

The device simulator and the tests need impaired links (loss, delay, jitter,
duplication, reordering, bit errors, narrow bandwidth, outages) without root,
without `tc`, and reproducibly. The proxy sits between a CoAP/DTLS client and the
server: clients talk to `proxy.address`, and the proxy relays each datagram through
the impairment model. Because every decision comes from a seeded `random.Random`, a
failing run can be replayed exactly, which also makes the proxy usable as an attack
tool (drop, delay, duplicate, reorder, corrupt, and `inject` for replays).

Design choices worth knowing:

* One upstream socket per client address, like a NAT, so the server keeps telling
  DTLS sessions apart by source port. Sessions beyond `max_sessions` evict the least
  recently used one, which doubles as a NAT-rebinding scenario.
* One RNG per direction, derived from the seed, so the decisions taken for one
  direction do not depend on how the event loop interleaved it with the other. Given
  the same datagrams in the same order on a direction, the same seed gives the same
  decisions. Every datagram consumes a fixed number of draws whatever the outcome, so
  one knob does not shift the randomness another knob sees.
* Each (client, direction) pair is its own lane with its own queue and serialisation
  clock: rate limiting models the device's own radio link, not a shared bottleneck.
* Only asyncio timers (`call_at`), never threads; `close()` cancels everything pending.
* Traffic may only go to loopback (127.0.0.0/8, ::1): this project never sends
  packets anywhere else, so anything else is refused up front.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import ipaddress
import itertools
import logging
import math
import random
import socket
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Self

__all__ = [
    "DEFAULT_EVENT_LOG_SIZE",
    "MAX_QUEUE_PER_LANE",
    "NO_IMPAIRMENT",
    "REORDER_MAX_HOLD_MS",
    "Direction",
    "DirectionStats",
    "Event",
    "LinkProfile",
    "UdpImpairmentProxy",
    "main",
]

_log = logging.getLogger(__name__)

Address = tuple[str, int]
# (seconds since the proxy started, direction, action, datagram length)
Event = tuple[float, str, str, int]

DEFAULT_EVENT_LOG_SIZE = 10_000
# A datagram held back for reordering normally leaves right after the next one; if no
# next one comes (the last packet of a flight), it must not be held forever, or
# "reorder" silently turns into "loss".
REORDER_MAX_HOLD_MS = 200.0
# Bounds memory when a sender outruns a rate-limited lane; excess is tail-dropped,
# which is what a real router queue would do too.
MAX_QUEUE_PER_LANE = 4096

# Timers may fire a hair before their deadline (clock resolution, uvloop's 1 ms
# granularity); without slack the lane would re-arm in a tight loop instead of sending.
_CLOCK_SLACK_S = 1e-4
# Random draws per datagram: loss, duplicate, reorder, corrupt, bit, jitter, jitter(dup).
_DRAWS_PER_DATAGRAM = 7


class Direction(StrEnum):
    """Which way a datagram travels; a str so it reads naturally in logs and dict keys."""

    C2S = "c2s"
    S2C = "s2c"


@dataclass(frozen=True)
class LinkProfile:
    """How one direction of the link misbehaves.

    Frozen so a profile can be shared between directions and proxies without one
    caller's tweak leaking into another; change a running proxy with `set_profile`.
    Probabilities are per datagram; delays are one-way milliseconds.
    """

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    rate_kbps: float | None = None
    blackhole: bool = False

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder", "corrupt"):
            value = _number(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"LinkProfile.{name} must be a probability in [0, 1], got {value!r}"
                )
        for name in ("delay_ms", "jitter_ms"):
            value = _number(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"LinkProfile.{name} must be a finite value >= 0, got {value!r}")
        if self.rate_kbps is not None:
            value = _number(self, "rate_kbps")
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(
                    f"LinkProfile.rate_kbps must be None (unlimited) or a finite value > 0, "
                    f"got {value!r}"
                )
        if not isinstance(self.blackhole, bool):
            raise TypeError(f"LinkProfile.blackhole must be a bool, got {self.blackhole!r}")


def _number(profile: LinkProfile, name: str) -> float:
    """Reject bools and strings early: `loss="0.1"` or `loss=True` is a caller bug."""
    value = getattr(profile, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"LinkProfile.{name} must be a number, got {value!r}")
    return float(value)


NO_IMPAIRMENT = LinkProfile()


@dataclass
class DirectionStats:
    """Counters for one direction; `dropped` includes the blackholed and overflowed ones."""

    received: int = 0
    received_bytes: int = 0
    forwarded: int = 0
    forwarded_bytes: int = 0
    dropped: int = 0
    blackholed: int = 0
    overflowed: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    injected: int = 0


def _check_loopback(addr: Sequence[object], *, what: str, allow_port_zero: bool) -> Address:
    """Normalise a (host, port) pair, refusing anything that is not a loopback literal.

    Only literals (plus the name "localhost") are accepted: resolving names could
    quietly route test traffic to a real network.
    """
    if isinstance(addr, str | bytes) or len(addr) != 2:
        raise ValueError(f"{what} must be a (host, port) pair, got {addr!r}")
    host, port = addr
    if not isinstance(host, str):
        raise ValueError(f"{what} host must be a str, got {host!r}")
    literal = "127.0.0.1" if host.lower() == "localhost" else host.strip("[]")
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        raise ValueError(
            f"{what} host {host!r} is not a loopback IP literal; only 127.0.0.0/8 and ::1 "
            f"are allowed"
        ) from None
    if not ip.is_loopback:
        raise ValueError(
            f"{what} host {host!r} is not loopback; only 127.0.0.0/8 and ::1 are allowed"
        )
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f"{what} port must be an int, got {port!r}")
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what} port must be in [{low}, 65535], got {port}")
    return str(ip), port


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


@dataclass
class _Held:
    data: bytes
    seq: int
    timer: asyncio.TimerHandle


class _Lane:
    """One direction of one client session.

    Kept per flow so that ordering, the reorder slot and the serialisation clock of
    one client are never disturbed by another client's traffic.
    """

    def __init__(self, direction: Direction, send: Callable[[bytes], bool]) -> None:
        self.direction = direction
        self.send = send
        # (due, tiebreak, seq, data): the tiebreak keeps equal deadlines FIFO.
        self.heap: list[tuple[float, int, int, bytes]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        self.link_free_at = 0.0
        self.held: _Held | None = None
        self.seq = 0

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held is not None:
            self.held.timer.cancel()
            self.held = None
        self.heap.clear()


class _ProtocolBase(asyncio.DatagramProtocol):
    """Tracks closure so `wait_closed` can prove every socket was really released."""

    def __init__(self, proxy: UdpImpairmentProxy) -> None:
        self.proxy = proxy
        self.closed: asyncio.Future[None] = proxy._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.proxy._live_protocols.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy._live_protocols.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from a peer that went away is normal churn on a test link.
        _log.debug("netem: socket error ignored: %r", exc)


class _ListenProtocol(_ProtocolBase):
    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        self.proxy._on_client_datagram(data, addr)


class _UpstreamProtocol(_ProtocolBase):
    def __init__(self, proxy: UdpImpairmentProxy, session: _Session) -> None:
        super().__init__(proxy)
        self.session = session

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        if not self.session.closed:
            self.proxy._ingress(self.session.s2c, data)


class _Session:
    """NAT-style binding of one client address to its own upstream socket."""

    def __init__(self, proxy: UdpImpairmentProxy, client: tuple[object, ...], sock: socket.socket):
        self.client = client
        self.sock = sock
        self.upstream_local: Address = sock.getsockname()[:2]
        self.transport: asyncio.DatagramTransport | None = None
        self.handed_over = False
        self.closed = False
        # Datagrams due before the upstream transport exists; kept in order, bounded.
        self.backlog: deque[bytes] = deque()
        self.c2s = _Lane(Direction.C2S, self.send_upstream)
        self.s2c = _Lane(Direction.S2C, lambda data: proxy._send_to_client(data, client))

    def send_upstream(self, data: bytes) -> bool:
        if self.closed:
            return False
        if self.transport is None:
            if len(self.backlog) >= MAX_QUEUE_PER_LANE:
                return False
            self.backlog.append(data)
            return True
        if self.transport.is_closing():
            return False
        self.transport.sendto(data)
        return True

    def close(self) -> None:
        self.closed = True
        self.c2s.cancel()
        self.s2c.cancel()
        self.backlog.clear()
        if self.transport is not None:
            self.transport.close()
        # Otherwise the connect task closes the transport as soon as it exists.


class UdpImpairmentProxy:
    """Relay UDP between loopback clients and one loopback upstream, impairing both ways.

    Create with `await UdpImpairmentProxy.start(...)`; the constructor only wires state.
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        upstream: Address,
        profile: LinkProfile,
        upstream_profile: LinkProfile | None,
        seed: int,
        event_log_size: int,
        max_sessions: int,
    ) -> None:
        self._loop = loop
        self._upstream = upstream
        self._upstream_family = _family(upstream[0])
        self._profiles: dict[Direction, LinkProfile] = {}
        self.set_profile(profile, upstream_profile)
        self.seed = seed
        self._rngs = {d: random.Random(f"otacoap-netem:{seed}:{d.value}") for d in Direction}
        self._stats = {d: DirectionStats() for d in Direction}
        self._events: deque[Event] | None = (
            deque(maxlen=event_log_size) if event_log_size > 0 else None
        )
        self._max_sessions = max_sessions
        self._sessions: OrderedDict[tuple[object, ...], _Session] = OrderedDict()
        self._connect_tasks: set[asyncio.Task[None]] = set()
        self._live_protocols: set[_ProtocolBase] = set()
        self._tiebreak = itertools.count()
        self._t0 = loop.time()
        self._blackholed = False
        self._blackhole_timer: asyncio.TimerHandle | None = None
        self._listen_transport: asyncio.DatagramTransport | None = None
        self._listen_protocol: _ListenProtocol | None = None
        self._address: Address = ("", 0)
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def start(
        cls,
        upstream: Address,
        listen: Address = ("127.0.0.1", 0),
        profile: LinkProfile = NO_IMPAIRMENT,
        seed: int = 0,
        upstream_profile: LinkProfile | None = None,
        *,
        event_log_size: int = DEFAULT_EVENT_LOG_SIZE,
        max_sessions: int = 1024,
    ) -> Self:
        """Bind the listening socket and return a running proxy.

        `profile` impairs client→server traffic, and server→client traffic too unless
        `upstream_profile` (the profile for datagrams coming *from* upstream) is given.
        """
        upstream = _check_loopback(upstream, what="upstream", allow_port_zero=False)
        listen = _check_loopback(listen, what="listen", allow_port_zero=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if event_log_size < 0:
            raise ValueError(f"event_log_size must be >= 0, got {event_log_size}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        loop = asyncio.get_running_loop()
        proxy = cls(
            loop=loop,
            upstream=upstream,
            profile=profile,
            upstream_profile=upstream_profile,
            seed=seed,
            event_log_size=event_log_size,
            max_sessions=max_sessions,
        )
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _ListenProtocol(proxy), local_addr=listen, family=_family(listen[0])
        )
        proxy._listen_transport = transport
        proxy._listen_protocol = protocol
        proxy._address = transport.get_extra_info("sockname")[:2]
        _log.debug("netem: %s -> %s seed=%d", proxy._address, upstream, seed)
        return proxy

    def close(self) -> None:
        """Stop relaying at once: pending delayed sends are cancelled, not flushed.

        A link that goes away loses what was in flight; flushing would also make
        teardown timing depend on the profile. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if self._blackhole_timer is not None:
            self._blackhole_timer.cancel()
            self._blackhole_timer = None
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        if self._listen_transport is not None:
            self._listen_transport.close()

    async def wait_closed(self) -> None:
        """Wait until every socket the proxy opened is actually released."""
        if self._connect_tasks:
            await asyncio.gather(*self._connect_tasks, return_exceptions=True)
        pending = [p.closed for p in self._live_protocols]
        if pending:
            await asyncio.gather(*pending)

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ public state

    @property
    def address(self) -> Address:
        """Where clients should send: the proxy's own (host, port)."""
        return self._address

    @property
    def upstream(self) -> Address:
        return self._upstream

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> Mapping[Direction, DirectionStats]:
        """Live counters per direction (keys also match the strings "c2s"/"s2c")."""
        return self._stats

    @property
    def events(self) -> list[Event]:
        """Snapshot of the most recent events (empty when the log is disabled)."""
        return list(self._events) if self._events is not None else []

    @property
    def sessions(self) -> dict[tuple[object, ...], Address]:
        """Client address → the local upstream (host, port) the server sees for it."""
        return {client: s.upstream_local for client, s in self._sessions.items()}

    @property
    def in_flight(self) -> int:
        """Datagrams accepted but not yet sent or dropped, so tests can wait for quiet."""
        total = 0
        for s in self._sessions.values():
            for lane in (s.c2s, s.s2c):
                total += len(lane.heap) + (lane.held is not None)
            total += len(s.backlog)
        return total

    def profile(self, direction: Direction | str) -> LinkProfile:
        return self._profiles[Direction(direction)]

    def set_profile(
        self, profile: LinkProfile, upstream_profile: LinkProfile | None = None
    ) -> None:
        """Swap the impairment while running, with the same defaulting rule as `start`.

        Already-scheduled datagrams keep their timing: they are "on the wire".
        """
        for p in (profile, upstream_profile):
            if p is not None and not isinstance(p, LinkProfile):
                raise TypeError(f"expected a LinkProfile, got {p!r}")
        self._profiles[Direction.C2S] = profile
        self._profiles[Direction.S2C] = (
            upstream_profile if upstream_profile is not None else profile
        )

    @property
    def blackholed(self) -> bool:
        """The runtime link cut (independent of a profile's own `blackhole` flag)."""
        return self._blackholed

    @blackholed.setter
    def blackholed(self, on: bool) -> None:
        if self._blackhole_timer is not None:
            self._blackhole_timer.cancel()
            self._blackhole_timer = None
        self._blackholed = bool(on)

    def blackhole(self, seconds: float | None = None) -> None:
        """Cut the link in both directions now, for `seconds` or until cleared.

        Datagrams already queued are dropped too when they come due, as on a real
        outage; clear early with `proxy.blackholed = False`.
        """
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(
                f"blackhole seconds must be None or a finite value >= 0, got {seconds}"
            )
        self.blackholed = True
        if seconds is not None:
            self._blackhole_timer = self._loop.call_later(seconds, self._end_blackhole)

    def _end_blackhole(self) -> None:
        self._blackhole_timer = None
        self._blackholed = False

    def inject(
        self, direction: Direction | str, data: bytes, client: tuple[object, ...] | None = None
    ) -> None:
        """Send raw bytes now, bypassing the impairment (replays, forged datagrams).

        Goes out through the client's own session socket, so the server sees the same
        source port a replay from that client would have. `client` defaults to the
        most recently active client. A C2S injection for an unknown client opens a
        session for it, as its first datagram would.
        """
        if self._closed:
            raise RuntimeError("proxy is closed")
        direction = Direction(direction)
        if client is None:
            if not self._sessions:
                raise LookupError("no client session to inject into")
            client = next(reversed(self._sessions))
        session = self._session_for(client)
        if session is None:
            raise LookupError(f"could not open a session for {client!r}")
        lane = session.c2s if direction is Direction.C2S else session.s2c
        data = bytes(data)
        if lane.send(data):
            self._stats[direction].injected += 1
            self._log_event(self._loop.time(), direction, "inject", len(data))

    # ------------------------------------------------------------------ relay path

    def _log_event(self, now: float, direction: Direction, action: str, length: int) -> None:
        if self._events is not None:
            self._events.append((now - self._t0, direction.value, action, length))

    def _cut(self, profile: LinkProfile) -> bool:
        return self._blackholed or profile.blackhole

    def _drop(self, now: float, direction: Direction, action: str, length: int) -> None:
        st = self._stats[direction]
        st.dropped += 1
        if action == "blackhole":
            st.blackholed += 1
        elif action == "overflow":
            st.overflowed += 1
        self._log_event(now, direction, action, length)

    def _on_client_datagram(self, data: bytes, addr: tuple[object, ...]) -> None:
        session = self._session_for(addr)
        if session is not None:
            self._ingress(session.c2s, data)

    def _send_to_client(self, data: bytes, client: tuple[object, ...]) -> bool:
        transport = self._listen_transport
        if transport is None or transport.is_closing():
            return False
        transport.sendto(data, client)
        return True

    def _session_for(self, client: tuple[object, ...]) -> _Session | None:
        session = self._sessions.get(client)
        if session is not None:
            self._sessions.move_to_end(client)
            return session
        if self._closed:
            return None
        sock = socket.socket(self._upstream_family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # Bind to loopback explicitly so the source can never be another interface.
            local = "::1" if self._upstream_family == socket.AF_INET6 else "127.0.0.1"
            sock.bind((local, 0))
            sock.connect(self._upstream)
        except OSError:
            sock.close()
            _log.warning("netem: cannot open upstream socket for %r", client, exc_info=True)
            return None
        session = _Session(self, client, sock)
        self._sessions[client] = session
        task = self._loop.create_task(self._connect(session))
        self._connect_tasks.add(task)
        task.add_done_callback(lambda t: self._connect_done(t, session))
        while len(self._sessions) > self._max_sessions:
            _, evicted = self._sessions.popitem(last=False)
            evicted.close()
        return session

    async def _connect(self, session: _Session) -> None:
        """Wrap the already-connected socket in a transport.

        The socket is created synchronously so the upstream port is known at once and
        datagrams arriving meanwhile go to the session backlog in order.
        """
        session.handed_over = True
        try:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self, session), sock=session.sock
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            session.sock.close()
            session.closed = True
            _log.warning("netem: upstream endpoint failed for %r", session.client, exc_info=True)
            return
        session.transport = transport
        if session.closed:
            transport.close()
            return
        while session.backlog:
            transport.sendto(session.backlog.popleft())

    def _connect_done(self, task: asyncio.Task[None], session: _Session) -> None:
        self._connect_tasks.discard(task)
        # Cancelled before its first step: the socket never reached a transport.
        if task.cancelled() and not session.handed_over:
            session.sock.close()

    def _ingress(self, lane: _Lane, data: bytes) -> None:
        direction = lane.direction
        now = self._loop.time()
        n = len(data)
        st = self._stats[direction]
        st.received += 1
        st.received_bytes += n
        self._log_event(now, direction, "recv", n)

        profile = self._profiles[direction]
        rng = self._rngs[direction]
        u_loss, u_dup, u_reorder, u_corrupt, u_bit, u_jit0, u_jit1 = (
            rng.random() for _ in range(_DRAWS_PER_DATAGRAM)
        )
        if self._cut(profile):
            self._drop(now, direction, "blackhole", n)
            return
        if u_loss < profile.loss:
            self._drop(now, direction, "drop", n)
            return
        if n and u_corrupt < profile.corrupt:
            bit = min(int(u_bit * n * 8), n * 8 - 1)
            buf = bytearray(data)
            buf[bit >> 3] ^= 1 << (bit & 7)
            data = bytes(buf)
            st.corrupted += 1
            self._log_event(now, direction, "corrupt", n)
        copies = 2 if u_dup < profile.duplicate else 1
        if copies == 2:
            st.duplicated += 1
            self._log_event(now, direction, "duplicate", n)
        hold = u_reorder < profile.reorder and lane.held is None
        lane.seq += 1
        seq = lane.seq
        for copy, u_jit in zip(range(copies), (u_jit0, u_jit1), strict=False):
            if len(lane.heap) >= MAX_QUEUE_PER_LANE:
                self._drop(now, direction, "overflow", n)
                continue
            due = self._due(now, lane, profile, n, u_jit)
            if copy == 0 and hold:
                # Only a later datagram releases it (see _egress); the timer is the
                # safety net for when nothing follows.
                timer = self._loop.call_at(
                    due + REORDER_MAX_HOLD_MS / 1000.0, self._release_held, lane
                )
                lane.held = _Held(data, seq, timer)
                st.reordered += 1
                self._log_event(now, direction, "reorder", n)
                continue
            heapq.heappush(lane.heap, (due, next(self._tiebreak), seq, data))
        self._pump(lane)

    @staticmethod
    def _due(now: float, lane: _Lane, profile: LinkProfile, n: int, u_jit: float) -> float:
        """Serialisation first (the link is busy while bits go out), then propagation."""
        delay_ms = profile.delay_ms
        if profile.jitter_ms:
            delay_ms += (2.0 * u_jit - 1.0) * profile.jitter_ms
        leave = now
        if profile.rate_kbps is not None:
            start = max(now, lane.link_free_at)
            lane.link_free_at = start + (n * 8) / (profile.rate_kbps * 1000.0)
            leave = lane.link_free_at
        return leave + max(0.0, delay_ms) / 1000.0

    def _pump(self, lane: _Lane) -> None:
        """Send everything due, then arm one timer for the next deadline.

        One timer per lane (not per datagram) keeps equal deadlines FIFO and makes
        cancellation on close trivial.
        """
        if self._closed:
            return
        now = self._loop.time()
        while lane.heap and lane.heap[0][0] <= now + _CLOCK_SLACK_S:
            _, _, seq, data = heapq.heappop(lane.heap)
            self._egress(lane, data, seq)
        if not lane.heap:
            if lane.timer is not None:
                lane.timer.cancel()
                lane.timer = None
            return
        due = lane.heap[0][0]
        if lane.timer is not None and lane.timer_due == due:
            return
        if lane.timer is not None:
            lane.timer.cancel()
        lane.timer = self._loop.call_at(due, self._on_timer, lane)
        lane.timer_due = due

    def _on_timer(self, lane: _Lane) -> None:
        lane.timer = None
        self._pump(lane)

    def _egress(self, lane: _Lane, data: bytes, seq: int) -> None:
        direction = lane.direction
        now = self._loop.time()
        if self._cut(self._profiles[direction]):
            self._drop(now, direction, "blackhole", len(data))
        elif lane.send(data):
            st = self._stats[direction]
            st.forwarded += 1
            st.forwarded_bytes += len(data)
            self._log_event(now, direction, "send", len(data))
        else:
            self._drop(now, direction, "overflow", len(data))
        if lane.held is not None and lane.held.seq < seq:
            self._release_held(lane)

    def _release_held(self, lane: _Lane) -> None:
        held = lane.held
        if held is None or self._closed:
            return
        lane.held = None
        held.timer.cancel()
        self._egress(lane, held.data, held.seq)


# ---------------------------------------------------------------------- CLI


def _host_port(text: str) -> Address:
    """Parse "127.0.0.1:5684" or "[::1]:5684"."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None


async def _serve(args: argparse.Namespace) -> None:
    profile = LinkProfile(
        loss=args.loss,
        delay_ms=args.delay,
        jitter_ms=args.jitter,
        duplicate=args.duplicate,
        reorder=args.reorder,
        corrupt=args.corrupt,
        rate_kbps=args.rate,
    )
    proxy = await UdpImpairmentProxy.start(
        args.upstream, listen=args.listen, profile=profile, seed=args.seed
    )
    host, port = proxy.address
    print(f"netem: listening on {host}:{port} -> {args.upstream[0]}:{args.upstream[1]}")
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.aclose()
        for direction, st in proxy.stats.items():
            print(f"netem: {direction}: {st}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m device_sim.netem", description="Seeded UDP impairment proxy (loopback)"
    )
    parser.add_argument("--listen", type=_host_port, default=("127.0.0.1", 0))
    parser.add_argument("--upstream", type=_host_port, required=True)
    parser.add_argument("--loss", type=float, default=0.0, help="probability")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way ms")
    parser.add_argument("--jitter", type=float, default=0.0, help="± ms")
    parser.add_argument("--duplicate", type=float, default=0.0, help="probability")
    parser.add_argument("--reorder", type=float, default=0.0, help="probability")
    parser.add_argument("--corrupt", type=float, default=0.0, help="probability")
    parser.add_argument("--rate", type=float, default=None, help="kbit/s per direction")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    except (ValueError, TypeError) as exc:
        print(f"netem: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
