"""The CoAP numbers otacoap speaks: message types, codes, option numbers, Content-Formats.

One home for them, so the server's resources, its /fw fast path, its upload reassembly
and the device agree by construction. Plain ints, not aiocoap's enums: the core imports
no aiocoap (DESIGN "Layers"), and the fast path builds bytes from them directly.
"""

from __future__ import annotations

# RFC 7252 §3: the header's Version is 1; Type 0 is Confirmable, 2 Acknowledgement.
VERSION = 1
TYPE_CON, TYPE_ACK = 0, 2

# RFC 7252 §3.1: the byte that separates the options from the payload.
PAYLOAD_MARKER = 0xFF


def code(cls: int, detail: int) -> int:
    """The code "c.dd" as its byte (RFC 7252 §3: a 3-bit class, a 5-bit detail)."""
    return (cls << 5) | detail


def code_class(value: int) -> int:
    """2 for success, 4 for a client error, 5 for a server error (RFC 7252 §5.9)."""
    return value >> 5


def code_str(value: int) -> str:
    """The dotted form RFC 7252 §12.1 writes codes in, e.g. "4.04"."""
    return f"{value >> 5}.{value & 0x1F:02d}"


# RFC 7252 §12.1.1: method codes.
GET = code(0, 1)

# RFC 7252 §12.1.2: response codes; RFC 7959 §2.9.2 adds 4.08, §2.9.3 Size1 on 4.13.
CHANGED = code(2, 4)
CONTENT = code(2, 5)
BAD_REQUEST = code(4, 0)
UNAUTHORIZED = code(4, 1)
FORBIDDEN = code(4, 3)
NOT_FOUND = code(4, 4)
REQUEST_ENTITY_INCOMPLETE = code(4, 8)  # RFC 7959 §2.9.2
CONFLICT = code(4, 9)  # RFC 8132 §3.2 (registered for all methods)
PRECONDITION_FAILED = code(4, 12)
REQUEST_ENTITY_TOO_LARGE = code(4, 13)  # RFC 7959 §2.9.3 gives it Size1
UNSUPPORTED_CONTENT_FORMAT = code(4, 15)
INTERNAL_SERVER_ERROR = code(5, 0)
SERVICE_UNAVAILABLE = code(5, 3)  # RFC 7252 §5.9.3.4: Max-Age says when to retry

# RFC 7252 §12.2 option numbers, with RFC 7959 §2.1 and §4 (Block2, Size2, Size1).
OPT_URI_HOST = 3
OPT_ETAG = 4
OPT_URI_PORT = 7
OPT_URI_PATH = 11
OPT_CONTENT_FORMAT = 12
OPT_MAX_AGE = 14
OPT_BLOCK2 = 23
OPT_SIZE2 = 28
OPT_SIZE1 = 60

# IANA "CoAP Content-Formats" registry (RFC 7252 §12.3, RFC 8949 §9.5 for CBOR).
CF_OCTET_STREAM = 42
CF_CBOR = 60
