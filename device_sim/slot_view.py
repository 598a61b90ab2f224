"""One image slot as the device's code sees it: encrypted at rest under the chip's
hardware unique key, decrypted on every read (issue 13 §1 "Secure storage").

Why this and not MCUboot's "secondary slot stays encrypted until the swap": otacoap's
slots are A/B with no copy and no swap (device_sim.bootloader), so an image runs from
the slot it was staged into and there is no install-time copy to decrypt during. The
equivalent is what ESP32 flash encryption and STM32 OTFDEC do for execute-in-place:
every slot byte is stored encrypted under a device-unique key and decrypted on read.
So a dump of the staging slot mid-update, or of any slot at any time, shows no
plaintext firmware, and a copy of the flash on another chip cannot even be read.

The writer (core.writer.ImageWriter), secure boot (bootloader.check_image,
verify_slot) and the boot header all read through this view; a device without a
hardware key (an unsealed, legacy provisioning) keeps plaintext slots.

NOR semantics are kept visible: a write unit that still reads all 0xFF raw is reported
as erased (0xFF), not decrypted, so the writer's dropped-write retry and its
"read-back is still erased" check see what the flash really holds. The price: a
ciphertext unit that happens to be all 0xFF (2^-32 per 4-byte unit) reads as erased,
which fails that one staging (a digest mismatch, never a wrong image).
"""

from __future__ import annotations

from otacoap.core import sealing

from .flash import SimFlash
from .layout import FlashLayout

ERASED = 0xFF


class SlotView:
    """A `core.writer.FlashRegion` over slot `slot` holding the image `image_digest`
    (of component `component`: its own region of the slot on a multi-component device)."""

    def __init__(
        self,
        flash: SimFlash,
        layout: FlashLayout,
        slot: int,
        image_digest: bytes,
        component: int = 0,
    ):
        self._flash = flash
        self._base = layout.component_offset(slot, component)
        huk = flash.hardware_key
        # Component 1's regions are keystream domains 2 and 3 (slots keep 0 and 1).
        region = slot + 2 * component
        self._cipher = sealing.SlotCipher(huk, region, image_digest) if huk else None

    @property
    def encrypted(self) -> bool:
        return self._cipher is not None

    @property
    def sector_size(self) -> int:
        return self._flash.sector_size

    @property
    def write_align(self) -> int:
        return self._flash.write_align

    def erase(self, offset: int, length: int) -> None:
        self._flash.erase(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._cipher is None:
            self._flash.write(offset, data)
            return
        self._flash.write(offset, self._cipher.apply(offset - self._base, data))

    def read(self, offset: int, length: int) -> bytes:
        if self._cipher is None:
            return self._flash.read(offset, length)
        unit = self._flash.write_align
        start = offset - offset % unit
        end = min(-(-(offset + length) // unit) * unit, self._flash.size)
        raw = self._flash.read(start, end - start)
        plain = bytearray(self._cipher.apply(start - self._base, raw))
        erased_unit = b"\xff" * unit
        if erased_unit in raw:  # cheap test first: most reads hold no erased unit
            # Erased write units read as erased (see the module docstring).
            for u in range(0, len(raw), unit):
                if raw[u : u + unit] == erased_unit:
                    plain[u : u + unit] = erased_unit
        return bytes(plain[offset - start : offset - start + length])
