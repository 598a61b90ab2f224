"""Decrypting while streaming keeps the device's memory bounded (issue 13 §1): one
encrypted update (A128CTR payload, sealed device whose slots are encrypted at rest)
peaks under the same bound as a plain one (tests/test_device_memory.py) and does not
grow with the image. The server side serves a generated ciphertext, never held whole.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from evil_server import make_rig, manifest_bytes, sign
from memory_probe import LoopClock, VirtualTimeLoop, _measure
from test_device_memory import BOUND

from device_sim.agent import AgentConfig, DeviceAgent, Outcome
from device_sim.inprocess import GeneratedImage, InProcessServer, InProcessTransport
from otacoap.core import encryption

KEK = bytes(range(40, 56))


class EncryptedSource:
    """The A128CTR ciphertext of a generated image, block by block (random access)."""

    def __init__(self, plain: GeneratedImage, info: encryption.EncryptionInfo, cek: bytes):
        self._plain, self._info, self._cek = plain, info, cek

    @property
    def size(self) -> int:
        return self._plain.size

    def read(self, offset: int, length: int) -> bytes:
        # CTR: encryption and decryption are the same keystream XOR.
        return encryption.Decryptor(self._info, self._cek, offset).feed(
            self._plain.read(offset, length)
        )


def _encrypted_peak(tmp: Path, size: int) -> int:
    rig = make_rig(tmp, slot_size=size + 4096, decryption_keks=(KEK,), seal=True)
    image = GeneratedImage(size, seed=size)
    raw_info, _ = encryption.encrypt(b"", [encryption.KekRecipient(KEK)], os.urandom)
    info = encryption.parse_encryption_info(raw_info)
    cek = encryption.unwrap_cek(info, encryption.DecryptionKeys(keks=((None, KEK),)))
    uri = "/fw/" + "e" * 16  # any URI: the manifest names it
    manifest = manifest_bytes(
        digest=image.digest, size=size, seq=6, uri=uri, encryption_info=raw_info
    )
    server = InProcessServer(envelope=sign(manifest, rig.key))
    server.add_image(uri, EncryptedSource(image, info, cek))
    device = DeviceAgent(
        rig.path,
        "coaps://in-process",
        config=AgentConfig(),
        clock=LoopClock(),
        transport=InProcessTransport(server),
    )

    async def go() -> tuple[int, object, int]:
        try:
            return await _measure(device, lambda: asyncio.sleep(0))
        finally:
            await device.close()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        peak, result, _ = runner.run(go())
    assert result.outcome == Outcome.UPDATED, result  # type: ignore[attr-defined]
    assert rig.boots()[1] == image.digest
    return peak


@pytest.mark.slow
def test_encrypted_update_memory_is_bounded_and_flat(tmp_path: Path) -> None:
    small = _encrypted_peak(tmp_path / "a", 1 << 20)
    large = _encrypted_peak(tmp_path / "b", 4 << 20)
    print(f"\nencrypted in-process peak: 1 MiB {small} B, 4 MiB {large} B (bound {BOUND} B)")
    assert small < BOUND and large < BOUND
    assert large - small < 8 * 1024, "peak must not grow with the image size"
