"""The simulated bootloader: secure boot, trial boot of a candidate, automatic revert.

Choice: A/B slots with an *active-slot pointer* in the power-safe state record, no
copy and no swap. Activating a candidate is one StateStore save (atomic: the old
record stays valid until the new one is complete), so there is no scratch area and no
swap-status journal to recover, and a power cut at any operation leaves either the old
pointer or the new one.

Every boot (every call of `boot`), in this order:

1. identity and state are read; a damaged identity or two damaged state copies stop
   the device (fail closed, never factory defaults);
2. PENDING: the candidate slot is verified against its stored envelope exactly as the
   agent did (trust.accept: signature from a ROM'd anchor, vendor/class/device,
   freshness against the trusted sequence number, then the manifest's own validate
   sequence: image-match over the slot = secure boot). Valid -> TESTING and it is
   booted in test mode; invalid -> back to CONFIRMED with a "failed" report
   (ATTACKS.md #18: a staged image or envelope changed after the agent checked it);
3. TESTING at power-on means the previous trial boot never confirmed (crash, failed
   start, power cut): revert to the active slot and report "reverted";
4. the slot to run is verified again (secure boot on every boot, ATTACKS.md O2) and
   its validate/invoke sequences are run by the core interpreter.

The decisions of each step (the boot status table, what a trial boot counts, when a
revert gives a release up: the sequence-number policy, ATTACKS.md #47) are pure
functions in `otacoap.core.boot_status`; this module does the I/O around them: it
verifies slots in flash, saves the record and decides what to boot when a save fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from otacoap.core import boot_status, cose, interpreter, trust
from otacoap.core.anchor_list import TrustedAnchors
from otacoap.core.boot_status import BootEvent
from otacoap.core.build import DEVICE_COMPONENTS
from otacoap.core.errors import (
    CommandError,
    ConditionFailed,
    OtaError,
    ReportReason,
)
from otacoap.core.update_record import BootStatus, SlotInfo
from otacoap.core.writer import hash_region

from . import firmware
from .device_state import DeviceState, StateFile, sha256
from .flash import SimFlash
from .layout import Identity, read_identity
from .record_store import StateStoreError
from .slot_view import SlotView


class BootError(Exception):
    """Nothing bootable: the device is bricked. The tests count these; they must be 0."""


class SlotInvalid(OtaError):
    """A slot's image or envelope does not verify (secure boot refused it)."""

    reason = ReportReason.CONDITION_FAILED


def device_description(identity: Identity) -> interpreter.DeviceDescription:
    return interpreter.DeviceDescription(
        vendor_id=identity.vendor_id, class_id=identity.class_id, device_id=identity.device_uuid
    )


def trusted_anchors(identity: Identity, state: DeviceState) -> TrustedAnchors | None:
    """The anchor list the device trusts: the accepted one, else provisioning's (v0)."""
    return state.anchors if state.anchors is not None else identity.provisioned_anchors()


def author_anchors(
    identity: Identity, state: DeviceState | None, *, running: bool = False
) -> tuple[cose.TrustAnchor, ...]:
    """Keys that may vouch for a manifest: the accepted anchor list's authors, else the
    provisioned ones. `running`: for the confirmed, running slot, where the one revoked
    key that signed it is still accepted (TrustedAnchors.grace; never for a candidate).
    """
    if state is None or state.anchors is None:
        return identity.anchors()
    return state.anchors.boot_anchors() if running else state.anchors.author_anchors()


