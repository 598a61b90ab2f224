"""Delta payloads: a detools sequential patch turned into slot bytes while it streams.

The SUIT encoding (docs/decisions/delta-updates.md has it whole): the component's
standard image-digest and image-size are those of the *resulting* image, so the image
writer, the bootloader and every image-match check exactly what they check for a plain
image; five custom parameters (negative numbers, manifest-34 §8.4.8) name the source
image and the patch, and one custom condition (`suit.CMD_DELTA_SOURCE_MATCH`) asks
the device whether its running slot holds the source. `info_of` is how the trust gate
(`trust.summarize`) turns those parameters into a `DeltaInfo`; nothing else decodes them
before the gate has.

`SequentialPatchDecoder` applies a detools sequential patch (bsdiff control/diff/extra
stream, github.com/eerimoq/detools `apply_patch_sequential`) push-style: fetched patch
bytes in, slot bytes out, reading the source through an injected read-only region (the
running slot; the core never opens anything). Memory is flat in the image size: the
compressed input of one block, at most `CHUNK` decompressed bytes, one source read of
at most `CHUNK`, at most `OUT_MAX` output bytes, and the LZMA decoder's state
(`core.lzma_decoder`: the dictionary, which the device bounds by `MAX_DICT`, and 5 KiB
of probabilities): a patch made with detools' default LZMA settings (an 8 MiB
dictionary) is refused with a typed reason instead of exhausting RAM. Only the
compressions a small device should run are accepted: none and LZMA (heatshrink's figures
on the shared pairs are 35 % larger than LZMA with an 8 KiB dictionary;
docs/decisions/delta-updates.md).

A patch is never trusted: its size and digest are checked against the signed manifest
at the end (`finish`), and the slot bytes it produced against the signed image digest
by the image writer, whatever the patch did. Every failure is a `PatchError` with a
`PatchFault`, so the update machine can fall back to the full image and say why.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from . import cbor, suit
from .errors import ConditionFailed, ManifestError
from .lzma_decoder import LzmaDecoder, LzmaError, LzmaTooLarge, LzmaTruncated

FORMAT_DETOOLS_SEQUENTIAL = 1
"""suit-parameter-delta-format: a detools sequential patch (patch type 0)."""

FORMAT_NAMES = {FORMAT_DETOOLS_SEQUENTIAL: "detools-sequential"}

# detools' one-byte header: 1 pad bit, 3 bits patch type, 4 bits compression
# (detools/common.py `unpack_header`, bitstruct 'p1u3u4').
_PATCH_TYPE_SEQUENTIAL = 0
COMPRESSION_NONE = 0
COMPRESSION_LZMA = 1
COMPRESSION_NAMES = {
    0: "none",
    1: "lzma",
    2: "crle",
    3: "bz2",
    4: "heatshrink",
    5: "zstd",
    6: "lz4",
}

CHUNK = 1024
"""Most decompressed patch bytes held at once (and the largest source read)."""
OUT_MAX = 1024
"""Most slot bytes one `feed`/`drain` returns: the caller drains until b''."""
OUT_ALIGN = 256
"""Slot bytes come out in multiples of this (any write unit up to 256 divides it)."""
MAX_DICT = 32 * 1024
"""Largest LZMA dictionary a device accepts (otacoap's patches use 8 KiB)."""
_MAX_VARINT = 10


class PatchFault(StrEnum):
    """Why a patch was not applied (the typed reason a report and a test see)."""

    UNSUPPORTED = "unsupported"  # patch type, compression or dictionary this device lacks
    MALFORMED = "malformed"  # the stream does not parse, or decompression failed
    SOURCE_RANGE = "source-range"  # reads outside the source image
    RESULT_SIZE = "result-size"  # produces another size than the manifest's image-size
    PATCH_SIZE = "patch-size"  # more or fewer bytes than the manifest's patch size
    PATCH_DIGEST = "patch-digest"  # the patch is not the one the manifest signed
    TRUNCATED = "truncated"  # the patch ended before the image did


class PatchError(ConditionFailed):
    """The patch could not produce the image (a condition of the delta failed)."""

    def __init__(self, fault: PatchFault, message: str) -> None:
        super().__init__(f"delta patch {fault.value}: {message}")
        self.fault = fault


class SourceRegion(Protocol):
    """A read-only view of the source image (the running slot): bytes at an offset."""

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class DeltaInfo:
    """What a delta manifest says about its patch (decoded by the trust gate)."""

    source_digest: suit.SuitDigest
    source_size: int
    patch_digest: suit.SuitDigest
    patch_size: int
    format: int = FORMAT_DETOOLS_SEQUENTIAL

    def parameters(self) -> tuple[tuple[int, Any], ...]:
        """The custom parameters that carry it (docs/decisions/delta-updates.md)."""
        return (
            (suit.P_DELTA_SOURCE_DIGEST, self.source_digest.encode()),
            (suit.P_DELTA_SOURCE_SIZE, self.source_size),
            (suit.P_DELTA_PATCH_DIGEST, self.patch_digest.encode()),
            (suit.P_DELTA_PATCH_SIZE, self.patch_size),
            (suit.P_DELTA_FORMAT, self.format),
        )


_KEYS = (
    suit.P_DELTA_SOURCE_DIGEST,
    suit.P_DELTA_SOURCE_SIZE,
    suit.P_DELTA_PATCH_DIGEST,
    suit.P_DELTA_PATCH_SIZE,
    suit.P_DELTA_FORMAT,
)


def info_of(params: Mapping[int, Any]) -> DeltaInfo | None:
    """The delta a parameter set describes, None if it names none; all or nothing.

    Raises ManifestError for a partial or mistyped set (the trust gate's refusal).
    """
    present = [k for k in _KEYS if k in params]
    if not present:
        return None
    if len(present) != len(_KEYS):
        raise ManifestError("delta parameters must come together (source, patch, format)")
    sizes = (params[suit.P_DELTA_SOURCE_SIZE], params[suit.P_DELTA_PATCH_SIZE])
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 64:
            raise ManifestError("delta sizes must be positive unsigned integers")
    fmt = params[suit.P_DELTA_FORMAT]
    if fmt not in FORMAT_NAMES:
        raise ManifestError("unknown delta format")
    digests = []
    for key in (suit.P_DELTA_SOURCE_DIGEST, suit.P_DELTA_PATCH_DIGEST):
        raw = params[key]
        if not isinstance(raw, bytes):
            raise ManifestError("delta digests must be bstr-wrapped SUIT_Digests")
        digest = suit.decode_digest(cbor.loads(raw, max_size=256))
        suit.new_hasher(digest.algorithm)  # UnsupportedElement for an unknown algorithm
        digests.append(digest)
    return DeltaInfo(digests[0], sizes[0], digests[1], sizes[1], fmt)


# --- applying a patch ------------------------------------------------------------------


def _masks(n: int) -> tuple[int, int]:
    return int.from_bytes(b"\x7f" * n, "little"), int.from_bytes(b"\x80" * n, "little")


_FULL_MASKS = _masks(CHUNK)


def add_bytes(a: bytes | bytearray | memoryview, b: bytes) -> bytes:
    """Bytewise (a + b) mod 256, bsdiff's diff step, as one big-integer operation (SWAR:
    add the low 7 bits of every byte, then put each top bit back without a carry)."""
    n = len(b)
    if n == 0:
        return b""
    x = int.from_bytes(a, "little")
    y = int.from_bytes(b, "little")
    low7, high = _FULL_MASKS if n == CHUNK else _masks(n)
    return (((x & low7) + (y & low7)) ^ ((x ^ y) & high)).to_bytes(n, "little")


class _State(StrEnum):
    HEADER = "header"
    DATA_FORMAT = "data-format"
    DIFF_SIZE = "diff-size"
    DIFF = "diff"
    EXTRA_SIZE = "extra-size"
    EXTRA = "extra"
    ADJUSTMENT = "adjustment"
    DONE = "done"


def _varint(buf: bytearray) -> tuple[int, int] | None:
    """detools' size encoding (common.unpack_size): (value, length) or None if incomplete.

    First byte: continuation bit, sign bit, 6 value bits; then 7 bits per byte.
    """
    if not buf:
        return None
    byte = buf[0]
    negative = byte & 0x40
    value = byte & 0x3F
    shift, i = 6, 1
    while byte & 0x80:
        if i >= len(buf):
            if i >= _MAX_VARINT:
                raise PatchError(PatchFault.MALFORMED, "size field too long")
            return None
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if i > _MAX_VARINT:
            raise PatchError(PatchFault.MALFORMED, "size field too long")
    return (-value if negative else value), i


class SequentialPatchDecoder:
    """Push-style detools sequential patch applier (see the module docstring).

    `feed(data)` takes the next fetched patch bytes and returns slot bytes; when it
    returns a full `OUT_MAX` there may be more, which `drain()` returns (b'': give me
    more input). `finish()` checks the patch's size and digest and the stream's end,
    and returns the last slot bytes.
    """

    def __init__(self, info: DeltaInfo, source: SourceRegion, image_size: int) -> None:
        if info.format != FORMAT_DETOOLS_SEQUENTIAL:
            raise PatchError(PatchFault.UNSUPPORTED, "unknown patch format")
        self._info = info
        self._source = source
        self._image_size = image_size
        self._hasher: Any = suit.new_hasher(info.patch_digest.algorithm)
        self._received = 0
        self._state = _State.HEADER
        self._header = bytearray()
        self._lz: LzmaDecoder | None = None  # None: the patch is stored uncompressed
        self._input = bytearray()  # received, not yet decompressed
        self._body = bytearray()  # decompressed, not yet parsed
        self._out = bytearray()
        self._left = 0  # bytes left of the current diff or extra block
        self._to_pos = 0
        self._from_pos = 0
        self.peak_buffered = 0  # most bytes held in the buffers above (for the bench)

    @property
    def produced(self) -> int:
        return self._to_pos

    # -- input ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        self._received += len(data)
        if self._received > self._info.patch_size:
            raise PatchError(
                PatchFault.PATCH_SIZE, f"more than the {self._info.patch_size} bytes signed"
            )
        self._hasher.update(data)
        if self._state == _State.HEADER:
            self._header += data
            if not self._parse_header():
                return b""
        else:
            self._input += data
        return self.drain()

    def _parse_header(self) -> bool:
        head = self._header
        parsed = _varint(head[1:]) if head else None
        if parsed is None:
            if len(head) > 1 + _MAX_VARINT:
                raise PatchError(PatchFault.MALFORMED, "bad patch header")
            return False
        to_size, n = parsed
        patch_type, compression = head[0] >> 4 & 0x7, head[0] & 0xF
        if patch_type != _PATCH_TYPE_SEQUENTIAL:
            raise PatchError(PatchFault.UNSUPPORTED, f"patch type {patch_type} is not sequential")
        if to_size != self._image_size:
            raise PatchError(
                PatchFault.RESULT_SIZE,
                f"patch makes {to_size} bytes, the manifest's image is {self._image_size}",
            )
        if compression == COMPRESSION_LZMA:
            self._lz = LzmaDecoder(max_dict=MAX_DICT)
        elif compression != COMPRESSION_NONE:
            name = COMPRESSION_NAMES.get(compression, str(compression))
            raise PatchError(PatchFault.UNSUPPORTED, f"{name} compression is not supported")
        self._input = bytearray(head[1 + n :])
        self._header = bytearray()
        self._state = _State.DATA_FORMAT
        return True

    def _pull(self) -> bool:
        """Decompress up to CHUNK more patch bytes into the body; False: nothing to do."""
        if self._lz is None:
            if not self._input:
                return False
            take = CHUNK - len(self._body)
            if take <= 0:
                return False
            self._body += self._input[:take]
            del self._input[:take]
            return True
        lz = self._lz
        if lz.eof:
            return False
        fed = bool(self._input)
        if fed:
            lz.feed(self._input)
            self._input = bytearray()
        if self._received >= self._info.patch_size:
            lz.finish_input()  # the whole patch is in: decode to its end
        try:
            got = lz.decompress(CHUNK)
        except LzmaTooLarge:
            raise PatchError(PatchFault.UNSUPPORTED, "lzma dictionary too large") from None
        except LzmaTruncated:
            raise PatchError(PatchFault.TRUNCATED, "the compressed stream ended early") from None
        except LzmaError:
            raise PatchError(PatchFault.MALFORMED, "lzma bad stream") from None
        self._body += got
        return bool(got) or fed

    # -- output --------------------------------------------------------------------------

    def drain(self) -> bytes:
        """Up to OUT_MAX slot bytes from the input received so far (b'': feed more)."""
        while len(self._out) < OUT_MAX:
            if not self._parse() and not self._pull():
                break
        self.peak_buffered = max(
            self.peak_buffered, len(self._input) + len(self._body) + len(self._out)
        )
        n = len(self._out) - len(self._out) % OUT_ALIGN
        if n == 0:
            return b""
        chunk = bytes(self._out[:n])
        del self._out[:n]
        return chunk

    def _size(self) -> int | None:
        parsed = _varint(self._body)
        if parsed is None:
            return None
        value, n = parsed
        del self._body[:n]
        return value

    def _parse(self) -> bool:
        """One step of the control stream over the decompressed body; False: need more."""
        state = self._state
        if state in (_State.HEADER, _State.DONE):
            if state == _State.DONE and self._body:
                raise PatchError(PatchFault.MALFORMED, "data after the end of the patch")
            return False
        if state in (_State.DIFF, _State.EXTRA):
            n = min(self._left, len(self._body), OUT_MAX - len(self._out))
            if n == 0 and self._left:
                return False
            data = self._body[:n]
            if state == _State.DIFF:
                self._out += add_bytes(data, self._read_source(n))
            else:
                self._out += data
            del self._body[:n]
            self._left -= n
            self._to_pos += n
            if self._left == 0:
                self._state = _State.EXTRA_SIZE if state == _State.DIFF else _State.ADJUSTMENT
            return True
        value = self._size()
        if value is None:
            return False
        if state == _State.DATA_FORMAT:
            if value != 0:
                raise PatchError(PatchFault.UNSUPPORTED, "data-format patches are not supported")
            self._state = self._next_block()
        elif state == _State.ADJUSTMENT:
            self._from_pos += value
            self._state = self._next_block()
        else:  # a diff or extra block's size
            if not 0 <= value <= self._image_size - self._to_pos:
                raise PatchError(PatchFault.MALFORMED, "block runs past the image")
            self._left = value
            self._state = _State.DIFF if state == _State.DIFF_SIZE else _State.EXTRA
        return True

    def _next_block(self) -> _State:
        return _State.DONE if self._to_pos >= self._image_size else _State.DIFF_SIZE

    def _read_source(self, n: int) -> bytes:
        start = self._from_pos
        if start < 0 or start + n > self._info.source_size:
            raise PatchError(PatchFault.SOURCE_RANGE, "patch reads outside the source image")
        self._from_pos += n
        data = self._source.read(start, n)
        if len(data) != n:
            raise PatchError(PatchFault.SOURCE_RANGE, "short read of the source image")
        return data

    # -- the end -------------------------------------------------------------------------

    def finish(self) -> bytes:
        info = self._info
        if self._received != info.patch_size:
            raise PatchError(
                PatchFault.PATCH_SIZE, f"ended after {self._received} of {info.patch_size} bytes"
            )
        if not hmac.compare_digest(self._hasher.digest(), info.patch_digest.value):
            raise PatchError(PatchFault.PATCH_DIGEST, "patch digest does not match the manifest")
        tail = bytearray()
        while chunk := self.drain():
            tail += chunk
        if self._state != _State.DONE or self._input or self._body:
            raise PatchError(PatchFault.TRUNCATED, "the patch ended before the image")
        if self._lz is not None and (not self._lz.eof or self._lz.buffered):
            raise PatchError(PatchFault.TRUNCATED, "the compressed stream is not complete")
        tail += self._out
        self._out = bytearray()
        return bytes(tail)
