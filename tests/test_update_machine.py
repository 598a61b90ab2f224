"""The update machine (core.update_machine), table-driven, with no flash and no network.

Each scenario below starts the machine from a persisted record, answers its effects
with a scripted host (a dict instead of a flash, a list of blocks instead of a server)
and checks the transitions it took, the records it asked to persist (each transition's
report in the same save, ATTACKS.md O5), and the effects it did or did not ask for
(no payload byte before the trust gate, resume keyed by manifest digest #23/#50,
re-stage without a download, forget a download whose digest is wrong #10). One test
checks that the scenarios together take every transition of the table.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import cbor2
import pytest
from evil_server import CLASS, VENDOR, manifest_bytes, multi_envelope, sign

from device_sim.device_state import DeviceState
from otacoap.core import boot_status, cose, ids, interpreter, suit, trust, update_machine
from otacoap.core.boot_status import BOOT_TRANSITIONS, BootEvent, boot_step
from otacoap.core.build import DEVICE_COMPONENTS
from otacoap.core.errors import (
    ConditionFailed,
    LimitExceeded,
    OtaError,
    ReportReason,
    TransferError,
)
from otacoap.core.report import State, decode_report
from otacoap.core.update_machine import (
    TRANSITIONS,
    Begin,
    BlockReceived,
    CheckSlotImage,
    Done,
    Effect,
    EnvelopeFetched,
    Event,
    Failed,
    FetchDone,
    FetchEnvelope,
    FetchPayload,
    Finish,
    FinishImage,
    Flushed,
    FlushReports,
    ImageChecked,
    KeepReport,
    MachineConfig,
    NoRelease,
    OpenWriter,
    Persist,
    Persisted,
    Phase,
    Probed,
    ProbeSlot,
    RememberRefusal,
    Step,
    StoreEnvelope,
    StoreFailed,
    Unreachable,
    UpdateMachine,
    Verified,
    Verify,
    Write,
    checkpoint_interval,
    resolve_uri,
)
from otacoap.core.update_record import BootStatus, Download, SlotInfo, TransitionError, Trial

BASE = "coaps://server.example"
KEY = cose.generate_key("es256")
SEQ = 5
FACTORY = b"factory image".ljust(3000, b"\0")
IMAGE = bytes(range(256)) * 160  # 40 KiB: two checkpoints at 16 KiB
CONFIG = MachineConfig(
    device=interpreter.DeviceDescription(
        vendor_id=ids.vendor_id(VENDOR), class_id=ids.class_id(ids.vendor_id(VENDOR), CLASS)
    ),
    server_base=BASE,
    sector_size=4096,
)


def envelope(
    image: bytes = IMAGE, seq: int = SEQ + 1, key: cose.SigningKey = KEY, **kw: Any
) -> bytes:
    return sign(manifest_bytes(image=image, seq=seq, **kw), key)


def without_install(image: bytes, seq: int) -> bytes:
    """A manifest that validates and invokes but never fetches anything."""
    body = cbor2.loads(manifest_bytes(image=image, seq=seq))
    del body[suit.M_INSTALL]
    return sign(cbor2.dumps(body, canonical=True), KEY)


def mdigest(env: bytes) -> bytes:
    return trust.accept(env, trust.TrustPolicy(anchors=(KEY.public,))).manifest_digest.value


FACTORY_ENV = envelope(FACTORY, SEQ)


def factory_record(**changes: Any) -> DeviceState:
    info = SlotInfo(
        len(FACTORY),
        hashlib.sha256(FACTORY).digest(),
        SEQ,
        mdigest(FACTORY_ENV),
        len(FACTORY_ENV),
        hashlib.sha256(FACTORY_ENV).digest(),
    )
    state = DeviceState(
        sequence=SEQ,
        sequence_digest=info.manifest_digest,
        active=0,
        boot=BootStatus.CONFIRMED,
        slots=(info, None),
    )
    return replace(state, **changes)


# --- the scripted host ---------------------------------------------------------------------


@dataclass
class Host:
    """Answers effects from a script; records what the machine asked for."""

    envelope: bytes | None = field(default_factory=envelope)
    manifest_error: OtaError | None = None
    unreachable: bool = False
    earlier: tuple[ReportReason, str] | None = None
    image: bytes = IMAGE  # what the server serves
    slot: bytearray = field(default_factory=bytearray)  # the staging slot
    probe: bool = False
    image_check: bool | None = None  # None: hash the slot
    fail_block: int | None = None  # TransferError instead of this block
    store_fails: set[int] = field(default_factory=set)  # indexes of Persist effects
    envelope_error: OtaError | None = None
    effects: list[Effect] = field(default_factory=list)
    persisted: list[DeviceState] = field(default_factory=list)
    machine: UpdateMachine[DeviceState] = field(default_factory=lambda: UpdateMachine(CONFIG))
    _persists: int = 0

    def run(self, record: DeviceState) -> Finish:
        self.drive(Begin(record))
        assert self.machine.finished is not None
        return self.machine.finished

    def drive(self, event: Event | None) -> None:
        while event is not None:
            event = self.carry_out(self.machine.send(event))

    def carry_out(self, effects: list[Effect]) -> Event | None:
        for effect in effects:
            self.effects.append(effect)
            answer = self.answer(effect)
            if answer is not None:
                return answer
        return None

    def answer(self, effect: Effect) -> Event | None:
        match effect:
            case FetchEnvelope():
                if self.unreachable:
                    return Unreachable("no answer")
                if self.manifest_error is not None:
                    return Failed(self.manifest_error)
                if self.envelope is None:
                    return NoRelease()
                return EnvelopeFetched(self.envelope, self.earlier)
            case Verify(envelope=env, record=record):
                policy = trust.TrustPolicy(
                    anchors=(KEY.public,),
                    current_sequence=record.sequence,
                    current_manifest_digest=record.sequence_digest,
                    vendor_id=CONFIG.device.vendor_id,
                    class_id=CONFIG.device.class_id,
                    allowed_uri_prefixes=(BASE + "/",),
                )
                try:
                    return Verified(trust.accept(env, policy))
                except OtaError as exc:
                    return Failed(exc)
            case CheckSlotImage(action=action):
                if self.image_check is not None:
                    return ImageChecked(self.image_check)
                return ImageChecked(self._matches(action))
            case ProbeSlot():
                return Probed(self.probe)
            case Persist(record=record):
                index, self._persists = self._persists, self._persists + 1
                if index in self.store_fails:
                    return StoreFailed("flash refused")
                self.persisted.append(record)
                return Persisted(record)
            case FlushReports():
                return Flushed(self.machine.record)
            case StoreEnvelope():
                if self.envelope_error is not None:
                    return Failed(self.envelope_error)
                return Done()
            case OpenWriter(resume_at=resume_at):
                del self.slot[resume_at:]
                return None
            case FetchPayload(start=start, size=size):
                for n, pos in enumerate(range(start, size, 1024)):
                    if n == self.fail_block:
                        return Failed(TransferError("link lost"))
                    self.drive(BlockReceived(self.image[pos : pos + 1024]))
                    if not self.machine.streaming:
                        return None
                return FetchDone()
            case Write(data=data):
                self.slot += data
                return None
            case FinishImage():
                digest = hashlib.sha256(self.slot).digest()
                if digest != hashlib.sha256(IMAGE).digest():
                    return Failed(ConditionFailed("image digest mismatch"))
                return Done()
            case RememberRefusal() | KeepReport() | Finish():
                return None
        raise AssertionError(effect)

    def _matches(self, action: interpreter.CheckImage) -> bool:
        return (
            action.size == len(self.slot)
            and hashlib.sha256(self.slot).digest() == action.digest.value
        )

    # -- what the machine did ------------------------------------------------------------

    @property
    def steps(self) -> list[tuple[Phase, Step]]:
        return [(t.source, t.step) for t in self.machine.history]

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.effects if isinstance(e, kind)]

    def reports(self) -> list[State]:
        """The states of the reports queued, in order, over every persisted record."""
        seen: dict[int, State] = {}
        for record in self.persisted:
            for body in record.reports:
                report = decode_report(body)
                seen[report.counter] = report.state
        return [seen[c] for c in sorted(seen)]


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> set[tuple[Phase, Step]]:
    """Every (phase, step) the machine takes in a test, BLOCK self-loops included."""
    seen: set[tuple[Phase, Step]] = set()
    real = update_machine.update_step

    def spy(phase: Phase, step: Step, *args: Any) -> update_machine.Transition:
        seen.add((phase, step))
        return real(phase, step, *args)

    monkeypatch.setattr(update_machine, "update_step", spy)
    return seen


# --- the scenarios, one or more per transition ----------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    host: Callable[[], Host]
    record: Callable[[], DeviceState]
    steps: list[tuple[Phase, Step]]
    finish: Phase
    reports: list[State]
    check: Callable[[Host], None] = lambda host: None


def downloaded(**changes: Any) -> DeviceState:
    env = envelope()
    dl = Download(mdigest(env), 1, 16 * 1024, len(IMAGE), len(env), hashlib.sha256(env).digest())
    return factory_record(download=dl, **changes)


def staged_before(**changes: Any) -> DeviceState:
    """A retried trial: slot 1 still holds the image and envelope of this release."""
    env = envelope()
    info = SlotInfo(
        len(IMAGE),
        hashlib.sha256(IMAGE).digest(),
        SEQ + 1,
        mdigest(env),
        len(env),
        hashlib.sha256(env).digest(),
    )
    record = factory_record(**changes)
    return replace(record, slots=(record.slots[0], info))


CHECK = (Phase.IDLE, Step.CHECK)
ACCEPTED = (Phase.CHECKING, Step.ACCEPTED)
STARTED = (Phase.VERIFIED, Step.FETCH_STARTED)
FETCHED = (Phase.DOWNLOADING, Step.FETCH_DONE)
STAGED = (Phase.DOWNLOADED, Step.STAGED)
HAPPY = [CHECK, ACCEPTED, STARTED, FETCHED, STAGED]
HAPPY_REPORTS = [State.DOWNLOADING, State.DOWNLOADED, State.INSTALLING]


def check_happy(host: Host) -> None:
    final = host.persisted[-1]
    assert final.boot == BootStatus.PENDING and final.download is None
    assert final.slots[1] is not None and final.slots[1].sequence == SEQ + 1
    assert bytes(host.slot) == IMAGE
    # Checkpoints every 16 KiB (whole sectors and blocks), each its own save.
    durables = [r.download.durable for r in host.persisted if r.download is not None]
    assert durables == [0, 16 * 1024, 32 * 1024, len(IMAGE)]
    # Nothing of the payload before the gate; the envelope is stored before the fetch.
    kinds = [type(e) for e in host.effects]
    assert kinds.index(Verify) < kinds.index(StoreEnvelope) < kinds.index(FetchPayload)


def check_no_write(host: Host) -> None:
    assert not host.persisted and not host.of(StoreEnvelope) and not host.of(FetchPayload)


def check_remembered(host: Host) -> None:
    assert len(host.of(RememberRefusal)) == 1
    assert not host.of(FetchPayload) and not host.of(StoreEnvelope)


def check_manifest_refusal(host: Host) -> None:
    assert not host.of(RememberRefusal)  # not a verdict on any signed envelope
    (report,) = [decode_report(b) for b in host.persisted[-1].reports]
    assert report.detail.startswith("manifest fetch: ")


def check_resume(host: Host) -> None:
    assert not host.of(StoreEnvelope)
    assert host.of(OpenWriter)[0].resume_at == 16 * 1024
    assert host.of(FetchPayload)[0].start == 16 * 1024
    first = decode_report(host.persisted[0].reports[-1])
    assert first.state == State.DOWNLOADING and first.bytes_received == 16 * 1024


def check_start_over(host: Host) -> None:
    # The old download and slot are unlinked in their own save before the envelope
    # area is rewritten (ATTACKS.md #50).
    cleared = host.persisted[0]
    assert cleared.download is None and cleared.slots[1] is None and not cleared.reports
    assert host.of(StoreEnvelope) and host.of(FetchPayload)[0].start == 0


def check_restage(host: Host) -> None:
    assert not host.of(FetchPayload) and not host.of(StoreEnvelope)
    assert host.persisted[-1].boot == BootStatus.PENDING


def check_resumable(host: Host) -> None:
    last = host.persisted[-1]
    assert last.download is not None and last.download.durable == 16 * 1024


def check_forgotten(host: Host) -> None:
    last = host.persisted[-1]  # one save: the download forgotten, the FAILED report
    assert last.download is None
    assert decode_report(last.reports[-1]).state == State.FAILED


def check_kept_in_ram(host: Host) -> None:
    (kept,) = host.of(KeepReport)
    assert decode_report(kept.body).state == State.FAILED
    assert "flash: flash refused" in decode_report(kept.body).detail


def check_flash_report(host: Host) -> None:
    assert decode_report(host.persisted[-1].reports[-1]).detail == "flash: flash refused"


AUX = bytes(reversed(range(256))) * 40  # 10 KiB: component 1 of a two-component release
MULTI_CONFIG = replace(CONFIG, components=DEVICE_COMPONENTS)
MULTI_ENV = multi_envelope(KEY, IMAGE, AUX, SEQ + 1)


@dataclass
class MultiHost(Host):
    """A two-component device: component i is written into region i of the slot."""

    aux: bytes = AUX
    component: int = 0
    regions: dict[int, bytearray] = field(default_factory=lambda: {0: bytearray(), 1: bytearray()})

    def __post_init__(self) -> None:
        self.envelope = (
            MULTI_ENV if self.aux == AUX else multi_envelope(KEY, IMAGE, self.aux, SEQ + 1)
        )
        self.machine = UpdateMachine(MULTI_CONFIG)

    def answer(self, effect: Effect) -> Event | None:
        match effect:
            case OpenWriter(resume_at=resume_at, component=component):
                self.component = component
                del self.regions[component][resume_at:]
                return None
            case FetchPayload(path=path, start=start, size=size):
                image = (
                    self.aux if path == ids.image_uri(hashlib.sha256(self.aux).digest()) else IMAGE
                )
                for pos in range(start, size, 1024):
                    self.drive(BlockReceived(image[pos : pos + 1024]))
                    if not self.machine.streaming:
                        return None
                return FetchDone()
            case Write(data=data):
                self.regions[self.component] += data
                return None
            case FinishImage():
                want = (IMAGE, AUX)[self.component]
                if bytes(self.regions[self.component]) != want:
                    return Failed(ConditionFailed("image digest mismatch"))
                return Done()
            case CheckSlotImage(action=action):
                region = self.regions[action.component]
                return ImageChecked(hashlib.sha256(region).digest() == action.digest.value)
        return super().answer(effect)


def check_both_components(host: Host) -> None:
    assert isinstance(host, MultiHost)
    final = host.persisted[-1]
    assert final.boot == BootStatus.PENDING and final.download is None
    info = final.slots[1]
    assert info is not None and info.extra == ((len(AUX), hashlib.sha256(AUX).digest()),)
    assert (bytes(host.regions[0]), bytes(host.regions[1])) == (IMAGE, AUX)
    # One resume point for the release: component 0's bytes, then component 1's.
    durables = [r.download.durable for r in host.persisted if r.download is not None]
    assert durables == [0, 16 * 1024, 32 * 1024, len(IMAGE), len(IMAGE) + len(AUX)]
    assert [e.component for e in host.of(OpenWriter)] == [0, 1]


def multi_staged_before() -> DeviceState:
    """A retried trial of a two-component release: slot 1 still holds both images."""
    env = MULTI_ENV
    info = SlotInfo(
        len(IMAGE),
        hashlib.sha256(IMAGE).digest(),
        SEQ + 1,
        mdigest(env),
        len(env),
        hashlib.sha256(env).digest(),
        ((len(AUX), hashlib.sha256(AUX).digest()),),
    )
    record = factory_record()
    return replace(record, slots=(record.slots[0], info))


def check_multi_restage(host: Host) -> None:
    assert not host.of(FetchPayload) and not host.of(StoreEnvelope)
    (probe,) = host.of(ProbeSlot)
    assert [c.component for c in probe.more] == [1]
    assert host.persisted[-1].slots[1] == multi_staged_before().slots[1]


SCENARIOS = [
    Scenario("happy path", Host, factory_record, HAPPY, Phase.STAGED, HAPPY_REPORTS, check_happy),
    Scenario(
        "two-component release re-staged without a download",
        lambda: MultiHost(probe=True, regions={0: bytearray(IMAGE), 1: bytearray(AUX)}),
        multi_staged_before,
        [CHECK, ACCEPTED, (Phase.VERIFIED, Step.FETCH_DONE), STAGED],
        Phase.STAGED,
        [State.DOWNLOADED, State.INSTALLING],
        check_multi_restage,
    ),
    Scenario(
        "two-component release",
        MultiHost,
        factory_record,
        [CHECK, ACCEPTED, STARTED, (Phase.DOWNLOADING, Step.COMPONENT_DONE), FETCHED, STAGED],
        Phase.STAGED,
        HAPPY_REPORTS,
        check_both_components,
    ),
    Scenario(
        "unsettled boot status",
        Host,
        lambda: factory_record(boot=BootStatus.TESTING),
        [(Phase.IDLE, Step.UNSETTLED)],
        Phase.FAILED,
        [],
        lambda host: host.effects == [host.machine.finished],
    ),
    Scenario(
        "no release (4.04)",
        lambda: Host(envelope=None),
        factory_record,
        [CHECK, (Phase.CHECKING, Step.NO_UPDATE)],
        Phase.UP_TO_DATE,
        [],
        check_no_write,
    ),
    Scenario(
        "server unreachable",
        lambda: Host(unreachable=True),
        factory_record,
        [CHECK, (Phase.CHECKING, Step.UNREACHABLE)],
        Phase.UNREACHABLE,
        [],
        check_no_write,
    ),
    Scenario(
        "manifest resource breaks the rules",
        lambda: Host(manifest_error=LimitExceeded("manifest too large")),
        factory_record,
        [CHECK, (Phase.CHECKING, Step.REFUSED)],
        Phase.REJECTED,
        [State.REJECTED],
        check_manifest_refusal,
    ),
    Scenario(
        "envelope refused lately",
        lambda: Host(earlier=(ReportReason.UNAUTHORISED, "bad signature")),
        factory_record,
        [CHECK, (Phase.CHECKING, Step.REFUSED_BEFORE)],
        Phase.REJECTED,
        [],
        lambda host: check_no_write(host) or not host.of(Verify),
    ),
    Scenario(
        "trust gate refuses (unknown signer)",
        lambda: Host(envelope=envelope(key=cose.generate_key("es256"))),
        factory_record,
        [CHECK, (Phase.CHECKING, Step.REFUSED)],
        Phase.REJECTED,
        [State.REJECTED],
        check_remembered,
    ),
    Scenario(
        "the installed release again",
        lambda: Host(envelope=FACTORY_ENV),
        factory_record,
        [CHECK, (Phase.CHECKING, Step.NO_UPDATE)],
        Phase.UP_TO_DATE,
        [],
        check_no_write,
    ),
    Scenario(
        "a release that was given up (#47)",
        lambda: Host(envelope=envelope()),
        lambda: factory_record(sequence=SEQ + 1, sequence_digest=mdigest(envelope())),
        [CHECK, (Phase.CHECKING, Step.REFUSED)],
        Phase.REJECTED,
        [State.REJECTED],
        check_remembered,
    ),
    Scenario(
        "image URI off this server",
        lambda: Host(envelope=envelope(uri="/fw/abc?x=1")),
        factory_record,
        [CHECK, ACCEPTED, (Phase.VERIFIED, Step.REFUSED)],
        Phase.REJECTED,
        [State.REJECTED],
        check_remembered,
    ),
    Scenario(
        "resume under the same manifest digest (#23)",
        lambda: Host(probe=True, slot=bytearray(IMAGE[: 16 * 1024])),
        downloaded,
        HAPPY,
        Phase.STAGED,
        HAPPY_REPORTS,
        check_resume,
    ),
    Scenario(
        "stored envelope does not match: start over",
        lambda: Host(probe=False),
        downloaded,
        HAPPY,
        Phase.STAGED,
        HAPPY_REPORTS,
        check_start_over,
    ),
    Scenario(
        "a newer manifest: start over (#50)",
        lambda: Host(envelope=envelope(seq=SEQ + 2), probe=True),
        downloaded,
        HAPPY,
        Phase.STAGED,
        HAPPY_REPORTS,
        check_start_over,
    ),
    Scenario(
        "retried trial: re-stage without a download",
        lambda: Host(probe=True, slot=bytearray(IMAGE)),
        staged_before,
        [CHECK, ACCEPTED, (Phase.VERIFIED, Step.FETCH_DONE), STAGED],
        Phase.STAGED,
        [State.DOWNLOADED, State.INSTALLING],
        check_restage,
    ),
    Scenario(
        "manifest fetches nothing",
        lambda: Host(envelope=without_install(IMAGE, SEQ + 1), image_check=True),
        factory_record,
        [CHECK, ACCEPTED, (Phase.VERIFIED, Step.ERROR)],
        Phase.FAILED,
        [State.FAILED],
        lambda host: not host.of(StoreEnvelope) and not host.of(FetchPayload),
    ),
    Scenario(
        "envelope area will not take the envelope",
        lambda: Host(envelope_error=TransferError("staging failed")),
        factory_record,
        [CHECK, ACCEPTED, (Phase.VERIFIED, Step.ERROR)],
        Phase.FAILED,
        [State.FAILED],
    ),
    Scenario(
        "transfer fails mid-stream: resumable",
        lambda: Host(fail_block=20),
        factory_record,
        [CHECK, ACCEPTED, STARTED, (Phase.DOWNLOADING, Step.ERROR)],
        Phase.FAILED,
        [State.DOWNLOADING, State.FAILED],
        check_resumable,
    ),
    Scenario(
        "wrong image bytes: download forgotten (#10)",
        lambda: Host(image=bytes(len(IMAGE))),
        factory_record,
        [CHECK, ACCEPTED, STARTED, (Phase.DOWNLOADING, Step.ERROR)],
        Phase.FAILED,
        [State.DOWNLOADING, State.FAILED],
        check_forgotten,
    ),
    Scenario(
        "the FETCH_STARTED save fails, and so does the report's (#48)",
        lambda: Host(store_fails={0, 1}),
        factory_record,
        [CHECK, ACCEPTED, STARTED, (Phase.DOWNLOADING, Step.ERROR)],
        Phase.FAILED,
        [],
        check_kept_in_ram,
    ),
    Scenario(
        "a checkpoint save fails",
        lambda: Host(store_fails={1}),
        factory_record,
        [CHECK, ACCEPTED, STARTED, (Phase.DOWNLOADING, Step.ERROR)],
        Phase.FAILED,
        [State.DOWNLOADING, State.FAILED],
        check_flash_report,
    ),
    Scenario(
        "the staged image does not match its manifest",
        lambda: Host(image_check=False),
        factory_record,
        [CHECK, ACCEPTED, STARTED, FETCHED, (Phase.DOWNLOADED, Step.ERROR)],
        Phase.FAILED,
        [State.DOWNLOADING, State.DOWNLOADED, State.FAILED],
    ),
    Scenario(
        "the stage save fails",
        lambda: Host(store_fails={4}),
        factory_record,
        [CHECK, ACCEPTED, STARTED, FETCHED, (Phase.DOWNLOADED, Step.ERROR)],
        Phase.FAILED,
        [State.DOWNLOADING, State.DOWNLOADED, State.FAILED],
        check_flash_report,
    ),
]


# --- delta payloads (core.delta): a patch that fails falls back to the full image ----------


class _Source:
    def read(self, offset: int, length: int) -> bytes:
        return FACTORY[offset : offset + length]


DELTA_CONFIG = replace(CONFIG, source=lambda slot: _Source())


def _delta_envelope() -> tuple[bytes, bytes]:
    from otacoap import patching
    from otacoap.core import delta
    from otacoap.core.build import Release, build_envelope

    patch = patching.create_patch(FACTORY, IMAGE)
    info = delta.DeltaInfo(
        suit.SuitDigest.of(FACTORY), len(FACTORY), suit.SuitDigest.of(patch), len(patch)
    )
    release = Release(hashlib.sha256(IMAGE).digest(), len(IMAGE), VENDOR, CLASS, SEQ + 1)
    return suit.encode_envelope(build_envelope(release, KEY, patch=info)), patch


@dataclass
class DeltaHost(Host):
    """Serves the patch (here: a damaged one) and the full image by path; drains."""

    patch: bytes = b""
    machine: UpdateMachine[DeltaState] = field(default_factory=lambda: UpdateMachine(DELTA_CONFIG))

    def answer(self, effect: Effect) -> Event | None:
        match effect:
            case update_machine.Drain():
                return update_machine.Drained()
            case CheckSlotImage(slot=0, action=action):  # the running slot: the source
                return ImageChecked(action.digest.value == hashlib.sha256(FACTORY).digest())
            case FetchPayload(path=path, start=start, size=size):
                data = (
                    self.image
                    if path == ids.image_uri(hashlib.sha256(IMAGE).digest())
                    else self.patch
                )
                for pos in range(start, size, 1024):
                    self.drive(BlockReceived(data[pos : pos + 1024]))
                    if not self.machine.streaming:
                        return None
                return FetchDone()
        return super().answer(effect)


DeltaState = DeviceState


def delta_host() -> DeltaHost:
    env, patch = _delta_envelope()
    damaged = bytearray(patch)
    damaged[len(damaged) // 2] ^= 0x01
    return DeltaHost(envelope=env, patch=bytes(damaged))


def check_delta_fallback(host: Host) -> None:
    assert bytes(host.slot) == IMAGE
    paths = [e.path for e in host.of(FetchPayload)]
    assert len(paths) == 2 and paths[1] == ids.image_uri(hashlib.sha256(IMAGE).digest())
    details = [decode_report(b).detail for b in host.persisted[-1].reports]
    assert any(d.startswith("full image (delta failed: delta patch") for d in details)


SCENARIOS.append(
    Scenario(
        "a failed delta falls back to the full image",
        delta_host,
        factory_record,
        [CHECK, ACCEPTED, STARTED, (Phase.DOWNLOADING, Step.FALLBACK), FETCHED, STAGED],
        Phase.STAGED,
        [State.DOWNLOADING, State.DOWNLOADING, State.DOWNLOADED, State.INSTALLING],
        check_delta_fallback,
    )
)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario) -> None:
    host = scenario.host()
    finish = host.run(scenario.record())
    assert host.steps == scenario.steps
    assert finish.phase == scenario.finish and host.machine.phase == scenario.finish
    assert host.reports() == scenario.reports
    assert scenario.check(host) is not False
    if finish.phase in (Phase.REJECTED, Phase.FAILED):
        assert finish.reason != ReportReason.OK  # a refusal carries its cause (O5)
    # Sticky: after Finish every event raises (h11's ERROR is absorbing).
    for event in (Begin(scenario.record()), FetchDone(), Done(), NoRelease()):
        with pytest.raises(TransitionError):
            host.machine.send(event)


def test_the_scenarios_take_every_transition(taken: set[tuple[Phase, Step]]) -> None:
    for scenario in SCENARIOS:
        scenario.host().run(scenario.record())
    assert taken == set(TRANSITIONS)


def test_every_report_is_queued_in_the_save_of_its_transition() -> None:
    """Each persisted record adds at most one report: the one its transition calls for."""
    host = Host()
    host.run(factory_record())
    counters = [r.report_counter for r in host.persisted]
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(counters))
    with_report = [t for t in host.machine.history if t.report is not None]
    assert len(with_report) + 1 == counters[-1]  # + the boot table's INSTALLING


@pytest.mark.parametrize(
    "event",
    [FetchDone(), BlockReceived(b"x"), Done(), Persisted(factory_record()), Probed(True)],
)
def test_an_event_that_answers_nothing_asked_raises(event: Event) -> None:
    machine: UpdateMachine[DeviceState] = UpdateMachine(CONFIG)
    with pytest.raises(TransitionError):
        machine.send(event)
    assert machine.send(Begin(factory_record())) == [FetchEnvelope()]
    with pytest.raises(TransitionError):
        machine.send(event)


def test_no_payload_is_asked_for_before_the_gate_accepts() -> None:
    machine: UpdateMachine[DeviceState] = UpdateMachine(CONFIG)
    machine.send(Begin(factory_record()))
    (verify,) = machine.send(EnvelopeFetched(envelope()))
    assert isinstance(verify, Verify)
    with pytest.raises(TransitionError):
        machine.send(BlockReceived(IMAGE[:1024]))


@pytest.mark.parametrize(
    ("checkpoint", "sector", "interval"),
    [(16 * 1024, 4096, 16 * 1024), (1000, 256, 1024), (5000, 4096, 8192), (0, 8192, 8192)],
)
def test_checkpoints_are_whole_sectors_and_blocks(
    checkpoint: int, sector: int, interval: int
) -> None:
    assert checkpoint_interval(checkpoint, sector) == interval


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("/fw/abc", "/fw/abc"),
        ("fw/abc", "/fw/abc"),
        (BASE + "/fw/abc", "/fw/abc"),
        ("//evil.example/fw/abc", None),
        ("coaps://evil.example/fw/abc", None),
        ("/fw/abc?x=1", None),
        ("/fw/abc#frag", None),
    ],
)
def test_image_uris_resolve_only_onto_this_server(uri: str, path: str | None) -> None:
    if path is None:
        with pytest.raises(OtaError):
            resolve_uri(BASE, uri)
    else:
        assert resolve_uri(BASE, uri) == path


# --- the boot status table (core.boot_status) ---------------------------------------------


def on_trial(boots: int = 1) -> DeviceState:
    record = staged_before()
    cand = record.slots[1]
    assert cand is not None and cand.manifest_digest is not None
    return replace(record, boot=BootStatus.TESTING, trial=Trial(cand.manifest_digest, boots))


def test_the_boot_table_is_complete_and_closed() -> None:
    for status in BootStatus:
        for event in BootEvent:
            if (status, event) in BOOT_TRANSITIONS:
                assert boot_step(status, event) == BOOT_TRANSITIONS[(status, event)]
            else:
                with pytest.raises(TransitionError):
                    boot_step(status, event)
    # Every path leads back to CONFIRMED: the boot status is never stuck.
    assert {t for t, _ in BOOT_TRANSITIONS.values()} >= {BootStatus.CONFIRMED}


@dataclass(frozen=True)
class BootCase:
    name: str
    apply: Callable[[DeviceState], DeviceState]
    record: Callable[[], DeviceState]
    boot: BootStatus
    active: int
    sequence: int
    report: State
    trial_boots: int | None  # None: no trial on record


BOOT_CASES = [
    BootCase(
        "trial boot of a staged candidate",
        boot_status.trial_boot,
        lambda: replace(staged_before(), boot=BootStatus.PENDING),
        BootStatus.TESTING,
        0,
        SEQ,
        State.INSTALLED,
        1,
    ),
    BootCase(
        "a second trial boot of the same candidate is counted",
        boot_status.trial_boot,
        lambda: replace(on_trial(1), boot=BootStatus.PENDING),
        BootStatus.TESTING,
        0,
        SEQ,
        State.INSTALLED,
        2,
    ),
    BootCase(
        "secure boot refuses the candidate",
        lambda r: boot_status.candidate_invalid(r, ReportReason.CONDITION_FAILED, "bad"),
        lambda: replace(staged_before(), boot=BootStatus.PENDING),
        BootStatus.CONFIRMED,
        0,
        SEQ,
        State.FAILED,
        None,
    ),
    BootCase(
        "healthy: confirm commits the sequence number",
        lambda r: boot_status.health_verdict(r, True, 3),
        on_trial,
        BootStatus.CONFIRMED,
        1,
        SEQ + 1,
        State.CONFIRMED,
        None,
    ),
    BootCase(
        "unhealthy: revert and give the release up (#47)",
        lambda r: boot_status.health_verdict(r, False, 3),
        on_trial,
        BootStatus.CONFIRMED,
        0,
        SEQ + 1,
        State.REVERTED,
        None,
    ),
    BootCase(
        "unconfirmed restart: revert, the release may be retried",
        lambda r: boot_status.revert(r, 3, BootEvent.UNCONFIRMED_RESTART, "restart"),
        lambda: on_trial(2),
        BootStatus.CONFIRMED,
        0,
        SEQ,
        State.REVERTED,
        2,
    ),
    BootCase(
        "unconfirmed restart after the last trial: given up",
        lambda r: boot_status.revert(r, 3, BootEvent.UNCONFIRMED_RESTART, "restart"),
        lambda: on_trial(3),
        BootStatus.CONFIRMED,
        0,
        SEQ + 1,
        State.REVERTED,
        None,
    ),
]


@pytest.mark.parametrize("case", BOOT_CASES, ids=[c.name for c in BOOT_CASES])
def test_boot_status_transition(case: BootCase) -> None:
    before = case.record()
    after = case.apply(before)
    assert (after.boot, after.active, after.sequence) == (case.boot, case.active, case.sequence)
    assert after.sequence >= before.sequence  # O3: never lowered
    assert (after.trial.boots if after.trial else None) == case.trial_boots
    # The report is queued in the same record as the transition.
    assert len(after.reports) == len(before.reports) + 1
    report = decode_report(after.reports[-1])
    assert report.state == case.report and report.installed_sequence == after.sequence
    if case.report in (State.FAILED, State.REVERTED):
        assert report.reason != ReportReason.OK


def test_confirm_and_trial_need_a_candidate() -> None:
    with pytest.raises(TransitionError):
        boot_status.confirm(replace(factory_record(), boot=BootStatus.TESTING))
    with pytest.raises(TransitionError):
        boot_status.trial_boot(replace(factory_record(), boot=BootStatus.PENDING))
