"""Making delta patches (the operator's side): detools sequential patches, LZMA-packed.

detools (github.com/eerimoq/detools) computes the bsdiff control/diff/extra stream; its
own LZMA step uses the preset's 8 MiB dictionary, which no small device can hold. So the
patch is made uncompressed and its body packed here with LZMA1 ("alone" format, what
detools itself writes), an 8 KiB dictionary and lc=lp=pb=0, which measured smaller than
detools' default on the MicroPython pairs (docs/decisions/delta-updates.md) and needs
about 13 KiB in an embedded LzmaDec (CPython's liblzma: 41 KiB). The result is still a
valid detools patch: `detools.apply_patch` applies it, and so does the device's
`core.delta` decoder.
"""

from __future__ import annotations

import io
import lzma

import detools

from .core import delta

DICT_SIZE = 8 * 1024
_FILTERS = [
    {
        "id": lzma.FILTER_LZMA1,
        "preset": 9 | lzma.PRESET_EXTREME,
        "dict_size": DICT_SIZE,
        "lc": 0,
        "lp": 0,
        "pb": 0,
    }
]
COMPRESSIONS = ("lzma", "none")


def create_patch(source: bytes, target: bytes, compression: str = "lzma") -> bytes:
    """A detools sequential patch from `source` to `target` the device can apply."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}")
    out = io.BytesIO()
    detools.create_patch(io.BytesIO(source), io.BytesIO(target), out, compression="none")
    raw = out.getvalue()
    if compression == "none":
        return raw
    # Header: one byte (type << 4 | compression), then the target size (detools varint).
    end = 1
    while raw[end] & 0x80:
        end += 1
    end += 1
    body = lzma.compress(raw[end:], format=lzma.FORMAT_ALONE, filters=_FILTERS)
    header = bytes([raw[0] & 0xF0 | delta.COMPRESSION_LZMA]) + raw[1:end]
    return header + body


def detools_patch(source: bytes, target: bytes, compression: str) -> bytes:
    """detools' own patch with its default options (for comparisons in benches)."""
    out = io.BytesIO()
    detools.create_patch(io.BytesIO(source), io.BytesIO(target), out, compression=compression)
    return out.getvalue()


def apply_with_detools(source: bytes, patch: bytes) -> bytes:
    """detools' reference apply (tests check the device's decoder against it)."""
    out = io.BytesIO()
    detools.apply_patch(io.BytesIO(source), io.BytesIO(patch), out)
    return out.getvalue()
