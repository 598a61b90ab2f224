"""The device's update agent: check, verify, download, stage, reboot, confirm, report.

Two layers:

* `UpdateAgent` carries out an update for one powered-on device: a flash, its
  identity, a Transport and a Clock. It decides nothing about the update itself: each
  attempt is a `core.update_machine.UpdateMachine`, whose effects (persist, store the
  envelope, fetch from an offset, write, report, ...) the agent carries out and whose
  events (fetched, verified, block received, failed, ...) it feeds back. It keeps no
  state of its own between calls; everything lives in flash (device_sim.device_state),
  so a power cut (SimFlash raises PowerCut, which is never caught here) loses nothing
  that a restart cannot redo.
* `DeviceAgent` is the public handle a CLI or a fleet simulator holds: a flash file
  and a server URI; `run_once()` powers the device on (bootloader), settles a trial
  boot, checks for an update and installs it; `watch()` keeps doing that on Observe
  notifications. Many DeviceAgents can run in one event loop.

One update, in order (RFC 9124 USER_STORY.MFST.FAIL_EARLY; manifest-34 §6):

1. flush queued reports; GET /m block by block under a hard size cap;
2. `trust.accept` with the device's TrustPolicy (anchors from the read-only identity,
   trusted sequence number, vendor/class/device, slot size, components, URI origin):
   nothing is downloaded for a manifest that fails it (Block2 request count 0);
3. the core interpreter runs the update procedure; its Fetch is served by streaming
   Block2 into the staging slot through core.writer.ImageWriter (erase-ahead, read-back,
   SHA-256); progress is persisted at sector-aligned checkpoints, keyed by manifest
   digest, so a restart resumes and a newer manifest starts over (ATTACKS.md #23, #50);
   its image-match conditions hash the slot from flash;
4. stage: one state save marks the candidate PENDING (with its report); "reboot": the
   bootloader verifies it again and boots it in test mode;
5. health check, then confirm (the sequence number commits) or revert
   (`core.boot_status`).

Every report is put in the flash outbox in the same save as the transition it reports,
then POSTed to /r; whatever cannot be sent stays queued for later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from otacoap.core import boot_status, protocol, suit, trust
from otacoap.core.check_pacing import CheckPacer, PacingConfig
from otacoap.core.coap_numbers import code_class
from otacoap.core.errors import AlreadyInstalled, OtaError, ReportReason
from otacoap.core.freshness import Freshness
from otacoap.core.update_machine import (
    MANIFEST_PATH,
    MAX_BLOCK,
    Begin,
    BlockReceived,
    CheckSlotImage,
    Done,
    Drain,
    Drained,
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
    StoreEnvelope,
    StoreFailed,
    Unreachable,
    UpdateMachine,
    Verified,
    Verify,
    Write,
)
from otacoap.core.writer import ImageWriter

from . import anchor_client, firmware
from .bootloader import (
    Bootloader,
    BootResult,
    author_anchors,
    check_image,
    device_components,
    device_description,
    trust_policy,
)
from .device_state import DeviceState, StateFile, sha256
from .fetcher import (
    BlockFetcher,
    DeadlineExceeded,
    FetchConfig,
    HandshakeFailed,
    ResourceNotFound,
    ServerUnreachable,
    SlowRetrieval,
)
from .flash import FlashFaults, FlashWriteError, SimFlash
from .layout import Identity, open_flash
from .record_store import StateStoreError
from .slot_view import SlotView
from .source_slot import SourceSlot
from .transport import Clock, RealClock, Response, Transport, TransportError

_log = logging.getLogger(__name__)

REPORT_PATH = "/" + "/".join(protocol.PATH_REPORT)


@dataclass(frozen=True)
class AgentConfig:
    """Everything tunable about the agent; safe defaults (DESIGN principle 8)."""

    fetch: FetchConfig = field(default_factory=FetchConfig)
    # Progress is persisted every this many bytes (rounded up to whole sectors and to
    # the largest block size, so a resume point is both a sector and a block boundary).
    checkpoint_bytes: int = 16 * 1024
    max_envelope_size: int = protocol.MAX_ENVELOPE_SIZE
    report_timeout: float = 5.0
    poll_interval: float = 60.0  # --watch: poll even without a notification
    # --watch: how soon checks may follow each other, whatever the server notifies
    # (a notification storm must not become a flash-write storm; core.check_pacing).
    pacing: PacingConfig = field(default_factory=PacingConfig)
    # A trusted wall clock (POSIX seconds) enforces the manifests' signed expiry;
    # None: the device has none (core.freshness, device_sim.anchor_client).
    trusted_time: Callable[[], float] | None = None

    # The Block2 window lives in FetchConfig (one source of truth); these read it and
    # `with_window` sets it, for callers that only hold an AgentConfig.
    @property
    def max_window(self) -> int:
        """Most Block2 requests outstanding for the image (1 = RFC 7959 lock-step)."""
        return self.fetch.max_window

    @property
    def window(self) -> int:
        """Initial window once the first block is in (capped at `max_window`)."""
        return min(self.fetch.window, self.fetch.max_window)

    def with_window(self, max_window: int, window: int | None = None) -> AgentConfig:
        """This config with a windowed image transfer of at most `max_window` requests."""
        fetch = replace(self.fetch, max_window=max_window)
        if window is not None:
            fetch = replace(fetch, window=window)
        return replace(self, fetch=fetch)


class Outcome(StrEnum):
    """How a run ended, for the CLI and the fleet (the machine's terminal phases, and the
    outcomes of a trial boot)."""

    UP_TO_DATE = "up-to-date"  # nothing new (or no release for this device)
    UPDATED = "updated"  # a new image was installed and confirmed
    REVERTED = "reverted"  # a new image was installed but reverted
    REJECTED = "rejected"  # the manifest or release was refused before download
    FAILED = "failed"  # an accepted update failed (resumable where possible)
    UNREACHABLE = "unreachable"  # could not get the manifest
    STAGED = "staged"  # internal: a candidate is PENDING, the device must reboot


_OUTCOMES: dict[Phase, Outcome] = {
    Phase.UP_TO_DATE: Outcome.UP_TO_DATE,
    Phase.UNREACHABLE: Outcome.UNREACHABLE,
    Phase.REJECTED: Outcome.REJECTED,
    Phase.FAILED: Outcome.FAILED,
    Phase.STAGED: Outcome.STAGED,
}


@dataclass(frozen=True)
class RunResult:
    outcome: Outcome
    reason: ReportReason = ReportReason.OK
    detail: str = ""
    sequence_number: int = 0  # trusted sequence number afterwards
    running_slot: int = 0
    image_digest: bytes = b""  # SHA-256 of the running image (from its slot record)
    freshness: Freshness | None = None  # devices with root keys: see anchor_client

    def summary(self) -> str:
        text = f"{self.outcome.value}: seq {self.sequence_number}, slot {self.running_slot}"
        if self.image_digest:
            text += f", image sha256 {self.image_digest.hex()[:16]}"
        if self.detail:
            text += f" ({self.detail})"
        return text


def default_health_check(boot: BootResult) -> bool:
    """The simulated firmware's own start-up self test (device_sim.firmware)."""
    return boot.behaviour != firmware.Behaviour.UNHEALTHY


