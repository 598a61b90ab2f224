"""A read-only window on one slot: how a delta patch reads its source image.

The running slot is the source of a delta (otacoap.core.delta) and must never be
written (a power cut during the apply must leave it bootable), so the decoder gets an
object that can only read, and only inside the slot.
"""

from __future__ import annotations

from .flash import SimFlash


class SlotView:
    """read(offset, length) within [base, base + size) of a flash; nothing else."""

    def __init__(self, flash: SimFlash, base: int, size: int) -> None:
        self._flash = flash
        self._base = base
        self._size = size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError("read outside the slot")
        return self._flash.read(self._base + offset, length)
