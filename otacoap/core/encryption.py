"""SUIT payload encryption (draft-ietf-suit-firmware-encryption-24), sans-I/O.

What it does, and only that: parse a SUIT_Encryption_Info (the bstr-wrapped COSE_Encrypt,
tag 96, or COSE_Encrypt0, tag 16, of suit-parameter-encryption-info = 19), find the
content-encryption key (CEK) with the keys this holder has, and decrypt the payload
*while it streams*. The operator side (`encrypt`) produces the same structures.

Algorithms (the SUIT MTI profiles, draft-ietf-suit-mti §5, DIGEST.md §2):

* content: A128GCM (1, RFC 9053 §4.1) and A128CTR (-65534, RFC 9459 §4);
* key distribution: A128KW (-3, RFC 9053 §6.2.1; the recipient names its KEK by `kid`)
  and ECDH-ES+A128KW (-29, RFC 9053 §6.4): the KEK is HKDF-SHA-256 of the ECDH shared
  secret with the draft's COSE_KDF_Context (firmware-encryption §6.2.2):
  ``[AlgorithmID -3, PartyUInfo [nil, nil, nil], PartyVInfo [nil, nil, nil],
  SuppPubInfo [128, recipient protected header bstr, h"SUIT Payload Encryption"]]``
  (``other`` is a byte string).

Streaming and bounded memory. A `Decryptor` turns ciphertext into plaintext in order,
holding at most 16 bytes:

* A128CTR is the draft's streaming mode (firmware-encryption §7, "non-AEAD"): no tag;
  integrity comes from the signed manifest's image-digest over the *plaintext*, which
  the image writer checks as for any payload. The counter of byte ``n`` is
  ``IV + n // 16``, so a decryptor can start at any offset: a download resumes from
  its last checkpoint.
* A128GCM: the tag is the last 16 bytes of the ciphertext. The decryptor holds back the
  trailing 16 bytes it has seen (they may be the tag), releases everything before them,
  and checks the tag in `finish` (GHASH runs incrementally; nothing else is kept). The
  released plaintext is *unauthenticated* until then; it only goes to the staging slot,
  which nothing boots until `finish` and the image digest have both passed. A GCM
  decryptor cannot resume mid-stream (the GHASH state is not in flash), so a GCM download
  that is cut restarts from zero.

Key choice: a recipient is tried only with keys of its algorithm; the `kid` narrows the
A128KW keys tried but never selects a key the holder does not already trust with that id.
A wrong key or a tampered ciphertext is a typed refusal (`NoDecryptionKey`,
`CiphertextRejected`), never garbage handed on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from . import cbor, suit
from .errors import AlgorithmError, AuthenticationError, ManifestError, OtaError, ReportReason
from .untrusted import describe

A128GCM = 1
A128CTR = -65534
A128KW = -3
ECDH_ES_A128KW = -29

ALG_NAMES = {
    A128GCM: "A128GCM",
    A128CTR: "A128CTR",
    A128KW: "A128KW",
    ECDH_ES_A128KW: "ECDH-ES+A128KW",
}
CONTENT_ALGS = (A128GCM, A128CTR)

TAG_ENCRYPT0 = 16
TAG_ENCRYPT = 96

H_ALG = 1
H_CRIT = 2
H_KID = 4
H_IV = 5
H_EPHEMERAL_KEY = -1

# COSE_Key labels (RFC 9052 §7, RFC 9053 §7.1)
K_KTY = 1
K_CRV = -1
K_X = -2
K_Y = -3
KTY_EC2 = 2
CRV_P256 = 1

KDF_OTHER = b"SUIT Payload Encryption"  # firmware-encryption §6.2.2: SuppPubInfo.other, a bstr
GCM_TAG_SIZE = 16
GCM_IV_SIZE = 12
CTR_IV_SIZE = 16
CEK_SIZE = 16
MAX_RECIPIENTS = 16
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class EncryptionError(OtaError):
    """The payload's encryption cannot be processed (malformed or unsupported info)."""

    reason = ReportReason.PARAMETER_UNSUPPORTED


class NoDecryptionKey(AuthenticationError):
    """No key this holder has unwraps the payload's CEK (wrong or missing key)."""

    reason = ReportReason.UNAUTHORISED


