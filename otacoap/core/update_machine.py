"""The device's update decisions as a sans-I/O machine: events in, effects out (h11 style).

One `UpdateMachine` is one check-and-update attempt. It decides everything an update
decides (resume or restart, re-stage without a download, refuse, fail, which report
goes with which transition, what to persist and when); the host (`device_sim.agent`)
only carries out its effects with a transport, a flash and a clock, and reports back
what happened as events. The machine reads no clock, touches no flash, sends nothing.

    host                                     machine
    ----                                     -------
    send(Begin(record))                  ->  [FetchEnvelope()]
    send(EnvelopeFetched(envelope, ..))  ->  [Verify(envelope, record)]
    send(Verified(vm))                   ->  runs the SUIT update procedure (core.interpreter)
                                             ... [ProbeSlot | Persist | StoreEnvelope ...]
                                             [Persist(record + DOWNLOADING report),
                                              FlushReports()]
    send(Flushed(record))                ->  [OpenWriter(..), FetchPayload(path, start)]
    send(BlockReceived(data))            ->  [Write(slot bytes), Persist(checkpoint)?]
    send(FetchDone())                    ->  [FinishImage()]
    ...                                  ->  [..., Finish(Phase.STAGED)]

Protocol between the two. `send` returns a batch: zero or more effects that need no
answer (`Write`, `OpenWriter`, `RememberRefusal`, `KeepReport`), then either one effect
the host must answer (`ANSWERS` lists the events that answer each) or `Finish`. If an
effect raises, the host skips the rest of the batch and sends `Failed(error)` (an
OtaError) or `StoreFailed(detail)` (the state record could not be saved). `FetchPayload`
is answered by a stream of `BlockReceived`, then `FetchDone`.

The rules it keeps (each was in the agent's I/O code before; ATTACKS.md numbers):

* the trust gate runs before any payload byte is asked for (RFC 9124
  USER_STORY.MFST.FAIL_EARLY): `FETCH_STARTED` is only reachable from VERIFIED;
* a download resumes only under the same manifest digest, slot, size and stored
  envelope (#23, #50); anything else starts over after unlinking slot and download;
* a retried trial of the same release whose staging slot still holds the exact image
  and envelope is re-staged without a download;
* an image whose digest does not match is not resumed: its download is forgotten, in
  the same save as the FAILED report (#10);
* every report is queued in the same save as the transition it reports (so a power cut
  never separates them); a report the flash refuses is kept in RAM (`KeepReport`, #48);
* an envelope refused once (by the host's RefusalMemory) is not verified, reported or
  written again; an `AlreadyInstalled` envelope is "up to date" only if the running
  image is the one the trusted sequence number names, else a given-up release (#47);
* failures are sticky: after `Finish`, every event raises (h11's ERROR is absorbing).

The transitions are ONE table, `TRANSITIONS` (DESIGN principle 5): (phase, step) -> (next
phase, report). The boot status has its own table in `core.boot_status` (why two: see
there); the machine takes its one step, `BootEvent.STAGE`, from it.

Payload kinds. What the fetched bytes are is a strategy (`core.payload_kind`) the machine
asks for when the manifest's Fetch comes: where a download may resume given its durable
bytes (`resume_from`), which payload offset to ask for (`fetch_offset`), whether
mid-stream checkpoints are allowed (`checkpoints`), and a decoder that turns fetched
bytes into slot bytes, and how many bytes the fetch brings (`payload_size`). The image
writer checks size and digest of the *slot bytes* whatever the kind. Besides the plain
image (pass-through, resume at any checkpoint), two kinds plug in without touching the
table (an encrypted delta is a delta whose patch is decrypted while it streams):

* delta (detools sequential patch, core.delta; docs/decisions/delta-updates.md):
  `select_kind` recognises the delta fetch from the trust gate's `DeltaInfo`; the
  decoder applies the patch while streaming, reading the "from" image through a
  read-only region of the *running* slot the host injects (`MachineConfig.source`, as
  the writer's flash is injected); a patch expands, so its decoder is drained in
  bounded pieces (`Drain`/`Drained`). The custom condition delta-source-match becomes a
  `CheckSlotImage` on the running slot: a mismatch fails that try-each alternative
  before any payload byte. detools' decompressor state is not in flash, so
  `checkpoints` is False and `resume_from` answers 0. A delta payload that fails is
  thrown into the interpreter at its Fetch, so try-each runs the next alternative (the
  full image; `Step.FALLBACK`), and the reports say which payload was used.
* encrypted (draft-ietf-suit-firmware-encryption, A128KW / ECDH-ES+A128KW with A128CTR
  or A128GCM; `core.encryption.EncryptedPayload`, done): the CEK is unwrapped once with
  `MachineConfig.decryption_keys` when the kind is chosen, before the fetch (a wrong key
  is a refusal); the decoder decrypts while streaming. CTR resumes at any checkpoint
  (the counter is computable, so `resume_from` is the durable offset); GCM
  authenticates only at the end, so `resume_from` answers 0 and the tag is checked in
  `finish` (a bad tag forgets the download, like a digest mismatch).

A kind that needs more resume state than the durable offset (a delta's patch offset) adds
it to `Download` in the persisted record (a new record format field, keyed by the same
manifest digest).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Generic, TypeVar
from urllib.parse import urljoin, urlsplit

from . import delta, interpreter, protocol, suit, trust
from .blockwise import MAX_SZX, size_of
from .boot_status import BootEvent, boot_step
from .build import MAIN_COMPONENT
from .encryption import DecryptionKeys
from .errors import (
    AlreadyInstalled,
    CommandError,
    ConditionFailed,
    OtaError,
    PolicyError,
    ReportReason,
)
from .payload_kind import (
    DrainingDecoder,
    PayloadDecoder,
    PayloadKind,
    check_multi_component_plain,
    delta_in_force,
    select_kind,
)
from .report import Report, State
from .sizes import round_up
from .update_record import (
    BootStatus,
    Download,
    ReportEncoder,
    SlotInfo,
    TransitionError,
    UpdateRecord,
    with_slot,
)
from .writer import StagingError

R = TypeVar("R", bound=UpdateRecord)

MANIFEST_PATH = "/" + "/".join(protocol.PATH_MANIFEST)
MAX_BLOCK = size_of(MAX_SZX)
"""The largest Block2 block (RFC 7959 §2.2): resume points are whole blocks of it, and an
integrated payload is fed in chunks of it."""


# --- the table ---------------------------------------------------------------------------


class Phase(StrEnum):
    IDLE = "idle"
    CHECKING = "checking"  # asking the server for the manifest
    VERIFIED = "verified"  # the trust gate accepted it; no payload byte requested yet
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"  # size and digest of the staged image checked
    STAGED = "staged"  # slot marked pending in flash; the device must reboot
    UP_TO_DATE = "up-to-date"
    UNREACHABLE = "unreachable"  # no manifest to judge: try again at the next poll
    REJECTED = "rejected"  # the manifest (or release) was refused: sticky
    FAILED = "failed"  # something broke while acting on an accepted manifest: sticky


class Step(StrEnum):
    """The named transitions; the machine's handlers decide which one an event is."""

    CHECK = "check"
    UNSETTLED = "unsettled"  # a trial or a pending candidate: reboot and settle first
    NO_UPDATE = "no-update"  # 4.04, or the installed manifest again
    UNREACHABLE = "unreachable"  # could not even get the manifest
    REFUSED_BEFORE = "refused-before"  # the same envelope was refused lately
    ACCEPTED = "accepted"  # trust.accept returned a VerifiedManifest
    REFUSED = "refused"  # trust gate, local policy or a failed pre-fetch condition
    FETCH_STARTED = "fetch-started"
    FALLBACK = "fallback"  # a failed delta's fetch is followed by the full image's
    BLOCK = "block"
    FETCH_DONE = "fetch-done"
    COMPONENT_DONE = "component-done"  # one image of a multi-component release is in
    STAGED = "staged"
    ERROR = "error"


