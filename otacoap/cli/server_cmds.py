"""Server-side operator commands: init, trust, device, operator, publish, release,
report, audit and serve.

Each works on a data directory (`--data DIR`, default ./otacoap-data) through
`otacoap.store`; `serve` hands over to `otacoap.server`. Handlers return exit codes;
refusals are OtaError/CliError and end as one line on stderr (see cli/__init__.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from ..cliargs import OPERATOR_PSK_ENV, PSK_ENV, CliError, add_psk_options, read_psk
from ..config import EVENT_LOOPS, LOG_FORMATS
from ..core import ids
from ..core.errors import OtaError, ReportReason
from ..fsutil import atomic_write, read_capped
from ..store import DEFAULT_DATA_DIR, DataDir, Publisher, SQLiteStore
from ..store.checkpoint import MAX_CHECKPOINT_FILE, CheckpointInvalid
from ..store.errors import NotFound
from ..store.models import DeviceRecord, ReportRecord
from ..store.names import PSK_LENGTH, parse_psk_hex
from .delta_cmds import publish_local
from .manifest_cmds import load_anchor, read_envelope_file
from .output import emit_list, emit_one, json_parent
from .serve_workers import add_worker_options

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
    js = json_parent()

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
    p.add_argument(
        "--store",
        metavar="URL",
        help="keep the store in PostgreSQL (postgresql://USER@HOST/DB, no password: "
        "~/.pgpass) instead of DIR/otacoap.db; written to config.toml [store] url",
    )
    p.set_defaults(handler=cmd_init, _cmd_path=["init"])

    # trust ---------------------------------------------------------------------------
    t = group("trust", "manage the keys whose signatures publishing accepts")
    p = t.add_parser(
        "add",
        parents=[common],
        help="trust a public key (PEM)",
        description="Trust PUBLIC.pem for publishing. A private key is refused: the "
        "author key stays offline, the server needs only its public half.",
    )
    p.add_argument("key", metavar="PUBLIC.pem")
    p.set_defaults(handler=cmd_trust_add, _cmd_path=["trust", "add"])
    p = t.add_parser("list", parents=[common, js], help="list trust anchors")
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
        description="Register device ID; its DTLS PSK identity is ID. The PSK "
        f"({PSK_LENGTH} bytes as hex) comes from --psk-file, ${PSK_ENV} or --psk; "
        f"without any, a random one is generated and printed once.",
    )
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--vendor-domain", required=True, metavar="DOMAIN")
    p.add_argument("--class-info", required=True, metavar="TEXT")
    add_psk_options(p, env=PSK_ENV, what="the device's PSK")
    p.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag (repeatable)"
    )
    p.set_defaults(handler=cmd_device_add, _cmd_path=["device", "add"])
    p = d.add_parser("list", parents=[common, js], help="list devices")
    p.set_defaults(handler=cmd_device_list, _cmd_path=["device", "list"])
    p = d.add_parser("show", parents=[common, js], help="show one device")
    p.add_argument("device_id", metavar="ID")
    p.set_defaults(handler=cmd_device_show, _cmd_path=["device", "show"])
    p = d.add_parser("remove", parents=[common], help="remove a device")
    p.add_argument("device_id", metavar="ID")
    p.set_defaults(handler=cmd_device_remove, _cmd_path=["device", "remove"])
    p = d.add_parser(
        "rekey",
        parents=[common],
        help="give a device a new PSK; sessions made with the old one end",
        description="Replace device ID's PSK (audited). A running server ends every "
        "DTLS session made with the old key within a second. Without --psk a random "
        f"{PSK_LENGTH}-byte PSK is generated and printed once.",
    )
    p.add_argument("device_id", metavar="ID")
    add_psk_options(p, env=PSK_ENV, what="the device's new PSK")
    p.set_defaults(handler=cmd_device_rekey, _cmd_path=["device", "rekey"])
    from .campaign_cmds import register_device_tags, register_release_rebuild

    register_device_tags(d, common)

    # operator ------------------------------------------------------------------------
    o = group("operator", "manage operator identities (network publishing)")
    p = o.add_parser(
        "add",
        parents=[common],
        help="add an operator",
        description="Add operator NAME; its DTLS PSK identity is 'operator:NAME'. The "
        f"PSK ({PSK_LENGTH} bytes as hex) comes from --psk-file, ${PSK_ENV} or --psk; "
        "without any, a random one is generated and printed once.",
    )
    p.add_argument("name", metavar="NAME")
    add_psk_options(p, env=PSK_ENV, what="the operator's PSK")
    p.set_defaults(handler=cmd_operator_add, _cmd_path=["operator", "add"])
    p = o.add_parser("list", parents=[common, js], help="list operators")
    p.set_defaults(handler=cmd_operator_list, _cmd_path=["operator", "list"])
    p = o.add_parser("remove", parents=[common], help="remove an operator")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=cmd_operator_remove, _cmd_path=["operator", "remove"])
    p = o.add_parser(
        "rekey",
        parents=[common],
        help="give an operator a new PSK; sessions made with the old one end",
        description="Replace operator NAME's PSK (audited). A running server ends every "
        "DTLS session made with the old key within a second.",
    )
    p.add_argument("name", metavar="NAME")
    add_psk_options(p, env=PSK_ENV, what="the operator's new PSK")
    p.set_defaults(handler=cmd_operator_rekey, _cmd_path=["operator", "rekey"])

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
    p.add_argument(
        "image",
        metavar="IMAGE",
        nargs="+",
        help="the image; a multi-component release takes each component's image, in any "
        "order (matched to the manifest by digest)",
    )
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
    add_psk_options(p, env=OPERATOR_PSK_ENV, what="the operator's PSK (with --server)")
    p.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="network timeout per request"
    )
    p.add_argument(
        "--rollout",
        choices=("all", "none"),
        default="all",
        help="all (default, as before campaigns): every device of the class is served it "
        "at once; none: stored only, handed out by 'otacoap campaign create'",
    )
    p.set_defaults(handler=cmd_publish, _cmd_path=["publish"])

    # release -------------------------------------------------------------------------
    r = group("release", "show and assign releases")
    p = r.add_parser("list", parents=[common, js], help="what each class gets")
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
    register_release_rebuild(r, common)

    # report --------------------------------------------------------------------------
    rp = group("report", "device status reports")
    p = rp.add_parser("list", parents=[common, js], help="recent reports")
    p.add_argument("--device", metavar="ID")
    p.add_argument("--limit", type=_positive, default=50, metavar="N")
    p.set_defaults(handler=cmd_report_list, _cmd_path=["report", "list"])

    # audit ---------------------------------------------------------------------------
    a = group("audit", "the append-only, keyed hash-chained audit log")
    p = a.add_parser("list", parents=[common, js], help="show the latest entries")
    p.add_argument("--limit", type=_positive, default=50, metavar="N")
    p.set_defaults(handler=cmd_audit_list, _cmd_path=["audit", "list"])
    p = a.add_parser(
        "verify",
        parents=[common],
        help="check the keyed chain, its seal, and the store against the log",
        description="Exit 0 and print the head hash if every entry links to the one "
        "before (HMAC under a key derived from server.key), the log's sealed length "
        "matches, and every release, device, operator and trust anchor has the audit "
        "entry that made it; exit 1 naming the first problem otherwise. With "
        "--checkpoint, also prove that nothing up to that checkpoint was removed or "
        "changed.",
    )
    p.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="a file written by 'otacoap audit checkpoint' (keep copies off this machine)",
    )
    p.set_defaults(handler=cmd_audit_verify, _cmd_path=["audit", "verify"])
    p = a.add_parser(
        "checkpoint",
        parents=[common],
        help="write the log's length and head, MACed, to a file to keep elsewhere",
        description="Verify the log, then write its entry count and head, with a MAC "
        "under a key derived from server.key, to FILE (atomically). Keep the file "
        "where whoever can write the data directory cannot: 'audit verify --checkpoint "
        "FILE' then proves that no entry up to it was removed or changed, even if the "
        "whole database was replaced by an older copy.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace an existing FILE")
    p.set_defaults(handler=cmd_audit_checkpoint, _cmd_path=["audit", "checkpoint"])

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
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics and /health over HTTP there (e.g. 127.0.0.1:9464; "
        "default from config: off)",
    )
    p.add_argument(
        "--log-format", choices=LOG_FORMATS, help="log as text or JSON lines (default: text)"
    )
    add_worker_options(
        p,
        "server processes sharing the port (SO_REUSEPORT), supervised and restarted by "
        "this one (default auto: one per core; 1: this process serves alone). Worker I's "
        "--metrics is on PORT+I",
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


def _datadir(args: argparse.Namespace) -> DataDir:
    return DataDir(Path(args.data))


def _store(args: argparse.Namespace) -> contextlib.closing[SQLiteStore]:
    """The data directory's store, for `with`: closed however the command ends.

    Every command is one short session on the store, and a refusal (OtaError,
    CliError) must not leave the SQLite connection open behind it.
    """
    return contextlib.closing(_datadir(args).open_store())


def _psk(args: argparse.Namespace) -> tuple[bytes, bool]:
    psk = read_psk(args, PSK_ENV, parse_psk_hex)
    if psk is not None:
        return psk, False
    return os.urandom(PSK_LENGTH), True


def cmd_init(args: argparse.Namespace) -> int:
    root = Path(args.dir or args.data)
    created = DataDir(root).init(store_url=args.store)
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
    rows = [{"key_id": a.key_id, "kind": a.kind, "added_at": a.added_at} for a in anchors]
    emit_list(
        args,
        rows,
        (("KEY ID", "key_id"), ("KIND", "kind"), ("ADDED", "added_at")),
        "no trust anchors (publishing refuses everything until one is added)",
    )
    return 0


def cmd_trust_remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.remove_anchor(args.key_id, _CLI_ACTOR)
    print(f"removed trust anchor {args.key_id}")
    return 0


def cmd_device_add(args: argparse.Namespace) -> int:
    from ..core.campaign import CampaignError, parse_tag

    try:
        tags = dict(parse_tag(t) for t in args.tag)
    except CampaignError as exc:
        raise CliError(str(exc)) from None
    psk, generated = _psk(args)
    with _store(args) as store:
        dev = store.add_device(
            args.device_id, args.vendor_domain, args.class_info, psk, _CLI_ACTOR, tags=tags
        )
    print(f"registered device {dev.id} ({dev.class_label})")
    if generated:
        # Shown once: only the sealed form is stored.
        print(f"psk {psk.hex()}")
    return 0


def reason_name(code: int) -> str:
    """A SUIT report reason by name ("condition_failed"), not by number."""
    try:
        return ReportReason(code).name.lower()
    except ValueError:
        return f"unknown reason {code}"


def _device_row(dev: DeviceRecord, last: ReportRecord | None) -> dict[str, Any]:
    """What an operator wants to know about a device at a glance; the running sequence
    number, state and reason are what the device last reported (nothing before that)."""
    return {
        "id": dev.id,
        "class": dev.class_label,
        "running_seq": last.installed_sequence if last else None,
        "state": last.state if last else None,
        "reason": reason_name(last.reason) if last else None,
        "last_seen": last.received_at if last else None,
        "last_report_counter": dev.last_counter,
    }


_DEVICE_COLUMNS = (
    ("DEVICE", "id"),
    ("CLASS", "class"),
    ("RUNNING SEQ", "running_seq"),
    ("STATE", "state"),
    ("LAST SEEN", "last_seen"),
    ("LAST REASON", "reason"),
)


def cmd_device_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        devices = store.list_devices()
        latest = store.latest_reports()
    rows = [_device_row(dev, latest.get(dev.id)) for dev in devices]
    emit_list(args, rows, _DEVICE_COLUMNS, "no devices (add one with 'otacoap device add')")
    return 0


def cmd_device_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        dev = store.get_device(args.device_id)
        if dev is None:
            raise NotFound(f"no device {args.device_id!r}")
        release = store.release_for_device(dev.id)
        last = store.latest_reports().get(dev.id)
        tags = store.device_tags(dev.id)
    row = _device_row(dev, last)
    row.update(
        dtls_identity=dev.id,
        vendor_domain=dev.vendor_domain,
        vendor_id=ids.uuid_str(dev.vendor_id),
        class_info=dev.class_info,
        class_id=ids.uuid_str(dev.class_id),
        registered=dev.created_at,
        release_seq=release.sequence_number if release else None,
        release_image=release.image.image_id if release else None,
        pinned=dev.assigned_release is not None,
        last_detail=last.detail if last and last.detail else None,
        tags=dict(tags),
    )
    pin = " (pinned)" if row["pinned"] else ""
    row["release"] = (
        f"seq {release.sequence_number}, image {release.image.image_id}{pin}" if release else "none"
    )
    row["tag_list"] = " ".join(f"{k}={v}" for k, v in tags.items()) or None
    labels = (
        ("id", "id"),
        ("dtls identity", "dtls_identity"),
        ("vendor domain", "vendor_domain"),
        ("vendor id", "vendor_id"),
        ("class info", "class_info"),
        ("class id", "class_id"),
        ("registered", "registered"),
        ("tags", "tag_list"),
        ("release", "release"),
        ("running seq", "running_seq"),
        ("state", "state"),
        ("last reason", "reason"),
        ("last detail", "last_detail"),
        ("last seen", "last_seen"),
        ("last report counter", "last_report_counter"),
    )
    emit_one(args, row, labels)
    return 0


def cmd_device_remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.remove_device(args.device_id, _CLI_ACTOR)
    print(f"removed device {args.device_id}")
    return 0


def cmd_device_rekey(args: argparse.Namespace) -> int:
    psk, generated = _psk(args)
    with _store(args) as store:
        store.rekey_device(args.device_id, psk, _CLI_ACTOR)
    print(f"new key for device {args.device_id}; sessions made with the old one end")
    if generated:
        print(f"psk {psk.hex()}")
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
    rows = [{"name": op.name, "identity": op.identity, "added_at": op.created_at} for op in ops]
    emit_list(
        args,
        rows,
        (("OPERATOR", "name"), ("DTLS IDENTITY", "identity"), ("ADDED", "added_at")),
        "no operators (add one with 'otacoap operator add')",
    )
    return 0


def cmd_operator_remove(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.remove_operator(args.name, _CLI_ACTOR)
    print(f"removed operator {args.name}")
    return 0


def cmd_operator_rekey(args: argparse.Namespace) -> int:
    psk, generated = _psk(args)
    with _store(args) as store:
        store.rekey_operator(args.name, psk, _CLI_ACTOR)
    print(f"new key for operator {args.name}; sessions made with the old one end")
    if generated:
        print(f"psk {psk.hex()}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    envelope = read_envelope_file(args.envelope)
    if args.server:
        if args.rollout != "all":
            raise CliError("--rollout none is a local publish (--data) for now")
        return _publish_remote(args, envelope)
    if args.identity or args.psk or args.psk_file:
        raise CliError("--identity, --psk-file and --psk only make sense with --server")
    datadir = _datadir(args)
    config = datadir.config()
    with contextlib.closing(datadir.open_store()) as store:
        publisher = Publisher(store, datadir.blobs, config.publish)
        done = publish_local(
            publisher,
            envelope,
            [Path(p) for p in args.image],
            args.delta,
            _CLI_ACTOR,
            make_current=args.rollout == "all",
        )
    for n, published in enumerate(done):
        campaign_only = n == 0 and args.rollout != "all" and published.delta_from is None
        print(published.line() + ("; rollout by campaign only" if campaign_only else ""))
    return 0


def _publish_remote(args: argparse.Namespace, envelope: bytes) -> int:
    psk = read_psk(args, OPERATOR_PSK_ENV, parse_psk_hex, what="operator PSK")
    if not args.identity or psk is None:
        raise CliError(
            "--server needs --identity NAME and the operator's PSK "
            f"(--psk-file FILE, ${OPERATOR_PSK_ENV} or --psk HEX)"
        )
    from .. import eventloop
    from ..operator.client import publish

    pairs = [(envelope, Path(args.image[0]))]
    pairs += [(read_envelope_file(e), Path(p)) for e, p in args.delta]
    try:
        for n, (env, path) in enumerate(pairs):  # a delta after its release, each like one
            result = eventloop.run(
                publish(
                    args.server,
                    args.identity,
                    psk,
                    env,
                    path,
                    timeout=args.timeout,
                    progress=UploadProgress(path.name, sys.stderr),
                    more=[Path(p) for p in args.image[1:]] if n == 0 else (),
                )
            )
            print(result)
    except KeyboardInterrupt:
        print(
            "\notacoap publish: interrupted; the partial upload was withdrawn from the server",
            file=sys.stderr,
        )
        return 130
    return 0


class UploadProgress:
    """Progress of a network upload on stderr: one updating line on a terminal, a line
    per tenth otherwise (a log stays readable), nothing for a file under 1 MiB."""

    def __init__(self, name: str, out: TextIO) -> None:
        self._name = name
        self._out = out
        self._tty = out.isatty()
        self._shown = -1

    def __call__(self, sent: int, total: int) -> None:
        if total < 1 << 20:
            return
        tenth = sent * 10 // total
        if not self._tty and tenth == self._shown:
            return
        self._shown = tenth
        line = f"uploading {self._name}: {sent / 2**20:.1f} of {total / 2**20:.1f} MiB"
        line += f" ({sent * 100 // total} %)"
        if self._tty:
            self._out.write("\r" + line + ("\n" if sent >= total else ""))
        else:
            self._out.write(line + "\n")
        self._out.flush()


def cmd_release_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        releases = store.list_releases(current_only=not args.all)
        current = {r.id for r in store.list_releases(current_only=True)}
        deltas = {r.id: store.deltas_of(r.id) for r in releases}
    rows: list[dict[str, Any]] = [
        {
            "class": r.class_label,
            "seq": r.sequence_number,
            "current": r.id in current,
            "image": r.image.image_id,
            "size": r.image.size,
            "signer": r.signer,
            "published_at": r.published_at,
            "published_by": r.published_by,
            # Delta envelopes of the release, by source image (store/deltas.py).
            "deltas": [
                {
                    "from": d.source_digest.hex(),
                    "patch": d.patch.image_id,
                    "size": d.patch.size,
                    "signer": d.signer,
                    "published_at": d.published_at,
                    "published_by": d.published_by,
                }
                for d in deltas[r.id]
            ],
        }
        for r in releases
    ]
    columns: list[tuple[str, str]] = [("CLASS", "class"), ("SEQ", "seq")]
    if args.all:
        columns.append(("CURRENT", "current"))
    columns += [
        ("IMAGE", "image"),
        ("BYTES", "size"),
        ("PUBLISHED", "published_at"),
        ("BY", "published_by"),
        ("DELTAS", "deltas"),
    ]
    if not args.json:  # one cell per release: "from <source> patch <id> (<n> bytes)", ...
        rows = [{**row, "deltas": _delta_cell(row["deltas"])} for row in rows]
    emit_list(args, rows, columns, "no releases")
    return 0


def _delta_cell(deltas: list[dict[str, Any]]) -> str | None:
    text = ", ".join(
        f"from {d['from'][:16]} patch {d['patch']} ({d['size']} bytes)" for d in deltas
    )
    return text or None


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
        if args.device and not reports and store.get_device(args.device) is None:
            # A typo must not look like a quiet device (a removed device's reports stay).
            raise NotFound(f"no device {args.device!r} and no reports from it")
    rows = [
        {
            "received_at": r.received_at,
            "device": r.device_id,
            "counter": r.counter,
            "state": r.state,
            "reason": reason_name(r.reason),
            "reason_code": r.reason,
            "seq": r.sequence_number,
            "installed_seq": r.installed_sequence,
            "bytes_received": r.bytes_received,
            "detail": r.detail,
            "lost_before": r.lost,
            "note": f"{r.lost} earlier reports lost on the device" if r.lost else None,
        }
        for r in reports
    ]
    columns: tuple[tuple[str, str], ...] = (
        ("RECEIVED", "received_at"),
        ("DEVICE", "device"),
        ("#", "counter"),
        ("STATE", "state"),
        ("REASON", "reason"),
        ("SEQ", "seq"),
        ("DETAIL", "detail"),
    )
    if any(r.lost for r in reports):
        columns = (*columns[:-1], ("LOST BEFORE", "lost_before"), columns[-1])
    emit_list(args, rows, columns, "no reports")
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        entries = store.audit_entries(args.limit)
    rows = [
        {
            "seq": e.seq,
            "ts": e.ts,
            "actor": e.actor,
            "action": e.action,
            "subject": e.subject,
            "outcome": e.outcome,
            "detail": e.detail,
            "hash": e.hash.hex(),
        }
        for e in entries
    ]
    columns = (
        ("#", "seq"),
        ("TIME", "ts"),
        ("ACTOR", "actor"),
        ("ACTION", "action"),
        ("SUBJECT", "subject"),
        ("OUTCOME", "outcome"),
        ("DETAIL", "detail"),
    )
    emit_list(args, rows, columns, "the audit log is empty")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    checkpoint = None
    if args.checkpoint:
        try:
            checkpoint = read_capped(args.checkpoint, MAX_CHECKPOINT_FILE)
        except ValueError:
            raise CliError(f"{args.checkpoint}: not an audit checkpoint (too large)") from None
    with _store(args) as store:
        try:
            count, head = store.verify_audit(checkpoint)
        except CheckpointInvalid as exc:
            raise CliError(f"{args.checkpoint}: {exc}") from None
    held = f"; checkpoint {args.checkpoint} holds" if args.checkpoint else ""
    print(f"audit log OK: {count} entries, head {head.hex()}{held}")
    return 0


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    if os.path.exists(args.file) and not args.force:
        raise CliError(f"{args.file} exists (use --force to replace it)")
    parent = Path(args.file).parent
    if not parent.is_dir():
        raise CliError(f"{args.file}: directory {parent} does not exist")
    with _store(args) as store:
        data = store.audit_checkpoint()
    atomic_write(args.file, data, mode=0o644)
    doc = json.loads(data)
    print(
        f"audit log OK: checkpoint of {doc['count']} entries, head {doc['head']}, written "
        f"to {args.file}; keep a copy off this machine"
    )
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
        metrics=args.metrics,
        log_format=args.log_format,
        worker=args.worker,
    )
    server = options.apply(config).server
    try:
        if args.workers > 1 and args.worker is None:
            from .serve_workers import run_workers

            return run_workers(args, datadir, options.apply(config), options)
        # DESIGN.md: the command line chooses the event loop (uvloop by default).
        return eventloop.run(serve(datadir, config, options), server.loop)
    except OtaError:
        raise
    except OSError as exc:
        raise CliError(_serve_failure(exc, server.bind, server.port)) from None


def _serve_failure(exc: OSError, bind: str, port: int) -> str:
    """Name what failed: a file of the data directory, or the address (and why)."""
    if exc.filename is not None:
        problem = (exc.strerror or str(exc)).lower()
        return f"{exc.filename}: {problem} (is the data directory writable?)"
    # uvloop reports a failed bind as a bare "could not bind" with the real error chained.
    if exc.errno is None and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    where = f"cannot serve on {f'[{bind}]' if ':' in bind else bind}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use (another otacoap serve, or another CoAP server?)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no interface of this host has that address"
    return f"{where}: {exc.strerror or exc}"
