"""Block1 reassembly rules, without a network (RFC 7959 §2.3, RFC 9175, ATTACKS.md
#26, #27, #37): streamed to temp files, keyed by Request-Tag, gaps are 4.08, caps are
4.13/5.03, idle uploads expire."""

from __future__ import annotations

from pathlib import Path

import pytest

from otacoap.config import UploadConfig
from otacoap.server.uploads import (
    Block,
    StagedImages,
    UploadBusy,
    UploadIncomplete,
    UploadMalformed,
    Uploads,
    UploadTooLarge,
)
from otacoap.store import BlobStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    b = BlobStore(tmp_path / "blobs")
    b.create_dirs()
    return b


def _key(tag: bytes, peer: str = "p1") -> tuple[str, str, str, bytes]:
    return ("operator:ops", peer, "image", tag)


def _send(up: Uploads, tag: bytes, body: bytes, szx: int = 0, cap: int = 10_000) -> bytes:
    size = 16 << szx
    blocks = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    for num, chunk in enumerate(blocks):
        blob = up.feed(_key(tag), Block(num, num < len(blocks) - 1, szx), chunk, cap)
    assert blob is not None
    try:
        blob.finish()
        return blob.path.read_bytes()
    finally:
        blob.discard()


def test_blocks_reassemble_in_a_temp_file(blobs: BlobStore) -> None:
    up = Uploads(blobs, UploadConfig())
    body = bytes(range(256)) * 3
    assert _send(up, b"t", body) == body
    assert len(up) == 0 and blobs.temp_files() == []


def test_interleaved_tags_never_splice(blobs: BlobStore) -> None:
    up = Uploads(blobs, UploadConfig())
    a, b = b"A" * 48, b"B" * 48
    for num in range(3):
        more = num < 2
        ra = up.feed(_key(b"tag-a"), Block(num, more, 0), a[num * 16 : num * 16 + 16], 1000)
        rb = up.feed(_key(b"tag-b"), Block(num, more, 0), b[num * 16 : num * 16 + 16], 1000)
    assert ra is not None and rb is not None
    ra.finish()
    rb.finish()
    assert ra.path.read_bytes() == a and rb.path.read_bytes() == b
    ra.discard()
    rb.discard()


def test_a_body_must_start_at_block_zero(blobs: BlobStore) -> None:
    up = Uploads(blobs, UploadConfig())
    with pytest.raises(UploadIncomplete, match="start at block 0") as exc:
        up.feed(_key(b"t"), Block(1, False, 0), b"x" * 10, 1000)
    assert exc.value.coap_code == (4 << 5) | 8


def test_a_gap_is_4_08_and_drops_the_partial_body(blobs: BlobStore) -> None:
    up = Uploads(blobs, UploadConfig())
    up.feed(_key(b"t"), Block(0, True, 0), b"x" * 16, 1000)
    with pytest.raises(UploadIncomplete, match="does not continue"):
        up.feed(_key(b"t"), Block(2, False, 0), b"x" * 16, 1000)
    assert len(up) == 0 and blobs.temp_files() == []
    with pytest.raises(UploadIncomplete):
        up.feed(_key(b"t"), Block(1, False, 0), b"x", 1000)


def test_a_withheld_first_block_cannot_be_injected_later(blobs: BlobStore) -> None:
    """ATTACKS.md #27: block 0 of body A released during body B restarts, never splices."""
    up = Uploads(blobs, UploadConfig())
    up.feed(_key(b""), Block(0, True, 0), b"B" * 16, 1000)
    up.feed(_key(b""), Block(0, True, 0), b"A" * 16, 1000)  # the withheld block
    with pytest.raises(UploadIncomplete):
        up.feed(_key(b""), Block(2, False, 0), b"B" * 5, 1000)


def test_short_non_final_block_and_reserved_szx(blobs: BlobStore) -> None:
    up = Uploads(blobs, UploadConfig())
    with pytest.raises(UploadMalformed, match="non-final"):
        up.feed(_key(b"t"), Block(0, True, 0), b"x" * 15, 1000)
    with pytest.raises(UploadMalformed, match="SZX 7"):
        up.feed(_key(b"t"), Block(0, True, 7), b"x" * 1024, 100_000)
    assert blobs.temp_files() == []


