"""The data directory: config.toml, otacoap.db, blobs/ (with blobs/tmp/) and server.key.

The store is otacoap.db (SQLite) unless config.toml's `[store] url` names a PostgreSQL
database (`otacoap init --store URL`, store/postgres.py); server.key and blobs/ stay
here either way.

`init` is idempotent and never destroys: it creates what is missing, applies pending
schema migrations and leaves everything that exists alone. It refuses to mint a new
server key for a database that already holds sealed PSKs (they would become
unreadable).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, check_store_url, default_toml, load_config
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

    def init(self, store_url: str | None = None) -> list[str]:
        """Create what is missing; return the names of what was created. `store_url`
        (a postgresql:// URL) goes into a new config.toml's [store] url."""
        created: list[str] = []
        if store_url:
            check_store_url(store_url)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} exists and is not a directory")
        if not self.root.exists():
            self.root.mkdir(mode=0o700, parents=True)
            created.append(str(self.root))
        if not self.config_path.exists():
            text = default_toml()
            if store_url:
                text = text.replace('\nurl = ""', f"\nurl = {json.dumps(store_url)}", 1)
            atomic_write(self.config_path, text.encode(), mode=0o644)
            created.append(CONFIG_NAME)
        else:
            existing = load_config(self.config_path).store.url  # refuses a broken config
            if store_url and store_url != existing:
                raise StoreError(
                    f"{self.config_path} already names the store {existing or DB_NAME!r}; "
                    "edit [store] url there (or use 'otacoap store migrate')"
                )
        url = load_config(self.config_path).store.url
        if not self.key_path.exists():
            if _has_sealed_psks(self.db_path, url):
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
        new_db = not url and not self.db_path.exists()
        store = self._open(url)
        try:
            applied = store.applied_migrations
            new_db = new_db or (bool(url) and 1 in applied)
            if new_db:
                store.audit("cli", "init", str(self.root), "ok")
        finally:
            store.close()
        name = DB_NAME
        if url:
            from .postgres import redact

            name = redact(url)
        if new_db:
            created.append(name)
        elif applied:
            created.append(f"{name} migrations {applied}")
        return created

    def check(self) -> None:
        for path in (self.config_path, self.key_path):
            if not path.exists():
                raise NotInitialised(
                    f"{self.root} is not an otacoap data directory ({path.name} missing; "
                    f"run 'otacoap init {self.root}')"
                )
        if not self.db_path.exists() and not load_config(self.config_path).store.url:
            raise NotInitialised(
                f"{self.root} is not an otacoap data directory ({DB_NAME} missing; "
                f"run 'otacoap init {self.root}')"
            )
        self.blobs.check()

    def config(self) -> Config:
        self.check()
        return load_config(self.config_path)

    def sealer(self) -> PskSealer:
        return PskSealer(load_secret(self.key_path))

    def store_url(self) -> str:
        """config.toml's [store] url: empty for the SQLite file in this directory."""
        return load_config(self.config_path).store.url

    def open_store(self, *, check_same_thread: bool = True) -> SQLiteStore:
        """The store config.toml names (PostgresStore is an SQLiteStore over psycopg)."""
        self.check()
        return self._open(self.store_url(), check_same_thread=check_same_thread)

    def _open(self, url: str, *, check_same_thread: bool = True) -> SQLiteStore:
        if url:
            from .postgres import PostgresStore  # psycopg only when it is used

            return PostgresStore(url, self.sealer(), blobs=self.blobs)
        return SQLiteStore(self.db_path, self.sealer(), check_same_thread=check_same_thread)


def _has_sealed_psks(db: Path, url: str = "") -> bool:
    if url:
        from .postgres import has_principals

        return has_principals(url)
    if not db.exists():
        return False
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
