"""The device installs encrypted firmware over CoAP/DTLS (issue 13 §1, §5).

The server serves the ciphertext; the device unwraps the CEK with the key provisioning
put in its identity, decrypts while streaming block by block into the staging slot,
and the image writer checks the manifest's plaintext digest. A wrong key is refused
before any payload byte; a flipped ciphertext byte never becomes the running image; an
A128CTR download resumes from its durable checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from evil_server import (
    FAST,
    EvilServer,
    Rig,
    Script,
    at_block,
    honest_block,
    make_rig,
    release,
    run_device,
    stall_from,
)

from device_sim.agent import Outcome
from device_sim.firmware import make_image
from otacoap.core import blockwise, cose, encryption, ids
from otacoap.core.errors import ReportReason

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]

KEK = bytes(range(16))


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout)

    asyncio.run(bounded())


def publish_encrypted(
    rig: Rig,
    server: EvilServer,
    size: int,
    seq: int,
    recipient: encryption.RecipientSpec,
    alg: int = encryption.A128CTR,
) -> tuple[bytes, bytes]:
    """(plaintext image, ciphertext served); the manifest states the plaintext digest."""
    image = make_image(size, version=seq, seed=seq)
    info, ciphertext = encryption.encrypt(image, [recipient], os.urandom, alg)
    uri = ids.image_uri(hashlib.sha256(ciphertext).digest())
    envelope, _ = release(rig.key, image, seq, uri=uri, encryption_info=info)
    server.script.envelope = envelope
    server.script.images[uri] = ciphertext
    return image, ciphertext


@pytest.mark.parametrize("alg", [encryption.A128CTR, encryption.A128GCM], ids=["ctr", "gcm"])
def test_encrypted_update_with_a_class_kek(tmp_path: Path, alg: int) -> None:
    rig = make_rig(tmp_path, seq=5, decryption_keks=(KEK,))

    async def go() -> None:
        async with EvilServer() as server:
            image, ciphertext = publish_encrypted(
                rig, server, 20_000, 6, encryption.KekRecipient(KEK), alg
            )
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome == Outcome.UPDATED, result
            assert server.states()[-1] == "confirmed"
            n = blockwise.block_count(len(ciphertext), 6)
            assert [num for num, _ in server.block_log()] == list(range(n))
            assert rig.boots() == (1, hashlib.sha256(image).digest())

    run(go)


def test_encrypted_update_with_the_device_ecdh_key(tmp_path: Path) -> None:
    device_key = cose.generate_key("es256")
    private = encryption.load_ec_private(device_key.pem)
    rig = make_rig(tmp_path, seq=5, decryption_ec_der=encryption.private_der(private))

    async def go() -> None:
        async with EvilServer() as server:
            image, _ = publish_encrypted(
                rig,
                server,
                12_345,
                6,
                encryption.EcdhRecipient(private.public_key()),
                encryption.A128GCM,
            )
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome == Outcome.UPDATED, result
            assert rig.boots() == (1, hashlib.sha256(image).digest())

    run(go)


def test_wrong_key_is_refused_before_any_payload_byte(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5, decryption_keks=(b"\x07" * 16,))
    before = rig.boots()

    async def go() -> None:
        async with EvilServer() as server:
            publish_encrypted(rig, server, 8_000, 6, encryption.KekRecipient(KEK))
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome != Outcome.UPDATED
            assert result.reason == ReportReason.UNAUTHORISED, result
            assert server.block_log() == [], "nothing fetched for a payload it cannot decrypt"
            assert rig.boots() == before
            assert rig.info()["sequence_number"] == 5

    run(go)


def test_device_without_keys_refuses_an_encrypted_payload(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)

    async def go() -> None:
        async with EvilServer() as server:
            publish_encrypted(rig, server, 8_000, 6, encryption.KekRecipient(KEK))
            result, _ = await run_device(rig, server.base_uri)
            assert result.reason == ReportReason.UNAUTHORISED, result
            assert server.block_log() == []

    run(go)


def _flip(k: int) -> Callable[[bytes, int, int], tuple[bytes, tuple[int, bool, int] | None]]:
    def script(image: bytes, num: int, szx: int) -> tuple[bytes, tuple[int, bool, int] | None]:
        payload, opt = honest_block(image, num, szx)
        return bytes([payload[0] ^ 0x01]) + payload[1:], opt

    return at_block(k, script)


@pytest.mark.parametrize(
    ("alg", "reason"),
    [
        (encryption.A128CTR, ReportReason.CONDITION_FAILED),  # the plaintext digest
        (encryption.A128GCM, ReportReason.OPERATION_FAILED),  # the GCM tag
    ],
    ids=["ctr", "gcm"],
)
def test_flipped_ciphertext_byte_never_runs(tmp_path: Path, alg: int, reason: int) -> None:
    rig = make_rig(tmp_path, seq=5, decryption_keks=(KEK,))
    before = rig.boots()

    async def go() -> None:
        async with EvilServer(script=Script(block=_flip(3))) as server:
            publish_encrypted(rig, server, 20_000, 6, encryption.KekRecipient(KEK), alg)
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome == Outcome.FAILED, result
            assert result.reason == reason, result
            assert server.reports[-1].state.value == "failed"
            assert rig.boots() == before, "the running image is untouched"
            info = rig.info()
            assert info["sequence_number"] == 5 and info["download"] is None

    run(go)


def test_ctr_download_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5, decryption_keks=(KEK,))
    config = replace(FAST, checkpoint_bytes=8 * 1024)

    async def go() -> None:
        async with EvilServer(script=Script(block=stall_from(21))) as server:
            image, ciphertext = publish_encrypted(
                rig, server, 40_000, 6, encryption.KekRecipient(KEK)
            )
            first, _ = await run_device(rig, server.base_uri, config=config)
            assert first.outcome == Outcome.FAILED
            assert rig.info()["download"]["bytes"] == 16 * 1024
            server.log.clear()
            server.script.block = honest_block
            second, _ = await run_device(rig, server.base_uri, config=config)
            assert second.outcome == Outcome.UPDATED, second
            nums = [num for num, _ in server.block_log()]
            assert nums == list(range(16, blockwise.block_count(len(ciphertext), 6)))
            assert rig.boots() == (1, hashlib.sha256(image).digest())

    run(go)


def test_gcm_download_restarts_from_zero(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5, decryption_keks=(KEK,))
    config = replace(FAST, checkpoint_bytes=8 * 1024)

    async def go() -> None:
        async with EvilServer(script=Script(block=stall_from(21))) as server:
            image, _ = publish_encrypted(
                rig, server, 40_000, 6, encryption.KekRecipient(KEK), encryption.A128GCM
            )
            first, _ = await run_device(rig, server.base_uri, config=config)
            assert first.outcome == Outcome.FAILED
            server.log.clear()
            server.script.block = honest_block
            second, _ = await run_device(rig, server.base_uri, config=config)
            assert second.outcome == Outcome.UPDATED, second
            assert next(num for num, _ in server.block_log()) == 0
            assert rig.boots() == (1, hashlib.sha256(image).digest())

    run(go)


def _chunks(image: bytes, size: int = 64) -> list[bytes]:
    return [image[i : i + size] for i in range(0, len(image) - size, 997)]


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "control-unsealed"])
def test_staging_slot_dump_mid_update_holds_no_plaintext(tmp_path: Path, sealed: bool) -> None:
    """A sealed device keeps every slot encrypted at rest under its hardware key
    (device_sim.slot_view): a dump of the staging slot mid-download, and of the flash
    after the update, shows no plaintext. The unsealed control shows the dump would."""
    rig = make_rig(tmp_path, seq=5, decryption_keks=(KEK,), seal=sealed)
    config = replace(FAST, checkpoint_bytes=8 * 1024)

    async def go() -> None:
        async with EvilServer(script=Script(block=stall_from(21))) as server:
            image, _ = publish_encrypted(rig, server, 40_000, 6, encryption.KekRecipient(KEK))
            first, _ = await run_device(rig, server.base_uri, config=config)
            assert first.outcome == Outcome.FAILED
            staged = rig.slot_bytes(1)
            written = [c for c in _chunks(image[: 16 * 1024]) if c in staged]
            if sealed:
                assert written == [], "plaintext firmware in the staging slot mid-update"
            else:
                assert written, "the control: an unsealed slot holds the plaintext"
                return
            server.script.block = honest_block
            second, _ = await run_device(rig, server.base_uri, config=config)
            assert second.outcome == Outcome.UPDATED, second
            raw = rig.path.read_bytes()
            assert not [c for c in _chunks(image) if c in raw]
            assert not [c for c in _chunks(rig.factory) if c in raw]
            assert rig.boots() == (1, hashlib.sha256(image).digest())

    run(go)


def test_unsupported_payload_encryption_is_refused_before_any_byte(tmp_path: Path) -> None:
    """A signed manifest whose encryption info asks for A256GCM (not in the MTI
    profiles otacoap implements): a typed refusal, nothing fetched, image untouched."""
    import cbor2

    rig = make_rig(tmp_path, seq=5, decryption_keks=(KEK,))
    before = rig.boots()
    info = cbor2.dumps(
        cbor2.CBORTag(
            96, [cbor2.dumps({1: 3}), {5: b"\x00" * 12}, None, [[b"", {1: -3}, b"\x00" * 24]]]
        )
    )

    async def go() -> None:
        async with EvilServer() as server:
            image = make_image(4_000, version=6, seed=6)
            uri = ids.image_uri(hashlib.sha256(image).digest())
            envelope, _ = release(rig.key, image, 6, uri=uri, encryption_info=info)
            server.script.envelope = envelope
            server.script.images[uri] = image
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome != Outcome.UPDATED
            assert result.reason == ReportReason.ALG_UNSUPPORTED, result
            assert server.block_log() == []
            assert rig.boots() == before

    run(go)
