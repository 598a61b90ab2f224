"""Factory provisioning and read-only inspection of a simulated device's flash.

Provisioning is the one trusted step in a device's life: it writes the read-only
identity (with the trust anchors), the factory image into slot 0, optionally the
factory envelope that vouches for it, and the first state record. It builds the new
flash in a temporary file and renames it into place only after a test boot succeeded,
so a failed provisioning never leaves a half-made device behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otacoap.core import trust
from otacoap.core.errors import OtaError
from otacoap.core.update_record import BootStatus, SlotInfo

from .bootloader import BootError, Bootloader, trust_policy, verify_slot
from .device_state import DeviceState, StateError, StateFile, sha256
from .flash import SimFlash
from .layout import (
    DEFAULT_MAX_TRIAL_BOOTS,
    DEFAULT_SECTOR_SIZE,
    DEFAULT_SLOT_SIZE,
    DEFAULT_WRITE_ALIGN,
    FlashLayout,
    Identity,
    ProvisioningError,
    ensure_hardware_key,
    load_hardware_key,
    open_flash,
)
from .slot_view import SlotView

_IO_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ProvisionResult:
    path: Path
    identity: Identity
    sequence: int
    image_digest: bytes


def provision(
    path: str | os.PathLike[str],
    *,
    device_id: str,
    psk: bytes,
    vendor_domain: str,
    class_info: str,
    anchors_pem: tuple[bytes, ...],
    factory_image: bytes,
    factory_envelope: bytes | None = None,
    slot_size: int = DEFAULT_SLOT_SIZE,
    sector_size: int = DEFAULT_SECTOR_SIZE,
    write_align: int = DEFAULT_WRITE_ALIGN,
    max_trial_boots: int = DEFAULT_MAX_TRIAL_BOOTS,
    force: bool = False,
    roots_pem: tuple[bytes, ...] = (),
    root_threshold: int = 1,
    decryption_keks: tuple[bytes, ...] = (),
    decryption_ec_der: bytes = b"",
    seal: bool = False,
    aux_slot_size: int = 0,
    factory_aux_image: bytes = b"",
) -> ProvisionResult:
    """Create a provisioned flash file at `path`; raise ProvisioningError on bad input.

    `seal`: store the PSK and decryption keys sealed under the simulated chip's hardware
    unique key (created beside the flash file, `layout.huk_path`), so the flash file
    alone neither reveals them nor clones the device.

    `aux_slot_size` > 0 makes a multi-component device (docs/decisions/multi-component.md):
    `factory_aux_image` goes into component 1's region of slot 0, and the factory
    envelope (required then) must vouch for both images.
    """
    target = Path(path)
    if target.exists() and not force:
        raise ProvisioningError(f"{target}: already exists (use --force to replace it)")
    layout = FlashLayout(sector_size, write_align, slot_size, aux_slot_size=aux_slot_size)
    if not factory_image:
        raise ProvisioningError("factory image is empty")
    if layout.components > 1 and (not factory_aux_image or factory_envelope is None):
        raise ProvisioningError(
            "a multi-component device needs a factory second image and an envelope for both"
        )
    if layout.components == 1 and factory_aux_image:
        raise ProvisioningError("a second factory image needs an aux slot size")
    if len(factory_aux_image) > layout.aux_slot_size:
        raise ProvisioningError(
            f"factory second image of {len(factory_aux_image)} bytes does not fit the "
            f"{layout.aux_slot_size}-byte region"
        )
    if len(factory_image) > layout.slot_size:
        raise ProvisioningError(
            f"factory image of {len(factory_image)} bytes does not fit the "
            f"{layout.slot_size}-byte slot"
        )
    image_digest = hashlib.sha256(factory_image).digest()
    try:
        identity = Identity(
            device_id=device_id,
            psk=psk,
            vendor_domain=vendor_domain,
            class_info=class_info,
            anchors_pem=anchors_pem,
            layout=layout,
            factory_size=len(factory_image),
            factory_digest=image_digest,
            max_trial_boots=max_trial_boots,
            roots_pem=roots_pem,
            root_threshold=root_threshold,
            decryption_keks=decryption_keks,
            decryption_ec_der=decryption_ec_der,
            hardware_key=ensure_hardware_key(target) if seal else None,
        )
        identity.anchors()  # every anchor must load now, not at the first update
        identity.roots()
    except OtaError as exc:
        raise ProvisioningError(f"trust anchor: {exc}") from exc

    sequence, manifest_digest = 0, None
    if factory_envelope is not None:
        try:
            vm = trust.accept(
                factory_envelope,
                trust_policy(identity, sequence=None, sequence_digest=None, uri_prefixes=None),
            )
        except OtaError as exc:
            raise ProvisioningError(f"factory envelope refused: {exc}") from exc
        sequence, manifest_digest = vm.sequence_number, vm.manifest_digest.value

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        flash = SimFlash.create(tmp, layout.total_size, layout.sector_size, layout.write_align)
        flash.hardware_key = identity.hardware_key
        try:
            flash.write(layout.identity_offset, identity.encode())
            factory_view = SlotView(flash, layout, 0, image_digest)
            _write_padded(factory_view, layout.slot_offset(0), factory_image)
            slot = SlotInfo(len(factory_image), image_digest, sequence, manifest_digest)
            extra: tuple[tuple[int, bytes], ...] = ()
            if factory_aux_image:
                aux_digest = sha256(factory_aux_image)
                aux_view = SlotView(flash, layout, 0, aux_digest, component=1)
                _write_padded(aux_view, layout.component_offset(0, 1), factory_aux_image)
                extra = ((len(factory_aux_image), aux_digest),)
            if factory_envelope is not None:
                _write_padded(flash, layout.envelope_offset(0), factory_envelope)
                slot = SlotInfo(
                    len(factory_image),
                    image_digest,
                    sequence,
                    manifest_digest,
                    len(factory_envelope),
                    sha256(factory_envelope),
                    extra,
                )
            state = DeviceState(
                sequence=sequence,
                sequence_digest=manifest_digest,
                active=0,
                boot=BootStatus.CONFIRMED,
                slots=(slot, None),
                anchors=identity.provisioned_anchors(),  # anchor list version 0
            )
            StateFile(flash, layout).save(state)
            if factory_envelope is not None:
                _check_factory_envelope(flash, identity, state)
            Bootloader(flash).boot()  # the device must boot before it leaves the factory
        finally:
            flash.close()
        os.replace(tmp, target)
    except BootError as exc:
        raise ProvisioningError(f"provisioned device does not boot: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return ProvisionResult(target, identity, sequence, image_digest)


def _check_factory_envelope(flash: SimFlash, identity: Identity, state: DeviceState) -> None:
    try:
        verify_slot(flash, identity, state, 0, candidate=False)
    except OtaError as exc:
        raise ProvisioningError(f"factory envelope does not vouch for the image: {exc}") from exc


def _write_padded(flash: SimFlash | SlotView, offset: int, data: bytes) -> None:
    """Program data on erased flash in bounded chunks, padding the tail with 0xFF."""
    align = flash.write_align
    pos = 0
    while pos < len(data):
        chunk = data[pos : pos + _IO_CHUNK]
        if len(chunk) % align:
            chunk = chunk + b"\xff" * (align - len(chunk) % align)
        flash.write(offset + pos, chunk)
        pos += _IO_CHUNK


def _hash_view(view: SlotView, base: int, size: int) -> str:
    digest = hashlib.sha256()
    for pos in range(0, size, 4096):
        digest.update(view.read(base + pos, min(4096, size - pos)))
    return digest.hexdigest()


def _next_boot_problem(path: str | os.PathLike[str]) -> str:
    """What stops the next power-on, or "" if it boots: found by really booting a copy.

    Checking the running slot alone is not the truth: a boot can also fail on its
    way there (a state record it cannot save, a candidate it must judge). So the
    bootloader runs on a scratch copy of the flash, and the original stays untouched.
    """
    with tempfile.TemporaryDirectory(prefix="otacoap-status-") as tmp:
        scratch = Path(tmp) / "flash"
        shutil.copyfile(path, scratch)
        try:
            flash, _ = open_flash(scratch, hardware_key=load_hardware_key(path))
        except (ProvisioningError, OSError, ValueError) as exc:
            return f"flash does not open: {exc}"
        try:
            Bootloader(flash).boot()
        except Exception as exc:  # whatever stops a boot is the answer, typed or not
            return str(exc) or type(exc).__name__
        finally:
            flash.close()
    return ""


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the bootloader would see, without writing a single byte.

    `sequence_number` is the trusted (installed) sequence number; `image_digest` is the
    SHA-256 of the image the device runs, hashed from the flash.
    """
    flash, identity = open_flash(path)
    try:
        lay = identity.layout
        try:
            state = StateFile(flash, lay).load()
        except StateError as exc:
            raise ProvisioningError(str(exc)) from exc
        running = state.running
        info = state.slots[running]
        if info is None:
            raise ProvisioningError(f"running slot {running} holds no image")
        digest = hashlib.sha256()
        view = SlotView(flash, lay, running, info.image_digest)
        pos, end = 0, info.image_size
        while pos < end:
            n = min(4096, end - pos)
            digest.update(view.read(lay.slot_offset(running) + pos, n))
            pos += n
        problem = _next_boot_problem(path)
        bootable = not problem
        pending = None
        if state.boot == BootStatus.PENDING:
            cand = state.slots[state.candidate]
            pending = {
                "slot": state.candidate,
                "sequence_number": cand.sequence if cand else None,
            }
        download = None
        if state.download is not None:
            d = state.download
            download = {
                "manifest_digest": d.manifest_digest.hex(),
                "slot": d.slot,
                "bytes": d.durable,
                "image_size": d.image_size,
            }
        more: dict[str, Any] = {}
        if lay.components > 1:
            # Component 1's image, hashed from its region of the running slot.
            aux = [
                _hash_view(SlotView(flash, lay, running, d, 1), lay.component_offset(running, 1), n)
                for n, d in info.extra
            ]
            more = {"component_image_digests": aux, "aux_slot_size": lay.aux_slot_size}
        return {
            **more,
            "device_id": identity.device_id,
            "vendor_domain": identity.vendor_domain,
            "class_info": identity.class_info,
            "sequence_number": state.sequence,
            "running_sequence_number": info.sequence,
            "running_slot": running,
            "active_slot": state.active,
            "image_size": info.image_size,
            "image_digest": digest.hexdigest(),
            "manifest_digest": info.manifest_digest.hex() if info.manifest_digest else None,
            "boot_status": state.boot.value,
            "bootable": bootable,
            "problem": problem,
            "pending": pending,
            "download": download,
            "trial_boots": state.trial.boots if state.trial else 0,
            "report_counter": state.report_counter,
            "queued_reports": len(state.reports),
            "reports_lost": state.reports_lost,
            "anchor_version": state.anchor_version,
            "slot_size": lay.slot_size,
            "flash_size": lay.total_size,
        }
    finally:
        flash.close()
