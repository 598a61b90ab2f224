"""The embedded store: one SQLite file in WAL mode with versioned migrations.

Durability: WAL with synchronous=FULL and an explicit COMMIT per operation, so a
status report or an upload is on disk before the server acknowledges it (ATTACKS.md
#49). Every write transaction starts with BEGIN IMMEDIATE: it takes the write lock
up front, which serialises the read-the-chain-head-then-append of the audit log and
the check-then-publish of releases across processes (the CLI and the server share
the file).

One SQLiteStore wraps one connection and must be used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core import cose, ids, protocol
from ..core.errors import ManifestError, PolicyError, RollbackError
from ..core.report import Report
from . import anchor_lists
from . import audit as chain
from . import checkpoint as checkpoints
from .audit import AuditEntry
from .blobs import BlobStore
from .campaigns import BLOCK_RATES_MIGRATION, CampaignStore, served_release
from .campaigns import MIGRATION as CAMPAIGNS_MIGRATION
from .crosscheck import missing_entries
from .deltas import MIGRATION as DELTA_MIGRATION
from .deltas import DeltaTables
from .errors import AlreadyExists, AuditChainBroken, NotFound, ReportReplayed, StoreError
from .models import (
    AnchorRecord,
    ClassKey,
    Credential,
    DeviceRecord,
    ImageRecord,
    OperatorRecord,
    Principal,
    ReleaseCandidate,
    ReleaseRecord,
    ReportOutcome,
    ReportRecord,
    Role,
    key_tag_of,
)
from .names import check_device_id, check_label, check_operator_name
from .secrets import PskSealer

log = logging.getLogger(__name__)

# SQLite INTEGER is signed 64-bit; SUIT sequence numbers and report counters are
# uint64. Values at or above 2^63 are refused (they are also fast-forward bait).
MAX_DB_INT = (1 << 63) - 1

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "initial schema",
        (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
            "INSERT INTO meta (key, value) VALUES "
            "('principal_generation', 0), ('release_generation', 0), ('audit_count', 0)",
            """CREATE TABLE trust_anchors (
                key_id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                material BLOB NOT NULL,
                added_at TEXT NOT NULL)""",
            """CREATE TABLE images (
                digest BLOB PRIMARY KEY,
                image_id TEXT NOT NULL UNIQUE,
                size INTEGER NOT NULL,
                created_at TEXT NOT NULL)""",
            """CREATE TABLE releases (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                vendor_id BLOB NOT NULL,
                class_id BLOB NOT NULL,
                class_label TEXT NOT NULL,
                seq INTEGER NOT NULL,
                manifest_digest BLOB NOT NULL,
                envelope BLOB NOT NULL,
                image_digest BLOB NOT NULL REFERENCES images(digest),
                signer TEXT NOT NULL,
                published_at TEXT NOT NULL,
                published_by TEXT NOT NULL,
                UNIQUE (vendor_id, class_id, seq))""",
            """CREATE TABLE current_releases (
                vendor_id BLOB NOT NULL,
                class_id BLOB NOT NULL,
                release_id INTEGER NOT NULL REFERENCES releases(id),
                PRIMARY KEY (vendor_id, class_id)) WITHOUT ROWID""",
            """CREATE TABLE devices (
                id TEXT PRIMARY KEY,
                vendor_domain TEXT NOT NULL,
                class_info TEXT NOT NULL,
                vendor_id BLOB NOT NULL,
                class_id BLOB NOT NULL,
                psk_sealed BLOB NOT NULL,
                created_at TEXT NOT NULL,
                last_counter INTEGER,
                last_report_hash BLOB,
                assigned_release INTEGER REFERENCES releases(id))""",
            "CREATE INDEX devices_by_class ON devices (vendor_id, class_id)",
            """CREATE TABLE operators (
                name TEXT PRIMARY KEY,
                psk_sealed BLOB NOT NULL,
                created_at TEXT NOT NULL)""",
            """CREATE TABLE reports (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                device_id TEXT NOT NULL,
                counter INTEGER NOT NULL,
                state TEXT NOT NULL,
                reason INTEGER NOT NULL,
                seq INTEGER,
                manifest_digest BLOB,
                bytes_received INTEGER,
                installed_seq INTEGER,
                detail TEXT NOT NULL,
                body BLOB NOT NULL,
                received_at TEXT NOT NULL)""",
            "CREATE INDEX reports_by_device ON reports (device_id, counter)",
            """CREATE TABLE audit (
                seq INTEGER PRIMARY KEY,
                ts TEXT NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                subject TEXT NOT NULL,
                outcome TEXT NOT NULL,
                detail TEXT NOT NULL,
                prev_hash BLOB NOT NULL,
                hash BLOB NOT NULL)""",
            # Append-only through SQL; someone editing the file directly is what the
            # hash chain is for.
            """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
               BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
            """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
               BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
        ),
    ),
    (
        2,
        "reports say how many earlier reports the device had to drop",
        # A device's outbox is bounded; what it dropped it counts, and each report
        # carries the running count (report key -7), so lost history is visible.
        ("ALTER TABLE reports ADD COLUMN lost INTEGER NOT NULL DEFAULT 0",),
    ),
    CAMPAIGNS_MIGRATION,  # 3: device tags, rollout campaigns (store/campaigns.py)
    (
        4,
        "the audit chain is keyed and its head sealed (issue 10 section 3)",
        # audit.py: entries written so far stay plain SHA-256 links and are counted
        # here; _after_migration_4 appends the keyed marker naming that count.
        (
            "INSERT INTO meta (key, value) VALUES ('audit_plain_count', "
            "(SELECT value FROM meta WHERE key = 'audit_count'))",
            """CREATE TABLE audit_seal (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                count INTEGER NOT NULL,
                head BLOB NOT NULL,
                mac BLOB NOT NULL)""",
        ),
    ),
    anchor_lists.MIGRATION,  # 5: signed anchor lists per class (otacoap/store/anchor_lists.py)
    DELTA_MIGRATION,  # 6: delta envelopes (store/deltas.py)
    BLOCK_RATES_MIGRATION,  # 8: block rates of every server process (store/campaigns.py)
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_RELEASE_COLUMNS = (
    "r.id, r.vendor_id, r.class_id, r.class_label, r.seq, r.manifest_digest, r.envelope, "
    "r.image_digest, i.size, r.signer, r.published_at, r.published_by"
)
_DEVICE_COLUMNS = (
    "id, vendor_domain, class_info, vendor_id, class_id, created_at, last_counter, "
    "assigned_release, campaign_release"
)


_AUDIT_FROM = "SELECT seq, ts, actor, action, subject, outcome, detail, prev_hash, hash FROM audit"
_AUDIT_SELECT = f"{_AUDIT_FROM} ORDER BY seq"


def _release(row: sqlite3.Row | tuple[Any, ...]) -> ReleaseRecord:
    return ReleaseRecord(
        id=row[0],
        vendor_id=row[1],
        class_id=row[2],
        class_label=row[3],
        sequence_number=row[4],
        manifest_digest=row[5],
        envelope=row[6],
        image=ImageRecord(row[7], row[8]),
        signer=row[9],
        published_at=row[10],
        published_by=row[11],
    )


def _device(row: tuple[Any, ...]) -> DeviceRecord:
    return DeviceRecord(*row)


def explain_sqlite_error(path: Path, exc: sqlite3.Error) -> str:
    """One line an operator can act on, for an SQLite failure on the store's file.

    A damaged, truncated or foreign file and a read-only data directory are the cases
    operators meet; SQLite's own words name neither the file nor what to do.
    """
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and (
        "readonly" in text or "unable to open" in text
    ):
        # SQLite needs to write the file and create its -wal and -shm beside it.
        writable = os.access(path.parent, os.W_OK) and (
            not path.exists() or os.access(path, os.W_OK)
        )
        if not writable or "readonly" in text:
            return f"{path}: cannot write the store: the data directory or the file is read-only"
        return f"{path}: cannot open the store (missing directory or no permission)"
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        return f"{path}: not an otacoap database or damaged ({text}); restore it from a backup"
    return f"{path}: store error: {text}"


def timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


class SQLiteStore(CampaignStore, anchor_lists.AnchorListStore, DeltaTables):
    """`Store` over one SQLite connection (tags and campaigns: store/campaigns.py;
    anchor lists: store/anchor_lists.py; delta envelopes: store/deltas.py)."""

    def __init__(
        self,
        path: Path,
        sealer: PskSealer,
        *,
        clock: Callable[[], float] = time.time,
        check_same_thread: bool = True,
        migrate: bool = True,
    ) -> None:
        self.path = path
        self._sealer = sealer
        self._clock = clock
        self._depth = 0
        self._data_version = -1
        self.applied_migrations: list[int] = []
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=check_same_thread, timeout=10.0
            )
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot switch SQLite to WAL mode (got {mode})")
            # FULL: the WAL is fsynced at every commit, so an acknowledged report survives
            # power loss, not only a process crash (NORMAL only guarantees the latter).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            if migrate:
                self.applied_migrations = self.migrate()
            else:
                self._check_version()
        except sqlite3.Error as exc:
            raise StoreError(explain_sqlite_error(path, exc)) from None

    # --- plumbing ------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    # A file cannot be unreachable; PostgresStore re-establishes a lost connection.
    def reconnect(self) -> bool:
        """Re-establish a lost connection if an attempt is due; True when usable."""
        return True

    def reconnections(self) -> int:
        """Connections re-established so far (each: caches may have missed changes)."""
        return 0

    def _now(self) -> str:
        return timestamp(self._clock())

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); nested calls join it."""
        if self._depth:
            self._depth += 1
            try:
                yield self._db
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._db
        except BaseException:
            self._depth = 0
            self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        self._db.execute("COMMIT")

    def schema_version(self) -> int:
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'"
        ).fetchone()
        if not exists:
            return 0
        row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def _check_version(self) -> None:
        version = self.schema_version()
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version}, this otacoap needs {SCHEMA_VERSION}"
            )

    def migrate(self) -> list[int]:
        """Apply the migrations not yet recorded, each in its own transaction."""
        applied: list[int] = []
        with self._tx() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this otacoap "
                f"({SCHEMA_VERSION}); upgrade otacoap"
            )
        for version, name, statements in MIGRATIONS:
            with self._tx() as db:
                # Re-check under the write lock: another process may have migrated. By
                # the set of recorded versions, not the highest: a migration is applied
                # once whatever the order the others were recorded in.
                if db.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
                ).fetchone():
                    continue
                for statement in statements:
                    db.execute(statement)
                # A step SQL cannot do (it needs a key) runs in the same transaction.
                after = getattr(self, f"_after_migration_{version}", None)
                if after is not None:
                    after()
                db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, self._now()),
                )
                applied.append(version)
        return applied

    def _bump(self, key: str) -> None:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE key = ?", (key,))

    def generations(self) -> tuple[int, int]:
        rows = dict(
            self._db.execute(
                "SELECT key, value FROM meta WHERE key IN "
                "('principal_generation', 'release_generation')"
            ).fetchall()
        )
        return int(rows["principal_generation"]), int(rows["release_generation"])

    def changed_elsewhere(self) -> bool:
        # PRAGMA data_version changes when *another* connection commits; it costs no
        # I/O beyond the WAL index, so polling it every second is cheap.
        version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
        changed = version != self._data_version
        self._data_version = version
        return changed

    # --- audit ---------------------------------------------------------------------

    def _after_migration_4(self) -> None:
        """Anchor the keyed chain on the plain one (audit.py), or seal an empty log."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'audit_plain_count'").fetchone()
        plain = int(row[0])
        if plain:
            self.audit(
                "otacoap",
                chain.REKEY_ACTION,
                chain.rekey_subject(plain),
                "ok",
                f"entries 1..{plain} are plain SHA-256 links (written before the chain was "
                "keyed); this entry and every later one are HMACs under a key from server.key",
            )
        else:
            self._seal(0, chain.GENESIS)

    def _seal(self, count: int, head: bytes) -> None:
        self._db.execute(
            "INSERT INTO audit_seal (id, count, head, mac) VALUES (1, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET count = excluded.count, head = excluded.head, "
            "mac = excluded.mac",
            (count, head, chain.seal_mac(self._sealer.audit_keys.chain, count, head)),
        )

    def audit(
        self, actor: str, action: str, subject: str, outcome: str, detail: str = ""
    ) -> AuditEntry:
        with self._tx() as db:
            row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (1, chain.GENESIS)
            entry = chain.make_entry(
                seq,
                self._now(),
                actor,
                action,
                subject,
                outcome,
                detail[:500],
                prev,
                key=self._sealer.audit_keys.chain,
            )
            db.execute(
                "INSERT INTO audit (seq, ts, actor, action, subject, outcome, detail, "
                "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.seq,
                    entry.ts,
                    entry.actor,
                    entry.action,
                    entry.subject,
                    entry.outcome,
                    entry.detail,
                    entry.prev_hash,
                    entry.hash,
                ),
            )
            db.execute("UPDATE meta SET value = ? WHERE key = 'audit_count'", (seq,))
            self._seal(seq, entry.hash)
        return entry

    def audit_entries(self, limit: int | None = None) -> Sequence[AuditEntry]:
        sql = _AUDIT_SELECT
        if limit is not None:
            sql = f"SELECT * FROM ({sql} DESC LIMIT {int(limit)}) AS tail ORDER BY seq"
        return [AuditEntry(*row) for row in self._db.execute(sql)]

    def verify_audit(self, checkpoint: bytes | None = None) -> tuple[int, bytes]:
        """(count, head) of a log that verifies, or AuditChainBroken naming the problem.

        Checks the keyed chain, its seal, the store against the log (crosscheck.py),
        and, given the bytes of a checkpoint file, that nothing up to it was removed or
        changed (checkpoint.py; CheckpointInvalid if the file is not a valid one).
        """
        keys = self._sealer.audit_keys
        cp = checkpoints.decode(checkpoint, keys.checkpoint) if checkpoint is not None else None
        # One read transaction so the chain, the count, the seal and the records come
        # from the same snapshot.
        self._db.execute("BEGIN")
        try:
            meta = dict(
                self._db.execute(
                    "SELECT key, value FROM meta WHERE key IN ('audit_count', 'audit_plain_count')"
                ).fetchall()
            )
            count = int(meta["audit_count"])
            head = chain.verify_chain(
                (AuditEntry(*row) for row in self._db.execute(_AUDIT_SELECT)),
                count,
                key=keys.chain,
                plain_count=int(meta.get("audit_plain_count", 0)),
            )
            seal = self._db.execute("SELECT count, head, mac FROM audit_seal").fetchone()
            chain.check_seal(keys.chain, count, head, seal)
            # A second pass in the same snapshot, over the few actions that make records
            # (not the reports), so a long log is streamed, never held in memory.
            lifecycle = self._db.execute(
                f"{_AUDIT_FROM} WHERE outcome = 'ok' AND "
                "(action = 'publish' OR action LIKE 'device.%' OR action LIKE 'operator.%' "
                "OR action LIKE 'trust.%') ORDER BY seq"
            )
            problems = missing_entries(
                (AuditEntry(*row) for row in lifecycle),
                releases=self._db.execute(
                    "SELECT class_label, seq, manifest_digest FROM releases ORDER BY id"
                ).fetchall(),
                devices=[r[0] for r in self._db.execute("SELECT id FROM devices ORDER BY id")],
                operators=[
                    r[0] for r in self._db.execute("SELECT name FROM operators ORDER BY name")
                ],
                anchors=[r[0] for r in self._db.execute("SELECT key_id FROM trust_anchors")],
            )
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise AuditChainBroken(f"{problems[0]}{more}")
            if cp is not None:
                checkpoints.check(cp, count, self._audit_hash)
        finally:
            self._db.execute("COMMIT")
        return count, head

    def _audit_hash(self, seq: int) -> bytes | None:
        if seq == 0:
            return chain.GENESIS
        row = self._db.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
        return bytes(row[0]) if row else None

    def audit_checkpoint(self) -> bytes:
        """A checkpoint file's bytes for the log as it is now (verified first: a
        checkpoint of a broken log would vouch for the break)."""
        count, head = self.verify_audit()
        cp = checkpoints.Checkpoint(count, head, self._now())
        return checkpoints.encode(cp, self._sealer.audit_keys.checkpoint)

    # --- trust anchors -------------------------------------------------------------

    def add_anchor(self, anchor: cose.TrustAnchor, actor: str) -> AnchorRecord:
        if anchor.kind == "hmac":
            raise PolicyError("an HMAC key cannot be a server trust anchor (it could sign too)")
        now = self._now()
        with self._tx() as db:
            try:
                db.execute(
                    "INSERT INTO trust_anchors (key_id, kind, material, added_at) "
                    "VALUES (?, ?, ?, ?)",
                    (anchor.key_id, anchor.kind, anchor.material, now),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"trust anchor {anchor.key_id} is already present") from None
            self.audit(actor, "trust.add", anchor.key_id, "ok", anchor.kind)
        return AnchorRecord(anchor.key_id, anchor.kind, now, anchor)

    def remove_anchor(self, key_id: str, actor: str) -> None:
        with self._tx() as db:
            cur = db.execute("DELETE FROM trust_anchors WHERE key_id = ?", (key_id,))
            if cur.rowcount == 0:
                raise NotFound(f"no trust anchor with key id {key_id!r}")
            self.audit(actor, "trust.remove", key_id, "ok")

    def list_anchors(self) -> list[AnchorRecord]:
        rows = self._db.execute(
            "SELECT key_id, kind, material, added_at FROM trust_anchors ORDER BY added_at, key_id"
        ).fetchall()
        return [
            AnchorRecord(key_id, kind, added, cose.TrustAnchor(kind, key_id, material))
            for key_id, kind, material, added in rows
        ]

    # --- principals ----------------------------------------------------------------

    def add_device(
        self,
        device_id: str,
        vendor_domain: str,
        class_info: str,
        psk: bytes,
        actor: str,
        *,
        tags: dict[str, str] | None = None,
    ) -> DeviceRecord:
        check_device_id(device_id)
        check_label(vendor_domain, "vendor domain")
        check_label(class_info, "class info")
        vendor, klass = ids.class_key_of(vendor_domain, class_info)
        now = self._now()
        with self._tx() as db:
            try:
                db.execute(
                    "INSERT INTO devices (id, vendor_domain, class_info, vendor_id, class_id, "
                    "psk_sealed, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        device_id,
                        vendor_domain,
                        class_info,
                        vendor,
                        klass,
                        self._sealer.seal(device_id, psk),
                        now,
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"device {device_id!r} is already registered") from None
            self._bump("principal_generation")
            self.audit(actor, "device.add", device_id, "ok", f"{vendor_domain}/{class_info}")
            if tags:
                self.set_device_tags(device_id, tags, actor)
        return DeviceRecord(device_id, vendor_domain, class_info, vendor, klass, now)

    def get_device(self, device_id: str) -> DeviceRecord | None:
        row = self._db.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,)
        ).fetchone()
        return _device(row) if row else None

    def list_devices(self) -> list[DeviceRecord]:
        rows = self._db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY id").fetchall()
        return [_device(r) for r in rows]

    def remove_device(self, device_id: str, actor: str) -> None:
        with self._tx() as db:
            cur = db.execute("DELETE FROM devices WHERE id = ?", (device_id,))
            if cur.rowcount == 0:
                raise NotFound(f"no device {device_id!r}")
            self._bump("principal_generation")
            self.audit(actor, "device.remove", device_id, "ok")

    def add_operator(self, name: str, psk: bytes, actor: str) -> OperatorRecord:
        check_operator_name(name)
        identity = protocol.operator_identity(name)
        now = self._now()
        with self._tx() as db:
            try:
                db.execute(
                    "INSERT INTO operators (name, psk_sealed, created_at) VALUES (?, ?, ?)",
                    (name, self._sealer.seal(identity, psk), now),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"operator {name!r} already exists") from None
            self._bump("principal_generation")
            self.audit(actor, "operator.add", name, "ok")
        return OperatorRecord(name, now)

    def list_operators(self) -> list[OperatorRecord]:
        rows = self._db.execute("SELECT name, created_at FROM operators ORDER BY name").fetchall()
        return [OperatorRecord(*r) for r in rows]

    def remove_operator(self, name: str, actor: str) -> None:
        with self._tx() as db:
            cur = db.execute("DELETE FROM operators WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"no operator {name!r}")
            self._bump("principal_generation")
            self.audit(actor, "operator.remove", name, "ok")

    def rekey_device(self, device_id: str, psk: bytes, actor: str) -> None:
        self._rekey("devices", "id", device_id, device_id, psk, actor, "device")

    def rekey_operator(self, name: str, psk: bytes, actor: str) -> None:
        identity = protocol.operator_identity(name)
        self._rekey("operators", "name", name, identity, psk, actor, "operator")

    def _rekey(
        self, table: str, column: str, name: str, identity: str, psk: bytes, actor: str, kind: str
    ) -> None:
        """A new PSK for an existing principal: the new seal (fresh nonce, so a new key
        tag even for the same bytes), the principal generation bump that makes the
        server end the old key's sessions, and the audit entry, in one transaction."""
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE {table} SET psk_sealed = ? WHERE {column} = ?",
                (self._sealer.seal(identity, psk), name),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no {kind} {name!r}")
            self._bump("principal_generation")
            self.audit(actor, f"{kind}.rekey", name, "ok")

    def lookup_identity(self, identity: str) -> tuple[Principal, bytes] | None:
        found = self.lookup_credential(identity)
        return (found.principal, found.psk) if found is not None else None

    def lookup_credential(self, identity: str) -> Credential | None:
        if identity.startswith(protocol.OPERATOR_IDENTITY_PREFIX):
            name = identity[len(protocol.OPERATOR_IDENTITY_PREFIX) :]
            row = self._db.execute(
                "SELECT psk_sealed FROM operators WHERE name = ?", (name,)
            ).fetchone()
            principal = Principal(Role.OPERATOR, name)
        else:
            row = self._db.execute(
                "SELECT psk_sealed FROM devices WHERE id = ?", (identity,)
            ).fetchone()
            principal = Principal(Role.DEVICE, identity)
        if row is None:
            return None
        sealed = bytes(row[0])
        return Credential(principal, self._sealer.open(identity, sealed), key_tag_of(sealed))

    def principal_exists(self, principal: Principal) -> bool:
        table = "devices WHERE id" if principal.role is Role.DEVICE else "operators WHERE name"
        return (
            self._db.execute(f"SELECT 1 FROM {table} = ?", (principal.name,)).fetchone() is not None
        )

    # --- releases ------------------------------------------------------------------

    def class_has_devices(self, key: ClassKey) -> str | None:
        row = self._db.execute(
            "SELECT vendor_domain, class_info FROM devices WHERE vendor_id = ? AND class_id = ? "
            "LIMIT 1",
            key,
        ).fetchone()
        return f"{row[0]}/{row[1]}" if row else None

    def _release_where(self, where: str, args: tuple[Any, ...]) -> ReleaseRecord | None:
        row = self._db.execute(
            f"SELECT {_RELEASE_COLUMNS} FROM releases r JOIN images i ON i.digest = r.image_digest "
            f"WHERE {where}",
            args,
        ).fetchone()
        return _release(row) if row else None

    def current_release(self, key: ClassKey) -> ReleaseRecord | None:
        return self._release_where(
            "r.id = (SELECT release_id FROM current_releases WHERE vendor_id = ? AND class_id = ?)",
            key,
        )

    def release_for_device(self, device_id: str) -> ReleaseRecord | None:
        device = self.get_device(device_id)
        if device is None:
            return None
        return served_release(device, self.release_by_id, self.current_release)

    def release_by_id(self, release_id: int) -> ReleaseRecord | None:
        return self._release_where("r.id = ?", (release_id,))

    def release_by_seq(self, key: ClassKey, seq: int) -> ReleaseRecord | None:
        return self._release_where("r.vendor_id = ? AND r.class_id = ? AND r.seq = ?", (*key, seq))

    def commit_release(
        self, candidate: ReleaseCandidate, actor: str, *, make_current: bool = True
    ) -> ReleaseRecord:
        """Store a checked release; `make_current` (publish --rollout all) makes it what
        every device of the class is served, otherwise only a campaign hands it out."""
        c = candidate
        if c.sequence_number > MAX_DB_INT:
            raise PolicyError(f"sequence number {c.sequence_number} is above 2^63-1")
        key = (c.vendor_id, c.class_id)
        now = self._now()
        with self._tx() as db:
            # The freshness check ran against the class's latest release (current or
            # not, see Publisher.check): it must still be the latest.
            row = db.execute(
                "SELECT id FROM releases WHERE vendor_id = ? AND class_id = ? "
                "ORDER BY seq DESC LIMIT 1",
                key,
            ).fetchone()
            current_id = row[0] if row else None
            if current_id != c.previous_release_id:
                raise RollbackError(
                    "another release was published for this class meanwhile; check again"
                )
            for image in (c.image, *c.more_images):  # more: a multi-component release
                existing = db.execute(
                    "SELECT digest FROM images WHERE image_id = ?", (image.image_id,)
                ).fetchone()
                if existing is None:
                    db.execute(
                        "INSERT INTO images (digest, image_id, size, created_at) "
                        "VALUES (?, ?, ?, ?)",
                        (image.digest, image.image_id, image.size, now),
                    )
                elif existing[0] != image.digest:
                    # 64-bit prefix collision (ids.py): /fw/<id> would be ambiguous.
                    raise PolicyError(f"image id {image.image_id} already names another image")
            cur = db.execute(
                "INSERT INTO releases (vendor_id, class_id, class_label, seq, manifest_digest, "
                "envelope, image_digest, signer, published_at, published_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.vendor_id,
                    c.class_id,
                    c.class_label,
                    c.sequence_number,
                    c.manifest_digest,
                    c.envelope,
                    c.image.digest,
                    c.signer,
                    now,
                    actor,
                ),
            )
            release_id = int(cur.lastrowid or 0)
            if make_current:
                db.execute(
                    "INSERT INTO current_releases (vendor_id, class_id, release_id) "
                    "VALUES (?, ?, ?) ON CONFLICT (vendor_id, class_id) "
                    "DO UPDATE SET release_id = excluded.release_id",
                    (*key, release_id),
                )
            self._bump("release_generation")
            self.audit(
                actor,
                "publish",
                f"{c.class_label} seq {c.sequence_number}",
                "ok",
                f"image {c.image.image_id} ({c.image.size} bytes), signer {c.signer}, "
                f"manifest {c.manifest_digest.hex()[:16]}"
                + ("" if make_current else ", rollout by campaign only"),
            )
        return ReleaseRecord(
            release_id,
            c.vendor_id,
            c.class_id,
            c.class_label,
            c.sequence_number,
            c.manifest_digest,
            c.envelope,
            c.image,
            c.signer,
            now,
            actor,
        )

    def list_releases(self, *, current_only: bool) -> list[ReleaseRecord]:
        where = "r.id IN (SELECT release_id FROM current_releases)" if current_only else "1 = 1"
        rows = self._db.execute(
            f"SELECT {_RELEASE_COLUMNS} FROM releases r JOIN images i ON i.digest = r.image_digest "
            f"WHERE {where} ORDER BY r.class_label, r.seq"
        ).fetchall()
        return [_release(r) for r in rows]

    def image_referenced(self, digest: bytes) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM releases WHERE image_digest = ? LIMIT 1", (digest,)
        ).fetchone()
        return row is not None or self.patch_referenced(digest)

    def fill_image(self, digest: bytes, blobs: BlobStore) -> bool:
        """Whether `blobs` holds the image; a shared store (postgres.py) first copies
        it there, verified. The SQLite store's images live only in the data directory."""
        return blobs.has(digest)

    def assign_release(self, device_id: str, sequence_number: int | None, actor: str) -> None:
        with self._tx() as db:
            device = self.get_device(device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            release_id = None
            if sequence_number is not None:
                release = self.release_by_seq(device.class_key, sequence_number)
                if release is None:
                    raise NotFound(
                        f"no release with seq {sequence_number} for {device.class_label}"
                    )
                release_id = release.id
            db.execute(
                "UPDATE devices SET assigned_release = ? WHERE id = ?", (release_id, device_id)
            )
            self._bump("release_generation")
            what = "class current" if sequence_number is None else f"seq {sequence_number}"
            self.audit(actor, "release.assign", device_id, "ok", what)

    # --- reports -------------------------------------------------------------------

    def record_report(self, device_id: str, report: Report, body: bytes) -> ReportOutcome:
        for name, value in (
            ("counter", report.counter),
            ("sequence", report.sequence_number),
            ("bytes", report.bytes_received),
            ("installed sequence", report.installed_sequence),
            ("lost count", report.lost),
        ):
            if value is not None and value > MAX_DB_INT:
                raise ManifestError(f"report {name} above 2^63-1")
        body_hash = hashlib.sha256(body).digest()
        now = self._now()
        with self._tx() as db:
            row = db.execute(
                "SELECT last_counter, last_report_hash FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no device {device_id!r}")
            last, last_hash = row
            if last is not None and report.counter <= last:
                if report.counter == last and last_hash == body_hash:
                    # The same report again (a retransmission whose 2.04 was lost after
                    # the duplicate cache forgot it): idempotent, nothing is counted twice.
                    rid = db.execute(
                        "SELECT MAX(id) FROM reports WHERE device_id = ? AND counter = ?",
                        (device_id, last),
                    ).fetchone()[0]
                    return ReportOutcome(False, int(rid or 0))
                raise ReportReplayed(
                    f"report counter {report.counter} is not above the last accepted {last}"
                )
            digest = report.manifest_digest.value if report.manifest_digest else None
            cur = db.execute(
                "INSERT INTO reports (device_id, counter, state, reason, seq, manifest_digest, "
                "bytes_received, installed_seq, detail, lost, body, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device_id,
                    report.counter,
                    report.state.value,
                    int(report.reason),
                    report.sequence_number,
                    digest,
                    report.bytes_received,
                    report.installed_sequence,
                    report.detail,
                    report.lost,
                    body,
                    now,
                ),
            )
            db.execute(
                "UPDATE devices SET last_counter = ?, last_report_hash = ? WHERE id = ?",
                (report.counter, body_hash, device_id),
            )
            self.record_anchor_status(device_id, report.anchor_version, report.freshness)
            self.audit(
                str(Principal(Role.DEVICE, device_id)),
                "report",
                device_id,
                report.state.value,
                f"counter {report.counter}, reason {report.reason.name}"
                + (f", seq {report.sequence_number}" if report.sequence_number is not None else "")
                + (f", {report.lost} reports lost so far" if report.lost else ""),
            )
        return ReportOutcome(True, int(cur.lastrowid or 0))

    def report_counts(self) -> dict[str, int]:
        """Reports stored, by state (metrics)."""
        rows = self._db.execute("SELECT state, COUNT(*) FROM reports GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    def latest_reports(self) -> dict[str, ReportRecord]:
        """Each device's newest report (by arrival): what it last said it was doing."""
        rows = self._db.execute(
            "SELECT id, device_id, counter, state, reason, seq, manifest_digest, bytes_received, "
            "installed_seq, detail, received_at, lost FROM reports WHERE id IN "
            "(SELECT MAX(id) FROM reports GROUP BY device_id)"
        ).fetchall()
        return {r[1]: ReportRecord(*r) for r in rows}

    def list_reports(self, device_id: str | None, limit: int) -> list[ReportRecord]:
        where, args = ("WHERE device_id = ?", (device_id,)) if device_id else ("", ())
        rows = self._db.execute(
            "SELECT id, device_id, counter, state, reason, seq, manifest_digest, bytes_received, "
            f"installed_seq, detail, received_at, lost FROM reports {where} "
            f"ORDER BY id DESC LIMIT {int(limit)}",
            args,
        ).fetchall()
        return [ReportRecord(*r) for r in reversed(rows)]
