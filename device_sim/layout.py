"""Where everything lives in the simulated device's flash, and the read-only identity.

Layout (offsets grow downwards; every area is whole sectors)::

    identity      read-only after provisioning: device id, PSK, vendor/class ids,
                  trust anchors, the layout itself, the factory image digest
    state copy 0  \\ device_sim.record_store.StateStore: two copies, the newest valid one
    state copy 1  /  wins (DeviceState in device_sim.device_state)
    envelope 0    the SUIT envelope that vouches for slot 0 (<= 64 KiB)
    envelope 1    the SUIT envelope that vouches for slot 1
    slot 0        image slot
    slot 1        image slot
    aux 0         component 1's region of slot 0 \\  only on a multi-component device
    aux 1         component 1's region of slot 1 /  (aux_slot_size > 0)

Slots are symmetric (A/B with no copy): the state names the *active* slot, an update
is staged into the other one, and activating it is a single power-safe state write. So
"slot A (running)" and "slot B (staging)" are roles that alternate between slot 0 and
slot 1.

A multi-component device (a second image: data, or another processor's firmware) has
one more region per slot, appended after slot 1 so that every offset of a
single-component layout stays where it was. "Slot N" then means the pair (slot N,
aux N): the one envelope in envelope area N vouches for both, and the one `active`
field of the state record switches both at once (docs/decisions/multi-component.md).

The identity record is written once at provisioning and never erased by the device. It
plays the part of a ROM'd root of trust: the trust anchors and the factory image
digest come from here, never from anything the network can change. It is framed like
a state record (magic, length, CRC) but has one copy only: if it is damaged the device
refuses to run rather than guessing.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otacoap.core import anchor_list, cbor, cose, encryption, ids, protocol, sealing
from otacoap.core.errors import OtaError
from otacoap.core.sizes import round_up
from otacoap.fsutil import atomic_write

from .flash import FlashFaults, SimFlash

IDENTITY_MAGIC = b"OTAI"
IDENTITY_VERSION = 1
_ID_HEADER = struct.Struct("<4sBI")  # magic, version, payload length
_ID_TRAILER = struct.Struct("<I")  # crc32 over header + payload

DEFAULT_SECTOR_SIZE = 4096
DEFAULT_WRITE_ALIGN = 4
DEFAULT_SLOT_SIZE = 1024 * 1024
DEFAULT_STATE_COPY_SIZE = 8 * 1024
MIN_STATE_COPY_SIZE = 4096
"""Each state copy must hold device_state.worst_case_record_size() (a test checks)."""
IDENTITY_AREA_SIZE = 4096
ENVELOPE_AREA_SIZE = protocol.MAX_ENVELOPE_SIZE
DEFAULT_MAX_TRIAL_BOOTS = 3

MAX_ANCHORS = 8
MAX_IDENTITY_TEXT = 256


class ProvisioningError(Exception):
    """The identity or layout is unusable: the device cannot (or may not) run."""


@dataclass(frozen=True)
class FlashLayout:
    """Offsets of every area, derived from the geometry and the slot size."""

    sector_size: int = DEFAULT_SECTOR_SIZE
    write_align: int = DEFAULT_WRITE_ALIGN
    slot_size: int = DEFAULT_SLOT_SIZE
    state_copy_size: int = DEFAULT_STATE_COPY_SIZE
    aux_slot_size: int = 0  # > 0: a second component, one region of this size per slot

    def __post_init__(self) -> None:
        ss = self.sector_size
        if ss <= 0 or ss & (ss - 1) or ss < 256:
            raise ProvisioningError("sector size must be a power of two of at least 256")
        if self.write_align <= 0 or ss % self.write_align or self.write_align > 16:
            raise ProvisioningError("write alignment must divide the sector size (<= 16)")
        if self.slot_size <= 0 or self.slot_size % ss:
            raise ProvisioningError(f"slot size must be a positive multiple of {ss} bytes")
        if self.aux_slot_size < 0 or self.aux_slot_size % ss:
            raise ProvisioningError(f"aux slot size must be a multiple of {ss} bytes")
        if self.state_copy_size < MIN_STATE_COPY_SIZE or self.state_copy_size % ss:
            raise ProvisioningError(
                f"state copy size must be whole sectors of at least {MIN_STATE_COPY_SIZE} bytes"
            )

    @property
    def identity_offset(self) -> int:
        return 0

    @property
    def identity_size(self) -> int:
        return round_up(IDENTITY_AREA_SIZE, self.sector_size)

    @property
    def state_offset(self) -> int:
        return self.identity_size

    @property
    def envelope_area_size(self) -> int:
        return round_up(ENVELOPE_AREA_SIZE, self.sector_size)

    def envelope_offset(self, slot: int) -> int:
        _check_slot(slot)
        return self.state_offset + 2 * self.state_copy_size + slot * self.envelope_area_size

    def slot_offset(self, slot: int) -> int:
        _check_slot(slot)
        return self.envelope_offset(0) + 2 * self.envelope_area_size + slot * self.slot_size

    @property
    def components(self) -> int:
        """How many components (images) every slot holds."""
        return 2 if self.aux_slot_size else 1

    def component_offset(self, slot: int, component: int) -> int:
        """Where component `component` of slot `slot` starts (component 0: the slot)."""
        if component == 0:
            return self.slot_offset(slot)
        if component != 1 or not self.aux_slot_size:
            raise ValueError(f"this layout has no component {component}")
        _check_slot(slot)
        return self.slot_offset(1) + self.slot_size + slot * self.aux_slot_size

    def component_size(self, component: int) -> int:
        if component == 0:
            return self.slot_size
        if component != 1 or not self.aux_slot_size:
            raise ValueError(f"this layout has no component {component}")
        return self.aux_slot_size

    @property
    def total_size(self) -> int:
        return self.slot_offset(1) + self.slot_size + 2 * self.aux_slot_size

    def areas(self) -> dict[str, tuple[int, int]]:
        """Name -> (offset, length), for tests that check who wrote where."""
        return {
            "identity": (self.identity_offset, self.identity_size),
            "state": (self.state_offset, 2 * self.state_copy_size),
            "envelope0": (self.envelope_offset(0), self.envelope_area_size),
            "envelope1": (self.envelope_offset(1), self.envelope_area_size),
            "slot0": (self.slot_offset(0), self.slot_size),
            "slot1": (self.slot_offset(1), self.slot_size),
            **{
                f"aux{slot}": (self.component_offset(slot, 1), self.aux_slot_size)
                for slot in (0, 1)
                if self.aux_slot_size
            },
        }

    def to_cbor(self) -> dict[str, int]:
        return {
            "sector": self.sector_size,
            "align": self.write_align,
            "slot": self.slot_size,
            "state": self.state_copy_size,
            # absent on single-component layouts (identities written before read as before)
            **({"aux": self.aux_slot_size} if self.aux_slot_size else {}),
        }

    @classmethod
    def from_cbor(cls, value: Any) -> FlashLayout:
        if not isinstance(value, dict):
            raise ProvisioningError("identity: layout is not a map")
        try:
            return cls(
                _int(value["sector"]),
                _int(value["align"]),
                _int(value["slot"]),
                _int(value["state"]),
                _int(value.get("aux", 0)),
            )
        except KeyError as exc:
            raise ProvisioningError(f"identity: layout lacks {exc}") from None


def _check_slot(slot: int) -> None:
    if slot not in (0, 1):
        raise ValueError("slot must be 0 or 1")


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ProvisioningError("identity: expected an unsigned integer")
    return v


def device_uuid(vendor: bytes, device_id: str) -> bytes:
    """The SUIT device-identifier (manifest-34 §8.4.8.4) this device answers to.

    The draft leaves the derivation to the vendor; otacoap uses UUID5 under the vendor
    id, in the spirit of §8.4.8.2, so a manifest for one device cannot match another.
    """
    return uuid.uuid5(uuid.UUID(bytes=vendor), "device:" + device_id).bytes


@dataclass(frozen=True)
class Identity:
    """Everything provisioning wrote; immutable for the life of the device."""

    device_id: str
    psk: bytes = b""
    vendor_domain: str = ""
    class_info: str = ""
    anchors_pem: tuple[bytes, ...] = ()
    layout: FlashLayout = FlashLayout()
    factory_size: int = 0
    factory_digest: bytes = b""
    max_trial_boots: int = DEFAULT_MAX_TRIAL_BOOTS
    # The class's root keys (k-of-n) that sign anchor lists (core.anchor_list). None
    # provisioned: the author keys above are fixed for the device's life (as before).
    roots_pem: tuple[bytes, ...] = ()
    root_threshold: int = 1
    # Payload decryption keys (firmware-encryption): class or device A128KW KEKs and
    # the device's own P-256 private key (PKCS#8 DER) for ECDH-ES+A128KW. Secrets, like
    # the PSK: docs/decisions/firmware-encryption.md has who holds which key.
    decryption_keks: tuple[bytes, ...] = ()
    decryption_ec_der: bytes = b""
    # Set: the PSK and decryption keys are stored sealed under this hardware unique key
    # (core.sealing), so the flash file alone neither reveals nor clones them.
    hardware_key: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.device_id or len(self.device_id) > MAX_IDENTITY_TEXT:
            raise ProvisioningError("device id must be 1..256 characters")
        if not self.device_id.isascii() or not self.device_id.isprintable():
            raise ProvisioningError("device id must be printable ASCII (it is the PSK identity)")
        if not 16 <= len(self.psk) <= 64:
            raise ProvisioningError("PSK must be 16..64 bytes")
        for name in ("vendor_domain", "class_info"):
            text = getattr(self, name)
            if not text or len(text) > MAX_IDENTITY_TEXT:
                raise ProvisioningError(f"{name.replace('_', ' ')} must be 1..256 characters")
        if not 1 <= len(self.anchors_pem) <= MAX_ANCHORS:
            # DESIGN principle 10: an empty trust set is an error, never "trust all".
            raise ProvisioningError(f"need 1..{MAX_ANCHORS} trust anchors")
        if not 1 <= self.max_trial_boots <= 16:
            raise ProvisioningError("max trial boots must be 1..16")
        if self.roots_pem:
            try:
                anchor_list.provisioned(self.roots(), self.root_threshold, self.anchors())
            except (OtaError, ValueError) as exc:
                raise ProvisioningError(f"root keys: {exc}") from None
        if len(self.decryption_keks) > MAX_ANCHORS or any(
            len(k) != 16 for k in self.decryption_keks
        ):
            raise ProvisioningError(f"up to {MAX_ANCHORS} A128KW keys of 16 bytes each")
        if self.decryption_ec_der:
            try:
                encryption.load_ec_private_der(self.decryption_ec_der)
            except encryption.EncryptionError as exc:
                raise ProvisioningError(f"device decryption key: {exc}") from exc

    @property
    def vendor_id(self) -> bytes:
        return ids.vendor_id(self.vendor_domain)

    @property
    def class_id(self) -> bytes:
        return ids.class_id(self.vendor_id, self.class_info)

    @property
    def device_uuid(self) -> bytes:
        return device_uuid(self.vendor_id, self.device_id)

    def anchors(self) -> tuple[cose.TrustAnchor, ...]:
        return tuple(cose.load_public_key(pem) for pem in self.anchors_pem)

    def roots(self) -> tuple[cose.TrustAnchor, ...]:
        return tuple(cose.load_public_key(pem) for pem in self.roots_pem)

    def provisioned_anchors(self) -> anchor_list.TrustedAnchors | None:
        """Anchor list version 0 (roots and first authors), or None without roots."""
        if not self.roots_pem:
            return None
        return anchor_list.provisioned(self.roots(), self.root_threshold, self.anchors())

    def decryption_keys(self) -> encryption.DecryptionKeys:
        """What this device can decrypt payloads with (empty: plain images only)."""
        der = self.decryption_ec_der
        return encryption.DecryptionKeys(
            keks=tuple((None, k) for k in self.decryption_keks),
            ec_private=(encryption.load_ec_private_der(der),) if der else (),
        )

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "id": self.device_id,
            "vendor": self.vendor_domain,
            "class": self.class_info,
            "anchors": list(self.anchors_pem),
            "layout": self.layout.to_cbor(),
            "factory": [self.factory_size, self.factory_digest],
            "trials": self.max_trial_boots,
        }
        if self.roots_pem:  # absent in identities without roots (read as before)
            body["roots"] = [list(self.roots_pem), self.root_threshold]
        secrets = [self.psk, list(self.decryption_keks), self.decryption_ec_der]
        if self.hardware_key is not None:
            context = self.device_id.encode("ascii")
            body["sealed"] = sealing.seal(self.hardware_key, cbor.dumps(secrets), context)
        else:
            body["psk"] = self.psk
            if self.decryption_keks or self.decryption_ec_der:
                body["dec"] = secrets[1:]
        payload = cbor.dumps(body)
        head = _ID_HEADER.pack(IDENTITY_MAGIC, IDENTITY_VERSION, len(payload)) + payload
        record = head + _ID_TRAILER.pack(zlib.crc32(head))
        if len(record) > IDENTITY_AREA_SIZE:
            raise ProvisioningError("identity record does not fit its area (too many anchors?)")
        pad = round_up(len(record), self.layout.write_align) - len(record)
        return record + b"\xff" * pad

    @classmethod
    def decode(cls, data: bytes, hardware_key: bytes | None = None) -> Identity:
        """Parse and check an identity record (the first IDENTITY_AREA_SIZE bytes);
        a sealed one opens only with the `hardware_key` of the device that sealed it."""
        if len(data) < _ID_HEADER.size + _ID_TRAILER.size:
            raise ProvisioningError("flash is too small to hold an identity")
        magic, version, length = _ID_HEADER.unpack_from(data)
        if magic != IDENTITY_MAGIC:
            raise ProvisioningError("flash is not provisioned (no identity record)")
        if version != IDENTITY_VERSION:
            raise ProvisioningError(f"identity record version {version} is not supported")
        end = _ID_HEADER.size + length
        if end + _ID_TRAILER.size > min(len(data), IDENTITY_AREA_SIZE):
            raise ProvisioningError("identity record is damaged (length)")
        (crc,) = _ID_TRAILER.unpack_from(data, end)
        if crc != zlib.crc32(data[:end]):
            raise ProvisioningError("identity record is damaged (CRC)")
        try:
            body = cbor.loads(data[_ID_HEADER.size : end], max_size=IDENTITY_AREA_SIZE)
        except Exception as exc:
            raise ProvisioningError("identity record is damaged (CBOR)") from exc
        if not isinstance(body, dict):
            raise ProvisioningError("identity record is damaged (not a map)")
        try:
            factory = body["factory"]
            anchors = body["anchors"]
            if not (isinstance(factory, list) and len(factory) == 2):
                raise ProvisioningError("identity: bad factory entry")
            if not (isinstance(anchors, list) and all(isinstance(a, bytes) for a in anchors)):
                raise ProvisioningError("identity: bad anchors")
            if "sealed" in body:
                body.update(_unsealed(body, hardware_key))
            dec = body.get("dec", [[], b""])
            if not (
                isinstance(dec, list)
                and len(dec) == 2
                and isinstance(dec[0], list)
                and all(isinstance(k, bytes) for k in dec[0])
                and isinstance(dec[1], bytes)
            ):
                raise ProvisioningError("identity: bad decryption keys")
            fields = (body["id"], body["vendor"], body["class"])
            if not all(isinstance(f, str) for f in fields) or not isinstance(body["psk"], bytes):
                raise ProvisioningError("identity: bad field types")
            return cls(
                device_id=body["id"],
                psk=body["psk"],
                vendor_domain=body["vendor"],
                class_info=body["class"],
                anchors_pem=tuple(anchors),
                layout=FlashLayout.from_cbor(body["layout"]),
                factory_size=_int(factory[0]),
                factory_digest=bytes(factory[1]),
                max_trial_boots=_int(body["trials"]),
                **_roots(body.get("roots")),
                decryption_keks=tuple(dec[0]),
                decryption_ec_der=dec[1],
                hardware_key=hardware_key if "sealed" in body else None,
            )
        except KeyError as exc:
            raise ProvisioningError(f"identity record lacks {exc}") from None


def _roots(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], list)
        and all(isinstance(r, bytes) for r in value[0])
    ):
        raise ProvisioningError("identity: bad roots")
    return {"roots_pem": tuple(value[0]), "root_threshold": _int(value[1])}


def _unsealed(body: dict[str, Any], hardware_key: bytes | None) -> dict[str, Any]:
    sealed, device_id = body["sealed"], body["id"]
    if not isinstance(sealed, bytes) or not isinstance(device_id, str):
        raise ProvisioningError("identity: bad sealed secrets")
    if hardware_key is None:
        raise ProvisioningError("identity secrets are sealed and this device has no hardware key")
    try:
        opened = sealing.unseal(hardware_key, sealed, device_id.encode("ascii", "replace"))
        secrets = cbor.loads(opened, max_size=IDENTITY_AREA_SIZE)
    except sealing.UnsealError as exc:
        raise ProvisioningError(str(exc)) from None
    except Exception as exc:
        raise ProvisioningError("identity: sealed secrets are damaged") from exc
    if not (isinstance(secrets, list) and len(secrets) == 3):
        raise ProvisioningError("identity: sealed secrets are damaged")
    return {"psk": secrets[0], "dec": secrets[1:]}


def huk_path(path: str | os.PathLike[str]) -> Path:
    """Where the simulated chip keeps its hardware unique key: beside, never inside, the
    flash file (an eFuse stand-in; copying the flash file does not copy the chip)."""
    return Path(str(path) + ".huk")


def load_hardware_key(path: str | os.PathLike[str]) -> bytes | None:
    p = huk_path(path)
    if not p.is_file():
        return None
    key = p.read_bytes()
    if len(key) != sealing.HUK_SIZE:
        raise ProvisioningError(f"{p}: a hardware key is {sealing.HUK_SIZE} bytes")
    return key


def ensure_hardware_key(path: str | os.PathLike[str]) -> bytes:
    """This simulated chip's HUK, fused (created) on first use."""
    key = load_hardware_key(path)
    if key is None:
        key = os.urandom(sealing.HUK_SIZE)
        huk_path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(huk_path(path), key, mode=0o600)
    return key


