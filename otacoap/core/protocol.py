"""The wire contract between server and device: paths, formats, identities, limits.

One place for each of these, so the server's resources and the device's agent cannot
drift apart.
"""

from __future__ import annotations

from . import ids
from .coap_numbers import CF_CBOR, CF_OCTET_STREAM

# Resource paths (DESIGN.md "The system in one picture").
PATH_MANIFEST = ("m",)
PATH_REPORT = ("r",)
PATH_FIRMWARE = (ids.IMAGE_PATH_PREFIX,)  # /fw/<image id>
PATH_ADMIN = ("admin",)

# What each body travels as (the numbers: core.coap_numbers). SUIT envelopes have no
# registered CoAP Content-Format yet (DIGEST.md §7), so they travel as application/cbor.
CF_ENVELOPE = CF_CBOR
CF_REPORT = CF_CBOR
CF_IMAGE = CF_OCTET_STREAM

# DTLS PSK identities name the principal; the role is a prefix so that an operator and
# a device can never share a name space. A device's identity is its id verbatim.
OPERATOR_IDENTITY_PREFIX = "operator:"

# Limits every party shares.
MAX_ENVELOPE_SIZE = 64 * 1024
DEFAULT_BLOCK_SZX = 6  # 1024-byte blocks
ETAG_LENGTH = 8  # RFC 7252 §5.10.6: up to 8 bytes; we use a digest prefix


def operator_identity(name: str) -> str:
    return OPERATOR_IDENTITY_PREFIX + name


def etag_for(digest: bytes) -> bytes:
    return digest[:ETAG_LENGTH]
