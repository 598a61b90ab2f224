"""An audit log its owner cannot rewrite unseen (issue 10 §3).

Someone who can write otacoap.db (drop the triggers, edit rows, fix up the count) but
does not hold server.key must not be able to make `otacoap audit verify` say OK over a
log that lies: the chain is keyed (HMAC with a key derived from server.key), its head
is sealed with that key, a checkpoint file kept elsewhere pins everything before it,
and the store is cross-checked against the log.

The tests on a published data directory run on both backends: the tampering is done
with the database's own client (sqlite3, or psycopg on the PostgreSQL store), as
someone with write access to the database would.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from server_helpers import CLASS_A, DeviceSpec, Setup, cli, cli_ok, make_image, make_setup

from otacoap.config import load_config
from otacoap.store import DataDir
from otacoap.store import audit as chain
from otacoap.store import sqlite as sqlite_store
from otacoap.store.errors import AuditChainBroken


class _Raw:
    """The data directory's database through its own client, no otacoap in between:
    sqlite3 on otacoap.db, or psycopg on the PostgreSQL store config.toml names."""

    def __init__(self, db_path: Path) -> None:
        self.url = load_config(db_path.parent / "config.toml").store.url
        self._conn: Any = psycopg.connect(self.url) if self.url else sqlite3.connect(db_path)

    def _sql(self, sql: str) -> str:
        if not self.url:
            return sql
        if sql.startswith("DROP TRIGGER"):
            sql += " ON audit"
        return sql.replace("?", "%s")

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        return self._conn.execute(self._sql(sql), params)

    def executemany(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        self._conn.cursor().executemany(self._sql(sql), rows)

    def commit(self) -> None:
        self._conn.commit()

    def close(self) -> None:
        self._conn.close()


def _tamper(db_path: Path, *sql: str, params: tuple[object, ...] = ()) -> None:
    """What someone with write access to the file can do: drop the triggers, edit rows."""
    db = _Raw(db_path)
    db.execute("DROP TRIGGER IF EXISTS audit_no_update")
    db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    for statement in sql:
        db.execute(statement, params) if "?" in statement else db.execute(statement)
    db.commit()
    db.close()


def _rows(db_path: Path) -> list[chain.AuditEntry]:
    db = _Raw(db_path)
    try:
        return [
            chain.AuditEntry(*r)
            for r in db.execute(
                "SELECT seq, ts, actor, action, subject, outcome, detail, prev_hash, hash "
                "FROM audit ORDER BY seq"
            )
        ]
    finally:
        db.close()


def _rewrite_chain(
    db_path: Path,
    entries: list[chain.AuditEntry],
    *,
    key: bytes | None,
) -> None:
    """Replace the whole audit table by `entries`, every hash recomputed from scratch
    (plain SHA-256 with key=None, as the old chain was; HMAC with a key otherwise)."""
    prev = chain.GENESIS
    rebuilt = []
    for i, e in enumerate(entries, start=1):
        new = chain.make_entry(
            i, e.ts, e.actor, e.action, e.subject, e.outcome, e.detail, prev, key=key
        )
        rebuilt.append(new)
        prev = new.hash
    db = _Raw(db_path)
    db.execute("DROP TRIGGER IF EXISTS audit_no_update")
    db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    db.execute("DELETE FROM audit")
    db.executemany(
        "INSERT INTO audit (seq, ts, actor, action, subject, outcome, detail, prev_hash, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (e.seq, e.ts, e.actor, e.action, e.subject, e.outcome, e.detail, e.prev_hash, e.hash)
            for e in rebuilt
        ],
    )
    db.execute("UPDATE meta SET value = ? WHERE key = 'audit_count'", (len(rebuilt),))
    db.commit()
    db.close()


def _reseal(d: DataDir) -> None:
    """Seal the current head with the real key: only someone holding server.key can."""
    entries = _rows(d.db_path)
    head = entries[-1].hash if entries else chain.GENESIS
    mac = chain.seal_mac(d.sealer().audit_keys.chain, len(entries), head)
    _tamper(
        d.db_path,
        "UPDATE audit_seal SET count = ?, head = ?, mac = ?",
        params=(len(entries), head, mac),
    )


def _verify_fails(data: Path, message: str, *extra: str | Path) -> str:
    result = cli("audit", "verify", "--data", data, *extra)
    assert result.code == 1, result.out
    assert result.err.count("\n") == 1 and "Traceback" not in result.err, result.err
    assert message in result.err, result.err
    return result.err


@pytest.fixture
def published(tmp_path: Path, store_url: str) -> Setup:
    """A data dir with a trust anchor, an operator, a device and one live release, on
    SQLite and on PostgreSQL (conftest.store_url)."""
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")], operators=["ops"], store_url=store_url)
    setup.publish(setup.release(CLASS_A, 1, make_image("a", 300)))
    assert "audit log OK" in cli_ok("audit", "verify", "--data", setup.data)
    return setup


# --- the keyed chain -------------------------------------------------------------------


def test_the_chain_key_is_derived_from_server_key_and_never_stored(published: Setup) -> None:
    d = DataDir(published.data)
    key = d.sealer().audit_keys.chain
    blob = b"".join(p.read_bytes() for p in d.root.glob("otacoap.db*"))
    assert key not in blob
    entries = _rows(d.db_path)
    # Each link is an HMAC under that key, not a plain SHA-256 anyone can recompute.
    first = entries[0]
    plain = chain.entry_hash(*_fields(first))
    keyed = chain.entry_hash(*_fields(first), key=key)
    assert first.hash == keyed != plain


def _fields(e: chain.AuditEntry) -> tuple[int, str, str, str, str, str, str, bytes]:
    return (e.seq, e.ts, e.actor, e.action, e.subject, e.outcome, e.detail, e.prev_hash)


def test_a_whole_chain_recomputation_without_the_key_is_detected(published: Setup) -> None:
    """The trial of the issue: a real publish rewritten to look refused, every hash
    after it recomputed, the release still live."""
    d = DataDir(published.data)
    entries = _rows(d.db_path)
    edited = [
        e
        if e.action != "publish"
        else chain.AuditEntry(*_fields(e)[:5], "refused", *_fields(e)[6:], e.hash)
        for e in entries
    ]
    _rewrite_chain(d.db_path, edited, key=None)
    _verify_fails(published.data, "audit entry 1: content does not match")
    # Recomputed with some other key (another data dir's): no better.
    other = DataDir(published.data.parent / "other")
    other.init()
    _rewrite_chain(d.db_path, edited, key=other.sealer().audit_keys.chain)
    _verify_fails(published.data, "audit entry 1: content does not match")


def test_an_edited_entry_is_detected(published: Setup) -> None:
    seq = next(e.seq for e in _rows(published.data / "otacoap.db") if e.action == "publish")
    _tamper(published.data / "otacoap.db", f"UPDATE audit SET outcome='refused' WHERE seq={seq}")
    _verify_fails(published.data, f"audit entry {seq}: content does not match")


def test_tail_truncation_with_the_count_fixed_is_detected(published: Setup) -> None:
    """Delete the last entries and lower the count to match: the prefix is a valid
    chain, but the head no longer matches the keyed seal the store keeps."""
    db = published.data / "otacoap.db"
    n = len(_rows(db))
    _tamper(
        db,
        f"DELETE FROM audit WHERE seq > {n - 2}",
        f"UPDATE meta SET value = {n - 2} WHERE key = 'audit_count'",
    )
    _verify_fails(published.data, "removed from the end")
    # Dropping the seal as well does not help.
    _tamper(db, "DELETE FROM audit_seal")
    _verify_fails(published.data, "seal")


# --- checkpoints -----------------------------------------------------------------------


def test_checkpoint_is_written_once_and_verifies(published: Setup, tmp_path: Path) -> None:
    cp = tmp_path / "offsite" / "audit.checkpoint"
    cp.parent.mkdir()
    out = cli_ok("audit", "checkpoint", "--data", published.data, cp)
    n = len(_rows(published.data / "otacoap.db"))
    assert f"{n} entries" in out and cp.is_file()
    result = cli("audit", "checkpoint", "--data", published.data, cp)
    assert result.code == 1 and "--force" in result.err and result.err.count("\n") == 1
    result = cli("audit", "checkpoint", "--data", published.data, tmp_path / "no" / "cp")
    assert result.code == 1 and "does not exist" in result.err and ".tmp" not in result.err
    cli_ok("device", "add", "--data", published.data, "t2", "--vendor-domain", "v.example",
           "--class-info", "c")  # fmt: skip
    out = cli_ok("audit", "verify", "--data", published.data, "--checkpoint", cp)
    assert f"audit log OK: {n + 1} entries" in out and f"checkpoint {cp}" in out
    assert "audit log OK" in cli_ok("audit", "checkpoint", "--data", published.data, cp, "--force")


def _admin(url: str) -> tuple[Any, str]:
    """An autocommit connection to the cluster's `postgres` database, and the store's
    database name (CREATE DATABASE ... TEMPLATE needs no one connected to the template)."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    return psycopg.connect(parts._replace(path="/postgres").geturl(), autocommit=True), name


