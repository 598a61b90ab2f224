"""The device's two state machines, sans-I/O: one update session and the boot status.

Both keep every legal transition in ONE table (DESIGN principle 5, after h11): reading
the table is reading the protocol, and a transition that is not in it is a bug that
raises instead of silently doing something. Each transition also names the status
report it produces (`report.State`), so "which stage reports what" lives here too.

* `UpdateSession` is one check-and-update attempt by the agent. Its failure is sticky:
  once REJECTED or FAILED, every further event raises, so a caller cannot carry on
  downloading or staging after something went wrong (h11's "ERROR is absorbing").
* `boot_step` is the persistent boot status kept in flash (CONFIRMED / PENDING /
  TESTING). It is cyclic by nature (every update goes round it once), so it is not
  sticky; it is a pure function the bootloader and the agent both call before they
  write the new status to flash, so neither can invent a transition.

No clock, no I/O, no randomness here: the host passes everything in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from .errors import OtaError, ReportReason
from .report import State


class SessionError(OtaError):
    """An event the session's transition table does not allow (a host bug, or sticky)."""


# --- the update session ---------------------------------------------------------------


class Phase(StrEnum):
    IDLE = "idle"
    CHECKING = "checking"  # asking the server for the manifest
    VERIFIED = "verified"  # the trust gate accepted it; no payload byte requested yet
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"  # size and digest of the staged image checked
    STAGED = "staged"  # slot marked pending in flash; the device must reboot
    UP_TO_DATE = "up-to-date"
    REJECTED = "rejected"  # the manifest (or release) was refused: sticky
    FAILED = "failed"  # something broke while acting on an accepted manifest: sticky


class Event(StrEnum):
    CHECK = "check"
    NO_UPDATE = "no-update"  # 4.04, or the installed manifest again
    UNREACHABLE = "unreachable"  # could not even get the manifest
    ACCEPTED = "accepted"  # trust.accept returned a VerifiedManifest
    REFUSED = "refused"  # trust gate, local policy or a failed pre-fetch condition
    FETCH_STARTED = "fetch-started"
    FETCH_DONE = "fetch-done"
    STAGED = "staged"
    ERROR = "error"


TERMINAL = frozenset({Phase.UP_TO_DATE, Phase.REJECTED, Phase.FAILED, Phase.STAGED})

# (phase, event) -> (next phase, report to send or None)
TRANSITIONS: Mapping[tuple[Phase, Event], tuple[Phase, State | None]] = {
    (Phase.IDLE, Event.CHECK): (Phase.CHECKING, None),
    (Phase.CHECKING, Event.NO_UPDATE): (Phase.UP_TO_DATE, None),
    # Offline is not worth a flash write per poll: no report, just a failed session.
    (Phase.CHECKING, Event.UNREACHABLE): (Phase.FAILED, None),
    (Phase.CHECKING, Event.ACCEPTED): (Phase.VERIFIED, None),
    # RFC 9124 USER_STORY.MFST.FAIL_EARLY: refusals happen before any payload byte.
    (Phase.CHECKING, Event.REFUSED): (Phase.REJECTED, State.REJECTED),
    (Phase.VERIFIED, Event.REFUSED): (Phase.REJECTED, State.REJECTED),
    (Phase.VERIFIED, Event.FETCH_STARTED): (Phase.DOWNLOADING, State.DOWNLOADING),
    # The staging slot already holds exactly this image (a retried trial): no download.
    (Phase.VERIFIED, Event.FETCH_DONE): (Phase.DOWNLOADED, State.DOWNLOADED),
    (Phase.VERIFIED, Event.ERROR): (Phase.FAILED, State.FAILED),
    (Phase.DOWNLOADING, Event.FETCH_DONE): (Phase.DOWNLOADED, State.DOWNLOADED),
    (Phase.DOWNLOADING, Event.ERROR): (Phase.FAILED, State.FAILED),
    (Phase.DOWNLOADED, Event.STAGED): (Phase.STAGED, None),  # boot table reports INSTALLING
    (Phase.DOWNLOADED, Event.ERROR): (Phase.FAILED, State.FAILED),
}


@dataclass(frozen=True)
class Transition:
    source: Phase
    event: Event
    target: Phase
    report: State | None
    reason: ReportReason
    detail: str


class UpdateSession:
    """One check-and-update attempt; a failure is sticky."""

    def __init__(self) -> None:
        self._phase = Phase.IDLE
        self.history: list[Transition] = []

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def done(self) -> bool:
        return self._phase in TERMINAL

    def fire(
        self, event: Event, reason: ReportReason = ReportReason.OK, detail: str = ""
    ) -> Transition:
        """Apply `event`; return the transition (with the report it calls for) or raise."""
        key = (self._phase, event)
        if key not in TRANSITIONS:
            raise SessionError(
                f"event {event.value!r} is not allowed in phase {self._phase.value!r}"
            )
        target, report = TRANSITIONS[key]
        if report in (State.REJECTED, State.FAILED) and reason == ReportReason.OK:
            # A refusal must carry its cause (ATTACKS.md O5): never report "failed, OK".
            reason = ReportReason.OPERATION_FAILED
        t = Transition(self._phase, event, target, report, reason, detail)
        self._phase = target
        self.history.append(t)
        return t


# --- the boot status ------------------------------------------------------------------


class BootStatus(StrEnum):
    CONFIRMED = "confirmed"  # boot the active slot
    PENDING = "pending"  # the other slot holds a staged candidate: verify, then test-boot
    TESTING = "testing"  # the candidate is running on trial, not yet confirmed


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
        raise SessionError(f"boot event {event.value!r} is not allowed in status {status.value!r}")
    return BOOT_TRANSITIONS[key]
