"""Server-side operator commands: init, trust, device, operator, publish, release,
report, audit and serve.

Each works on a data directory (`--data DIR`, default ./otacoap-data) through
`otacoap.store`; `serve` hands over to `otacoap.server`. Handlers return exit codes;
refusals are OtaError/CliError and end as one line on stderr (see cli/__init__.py).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
from pathlib import Path

from ..cliargs import CliError
from ..config import EVENT_LOOPS
from ..core import ids
from ..core.errors import OtaError
from ..store import DEFAULT_DATA_DIR, DataDir, Publisher, SQLiteStore
from ..store.names import PSK_LENGTH, parse_psk_hex
from .delta_cmds import publish_local
from .manifest_cmds import load_anchor, read_envelope_file

# Who the audit log names for local commands: the OS user, as far as we can tell.
_CLI_ACTOR = "cli:" + getpass.getuser()


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--data",
        metavar="DIR",
        default=DEFAULT_DATA_DIR,
        help=f"data directory (default: ./{DEFAULT_DATA_DIR})",
    )
    return p


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = _common()

    def group(name: str, help_text: str) -> argparse._SubParsersAction:  # type: ignore[type-arg]
        p = sub.add_parser(name, help=help_text)
        g = p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", parser_class=type(p))
        g.required = True
        return g

    p = sub.add_parser(
        "init",
        parents=[common],
        help="create a data directory (idempotent, never destroys)",
        description="Create config.toml, the SQLite database, the blob store and the "
        "server key (mode 0600) in DIR. Existing pieces are kept; pending schema "
        "migrations are applied.",
    )
    p.add_argument("dir", nargs="?", metavar="DIR", help="data directory (default: --data)")
    p.set_defaults(handler=cmd_init, _cmd_path=["init"])

    # trust ---------------------------------------------------------------------------
    t = group("trust", "manage the keys whose signatures publishing accepts")
    p = t.add_parser("add", parents=[common], help="trust a public key (PEM)")
    p.add_argument("key", metavar="PUBLIC.pem")
    p.set_defaults(handler=cmd_trust_add, _cmd_path=["trust", "add"])
    p = t.add_parser("list", parents=[common], help="list trust anchors")
    p.set_defaults(handler=cmd_trust_list, _cmd_path=["trust", "list"])
    p = t.add_parser("remove", parents=[common], help="stop trusting a key")
    p.add_argument("key_id", metavar="KEYID")
    p.set_defaults(handler=cmd_trust_remove, _cmd_path=["trust", "remove"])

    # device --------------------------------------------------------------------------
    d = group("device", "register and manage devices (DTLS PSK identities)")
    p = d.add_parser(
        "add",
        parents=[common],
        help="register a device",
        description="Register device ID; its DTLS PSK identity is ID. Without --psk a "
        f"random {PSK_LENGTH}-byte PSK is generated and printed once.",
    )
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--vendor-domain", required=True, metavar="DOMAIN")
    p.add_argument("--class-info", required=True, metavar="TEXT")
    p.add_argument("--psk", metavar="HEX", help=f"the PSK ({PSK_LENGTH} bytes as hex)")
    p.set_defaults(handler=cmd_device_add, _cmd_path=["device", "add"])
    p = d.add_parser("list", parents=[common], help="list devices")
    p.set_defaults(handler=cmd_device_list, _cmd_path=["device", "list"])
    p = d.add_parser("show", parents=[common], help="show one device")
    p.add_argument("device_id", metavar="ID")
    p.set_defaults(handler=cmd_device_show, _cmd_path=["device", "show"])
    p = d.add_parser("remove", parents=[common], help="remove a device")
    p.add_argument("device_id", metavar="ID")
    p.set_defaults(handler=cmd_device_remove, _cmd_path=["device", "remove"])

    # operator ------------------------------------------------------------------------
    o = group("operator", "manage operator identities (network publishing)")
    p = o.add_parser(
        "add",
        parents=[common],
        help="add an operator",
        description="Add operator NAME; its DTLS PSK identity is 'operator:NAME'.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--psk", metavar="HEX", help=f"the PSK ({PSK_LENGTH} bytes as hex)")
    p.set_defaults(handler=cmd_operator_add, _cmd_path=["operator", "add"])
    p = o.add_parser("list", parents=[common], help="list operators")
    p.set_defaults(handler=cmd_operator_list, _cmd_path=["operator", "list"])
    p = o.add_parser("remove", parents=[common], help="remove an operator")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=cmd_operator_remove, _cmd_path=["operator", "remove"])

    # publish -------------------------------------------------------------------------
    p = sub.add_parser(
        "publish",
        parents=[common],
        help="validate and publish a release (locally or to a running server)",
        description="Verify ENVELOPE against the trust anchors and the class's current "
        "release, check that IMAGE is the image it describes, then make it the current "
        "release of its class. With --server, upload both to a running server over "
        "DTLS as an operator instead (the server runs the same checks).",
    )
    p.add_argument("envelope", metavar="ENVELOPE")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument(
        "--delta",
        nargs=2,
        action="append",
        default=[],
        metavar=("DELTA_ENVELOPE", "PATCH"),
        help="also publish a delta envelope of this release and its patch (repeatable); "
        "a delta envelope given as ENVELOPE (with its PATCH) is added to its release",
    )
    p.add_argument("--server", metavar="coaps://HOST:PORT", help="publish over the network")
    p.add_argument("--identity", metavar="NAME", help="operator name (with --server)")
    p.add_argument("--psk", metavar="HEX", help="operator PSK (with --server)")
    p.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="network timeout per request"
    )
    p.set_defaults(handler=cmd_publish, _cmd_path=["publish"])

    # release -------------------------------------------------------------------------
    r = group("release", "show and assign releases")
    p = r.add_parser("list", parents=[common], help="what each class gets")
    p.add_argument("--all", action="store_true", help="every release, not only current ones")
    p.set_defaults(handler=cmd_release_list, _cmd_path=["release", "list"])
    p = r.add_parser(
        "assign",
        parents=[common],
        help="pin one device to a release of its class",
        description="Make DEVICE get release SEQ of its class instead of the class's "
        "current one ('current' removes the pin).",
    )
    p.add_argument("device_id", metavar="DEVICE")
    p.add_argument("seq", metavar="SEQ|current")
    p.set_defaults(handler=cmd_release_assign, _cmd_path=["release", "assign"])

    # report --------------------------------------------------------------------------
    rp = group("report", "device status reports")
    p = rp.add_parser("list", parents=[common], help="recent reports")
    p.add_argument("--device", metavar="ID")
    p.add_argument("--limit", type=_positive, default=50, metavar="N")
    p.set_defaults(handler=cmd_report_list, _cmd_path=["report", "list"])

    # audit ---------------------------------------------------------------------------
    a = group("audit", "the append-only, hash-chained audit log")
    p = a.add_parser("list", parents=[common], help="show the latest entries")
    p.add_argument("--limit", type=_positive, default=50, metavar="N")
    p.set_defaults(handler=cmd_audit_list, _cmd_path=["audit", "list"])
    p = a.add_parser(
        "verify",
        parents=[common],
        help="check the hash chain",
        description="Exit 0 and print the head hash if every entry links to the one "
        "before; exit 1 naming the first broken entry otherwise.",
    )
    p.set_defaults(handler=cmd_audit_verify, _cmd_path=["audit", "verify"])

    # serve ---------------------------------------------------------------------------
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="run the CoAP/DTLS update server",
        description="Serve /m, /fw/<id>, /r and /admin over DTLS-PSK (aiocoap "
        "tinydtls_server). Prints 'listening on coaps://ADDR:PORT' when ready; stops "
        "cleanly on SIGINT/SIGTERM.",
    )
    p.add_argument("--bind", metavar="ADDR", help="address (default from config: 127.0.0.1)")
    p.add_argument(
        "--port", type=_port, metavar="N", help="DTLS port devices use (0: pick a free one)"
    )
    p.add_argument("--loop", choices=EVENT_LOOPS, help="event loop (default from config: uvloop)")
    p.add_argument(
        "--insecure-plain-coap",
        action="store_true",
        help="ALSO listen for unencrypted, unauthenticated CoAP (development only): "
        "every request answers a bare 4.01 there",
    )
    p.add_argument(
        "--plain-port",
        type=_port,
        metavar="N",
        help="port of the plain CoAP listener (default: DTLS port - 1; 0 picks one)",
    )
    p.add_argument(
        "--insecure-plain-identity",
        metavar="IDENTITY",
        help="DANGEROUS development mode: treat every plain CoAP request as coming from "
        "this registered device (or operator:NAME); needs --insecure-plain-coap",
    )
    p.set_defaults(handler=cmd_serve, _cmd_path=["serve"])


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("port must be 0..65535")
    return value


def _safe(text: str) -> str:
    """Device-supplied text (report details) may hold terminal control sequences."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _datadir(args: argparse.Namespace) -> DataDir:
    return DataDir(Path(args.data))


