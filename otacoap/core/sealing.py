"""Sealing device secrets under a device-unique hardware key (HUK), sans-I/O.

A real device keeps its DTLS PSK and payload decryption keys encrypted in flash under a
key that never leaves the chip (an eFuse or PUF-derived hardware unique key, as TF-M's
HUK-derived keys or ESP32 flash encryption do). So a dump of the flash, or a copy of it
on another device, does not yield or clone the identity: the other chip's HUK cannot
unseal it.

Scheme: AES-128-GCM under HKDF-SHA-256(HUK, info = "otacoap identity seal v1"), with
the device id as associated data (a sealed blob moved to another identity record fails).
The nonce is synthetic (HMAC-SHA-256 of the plaintext under a second derived key, cut to
96 bits, as in SIV): sealing the same secrets twice gives the same blob and no nonce is
ever reused for different plaintexts, without a random source in the core.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import AuthenticationError

HUK_SIZE = 32
_NONCE = 12


class UnsealError(AuthenticationError):
    """The sealed secrets do not open with this device's hardware key."""


def _keys(huk: bytes) -> tuple[bytes, bytes]:
    if len(huk) != HUK_SIZE:
        raise ValueError(f"a hardware unique key is {HUK_SIZE} bytes")
    okm = HKDF(hashes.SHA256(), 48, None, b"otacoap identity seal v1").derive(huk)
    return okm[:16], okm[16:]


def seal(huk: bytes, plaintext: bytes, context: bytes) -> bytes:
    enc_key, nonce_key = _keys(huk)
    nonce = hmac.new(nonce_key, context + b"\x00" + plaintext, hashlib.sha256).digest()[:_NONCE]
    return nonce + AESGCM(enc_key).encrypt(nonce, plaintext, context)


def unseal(huk: bytes, blob: bytes, context: bytes) -> bytes:
    enc_key, _ = _keys(huk)
    if len(blob) < _NONCE + 16:
        raise UnsealError("sealed secrets are truncated")
    try:
        return AESGCM(enc_key).decrypt(blob[:_NONCE], blob[_NONCE:], context)
    except InvalidTag:
        raise UnsealError(
            "sealed secrets do not open with this device's hardware key "
            "(a flash image from another device?)"
        ) from None


class SlotCipher:
    """At-rest encryption of one image in one slot under the chip's hardware key.

    AES-128-CTR under HKDF-SHA-256(HUK, "otacoap slot v1"); the initial counter block is
    SHA-256("otacoap slot iv" | slot | image digest) cut to 128 bits, and the counter of
    slot byte ``p`` is that block plus ``p // 16``. So the keystream depends on the slot
    and on which image is there: two different images never share keystream in the same
    slot (unlike address-only schemes), the same image re-staged writes the same bytes,
    and any byte can be read or written on its own (random access, as XIP flash
    decryption needs). Integrity is not its job: the manifest's digest is checked over
    the decrypted bytes, so a wrong key or a changed byte fails secure boot.
    """

    def __init__(self, huk: bytes, slot: int, image_digest: bytes) -> None:
        okm = HKDF(hashes.SHA256(), 16, None, b"otacoap slot v1").derive(huk)
        self._key = okm
        iv = hashlib.sha256(b"otacoap slot iv" + bytes([slot]) + image_digest).digest()[:16]
        self._iv = int.from_bytes(iv, "big")

    def apply(self, position: int, data: bytes | bytearray | memoryview) -> bytes:
        """XOR `data` at slot offset `position` with the keystream (encrypt = decrypt)."""
        counter = (self._iv + position // 16) % (1 << 128)
        ctx = Cipher(algorithms.AES(self._key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
        skip = position % 16
        if skip:
            ctx.update(bytes(skip))
        return bytes(ctx.update(bytes(data)))
