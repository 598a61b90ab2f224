"""Profile `otacoap serve`'s per-datagram path under the Block2 DTLS load.

    .venv/bin/python -m bench.profile_server [--clients 8] [--seconds 10] [--top 30]
    .venv/bin/python -m bench.profile_server --perf   # perf's view: C, Python, kernel

The server runs `otacoap.cli.main(["serve", ...])` under cProfile in a child process
(SIGTERM stops it cleanly, so the profile is written); the lean load generator
(bench/leanload.py) drives it exactly as bench_block2_throughput does. Prints the
server's CPU seconds per 1,000 responses (cProfile inflates it, about 2x: compare
runs of this script with each other, the throughput bench for absolute figures) and
the top functions by own time. With `--perf` the server runs without cProfile and
`perf record` samples it instead: the split between tinydtls (C), the interpreter and
the kernel's socket work, which cProfile cannot see.
"""

from __future__ import annotations

import argparse
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/profile_server.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from .common import PYTHON, ROOT, free_udp_port
from .fixture import make_fixture
from .targets import Running, collect, cpu_seconds, spawn_load

_SERVE = (
    "import cProfile, sys\n"
    "from otacoap.cli import main\n"
    "p = cProfile.Profile()\n"
    "code = p.runcall(main, sys.argv[2:])\n"
    "p.dump_stats(sys.argv[1])\n"
    "sys.exit(code)\n"
)
_PLAIN = "import sys\nfrom otacoap.cli import main\nsys.exit(main(sys.argv[2:]))\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--perf", action="store_true", help="perf record instead of cProfile")
    ap.add_argument("--out", type=Path, help="keep the profile (cProfile stats or perf.data)")
    args = ap.parse_args(argv)
    if args.perf and shutil.which("perf") is None:
        raise SystemExit("perf is not installed")
    with tempfile.TemporaryDirectory(prefix="otacoap-prof-") as tmp:
        fx = make_fixture(Path(tmp), args.clients, 256 * 1024)
        out = args.out or Path(tmp) / ("perf.data" if args.perf else "server.prof")
        port = free_udp_port()
        # One process (the default is one per core): the pid profiled is the one serving.
        serve = [
            *("serve", "--data", str(fx.data), "--bind", "127.0.0.1", "--port", str(port)),
            *("--workers", "1"),
        ]
        serve += ["--loop", args.loop]
        script = _PLAIN if args.perf else _SERVE
        proc = subprocess.Popen(
            [PYTHON, "-c", script, str(out), *serve],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                break
        else:
            raise SystemExit("server did not start")
        srv = Running(
            "otacoap",
            "dtls",
            proc.pid,
            port,
            fx.image_path,
            tuple((d.identity, d.psk) for d in fx.devices),
        )
        start_at = time.time() + 1.0 + args.warmup
        end_at = start_at + args.seconds
        load = spawn_load(
            srv, fx, clients=args.clients, start_at=start_at, end_at=end_at, window=args.window
        )
        time.sleep(max(0.0, start_at - time.time()))
        c0 = cpu_seconds(proc.pid)
        recorder = None
        if args.perf:
            recorder = subprocess.Popen(
                ["perf", "record", "-q", "-g", "-o", str(out), "-p", str(proc.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(max(0.0, end_at - time.time()))
        c1 = cpu_seconds(proc.pid)
        if recorder is not None:
            recorder.terminate()
            recorder.wait(timeout=60)
        r = collect(load, timeout=args.seconds + args.warmup + 60)
        proc.terminate()
        proc.communicate(timeout=60)
        responses = int(r["responses"])
        per_k = 1000 * (c1 - c0) / responses if responses else float("inf")
        print(
            f"{responses} responses in {r['seconds']:.1f} s ({responses / r['seconds']:.0f}/s), "
            f"{int(r['errors'])} errors; server CPU {c1 - c0:.2f} s = {per_k:.4f} s per 1,000"
        )
        if args.perf:
            subprocess.run(
                [
                    *("perf", "report", "-i", str(out), "--no-children", "--sort", "dso,sym"),
                    *("--stdio", "-g", "none", "--percent-limit", "0.3"),
                ],
                check=False,
            )
        else:
            stats = pstats.Stats(str(out))
            stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
