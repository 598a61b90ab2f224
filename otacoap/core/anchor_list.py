"""Signed anchor lists: rotating and revoking a device class's author keys (ATTACKS.md #20).

In the spirit of TUF root rotation (TUF spec §5.3.4; design and threat model in
docs/decisions/anchor-rotation.md). A device class has *root* keys (k-of-n, offline,
provisioned into the device's read-only identity) that sign a numbered list of the
keys the class trusts for everything else:

* `authors`: the keys whose signatures on a SUIT manifest the device accepts
  (offline, like today's provisioned author keys);
* `freshness`: online keys that may only sign nonce-bound freshness statements
  (TUF's timestamp role, `core.freshness`); never a manifest;
* `roots` and `threshold`: the root set that signs the *next* list.

Wire format (all CBOR, strict, deterministic; `decode_signed`)::

    Signed_Anchor_List = [
        payload: bstr .cbor Anchor_List,
        signatures: [+ COSE_Sign1],    ; detached payload = the payload bstr contents
    ]
    Anchor_List = {
        0: "otacoap-anchors",          ; type: domain separation from every other payload
        1: uint,                       ; version, >= 1; exactly trusted version + 1
        2: bstr,                       ; vendor-id (16 bytes, as the SUIT parameter)
        3: bstr,                       ; class-id  (16 bytes)
        4: [+ Key],                    ; roots (1..MAX_ROOTS, distinct)
        5: uint,                       ; threshold k (1..len(roots))
        6: [+ Key],                    ; authors (1..MAX_AUTHORS, distinct)
        7: [* Key],                    ; freshness keys (0..MAX_FRESHNESS_KEYS, distinct)
    }
    Key = [crv: 1 / 6, x: bstr]        ; COSE crv (RFC 9053): 1 = P-256, x = the 33-byte
                                       ; compressed SEC1 point; 6 = Ed25519, x = 32 bytes

Acceptance (`verify_update`), checked in this order; any failure refuses the whole list:
size cap, strict parse, type; vendor and class are the device's; version is exactly the
trusted one + 1 (TUF §5.3.4: no skipping, so every list is signed by the roots its
predecessor named, and a chain is walked one version at a time, at most
MAX_ROTATIONS_PER_CHECK per check); at least `threshold` distinct roots of the *trusted*
set signed it, and at least the *new* `threshold` of the *new* root set signed it (a
root change needs both the old and the new roots). A list is never accepted twice and
never replaced by a lower or equal version, so a revoked author key stays revoked.

Only this module judges anchor lists; the device stores what it accepted
(`TrustedAnchors`) in its power-safe state record, the server stores and serves the
signed bytes as published.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from . import cbor, cose
from .errors import AuthenticationError, ManifestError, RollbackError
from .untrusted import describe

TYPE_ANCHORS = "otacoap-anchors"

K_TYPE = 0
K_VERSION = 1
K_VENDOR = 2
K_CLASS = 3
K_ROOTS = 4
K_THRESHOLD = 5
K_AUTHORS = 6
K_FRESHNESS = 7

CRV_P256 = 1
CRV_ED25519 = 6
_KEY_LENGTH = {CRV_P256: 33, CRV_ED25519: 32}

MAX_ROOTS = 3
MAX_AUTHORS = 4
MAX_FRESHNESS_KEYS = 2
MAX_SIGNATURES = 2 * MAX_ROOTS  # old and new roots may all sign a root change
MAX_ANCHOR_LIST_SIZE = 2048
MAX_ROTATIONS_PER_CHECK = 8
"""Lists a device applies in one check (TUF's max_root_rotations): an endless chain of
rotations costs a bounded amount of work per check, and the rest waits for the next."""
MAX_VERSION = (1 << 63) - 1  # the server keeps versions in SQLite INTEGER


class AnchorListError(AuthenticationError):
    """An anchor list that is not signed by the roots it needs (reason: unauthorised)."""


# --- keys ------------------------------------------------------------------------------


def compact_key(anchor: cose.TrustAnchor) -> tuple[int, bytes]:
    """(crv, x) of a public key: the form anchor lists and the device record use."""
    key: Any = serialization.load_der_public_key(anchor.material)
    if anchor.kind == "p256":
        return CRV_P256, key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
    if anchor.kind == "ed25519":
        return CRV_ED25519, key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    raise ManifestError("only P-256 and Ed25519 keys can be anchors")


def anchor_of(crv: int, x: bytes) -> cose.TrustAnchor:
    """The TrustAnchor for a compact key, or ManifestError if it is not a valid key."""
    try:
        if crv == CRV_P256 and len(x) == 33:
            key: Any = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), x)
        elif crv == CRV_ED25519 and len(x) == 32:
            key = ed25519.Ed25519PublicKey.from_public_bytes(x)
        else:
            raise ManifestError(f"key of curve {describe(crv)} and {len(x)} bytes is not allowed")
    except ValueError:
        raise ManifestError("key is not a valid public key") from None
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cose.load_public_key(pem)


def _decode_key(v: Any) -> tuple[int, bytes]:
    if not (isinstance(v, list) and len(v) == 2 and type(v[0]) is int and isinstance(v[1], bytes)):
        raise ManifestError("an anchor key must be [crv, x]")
    crv, x = v[0], bytes(v[1])
    if _KEY_LENGTH.get(crv) != len(x):
        raise ManifestError(f"key of curve {describe(crv)} and {len(x)} bytes is not allowed")
    anchor_of(crv, x)  # must be a point on the curve
    return crv, x


def _decode_keys(v: Any, what: str, low: int, high: int) -> tuple[tuple[int, bytes], ...]:
    if not isinstance(v, list) or not low <= len(v) <= high:
        raise ManifestError(f"anchor list needs {low}..{high} {what} keys")
    keys = tuple(_decode_key(k) for k in v)
    if len(set(keys)) != len(keys):
        raise ManifestError(f"anchor list names a {what} key twice")
    return keys


def key_id(key: tuple[int, bytes]) -> str:
    """The fingerprint `trust list` and logs show (cose.TrustAnchor.key_id of the key)."""
    return anchor_of(*key).key_id


# --- the list --------------------------------------------------------------------------


Key = tuple[int, bytes]


@dataclass(frozen=True)
class AnchorList:
    """The contents of one anchor list (what the roots vouch for)."""

    version: int
    vendor_id: bytes
    class_id: bytes
    roots: tuple[Key, ...]
    threshold: int
    authors: tuple[Key, ...]
    freshness: tuple[Key, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.version <= MAX_VERSION:
            raise ManifestError("anchor list version must be 1..2^63-1")
        if len(self.vendor_id) != 16 or len(self.class_id) != 16:
            raise ManifestError("anchor list vendor and class ids must be 16 bytes")
        for what, keys, low, high in (
            ("root", self.roots, 1, MAX_ROOTS),
            ("author", self.authors, 1, MAX_AUTHORS),
            ("freshness", self.freshness, 0, MAX_FRESHNESS_KEYS),
        ):
            if not low <= len(keys) <= high:
                raise ManifestError(f"anchor list needs {low}..{high} {what} keys")
            if len(set(keys)) != len(keys):
                raise ManifestError(f"anchor list names a {what} key twice")
            for crv, x in keys:
                if _KEY_LENGTH.get(crv) != len(x):
                    raise ManifestError(f"bad {what} key")
        if not 1 <= self.threshold <= len(self.roots):
            raise ManifestError("anchor list threshold must be 1..number of roots")

    def payload(self) -> bytes:
        return cbor.dumps(
            {
                K_TYPE: TYPE_ANCHORS,
                K_VERSION: self.version,
                K_VENDOR: self.vendor_id,
                K_CLASS: self.class_id,
                K_ROOTS: [list(k) for k in self.roots],
                K_THRESHOLD: self.threshold,
                K_AUTHORS: [list(k) for k in self.authors],
                K_FRESHNESS: [list(k) for k in self.freshness],
            }
        )


def _uint(v: Any, what: str) -> int:
    if not (type(v) is int and 0 <= v < 1 << 64):
        raise ManifestError(f"anchor list {what} must be an unsigned integer")
    return v


def decode_payload(raw: bytes) -> AnchorList:
    value = cbor.loads(raw, max_size=MAX_ANCHOR_LIST_SIZE, max_depth=4)
    if not isinstance(value, dict):
        raise ManifestError("anchor list must be a map")
    if value.get(K_TYPE) != TYPE_ANCHORS:
        raise ManifestError("not an otacoap anchor list")
    known = {K_TYPE, K_VERSION, K_VENDOR, K_CLASS, K_ROOTS, K_THRESHOLD, K_AUTHORS, K_FRESHNESS}
    for k in value:
        if k not in known:
            raise ManifestError(f"unknown anchor list field {describe(k)}")
    missing = known - set(value)
    if missing:
        raise ManifestError(f"anchor list lacks field {min(missing)}")
    vendor, klass = value[K_VENDOR], value[K_CLASS]
    if not (isinstance(vendor, bytes) and isinstance(klass, bytes)):
        raise ManifestError("anchor list vendor and class ids must be byte strings")
    return AnchorList(
        version=_uint(value[K_VERSION], "version"),
        vendor_id=bytes(vendor),
        class_id=bytes(klass),
        roots=_decode_keys(value[K_ROOTS], "root", 1, MAX_ROOTS),
        threshold=_uint(value[K_THRESHOLD], "threshold"),
        authors=_decode_keys(value[K_AUTHORS], "author", 1, MAX_AUTHORS),
        freshness=_decode_keys(value[K_FRESHNESS], "freshness", 0, MAX_FRESHNESS_KEYS),
    )


@dataclass(frozen=True)
class SignedAnchorList:
    """A parsed, *not yet verified* signed list: what `decode_signed` returns."""

    contents: AnchorList
    payload: bytes
    signatures: tuple[bytes, ...]

    @property
    def digest(self) -> bytes:
        """SHA-256 of the payload: names one list whatever its signatures."""
        return hashlib.sha256(self.payload).digest()


def sign(contents: AnchorList, keys: Sequence[cose.SigningKey]) -> bytes:
    """The signed list: `contents` signed by each of `keys` (roots, old and new)."""
    if not keys:
        raise ManifestError("an anchor list needs at least one signature")
    if len(keys) > MAX_SIGNATURES:
        raise ManifestError(f"at most {MAX_SIGNATURES} signatures")
    payload = contents.payload()
    return cbor.dumps([payload, [cose.sign1(payload, k) for k in keys]])


def decode_signed(data: bytes) -> SignedAnchorList:
    """Strictly parse a signed list (size cap first); signatures are not checked here."""
    if len(data) > MAX_ANCHOR_LIST_SIZE:
        raise ManifestError(
            f"anchor list of {len(data)} bytes exceeds the {MAX_ANCHOR_LIST_SIZE}-byte cap"
        )
    value = cbor.loads(data, max_size=MAX_ANCHOR_LIST_SIZE, max_depth=6)
    if not (isinstance(value, list) and len(value) == 2):
        raise ManifestError("signed anchor list must be [payload, signatures]")
    payload, sigs = value
    if not isinstance(payload, bytes):
        raise ManifestError("anchor list payload must be a byte string")
    if not (
        isinstance(sigs, list)
        and 1 <= len(sigs) <= MAX_SIGNATURES
        and all(isinstance(s, bytes) for s in sigs)
    ):
        raise ManifestError(f"anchor list needs 1..{MAX_SIGNATURES} signatures")
    return SignedAnchorList(decode_payload(payload), bytes(payload), tuple(sigs))


def signers(signed: SignedAnchorList, keys: Iterable[Key]) -> frozenset[Key]:
    """The distinct keys among `keys` that produced one of the list's signatures."""
    anchors = {k: anchor_of(*k) for k in keys}
    found: set[Key] = set()
    for block in signed.signatures:
        candidates = [a for k, a in anchors.items() if k not in found]
        if not candidates:
            break
        try:
            who = cose.verify_block(block, signed.payload, candidates)
        except AuthenticationError:
            continue
        found.update(k for k, a in anchors.items() if a.key_id == who.key_id)
    return frozenset(found)


# --- what a device trusts --------------------------------------------------------------


@dataclass(frozen=True)
class TrustedAnchors:
    """What a device trusts now: version 0 is its provisioning, then each accepted list.

    `grace` is the one revoked author key still allowed to vouch for the image the
    device *runs* (secure boot of the confirmed slot only, never a new manifest or a
    candidate): revoking the key that signed the running image must not brick the
    device. `reported` is the last freshness outcome the device reported (so a frozen
    server causes one alarm, not one flash write per poll).
    """

    version: int
    roots: tuple[Key, ...]
    threshold: int
    authors: tuple[Key, ...]
    freshness: tuple[Key, ...] = ()
    grace: Key | None = None
    reported: int | None = None

    def author_anchors(self) -> tuple[cose.TrustAnchor, ...]:
        return tuple(anchor_of(*k) for k in self.authors)

    def boot_anchors(self) -> tuple[cose.TrustAnchor, ...]:
        """Keys that may vouch for the confirmed, running slot: the authors and `grace`."""
        extra = (anchor_of(*self.grace),) if self.grace and self.grace not in self.authors else ()
        return self.author_anchors() + extra

    def freshness_anchors(self) -> tuple[cose.TrustAnchor, ...]:
        return tuple(anchor_of(*k) for k in self.freshness)

    def to_cbor(self) -> list[Any]:
        return [
            self.version,
            [list(k) for k in self.roots],
            self.threshold,
            [list(k) for k in self.authors],
            [list(k) for k in self.freshness],
            list(self.grace) if self.grace else None,
            self.reported,
        ]

    @classmethod
    def from_cbor(cls, v: Any) -> TrustedAnchors:
        if not (isinstance(v, list) and len(v) == 7):
            raise ManifestError("trusted anchors must be a 7-element array")
        grace = _decode_key(v[5]) if v[5] is not None else None
        reported = _uint(v[6], "reported") if v[6] is not None else None
        roots = _decode_keys(v[1], "root", 1, MAX_ROOTS)
        threshold = _uint(v[2], "threshold")
        if not 1 <= threshold <= len(roots):
            raise ManifestError("trusted threshold out of range")
        return cls(
            version=_uint(v[0], "version"),
            roots=roots,
            threshold=threshold,
            authors=_decode_keys(v[3], "author", 1, MAX_AUTHORS),
            freshness=_decode_keys(v[4], "freshness", 0, MAX_FRESHNESS_KEYS),
            grace=grace,
            reported=reported,
        )

    @classmethod
    def worst_case(cls) -> TrustedAnchors:
        """The largest value a device record can hold (for its size bound)."""
        p256 = [(CRV_P256, bytes([2]) + bytes([i]) * 32) for i in range(MAX_ROOTS + 6)]
        return cls(
            version=MAX_VERSION,
            roots=tuple(p256[:MAX_ROOTS]),
            threshold=MAX_ROOTS,
            authors=tuple(p256[MAX_ROOTS : MAX_ROOTS + MAX_AUTHORS]),
            freshness=tuple(p256[MAX_ROOTS + MAX_AUTHORS : MAX_ROOTS + MAX_AUTHORS + 2]),
            grace=p256[0],
            reported=255,
        )


def provisioned(
    roots: Sequence[cose.TrustAnchor], threshold: int, authors: Sequence[cose.TrustAnchor]
) -> TrustedAnchors:
    """Version 0: what provisioning wrote (roots and the first author keys)."""
    roots_c = tuple(compact_key(a) for a in roots)
    authors_c = tuple(compact_key(a) for a in authors)
    if not 1 <= len(roots_c) <= MAX_ROOTS or not 1 <= threshold <= len(roots_c):
        raise ManifestError(f"need 1..{MAX_ROOTS} root keys and a threshold up to their number")
    if not 1 <= len(authors_c) <= MAX_AUTHORS:
        raise ManifestError(f"need 1..{MAX_AUTHORS} author keys with root keys")
    return TrustedAnchors(0, roots_c, threshold, authors_c)


def verify_update(
    trusted: TrustedAnchors,
    data: bytes,
    *,
    vendor_id: bytes,
    class_id: bytes,
) -> SignedAnchorList:
    """Accept `data` as the successor of `trusted`, or raise (TUF §5.3.4).

    The caller makes the new TrustedAnchors from the result (`successor`) and commits it
    durably before acting on it.
    """
    signed = decode_signed(data)
    new = signed.contents
    if new.vendor_id != vendor_id or new.class_id != class_id:
        raise AnchorListError("anchor list is for another vendor or class")
    if new.version <= trusted.version:
        raise RollbackError(
            f"anchor list version {new.version} is not above the trusted {trusted.version}"
        )
    if new.version != trusted.version + 1:
        raise RollbackError(
            f"anchor list version {new.version} skips versions after {trusted.version}"
        )
    old_signers = signers(signed, trusted.roots)
    if len(old_signers) < trusted.threshold:
        raise AnchorListError(
            f"anchor list is signed by {len(old_signers)} of the trusted roots, "
            f"{trusted.threshold} needed"
        )
    new_signers = signers(signed, new.roots)
    if len(new_signers) < new.threshold:
        raise AnchorListError(
            f"anchor list is signed by {len(new_signers)} of its own roots, {new.threshold} needed"
        )
    return signed


def successor(
    trusted: TrustedAnchors, signed: SignedAnchorList, running_signer: Key | None
) -> TrustedAnchors:
    """The TrustedAnchors after accepting `signed`.

    `running_signer`: the key that vouches for the image the device runs (None for the
    factory image). If the new list drops it, it becomes the grace key, so the running
    image still passes secure boot; it vouches for nothing else.
    """
    new = signed.contents
    grace = running_signer if running_signer and running_signer not in new.authors else None
    return TrustedAnchors(
        version=new.version,
        roots=new.roots,
        threshold=new.threshold,
        authors=new.authors,
        freshness=new.freshness,
        grace=grace,
        reported=trusted.reported,
    )
