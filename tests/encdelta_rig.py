"""Helpers for the encrypted-delta tests: a device holding a class KEK (optionally sealed,
so its slots are encrypted at rest) whose factory image is the delta's source, and the
signed envelopes of an encrypted release (full, delta with fallback, delta only)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from delta_rig import make_delta_rig
from evil_server import CLASS, VENDOR, Rig

from device_sim.inprocess import InProcessServer
from otacoap import patching
from otacoap.core import cose, delta, encryption, ids, suit
from otacoap.core.build import EncryptedPatch, Release, build_envelope

KEK = bytes(range(32, 48))
RECIPIENT = encryption.KekRecipient(KEK, b"class-kek")


def make_encdelta_rig(
    tmp: Path,
    factory: bytes,
    *,
    seq: int = 5,
    slot_size: int = 64 * 1024,
    sector_size: int = 4096,
    key: cose.SigningKey | None = None,
    keks: tuple[bytes, ...] = (KEK,),
    seal: bool = True,
) -> Rig:
    """A device running `factory` (seq `seq`) that holds `keks`; sealed by default."""
    return make_delta_rig(
        tmp,
        factory,
        seq=seq,
        slot_size=slot_size,
        sector_size=sector_size,
        key=key,
        keks=keks,
        seal=seal,
    )


@dataclass(frozen=True)
class EncryptedDeltaRelease:
    image: bytes  # the plaintext the device must end up running
    image_ct: bytes  # the release's ciphertext (the fallback)
    patch: bytes  # the plaintext patch (never served)
    patch_ct: bytes  # the patch's ciphertext (served)
    info: delta.DeltaInfo
    envelope: bytes  # encrypted delta with the encrypted full image as fallback
    delta_only: bytes  # encrypted delta, no fallback
    full: bytes  # the encrypted release's full envelope

    @property
    def image_path(self) -> str:
        return ids.image_uri(hashlib.sha256(self.image_ct).digest())

    @property
    def patch_path(self) -> str:
        return ids.image_uri(hashlib.sha256(self.patch_ct).digest())

    def serve(self, server: InProcessServer, patch_ct: bytes | None = None) -> None:
        server.add_image(self.image_path, self.image_ct)
        server.add_image(self.patch_path, self.patch_ct if patch_ct is None else patch_ct)


def encrypted_delta_release(
    key: cose.SigningKey,
    source: bytes,
    target: bytes,
    seq: int,
    *,
    alg: int = encryption.A128CTR,
    recipient: encryption.RecipientSpec = RECIPIENT,
    claimed_source: bytes | None = None,
) -> EncryptedDeltaRelease:
    """Signed envelopes for `target` by encrypted delta from `source` (or `claimed_source`).

    The image and the patch each get their own CEK and IV (two `encryption.encrypt`
    calls), as `otacoap manifest build` does."""
    patch = patching.create_patch(source, target)
    src = claimed_source if claimed_source is not None else source
    info = delta.DeltaInfo(suit.SuitDigest.of(src), len(src), suit.SuitDigest.of(patch), len(patch))
    image_info, image_ct = encryption.encrypt(target, [recipient], os.urandom, alg)
    patch_info, patch_ct = encryption.encrypt(patch, [recipient], os.urandom, alg)
    release = Release(
        hashlib.sha256(target).digest(),
        len(target),
        VENDOR,
        CLASS,
        seq,
        uri=ids.image_uri(hashlib.sha256(image_ct).digest()),
        encryption_info=image_info,
    )
    enc = EncryptedPatch(patch_info, ids.image_uri(hashlib.sha256(patch_ct).digest()))

    def signed(env: suit.Envelope) -> bytes:
        return suit.encode_envelope(env)

    return EncryptedDeltaRelease(
        target,
        image_ct,
        patch,
        patch_ct,
        info,
        signed(build_envelope(release, key, patch=info, encrypted_patch=enc)),
        signed(build_envelope(release, key, patch=info, fallback=False, encrypted_patch=enc)),
        signed(build_envelope(release, key)),
    )
