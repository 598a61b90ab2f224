"""Delta updates meet encrypted payloads: an encrypted delta is out of scope, and every
side says so with a one-line refusal instead of a plaintext patch or a wrong decode.

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


def test_build_refuses_a_patch_for_an_encrypted_release() -> None:
    old, new = synthetic_pair()
    info = delta_release(cose.generate_key("es256"), old, new, 2).info
    raw, ct = encryption.encrypt(new, [KEK], os.urandom)
    release = build.Release(
        hashlib.sha256(new).digest(), len(new), "a.example", "c", 2,
        uri="/fw/" + hashlib.sha256(ct).hexdigest()[:16], encryption_info=raw,
    )  # fmt: skip
    with pytest.raises(OtaError, match="encrypted release cannot have a delta"):
        build.build_manifest(release, info)
    build.build_manifest(release)  # the full encrypted form is fine


def test_device_refuses_a_delta_fetch_that_carries_encryption_info() -> None:
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
    with pytest.raises(PolicyError, match="encrypted delta"):
        payload_kind.select_kind(dataclasses.replace(fetch, encryption_info=raw), vm, None)


def test_manifest_build_refuses_delta_from_with_encryption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
        "--payload-out", str(tmp_path / "fw.enc"), "--delta-from", str(tmp_path / "old.bin"),
        "-o", str(tmp_path / "o.suit"),
    ]  # fmt: skip
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "--delta-from" in err and "encryption" in err
    for name in ("o.suit", "o.suit.patch", "fw.enc"):
        assert not (tmp_path / name).exists(), name