class CiphertextRejected(OtaError):
    """The ciphertext failed authentication (GCM tag) or is cut short."""

    reason = ReportReason.OPERATION_FAILED


@dataclass(frozen=True)
class Recipient:
    """One COSE_recipient: how the CEK is wrapped for one key holder."""

    alg: int
    protected_raw: bytes
    kid: bytes | None
    encrypted_key: bytes
    ephemeral: ec.EllipticCurvePublicKey | None = field(default=None, compare=False)


@dataclass(frozen=True)
class EncryptionInfo:
    """A parsed SUIT_Encryption_Info (the ciphertext itself is detached: nil)."""

    content_alg: int
    protected_raw: bytes
    iv: bytes
    recipients: tuple[Recipient, ...]
    raw: bytes = field(compare=False, default=b"")

    @property
    def streaming_resumable(self) -> bool:
        """Whether a decryptor may start mid-payload (CTR: yes; GCM: no)."""
        return self.content_alg == A128CTR

    def ciphertext_size(self, plaintext_size: int) -> int:
        return plaintext_size + (GCM_TAG_SIZE if self.content_alg == A128GCM else 0)

    def plaintext_size(self, ciphertext_size: int) -> int:
        return ciphertext_size - (GCM_TAG_SIZE if self.content_alg == A128GCM else 0)


def _fail(message: str) -> EncryptionError:
    return EncryptionError(message)


def _headers(protected_raw: Any, unprotected: Any) -> tuple[dict[Any, Any], dict[Any, Any]]:
    if not isinstance(protected_raw, bytes) or not isinstance(unprotected, dict):
        raise _fail("malformed COSE headers in encryption info")
    try:
        protected = cbor.loads(protected_raw) if protected_raw else {}
    except ManifestError as exc:
        raise _fail("malformed COSE protected header in encryption info") from exc
    if not isinstance(protected, dict):
        raise _fail("COSE protected header is not a map")
    if H_CRIT in protected or H_CRIT in unprotected:
        raise _fail("COSE crit header lists labels this processor does not know")
    if set(protected) & set(unprotected):
        raise _fail("a COSE header label is both protected and unprotected")
    return protected, unprotected


def _ephemeral_key(value: Any) -> ec.EllipticCurvePublicKey:
    if not isinstance(value, dict):
        raise _fail("ephemeral key is not a COSE_Key")
    if value.get(K_KTY) != KTY_EC2 or value.get(K_CRV) != CRV_P256:
        raise _fail("ephemeral key is not an EC2 P-256 key")
    x, y = value.get(K_X), value.get(K_Y)
    if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == len(y) == 32):
        raise _fail("ephemeral key coordinates are malformed")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    except ValueError as exc:
        raise _fail("ephemeral key is not a point on P-256") from exc


def _recipient(value: Any) -> Recipient:
    if not (isinstance(value, list) and len(value) in (3, 4)):
        raise _fail("COSE_recipient must have three elements")
    if len(value) == 4:
        raise _fail("nested COSE recipients are not supported")
    protected_raw, unprotected, encrypted_key = value
    protected, unprotected = _headers(protected_raw, unprotected)
    alg = protected.get(H_ALG, unprotected.get(H_ALG))
    if alg not in (A128KW, ECDH_ES_A128KW):
        raise AlgorithmError(f"key distribution algorithm {describe(alg)} is not supported")
    if not isinstance(encrypted_key, bytes) or len(encrypted_key) != CEK_SIZE + 8:
        raise _fail("wrapped CEK must be 24 bytes (A128KW of a 128-bit key)")
    kid = unprotected.get(H_KID, protected.get(H_KID))
    if kid is not None and not isinstance(kid, bytes):
        raise _fail("recipient kid must be a byte string")
    ephemeral = None
    if alg == ECDH_ES_A128KW:
        if H_ALG not in protected:
            raise _fail("ECDH-ES recipient must protect its alg (it is in the KDF context)")
        ephemeral = _ephemeral_key(unprotected.get(H_EPHEMERAL_KEY))
    elif protected_raw:
        # RFC 9053 §6.2.1: AES key wrap recipients have an empty protected header.
        raise _fail("A128KW recipient must have an empty protected header")
    return Recipient(alg, protected_raw, kid, encrypted_key, ephemeral)