TERMINAL = frozenset(
    {Phase.UP_TO_DATE, Phase.UNREACHABLE, Phase.REJECTED, Phase.FAILED, Phase.STAGED}
)

# (phase, step) -> (next phase, report to queue with it, or None)
TRANSITIONS: Mapping[tuple[Phase, Step], tuple[Phase, State | None]] = {
    (Phase.IDLE, Step.CHECK): (Phase.CHECKING, None),
    # The staging slot may be the running image: never touch it (no report either).
    (Phase.IDLE, Step.UNSETTLED): (Phase.FAILED, None),
    (Phase.CHECKING, Step.NO_UPDATE): (Phase.UP_TO_DATE, None),
    # Offline is not worth a flash write per poll: no report.
    (Phase.CHECKING, Step.UNREACHABLE): (Phase.UNREACHABLE, None),
    # A refusal is final; a server replaying it must not wear the flash out: no report.
    (Phase.CHECKING, Step.REFUSED_BEFORE): (Phase.REJECTED, None),
    (Phase.CHECKING, Step.ACCEPTED): (Phase.VERIFIED, None),
    # RFC 9124 USER_STORY.MFST.FAIL_EARLY: refusals happen before any payload byte.
    (Phase.CHECKING, Step.REFUSED): (Phase.REJECTED, State.REJECTED),
    (Phase.VERIFIED, Step.REFUSED): (Phase.REJECTED, State.REJECTED),
    (Phase.VERIFIED, Step.FETCH_STARTED): (Phase.DOWNLOADING, State.DOWNLOADING),
    # The staging slot already holds exactly this image (a retried trial): no download.
    (Phase.VERIFIED, Step.FETCH_DONE): (Phase.DOWNLOADED, State.DOWNLOADED),
    (Phase.VERIFIED, Step.ERROR): (Phase.FAILED, State.FAILED),
    (Phase.DOWNLOADING, Step.BLOCK): (Phase.DOWNLOADING, None),
    (Phase.DOWNLOADING, Step.FETCH_DONE): (Phase.DOWNLOADED, State.DOWNLOADED),
    # A delta that failed falls back to try-each's next alternative, the full image
    # (a new fetch, but only ever after a first one: FETCH_STARTED stays VERIFIED-only).
    (Phase.DOWNLOADING, Step.FALLBACK): (Phase.DOWNLOADING, State.DOWNLOADING),
    # Multi-component: the next component's image follows into the same staging slot.
    (Phase.DOWNLOADING, Step.COMPONENT_DONE): (Phase.DOWNLOADING, None),
    (Phase.DOWNLOADING, Step.ERROR): (Phase.FAILED, State.FAILED),
    (Phase.DOWNLOADED, Step.STAGED): (Phase.STAGED, None),  # boot table reports INSTALLING
    (Phase.DOWNLOADED, Step.ERROR): (Phase.FAILED, State.FAILED),
}


@dataclass(frozen=True)
class Transition:
    source: Phase
    step: Step
    target: Phase
    report: State | None
    reason: ReportReason
    detail: str


def update_step(
    phase: Phase, step: Step, reason: ReportReason = ReportReason.OK, detail: str = ""
) -> Transition:
    """The transition `step` makes from `phase` (with the report it calls for), or raise."""
    key = (phase, step)
    if key not in TRANSITIONS:
        raise TransitionError(f"step {step.value!r} is not allowed in phase {phase.value!r}")
    target, report = TRANSITIONS[key]
    if report in (State.REJECTED, State.FAILED) and reason == ReportReason.OK:
        # A refusal must carry its cause (ATTACKS.md O5): never report "failed, OK".
        reason = ReportReason.OPERATION_FAILED
    return Transition(phase, step, target, report, reason, detail)


# --- events (host -> machine) ------------------------------------------------------------


@dataclass(frozen=True)
class Begin(Generic[R]):
    """Start an attempt from the record as it is in flash now."""

    record: R


