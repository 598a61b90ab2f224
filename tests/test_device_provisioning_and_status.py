"""Provisioning writes a device that boots; status reads it as the bootloader would.

Covers the flash layout (areas are whole sectors, disjoint, in order), the read-only
identity record (round trip, damage is refused, never guessed), the state record (a
damaged copy falls back to the other, two damaged copies fail closed: ATTACKS.md #45),
and the `python -m device_sim provision|status` command line (one-line errors, exit
codes, --json).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from evil_server import CLASS, DEVICE_ID, PSK, VENDOR, make_rig, manifest_bytes, sign

from device_sim.bootloader import Bootloader
from device_sim.device_state import StateError, StateFile
from device_sim.firmware import make_image
from device_sim.layout import (
    MIN_STATE_COPY_SIZE,
    FlashLayout,
    Identity,
    ProvisioningError,
    open_flash,
)
from device_sim.provision import inspect, provision
from otacoap.core import cose

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_sim", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


# -- layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("sector", [256, 1024, 4096])
def test_layout_areas_are_disjoint_whole_sectors_in_order(sector: int) -> None:
    state = max(2 * sector, MIN_STATE_COPY_SIZE)  # the worst-case state record must fit
    lay = FlashLayout(sector_size=sector, slot_size=16 * sector, state_copy_size=state)
    areas = list(lay.areas().values())
    end = 0
    for offset, length in areas:
        assert offset == end, "areas are contiguous and in the documented order"
        assert offset % sector == 0 and length % sector == 0 and length > 0
        end = offset + length
    assert end == lay.total_size
    assert lay.envelope_area_size >= 64 * 1024  # any envelope the protocol allows fits


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sector_size": 1000},
        {"sector_size": 128},
        {"slot_size": 4097},
        {"write_align": 3},
        {"state_copy_size": 100},
        {"sector_size": 1024, "state_copy_size": 2048},  # too small for the state record
    ],
)
def test_bad_layouts_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ProvisioningError):
        FlashLayout(**kwargs)


# -- provisioning ----------------------------------------------------------------------


def test_provisioned_device_boots_its_factory_image(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=7)
    info = rig.info()
    assert info["sequence_number"] == 7
    assert info["running_slot"] == 0 and info["boot_status"] == "confirmed"
    assert info["image_digest"] == hashlib.sha256(rig.factory).hexdigest()
    assert info["bootable"] and info["download"] is None and info["pending"] is None
    assert rig.boots() == (0, hashlib.sha256(rig.factory).digest())
    flash, identity = open_flash(rig.path)
    flash.close()
    assert identity.device_id == DEVICE_ID and identity.psk == PSK
    assert identity.vendor_domain == VENDOR and identity.class_info == CLASS


def test_provision_without_envelope_starts_at_seq_zero_and_boots_by_identity_digest(
    tmp_path: Path,
) -> None:
    key = cose.generate_key("ed25519")
    image = b"\x01\x02\x03" * 1001  # not a multiple of the write alignment
    provision(
        tmp_path / "f.bin",
        device_id="d",
        psk=PSK,
        vendor_domain=VENDOR,
        class_info=CLASS,
        anchors_pem=(key.public.public_pem(),),
        factory_image=image,
        slot_size=16 * 1024,
    )
    info = inspect(tmp_path / "f.bin")
    assert info["sequence_number"] == 0 and info["manifest_digest"] is None
    assert info["image_digest"] == hashlib.sha256(image).hexdigest()


def test_provision_refuses_bad_input_and_leaves_no_file(tmp_path: Path) -> None:
    key = cose.generate_key("es256")
    other = cose.generate_key("es256")
    image = make_image(2000)
    good = {
        "device_id": "d",
        "psk": PSK,
        "vendor_domain": VENDOR,
        "class_info": CLASS,
        "anchors_pem": (key.public.public_pem(),),
        "factory_image": image,
        "slot_size": 16 * 1024,
    }
    target = tmp_path / "f.bin"
    bad_cases = [
        {"psk": b"short"},
        {"device_id": ""},
        {"device_id": "caf\u00e9"},
        {"anchors_pem": ()},
        {"anchors_pem": (b"not a key",)},
        {"factory_image": b""},
        {"factory_image": make_image(17 * 1024)},
        # An envelope signed by a key the device does not trust.
        {"factory_envelope": sign(manifest_bytes(image=image, seq=1), other)},
        # A trusted envelope for a different image.
        {"factory_envelope": sign(manifest_bytes(image=make_image(2000, seed=9), seq=1), key)},
        # A trusted envelope for another device class.
        {"factory_envelope": sign(manifest_bytes(image=image, seq=1, klass="other"), key)},
    ]
    for case in bad_cases:
        with pytest.raises(ProvisioningError):
            provision(target, **{**good, **case})  # type: ignore[arg-type]
        assert not target.exists()
        assert not list(tmp_path.iterdir()), "no temporary file is left behind"
    provision(target, **good)  # type: ignore[arg-type]
    with pytest.raises(ProvisioningError, match="already exists"):
        provision(target, **good)  # type: ignore[arg-type]


def test_identity_record_round_trips_and_refuses_damage(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    flash, identity = open_flash(rig.path)
    flash.close()
    raw = identity.encode()
    assert Identity.decode(raw) == identity
    for i in range(0, len(raw) - 4, 7):  # every 7th byte: header, CBOR and CRC regions
        damaged = bytearray(raw)
        damaged[i] ^= 0x01
        with pytest.raises(ProvisioningError):
            Identity.decode(bytes(damaged))


def test_damaged_state_copy_falls_back_and_two_damaged_copies_fail_closed(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, seq=9)
    flash, identity = open_flash(rig.path)
    sf = StateFile(flash, identity.layout)
    state = sf.load()
    sf.save(state)  # two valid copies now, both seq 9
    counters = sf.store.copy_counters()
    newest = 0 if (counters[0] or 0) > (counters[1] or 0) else 1
    flash.close()

    def flip(copy: int) -> None:
        offset = identity.layout.state_offset + copy * identity.layout.state_copy_size + 20
        with open(rig.path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x80]))

    flip(newest)
    assert rig.info()["sequence_number"] == 9, "the older copy is used"
    assert rig.boots()[0] == 0
    flip(1 - newest)
    with pytest.raises(ProvisioningError, match="no valid state"):
        rig.info()
    flash, _ = open_flash(rig.path)
    with pytest.raises(StateError):
        Bootloader(flash).boot()  # never "factory defaults, seq 0"
    flash.close()


# -- the command line ------------------------------------------------------------------


def test_cli_provision_and_status(tmp_path: Path) -> None:
    key = cose.generate_key("es256")
    (tmp_path / "author.pub").write_bytes(key.public.public_pem())
    image = make_image(3000, version=4)
    (tmp_path / "fw.bin").write_bytes(image)
    (tmp_path / "fw.suit").write_text(sign(manifest_bytes(image=image, seq=4), key).hex())
    flash = tmp_path / "dev.flash"
    args = [
        "provision",
        "--flash",
        str(flash),
        "--id",
        DEVICE_ID,
        "--psk",
        PSK.hex(),
        "--vendor-domain",
        VENDOR,
        "--class-info",
        CLASS,
        "--trust",
        str(tmp_path / "author.pub"),
        "--factory-image",
        str(tmp_path / "fw.bin"),
        "--factory-envelope",
        str(tmp_path / "fw.suit"),
        "--slot-size",
        "64K",
    ]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert "seq 4" in done.stdout

    status = _cli("status", "--flash", str(flash), "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["sequence_number"] == 4
    assert info["image_digest"] == hashlib.sha256(image).hexdigest()
    human = _cli("status", "--flash", str(flash))
    assert human.returncode == 0 and "sha256 " + hashlib.sha256(image).hexdigest() in human.stdout

    again = _cli(*args)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["status", "--flash", "/nonexistent/flash"], 1, "no such flash file"),
        (["status"], 2, "--flash"),
        (["run", "--flash", "x", "--server", "coap://127.0.0.1:1"], 1, "coaps://"),
        (["run", "--flash", "x", "--server", "coaps://h:1", "--max-time", "5"], 1, "--watch"),
        (["run", "--flash", "x", "--server", "coaps://h:1", "--block-size", "100"], 2, "choice"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], code: int, needle: str) -> None:
    done = _cli(*args)
    assert done.returncode == code
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") <= 1  # argparse usage line + error at most


def test_cli_garbage_flash_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"\x00" * 8192)
    done = _cli("status", "--flash", str(tmp_path / "junk"))
    assert done.returncode == 1 and "not provisioned" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("sub", [[], ["provision"], ["status"], ["run"]])
def test_cli_help_everywhere(sub: list[str]) -> None:
    done = _cli(*sub, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout
