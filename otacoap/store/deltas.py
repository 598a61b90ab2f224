"""A release's delta envelopes: the table of migration 6 and the store methods on it.

A release carries its full envelope (the `releases` row) and optional delta envelopes,
one per source image digest (`release_deltas`, keyed by (release, source digest)). Each
is signed by the author like any envelope and checked by the `Publisher` before it is
committed here. The patch is a content-addressed blob like an image (an `images` row).

Which envelope a device gets: the delta whose source is the image the device last
reported as installed (its latest report's installed sequence number, mapped to that
release's image in the device's class), else the full one. A device that already runs
this release keeps getting the envelope it installed (so it stays "up to date" instead
of seeing a second manifest with the same sequence number). A wrong guess costs bytes,
never correctness: the delta envelope conditions on the running image and falls back
to the full image on the device (docs/decisions/delta-updates.md).

`DeltaTables` is mixed into `SQLiteStore` (it uses its connection, transactions and
audit log), so the delta SQL lives here rather than in the shared store module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from ..core import protocol
from ..core.errors import PolicyError
from .audit import AuditEntry
from .errors import AlreadyExists
from .models import ImageRecord, ReleaseRecord

MIGRATION = (
    6,
    "delta envelopes of a release, keyed by source image digest",
    (
        """CREATE TABLE release_deltas (
            release_id INTEGER NOT NULL REFERENCES releases(id),
            source_digest BLOB NOT NULL,
            manifest_digest BLOB NOT NULL,
            envelope BLOB NOT NULL,
            patch_digest BLOB NOT NULL REFERENCES images(digest),
            signer TEXT NOT NULL,
            published_at TEXT NOT NULL,
            published_by TEXT NOT NULL,
            PRIMARY KEY (release_id, source_digest))""",
    ),
)


@dataclass(frozen=True)
class DeltaCandidate:
    """A delta envelope that passed every publish check (Publisher.check_delta)."""

    release: ReleaseRecord
    source_digest: bytes
    manifest_digest: bytes
    envelope: bytes = field(repr=False)
    patch: ImageRecord
    signer: str


@dataclass(frozen=True)
class DeltaRecord:
    release_id: int
    source_digest: bytes
    manifest_digest: bytes
    envelope: bytes = field(repr=False)
    patch: ImageRecord
    signer: str
    published_at: str
    published_by: str

    @functools.cached_property
    def etag(self) -> bytes:
        """ETag of the /m representation (like ReleaseRecord.etag)."""
        return protocol.etag_for(hashlib.sha256(self.envelope).digest())


_COLUMNS = (
    "d.release_id, d.source_digest, d.manifest_digest, d.envelope, d.patch_digest, i.size, "
    "d.signer, d.published_at, d.published_by"
)


def _delta(row: Any) -> DeltaRecord:
    return DeltaRecord(
        row[0], row[1], row[2], row[3], ImageRecord(row[4], row[5]), row[6], row[7], row[8]
    )


class DeltaTables:
    """The delta methods of SQLiteStore (see the module docstring)."""

    _db: sqlite3.Connection

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _bump(self, key: str) -> None:
        raise NotImplementedError

    def _now(self) -> str:
        raise NotImplementedError

    def audit(
        self, actor: str, action: str, subject: str, outcome: str, detail: str = ""
    ) -> AuditEntry:
        raise NotImplementedError

    def release_by_seq(self, key: tuple[bytes, bytes], seq: int) -> ReleaseRecord | None:
        raise NotImplementedError

    # -- writing -------------------------------------------------------------------------

    def commit_delta(self, c: DeltaCandidate, actor: str) -> DeltaRecord:
        now = self._now()
        with self._tx() as db:
            if db.execute(
                "SELECT 1 FROM release_deltas WHERE release_id = ? AND source_digest = ?",
                (c.release.id, c.source_digest),
            ).fetchone():
                raise AlreadyExists(
                    f"{c.release.class_label} seq {c.release.sequence_number} already has a "
                    f"delta from {c.source_digest.hex()[:16]}"
                )
            existing = db.execute(
                "SELECT digest FROM images WHERE image_id = ?", (c.patch.image_id,)
            ).fetchone()
            if existing is None:
                db.execute(
                    "INSERT INTO images (digest, image_id, size, created_at) VALUES (?, ?, ?, ?)",
                    (c.patch.digest, c.patch.image_id, c.patch.size, now),
                )
            elif existing[0] != c.patch.digest:
                raise PolicyError(f"image id {c.patch.image_id} already names another image")
            db.execute(
                "INSERT INTO release_deltas (release_id, source_digest, manifest_digest, "
                "envelope, patch_digest, signer, published_at, published_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.release.id,
                    c.source_digest,
                    c.manifest_digest,
                    c.envelope,
                    c.patch.digest,
                    c.signer,
                    now,
                    actor,
                ),
            )
            # Devices of the class may now be served another envelope: tell observers.
            self._bump("release_generation")
            self.audit(
                actor,
                "publish.delta",
                f"{c.release.class_label} seq {c.release.sequence_number}",
                "ok",
                f"from {c.source_digest.hex()[:16]}, patch {c.patch.image_id} "
                f"({c.patch.size} bytes), signer {c.signer}, "
                f"manifest {c.manifest_digest.hex()[:16]}",
            )
        return DeltaRecord(
            c.release.id,
            c.source_digest,
            c.manifest_digest,
            c.envelope,
            c.patch,
            c.signer,
            now,
            actor,
        )

    # -- reading -------------------------------------------------------------------------

    def deltas_of(self, release_id: int) -> list[DeltaRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM release_deltas d JOIN images i ON i.digest = d.patch_digest "
            "WHERE d.release_id = ? ORDER BY d.published_at, d.source_digest",
            (release_id,),
        ).fetchall()
        return [_delta(r) for r in rows]

    def patch_referenced(self, digest: bytes) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM release_deltas WHERE patch_digest = ? LIMIT 1", (digest,)
        ).fetchone()
        return row is not None

    def delta_for_device(self, device_id: str, release: ReleaseRecord) -> DeltaRecord | None:
        """The delta envelope of `release` this device should get, if any (module doc)."""
        deltas = {d.source_digest: d for d in self.deltas_of(release.id)}
        if not deltas:
            return None
        row = self._db.execute(
            "SELECT installed_seq FROM reports WHERE device_id = ? AND installed_seq IS NOT NULL "
            "ORDER BY id DESC LIMIT 1",
            (device_id,),
        ).fetchone()
        if row is None:
            return None
        installed = int(row[0])
        if installed == release.sequence_number:
            # Up to date: the envelope it installed, so it sees that one again.
            got = self._db.execute(
                "SELECT manifest_digest FROM reports WHERE device_id = ? AND seq = ? "
                "AND manifest_digest IS NOT NULL ORDER BY id DESC LIMIT 1",
                (device_id, installed),
            ).fetchone()
            by_manifest = {d.manifest_digest: d for d in deltas.values()}
            return by_manifest.get(got[0]) if got else None
        source = self.release_by_seq(release.class_key, installed)
        return deltas.get(source.running_digest) if source is not None else None
