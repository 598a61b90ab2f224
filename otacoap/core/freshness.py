"""Freshness without a trusted clock, and expiry with one (ATTACKS.md #8).

A frozen or replaying server (a stale mirror, a restored backup, a cache) can keep
serving an old, validly signed release; signatures alone cannot tell "nothing newer"
from "the newer one is hidden". Two tools, both documented in
docs/decisions/anchor-rotation.md ("Freshness"):

1. **Signed expiry** (devices with a trusted clock). A manifest may carry

       otacoap-expires = -25601 => uint    ; POSIX seconds (UTC), in SUIT_Manifest

   (a negative, i.e. application-specific, manifest key: manifest-34 §8.4 lets a
   processor ignore unknown negative keys, so older devices simply do not enforce it).
   It is covered by the author's signature. A device that has a trusted clock refuses
   a manifest whose expiry has passed (`trust.admit`, `ManifestExpired`), including
   the installed one served again: a server that keeps serving an expired manifest is
   frozen, and the refusal is reported. A device without a clock cannot enforce it.

2. **Nonce-bound freshness statement** (every device, in the style of RFC 9175 Echo:
   the device's fresh nonce proves the answer was made after the question). The device
   sends `GET /t?n=<hex nonce>`; the server answers::

       Signed_Freshness = [payload: bstr .cbor Freshness, COSE_Sign1]  ; detached payload
       Freshness = {
           0: "otacoap-freshness",   ; type: domain separation
           1: bstr,                  ; the device's nonce, echoed (8..32 bytes)
           2: bstr, 3: bstr,         ; vendor-id, class-id
           4: uint,                  ; sequence number of the release the server serves
                                     ; this device now (0: none)
           5: uint,                  ; newest anchor list version of the class (0: none)
           6: uint,                  ; server time, POSIX seconds (informative only)
       }

   signed by a *freshness key*: an online key per server, trusted by the device only
   because the class's signed anchor list names it (TUF's timestamp role), and only
   for this statement. `judge` turns it into an outcome: FRESH (the server vouches, now,
   that nothing newer exists), STALE (it vouches that something newer exists than what
   the device got: a frozen /m or a withheld anchor list) or UNKNOWN (no statement that
   verifies: no freshness key, wrong nonce, replayed, unreachable). A compromised
   server holds its freshness key and can claim FRESH while withholding a release; it
   still cannot make the device accept anything (the key signs no manifest, no list).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from . import cbor, cose, suit
from .errors import AuthenticationError, ManifestError, RollbackError

M_EXPIRES = -25601
"""SUIT_Manifest key of otacoap's signed expiry (uint, POSIX seconds)."""

TYPE_FRESHNESS = "otacoap-freshness"
F_TYPE, F_NONCE, F_VENDOR, F_CLASS, F_SEQUENCE, F_ANCHORS, F_TIME = range(7)
MIN_NONCE, MAX_NONCE = 8, 32
MAX_STATEMENT_SIZE = 512
FRESHNESS_PATH = "/t"
NONCE_QUERY = "n"


class Freshness(IntEnum):
    """What a device knows about the freshness of what it was served (report key -21)."""

    FRESH = 0  # a statement bound to its nonce says nothing newer exists
    UNKNOWN = 1  # it cannot learn whether something newer exists
    STALE = 2  # a statement says something newer exists than what it was served
    EXPIRED = 3  # its trusted clock says the served manifest has expired


class ManifestExpired(RollbackError):
    """The manifest's signed expiry has passed (reason: condition failed)."""


def manifest_expiry(manifest: suit.Manifest) -> int | None:
    """The signed expiry (POSIX seconds) or None; ManifestError if it is malformed."""
    for k, v in manifest.extensions:
        if k == M_EXPIRES:
            if not (type(v) is int and 0 <= v < 1 << 64):
                raise ManifestError("otacoap-expires must be an unsigned integer")
            return v
    return None


