"""Strict CBOR: a bounded pre-scan in front of cbor2, and one deterministic encoder.

cbor2 alone is not enough for untrusted input: it recurses per nesting level
(CVE-2026-26209), preallocates from declared lengths (cbor2 #198), keeps the last of
duplicate map keys, and turns tags such as 2 (bignum) into plain ints. So every
decode first walks the item header by header, without recursion and without
allocating, and refuses anything the SUIT profile does not need. Only then does a
*fresh* cbor2 decoder (CVE-2025-68131: no shared state between messages) see the bytes.

What the scan enforces (shared by server and device, so they cannot disagree,
ATTACKS.md #41):
- size cap and nesting cap (ATTACKS.md #38, #39); declared lengths fit the input;
- exactly one item, no trailing bytes (RFC 8949 §5.3 well-formedness, ATTACKS.md #40);
- preferred (shortest) serialization of every head and no indefinite lengths
  (RFC 8949 §4.2.1 core deterministic encoding), which makes "same bytes" mean
  "same value", so duplicate map keys are found by comparing key bytes (§5.6);
- map keys are not maps or simple values (SUIT text keys are component-id arrays);
- no floats, no simple values but false/true/null, only allow-listed tags.
"""

from __future__ import annotations

from typing import Any

import cbor2

from .errors import LimitExceeded, ManifestError
from .untrusted import describe

DEFAULT_MAX_SIZE = 64 * 1024
DEFAULT_MAX_DEPTH = 16

# Tags that may appear in SUIT envelopes, COSE structures and otacoap reports.
# 107/1070 SUIT envelope/manifest, 16-18/96-98 COSE, 112 CBOR-PEN (manifest-34 §8.4.8.1),
# 38 language-tagged string (SUIT text).
ALLOWED_TAGS = frozenset({16, 17, 18, 38, 96, 97, 98, 107, 112, 1070})

_MT_UINT, _MT_NINT, _MT_BSTR, _MT_TSTR, _MT_ARRAY, _MT_MAP, _MT_TAG, _MT_SIMPLE = range(8)


