"""Simulated NOR flash backed by a file, modelled on MCUboot's simflash.

The device simulator must survive the same things a real bootloader does: power cuts in
the middle of an erase or a program, writes that fail, and writes that silently do not
stick. A file is the simplest store that outlives a "reboot": the file is opened
unbuffered, so every operation has reached the OS before it returns, and reopening the
file (a restart) sees exactly what was programmed, and nothing that was not.

NOR rules enforced here (the mistakes they catch are real driver bugs):
- erase works on whole sectors only and sets every byte to 0xFF;
- programming can only clear bits; writing where ``(old & new) != new`` is refused with
  ``FlashError("write to unerased location ...")`` instead of silently ANDing, because
  on real parts the result would depend on the chip;
- writes are aligned to ``write_align`` in offset and length.

Op numbering. Every erase or write command that passes argument checking counts as one
op, whatever happens to it afterwards (cut, failed, dropped). Ops are numbered from 1
since the flash was opened or since :meth:`SimFlash.reset_counters`. Invalid commands
(bounds, alignment, unerased target) raise ``FlashError`` and are not counted: a driver
that issues them has a bug that never reaches the chip. Reads are not ops.

Power-cut rule (``FlashFaults.cut_after = k``): ops ``1 .. k-1`` complete normally; the
first op whose number is ``>= k`` raises :class:`PowerCut`. With ``torn=False`` that op
does not touch the file at all. With ``torn=True`` it is partially applied first:

- a write programs ``data[:n]`` with ``n = (len(data) // 2)`` aligned down to
  ``write_align`` (possibly 0 bytes);
- an erase sets the first ``length // 2`` bytes of its range to 0xFF (so a multi-sector
  erase completes its first sectors and stops inside the middle one, and a
  single-sector erase leaves the second half of the sector unerased).

After a PowerCut the instance is dead: every further erase, write *and read* raises
PowerCut, because code that keeps using a flash after losing power is itself a bug the
tests should see. Reopen the file to "reboot". ``close()`` still works.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

ERASED = 0xFF
"""Value of every byte after an erase."""

_IO_CHUNK = 64 * 1024
"""Largest buffer any single internal file operation allocates; keeps 16 MiB images cheap."""

Buffer = bytes | bytearray | memoryview


class FlashError(Exception):
    """A command the flash refuses: out of bounds, misaligned, unerased target, closed."""


class FlashWriteError(FlashError):
    """An injected program failure; nothing was changed, so the caller may retry."""


class PowerCut(Exception):
    """The device lost power during an operation.

    Deliberately not a FlashError: code that handles flash errors (retry, report) must
    not be able to catch a power cut by accident and carry on as if it were still alive.
    """


@dataclass
class FlashFaults:
    """Fault injection knobs; mutate them on ``flash.faults`` between operations.

    The random faults draw from one seeded generator, exactly one draw per write that
    reaches the chip and is not cut, so a given seed and op sequence always fails the
    same writes.
    """

    cut_after: int | None = None
    torn: bool = False
    fail_write_probability: float = 0.0
    drop_write_probability: float = 0.0
    seed: int = 0
    rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.validate()

    def reseed(self, seed: int) -> None:
        """Restart the fault sequence, e.g. to replay a failing run."""
        self.seed = seed
        self.rng = random.Random(seed)

    def validate(self) -> None:
        """Checked on every op, because the fields are plain attributes tests may set."""
        if self.cut_after is not None and self.cut_after < 1:
            raise ValueError("cut_after counts ops from 1")
        p_fail, p_drop = self.fail_write_probability, self.drop_write_probability
        if not (0.0 <= p_fail <= 1.0 and 0.0 <= p_drop <= 1.0 and p_fail + p_drop <= 1.0):
            raise ValueError("fault probabilities must be in [0, 1] and sum to at most 1")


def _check_geometry(sector_size: int, write_align: int) -> None:
    if sector_size <= 0 or write_align <= 0:
        raise ValueError("sector_size and write_align must be positive")
    if sector_size % write_align:
        raise ValueError("sector_size must be a multiple of write_align")


class SimFlash:
    """A NOR flash device whose contents live in a file; see the module docstring."""

    # The chip's hardware unique key (an eFuse/PUF stand-in, never stored in the flash
    # file): set by layout.open_flash; the identity's secrets are sealed under it.
    hardware_key: bytes | None = None

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sector_size: int = 4096,
        write_align: int = 4,
        faults: FlashFaults | None = None,
    ) -> None:
        _check_geometry(sector_size, write_align)
        self._path = Path(path)
        self._sector_size = sector_size
        self._write_align = write_align
        self.faults = faults if faults is not None else FlashFaults()
        self._dead = False
        # Unbuffered on purpose: a userspace read buffer is a cache, and would hide
        # changes made through another handle (a test harness damaging the image).
        self._f = open(self._path, "r+b", buffering=0)  # noqa: SIM115 - lives with the device
        size = os.fstat(self._f.fileno()).st_size
        if size == 0 or size % sector_size:
            self._f.close()
            raise ValueError(f"flash file size {size} is not a positive multiple of {sector_size}")
        self._size = size
        self.ops = 0
        self.erase_count = 0
        self.write_count = 0
        self.bytes_written = 0
        self.failed_writes = 0
        self.dropped_writes = 0
        self.sector_erases: list[int] = [0] * (size // sector_size)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        size: int,
        sector_size: int = 4096,
        write_align: int = 4,
        *,
        faults: FlashFaults | None = None,
    ) -> Self:
        """Make a factory-fresh (all 0xFF) image, truncating any existing file."""
        _check_geometry(sector_size, write_align)
        if size <= 0 or size % sector_size:
            raise ValueError(f"size {size} is not a positive multiple of {sector_size}")
        blank = bytes([ERASED]) * min(size, _IO_CHUNK)
        with open(path, "wb") as f:
            remaining = size
            while remaining:
                n = min(remaining, len(blank))
                f.write(blank[:n] if n < len(blank) else blank)
                remaining -= n
        return cls(path, sector_size=sector_size, write_align=write_align, faults=faults)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        sector_size: int = 4096,
        write_align: int = 4,
        *,
        faults: FlashFaults | None = None,
    ) -> Self:
        """Attach to an existing image: this is what a reboot after a power cut does."""
        return cls(path, sector_size=sector_size, write_align=write_align, faults=faults)

    # -- geometry and state ---------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def sector_size(self) -> int:
        return self._sector_size

    @property
    def write_align(self) -> int:
        return self._write_align

    @property
    def num_sectors(self) -> int:
        return self._size // self._sector_size

    @property
    def closed(self) -> bool:
        return self._f.closed

    @property
    def dead(self) -> bool:
        """True once a PowerCut was raised; only reopening the file revives the device."""
        return self._dead

    def reset_counters(self) -> None:
        """Zero all counters so ``cut_after`` can target an op of the next step only.

        Does not revive a dead device and does not touch the fault settings.
        """
        self.ops = 0
        self.erase_count = 0
        self.write_count = 0
        self.bytes_written = 0
        self.failed_writes = 0
        self.dropped_writes = 0
        self.sector_erases = [0] * self.num_sectors

    def close(self) -> None:
        """Release the file; allowed on a dead device so tests can clean up."""
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SimFlash({str(self._path)!r}, size={self._size}, "
            f"sector_size={self._sector_size}, write_align={self._write_align})"
        )

    # -- commands -------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Return the bytes as they are on the medium right now (no cache exists)."""
        self._check_alive()
        self._check_range(offset, length)
        return self._pread(offset, length)

    def erase(self, offset: int, length: int) -> None:
        """Erase whole sectors to 0xFF."""
        self._check_alive()
        self._check_range(offset, length)
        ss = self._sector_size
        if length == 0 or offset % ss or length % ss:
            raise FlashError(
                f"erase of [{offset:#x}, +{length:#x}) is not whole {ss:#x}-byte sectors"
            )
        if self._issue(is_erase=True):
            if self.faults.torn:
                self._fill_erased(offset, length // 2)
            self._power_cut(f"erase at {offset:#x}")
        self._fill_erased(offset, length)

    def write(self, offset: int, data: Buffer) -> None:
        """Program bytes; only 1 -> 0 transitions are possible, as on real NOR."""
        self._check_alive()
        mv = memoryview(data).cast("B")
        length = mv.nbytes
        self._check_range(offset, length)
        wa = self._write_align
        if length == 0 or offset % wa or length % wa:
            raise FlashError(f"write of [{offset:#x}, +{length:#x}) is not aligned to {wa} bytes")
        self._check_programmable(offset, mv)
        if self._issue(is_erase=False):
            if self.faults.torn:
                n = (length // 2) // wa * wa
                if n:
                    self._program(offset, mv[:n])
            self._power_cut(f"write at {offset:#x}")
        faults = self.faults
        p_fail, p_drop = faults.fail_write_probability, faults.drop_write_probability
        if p_fail or p_drop:
            r = faults.rng.random()
            if r < p_fail:
                self.failed_writes += 1
                raise FlashWriteError(f"injected program failure at {offset:#x}")
            if r < p_fail + p_drop:
                self.dropped_writes += 1
                return
        self._program(offset, mv)

    # -- internals ------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._f.closed:
            raise FlashError("flash is closed")
        if self._dead:
            raise PowerCut("device has no power; reopen the flash to reboot")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise FlashError(
                f"access [{offset:#x}, +{length:#x}) outside flash of {self._size:#x} bytes"
            )

    def _check_programmable(self, offset: int, mv: memoryview) -> None:
        """Refuse the whole write up front, so a refused write changes nothing."""
        pos = 0
        while pos < len(mv):
            new = mv[pos : pos + _IO_CHUNK]
            old = self._pread(offset + pos, len(new))
            n = int.from_bytes(new, "little")
            if int.from_bytes(old, "little") & n != n:
                bad = next(i for i in range(len(new)) if old[i] & new[i] != new[i])
                raise FlashError(f"write to unerased location (offset {offset + pos + bad:#x})")
            pos += len(new)

    def _issue(self, *, is_erase: bool) -> bool:
        """Count the op; True if power dies during it."""
        self.faults.validate()
        self.ops += 1
        if is_erase:
            self.erase_count += 1
        else:
            self.write_count += 1
        cut = self.faults.cut_after
        return cut is not None and self.ops >= cut

    def _power_cut(self, what: str) -> None:
        self._dead = True
        raise PowerCut(f"power cut during op {self.ops} ({what})")

    def _pread(self, offset: int, length: int) -> bytes:
        """Read exactly length bytes; raw file reads may legally return fewer."""
        self._f.seek(offset)
        parts = []
        remaining = length
        while remaining:
            chunk = self._f.read(remaining)
            if not chunk:
                raise FlashError("short read: flash file was truncated behind our back")
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def _pwrite(self, offset: int, mv: memoryview) -> None:
        """Write all of mv straight to the OS, where every other handle sees it at once."""
        self._f.seek(offset)
        pos = 0
        while pos < len(mv):
            n = self._f.write(mv[pos:])
            if not n:
                raise FlashError("flash file refused a write")
            pos += n

    def _program(self, offset: int, mv: memoryview) -> None:
        self._pwrite(offset, mv)
        self.bytes_written += len(mv)

    def _fill_erased(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        blank = memoryview(bytes([ERASED]) * min(length, _IO_CHUNK))
        pos = offset
        end = offset + length
        while pos < end:
            n = min(end - pos, len(blank))
            self._pwrite(pos, blank[:n])
            pos += n
        # Wear accrues on every sector the erase touched, even partially (a torn erase).
        first = offset // self._sector_size
        last = (offset + length - 1) // self._sector_size
        for s in range(first, last + 1):
            self.sector_erases[s] += 1


def sha256_region(flash: SimFlash, offset: int, length: int, chunk: int = 4096) -> bytes:
    """Digest a flash region in chunks, so hashing a 16 MiB slot costs one chunk of RAM."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    if offset < 0 or length < 0 or offset + length > flash.size:
        raise FlashError(f"region [{offset:#x}, +{length:#x}) outside flash")
    h = hashlib.sha256()
    end = offset + length
    pos = offset
    while pos < end:
        n = min(chunk, end - pos)
        h.update(flash.read(pos, n))
        pos += n
    return h.digest()
