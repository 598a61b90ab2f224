"""One worker's share of the fleet: provision its flash files, run every device's
update agent (at most `concurrency` at once, optionally through one netem proxy),
retry like a device's next poll, and verify each flash the way the bootloader reads it.

A worker runs in the parent's process (one worker) or in its own process (see
`processes`); either way it only ever acts as devices, never as the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from otacoap.core.errors import OtaError
from otacoap.core.report import Report, State

from ..agent import AgentConfig, DeviceAgent, Outcome
from ..coap import CoapTransport
from ..device_state import StateFile
from ..fetcher import FetchConfig
from ..layout import open_flash
from ..netem import LinkProfile, UdpImpairmentProxy
from ..provision import inspect, provision
from .counting_transport import CountingTransport, Tally
from .options import SECTOR_SIZE
from .report import FleetDeviceOutcome

_log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 0.5  # seconds between progress samples sent to the parent
GRACE = 30.0  # how long past the run deadline a worker may take to wind down
RESET_AFTER_STUCK_FLUSHES = 2  # report flushes without progress before a new session


@dataclass(frozen=True)
class WorkerJob:
    """One worker's share of the fleet; pickled to a worker process as is."""

    index: int
    server_uri: str  # the real server (coaps://HOST:PORT)
    upstream: tuple[str, int] | None  # where the proxy relays to, when impaired
    impairment: LinkProfile
    seed: int
    devices: tuple[tuple[str, bytes], ...]  # (device id, PSK)
    flash_dir: str
    vendor_domain: str
    class_info: str
    anchors_pem: tuple[bytes, ...]
    factory_image: bytes
    factory_envelope: bytes
    slot_size: int
    szx: int
    max_window: int
    concurrency: int
    timeout: float
    attempts: int
    expected_seq: int
    expected_digest: str  # hex SHA-256 of the new image
    # Campaign mode: devices wait (polling /m every poll_interval, no concurrency slot
    # held between polls) until /m serves something else than their factory envelope;
    # when `stop_file` appears (the campaign halted or ended) a waiting device gives up
    # after one last poll and ends "untouched".
    campaign: bool = False
    poll_interval: float = 2.0
    stop_file: str = ""
    # Devices on which the release fails its health check at its first (trial) boot:
    # the simulated hardware/firmware mismatch of --bad-fraction.
    bad: frozenset[str] = frozenset()
    decryption_keks: tuple[bytes, ...] = ()  # --encrypt: the class key
    # --delta: the factory is the old release; `mismatched` devices run `variant_image`
    # (its own seq - 1 envelope) instead; every device checks in with its running seq
    # (`check_in`); /fw/ paths of the patch and the image tell what a device fetched.
    check_in: bool = False
    mismatched: frozenset[str] = frozenset()
    variant_image: bytes = b""
    variant_envelope: bytes = b""
    patch_uri: str = ""
    image_uri: str = ""
    # No --work (issue 14 §4): a device's flash file is made right before it starts and
    # removed once its outcome is recorded, so disk grows with the concurrency, not
    # the fleet (100,000 files of ~200 KiB each would be ~20 GB up front).
    lazy_flash: bool = False


@dataclass
class WorkerResult:
    outcomes: list[FleetDeviceOutcome]
    network: dict[str, dict[str, int]]


ProgressFn = Callable[[int, tuple[int, int, int, int]], None]


def flash_path(job: WorkerJob, device_id: str) -> Path:
    return Path(job.flash_dir) / f"{device_id}.flash"


def provision_worker(job: WorkerJob) -> None:
    """Make every device's flash file (with `lazy_flash`, each device makes its own
    when it starts: see provision_device)."""
    Path(job.flash_dir).mkdir(parents=True, exist_ok=True)
    if job.lazy_flash:
        return
    for device_id, psk in job.devices:
        provision_device(job, device_id, psk)


def provision_device(job: WorkerJob, device_id: str, psk: bytes) -> None:
    """One device's flash file: identity, PSK, anchors, factory image + envelope."""
    odd = device_id in job.mismatched
    provision(
        flash_path(job, device_id),
        device_id=device_id,
        psk=psk,
        vendor_domain=job.vendor_domain,
        class_info=job.class_info,
        anchors_pem=job.anchors_pem,
        factory_image=job.variant_image if odd else job.factory_image,
        factory_envelope=job.variant_envelope if odd else job.factory_envelope,
        slot_size=job.slot_size,
        sector_size=SECTOR_SIZE,
        force=True,
        decryption_keks=job.decryption_keks,
    )
    if job.check_in:
        queue_check_in(flash_path(job, device_id))