def peek_identity(path: str | os.PathLike[str], hardware_key: bytes | None = None) -> Identity:
    """Read the identity straight from the file, to learn the geometry before SimFlash."""
    p = Path(path)
    if not p.is_file():
        raise ProvisioningError(f"{p}: no such flash file")
    with open(p, "rb") as f:
        data = f.read(IDENTITY_AREA_SIZE)
    if hardware_key is None:
        hardware_key = load_hardware_key(p)
    identity = Identity.decode(data, hardware_key)
    size = p.stat().st_size
    if size != identity.layout.total_size:
        raise ProvisioningError(
            f"flash file is {size} bytes, the layout needs {identity.layout.total_size}"
        )
    return identity


def open_flash(
    path: str | os.PathLike[str],
    *,
    faults: FlashFaults | None = None,
    flash_class: type[SimFlash] = SimFlash,
    hardware_key: bytes | None = None,
) -> tuple[SimFlash, Identity]:
    """Power on: attach to the flash file with the geometry its identity records.

    The chip's hardware key is `hardware_key`, else the one beside the flash file."""
    if hardware_key is None:
        hardware_key = load_hardware_key(path)
    identity = peek_identity(path, hardware_key)
    lay = identity.layout
    flash = flash_class(
        path, sector_size=lay.sector_size, write_align=lay.write_align, faults=faults
    )
    flash.hardware_key = hardware_key
    return flash, identity


def read_identity(flash: SimFlash) -> Identity:
    return Identity.decode(flash.read(0, IDENTITY_AREA_SIZE), flash.hardware_key)
