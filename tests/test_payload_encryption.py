"""Encrypted firmware (issue 13 §1, draft-ietf-suit-firmware-encryption) and the SUIT MTI
profiles on the signer side (issue 13 §3).

The five `fw-encryption_*` vectors decrypt to their published plaintext through the
core API and through `otacoap manifest decrypt`; the dependency example is refused
cleanly when processed (dependencies are out of scope). Hostile inputs (wrong key,
flipped ciphertext byte, malformed info) are typed refusals. Every MTI profile otacoap
supports builds end to end with `manifest build --profile` and round-trips.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cbor2
import pytest
from conftest import KEYS, VECTORS, require_vectors

from otacoap.cli import main
from otacoap.core import build, cose, encryption, ids, interpreter, mti, suit, trust
from otacoap.core.errors import AlgorithmError, ConditionFailed, OtaError

EncError = encryption.EncryptionError
FW_VECTORS = sorted(p.stem for p in VECTORS.glob("fw-encryption_*.hex"))
PLAINTEXT = b"This is a real firmware image."


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _vector(name: str) -> tuple[bytes, dict[str, object]]:
    require_vectors()
    data = bytes.fromhex((VECTORS / f"{name}.hex").read_text().strip())
    return data, json.loads((VECTORS / f"{name}.json").read_text())


def _vector_keys(meta: dict[str, object]) -> encryption.DecryptionKeys:
    dec = meta["decryption"]
    assert isinstance(dec, dict)
    if "kek_file" in dec:
        kek = encryption.load_kek((KEYS.parent / dec["kek_file"]).read_bytes(), b"kid-1")
        return encryption.DecryptionKeys(keks=(kek,))
    pem = (KEYS.parent / dec["recipient_private_key_file"]).read_bytes()
    return encryption.DecryptionKeys(ec_private=(encryption.load_ec_private(pem),))


def _ciphertext(meta: dict[str, object], params: encryption.EncryptedParameters) -> bytes:
    dec = meta["decryption"]
    assert isinstance(dec, dict)
    if params.content is not None:
        return params.content
    return bytes.fromhex(dec["fetched_payload_hex"])


def test_all_five_vectors_are_present() -> None:
    require_vectors()
    assert len(FW_VECTORS) == 5


@pytest.mark.parametrize("name", FW_VECTORS)
def test_vector_decrypts_to_the_published_plaintext_through_the_api(name: str) -> None:
    data, meta = _vector(name)
    envelope = suit.decode_envelope(data)
    found = encryption.encrypted_parameters(envelope)
    assert len(found) == 1
    info = encryption.parse_encryption_info(found[0].info)
    assert info.content_alg == encryption.A128GCM
    plain = encryption.decrypt(info, _vector_keys(meta), _ciphertext(meta, found[0]))
    assert plain == PLAINTEXT
    assert plain.decode() == meta["decryption"]["expected_plaintext_ascii"]  # type: ignore[index]


@pytest.mark.parametrize("name", FW_VECTORS)
def test_vector_decrypts_through_the_cli(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, meta = _vector(name)
    dec = meta["decryption"]
    assert isinstance(dec, dict)
    args = ["manifest", "decrypt", str(VECTORS / f"{name}.hex"), "-o", str(tmp_path / "out")]
    if "kek_file" in dec:
        args += ["--kek", str(KEYS.parent / dec["kek_file"])]
    else:
        args += ["--key", str(KEYS.parent / dec["recipient_private_key_file"])]
    if "fetched_payload_hex" in dec:
        payload = tmp_path / "fetched.hex"
        payload.write_text(dec["fetched_payload_hex"])
        args += ["--payload", str(payload)]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert (tmp_path / "out").read_bytes() == PLAINTEXT
    assert "A128GCM" in out


def test_cli_decrypt_with_the_wrong_key_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_vectors()
    wrong = tmp_path / "wrong.hex"
    wrong.write_text("00" * 16)
    code, _, err = cli(
        capsys, "manifest", "decrypt", str(VECTORS / "fw-encryption_aes-kw_write.hex"),
        "--kek", str(wrong),
    )  # fmt: skip
    assert code == 1
    assert len(err.splitlines()) == 1 and "unwraps" in err


def test_dependency_vector_is_refused_cleanly_when_processed() -> None:
    """Dependencies (trust-domains) stay out of scope: authentic, decryptable, but its
    install sequence is refused with a typed reason, never half-run."""
    data, _ = _vector("fw-encryption_es-ecdh_dependency")
    anchor = cose.load_public_key((KEYS / "fwenc-dependency-signer_p256_public.pem").read_bytes())
    vm = trust.accept(data, trust.TrustPolicy(anchors=(anchor,)))
    actions: list[interpreter.Action] = []

    def answer(action: interpreter.Action) -> object:
        actions.append(action)
        return False  # a device that does not know a condition reports failure

    with pytest.raises(ConditionFailed, match="dependency"):
        interpreter.drive(interpreter.run(vm.envelope, interpreter.UPDATE, vm_device()), answer)
    assert not any(isinstance(a, interpreter.Write | interpreter.Copy) for a in actions)


def vm_device() -> interpreter.DeviceDescription:
    return interpreter.DeviceDescription()


@pytest.mark.parametrize("name", ["fw-encryption_aes-kw_write", "fw-encryption_es-ecdh_write"])
def test_interpreter_hands_the_encryption_info_to_the_host(name: str) -> None:
    data, _ = _vector(name)
    envelope = suit.decode_envelope(data)
    actions = interpreter.drive(
        interpreter.run(envelope, interpreter.UPDATE, vm_device()), lambda a: True
    )
    writes = [a for a in actions if isinstance(a, interpreter.Write)]
    assert len(writes) == 1 and writes[0].encryption_info is not None


# --- streaming ----------------------------------------------------------------------------


def _rand(n: int) -> bytes:
    return os.urandom(n)


KEK = encryption.KekRecipient(bytes(range(16)), b"k1")
KEYS_OK = encryption.DecryptionKeys(keks=((b"k1", bytes(range(16))),))


@pytest.mark.parametrize("alg", [encryption.A128CTR, encryption.A128GCM])
def test_streaming_decryption_in_any_chunking_equals_the_image(alg: int) -> None:
    image = os.urandom(5000)
    raw, ct = encryption.encrypt(image, [KEK], _rand, alg)
    info = encryption.parse_encryption_info(raw)
    cek = encryption.unwrap_cek(info, KEYS_OK)
    d = encryption.Decryptor(info, cek)
    out = bytearray()
    fed = 0
    for size in (1, 7, 16, 100, 1024) * 20:
        chunk = ct[fed : fed + size]
        if not chunk:
            break
        fed += len(chunk)
        out += d.feed(chunk)
        # bounded: at most the 16-byte tag candidate is held back (GCM), nothing for CTR
        held = fed - len(out)
        assert held <= (16 if alg == encryption.A128GCM else 0)
    out += d.finish()
    assert bytes(out) == image


def test_ctr_resumes_at_any_offset() -> None:
    image = os.urandom(4100)
    raw, ct = encryption.encrypt(image, [KEK], _rand, encryption.A128CTR)
    info = encryption.parse_encryption_info(raw)
    cek = encryption.unwrap_cek(info, KEYS_OK)
    for start in (0, 8, 16, 1024, 4080, 4099, 4100):
        d = encryption.Decryptor(info, cek, start)
        assert d.feed(ct[start:]) + d.finish() == image[start:]
    kind = encryption.EncryptedPayload(info, cek)
    assert kind.checkpoints and kind.resume_from(4096) == 4096 and kind.resume_from(4100) == 4100


def test_gcm_cannot_resume_mid_payload() -> None:
    raw, _ = encryption.encrypt(b"x" * 64, [KEK], _rand, encryption.A128GCM)
    info = encryption.parse_encryption_info(raw)
    kind = encryption.EncryptedPayload(info, encryption.unwrap_cek(info, KEYS_OK))
    assert not kind.checkpoints and kind.resume_from(4096) == 0
    assert kind.payload_size(64) == 80
    with pytest.raises(encryption.EncryptionError):
        kind.decoder(16)


# --- hostile --------------------------------------------------------------------------------


def test_wrong_kek_is_a_typed_refusal() -> None:
    raw, _ = encryption.encrypt(b"x" * 64, [KEK], _rand)
    info = encryption.parse_encryption_info(raw)
    wrong = encryption.DecryptionKeys(keks=((None, b"\x01" * 16),))
    with pytest.raises(encryption.NoDecryptionKey) as exc:
        encryption.unwrap_cek(info, wrong)
    assert exc.value.reason.name == "UNAUTHORISED"
    # A kid that names another key is not even tried.
    other_kid = encryption.DecryptionKeys(keks=((b"k2", bytes(range(16))),))
    with pytest.raises(encryption.NoDecryptionKey):
        encryption.unwrap_cek(info, other_kid)


def test_wrong_ecdh_private_key_is_a_typed_refusal() -> None:
    require_vectors()
    pem = (KEYS / "fwenc-receiver_p256_PRIVATE_published-in-draft.pem").read_bytes()
    right = encryption.load_ec_private(pem)
    raw, _ = encryption.encrypt(
        b"y" * 40, [encryption.EcdhRecipient(right.public_key())], _rand, encryption.A128GCM
    )
    info = encryption.parse_encryption_info(raw)
    other = cose.generate_key("es256")
    wrong = encryption.DecryptionKeys(ec_private=(encryption.load_ec_private(other.pem),))
    with pytest.raises(encryption.NoDecryptionKey):
        encryption.unwrap_cek(info, wrong)
    ok = encryption.DecryptionKeys(ec_private=(right,))
    assert len(encryption.unwrap_cek(info, ok)) == 16


@pytest.mark.parametrize("where", [0, 20, -1])
def test_flipped_gcm_ciphertext_byte_is_refused_at_finish(where: int) -> None:
    raw, ct = encryption.encrypt(b"z" * 100, [KEK], _rand, encryption.A128GCM)
    info = encryption.parse_encryption_info(raw)
    bad = bytearray(ct)
    bad[where] ^= 0x01
    with pytest.raises(encryption.CiphertextRejected):
        encryption.decrypt(info, KEYS_OK, bytes(bad))


def test_truncated_gcm_ciphertext_is_refused() -> None:
    raw, ct = encryption.encrypt(b"z" * 100, [KEK], _rand, encryption.A128GCM)
    info = encryption.parse_encryption_info(raw)
    for cut in (ct[:10], ct[:-1]):
        with pytest.raises(encryption.CiphertextRejected):
            encryption.decrypt(info, KEYS_OK, cut)


def _info(
    protected: dict[int, object], unprotected: dict[int, object], recipients: object
) -> bytes:
    prot = cbor2.dumps(protected) if protected else b""
    return cbor2.dumps(cbor2.CBORTag(96, [prot, unprotected, None, recipients]))


GOOD_RECIPIENT = [b"", {1: -3, 4: b"k"}, b"\x00" * 24]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xff", encryption.EncryptionError),
        (cbor2.dumps(cbor2.CBORTag(18, [b"", {}, None, b""])), encryption.EncryptionError),
        (_info({1: 3}, {5: b"\x00" * 12}, [GOOD_RECIPIENT]), AlgorithmError),  # A256GCM
        (_info({1: 1}, {5: b"\x00" * 11}, [GOOD_RECIPIENT]), encryption.EncryptionError),
        (_info({1: -65534}, {5: b"\x00" * 16}, [GOOD_RECIPIENT]), encryption.EncryptionError),
        (_info({}, {1: -65534, 5: b"\x00" * 16}, []), encryption.EncryptionError),
        (_info({1: 1}, {5: b"\x00" * 12}, [[b"", {1: -5}, b"\x00" * 24]]), AlgorithmError),
        (_info({1: 1}, {5: b"\x00" * 12}, [[b"", {1: -3}, b"\x00" * 8]]), EncError),
        (_info({1: 1, 2: [99]}, {5: b"\x00" * 12}, [GOOD_RECIPIENT]), encryption.EncryptionError),
        (
            _info({1: 1}, {5: b"\x00" * 12}, [[cbor2.dumps({1: -29}), {-1: {1: 2}}, b"\x00" * 24]]),
            encryption.EncryptionError,
        ),
    ],
    ids=[
        "not-cbor", "not-encrypt", "a256gcm", "short-iv", "ctr-protected", "no-recipients",
        "a256kw", "short-wrapped-key", "crit", "bad-ephemeral",
    ],
)  # fmt: skip
def test_malformed_encryption_info_is_refused(raw: bytes, error: type[OtaError]) -> None:
    with pytest.raises(error):
        encryption.parse_encryption_info(raw)


# --- MTI profiles, signer side ------------------------------------------------------------


DIGEST_RAW = cbor2.dumps([-16, b"\x11" * 32])


def test_ed25519_signs_as_minus_19_by_default_and_minus_8_still_verifies() -> None:
    key = cose.generate_key("ed25519")
    block = cose.sign1(DIGEST_RAW, key)
    assert cose.parse_block(block).alg == cose.ED25519
    legacy = cose.sign1(DIGEST_RAW, key, cose.EDDSA)
    assert cose.parse_block(legacy).alg == cose.EDDSA
    for b in (block, legacy):
        assert cose.verify_block(b, DIGEST_RAW, [key.public]) == key.public


def test_esp256_signing_verifies_and_es256_stays_the_p256_default() -> None:
    key = cose.generate_key("es256")
    assert cose.parse_block(cose.sign1(DIGEST_RAW, key)).alg == cose.ES256
    block = cose.sign1(DIGEST_RAW, key, cose.ESP256)
    assert cose.parse_block(block).alg == cose.ESP256
    assert cose.verify_block(block, DIGEST_RAW, [key.public]) == key.public


def test_unsupported_profiles_are_refused_by_name() -> None:
    with pytest.raises(AlgorithmError, match="ChaCha20"):
        mti.profile("suit-sha256-ed25519-ecdh-chacha-poly")
    with pytest.raises(AlgorithmError, match="unknown"):
        mti.profile("suit-sha1-rot13")


def _envelope_algs(data: bytes) -> tuple[int, int, int]:
    """(auth alg, key exchange alg, content alg) as an independent reader sees them."""
    outer = cbor2.loads(data)
    env = outer.value
    auth = cbor2.loads(env[2])
    block = cbor2.loads(auth[1])
    auth_alg = cbor2.loads(block.value[0])[1]
    manifest = cbor2.loads(env[3])
    install = cbor2.loads(manifest[20])
    params = install[1]
    info = cbor2.loads(params[19]).value
    content_alg = (cbor2.loads(info[0]) if info[0] else info[1])[1]
    recipient = info[3][0]
    kx_alg = (cbor2.loads(recipient[0]) if recipient[0] else recipient[1])[1]
    return auth_alg, kx_alg, content_alg


@pytest.mark.parametrize("name", sorted(mti.PROFILES))
def test_manifest_build_produces_each_mti_profile_end_to_end(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = mti.PROFILES[name]
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(3000))
    args = [
        "manifest", "build", "--image", str(image), "--vendor-domain", "acme.example",
        "--class-info", "t1", "--seq", "3", "--profile", name,
        "--payload-out", str(tmp_path / "fw.enc"), "-o", str(tmp_path / "fw.suit"),
    ]  # fmt: skip
    verify = ["manifest", "verify", str(tmp_path / "fw.suit")]
    decrypt = [
        "manifest",
        "decrypt",
        str(tmp_path / "fw.suit"),
        "--payload",
        str(tmp_path / "fw.enc"),
    ]
    if profile.signing_kind == "hmac":
        (tmp_path / "mac.hex").write_text(os.urandom(32).hex())
        (tmp_path / "kek.hex").write_text(os.urandom(16).hex())
        args += ["--hmac-key", str(tmp_path / "mac.hex"), "--kek", str(tmp_path / "kek.hex")]
        verify += ["--hmac-key", str(tmp_path / "mac.hex")]
        decrypt += ["--kek", str(tmp_path / "kek.hex")]
    else:
        key = cose.generate_key("es256" if profile.signing_kind == "p256" else "ed25519")
        (tmp_path / "sign.pem").write_bytes(key.pem)
        (tmp_path / "sign.pub").write_bytes(key.public.public_pem())
        device = cose.generate_key("es256")  # the device's ECDH-ES key pair
        (tmp_path / "dev.pem").write_bytes(device.pem)
        (tmp_path / "dev.pub").write_bytes(device.public.public_pem())
        args += ["--key", str(tmp_path / "sign.pem"), "--encrypt-for", str(tmp_path / "dev.pub")]
        verify += ["--key", str(tmp_path / "sign.pub")]
        decrypt += ["--key", str(tmp_path / "dev.pem")]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    data = (tmp_path / "fw.suit").read_bytes()
    assert _envelope_algs(data) == (profile.auth, profile.key_exchange, profile.content)
    code, _, err = cli(capsys, *verify)
    assert code == 0, err
    code, _, err = cli(capsys, *decrypt, "-o", str(tmp_path / "plain"))
    assert code == 0, err
    assert (tmp_path / "plain").read_bytes() == image.read_bytes()
    # The manifest's image digest and size are the plaintext's; the URI names the
    # ciphertext the server stores (firmware-encryption §7).
    summary = trust.summarize(suit.decode_envelope(data))
    (img,) = summary.images
    assert (
        img.digest is not None and img.digest.value == hashlib.sha256(image.read_bytes()).digest()
    )
    ct = (tmp_path / "fw.enc").read_bytes()
    assert img.uri == "/fw/" + hashlib.sha256(ct).hexdigest()[:16]


def test_profile_and_key_mismatch_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "fw.bin"
    image.write_bytes(b"x" * 100)
    key = cose.generate_key("es256")
    (tmp_path / "k.pem").write_bytes(key.pem)
    (tmp_path / "k.pub").write_bytes(key.public.public_pem())
    base = [
        "manifest", "build", "--image", str(image), "--vendor-domain", "a.example",
        "--class-info", "c", "--seq", "1", "-o", str(tmp_path / "o.suit"),
    ]  # fmt: skip
    for extra in (
        ["--key", str(tmp_path / "k.pem"), "--profile", "suit-sha256-ed25519-ecdh-a128ctr",
         "--encrypt-for", str(tmp_path / "k.pub"), "--payload-out", str(tmp_path / "p")],
        ["--key", str(tmp_path / "k.pem"), "--encrypt-for", str(tmp_path / "k.pub")],
        ["--key", str(tmp_path / "k.pem"), "--alg", "ed25519"],
    ):  # fmt: skip
        code, _, err = cli(capsys, *base, *extra)
        assert code == 1 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.suit").exists()


def test_build_release_carries_the_encryption_info_into_the_fetch() -> None:
    raw, ct = encryption.encrypt(b"q" * 500, [KEK], _rand)
    release = build.Release(
        hashlib.sha256(b"q" * 500).digest(), 500, "a.example", "c", 1,
        uri="/fw/" + hashlib.sha256(ct).hexdigest()[:16], encryption_info=raw,
    )  # fmt: skip
    envelope = build.build_envelope(release)
    vendor = ids.vendor_id("a.example")
    device = interpreter.DeviceDescription(vendor, ids.class_id(vendor, "c"))
    actions = interpreter.drive(
        interpreter.run(envelope, interpreter.UPDATE, device),
        lambda a: True,
    )
    (fetch,) = [a for a in actions if isinstance(a, interpreter.Fetch)]
    assert fetch.encryption_info == raw and fetch.size == 500


def test_staged_upload_is_taken_by_its_image_id_only_for_its_owner(tmp_path: Path) -> None:
    """An encrypted release names its ciphertext only by /fw/<id>: a network publish
    takes the operator's own upload by that id prefix."""
    from otacoap.config import UploadConfig
    from otacoap.server.uploads import StagedImages
    from otacoap.store import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    blobs.create_dirs()
    staged = StagedImages(UploadConfig(staged_ttl=60, max_staged=4))
    blob = blobs.temp()
    blob.write(b"ciphertext")
    digest = blob.finish()
    staged.put("operator:a", blob)
    assert staged.take("operator:b", digest[:8]) is None
    assert staged.take("operator:a", b"\x00" * 8) is None
    taken = staged.take("operator:a", digest[:8])
    assert taken is not None and taken.digest == digest
    taken.discard()


