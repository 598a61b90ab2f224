"""The device's PSK and decryption keys are sealed under a simulated hardware unique key
(issue 13 §1, "Secure storage"): the flash file does not contain them, a copy of it on
another simulated device (another HUK) does not open, and the device itself boots and
reads them as before.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from evil_server import CLASS, VENDOR, make_rig

from device_sim.bootloader import Bootloader
from device_sim.firmware import make_image
from device_sim.layout import (
    Identity,
    ProvisioningError,
    ensure_hardware_key,
    huk_path,
    open_flash,
    peek_identity,
)
from device_sim.provision import provision
from otacoap.core import cose, encryption, sealing

ROOT = Path(__file__).resolve().parent.parent
PSK = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")
KEK = bytes.fromhex("0f" * 16)


def _provision(path: Path, *, seal: bool, device_key: cose.SigningKey) -> None:
    author = cose.generate_key("es256")
    provision(
        path,
        device_id="sealed-1",
        psk=PSK,
        vendor_domain=VENDOR,
        class_info=CLASS,
        anchors_pem=(author.public.public_pem(),),
        factory_image=make_image(3000, version=1, seed=1),
        slot_size=16 * 1024,
        decryption_keks=(KEK,),
        decryption_ec_der=encryption.private_der(encryption.load_ec_private(device_key.pem)),
        seal=seal,
        force=True,
    )


def test_sealed_secrets_are_not_in_the_flash_file(tmp_path: Path) -> None:
    device_key = cose.generate_key("es256")
    der = encryption.private_der(encryption.load_ec_private(device_key.pem))
    clear, sealed = tmp_path / "clear.flash", tmp_path / "sealed.flash"
    _provision(clear, seal=False, device_key=device_key)
    _provision(sealed, seal=True, device_key=device_key)
    assert PSK in clear.read_bytes() and KEK in clear.read_bytes()  # the control
    raw = sealed.read_bytes()
    for secret in (PSK, KEK, der[-32:]):
        assert secret not in raw
    assert huk_path(sealed).is_file() and huk_path(sealed).read_bytes() not in raw
    # The device itself opens and uses them.
    flash, identity = open_flash(sealed)
    try:
        assert identity.psk == PSK and identity.decryption_keks == (KEK,)
        assert identity.decryption_ec_der == der
        assert Bootloader(flash).boot().slot == 0
    finally:
        flash.close()


def test_a_copied_flash_does_not_open_on_another_device(tmp_path: Path) -> None:
    original = tmp_path / "a.flash"
    _provision(original, seal=True, device_key=cose.generate_key("es256"))
    clone = tmp_path / "b.flash"
    shutil.copyfile(original, clone)
    with pytest.raises(ProvisioningError, match="no hardware key"):
        open_flash(clone)  # a chip with no HUK fused
    ensure_hardware_key(clone)  # another chip: its own HUK
    with pytest.raises(ProvisioningError, match="hardware key"):
        open_flash(clone)
    with pytest.raises(ProvisioningError):
        peek_identity(clone)
    # Same flash bytes with the original chip's key: it is the same device.
    shutil.copyfile(huk_path(original), huk_path(clone))
    _, identity = open_flash(clone)
    assert identity.psk == PSK


def test_sealed_blob_is_bound_to_its_device_id(tmp_path: Path) -> None:
    huk = bytes(range(32))
    blob = sealing.seal(huk, b"secret", b"dev-1")
    assert sealing.unseal(huk, blob, b"dev-1") == b"secret"
    with pytest.raises(sealing.UnsealError):
        sealing.unseal(huk, blob, b"dev-2")
    with pytest.raises(sealing.UnsealError):
        sealing.unseal(bytes(32), blob, b"dev-1")


def test_unsealed_identities_still_round_trip(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    flash, identity = open_flash(rig.path)
    flash.close()
    assert identity.hardware_key is None
    assert Identity.decode(identity.encode()) == identity


def test_cli_provision_seals_by_default(tmp_path: Path) -> None:
    author = cose.generate_key("es256")
    (tmp_path / "a.pub").write_bytes(author.public.public_pem())
    (tmp_path / "fw.bin").write_bytes(make_image(3000, version=1, seed=1))
    (tmp_path / "class.kek").write_text(KEK.hex())
    flash = tmp_path / "d.flash"
    done = subprocess.run(
        [
            sys.executable, "-m", "device_sim", "provision", "--flash", str(flash),
            "--id", "cli-dev", "--psk", PSK.hex(), "--vendor-domain", VENDOR,
            "--class-info", CLASS, "--trust", str(tmp_path / "a.pub"),
            "--factory-image", str(tmp_path / "fw.bin"), "--slot-size", "16K",
            "--kek", str(tmp_path / "class.kek"),
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert PSK not in flash.read_bytes() and KEK not in flash.read_bytes()
    status = subprocess.run(
        [sys.executable, "-m", "device_sim", "status", "--flash", str(flash)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
