"""Device peak memory against image size, lock-step and windowed (tracemalloc).

    .venv/bin/python bench/bench_device_memory.py            # 64 KiB, 1 MiB, 16 MiB
    .venv/bin/python bench/bench_device_memory.py --dtls     # + 1 MiB over real DTLS

What is measured: the tracemalloc peak of one whole update (`DeviceAgent.run_once`:
manifest, download, stage, reboot, trial boot, confirm, reports) above what was
allocated before it, measured the way tests/test_device_memory.py does (free lists
filled first, the server outside the traced allocations). The claim under test: the
device holds a bounded number of blocks, so the peak does not grow with the image;
windowed, it holds up to `max_window` blocks plus each outstanding request's state.

Links:
* `in-process`: InProcessTransport, answers at once (the window never has to buffer);
* `jitter`: the same server behind a seeded 0.5 +- 0.5 ms delay per answer, so answers
  overtake each other and the reorder buffer fills up (the windowed worst case);
* `dtls` (--dtls): 1 MiB over real DTLS-PSK on loopback, the H1 honest server in a
  child process, uvloop as the CLI uses (see test_device_memory.py for why).

Ratios are against the 64 KiB peak of the same window and link, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import random
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from evil_server import free_udp_port, make_rig, manifest_bytes, release, sign  # noqa: E402

from device_sim.agent import AgentConfig, DeviceAgent, Outcome  # noqa: E402
from device_sim.fetcher import FetchConfig  # noqa: E402
from device_sim.firmware import make_image  # noqa: E402
from device_sim.inprocess import GeneratedImage, InProcessServer, InProcessTransport  # noqa: E402
from device_sim.transport import Response  # noqa: E402
from otacoap.core import ids  # noqa: E402

SIZES = {"64 KiB": 64 * 1024, "1 MiB": 1 << 20, "16 MiB": 16 << 20}


class JitterTransport:
    """InProcessTransport whose answers take 0.5 +- 0.5 ms (seeded): they reorder."""

    def __init__(self, server: InProcessServer, seed: int) -> None:
        self.inner = InProcessTransport(server)
        self.rng = random.Random(seed)

    @property
    def base_uri(self) -> str:
        return self.inner.base_uri

    async def get(
        self, path: str, *, block2: tuple[int, int, int] | None, timeout: float
    ) -> Response:
        resp = await self.inner.get(path, block2=block2, timeout=timeout)
        await asyncio.sleep(0.001 * self.rng.random())
        return resp

    async def post(
        self, path: str, payload: bytes, *, content_format: int, timeout: float
    ) -> Response:
        return await self.inner.post(path, payload, content_format=content_format, timeout=timeout)

    async def observe(self, path: str) -> AsyncIterator[Response]:
        async for note in self.inner.observe(path):
            yield note

    async def reset(self) -> None:
        await self.inner.reset()

    async def close(self) -> None:
        await self.inner.close()


def _fill_free_lists() -> None:
    junk = [tuple(range(n)) for n in range(1, 20) for _ in range(2100)]
    junk.clear()


async def _measure(device: DeviceAgent, warm_up: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
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
    return peak, result


def config_for(window: int) -> AgentConfig:
    # Quick timers: the in-process round trip is a millisecond.
    fetch = FetchConfig(max_window=window, rto_initial=0.1, rto_min=0.03, rto_max=0.5)
    return AgentConfig(fetch=fetch)


def inprocess_peak(tmp: Path, size: int, window: int, link: str) -> int:
    rig = make_rig(tmp, slot_size=size + 4096)
    image = GeneratedImage(size, seed=size)
    server = InProcessServer(
        envelope=sign(manifest_bytes(digest=image.digest, size=size, seq=6), rig.key)
    )
    server.add_image(ids.image_uri(image.digest), image)
    transport: Any = (
        InProcessTransport(server) if link == "in-process" else JitterTransport(server, size)
    )
    device = DeviceAgent(
        rig.path, "coaps://in-process", config=config_for(window), transport=transport
    )

    async def go() -> int:
        try:
            peak, result = await _measure(device, lambda: asyncio.sleep(0))
        finally:
            await device.close()
        if result.outcome != Outcome.UPDATED:
            raise RuntimeError(f"update failed: {result}")
        return peak

    return asyncio.run(go())


def dtls_peak(tmp: Path, size: int, window: int) -> int:
    import uvloop

    rig = make_rig(tmp, slot_size=size + 4096)
    image = make_image(size, version=6)
    envelope, _ = release(rig.key, image, 6)
    (tmp / "env").write_bytes(envelope)
    (tmp / "img").write_bytes(image)
    port = free_udp_port()
    path = ids.image_uri(hashlib.sha256(image).digest())
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "evil_server.py"),
            str(port),
            str(tmp / "env"),
            f"{path}={tmp / 'img'}",
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError("H1 server did not start")
        fetch = FetchConfig(max_window=window)
        device = DeviceAgent(rig.path, f"coaps://127.0.0.1:{port}", config=AgentConfig(fetch=fetch))

        async def go() -> tuple[int, Any]:
            async def warm_up() -> None:
                assert device.agent is not None
                await device.agent.fetch_envelope()

            try:
                return await _measure(device, warm_up)
            finally:
                await device.close()

        peak, result = uvloop.run(go())
    finally:
        server.terminate()
        server.wait(timeout=10)
    if result.outcome != Outcome.UPDATED:
        raise RuntimeError(f"update failed: {result}")
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=8, help="max window of the windowed runs")
    parser.add_argument("--dtls", action="store_true", help="also 1 MiB over real DTLS")
    args = parser.parse_args(argv)
    print(f"{'link':<11} {'W':>2} " + " ".join(f"{name:>18}" for name in SIZES))
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmpdir:
        tmp = Path(tmpdir)
        rows = [("in-process", 1), ("in-process", args.window), ("jitter", args.window)]
        for link, window in rows:
            peaks = []
            for name, size in SIZES.items():
                where = tmp / f"{link}-{window}-{name.replace(' ', '')}"
                where.mkdir()
                peaks.append(inprocess_peak(where, size, window, link))
            cells = [f"{p:>8} B x{p / peaks[0]:5.2f}" for p in peaks]
            print(f"{link:<11} {window:>2} " + " ".join(f"{c:>18}" for c in cells), flush=True)
        if args.dtls:
            dtls = []
            for window in (1, args.window):
                where = tmp / f"dtls-{window}"
                where.mkdir()
                dtls.append(dtls_peak(where, 1 << 20, window))
                print(f"{'dtls 1 MiB':<11} {window:>2} {dtls[-1]:>8} B", flush=True)
            print(f"dtls 1 MiB: W={args.window} / W=1 peak = {dtls[1] / dtls[0]:.2f}")
    print("(x: ratio to the 64 KiB peak of the same row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
