"""`python -m device_sim provision | status | run`: the simulated device's command line.

Every refusal is one line on stderr and a non-zero exit, never a traceback
(OTACOAP_TRACEBACK=1 shows it for debugging). Exit codes: 0 success (updated, or
nothing to do), 1 bad input or an unusable flash, 2 usage, 3 the update was refused,
failed, was reverted, or the server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from otacoap import eventloop
from otacoap.cliargs import (
    PSK_ENV,
    CliError,
    Parser,
    add_block2_arguments,
    add_psk_options,
    maybe_hex,
    positive_seconds,
    print_warnings,
    read_psk,
    read_small_file,
    size_type,
)
from otacoap.core import cose
from otacoap.core.check_pacing import PacingConfig
from otacoap.core.errors import OtaError
from otacoap.fsutil import atomic_write

from .bootloader import BootError
from .device_state import StateError
from .fetcher import DEFAULT_MAX_WINDOW, MAX_WINDOW
from .firmware import Behaviour, make_image
from .flash import FlashError
from .layout import (
    DEFAULT_MAX_TRIAL_BOOTS,
    DEFAULT_SECTOR_SIZE,
    DEFAULT_SLOT_SIZE,
    ProvisioningError,
)
from .record_store import StateStoreError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UPDATE_FAILED = 0, 1, 2, 3
MAX_INPUT_FILE = 64 * 1024 * 1024
MAX_SMALL_FILE = 256 * 1024


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m device_sim",
        description="A simulated OTA device: NOR flash with A/B slots, a secure "
        "bootloader, and an update agent speaking CoAP over DTLS.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser(
        "provision",
        help="create a provisioned flash image (identity, trust anchors, factory image)",
        description="Write a new flash file: read-only identity (device id, PSK, vendor "
        "and class, trust anchors), the factory image in slot 0 and the first state record.",
    )
    p.add_argument("--flash", required=True, metavar="FILE", help="flash image to create")
    p.add_argument("--id", required=True, metavar="ID", help="device id (= DTLS PSK identity)")
    add_psk_options(p, env=PSK_ENV, what="the DTLS pre-shared key (required: one source)")
    p.add_argument("--vendor-domain", required=True, metavar="DOMAIN", help="vendor domain")
    p.add_argument("--class-info", required=True, metavar="TEXT", help="device class")
    p.add_argument(
        "--trust",
        required=True,
        action="append",
        metavar="AUTHOR.pub",
        help="trust anchor: a PEM public key of a manifest author (repeatable); a private "
        "key is refused (the author key stays offline)",
    )
    p.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="ROOT.pub",
        help="root key of the class that signs anchor lists (repeatable, at most 3); "
        "without one, the --trust keys are fixed for the device's life",
    )
    p.add_argument(
        "--root-threshold",
        type=int,
        default=1,
        metavar="K",
        help="how many of the --root keys must sign an anchor list (default 1)",
    )
    p.add_argument("--factory-image", required=True, metavar="FW.bin", help="factory image")
    p.add_argument(
        "--factory-envelope",
        metavar="ENV",
        help="SUIT envelope (CBOR or hex) for the factory image; its sequence number "
        "becomes the device's (default: none, sequence number 0)",
    )
    p.add_argument(
        "--slot-size",
        type=size_type(),
        default=DEFAULT_SLOT_SIZE,
        metavar="BYTES",
        help=f"size of each image slot (default {DEFAULT_SLOT_SIZE // 1024}K)",
    )
    p.add_argument(
        "--factory-aux-image",
        metavar="DATA.bin",
        help="a two-component device: component 1's factory image (needs --aux-slot-size "
        "and a --factory-envelope that names both images)",
    )
    p.add_argument(
        "--aux-slot-size",
        type=size_type(),
        default=0,
        metavar="BYTES",
        help="a two-component device: size of component 1's region in each slot (default "
        "0: one component; docs/decisions/multi-component.md)",
    )
    p.add_argument(
        "--sector-size",
        type=size_type(),
        default=DEFAULT_SECTOR_SIZE,
        metavar="BYTES",
        help=f"flash erase sector size (default {DEFAULT_SECTOR_SIZE})",
    )
    p.add_argument(
        "--max-trial-boots",
        type=int,
        default=DEFAULT_MAX_TRIAL_BOOTS,
        metavar="N",
        help="unconfirmed trial boots before a release is given up "
        f"(default {DEFAULT_MAX_TRIAL_BOOTS})",
    )
    p.add_argument(
        "--decryption-key",
        metavar="PRIVATE.pem",
        help="the device's P-256 key for encrypted payloads (ECDH-ES+A128KW); its public "
        "half is what `manifest build --encrypt-for` takes",
    )
    p.add_argument(
        "--kek",
        action="append",
        default=[],
        metavar="FILE",
        help="an A128KW key (16 bytes or 32 hex) for encrypted payloads, e.g. a class key "
        "(repeatable)",
    )
    p.add_argument(
        "--no-seal",
        action="store_true",
        help="store the PSK and keys in the clear (default: sealed under the simulated "
        "chip's hardware key, FLASH.huk)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing flash file")
    p.set_defaults(handler=cmd_provision)

    m = sub.add_parser(
        "make-image",
        help="write a simulated firmware image (for walkthroughs and tests)",
        description="Write a deterministic firmware image the simulated device can run. "
        "Its header says how it behaves after an update: healthy (confirms), crash (never "
        "gets to confirm) or unhealthy (its health check fails: the bootloader reverts).",
    )
    m.add_argument("-o", "--out", required=True, metavar="FILE", help="the image to write")
    m.add_argument(
        "--size", type=size_type(MAX_INPUT_FILE), default=32 * 1024, metavar="BYTES",
        help="image size, K/M suffixes allowed (default 32K)",
    )  # fmt: skip
    m.add_argument("--version", type=int, default=1, metavar="N", help="version (default 1)")
    m.add_argument(
        "--behaviour", choices=[b.value for b in Behaviour], default=Behaviour.HEALTHY.value,
        help="what the image does after an update (default healthy)",
    )  # fmt: skip
    m.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    m.set_defaults(handler=cmd_make_image)

    s = sub.add_parser(
        "status",
        help="show what the bootloader would boot",
        description="Read the flash as the bootloader does (without writing to it): "
        "installed sequence number, running slot and the SHA-256 of its image, "
        "pending or partial updates.",
    )
    s.add_argument("--flash", required=True, metavar="FILE", help="flash image")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(handler=cmd_status)

    r = sub.add_parser(
        "run",
        help="run the update agent against a server",
        description="Power the device on (bootloader), then check the server for a "
        "release and install it: verify the manifest before any download, fetch the "
        "image block by block into the staging slot, reboot into it, confirm.",
    )
    r.add_argument("--flash", required=True, metavar="FILE", help="flash image")
    r.add_argument("--server", required=True, metavar="coaps://HOST:PORT", help="the server")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="check once, update, exit (default)")
    mode.add_argument(
        "--watch", action="store_true", help="observe /m and update whenever a release appears"
    )
    r.add_argument(
        "--max-time", type=positive_seconds, metavar="SECONDS", help="stop --watch after this long"
    )
    add_block2_arguments(
        r,
        max_window=MAX_WINDOW,
        window_default=DEFAULT_MAX_WINDOW,
        who="to ask",
        window_help="most Block2 requests outstanding for the image, adapted to loss and "
        f"delay by a congestion controller (default {DEFAULT_MAX_WINDOW}; 1 = RFC 7959 "
        "lock-step)",
    )
    r.add_argument(
        "--poll-interval",
        type=positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="--watch: also check this often without a notification (default 60)",
    )
    r.add_argument(
        "--min-check-interval",
        type=positive_seconds,
        default=PacingConfig.min_gap,
        metavar="SECONDS",
        help="--watch: never start checks closer together than this, however often the "
        f"server notifies; doubled after each check that fails, up to --max-check-backoff "
        f"(default {PacingConfig.min_gap:g})",
    )
    r.add_argument(
        "--max-check-backoff",
        type=positive_seconds,
        default=PacingConfig.max_gap,
        metavar="SECONDS",
        help=f"--watch: longest gap after repeated failed checks "
        f"(default {PacingConfig.max_gap:g})",
    )
    r.add_argument("--json", action="store_true", help="print each result as a JSON line")
    r.add_argument(
        "--trusted-clock",
        action="store_true",
        help="treat the system clock as trusted: refuse manifests past their signed expiry",
    )
    r.set_defaults(handler=cmd_run)

    from .fleet.cli import register as register_fleet  # the fleet simulator (issue 5)

    register_fleet(sub)
    return parser


def _read(path: str, cap: int) -> bytes:
    try:
        return read_small_file(path, cap)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _hex_psk(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("must be hex") from None


def _read_anchor(path: str) -> bytes:
    """A --trust file, refused here (naming it) if it holds no public key: a private
    one must never be copied onto a device (cose.load_public_key says why)."""
    data = _read(path, MAX_SMALL_FILE)
    try:
        cose.load_public_key(data)
    except OtaError as exc:
        raise CliError(f"--trust {path}: {exc}") from None
    return data


def cmd_provision(args: argparse.Namespace) -> int:
    from .provision import provision

    psk = read_psk(args, PSK_ENV, _hex_psk)
    if psk is None:
        raise CliError(f"the device needs its PSK: --psk-file FILE, ${PSK_ENV} or --psk HEX")
    anchors = tuple(_read_anchor(t) for t in args.trust)
    image = _read(args.factory_image, MAX_INPUT_FILE)
    envelope = (
        maybe_hex(_read(args.factory_envelope, MAX_SMALL_FILE)) if args.factory_envelope else None
    )
    keks, der = _decryption_keys(args)
    result = provision(
        args.flash,
        device_id=args.id,
        psk=psk,
        vendor_domain=args.vendor_domain,
        class_info=args.class_info,
        anchors_pem=anchors,
        factory_image=image,
        factory_envelope=envelope,
        slot_size=args.slot_size,
        sector_size=args.sector_size,
        max_trial_boots=args.max_trial_boots,
        force=args.force,
        roots_pem=tuple(_read(r, MAX_SMALL_FILE) for r in args.root),
        root_threshold=args.root_threshold,
        decryption_keks=keks,
        decryption_ec_der=der,
        seal=not args.no_seal,
        aux_slot_size=args.aux_slot_size,
        factory_aux_image=(
            _read(args.factory_aux_image, MAX_INPUT_FILE) if args.factory_aux_image else b""
        ),
    )
    print(
        f"provisioned {result.identity.device_id} in {result.path}: "
        f"seq {result.sequence}, image sha256 {result.image_digest.hex()}"
    )
    return EXIT_OK


def _decryption_keys(args: argparse.Namespace) -> tuple[tuple[bytes, ...], bytes]:
    """The provisioning keywords for payload decryption keys (firmware-encryption)."""
    from otacoap.core import encryption

    keks = tuple(encryption.load_kek(_read(k, MAX_SMALL_FILE))[1] for k in args.kek)
    der = b""
    if args.decryption_key:
        key = encryption.load_ec_private(_read(args.decryption_key, MAX_SMALL_FILE))
        der = encryption.private_der(key)
    return keks, der


def cmd_make_image(args: argparse.Namespace) -> int:
    if not 0 <= args.version < 1 << 32:
        raise CliError("--version must be 0..4294967295")
    if os.path.exists(args.out) and not args.force:
        raise CliError(f"{args.out} exists (use --force to overwrite)")
    try:
        image = make_image(args.size, version=args.version, behaviour=Behaviour(args.behaviour))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    atomic_write(args.out, image)
    print(f"wrote {args.out}: {len(image)} bytes, version {args.version}, {args.behaviour}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from .provision import inspect

    info = inspect(args.flash)
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return EXIT_OK
    print(f"device    {info['device_id']} ({info['vendor_domain']}, {info['class_info']})")
    print(f"sequence  {info['sequence_number']} (trusted)")
    print(
        f"running   slot {info['running_slot']}: seq {info['running_sequence_number']}, "
        f"{info['image_size']} bytes, sha256 {info['image_digest']}"
    )
    boot = info["boot_status"] + ("" if info["bootable"] else f" - NOT BOOTABLE: {info['problem']}")
    print(f"boot      {boot}")
    if info["pending"]:
        pending = info["pending"]
        print(f"pending   slot {pending['slot']}, seq {pending['sequence_number']}")
    if info["download"]:
        d = info["download"]
        print(
            f"partial   {d['bytes']}/{d['image_size']} bytes of manifest "
            f"{d['manifest_digest'][:16]} in slot {d['slot']}"
        )
    print(f"reports   {info['queued_reports']} queued (counter {info['report_counter']})")
    if info["anchor_version"] is not None:
        print(f"anchors   list version {info['anchor_version']} (root keys provisioned)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from otacoap.core import blockwise

    from .agent import AgentConfig, DeviceAgent, Outcome, RunResult
    from .coap import normalize_base
    from .fetcher import FetchConfig

    try:
        server = normalize_base(args.server)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.max_time is not None and not args.watch:
        raise CliError("--max-time only applies to --watch")
    if args.min_check_interval > args.max_check_backoff:
        raise CliError("--min-check-interval must not exceed --max-check-backoff")
    pacing = PacingConfig(args.min_check_interval, args.max_check_backoff)
    config = AgentConfig(
        fetch=FetchConfig(szx=blockwise.szx_of(args.block_size), max_window=args.window),
        poll_interval=args.poll_interval,
        pacing=pacing,
        trusted_time=time.time if args.trusted_clock else None,
    )

    def show(result: RunResult) -> None:
        if args.json:
            print(
                json.dumps(
                    {
                        "outcome": result.outcome.value,
                        "reason": int(result.reason),
                        "detail": result.detail,
                        "sequence_number": result.sequence_number,
                        "running_slot": result.running_slot,
                        "image_digest": result.image_digest.hex(),
                        "freshness": (
                            None if result.freshness is None else result.freshness.name.lower()
                        ),
                    }
                ),
                flush=True,
            )
        else:
            print(result.summary(), flush=True)

    async def main() -> list[RunResult]:
        device = DeviceAgent(args.flash, server, config=config)
        try:
            if args.watch:
                return await device.watch(args.max_time, on_result=show)
            result = await device.run_once()
            show(result)
            return [result]
        finally:
            await device.close()

    results = eventloop.run(main())
    good = {Outcome.UPDATED, Outcome.UP_TO_DATE}
    return EXIT_OK if results and results[-1].outcome in good else EXIT_UPDATE_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # aiocoap warns about routine DTLS alerts (close_notify at shutdown); the
        # device's own outcome line says what happened.
        logging.getLogger("coap").setLevel(logging.ERROR)
    try:
        code = int(args.handler(args))
        print_warnings(args, f"python -m device_sim {args.command}")
        return code
    except (
        CliError,
        ProvisioningError,
        StateError,
        BootError,
        OtaError,
        FlashError,
        StateStoreError,
        ValueError,
    ) as exc:
        _fail(args, str(exc))
    except OSError as exc:
        _fail(args, f"{getattr(exc, 'filename', None) or ''} {exc.strerror or exc}".strip())
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR


def _fail(args: argparse.Namespace, message: str) -> None:
    print(f"python -m device_sim {args.command}: error: {message}", file=sys.stderr)
    if os.environ.get("OTACOAP_TRACEBACK"):
        raise
