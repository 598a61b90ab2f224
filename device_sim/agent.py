"""The device's update agent: check, verify, download, stage, reboot, confirm, report.

Two layers:

* `UpdateAgent` is the logic for one powered-on device: a flash, its identity, a
  Transport and a Clock. It keeps no state of its own between calls; everything lives
  in flash (device_sim.device_state), so a power cut (SimFlash raises PowerCut, which
  is never caught here) loses nothing that a restart cannot redo.
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
5. health check, then confirm (the sequence number commits) or revert.

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
from urllib.parse import urljoin, urlsplit

from otacoap.core import interpreter, protocol, suit, trust
from otacoap.core.check_pacing import CheckPacer, PacingConfig
from otacoap.core.errors import (
    AlreadyInstalled,
    CommandError,
    ConditionFailed,
    OtaError,
    PolicyError,
    ReportReason,
)
from otacoap.core.report import Report, State
from otacoap.core.session import (
    BootEvent,
    BootStatus,
    Event,
    Phase,
    Transition,
    UpdateSession,
    boot_step,
)
from otacoap.core.writer import ImageWriter

from . import firmware
from .bootloader import (
    Bootloader,
    BootResult,
    check_image,
    confirm,
    device_description,
    revert,
    trust_policy,
)
from .device_state import DeviceState, Download, SlotInfo, StateFile, sha256
from .fetcher import (
    BlockFetcher,
    DeadlineExceeded,
    FetchConfig,
    NotFound,
    ServerUnreachable,
    SlowRetrieval,
)
from .flash import FlashFaults, FlashWriteError, SimFlash
from .layout import Identity, open_flash
from .state import StateStoreError
from .transport import Clock, RealClock, Response, Transport, TransportError

_log = logging.getLogger(__name__)

MANIFEST_PATH = "/" + "/".join(protocol.PATH_MANIFEST)
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
    UP_TO_DATE = "up-to-date"  # nothing new (or no release for this device)
    UPDATED = "updated"  # a new image was installed and confirmed
    REVERTED = "reverted"  # a new image was installed but reverted
    REJECTED = "rejected"  # the manifest or release was refused before download
    FAILED = "failed"  # an accepted update failed (resumable where possible)
    UNREACHABLE = "unreachable"  # could not get the manifest
    STAGED = "staged"  # internal: a candidate is PENDING, the device must reboot


@dataclass(frozen=True)
class RunResult:
    outcome: Outcome
    reason: ReportReason = ReportReason.OK
    detail: str = ""
    sequence_number: int = 0  # trusted sequence number afterwards
    running_slot: int = 0
    image_digest: bytes = b""  # SHA-256 of the running image (from its slot record)

    def summary(self) -> str:
        text = f"{self.outcome.value}: seq {self.sequence_number}, slot {self.running_slot}"
        if self.image_digest:
            text += f", image sha256 {self.image_digest.hex()[:16]}"
        if self.detail:
            text += f" ({self.detail})"
        return text


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def default_health_check(boot: BootResult) -> bool:
    """The simulated firmware's own start-up self test (device_sim.firmware)."""
    return boot.behaviour != firmware.Behaviour.UNHEALTHY


