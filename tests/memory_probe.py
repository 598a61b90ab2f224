"""The device's peak memory during one whole update, measured one way for the test
that asserts the bound (test_device_memory.py) and the bench that reports it
(bench/bench_device_memory.py).

What is measured: the tracemalloc peak of `DeviceAgent.run_once` (manifest, download,
stage, reboot, trial boot, confirm, reports) above what was allocated before it, with
this hygiene, each for a reason:
* CPython's free lists are filled before tracing starts: memory parked on a free list
  stays attributed to its first allocation site, so a free list filling up during the
  run would look like growth;
* over DTLS, the server (H1, evil_server.py) runs in a child process, so only the
  device's allocations count, and the device runs on uvloop (as the CLI does):
  asyncio's selector transport calls recvfrom with a 256 KiB Python buffer for every
  datagram, which tracemalloc would report as a transient that is not the agent's;
* over DTLS the aiocoap context and the DTLS session are up before tracing starts;
* in process, the update runs on virtual time (`VirtualTimeLoop`): the loop's clock
  moves only when every task waits, by exactly as much as the next timer needs. The
  windowed fetcher's retransmission timers run on the loop's clock (tens of ms in the
  tests), so on a busy machine a real clock let the scheduler's pauses fire them: every
  block of the window was asked again while its first request stayed alive (by design,
  for a strong RTT sample), a few KiB of request state each. Bounded by the window, but
  a longer transfer met more such pauses, so the peak looked as if it grew with the
  image. On virtual time the order of events is the seeded link's, whatever the load,
  and a growth of the peak can only come from the code.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import selectors
import subprocess
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evil_server import Rig, free_udp_port, make_rig, manifest_bytes, release, sign

from device_sim.agent import AgentConfig, DeviceAgent, RunResult
from device_sim.firmware import make_image
from device_sim.inprocess import GeneratedImage, InProcessServer, InProcessTransport
from otacoap import eventloop
from otacoap.core import ids

HERE = Path(__file__).resolve().parent


@dataclass
class Measured:
    peak: int  # bytes above the allocations before the update
    result: RunResult
    rig: Rig
    image_digest: bytes
    buffered: int = 0  # most blocks the fetcher held out of order (windowed)


class _VirtualSelector:
    """The loop's selector, except that waiting for a timer advances virtual time.

    Ready file descriptors (the loop's self-pipe) are still polled, without blocking;
    a wait with no timer at all (nothing scheduled, only I/O could wake the loop) is a
    real one, as an in-process update never does that except when it is stuck.
    """

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._inner = inner
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        events = self._inner.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            return self._inner.select(None)
        self._loop.virtual_now += timeout
        return []

    def __getattr__(self, name: str) -> Any:  # register, unregister, close, get_map
        return getattr(self._inner, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual (see the module docstring for why)."""

    def __init__(self) -> None:
        super().__init__()
        self.virtual_now = 0.0
        inner: selectors.BaseSelector = self._selector  # type: ignore[has-type]
        self._selector = _VirtualSelector(inner, self)

    def time(self) -> float:
        return self.virtual_now


class LoopClock:
    """The device's injected clock (deadline, watchdog, backoff) on the loop's time, so
    that it agrees with the fetcher's timers on a VirtualTimeLoop."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


def _fill_free_lists() -> None:
    junk = [tuple(range(n)) for n in range(1, 20) for _ in range(2100)]
    junk.clear()


async def _measure(
    device: DeviceAgent, warm_up: Callable[[], Awaitable[Any]]
) -> tuple[int, Any, int]:
    device.power_on()
    await warm_up()
    gc.collect()
    _fill_free_lists()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = await device.run_once()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    fetcher = device.agent.last_fetcher if device.agent else None
    return peak, result, fetcher.peak_buffered if fetcher else 0


def inprocess_update_peak(
    tmp: Path,
    size: int,
    config: AgentConfig | None = None,
    wrap: Callable[[InProcessTransport], Any] = lambda transport: transport,
) -> Measured:
    """One update of a generated `size`-byte image through InProcessTransport (which
    `wrap` may put behind something, e.g. a jittered link), on virtual time."""
    rig = make_rig(tmp, slot_size=size + 4096)
    image = GeneratedImage(size, seed=size)
    server = InProcessServer(
        envelope=sign(manifest_bytes(digest=image.digest, size=size, seq=6), rig.key)
    )
    server.add_image(ids.image_uri(image.digest), image)
    device = DeviceAgent(
        rig.path,
        "coaps://in-process",
        config=config or AgentConfig(),
        clock=LoopClock(),
        transport=wrap(InProcessTransport(server)),
    )

    async def go() -> tuple[int, Any, int]:
        try:
            return await _measure(device, lambda: asyncio.sleep(0))
        finally:
            await device.close()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        peak, result, buffered = runner.run(go())
    return Measured(peak, result, rig, image.digest, buffered)


def dtls_update_peak(tmp: Path, size: int, config: AgentConfig | None = None) -> Measured:
    """One update of a `size`-byte image over real DTLS-PSK on loopback."""

    rig = make_rig(tmp, slot_size=size + 4096)
    image = make_image(size, version=6)
    envelope, _ = release(rig.key, image, 6)
    (tmp / "env").write_bytes(envelope)
    (tmp / "img").write_bytes(image)
    port = free_udp_port()
    path = ids.image_uri(hashlib.sha256(image).digest())
    server = subprocess.Popen(
        [sys.executable, str(HERE / "evil_server.py"), str(port), str(tmp / "env"),
         f"{path}={tmp / 'img'}"],
        stdout=subprocess.PIPE,
        cwd=HERE.parent,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError("H1 server did not start")
        device = DeviceAgent(rig.path, f"coaps://127.0.0.1:{port}", config=config or AgentConfig())

        async def go() -> tuple[int, Any, int]:
            async def warm_up() -> None:
                assert device.agent is not None
                await device.agent.fetch_envelope()

            try:
                return await _measure(device, warm_up)
            finally:
                await device.close()

        peak, result, buffered = eventloop.run(go())
    finally:
        server.terminate()
        server.wait(timeout=10)
    return Measured(peak, result, rig, hashlib.sha256(image).digest(), buffered)