def queue_check_in(path: Path) -> None:
    """--delta: put a check-in report in the device's flash outbox (an "up-to-date"
    report carrying its running sequence number, report key -6); the agent sends its
    outbox before asking /m, like any queued report.

    It stands for the reports a fleet in the field has long sent: the server serves a
    delta only to a device whose reports say which release it runs (store/deltas.py),
    and a freshly provisioned simulated device has sent none. The counter comes from
    the device's own state record (ATTACKS.md #28), as for every report.
    """
    flash, identity = open_flash(path)
    try:
        states = StateFile(flash, identity.layout)
        state = states.load()
        running = state.sequence

        def encode(counter: int, lost: int) -> bytes:
            return Report(
                counter=counter,
                state=State.UP_TO_DATE,
                installed_sequence=running,
                detail=f"check-in: running seq {running}",
                lost=lost,
            ).encode()

        states.save(state.with_report(encode))
    finally:
        flash.close()


def _stats_dict(proxy: Any) -> dict[str, dict[str, int]]:
    return {str(d): asdict(s) for d, s in proxy.stats.items()}


async def run_worker(
    job: WorkerJob,
    t0: float,
    deadline: float,
    progress: ProgressFn | None,
    sink: list[FleetDeviceOutcome] | None = None,
) -> WorkerResult:
    """Run this worker's devices (bounded by its concurrency) until done or `deadline`.

    `t0` and `deadline` are time.monotonic() values from the parent: CLOCK_MONOTONIC is
    system-wide on Linux, so worker processes share the parent's time axis.
    """
    tally = Tally()
    outcomes = [
        FleetDeviceOutcome(
            dev, "timeout", "fleet deadline before the device started", worker=job.index
        )
        for dev, _ in job.devices
    ]
    proxy = None
    target = job.server_uri
    if job.impairment != LinkProfile():
        assert job.upstream is not None
        profile = job.impairment
        proxy = await UdpImpairmentProxy.start(
            upstream=job.upstream,
            listen=("127.0.0.1", 0),
            profile=profile,
            seed=job.seed,
            event_log_size=0,  # nobody reads it; it would cost a deque append per datagram
            # One lane per live client socket; finished devices' lanes age out (LRU).
            max_sessions=max(64, 4 * job.concurrency),
        )
        host, port = proxy.address
        target = f"coaps://{host}:{port}"
    fetch = FetchConfig(szx=job.szx, deadline=job.timeout, max_window=job.max_window)
    config = AgentConfig(fetch=fetch)
    sem = asyncio.Semaphore(job.concurrency)
    rng = random.Random(job.seed)
    if sink is not None:
        sink.extend(outcomes)  # the caller's view, for a partial report on Ctrl-C

    async def device(i: int) -> None:
        device_id, psk = job.devices[i]
        if job.lazy_flash:
            provision_device(job, device_id, psk)
        try:
            if job.campaign and not await _wait_admitted(job, i, outcomes[i], target, sem, rng, t0):
                tally.failed += 1
                return
            async with sem:
                await _update_device(job, i, outcomes[i], target, config, tally, t0, rng)
        finally:
            if job.lazy_flash:  # verified (or failed) and recorded: the file has served
                flash_path(job, device_id).unlink(missing_ok=True)

    todo = iter(range(len(job.devices)))

    async def runner() -> None:
        """Outside campaign mode at most `concurrency` devices run at once anyway: a
        few runners taking the next device keep the number of tasks (and their
        memory) bounded by the concurrency rather than the fleet."""
        for i in todo:
            await device(i)

    sampler: asyncio.Task[None] | None = None
    if job.campaign:  # every device polls /m until admitted: one task each
        tasks = [asyncio.create_task(device(i)) for i in range(len(job.devices))]
    else:
        n_runners = min(job.concurrency, len(job.devices))
        tasks = [asyncio.create_task(runner()) for _ in range(n_runners)]
    try:
        if progress is not None:
            sampler = asyncio.create_task(_sample(job.index, tally, progress))
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=GRACE)
    finally:
        for task in tasks:
            task.cancel()
        # Interrupted (Ctrl-C cancels this task): let the devices close their DTLS
        # sessions here rather than at the loop's shutdown, where aiocoap's own tasks
        # are cancelled under them and their errors end up logged as tracebacks.
        live = [task for task in tasks if not task.done()]
        if live:
            with contextlib.suppress(BaseException):
                await asyncio.wait(live, timeout=10.0)
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        if progress is not None:
            progress(job.index, tally.snapshot())
        network = _stats_dict(proxy) if proxy is not None else {}
        if proxy is not None:
            proxy.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proxy.wait_closed(), 5.0)
    return WorkerResult(outcomes, network)


