"""The server secret and what it protects: PSKs sealed at rest, decoy keys, the audit
log's chain and checkpoints.

PSKs are never stored in plain text (ATTACKS.md #30, a stolen DB must not hand out
device keys): each is sealed with AES-256-GCM under a key derived from the server key
file, with the DTLS identity as associated data so a sealed PSK cannot be moved to
another row. The same secret derives decoy keys for unknown identities, so a
handshake with an unknown identity fails exactly like one with a wrong key (RFC 4279
§2: a server MAY hide whether an identity exists).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import NotInitialised, StoreError

SECRET_LENGTH = 32
NONCE_LENGTH = 12  # NIST SP 800-38D: 96-bit nonces; random nonces are fine at our volume


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


class AuditKeys:
    """The audit log's keys (store/audit.py, store/checkpoint.py), derived from the
    server secret like the PSK sealing key (HKDF, RFC 5869, one `info` per use), so
    they live nowhere but in server.key: never in the database they protect."""

    def __init__(self, secret: bytes) -> None:
        self.chain = _derive(secret, b"otacoap audit chain v2")
        self.checkpoint = _derive(secret, b"otacoap audit checkpoint v1")


class PskSealer:
    """Seal, open and fabricate PSKs with keys derived from the server secret; it also
    carries the audit keys derived from the same secret (`audit_keys`)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != SECRET_LENGTH:
            raise StoreError("server key must be 32 bytes")
        self._aead = AESGCM(_derive(secret, b"otacoap psk seal v1"))
        self._decoy_key = _derive(secret, b"otacoap psk decoy v1")
        self.audit_keys = AuditKeys(secret)

    def seal(self, identity: str, psk: bytes) -> bytes:
        nonce = os.urandom(NONCE_LENGTH)
        return nonce + self._aead.encrypt(nonce, psk, identity.encode())

    def open(self, identity: str, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(
                sealed[:NONCE_LENGTH], sealed[NONCE_LENGTH:], identity.encode()
            )
        except (InvalidTag, ValueError):
            raise StoreError(
                f"sealed PSK of {identity!r} does not open (wrong server.key or tampered row)"
            ) from None

    def decoy(self, identity: bytes, length: int) -> bytes:
        """A stable, unguessable key for an identity that is not registered."""
        return hmac.new(self._decoy_key, identity, hashlib.sha256).digest()[:length]


def create_secret(path: Path) -> None:
    """Write a fresh 32-byte secret with mode 0600, refusing to replace one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(SECRET_LENGTH))
        os.fsync(fd)
    finally:
        os.close(fd)


def load_secret(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotInitialised(f"{path} is missing (run 'otacoap init')") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StoreError(f"{path} is accessible by group or others; chmod 600 it")
    data = path.read_bytes()
    if len(data) != SECRET_LENGTH:
        raise StoreError(f"{path} is not a 32-byte server key")
    return data