def _store(args: argparse.Namespace) -> contextlib.closing[SQLiteStore]:
    """The data directory's store, for `with`: closed however the command ends.

    Every command is one short session on the store, and a refusal (OtaError,
    CliError) must not leave the SQLite connection open behind it.
    """
    return contextlib.closing(_datadir(args).open_store())


def _psk(args: argparse.Namespace) -> tuple[bytes, bool]:
    if args.psk:
        return parse_psk_hex(args.psk), False
    return os.urandom(PSK_LENGTH), True


def cmd_init(args: argparse.Namespace) -> int:
    root = Path(args.dir or args.data)
    created = DataDir(root).init()
    if created:
        print(f"initialised {root}: created {', '.join(created)}")
    else:
        print(f"{root} is already initialised; nothing changed")
    return 0


def cmd_trust_add(args: argparse.Namespace) -> int:
    anchor = load_anchor(args.key)
    with _store(args) as store:
        rec = store.add_anchor(anchor, _CLI_ACTOR)
    print(f"trusted {rec.kind} key {rec.key_id}")
    return 0


def cmd_trust_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        anchors = store.list_anchors()
    if not anchors:
        print("no trust anchors (publishing refuses everything until one is added)")
    for a in anchors:
        print(f"{a.key_id}  {a.kind:8}  added {a.added_at}")
    return 0


