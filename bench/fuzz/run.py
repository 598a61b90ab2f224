"""Run one fuzz harness under atheris (libFuzzer, coverage-guided); one process per harness.

    python -m bench.fuzz.run NAME [--corpus DIR] [libFuzzer flags, e.g. -runs=100000
        -max_total_time=60 -artifact_prefix=crashes/]

The otacoap and device_sim modules are imported under atheris' bytecode
instrumentation, so libFuzzer sees their branch coverage. The harness's seeds
(bench.fuzz.harnesses) are written to the corpus directory first. An input that makes
the harness raise anything outside its typed error tree is a crash: libFuzzer writes
it to `<artifact_prefix>crash-<sha1>` and the process exits non-zero. At the end
libFuzzer prints "Done N runs in S second(s)" (parsed by bench/bench_fuzz.py).
libFuzzer ends the process itself (it calls exit()), hence one process per harness.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import atheris  # type: ignore[import-untyped]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--corpus", type=Path, default=None, help="corpus directory (kept)")
    args, libfuzzer = parser.parse_known_args(argv)

    with atheris.instrument_imports(include=["otacoap", "device_sim"]):
        from otacoap.core import (  # noqa: F401 -- instrumented before harnesses import them
            block2_responder,
            cbor,
            report,
            suit,
            trust,
        )

        from . import harnesses

    harness = harnesses.HARNESSES.get(args.name)
    if harness is None:
        sys.exit(f"unknown harness {args.name!r}; one of {', '.join(harnesses.HARNESSES)}")
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.name}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in harness.seeds():
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)

    def one_input(data: bytes) -> None:
        harness.one(data)

    atheris.Setup([sys.argv[0], *libfuzzer, str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