def parse_encryption_info(raw: bytes) -> EncryptionInfo:
    """Strictly parse suit-parameter-encryption-info (COSE_Encrypt or COSE_Encrypt0)."""
    try:
        value = cbor.loads(raw)
    except ManifestError as exc:
        raise _fail("encryption info is not valid CBOR") from exc
    if not isinstance(value, cbor2.CBORTag) or value.tag not in (TAG_ENCRYPT, TAG_ENCRYPT0):
        raise _fail("encryption info is not a tagged COSE_Encrypt or COSE_Encrypt0")
    body = value.value
    size = 4 if value.tag == TAG_ENCRYPT else 3
    if not (isinstance(body, list) and len(body) == size):
        raise _fail(f"COSE_Encrypt{'' if size == 4 else '0'} must have {size} elements")
    protected, unprotected = _headers(body[0], body[1])
    if body[2] is not None:
        raise _fail("SUIT encryption info carries a detached (nil) ciphertext")
    alg = protected.get(H_ALG, unprotected.get(H_ALG))
    if alg not in CONTENT_ALGS:
        raise AlgorithmError(f"content encryption algorithm {describe(alg)} is not supported")
    if alg == A128GCM and H_ALG not in protected:
        raise _fail("A128GCM must carry its alg in the protected header")
    if alg == A128CTR and body[0]:
        # RFC 9459 §4: without integrity, the protected header is a zero-length bstr.
        raise _fail("A128CTR must have an empty protected header")
    iv = unprotected.get(H_IV)
    want = GCM_IV_SIZE if alg == A128GCM else CTR_IV_SIZE
    if not isinstance(iv, bytes) or len(iv) != want:
        raise _fail(f"{ALG_NAMES[alg]} needs a {want}-byte IV")
    recipients: tuple[Recipient, ...] = ()
    if value.tag == TAG_ENCRYPT:
        items = body[3]
        if not isinstance(items, list) or not 0 < len(items) <= MAX_RECIPIENTS:
            raise _fail(f"COSE_Encrypt needs 1..{MAX_RECIPIENTS} recipients")
        recipients = tuple(_recipient(r) for r in items)
    return EncryptionInfo(alg, body[0], iv, recipients, bytes(raw))


# --- keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DecryptionKeys:
    """What a holder can decrypt with: A128KW KEKs (with optional kid), P-256 private
    keys for ECDH-ES, and, for COSE_Encrypt0, direct CEKs."""

    keks: tuple[tuple[bytes | None, bytes], ...] = ()
    ec_private: tuple[ec.EllipticCurvePrivateKey, ...] = field(default=(), compare=False)
    direct: tuple[bytes, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.keks or self.ec_private or self.direct)


def load_kek(data: bytes, kid: bytes | None = None) -> tuple[bytes | None, bytes]:
    """A KEK from a file's bytes: 16 raw bytes or 32 hex digits (whitespace ignored)."""
    text = data.strip()
    key = data
    if len(text) == 2 * CEK_SIZE:
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = data
    if len(key) != CEK_SIZE:
        raise EncryptionError("an A128KW key must be 16 bytes (or 32 hex digits)")
    return (kid, bytes(key))