async def _sample(index: int, tally: Tally, progress: ProgressFn) -> None:
    while True:
        progress(index, tally.snapshot())
        await asyncio.sleep(SAMPLE_INTERVAL)


async def _update_device(
    job: WorkerJob,
    i: int,
    out: FleetDeviceOutcome,
    target: str,
    config: AgentConfig,
    tally: Tally,
    t0: float,
    rng: random.Random,
) -> None:
    """One device: run the agent (retrying like a device's next poll would), drain its
    report outbox, then verify its flash. Always closes its transport and flash."""
    device_id, psk = job.devices[i]
    path = flash_path(job, device_id)
    start = time.monotonic()
    out.started = start - t0
    out.reason = "fleet deadline reached during the update"
    tally.in_flight += 1
    transport = CountingTransport(CoapTransport(target, device_id, psk), tally)
    health: dict[str, Any] = {}
    if device_id in job.bad:
        # --bad-fraction: on this device the release boots but fails its self test, so
        # the agent reverts to the factory image and reports "reverted".
        health["health_check"] = _fails_health_check
    agent = DeviceAgent(path, target, config=config, transport=transport, **health)
    claimed = ""
    try:
        async with asyncio.timeout(job.timeout):
            claimed = await _attempts(agent, out, job, rng)
    except TimeoutError:
        out.outcome, out.reason = "timeout", f"device deadline of {job.timeout:g} s"
    except OtaError as exc:
        out.outcome, out.reason = "failed", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a simulator bug must cost one device, not the fleet
        _log.exception("device %s crashed", device_id)
        out.outcome, out.reason = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(transport.close(), 5.0)
        agent.abandon()
        tally.in_flight -= 1
        out.requests = transport.requests
        out.retransmissions = transport.retransmissions
        out.timeouts = transport.timeouts
        out.resets = transport.resets
        out.blocks = transport.blocks
        out.bytes = transport.bytes
        if job.patch_uri:
            _note_payload(job, out, transport.fw_bytes, transport.downloaded_detail)
    out.finished = time.monotonic() - t0
    if claimed == "updated":
        _verify_flash(job, path, out)
    if out.outcome == "updated":
        end = time.monotonic()
        out.seconds, out.duration = end - t0, end - start
        tally.updated += 1
    else:
        tally.failed += 1


def _fails_health_check(boot: Any) -> bool:
    return False


def _note_payload(
    job: WorkerJob, out: FleetDeviceOutcome, fw_bytes: dict[str, int], detail: str | None
) -> None:
    """--delta: which payload the device fetched, seen from its own transport: the
    bytes of each /fw/ path, and its DOWNLOADED report's detail, which tells a delta
    envelope's fallback ("full image (...)") from a plain envelope's image ("")."""
    out.mismatched = out.device in job.mismatched
    out.patch_bytes = fw_bytes.get(job.patch_uri, 0)
    out.image_bytes = fw_bytes.get(job.image_uri, 0)
    if out.patch_bytes and out.image_bytes:
        out.payload = "delta+full"
    elif out.patch_bytes:
        out.payload = "delta"
    elif out.image_bytes:
        fallback = detail is None or detail.startswith("full image")
        out.payload = "full" if fallback else "plain"


async def _read_manifest(transport: CoapTransport, szx: int) -> bytes | None:
    """GET /m whole (Block2, RFC 7959 §2.4), or None if the server did not answer."""
    body = bytearray()
    for num in range(256):
        resp = await transport.get("/m", block2=(num, 0, szx), timeout=10.0)
        if not resp.successful:
            return None
        body += resp.payload
        if resp.block2 is None or not resp.block2[1]:
            return bytes(body)
    return None


async def _wait_admitted(
    job: WorkerJob,
    i: int,
    out: FleetDeviceOutcome,
    target: str,
    sem: asyncio.Semaphore,
    rng: random.Random,
    t0: float,
) -> bool:
    """Campaign mode: poll /m until it serves something else than the factory envelope
    (the campaign admitted this device). False when the campaign is over (`stop_file`)
    and one last poll still shows the factory release: the device stays untouched."""
    device_id, psk = job.devices[i]
    out.outcome, out.reason = "untouched", "never admitted by the campaign"
    transport = CoapTransport(target, device_id, psk)
    stop = Path(job.stop_file)
    try:
        while True:
            final = stop.exists()
            body: bytes | None = None
            async with sem:
                try:
                    body = await _read_manifest(transport, job.szx)
                except Exception:  # a lost session or timeout: poll again later
                    with contextlib.suppress(Exception):
                        await transport.reset()
            if body is not None and body != job.factory_envelope:
                out.admitted = time.monotonic() - t0
                return True
            if final:
                _note_untouched(job, out)
                return False
            await asyncio.sleep(job.poll_interval * (0.5 + rng.random()))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(transport.close(), 5.0)