@dataclass(frozen=True)
class EnvelopeFetched:
    envelope: bytes
    earlier: tuple[ReportReason, str] | None = None  # refused lately: (reason, detail)


@dataclass(frozen=True)
class NoRelease:
    """4.04 on the manifest: nothing for this device."""


@dataclass(frozen=True)
class Unreachable:
    detail: str


@dataclass(frozen=True)
class Verified:
    vm: trust.VerifiedManifest


@dataclass(frozen=True)
class ImageChecked:
    matches: bool


@dataclass(frozen=True)
class Probed:
    matches: bool


@dataclass(frozen=True)
class Persisted(Generic[R]):
    record: R  # what was saved (the store may have dropped old reports to fit)


@dataclass(frozen=True)
class Flushed(Generic[R]):
    record: R  # the record after the sent reports left the outbox


@dataclass(frozen=True)
class BlockReceived:
    data: bytes


@dataclass(frozen=True)
class FetchDone:
    pass


@dataclass(frozen=True)
class Done:
    """An effect without a result completed (StoreEnvelope, FinishImage)."""


@dataclass(frozen=True)
class Failed:
    error: OtaError


@dataclass(frozen=True)
class StoreFailed:
    detail: str


@dataclass(frozen=True)
class Drained:
    """Answers `Drain`: the slot bytes handed out so far were written."""


Event = (
    Begin[Any]
    | EnvelopeFetched
    | NoRelease
    | Unreachable
    | Verified
    | ImageChecked
    | Probed
    | Persisted[Any]
    | Flushed[Any]
    | BlockReceived
    | FetchDone
    | Done
    | Failed
    | StoreFailed
    | Drained
)


# --- effects (machine -> host) -----------------------------------------------------------


@dataclass(frozen=True)
class FetchEnvelope:
    """GET the manifest under the envelope size cap (NoRelease / Unreachable / Failed)."""


@dataclass(frozen=True)
class Verify(Generic[R]):
    """trust.accept(envelope) with the policy of this record (trusted sequence number)."""

    envelope: bytes
    record: R


@dataclass(frozen=True)
class CheckSlotImage:
    """condition-image-match over a slot (manifest-34 §8.4.9.2)."""

    slot: int
    action: interpreter.CheckImage


@dataclass(frozen=True)
class ProbeSlot:
    """Does the slot's envelope area hold these bytes (and the slot this image)?"""

    slot: int
    envelope_length: int
    envelope_sha256: bytes
    image: interpreter.CheckImage | None
    more: tuple[interpreter.CheckImage, ...] = ()  # the other components' images


@dataclass(frozen=True)
class Persist(Generic[R]):
    """Save this record (power-safe, one save: a transition and its report together)."""

    record: R


@dataclass(frozen=True)
class FlushReports:
    """Send the queued reports now; answer with the record as it is afterwards."""


@dataclass(frozen=True)
class StoreEnvelope:
    """Write the envelope into the slot's envelope area (erase-ahead, read-back)."""

    slot: int
    envelope: bytes


@dataclass(frozen=True)
class OpenWriter:
    """Start the image writer on the slot; on a resume it re-hashes the prefix (#23)."""

    slot: int
    size: int
    digest: suit.SuitDigest
    resume_at: int
    component: int = 0  # which region of the slot (multi-component releases)


@dataclass(frozen=True)
class FetchPayload:
    """Stream the payload from `start`: from the server (`path`) or the envelope itself."""

    path: str | None
    integrated: bytes | None
    start: int
    size: int


@dataclass(frozen=True)
class Write:
    """Slot bytes for the writer, in order."""

    data: bytes


@dataclass(frozen=True)
class Drain:
    """Answer `Drained` so the machine can hand out more slot bytes of the same block
    (a patch expands: its output is handed out in bounded pieces)."""


@dataclass(frozen=True)
class FinishImage:
    """Check size and digest of the slot bytes (Failed(ConditionFailed) on a mismatch)."""


@dataclass(frozen=True)
class RememberRefusal:
    """Keep this envelope's refusal in RAM, so it is never verified or reported again."""

    envelope: bytes
    reason: ReportReason
    detail: str


@dataclass(frozen=True)
class KeepReport:
    """The flash refused to queue this report (#48): keep it in RAM and send it anyway."""

    body: bytes
    state: State


@dataclass(frozen=True)
class Finish:
    """The attempt is over; `phase` is terminal."""

    phase: Phase
    reason: ReportReason = ReportReason.OK
    detail: str = ""


Effect = (
    FetchEnvelope
    | Verify[Any]
    | CheckSlotImage
    | ProbeSlot
    | Persist[Any]
    | FlushReports
    | StoreEnvelope
    | OpenWriter
    | FetchPayload
    | Write
    | Drain
    | FinishImage
    | RememberRefusal
    | KeepReport
    | Finish
)

# What answers each effect the host must answer (anything else is a host bug).
ANSWERS: Mapping[type[Any], tuple[type[Any], ...]] = {
    type(None): (Begin,),
    FetchEnvelope: (EnvelopeFetched, NoRelease, Unreachable, Failed),
    Verify: (Verified, Failed),
    CheckSlotImage: (ImageChecked, Failed),
    ProbeSlot: (Probed, Failed),
    # Failed: an effect earlier in the same batch (a Write before a checkpoint) raised.
    Persist: (Persisted, StoreFailed, Failed),
    FlushReports: (Flushed,),
    StoreEnvelope: (Done, Failed),
    FetchPayload: (BlockReceived, FetchDone, Failed),
    FinishImage: (Done, Failed),
    Drain: (Drained, Failed),
}


# --- pure helpers ------------------------------------------------------------------------


def checkpoint_interval(checkpoint_bytes: int, sector_size: int) -> int:
    """Bytes between persisted resume points: whole sectors and whole Block2 blocks.

    A resume point must be a sector boundary (the writer erases the sector it resumes
    in again) and a block boundary of the largest block size (RFC 7959 §2.2: 1024).
    """
    align = max(sector_size, MAX_BLOCK)
    return round_up(max(checkpoint_bytes, align), align)