def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """Read one CBOR head at pos: (major type, argument, position after the head)."""
    end = len(data)
    if pos >= end:
        raise ManifestError("truncated CBOR")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, pos
    if info == 31:
        raise ManifestError("indefinite-length CBOR item (not deterministic encoding)")
    if info > 27:
        raise ManifestError("reserved CBOR additional information")
    n = 1 << (info - 24)
    if pos + n > end:
        raise ManifestError("truncated CBOR")
    arg = int.from_bytes(data[pos : pos + n], "big")
    # RFC 8949 §4.2.1: the argument uses the shortest form. Simple values and floats
    # (major 7) are refused separately.
    if major != _MT_SIMPLE:
        minimum = 24 if n == 1 else 1 << (8 * (n // 2))
        if arg < minimum:
            raise ManifestError("CBOR integer or length not in shortest form")
    return major, arg, pos + n


def _item_end(data: bytes, pos: int) -> int:
    """Where the item starting at pos ends; iterative, every length checked."""
    end = len(data)
    remaining = 1
    while remaining:
        remaining -= 1
        major, arg, pos = _head(data, pos)
        if major in (_MT_BSTR, _MT_TSTR):
            if arg > end - pos:
                raise ManifestError("CBOR string length exceeds the input")
            pos += arg
        elif major in (_MT_ARRAY, _MT_MAP):
            count = arg * 2 if major == _MT_MAP else arg
            if count > end - pos:
                raise ManifestError("CBOR container count exceeds the input")
            remaining += count
        elif major == _MT_TAG:
            remaining += 1
    return pos


def scan(
    data: bytes,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    allowed_tags: frozenset[int] = ALLOWED_TAGS,
) -> None:
    """Refuse anything outside the strict profile, in time linear in len(data)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ManifestError("expected CBOR bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise LimitExceeded(f"CBOR input of {len(data)} bytes exceeds the {max_size}-byte cap")
    if not data:
        raise ManifestError("empty CBOR input")
    end = len(data)
    pos = 0
    # Each frame: [items still to read, depth, map key set or None, expecting a key?]
    stack: list[list[Any]] = [[1, 0, None, False]]
    while stack:
        frame = stack[-1]
        if frame[0] == 0:
            stack.pop()
            continue
        frame[0] -= 1
        depth = frame[1]
        is_key = frame[2] is not None and frame[3]
        if frame[2] is not None:
            frame[3] = not frame[3]
        start = pos
        major, arg, pos = _head(data, pos)
        if is_key:
            if major in (_MT_MAP, _MT_SIMPLE):
                raise ManifestError("CBOR map key is a map, float or simple value")
            # Compare whole keys: an array or tagged key spans more than its head.
            key = data[start : _item_end(data, start)]
            if key in frame[2]:
                raise ManifestError("duplicate key in CBOR map")
            frame[2].add(key)
        if major in (_MT_BSTR, _MT_TSTR):
            if arg > end - pos:
                raise ManifestError("CBOR string length exceeds the input")
            if major == _MT_TSTR:
                try:
                    data[pos : pos + arg].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ManifestError("CBOR text string is not valid UTF-8") from exc
            pos += arg
        elif major in (_MT_ARRAY, _MT_MAP, _MT_TAG):
            if depth + 1 > max_depth:
                raise LimitExceeded(f"CBOR nesting deeper than {max_depth}")
            if major == _MT_TAG:
                if arg not in allowed_tags:
                    raise ManifestError(f"CBOR tag {describe(arg)} is not allowed here")
                stack.append([1, depth + 1, None, False])
            else:
                count = arg * 2 if major == _MT_MAP else arg
                # Every item takes at least one byte: a count larger than what is left
                # is a length bomb (ATTACKS.md #39), refused before anything is built.
                if count > end - pos:
                    raise ManifestError("CBOR container count exceeds the input")
                stack.append([count, depth + 1, set() if major == _MT_MAP else None, True])
        elif major == _MT_SIMPLE and (arg not in (20, 21, 22) or data[start] & 0x1F >= 24):
            raise ManifestError("CBOR float or simple value is not allowed")
    if pos != end:
        raise ManifestError(f"{end - pos} trailing bytes after the CBOR item")


def loads(
    data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH
) -> Any:
    """Decode untrusted bytes under the strict profile; raises ManifestError."""
    scan(data, max_size=max_size, max_depth=max_depth)
    try:
        # A new decoder per message (cbor2 CVE-2025-68131); tags stay CBORTag objects
        # because the scan already refused every tag cbor2 would reinterpret.
        return cbor2.loads(bytes(data))
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise ManifestError("malformed CBOR", detail=str(exc)) from exc


def dumps(value: Any) -> bytes:
    """Deterministic encoding (RFC 8949 §4.2.1) for everything otacoap emits."""
    return cbor2.dumps(value, canonical=True)


def bstr_wrap(content: bytes) -> bytes:
    """The encoding of `content` as a CBOR byte string, header included.

    SUIT digests cover the bstr-wrapped element *with* its header (manifest-34 §8.3,
    §8.4.12), so this is what gets hashed.
    """
    return cbor2.dumps(bytes(content))


def diagnostic(value: Any, indent: int = 0) -> str:
    """CBOR diagnostic notation (RFC 8949 §8) for humans reading `manifest inspect`."""
    pad = "  " * indent
    if isinstance(value, cbor2.CBORTag):
        return f"{value.tag}({diagnostic(value.value, indent)})"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return f"h'{value.hex()}'"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        inner = ",\n".join(pad + "  " + diagnostic(v, indent + 1) for v in value)
        return "[\n" + inner + "\n" + pad + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = ",\n".join(
            pad + "  " + diagnostic(k, indent + 1) + ": " + diagnostic(v, indent + 1)
            for k, v in value.items()
        )
        return "{\n" + inner + "\n" + pad + "}"
    return repr(value)