class RefusalMemory:
    """Envelopes this device refused lately, by SHA-256 and by the ETag they came with.

    RAM only and bounded (a reboot forgets it, which costs one more verification).
    A refusal of a given envelope is final: its signature, sequence number, class and
    URIs do not change, and the trusted sequence number only grows; only the author
    keys can change (a new anchor list), and committing one clears this memory. So the same
    envelope is never verified and reported again, and a notification that carries it
    (or its ETag) triggers no check: a server replaying it cannot make the device write
    a report per notification.
    """

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._by_digest: OrderedDict[bytes, tuple[ReportReason, str]] = OrderedDict()
        self._etags: OrderedDict[bytes, None] = OrderedDict()

    def remember(
        self, envelope: bytes, etag: bytes | None, reason: ReportReason, detail: str
    ) -> None:
        _bounded_put(self._by_digest, sha256(envelope), (reason, detail), self._size)
        if etag:
            _bounded_put(self._etags, etag, None, self._size)

    def clear(self) -> None:
        """Forget every refusal: the keys they were judged with changed (a new anchor
        list), so an envelope refused for its signer may be accepted now."""
        self._by_digest.clear()
        self._etags.clear()

    def verdict(self, envelope: bytes) -> tuple[ReportReason, str] | None:
        """(reason, detail) of the earlier refusal of exactly these bytes, if any."""
        return self._by_digest.get(sha256(envelope))

    def covers(self, note: Response) -> bool:
        """Does an Observe notification carry an envelope already refused?"""
        if note.etag and note.etag in self._etags:
            return True
        whole = note.block2 is None or (note.block2[0] == 0 and not note.block2[1])
        return whole and note.successful and sha256(note.payload) in self._by_digest


