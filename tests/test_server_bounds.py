"""Bounded resources (issue 3 §6): the duplicate-detection cache, the DTLS session
table and observations stay under their caps, and clients keep being served."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from server_helpers import (
    CLASS_A,
    DeviceSpec,
    Setup,
    ThreadedServer,
    coaps_client,
    get,
    make_image,
    make_setup,
    run,
    threaded_server,
)

from otacoap.server.coap.dedup import BoundedMessageManager, DedupCache

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore:DTLS module did not shut down"),
]

CONFIG = """
[server]
max_dtls_sessions = 3
dedup_max_entries = 20
max_observers_per_device = 2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    s = make_setup(
        tmp_path_factory.mktemp("bounds"),
        devices=[DeviceSpec(f"d{i}") for i in range(6)],
        config=CONFIG,
    )
    s.publish(s.release(CLASS_A, 1, make_image("b", 1500)))
    return s


@pytest.fixture(scope="module")
def server(setup: Setup) -> Iterator[ThreadedServer]:
    with threaded_server(setup.data) as srv:
        yield srv


def _mman(server: ThreadedServer) -> BoundedMessageManager:
    ctx = server.server.context
    assert ctx is not None
    mman = ctx.request_interfaces[0].token_interface
    assert isinstance(mman, BoundedMessageManager)
    return mman


def test_duplicate_cache_is_capped(setup: Setup, server: ThreadedServer) -> None:
    async def go() -> None:
        async with coaps_client(server.port, "d0", setup.devices["d0"].psk) as ctx:
            for _ in range(60):
                assert (await get(ctx, server.uri + "/m")).code == Code.CONTENT

    run(go())
    size, evicted = server.call(lambda: (len(_mman(server).dedup), _mman(server).dedup.evicted))  # type: ignore[misc]
    assert size <= 20 and evicted >= 40


def test_dedup_cache_expires_and_replays_stored_responses() -> None:
    now = [0.0]
    cache = DedupCache(max_entries=3, lifetime=10, clock=lambda: now[0])
    cache.add("a")
    assert cache.lookup("a") == (True, None)
    msg = aiocoap.Message(code=Code.CONTENT, payload=b"r")
    cache.store_response("a", msg)
    assert cache.lookup("a") == (True, msg)
    for key in "bcd":
        cache.add(key)
    assert cache.lookup("a") == (False, None) and cache.evicted == 1
    now[0] = 11
    assert cache.lookup("b") == (False, None) and len(cache) == 0


def test_dtls_session_table_is_capped_and_evicted_peers_come_back(
    setup: Setup, server: ThreadedServer
) -> None:
    async def go() -> list[int]:
        counts = []
        contexts = []
        try:
            for i in range(6):
                ctx = await aiocoap.Context.create_client_context()
                ctx.client_credentials.load_from_dict(
                    {
                        server.uri + "/*": {
                            "dtls": {
                                "psk": {"hex": setup.devices[f"d{i}"].psk.hex()},
                                "client-identity": {"ascii": f"d{i}"},
                            }
                        }
                    }
                )
                contexts.append(ctx)
                r = await get(ctx, server.uri + "/m")
                assert r.code == Code.CONTENT
                counts.append(server.server.dtls.session_count)  # type: ignore[union-attr]
                counts.append(server.server.dtls.unverified_count)  # type: ignore[union-attr]
            # d0 was evicted (told with close_notify); its next request re-handshakes.
            # Both pools (sessions, and peers before the cookie) stay within the cap.
            r = await get(contexts[0], server.uri + "/m", timeout=5)
            assert r.code == Code.CONTENT
            counts.append(server.server.dtls.session_count)  # type: ignore[union-attr]
        finally:
            for ctx in contexts:
                await ctx.shutdown()
        return counts

    counts = run(go())
    assert max(counts) <= 3, counts  # type: ignore[call-overload]


