"""Signed anchor lists per device class, in the SQLite store (migration 5).

The server keeps every published version of a class's anchor list, as the signed
bytes the operator published (it never signs one: the root keys stay offline), and
serves version N+1 to a device that holds N (`/a`), so devices walk the chain one
rotation at a time (core.anchor_list). Publishing checks what a device will check:
the version is exactly the class's latest + 1 and the list is signed by the roots of
the previous version and by its own (for version 1, by its own: the provisioned roots
are not known to the server). Devices report the version they hold (report key -20)
and their last freshness outcome (-21); `record_anchor_status` keeps both per device.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import anchor_list, cose
from ..core.errors import AuthenticationError, ManifestError, PolicyError, RollbackError
from ..fsutil import read_capped
from .errors import NotFound
from .models import ClassKey

MIGRATION_VERSION = 5
MIGRATION = (
    MIGRATION_VERSION,
    "signed anchor lists per class; devices report the anchor list and freshness they hold",
    (
        """CREATE TABLE anchor_lists (
            vendor_id BLOB NOT NULL,
            class_id BLOB NOT NULL,
            version INTEGER NOT NULL,
            body BLOB NOT NULL,
            digest BLOB NOT NULL,
            published_at TEXT NOT NULL,
            published_by TEXT NOT NULL,
            PRIMARY KEY (vendor_id, class_id, version)) WITHOUT ROWID""",
        "ALTER TABLE devices ADD COLUMN anchor_version INTEGER",
        "ALTER TABLE devices ADD COLUMN freshness INTEGER",
    ),
)


@dataclass(frozen=True)
class AnchorListRecord:
    vendor_id: bytes
    class_id: bytes
    version: int
    body: bytes
    digest: bytes  # SHA-256 of the signed list's payload
    published_at: str
    published_by: str

    @property
    def contents(self) -> anchor_list.AnchorList:
        return anchor_list.decode_signed(self.body).contents


@dataclass(frozen=True)
class DeviceAnchorStatus:
    device_id: str
    anchor_version: int | None
    freshness: int | None


_COLUMNS = "vendor_id, class_id, version, body, digest, published_at, published_by"


class AnchorListStore:
    """Mixed into SQLiteStore: anchor lists and what devices report about them."""

    _db: sqlite3.Connection
    _tx: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _now: Callable[[], str]
    audit: Callable[..., object]

    def latest_anchor_list(self, key: ClassKey) -> AnchorListRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM anchor_lists WHERE vendor_id = ? AND class_id = ? "
            "ORDER BY version DESC LIMIT 1",
            key,
        ).fetchone()
        return AnchorListRecord(*row) if row else None

    def anchor_list(self, key: ClassKey, version: int) -> AnchorListRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM anchor_lists WHERE vendor_id = ? AND class_id = ? "
            "AND version = ?",
            (*key, version),
        ).fetchone()
        return AnchorListRecord(*row) if row else None

    def list_anchor_lists(self) -> list[AnchorListRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM anchor_lists ORDER BY vendor_id, class_id, version"
        ).fetchall()
        return [AnchorListRecord(*r) for r in rows]

    def publish_anchor_list(self, body: bytes, label: str, actor: str) -> AnchorListRecord:
        """Store the next version of a class's list (checked as a device would), audited."""
        try:
            signed = anchor_list.decode_signed(body)
            new = signed.contents
            key = (new.vendor_id, new.class_id)
            now = self._now()
            with self._tx() as db:
                latest = self.latest_anchor_list(key)
                if latest is None:
                    if new.version != 1:
                        raise RollbackError(
                            f"the class has no anchor list yet: publish version 1, "
                            f"not {new.version}"
                        )
                    # Version 1 follows the provisioned roots, which the server does not
                    # know: it can only check that the list's own roots signed it.
                    if len(anchor_list.signers(signed, new.roots)) < new.threshold:
                        raise AuthenticationError(
                            "anchor list is not signed by the threshold of its own roots"
                        )
                else:
                    old = latest.contents
                    trusted = anchor_list.TrustedAnchors(
                        old.version, old.roots, old.threshold, old.authors, old.freshness
                    )
                    anchor_list.verify_update(
                        trusted, body, vendor_id=new.vendor_id, class_id=new.class_id
                    )
                db.execute(
                    f"INSERT INTO anchor_lists ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*key, new.version, body, signed.digest, now, actor),
                )
                self.audit(
                    actor,
                    "anchors.publish",
                    label,
                    "ok",
                    f"version {new.version}, {len(new.authors)} author keys "
                    f"({', '.join(anchor_list.key_id(k) for k in new.authors)}), "
                    f"{len(new.freshness)} freshness keys, roots {new.threshold}-of-"
                    f"{len(new.roots)}",
                )
        except (AuthenticationError, PolicyError, RollbackError) as exc:
            self.audit(actor, "anchors.publish", label, "refused", str(exc))
            raise
        return AnchorListRecord(*key, new.version, body, signed.digest, now, actor)

    def record_anchor_status(
        self, device_id: str, anchor_version: int | None, freshness: int | None
    ) -> None:
        """What the device's latest report said it holds (called inside record_report)."""
        if anchor_version is None and freshness is None:
            return
        if anchor_version is not None and anchor_version > anchor_list.MAX_VERSION:
            raise ManifestError("report anchor version above 2^63-1")
        cur = self._db.execute(
            "UPDATE devices SET anchor_version = COALESCE(?, anchor_version), "
            "freshness = COALESCE(?, freshness) WHERE id = ?",
            (anchor_version, freshness, device_id),
        )
        if cur.rowcount == 0:
            raise NotFound(f"no device {device_id!r}")

    def anchor_status(self) -> Iterator[DeviceAnchorStatus]:
        for row in self._db.execute(
            "SELECT id, anchor_version, freshness FROM devices ORDER BY id"
        ).fetchall():
            yield DeviceAnchorStatus(*row)


FRESHNESS_KEY_NAME = "freshness.key"
"""The server's online freshness key (TUF timestamp role), PEM, 0600, in the data dir."""


def freshness_key_path(root: Path) -> Path:
    return root / FRESHNESS_KEY_NAME


def load_freshness_key(root: Path) -> cose.SigningKey | None:
    """The server's freshness key, or None if `otacoap anchors freshness-key` never ran."""
    path = freshness_key_path(root)
    if not path.exists():
        return None
    return cose.load_private_key(read_capped(path, 16 * 1024))


def check_publish_signer(store: Any, key: ClassKey, signer: cose.TrustAnchor) -> None:
    """A class with an anchor list publishes only manifests its current authors signed.

    What its devices would refuse anyway (a revoked key) is refused at publish time, so
    it never becomes the class's current release.
    """
    latest = store.latest_anchor_list(key)
    if latest is None or signer.kind not in ("p256", "ed25519"):
        return
    if anchor_list.compact_key(signer) not in latest.contents.authors:
        raise AuthenticationError(
            f"key {signer.key_id} is not an author in anchor list version {latest.version} "
            "of this class (revoked?); devices would refuse the manifest"
        )
