"""Encrypted delta updates on the device (issue 13 §3b), in process.

The patch is fetched as ciphertext, decrypted while it streams into the patch decoder
(no whole patch in RAM), applied against the running slot, and the result is checked
against the manifest's plaintext image digest before it is installed. On a sealed
device the staged result is encrypted at rest like any staged image. Hostile cases: a
wrong key, a flipped ciphertext byte, a patch for another source: each refused typed
(or, where the manifest offers it, replaced by the encrypted full image, and the
reports say which), the running image untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from delta_rig import DELTA_DIR, Served, details, pair, synthetic_pair, update
from encdelta_rig import KEK, EncryptedDeltaRelease, encrypted_delta_release, make_encdelta_rig
from evil_server import Rig

from device_sim.agent import Outcome
from device_sim.inprocess import InProcessServer
from otacoap.core import cose, encryption, interpreter, payload_kind, suit, trust
from otacoap.core.errors import ReportReason
from otacoap.core.report import State

ALGS = pytest.mark.parametrize(
    "alg", [encryption.A128CTR, encryption.A128GCM], ids=["a128ctr", "a128gcm"]
)
needs_pairs = pytest.mark.skipif(
    not DELTA_DIR.is_dir(), reason="../shared/delta (OTACOAP_SHARED) not available"
)


def _setup(
    tmp_path: Path, alg: int = encryption.A128CTR, *, seal: bool = True, **kw: object
) -> tuple[Rig, EncryptedDeltaRelease, InProcessServer, Served]:
    old, new = kw.pop("pair_", None) or synthetic_pair(20_000)  # type: ignore[misc]
    claimed = synthetic_pair(20_001)[0] if kw.pop("other_source", False) else None
    rig = make_encdelta_rig(tmp_path, old, seal=seal, **kw)  # type: ignore[arg-type]
    rel = encrypted_delta_release(rig.key, old, new, 6, alg=alg, claimed_source=claimed)
    rig.accept(new)
    server = InProcessServer(envelope=rel.envelope)
    rel.serve(server)
    return rig, rel, server, Served(server)


def _untouched(rig: Rig, before: tuple[int, bytes]) -> None:
    assert rig.boots() == before and rig.info()["sequence_number"] == 5
    assert rig.boots()[1] == hashlib.sha256(rig.factory).digest()


# --- the SUIT encoding through the trust gate -------------------------------------------


def test_gate_sees_an_encrypted_delta_and_the_device_picks_the_decrypting_kind() -> None:
    key = cose.generate_key("es256")
    old, new = synthetic_pair()
    rel = encrypted_delta_release(key, old, new, 2)
    vm = trust.accept(rel.envelope, trust.TrustPolicy((key.public,)))
    (patch_fetch,) = [f for f in vm.fetches if f.delta is not None]
    (full_fetch,) = [f for f in vm.fetches if f.delta is None]
    # Both the patch and the fallback carry their own encryption info; digests stay the
    # plaintext's: the result image, the source image, the plaintext patch.
    assert patch_fetch.encryption_info and full_fetch.encryption_info
    assert patch_fetch.encryption_info != full_fetch.encryption_info
    assert patch_fetch.digest == full_fetch.digest and patch_fetch.digest is not None
    assert patch_fetch.digest.value == hashlib.sha256(new).digest()
    assert patch_fetch.delta == rel.info
    assert rel.info.patch_digest.value == hashlib.sha256(rel.patch).digest()
    assert patch_fetch.uri == rel.patch_path and full_fetch.uri == rel.image_path

    device = interpreter.DeviceDescription(vm.vendor_ids[0], vm.class_ids[0])
    actions = interpreter.drive(
        interpreter.run(vm.envelope, interpreter.UPDATE, device), lambda a: True
    )
    fetch = next(a for a in actions if isinstance(a, interpreter.Fetch))

    class Zero:
        def read(self, offset: int, length: int) -> bytes:
            return bytes(length)

    keys = encryption.DecryptionKeys(keks=((b"class-kek", KEK),))
    kind = payload_kind.select_kind(fetch, vm, keys, source=Zero())
    assert isinstance(kind, payload_kind.DeltaKind) and kind.name == "delta"
    assert kind.label == "delta+encrypted-a128ctr"
    assert kind.payload_size(len(new)) == len(rel.patch_ct)
    with pytest.raises(encryption.NoDecryptionKey):
        payload_kind.select_kind(fetch, vm, encryption.DecryptionKeys(), source=Zero())


def test_decrypting_patch_decoder_matches_the_plain_one_block_by_block() -> None:
    key = cose.generate_key("es256")
    old, new = synthetic_pair()
    for alg in (encryption.A128CTR, encryption.A128GCM):
        rel = encrypted_delta_release(key, old, new, 2, alg=alg)
        info = encryption.parse_encryption_info(
            encryption.encrypted_parameters(suit.decode_envelope(rel.envelope))[0].info
        )
        payload = encryption.EncryptedPayload(
            info, encryption.unwrap_cek(info, encryption.DecryptionKeys(keks=((None, KEK),)))
        )

        class Src:
            def read(self, offset: int, length: int) -> bytes:
                return old[offset : offset + length]

        kind = payload_kind.DeltaKind(rel.info, Src(), len(new), encryption=payload)
        for block in (1, 17, 1024):
            dec = kind.decoder(0)
            assert isinstance(dec, payload_kind.DrainingDecoder)
            out = bytearray()
            for pos in range(0, len(rel.patch_ct), block):
                chunk = dec.feed(rel.patch_ct[pos : pos + block])
                while chunk:
                    out += chunk
                    chunk = dec.drain()
            out += dec.finish()
            assert bytes(out) == new, (alg, block)


# --- the device -----------------------------------------------------------------------


@ALGS
def test_device_updates_by_encrypted_delta_and_reports_it(tmp_path: Path, alg: int) -> None:
    rig, rel, server, served = _setup(tmp_path, alg)
    assert asyncio.run(update(rig, server)) == Outcome.UPDATED
    assert rig.boots()[1] == hashlib.sha256(rel.image).digest()
    assert rig.info()["sequence_number"] == 6
    assert served.paths.get(rel.image_path, 0) == 0, "the full image was not fetched"
    assert served.paths[rel.patch_path] == -(-len(rel.patch_ct) // 1024)
    name = encryption.ALG_NAMES[alg].lower()
    (note,) = details(server, State.DOWNLOADED)
    assert note.startswith(f"delta+encrypted-{name} from "), note
    raw = rig.path.read_bytes()
    assert rel.image[:4096] not in raw and rel.image[-4096:] not in raw, "encrypted at rest"
    assert rig.slot_bytes(0)[:4096] != rig.factory[:4096]


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "control-unsealed"])
def test_staging_slot_dump_mid_encrypted_delta_holds_no_plaintext(
    tmp_path: Path, sealed: bool
) -> None:
    """Mid-patch (before its last blocks), a dump of the staging slot shows no
    plaintext of the result on a sealed device; the unsealed control shows it would."""
    old, new = synthetic_pair(20_000)
    noise = hashlib.shake_256(b"new code").digest(8192)  # incompressible: a long patch
    rig, rel, server, served = _setup(
        tmp_path, seal=sealed, pair_=(old, new[:12_000] + noise + new[12_000:])
    )
    blocks = -(-len(rel.patch_ct) // 1024)
    assert blocks > 6
    dumps: list[bytes] = []

    def snapshot(path: str, block2: tuple[int, int, int] | None) -> None:
        if path == rel.patch_path and block2 is not None and block2[0] == blocks - 2:
            dumps.append(rig.slot_bytes(1))

    served.hook = snapshot
    assert asyncio.run(update(rig, server)) == Outcome.UPDATED
    (staged,) = dumps
    chunks = [rel.image[i : i + 64] for i in range(0, 16_000, 997)]
    written = [c for c in chunks if c in staged]
    if sealed:
        assert written == [], "plaintext firmware in the staging slot mid-update"
        raw = rig.path.read_bytes()
        assert not [c for c in chunks if c in raw], "plaintext in flash after the update"
    else:
        assert written, "the control: an unsealed slot holds the plaintext mid-update"


def test_wrong_key_is_refused_before_any_byte(tmp_path: Path) -> None:
    rig, _, server, served = _setup(tmp_path, keks=(bytes(16),))
    before = rig.boots()
    # As for an encrypted full image: the CEK is unwrapped when the kind is chosen,
    # before the fetch (NoDecryptionKey, reason UNAUTHORISED).
    assert asyncio.run(update(rig, server)) != Outcome.UPDATED
    _untouched(rig, before)
    assert not any(p.startswith("/fw/") for p in served.paths), served.paths
    assert server.reports[-1].reason == ReportReason.UNAUTHORISED, server.reports[-1]
    assert "key" in server.reports[-1].detail


@ALGS
def test_flipped_ciphertext_byte_falls_back_to_the_encrypted_full_image(
    tmp_path: Path, alg: int
) -> None:
    rig, rel, server, served = _setup(tmp_path, alg)
    bad = bytearray(rel.patch_ct)
    bad[len(bad) // 3] ^= 0x04
    rel.serve(server, patch_ct=bytes(bad))
    assert asyncio.run(update(rig, server)) == Outcome.UPDATED
    assert rig.boots()[1] == hashlib.sha256(rel.image).digest()
    assert served.paths[rel.patch_path] > 0 and served.paths[rel.image_path] > 0
    (note,) = details(server, State.DOWNLOADED)
    assert note.startswith("full image (delta failed: "), note


@ALGS
def test_flipped_ciphertext_byte_of_a_delta_only_release_fails_typed(
    tmp_path: Path, alg: int
) -> None:
    rig, rel, server, _ = _setup(tmp_path, alg)
    server.envelope = rel.delta_only
    bad = bytearray(rel.patch_ct)
    bad[-1] ^= 0x01  # the GCM tag's last byte; with CTR the patch's last byte
    rel.serve(server, patch_ct=bytes(bad))
    before = rig.boots()
    assert asyncio.run(update(rig, server)) == Outcome.FAILED
    _untouched(rig, before)
    # A failed delta payload is a failed condition of the delta (thrown into try-each at
    # its fetch); the detail says which check caught it.
    failed = [r for r in server.reports if r.state == State.FAILED]
    assert failed[-1].reason == ReportReason.CONDITION_FAILED
    if alg == encryption.A128GCM:
        assert "failed authentication" in failed[-1].detail, failed[-1].detail
    else:
        assert "delta patch" in failed[-1].detail, failed[-1].detail


def test_patch_for_another_source_takes_the_encrypted_full_image(tmp_path: Path) -> None:
    rig, rel, server, served = _setup(tmp_path, other_source=True)
    assert asyncio.run(update(rig, server)) == Outcome.UPDATED
    assert rig.boots()[1] == hashlib.sha256(rel.image).digest()
    assert served.paths.get(rel.patch_path, 0) == 0, "no patch byte for another source"
    assert details(server, State.DOWNLOADED) == [
        "full image (running image is not the patch's source)"
    ]


def test_delta_only_for_another_source_is_refused_before_any_byte(tmp_path: Path) -> None:
    rig, rel, server, served = _setup(tmp_path, other_source=True)
    server.envelope = rel.delta_only
    before = rig.boots()
    assert asyncio.run(update(rig, server)) == Outcome.REJECTED
    _untouched(rig, before)
    assert not any(p.startswith("/fw/") for p in served.paths)
    rejected = [r for r in server.reports if r.state == State.REJECTED]
    assert rejected and rejected[-1].reason == ReportReason.CONDITION_FAILED


@needs_pairs
def test_encrypted_delta_of_the_programmer_pair_with_bounded_memory(tmp_path: Path) -> None:
    """A real pair: the device decrypts and patches while streaming; its peak memory is
    that of a plain delta install plus the cipher's (generous margin for noise)."""
    from delta_rig import delta_release, install_peak, make_delta_rig

    old, new = pair("programmer")

    async def peak(encrypted: bool, where: Path) -> int:
        where.mkdir()
        slot = -(-max(len(old), len(new)) // 4096) * 4096 + 4096
        if encrypted:
            rig = make_encdelta_rig(where, old, slot_size=slot)
            measured, server = await install_peak(
                rig, encrypted_delta_release(rig.key, old, new, 6)
            )
        else:
            rig = make_delta_rig(where, old, slot_size=slot, seal=True)
            measured, server = await install_peak(rig, delta_release(rig.key, old, new, 6))
        (note,) = details(server, State.DOWNLOADED)
        assert note.startswith("delta+encrypted" if encrypted else "delta from"), note
        assert rig.boots()[1] == hashlib.sha256(new).digest()
        return measured

    plain = asyncio.run(peak(False, tmp_path / "plain"))
    enc = asyncio.run(peak(True, tmp_path / "enc"))
    print(f"\ndelta install peak (sealed): plain {plain} B, encrypted {enc} B")
    assert enc < plain + 16 * 1024
    assert enc < 96 * 1024