class RefusalMemory:
    """Envelopes this device refused lately, by SHA-256 and by the ETag they came with.

    RAM only and bounded (a reboot forgets it, which costs one more verification).
    A refusal of a given envelope is final: its signature, sequence number, class and
    URIs do not change, and the trusted sequence number only grows. So the same
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
        lay = identity.layout
        self._checkpoint = _round_up(
            max(self.config.checkpoint_bytes, lay.sector_size, 1024), max(lay.sector_size, 1024)
        )
        self.last_fetcher: BlockFetcher | None = None
        self._unqueued: list[bytes] = []  # reports the flash refused to store
        self.refused = RefusalMemory()
        self._envelope_etag: bytes | None = None

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
            try:
                if self.health_check(boot):
                    self.save(confirm(state))
                    return replace(boot, test_mode=False), Outcome.UPDATED
                self.save(
                    revert(state, self.identity, BootEvent.HEALTH_FAILED, "health check failed")
                )
            except StateStoreError:
                # Neither verdict could be recorded: restart; the bootloader reverts the
                # unconfirmed trial (the sequence number did not move).
                _log.warning("could not record the trial's outcome; restarting")
            boot = Bootloader(self.flash).boot()
            outcome = Outcome.REVERTED
        raise RuntimeError("boot did not settle")  # pragma: no cover - bounded above

    # -- reports -------------------------------------------------------------------------

    def _enqueue(
        self,
        state: DeviceState,
        report_state: State,
        reason: ReportReason = ReportReason.OK,
        *,
        vm: trust.VerifiedManifest | None = None,
        bytes_received: int | None = None,
        detail: str = "",
    ) -> DeviceState:
        def encode(counter: int, lost: int) -> bytes:
            return Report(
                counter=counter,
                state=report_state,
                reason=reason,
                sequence_number=vm.sequence_number if vm is not None else None,
                manifest_digest=vm.manifest_digest if vm is not None else None,
                bytes_received=bytes_received,
                installed_sequence=state.sequence,
                detail=detail,
                lost=lost,
            ).encode()

        return state.with_report(encode)

    def _report_transition(
        self,
        t: Transition,
        vm: trust.VerifiedManifest | None,
        *,
        state: DeviceState | None = None,
        bytes_received: int | None = None,
    ) -> DeviceState | None:
        """Queue the report a session transition calls for; save unless `state` given."""
        if t.report is None:
            return state
        base = state if state is not None else self.load()
        new = self._enqueue(
            base, t.report, t.reason, vm=vm, bytes_received=bytes_received, detail=t.detail
        )
        if state is None:
            try:
                self.save(new)
            except StateStoreError:
                # The flash will not even take the report (ATTACKS.md #48). Keep it in
                # RAM and send it anyway (O5). Its counter is not durable, so a later
                # report may reuse it and be refused as stale: one lost report at worst.
                _log.warning("could not queue the %s report: flash refused", t.report.value)
                self._unqueued.append(new.reports[-1])
            return None
        return new

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
            if resp.successful or resp.code >> 5 == 4:
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
        )

    async def check_and_update(self) -> RunResult:
        """One update session; returns once the candidate is staged (or nothing to do)."""
        if self.load().boot != BootStatus.CONFIRMED:
            # A trial or a pending candidate is unsettled (the caller must boot and
            # settle first): the staging slot may be the running image. Never touch it.
            detail = "boot status not settled; reboot first"
            return self.snapshot(Outcome.FAILED, ReportReason.OPERATION_FAILED, detail)
        session = UpdateSession()
        session.fire(Event.CHECK)
        try:
            envelope = await self.fetch_envelope()
        except NotFound:
            session.fire(Event.NO_UPDATE)
            return self.snapshot(Outcome.UP_TO_DATE, detail="no release for this device")
        except (ServerUnreachable, TransportError, SlowRetrieval, DeadlineExceeded) as exc:
            # A manifest that trickles in is a link (or server) problem, not a refusal
            # of anything signed: try again at the next poll, like a silent server.
            session.fire(Event.UNREACHABLE, ReportReason.OPERATION_FAILED, str(exc))
            return self.snapshot(Outcome.UNREACHABLE, ReportReason.OPERATION_FAILED, str(exc))
        except OtaError as exc:
            # The manifest resource itself broke the rules (too large, bad Block2).
            t = session.fire(Event.REFUSED, exc.reason, f"manifest fetch: {exc}")
            self._report_transition(t, None)
            return self.snapshot(Outcome.REJECTED, exc.reason, str(exc))

        earlier = self.refused.verdict(envelope)
        if earlier is not None:
            # Refused before, and a refusal is final: no verification, no report, no
            # flash write (a server replaying it must not wear the flash out).
            return self.snapshot(Outcome.REJECTED, earlier[0], earlier[1])
        state = self.load()
        try:
            vm = trust.accept(envelope, self.policy(state))
        except AlreadyInstalled:
            running = state.slots[state.running]
            if running is not None and running.manifest_digest == state.sequence_digest:
                session.fire(Event.NO_UPDATE)
                return self.snapshot(Outcome.UP_TO_DATE)
            # The trusted number was raised by a release that was given up (#47).
            reason = ReportReason.CONDITION_FAILED
            return self._refuse(session, envelope, reason, "release was reverted and given up")
        except OtaError as exc:
            _log.info("manifest refused: %s (%s)", exc, exc.detail or "")
            return self._refuse(session, envelope, exc.reason, str(exc))
        session.fire(Event.ACCEPTED)
        try:
            fetched = await self._run_update(vm, session)
        except OtaError as exc:
            if session.phase == Phase.VERIFIED and isinstance(exc, ConditionFailed | PolicyError):
                # Failed before a byte was fetched: a refusal of the manifest.
                result = self._refuse(session, envelope, exc.reason, str(exc), vm)
            else:
                t = session.fire(Event.ERROR, exc.reason, str(exc))
                self._report_transition(t, vm)
                result = self.snapshot(Outcome.FAILED, exc.reason, str(exc))
            await self.flush_reports()
            return result
        except StateStoreError as exc:
            t = session.fire(Event.ERROR, ReportReason.OPERATION_FAILED, f"flash: {exc}")
            self._report_transition(t, vm)
            return self.snapshot(Outcome.FAILED, ReportReason.OPERATION_FAILED, str(exc))
        if not fetched:
            t = session.fire(
                Event.ERROR, ReportReason.COMMAND_UNSUPPORTED, "manifest fetches no image"
            )
            self._report_transition(t, vm)
            return self.snapshot(Outcome.FAILED, ReportReason.COMMAND_UNSUPPORTED, t.detail)

        # Stage: one save marks the candidate PENDING together with its report.
        state = self.load()
        dl = state.download
        assert dl is not None and dl.durable == dl.image_size
        image = next(i for i in vm.payload_images() if i.component == 0)
        assert image.digest is not None and image.size is not None
        info = SlotInfo(
            image.size,
            image.digest.value,
            vm.sequence_number,
            vm.manifest_digest.value,
            dl.envelope_length,
            dl.envelope_sha256,
        )
        status, report_state = boot_step(state.boot, BootEvent.STAGE)
        slots = list(state.slots)
        slots[state.candidate] = info
        staged = replace(state, boot=status, slots=(slots[0], slots[1]), download=None)
        staged = self._enqueue(staged, report_state, vm=vm)
        try:
            self.save(staged)
        except StateStoreError as exc:
            t = session.fire(Event.ERROR, ReportReason.OPERATION_FAILED, f"flash: {exc}")
            self._report_transition(t, vm)
            return self.snapshot(Outcome.FAILED, ReportReason.OPERATION_FAILED, str(exc))
        session.fire(Event.STAGED)
        await self.flush_reports()
        return self.snapshot(Outcome.STAGED)

    async def _run_update(self, vm: trust.VerifiedManifest, session: UpdateSession) -> bool:
        """Drive the interpreter's update procedure; True if it fetched the image."""
        staging = self.load().candidate
        fetched = False
        gen = interpreter.run(vm.envelope, interpreter.UPDATE, device_description(self.identity))
        result: Any = None
        try:
            action = next(gen)
            while True:
                if isinstance(action, interpreter.Fetch):
                    if action.component != 0 or fetched:
                        raise CommandError("only one fetch into component 0 is supported")
                    await self._fetch_image(vm, action, staging, session)
                    fetched = True
                    result = None
                elif isinstance(action, interpreter.CheckImage):
                    result = action.component == 0 and check_image(
                        self.flash, self.identity, staging, action
                    )
                elif isinstance(action, interpreter.CheckCondition):
                    result = False  # manifest-34 §8.4.10: unknown conditions fail
                else:
                    raise CommandError(f"{type(action).__name__} is not supported in update")
                action = gen.send(result)
        except StopIteration:
            pass
        return fetched

    def _refuse(
        self,
        session: UpdateSession,
        envelope: bytes,
        reason: ReportReason,
        detail: str,
        vm: trust.VerifiedManifest | None = None,
    ) -> RunResult:
        """Report a refused envelope once and remember it (RefusalMemory)."""
        t = session.fire(Event.REFUSED, reason, detail)
        self._report_transition(t, vm)
        self.refused.remember(envelope, self._envelope_etag, reason, detail)
        return self.snapshot(Outcome.REJECTED, reason, detail)

    def _resolve(self, uri: str) -> str:
        """The path on this server for a manifest URI.

        RFC 3986 §5.2: a relative reference resolves against the envelope's own URI
        (this server's /m); the result, like an absolute URI, must stay on this server
        (the trust gate already refused other origins; this is the device's own check).
        """
        base = self.transport.base_uri
        resolved = urljoin(base + MANIFEST_PATH, uri)
        if not resolved.startswith(base + "/"):
            raise PolicyError(f"URI {uri!r} is not on this device's server")
        parts = urlsplit(resolved)
        if parts.query or parts.fragment or parts.username is not None:
            raise PolicyError(f"URI {uri!r} is not a plain resource path")
        return resolved[len(base) :]

    async def _fetch_image(
        self,
        vm: trust.VerifiedManifest,
        action: interpreter.Fetch,
        staging: int,
        session: UpdateSession,
    ) -> None:
        if action.digest is None or action.size is None:
            raise PolicyError("fetch without image digest and size")
        size, digest = action.size, action.digest
        path = self._resolve_or_integrated(action.uri)  # refuse before touching flash
        lay = self.layout
        mdig = vm.manifest_digest.value
        envelope = vm.envelope_bytes
        state = self.load()

        # A retried trial of the same release (e.g. after a power cut in the trial
        # window): the staging slot may still hold exactly this image. No download.
        held = state.slots[staging]
        if (
            state.download is None
            and held is not None
            and held.manifest_digest == mdig
            and self._envelope_matches(staging, held.envelope_length, held.envelope_sha256)
            and check_image(
                self.flash, self.identity, staging, interpreter.CheckImage(0, digest, size)
            )
        ):
            self.save(
                replace(
                    state,
                    download=Download(
                        mdig, staging, size, size, held.envelope_length, held.envelope_sha256
                    ),
                )
            )
            t = session.fire(Event.FETCH_DONE)
            self._report_transition(t, vm, bytes_received=size)
            return

        dl = state.download
        resume = (
            dl is not None
            and dl.manifest_digest == mdig
            and dl.slot == staging
            and dl.image_size == size
            and dl.envelope_length == len(envelope)
            and self._envelope_matches(staging, dl.envelope_length, dl.envelope_sha256)
        )
        if resume:
            assert dl is not None
            start = dl.durable
        else:
            # A new download (or a newer manifest, ATTACKS.md #50): first make sure no
            # record points at the slot or envelope area any more, then rewrite them.
            if state.slots[staging] is not None or state.download is not None:
                slots = list(state.slots)
                slots[staging] = None
                state = replace(state, slots=(slots[0], slots[1]), download=None)
                self.save(state)
            self._store_envelope(staging, envelope)
            dl = Download(mdig, staging, 0, size, len(envelope), sha256(envelope))
            start = 0
        t = session.fire(Event.FETCH_STARTED)
        state = replace(state, download=dl)
        queued = self._report_transition(t, vm, state=state, bytes_received=start)
        assert queued is not None
        self.save(queued)
        await self.flush_reports()

        writer = ImageWriter(
            self.flash,
            base=lay.slot_offset(staging),
            capacity=lay.slot_size,
            size=size,
            digest=digest,
            resume_at=start,
            retryable=(FlashWriteError,),
        )
        if path is None:
            payload = vm.envelope.integrated_payload(action.uri)
            if payload is None or len(payload) != size:
                raise PolicyError("integrated payload missing or of the wrong size")
            for pos in range(start, size, 1024):
                writer.write(payload[pos : pos + 1024])
        elif start < size:
            fetcher = BlockFetcher(
                self.transport, path, clock=self.clock, config=self.config.fetch, total=size
            )
            self.last_fetcher = fetcher
            # Blocks arrive strictly in order whatever the window (the fetcher buffers
            # out-of-order ones), so the writer, its hash and the checkpoints are the
            # same as in lock-step. aclosing: a PowerCut or flash error raised here
            # also ends the requests a windowed fetcher still has in flight.
            async with contextlib.aclosing(fetcher.blocks(start)) as stream:
                async for _, payload in stream:
                    writer.write(payload)
                    if writer.offset % self._checkpoint == 0 and writer.offset < size:
                        state = self.load()
                        assert state.download is not None
                        self.save(
                            replace(state, download=replace(state.download, durable=writer.offset))
                        )
        try:
            writer.finish()
        except ConditionFailed:
            # Wrong bytes (ATTACKS.md #10): resuming would re-hash the same wrong prefix,
            # so forget the download; the slot is not marked anything.
            state = self.load()
            self.save(replace(state, download=None))
            raise
        state = self.load()
        assert state.download is not None
        done = replace(state, download=replace(state.download, durable=size))
        t = session.fire(Event.FETCH_DONE)
        queued = self._report_transition(t, vm, state=done, bytes_received=size)
        assert queued is not None
        self.save(queued)

    def _resolve_or_integrated(self, uri: str) -> str | None:
        return None if uri.startswith("#") else self._resolve(uri)

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
        for pos in range(0, len(envelope), 1024):
            writer.write(envelope[pos : pos + 1024])
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
