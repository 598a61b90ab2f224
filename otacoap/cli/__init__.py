"""The operator's command line: `otacoap <command> ...`.

Every command module registers its subcommands through `register(subparsers)`; each
handler returns an exit code. All refusals end here as one line on stderr and a
non-zero exit (never a traceback): OtaError and CliError carry a human message,
OSError says which file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cliargs import CliError, Parser, print_warnings
from ..core.errors import OtaError


def build_parser() -> argparse.ArgumentParser:
    from . import anchor_cmds, campaign_cmds, manifest_cmds, server_cmds, stats_cmds, status_cmds

    parser = Parser(
        prog="otacoap",
        description=(
            "Secure over-the-air updates for constrained devices: SUIT manifests and "
            "block-wise firmware over CoAP/DTLS."
        ),
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)"
    )
    parser.add_argument("--version", action="version", version=f"otacoap {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    manifest_cmds.register(sub)
    server_cmds.register(sub)
    anchor_cmds.register(sub)
    campaign_cmds.register(sub)
    stats_cmds.register(sub)
    status_cmds.register(sub)
    return parser


def _version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    try:
        return importlib.metadata.version("otacoap")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports every command module: a Ctrl-C may land here
    except KeyboardInterrupt:
        return 130
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.handler(args) or 0)
        print_warnings(args, _prog(args))
        return code
    except (OtaError, CliError) as exc:
        _fail(args, str(exc))
    except sqlite3.Error as exc:
        # Damage found after the store opened (a truncated file fails page by page).
        from ..store.sqlite import explain_sqlite_error

        _fail(args, explain_sqlite_error(Path(getattr(args, "data", "") or "store"), exc))
    except BrokenPipeError:
        # A reader such as `head` went away: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except FileNotFoundError as exc:
        _fail(args, f"{exc.filename}: no such file")
    except PermissionError as exc:
        _fail(args, f"{exc.filename}: permission denied")
    except IsADirectoryError as exc:
        _fail(args, f"{exc.filename}: is a directory")
    except OSError as exc:
        _fail(args, f"{getattr(exc, 'filename', None) or ''} {exc.strerror or exc}".strip())
    except KeyboardInterrupt:
        return 130
    return 1


def _prog(args: argparse.Namespace) -> str:
    return "otacoap " + " ".join(getattr(args, "_cmd_path", [args.command]))


def _fail(args: argparse.Namespace, message: str) -> None:
    print(f"{_prog(args)}: error: {message}", file=sys.stderr)
    if os.environ.get("OTACOAP_TRACEBACK"):
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
