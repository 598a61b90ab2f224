"""The persistent boot status and every decision that moves it, sans-I/O.

The status lives in the device's state record (CONFIRMED / PENDING / TESTING). It is
cyclic by nature (every update goes round it once), so unlike the update machine
(`core.update_machine`, one attempt in RAM, failures sticky) it is never absorbing: a
failed candidate or trial goes back to CONFIRMED. Its transitions are ONE table
(`BOOT_TRANSITIONS`, DESIGN principle 5), and each names the status report it produces.

The two tables stay two because their lives differ: the bootloader moves the boot status
at power-on with no update attempt in sight, and an update attempt that fails must stop
(sticky) while the boot status must always come back to something bootable. They meet at
one point, `BootEvent.STAGE`, which the update machine takes from this table.

The functions below take the loaded record and return the record to save, report queued
in the same record (so a transition and its report are durable together). The host (the
bootloader and the agent) does the I/O: it verifies slots, saves, and decides what to do
when a save fails.

Sequence-number policy (ATTACKS.md #47). The trusted sequence number moves only forward
and only at two points: (a) `confirm`, when a trial boot passed its health check (it
becomes the new image's number), and (b) `revert` when a release is *given up*: its
health check failed, or it has used up `max_trial_boots` unconfirmed trial boots. Then
the trusted number stays at the failed release's (new) value while the device runs the
old image, so that release can never be installed again and only a newer one can replace
it. A revert after fewer unconfirmed trial boots (say a power cut during the trial)
leaves the number unchanged and the same release may be retried, so power loss alone
never makes a device refuse a good update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from enum import StrEnum
from typing import TypeVar

from . import suit
from .errors import ReportReason
from .report import Report, State
from .update_record import (
    BootStatus,
    ReportEncoder,
    SlotInfo,
    TransitionError,
    Trial,
    UpdateRecord,
)

R = TypeVar("R", bound=UpdateRecord)


class BootEvent(StrEnum):
    STAGE = "stage"  # agent: candidate written and checked
    TRIAL_BOOT = "trial-boot"  # bootloader: candidate verified, boot it in test mode
    CANDIDATE_INVALID = "candidate-invalid"  # bootloader: secure-boot check failed
    CONFIRM = "confirm"  # agent: health check passed; commit the sequence number
    HEALTH_FAILED = "health-failed"  # agent: health check failed; revert now
    UNCONFIRMED_RESTART = "unconfirmed-restart"  # bootloader: trial ended without confirm


BOOT_TRANSITIONS: Mapping[tuple[BootStatus, BootEvent], tuple[BootStatus, State]] = {
    (BootStatus.CONFIRMED, BootEvent.STAGE): (BootStatus.PENDING, State.INSTALLING),
    (BootStatus.PENDING, BootEvent.TRIAL_BOOT): (BootStatus.TESTING, State.INSTALLED),
    (BootStatus.PENDING, BootEvent.CANDIDATE_INVALID): (BootStatus.CONFIRMED, State.FAILED),
    (BootStatus.TESTING, BootEvent.CONFIRM): (BootStatus.CONFIRMED, State.CONFIRMED),
    (BootStatus.TESTING, BootEvent.HEALTH_FAILED): (BootStatus.CONFIRMED, State.REVERTED),
    (BootStatus.TESTING, BootEvent.UNCONFIRMED_RESTART): (BootStatus.CONFIRMED, State.REVERTED),
}


def boot_step(status: BootStatus, event: BootEvent) -> tuple[BootStatus, State]:
    """The next boot status and the report that transition produces, or raise."""
    key = (status, event)
    if key not in BOOT_TRANSITIONS:
        raise TransitionError(
            f"boot event {event.value!r} is not allowed in status {status.value!r}"
        )
    return BOOT_TRANSITIONS[key]


def report_for(
    record: UpdateRecord,
    report_state: State,
    info: SlotInfo | None,
    reason: ReportReason = ReportReason.OK,
    detail: str = "",
) -> ReportEncoder:
    """A report builder about the image in a slot (the counter is allocated by the record)."""

    def encode(counter: int, lost: int) -> bytes:
        digest = (
            suit.SuitDigest(suit.DIGEST_SHA256, info.manifest_digest)
            if info is not None and info.manifest_digest is not None
            else None
        )
        return Report(
            counter=counter,
            state=report_state,
            reason=reason,
            sequence_number=info.sequence if info is not None else None,
            manifest_digest=digest,
            installed_sequence=record.sequence,
            detail=detail,
            lost=lost,
        ).encode()

    return encode


def trial_boot(record: R) -> R:
    """PENDING -> TESTING: the candidate verified; count this trial boot of it."""
    status, report_state = boot_step(record.boot, BootEvent.TRIAL_BOOT)
    info = record.slots[record.candidate]
    if info is None or info.manifest_digest is None:
        raise TransitionError("trial boot without a candidate")
    boots = 1
    if record.trial is not None and record.trial.manifest_digest == info.manifest_digest:
        boots = record.trial.boots + 1
    new = replace(record, boot=status, trial=Trial(info.manifest_digest, boots))
    return new.with_report(report_for(new, report_state, info))


def candidate_invalid(record: R, reason: ReportReason, detail: str) -> R:
    """PENDING -> CONFIRMED: secure boot refused the candidate (ATTACKS.md #18)."""
    status, report_state = boot_step(record.boot, BootEvent.CANDIDATE_INVALID)
    info = record.slots[record.candidate]
    new = replace(record, boot=status)
    return new.with_report(report_for(new, report_state, info, reason, detail))


def revert(record: R, max_trial_boots: int, event: BootEvent, detail: str) -> R:
    """TESTING -> CONFIRMED on the old slot, with the sequence policy of the module doc."""
    status, report_state = boot_step(record.boot, event)
    info = record.slots[record.candidate]
    trial = record.trial
    give_up = event == BootEvent.HEALTH_FAILED or (
        trial is not None and trial.boots >= max_trial_boots
    )
    seq, seq_digest = record.sequence, record.sequence_digest
    if give_up:
        if info is not None and info.sequence > seq:
            seq, seq_digest = info.sequence, info.manifest_digest
        trial = None
        detail += "; release given up"
    new = replace(record, boot=status, sequence=seq, sequence_digest=seq_digest, trial=trial)
    return new.with_report(
        report_for(new, report_state, info, ReportReason.OPERATION_FAILED, detail)
    )


def confirm(record: R) -> R:
    """TESTING -> CONFIRMED on the candidate; the one place the sequence number commits."""
    status, report_state = boot_step(record.boot, BootEvent.CONFIRM)
    cand = record.candidate
    info = record.slots[cand]
    if info is None or info.manifest_digest is None:
        raise TransitionError("confirm without a candidate")
    if info.sequence < record.sequence:  # cannot happen: the gate checked freshness
        raise TransitionError("candidate is older than the trusted sequence number")
    new = replace(
        record,
        boot=status,
        active=cand,
        sequence=info.sequence,
        sequence_digest=info.manifest_digest,
        trial=None,
    )
    return new.with_report(report_for(new, report_state, info))


def health_verdict(record: R, healthy: bool, max_trial_boots: int) -> R:
    """The end of a trial boot: confirm a healthy image, revert (and give up) otherwise."""
    if healthy:
        return confirm(record)
    return revert(record, max_trial_boots, BootEvent.HEALTH_FAILED, "health check failed")
