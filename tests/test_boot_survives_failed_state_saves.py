"""The bootloader boots a valid image whatever happens to its state saves (issue 15 §1:
"every failure to save state is a typed error that the bootloader and the agent
handle; the bootloader always boots a valid image").

The outbox brick ended in an untyped error from the trial-boot save, raised on every
power-on. Now a save that fails raises `StateStoreError`, and each of the bootloader's
saves has its answer: a trial that cannot be put on record does not run (the active
image boots, the candidate stays pending), and a revert that cannot be recorded boots
the old image anyway. Here the flash refuses every program operation, the harshest
case, and the device still boots, and updates once the flash works again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from evil_server import Rig, make_rig, stage

from device_sim.bootloader import Bootloader, BootResult
from device_sim.firmware import make_image
from device_sim.flash import FlashFaults
from device_sim.layout import open_flash


def _stage(rig: Rig) -> bytes:
    """Download and stage seq 6 (PENDING); returns its image."""
    image = make_image(6000, version=6, seed=6)
    stage(rig, image, 6)
    return image


def _boot(rig: Rig, *, failing: bool) -> BootResult:
    flash, _ = open_flash(rig.path)
    try:
        if failing:
            flash.faults = FlashFaults(fail_write_probability=1.0)
        return Bootloader(flash).boot()
    finally:
        flash.close()


def test_a_trial_that_cannot_be_recorded_boots_the_active_image(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    factory = hashlib.sha256(rig.factory).digest()
    image = _stage(rig)
    for _ in range(3):
        boot = _boot(rig, failing=True)
        assert "trial-deferred" in boot.events
        assert not boot.test_mode
        assert boot.info.image_digest == factory
    assert rig.info()["boot_status"] == "pending"
    boot = _boot(rig, failing=False)  # the flash works again: the trial runs
    assert boot.test_mode and "trial-boot" in boot.events
    assert boot.info.image_digest == hashlib.sha256(image).digest()


def test_a_revert_that_cannot_be_recorded_boots_the_old_image(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    factory = hashlib.sha256(rig.factory).digest()
    _stage(rig)
    assert _boot(rig, failing=False).test_mode  # on trial, never confirmed
    for _ in range(3):
        boot = _boot(rig, failing=True)
        assert "reverted" in boot.events and not boot.test_mode
        assert boot.info.image_digest == factory
    assert rig.info()["boot_status"] == "testing"  # nothing could be written
    boot = _boot(rig, failing=False)
    assert "reverted" in boot.events and boot.info.image_digest == factory
    assert rig.info()["boot_status"] == "confirmed"