def cmd_trust_remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.remove_anchor(args.key_id, _CLI_ACTOR)
    print(f"removed trust anchor {args.key_id}")
    return 0


def cmd_device_add(args: argparse.Namespace) -> int:
    psk, generated = _psk(args)
    with _store(args) as store:
        dev = store.add_device(args.device_id, args.vendor_domain, args.class_info, psk, _CLI_ACTOR)
    print(f"registered device {dev.id} ({dev.class_label})")
    if generated:
        # Shown once: only the sealed form is stored.
        print(f"psk {psk.hex()}")
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        devices = store.list_devices()
    for dev in devices:
        counter = "-" if dev.last_counter is None else str(dev.last_counter)
        print(f"{dev.id}  {dev.class_label}  last-report-counter {counter}")
    return 0


def cmd_device_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        dev = store.get_device(args.device_id)
        if dev is None:
            raise CliError(f"no device {args.device_id!r}")
        release = store.release_for_device(dev.id)
    print(f"id: {dev.id}")
    print(f"dtls identity: {dev.id}")
    print(f"vendor domain: {dev.vendor_domain} (vendor-id {ids.uuid_str(dev.vendor_id)})")
    print(f"class info: {dev.class_info} (class-id {ids.uuid_str(dev.class_id)})")
    print(f"registered: {dev.created_at}")
    print(f"last report counter: {'-' if dev.last_counter is None else dev.last_counter}")
    pinned = " (pinned)" if dev.assigned_release is not None else ""
    if release:
        print(f"release: seq {release.sequence_number}, image {release.image.image_id}{pinned}")
    else:
        print("release: none")
    return 0


def cmd_device_remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.remove_device(args.device_id, _CLI_ACTOR)
    print(f"removed device {args.device_id}")
    return 0


def cmd_operator_add(args: argparse.Namespace) -> int:
    psk, generated = _psk(args)
    with _store(args) as store:
        op = store.add_operator(args.name, psk, _CLI_ACTOR)
    print(f"added operator {op.name} (DTLS identity {op.identity})")
    if generated:
        print(f"psk {psk.hex()}")
    return 0


def cmd_operator_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        ops = store.list_operators()
    for op in ops:
        print(f"{op.name}  identity {op.identity}  added {op.created_at}")
    return 0


