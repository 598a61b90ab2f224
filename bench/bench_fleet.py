"""Fleet-scale updates: 1,000 and 10,000 simulated devices, 64 KiB image, one server.

What it measures: time for a whole fleet to update (each device's flash verified and
its "confirmed" report in the server's store, see device_sim.fleet) and the success
rate, with the real server (`otacoap serve`, uvloop, DTLS-PSK) and the real device
agents over loopback.

The ratio printed is against a baseline measured in the same run on the same
machine: a 100-device fleet with the same image, concurrency and processes.

    per-device ratio = (run time of N devices / N) / (run time of 100 devices / 100)

1.00 means the fleet scales linearly (each device costs the same however many there
are); above 1 the per-device cost grows with the fleet (server state, DB, session
churn), below 1 the larger fleet amortises its ramp-up and tail better. "Run time" is
the update phase only (from the moment the first device may start until the last one
is verified); registration and provisioning are reported separately as setup.

Usage:
    .venv/bin/python -m bench.bench_fleet                     # 100 (baseline), 1000
    .venv/bin/python -m bench.bench_fleet --sizes 1000,10000 --processes 2
    .venv/bin/python -m bench.bench_fleet --sizes 10000 --processes 2 --workers 2 --postgres

`--workers N` runs `otacoap serve --workers N` (issue 14 §2): a supervising parent and
N worker processes on one port. "server MiB" is then the peak RSS of the largest worker
(each is a whole server; the parent serves nothing), and "server CPU s" the CPU of the
parent and every worker over the update phase. `--postgres` starts a throwaway
PostgreSQL the way the test suite does (tests/pg_server.py: Debian's server binaries,
a temporary directory, an unprivileged user, a Unix socket only) and initialises the
data directory on it (`otacoap init --store postgresql://...`); "pg CPU s" is the CPU
of its postmaster and backends over the same phase.

The server runs with its default `max_dtls_sessions` (256) unless `--max-sessions`
says otherwise: finished devices' sessions are pushed out by newcomers once the table
is full (otacoap/server/coap/dtls_pool.py). Before that fix the table livelocked (a
10,000-device run stalled at 4,106 devices with a 4,096 cap) and this bench had to
raise the cap above the whole fleet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otacoap.cli import main as otacoap_main

from .common import PYTHON, ROOT, free_udp_port, rss_kib, running
from .targets import process_tree, tree_cpu_seconds

BASELINE = 100
OTACOAP_CMD = [PYTHON, "-c", "import sys; from otacoap.cli import main; sys.exit(main())"]


def _otacoap(*args: str | Path) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = otacoap_main([str(a) for a in args])
    if code != 0:
        raise RuntimeError(f"otacoap {' '.join(map(str, args))}: {err.getvalue()}")
    return out.getvalue()


def make_data_dir(
    base: Path, max_sessions: int | None, store_url: str | None = None
) -> tuple[Path, Path]:
    """`otacoap init` (on PostgreSQL if `store_url`), a larger dedup cache, an author key
    the server trusts."""
    data = base / "data"
    _otacoap("init", data, *(("--store", store_url) if store_url else ()))
    # Only the keys we change; everything else keeps its default.
    sessions = "" if max_sessions is None else f"max_dtls_sessions = {max_sessions}\n"
    store = f'\n[store]\nurl = "{store_url}"\n' if store_url else ""
    (data / "config.toml").write_text(f"[server]\n{sessions}dedup_max_entries = 16384\n{store}")
    _otacoap("keygen", "--alg", "es256", "--out", base / "author")
    _otacoap("trust", "add", "--data", data, base / "author.pub")
    return data, base / "author"


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


class PeakRss:
    """Peak resident memory of a process tree, sampled once a second (Linux /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            total, todo = 0, [self.pid]
            while todo:
                pid = todo.pop()
                with contextlib.suppress(OSError, ValueError):
                    total += rss_kib(pid)
                todo += _children(pid)
            self.peak_kib = max(self.peak_kib, total)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Result:
    devices: int
    summary: dict[str, Any]
    setup_seconds: float
    total_seconds: float
    fleet_rss_mib: float
    server_rss_mib: float  # with workers: the largest worker's peak
    server_cpu: float  # parent + workers, over the whole fleet run (setup and update)
    pg_cpu: float | None  # the PostgreSQL cluster's, same window; None: SQLite

    @property
    def run_seconds(self) -> float:
        return float(self.summary["wall_seconds"])

    @property
    def per_device(self) -> float:
        return self.run_seconds / self.devices


def _largest_rss_kib(pid: int) -> int:
    """RSS of the largest process in `pid`'s tree: the server itself, or with
    `--workers N` its largest worker (the parent serves nothing and stays small)."""
    sizes = [0]
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            sizes.append(rss_kib(p))
    return max(sizes)


def _cpu(pid: int | None) -> float:
    return 0.0 if pid is None else tree_cpu_seconds(pid)


def run_fleet(
    args: argparse.Namespace,
    uri: str,
    data: Path,
    key: Path,
    n: int,
    server_pid: int,
    out: Path,
    pg_pid: int | None = None,
) -> Result:
    report = out / f"fleet-{n}.json"
    cmd = [
        PYTHON, "-m", "device_sim.fleet", "--server", uri, "--data", str(data),
        "--key", str(key), "--devices", str(n), "--image-size", str(args.image_size),
        "--concurrency", str(args.concurrency), "--processes", str(args.processes),
        "--timeout", str(args.timeout), "--seed", "1", "--json",
        "--report", str(report), "--plot", str(out / f"fleet-{n}.png"),
    ]  # fmt: skip
    if args.loss:
        cmd += ["--loss", str(args.loss)]
    if args.progress:
        cmd.append("--progress")
    start = time.monotonic()
    server_peak = 0
    cpu0, pg0 = _cpu(server_pid), _cpu(pg_pid)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    with PeakRss(proc.pid) as fleet_rss:
        # stdout is one JSON line (progress goes to stderr), so the pipe cannot fill.
        while proc.poll() is None:
            server_peak = max(server_peak, _largest_rss_kib(server_pid))
            time.sleep(1.0)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
    total = time.monotonic() - start
    server_cpu, pg_cpu = _cpu(server_pid) - cpu0, _cpu(pg_pid) - pg0
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"fleet of {n} failed with exit {proc.returncode}: {stdout}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    full = json.loads(report.read_text())
    return Result(
        n,
        summary,
        float(full["settings"]["setup_seconds"]),
        total,
        fleet_rss.peak_kib / 1024,
        server_peak / 1024,
        server_cpu,
        None if pg_pid is None else pg_cpu,
    )


@contextlib.contextmanager
def server(data: Path, workers: int = 1) -> Iterator[tuple[str, int]]:
    port = free_udp_port()
    # --workers 1: one process, measured by its pid; N: the parent, measured with its
    # workers (/proc/PID/task/*/children).
    cmd = [*OTACOAP_CMD, "serve", "--data", str(data), "--port", str(port)]
    cmd += ["--workers", str(workers)]
    with running(cmd, ready_text="listening on", timeout=60 + 30 * workers) as proc:
        yield f"coaps://127.0.0.1:{port}", proc.pid


@contextlib.contextmanager
def postgres() -> Iterator[tuple[str, int | None]]:
    """A throwaway PostgreSQL (tests/pg_server.py, reused as is): a fresh database's
    URL and the postmaster's pid (for its CPU; None if it cannot be read)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import pg_server  # tests/pg_server.py

    if pg_server.find_pg_bin() is None:
        raise SystemExit(
            "bench_fleet --postgres: PostgreSQL server binaries (initdb, pg_ctl) not found; "
            "run scripts/bootstrap.sh as root"
        )
    with pg_server.running_server() as pg:
        pid: int | None = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((pg.data / "postmaster.pid").read_text().split()[0])
        yield pg.new_database(), pid


def _fmt(v: float | None, unit: str = "s") -> str:
    return "-" if v is None else f"{v:.1f} {unit}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000", help="fleet sizes after the 100 baseline")
    p.add_argument("--image-size", type=int, default=64 * 1024)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="per-device deadline")
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument(
        "--max-sessions",
        type=int,
        help="server max_dtls_sessions (default: the server's default, 256)",
    )
    p.add_argument("--workers", type=int, default=1, help="otacoap serve --workers N (default 1)")
    p.add_argument(
        "--postgres",
        action="store_true",
        help="store on a throwaway PostgreSQL started like tests/pg_server.py (default: SQLite)",
    )
    p.add_argument("--out", type=Path, help="keep reports and plots here")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    sizes = [BASELINE] + [int(s) for s in args.sizes.split(",") if s.strip()]

    base = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    out = args.out or base / "out"
    out.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    try:
        sessions = args.max_sessions
        with contextlib.ExitStack() as stack:
            url, pg_pid = stack.enter_context(postgres()) if args.postgres else (None, None)
            data, key = make_data_dir(base, sessions, url)
            uri, pid = stack.enter_context(server(data, args.workers))
            for n in sizes:
                r = run_fleet(args, uri, data, key, n, pid, out, pg_pid)
                results.append(r)
                s = r.summary
                print(
                    f"{n:>6} devices: {s['completed']}/{n} updated "
                    f"({s['success_rate']:.2%}), run {r.run_seconds:.1f} s, setup "
                    f"{r.setup_seconds:.1f} s, p50/p95/p99 {_fmt(s['p50_seconds'])}/"
                    f"{_fmt(s['p95_seconds'])}/{_fmt(s['p99_seconds'])}, "
                    f"{s['blocks_per_second']:,.0f} blocks/s",
                    flush=True,
                )
                # the server (and PostgreSQL) stop when the ExitStack closes
    finally:
        if args.out is None:
            shutil.rmtree(base, ignore_errors=True)

    baseline = results[0]
    print()
    cap = sessions or "default (256)"
    print(
        f"image {args.image_size} B, concurrency {args.concurrency}, processes "
        f"{args.processes}, loss {args.loss}, server max_dtls_sessions {cap}, "
        f"store {'PostgreSQL' if args.postgres else 'SQLite'}, server workers {args.workers}"
    )
    print(
        f"{'devices':>8} {'success':>8} {'run s':>8} {'setup s':>8} {'ms/device':>10} "
        f"{'ratio':>6} {'blocks/s':>9} {'upd p50':>8} {'fleet MiB':>10} {'server MiB':>10} "
        f"{'server CPU s':>12} {'pg CPU s':>8}"
    )
    for r in results:
        s = r.summary
        ratio = r.per_device / baseline.per_device
        print(
            f"{r.devices:>8} {s['success_rate']:>8.2%} {r.run_seconds:>8.1f} "
            f"{r.setup_seconds:>8.1f} {1000 * r.per_device:>10.1f} {ratio:>6.2f} "
            f"{s['blocks_per_second']:>9,.0f} {s['update_p50_seconds'] or 0:>8.2f} "
            f"{r.fleet_rss_mib:>10.0f} {r.server_rss_mib:>10.0f} "
            f"{r.server_cpu:>12.1f} {'-' if r.pg_cpu is None else f'{r.pg_cpu:.1f}':>8}"
        )
    print(
        f"ratio = (run time / devices) / (same for the {BASELINE}-device baseline of this "
        "run): 1.00 = linear scaling, > 1 = each device costs more in a larger fleet"
    )
    print(
        "server MiB: peak RSS of the server process (with workers: of the largest worker); "
        "server CPU s, pg CPU s: over the whole fleet run, setup included"
    )
    return 0 if all(r.summary["success_rate"] == 1.0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
