"""`otacoap serve --workers N`: the command lines of the workers and the parent's run.

The supervisor itself is `otacoap/server/workers.py`; this module only knows how an
`otacoap serve` command line is spelled, so each worker is started as the same command
with its port and index filled in (`--worker I`, hidden: a worker is never started by
hand, and it refuses to run without its parent holding the data directory's lock).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..config import Config
from ..store import DataDir

if TYPE_CHECKING:
    from ..server.app import ServeOptions

# Like `python -m otacoap` (the package has no __main__): the entry point, by import.
_ENTRY = "import sys; from otacoap.cli import main; sys.exit(main())"


def add_worker_options(p: argparse.ArgumentParser, workers_help: str) -> None:
    p.add_argument("--workers", type=_workers, default="auto", metavar="N|auto", help=workers_help)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)


def _workers(text: str) -> int:
    from ..server.workers import default_workers

    if text == "auto":
        return default_workers()
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', not {text!r}") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"expected 1 to 256 workers, not {n}")
    return n


def worker_command(args: argparse.Namespace, datadir: DataDir, config: Config) -> list[str]:
    """`otacoap serve` as this command line asked for it, minus what differs per worker."""
    cmd = [sys.executable, "-c", _ENTRY]
    if args.verbose:
        cmd.append("-" + "v" * min(args.verbose, 2))
    cmd += ["serve", "--data", str(datadir.root), "--bind", config.server.bind]
    cmd += ["--loop", config.server.loop, "--log-format", config.monitoring.log_format]
    if args.insecure_plain_coap:
        cmd.append("--insecure-plain-coap")
    if args.insecure_plain_identity:
        cmd += ["--insecure-plain-identity", args.insecure_plain_identity]
    return cmd


def run_workers(
    args: argparse.Namespace, datadir: DataDir, config: Config, options: ServeOptions
) -> int:
    """The parent of `serve --workers N` (config: the command line's overrides applied)."""
    plain_port = args.plain_port
    if args.insecure_plain_coap and plain_port is None and config.server.port:
        plain_port = options.plain_port_for(config.server.port)
    from .. import eventloop
    from ..server.app import clean_uploads, default_logging, lock_datadir, mark_supervisor
    from ..server.workers import Supervisor

    base = worker_command(args, datadir, config)

    def command(index: int, port: int, plain: int | None, metrics: str | None) -> list[str]:
        cmd = [*base, "--port", str(port), "--worker", str(index)]
        if plain is not None and args.insecure_plain_coap:
            cmd += ["--plain-port", str(plain)]
        if metrics is not None:
            cmd += ["--metrics", metrics]
        return cmd

    default_logging(config.monitoring.log_format, "supervisor")
    datadir.check()
    datadir.open_store().close()  # migrations and a bad [store] url: once, here
    lock = lock_datadir(datadir)
    try:
        mark_supervisor(lock)
        clean_uploads(datadir)
        supervisor = Supervisor(
            args.workers,
            command,
            bind=config.server.bind,
            port=config.server.port,
            plain_port=plain_port,
            metrics=config.monitoring.metrics_bind or None,
        )
        return eventloop.run(supervisor.run(), config.server.loop)
    finally:
        lock.close()
