"""Throughput against `serve --workers N` when every worker has the same CPU budget.

    .venv/bin/python -m bench.bench_worker_scaling [--workers 1,2,3] [--cpu 0.3]
        [--clients 32] [--seconds 8] [--repeat 2] [--libcoap]

Why a budget: on a machine with few cores the load generator needs a core of its own,
so N workers uncapped only compete with it for the same two cores and "throughput
grows with workers" cannot show (bench/RESULTS.md, "With two workers"). Here each
worker process is put in a cgroup of its own whose CFS quota is `--cpu` of one core
(cgroup v1 `cpu.cfs_quota_us` or v2 `cpu.max`, 10 ms period): each worker stands for
a core of that size, and N workers together may use N × `--cpu` cores while the load
generator keeps the rest. If throughput grows about N-fold, the workers share the
port's load (SO_REUSEPORT) and add their capacity, which is what more cores would
give; the bound column says whether the workers (their budget spent) or something
else limited the row.

The baseline is the one-worker row of the same run. `--libcoap` adds libcoap's
`coap-server` under the same one-core budget: what one budget buys each server.
Needs root (cgroups); benchmarks only, never the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python bench/bench_worker_scaling.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from .fixture import Fixture, make_fixture
from .targets import (
    LoadResult,
    Running,
    cpu_seconds,
    libcoap_available,
    machine,
    measure,
    process_tree,
    start,
)

PERIOD_US = 10_000  # a short CFS period: a throttled worker pauses ms, not 100 ms
V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")


def _cgroup_root() -> tuple[Path, bool]:
    """(where to make cgroups, whether it is cgroup v2)."""
    if (V1 / "cpu.cfs_quota_us").exists():
        return V1, False
    if "cpu" in (V2 / "cgroup.controllers").read_text(errors="replace").split():
        return V2, True
    raise SystemExit("no cgroup CPU controller (v1 cpu or v2 cpu.max) on this machine")


@contextlib.contextmanager
def cpu_budget(pids: list[int], cores: float) -> Iterator[None]:
    """Each of `pids` in a cgroup of its own, limited to `cores` of one core."""
    root, v2 = _cgroup_root()
    quota = max(1000, int(cores * PERIOD_US))
    made: list[Path] = []
    try:
        for pid in pids:
            group = root / f"otacoap-bench-{os.getpid()}-{pid}"
            group.mkdir()
            made.append(group)
            if v2:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))
        yield
    except PermissionError as e:
        raise SystemExit(f"cannot set a CPU budget ({e.filename}): run as root") from None
    finally:
        for group in made:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    (root / "cgroup.procs").write_text(pid)
            for _ in range(50):  # rmdir fails while a task is still leaving
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def serving_pids(srv: Running, workers: int) -> list[int]:
    """The processes that answer: with workers, the children (the parent serves
    nothing); else the one process."""
    if not workers:
        return [srv.pid]
    deadline = time.monotonic() + 30
    while True:
        children = process_tree(srv.pid)[1:]
        if len(children) >= workers or time.monotonic() > deadline:
            return children


def busiest_fraction(pids: list[int], before: dict[int, float], seconds: float) -> float:
    """The busiest serving process's CPU over the window, as a fraction of one core."""
    return max(
        ((cpu_seconds(p) - before.get(p, 0.0)) / seconds for p in pids if p in before),
        default=0.0,
    )


@dataclass(frozen=True)
class Row:
    label: str
    workers: int
    result: LoadResult
    busiest: float  # the busiest serving process, fraction of one core


