"""Helpers for the delta tests: a device whose factory image is a delta's source, and the
signed delta envelopes (full-image fallback or not) a release carries."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from conftest import SHARED
from evil_server import CLASS, DEVICE_ID, PSK, VENDOR, Rig, manifest_bytes, sign

from device_sim.agent import DeviceAgent, Outcome
from device_sim.inprocess import InProcessServer, InProcessTransport
from device_sim.provision import provision
from otacoap import patching
from otacoap.core import cose, delta, ids, suit
from otacoap.core.build import Release, build_envelope
from otacoap.core.report import State

DELTA_DIR = SHARED / "delta"
PAIRS = {
    "programmer": ("programmer-0.8.0.bin", "programmer-0.9.0.bin"),
    "pybv11": (
        "micropython-pybv11-1f5d945af-firmware1.bin",
        "micropython-pybv11-v1.10-firmware1.bin",
    ),
    "esp8266": ("micropython-esp8266-v1.9.4.bin", "micropython-esp8266-v1.10.bin"),
}


def pair(name: str) -> tuple[bytes, bytes]:
    old, new = PAIRS[name]
    return (DELTA_DIR / old).read_bytes(), (DELTA_DIR / new).read_bytes()


def synthetic_pair(size: int = 6000) -> tuple[bytes, bytes]:
    """A small old/new pair that looks like a firmware change: edits, an insertion."""
    old = bytearray()
    counter = 0
    while len(old) < size:
        old += hashlib.sha256(counter.to_bytes(4, "big")).digest()[:8] * 4
        counter += 1
    old = old[:size]
    new = bytearray(old)
    new[100:140] = b"version 2 of the application code!!!!!!"
    new[size // 2 : size // 2] = b"an inserted function body" * 8
    new[-300:-200] = bytes(range(100))
    return bytes(old), bytes(new)


def make_delta_rig(
    tmp: Path,
    factory: bytes,
    *,
    seq: int = 5,
    slot_size: int = 64 * 1024,
    sector_size: int = 4096,
    key: cose.SigningKey | None = None,
    keks: tuple[bytes, ...] = (),
    seal: bool = False,
) -> Rig:
    """`keks`: the class KEKs the device holds (encrypted releases);
    `seal`: a chip with a hardware key, so both slots are encrypted at rest."""
    key = key or cose.generate_key("es256")
    env = sign(manifest_bytes(image=factory, seq=seq), key)
    path = tmp / "flash.bin"
    provision(
        path,
        device_id=DEVICE_ID,
        psk=PSK,
        vendor_domain=VENDOR,
        class_info=CLASS,
        anchors_pem=(key.public.public_pem(),),
        factory_image=factory,
        factory_envelope=env,
        slot_size=slot_size,
        sector_size=sector_size,
        max_trial_boots=3,
        force=True,
        decryption_keks=keks,
        seal=seal,
    )
    rig = Rig(path, key, factory, env, slot_size=slot_size)
    rig.accept(factory)
    return rig


@dataclass(frozen=True)
class DeltaRelease:
    image: bytes
    patch: bytes
    info: delta.DeltaInfo
    envelope: bytes  # delta with full-image fallback
    delta_only: bytes  # delta without fallback
    full: bytes  # the plain full-image envelope

    @property
    def image_path(self) -> str:
        return ids.image_uri(hashlib.sha256(self.image).digest())

    @property
    def patch_path(self) -> str:
        return ids.image_uri(self.info.patch_digest.value)

    def serve(self, server: InProcessServer, patch: bytes | None = None) -> None:
        server.add_image(self.image_path, self.image)
        server.add_image(self.patch_path, self.patch if patch is None else patch)


def delta_release(
    key: cose.SigningKey,
    source: bytes,
    target: bytes,
    seq: int,
    *,
    patch: bytes | None = None,
    claimed_source: bytes | None = None,
) -> DeltaRelease:
    """Signed envelopes for `target` by delta from `source` (or from `claimed_source`)."""
    patch = patch if patch is not None else patching.create_patch(source, target)
    src = claimed_source if claimed_source is not None else source
    info = delta.DeltaInfo(suit.SuitDigest.of(src), len(src), suit.SuitDigest.of(patch), len(patch))
    release = Release(hashlib.sha256(target).digest(), len(target), VENDOR, CLASS, seq)

    def signed(env: suit.Envelope) -> bytes:
        return suit.encode_envelope(env)

    return DeltaRelease(
        target,
        patch,
        info,
        signed(build_envelope(release, key, patch=info)),
        signed(build_envelope(release, key, patch=info, fallback=False)),
        signed(build_envelope(release, key)),
    )


class Served:
    """Counts the requests an in-process server gets, by path; `hook(path, block2)`, when
    set, is called on each (a test that looks at the flash mid-transfer)."""

    def __init__(self, server: InProcessServer) -> None:
        self.paths: dict[str, int] = {}
        self.hook: object = None
        server.on_request = self.count

    def count(self, path: str, block2: tuple[int, int, int] | None) -> None:
        self.paths[path] = self.paths.get(path, 0) + 1
        if callable(self.hook):
            self.hook(path, block2)


async def update(rig: Rig, server: InProcessServer) -> Outcome:
    """One `run_once` of the device on `rig`'s flash against the in-process `server`."""
    device = DeviceAgent(rig.path, "coaps://in-process", transport=InProcessTransport(server))
    try:
        result = await device.run_once()
    finally:
        await device.close()
    return result.outcome


def details(server: InProcessServer, state: State) -> list[str]:
    """The details of the reports `server` received in `state`."""
    return [r.detail for r in server.reports if r.state == state]


class ServableRelease(Protocol):
    """A release the in-process server can serve (a `DeltaRelease`, an
    `encdelta_rig.EncryptedDeltaRelease`)."""

    @property
    def envelope(self) -> bytes: ...

    def serve(self, server: InProcessServer) -> None: ...


async def install_peak(rig: Rig, release: ServableRelease) -> tuple[int, InProcessServer]:
    """The traced memory peak of one `run_once` that installs `release` on `rig` (it must
    update), and the in-process server that served it (its reports)."""
    from memory_probe import _measure

    server = InProcessServer(envelope=release.envelope)
    release.serve(server)
    device = DeviceAgent(rig.path, "coaps://in-process", transport=InProcessTransport(server))

    async def nothing() -> None:
        return None

    try:
        measured, result, _ = await _measure(device, nothing)
    finally:
        await device.close()
    assert result.outcome == Outcome.UPDATED
    return measured, server
