"""PSK encryption at rest and the audit log's hash chain (issue 3 §2, §5), on both
backends: SQLite, and a real PostgreSQL server (conftest.store_url), tampered with
through its own client as someone with write access to the database would."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest
from server_helpers import cli

from otacoap.store import DataDir, SQLiteStore
from otacoap.store.audit import GENESIS, make_entry, verify_chain
from otacoap.store.errors import AuditChainBroken, StoreError
from otacoap.store.secrets import PskSealer

_PG_DATA: list[Path] = []  # the PostgreSQL server's data directory, when it is used


@pytest.fixture
def datadir(tmp_path: Path, store_url: str, request: pytest.FixtureRequest) -> DataDir:
    d = DataDir(tmp_path / "data")
    d.init(store_url=store_url or None)
    _PG_DATA[:] = [request.getfixturevalue("pg_server").data] if store_url else []
    return d


def _files(d: DataDir) -> bytes:
    """Every byte the database keeps on disk: otacoap.db and its WAL, or the
    PostgreSQL database's heap files and the server's WAL after a checkpoint."""
    if not d.store_url():
        return b"".join(p.read_bytes() for p in d.root.glob("otacoap.db*"))
    with psycopg.connect(d.store_url(), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        row = conn.execute(
            "SELECT oid FROM pg_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    # This database's files, and the write-ahead log every database shares.
    files = [*(_PG_DATA[0] / "base" / str(row[0])).iterdir(), *(_PG_DATA[0] / "pg_wal").iterdir()]
    return b"".join(p.read_bytes() for p in files if p.is_file())


def _raw(d: DataDir) -> Any:
    """The database's own client (no otacoap in between)."""
    return psycopg.connect(d.store_url()) if d.store_url() else sqlite3.connect(d.db_path)


def _sql(d: DataDir, sql: str) -> str:
    if not d.store_url():
        return sql
    sql = re.sub(r"x'([0-9a-f]*)'", r"'\\x\1'::bytea", sql)
    return sql.replace("?", "%s")


def test_psks_are_not_stored_in_plain_text(datadir: DataDir) -> None:
    psk_dev, psk_op = b"DEVICE-PSK-0001!", b"OPERATOR-PSK-01!"
    store = datadir.open_store()
    store.add_device("dev1", "example.com", "c1", psk_dev, "test")
    store.add_operator("ops", psk_op, "test")
    # While the connection is open the change may still sit in the WAL: check both.
    assert psk_dev not in _files(datadir) and psk_op not in _files(datadir)
    assert psk_dev.hex().encode() not in _files(datadir)
    found = store.lookup_identity("dev1")
    assert found is not None and found[1] == psk_dev
    found = store.lookup_identity("operator:ops")
    assert found is not None and found[1] == psk_op
    assert store.lookup_identity("operator:dev1") is None
    assert store.lookup_identity("nobody") is None
    store.close()
    assert psk_dev not in _files(datadir) and psk_op not in _files(datadir)
    assert b"dev1" in _files(datadir)  # what is stored in plain text is found there


def test_a_sealed_psk_moved_to_another_identity_does_not_open(datadir: DataDir) -> None:
    store = datadir.open_store()
    store.add_device("dev1", "example.com", "c1", b"A" * 16, "test")
    store.add_device("dev2", "example.com", "c1", b"B" * 16, "test")
    store.close()
    db = _raw(datadir)
    sealed = db.execute("SELECT psk_sealed FROM devices WHERE id='dev1'").fetchone()[0]
    db.execute(_sql(datadir, "UPDATE devices SET psk_sealed=? WHERE id='dev2'"), (sealed,))
    db.commit()
    db.close()
    store = datadir.open_store()
    with pytest.raises(StoreError, match="does not open"):
        store.lookup_identity("dev2")
    store.close()


def test_decoy_keys_are_stable_and_secret_dependent() -> None:
    a, b = PskSealer(b"a" * 32), PskSealer(b"b" * 32)
    assert a.decoy(b"ghost", 16) == a.decoy(b"ghost", 16)
    assert a.decoy(b"ghost", 16) != b.decoy(b"ghost", 16)
    assert len(a.decoy(b"ghost", 16)) == 16


