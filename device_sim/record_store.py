"""The two-copy power-safe record store in simulated NOR flash.

The device's persistent state (which slot is active, what update is in progress) must
survive a power cut at any instant, or a device can brick itself while updating. Two
copies live in separate sector ranges; a save only ever erases and rewrites the copy
that does *not* hold the newest valid record, so the newest record is never touched
while it is the only good one.

On-flash record (little-endian), padded with 0xFF to ``write_align``::

    magic   4   b"OTAS"
    version 1   FORMAT_VERSION
    counter 4   u32, +1 per save, starts at 1
    length  4   u32 payload length
    payload     opaque bytes (the caller's CBOR)
    crc32   4   zlib.crc32 over everything above

Commit point. A save erases the target copy, programs everything *except* the first
write unit (the one holding the magic), reads it back, and only then programs the first
unit. Until that last write lands, the copy has no magic and is rejected without
relying on the CRC; a torn final write programs half a write unit aligned down, which
for ``write_align <= 16`` always leaves the magic, version or length invalid. So a
power cut anywhere in a save leaves ``load()`` returning the old record, and the new
one appears only once it has been fully written. The CRC is the backstop for damage
after the fact (bit rot, a torn erase of a previously valid copy).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from otacoap.core.sizes import round_up

from .flash import FlashWriteError, SimFlash

MAGIC = b"OTAS"
FORMAT_VERSION = 1
MAX_COUNTER = 0xFFFFFFFF

_HEADER = struct.Struct("<4sBII")
_TRAILER = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
TRAILER_SIZE = _TRAILER.size
OVERHEAD = HEADER_SIZE + TRAILER_SIZE

_READ_CHUNK = 4096
"""Streaming granularity for CRC checks and read-back, so memory does not grow with
copy_size."""


class StateStoreError(Exception):
    """The new record could not be written; the previous one is still intact."""


class RecordTooLarge(StateStoreError, ValueError):
    """The payload does not fit a copy; nothing was written, the old record stands.

    A StateStoreError like every other failure to save, so the callers that must keep
    the device bootable (bootloader, agent) handle it; also a ValueError, because
    it is the caller's data that is wrong.
    """


class _VerifyError(Exception):
    """Read-back differs from what was programmed (a dropped or corrupted write)."""


def encode_record(counter: int, payload: bytes, write_align: int = 1) -> bytes:
    """Serialise one record exactly as it is stored, padding included.

    Public so tests and tools can plant records (e.g. a counter near exhaustion)
    without going through :meth:`StateStore.save`.
    """
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError("counter does not fit in 32 bits")
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, counter, len(payload)) + payload
    record = body + _TRAILER.pack(zlib.crc32(body))
    return record + b"\xff" * (round_up(len(record), write_align) - len(record))


@dataclass(frozen=True)
class _Copy:
    index: int
    counter: int
    length: int


class StateStore:
    """Two-copy record store; every call goes to flash, nothing is cached.

    No cache on purpose: a cached record could hide what a power cut or corruption did
    to the medium, which is exactly what the simulator exists to expose.
    """

    def __init__(self, flash: SimFlash, offset: int, copy_size: int, *, attempts: int = 3) -> None:
        ss = flash.sector_size
        if offset < 0 or offset % ss:
            raise ValueError(f"offset {offset:#x} is not sector-aligned")
        if copy_size <= 0 or copy_size % ss:
            raise ValueError(f"copy_size {copy_size:#x} is not a positive multiple of {ss:#x}")
        if offset + 2 * copy_size > flash.size:
            raise ValueError("state area does not fit in the flash")
        if copy_size < OVERHEAD:
            raise ValueError("copy_size cannot hold even an empty record")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._flash = flash
        self._offset = offset
        self._copy_size = copy_size
        self._attempts = attempts

    @property
    def flash(self) -> SimFlash:
        return self._flash

    @property
    def max_payload(self) -> int:
        # copy_size is a multiple of write_align, so padding never pushes a record past it.
        return self._copy_size - OVERHEAD

    def copy_offset(self, index: int) -> int:
        """Flash offset of copy 0 or 1, for tests that damage one copy on purpose."""
        if index not in (0, 1):
            raise ValueError("copy index must be 0 or 1")
        return self._offset + index * self._copy_size

    def copy_counters(self) -> tuple[int | None, int | None]:
        """Counter of each copy if it is valid, else None; shows which copy a save used."""
        c0, c1 = self._probe(0), self._probe(1)
        return (c0.counter if c0 else None, c1.counter if c1 else None)

    def load(self) -> tuple[int, bytes] | None:
        """Return (counter, payload) of the newest valid copy.

        None means neither copy holds a valid record, which after correct use of
        ``save`` only happens before the first save has completed. There is no
        fallback to defaults while one valid copy exists.
        """
        newest = self._newest()
        if newest is None:
            return None
        base = self.copy_offset(newest.index)
        return newest.counter, self._flash.read(base + HEADER_SIZE, newest.length)

    def load_all(self) -> list[tuple[int, int, bytes]]:
        """(copy index, counter, payload) of every valid copy, newest first.

        For a caller that judges payloads itself (the device state decoder): a copy
        whose CRC holds may still carry a record the caller cannot use, and then the
        older copy is the one to use (and to spare, see ``save``'s ``keep``).
        """
        copies = sorted(
            (c for c in (self._probe(0), self._probe(1)) if c is not None),
            key=lambda c: (c.counter, -c.index),
            reverse=True,
        )
        return [
            (
                c.index,
                c.counter,
                self._flash.read(self.copy_offset(c.index) + HEADER_SIZE, c.length),
            )
            for c in copies
        ]

    def save(self, payload: bytes, *, keep: int | None = None) -> int:
        """Write payload as the new newest record and return its counter.

        The copy written is the one that does not hold the newest valid record, or, if
        ``keep`` names a valid copy, the one that is not ``keep``: the caller's way to
        spare an older copy when the newest one holds a record it cannot decode. The
        counter always exceeds every valid copy's, so the new record is the newest.

        Raises RecordTooLarge if the payload cannot fit, StateStoreError if writing
        kept failing (in both cases the previous record is still what ``load`` returns). PowerCut
        always propagates: there is nothing to recover in a device without power.
        """
        payload = bytes(payload)
        if len(payload) > self.max_payload:
            raise RecordTooLarge(f"payload of {len(payload)} bytes exceeds {self.max_payload}")
        newest = self._newest()
        counter = 1 if newest is None else newest.counter + 1
        if counter > MAX_COUNTER:
            # ~4e9 saves outlasts any flash's erase endurance; refuse rather than wrap,
            # because a wrapped counter would make the older copy look newer.
            raise StateStoreError("state counter exhausted")
        target = 0 if newest is None else 1 - newest.index
        if keep is not None and newest is not None and self._probe(keep) is not None:
            target = 1 - keep
        record = encode_record(counter, payload, self._flash.write_align)
        last: Exception | None = None
        for _ in range(self._attempts):
            try:
                self._program(target, record)
            except (FlashWriteError, _VerifyError) as exc:
                last = exc
                continue
            return counter
        raise StateStoreError(
            f"could not write state copy {target} after {self._attempts} attempts"
        ) from last

    # -- internals ------------------------------------------------------------------

    def _newest(self) -> _Copy | None:
        valid = [c for c in (self._probe(0), self._probe(1)) if c is not None]
        if not valid:
            return None
        # Equal counters never arise from save(); prefer copy 0 so the choice is stable.
        return max(valid, key=lambda c: (c.counter, -c.index))

    def _probe(self, index: int) -> _Copy | None:
        """Validate one copy by streaming it, without holding its payload."""
        flash = self._flash
        base = self.copy_offset(index)
        header = flash.read(base, HEADER_SIZE)
        magic, version, counter, length = _HEADER.unpack(header)
        if magic != MAGIC or version != FORMAT_VERSION or length > self.max_payload:
            return None
        crc = zlib.crc32(header)
        pos = base + HEADER_SIZE
        end = pos + length
        while pos < end:
            n = min(_READ_CHUNK, end - pos)
            crc = zlib.crc32(flash.read(pos, n), crc)
            pos += n
        (stored,) = _TRAILER.unpack(flash.read(end, TRAILER_SIZE))
        if stored != crc:
            return None
        return _Copy(index, counter, length)

    def _program(self, index: int, record: bytes) -> None:
        """Erase the copy, write the body, verify it, then commit with the magic unit."""
        flash = self._flash
        base = self.copy_offset(index)
        flash.erase(base, round_up(len(record), flash.sector_size))
        head = min(round_up(len(MAGIC), flash.write_align), len(record))
        view = memoryview(record)
        if head < len(record):
            flash.write(base + head, view[head:])
            self._verify(base + head, view[head:])
        flash.write(base, view[:head])
        self._verify(base, view)

    def _verify(self, offset: int, expected: memoryview) -> None:
        pos = 0
        while pos < len(expected):
            n = min(_READ_CHUNK, len(expected) - pos)
            if self._flash.read(offset + pos, n) != expected[pos : pos + n]:
                raise _VerifyError(f"read-back mismatch at {offset + pos:#x}")
            pos += n
