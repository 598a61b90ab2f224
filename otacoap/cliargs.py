"""The argparse pieces every command line of the project shares.

`otacoap` (otacoap.cli), `python -m device_sim` (device_sim.cli) and
`python -m device_sim.fleet` (also the `fleet` subcommand of the former) promise the
same things: a usage error is one line on stderr and exit 2, a refusal by the command
itself is a CliError (one line, exit 1), and a bad option value is refused by argparse
with a message naming the limit. Keeping the parser class, the error and the value
types here means the command lines cannot drift apart; each command still decides its
own limits (e.g. the fleet caps image sizes, provisioning does not) by parameter.

A leaf module like otacoap.eventloop: it imports nothing of otacoap, so the device
simulator (which may import only otacoap.core of the operator's side) can use it too.

Secrets come in one way for every command: `add_psk_options` and `read_psk` (a file,
standard input or an environment variable; `--psk HEX` still works but warns).

The messages are user-visible and kept exactly as they were when each command had
its own copy; where two commands worded a refusal differently, both wordings stay.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

T = TypeVar("T")

EXIT_USAGE = 2

_KIB = 1024
_MIB = 1024 * 1024


class CliError(Exception):
    """A refusal by a command itself (bad argument combination, unreadable file, ...)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line plus a pointer to --help, exit 2.

    The stock error() prints the whole usage block first; our commands promise one
    line on stderr per refusal, which scripts and the tests rely on.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- integers


