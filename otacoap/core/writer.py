"""The streaming image writer: one payload into one staging slot, block by block.

Sans-I/O in the DESIGN sense: the flash is *injected* (anything with read/erase/write
and its geometry), so the same writer serves the simulator, tests and, in principle, a
real driver; the core never opens a file. The writer owns the rules that keep a staged
image honest, so the agent cannot get them wrong:

* bytes land only at the next expected offset and never past the manifest's size
  (RFC 9124 REQ.SEC.IMG.COMPLETE_DIGEST, ATTACKS.md #11/#12/#22);
* a sector is erased right before its first byte is written (NOR: programming only
  clears bits), never earlier, so a resume never erases what a checkpoint covers;
* every program is read back: a dropped write (still 0xFF) is retried, anything else
  fails the writer (ATTACKS.md #48);
* the SHA-256 is fed strictly in order with exactly `size` bytes; on a resume the hash
  is recomputed from the flash prefix, because hash state is not trusted across a
  restart (ATTACKS.md #23).

Resume points are sector boundaries (the agent persists `offset` only there), so the
sector a resume starts in is erased again and anything a power cut left in it beyond the
checkpoint is wiped before it is rewritten.

The final partial write unit is padded with 0xFF, the erased value, so those pad bytes
program nothing: the slot past `size` stays erased.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Protocol

from . import suit
from .errors import ConditionFailed, OtaError, ReportReason, TransferError

ERASED = 0xFF
HASH_CHUNK = 4096


class FlashRegion(Protocol):
    """What the writer needs of a flash device (device_sim.flash.SimFlash fits)."""

    @property
    def sector_size(self) -> int: ...

    @property
    def write_align(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def erase(self, offset: int, length: int) -> None: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


class StagingError(OtaError):
    """The flash would not take the image (write kept failing, read-back differs)."""

    reason = ReportReason.OPERATION_FAILED


class WriterPhase(StrEnum):
    WRITING = "writing"
    COMPLETE = "complete"
    FAILED = "failed"


class _Op(StrEnum):
    WRITE = "write"
    FINISH = "finish"
    FAIL = "fail"


# One table for the writer's life (DESIGN principle 5); FAILED is sticky.
_TRANSITIONS: Mapping[tuple[WriterPhase, _Op], WriterPhase] = {
    (WriterPhase.WRITING, _Op.WRITE): WriterPhase.WRITING,
    (WriterPhase.WRITING, _Op.FINISH): WriterPhase.COMPLETE,
    (WriterPhase.WRITING, _Op.FAIL): WriterPhase.FAILED,
    (WriterPhase.COMPLETE, _Op.FAIL): WriterPhase.FAILED,
}


def hash_region(
    flash: FlashRegion, offset: int, length: int, algorithm: int = suit.DIGEST_SHA256
) -> bytes:
    """Digest a flash range in HASH_CHUNK pieces (bounded memory for any image size)."""
    h = suit.new_hasher(algorithm)
    pos, end = offset, offset + length
    while pos < end:
        n = min(HASH_CHUNK, end - pos)
        h.update(flash.read(pos, n))
        pos += n
    return bytes(h.digest())


class ImageWriter:
    """Streams exactly `size` bytes into [base, base + capacity) and checks the digest."""

    def __init__(
        self,
        flash: FlashRegion,
        *,
        base: int,
        capacity: int,
        size: int,
        digest: suit.SuitDigest,
        resume_at: int = 0,
        retryable: tuple[type[Exception], ...] = (),
        write_attempts: int = 3,
    ) -> None:
        sector = flash.sector_size
        if base % sector or capacity % sector or capacity <= 0:
            raise ValueError("staging slot must be whole sectors")
        if not 0 < size <= capacity:
            raise TransferError(f"image of {size} bytes does not fit the {capacity}-byte slot")
        if not (0 <= resume_at <= size and (resume_at % sector == 0 or resume_at == size)):
            raise ValueError(f"resume offset {resume_at} is not a sector boundary")
        if write_attempts < 1:
            raise ValueError("write_attempts must be at least 1")
        self._flash = flash
        self._base = base
        self._capacity = capacity
        self._size = size
        self._digest = digest
        self._retryable = retryable
        self._attempts = write_attempts
        self._phase = WriterPhase.WRITING
        self._offset = resume_at
        self._erased_upto = resume_at  # exclusive end of what this writer erased
        self._hasher: Any = suit.new_hasher(digest.algorithm)
        # Re-hash the durable prefix from flash: never trust a hash state from before a
        # restart, only the bytes that are actually in the slot (ATTACKS.md #23).
        pos = 0
        while pos < resume_at:
            n = min(HASH_CHUNK, resume_at - pos)
            self._hasher.update(flash.read(base + pos, n))
            pos += n

    # -- state ---------------------------------------------------------------------------

    @property
    def phase(self) -> WriterPhase:
        return self._phase

    @property
    def offset(self) -> int:
        """Bytes of the image written and verified so far (the next expected offset)."""
        return self._offset

    @property
    def size(self) -> int:
        return self._size

    @property
    def remaining(self) -> int:
        return self._size - self._offset

    def _go(self, op: _Op) -> None:
        key = (self._phase, op)
        if key not in _TRANSITIONS:
            raise StagingError(f"writer is {self._phase.value}; cannot {op.value}")
        self._phase = _TRANSITIONS[key]

    def _fail(self, exc: OtaError) -> OtaError:
        if (self._phase, _Op.FAIL) in _TRANSITIONS:
            self._go(_Op.FAIL)
        return exc

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append the next bytes of the image at `offset`."""
        self._go(_Op.WRITE)
        view = memoryview(data).cast("B")
        n = view.nbytes
        if n == 0:
            return
        if self._offset + n > self._size:
            raise self._fail(TransferError("more bytes than the image size the manifest states"))
        align = self._flash.write_align
        end = self._offset + n
        if n % align and end != self._size:
            raise self._fail(TransferError("unaligned block in the middle of the image"))
        self._erase_ahead(end)
        if n % align:
            # Only the last write unit: pad with the erased value, which programs nothing.
            buf: bytes | memoryview = bytes(view) + bytes([ERASED]) * (align - n % align)
        else:
            buf = view
        self._program(self._base + self._offset, buf)
        self._hasher.update(view)
        self._offset = end

    def _erase_ahead(self, end: int) -> None:
        sector = self._flash.sector_size
        while self._erased_upto < end:
            if self._erased_upto + sector > self._capacity:
                raise self._fail(StagingError("image would run past the staging slot"))
            self._flash.erase(self._base + self._erased_upto, sector)
            self._erased_upto += sector

    def _program(self, address: int, buf: bytes | memoryview) -> None:
        for _ in range(self._attempts):
            try:
                self._flash.write(address, buf)
            except self._retryable:
                continue  # the flash reports nothing changed: try again
            back = self._flash.read(address, len(buf))
            if back == buf:
                return
            if back.count(ERASED) != len(back):
                # Partly programmed with something else: cannot be rewritten without an
                # erase, and erasing would undo verified neighbours. Give up.
                raise self._fail(StagingError("flash read-back differs from what was written"))
            # Still erased: the write was silently dropped. Program it again.
        raise self._fail(StagingError(f"flash write failed {self._attempts} times"))

    # -- the end -------------------------------------------------------------------------

    def finish(self) -> None:
        """Check size and digest of what was streamed; raise and stay FAILED on mismatch."""
        if (self._phase, _Op.FINISH) not in _TRANSITIONS:
            raise StagingError(f"writer is {self._phase.value}; cannot finish")
        if self._offset != self._size:
            raise self._fail(
                TransferError(f"image ended after {self._offset} of {self._size} bytes")
            )
        if not hmac.compare_digest(self._hasher.digest(), self._digest.value):
            raise self._fail(ConditionFailed("image digest does not match the manifest"))
        self._go(_Op.FINISH)
