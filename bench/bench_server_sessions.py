"""Server RSS per worker with thousands of DTLS sessions held open (issue 14 §4).

    .venv/bin/python -m bench.bench_server_sessions --sessions 10000 [--seconds 300]
        [--workers 1,2] [--busy 32] [--fixture DIR]

For each `--workers` value in turn: start `otacoap serve` with `max_dtls_sessions`
raised above N, open N real DTLS sessions (PSK handshakes, each from its own UDP source
port, N distinct device identities when the fixture has that many), keep them all alive
while `--busy` of them (default 32) load the server with Block2 requests flat out for
`--seconds` (default 300: five minutes), sample the RSS of every worker, and at the
end check how many sessions still answer without a new handshake.

Clients are bench/leanload.py processes: `--busy` flat-out clients in one, the held
sessions spread over `--session-procs` more (2,500 sockets each by default), each held
session sending one Block2 request every `--keepalive` seconds, below the server's
`dtls_idle_timeout` (300 s), so none is idle-expired. Handshakes are paced
(`--handshaking` in progress at once, all processes together) below the server's
`max_dtls_handshakes` (256), beyond which a newer handshake pushes out an older one.

Prints the RSS series, then per run: sessions requested, established, alive at the
end (answered one more request without a new handshake), handshakes the server
completed (N when no session broke), start / with-N-sessions / max / final RSS per
worker, RSS per session ((RSS with N sessions - RSS before) / N), responses and server
CPU ms per 1000 responses. The goal is <= 150 MB per worker after five minutes.

A fixture of 10,000 devices takes minutes to build (every device added through the CLI
as an operator would): `--fixture DIR` builds it there once and reuses it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/bench_server_sessions.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from .common import PYTHON, ROOT, rss_kib
from .fixture import Fixture, make_fixture, open_fixture
from .leanload import raise_fd_limit
from .targets import (
    Running,
    collect,
    machine,
    process_tree,
    spawn_load,
    start,
    tree_cpu_seconds,
)

TARGET_MB = 150.0
MIB = 1024 * 1024


@dataclass
class Row:
    workers: int
    sessions: int
    established: int = 0
    establish_seconds: float = 0.0
    alive: int = 0
    rehandshaked: int = 0
    server_handshakes: int = 0
    server_sessions: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    start_rss: dict[int, float] = field(default_factory=dict)  # worker pid -> MiB
    held_rss: dict[int, float] = field(default_factory=dict)  # with N sessions, before load
    max_rss: dict[int, float] = field(default_factory=dict)
    final_rss: dict[int, float] = field(default_factory=dict)
    supervisor_rss: float = 0.0
    responses: int = 0
    errors: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    loadgen_rss: float = 0.0  # MiB, largest load process at the end

    @property
    def per_session_kib(self) -> float:
        grown = sum(self.held_rss[p] - self.start_rss[p] for p in self.start_rss)
        return 1024 * grown / self.sessions if self.sessions else 0.0


def worker_pids(srv: Running, workers: int) -> list[int]:
    """The processes that serve: the server itself, or the supervisor's children."""
    tree = process_tree(srv.pid)
    return tree if workers <= 1 else [p for p in tree if p != srv.pid]