def test_inspect_names_the_encrypted_payload(capsys: pytest.CaptureFixture[str]) -> None:
    require_vectors()
    code, out, err = cli(
        capsys, "manifest", "inspect", str(VECTORS / "fw-encryption_es-ecdh_write.hex")
    )
    assert code == 0, err
    assert (
        "encrypted payload: component 0, A128GCM, in the manifest, "
        "recipients: ECDH-ES+A128KW kid b'kid-2'"
    ) in out


def test_publisher_takes_ciphertext_and_checks_its_size(tmp_path: Path) -> None:
    """The server stores the ciphertext: its size must fit the content algorithm and the
    signed URI must name it; the plaintext digest is the device's to check."""
    from server_helpers import CLASS_A, VENDOR, DeviceSpec, make_setup

    from otacoap.core.errors import PolicyError
    from otacoap.store import DataDir, Publisher
    from otacoap.store.errors import ImageMismatch

    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")])
    image = os.urandom(3000)
    info, ct = encryption.encrypt(image, [KEK], _rand, encryption.A128GCM)
    uri = ids.image_uri(hashlib.sha256(ct).digest())

    def envelope(seq: int, uri: str) -> bytes:
        release = build.Release(
            hashlib.sha256(image).digest(), len(image), VENDOR, CLASS_A, seq, uri,
            encryption_info=info,
        )  # fmt: skip
        return suit.encode_envelope(build.build_envelope(release, setup.key))

    def publish(env: bytes, payload: bytes) -> None:
        d = DataDir(setup.data)
        store = d.open_store()
        path = tmp_path / "payload.bin"
        path.write_bytes(payload)
        try:
            Publisher(store, d.blobs, d.config().publish).publish_file(env, path, "test")
        finally:
            store.close()

    with pytest.raises(ImageMismatch, match="ciphertext"):
        publish(envelope(2, uri), ct[:-16])  # the tag cut off
    with pytest.raises(PolicyError, match="URI"):
        publish(envelope(2, ids.image_uri(hashlib.sha256(image).digest())), ct)
    publish(envelope(2, uri), ct)
    blobs = [p.read_bytes() for p in (setup.data / "blobs").rglob("*") if p.is_file()]
    assert ct in blobs and image not in blobs


def test_manifest_sign_adds_an_esp256_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = cose.generate_key("es256")
    (tmp_path / "k.pem").write_bytes(key.pem)
    release = build.Release(hashlib.sha256(b"i").digest(), 1, "a.example", "c", 1)
    (tmp_path / "in.suit").write_bytes(suit.encode_envelope(build.build_envelope(release)))
    code, _, err = cli(
        capsys, "manifest", "sign", "--key", str(tmp_path / "k.pem"), "--alg", "esp256",
        str(tmp_path / "in.suit"), "-o", str(tmp_path / "out.suit"),
    )  # fmt: skip
    assert code == 0, err
    envelope = suit.decode_envelope((tmp_path / "out.suit").read_bytes())
    (block,) = envelope.authentication.blocks
    assert cose.parse_block(block.raw).alg == cose.ESP256
    trust.accept((tmp_path / "out.suit").read_bytes(), trust.TrustPolicy(anchors=(key.public,)))
    code, _, err = cli(
        capsys, "manifest", "sign", "--key", str(tmp_path / "k.pem"), "--alg", "ed25519",
        str(tmp_path / "in.suit"), "-o", str(tmp_path / "x.suit"),
    )  # fmt: skip
    assert code == 1 and len(err.splitlines()) == 1
