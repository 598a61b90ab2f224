"""File helpers that never leave a half-written file behind (writes are atomic)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a mix
    (TUF "persist metadata", ATTACKS.md #49). The directory is fsynced so the rename
    itself survives power loss.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _about(target, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _about(target, exc) from None
        raise
    fsync_dir(directory)


def _about(target: Path, exc: OSError) -> OSError:
    """The same error, naming the file the caller asked for, not our temporary one
    (whose name means nothing to an operator)."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(target))


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_capped(path: str | os.PathLike[str], cap: int) -> bytes:
    """Read a file, refusing one larger than `cap` without reading it all."""
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"{path}: larger than {cap} bytes")
    return data