def check_expiry(manifest: suit.Manifest, now: int | None) -> None:
    """Refuse an expired manifest when the recipient has a trusted clock (`now`)."""
    expires = manifest_expiry(manifest)  # malformed is refused with or without a clock
    if now is not None and expires is not None and now >= expires:
        raise ManifestExpired(f"manifest expired {now - expires} s ago")


@dataclass(frozen=True)
class Statement:
    nonce: bytes
    vendor_id: bytes
    class_id: bytes
    sequence: int
    anchor_version: int
    time: int

    def payload(self) -> bytes:
        return cbor.dumps(
            {
                F_TYPE: TYPE_FRESHNESS,
                F_NONCE: self.nonce,
                F_VENDOR: self.vendor_id,
                F_CLASS: self.class_id,
                F_SEQUENCE: self.sequence,
                F_ANCHORS: self.anchor_version,
                F_TIME: self.time,
            }
        )


def check_nonce(nonce: bytes) -> bytes:
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise ManifestError(f"freshness nonce must be {MIN_NONCE}..{MAX_NONCE} bytes")
    return nonce


def sign_statement(statement: Statement, key: cose.SigningKey) -> bytes:
    check_nonce(statement.nonce)
    payload = statement.payload()
    return cbor.dumps([payload, cose.sign1(payload, key)])


def _uint(v: Any, what: str) -> int:
    if not (type(v) is int and 0 <= v < 1 << 64):
        raise ManifestError(f"freshness {what} must be an unsigned integer")
    return v


def verify_statement(
    data: bytes,
    *,
    nonce: bytes,
    keys: Sequence[cose.TrustAnchor],
    vendor_id: bytes,
    class_id: bytes,
) -> Statement:
    """The statement if a freshness key signed it for this nonce and class; else raise."""
    if not keys:
        raise AuthenticationError("no freshness key is trusted")
    if len(data) > MAX_STATEMENT_SIZE:
        raise ManifestError("freshness statement too large")
    value = cbor.loads(data, max_size=MAX_STATEMENT_SIZE, max_depth=4)
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], bytes)):
        raise ManifestError("freshness statement must be [payload, COSE_Sign1]")
    payload, block = value
    if not isinstance(block, bytes):
        raise ManifestError("freshness signature must be a byte string")
    cose.verify_block(block, payload, keys)  # authenticate before interpreting
    body = cbor.loads(payload, max_size=MAX_STATEMENT_SIZE, max_depth=2)
    if not isinstance(body, dict) or body.get(F_TYPE) != TYPE_FRESHNESS:
        raise ManifestError("not an otacoap freshness statement")
    if set(body) != {F_TYPE, F_NONCE, F_VENDOR, F_CLASS, F_SEQUENCE, F_ANCHORS, F_TIME}:
        raise ManifestError("freshness statement has missing or unknown fields")
    if body[F_NONCE] != nonce:
        # A statement made for another question: a replay (RFC 9175 §2.3).
        raise AuthenticationError("freshness statement is not for this nonce")
    if body[F_VENDOR] != vendor_id or body[F_CLASS] != class_id:
        raise AuthenticationError("freshness statement is for another vendor or class")
    return Statement(
        nonce,
        vendor_id,
        class_id,
        _uint(body[F_SEQUENCE], "sequence"),
        _uint(body[F_ANCHORS], "anchor version"),
        _uint(body[F_TIME], "time"),
    )


def judge(statement: Statement | None, *, installed: int, anchor_version: int) -> Freshness:
    """FRESH, STALE or UNKNOWN, after a check that found nothing to install.

    `installed`: the device's trusted sequence number; `anchor_version`: the version of
    the anchor list it holds after this check's anchor update.
    """
    if statement is None:
        return Freshness.UNKNOWN
    if statement.sequence > installed or statement.anchor_version > anchor_version:
        return Freshness.STALE
    return Freshness.FRESH
