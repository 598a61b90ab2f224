"""Delta updates meet encrypted payloads: the delta of an encrypted release is an
encrypted delta (issue 13 §3b; tests/test_encrypted_delta_*.py test it working), and
every side refuses the mixes that would leak or mislead with a one-line refusal: a
plaintext patch of an encrypted release, an encrypted delta the device has no key for,
an encrypted delta built without the release it falls back to.

(A device whose *slots* are encrypted at rest applies deltas normally:
tests/test_delta_update.py, test_device_with_slots_encrypted_at_rest_...)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
from delta_rig import delta_release, synthetic_pair

from otacoap.cli import main
from otacoap.core import build, cose, encryption, interpreter, payload_kind, trust
from otacoap.core.errors import OtaError, PolicyError

KEK = encryption.KekRecipient(bytes(range(16)), b"k1")


class _Source:
    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)


def test_build_refuses_a_plaintext_patch_for_an_encrypted_release() -> None:
    old, new = synthetic_pair()
    info = delta_release(cose.generate_key("es256"), old, new, 2).info
    raw, ct = encryption.encrypt(new, [KEK], os.urandom)
    release = build.Release(
        hashlib.sha256(new).digest(), len(new), "a.example", "c", 2,
        uri="/fw/" + hashlib.sha256(ct).hexdigest()[:16], encryption_info=raw,
    )  # fmt: skip
    with pytest.raises(OtaError, match="delta must be encrypted too"):
        build.build_manifest(release, info)
    build.build_manifest(release)  # the full encrypted form is fine
    patch_raw, _ = encryption.encrypt(b"patch", [KEK], os.urandom)
    enc = build.EncryptedPatch(patch_raw, "/fw/0011223344556677")
    build.build_manifest(release, info, encrypted_patch=enc)  # the encrypted delta is fine
    plain = dataclasses.replace(release, encryption_info=None, uri=None)
    with pytest.raises(OtaError, match="encrypted patch needs an encrypted release"):
        build.build_manifest(plain, info, encrypted_patch=enc)


def test_device_refuses_an_encrypted_delta_it_has_no_key_for() -> None:
    key = cose.generate_key("es256")
    old, new = synthetic_pair()
    rel = delta_release(key, old, new, 2)
    vm = trust.accept(rel.delta_only, trust.TrustPolicy((key.public,)))
    device = interpreter.DeviceDescription(vm.vendor_ids[0], vm.class_ids[0])
    actions = interpreter.drive(
        interpreter.run(vm.envelope, interpreter.UPDATE, device), lambda a: True
    )
    (fetch,) = [a for a in actions if isinstance(a, interpreter.Fetch)]
    kind = payload_kind.select_kind(fetch, vm, source=_Source())
    assert kind.name == "delta" and kind.payload_size(len(new)) == len(rel.patch)
    raw, _ = encryption.encrypt(rel.patch, [KEK], os.urandom)
    encrypted = dataclasses.replace(fetch, encryption_info=raw)
    with pytest.raises(encryption.NoDecryptionKey):
        payload_kind.select_kind(encrypted, vm, None, source=_Source())
    with pytest.raises(PolicyError, match="cannot apply delta"):
        keys = encryption.DecryptionKeys(keks=((None, KEK.key),))
        payload_kind.select_kind(encrypted, vm, keys, None)  # a device without deltas


def _build(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    old, new = synthetic_pair()
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    key = cose.generate_key("es256")
    (tmp_path / "k.pem").write_bytes(key.pem)
    enc = cose.generate_key("es256")
    (tmp_path / "enc.pub").write_bytes(enc.public.public_pem())
    argv = [
        "manifest", "build", "--image", str(tmp_path / "new.bin"),
        "--vendor-domain", "a.example", "--class-info", "c", "--seq", "2",
        "--key", str(tmp_path / "k.pem"), "--encrypt-for", str(tmp_path / "enc.pub"),
        "--delta-from", str(tmp_path / "old.bin"), "-o", str(tmp_path / "o.suit"), *extra,
    ]  # fmt: skip
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ((), "--full-envelope"),  # the fallback's ciphertext and encryption info
        (("--payload-out", "fw.enc"), "--patch-out"),  # the patch is the payload
        (("--full-envelope", "missing.suit"), "missing.suit"),
    ],
    ids=["no-full-envelope", "payload-out", "unreadable-full-envelope"],
)
def test_manifest_build_of_an_encrypted_delta_needs_its_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], says: str
) -> None:
    code, err = _build(tmp_path, capsys, *extra)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert says in err
    for name in ("o.suit", "o.suit.patch", "fw.enc"):
        assert not (tmp_path / name).exists(), name
