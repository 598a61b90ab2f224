"""`otacoap anchors ...`: issue, inspect, publish and follow signed anchor lists.

* `issue` is offline, like `manifest sign`: it needs the root private keys (the current
  roots, and on a root change the new ones too) and writes a signed list to a file.
  It never touches a data directory.
* `publish` stores the next version of a class's list in the data directory (checked
  as a device checks it, audited); the server serves it on /a.
* `list` shows the published lists; `status` what each device last reported (the
  anchor version it holds and its freshness outcome).
* `freshness-key` makes this server's online freshness key (TUF's timestamp role) and
  prints its public key, to be named in the next list with `issue --freshness-key`.

Design and threat model: docs/decisions/anchor-rotation.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cliargs import CliError
from ..core import anchor_list, cose, ids
from ..core.freshness import Freshness
from ..fsutil import atomic_write, read_capped
from ..store import DataDir
from ..store.anchor_lists import freshness_key_path
from .manifest_cmds import load_anchor, load_signing_key
from .output import emit_list, emit_one, json_parent
from .server_cmds import _CLI_ACTOR, _common, _store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = _common()
    p = sub.add_parser(
        "anchors", help="rotate and revoke a device class's author keys (signed anchor lists)"
    )
    g = p.add_subparsers(dest="anchors_command", metavar="SUBCOMMAND", parser_class=type(p))
    g.required = True

    i = g.add_parser(
        "issue",
        help="sign a new anchor list (offline: needs the root private keys)",
        description="Write the signed anchor list VERSION for a class: its roots, author "
        "keys and freshness keys. Sign with the current roots (at least their threshold) "
        "and, when the roots change, with the new ones too (TUF root rotation).",
    )
    i.add_argument("--vendor-domain", required=True, metavar="DOMAIN", help="vendor domain")
    i.add_argument("--class-info", required=True, metavar="TEXT", help="device class")
    i.add_argument("--version", required=True, type=int, metavar="N", help="1 + the current one")
    i.add_argument(
        "--root",
        action="append",
        required=True,
        metavar="ROOT.pub",
        help="a root key of the NEW list (repeatable, 1..3)",
    )
    i.add_argument("--threshold", type=int, default=1, metavar="K", help="roots needed (default 1)")
    i.add_argument(
        "--author",
        action="append",
        required=True,
        metavar="AUTHOR.pub",
        help="an author key devices accept manifests from (repeatable, 1..4); a key "
        "left out is revoked",
    )
    i.add_argument(
        "--freshness-key",
        action="append",
        default=[],
        metavar="FRESH.pub",
        help="an online freshness key (repeatable, 0..2; `anchors freshness-key`)",
    )
    i.add_argument(
        "--sign",
        action="append",
        required=True,
        metavar="ROOT.key",
        help="a root private key to sign with: the current roots and any new ones",
    )
    i.add_argument("-o", "--out", required=True, metavar="OUT", help="signed list to write")
    i.set_defaults(handler=cmd_issue, _cmd_path=["anchors", "issue"])

    q = g.add_parser("publish", parents=[common], help="store and serve a signed list")
    q.add_argument("list", metavar="LIST.cbor")
    q.set_defaults(handler=cmd_publish, _cmd_path=["anchors", "publish"])

    js = json_parent()
    v = g.add_parser("inspect", parents=[js], help="show what a signed list says")
    v.add_argument("list", metavar="LIST.cbor")
    v.set_defaults(handler=cmd_inspect, _cmd_path=["anchors", "inspect"])

    s = g.add_parser("list", parents=[common, js], help="published anchor lists")
    s.set_defaults(handler=cmd_list, _cmd_path=["anchors", "list"])

    t = g.add_parser(
        "status",
        parents=[common, js],
        help="anchor version and freshness each device reported",
    )
    t.set_defaults(handler=cmd_status, _cmd_path=["anchors", "status"])

    f = g.add_parser(
        "freshness-key",
        parents=[common],
        help="create this server's online freshness key; print its public key",
    )
    f.add_argument("--out", metavar="PUB", help="also write the public key (PEM) here")
    f.add_argument("--force", action="store_true", help="replace an existing key")
    f.set_defaults(handler=cmd_freshness_key, _cmd_path=["anchors", "freshness-key"])


def _keys(paths: list[str]) -> tuple[anchor_list.Key, ...]:
    return tuple(anchor_list.compact_key(load_anchor(p)) for p in paths)


def cmd_issue(args: argparse.Namespace) -> int:
    vendor = ids.vendor_id(args.vendor_domain)
    contents = anchor_list.AnchorList(
        version=args.version,
        vendor_id=vendor,
        class_id=ids.class_id(vendor, args.class_info),
        roots=_keys(args.root),
        threshold=args.threshold,
        authors=_keys(args.author),
        freshness=_keys(args.freshness_key),
    )
    signers = [load_signing_key(p) for p in args.sign]
    signed = anchor_list.sign(contents, signers)
    new_roots = set(contents.roots)
    own = sum(1 for k in signers if anchor_list.compact_key(k.public) in new_roots)
    if own < contents.threshold:
        raise CliError(
            f"the list is signed by {own} of its own roots, {contents.threshold} needed "
            "(devices would refuse it)"
        )
    atomic_write(args.out, signed)
    print(
        f"wrote {args.out}: anchor list version {contents.version} for "
        f"{args.vendor_domain}/{args.class_info}, {len(contents.authors)} author keys, "
        f"{len(contents.freshness)} freshness keys, roots {contents.threshold}-of-"
        f"{len(contents.roots)}, {len(signers)} signatures"
    )
    return 0


def _read_list(path: str) -> bytes:
    return read_capped(path, anchor_list.MAX_ANCHOR_LIST_SIZE)


def cmd_inspect(args: argparse.Namespace) -> int:
    signed = anchor_list.decode_signed(_read_list(args.list))
    c = signed.contents
    row = {
        "version": c.version,
        "vendor_id": c.vendor_id.hex(),
        "class_id": c.class_id.hex(),
        "roots": f"{c.threshold}-of-{len(c.roots)}: " + _ids(c.roots),
        "root_ids": [anchor_list.key_id(k) for k in c.roots],
        "threshold": c.threshold,
        "authors": _ids(c.authors),
        "freshness": _ids(c.freshness) or "(none)",
        "signatures": len(signed.signatures),
    }
    labels = [(k, k) for k in ("version", "vendor_id", "class_id", "roots", "authors")]
    emit_one(args, row, [*labels, ("freshness", "freshness"), ("signatures (not verified here)",
                                                               "signatures")])  # fmt: skip
    return 0


def _ids(keys: tuple[anchor_list.Key, ...]) -> str:
    return ", ".join(anchor_list.key_id(k) for k in keys)


def cmd_publish(args: argparse.Namespace) -> int:
    body = _read_list(args.list)
    contents = anchor_list.decode_signed(body).contents
    with _store(args) as store:
        label = store.class_has_devices((contents.vendor_id, contents.class_id))
        if label is None:
            raise CliError("no registered device belongs to this list's vendor and class")
        rec = store.publish_anchor_list(body, label, _CLI_ACTOR)
    print(f"published anchor list version {rec.version} for {label}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        records = store.list_anchor_lists()
    rows = [
        {
            "class": f"{r.vendor_id.hex()[:8]}/{r.class_id.hex()[:8]}",
            "vendor_id": r.vendor_id.hex(),
            "class_id": r.class_id.hex(),
            "version": r.version,
            "authors": _ids(r.contents.authors),
            "freshness": _ids(r.contents.freshness) or None,
            "published_at": r.published_at,
            "published_by": r.published_by,
        }
        for r in records
    ]
    columns = (
        ("CLASS", "class"),
        ("VERSION", "version"),
        ("AUTHORS", "authors"),
        ("FRESHNESS", "freshness"),
        ("PUBLISHED", "published_at"),
        ("BY", "published_by"),
    )
    emit_list(args, rows, columns, "no anchor lists published")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _store(args) as store:
        rows = list(store.anchor_status())
    out = [
        {
            "device": row.device_id,
            "anchor_version": row.anchor_version,
            "freshness": None if row.freshness is None else Freshness(row.freshness).name.lower(),
        }
        for row in rows
    ]
    columns = (("DEVICE", "device"), ("ANCHOR VERSION", "anchor_version"),
               ("FRESHNESS", "freshness"))  # fmt: skip
    emit_list(args, out, columns, "no devices")
    return 0


def cmd_freshness_key(args: argparse.Namespace) -> int:
    datadir = DataDir(Path(args.data))
    datadir.check()
    path = freshness_key_path(datadir.root)
    if path.exists() and not args.force:
        raise CliError(f"{path} exists (use --force to replace it; devices then need a new list)")
    key = cose.generate_key("es256")
    atomic_write(path, key.pem, mode=0o600)
    if args.out:
        atomic_write(args.out, key.public.public_pem())
    print(f"wrote {path} (0600); key id {key.public.key_id}; restart `otacoap serve` to use it")
    print(key.public.public_pem().decode().strip())
    return 0
