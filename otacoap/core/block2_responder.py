"""The server's answer to one GET of a body it serves block by block (RFC 7959 §2.4).

Sans-I/O and stateless: the request's Block2 (or its absence), the body's size, its
Content-Format and ETag, and the largest block size allowed in; out comes which bytes of
the body answer it and the options that go with them. The caller reads exactly
[offset, offset + length) from wherever the body lives. Both the /fw resource (through
aiocoap) and the /fw fast path (its own bytes, memoised per block) answer with this, so
the rules live once:

- without Block2, a body that fits one block is sent whole, a larger one as block 0
  (the server may start block-wise on its own, §2.4);
- the server may only lower the block size (§2.3); SZX 7 and a block starting past the
  end are a 4.00 (`BlockError`), so nothing outside the body is ever read (ATTACKS.md
  #24, #25);
- a block-wise answer carries Size2, the body's size (§4).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import blockwise, coap_numbers
from .coap_options import options, uint


@dataclass(frozen=True, slots=True)
class Block2Answer:
    """A 2.05 Content: bytes [offset, offset + length) of the body, under these options."""

    offset: int
    length: int
    content_format: int
    etag: bytes
    block2: tuple[int, bool, int] | None  # (NUM, M, SZX); None: the whole body, no Block2
    size2: int | None  # RFC 7959 §4: the body's size; only with Block2

    @property
    def code(self) -> int:
        return coap_numbers.CONTENT

    def encoded_options(self) -> bytes:
        """The options as they go on the wire, then the payload marker if a payload
        follows (RFC 7252 §3.1: options by number: ETag 4, Content-Format 12, Block2 23,
        Size2 28; no marker before an empty payload)."""
        items = [
            (coap_numbers.OPT_ETAG, self.etag),
            (coap_numbers.OPT_CONTENT_FORMAT, uint(self.content_format)),
        ]
        if self.block2 is not None:
            items.append((coap_numbers.OPT_BLOCK2, uint(blockwise.block_value(*self.block2))))
            if self.size2 is not None:
                items.append((coap_numbers.OPT_SIZE2, uint(self.size2)))
        out = options(items)
        if self.length:
            out += bytes((coap_numbers.PAYLOAD_MARKER,))
        return out


def answer(
    size: int,
    asked: tuple[int, int] | None,
    max_szx: int,
    *,
    content_format: int,
    etag: bytes,
) -> Block2Answer:
    """What answers a GET whose Block2 asks for block `asked` = (NUM, SZX), or that has
    no Block2 (None), of a `size`-byte body, with blocks of at most 16 << `max_szx`.

    Raises `blockwise.BlockError` (4.00) for a block that cannot be answered.
    """
    if asked is None and size <= blockwise.size_of(max_szx):
        return Block2Answer(0, size, content_format, etag, None, None)
    num, szx = (0, max_szx) if asked is None else asked
    szx_used, piece = blockwise.server_slice(size, num, szx, max_szx)
    num_used = piece.offset // blockwise.size_of(szx_used)
    return Block2Answer(
        piece.offset, piece.length, content_format, etag, (num_used, piece.more, szx_used), size
    )