def test_over_the_cap_is_4_13_with_the_cap(blobs: BlobStore) -> None:
    up = Uploads(blobs, UploadConfig())
    with pytest.raises(UploadTooLarge) as exc:
        up.feed(_key(b"t"), Block(0, True, 0), b"x" * 16, 100, size1=2_000_000_000)
    assert exc.value.cap == 100 and exc.value.coap_code == (4 << 5) | 13
    for num in range(6):
        up.feed(_key(b"u"), Block(num, True, 0), b"x" * 16, 100)
    with pytest.raises(UploadTooLarge):
        up.feed(_key(b"u"), Block(6, True, 0), b"x" * 16, 100)
    with pytest.raises(UploadTooLarge):
        up.feed(_key(b"v"), None, b"x" * 101, 100)
    assert len(up) == 0 and blobs.temp_files() == []


def test_concurrency_caps_answer_busy_with_max_age(blobs: BlobStore) -> None:
    up = Uploads(blobs, UploadConfig(max_concurrent=3, max_per_peer=2, busy_max_age=7))
    up.feed(_key(b"1", "p1"), Block(0, True, 0), b"x" * 16, 1000)
    up.feed(_key(b"2", "p1"), Block(0, True, 0), b"x" * 16, 1000)
    with pytest.raises(UploadBusy, match="this peer") as exc:
        up.feed(_key(b"3", "p1"), Block(0, True, 0), b"x" * 16, 1000)
    assert exc.value.max_age == 7 and exc.value.coap_code == (5 << 5) | 3
    up.feed(_key(b"1", "p2"), Block(0, True, 0), b"x" * 16, 1000)
    with pytest.raises(UploadBusy, match=r"too many uploads in progress$"):
        up.feed(_key(b"1", "p3"), Block(0, True, 0), b"x" * 16, 1000)
    assert len(up) == 3 and len(blobs.temp_files()) == 3
    up.close()
    assert blobs.temp_files() == []


def test_idle_uploads_expire(blobs: BlobStore) -> None:
    clock = Clock()
    up = Uploads(blobs, UploadConfig(idle_timeout=10, max_concurrent=1), clock)
    up.feed(_key(b"slow"), Block(0, True, 0), b"x" * 16, 1000)
    clock.now = 5
    up.feed(_key(b"slow"), Block(1, True, 0), b"x" * 16, 1000)
    clock.now = 14
    assert up.sweep() == 0
    clock.now = 16
    # A new upload finds the slot held by an idle one: the sweep frees it.
    up.feed(_key(b"new"), Block(0, True, 0), b"x" * 16, 1000)
    assert len(up) == 1 and len(blobs.temp_files()) == 1
    with pytest.raises(UploadIncomplete):
        up.feed(_key(b"slow"), Block(2, True, 0), b"x" * 16, 1000)
    up.close()


def test_a_drip_fed_upload_ends_at_max_duration(blobs: BlobStore) -> None:
    """One block every 9 s never trips the 10 s idle timeout; the overall limit ends
    it (ATTACKS.md #37), and the sweep frees its slot even if no block comes."""
    clock = Clock()
    config = UploadConfig(idle_timeout=10, max_duration=30, max_concurrent=1)
    up = Uploads(blobs, config, clock)
    up.feed(_key(b"drip"), Block(0, True, 0), b"x" * 16, 10_000)
    for num in range(1, 4):
        clock.now = 9.0 * num
        assert up.feed(_key(b"drip"), Block(num, True, 0), b"x" * 16, 10_000) is None
    clock.now = 36
    with pytest.raises(UploadIncomplete, match="longer than 30 s"):
        up.feed(_key(b"drip"), Block(4, True, 0), b"x" * 16, 10_000)
    assert len(up) == 0 and blobs.temp_files() == []
    up.feed(_key(b"again"), Block(0, True, 0), b"x" * 16, 10_000)
    for num in range(1, 4):
        clock.now = 36 + 9.0 * num
        up.feed(_key(b"again"), Block(num, True, 0), b"x" * 16, 10_000)
    clock.now = 36 + 31  # 4 s since its last block: not idle, but over 30 s in all
    assert up.sweep() == 1 and blobs.temp_files() == []


def test_staged_images_expire_and_belong_to_their_uploader(blobs: BlobStore) -> None:
    clock = Clock()
    staged = StagedImages(UploadConfig(staged_ttl=60, max_staged=1), clock)
    blob = blobs.temp()
    blob.write(b"image")
    digest = blob.finish()
    staged.put("operator:a", blob)
    assert staged.take("operator:b", digest) is None
    other = blobs.temp()
    other.write(b"other")
    other.finish()
    with pytest.raises(UploadBusy):
        staged.put("operator:a", other)
    clock.now = 61
    assert staged.take("operator:a", digest) is None
    assert blobs.temp_files() == []
