"""The fleet simulator's command line: `python -m device_sim.fleet`, and the `fleet`
subcommand of `python -m device_sim` (`register`).

Parsing and wording are shared with `python -m device_sim` (device_sim.cliargs); the
combinations argparse cannot check are refused here with one line (`options_from_args`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otacoap.cliargs import (
    Parser,
    add_block2_arguments,
    non_negative_float,
    positive_float_type,
    positive_int,
    probability,
    size_type,
)
from otacoap.core.errors import OtaError

from ..coap import normalize_base
from ..fetcher import MAX_WINDOW
from ..netem import LinkProfile
from .operator_role import parse_campaign
from .options import (
    DEFAULT_ATTEMPTS,
    DEFAULT_CONCURRENCY,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_TIMEOUT,
    DEFAULT_VENDOR,
    MAX_DEVICES,
    MAX_IMAGE_SIZE,
    PSK_LENGTH,
    FleetError,
    FleetOptions,
    check_payload_modes,
)
from .run import run_fleet
from .runtime import quiet_aiocoap, sigterm_cleans_up

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_ALL_UPDATED = 0, 1, 2, 3
PROG = "python -m device_sim.fleet"


# The fleet's own limits; parsing and wording are shared with `python -m device_sim`.
_size = size_type(MAX_IMAGE_SIZE)  # a generated image must fit the server's publish limit
_seconds = positive_float_type("seconds")
_rate = positive_float_type("rate")


def _psk(text: str) -> bytes:
    try:
        psk = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("PSK must be hex") from None
    if len(psk) != PSK_LENGTH:
        raise argparse.ArgumentTypeError(f"PSK must be {PSK_LENGTH} bytes ({2 * PSK_LENGTH} hex)")
    return psk


DESCRIPTION = (
    "Update a whole simulated fleet against a running otacoap server: register N "
    "devices of a fresh class (with --data, through the server's store), provision "
    "their flash with a signed factory image, publish a new signed release, run every "
    "device's update agent concurrently (optionally through a lossy link), verify "
    "each device's flash and the server's confirmed report, and write a report."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """All options of the fleet command (shared by `register` and `main`)."""
    p.add_argument("--server", required=True, metavar="coaps://HOST:PORT", help="the server")
    p.add_argument("--devices", required=True, type=positive_int, metavar="N", help="fleet size")
    p.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="AUTHOR_PRIVATE",
        help="manifest author's private key (PEM): signs factory and release; its public "
        "key becomes every device's trust anchor",
    )
    where = p.add_argument_group("server access (one of)")
    where.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="the server's data directory: register devices and publish through its store",
    )
    where.add_argument(
        "--operator", metavar="NAME", help="publish over the network as this operator"
    )
    where.add_argument("--operator-psk", type=_psk, metavar="HEX", help="the operator's PSK")
    where.add_argument(
        "--devices-file",
        type=Path,
        metavar="FILE",
        help="with --operator: already registered devices, one 'ID PSK_HEX' per line",
    )
    rel = p.add_argument_group("release")
    rel.add_argument(
        "--image-size",
        type=_size,
        default=DEFAULT_IMAGE_SIZE,
        metavar="BYTES",
        help=f"generated image size, K/M suffixes allowed (default {DEFAULT_IMAGE_SIZE // 1024}K)",
    )
    rel.add_argument(
        "--release",
        nargs=2,
        type=Path,
        metavar=("ENVELOPE", "IMAGE"),
        help="use this signed release instead of generating one (needs --class-info)",
    )
    rel.add_argument(
        "--vendor-domain",
        default=DEFAULT_VENDOR,
        metavar="DOMAIN",
        help=f"vendor domain of the fleet (default {DEFAULT_VENDOR})",
    )
    rel.add_argument(
        "--class-info",
        metavar="TEXT",
        help="device class (default: a fresh 'fleet-<random>' per run)",
    )
    rel.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the generated release (A128CTR under a fresh class A128KW key that "
        "every device is provisioned with; with --delta the old release and the patch "
        "too, each under its own CEK); the server stores only the ciphertext. A "
        "class key, not per-device ECDH: one recipient in the manifest whatever the fleet "
        "size (per-device keys need one recipient per device in the one envelope the "
        "class is served) and no ECDH on the device per update",
    )
    rel.add_argument(
        "--delta",
        action="store_true",
        help="devices start on an OLD release (seq - 1, published first so the server "
        "knows what they run; each device checks in with its running seq) and the "
        "release carries a delta from it with the full image as fallback; the report "
        "counts delta installs and fallbacks (with --encrypt: an encrypted delta, the "
        "encrypted release as fallback)",
    )
    rel.add_argument(
        "--old-image",
        type=Path,
        metavar="FILE",
        help="with --delta: the image the devices run before the update (default: "
        "generated; a generated release is the old image with about 1%% of its bytes "
        "changed in a few places and 256 bytes inserted)",
    )
    rel.add_argument(
        "--delta-mismatch-fraction",
        type=probability,
        default=0.0,
        metavar="P",
        help="with --delta: share of devices that run another image at seq - 1 than the "
        "patch's source, so they fall back to the full image (chosen from --seed)",
    )
    rel.add_argument(
        "--seq",
        type=positive_int,
        default=2,
        metavar="N",
        help="sequence number of the generated release; the factory gets N-1 (default 2)",
    )
    link = p.add_argument_group("link impairment (any of them puts a netem proxy in between)")
    link.add_argument("--loss", type=probability, default=0.0, metavar="P", help="loss, 0..1")
    link.add_argument("--delay", type=non_negative_float, default=0.0, metavar="MS", help="one-way")
    link.add_argument("--jitter", type=non_negative_float, default=0.0, metavar="MS", help="jitter")
    link.add_argument("--duplicate", type=probability, default=0.0, metavar="P")
    link.add_argument("--reorder", type=probability, default=0.0, metavar="P")
    link.add_argument("--rate", type=_rate, metavar="KBPS", help="per-device link rate")
    run = p.add_argument_group("run")
    run.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="K",
        help=f"devices updating at once, all processes together (default {DEFAULT_CONCURRENCY})",
    )
    run.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        metavar="M",
        help="worker processes, each with its own event loop (default 1)",
    )
    add_block2_arguments(
        run,
        max_window=MAX_WINDOW,
        window_default=1,
        who="the devices ask",
        window_help="most Block2 requests each device keeps outstanding, adapted by its "
        "congestion controller (default 1, RFC 7959 lock-step: with many devices per "
        "process the simulator's CPU, not the round trip, is the limit)",
    )
    run.add_argument("--seed", type=int, metavar="N", help="seed for the link model and retries")
    run.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"per-device deadline (default {DEFAULT_TIMEOUT:g})",
    )
    run.add_argument(
        "--max-time",
        type=_seconds,
        metavar="SECONDS",
        help="deadline of the whole run (default: waves x --timeout + 60)",
    )
    run.add_argument(
        "--attempts",
        type=positive_int,
        default=DEFAULT_ATTEMPTS,
        metavar="N",
        help="agent runs per device within its deadline, like polls after a failure "
        f"(default {DEFAULT_ATTEMPTS})",
    )
    run.add_argument(
        "--work",
        type=Path,
        metavar="DIR",
        help="put the flash files here and keep them (default: a temp dir, removed)",
    )
    camp = p.add_argument_group("rollout campaign (with --data)")
    camp.add_argument(
        "--campaign",
        metavar='"OPTIONS"',
        help="roll the release out as a campaign: 'otacoap campaign create' options in "
        'one string, e.g. "--waves 1%%,10%%,100%% --failure-threshold 5%%" (the release '
        "is published with rollout none, the factory release stays current; devices "
        "poll until admitted; waiting devices end 'untouched' once it halts or ends; a "
        "single option without a space needs the = form: --campaign=--urgent)",
    )
    camp.add_argument(
        "--bad-fraction",
        type=probability,
        default=0.0,
        metavar="P",
        help="share of devices on which the release fails its health check at its first "
        "boot (they revert and report it); chosen deterministically from --seed",
    )
    camp.add_argument(
        "--poll-interval",
        type=_seconds,
        default=DEFAULT_POLL_INTERVAL,
        metavar="SECONDS",
        help="with --campaign: mean seconds between a waiting device's polls of /m "
        f"(default {DEFAULT_POLL_INTERVAL:g}, jittered +-50%%)",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="with --data: at the end remove the devices this run registered and cancel "
        "its campaign if still active (audited as fleet-simulator)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--report", type=Path, metavar="OUT.json", help="write the JSON report")
    out.add_argument("--plot", type=Path, metavar="OUT.png", help="plot completions over time")
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: only when stderr is a terminal)",
    )
    out.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `fleet` subcommand to a device_sim-style subparsers object."""
    p = subparsers.add_parser(
        "fleet", help="update a simulated fleet against a server", description=DESCRIPTION
    )
    add_arguments(p)
    p.set_defaults(handler=cmd_fleet)
    return p