def _store_with_entries(d: DataDir, n: int = 5) -> SQLiteStore:
    store = d.open_store()
    for i in range(n):
        store.audit("tester", "action", f"subject {i}", "ok", f"detail {i}")
    return store


def _tamper(d: DataDir, *sql: str) -> None:
    """What someone with write access to the file could do (bypassing the triggers)."""
    db = _raw(d)
    on = " ON audit" if d.store_url() else ""
    db.execute(f"DROP TRIGGER audit_no_update{on}")
    db.execute(f"DROP TRIGGER audit_no_delete{on}")
    for statement in sql:
        db.execute(_sql(d, statement))
    db.commit()
    db.close()


def test_chain_verifies_and_sql_cannot_change_it(datadir: DataDir) -> None:
    store = _store_with_entries(datadir)
    count, head = store.verify_audit()
    assert count == 6  # init + 5
    assert head == store.audit_entries()[-1].hash
    store.close()
    refused = (sqlite3.DatabaseError, psycopg.Error)
    for statement in ("UPDATE audit SET detail='x' WHERE seq=2", "DELETE FROM audit WHERE seq=2"):
        db = _raw(datadir)
        with pytest.raises(refused, match="append-only"):
            db.execute(statement)
        db.close()


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (["UPDATE audit SET detail='edited' WHERE seq=3"], "audit entry 3: content"),
        (["UPDATE audit SET outcome='refused' WHERE seq=6"], "audit entry 6: content"),
        (["DELETE FROM audit WHERE seq=3"], "audit entry 3 is missing"),
        (["DELETE FROM audit WHERE seq=6"], "audit entry 6 is missing"),
        (
            # Swap the contents of entries 3 and 4 (keeping their positions).
            [
                "UPDATE audit SET seq=100 WHERE seq=3",
                "UPDATE audit SET seq=3 WHERE seq=4",
                "UPDATE audit SET seq=4 WHERE seq=100",
            ],
            "audit entry 3",
        ),
        (["DELETE FROM audit WHERE seq=1"], "audit entry 1 is missing"),
    ],
)
def test_chain_detects_modification_deletion_reordering(
    datadir: DataDir, sql: list[str], message: str
) -> None:
    _store_with_entries(datadir).close()
    _tamper(datadir, *sql)
    store = datadir.open_store()
    with pytest.raises(AuditChainBroken, match=message):
        store.verify_audit()
    store.close()
    result = cli("audit", "verify", "--data", datadir.root)
    assert result.code == 1
    assert result.err.count("\n") == 1 and message in result.err
    assert "Traceback" not in result.err


def test_a_rewritten_suffix_still_breaks_at_the_first_changed_entry(datadir: DataDir) -> None:
    """Recomputing an edited entry's hash does not help: the next link breaks (even
    with the chain key; without it, the edited entry itself already fails)."""
    store = _store_with_entries(datadir)
    entries = list(store.audit_entries())
    store.close()
    e = entries[2]
    key = datadir.sealer().audit_keys.chain
    forged = make_entry(
        e.seq, e.ts, e.actor, e.action, e.subject, "forged", e.detail, e.prev_hash, key=key
    )
    _tamper(
        datadir,
        f"UPDATE audit SET outcome='forged', hash=x'{forged.hash.hex()}' WHERE seq={e.seq}",
    )
    store = datadir.open_store()
    with pytest.raises(AuditChainBroken, match=f"audit entry {e.seq + 1}: link"):
        store.verify_audit()
    store.close()


def test_verify_chain_counts_and_genesis() -> None:
    a = make_entry(1, "t", "x", "y", "z", "ok", "", GENESIS)
    b = make_entry(2, "t", "x", "y", "z", "ok", "", a.hash)
    assert verify_chain([a, b], 2) == b.hash
    with pytest.raises(AuditChainBroken, match="entry 3 is missing"):
        verify_chain([a, b], 3)
    with pytest.raises(AuditChainBroken, match="entry 1 is missing"):
        verify_chain([b, a])
