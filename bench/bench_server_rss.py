"""Server RSS under sustained Block2 load over DTLS: otacoap vs stock aiocoap.

    .venv/bin/python -m bench.bench_server_rss [--seconds 300] [--clients 32]

Each target in turn serves the same image to the same clients (bench/leanload.py, flat
out) for `--seconds` (default 300 s, five minutes: longer than RFC 7252's
EXCHANGE_LIFETIME of 247 s, so a per-request cache has reached its plateau); its RSS is
sampled every `--interval` seconds. Prints the series, max and final RSS, responses
served, and the ratio to stock aiocoap measured in the same run. The goal for otacoap
is <= 150 MB after five minutes.

Why stock grows: every request's response is kept for EXCHANGE_LIFETIME in aiocoap's
duplicate-detection cache, with a timer handle each, so its memory follows the request
rate. otacoap answers image blocks without per-request state and caps the cache for
everything else.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/bench_server_rss.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from .fixture import make_fixture
from .targets import (
    collect,
    cpu_seconds,
    machine,
    machine_busy_seconds,
    rss_mib,
    spawn_load,
    start,
    wait_quiet,
)

TARGET_MB = 150.0


@dataclass
class Trace:
    target: str
    start_rss: float = 0.0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)
    responses: int = 0
    errors: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    loadgen_cpu: float = 0.0
    machine_cpu: float = 0.0

    @property
    def max_rss(self) -> float:
        return max((m for _, m in self.samples), default=0.0)

    @property
    def final_rss(self) -> float:
        return self.samples[-1][1] if self.samples else 0.0


def run_one(target: str, fx: object, args: argparse.Namespace) -> Trace:
    trace = Trace(target)
    with start(target, "dtls", fx, loop=args.loop) as srv:  # type: ignore[arg-type]
        trace.start_rss = rss_mib(srv.pid)
        if args.quiet_wait > 0:
            wait_quiet(args.quiet_wait)
        start_at = time.time() + 2.0
        end_at = start_at + args.seconds
        procs = spawn_load(
            srv,
            fx,  # type: ignore[arg-type]
            clients=args.clients,
            start_at=start_at,
            end_at=end_at,
            processes=args.loadgen_procs,
        )
        time.sleep(max(0.0, start_at - time.time()))
        c0, m0 = cpu_seconds(srv.pid), machine_busy_seconds()
        next_print = 0.0
        while (now := time.time()) < end_at:
            t = now - start_at
            mib = rss_mib(srv.pid)
            trace.samples.append((t, mib))
            if t >= next_print:
                print(f"  {target:<8} t={t:6.0f} s  RSS {mib:7.1f} MiB", flush=True)
                next_print += args.print_every
            time.sleep(min(args.interval, max(0.0, end_at - time.time())))
        trace.server_cpu = cpu_seconds(srv.pid) - c0
        trace.machine_cpu = machine_busy_seconds() - m0
        trace.samples.append((time.time() - start_at, rss_mib(srv.pid)))
        r = collect(procs, timeout=60)
        trace.responses, trace.errors, trace.seconds = (
            int(r["responses"]),
            int(r["errors"]),
            r["seconds"],
        )
        trace.loadgen_cpu = r["cpu"]
    return trace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="load per target")
    ap.add_argument("--interval", type=float, default=5.0, help="RSS sampling interval")
    ap.add_argument("--print-every", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--loadgen-procs", type=int, default=1)
    ap.add_argument("--targets", default="otacoap,stock")
    ap.add_argument("--image-kib", type=int, default=256)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="wait for an idle machine")
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    print(f"machine: {machine()}")
    print(
        f"DTLS, {args.clients} clients, image {args.image_kib} KiB in 1024-byte blocks, "
        f"{args.seconds:g} s per target, RSS every {args.interval:g} s"
    )
    traces = []
    with tempfile.TemporaryDirectory(prefix="otacoap-rss-") as tmp:
        fx = make_fixture(Path(tmp), args.clients, args.image_kib * 1024)
        for target in targets:
            traces.append(run_one(target, fx, args))
    stock = next((t for t in traces if t.target == "stock"), None)
    print()
    print(
        f"{'target':<8} {'start MiB':>9} {'max MiB':>8} {'final MiB':>9} {'x stock':>7} "
        f"{'responses':>10} {'resp/s':>8} {'errors':>6} {'srv s/1k':>9} {'srv %':>5} "
        f"{'rest %':>6} {'<=150 MB':>8}"
    )
    for t in traces:
        ratio = f"{t.final_rss / stock.final_rss:.2f}" if stock and stock.final_rss else "-"
        rate = t.responses / t.seconds if t.seconds else 0.0
        per_k = 1000 * t.server_cpu / t.responses if t.responses else float("inf")
        ok = "yes" if t.final_rss * 1.048576 <= TARGET_MB else "no"  # MiB -> MB
        srv = 100 * t.server_cpu / t.seconds if t.seconds else 0.0
        rest = t.machine_cpu - t.server_cpu - t.loadgen_cpu
        rest_pct = 100 * max(0.0, rest) / t.seconds if t.seconds else 0.0
        print(
            f"{t.target:<8} {t.start_rss:>9.1f} {t.max_rss:>8.1f} {t.final_rss:>9.1f} "
            f"{ratio:>7} {t.responses:>10} {rate:>8.0f} {t.errors:>6} {per_k:>9.3f} "
            f"{srv:>5.0f} {rest_pct:>6.0f} {ok:>8}"
        )
    print()
    print(
        "x stock: final RSS relative to stock aiocoap's (lower is better); rest %: CPU "
        "used by neither the server nor the load generator (kernel, other jobs)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
