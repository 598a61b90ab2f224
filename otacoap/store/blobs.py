"""Content-addressed blob store: files named by their SHA-256, written atomically.

A blob is written to a temporary file inside the store (`tmp/`, same file system, so
the final rename is atomic), fsynced, and only then renamed to its digest name and
the directory fsynced (TUF "persist metadata", ATTACKS.md #49). Its name is the digest
computed while writing, never a name from outside (ATTACKS.md #35). A crash leaves at
worst an orphaned temp file, which `clean_tmp` removes, never a half-written blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import TracebackType

from ..core.errors import LimitExceeded
from ..fsutil import fsync_dir
from .errors import StoreError

TMP_DIR = "tmp"
_TMP_SUFFIX = ".part"


class TempBlob:
    """A blob being written: hashed and counted as it streams, deleted unless committed."""

    def __init__(self, directory: Path, cap: int | None, prefix: str = "blob-") -> None:
        self._cap = cap
        self._hasher = hashlib.sha256()
        self.size = 0
        name = f"{prefix}{secrets.token_hex(8)}{_TMP_SUFFIX}"
        self.path = directory / name
        # O_EXCL + O_NOFOLLOW: never write through a planted symlink (ATTACKS.md #35).
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self._fd: int | None = os.open(self.path, flags, 0o600)
        self._digest: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._fd is None or self._digest is not None:
            raise StoreError("temporary blob is closed")
        if self._cap is not None and self.size + len(data) > self._cap:
            raise LimitExceeded(f"image exceeds the {self._cap}-byte limit")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._hasher.update(data)
        self.size += len(data)

    def finish(self) -> bytes:
        """Flush to disk and return the SHA-256; no more writes after this."""
        if self._digest is None:
            if self._fd is None:
                raise StoreError("temporary blob is closed")
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            self._digest = self._hasher.digest()
        return self._digest

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            raise StoreError("temporary blob not finished")
        return self._digest

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> TempBlob:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()


class BlobStore:
    """The blob directory. Safe to share between processes; blobs are immutable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / TMP_DIR

    def create_dirs(self) -> None:
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.tmp.mkdir(mode=0o700, exist_ok=True)

    def check(self) -> None:
        if not self.tmp.is_dir():
            raise StoreError(f"{self.tmp} is missing (run 'otacoap init')")

    def path_of(self, digest: bytes) -> Path:
        if len(digest) != 32:
            raise StoreError("blob names are SHA-256 digests")
        return self.root / digest.hex()

    def has(self, digest: bytes) -> bool:
        return self.path_of(digest).is_file()

    def temp(self, cap: int | None = None, prefix: str = "blob-") -> TempBlob:
        """A new temp blob; `prefix` lets its owner find its own leftovers later."""
        return TempBlob(self.tmp, cap, prefix)

    def commit(self, blob: TempBlob) -> bool:
        """Move a finished temp blob to its digest name; True if it was new.

        An existing blob with that name has the same content by construction, so the
        temp file is simply dropped.
        """
        digest = blob.finish()
        target = self.path_of(digest)
        if target.exists():
            blob.discard()
            return False
        os.chmod(blob.path, 0o444)
        os.replace(blob.path, target)
        fsync_dir(self.root)
        return True

    def put(self, data: bytes) -> bytes:
        with self.temp() as blob:
            blob.write(data)
            self.commit(blob)
            return blob.digest

    def remove(self, digest: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_of(digest))
        fsync_dir(self.root)

    def size(self, digest: bytes) -> int:
        return self.path_of(digest).stat().st_size

    def temp_files(self, prefix: str = "") -> list[Path]:
        return sorted(self.tmp.glob(prefix + "*" + _TMP_SUFFIX))

    def clean_tmp(self, older_than: float = 0.0, prefix: str = "") -> int:
        """Remove temp files not modified for `older_than` seconds (crash leftovers)."""
        now = time.time()
        removed = 0
        for path in self.temp_files(prefix):
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime >= older_than:
                    path.unlink()
                    removed += 1
        return removed

    def reader(self, max_open: int = 32) -> BlobReader:
        return BlobReader(self, max_open)


class BlobReader:
    """Random-access reads of blobs through a small LRU of open descriptors.

    Stateless Block2 (RFC 7959 §2.4) turns every request into one pread of exactly
    the requested range; keeping hot images open avoids an open/close per block.
    """

    def __init__(self, blobs: BlobStore, max_open: int) -> None:
        self._blobs = blobs
        self._max_open = max_open
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, digest: bytes, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, or StoreError (never a short block)."""
        if offset < 0 or length < 0:
            raise StoreError("negative blob range")
        with self._lock:
            fd = self._fds.get(digest)
            if fd is None:
                fd = os.open(self._blobs.path_of(digest), os.O_RDONLY)
                self._fds[digest] = fd
                while len(self._fds) > self._max_open:
                    _, old = self._fds.popitem(last=False)
                    os.close(old)
            else:
                self._fds.move_to_end(digest)
            data = os.pread(fd, length, offset)
        if len(data) != length:
            raise StoreError(f"blob {digest.hex()[:16]} is shorter than recorded")
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
