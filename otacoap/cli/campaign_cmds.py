"""`otacoap campaign ...`, `otacoap device tag|untag` and `otacoap release rebuild`.

Rollout campaigns (issue 11): the rules are otacoap/core/campaign.py's, the state is
in the store (otacoap/store/campaigns.py). Every command works on the data directory
(`--data`), like the other store commands; a running server shares the file and
notices the changes through its store poll.

Commands that read a campaign (`show`, `watch`, `list`) first evaluate the active
campaigns once (`Store.tick_campaigns`), so what they print is current even when no
server is running; the server evaluates after every report and every second anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..campaign_args import add_policy_arguments, core_type, policy_from_args
from ..cliargs import CliError, positive_int, positive_seconds
from ..core import campaign as rules
from ..core.build import rebuild_envelope
from ..core.campaign import ACTIVE_STATES
from ..fsutil import atomic_write
from ..store import ReleaseRecord, SQLiteStore
from ..store.campaigns import campaign_dict, status_dict
from ..store.models import CampaignRecord, CampaignStatus
from .manifest_cmds import load_signing_key
from .server_cmds import _CLI_ACTOR, _common, _datadir, _store

_arg = core_type  # the tag options below parse with the same wrapper


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = _common()
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = sub.add_parser("campaign", help="staged rollouts of a release (waves, thresholds)")
    c = p.add_subparsers(dest="campaign_command", metavar="SUBCOMMAND", parser_class=type(p))
    c.required = True

    p = c.add_parser(
        "create",
        parents=[common, out],
        help="roll a release out in waves",
        description="Start a campaign for RELEASE (CLASS:SEQ as 'release list' shows it; "
        "CLASS may be the class info alone when unambiguous). Its first wave opens at "
        "once. Publish the release with 'publish --rollout none' first so that only the "
        "campaign hands it out.",
    )
    p.add_argument("release", metavar="CLASS:SEQ")
    add_policy_arguments(p)
    p.set_defaults(handler=cmd_create, _cmd_path=["campaign", "create"])

    p = c.add_parser("list", parents=[common, out], help="list campaigns")
    p.add_argument("--active", action="store_true", help="only running, paused or halted ones")
    p.set_defaults(handler=cmd_list, _cmd_path=["campaign", "list"])

    p = c.add_parser("show", parents=[common, out], help="one campaign, per wave")
    p.add_argument("id", type=positive_int, metavar="ID")
    p.add_argument("--members", action="store_true", help="list every member too")
    p.set_defaults(handler=cmd_show, _cmd_path=["campaign", "show"])

    p = c.add_parser(
        "watch",
        parents=[common, out],
        help="show progress per wave until the campaign ends or halts",
        description="Print the campaign's progress every --interval seconds; exit when it "
        "is finished, halted or cancelled (exit 0, or 3 when halted), after --count "
        "prints, or on Ctrl-C.",
    )
    p.add_argument("id", type=positive_int, metavar="ID")
    p.add_argument("--interval", type=positive_seconds, default=2.0, metavar="S")
    p.add_argument("--count", type=positive_int, metavar="N", help="stop after N prints")
    p.set_defaults(handler=cmd_watch, _cmd_path=["campaign", "watch"])

    for name, help_text in (
        ("pause", "stop admitting devices (admitted ones continue)"),
        ("resume", "continue a paused or halted campaign (its failures so far acknowledged)"),
        ("cancel", "end it: nobody more is admitted; updated devices stay updated"),
        ("approve", "let the next wave open (campaigns created with --approve)"),
    ):
        p = c.add_parser(name, parents=[common, out], help=help_text)
        p.add_argument("id", type=positive_int, metavar="ID")
        p.set_defaults(handler=cmd_transition, _cmd_path=["campaign", name], _verb=name)


def register_device_tags(
    d: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    """`device tag ID KEY=VALUE...` and `device untag ID KEY...` (campaign targets)."""
    p = d.add_parser("tag", parents=[common], help="set tags (campaign targets select by them)")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("tags", nargs="+", type=_arg(rules.parse_tag), metavar="KEY=VALUE")
    p.set_defaults(handler=cmd_device_tag, _cmd_path=["device", "tag"])
    p = d.add_parser("untag", parents=[common], help="remove tags")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("keys", nargs="+", type=_arg(rules.check_tag_key), metavar="KEY")
    p.set_defaults(handler=cmd_device_untag, _cmd_path=["device", "untag"])


def register_release_rebuild(
    r: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    p = r.add_parser(
        "rebuild",
        parents=[common],
        help="a new signed envelope for an older release's image (rollback)",
        description="SUIT forbids going back to a lower sequence number, so a rollback "
        "is a new release: write a new envelope for CLASS:SEQ's image with sequence "
        "number --seq, signed with --key, and a copy of the image; publish both "
        "('publish --rollout none OUT IMAGE-OUT') and roll them out with a campaign.",
    )
    p.add_argument("release", metavar="CLASS:SEQ")
    p.add_argument("--seq", required=True, type=positive_int, metavar="NEW")
    p.add_argument("--key", required=True, metavar="AUTHOR.pem", help="signing key (PEM)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="the new envelope")
    p.add_argument("--image-out", metavar="FILE", help="where to copy the image (default: OUT.bin)")
    p.set_defaults(handler=cmd_release_rebuild, _cmd_path=["release", "rebuild"])


# --------------------------------------------------------------------------- helpers


def find_release(store: SQLiteStore, text: str) -> ReleaseRecord:
    """CLASS:SEQ, CLASS being a class label as `release list` prints it or, when only
    one class has it, its class info (the part after '/')."""
    label, sep, seq_text = text.rpartition(":")
    if not sep or not label:
        raise CliError(f"{text!r}: expected CLASS:SEQ (see 'otacoap release list --all')")
    try:
        seq = int(seq_text)
    except ValueError:
        raise CliError(f"{text!r}: {seq_text!r} is not a sequence number") from None
    found = [
        r
        for r in store.list_releases(current_only=False)
        if r.sequence_number == seq
        and (r.class_label == label or r.class_label.rpartition("/")[2] == label)
    ]
    exact = [r for r in found if r.class_label == label]
    if exact:
        return exact[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise CliError(f"no release {text!r} (see 'otacoap release list --all')")
    raise CliError(f"{text!r} is ambiguous: give the class label (vendor/class)")


def _summary_line(c: CampaignRecord) -> str:
    return (
        f"campaign {c.id}  {c.class_label} seq {c.sequence_number}  {c.state}  "
        f"wave {c.progress.opened}/{c.progress.wave_count}  target {c.target}  "
        f"waves {rules.format_waves(c.waves)}"
    )


def _print_status(s: CampaignStatus, members: bool) -> None:
    c = s.campaign
    print(_summary_line(c))
    pol = c.policy
    extras = [
        f"success {pol.success_threshold:.0%}",
        f"failure {pol.failure_threshold:.0%}",
        f"timeout {rules.format_duration(pol.timeout)}",
    ]
    if pol.soak:
        extras.append(f"soak {rules.format_duration(pol.soak)}")
    if pol.approve:
        extras.append(f"approve (approved through wave {c.progress.approved})")
    if pol.window:
        extras.append(f"window {pol.window} UTC")
    if pol.urgent:
        extras.append("urgent")
    if pol.max_downloads:
        extras.append(f"max-downloads {pol.max_downloads}")
    if pol.block_rate:
        extras.append(f"block-rate {pol.block_rate:g}/s")
    print("  " + ", ".join(extras))
    for i, w in enumerate(s.waves):
        mark = "open" if i < c.progress.opened else "waiting"
        print(
            f"  wave {i + 1}: {mark:7}  {w.size:5} devices  {w.succeeded:5} confirmed  "
            f"{w.failed:5} failed  {w.admitted:5} in progress  {w.pending:5} pending"
        )
    if c.progress.halt_reason:
        print(f"  halted: {c.progress.halt_reason}")
    if members:
        for m in s.members:
            reason = f"  {m.reason}" if m.reason else ""
            print(f"    {m.device_id}  wave {m.wave + 1}  {m.state.value}{reason}")


def _emit(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True))


# --------------------------------------------------------------------------- handlers


def cmd_create(args: argparse.Namespace) -> int:
    policy = policy_from_args(args)
    with _store(args) as store:
        release = find_release(store, args.release)
        c = store.create_campaign(release.id, args.target, args.waves, policy, _CLI_ACTOR)
        store.tick_campaigns()
        status = store.campaign_status(c.id)
    if args.json:
        _emit(status_dict(status, False))
    else:
        sizes = "/".join(str(w.size) for w in status.waves)
        print(f"created campaign {c.id}: {c.class_label} seq {c.sequence_number}, "
              f"{sum(w.size for w in status.waves)} devices in waves of {sizes}")  # fmt: skip
        _print_status(status, False)
        if not any(w.size for w in status.waves):
            print(
                "note: no device matches the target, so the campaign is already over"
                + ("; the release is now the class's current one" if c.target.whole_class else "")
            )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.tick_campaigns()
        campaigns = store.list_campaigns(active_only=args.active)
    if args.json:
        _emit([campaign_dict(c) for c in campaigns])
        return 0
    if not campaigns:
        print("no campaigns")
    for c in campaigns:
        print(_summary_line(c))
    return 0


def _status(store: SQLiteStore, cid: int) -> CampaignStatus:
    store.tick_campaigns()
    return store.campaign_status(cid)


def cmd_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        status = _status(store, args.id)
    if args.json:
        _emit(status_dict(status, args.members))
    else:
        _print_status(status, args.members)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    printed = 0
    with _store(args) as store:
        while True:
            status = _status(store, args.id)
            if args.json:
                _emit(status_dict(status, False))
            else:
                print(time.strftime("%H:%M:%S", time.gmtime()) + "Z")
                _print_status(status, False)
            sys.stdout.flush()
            printed += 1
            state = status.campaign.progress.state
            if state not in ACTIVE_STATES or state is rules.CampaignState.HALTED:
                return 3 if state is rules.CampaignState.HALTED else 0
            if args.count is not None and printed >= args.count:
                return 0
            time.sleep(args.interval)


def cmd_transition(args: argparse.Namespace) -> int:
    verb = args._verb
    with _store(args) as store:
        op = {
            "pause": store.pause_campaign,
            "resume": store.resume_campaign,
            "cancel": store.cancel_campaign,
            "approve": store.approve_campaign,
        }[verb]
        c = op(args.id, _CLI_ACTOR)
        store.tick_campaigns()
        status = store.campaign_status(c.id)
    if args.json:
        _emit(status_dict(status, False))
    else:
        done = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}
        print(
            f"campaign {c.id} {done.get(verb, 'approved')}: now {status.campaign.state}"
            + (f", wave {c.progress.approved} may open" if verb == "approve" else "")
        )
    return 0


def cmd_device_tag(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.set_device_tags(args.device_id, dict(args.tags), _CLI_ACTOR)
        tags = store.device_tags(args.device_id)
    print(f"device {args.device_id}: " + " ".join(f"{k}={v}" for k, v in tags.items()))
    return 0


def cmd_device_untag(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.remove_device_tags(args.device_id, args.keys, _CLI_ACTOR)
        tags = store.device_tags(args.device_id)
    print(
        f"device {args.device_id}: " + (" ".join(f"{k}={v}" for k, v in tags.items()) or "no tags")
    )
    return 0


def cmd_release_rebuild(args: argparse.Namespace) -> int:
    key = load_signing_key(args.key)
    with _store(args) as store:
        release = find_release(store, args.release)
        if args.seq <= release.sequence_number:
            raise CliError(
                f"--seq {args.seq} must be above the release's own {release.sequence_number}"
            )
    blob_path = _datadir(args).blobs.path_of(release.image.digest)
    try:
        data = rebuild_envelope(release.envelope, args.seq, key)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    image_out = Path(args.image_out or f"{args.out}.bin")
    atomic_write(image_out, blob_path.read_bytes())
    atomic_write(args.out, data)
    print(
        f"wrote {args.out}: {release.class_label} seq {args.seq} for the image of seq "
        f"{release.sequence_number} ({release.image.image_id}), signed with key "
        f"{key.public.key_id}; image copied to {image_out}"
    )
    return 0
