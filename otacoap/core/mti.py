"""The SUIT MTI algorithm profiles (draft-ietf-suit-mti §5, IANA "COSE SUIT Algorithm
Profiles"; DIGEST.md §2): which digest, authentication, key exchange and content
encryption a manifest author uses together.

`manifest build --profile NAME` takes its algorithms from here, so an envelope built for
a profile uses exactly that profile's COSE algorithm ids (the fully-specified ESP256 -9
and Ed25519 -19 of RFC 9864 for signatures, ECDH-ES+A128KW -29 or A128KW -3 for the key,
A128CTR -65534 or A128GCM 1 for the payload). Profiles whose primitives otacoap lacks
(ChaCha20/Poly1305, HSS-LMS with A256KW/A256CTR) are named so a request for them is
refused by name rather than mistaken for an unknown string.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import cose, encryption, suit
from .errors import AlgorithmError


@dataclass(frozen=True)
class Profile:
    name: str
    digest: int
    auth: int  # COSE alg of the authentication block
    key_exchange: int  # COSE alg of the recipient
    content: int  # COSE alg of the payload encryption

    @property
    def signing_kind(self) -> str:
        """The key kind the author signs (or MACs) with: p256, ed25519 or hmac."""
        if self.auth in (cose.ES256, cose.ESP256):
            return "p256"
        if self.auth in (cose.EDDSA, cose.ED25519):
            return "ed25519"
        return "hmac"


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "suit-sha256-hmac-a128kw-a128ctr",
            suit.DIGEST_SHA256,
            cose.HMAC_256_256,
            encryption.A128KW,
            encryption.A128CTR,
        ),
        Profile(
            "suit-sha256-esp256-ecdh-a128ctr",
            suit.DIGEST_SHA256,
            cose.ESP256,
            encryption.ECDH_ES_A128KW,
            encryption.A128CTR,
        ),
        Profile(
            "suit-sha256-ed25519-ecdh-a128ctr",
            suit.DIGEST_SHA256,
            cose.ED25519,
            encryption.ECDH_ES_A128KW,
            encryption.A128CTR,
        ),
        Profile(
            "suit-sha256-esp256-ecdh-a128gcm",
            suit.DIGEST_SHA256,
            cose.ESP256,
            encryption.ECDH_ES_A128KW,
            encryption.A128GCM,
        ),
    )
}

UNSUPPORTED = {
    "suit-sha256-ed25519-ecdh-chacha-poly": "ChaCha20/Poly1305 payload encryption",
    "suit-sha256-hsslms-a256kw-a256ctr": "HSS-LMS signatures and A256KW/A256CTR",
}


def profile(name: str) -> Profile:
    found = PROFILES.get(name)
    if found is not None:
        return found
    if name in UNSUPPORTED:
        raise AlgorithmError(f"profile {name} needs {UNSUPPORTED[name]}, which otacoap lacks")
    raise AlgorithmError(f"unknown SUIT MTI profile {name!r} (one of: {', '.join(PROFILES)})")
