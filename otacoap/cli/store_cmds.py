"""`otacoap store migrate --to postgresql://...`: move a data directory's SQLite store
into PostgreSQL (store/postgres.py), audit chain included.

Order of events, so a failure leaves the data directory as it was: the SQLite log is
verified first (a broken chain is not carried over), every row is copied in one
PostgreSQL transaction, the copy's chain is verified with the same server.key and
must end at the same entry and head, and only then does config.toml's [store] url
change (atomically). otacoap.db stays where it is, unused, as the pre-migration copy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from pathlib import Path

from ..cliargs import CliError
from ..config import check_store_url, default_toml
from ..fsutil import atomic_write
from ..store import DEFAULT_DATA_DIR, DataDir, SQLiteStore


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("store", help="the store's backend (SQLite file or PostgreSQL)")
    g = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND", parser_class=type(p))
    g.required = True
    m = g.add_parser(
        "migrate",
        help="copy the SQLite store into PostgreSQL and switch the data directory to it",
        description="Copy every record of DIR/otacoap.db (releases, devices, reports, "
        "campaigns, the audit chain and its seal) into an empty PostgreSQL database, "
        "verify the copied audit chain, then point config.toml's [store] url at it. "
        "Stop the server first. otacoap.db is left in place, unused.",
    )
    m.add_argument(
        "--data",
        metavar="DIR",
        default=DEFAULT_DATA_DIR,
        help=f"data directory (default: ./{DEFAULT_DATA_DIR})",
    )
    m.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="postgresql://USER@HOST/DB of an empty database (password: ~/.pgpass)",
    )
    m.set_defaults(handler=cmd_store_migrate, _cmd_path=["store", "migrate"])


def cmd_store_migrate(args: argparse.Namespace) -> int:
    from ..store.postgres import PostgresStore, copy_from_sqlite, redact

    url: str = args.to
    if not url.startswith(("postgresql://", "postgres://")):
        raise CliError(f"--to must be a postgresql:// URL, not {url!r}")
    check_store_url(url)
    datadir = DataDir(Path(args.data))
    datadir.check()
    if datadir.store_url():
        raise CliError(
            f"{datadir.root} already keeps its store in {redact(datadir.store_url())}; "
            "nothing to migrate"
        )
    with contextlib.closing(SQLiteStore(datadir.db_path, datadir.sealer())) as source:
        source.verify_audit()  # a broken log is not carried over
        target_store = PostgresStore(url, datadir.sealer(), blobs=datadir.blobs)
        with contextlib.closing(target_store) as target:
            copied, (count, head) = copy_from_sqlite(source, target)
            pg_count, pg_head = target.verify_audit()
            if (pg_count, pg_head) != (count, head):
                raise CliError(
                    f"the copied audit log ends at entry {pg_count}, the source at {count}: "
                    "config.toml left unchanged"
                )
            target.audit(
                "cli",
                "store.migrate",
                redact(url),
                "ok",
                f"copied from {datadir.db_path.name}: {count} audit entries, "
                + ", ".join(f"{n} {t}" for t, n in sorted(copied.items()) if n),
            )
    _set_store_url(datadir, url)
    print(
        f"migrated {datadir.root} to {redact(url)}: {count} audit entries verified; "
        f"{datadir.db_path.name} is kept, unused"
    )
    return 0


def _set_store_url(datadir: DataDir, url: str) -> None:
    """config.toml's [store] url = URL, the rest of the file as it was."""
    text = datadir.config_path.read_text(encoding="utf-8")
    line = f"url = {json.dumps(url)}"
    section = re.search(r"(?m)^\[store\][^\n]*\n", text)
    if section is None:
        if "[store]" not in default_toml():  # pragma: no cover - config.py names it
            raise CliError("this otacoap has no [store] section")
        text = text.rstrip("\n") + f"\n\n[store]\n{line}\n"
    else:
        rest = text[section.end() :]
        nxt = re.search(r"(?m)^\[", rest)
        body, tail = (rest[: nxt.start()], rest[nxt.start() :]) if nxt else (rest, "")
        body, n = re.subn(r'(?m)^url\s*=\s*"[^"\n]*"', line, body, count=1)
        if n == 0:
            body = line + "\n" + body
        text = text[: section.end()] + body + tail
    atomic_write(datadir.config_path, text.encode(), mode=0o644)
    if datadir.store_url() != url:  # re-read: the file must now name it
        raise CliError(f"{datadir.config_path}: could not set [store] url")
