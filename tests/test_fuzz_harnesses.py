"""The fuzz harnesses run, briefly, in every test run (ATTACKS.md #43, issue 10 §8).

Every parser that takes outside bytes (strict CBOR, envelope decode, the trust gate,
the report codec, the server's Block1/Block2 option handling, the device's state
records) answers or refuses with its typed error tree, never anything else. The long,
coverage-guided run is `python -m bench.bench_fuzz` (figures in bench/RESULTS.md); here:

- every seed of every harness, and a deterministic batch of mutations of them, in
  process (so a regression names its input in the assertion);
- each harness under atheris for a bounded run: at most RUNS executions *and* at most
  SECONDS seconds per harness, so the whole file stays well under a minute even on a
  loaded machine.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fuzz.harnesses import HARNESSES, Harness

ROOT = Path(__file__).resolve().parent.parent
RUNS = 20_000
SECONDS = 2  # per harness, libFuzzer's -max_total_time
MUTATIONS = 300


def _mutations(seeds: list[bytes], rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(MUTATIONS):
        s = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if s and op < 0.5:
                s[rng.randrange(len(s))] = rng.randrange(256)
            elif s and op < 0.7:
                del s[rng.randrange(len(s))]
            else:
                s.insert(rng.randrange(len(s) + 1), rng.randrange(256))
        out.append(bytes(s))
    return out


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_seeds_and_mutations_answer_or_refuse_with_the_typed_error(name: str) -> None:
    harness: Harness = HARNESSES[name]
    seeds = harness.seeds()
    assert seeds, "every harness has seeds"
    refused = 0
    for data in [*seeds, *_mutations(seeds, random.Random(name))]:
        try:
            refused += harness.one(data)
        except Exception as exc:  # pragma: no cover - the failure message
            raise AssertionError(f"{name}: {type(exc).__name__} on {data.hex()}") from exc
    if harness.errors:
        assert refused > 0, "the mutations reach the refusals"


def test_the_harness_families_cover_every_target() -> None:
    families = {h.family for h in HARNESSES.values()}
    assert families == {"cbor", "envelope", "trust", "report", "options", "state"}


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_a_bounded_atheris_run_finds_no_crash(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    cmd = [
        sys.executable,
        "-m",
        "bench.fuzz.run",
        name,
        "--corpus",
        str(tmp_path / "corpus"),
        f"-runs={RUNS}",
        f"-max_total_time={SECONDS}",
        "-timeout=20",
        f"-artifact_prefix={tmp_path}/",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, (
        f"{name}: exit {proc.returncode}, {crashes}\n{proc.stderr[-3000:]}"
    )
    assert "Done " in proc.stderr, proc.stderr[-2000:]