def _bounded_put(table: OrderedDict[bytes, Any], key: bytes, value: Any, size: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > size:
        table.popitem(last=False)


class UpdateAgent:
    """Update logic for one powered-on device. Holds no state outside flash."""

    def __init__(
        self,
        flash: SimFlash,
        identity: Identity,
        transport: Transport,
        *,
        config: AgentConfig | None = None,
        clock: Clock | None = None,
        health_check: Callable[[BootResult], bool] = default_health_check,
    ) -> None:
        self.flash = flash
        self.identity = identity
        self.transport = transport
        self.config = config or AgentConfig()
        self.clock = clock or RealClock()
        self.health_check = health_check
        self.state_file = StateFile(flash, identity.layout)
        self.layout = identity.layout
        self.last_fetcher: BlockFetcher | None = None
        self._unqueued: list[bytes] = []  # reports the flash refused to store
        self.refused = RefusalMemory()
        self._envelope_etag: bytes | None = None
        self._writer: ImageWriter | None = None  # the image writer of the current attempt
        self.anchor_refusals = anchor_client.AnchorRefusals()
        self.refusal: OtaError | None = None  # the trust gate's refusal in this attempt

    # -- state helpers -------------------------------------------------------------------

    def load(self) -> DeviceState:
        return self.state_file.load()

    def save(self, state: DeviceState) -> None:
        self.state_file.save(state)

    # -- after a boot: confirm or revert -------------------------------------------------

    def settle(self, boot: BootResult) -> tuple[BootResult, Outcome | None]:
        """Resolve a trial boot: confirm it (healthy) or revert and reboot.

        A crashing image never gets here on its own; the simulator models the crash as
        an immediate restart, which makes the bootloader revert the unconfirmed trial.
        Returns the boot the device ends up on and UPDATED/REVERTED if a trial ended.
        """
        outcome: Outcome | None = None
        for _ in range(2 * self.identity.max_trial_boots + 2):
            if any(e in ("reverted", "candidate-invalid") for e in boot.events):
                outcome = Outcome.REVERTED if "reverted" in boot.events else Outcome.FAILED
            if not boot.test_mode:
                return boot, outcome
            if boot.behaviour == firmware.Behaviour.CRASH:
                boot = Bootloader(self.flash).boot()  # crashed: power-on again
                continue
            state = self.load()
            healthy = self.health_check(boot)
            verdict = boot_status.health_verdict(state, healthy, self.identity.max_trial_boots)
            try:
                self.save(verdict)
                if healthy:
                    return replace(boot, test_mode=False), Outcome.UPDATED
            except StateStoreError:
                # Neither verdict could be recorded: restart; the bootloader reverts the
                # unconfirmed trial (the sequence number did not move).
                _log.warning("could not record the trial's outcome; restarting")
            boot = Bootloader(self.flash).boot()
            outcome = Outcome.REVERTED
        raise RuntimeError("boot did not settle")  # pragma: no cover - bounded above

    # -- reports -------------------------------------------------------------------------

    async def flush_reports(self) -> int:
        """POST queued reports in order; drop the ones the server took or refused for good."""
        while self._unqueued:
            try:
                await self.transport.post(
                    REPORT_PATH,
                    self._unqueued[0],
                    content_format=protocol.CF_REPORT,
                    timeout=self.config.report_timeout,
                )
            except TransportError:
                break
            self._unqueued.pop(0)
        state = self.load()
        if not state.reports:
            return 0
        done = 0
        for body in state.reports:
            try:
                resp = await self.transport.post(
                    REPORT_PATH,
                    body,
                    content_format=protocol.CF_REPORT,
                    timeout=self.config.report_timeout,
                )
            except TransportError:
                break
            if resp.successful or code_class(resp.code) == 4:
                # 2.04: durably stored. 4.xx: refused for good (e.g. a counter the
                # server already has, after our ack was lost): resending cannot help.
                done += 1
                continue
            break  # 5.xx: try again later
        if done:
            state = self.load()
            with contextlib.suppress(StateStoreError):
                self.save(replace(state, reports=state.reports[done:]))
        return done

    # -- check and update ----------------------------------------------------------------

    async def fetch_envelope(self) -> bytes:
        """GET /m block by block under the hard cap (ATTACKS.md #12 endless manifest)."""
        fetcher = BlockFetcher(
            self.transport,
            MANIFEST_PATH,
            clock=self.clock,
            config=self.config.fetch,
            cap=self.config.max_envelope_size,
        )
        parts = bytearray()
        # Lock-step whatever the window: the envelope's size is unknown (see fetcher).
        async with contextlib.aclosing(fetcher.blocks(0)) as stream:
            async for _, payload in stream:
                parts += payload
        self._envelope_etag = fetcher.etag
        return bytes(parts)

    def policy(self, state: DeviceState) -> trust.TrustPolicy:
        return trust_policy(
            self.identity,
            sequence=state.sequence,
            sequence_digest=state.sequence_digest,
            # Relative /fw/<id> resolves against this server; absolute URIs only to it.
            uri_prefixes=(self.transport.base_uri + "/",),
            max_envelope_size=self.config.max_envelope_size,
            anchors=author_anchors(self.identity, state),
            now=anchor_client.trusted_time(self),
        )

    def machine_config(self) -> MachineConfig:
        return MachineConfig(
            device=device_description(self.identity),
            server_base=self.transport.base_uri,
            sector_size=self.layout.sector_size,
            checkpoint_bytes=self.config.checkpoint_bytes,
            decryption_keys=self.identity.decryption_keys(),
            source=self.source_slot,
            components=device_components(self.identity),
        )

    def source_slot(self, slot: int) -> SourceSlot:
        """A read-only view of a slot: a delta's source is the running one (core.delta).

        It reads through the slot's SlotView, keyed by the image its record vouches for,
        so a slot encrypted at rest is read as plaintext (the source-match condition has
        checked that image's digest before the patch reads a byte)."""
        info = self.load().slots[slot]
        digest = info.image_digest if info is not None else b""
        view = SlotView(self.flash, self.layout, slot, digest)
        return SourceSlot(view, self.layout.slot_offset(slot), self.layout.slot_size)

    async def check_and_update(self) -> RunResult:
        """One update attempt; returns once the candidate is staged (or nothing to do).

        Every decision is the UpdateMachine's; this loop only carries out its effects
        and tells it what happened.
        """
        await anchor_client.update_anchors(self)  # rotate/revoke author keys first (#20)
        machine: UpdateMachine[DeviceState] = UpdateMachine(self.machine_config())
        self._writer, self.refusal = None, None
        await self._drive(machine, Begin(self.load()))
        finish = machine.finished
        assert finish is not None, "the machine stopped without finishing"
        outcome = _OUTCOMES[finish.phase]
        fresh = await anchor_client.check_freshness(self, outcome.value)  # (#8)
        return replace(self.snapshot(outcome, finish.reason, finish.detail), freshness=fresh)

    async def _drive(self, machine: UpdateMachine[DeviceState], event: Event | None) -> None:
        """Send events and carry out the effects until the machine needs nothing more."""
        while event is not None:
            event = await self._carry_out(machine, machine.send(event))

    async def _carry_out(
        self, machine: UpdateMachine[DeviceState], effects: list[Effect]
    ) -> Event | None:
        """Carry out a batch in order; the answer of its last effect (None: nothing to say).

        A failure skips the rest of the batch and becomes the answer. PowerCut is never
        caught: a device without power has nothing to report.
        """
        for effect in effects:
            try:
                answer = await self._effect(machine, effect)
            except OtaError as exc:
                return Failed(exc)
            except StateStoreError as exc:
                return StoreFailed(str(exc))
            if answer is not None:
                return answer
        return None

    async def _effect(self, machine: UpdateMachine[DeviceState], effect: Effect) -> Event | None:
        match effect:
            case Persist(record=record):
                return Persisted(self.state_file.save(record))
            case Write(data=data):
                assert self._writer is not None
                self._writer.write(data)
                return None
            case FetchEnvelope():
                return await self._fetch_envelope_event()
            case Verify(envelope=envelope, record=record):
                try:
                    return Verified(trust.accept(envelope, self.policy(record)))
                except AlreadyInstalled as exc:
                    return Failed(exc)
                except OtaError as exc:
                    _log.info("manifest refused: %s (%s)", exc, exc.detail or "")
                    self.refusal = exc
                    return Failed(exc)
            case CheckSlotImage(slot=slot, action=action):
                return ImageChecked(check_image(self.flash, self.identity, slot, action))
            case ProbeSlot():
                ok = self._envelope_matches(
                    effect.slot, effect.envelope_length, effect.envelope_sha256
                ) and all(
                    check_image(self.flash, self.identity, effect.slot, image)
                    for image in (*([effect.image] if effect.image else []), *effect.more)
                )
                return Probed(ok)
            case FlushReports():
                await self.flush_reports()
                return Flushed(self.load())
            case StoreEnvelope(slot=slot, envelope=envelope):
                self._store_envelope(slot, envelope)
                return Done()
            case OpenWriter():
                lay, comp = self.layout, effect.component
                self._writer = ImageWriter(
                    # encrypted at rest under the chip's hardware key, if it has one
                    SlotView(self.flash, lay, effect.slot, effect.digest.value, comp),
                    base=lay.component_offset(effect.slot, comp),
                    capacity=lay.component_size(comp),
                    size=effect.size,
                    digest=effect.digest,
                    resume_at=effect.resume_at,
                    retryable=(FlashWriteError,),
                )
                return None
            case FetchPayload():
                return await self._stream(machine, effect)
            case Drain():
                return Drained()
            case FinishImage():
                assert self._writer is not None
                self._writer.finish()
                return Done()
            case RememberRefusal(envelope=envelope, reason=reason, detail=detail):
                self.refused.remember(envelope, self._envelope_etag, reason, detail)
                return None
            case KeepReport(body=body, state=state):
                # The flash will not even take the report (ATTACKS.md #48). Keep it in
                # RAM and send it anyway (O5). Its counter is not durable, so a later
                # report may reuse it and be refused as stale: one lost report at worst.
                _log.warning("could not queue the %s report: flash refused", state.value)
                self._unqueued.append(body)
                return None
            case Finish():
                return None
        raise AssertionError(f"unknown effect {effect!r}")  # pragma: no cover

    async def _fetch_envelope_event(self) -> Event:
        try:
            envelope = await self.fetch_envelope()
        except ResourceNotFound:
            return NoRelease()
        except (
            ServerUnreachable,
            HandshakeFailed,
            TransportError,
            SlowRetrieval,
            DeadlineExceeded,
        ) as exc:
            # A manifest that trickles in is a link (or server) problem, not a refusal
            # of anything signed: try again at the next poll, like a silent server.
            return Unreachable(str(exc))
        return EnvelopeFetched(envelope, self.refused.verdict(envelope))

    async def _stream(
        self, machine: UpdateMachine[DeviceState], fetch: FetchPayload
    ) -> Event | None:
        """Feed the payload to the machine block by block; FetchDone at its end."""
        if fetch.integrated is not None:
            for pos in range(fetch.start, fetch.size, MAX_BLOCK):
                await self._drive(machine, BlockReceived(fetch.integrated[pos : pos + MAX_BLOCK]))
                if not machine.streaming:
                    return None
            return FetchDone()
        assert fetch.path is not None
        fetcher = BlockFetcher(
            self.transport, fetch.path, clock=self.clock, config=self.config.fetch, total=fetch.size
        )
        self.last_fetcher = fetcher
        # Blocks arrive strictly in order whatever the window (the fetcher buffers
        # out-of-order ones), so the writer, its hash and the checkpoints are the same as
        # in lock-step. aclosing: a PowerCut, a flash error or the machine's end raised
        # or reached here also ends the requests a windowed fetcher still has in flight.
        async with contextlib.aclosing(fetcher.blocks(fetch.start)) as stream:
            async for _, payload in stream:
                await self._drive(machine, BlockReceived(payload))
                if not machine.streaming:
                    return None
        return FetchDone()

    def _envelope_matches(self, slot: int, length: int, digest: bytes) -> bool:
        if not 0 < length <= self.layout.envelope_area_size:
            return False
        return sha256(self.flash.read(self.layout.envelope_offset(slot), length)) == digest

    def _store_envelope(self, slot: int, envelope: bytes) -> None:
        """Write the envelope into its area with the same erase-ahead/read-back writer."""
        lay = self.layout
        writer = ImageWriter(
            self.flash,
            base=lay.envelope_offset(slot),
            capacity=lay.envelope_area_size,
            size=len(envelope),
            digest=suit.SuitDigest(suit.DIGEST_SHA256, sha256(envelope)),
            retryable=(FlashWriteError,),
        )
        for pos in range(0, len(envelope), MAX_BLOCK):
            writer.write(envelope[pos : pos + MAX_BLOCK])
        writer.finish()

    def snapshot(
        self, outcome: Outcome, reason: ReportReason = ReportReason.OK, detail: str = ""
    ) -> RunResult:
        """A RunResult with `outcome` and the device's state as the flash has it now."""
        state = self.load()
        info = state.slots[state.running]
        return RunResult(
            outcome,
            reason,
            detail,
            state.sequence,
            state.running,
            info.image_digest if info is not None else b"",
        )


class DeviceAgent:
    """One simulated device: a flash file, its bootloader and its agent.

    The handle a CLI or a fleet simulator holds. Power-on (the bootloader) happens on
    the first `run_once`; a PowerCut raised by the flash propagates out of any call and
    leaves this object dead: call `close()` and make a new DeviceAgent on the same file
    to "reboot", exactly as the crash harness does.
    """

    def __init__(
        self,
        flash_path: str | Path,
        server_uri: str,
        *,
        config: AgentConfig | None = None,
        clock: Clock | None = None,
        transport: Transport | None = None,
        faults: FlashFaults | None = None,
        flash_class: type[SimFlash] = SimFlash,
        health_check: Callable[[BootResult], bool] = default_health_check,
    ) -> None:
        self.flash_path = Path(flash_path)
        self.server_uri = server_uri
        self.config = config or AgentConfig()
        self.clock = clock or RealClock()
        self.faults = faults
        self.flash_class = flash_class
        self.health_check = health_check
        self._transport = transport
        self._own_transport = transport is None
        self.flash: SimFlash | None = None
        self.identity: Identity | None = None
        self.agent: UpdateAgent | None = None
        self.boot: BootResult | None = None
        self.boot_outcome: Outcome | None = None

    def power_on(self) -> BootResult:
        """Run the bootloader (and settle a trial boot left from before the restart)."""
        if self.agent is not None:
            assert self.boot is not None
            return self.boot
        flash, identity = open_flash(
            self.flash_path, faults=self.faults, flash_class=self.flash_class
        )
        self.flash, self.identity = flash, identity
        boot = Bootloader(flash).boot()
        if self._transport is None:
            from .coap import CoapTransport, normalize_base

            self._transport = CoapTransport(
                normalize_base(self.server_uri), identity.device_id, identity.psk
            )
        self.agent = UpdateAgent(
            flash,
            identity,
            self._transport,
            config=self.config,
            clock=self.clock,
            health_check=self.health_check,
        )
        self.boot, self.boot_outcome = self.agent.settle(boot)
        return self.boot

    async def run_once(self) -> RunResult:
        """Check for an update and install it (reboot, trial, confirm) if there is one."""
        self.power_on()
        agent = self.agent
        assert agent is not None and self.flash is not None
        await agent.flush_reports()
        result = await agent.check_and_update()
        if result.outcome != Outcome.STAGED:
            await agent.flush_reports()
            return result
        boot = Bootloader(self.flash).boot()  # "reboot" into the candidate
        self.boot, outcome = agent.settle(boot)
        await agent.flush_reports()
        if outcome == Outcome.UPDATED:
            return agent.snapshot(Outcome.UPDATED)
        if outcome == Outcome.REVERTED:
            return agent.snapshot(
                Outcome.REVERTED, ReportReason.OPERATION_FAILED, "new image was reverted"
            )
        return agent.snapshot(
            Outcome.FAILED, ReportReason.CONDITION_FAILED, "secure boot refused the candidate"
        )

    async def watch(
        self,
        max_time: float | None = None,
        on_result: Callable[[RunResult], None] | None = None,
    ) -> list[RunResult]:
        """Observe /m (RFC 7641) and update whenever a release appears; poll as fallback.

        A notification only asks for a check; `CheckPacer` decides when it may start
        (a minimum gap, doubled after every check that did not end well), so however
        fast a server notifies, checks and the flash writes they cause stay bounded.
        """
        self.power_on()
        assert self._transport is not None
        trigger = asyncio.Event()
        observer = asyncio.create_task(self._observe(trigger))
        pacer = CheckPacer(self.config.pacing)
        clock = self.clock
        deadline = None if max_time is None else clock.now() + max_time
        results: list[RunResult] = []
        try:
            while True:
                hold = pacer.earliest() - clock.now()
                if deadline is not None and clock.now() + max(hold, 0.0) >= deadline:
                    break
                if hold > 0:
                    await clock.sleep(hold)
                trigger.clear()
                pacer.started(clock.now())
                result = await self.run_once()
                pacer.finished(result.outcome in (Outcome.UP_TO_DATE, Outcome.UPDATED))
                results.append(result)
                if on_result is not None:
                    on_result(result)
                wait = self.config.poll_interval
                if deadline is not None:
                    wait = min(wait, deadline - clock.now())
                    if wait <= 0:
                        break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(trigger.wait(), wait)
                if deadline is not None and clock.now() >= deadline:
                    break
        finally:
            observer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await observer
        return results

    async def _observe(self, trigger: asyncio.Event) -> None:
        assert self._transport is not None and self.agent is not None
        refused = self.agent.refused
        registrations = 0
        while True:
            registrations += 1
            try:
                first = True
                async for note in self._transport.observe(MANIFEST_PATH):
                    # The first answer of the first registration is the state the loop
                    # just checked; after a re-registration a change may have been
                    # missed while the observation was down, so it counts.
                    if not (first and registrations == 1) and not refused.covers(note):
                        trigger.set()
                    first = False
            except TransportError as exc:
                _log.info("observation of /m lost: %s", exc)
            # The observation ended (or was never granted): register again, not in a loop.
            await asyncio.sleep(min(5.0, self.config.poll_interval))

    def status(self) -> RunResult:
        """Trusted sequence number, running slot and image digest (powers on if needed)."""
        self.power_on()
        assert self.agent is not None
        return self.agent.snapshot(self.boot_outcome or Outcome.UP_TO_DATE)

    async def close(self) -> None:
        if self._transport is not None and self._own_transport:
            await self._transport.close()
        self.abandon()

    def abandon(self) -> None:
        """Drop the flash handle (after a PowerCut the device is dead anyway)."""
        if self.flash is not None:
            self.flash.close()
        self.flash = None
        self.agent = None