def options_from_args(args: argparse.Namespace) -> FleetOptions:
    """Check the combinations argparse cannot; raise FleetError with one line."""
    local = args.data is not None
    remote = args.operator is not None or args.operator_psk is not None
    if local and remote:
        raise FleetError("give either --data DIR or --operator NAME --operator-psk HEX, not both")
    if not local and not remote:
        raise FleetError(
            "say how to reach the server's store: --data DIR (local), or --operator NAME "
            "--operator-psk HEX --devices-file FILE (network publishing only)"
        )
    if remote:
        if args.operator is None or args.operator_psk is None:
            raise FleetError("--operator and --operator-psk go together")
        if args.devices_file is None or args.class_info is None:
            raise FleetError(
                "with --operator the devices must already be registered (the server has no "
                "network device registration): give --devices-file and --class-info"
            )
    elif args.devices_file is not None:
        raise FleetError("--devices-file only applies with --operator")
    if not local and (args.campaign is not None or args.cleanup):
        raise FleetError("--campaign and --cleanup need --data DIR (the server's store)")
    plan = parse_campaign(args.campaign) if args.campaign is not None else None
    check_payload_modes(args.delta, args.encrypt)
    if args.encrypt and args.release:
        raise FleetError(
            "--encrypt applies to a generated release (a given --release is published as it is)"
        )
    if not args.delta and (args.old_image is not None or args.delta_mismatch_fraction):
        raise FleetError("--old-image and --delta-mismatch-fraction need --delta")
    if args.old_image is not None and not args.old_image.is_file():
        raise FleetError(f"--old-image {args.old_image}: no such file")
    if args.release is not None and args.class_info is None:
        raise FleetError("--release needs --class-info (and --vendor-domain) of its class")
    if args.devices > MAX_DEVICES:
        raise FleetError(f"--devices is limited to {MAX_DEVICES}")
    if args.seq < 2 and args.release is None:
        raise FleetError("--seq must be at least 2 (the factory image has seq - 1)")
    if args.max_time is not None and args.max_time < 1:
        raise FleetError("--max-time must be at least 1 second")
    try:
        normalize_base(args.server)
    except ValueError as exc:
        raise FleetError(str(exc)) from None
    if not args.key.is_file():
        raise FleetError(f"--key {args.key}: no such file")
    if local and not args.data.is_dir():
        raise FleetError(f"--data {args.data}: no such directory")
    imp = LinkProfile(
        loss=args.loss,
        delay_ms=args.delay,
        jitter_ms=args.jitter,
        duplicate=args.duplicate,
        reorder=args.reorder,
        rate_kbps=args.rate,
    )
    return FleetOptions(
        server=args.server,
        devices=args.devices,
        key_path=args.key,
        data=args.data,
        operator=args.operator,
        operator_psk=args.operator_psk,
        devices_file=args.devices_file,
        vendor_domain=args.vendor_domain,
        class_info=args.class_info,
        seq=args.seq,
        image_size=args.image_size,
        release=(args.release[0], args.release[1]) if args.release else None,
        impairment=imp,
        concurrency=args.concurrency,
        processes=args.processes,
        block_size=args.block_size,
        max_window=args.window,
        seed=args.seed if args.seed is not None else secrets.randbelow(1 << 31),
        timeout=args.timeout,
        max_time=args.max_time,
        attempts=args.attempts,
        work=args.work,
        report=args.report,
        plot=args.plot,
        progress=args.progress,
        campaign=plan,
        campaign_text=args.campaign,
        poll_interval=args.poll_interval,
        bad_fraction=args.bad_fraction,
        cleanup=args.cleanup,
        encrypt=args.encrypt,
        delta=args.delta,
        old_image=args.old_image,
        delta_mismatch_fraction=args.delta_mismatch_fraction,
    )


