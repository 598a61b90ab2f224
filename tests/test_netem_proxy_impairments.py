"""The impairment proxy really impairs: real UDP sockets on loopback, echo server upstream.

Each scenario runs in its own `asyncio.run` so a hung socket cannot leak into the next
test, and every wait is bounded so a regression fails fast instead of hanging CI.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any, cast

import pytest

from device_sim.netem import (
    REORDER_MAX_HOLD_MS,
    Direction,
    LinkProfile,
    UdpImpairmentProxy,
)

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

C2S = Direction.C2S
S2C = Direction.S2C
CLEAN = LinkProfile()


def run(coro: Coroutine[Any, Any, None], timeout: float = 10.0) -> None:
    """Bound every scenario so a lost datagram shows up as a failure, not a hang."""

    async def bounded() -> None:
        await asyncio.wait_for(coro, timeout)

    asyncio.run(bounded())


class Echo(asyncio.DatagramProtocol):
    """Upstream stand-in that remembers who sent what, in arrival order."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.seen: list[tuple[bytes, tuple[Any, ...]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.seen.append((data, addr))
        assert self.transport is not None
        self.transport.sendto(data, addr)


class Client(asyncio.DatagramProtocol):
    """Device stand-in recording what came back and when."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.got: list[tuple[float, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.got.append((asyncio.get_running_loop().time(), data))

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    @property
    def payloads(self) -> list[bytes]:
        return [d for _, d in self.got]

    @property
    def sockname(self) -> tuple[Any, ...]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")


class Rig:
    """Echo server + proxy + clients, torn down together so no socket outlives a test."""

    def __init__(self) -> None:
        self.echo = Echo()
        self.proxy: UdpImpairmentProxy
        self.clients: list[Client] = []
        self._transports: list[asyncio.DatagramTransport] = []

    @classmethod
    async def create(cls, host: str = "127.0.0.1", **proxy_kwargs: Any) -> Rig:
        rig = cls()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: rig.echo, local_addr=(host, 0))
        rig._transports.append(transport)
        upstream = transport.get_extra_info("sockname")[:2]
        proxy_kwargs.setdefault("listen", (host, 0))
        rig.proxy = await UdpImpairmentProxy.start(upstream, **proxy_kwargs)
        return rig

    async def client(self) -> Client:
        loop = asyncio.get_running_loop()
        client = Client()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: client, remote_addr=self.proxy.address
        )
        self._transports.append(transport)
        self.clients.append(client)
        return client

    async def __aenter__(self) -> Rig:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.proxy.aclose()
        for t in self._transports:
            t.close()
        await asyncio.sleep(0)  # let connection_lost run so sockets are really closed

    async def settle(self, timeout: float = 3.0) -> None:
        """Wait until nothing is in flight and every forwarded datagram has landed.

        Polling the counters avoids fixed sleeps: fast when the path is clean, and
        still correct when delays or drops are involved.
        """
        c2s, s2c = self.proxy.stats[C2S], self.proxy.stats[S2C]

        def quiet() -> bool:
            return (
                self.proxy.in_flight == 0
                and len(self.echo.seen) == c2s.forwarded + c2s.injected
                and sum(len(c.got) for c in self.clients) == s2c.forwarded + s2c.injected
                and s2c.received == len(self.echo.seen)
            )

        await wait_for(quiet, timeout)

    async def send_paced(self, client: Client, payloads: list[bytes], batch: int = 16) -> None:
        """Send in small batches, settling in between.

        A large synchronous burst can overflow a loopback receive buffer before the
        loop reads it, and the kernel's drop would be blamed on the proxy.
        """
        for i in range(0, len(payloads), batch):
            target = self.proxy.stats[C2S].received + len(payloads[i : i + batch])
            for p in payloads[i : i + batch]:
                client.send(p)
            await wait_for(lambda t=target: self.proxy.stats[C2S].received >= t, 3.0)
            await self.settle()


async def wait_for(cond: Callable[[], bool], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def numbered(n: int, size: int = 16) -> list[bytes]:
    return [i.to_bytes(4, "big") + bytes(size - 4) for i in range(n)]


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- clean path


def test_zero_profile_delivers_everything_once_in_order_unchanged() -> None:
    async def scenario() -> None:
        async with await Rig.create(seed=1) as rig:
            client = await rig.client()
            rng = random.Random(99)
            payloads = [
                i.to_bytes(2, "big") + rng.randbytes(rng.randrange(1, 1200)) for i in range(200)
            ]
            await rig.send_paced(client, payloads)

            assert [d for d, _ in rig.echo.seen] == payloads
            assert client.payloads == payloads
            for d in Direction:
                st = rig.proxy.stats[d]
                assert st.received == st.forwarded == 200
                assert st.dropped == st.duplicated == st.reordered == st.corrupted == 0
                assert st.forwarded_bytes == st.received_bytes == sum(map(len, payloads))

    run(scenario())


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_ipv6_loopback_round_trip() -> None:
    async def scenario() -> None:
        async with await Rig.create(host="::1") as rig:
            assert rig.proxy.address[0] == "::1"
            client = await rig.client()
            payloads = numbered(20)
            await rig.send_paced(client, payloads)
            assert client.payloads == payloads
            (upstream_local,) = rig.proxy.sessions.values()
            assert upstream_local[0] == "::1"

    run(scenario())


# --------------------------------------------------------------------------- loss


async def _lossy_run(seed: int, n: int = 400) -> tuple[dict[str, Any], list[Any]]:
    async with await Rig.create(profile=LinkProfile(loss=0.3), seed=seed) as rig:
        client = await rig.client()
        await rig.send_paced(client, numbered(n))
        stats = {d.value: asdict(rig.proxy.stats[d]) for d in Direction}
        # Each direction is deterministic on its own; their interleaving is up to the
        # event loop, so compare per-direction sequences without timestamps.
        events = [[(a, ln) for _, d, a, ln in rig.proxy.events if d == dd] for dd in ("c2s", "s2c")]
        assert len(client.got) == stats["s2c"]["forwarded"]
        return stats, events


def test_loss_matches_probability_and_is_deterministic_per_seed() -> None:
    results: list[tuple[dict[str, Any], list[Any]]] = []

    async def scenario() -> None:
        results.append(await _lossy_run(seed=7))
        results.append(await _lossy_run(seed=7))
        results.append(await _lossy_run(seed=8))

    run(scenario(), timeout=20)
    (stats, events), (stats_again, events_again), (_, events_other) = results

    c2s = stats["c2s"]
    assert c2s["received"] == 400
    assert abs(c2s["dropped"] / c2s["received"] - 0.3) < 0.07
    s2c = stats["s2c"]
    assert s2c["received"] == c2s["forwarded"]
    assert abs(s2c["dropped"] / s2c["received"] - 0.3) < 0.08
    assert c2s["dropped"] + c2s["forwarded"] == 400

    assert stats_again == stats
    assert events_again == events
    assert events_other != events


# --------------------------------------------------------------------------- duplicate


def test_duplicates_are_counted_and_received_twice() -> None:
    async def scenario() -> None:
        rig = await Rig.create(profile=LinkProfile(duplicate=1.0), upstream_profile=CLEAN)
        async with rig:
            client = await rig.client()
            payloads = numbered(20)
            await rig.send_paced(client, payloads, batch=5)

            assert Counter(d for d, _ in rig.echo.seen) == dict.fromkeys(payloads, 2)
            assert Counter(client.payloads) == dict.fromkeys(payloads, 2)
            st = rig.proxy.stats[C2S]
            assert st.duplicated == 20
            assert st.forwarded == 40
            assert rig.proxy.stats[S2C].duplicated == 0

    run(scenario())


# --------------------------------------------------------------------------- reorder


def test_reorder_always_swaps_neighbours() -> None:
    async def scenario() -> None:
        rig = await Rig.create(profile=LinkProfile(reorder=1.0), upstream_profile=CLEAN)
        async with rig:
            client = await rig.client()
            payloads = numbered(10)
            for p in payloads:
                client.send(p)
            await wait_for(lambda: len(client.got) == 10, 3.0)
            expected = [payloads[i ^ 1] for i in range(10)]  # 1,0,3,2,...
            assert [d for d, _ in rig.echo.seen] == expected
            assert client.payloads == expected
            assert rig.proxy.stats[C2S].reordered == 5

    run(scenario())


def test_partial_reorder_produces_out_of_order_arrival_without_loss() -> None:
    async def scenario() -> None:
        rig = await Rig.create(profile=LinkProfile(reorder=0.3), upstream_profile=CLEAN, seed=3)
        async with rig:
            client = await rig.client()
            payloads = numbered(60)
            await rig.send_paced(client, payloads, batch=20)
            arrived = [d for d, _ in rig.echo.seen]
            assert sorted(arrived) == payloads
            assert arrived != payloads
            assert rig.proxy.stats[C2S].reordered > 0

    run(scenario())


def test_held_datagram_is_released_when_nothing_follows() -> None:
    async def scenario() -> None:
        rig = await Rig.create(profile=LinkProfile(reorder=1.0), upstream_profile=CLEAN)
        async with rig:
            client = await rig.client()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            client.send(b"lonely")
            await wait_for(lambda: len(client.got) == 1, 2.0)
            assert client.got[0][0] - t0 >= REORDER_MAX_HOLD_MS / 1000 * 0.9
            assert client.payloads == [b"lonely"]

    run(scenario())


# --------------------------------------------------------------------------- corrupt


def test_corruption_flips_exactly_one_bit() -> None:
    async def scenario() -> None:
        rig = await Rig.create(profile=LinkProfile(corrupt=1.0), upstream_profile=CLEAN, seed=5)
        async with rig:
            client = await rig.client()
            rng = random.Random(5)
            payloads = [rng.randbytes(rng.randrange(1, 300)) for _ in range(30)]
            await rig.send_paced(client, payloads, batch=10)
            assert len(client.got) == 30
            flipped_positions = set()
            for sent, got in zip(payloads, client.payloads, strict=True):
                assert len(got) == len(sent)
                diff = int.from_bytes(sent, "big") ^ int.from_bytes(got, "big")
                assert diff.bit_count() == 1
                flipped_positions.add(diff.bit_length())
            assert len(flipped_positions) > 1  # not always the same bit
            assert rig.proxy.stats[C2S].corrupted == 30
            assert rig.proxy.stats[S2C].corrupted == 0

    run(scenario())


# --------------------------------------------------------------------------- timing


def test_delay_applies_in_each_direction() -> None:
    async def scenario() -> None:
        async with await Rig.create(profile=LinkProfile(delay_ms=40)) as rig:
            client = await rig.client()
            loop = asyncio.get_running_loop()
            for i in range(4):
                t0 = loop.time()
                client.send(bytes([i]))
                await wait_for(lambda i=i: len(client.got) == i + 1, 2.0)
                rtt = client.got[-1][0] - t0
                assert 0.080 - 0.002 <= rtt < 0.5

    run(scenario())


def test_jitter_stays_within_bounds_and_varies() -> None:
    async def scenario() -> None:
        profile = LinkProfile(delay_ms=30, jitter_ms=20)
        async with await Rig.create(profile=profile, upstream_profile=CLEAN, seed=11) as rig:
            client = await rig.client()
            loop = asyncio.get_running_loop()
            rtts = []
            for i in range(8):
                t0 = loop.time()
                client.send(bytes([i]))
                await wait_for(lambda i=i: len(client.got) == i + 1, 2.0)
                rtts.append(client.got[-1][0] - t0)
            assert all(0.010 - 0.002 <= r < 0.3 for r in rtts)
            assert max(rtts) - min(rtts) > 0.005

    run(scenario())


def test_rate_limit_slows_a_burst() -> None:
    async def scenario() -> None:
        # 20 x 250 B = 40 kbit at 80 kbit/s -> the last one leaves after ~0.5 s.
        rig = await Rig.create(profile=LinkProfile(rate_kbps=80), upstream_profile=CLEAN)
        async with rig:
            client = await rig.client()
            payloads = [bytes([i]) * 250 for i in range(20)]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for p in payloads:
                client.send(p)
            await wait_for(lambda: len(client.got) == 20, 3.0)
            elapsed = client.got[-1][0] - t0
            assert 0.45 <= elapsed <= 1.2
            first = client.got[0][0] - t0
            assert first < 0.2
            assert client.payloads == payloads

    run(scenario())


# --------------------------------------------------------------------------- blackhole


def test_blackhole_drops_everything_then_traffic_flows_again() -> None:
    async def scenario() -> None:
        async with await Rig.create() as rig:
            client = await rig.client()
            proxy = rig.proxy
            await rig.send_paced(client, numbered(10))
            assert len(client.got) == 10

            proxy.blackhole()
            assert proxy.blackholed
            for p in numbered(10):
                client.send(p)
            await wait_for(lambda: proxy.stats[C2S].received == 20, 2.0)
            await asyncio.sleep(0.05)
            assert len(client.got) == 10
            assert proxy.stats[C2S].blackholed == 10

            proxy.blackholed = False
            await rig.send_paced(client, numbered(10))
            assert len(client.got) == 20

            # Timed cut: restores itself.
            proxy.blackhole(0.1)
            client.send(b"lost")
            await wait_for(lambda: proxy.stats[C2S].received == 31, 2.0)
            await wait_for(lambda: not proxy.blackholed, 1.0)
            await rig.send_paced(client, [b"back"])
            assert client.payloads[-1] == b"back"
            assert b"lost" not in client.payloads

            # Via the profile, and catching datagrams already in flight.
            proxy.set_profile(LinkProfile(delay_ms=50))
            client.send(b"in-flight")
            await wait_for(lambda: proxy.in_flight == 1, 1.0)
            proxy.set_profile(LinkProfile(delay_ms=50, blackhole=True))
            await wait_for(lambda: proxy.in_flight == 0, 1.0)
            assert b"in-flight" not in client.payloads
            assert proxy.stats[C2S].blackholed == 12

    run(scenario())


def test_set_profile_changes_behaviour_at_runtime() -> None:
    async def scenario() -> None:
        async with await Rig.create() as rig:
            client = await rig.client()
            await rig.send_paced(client, numbered(5))
            rig.proxy.set_profile(LinkProfile(loss=1.0), upstream_profile=CLEAN)
            assert rig.proxy.profile("s2c") == CLEAN
            await rig.send_paced(client, numbered(5))
            assert len(client.got) == 5
            assert rig.proxy.stats[C2S].dropped == 5

    run(scenario())


# --------------------------------------------------------------------------- sessions


def test_two_clients_get_distinct_upstream_ports_and_their_own_replies() -> None:
    async def scenario() -> None:
        async with await Rig.create() as rig:
            a, b = await rig.client(), await rig.client()
            await rig.send_paced(a, [b"from-a"])
            await rig.send_paced(b, [b"from-b"])
            sources = {data: addr[:2] for data, addr in rig.echo.seen}
            assert sources[b"from-a"][1] != sources[b"from-b"][1]
            assert rig.proxy.address[1] not in {sources[b"from-a"][1], sources[b"from-b"][1]}
            assert a.payloads == [b"from-a"]
            assert b.payloads == [b"from-b"]
            sessions = rig.proxy.sessions
            assert sessions[a.sockname[:2]] == sources[b"from-a"]
            assert sessions[b.sockname[:2]] == sources[b"from-b"]

            # A replay goes out through the same NAT binding as the original.
            rig.proxy.inject(C2S, b"from-a", client=a.sockname[:2])
            await rig.settle()
            replays = [addr[:2] for data, addr in rig.echo.seen if data == b"from-a"]
            assert replays == [sources[b"from-a"]] * 2

    run(scenario())


def test_close_cancels_pending_delayed_sends() -> None:
    async def scenario() -> None:
        rig = await Rig.create(profile=LinkProfile(delay_ms=100))
        async with rig:
            client = await rig.client()
            for p in numbered(5):
                client.send(p)
            await wait_for(lambda: rig.proxy.stats[C2S].received == 5, 1.0)
            await rig.proxy.aclose()
            await asyncio.sleep(0.15)
            assert rig.echo.seen == []
            assert rig.proxy.closed

    run(scenario())


def test_event_log_is_bounded() -> None:
    async def scenario() -> None:
        async with await Rig.create(event_log_size=50) as rig:
            client = await rig.client()
            await rig.send_paced(client, numbered(40))
            events = rig.proxy.events
            assert len(events) == 50
            t, direction, action, length = events[-1]
            assert t >= 0 and direction in {"c2s", "s2c"} and action == "send" and length == 16

    run(scenario())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("upstream", "listen"),
    [
        (("10.0.0.1", 5684), ("127.0.0.1", 0)),
        (("8.8.8.8", 53), ("127.0.0.1", 0)),
        (("example.com", 5684), ("127.0.0.1", 0)),
        (("2001:db8::1", 5684), ("127.0.0.1", 0)),
        (("127.0.0.1", 5684), ("0.0.0.0", 0)),
        (("127.0.0.1", 5684), ("::", 0)),
        (("127.0.0.1", 5684), ("192.168.1.10", 6000)),
    ],
)
def test_non_loopback_addresses_are_refused(
    upstream: tuple[str, int], listen: tuple[str, int]
) -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="loopback"):
            await UdpImpairmentProxy.start(upstream, listen=listen)

    run(scenario())


def test_upstream_port_zero_is_refused() -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="port"):
            await UdpImpairmentProxy.start(("127.0.0.1", 0))

    run(scenario())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss": -0.1},
        {"loss": 1.5},
        {"duplicate": 2.0},
        {"reorder": float("nan")},
        {"corrupt": -1.0},
        {"delay_ms": -1.0},
        {"jitter_ms": float("inf")},
        {"rate_kbps": 0.0},
        {"rate_kbps": -5.0},
    ],
)
def test_link_profile_rejects_out_of_range_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="LinkProfile"):
        LinkProfile(**kwargs)
