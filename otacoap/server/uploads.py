"""Block1 (RFC 7959 §2.3) reassembly for operator uploads, streamed to temp blobs.

Independent of aiocoap so it can be tested without a network. The rules:
- an upload is keyed by (identity, peer address, resource, Request-Tag) (RFC 9175 §3,
  ATTACKS.md #27): bodies with different tags never mix;
- it must start at block 0 and continue without gaps: anything else is 4.08 Request
  Entity Incomplete (RFC 7959 §2.9.2) and drops the partial body, so a withheld or
  replayed block can never be spliced in;
- every non-final block is exactly the block size (§2.3); the body streams into a
  temp file in the blob store, never into RAM;
- a declared Size1 or a running total over the cap is 4.13 with Size1 = cap (§2.9.3,
  §4); concurrent reassemblies are capped globally and per peer, beyond which the
  answer is 5.03 with Max-Age (§7.1 "Mitigating Resource Exhaustion Attacks");
- an upload idle longer than the timeout is dropped by `sweep` (slowloris, #37).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import UploadConfig
from ..core.blockwise import BlockError, size_of
from ..core.coap_numbers import (
    BAD_REQUEST,
    OPT_MAX_AGE,
    OPT_SIZE1,
    REQUEST_ENTITY_INCOMPLETE,
    SERVICE_UNAVAILABLE,
)
from ..core.errors import LimitExceeded, OtaError
from ..store import BlobStore, TempBlob

log = logging.getLogger(__name__)

# Temp files of network uploads carry their own prefix: only the (single) server
# writes them, so at start-up it may delete all of them, while a concurrent CLI
# publish's temp files ("blob-") are left alone.
UPLOAD_PREFIX = "upload-"


class UploadIncomplete(OtaError):
    """4.08: a block out of sequence, or no upload to continue (RFC 7959 §2.9.2)."""

    coap_code = REQUEST_ENTITY_INCOMPLETE


class UploadTooLarge(LimitExceeded):
    """4.13 with Size1 = the cap (RFC 7959 §2.9.3): a request body over its limit."""

    def __init__(self, message: str, cap: int) -> None:
        super().__init__(message)
        self.cap = cap

    def coap_options(self) -> tuple[tuple[int, int], ...]:
        return ((OPT_SIZE1, self.cap),)


class UploadBusy(OtaError):
    """5.03 with Max-Age: every reassembly slot is taken."""

    coap_code = SERVICE_UNAVAILABLE

    def __init__(self, message: str, max_age: int) -> None:
        super().__init__(message)
        self.max_age = max_age

    def coap_options(self) -> tuple[tuple[int, int], ...]:
        return ((OPT_MAX_AGE, self.max_age),)  # RFC 7252 §5.9.3.4: retry after Max-Age


class UploadMalformed(OtaError):
    coap_code = BAD_REQUEST


UploadKey = tuple[str, str, str, bytes]
"""(identity, peer, resource, Request-Tag)."""


@dataclass(frozen=True)
class Block:
    num: int
    more: bool
    szx: int


@dataclass
class _Assembly:
    blob: TempBlob
    peer: str
    next_offset: int = 0
    last_seen: float = field(default=0.0)
    started: float = field(default=0.0)


class Uploads:
    def __init__(
        self, blobs: BlobStore, config: UploadConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._blobs = blobs
        self._config = config
        self._clock = clock
        self._active: dict[UploadKey, _Assembly] = {}

    def __len__(self) -> int:
        return len(self._active)

    def feed(
        self,
        key: UploadKey,
        block: Block | None,
        payload: bytes,
        cap: int,
        size1: int | None = None,
    ) -> TempBlob | None:
        """Take one request's payload; return the complete body or None (more to come).

        The returned TempBlob belongs to the caller, who must commit or discard it.
        """
        if size1 is not None and size1 > cap:
            # RFC 7959 §4: a declared Size1 lets us refuse before taking any bytes.
            self._drop(key)
            raise UploadTooLarge(f"upload of {size1} bytes exceeds the {cap}-byte limit", cap)
        if block is None:
            if len(payload) > cap:
                raise UploadTooLarge(f"upload exceeds the {cap}-byte limit", cap)
            self._drop(key)
            blob = self._blobs.temp(prefix=UPLOAD_PREFIX)
            try:
                blob.write(payload)
            except BaseException:
                blob.discard()
                raise
            return blob
        try:
            size = size_of(block.szx)  # RFC 7959 §2.2: SZX 7 is reserved (BERT is TCP only)
        except BlockError as exc:
            self._drop(key)
            raise UploadMalformed(str(exc)) from None
        if block.more and len(payload) != size:
            self._drop(key)
            raise UploadMalformed(f"non-final block of {len(payload)} bytes, block size {size}")
        if len(payload) > size:
            self._drop(key)
            raise UploadMalformed("block payload larger than the block size")
        now = self._clock()
        if block.num == 0:
            self._drop(key)  # a new body with the same tag replaces the old one
            self._admit(key[1])
            temp = self._blobs.temp(prefix=UPLOAD_PREFIX)
            self._active[key] = _Assembly(temp, key[1], 0, now, now)
        assembly = self._active.get(key)
        if assembly is None:
            raise UploadIncomplete(
                f"block {block.num} without an upload in progress (start at block 0)"
            )
        if now - assembly.started > self._config.max_duration:
            # A drip-feed just inside the idle timeout would hold a slot for ever.
            self._drop(key)
            raise UploadIncomplete(
                f"upload took longer than {self._config.max_duration:.0f} s; start again"
            )
        offset = block.num * size
        if offset != assembly.next_offset:
            self._drop(key)
            raise UploadIncomplete(
                f"block {block.num} does not continue the upload at byte {assembly.next_offset}"
            )
        if assembly.next_offset + len(payload) > cap:
            self._drop(key)
            raise UploadTooLarge(f"upload exceeds the {cap}-byte limit", cap)
        try:
            assembly.blob.write(payload)
        except BaseException:
            self._drop(key)
            raise
        assembly.next_offset += len(payload)
        assembly.last_seen = now
        if block.more:
            return None
        del self._active[key]
        return assembly.blob

    def _admit(self, peer: str) -> None:
        cfg = self._config
        if len(self._active) >= cfg.max_concurrent:
            self.sweep()
        if len(self._active) >= cfg.max_concurrent:
            raise UploadBusy("too many uploads in progress", cfg.busy_max_age)
        if sum(1 for a in self._active.values() if a.peer == peer) >= cfg.max_per_peer:
            raise UploadBusy("too many uploads in progress from this peer", cfg.busy_max_age)

    def cancel(self, key: UploadKey) -> bool:
        """Drop the upload in progress under `key` (its uploader gave up); True if any.

        Without this an interrupted upload held its slot and its partial file until the
        idle timeout."""
        present = key in self._active
        self._drop(key)
        return present

    def _drop(self, key: UploadKey) -> None:
        assembly = self._active.pop(key, None)
        if assembly is not None:
            assembly.blob.discard()

    def sweep(self) -> int:
        """Drop uploads idle for longer than the timeout or running for longer than
        max_duration; return how many."""
        now = self._clock()
        idle, old = now - self._config.idle_timeout, now - self._config.max_duration
        stale = [k for k, a in self._active.items() if a.last_seen < idle or a.started < old]
        for key in stale:
            log.info("dropping idle upload from %s (%s)", key[0], key[2])
            self._drop(key)
        return len(stale)

    def close(self) -> None:
        for key in list(self._active):
            self._drop(key)


@dataclass
class StagedImage:
    blob: TempBlob
    owner: str
    expires: float


class StagedImages:
    """Uploaded images waiting for the envelope that publishes them.

    Keyed by (operator identity, SHA-256): an operator can only publish an image it
    uploaded itself. Each expires after `staged_ttl`; nothing staged is visible to
    devices, and a server restart forgets (and the temp sweep deletes) them all.
    """

    def __init__(self, config: UploadConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._items: dict[tuple[str, bytes], StagedImage] = {}

    def __len__(self) -> int:
        return len(self._items)

    def put(self, owner: str, blob: TempBlob) -> None:
        self.sweep()
        key = (owner, blob.digest)
        old = self._items.pop(key, None)
        if old is not None:
            old.blob.discard()
        if len(self._items) >= self._config.max_staged:
            blob.discard()
            raise UploadBusy(
                "too many uploaded images await an envelope", self._config.busy_max_age
            )
        self._items[key] = StagedImage(blob, owner, self._clock() + self._config.staged_ttl)

    def take(self, owner: str, digest: bytes) -> TempBlob | None:
        """The owner's upload with this SHA-256; a shorter `digest` is an image id
        (SHA-256 prefix, for encrypted releases) and must match exactly one upload."""
        self.sweep()
        if len(digest) < 32:
            keys = [k for k in self._items if k[0] == owner and k[1].startswith(digest)]
            if len(keys) != 1:
                return None
            digest = keys[0][1]
        item = self._items.pop((owner, digest), None)
        return item.blob if item else None

    def sweep(self) -> int:
        now = self._clock()
        stale = [k for k, v in self._items.items() if v.expires <= now]
        for key in stale:
            self._items.pop(key).blob.discard()
        return len(stale)

    def close(self) -> None:
        for item in self._items.values():
            item.blob.discard()
        self._items.clear()
