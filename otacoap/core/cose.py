"""COSE for SUIT: the one module that calls `cwt` (DESIGN.md "COSE: cwt").

We parse the COSE structure ourselves, strictly, and use cwt's COSEKey only for the
cryptographic primitive. That is what lets us enforce the SUIT/MTI rules cwt does not:
the algorithm comes only from the protected header (RFC 9052 §3.1, MTI CDDL), unknown
`crit` labels are refused, the payload is detached (manifest-34 §8.3), and the key is
chosen by the trust anchor list, never by an attacker-supplied `kid` (ATTACKS.md #2).

The detached payload is the SUIT_Digest encoding itself (auth[0]'s contents): the
Sig_structure is ["Signature1", protected, h'', SUIT_Digest bytes] (DIGEST.md §2.2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cwt import COSEKey

from . import cbor
from .errors import AlgorithmError, AuthenticationError, ManifestError
from .untrusted import describe

ES256 = -7
ESP256 = -9
EDDSA = -8
ED25519 = -19
HMAC_256_256 = 5

ALG_NAMES = {
    ES256: "ES256",
    ESP256: "ESP256",
    EDDSA: "EdDSA",
    ED25519: "Ed25519",
    HMAC_256_256: "HMAC 256/256",
}
_ALGS_FOR_KIND = {"p256": (ES256, ESP256), "ed25519": (EDDSA, ED25519), "hmac": (HMAC_256_256,)}

TAG_SIGN1 = 18
TAG_MAC0 = 17
TAG_SIGN = 98
TAG_MAC = 97

H_ALG = 1
H_CRIT = 2
H_KID = 4


@dataclass(frozen=True)
class TrustAnchor:
    """A key whose signatures (or MACs) the holder accepts; bound to its algorithm family."""

    kind: str  # "p256" | "ed25519" | "hmac"
    key_id: str  # short fingerprint for logs and `trust list`
    material: bytes  # SubjectPublicKeyInfo DER, or the raw HMAC key
    _keys: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)

    def cose_key(self, alg: int) -> Any:
        key = self._keys.get(alg)
        if key is None:
            if self.kind == "hmac":
                key = COSEKey.from_symmetric_key(self.material, alg=alg)
            else:
                pem = serialization.load_der_public_key(self.material).public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                key = COSEKey.from_pem(pem, alg=alg)
            self._keys[alg] = key
        return key

    def public_pem(self) -> bytes:
        if self.kind == "hmac":
            raise ValueError("an HMAC key has no public form")
        return serialization.load_der_public_key(self.material).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass(frozen=True)
class SigningKey:
    kind: str  # "p256" | "ed25519"
    pem: bytes = field(repr=False)
    public: TrustAnchor = field(compare=False)

    @property
    def default_alg(self) -> int:
        """ES256 for P-256 (what the manifest draft's examples and libcsuit's ES256
        envelopes use; ESP256 on request), and the fully-specified Ed25519 (-19,
        RFC 9864) for Ed25519 keys, as the SUIT MTI profiles name it. EdDSA (-8) is
        still verified, and signed on request."""
        return ES256 if self.kind == "p256" else ED25519


def _fingerprint(material: bytes) -> str:
    return hashlib.sha256(material).hexdigest()[:16]


def _kind_of(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp256r1":
            raise AlgorithmError(f"EC curve {key.curve.name} is not supported (P-256 only)")
        return "p256"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise AlgorithmError("unsupported key type (P-256 or Ed25519 only)")


PRIVATE_KEY_GIVEN = (
    "this is a private key: give its public key (e.g. author.pub); the author key "
    "stays offline, never on a server or a device"
)

# RFC 9052 §7.1 / RFC 9053 §7: COSE_Key labels kty (1), d (-4, EC2/OKP private
# key) and k (-1 with kty Symmetric (4), a secret key).
_COSE_KTY, _COSE_D, _COSE_K, _KTY_SYMMETRIC = 1, -4, -1, 4


def is_private_key(data: bytes) -> bool:
    """Whether `data` holds a private or secret key: PEM "... PRIVATE KEY" (PKCS#8,
    SEC1, OpenSSH, encrypted or not) or a COSE_Key with 'd' (or a symmetric 'k'),
    raw CBOR or hex."""
    if b"PRIVATE KEY-----" in data:
        return True
    text = data.strip()
    if text and all(c in b"0123456789abcdefABCDEF \t\r\n" for c in text):
        try:
            data = bytes.fromhex(text.decode())
        except ValueError:
            return False
    try:
        value = cbor.loads(data, max_size=4096, max_depth=4)
    except (ManifestError, ValueError):
        return False
    if isinstance(value, cbor2.CBORTag):  # COSE_Key sets are not tagged; be lenient
        value = value.value
    keys = value if isinstance(value, list) else [value]
    return any(
        isinstance(k, dict)
        and (_COSE_D in k or (k.get(_COSE_KTY) == _KTY_SYMMETRIC and _COSE_K in k))
        for k in keys
    )


def load_public_key(pem: bytes) -> TrustAnchor:
    """A trust anchor from a PEM public key.

    A private key is refused, not quietly reduced to its public half: the README
    promises the author key stays offline, so no tool that needs only the public key
    (`trust add`, `manifest verify --key`, provisioning's `--trust`) may invite
    copying it onto a server or a device.
    """
    if is_private_key(pem):
        raise AuthenticationError(PRIVATE_KEY_GIVEN)
    try:
        key: Any = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise AuthenticationError("not a PEM public key") from exc
    kind = _kind_of(key)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return TrustAnchor(kind, _fingerprint(der), der)


def hmac_anchor(key: bytes) -> TrustAnchor:
    if len(key) != 32:
        raise AuthenticationError("an HMAC 256/256 key must be 32 bytes")
    return TrustAnchor("hmac", "hmac-" + _fingerprint(key), bytes(key))


def load_private_key(pem: bytes) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise AuthenticationError("not an unencrypted PEM private key") from exc
    kind = _kind_of(key)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey(kind, pem, load_public_key(public_pem))


def generate_key(kind: str) -> SigningKey:
    """A fresh signing key: 'es256' (P-256) or 'ed25519'."""
    if kind == "es256":
        key: Any = ec.generate_private_key(ec.SECP256R1())
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise AlgorithmError(f"unknown key algorithm {kind!r} (es256 or ed25519)")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return load_private_key(pem)


@dataclass(frozen=True)
class ParsedBlock:
    tag: int
    alg: int
    protected_raw: bytes
    signature: bytes


def parse_block(raw: bytes) -> ParsedBlock:
    """Strictly parse one COSE_Sign1/COSE_Mac0 authentication block."""
    try:
        value = cbor.loads(raw)
    except ManifestError as exc:
        raise AlgorithmError("authentication block is not valid CBOR") from exc
    if not isinstance(value, cbor2.CBORTag):
        raise AlgorithmError("authentication block is not a tagged COSE message")
    if value.tag in (TAG_SIGN, TAG_MAC):
        raise AlgorithmError("multi-signer COSE_Sign/COSE_Mac is not supported")
    if value.tag not in (TAG_SIGN1, TAG_MAC0):
        raise AlgorithmError(f"CBOR tag {describe(value.tag)} is not a COSE signature or MAC")
    body = value.value
    if not (isinstance(body, list) and len(body) == 4):
        raise AlgorithmError("COSE message must have four elements")
    protected_raw, unprotected, payload, signature = body
    if not isinstance(protected_raw, bytes) or not isinstance(unprotected, dict):
        raise AlgorithmError("malformed COSE headers")
    if payload is not None:
        raise AlgorithmError("COSE payload must be detached (nil) in SUIT")
    if not isinstance(signature, bytes) or not signature:
        raise AlgorithmError("empty or malformed COSE signature")
    try:
        protected = cbor.loads(protected_raw) if protected_raw else {}
    except ManifestError as exc:
        raise AlgorithmError("malformed COSE protected header") from exc
    if not isinstance(protected, dict):
        raise AlgorithmError("COSE protected header is not a map")
    if H_ALG in unprotected:
        raise AlgorithmError("COSE alg must be in the protected header only")
    if H_CRIT in protected or H_CRIT in unprotected:
        raise AlgorithmError("COSE crit header lists labels this processor does not know")
    alg = protected.get(H_ALG)
    allowed = (
        _ALGS_FOR_KIND["hmac"]
        if value.tag == TAG_MAC0
        else (_ALGS_FOR_KIND["p256"] + _ALGS_FOR_KIND["ed25519"])
    )
    if alg not in allowed:
        raise AlgorithmError(f"COSE algorithm {describe(alg)} is not allowed for tag {value.tag}")
    return ParsedBlock(value.tag, alg, protected_raw, signature)


def _to_be_signed(block: ParsedBlock, payload: bytes) -> bytes:
    context = "Signature1" if block.tag == TAG_SIGN1 else "MAC0"
    return cbor2.dumps([context, block.protected_raw, b"", payload])


def verify_block(raw: bytes, payload: bytes, anchors: Sequence[TrustAnchor]) -> TrustAnchor:
    """Return the anchor that authenticates `payload` through this block, or raise.

    Every anchor of the algorithm's family is tried; none is picked by `kid`.
    """
    block = parse_block(raw)
    message = _to_be_signed(block, payload)
    candidates = [a for a in anchors if block.alg in _ALGS_FOR_KIND[a.kind]]
    for anchor in candidates:
        try:
            anchor.cose_key(block.alg).verify(message, block.signature)
        except Exception:
            continue
        return anchor
    raise AuthenticationError(
        "signature does not verify with any trusted key",
        detail=f"alg {block.alg}, {len(candidates)} candidate keys",
    )


def sign1(payload: bytes, key: SigningKey, alg: int | None = None) -> bytes:
    """A tagged COSE_Sign1 with detached payload over a SUIT_Digest encoding."""
    alg = key.default_alg if alg is None else alg
    if alg not in _ALGS_FOR_KIND[key.kind]:
        raise AlgorithmError(f"algorithm {ALG_NAMES.get(alg, alg)} does not fit a {key.kind} key")
    protected = cbor.dumps({H_ALG: alg})
    block = ParsedBlock(TAG_SIGN1, alg, protected, b"")
    signature = COSEKey.from_pem(key.pem, alg=alg).sign(_to_be_signed(block, payload))
    return cbor.dumps(cbor2.CBORTag(TAG_SIGN1, [protected, {}, None, signature]))


def algs_for(kind: str) -> tuple[int, ...]:
    """The COSE algorithms a key of this kind signs or verifies."""
    return _ALGS_FOR_KIND[kind]


def alg_by_name(name: str) -> int:
    """A signature algorithm from its IANA name (case-insensitive): es256, esp256,
    eddsa, ed25519."""
    for alg, alg_name in ALG_NAMES.items():
        if alg != HMAC_256_256 and alg_name.lower() == name.lower():
            return alg
    raise AlgorithmError(f"unknown signature algorithm {name!r} (es256, esp256, eddsa, ed25519)")


def mac0(payload: bytes, key: bytes) -> bytes:
    """A tagged COSE_Mac0 (HMAC 256/256) with detached payload."""
    protected = cbor.dumps({H_ALG: HMAC_256_256})
    block = ParsedBlock(TAG_MAC0, HMAC_256_256, protected, b"")
    tag = COSEKey.from_symmetric_key(key, alg=HMAC_256_256).sign(_to_be_signed(block, payload))
    return cbor.dumps(cbor2.CBORTag(TAG_MAC0, [protected, {}, None, tag]))