def trust_policy(
    identity: Identity,
    *,
    sequence: int | None,
    sequence_digest: bytes | None,
    uri_prefixes: tuple[str, ...] | None,
    max_envelope_size: int | None = None,
    anchors: tuple[cose.TrustAnchor, ...] | None = None,
    now: int | None = None,
) -> trust.TrustPolicy:
    """The device's TrustPolicy: everything from the read-only identity and the state.

    `anchors` default to the provisioned author keys (see `author_anchors`); `now` is
    trusted time for the signed expiry (None: the device has no trusted clock).
    """
    kwargs = {} if max_envelope_size is None else {"max_envelope_size": max_envelope_size}
    return trust.TrustPolicy(
        anchors=anchors if anchors is not None else identity.anchors(),
        now=now,
        current_sequence=sequence,
        current_manifest_digest=sequence_digest,
        vendor_id=identity.vendor_id,
        class_id=identity.class_id,
        device_id=identity.device_uuid,
        # Each component's own bound is its region (the image writer's capacity).
        max_image_size=max(identity.layout.slot_size, identity.layout.aux_slot_size),
        max_components=identity.layout.components,
        # RFC 9124 REQ.SEC.ACCESS_CONTROL: the only writable components are the image
        # slot (and the second image's region on a multi-component device); a manifest
        # aimed at anything else (bootloader, ...) is refused (#17).
        allowed_components=frozenset(device_components(identity)),
        allow_relative_uris=True,
        allowed_uri_prefixes=uri_prefixes,
        **kwargs,
    )


def device_components(identity: Identity) -> tuple[tuple[bytes, ...], ...]:
    """The component identifiers this device installs, in index order."""
    return DEVICE_COMPONENTS[: identity.layout.components]


def read_envelope(flash: SimFlash, identity: Identity, slot: int, info: SlotInfo) -> bytes:
    """The stored envelope of a slot, checked against the digest the state holds."""
    lay = identity.layout
    if not 0 < info.envelope_length <= lay.envelope_area_size:
        raise SlotInvalid("stored envelope has an impossible length")
    data = flash.read(lay.envelope_offset(slot), info.envelope_length)
    if sha256(data) != info.envelope_sha256:
        raise SlotInvalid("stored envelope was modified")
    return data


def check_image(
    flash: SimFlash, identity: Identity, slot: int, action: interpreter.CheckImage
) -> bool:
    """condition-image-match (manifest-34 §8.4.9.2) over a slot: digest of exactly size bytes."""
    lay, component = identity.layout, action.component
    if not 0 <= component < lay.components:
        return False
    size = action.size
    if size is None or not 0 < size <= lay.component_size(component):
        return False
    view = SlotView(flash, lay, slot, action.digest.value, component)
    digest = hash_region(view, lay.component_offset(slot, component), size, action.digest.algorithm)
    return digest == action.digest.value


def run_procedure(
    flash: SimFlash,
    identity: Identity,
    slot: int,
    vm: trust.VerifiedManifest,
    procedure: str,
    fetch: Callable[[interpreter.Fetch], object] | None = None,
) -> list[interpreter.Action]:
    """Run a SUIT procedure synchronously with component i mapped onto `slot`'s region i."""

    def answer(action: interpreter.Action) -> object:
        if isinstance(action, interpreter.CheckImage):
            return check_image(flash, identity, slot, action)
        if isinstance(action, interpreter.Invoke):
            return None
        if isinstance(action, interpreter.Fetch) and fetch is not None:
            return fetch(action)
        if isinstance(action, interpreter.CheckCondition):
            # manifest-34 §8.4.10: a condition this processor cannot judge fails.
            return False
        raise CommandError(f"{type(action).__name__} is not supported by this device")

    gen = interpreter.run(vm.envelope, procedure, device_description(identity))
    return interpreter.drive(gen, answer)