def _note_untouched(job: WorkerJob, out: FleetDeviceOutcome) -> None:
    """Record what an untouched device's flash runs (it must still be the factory)."""
    try:
        info = inspect(flash_path(job, out.device))
    except Exception as exc:
        out.reason = f"never admitted; flash unreadable: {exc}"
        return
    out.flash_sequence = int(info["sequence_number"])
    if out.flash_sequence != job.expected_seq - 1:
        out.reason = f"never admitted, yet the flash runs seq {out.flash_sequence}"


async def _attempts(
    agent: DeviceAgent, out: FleetDeviceOutcome, job: WorkerJob, rng: random.Random
) -> str:
    """Up to job.attempts agent runs, as a device tries again at its next poll; return
    the agent's final outcome ("updated" on success).

    Every unsuccessful outcome is retried except REVERTED (the device gave the release
    up by design): the agent also reports a manifest transfer that stalled (e.g. the
    slow-retrieval watchdog on /m) as REJECTED, and a real device would simply poll
    again. Earlier attempts' reasons are kept in `out.earlier`.
    """

    def done(r: Any) -> bool:
        return bool(
            r.outcome == Outcome.UPDATED
            # An earlier attempt got there but its answer was lost.
            or (r.outcome == Outcome.UP_TO_DATE and r.sequence_number == job.expected_seq)
        )

    if job.check_in:
        # The check-in must reach the server before /m is asked, as the reports of a
        # fleet in the field long have; a lost POST is sent again, not skipped.
        agent.power_on()
        await _drain_outbox(agent, rng)
    for attempt in range(1, job.attempts + 1):
        out.attempts = attempt
        result = await agent.run_once()
        if done(result):
            break
        why = result.detail or result.reason.name.lower()
        if result.outcome == Outcome.REVERTED or attempt == job.attempts:
            out.outcome, out.reason = result.outcome.value, why
            return str(out.outcome)
        out.earlier.append(f"{result.outcome.value}: {why}")
        await asyncio.sleep(min(8.0, 0.5 * 2**attempt) * (0.5 + rng.random()))
    # The "confirmed" report may still sit in the flash outbox if its POST was lost; a
    # device sends it at its next contact, so keep contacting until it is acknowledged.
    await _drain_outbox(agent, rng)
    out.outcome, out.reason = "updated", ""
    return "updated"


async def _drain_outbox(agent: DeviceAgent, rng: random.Random) -> None:
    """Send the device's queued reports until the server acknowledged them all (the
    caller's deadline bounds it), backing off between contacts; after two contacts in
    a row without progress the DTLS session starts over, as the fetcher's does (a
    handshake that failed, say before the server knew the device, never recovers)."""
    delay = 0.5
    stuck = 0
    while agent.agent is not None and agent.agent.load().reports:
        progressed = await agent.agent.flush_reports()
        if not agent.agent.load().reports:
            return
        stuck = 0 if progressed else stuck + 1
        if stuck >= RESET_AFTER_STUCK_FLUSHES:
            stuck = 0
            with contextlib.suppress(Exception):
                await agent.agent.transport.reset()
        await asyncio.sleep(delay * (0.5 + rng.random()))
        delay = min(delay * 2, 4.0)


def _verify_flash(job: WorkerJob, path: Path, out: FleetDeviceOutcome) -> None:
    """Read the flash as the bootloader does; downgrade the outcome if it disagrees."""
    try:
        info = inspect(path)
    except Exception as exc:
        out.outcome, out.reason = "unverified", f"flash unreadable: {exc}"
        return
    out.flash_sequence = int(info["sequence_number"])
    out.flash_image_ok = info["image_digest"] == job.expected_digest
    out.queued_reports = int(info["queued_reports"])
    problems = []
    if out.flash_sequence != job.expected_seq:
        problems.append(f"flash seq {out.flash_sequence}, expected {job.expected_seq}")
    if not out.flash_image_ok:
        problems.append("running image is not the release's image")
    if info["boot_status"] != "confirmed" or not info["bootable"]:
        problems.append(f"boot {info['boot_status']}, bootable {info['bootable']}")
    if problems:
        out.outcome, out.reason = "unverified", "; ".join(problems)