def rss_by_pid(pids: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for p in pids:
        with contextlib.suppress(OSError):
            out[p] = rss_kib(p) / 1024
    return out


def configure(fx: Fixture, sessions: int) -> None:
    """config.toml's [server] with the session cap above N (each worker's own cap:
    SO_REUSEPORT does not split the peers evenly)."""
    cap = sessions + sessions // 10 + 64
    (fx.data / "config.toml").write_text(f"[server]\nmax_dtls_sessions = {cap}\n")


def server_stats(fx: Fixture) -> list[dict[str, Any]]:
    """Every server-stats*.json the run wrote (one per worker under --workers N)."""
    out = []
    for path in sorted(fx.data.glob("server-stats*.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out


def clear_stats(fx: Fixture) -> None:
    for path in fx.data.glob("server-stats*.json"):
        path.unlink()


@contextlib.contextmanager
def held_sessions(
    srv: Running, fx: Fixture, args: argparse.Namespace
) -> Iterator[list[subprocess.Popen[str]]]:
    """Start the load processes holding sessions busy..N (they wait for their times)."""
    n_held = args.sessions - args.busy
    procs_n = args.session_procs or max(1, math.ceil(n_held / 2500))
    devices = fx.devices
    slots = [
        [devices[i % len(devices)].identity, devices[i % len(devices)].psk.hex()]
        for i in range(args.busy, args.sessions)
    ]
    block = 16 << 6
    procs = []
    try:
        for i in range(procs_n):
            spec = {
                "host": "127.0.0.1",
                "port": srv.port,
                "secure": True,
                "path": srv.path,
                "szx": 6,
                "blocks": -(-fx.size // block),
                "window": 1,
                "image": str(fx.image),
                "interval": args.keepalive,
                "max_handshaking": max(1, args.handshaking // procs_n),
                "control": True,
                "verify": True,
                "devices": slots[i::procs_n],
            }
            procs.append(
                subprocess.Popen(
                    [PYTHON, "-m", "bench.leanload", json.dumps(spec)],
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_established(procs: list[subprocess.Popen[str]], timeout: float) -> bool:
    """Wait for every session process's `established` line (False: timed out)."""
    pending = {p.stdout.fileno(): p for p in procs if p.stdout is not None}
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        ready, _, _ = select.select(list(pending), [], [], 1.0)
        for fd in ready:
            p = pending[fd]
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"session load process exited ({p.wait()})")
            if json.loads(line).get("event") == "established":
                del pending[fd]
    return not pending


def proc_rss(procs: list[subprocess.Popen[str]]) -> float:
    sizes = []
    for p in procs:
        with contextlib.suppress(OSError):
            sizes.append(rss_kib(p.pid) / 1024)
    return max(sizes, default=0.0)


def run_row(fx: Fixture, workers: int, args: argparse.Namespace) -> Row:
    row = Row(workers, args.sessions)
    configure(fx, args.sessions)
    clear_stats(fx)
    with start("otacoap", "dtls", fx, loop=args.loop, workers=workers if workers > 1 else 0) as srv:
        time.sleep(3.0)
        pids = worker_pids(srv, workers)
        row.start_rss = rss_by_pid(pids)
        print(f"  workers={workers}: start RSS {_fmt(row.start_rss)} MiB", flush=True)
        t0 = time.monotonic()
        with held_sessions(srv, fx, args) as procs:
            done = wait_established(procs, args.establish_timeout)
            row.establish_seconds = time.monotonic() - t0
            print(
                f"  {args.sessions - args.busy} held sessions "
                f"{'established' if done else 'NOT all established'} "
                f"in {row.establish_seconds:.0f} s",
                flush=True,
            )
            time.sleep(3.0)
            row.held_rss = rss_by_pid(pids)
            print(f"  with sessions: RSS {_fmt(row.held_rss)} MiB", flush=True)
            start_at = time.time() + 2.0
            end_at = start_at + args.seconds
            times = json.dumps({"start_at": start_at, "end_at": end_at}) + "\n"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(times)
                p.stdin.flush()
            busy = spawn_load(
                srv, fx, clients=args.busy, start_at=start_at, end_at=end_at, processes=1
            )
            time.sleep(max(0.0, start_at - time.time()))
            c0 = tree_cpu_seconds(srv.pid)
            row.max_rss = dict(row.held_rss)
            next_print = 0.0
            while (now := time.time()) < end_at:
                sample = rss_by_pid(pids)
                for p, mib in sample.items():
                    row.max_rss[p] = max(row.max_rss.get(p, 0.0), mib)
                if now - start_at >= next_print:
                    print(f"  t={now - start_at:5.0f} s  RSS {_fmt(sample)} MiB", flush=True)
                    next_print += args.print_every
                time.sleep(min(args.interval, max(0.0, end_at - time.time())))
            row.server_cpu = tree_cpu_seconds(srv.pid) - c0
            row.final_rss = rss_by_pid(pids)
            for p, mib in row.final_rss.items():
                row.max_rss[p] = max(row.max_rss.get(p, 0.0), mib)
            with contextlib.suppress(OSError):
                row.supervisor_rss = rss_kib(srv.pid) / 1024 if workers > 1 else 0.0
            row.loadgen_rss = proc_rss(procs)
            b = collect(busy, timeout=120)
            held = collect(procs, timeout=300)
        time.sleep(2.5)  # one more stats write (every 2 s)
        stats = server_stats(fx)
    row.responses = int(b["responses"] + held["responses"])
    row.errors = int(b["errors"] + held["errors"])
    row.seconds = b["seconds"]
    row.established = int(held.get("established", 0) + b.get("established", 0))
    row.alive = int(held.get("alive", 0) + b.get("held", 0))
    row.rehandshaked = int(held.get("rehandshaked", 0) + b.get("rehandshaked", 0))
    row.server_handshakes = sum(int(s["handshakes"]["completed"]) for s in stats)
    row.server_sessions = [int(s["dtls"].get("sessions", 0)) for s in stats]
    for s in stats:
        for why, n in s["dtls"].get("dropped", {}).items():
            row.dropped[why] = row.dropped.get(why, 0) + int(n)
    return row


def _fmt(rss: dict[int, float]) -> str:
    return " / ".join(f"{v:.1f}" for v in rss.values())


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print()
    print(
        f"{'workers':>7} {'requested':>9} {'established':>11} {'alive':>6} {'srv hs':>6} "
        f"{'start MiB':>10} {'held MiB':>10} {'max MiB':>10} {'final MiB':>10} "
        f"{'KiB/sess':>8} {'responses':>10} {'errors':>6} {'srv ms/1k':>9} {'<=150 MB':>8}"
    )
    for r in rows:
        worst = max(r.max_rss.values(), default=0.0)
        ok = "yes" if worst * MIB <= TARGET_MB * 1e6 else "no"
        per_k = 1e6 * r.server_cpu / r.responses if r.responses else float("inf")
        print(
            f"{r.workers:>7} {r.sessions:>9} {r.established:>11} {r.alive:>6} "
            f"{r.server_handshakes:>6} {_fmt(r.start_rss):>10} {_fmt(r.held_rss):>10} "
            f"{_fmt(r.max_rss):>10} {_fmt(r.final_rss):>10} {r.per_session_kib:>8.1f} "
            f"{r.responses:>10} {r.errors:>6} {per_k:>9.1f} {ok:>8}"
        )
    print()
    for r in rows:
        rate = (r.sessions - args.busy) / r.establish_seconds if r.establish_seconds else 0.0
        print(
            f"workers={r.workers}: held sessions established in {r.establish_seconds:.0f} s "
            f"({rate:.0f}/s); sessions per worker at the end {r.server_sessions}; "
            f"dropped {r.dropped}; clients that needed a new session {r.rehandshaked}; "
            f"supervisor RSS {r.supervisor_rss:.1f} MiB; largest load process "
            f"{r.loadgen_rss:.0f} MiB; load {r.seconds:.0f} s"
        )
    print(f"uptime: {_uptime()}")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=10000, help="DTLS sessions held open (N)")
    ap.add_argument("--seconds", type=float, default=300.0, help="flat-out load duration")
    ap.add_argument("--busy", type=int, default=32, help="of the N, clients loading flat out")
    ap.add_argument("--workers", default="1,2", help="comma-separated `serve --workers` values")
    ap.add_argument("--keepalive", type=float, default=60.0, help="held session: s per request")
    ap.add_argument("--handshaking", type=int, default=128, help="handshakes in progress at once")
    ap.add_argument("--session-procs", type=int, default=0, help="0: one per 2,500 sessions")
    ap.add_argument("--establish-timeout", type=float, default=900.0)
    ap.add_argument("--interval", type=float, default=5.0, help="RSS sampling interval")
    ap.add_argument("--print-every", type=float, default=30.0)
    ap.add_argument("--image-kib", type=int, default=256)
    ap.add_argument("--fixture", type=Path, help="build the fixture here once, reuse it later")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = ap.parse_args(argv)
    if not 0 < args.busy < args.sessions:
        ap.error("--busy must be between 1 and --sessions - 1")
    raise_fd_limit(args.sessions + 256)
    print(f"machine: {machine()}")
    print(f"uptime: {_uptime()}")
    print(
        f"DTLS, {args.sessions} sessions ({args.busy} flat out, the rest one request every "
        f"{args.keepalive:g} s), image {args.image_kib} KiB in 1024-byte blocks, "
        f"{args.seconds:g} s of load, RSS every {args.interval:g} s"
    )
    rows = []
    with contextlib.ExitStack() as stack:
        if args.fixture is not None and (args.fixture / "devices.json").exists():
            fx = open_fixture(args.fixture)
        else:
            base = args.fixture or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            print(f"building a fixture of {args.sessions} devices in {base} ...", flush=True)
            fx = make_fixture(base, args.sessions, args.image_kib * 1024)
        if len(fx.devices) < args.sessions:
            print(f"note: {len(fx.devices)} devices in the fixture; identities are reused")
        for w in (int(x) for x in args.workers.split(",") if x):
            rows.append(run_row(fx, w, args))
    report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
