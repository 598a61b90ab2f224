"""Content-addressed blob store: atomic writes, no temp leftovers, bounded reads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from otacoap.core.errors import LimitExceeded
from otacoap.store import BlobStore
from otacoap.store.errors import StoreError


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    store = BlobStore(tmp_path / "blobs")
    store.create_dirs()
    return store


def test_blobs_are_named_by_their_sha256(blobs: BlobStore) -> None:
    data = os.urandom(5000)
    digest = blobs.put(data)
    assert digest == hashlib.sha256(data).digest()
    assert blobs.path_of(digest).name == digest.hex()
    assert blobs.path_of(digest).read_bytes() == data
    assert blobs.temp_files() == []


def test_same_content_twice_is_one_blob(blobs: BlobStore) -> None:
    assert blobs.put(b"abc") == blobs.put(b"abc")
    assert sorted(p.name for p in blobs.root.iterdir()) == sorted(
        ["tmp", hashlib.sha256(b"abc").hexdigest()]
    )
    assert blobs.temp_files() == []


def test_streamed_blob_is_invisible_until_committed(blobs: BlobStore) -> None:
    with blobs.temp() as blob:
        blob.write(b"x" * 100)
        assert blob.path.parent == blobs.tmp
        assert [p.name for p in blobs.root.iterdir()] == ["tmp"]
        digest = blob.finish()
        assert blobs.commit(blob) is True
    assert blobs.has(digest)
    assert blobs.temp_files() == []


def test_abandoned_and_over_cap_blobs_leave_nothing(blobs: BlobStore) -> None:
    with blobs.temp() as blob:
        blob.write(b"partial")
    with pytest.raises(LimitExceeded), blobs.temp(cap=10) as blob:
        blob.write(b"12345")
        blob.write(b"678901")
    assert [p.name for p in blobs.root.iterdir()] == ["tmp"]
    assert blobs.temp_files() == []


def test_clean_tmp_removes_crash_leftovers(blobs: BlobStore) -> None:
    (blobs.tmp / "blob-dead.part").write_bytes(b"half")
    os.utime(blobs.tmp / "blob-dead.part", (0, 0))
    (blobs.tmp / "blob-live.part").write_bytes(b"in use")
    assert blobs.clean_tmp(older_than=60) == 1
    assert [p.name for p in blobs.temp_files()] == ["blob-live.part"]


def test_reader_reads_exact_ranges_and_never_past_the_end(blobs: BlobStore) -> None:
    data = bytes(range(256)) * 10
    digest = blobs.put(data)
    reader = blobs.reader(max_open=1)
    try:
        assert reader.read(digest, 0, 16) == data[:16]
        assert reader.read(digest, 2550, 10) == data[2550:]
        other = blobs.put(b"other")
        assert reader.read(other, 0, 5) == b"other"  # evicts the first descriptor
        assert reader.read(digest, 100, 1) == data[100:101]
        with pytest.raises(StoreError, match="shorter"):
            reader.read(digest, 2550, 11)
        with pytest.raises(StoreError):
            reader.read(digest, -1, 1)
    finally:
        reader.close()


def test_temp_files_are_private_and_not_symlink_followers(blobs: BlobStore) -> None:
    with blobs.temp() as blob:
        assert oct(blob.path.stat().st_mode & 0o777) == oct(0o600)
