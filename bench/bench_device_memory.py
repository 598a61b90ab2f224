"""Device peak memory against image size, lock-step and windowed (tracemalloc).

    .venv/bin/python bench/bench_device_memory.py            # 64 KiB, 1 MiB, 16 MiB
    .venv/bin/python bench/bench_device_memory.py --dtls     # + 1 MiB over real DTLS

What is measured: the tracemalloc peak of one whole update (`DeviceAgent.run_once`:
manifest, download, stage, reboot, trial boot, confirm, reports) above what was
allocated before it, by tests/memory_probe.py, the same code
tests/test_device_memory.py asserts the bound with. The claim under test: the
device holds a bounded number of blocks, so the peak does not grow with the image;
windowed, it holds up to `max_window` blocks plus each outstanding request's state.

Links:
* `in-process`: InProcessTransport, answers at once (the window never has to buffer);
* `jitter`: the same server behind a seeded 0.5 +- 0.5 ms delay per answer, so answers
  overtake each other and the reorder buffer fills up (the windowed worst case);
* `dtls` (--dtls): 1 MiB over real DTLS-PSK on loopback, the H1 honest server in a
  child process, uvloop as the CLI uses (see tests/memory_probe.py for why).

Ratios are against the 64 KiB peak of the same window and link, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from memory_probe import Measured, dtls_update_peak, inprocess_update_peak  # noqa: E402

from bench.common import ForwardingTransport  # noqa: E402
from device_sim.agent import AgentConfig, Outcome  # noqa: E402
from device_sim.fetcher import FetchConfig  # noqa: E402
from device_sim.inprocess import InProcessTransport  # noqa: E402
from device_sim.transport import Response  # noqa: E402

SIZES = {"64 KiB": 64 * 1024, "1 MiB": 1 << 20, "16 MiB": 16 << 20}


class JitterTransport(ForwardingTransport):
    """InProcessTransport whose answers take 0.5 +- 0.5 ms (seeded): they reorder."""

    def __init__(self, inner: InProcessTransport, seed: int) -> None:
        super().__init__(inner)
        self.rng = random.Random(seed)

    async def get(
        self, path: str, *, block2: tuple[int, int, int] | None, timeout: float
    ) -> Response:
        resp = await self.inner.get(path, block2=block2, timeout=timeout)
        await asyncio.sleep(0.001 * self.rng.random())
        return resp


def _updated(m: Measured) -> int:
    if m.result.outcome != Outcome.UPDATED:
        raise RuntimeError(f"update failed: {m.result}")
    return m.peak


def config_for(window: int) -> AgentConfig:
    # Quick timers: the in-process round trip is a millisecond.
    fetch = FetchConfig(max_window=window, rto_initial=0.1, rto_min=0.03, rto_max=0.5)
    return AgentConfig(fetch=fetch)


def inprocess_peak(tmp: Path, size: int, window: int, link: str) -> int:
    def wrap(transport: InProcessTransport) -> object:
        return transport if link == "in-process" else JitterTransport(transport, size)

    return _updated(inprocess_update_peak(tmp, size, config_for(window), wrap))


def dtls_peak(tmp: Path, size: int, window: int) -> int:
    config = AgentConfig(fetch=FetchConfig(max_window=window))
    return _updated(dtls_update_peak(tmp, size, config))


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
