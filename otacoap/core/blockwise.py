"""Block2 arithmetic (RFC 7959), shared by the server and the device, with no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from .coap_numbers import BAD_REQUEST
from .errors import TransferError

MAX_NUM = (1 << 20) - 1  # RFC 7959 §2.2: NUM is at most 20 bits
MIN_SZX, MAX_SZX = 0, 6  # RFC 7959 §2.2: SZX 7 is reserved


class BlockError(TransferError):
    """A Block2 exchange broke the rules; on the device this aborts the transfer."""

    coap_code = BAD_REQUEST


def size_of(szx: int) -> int:
    if not MIN_SZX <= szx <= MAX_SZX:
        raise BlockError(f"SZX {szx} is reserved or invalid (RFC 7959 §2.2)")
    return 16 << szx


def szx_of(size: int) -> int:
    for szx in range(MIN_SZX, MAX_SZX + 1):
        if 16 << szx == size:
            return szx
    raise ValueError(f"block size {size} is not a power of two in 16..1024")


def block_value(num: int, more: bool, szx: int) -> int:
    """The uint value of a Block1/Block2 option (RFC 7959 §2.2: NUM, M, SZX)."""
    return (num << 4) | (8 if more else 0) | szx


def parse_block_value(value: int) -> tuple[int, bool, int]:
    """(NUM, M, SZX) of a Block1/Block2 option's uint value (RFC 7959 §2.2)."""
    return value >> 4, bool(value & 0x08), value & 0x07


def block_count(total: int, szx: int) -> int:
    size = size_of(szx)
    return max(1, -(-total // size))


@dataclass(frozen=True)
class Slice:
    offset: int
    length: int
    more: bool


def server_slice(total: int, num: int, szx: int, max_szx: int = MAX_SZX) -> tuple[int, Slice]:
    """Which bytes answer a Block2 request, and the SZX actually used.

    The server may only lower the block size (RFC 7959 §2.3); the NUM it answers with is
    then recomputed so that it still names the requested offset. A block that starts at
    or past the end of a non-empty body is an error: nothing outside the image is read.
    """
    if not 0 <= num <= MAX_NUM:
        raise BlockError(f"block number {num} out of range")
    offset = num * size_of(szx)  # validates SZX as well
    szx_used = min(szx, max_szx)
    size = size_of(szx_used)
    if offset // size > MAX_NUM:
        # The lowered block size would need a NUM wider than the option's 20 bits.
        raise BlockError(f"block {num} cannot be answered with {size}-byte blocks")
    if total == 0 and offset == 0:
        return szx_used, Slice(0, 0, False)
    if offset >= total:
        raise BlockError(f"block {num} starts past the end of the {total}-byte body")
    length = min(size, total - offset)
    return szx_used, Slice(offset, length, offset + length < total)


def check_response(
    *,
    asked_num: int,
    asked_szx: int,
    num: int,
    szx: int,
    more: bool,
    payload_len: int,
    offset: int,
    total: int,
) -> None:
    """Device-side check of one Block2 response (ATTACKS.md #11, #12, #24, #25).

    `offset` is where the asked block starts; `total` is the image size the *signed
    manifest* states, never Size2.
    """
    size = size_of(szx)  # rejects SZX 7
    if szx > asked_szx:
        raise BlockError("server raised the block size above the one asked for")
    if num * size != asked_num * size_of(asked_szx):
        raise BlockError(f"response is block {num}, not the block asked for")
    if offset + payload_len > total:
        raise BlockError("server sent bytes past the image size")
    if payload_len > size:
        raise BlockError("block payload larger than the block size")
    if more and payload_len != size:
        raise BlockError("non-final block shorter than the block size")
    if more and offset + payload_len >= total:
        raise BlockError("server claims more blocks past the image size")
    if not more and offset + payload_len != total:
        raise BlockError("image ended before the size the manifest states")
