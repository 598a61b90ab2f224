"""CoAP option encoding (RFC 7252 §3.1, §3.2), byte for byte as aiocoap writes it.

Sans-I/O: values in, bytes out (and back). The server's /fw fast path encodes its
responses and walks its requests with these, so the one encoding lives here.
"""

from __future__ import annotations

from collections.abc import Iterable


def uint(value: int) -> bytes:
    """RFC 7252 §3.2 uint: minimal big-endian, zero is the empty string."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _nibble(value: int) -> tuple[int, bytes]:
    # RFC 7252 §3.1: 0..12 inline; 13 + one byte (value - 13); 14 + two bytes (value - 269).
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def header(delta: int, length: int) -> bytes:
    """An option's header: the delta from the previous option's number, the length."""
    d, dx = _nibble(delta)
    n, nx = _nibble(length)
    return bytes(((d << 4) | n,)) + dx + nx


def option(delta: int, value: bytes) -> bytes:
    """One option: its header and its value."""
    return header(delta, len(value)) + value


def options(items: Iterable[tuple[int, bytes]]) -> bytes:
    """Options given as (number, value) in ascending number order (RFC 7252 §3.1)."""
    out = bytearray()
    last = 0
    for number, value in items:
        if number < last:
            raise ValueError("options must be given in ascending number order")
        out += option(number - last, value)
        last = number
    return bytes(out)


def field(nibble: int, data: bytes, i: int) -> tuple[int, int]:
    """An option delta or length nibble with its extended bytes at `data[i:]`: the value
    and the index after it, or (-1, i) for 15 (reserved: a message format error) or a
    field cut short by the end of `data` (RFC 7252 §3.1)."""
    if nibble < 13:
        return nibble, i
    if nibble == 13 and i < len(data):
        return data[i] + 13, i + 1
    if nibble == 14 and i + 1 < len(data):
        return (data[i] << 8 | data[i + 1]) + 269, i + 2
    return -1, i