def _copy_database(url: str, suffix: str) -> None:
    conn, name = _admin(url)
    with conn:
        conn.execute(f'CREATE DATABASE "{name}_{suffix}" TEMPLATE "{name}"')


def _restore_database(url: str, suffix: str) -> None:
    """Put the older copy back under the store's name (a restored backup)."""
    conn, name = _admin(url)
    with conn:
        conn.execute(f'DROP DATABASE "{name}"')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{name}_{suffix}"')


def test_checkpoint_catches_a_rollback_to_an_older_database(
    published: Setup, tmp_path: Path
) -> None:
    """Restoring an older copy of the database (its own seal is valid) is a truncation
    with everything fixed up: only a checkpoint taken later, kept elsewhere, sees it."""
    db = published.data / "otacoap.db"
    backup = tmp_path / "old.db"
    url = load_config(published.data / "config.toml").store.url
    _copy_database(url, "old") if url else shutil.copyfile(db, backup)
    cli_ok("device", "add", "--data", published.data, "t2", "--vendor-domain", "v.example",
           "--class-info", "c")  # fmt: skip
    cp = tmp_path / "audit.checkpoint"
    cli_ok("audit", "checkpoint", "--data", published.data, cp)
    if url:
        _restore_database(url, "old")
    else:
        shutil.copyfile(backup, db)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    assert "audit log OK" in cli_ok("audit", "verify", "--data", published.data)
    _verify_fails(published.data, "entries were removed", "--checkpoint", cp)