def load_ec_private(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise EncryptionError("not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise EncryptionError("an ECDH-ES recipient key must be a P-256 private key")
    return key


def load_ec_private_der(der: bytes) -> ec.EllipticCurvePrivateKey:
    """A device's stored ECDH-ES key (PKCS#8 DER, as provisioning writes it)."""
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError) as exc:
        raise EncryptionError("not a PKCS#8 DER private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise EncryptionError("an ECDH-ES recipient key must be a P-256 private key")
    return key


def private_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_ec_public(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key: Any = serialization.load_pem_public_key(pem)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(pem, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise EncryptionError("not a PEM P-256 public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise EncryptionError("an ECDH-ES recipient key must be a P-256 key")
    return key


def kdf_context(recipient_protected: bytes) -> bytes:
    """The draft's COSE_KDF_Context for ECDH-ES+A128KW (firmware-encryption §6.2.2)."""
    return cbor2.dumps(
        [
            A128KW,
            [None, None, None],
            [None, None, None],
            [CEK_SIZE * 8, recipient_protected, KDF_OTHER],
        ]
    )


def _ecdh_kek(
    private: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey, protected: bytes
) -> bytes:
    shared = private.exchange(ec.ECDH(), public)
    # RFC 9053 §6.3.1 (HKDF-SHA-256, no salt) with the context above as `info`.
    return HKDF(hashes.SHA256(), CEK_SIZE, None, kdf_context(protected)).derive(shared)


def _try_unwrap(kek: bytes, wrapped: bytes) -> bytes | None:
    try:
        return aes_key_unwrap(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        return None


def unwrap_cek(info: EncryptionInfo, keys: DecryptionKeys) -> bytes:
    """The CEK, from the first recipient one of `keys` unwraps (RFC 3394 integrity check)."""
    if not info.recipients:
        for cek in keys.direct:
            if len(cek) == CEK_SIZE:
                return cek
        raise NoDecryptionKey("no direct content key for this COSE_Encrypt0 payload")
    tried = 0
    for r in info.recipients:
        if r.alg == A128KW:
            for kid, kek in keys.keks:
                if kid is not None and r.kid is not None and kid != r.kid:
                    continue
                tried += 1
                found = _try_unwrap(kek, r.encrypted_key)
                if found is not None:
                    return found
        elif r.alg == ECDH_ES_A128KW and r.ephemeral is not None:
            for private in keys.ec_private:
                tried += 1
                found = _try_unwrap(
                    _ecdh_kek(private, r.ephemeral, r.protected_raw), r.encrypted_key
                )
                if found is not None:
                    return found
    raise NoDecryptionKey(
        "no key of this device unwraps the payload's content key",
        detail=f"{len(info.recipients)} recipients, {tried} keys tried",
    )


# --- streaming decryption -------------------------------------------------------------


def _ctr_block(iv: bytes, offset: int) -> bytes:
    counter = (int.from_bytes(iv, "big") + offset // 16) % (1 << 128)
    return counter.to_bytes(16, "big")


class Decryptor:
    """Ciphertext in, plaintext out, in order; holds at most 16 bytes (the GCM tag).

    `offset` (CTR only) is the plaintext offset the stream starts at: the counter of a
    block is IV + block number (RFC 9459 §4), so any offset can be reached.
    """

    def __init__(self, info: EncryptionInfo, cek: bytes, offset: int = 0) -> None:
        if len(cek) != CEK_SIZE:
            raise EncryptionError("the content key must be 16 bytes")
        self.alg = info.content_alg
        self._held = b""
        self.done = False
        if self.alg == A128CTR:
            if offset < 0:
                raise EncryptionError("A128CTR cannot start before the payload")
            self._ctx: Any = Cipher(
                algorithms.AES(cek), modes.CTR(_ctr_block(info.iv, offset))
            ).decryptor()
            if offset % 16:
                self._ctx.update(bytes(offset % 16))  # into the block: skip its first bytes
        else:
            if offset:
                raise EncryptionError("A128GCM decryption cannot start mid-payload")
            self._ctx = Cipher(algorithms.AES(cek), modes.GCM(info.iv)).decryptor()
            # RFC 9052 §5.3: AAD is the Enc_structure, external_aad empty.
            self._ctx.authenticate_additional_data(
                cbor2.dumps(["Encrypt" if info.recipients else "Encrypt0", info.protected_raw, b""])
            )

    def feed(self, data: bytes) -> bytes:
        if self.done:
            raise CiphertextRejected("ciphertext continues after its end")
        if self.alg == A128CTR:
            return bytes(self._ctx.update(data))
        buf = self._held + data
        if len(buf) <= GCM_TAG_SIZE:
            self._held = buf
            return b""
        self._held = buf[-GCM_TAG_SIZE:]
        return bytes(self._ctx.update(buf[:-GCM_TAG_SIZE]))

    def finish(self) -> bytes:
        """The last plaintext bytes; for GCM, raise unless the tag verifies."""
        self.done = True
        if self.alg == A128CTR:
            return bytes(self._ctx.finalize())
        if len(self._held) != GCM_TAG_SIZE:
            raise CiphertextRejected("ciphertext is shorter than its authentication tag")
        try:
            return bytes(self._ctx.finalize_with_tag(self._held))
        except InvalidTag as exc:
            raise CiphertextRejected(
                "payload ciphertext failed authentication (wrong key or tampered bytes)"
            ) from exc


def decrypt(info: EncryptionInfo, keys: DecryptionKeys, ciphertext: bytes) -> bytes:
    """Whole-buffer convenience over `Decryptor` (CLI, tests)."""
    d = Decryptor(info, unwrap_cek(info, keys))
    return d.feed(ciphertext) + d.finish()


# --- the operator's side ----------------------------------------------------------------


@dataclass(frozen=True)
class KekRecipient:
    key: bytes
    kid: bytes | None = None


@dataclass(frozen=True)
class EcdhRecipient:
    public: ec.EllipticCurvePublicKey = field(compare=False)
    kid: bytes | None = None


RecipientSpec = KekRecipient | EcdhRecipient


def _cose_ec_key(public: ec.EllipticCurvePublicKey) -> dict[int, Any]:
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return {K_KTY: KTY_EC2, K_CRV: CRV_P256, K_X: point[1:33], K_Y: point[33:65]}


def _wrap_for(spec: RecipientSpec, cek: bytes, random: Callable[[int], bytes]) -> list[Any]:
    if isinstance(spec, KekRecipient):
        if len(spec.key) != CEK_SIZE:
            raise EncryptionError("an A128KW key must be 16 bytes")
        unprotected: dict[int, Any] = {H_ALG: A128KW}
        if spec.kid is not None:
            unprotected[H_KID] = spec.kid
        return [b"", unprotected, aes_key_wrap(spec.key, cek)]
    protected = cbor.dumps({H_ALG: ECDH_ES_A128KW})
    # A fresh ephemeral key per recipient and message (RFC 9053 §6.3.1, ECDH-ES).
    scalar = int.from_bytes(random(48), "big") % (_P256_ORDER - 1) + 1
    ephemeral = ec.derive_private_key(scalar, ec.SECP256R1())
    kek = _ecdh_kek(ephemeral, spec.public, protected)
    unprotected = {H_EPHEMERAL_KEY: _cose_ec_key(ephemeral.public_key())}
    if spec.kid is not None:
        unprotected[H_KID] = spec.kid
    return [protected, unprotected, aes_key_wrap(kek, cek)]


def encrypt(
    plaintext: bytes,
    recipients: Sequence[RecipientSpec],
    random: Callable[[int], bytes],
    alg: int = A128CTR,
) -> tuple[bytes, bytes]:
    """Encrypt a payload for `recipients`: (encryption info bytes, ciphertext).

    A fresh CEK and IV each time, from `random` (the caller's CSPRNG, e.g. os.urandom:
    the core does no I/O); the CEK is wrapped once per recipient, so one ciphertext
    serves a device fleet or a class (firmware-encryption §3).
    """
    if alg not in CONTENT_ALGS:
        raise AlgorithmError(f"content encryption algorithm {describe(alg)} is not supported")
    if not 0 < len(recipients) <= MAX_RECIPIENTS:
        raise EncryptionError(f"encryption needs 1..{MAX_RECIPIENTS} recipients")
    cek = random(CEK_SIZE)
    wrapped = [_wrap_for(r, cek, random) for r in recipients]
    if alg == A128GCM:
        iv = random(GCM_IV_SIZE)
        protected = cbor.dumps({H_ALG: A128GCM})
        gcm = Cipher(algorithms.AES(cek), modes.GCM(iv)).encryptor()
        gcm.authenticate_additional_data(cbor2.dumps(["Encrypt", protected, b""]))
        ciphertext = gcm.update(plaintext) + gcm.finalize() + gcm.tag
        unprotected: dict[int, Any] = {H_IV: iv}
    else:
        iv = random(CTR_IV_SIZE)
        protected = b""
        ctr = Cipher(algorithms.AES(cek), modes.CTR(iv)).encryptor()
        ciphertext = ctr.update(plaintext) + ctr.finalize()
        unprotected = {H_ALG: A128CTR, H_IV: iv}
    info = cbor.dumps(cbor2.CBORTag(TAG_ENCRYPT, [protected, unprotected, None, wrapped]))
    return info, bytes(ciphertext)


# --- the device's payload kind (core.payload_kind) --------------------------------------


@dataclass(frozen=True)
class EncryptedPayload:
    """The fetched payload is ciphertext; the slot gets the plaintext (a `PayloadKind`).

    The CEK is unwrapped once, when the kind is chosen (before any payload byte). The
    manifest's image-digest and image-size are the plaintext's (firmware-encryption §7),
    so the image writer checks the decrypted bytes as for any image. A128CTR resumes at
    any checkpoint; A128GCM restarts from zero
    and never checkpoints (its GHASH state is not in flash). The CTR resume point is the
    durable offset itself (a sector checkpoint, or the whole image when it is complete).
    """

    info: EncryptionInfo
    cek: bytes = field(repr=False)

    @classmethod
    def for_fetch(cls, raw_info: bytes, keys: DecryptionKeys) -> EncryptedPayload:
        info = parse_encryption_info(raw_info)
        return cls(info, unwrap_cek(info, keys))

    @property
    def name(self) -> str:
        return "encrypted-" + ALG_NAMES[self.info.content_alg].lower()

    @property
    def checkpoints(self) -> bool:
        return self.info.streaming_resumable

    def resume_from(self, durable: int) -> int:
        return durable if self.info.streaming_resumable else 0

    def fetch_offset(self, slot_offset: int) -> int:
        return slot_offset

    def decoder(self, slot_offset: int) -> Decryptor:
        return Decryptor(self.info, self.cek, slot_offset)

    def payload_size(self, slot_size: int) -> int:
        return self.info.ciphertext_size(slot_size)


# --- finding the encrypted payloads of an envelope (CLI, tests, operator tools) --------


@dataclass(frozen=True)
class EncryptedParameters:
    """One parameter set that names an encryption info, where the manifest has it."""

    section: int  # the manifest member (sequence) key
    component: int  # the component index current when the parameters are set
    info: bytes
    content: bytes | None  # suit-parameter-content of the same set (write), if any
    source_component: int | None  # suit-parameter-source-component (copy), if any
    uri: str | None = None  # suit-parameter-uri of the same set (the fetched ciphertext)


def encrypted_parameters(envelope: suit.Envelope) -> list[EncryptedParameters]:
    """Every parameter set carrying suit-parameter-encryption-info, in sequence order.

    A static walk (no conditions evaluated, try-each alternatives all visited): it
    answers "what does this manifest decrypt, with what", for inspection and for
    decrypting a payload outside a device. A device runs the interpreter instead.
    """
    found: list[EncryptedParameters] = []
    manifest = envelope.manifest

    def walk(section: int, seq: suit.CommandSequence, current: list[int]) -> None:
        for cmd in seq.commands:
            if cmd.code == suit.CMD_SET_COMPONENT_INDEX:
                arg = cmd.arg
                current[:] = [arg] if isinstance(arg, int) and arg is not True else [0]
            elif cmd.code in (suit.CMD_OVERRIDE_PARAMETERS, suit.CMD_SET_PARAMETERS):
                params = dict(cmd.arg.items)
                info = params.get(suit.P_ENCRYPTION_INFO)
                if isinstance(info, bytes):
                    found.append(
                        EncryptedParameters(
                            section,
                            current[0] if current else 0,
                            info,
                            params.get(suit.P_CONTENT),
                            params.get(suit.P_SOURCE_COMPONENT),
                            params.get(suit.P_URI),
                        )
                    )
            elif cmd.code == suit.CMD_TRY_EACH:
                for alt in cmd.arg:
                    if alt is not None:
                        walk(section, alt, list(current))
            elif cmd.code == suit.CMD_RUN_SEQUENCE:
                walk(section, cmd.arg, list(current))

    shared = manifest.common.shared_sequence
    if shared is not None:
        walk(suit.M_COMMON, shared, [0])
    for key in sorted(suit.SEQUENCE_KEYS):
        seq = manifest.sequence(key)
        if seq is None and manifest.severed_digest(key) is not None:
            member = suit.severed_member(envelope, key)
            seq = member if isinstance(member, suit.CommandSequence) else None
        if seq is not None:
            walk(key, seq, [0])
    return found