def cmd_fleet(args: argparse.Namespace) -> int:
    quiet_aiocoap(getattr(args, "verbose", 0))
    sigterm_cleans_up()
    opts = options_from_args(args)
    report = run_fleet(opts)
    s = report.summary()
    if getattr(args, "json", False):
        print(json.dumps(s, sort_keys=True))
    else:

        def sec(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} s"

        print(
            f"fleet: {s['completed']}/{s['devices']} updated ({s['success_rate']:.1%}) in "
            f"{s['wall_seconds']:.1f} s; completion p50 {sec(s['p50_seconds'])}, "
            f"p95 {sec(s['p95_seconds'])}, p99 {sec(s['p99_seconds'])}; per-device update "
            f"p50 {sec(s['update_p50_seconds'])}; {s['blocks_per_second']:,.0f} blocks/s"
        )
        for line in payload_lines(s, report.settings):
            print(line)
        c = s.get("campaign")
        if c is not None:
            print(
                f"campaign {c['id']}: {c['state']}"
                + (f" ({c['halt_reason']})" if c["halt_reason"] else "")
                + f"; peak {c['peak_admitted']} admitted at once"
            )
            for w in c["per_wave"]:
                print(
                    f"  wave {w['wave']}: {w['size']} devices, {w['updated']} updated, "
                    f"{w['failed']} failed ({w['reverted']} reverted), {w['untouched']} "
                    f"untouched; opened {sec(w['opened_seconds'])}, completed "
                    f"{sec(w['completed_seconds'])}"
                )
        if s["failure_reasons"]:
            worst = sorted(s["failure_reasons"].items(), key=lambda kv: -kv[1])[:5]
            print("failures: " + "; ".join(f"{n}x {why}" for why, n in worst))
    return EXIT_OK if s["completed"] == s["devices"] else EXIT_NOT_ALL_UPDATED