def test_checkpoint_catches_a_rewrite_before_it(published: Setup, tmp_path: Path) -> None:
    cp = tmp_path / "audit.checkpoint"
    cli_ok("audit", "checkpoint", "--data", published.data, cp)
    d = DataDir(published.data)
    entries = _rows(d.db_path)
    # Even someone holding server.key who rewrites history (and the seal) is caught by
    # the checkpoint kept elsewhere.
    first = entries[0]
    edited = [chain.AuditEntry(*_fields(first)[:6], "rewritten", first.prev_hash, first.hash)]
    edited += entries[1:]
    _rewrite_chain(d.db_path, edited, key=d.sealer().audit_keys.chain)
    _reseal(d)
    _verify_fails(published.data, "checkpoint", "--checkpoint", cp)


def test_an_edited_or_foreign_checkpoint_is_refused(published: Setup, tmp_path: Path) -> None:
    cp = tmp_path / "audit.checkpoint"
    cli_ok("audit", "checkpoint", "--data", published.data, cp)
    text = cp.read_text()
    n = len(_rows(published.data / "otacoap.db"))
    cp.write_text(text.replace(f'"count": {n}', f'"count": {n - 1}'))
    assert cp.read_text() != text
    _verify_fails(published.data, "does not verify", "--checkpoint", cp)
    other = tmp_path / "other"
    cli_ok("init", other)
    foreign = tmp_path / "foreign.checkpoint"
    cli_ok("audit", "checkpoint", "--data", other, foreign)
    _verify_fails(published.data, "does not verify", "--checkpoint", foreign)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\xff not json")
    _verify_fails(published.data, "not an audit checkpoint", "--checkpoint", garbage)


# --- the store against the log ---------------------------------------------------------


def test_a_release_inserted_without_its_publish_entry_is_an_error(published: Setup) -> None:
    """The chain is intact, but the store holds a release the log never saw."""
    _tamper(
        published.data / "otacoap.db",
        "INSERT INTO releases (vendor_id, class_id, class_label, seq, manifest_digest, "
        "envelope, image_digest, signer, published_at, published_by) "
        "SELECT vendor_id, class_id, class_label, 99, manifest_digest, envelope, "
        "image_digest, signer, published_at, published_by FROM releases LIMIT 1",
    )
    _verify_fails(published.data, "seq 99 has no publish audit entry")


def test_a_deleted_release_entry_is_detected(published: Setup) -> None:
    d = DataDir(published.data)
    entries = _rows(d.db_path)
    seq = next(e.seq for e in entries if e.action == "publish")
    # Without the key: the chain breaks where the entry was.
    _tamper(d.db_path, f"DELETE FROM audit WHERE seq = {seq}")
    _verify_fails(published.data, f"audit entry {seq} is missing")
    # With the key (an insider, or a bug), the chain and seal can be made whole again;
    # the release without its entry is still found.
    _rewrite_chain(d.db_path, [e for e in entries if e.seq != seq], key=d.sealer().audit_keys.chain)
    _reseal(d)
    store = d.open_store()
    try:
        with pytest.raises(AuditChainBroken, match="seq 1 has no publish audit entry"):
            store.verify_audit()
    finally:
        store.close()


