"""Setup of a fleet run: the author's key, the release (generated or given) and the
factory image every device starts from; the devices' identities and the publish go
through the operator role.

The factory image gets sequence number seq - 1 and other bytes than the release, so a
device still on it can never pass the verification.
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
from otacoap.core import build, cose, encryption, ids, suit, trust
from otacoap.core.errors import OtaError

from .operator_role import (
    check_server_running,
    publish_over_network,
    read_devices_file,
    register_and_publish,
)
from .options import MAX_IMAGE_SIZE, PSK_LENGTH, FleetError, FleetOptions, read_input
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


def _load_key(path: Path) -> Any:
    try:
        return cose.load_private_key(read_input(path, 64 * 1024, "--key"))
    except OtaError as exc:
        raise FleetError(f"--key {path}: {exc}") from None


def image_bytes(label: str, size: int) -> bytes:
    """Deterministic, incompressible firmware bytes for `label`."""
    return random.Random(label).randbytes(size)


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
        seq = vm.sequence_number
        if seq < 1:
            raise FleetError("--release has sequence number 0; the factory needs one below it")
        image_path = img_path
    else:
        image = image_bytes(f"otacoap-fleet:{token}:release", opts.image_size)
        digest = hashlib.sha256(image).digest()
        release = build.Release(digest, len(image), vendor, class_info, seq)
        payload, image_path = image, work / "release.bin"
        if opts.encrypt:
            # The server gets the ciphertext (its URI names it); devices the class key.
            kek = os.urandom(16)
            keks = (kek,)
            info, payload = encryption.encrypt(
                image, [encryption.KekRecipient(kek)], os.urandom, encryption.A128CTR
            )
            uri = ids.image_uri(hashlib.sha256(payload).digest())
            release = build.Release(
                digest, len(image), vendor, class_info, seq, uri, encryption_info=info
            )
            image_path = work / "release.enc"
        envelope = suit.encode_envelope(build.build_envelope(release, key))
        image_path.write_bytes(payload)
    image_size = len(image)

    factory_image = image_bytes(f"otacoap-fleet:{token}:factory", image_size)
    factory = build.Release(
        hashlib.sha256(factory_image).digest(), image_size, vendor, class_info, seq - 1
    )
    factory_envelope = suit.encode_envelope(build.build_envelope(factory, key))

    server_facts: dict[str, Any]
    if opts.data is not None:
        # Nothing is registered for a server that is not there to serve it.
        check_server_running(opts.data)
        devices = tuple((f"fl{token}-{i:05d}", os.urandom(PSK_LENGTH)) for i in range(opts.devices))
        progress.phase(f"registering {len(devices)} devices of class {vendor}/{class_info}")
        served_first: tuple[bytes, Path] | None = None
        if opts.campaign is not None:
            # Devices outside the open waves are served the class's current release:
            # the factory one, which they already run.
            factory_path = work / "factory.bin"
            factory_path.write_bytes(factory_image)
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
        )
    else:
        assert opts.devices_file is not None
        devices = read_devices_file(opts.devices_file, opts.devices)
        progress.phase(f"publishing seq {seq} as operator {opts.operator}")
        publish_over_network(opts, envelope, image_path)
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
    )
    return prepared, server_facts