def verify_slot(
    flash: SimFlash,
    identity: Identity,
    state: DeviceState,
    slot: int,
    *,
    candidate: bool,
) -> SlotInfo:
    """Secure boot of one slot: raise SlotInvalid (or the gate's OtaError) if it fails."""
    info = state.slots[slot]
    if info is None:
        raise SlotInvalid(f"slot {slot} holds no image")
    if info.factory:
        # The factory image is vouched for by the digest in the read-only identity.
        if identity.layout.components > 1:
            raise SlotInvalid("a multi-component slot needs an envelope that vouches for it")
        if candidate or slot != state.active:
            raise SlotInvalid("a factory image is never a candidate")
        if (info.image_size, info.image_digest) != (
            identity.factory_size,
            identity.factory_digest,
        ):
            raise SlotInvalid("factory slot record does not match the identity")
        lay = identity.layout
        view = SlotView(flash, lay, slot, info.image_digest)
        if hash_region(view, lay.slot_offset(slot), info.image_size) != info.image_digest:
            raise SlotInvalid("factory image does not match its digest")
        return info
    envelope = read_envelope(flash, identity, slot, info)
    policy = trust_policy(
        identity,
        sequence=state.sequence if candidate else None,
        sequence_digest=state.sequence_digest if candidate else None,
        uri_prefixes=None,
        anchors=author_anchors(identity, state, running=not candidate),
    )
    vm = trust.accept(envelope, policy)
    if vm.manifest_digest.value != info.manifest_digest or vm.sequence_number != info.sequence:
        raise SlotInvalid("stored envelope is not the one recorded for this slot")
    if not candidate and info.sequence > state.sequence:
        raise SlotInvalid("active image is newer than the trusted sequence number")
    try:
        actions = run_procedure(flash, identity, slot, vm, interpreter.INVOKE)
    except ConditionFailed as exc:
        raise SlotInvalid("image does not match its manifest") from exc
    if not any(isinstance(a, interpreter.Invoke) for a in actions):
        raise SlotInvalid("the manifest does not invoke the image")
    if identity.layout.components > 1:
        # Secure boot of every component: the one envelope must name the device's
        # components in order and its validate sequence must have matched each image.
        if vm.manifest.common.components != device_components(identity):
            raise SlotInvalid("the envelope does not name this device's components")
        checked = {a.component for a in actions if isinstance(a, interpreter.CheckImage)}
        if not checked >= set(range(identity.layout.components)):
            raise SlotInvalid("the manifest does not check every component's image")
    return info


@dataclass(frozen=True)
class BootResult:
    slot: int
    test_mode: bool
    info: SlotInfo
    behaviour: firmware.Behaviour
    events: tuple[str, ...] = field(default=())


class Bootloader:
    """One power-on: decide what to run, persist that decision, verify, 'jump'."""

    def __init__(self, flash: SimFlash) -> None:
        self.flash = flash
        self.identity = read_identity(flash)
        self.state_file = StateFile(flash, self.identity.layout)

    def boot(self) -> BootResult:
        identity = self.identity
        state = self.state_file.load()
        events: list[str] = []
        verified: SlotInfo | None = None
        if state.boot == BootStatus.PENDING:
            state, verified = self._try_candidate(state, events)
        elif state.boot == BootStatus.TESTING:
            reverted = boot_status.revert(
                state,
                identity.max_trial_boots,
                BootEvent.UNCONFIRMED_RESTART,
                "trial boot was not confirmed",
            )
            try:
                self.state_file.save(reverted)
                state = reverted
            except StateStoreError:
                # Cannot record the revert: boot the old image anyway; the record still
                # says TESTING, so the next boot reverts again.
                state = replace(state, boot=BootStatus.CONFIRMED)
            events.append("reverted")
        slot = state.running
        test_mode = state.boot == BootStatus.TESTING
        info = verified
        if info is None:
            try:
                info = verify_slot(self.flash, identity, state, slot, candidate=test_mode)
            except OtaError as exc:
                raise BootError(f"slot {slot} does not verify: {exc}") from exc
        view = SlotView(self.flash, identity.layout, slot, info.image_digest)
        head = view.read(identity.layout.slot_offset(slot), firmware.HEADER_SIZE)
        return BootResult(slot, test_mode, info, firmware.behaviour_of(head), tuple(events))

    def _try_candidate(
        self, state: DeviceState, events: list[str]
    ) -> tuple[DeviceState, SlotInfo | None]:
        """PENDING: verify the candidate; then TESTING (verified) or CONFIRMED (refused)."""
        try:
            verify_slot(self.flash, self.identity, state, state.candidate, candidate=True)
        except OtaError as exc:
            new = boot_status.candidate_invalid(state, exc.reason, f"secure boot: {exc}")
            with contextlib.suppress(StateStoreError):  # else: refused again next boot
                self.state_file.save(new)
            events.append("candidate-invalid")
            return new, None
        new = boot_status.trial_boot(state)
        try:
            self.state_file.save(new)
        except StateStoreError:
            # A trial that is not on record must not run (it could never be reverted
            # properly): boot the active image, the candidate stays PENDING.
            events.append("trial-deferred")
            return replace(state, boot=BootStatus.CONFIRMED), None
        events.append("trial-boot")
        return new, new.slots[new.candidate]