def _measure(target: str, workers: int, cores: float, fx: Fixture, args: argparse.Namespace) -> Row:
    tries = []
    for _ in range(args.repeat):
        with start(target, "dtls", fx, "uvloop", workers) as srv:
            pids = serving_pids(srv, workers)
            with cpu_budget(pids, cores):
                before = {p: cpu_seconds(p) for p in pids}
                t0 = time.monotonic()
                r = measure(
                    srv,
                    fx,
                    clients=args.clients,
                    seconds=args.seconds,
                    warmup=args.warmup,
                    quiet_wait=args.quiet_wait,
                )
                busiest = busiest_fraction(pids, before, time.monotonic() - t0)
        label = f"{target} ({workers or 1} × {cores:g} core)"
        tries.append(Row(label, workers or 1, r, busiest))
    return max(tries, key=lambda row: row.result.rate)


def _bound(row: Row, cores: float) -> str:
    r = row.result
    lg = r.loadgen_cpu / r.seconds if r.seconds else 0.0
    if row.busiest >= 0.9 * cores:
        return "budget"  # the workers spent what they were given: the intended bound
    if lg >= 0.9:
        return "loadgen"
    return "other"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2,3", help="comma-separated worker counts")
    ap.add_argument("--cpu", type=float, default=0.3, help="each worker's budget, cores")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=2, help="keep the best of this many")
    ap.add_argument("--quiet-wait", type=float, default=10.0)
    ap.add_argument("--libcoap", action="store_true", help="also libcoap at the same budget")
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.workers.split(",") if x]
    except ValueError:
        raise SystemExit(f"--workers: not a list of numbers: {args.workers!r}") from None
    if not counts or min(counts) < 1 or not 0.05 <= args.cpu <= 1.0:
        raise SystemExit("--workers wants counts >= 1 and --cpu a budget in 0.05-1.0")
    if args.libcoap and not libcoap_available():
        raise SystemExit("--libcoap: coap-server-openssl is not installed")
    _cgroup_root()  # fail early, before building the fixture

    print(f"machine: {machine()}")
    print(
        f"{args.clients} DTLS clients (bench/leanload.py, window 1), 1024-byte blocks, "
        f"{args.seconds:g} s measured after {args.warmup:g} s, best of {args.repeat}; "
        f"each worker capped at {args.cpu:g} core ({PERIOD_US // 1000} ms CFS period)"
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="otacoap-scaling-") as tmp:
        fx = make_fixture(Path(tmp), args.clients, 256 * 1024)
        for n in counts:
            # `serve --workers 1` is one process with no parent: the budget is its own.
            rows.append(_measure("otacoap", n if n > 1 else 0, args.cpu, fx, args))
            print(f"  {_line(rows[-1], rows[0], args.cpu)}", flush=True)
        if args.libcoap:
            rows.append(_measure("libcoap", 0, args.cpu, fx, args))
            print(f"  {_line(rows[-1], rows[0], args.cpu)}", flush=True)
    print()
    print(HEADER)
    print("-" * len(HEADER))
    for row in rows:
        print(_line(row, rows[0], args.cpu))
    print()
    print(
        "x 1 worker: resp/s against the one-worker row; ideal: the worker count. "
        "busiest %: the busiest serving process's CPU (its budget is the cap); "
        "bound 'budget': the workers spent their budget, as intended."
    )
    return 0


HEADER = (
    f"{'target':<28} {'resp/s':>8} {'x 1 worker':>10} {'errors':>6} {'srv ms/1k':>9} "
    f"{'busiest %':>9} {'lg %':>5} {'rest %':>6} {'bound':<7}"
)


def _line(row: Row, base: Row, cores: float) -> str:
    r = row.result
    per_k = 1e6 * r.server_cpu / r.responses if r.responses else float("inf")  # µs = ms/1k
    ratio = r.rate / base.result.rate if base.result.rate else 0.0
    return (
        f"{row.label:<28} {r.rate:>8.0f} {ratio:>10.2f} {r.errors:>6} {per_k:>9.1f} "
        f"{100 * row.busiest:>9.0f} {100 * r.loadgen_cpu / r.seconds:>5.0f} "
        f"{100 * r.rest_cpu / r.seconds:>6.0f} {_bound(row, cores):<7}"
    )


if __name__ == "__main__":
    sys.exit(main())
