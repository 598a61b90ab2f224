"""The data directory: config.toml, otacoap.db, blobs/ (with blobs/tmp/) and server.key.

`init` is idempotent and never destroys: it creates what is missing, applies pending
schema migrations and leaves everything that exists alone. It refuses to mint a new
server key for a database that already holds sealed PSKs (they would become
unreadable).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, default_toml, load_config
from ..fsutil import atomic_write
from .blobs import BlobStore
from .errors import NotInitialised, StoreError
from .secrets import PskSealer, create_secret, load_secret
from .sqlite import SQLiteStore

CONFIG_NAME = "config.toml"
DB_NAME = "otacoap.db"
BLOB_DIR = "blobs"
KEY_NAME = "server.key"
DEFAULT_DATA_DIR = "otacoap-data"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    @property
    def key_path(self) -> Path:
        return self.root / KEY_NAME

    @property
    def blobs(self) -> BlobStore:
        return BlobStore(self.root / BLOB_DIR)

    def init(self) -> list[str]:
        """Create what is missing; return the names of what was created."""
        created: list[str] = []
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} exists and is not a directory")
        if not self.root.exists():
            self.root.mkdir(mode=0o700, parents=True)
            created.append(str(self.root))
        if not self.config_path.exists():
            atomic_write(self.config_path, default_toml().encode(), mode=0o644)
            created.append(CONFIG_NAME)
        else:
            load_config(self.config_path)  # refuse to go on with a broken config
        if not self.key_path.exists():
            if self.db_path.exists() and _has_sealed_psks(self.db_path):
                raise StoreError(
                    f"{self.key_path} is missing but {DB_NAME} holds sealed PSKs; "
                    "restore the key file instead of creating a new one"
                )
            create_secret(self.key_path)
            created.append(KEY_NAME)
        blobs = self.blobs
        if not blobs.tmp.is_dir():
            blobs.create_dirs()
            created.append(f"{BLOB_DIR}/")
        new_db = not self.db_path.exists()
        store = SQLiteStore(self.db_path, PskSealer(load_secret(self.key_path)))
        try:
            applied = store.applied_migrations
            if new_db:
                store.audit("cli", "init", str(self.root), "ok")
        finally:
            store.close()
        if new_db:
            created.append(DB_NAME)
        elif applied:
            created.append(f"{DB_NAME} migrations {applied}")
        return created

    def check(self) -> None:
        for path in (self.config_path, self.db_path, self.key_path):
            if not path.exists():
                raise NotInitialised(
                    f"{self.root} is not an otacoap data directory ({path.name} missing; "
                    f"run 'otacoap init {self.root}')"
                )
        self.blobs.check()

    def config(self) -> Config:
        self.check()
        return load_config(self.config_path)

    def sealer(self) -> PskSealer:
        return PskSealer(load_secret(self.key_path))

    def open_store(self, *, check_same_thread: bool = True) -> SQLiteStore:
        self.check()
        return SQLiteStore(self.db_path, self.sealer(), check_same_thread=check_same_thread)


def _has_sealed_psks(db: Path) -> bool:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        for table in ("devices", "operators"):
            try:
                if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                    return True
            except sqlite3.OperationalError:
                continue
        return False
    finally:
        conn.close()