def test_devices_operators_and_anchors_without_their_entries_are_errors(published: Setup) -> None:
    db = published.data / "otacoap.db"
    _tamper(
        db,
        "INSERT INTO devices (id, vendor_domain, class_info, vendor_id, class_id, psk_sealed, "
        "created_at) SELECT 'ghost', vendor_domain, class_info, vendor_id, class_id, "
        "psk_sealed, created_at FROM devices WHERE id = 't1'",
    )
    _verify_fails(published.data, "device 'ghost' has no device.add audit entry")
    _tamper(db, "DELETE FROM devices WHERE id = 'ghost'")
    _tamper(db, "INSERT INTO operators (name, psk_sealed, created_at) "
                "SELECT 'mallory', psk_sealed, created_at FROM operators")  # fmt: skip
    _verify_fails(published.data, "operator 'mallory' has no operator.add audit entry")
    _tamper(db, "DELETE FROM operators WHERE name = 'mallory'")
    _tamper(db, "INSERT INTO trust_anchors (key_id, kind, material, added_at) "
                "SELECT 'f00d', kind, material, added_at FROM trust_anchors")  # fmt: skip
    _verify_fails(published.data, "trust anchor 'f00d' has no trust.add audit entry")
    _tamper(db, "DELETE FROM trust_anchors WHERE key_id = 'f00d'")
    assert "audit log OK" in cli_ok("audit", "verify", "--data", published.data)


def test_a_removed_device_put_back_by_hand_is_an_error(published: Setup) -> None:
    """Its sealed PSK still opens (it is bound to the identity, not the row): the log
    is what says the device was removed."""
    db = published.data / "otacoap.db"
    conn = _Raw(db)
    row = conn.execute("SELECT * FROM devices WHERE id = 't1'").fetchone()
    conn.close()
    cli_ok("device", "remove", "--data", published.data, "t1")
    marks = ", ".join("?" for _ in row)
    _tamper(db, f"INSERT INTO devices VALUES ({marks})", params=tuple(row))
    _verify_fails(published.data, "device 't1' was removed")


def test_unknown_actions_do_not_break_the_cross_check(published: Setup) -> None:
    store = DataDir(published.data).open_store()
    try:
        store.audit("cli:x", "device.rekey", "t1", "ok", "new PSK")
        store.audit("cli:x", "operator.rekey", "ops", "ok")
        store.audit("cli:x", "something.new", "t1", "ok")
        store.verify_audit()
    finally:
        store.close()


# --- upgrading a data directory with a plain chain ---------------------------------------


@pytest.fixture
def legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int]:
    """A data dir as the code before migration 4 left it: every migration but 4, no
    seal, a plain SHA-256 chain (the others' tables are there, since today's code uses
    them; migration 4 then runs when the test opens it). Returns the directory and its
    entry count."""
    with monkeypatch.context() as m:
        older = tuple(mig for mig in sqlite_store.MIGRATIONS if mig[0] != 4)
        m.setattr(sqlite_store, "MIGRATIONS", older)
        m.setattr(sqlite_store.SQLiteStore, "_seal", lambda self, count, head: None)
        setup = make_setup(tmp_path, devices=[DeviceSpec("t1")], operators=["ops"])
        setup.publish(setup.release(CLASS_A, 1, make_image("a", 300)))
    db = setup.data / "otacoap.db"
    entries = _rows(db)
    _rewrite_chain(db, entries, key=None)
    conn = sqlite3.connect(db)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    versions = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
    conn.close()
    assert "audit_seal" not in tables and 4 not in versions
    return setup.data, len(entries)


def test_migration_anchors_a_keyed_chain_on_the_plain_one(legacy: tuple[Path, int]) -> None:
    data, n = legacy
    cli_ok("device", "add", "--data", data, "t2", "--vendor-domain", "v.example",
           "--class-info", "c")  # fmt: skip
    out = cli_ok("audit", "verify", "--data", data)
    assert f"audit log OK: {n + 2} entries" in out
    listing = cli_ok("audit", "list", "--data", data).splitlines()[1:]  # under the header
    assert "audit.rekey" in listing[n] and f"plain 1..{n}" in listing[n]
    entries = _rows(data / "otacoap.db")
    key = DataDir(data).sealer().audit_keys.chain
    assert entries[n].hash == chain.entry_hash(*_fields(entries[n]), key=key)
    # The plain part is still covered: the first keyed entry links to its head.
    _tamper(data / "otacoap.db", "UPDATE audit SET detail='x' WHERE seq = 2")
    _verify_fails(data, "audit entry 2: content does not match")


def test_claiming_more_plain_entries_after_migration_is_detected(
    legacy: tuple[Path, int],
) -> None:
    data, n = legacy
    cli_ok("device", "add", "--data", data, "t2", "--vendor-domain", "v.example",
           "--class-info", "c")  # fmt: skip
    d = DataDir(data)
    entries = _rows(d.db_path)
    # Recompute everything plain and say all of it predates the key: no keyed marker
    # vouches for that count, so it is refused.
    _rewrite_chain(d.db_path, entries, key=None)
    _tamper(d.db_path, f"UPDATE meta SET value = {n + 2} WHERE key = 'audit_plain_count'")
    _verify_fails(data, "re-keying")
