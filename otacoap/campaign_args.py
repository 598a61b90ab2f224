"""The policy options of `otacoap campaign create`, in one home.

`otacoap campaign create` adds them to its parser, and the fleet simulator's
`--campaign "OPTIONS"` parses its string with exactly the same definitions (through
`device_sim/fleet/operator_role.py`), so both accept the same options, values and
defaults and refuse the same mistakes with the same words. A layer of its own (not
in otacoap/cli, which nothing imports): only argparse, the shared value types and the
campaign rules (no server, no store).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from typing import Any

from .cliargs import CliError, Parser, positive_float_type, positive_int
from .core import campaign as rules
from .core.campaign import CampaignError, Policy, Target, WaveSize


def core_type(parse: Any) -> Any:
    """A core parser as an argparse type (its CampaignError becomes a usage error)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except CampaignError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """--target, --waves and the policy options of a campaign."""
    p.add_argument(
        "--target",
        type=core_type(rules.parse_target),
        default=rules.Target(),
        metavar="all|KEY=VALUE,...,DEVICE,...",
        help="devices of the class: all (default), those with every tag given, and/or "
        "only the device ids listed",
    )
    p.add_argument(
        "--waves",
        type=core_type(rules.parse_waves),
        default=rules.parse_waves("1%,10%,50%,100%"),
        metavar="W1,W2,...",
        help="cumulative wave sizes, percentages or counts (default 1%%,10%%,50%%,100%%)",
    )
    p.add_argument(
        "--success-threshold",
        type=core_type(rules.parse_share),
        default=0.95,
        metavar="SHARE",
        help="share of a wave that must confirm before the next opens (default 95%%)",
    )
    p.add_argument(
        "--failure-threshold",
        type=core_type(rules.parse_share),
        default=0.1,
        metavar="SHARE",
        help="share of a wave failed/reverted/rejected/timed out that halts (default 10%%)",
    )
    p.add_argument(
        "--soak",
        type=core_type(rules.parse_duration),
        default=0.0,
        metavar="DURATION",
        help="wait after a wave reaches its threshold (e.g. 30m; default 0)",
    )
    p.add_argument(
        "--approve", action="store_true", help="each next wave waits for 'campaign approve'"
    )
    p.add_argument(
        "--timeout",
        type=core_type(rules.parse_duration),
        default=3600.0,
        metavar="DURATION",
        help="a device admitted that long without confirming counts as failed (default 1h)",
    )
    p.add_argument(
        "--window",
        type=core_type(rules.parse_window),
        metavar="HH:MM-HH:MM",
        help="UTC maintenance window in which devices are admitted",
    )
    p.add_argument("--urgent", action="store_true", help="security patch: ignore windows and soak")
    p.add_argument(
        "--max-downloads",
        type=positive_int,
        metavar="N",
        help="at most N devices admitted and not yet done at once (the others keep "
        "their release until a slot frees: network-aware pacing)",
    )
    p.add_argument(
        "--block-rate",
        type=positive_float_type("block-rate"),
        metavar="BLOCKS/S",
        help="firmware block budget of this release's image (a constrained cell or "
        "mesh): the server admits one device at a time while the measured rate is below "
        "it (only a running server admits such a campaign's devices)",
    )


def policy_from_args(args: argparse.Namespace) -> Policy:
    """The Policy the parsed options describe (CliError with one line if it cannot be)."""
    if args.timeout <= 0:
        raise CliError("--timeout must be positive")
    try:
        return Policy(
            success_threshold=args.success_threshold,
            failure_threshold=args.failure_threshold,
            soak=args.soak,
            approve=args.approve,
            timeout=args.timeout,
            window=args.window,
            urgent=args.urgent,
            max_downloads=args.max_downloads,
            block_rate=args.block_rate,
        )
    except CampaignError as exc:
        raise CliError(str(exc)) from None


@dataclass(frozen=True)
class CampaignPlan:
    """A campaign to create, as `campaign create`'s options describe it."""

    target: Target
    waves: tuple[WaveSize, ...]
    policy: Policy


class _Refusal(Exception):
    pass


class _StringParser(Parser):
    """Raises instead of printing usage and exiting: the caller words the refusal."""

    def error(self, message: str) -> Any:
        raise _Refusal(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise _Refusal(message or "help is not available here")


def parse_plan(text: str) -> CampaignPlan:
    """`campaign create`'s options in one string ("--waves 1%,10%,100% ..."): the plan.

    Raises CliError with one line (the option's own message) on any mistake.
    """
    parser = _StringParser(prog="campaign options", add_help=False)
    add_policy_arguments(parser)
    try:
        words = shlex.split(text)
        args = parser.parse_args(words)
    except (_Refusal, ValueError) as exc:
        raise CliError(f"campaign options: {str(exc).strip()}") from None
    return CampaignPlan(args.target, tuple(args.waves), policy_from_args(args))