def whole_number(text: str) -> int:
    """Any int; the common first step of the bounded integer types."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def positive_int(text: str) -> int:
    """A count that must be at least 1 (devices, workers, attempts, ...)."""
    value = whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def size_type(limit: int | None = None) -> Callable[[str], int]:
    """A byte-count type: plain, or with a K/M suffix (powers of two), at least 1.

    With `limit` the value must also be at most `limit` bytes (the fleet's images must
    fit what the server accepts); without it only positivity is checked (flash
    geometry is checked later, by the layout code, with a better message).
    """

    def size(text: str) -> int:
        t = text.strip().upper().removesuffix("B").removesuffix("I")
        mult = 1
        if t.endswith("K"):
            mult, t = _KIB, t[:-1]
        elif t.endswith("M"):
            mult, t = _MIB, t[:-1]
        try:
            value = int(t) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
        if limit is None:
            if value <= 0:
                raise argparse.ArgumentTypeError("size must be positive")
        elif not 0 < value <= limit:
            raise argparse.ArgumentTypeError(f"size must be 1..{limit} bytes")
        return value

    return size


# --------------------------------------------------------------------------- floats


def _parse_float(text: str, noun: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {noun}: {text!r}") from None


def finite_float(text: str) -> float:
    """Any finite float: "nan" and "inf" parse as floats but are never a sane setting."""
    value = _parse_float(text, "number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be finite")
    return value


def probability(text: str) -> float:
    """A per-datagram probability in [0, 1] (loss, duplication, reordering)."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability must be in [0, 1], not {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite value >= 0, such as a delay in milliseconds (0 = none)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def positive_float_type(noun: str) -> Callable[[str], float]:
    """A type for a finite value > 0 whose refusal names it ("{noun} must be positive")."""

    def positive_float(text: str) -> float:
        value = finite_float(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{noun} must be positive")
        return value

    return positive_float


def positive_seconds(text: str) -> float:
    """A finite duration > 0, worded as `python -m device_sim run` has always worded it."""
    value = _parse_float(text, "number of seconds")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError("seconds must be a positive finite number")
    return value


def window_type(max_window: int) -> Callable[[str], int]:
    """A Block2 window: 1 (RFC 7959 lock-step) up to `max_window`."""

    def parse(text: str) -> int:
        value = whole_number(text)
        if not 1 <= value <= max_window:
            raise argparse.ArgumentTypeError(f"window must be 1..{max_window}")
        return value

    return parse


def add_block2_arguments(
    group: argparse._ActionsContainer,
    *,
    max_window: int,
    window_default: int,
    who: str,
    window_help: str,
) -> None:
    """`--block-size` and `--window`, declared once for the device and the fleet CLIs
    (only their defaults and wording differ). Block sizes: RFC 7959 §2.2 (SZX 0..6)."""
    group.add_argument(
        "--block-size",
        type=int,
        choices=[16, 32, 64, 128, 256, 512, 1024],
        default=1024,
        help=f"Block2 size {who} for (default 1024)",
    )
    group.add_argument(
        "--window",
        type=window_type(max_window),
        default=window_default,
        metavar="N",
        help=window_help,
    )


def read_small_file(path: str | Path, cap: int) -> bytes:
    """A file's bytes, refusing a missing file or one over `cap` bytes without reading
    it all; the ValueError's text is the one-line message the commands print."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    with open(p, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"{path}: larger than {cap} bytes")
    return data


def maybe_hex(data: bytes) -> bytes:
    """Key and envelope files may hold hex text (as the other tools print them) or
    raw bytes; hex is decoded, anything else is returned as it is."""
    text = data.strip()
    if text and all(c in b"0123456789abcdefABCDEF\r\n\t " for c in text):
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
    return data


# --------------------------------------------------------------------------- secrets

PSK_ENV = "OTACOAP_PSK"
"""The PSK of `otacoap device add`, `otacoap operator add` and `device_sim provision`."""
OPERATOR_PSK_ENV = "OTACOAP_OPERATOR_PSK"
"""The operator's own PSK for `otacoap publish --server` (a different secret from the
ones it registers, so it has its own name: one exported variable cannot leak into the
other command)."""
MAX_PSK_FILE = 4096
PSK_WARNING = "--psk exposes the key in the process list; use --psk-file or {env}"


def add_psk_options(parser: argparse.ArgumentParser, *, env: str, what: str) -> None:
    """--psk-file FILE and --psk HEX for a command that also reads `env`.

    A PSK on the command line shows in `ps`, /proc/PID/cmdline and shell history; a
    file (or standard input, `-`) or an environment variable does not, so those are
    the sources the help offers first.
    """
    parser.add_argument(
        "--psk-file",
        metavar="FILE",
        help=f"read {what} from FILE, as hex ('-': standard input); or set ${env} "
        "(--psk-file wins over it)",
    )
    parser.add_argument(
        "--psk",
        metavar="HEX",
        help=f"{what} as hex on the command line: visible to every local user in ps and "
        f"kept in shell history; prefer --psk-file or ${env} (still accepted, with a warning)",
    )


def read_psk(
    args: argparse.Namespace, env: str, parse: Callable[[str], T], *, what: str = "PSK"
) -> T | None:
    """The PSK from --psk-file, --psk or `env` (in that order), parsed; None if none.

    `parse` turns the hex text into the key and raises with a one-line message when it
    cannot; the message is prefixed with where the text came from (never the text).
    Giving both options is refused; --psk works but warns on stderr (after the
    command has run: see `warn_after`).
    """
    psk_file, psk_hex = getattr(args, "psk_file", None), getattr(args, "psk", None)
    if psk_file and psk_hex:
        raise CliError("give the PSK once: --psk-file or --psk, not both")
    if psk_file:
        origin = "standard input" if psk_file == "-" else f"--psk-file {psk_file}"
        text = _read_secret_text(psk_file)
    elif psk_hex:
        warn_after(args, PSK_WARNING.format(env=env))
        origin, text = "--psk", psk_hex
    elif os.environ.get(env):
        origin, text = f"${env}", os.environ[env]
    else:
        return None
    try:
        return parse(text.strip())
    except Exception as exc:  # the parser's own refusal, one line by contract
        raise CliError(f"{what} from {origin}: {exc}") from None


def warn_after(args: argparse.Namespace, message: str) -> None:
    """Queue a warning for `print_warnings`, which the entry point calls once the
    handler has returned. A refusal stays exactly one line on stderr (the promise of
    every command line here); the warning comes with every run that was not refused."""
    args.__dict__.setdefault("_warnings", []).append(message)


def print_warnings(args: argparse.Namespace, prog: str) -> None:
    for message in args.__dict__.get("_warnings", ()):
        print(f"{prog}: warning: {message}", file=sys.stderr)


def _read_secret_text(path: str) -> str:
    if path == "-":
        data = sys.stdin.read(MAX_PSK_FILE + 1)
    else:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                data = f.read(MAX_PSK_FILE + 1)
        except FileNotFoundError:
            raise CliError(f"--psk-file {path}: no such file") from None
        except IsADirectoryError:
            raise CliError(f"--psk-file {path}: is a directory") from None
        except PermissionError:
            raise CliError(f"--psk-file {path}: permission denied") from None
    if len(data) > MAX_PSK_FILE:
        raise CliError(f"--psk-file {path}: larger than {MAX_PSK_FILE} bytes (not a PSK file)")
    return data