def test_new_devices_get_in_when_the_table_is_full_of_finished_sessions(
    setup: Setup, server: ThreadedServer
) -> None:
    """Three devices finish and stay quiet, filling the table (cap 3); three new ones
    then arrive together. With one pool for both, each newcomer was "half-open" and
    evicted the previous newcomer before its cookie came back, so each had to start
    over (and, with a steady stream of newcomers, none got in at all). Now newcomers
    wait in their own pool and, once their address is proven, push out the least
    recently used finished sessions: no peer is ever admitted twice."""
    admitted: list[Any] = []

    def count_admissions() -> None:
        pool = server.server.dtls._pool  # type: ignore[union-attr]
        make = type(pool)._Address

        def counted(protocol: Any, sockaddr: Any) -> Any:
            admitted.append(sockaddr)
            return make(protocol, sockaddr)

        pool._Address = counted

    async def go() -> list[Code]:
        async with contextlib.AsyncExitStack() as stack:
            for i in range(3):
                ctx = await stack.enter_async_context(
                    coaps_client(server.port, f"d{i}", setup.devices[f"d{i}"].psk)
                )
                assert (await get(ctx, server.uri + "/m")).code == Code.CONTENT
            newcomers = [
                await stack.enter_async_context(
                    coaps_client(server.port, f"d{i}", setup.devices[f"d{i}"].psk)
                )
                for i in range(3, 6)
            ]
            server.call(count_admissions)
            try:
                responses = await asyncio.gather(
                    *(get(ctx, server.uri + "/m", timeout=15) for ctx in newcomers)
                )
            finally:
                server.call(lambda: vars(server.server.dtls._pool).pop("_Address"))  # type: ignore[union-attr]
            return [r.code for r in responses]

    assert run(go()) == [Code.CONTENT] * 3
    assert len(admitted) == len(set(admitted)) >= 3, admitted
    figures = server.call(lambda: server.server.load_figures())  # type: ignore[union-attr]
    assert figures["dropped_full"] >= 3, figures  # type: ignore[index]
    assert figures["dtls_sessions"] <= 3 and figures["dtls_unverified"] <= 3, figures  # type: ignore[index]


def test_idle_sessions_expire_and_their_devices_come_back(
    setup: Setup, server: ThreadedServer
) -> None:
    """A session silent for longer than dtls_idle_timeout is dropped at the next sweep
    (with close_notify), and its device is served again on a new handshake."""

    def pool() -> Any:
        return server.server.dtls._pool  # type: ignore[union-attr]

    async def go() -> tuple[int, Code]:
        async with (
            coaps_client(server.port, "d0", setup.devices["d0"].psk) as quiet,
            coaps_client(server.port, "d1", setup.devices["d1"].psk) as active,
        ):
            assert (await get(quiet, server.uri + "/m")).code == Code.CONTENT
            before = server.call(lambda: pool().dropped["idle"])
            # Five minutes and a bit pass for the server (its clock only; the
            # devices' retransmission timers are untouched).
            skew = pool().idle_timeout + 5
            server.call(lambda: setattr(pool(), "clock", lambda: time.monotonic() + skew))
            server.call(lambda: setattr(pool(), "_next_sweep", 0.0))
            try:
                assert (await get(active, server.uri + "/m")).code == Code.CONTENT
                expired = server.call(lambda: pool().dropped["idle"]) - before  # type: ignore[operator]
                again = (await get(quiet, server.uri + "/m", timeout=10)).code
            finally:
                server.call(lambda: setattr(pool(), "clock", time.monotonic))
            return expired, again  # type: ignore[return-value]

    # Both were silent for 305 s by the server's clock: the sweep that `active`'s
    # datagram triggers drops both, and `active` re-handshakes like `quiet` does.
    expired, again = run(go())
    assert expired >= 2 and again == Code.CONTENT


def test_psk_lookups_are_cached(setup: Setup, server: ThreadedServer) -> None:
    async def go() -> None:
        async with coaps_client(server.port, "d5", setup.devices["d5"].psk) as ctx:
            assert (await get(ctx, server.uri + "/m")).code == Code.CONTENT

    run(go())
    cached = server.call(lambda: set(server.server.view.psks._cache))  # type: ignore[union-attr]
    assert "d5" in cached  # type: ignore[operator]


def test_observations_per_device_are_capped(setup: Setup, server: ThreadedServer) -> None:
    async def go() -> list[int | None]:
        async with coaps_client(server.port, "d1", setup.devices["d1"].psk) as ctx:
            observes = []
            requests = []
            for _ in range(3):
                msg = aiocoap.Message(code=Code.GET, uri=server.uri + "/m", observe=0)
                req = ctx.request(msg, handle_blockwise=False)
                requests.append(req)
                r = await asyncio.wait_for(req.response, 5)
                observes.append(r.opt.observe)
            count = server.call(lambda: server.server.manifest.observer_count)  # type: ignore[union-attr]
            assert count == 2
            for req in requests:
                if req.observation is not None and not req.observation.cancelled:
                    req.observation.cancel()
            return observes

    observes = run(go())
    assert observes == [0, 0, None]


def test_one_server_per_data_dir(setup: Setup, server: ThreadedServer) -> None:
    from otacoap.store.errors import StoreError

    with pytest.raises(StoreError, match="already using"), threaded_server(setup.data):
        pass
