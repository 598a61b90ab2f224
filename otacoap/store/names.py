"""Naming rules for everything an operator types that ends up as a key or an identity.

Names are metadata only: they are DB keys and DTLS PSK identities, never file names
(blobs are named by digest, ATTACKS.md #35), but they still appear in logs and in the
audit chain, so control characters, whitespace and look-alike Unicode are refused.
"""

from __future__ import annotations

import string

from ..core import protocol
from .errors import InvalidName

# tinydtls (under aiocoap's DTLS server and client) keeps the PSK identity in a
# fixed buffer: DTLS_PSK_MAX_CLIENT_IDENTITY_LEN = 32. A longer identity makes the
# server abort the handshake with an internal_error alert, so we refuse it at
# registration instead of shipping a device that can never connect. (The issue asks
# for <= 64; 32 is what the DTLS stack can carry.)
MAX_IDENTITY_BYTES = 32
MAX_OPERATOR_NAME = MAX_IDENTITY_BYTES - len(protocol.OPERATOR_IDENTITY_PREFIX)
MAX_LABEL = 255

# tinydtls: DTLS_PSK_MAX_KEY_LEN = 16 (AES-128 key length). DTLSSocket copies the key
# into that buffer without a length check, so a longer key must never reach it.
PSK_LENGTH = 16

_IDENT_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)


def _check_ident(text: str, what: str, max_len: int) -> str:
    if not text:
        raise InvalidName(f"{what} must not be empty")
    if len(text) > max_len:
        raise InvalidName(f"{what} is {len(text)} characters, at most {max_len} are allowed")
    bad = next((c for c in text if c not in _IDENT_CHARS), None)
    if bad is not None:
        raise InvalidName(
            f"{what} contains {bad!r}: only printable ASCII without spaces is allowed"
        )
    return text


def check_device_id(text: str) -> str:
    """A device id is its DTLS PSK identity verbatim (protocol.py)."""
    _check_ident(text, "device id", MAX_IDENTITY_BYTES)
    if text.startswith(protocol.OPERATOR_IDENTITY_PREFIX):
        raise InvalidName(
            f"device id must not start with {protocol.OPERATOR_IDENTITY_PREFIX!r} "
            "(that name space belongs to operators)"
        )
    return text


def check_operator_name(text: str) -> str:
    return _check_ident(text, "operator name", MAX_OPERATOR_NAME)


def check_label(text: str, what: str) -> str:
    """Vendor domains and class-info strings: printable text, no control characters."""
    if not text or len(text) > MAX_LABEL:
        raise InvalidName(f"{what} must be 1 to {MAX_LABEL} characters")
    if any(not c.isprintable() for c in text) or text != text.strip():
        raise InvalidName(f"{what} contains control characters or surrounding spaces")
    return text


def parse_psk_hex(text: str) -> bytes:
    try:
        psk = bytes.fromhex(text)
    except ValueError:
        raise InvalidName("PSK must be hexadecimal") from None
    if len(psk) != PSK_LENGTH:
        raise InvalidName(
            f"PSK must be exactly {PSK_LENGTH} bytes ({2 * PSK_LENGTH} hex digits), "
            f"got {len(psk)} (tinydtls carries at most {PSK_LENGTH}-byte keys)"
        )
    return psk
