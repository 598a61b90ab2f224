"""The long fuzz run (ATTACKS.md #43, issue 10 §8): every harness under atheris.

    python -m bench.bench_fuzz [--executions N] [--max-seconds S] [--only NAME ...]
        [--workdir DIR] [--json]

Each harness of bench.fuzz.harnesses runs in its own process (`python -m
bench.fuzz.run NAME -runs=N -max_total_time=S`), one after the other, so the figures
do not depend on how many cores are free. Per harness it reports the executions
libFuzzer counted, the wall time, the rate, the corpus it grew, and the crashes: an
input that raised outside the harness's typed error tree, saved under
<workdir>/<name>/crash-* for replay (`python -m bench.fuzz.run NAME <file>`).

The goal stated in bench/RESULTS.md is at least one million executions per harness
family with zero crashes; the defaults run one million per harness, bounded by
--max-seconds per harness.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .fuzz.harnesses import HARNESSES

ROOT = Path(__file__).resolve().parent.parent
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_NEW = re.compile(r"stat::new_units_added:\s*(\d+)")


@dataclass
class Outcome:
    name: str
    family: str
    executions: int
    seconds: float
    new_units: int
    crashes: int
    exit_code: int

    @property
    def rate(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0


def run_one(name: str, executions: int, max_seconds: int, workdir: Path) -> Outcome:
    """Fuzz one harness in a child process; never raises for a crash, counts it."""
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.fuzz.run",
        name,
        "--corpus",
        str(out / "corpus"),
        f"-runs={executions}",
        f"-max_total_time={max_seconds}",
        "-timeout=30",  # one input running 30 s is a hang: a finding too
        "-rss_limit_mb=2048",
        f"-artifact_prefix={out}/",
        "-print_final_stats=1",
    ]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=max_seconds + 300, check=False
    )
    seconds = time.monotonic() - start
    (out / "libfuzzer.log").write_text(proc.stderr + proc.stdout)
    log = proc.stderr + proc.stdout
    m = _EXECUTED.search(log) or _DONE.search(log)
    new = _NEW.search(log)
    crashes = len(list(out.glob("crash-*"))) + len(list(out.glob("timeout-*")))
    crashes += len(list(out.glob("oom-*")))
    return Outcome(
        name,
        HARNESSES[name].family,
        int(m.group(1)) if m else 0,
        round(seconds, 1),
        int(new.group(1)) if new else 0,
        crashes,
        proc.returncode,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=1_000_000, help="per harness")
    parser.add_argument("--max-seconds", type=int, default=600, help="per harness")
    parser.add_argument("--only", nargs="*", choices=sorted(HARNESSES), default=None)
    parser.add_argument("--workdir", type=Path, default=Path("fuzz-work"))
    parser.add_argument("--json", action="store_true", help="one JSON object per harness")
    args = parser.parse_args(argv)
    if args.executions < 1 or args.max_seconds < 1:
        parser.error("--executions and --max-seconds must be positive")
    names = args.only or list(HARNESSES)
    outcomes = []
    for name in names:
        o = run_one(name, args.executions, args.max_seconds, args.workdir.resolve())
        outcomes.append(o)
        if args.json:
            print(json.dumps({**asdict(o), "rate": round(o.rate)}), flush=True)
        else:
            print(
                f"{o.name:14} {o.family:9} {o.executions:>10} execs {o.seconds:>7.1f} s "
                f"{o.rate:>8.0f}/s  +{o.new_units} units  crashes {o.crashes}"
                f"  (exit {o.exit_code})",
                flush=True,
            )
    families: dict[str, int] = {}
    for o in outcomes:
        families[o.family] = families.get(o.family, 0) + o.executions
    if not args.json:
        print("per family: " + ", ".join(f"{f} {n}" for f, n in families.items()))
    return 1 if any(o.crashes or o.exit_code for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