def resolve_uri(base: str, uri: str) -> str:
    """The path on this server for a manifest URI.

    RFC 3986 §5.2: a relative reference resolves against the envelope's own URI (this
    server's /m); the result, like an absolute URI, must stay on this server (the trust
    gate already refused other origins; this is the device's own check).
    """
    try:  # urljoin/urlsplit raise ValueError on a bad IP literal (RFC 3986 §3.2.2)
        resolved = urljoin(base + MANIFEST_PATH, uri)
        parts = urlsplit(resolved)
    except ValueError:
        raise PolicyError(f"URI {uri!r} does not parse") from None
    if not resolved.startswith(base + "/"):
        raise PolicyError(f"URI {uri!r} is not on this device's server")
    if parts.query or parts.fragment or parts.username is not None:
        raise PolicyError(f"URI {uri!r} is not a plain resource path")
    return resolved[len(base) :]


def component_sizes(
    vm: trust.VerifiedManifest, components: tuple[tuple[bytes, ...], ...]
) -> tuple[int, ...] | None:
    """Each component's image size for a multi-component release, None for one image;
    PolicyError for a release this device cannot install (before any payload byte).

    A device with several components takes only releases that name exactly its
    components, in order, each with one image: a release of component 0 alone would
    leave the staging slot's other regions unvouched for, yet switched to with it.
    SUIT dependencies (manifest-34 §5, process-dependency) are refused: this device
    has no place to put or evaluate a dependency manifest.
    """
    common = vm.manifest.common
    if common.dependencies:
        raise PolicyError("SUIT dependencies (process-dependency) are not supported")
    if len(components) == 1 and len(common.components) == 1:
        return None
    if common.components != components:
        raise PolicyError(
            f"release names {len(common.components)} component(s); this device installs "
            f"exactly its {len(components)} components together, in order"
        )
    check_multi_component_plain(vm)
    sizes = {i.component: i.size for i in vm.payload_images()}
    out = tuple(sizes.get(c) for c in range(len(components)))
    if any(size is None for size in out):
        raise PolicyError("every component of the release needs an image with a size")
    return tuple(s for s in out if s is not None)


def _extra_images(vm: trust.VerifiedManifest) -> tuple[tuple[int, bytes], ...]:
    """(size, digest) of the images of components 1.. (their SlotInfo.extra)."""
    out = []
    for image in sorted(vm.payload_images(), key=lambda i: i.component):
        if image.component > 0:
            assert image.size is not None and image.digest is not None
            out.append((image.size, image.digest.value))
    return tuple(out)


@dataclass(frozen=True)
class MachineConfig:
    """What the machine knows about its device; passed in (DESIGN principle 8)."""

    device: interpreter.DeviceDescription
    server_base: str  # e.g. "coaps://[::1]:5684": /m and /fw/<id> resolve against it
    sector_size: int
    checkpoint_bytes: int = 16 * 1024
    # The device's payload decryption keys (firmware-encryption; from its identity).
    decryption_keys: DecryptionKeys = field(default_factory=DecryptionKeys)
    # A read-only view of a slot (the running one is a delta's source, core.delta);
    # None: this device applies no deltas.
    source: Callable[[int], delta.SourceRegion] | None = None
    # The device's components, in index order; a release for more than one component
    # must name exactly these (docs/decisions/multi-component.md).
    components: tuple[tuple[bytes, ...], ...] = (MAIN_COMPONENT,)

    @property
    def checkpoint(self) -> int:
        return checkpoint_interval(self.checkpoint_bytes, self.sector_size)


@dataclass
class _Fetch:
    """The image fetch being planned or run (one per attempt)."""

    action: interpreter.Fetch
    size: int
    digest: suit.SuitDigest
    path: str | None
    kind: PayloadKind
    base: int = 0  # multi-component: slot bytes of the components before this one
    start: int = 0
    offset: int = 0  # slot bytes written so far
    decoder: PayloadDecoder | None = None
    stream: FetchPayload | None = None


# --- the machine -------------------------------------------------------------------------


@dataclass
class _Tail:
    """What follows the terminal transition's report save."""

    finish: Finish
    remember: RememberRefusal | None = None
    flush: bool = False
    kept: list[Effect] = field(default_factory=list)


