"""A read-only window on one slot: how a delta patch reads its source image.

The running slot is the source of a delta (otacoap.core.delta) and must never be
written (a power cut during the apply must leave it bootable), so the decoder gets an
object that can only read, and only inside the slot. It reads through the slot's
`device_sim.slot_view.SlotView`, so a slot encrypted at rest is decrypted on read like
any other read of the running image (secure boot's included).
"""

from __future__ import annotations

from typing import Protocol


class Readable(Protocol):
    """Reads at absolute flash offsets (a SimFlash or a SlotView)."""

    def read(self, offset: int, length: int) -> bytes: ...


class SourceSlot:
    """read(offset, length) within [0, size) of the slot at `base`; nothing else."""

    def __init__(self, region: Readable, base: int, size: int) -> None:
        self._region = region
        self._base = base
        self._size = size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError("read outside the slot")
        return self._region.read(self._base + offset, length)