def payload_lines(s: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The summary's lines about the payload: encrypted, and --delta's figures."""
    lines = []
    if settings.get("encrypted"):
        lines.append(f"payload encrypted ({settings.get('encryption')})")
    d = s.get("delta")
    if d is not None:

        def per(v: float | None) -> str:
            return "-" if v is None else f"{v:,.0f} B"

        enc = "encrypted " if settings.get("encrypted") else ""
        lines.append(
            f"delta: {d['installed_by_delta']} installed by {enc}delta (patch "
            f"{d['patch_size']:,} B), {d['fell_back_to_full']} fell back to the {enc}full image "
            f"({d['image_size']:,} B; {d['mismatched_devices']} devices ran another image)"
            + (
                f", {d['served_plain_envelope']} were served the plain envelope"
                if d["served_plain_envelope"]
                else ""
            )
            + "; "
            f"firmware bytes per device: delta {per(d['fw_bytes_per_delta_device'])}, "
            f"full {per(d['fw_bytes_per_full_device'])}, mean "
            f"{per(s.get('fw_bytes_per_device_mean'))}"
        )
    if s.get("air_bytes_per_device") is not None:
        lines.append(
            f"on the air (through the impairment proxy, both ways): "
            f"{s['air_bytes_per_device']:,.0f} B per device"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    add_arguments(parser)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return cmd_fleet(args)
    except (FleetError, OtaError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{getattr(exc, 'filename', None) or ''} {exc.strerror or exc}".strip())
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if os.environ.get("OTACOAP_TRACEBACK"):
        raise
