"""Setup of a fleet run: the author's key, the release (generated or given) and the
factory image every device starts from; the devices' identities and the publish go
through the operator role.

The factory image gets sequence number seq - 1 and other bytes than the release, so a
device still on it can never pass the verification.

With --delta the factory image is the OLD release (seq - 1), published first so the
server knows the image behind that sequence number; the release's image is the old one
slightly changed (`evolve`) and a delta envelope of it (patch from the old image, full
image as fallback) is published after it. Devices picked by --delta-mismatch-fraction
run a variant of the old image instead (signed, seq - 1), as if locally patched: the
server serves them the delta too, their source check fails, they take the full image.

With --encrypt every image the fleet publishes is encrypted under the one class key
(the old release too, so the server never holds a plaintext image), and with --delta
the patch as well, under its own CEK and IV: an encrypted delta whose fallback is the
encrypted release's own fetch (docs/decisions/delta-updates.md, "Encrypted deltas").
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otacoap.cliargs import maybe_hex
from otacoap.core import build, cose, delta, encryption, ids, suit, trust
from otacoap.core.errors import OtaError

from .operator_role import (
    check_server_running,
    make_patch,
    publish_over_network,
    read_devices_file,
    register_and_publish,
)
from .options import (
    MAX_IMAGE_SIZE,
    PSK_LENGTH,
    FleetError,
    FleetOptions,
    check_payload_modes,
    read_input,
)
from .progress import Progress


@dataclass(frozen=True)
class Prepared:
    """What the setup phase made: the class, the devices, the release, the factory."""

    vendor_domain: str
    class_info: str
    devices: tuple[tuple[str, bytes], ...]
    seq: int
    image_digest: bytes
    image_size: int
    image_id: str
    envelope: bytes
    image_path: Path
    factory_image: bytes
    factory_envelope: bytes
    anchors_pem: tuple[bytes, ...]
    decryption_keks: tuple[bytes, ...] = ()  # --encrypt: the class key devices get
    delta: DeltaSetup | None = None  # --delta


@dataclass(frozen=True)
class DeltaSetup:
    """--delta: the patch, and the variant image mismatching devices run instead."""

    envelope: bytes  # the delta envelope (patch first, the full image as fallback)
    patch_uri: str  # /fw/<patch id>
    patch_size: int
    image_uri: str  # /fw/<image id>: the fallback (and every full download)
    variant_image: bytes  # what --delta-mismatch-fraction devices run at seq - 1
    variant_envelope: bytes
    old_image_sha256: str


def _load_key(path: Path) -> Any:
    try:
        return cose.load_private_key(read_input(path, 64 * 1024, "--key"))
    except OtaError as exc:
        raise FleetError(f"--key {path}: {exc}") from None


def image_bytes(label: str, size: int) -> bytes:
    """Deterministic, incompressible firmware bytes for `label`."""
    return random.Random(label).randbytes(size)


EVOLVE_REGIONS = 4  # places rewritten by `evolve`
EVOLVE_INSERT = 256  # bytes inserted by `evolve` (as many dropped at the end)


def evolve(image: bytes, label: str) -> bytes:
    """The next version of `image`, deterministic from `label`: about 1 % of its bytes
    rewritten in EVOLVE_REGIONS places and EVOLVE_INSERT new bytes in the middle (the
    same number dropped from the end, so the size stays). What a small fix looks like
    to bsdiff: mostly copied, a shifted tail, a little new."""
    rng = random.Random(label)
    n = len(image)
    out = bytearray(image)
    size = max(1, n // (100 * EVOLVE_REGIONS))
    for _ in range(EVOLVE_REGIONS):
        at = rng.randrange(0, max(1, n - size))
        out[at : at + size] = rng.randbytes(min(size, n - at))
    insert = min(EVOLVE_INSERT, n // 4)
    if insert:
        mid = n // 2
        out[mid:mid] = rng.randbytes(insert)
        del out[n:]
    if bytes(out) == image:  # a one-byte image: still another version
        out[0] ^= 0xFF
    return bytes(out)


def encrypt_payload(plaintext: bytes, kek: bytes) -> tuple[bytes, bytes]:
    """(encryption info, ciphertext) of one payload: A128CTR under a fresh CEK and IV,
    the CEK wrapped under the class key (A128KW); every payload gets its own."""
    return encryption.encrypt(
        plaintext, [encryption.KekRecipient(kek)], os.urandom, encryption.A128CTR
    )


def prepare(
    opts: FleetOptions, work: Path, progress: Progress, registered: list[str] | None = None
) -> tuple[Prepared, dict[str, Any]]:
    """Register the devices, build the factory and the release, publish the release.

    Returns what the workers need plus the server facts the report records; each
    device id is appended to `registered` as soon as the store has it (--cleanup).
    """
    key = _load_key(opts.key_path)
    keks: tuple[bytes, ...] = ()
    anchor_pem = key.public.public_pem()
    token = secrets.token_hex(4)
    vendor = opts.vendor_domain
    class_info = opts.class_info or f"fleet-{token}"
    seq = opts.seq

    old_image = b""  # --delta: what the devices run before the update
    encrypted_release: build.Release | None = None  # --encrypt: the generated release
    delta_uri: str | None = None  # a given release's image URI (the delta's fallback)
    given_old = b""
    if opts.delta and opts.old_image is not None:
        given_old = read_input(opts.old_image, MAX_IMAGE_SIZE, "--old-image")
        if not given_old:
            raise FleetError(f"--old-image {opts.old_image}: the image is empty")
    if opts.release is not None:
        env_path, img_path = opts.release
        envelope = maybe_hex(read_input(env_path, 64 * 1024, "--release envelope"))
        try:
            vm = trust.accept(envelope, trust.TrustPolicy(anchors=(key.public,)))
        except OtaError as exc:
            raise FleetError(
                f"--release {env_path}: not signed by --key or invalid: {exc}"
            ) from None
        vendor_id = ids.vendor_id(vendor)
        if vm.vendor_ids != (vendor_id,) or vm.class_ids != (ids.class_id(vendor_id, class_info),):
            raise FleetError(
                "--release names another vendor/class than --vendor-domain/--class-info"
            )
        images = vm.payload_images()
        if len(images) != 1 or images[0].digest is None or images[0].size is None:
            raise FleetError("--release must fetch exactly one image with digest and size")
        image = read_input(img_path, MAX_IMAGE_SIZE, "--release image")
        digest = hashlib.sha256(image).digest()
        if digest != images[0].digest.value or len(image) != images[0].size:
            raise FleetError("--release image is not the image the envelope describes")
        delta_uri = images[0].uri
        seq = vm.sequence_number
        if seq < 1:
            raise FleetError("--release has sequence number 0; the factory needs one below it")
        image_path = img_path
        encrypted = images[0].encryption_info is not None
        check_payload_modes(opts.delta, opts.encrypt, given_encrypted=encrypted)
        old_image = given_old or evolve(image, f"otacoap-fleet:{token}:old")
    else:
        if opts.delta:
            old_image = given_old or image_bytes(f"otacoap-fleet:{token}:old", opts.image_size)
            image = evolve(old_image, f"otacoap-fleet:{token}:release")
        else:
            image = image_bytes(f"otacoap-fleet:{token}:release", opts.image_size)
        digest = hashlib.sha256(image).digest()
        release = build.Release(digest, len(image), vendor, class_info, seq)
        payload, image_path = image, work / "release.bin"
        if opts.encrypt:
            # The server gets the ciphertext (its URI names it); devices the class key.
            kek = os.urandom(16)
            keks = (kek,)
            info, payload = encrypt_payload(image, kek)
            uri = ids.image_uri(hashlib.sha256(payload).digest())
            release = encrypted_release = build.Release(
                digest, len(image), vendor, class_info, seq, uri, encryption_info=info
            )
            image_path = work / "release.enc"
        envelope = suit.encode_envelope(build.build_envelope(release, key))
        image_path.write_bytes(payload)
    image_size = len(image)

    def signed(firmware: bytes, number: int) -> bytes:
        r = build.Release(
            hashlib.sha256(firmware).digest(), len(firmware), vendor, class_info, number
        )
        return suit.encode_envelope(build.build_envelope(r, key))

    def published(firmware: bytes, number: int) -> tuple[bytes, bytes]:
        """A release the fleet publishes: (envelope, the bytes the server stores),
        encrypted under the class key with --encrypt."""
        if not keks:
            return signed(firmware, number), firmware
        info, wire = encrypt_payload(firmware, keks[0])
        r = build.Release(
            hashlib.sha256(firmware).digest(),
            len(firmware),
            vendor,
            class_info,
            number,
            ids.image_uri(hashlib.sha256(wire).digest()),
            encryption_info=info,
        )
        return suit.encode_envelope(build.build_envelope(r, key)), wire

    delta_setup: DeltaSetup | None = None
    if opts.delta:
        if old_image == image:
            raise FleetError("--old-image is the release's image itself: nothing to update")
        factory_image = old_image
        variant = evolve(old_image, f"otacoap-fleet:{token}:variant")
        patch = make_patch(old_image, image)
        patch_info = delta.DeltaInfo(
            suit.SuitDigest.of(old_image), len(old_image), suit.SuitDigest.of(patch), len(patch)
        )
        encrypted_patch: build.EncryptedPatch | None = None
        patch_wire = patch
        if encrypted_release is not None:
            # An encrypted delta: the patch under its own CEK and IV, the fallback the
            # release's own (encrypted) fetch; digests stay the plaintext's.
            patch_enc, patch_wire = encrypt_payload(patch, keks[0])
            patch_uri = ids.image_uri(hashlib.sha256(patch_wire).digest())
            encrypted_patch = build.EncryptedPatch(patch_enc, patch_uri)
            of = encrypted_release
        else:
            patch_uri = ids.image_uri(patch_info.patch_digest.value)
            of = build.Release(digest, image_size, vendor, class_info, seq, delta_uri)
        delta_envelope = build.build_envelope(
            of, key, patch=patch_info, encrypted_patch=encrypted_patch
        )
        delta_setup = DeltaSetup(
            suit.encode_envelope(delta_envelope),
            patch_uri,
            len(patch_wire),
            of.uri or ids.image_uri(digest),
            variant,
            signed(variant, seq - 1),
            hashlib.sha256(old_image).hexdigest(),
        )
        patch_path = work / "release.patch"
        patch_path.write_bytes(patch_wire)
    else:
        factory_image = image_bytes(f"otacoap-fleet:{token}:factory", image_size)
    factory_envelope, factory_wire = published(factory_image, seq - 1)

    server_facts: dict[str, Any]
    if opts.data is not None:
        # Nothing is registered for a server that is not there to serve it.
        check_server_running(opts.data)
        devices = tuple((f"fl{token}-{i:05d}", os.urandom(PSK_LENGTH)) for i in range(opts.devices))
        progress.phase(f"registering {len(devices)} devices of class {vendor}/{class_info}")
        served_first: tuple[bytes, Path] | None = None
        if delta_setup is not None:
            # The old release: the server maps a device's reported seq to its image.
            old_path = work / "old.bin"
            old_path.write_bytes(factory_wire)
            served_first = (factory_envelope, old_path)
        elif opts.campaign is not None:
            # Devices outside the open waves are served the class's current release:
            # the factory one, which they already run.
            factory_path = work / "factory.bin"
            factory_path.write_bytes(factory_wire)
            served_first = (factory_envelope, factory_path)
        server_facts = register_and_publish(
            opts,
            devices,
            vendor,
            class_info,
            envelope,
            image_path,
            key,
            rollout="none" if opts.campaign is not None else "all",
            factory=served_first,
            registered=registered,
            delta=(delta_setup.envelope, patch_path) if delta_setup is not None else None,
            source_seq=seq - 1,
        )
    else:
        assert opts.devices_file is not None
        devices = read_devices_file(opts.devices_file, opts.devices)
        progress.phase(f"publishing seq {seq} as operator {opts.operator}")
        items = [(envelope, image_path)]
        if delta_setup is not None:
            old_path = work / "old.bin"
            old_path.write_bytes(factory_wire)
            items = [(factory_envelope, old_path), *items, (delta_setup.envelope, patch_path)]
        publish_over_network(opts, items)
        server_facts = {
            "store": "not available: network mode (--operator) has no access to the "
            "server's store; success is judged from each device's flash and its "
            "acknowledged reports"
        }
    prepared = Prepared(
        vendor,
        class_info,
        devices,
        seq,
        digest,
        image_size,
        ids.image_id(digest),
        envelope,
        image_path,
        factory_image,
        factory_envelope,
        (anchor_pem,),
        keks,
        delta_setup,
    )
    return prepared, server_facts