class UpdateMachine(Generic[R]):
    """One check-and-update attempt over a persisted record of type R (see module doc)."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self._phase = Phase.IDLE
        self.history: list[Transition] = []  # every transition except BLOCK self-loops
        self.finished: Finish | None = None
        self._pending: Effect | None = None
        self._then: Callable[[], list[Effect]] | None = None
        self._record: R | None = None
        self._envelope = b""
        self._vm: trust.VerifiedManifest | None = None
        self._gen: Generator[interpreter.Action, Any, None] | None = None
        self._fetch: _Fetch | None = None
        self._probe_ok = False
        self._tail_state: tuple[_Tail, bytes, State] | None = None
        self._checkpoint = config.checkpoint
        self._source_check: delta.DeltaInfo | None = None  # a source-match in flight
        self._delta_note = ""  # why a delta was not used, for the reports
        # Multi-component release: the image size of each component (None: one image).
        self._sizes: tuple[int, ...] | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def record(self) -> R:
        """The record as the machine last knew it in flash."""
        assert self._record is not None, "send Begin first"
        return self._record

    @property
    def streaming(self) -> bool:
        """Is the machine waiting for payload blocks (FetchPayload outstanding)?"""
        return isinstance(self._pending, FetchPayload)

    # -- the entry point -------------------------------------------------------------------

    def send(self, event: Event) -> list[Effect]:
        """Take one event; return the effects the host must carry out, in order."""
        if self.finished is not None:
            raise TransitionError(f"the attempt is over ({self.finished.phase.value})")
        expected = ANSWERS.get(type(self._pending), ())
        if not isinstance(event, expected):
            raise TransitionError(
                f"{type(event).__name__} does not answer {type(self._pending).__name__}"
            )
        effects = self._handle(event)
        last = effects[-1] if effects else None
        if isinstance(last, Finish):
            self.finished = last
            self._pending = None
        elif last is not None and type(last) in ANSWERS:
            self._pending = last
        return effects

    def _handle(self, event: Event) -> list[Effect]:
        pending, then = self._pending, self._then
        self._then = None
        if isinstance(event, Failed):
            return self._failed(pending, event.error)
        if isinstance(event, StoreFailed):
            return self._store_failed(event.detail)
        if isinstance(event, Persisted | Flushed):
            self._record = event.record
        if isinstance(event, Probed):
            self._probe_ok = event.matches
        if isinstance(event, BlockReceived):
            return self._block(event.data)
        if then is not None:
            return then()
        match event:
            case Begin(record=record):
                return self._begin(record)
            case EnvelopeFetched():
                return self._fetched(event)
            case NoRelease():
                detail = "no release for this device"
                return self._finish(Step.NO_UPDATE, Phase.UP_TO_DATE, detail=detail)
            case Unreachable(detail=detail):
                return self._finish(
                    Step.UNREACHABLE, Phase.UNREACHABLE, ReportReason.OPERATION_FAILED, detail
                )
            case Verified(vm=vm):
                return self._accepted(vm)
            case ImageChecked(matches=matches):
                if self._source_check is not None and not matches:
                    self._delta_note = "running image is not the patch's source"
                self._source_check = None
                return self._interpret(matches)
            case FetchDone():
                return self._fetch_done()
        raise TransitionError(f"unexpected {type(event).__name__}")  # pragma: no cover

    # -- transitions and the terminal tail ---------------------------------------------

    def _go(
        self, step: Step, reason: ReportReason = ReportReason.OK, detail: str = ""
    ) -> Transition:
        t = update_step(self._phase, step, reason, detail)
        self._phase = t.target
        if step != Step.BLOCK:
            self.history.append(t)
        return t

    def _encoder(
        self,
        record: R,
        state: State,
        reason: ReportReason = ReportReason.OK,
        detail: str = "",
        bytes_received: int | None = None,
    ) -> ReportEncoder:
        vm = self._vm

        def encode(counter: int, lost: int) -> bytes:
            return Report(
                counter=counter,
                state=state,
                reason=reason,
                sequence_number=vm.sequence_number if vm is not None else None,
                manifest_digest=vm.manifest_digest if vm is not None else None,
                bytes_received=bytes_received,
                installed_sequence=record.sequence,
                detail=detail,
                lost=lost,
            ).encode()

        return encode

    def _queue(self, record: R, t: Transition, bytes_received: int | None = None) -> R:
        """`record` with the report transition `t` calls for (if any) in its outbox."""
        if t.report is None:
            return record
        return record.with_report(
            self._encoder(record, t.report, t.reason, t.detail, bytes_received)
        )

    def _persist(self, record: R, then: Callable[[], list[Effect]]) -> list[Effect]:
        self._then = then
        return [Persist(record)]

    def _finish(
        self,
        step: Step,
        phase: Phase,
        reason: ReportReason = ReportReason.OK,
        detail: str = "",
    ) -> list[Effect]:
        """A terminal transition without a report."""
        t = self._go(step, reason, detail)
        assert t.report is None and t.target == phase
        return [Finish(phase, reason, detail)]

    def _end(
        self,
        step: Step,
        reason: ReportReason,
        detail: str,
        *,
        report_detail: str | None = None,
        remember: bool = False,
        flush: bool = False,
    ) -> list[Effect]:
        """A terminal transition with a report: save it, then remember/flush/finish."""
        t = self._go(step, reason, report_detail if report_detail is not None else detail)
        tail = _Tail(Finish(t.target, t.reason, detail), flush=flush)
        if remember:
            tail.remember = RememberRefusal(self._envelope, t.reason, detail)
        assert t.report is not None, "a terminal transition with a report"
        queued = self._queue(self.record, t)
        self._tail_state = (tail, queued.reports[-1], t.report)
        return self._persist(queued, then=lambda: self._tail(tail))

    def _tail(self, tail: _Tail) -> list[Effect]:
        """After the report save: keep a refused report, remember, flush, finish."""
        effects: list[Effect] = [*tail.kept, *([tail.remember] if tail.remember else [])]
        tail.kept, tail.remember = [], None
        if tail.flush:
            tail.flush = False
            self._then = lambda: self._tail(tail)
            return [*effects, FlushReports()]
        return [*effects, tail.finish]

    def _store_failed(self, detail: str) -> list[Effect]:
        if self._phase in TERMINAL:
            # The report save of a terminal transition failed: the flash will not even
            # take the report (ATTACKS.md #48). Keep it in RAM and send it anyway (O5).
            assert self._tail_state is not None
            tail, body, state = self._tail_state
            tail.kept.append(KeepReport(body, state))
            return self._tail(tail)
        return self._end(
            Step.ERROR,
            ReportReason.OPERATION_FAILED,
            detail,
            report_detail=f"flash: {detail}",
        )

    def _failed(self, pending: Effect | None, error: OtaError) -> list[Effect]:
        if isinstance(pending, FetchEnvelope):
            # The manifest resource itself broke the rules (too large, bad Block2).
            return self._end(
                Step.REFUSED, error.reason, str(error), report_detail=f"manifest fetch: {error}"
            )
        if isinstance(pending, Verify):
            return self._refused(error)
        if isinstance(pending, FinishImage) and isinstance(error, ConditionFailed):
            # Wrong bytes (ATTACKS.md #10): resuming would re-hash the same wrong prefix,
            # so the download is forgotten, in the same save as the FAILED report.
            self._record = replace(self.record, download=None)
        if isinstance(pending, FetchPayload | Drain | FinishImage):
            return self._payload_failed(error)
        return self._fail(error)

    # -- delta payloads: which one was used, and the fallback --------------------------

    def _payload_detail(self) -> str:
        """What the reports say about the payload: "" for a plain image as always."""
        fetch = self._fetch
        assert fetch is not None
        if fetch.kind.name == "delta":
            info = delta_of_kind(fetch.kind)
            label = getattr(fetch.kind, "label", "delta")  # "delta+encrypted-a128ctr"
            return f"{label} from {info.source_digest.value.hex()[:16]}" if info else label
        if self._delta_note:
            return f"full image ({self._delta_note})"[:200]
        return ""

    def _payload_failed(self, error: OtaError) -> list[Effect]:
        """A delta's payload failed: try the manifest's next alternative (the full image).

        The error is thrown into the interpreter at the delta's Fetch; a try-each catches
        it and runs its next alternative (manifest-34 §8.4.10.2), whose Fetch the machine
        plans like any other (the slot is rewritten from its first byte). Without one,
        the error ends the attempt as before. The source slot was only read.
        """
        fetch = self._fetch
        if fetch is None or fetch.kind.name != "delta" or isinstance(error, StagingError):
            return self._fail(error)
        self._delta_note = f"delta failed: {error}"
        self._fetch = None
        return self._interpret(None, error=ConditionFailed(str(error)))

    def _fail(self, error: OtaError) -> list[Effect]:
        """An OtaError while acting on an accepted manifest."""
        if self._phase == Phase.VERIFIED and isinstance(error, ConditionFailed | PolicyError):
            # Failed before a byte was fetched: a refusal of the manifest.
            return self._end(Step.REFUSED, error.reason, str(error), remember=True, flush=True)
        return self._end(Step.ERROR, error.reason, str(error), flush=True)

    # -- checking ----------------------------------------------------------------------

    def _begin(self, record: R) -> list[Effect]:
        self._record = record
        if record.boot != BootStatus.CONFIRMED:
            # A trial or a pending candidate is unsettled (the host must boot and settle
            # first): the staging slot may be the running image. Never touch it.
            return self._finish(
                Step.UNSETTLED,
                Phase.FAILED,
                ReportReason.OPERATION_FAILED,
                "boot status not settled; reboot first",
            )
        self._go(Step.CHECK)
        return [FetchEnvelope()]

    def _fetched(self, event: EnvelopeFetched) -> list[Effect]:
        self._envelope = event.envelope
        if event.earlier is not None:
            # Refused before, and a refusal is final: no verification, no report, no
            # flash write (a server replaying it must not wear the flash out).
            reason, detail = event.earlier
            return self._finish(Step.REFUSED_BEFORE, Phase.REJECTED, reason, detail)
        return [Verify(event.envelope, self.record)]

    def _refused(self, error: OtaError) -> list[Effect]:
        """The trust gate refused the envelope."""
        record = self.record
        if isinstance(error, AlreadyInstalled):
            running = record.slots[record.running]
            if running is not None and running.manifest_digest == record.sequence_digest:
                return self._finish(Step.NO_UPDATE, Phase.UP_TO_DATE)
            # The trusted number was raised by a release that was given up (#47).
            return self._end(
                Step.REFUSED,
                ReportReason.CONDITION_FAILED,
                "release was reverted and given up",
                remember=True,
            )
        return self._end(Step.REFUSED, error.reason, str(error), remember=True)

    def _accepted(self, vm: trust.VerifiedManifest) -> list[Effect]:
        self._go(Step.ACCEPTED)
        self._vm = vm
        try:
            self._sizes = component_sizes(vm, self.config.components)
        except OtaError as exc:
            return self._fail(exc)
        self._gen = interpreter.run(vm.envelope, interpreter.UPDATE, self.config.device)
        return self._interpret(None)

    # -- the SUIT update procedure -----------------------------------------------------

    @property
    def _staging(self) -> int:
        return self.record.candidate

    def _interpret(self, answer: object, error: OtaError | None = None) -> list[Effect]:
        """Run the interpreter until it needs the host, fetches, or ends.

        `error` is thrown in at the pending action instead (a delta's failed Fetch:
        try-each then runs its next alternative, manifest-34 §8.4.10.2)."""
        assert self._gen is not None
        try:
            action = self._gen.send(answer) if error is None else self._gen.throw(error)
            while True:
                if isinstance(action, interpreter.Fetch):
                    if self._sizes is not None:
                        # Each component once, in index order, into its own region.
                        done = -1 if self._fetch is None else self._fetch.action.component
                        if action.component != done + 1:
                            raise CommandError("components must be fetched once each, in order")
                    elif action.component != 0 or self._fetch is not None:
                        raise CommandError("only one fetch into component 0 is supported")
                    return self._plan_fetch(action)
                if isinstance(action, interpreter.CheckImage):
                    if action.component < len(self.config.components):
                        return [CheckSlotImage(self._staging, action)]
                    answer = False
                elif isinstance(action, interpreter.CheckCondition):
                    assert self._vm is not None
                    info = delta_in_force(action.parameters, self._vm)
                    if action.code == suit.CMD_DELTA_SOURCE_MATCH and info is not None:
                        # The running slot must hold the patch's source (core.delta).
                        self._source_check = info
                        check = interpreter.CheckImage(0, info.source_digest, info.source_size)
                        return [CheckSlotImage(self.record.running, check)]
                    answer = False  # manifest-34 §8.4.10: unknown conditions fail
                else:
                    raise CommandError(f"{type(action).__name__} is not supported in update")
                action = self._gen.send(answer)
        except StopIteration:
            return self._procedure_done()
        except OtaError as exc:
            return self._fail(exc)

    def _procedure_done(self) -> list[Effect]:
        if self._fetch is None:
            return self._end(
                Step.ERROR, ReportReason.COMMAND_UNSUPPORTED, "manifest fetches no image"
            )
        if self._sizes is not None and self._fetch.action.component != len(self._sizes) - 1:
            return self._end(
                Step.ERROR, ReportReason.COMMAND_UNSUPPORTED, "manifest fetches not every component"
            )
        # Stage: one save marks the candidate PENDING together with its report.
        vm = self._vm
        record = self.record
        dl = record.download
        assert vm is not None and dl is not None and dl.durable == dl.image_size
        image = next(i for i in vm.payload_images() if i.component == 0)
        assert image.digest is not None and image.size is not None
        info = SlotInfo(
            image.size,
            image.digest.value,
            vm.sequence_number,
            vm.manifest_digest.value,
            dl.envelope_length,
            dl.envelope_sha256,
            _extra_images(vm) if self._sizes is not None else (),
        )
        status, report_state = boot_step(record.boot, BootEvent.STAGE)
        staged = replace(
            record,
            boot=status,
            slots=with_slot(record.slots, record.candidate, info),
            download=None,
        )
        staged = staged.with_report(self._encoder(staged, report_state))
        return self._persist(staged, then=self._staged)

    def _staged(self) -> list[Effect]:
        self._go(Step.STAGED)
        self._then = lambda: [Finish(Phase.STAGED)]
        return [FlushReports()]

    # -- the image fetch ---------------------------------------------------------------

    def _plan_fetch(self, action: interpreter.Fetch) -> list[Effect]:
        """Re-stage, resume or start over (raises PolicyError before touching flash)."""
        if action.digest is None or action.size is None:
            raise PolicyError("fetch without image digest and size")
        vm = self._vm
        assert vm is not None
        path = (
            None if action.uri.startswith("#") else resolve_uri(self.config.server_base, action.uri)
        )
        source = self.config.source(self.record.running) if self.config.source else None
        kind = select_kind(action, vm, self.config.decryption_keys, source)
        base = 0
        if self._sizes is not None:
            if action.size != self._sizes[action.component]:
                raise PolicyError("a fetch's image-size differs from its component's")
            base = sum(self._sizes[: action.component])
        fetch = _Fetch(action, action.size, action.digest, path, kind, base)
        self._fetch = fetch
        if action.component > 0:
            if self._phase == Phase.DOWNLOADED:  # re-staged: the probe checked them all
                return self._interpret(None)
            return self._next_component()
        record, staging = self.record, self._staging
        held = record.slots[staging]
        if (
            record.download is None
            and held is not None
            and held.manifest_digest == vm.manifest_digest.value
        ):
            # A retried trial of the same release (e.g. after a power cut in the trial
            # window): the staging slot may still hold exactly this image. No download.
            self._then = self._restage_probed
            check = interpreter.CheckImage(0, fetch.digest, fetch.size)
            more = tuple(
                interpreter.CheckImage(i.component, i.digest, i.size)
                for i in vm.payload_images()
                if i.component > 0 and i.digest is not None
            )
            return [ProbeSlot(staging, held.envelope_length, held.envelope_sha256, check, more)]
        return self._plan_resume()

    def _restage_probed(self) -> list[Effect]:
        if not self._probe_ok:
            return self._plan_resume()
        fetch, record = self._fetch, self.record
        held = record.slots[self._staging]
        assert fetch is not None and held is not None and self._vm is not None
        dl = Download(
            self._vm.manifest_digest.value,
            self._staging,
            self._total,
            self._total,
            held.envelope_length,
            held.envelope_sha256,
        )
        t = self._go(Step.FETCH_DONE)
        done = self._queue(replace(record, download=dl), t, self._total)
        return self._persist(done, then=lambda: self._interpret(None))

    def _plan_resume(self) -> list[Effect]:
        fetch, record, vm = self._fetch, self.record, self._vm
        assert fetch is not None and vm is not None
        dl = record.download
        if (
            dl is not None
            and dl.manifest_digest == vm.manifest_digest.value
            and dl.slot == self._staging
            and dl.image_size == self._total
            and dl.envelope_length == len(self._envelope)
        ):
            self._then = self._resume_probed
            return [ProbeSlot(self._staging, dl.envelope_length, dl.envelope_sha256, None)]
        return self._start_over()

    def _resume_probed(self) -> list[Effect]:
        if not self._probe_ok:
            return self._start_over()
        fetch, dl = self._fetch, self.record.download
        assert fetch is not None and dl is not None
        start = fetch.kind.resume_from(self._local(dl.durable))
        return self._start_fetch(replace(dl, durable=self._durable_at(start, dl.durable)))

    # Multi-component releases are downloaded one component after the other into the
    # staging slot's regions; `Download.durable` counts the slot bytes of all of them
    # (component 0's, then 1's, ...), so one field keeps the resume point of the whole
    # release. With one image, base is 0 and both helpers are the identity.

    @property
    def _total(self) -> int:
        """Slot bytes of the whole release (all components)."""
        assert self._fetch is not None
        return self._fetch.size if self._sizes is None else sum(self._sizes)

    def _local(self, durable: int) -> int:
        """The current component's durable bytes, given the release's."""
        fetch = self._fetch
        assert fetch is not None
        return min(max(durable - fetch.base, 0), fetch.size)

    def _durable_at(self, start: int, durable: int) -> int:
        """The release's durable bytes when this component resumes at `start` (a whole
        component keeps what later components already hold)."""
        fetch = self._fetch
        assert fetch is not None
        return durable if start >= fetch.size else fetch.base + start

    def _next_component(self) -> list[Effect]:
        """The next image of a multi-component release (phase DOWNLOADING)."""
        fetch, dl = self._fetch, self.record.download
        assert fetch is not None and dl is not None
        start = fetch.kind.resume_from(self._local(dl.durable))
        fetch.start = fetch.offset = start
        durable = self._durable_at(start, dl.durable)
        if durable != dl.durable:
            return self._persist(
                replace(self.record, download=replace(dl, durable=durable)), then=self._open
            )
        return self._open()

    def _start_over(self) -> list[Effect]:
        """A new download (or a newer manifest, ATTACKS.md #50)."""
        record, staging = self.record, self._staging
        if record.slots[staging] is not None or record.download is not None:
            # First make sure no record points at the slot or envelope area any more,
            # then rewrite them.
            cleared = replace(record, slots=with_slot(record.slots, staging, None), download=None)
            return self._persist(cleared, then=self._store_envelope)
        return self._store_envelope()

    def _store_envelope(self) -> list[Effect]:
        self._then = self._envelope_stored
        return [StoreEnvelope(self._staging, self._envelope)]

    def _envelope_stored(self) -> list[Effect]:
        fetch, vm, env = self._fetch, self._vm, self._envelope
        assert fetch is not None and vm is not None
        sha = hashlib.sha256(env).digest()
        dl = Download(vm.manifest_digest.value, self._staging, 0, self._total, len(env), sha)
        return self._start_fetch(dl)

    def _start_fetch(self, dl: Download) -> list[Effect]:
        fetch = self._fetch
        assert fetch is not None
        fetch.start = fetch.offset = self._local(dl.durable)
        step = Step.FALLBACK if self._phase == Phase.DOWNLOADING else Step.FETCH_STARTED
        t = self._go(step, detail=self._payload_detail())
        started = self._queue(replace(self.record, download=dl), t, dl.durable)
        return self._persist(started, then=self._flush_then_open)

    def _flush_then_open(self) -> list[Effect]:
        self._then = self._open
        return [FlushReports()]

    def _open(self) -> list[Effect]:
        fetch, vm = self._fetch, self._vm
        assert fetch is not None and vm is not None
        integrated = None
        wire_size = fetch.kind.payload_size(fetch.size)
        if fetch.path is None:
            integrated = vm.envelope.integrated_payload(fetch.action.uri)
            if integrated is None or len(integrated) != wire_size:
                return self._fail(PolicyError("integrated payload missing or of the wrong size"))
        fetch.decoder = fetch.kind.decoder(fetch.start)
        opened = OpenWriter(
            self._staging, fetch.size, fetch.digest, fetch.start, fetch.action.component
        )
        if fetch.start >= fetch.size:  # durable already: only the writer's re-hash is left
            self._then = self._image_complete
            return [opened, FinishImage()]
        fetch.stream = FetchPayload(
            fetch.path, integrated, fetch.kind.fetch_offset(fetch.start), wire_size
        )
        return [opened, fetch.stream]

    def _block(self, data: bytes) -> list[Effect]:
        fetch = self._fetch
        assert fetch is not None and fetch.decoder is not None and fetch.stream is not None
        self._go(Step.BLOCK)
        try:
            out = fetch.decoder.feed(data)
        except OtaError as exc:
            return self._payload_failed(exc)
        return self._slot_bytes(out)

    def _drain(self) -> list[Effect]:
        fetch = self._fetch
        assert fetch is not None and isinstance(fetch.decoder, DrainingDecoder)
        try:
            out = fetch.decoder.drain()
        except OtaError as exc:
            return self._payload_failed(exc)
        return self._slot_bytes(out)

    def _slot_bytes(self, out: bytes) -> list[Effect]:
        fetch = self._fetch
        assert fetch is not None and fetch.stream is not None
        fetch.offset += len(out)
        effects: list[Effect] = [Write(out)] if out else []
        if out and _drains(fetch.decoder):
            self._then = self._drain  # there may be more from the same input
            return [*effects, Drain()]
        self._pending = fetch.stream  # the stream goes on
        offset = fetch.offset
        if fetch.kind.checkpoints and offset % self._checkpoint == 0 and offset < fetch.size:
            dl = self.record.download
            assert dl is not None
            self._then = self._stream_on
            durable = fetch.base + offset
            effects.append(Persist(replace(self.record, download=replace(dl, durable=durable))))
        return effects

    def _stream_on(self) -> list[Effect]:
        assert self._fetch is not None
        self._pending = self._fetch.stream
        return []

    def _fetch_done(self) -> list[Effect]:
        fetch = self._fetch
        assert fetch is not None and fetch.decoder is not None
        try:
            tail = fetch.decoder.finish()
        except OtaError as exc:
            if fetch.kind.name != "delta":
                # A payload that fails authentication (A128GCM tag) is not resumed either.
                self._record = replace(self.record, download=None)
            return self._payload_failed(exc)
        self._then = self._image_complete
        return [Write(tail), FinishImage()] if tail else [FinishImage()]

    def _image_complete(self) -> list[Effect]:
        fetch, dl = self._fetch, self.record.download
        assert fetch is not None and dl is not None
        # The DOWNLOADED report names a payload kind other than the plain image (e.g.
        # "payload encrypted-a128ctr", "delta from 1f2e..."), so the operator sees how
        # the image arrived.
        kind = fetch.kind.name
        durable = max(dl.durable, fetch.base + fetch.size)
        if self._sizes is not None and fetch.action.component < len(self._sizes) - 1:
            self._go(Step.COMPONENT_DONE)
            done = replace(self.record, download=replace(dl, durable=durable))
            return self._persist(done, then=lambda: self._interpret(None))
        plain = "" if kind == "plain" else f"payload {kind}"
        t = self._go(Step.FETCH_DONE, detail=self._payload_detail() or plain)
        done = replace(self.record, download=replace(dl, durable=durable))
        done = self._queue(done, t, durable)
        return self._persist(done, then=lambda: self._interpret(None))


def delta_of_kind(kind: PayloadKind) -> delta.DeltaInfo | None:
    info = getattr(kind, "info", None)
    return info if isinstance(info, delta.DeltaInfo) else None


_DRAINS: dict[type, bool] = {}


def _drains(decoder: object) -> bool:
    """isinstance(decoder, DrainingDecoder), once per decoder class: on a
    runtime-checkable Protocol isinstance walks the protocol's members on every call,
    which was 5 % of a simulated device's CPU per Block2 block (issue 14 §4)."""
    kind = type(decoder)
    found = _DRAINS.get(kind)
    if found is None:
        found = _DRAINS[kind] = isinstance(decoder, DrainingDecoder)
    return found