def cmd_operator_remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.remove_operator(args.name, _CLI_ACTOR)
    print(f"removed operator {args.name}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    envelope = read_envelope_file(args.envelope)
    if args.server:
        return _publish_remote(args, envelope)
    if args.identity or args.psk:
        raise CliError("--identity and --psk only make sense with --server")
    datadir = _datadir(args)
    config = datadir.config()
    with contextlib.closing(datadir.open_store()) as store:
        publisher = Publisher(store, datadir.blobs, config.publish)
        done = publish_local(publisher, envelope, Path(args.image), args.delta, _CLI_ACTOR)
    for published in done:
        print(published.line())
    return 0


def _publish_remote(args: argparse.Namespace, envelope: bytes) -> int:
    if not args.identity or not args.psk:
        raise CliError("--server needs --identity NAME and --psk HEX")
    from .. import eventloop
    from ..operator.client import publish

    pairs = [(envelope, Path(args.image))]
    pairs += [(read_envelope_file(e), Path(p)) for e, p in args.delta]
    for env, path in pairs:  # a delta after its release, each like a release
        result = eventloop.run(
            publish(
                args.server,
                args.identity,
                parse_psk_hex(args.psk),
                env,
                path,
                timeout=args.timeout,
            )
        )
        print(result)
    return 0


def cmd_release_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        releases = store.list_releases(current_only=not args.all)
        current = {r.id for r in store.list_releases(current_only=True)}
        deltas = {r.id: store.deltas_of(r.id) for r in releases}
    if not releases:
        print("no releases")
    for r in releases:
        mark = "*" if args.all and r.id in current else ""
        print(
            f"{r.class_label}  seq {r.sequence_number}{mark}  image {r.image.image_id}  "
            f"{r.image.size} bytes  {r.published_at}  by {r.published_by}"
        )
        for d in deltas[r.id]:  # delta envelopes, by source image (store/deltas.py)
            print(f"  delta from {d.source_digest.hex()[:16]}  patch {d.patch.image_id}  "
                  f"{d.patch.size} bytes  {d.published_at}  by {d.published_by}")  # fmt: skip
    return 0


def cmd_release_assign(args: argparse.Namespace) -> int:
    seq: int | None
    if args.seq == "current":
        seq = None
    else:
        try:
            seq = int(args.seq)
        except ValueError:
            raise CliError(f"{args.seq!r} is neither a sequence number nor 'current'") from None
    with _store(args) as store:
        store.assign_release(args.device_id, seq, _CLI_ACTOR)
    target = "its class's current release" if seq is None else f"seq {seq}"
    print(f"device {args.device_id} now gets {target}")
    return 0


def cmd_report_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        reports = store.list_reports(args.device, args.limit)
    for r in reports:
        seq = "" if r.sequence_number is None else f" seq {r.sequence_number}"
        print(
            f"{r.received_at}  {r.device_id}  #{r.counter}  {r.state}  reason {r.reason}{seq}"
            + (f"  {_safe(r.detail)}" if r.detail else "")
            + (f"  ({r.lost} earlier reports lost on the device)" if r.lost else "")
        )
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        entries = store.audit_entries(args.limit)
    for e in entries:
        detail = f"  {_safe(e.detail)}" if e.detail else ""
        print(
            f"{e.seq:6}  {e.ts}  {_safe(e.actor)}  {e.action}  {_safe(e.subject)}  "
            f"{e.outcome}{detail}"
        )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    with _store(args) as store:
        count, head = store.verify_audit()
    print(f"audit log OK: {count} entries, head {head.hex()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .. import eventloop
    from ..server.app import ServeOptions, serve

    datadir = _datadir(args)
    config = datadir.config()
    if args.insecure_plain_identity and not args.insecure_plain_coap:
        raise CliError("--insecure-plain-identity needs --insecure-plain-coap")
    options = ServeOptions(
        bind=args.bind or None,
        port=args.port,
        loop=args.loop,
        plain_coap=args.insecure_plain_coap,
        plain_port=args.plain_port,
        plain_identity=args.insecure_plain_identity,
    )
    server = options.apply(config).server
    try:
        # DESIGN.md: the command line chooses the event loop (uvloop by default).
        return eventloop.run(serve(datadir, config, options), server.loop)
    except OtaError:
        raise
    except OSError as exc:
        raise CliError(f"cannot serve on {server.bind}: {exc.strerror or exc}") from None
