"""Persistent state of the update server: SQLite, a content-addressed blob store, and
the audit log, behind the `Store` interface (DESIGN.md layering: imports only core)."""

from __future__ import annotations

from .blobs import BlobReader, BlobStore, TempBlob
from .datadir import DEFAULT_DATA_DIR, DataDir
from .interface import Store
from .models import (
    AnchorRecord,
    ClassKey,
    DeviceRecord,
    ImageRecord,
    OperatorRecord,
    Principal,
    ReleaseCandidate,
    ReleaseRecord,
    ReportOutcome,
    ReportRecord,
    Role,
)
from .publish import Publisher
from .sqlite import SQLiteStore

__all__ = [
    "DEFAULT_DATA_DIR",
    "AnchorRecord",
    "BlobReader",
    "BlobStore",
    "ClassKey",
    "DataDir",
    "DeviceRecord",
    "ImageRecord",
    "OperatorRecord",
    "Principal",
    "Publisher",
    "ReleaseCandidate",
    "ReleaseRecord",
    "ReportOutcome",
    "ReportRecord",
    "Role",
    "SQLiteStore",
    "Store",
    "TempBlob",
]
