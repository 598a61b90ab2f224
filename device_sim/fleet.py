"""`python -m device_sim.fleet`: update a whole simulated fleet against a real server.

Why it exists: one device over loopback says nothing about how the server, the DTLS
session table, the report path (one fsynced transaction per report) and Block2
serving behave when hundreds or thousands of devices update at once over a lossy link.
The fleet simulator answers that with the real pieces end to end:

1. **Setup.** A fresh device class (`fleet-<random>`, so runs never collide with each
   other or with real devices) and N devices, each with its own DTLS identity and PSK.
   With `--data DIR` they are registered through the server's own store (the code
   path of `otacoap device add`; SQLite in WAL mode lets this process and the running
   server share the file, and the server reads identities from it on every new
   handshake). A factory image with a seq-1 envelope signed by `--key` goes into a small
   flash file per device; then a seq-2 release is built, signed and published (the
   local Publisher with `--data`, or a network upload as an operator with
   `--operator`), exactly as an operator would.
2. **Run.** Every device's update agent (device_sim.agent.DeviceAgent, unchanged) runs
   in asyncio, at most `--concurrency` at once, optionally split over `--processes`
   worker processes with their own event loops. With any impairment option each
   worker puts one netem proxy (device_sim.netem) between its devices and the server;
   the proxy keeps a lane per device, so one proxy serves them all.
3. **Verify.** A device counts as updated only when (a) its flash, read the way the
   bootloader reads it (device_sim.provision.inspect), shows the new sequence number,
   the new image's SHA-256 and a confirmed boot, and (b) the server's store holds its
   "confirmed" report for that sequence number (with `--data`; over the network the
   device's empty report outbox, i.e. every report acknowledged, is the evidence).
4. **Report.** JSON (per device and overall, via device_sim.fleet_report) and a PNG of
   completions over time.

Layering note (DESIGN.md): device_sim normally imports only otacoap.core. The fleet
simulator is also the operator of its own test fleet, so it imports otacoap.store (to
register and publish with `--data`) and otacoap.server.client (to publish with
`--operator`), lazily and only here; the device code paths stay as they are.

Limits of the network mode: the server has no network device registration (an
operator identity may only publish), so with `--operator` the devices must already be
registered on the server: `--devices-file` lists their ids and PSKs, `--vendor-domain`
and `--class-info` name their class, `--seq` the release to publish. Without store
access the server-side "confirmed" check and the server's report counts are not
available; the report says so.

Every refusal is one line on stderr and a non-zero exit. Exit codes: 0 every device
updated, 1 error, 2 usage, 3 the run finished but not every device was updated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from otacoap.core.errors import OtaError

from .cliargs import (
    Parser,
    maybe_hex,
    non_negative_float,
    positive_float_type,
    positive_int,
    probability,
    read_small_file,
    size_type,
    window,
)
from .fleet_report import DeviceOutcome, FleetReport, percentile
from .netem import LinkProfile
from .transport import Response, TransportError

_log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_ALL_UPDATED = 0, 1, 2, 3
PROG = "python -m device_sim.fleet"

DEFAULT_IMAGE_SIZE = 64 * 1024
DEFAULT_CONCURRENCY = 50
DEFAULT_TIMEOUT = 300.0
DEFAULT_ATTEMPTS = 3
DEFAULT_VENDOR = "fleet.otacoap.example"
SECTOR_SIZE = 4096
MAX_IMAGE_SIZE = 16 * 1024 * 1024  # the server's default publish.max_image_size
MAX_DEVICES = 100_000
PSK_LENGTH = 16  # tinydtls carries at most 16-byte keys (otacoap.store.names)
ACTOR = "fleet-simulator"
# Progress: a TTY line is redrawn at most twice a second; an explicitly requested
# progress log on a non-TTY (CI) gets a new line at most every few seconds.
TTY_INTERVAL = 0.5
LOG_INTERVAL = 5.0
SAMPLE_INTERVAL = 0.5
# Provisioning and start-up of a worker process are bounded too.
PROVISION_SECONDS_PER_DEVICE = 0.05
PROVISION_SECONDS_BASE = 60.0
GRACE = 30.0  # how long past the run deadline a worker may take to wind down


class FleetError(ValueError):
    """A refusal with a one-line message.

    A ValueError on purpose: device_sim.cli.main already turns ValueError into one
    line on stderr, so the `fleet` subcommand behaves the same once registered there.
    """


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class FleetOptions:
    """Everything a run needs, validated once (DESIGN principle 8)."""

    server: str
    devices: int
    key_path: Path
    data: Path | None = None
    operator: str | None = None
    operator_psk: bytes | None = None
    devices_file: Path | None = None
    vendor_domain: str = DEFAULT_VENDOR
    class_info: str | None = None
    seq: int = 2
    image_size: int = DEFAULT_IMAGE_SIZE
    release: tuple[Path, Path] | None = None
    # Both directions of every device's link; all zero: no proxy in between.
    impairment: LinkProfile = field(default_factory=LinkProfile)
    concurrency: int = DEFAULT_CONCURRENCY
    processes: int = 1
    block_size: int = 1024
    # Block2 requests outstanding per device. Lock-step by default: with a hundred
    # devices in one process the simulator's own CPU, not the round trip, is the
    # limit, and a window then only adds spurious timeouts (bench/RESULTS.md).
    max_window: int = 1
    seed: int = 0
    timeout: float = DEFAULT_TIMEOUT
    max_time: float | None = None
    attempts: int = DEFAULT_ATTEMPTS
    work: Path | None = None
    report: Path | None = None
    plot: Path | None = None
    progress: bool | None = None  # None: when stderr is a TTY

    def run_deadline(self) -> float:
        """The whole run's bound: every wave of devices using its full deadline."""
        if self.max_time is not None:
            return self.max_time
        waves = math.ceil(self.devices / max(1, self.concurrency))
        return waves * self.timeout + 60.0


# --------------------------------------------------------------------------- results


@dataclass
class FleetDeviceOutcome(DeviceOutcome):
    """One device's run, with what the verification and the transport saw.

    `seconds` (inherited) is when the device finished, counted from the fleet's start:
    what the completions-over-time plot shows. `duration` is its own update time
    from getting a concurrency slot, which is what a single device experiences.
    `retransmissions` counts requests the device sent again unchanged (same method,
    path and block, after a timeout or an error); aiocoap's own CoAP-level CON
    retransmissions below the agent are not exposed and not included.
    """

    started: float | None = None
    duration: float | None = None
    attempts: int = 0
    requests: int = 0
    timeouts: int = 0
    resets: int = 0
    flash_sequence: int | None = None
    flash_image_ok: bool = False
    queued_reports: int | None = None
    server_confirmed: bool | None = None
    worker: int = 0
    earlier: list[str] = field(default_factory=list)  # why earlier attempts failed


@dataclass
class FleetRunReport(FleetReport):
    """FleetReport plus per-device update times, attempts and the link's statistics."""

    network: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        s = super().summary()
        outs = [d for d in self.devices if isinstance(d, FleetDeviceOutcome)]
        durations = [d.duration for d in outs if d.ok and d.duration is not None]
        s.update(
            {
                "update_p50_seconds": percentile(durations, 50),
                "update_p95_seconds": percentile(durations, 95),
                "update_p99_seconds": percentile(durations, 99),
                "requests": sum(d.requests for d in outs),
                "timeouts": sum(d.timeouts for d in outs),
                "dtls_resets": sum(d.resets for d in outs),
                "devices_retried": sum(1 for d in outs if d.attempts > 1),
            }
        )
        return s

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["network"] = self.network
        return out


# --------------------------------------------------------------------------- transport


class _Tally:
    """Counters one worker shares between its devices and its progress sampler."""

    def __init__(self) -> None:
        self.blocks = 0
        self.updated = 0
        self.failed = 0
        self.in_flight = 0

    def snapshot(self) -> tuple[int, int, int, int]:
        return (self.updated, self.failed, self.in_flight, self.blocks)


class CountingTransport:
    """The device's real Transport, with counters the fleet report needs.

    Wrapping (instead of reading the fetcher's fields) sees every exchange of the
    agent: the manifest, every image block and every report, including those of a
    second attempt, without touching the agent.
    """

    def __init__(self, inner: Any, tally: _Tally, fw_prefix: str = "/fw/") -> None:
        self._inner = inner
        self._tally = tally
        self._fw = fw_prefix
        self._last: tuple[Any, ...] | None = None
        self.requests = 0
        self.retransmissions = 0
        self.timeouts = 0
        self.resets = 0
        self.blocks = 0
        self.bytes = 0

    @property
    def base_uri(self) -> str:
        return str(self._inner.base_uri)

    def _sent(self, key: tuple[Any, ...]) -> None:
        self.requests += 1
        if key == self._last:
            self.retransmissions += 1
        self._last = key

    async def get(
        self, path: str, *, block2: tuple[int, int, int] | None, timeout: float
    ) -> Response:
        self._sent(("GET", path, block2[0] if block2 else None))
        try:
            resp: Response = await self._inner.get(path, block2=block2, timeout=timeout)
        except TransportError:
            self.timeouts += 1
            raise
        if resp.successful and path.startswith(self._fw):
            self.blocks += 1
            self.bytes += len(resp.payload)
            self._tally.blocks += 1
        return resp

    async def post(
        self, path: str, payload: bytes, *, content_format: int, timeout: float
    ) -> Response:
        self._sent(("POST", path, hashlib.sha256(payload).digest()))
        try:
            resp: Response = await self._inner.post(
                path, payload, content_format=content_format, timeout=timeout
            )
        except TransportError:
            self.timeouts += 1
            raise
        return resp

    async def observe(self, path: str) -> AsyncIterator[Response]:
        async for note in self._inner.observe(path):
            yield note

    async def reset(self) -> None:
        self.resets += 1
        await self._inner.reset()

    async def close(self) -> None:
        await self._inner.close()


# --------------------------------------------------------------------------- workers


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


@dataclass
class WorkerResult:
    outcomes: list[FleetDeviceOutcome]
    network: dict[str, dict[str, int]]


ProgressFn = Callable[[int, tuple[int, int, int, int]], None]


def flash_path(job: WorkerJob, device_id: str) -> Path:
    return Path(job.flash_dir) / f"{device_id}.flash"


def provision_worker(job: WorkerJob) -> None:
    """Make every device's flash file: identity, PSK, anchors, factory image + envelope."""
    from .provision import provision

    Path(job.flash_dir).mkdir(parents=True, exist_ok=True)
    for device_id, psk in job.devices:
        provision(
            flash_path(job, device_id),
            device_id=device_id,
            psk=psk,
            vendor_domain=job.vendor_domain,
            class_info=job.class_info,
            anchors_pem=job.anchors_pem,
            factory_image=job.factory_image,
            factory_envelope=job.factory_envelope,
            slot_size=job.slot_size,
            sector_size=SECTOR_SIZE,
            force=True,
        )


def _stats_dict(proxy: Any) -> dict[str, dict[str, int]]:
    return {str(d): asdict(s) for d, s in proxy.stats.items()}


async def run_worker(
    job: WorkerJob, t0: float, deadline: float, progress: ProgressFn | None
) -> WorkerResult:
    """Run this worker's devices (bounded by its concurrency) until done or `deadline`.

    `t0` and `deadline` are time.monotonic() values from the parent: CLOCK_MONOTONIC is
    system-wide on Linux, so worker processes share the parent's time axis.
    """
    from .agent import AgentConfig
    from .fetcher import FetchConfig
    from .netem import UdpImpairmentProxy

    tally = _Tally()
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

    async def device(i: int) -> None:
        async with sem:
            await _update_device(job, i, outcomes[i], target, config, tally, t0, rng)

    sampler: asyncio.Task[None] | None = None
    tasks = [asyncio.create_task(device(i)) for i in range(len(job.devices))]
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


async def _sample(index: int, tally: _Tally, progress: ProgressFn) -> None:
    while True:
        progress(index, tally.snapshot())
        await asyncio.sleep(SAMPLE_INTERVAL)


async def _update_device(
    job: WorkerJob,
    i: int,
    out: FleetDeviceOutcome,
    target: str,
    config: Any,
    tally: _Tally,
    t0: float,
    rng: random.Random,
) -> None:
    """One device: run the agent (retrying like a device's next poll would), drain its
    report outbox, then verify its flash. Always closes its transport and flash."""
    from .agent import DeviceAgent
    from .coap import CoapTransport

    device_id, psk = job.devices[i]
    path = flash_path(job, device_id)
    start = time.monotonic()
    out.started = start - t0
    out.reason = "fleet deadline reached during the update"
    tally.in_flight += 1
    transport = CountingTransport(CoapTransport(target, device_id, psk), tally)
    agent = DeviceAgent(path, target, config=config, transport=transport)
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
    if claimed == "updated":
        _verify_flash(job, path, out)
    if out.outcome == "updated":
        end = time.monotonic()
        out.seconds, out.duration = end - t0, end - start
        tally.updated += 1
    else:
        tally.failed += 1


async def _attempts(agent: Any, out: FleetDeviceOutcome, job: WorkerJob, rng: random.Random) -> str:
    """Up to job.attempts agent runs, as a device tries again at its next poll; return
    the agent's final outcome ("updated" on success).

    Every unsuccessful outcome is retried except REVERTED (the device gave the release
    up by design): the agent also reports a manifest transfer that stalled (e.g. the
    slow-retrieval watchdog on /m) as REJECTED, and a real device would simply poll
    again. Earlier attempts' reasons are kept in `out.earlier`.
    """
    from .agent import Outcome

    def done(r: Any) -> bool:
        return bool(
            r.outcome == Outcome.UPDATED
            # An earlier attempt got there but its answer was lost.
            or (r.outcome == Outcome.UP_TO_DATE and r.sequence_number == job.expected_seq)
        )

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
    delay = 0.5
    while agent.agent is not None and agent.agent.load().reports:
        await agent.agent.flush_reports()
        if agent.agent.load().reports:
            await asyncio.sleep(delay * (0.5 + rng.random()))
            delay = min(delay * 2, 4.0)
    out.outcome, out.reason = "updated", ""
    return "updated"


def _verify_flash(job: WorkerJob, path: Path, out: FleetDeviceOutcome) -> None:
    """Read the flash as the bootloader does; downgrade the outcome if it disagrees."""
    from .provision import inspect

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


def _worker_process(job: WorkerJob, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process: provision, say ready, wait for go, run, reply."""
    logging.basicConfig(level=logging.WARNING)
    _quiet_aiocoap(0)
    _sigterm_cleans_up()
    try:
        provision_worker(job)
        conn.send(("ready", None))
        msg = conn.recv()
        if msg[0] != "go":
            return
        _, t0, deadline = msg

        def progress(index: int, snap: tuple[int, int, int, int]) -> None:
            conn.send(("progress", snap))

        result = _run_loop(run_worker(job, t0, deadline, progress))
        conn.send(("result", result))
    except BaseException as exc:  # report, then die: the parent decides what happens
        with contextlib.suppress(Exception):
            conn.send(("error", f"worker {job.index}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


def _sigterm_cleans_up() -> None:
    """SIGTERM (a CI runner, a parent giving up) unwinds like Ctrl-C: proxies and agents
    are closed and the temporary flash directory is removed instead of left behind."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def _quiet_aiocoap(verbose: int) -> None:
    import warnings

    # aiocoap's tinydtls client warns on every context shutdown that races a last write.
    warnings.filterwarnings("ignore", message="DTLS module did not shut down", category=UserWarning)
    # A lossy link makes aiocoap log every retransmission and late answer at warning
    # level; thousands of devices would flood the terminal. -vv shows them again.
    if verbose < 2:
        logging.getLogger("coap").setLevel(logging.ERROR)
        logging.getLogger("coap-server").setLevel(logging.ERROR)
        for name in (
            "device_sim.agent",
            "device_sim.coap",
            "device_sim.fetcher",
            "device_sim.netem",
        ):
            logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)


# --------------------------------------------------------------------------- progress


class Progress:
    """The one-line progress display on stderr (never on stdout, never flooding logs)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = TTY_INTERVAL if self.tty else LOG_INTERVAL
        self.snaps: dict[int, tuple[int, int, int, int]] = {}
        self.t0 = time.monotonic()
        self._last_print = 0.0
        self._last_blocks = 0
        self._last_t = self.t0
        self._shown = False

    def phase(self, text: str) -> None:
        if self.enabled:
            self._clear()
            print(f"fleet: {text}", file=self.stream, flush=True)

    def start(self) -> None:
        self.t0 = self._last_t = time.monotonic()

    def update(self, worker: int, snap: tuple[int, int, int, int]) -> None:
        self.snaps[worker] = snap
        now = time.monotonic()
        if self.enabled and now - self._last_print >= self.interval:
            self._draw(now)

    def _draw(self, now: float, *, average: bool = False) -> None:
        updated = sum(s[0] for s in self.snaps.values())
        failed = sum(s[1] for s in self.snaps.values())
        flying = sum(s[2] for s in self.snaps.values())
        blocks = sum(s[3] for s in self.snaps.values())
        since = self.t0 if average else self._last_t
        rate = (blocks - (0 if average else self._last_blocks)) / max(1e-6, now - since)
        self._last_blocks, self._last_t, self._last_print = blocks, now, now
        line = (
            f"fleet: {updated + failed}/{self.total} done, {failed} failed, "
            f"{flying} in flight, {rate:,.0f} blocks/s, {now - self.t0:.0f} s"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self._shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[2K")
            self._shown = False

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), average=True)
            if self.tty:
                self.stream.write("\n")
                self._shown = False
            self.stream.flush()


# --------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Prepared:
    """What the setup phase made: the class, the devices, the release, the factory."""

    vendor_domain: str
    class_info: str
    devices: tuple[tuple[str, bytes], ...]
    seq: int
    image_digest: bytes
    image_size: int
    image_id: str
    envelope: bytes
    image_path: Path
    factory_image: bytes
    factory_envelope: bytes
    anchors_pem: tuple[bytes, ...]


def _read(path: Path, cap: int, what: str) -> bytes:
    try:
        return read_small_file(path, cap)
    except ValueError as exc:
        raise FleetError(f"{what} {exc}") from None


def _load_key(path: Path) -> Any:
    from otacoap.core import cose

    try:
        return cose.load_private_key(_read(path, 64 * 1024, "--key"))
    except OtaError as exc:
        raise FleetError(f"--key {path}: {exc}") from None


def _image_bytes(label: str, size: int) -> bytes:
    """Deterministic, incompressible firmware bytes for `label`."""
    return random.Random(label).randbytes(size)


def _read_devices_file(path: Path, n: int) -> tuple[tuple[str, bytes], ...]:
    """Lines of `DEVICE_ID PSK_HEX` (blank lines and # comments ignored)."""
    from otacoap.store.names import check_device_id

    out: list[tuple[str, bytes]] = []
    text = _read(path, 16 * 1024 * 1024, "--devices-file").decode("utf-8", "replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise FleetError(f"{path}:{lineno}: expected 'DEVICE_ID PSK_HEX'")
        try:
            check_device_id(parts[0])
            psk = bytes.fromhex(parts[1])
        except (OtaError, ValueError) as exc:
            raise FleetError(f"{path}:{lineno}: {exc}") from None
        if len(psk) != PSK_LENGTH:
            raise FleetError(f"{path}:{lineno}: PSK must be {PSK_LENGTH} bytes")
        out.append((parts[0], psk))
        if len(out) == n:
            break
    if len(out) < n:
        raise FleetError(f"{path} lists {len(out)} devices, --devices asks for {n}")
    return tuple(out)


def prepare(opts: FleetOptions, work: Path, progress: Progress) -> tuple[Prepared, dict[str, Any]]:
    """Register the devices, build the factory and the release, publish the release.

    Returns what the workers need plus the server facts the report records.
    """
    from otacoap.core import build, ids, suit, trust

    key = _load_key(opts.key_path)
    anchor_pem = key.public.public_pem()
    token = secrets.token_hex(4)
    vendor = opts.vendor_domain
    class_info = opts.class_info or f"fleet-{token}"
    seq = opts.seq

    if opts.release is not None:
        env_path, img_path = opts.release
        envelope = maybe_hex(_read(env_path, 64 * 1024, "--release envelope"))
        try:
            vm = trust.accept(envelope, trust.TrustPolicy(anchors=(key.public,)))
        except OtaError as exc:
            raise FleetError(
                f"--release {env_path}: not signed by --key or invalid: {exc}"
            ) from None
        vendor_id = ids.vendor_id(vendor)
        if vm.vendor_ids != (vendor_id,) or vm.class_ids != (ids.class_id(vendor_id, class_info),):
            raise FleetError(
                "--release names another vendor/class than --vendor-domain/--class-info"
            )
        images = vm.payload_images()
        if len(images) != 1 or images[0].digest is None or images[0].size is None:
            raise FleetError("--release must fetch exactly one image with digest and size")
        image = _read(img_path, MAX_IMAGE_SIZE, "--release image")
        digest = hashlib.sha256(image).digest()
        if digest != images[0].digest.value or len(image) != images[0].size:
            raise FleetError("--release image is not the image the envelope describes")
        seq = vm.sequence_number
        if seq < 1:
            raise FleetError("--release has sequence number 0; the factory needs one below it")
        image_path = img_path
    else:
        image = _image_bytes(f"otacoap-fleet:{token}:release", opts.image_size)
        digest = hashlib.sha256(image).digest()
        release = build.Release(digest, len(image), vendor, class_info, seq)
        envelope = suit.encode_envelope(build.build_envelope(release, key))
        image_path = work / "release.bin"
        image_path.write_bytes(image)
    image_size = len(image)

    factory_image = _image_bytes(f"otacoap-fleet:{token}:factory", image_size)
    factory = build.Release(
        hashlib.sha256(factory_image).digest(), image_size, vendor, class_info, seq - 1
    )
    factory_envelope = suit.encode_envelope(build.build_envelope(factory, key))

    server_facts: dict[str, Any]
    if opts.data is not None:
        devices = tuple((f"fl{token}-{i:05d}", os.urandom(PSK_LENGTH)) for i in range(opts.devices))
        progress.phase(f"registering {len(devices)} devices of class {vendor}/{class_info}")
        server_facts = _local_setup(opts, devices, vendor, class_info, envelope, image_path, key)
    else:
        assert opts.devices_file is not None
        devices = _read_devices_file(opts.devices_file, opts.devices)
        progress.phase(f"publishing seq {seq} as operator {opts.operator}")
        _remote_publish(opts, envelope, image_path)
        server_facts = {
            "store": "not available: network mode (--operator) has no access to the "
            "server's store; success is judged from each device's flash and its "
            "acknowledged reports"
        }
    prepared = Prepared(
        vendor,
        class_info,
        devices,
        seq,
        digest,
        image_size,
        ids.image_id(digest),
        envelope,
        image_path,
        factory_image,
        factory_envelope,
        (anchor_pem,),
    )
    return prepared, server_facts


def _local_setup(
    opts: FleetOptions,
    devices: Sequence[tuple[str, bytes]],
    vendor: str,
    class_info: str,
    envelope: bytes,
    image_path: Path,
    key: Any,
) -> dict[str, Any]:
    """Register through the store (as `otacoap device add`) and publish (as
    `otacoap publish`); the server notices both through its store poll."""
    from otacoap.core.ids import class_key_of
    from otacoap.store import DataDir, Publisher

    assert opts.data is not None
    datadir = DataDir(opts.data)
    config = datadir.config()
    store = datadir.open_store()
    try:
        if key.public.key_id not in {a.key_id for a in store.list_anchors()}:
            raise FleetError(
                f"the server in {opts.data} does not trust --key (key id "
                f"{key.public.key_id}); run 'otacoap trust add --data {opts.data} KEY.pub'"
            )
        for device_id, psk in devices:
            store.add_device(device_id, vendor, class_info, psk, ACTOR)
        current = store.current_release(class_key_of(vendor, class_info))
        if current is not None and current.envelope == envelope:
            published = "already current"
        else:
            Publisher(store, datadir.blobs, config.publish).publish_file(
                envelope, image_path, ACTOR
            )
            published = "published"
    finally:
        store.close()
    s = config.server
    if opts.concurrency > s.max_dtls_sessions:
        # Every device in flight needs a session; beyond the cap, newly admitted ones
        # push out the least recently used, which may still be downloading.
        _log.warning(
            "concurrency %d but the server's max_dtls_sessions is %d: devices in flight "
            "will push each other's sessions out; raise it in %s/config.toml",
            opts.concurrency,
            s.max_dtls_sessions,
            opts.data,
        )
    return {
        "data": str(opts.data),
        "release": published,
        "max_dtls_sessions": s.max_dtls_sessions,
        "observe_poll_interval": s.observe_poll_interval,
    }


def _remote_publish(opts: FleetOptions, envelope: bytes, image_path: Path) -> None:
    from otacoap.operator.client import publish

    assert opts.operator is not None and opts.operator_psk is not None
    try:
        _run_loop(publish(opts.server, opts.operator, opts.operator_psk, envelope, image_path))
    except OtaError as exc:
        raise FleetError(f"publishing over the network failed: {exc}") from None


async def preflight(server: str, device: tuple[str, bytes], seq: int, szx: int) -> None:
    """Ask /m as the first device before launching everyone.

    A server that does not use the data directory the devices were registered in, or
    that is not running at all, would otherwise cost every device its full deadline.
    The server learns of the release by polling its store, so 4.04 is retried briefly.
    """
    from .coap import CoapTransport

    transport = CoapTransport(server, device[0], device[1])
    last = "no answer"
    try:
        for _ in range(20):
            try:
                resp = await transport.get("/m", block2=(0, 0, szx), timeout=3.0)
            except TransportError as exc:
                last = str(exc)
                await transport.reset()
                continue
            if resp.successful:
                return
            last = f"answered {resp.code >> 5}.{resp.code & 31:02d}"
            await asyncio.sleep(0.5)
    finally:
        await transport.close()
    raise FleetError(
        f"{server} does not offer seq {seq} to device {device[0]} ({last}): is the server "
        "running, and on the data directory the devices were registered in?"
    )


def _server_check(
    opts: FleetOptions, prepared: Prepared, outcomes: list[FleetDeviceOutcome]
) -> dict[str, Any]:
    """The server's side of the verification: each updated device's "confirmed" report
    for the release's sequence number must be in the store. Also the report counts."""
    from otacoap.store import DataDir

    assert opts.data is not None
    store = DataDir(opts.data).open_store()
    by_state: dict[str, int] = {}
    total = 0
    confirmed = 0
    try:
        for out in outcomes:
            reports = store.list_reports(out.device, 1000)
            total += len(reports)
            for r in reports:
                by_state[r.state] = by_state.get(r.state, 0) + 1
            ok = any(r.state == "confirmed" and r.sequence_number == prepared.seq for r in reports)
            out.server_confirmed = ok
            confirmed += ok
            if out.outcome == "updated" and not ok:
                out.outcome, out.reason = "unconfirmed", "the server has no confirmed report"
                out.seconds = out.duration = None
        try:
            audit: Any = store.verify_audit()[0]
        except OtaError as exc:
            audit = f"audit chain broken: {exc}"
    finally:
        store.close()
    return {
        "reports": total,
        "reports_by_state": dict(sorted(by_state.items())),
        "devices_confirmed": confirmed,
        "audit_entries": audit,
    }


# --------------------------------------------------------------------------- running


def _split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    out: list[list[Any]] = [[] for _ in range(parts)]
    for i, item in enumerate(items):
        out[i % parts].append(item)
    return out


def _server_address(server: str) -> tuple[str, int]:
    parts = urlsplit(server)
    assert parts.hostname is not None
    port = parts.port or 5684
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise FleetError(f"cannot resolve {parts.hostname}: {exc}") from None
    return str(infos[0][4][0]), port


def _jobs(opts: FleetOptions, prepared: Prepared, server: str, work: Path) -> list[WorkerJob]:
    from otacoap.core import blockwise

    upstream = None
    if opts.impairment != LinkProfile():
        upstream = _server_address(server)
        import ipaddress

        if not ipaddress.ip_address(upstream[0]).is_loopback:
            raise FleetError(
                "impairment options need a server on loopback (the netem proxy only "
                f"relays to 127.0.0.0/8 or ::1, not {upstream[0]})"
            )
    # No worker without a device or without a concurrency slot of its own.
    m = max(1, min(opts.processes, len(prepared.devices), opts.concurrency))
    shares = _split(prepared.devices, m)
    slot = -(-prepared.image_size // SECTOR_SIZE) * SECTOR_SIZE
    jobs = []
    for i in range(m):
        conc = opts.concurrency // m + (1 if i < opts.concurrency % m else 0)
        jobs.append(
            WorkerJob(
                index=i,
                server_uri=server,
                upstream=upstream,
                impairment=opts.impairment,
                seed=opts.seed + i,
                devices=tuple(shares[i]),
                flash_dir=str(work / f"w{i}"),
                vendor_domain=prepared.vendor_domain,
                class_info=prepared.class_info,
                anchors_pem=prepared.anchors_pem,
                factory_image=prepared.factory_image,
                factory_envelope=prepared.factory_envelope,
                slot_size=slot,
                szx=blockwise.szx_of(opts.block_size),
                max_window=opts.max_window,
                concurrency=max(1, conc),
                timeout=opts.timeout,
                attempts=opts.attempts,
                expected_seq=prepared.seq,
                expected_digest=prepared.image_digest.hex(),
            )
        )
    return jobs


def _run_inprocess(
    job: WorkerJob, deadline_s: float, progress: Progress
) -> tuple[float, WorkerResult]:
    provision_worker(job)
    progress.phase(f"running {len(job.devices)} devices, {job.concurrency} at once")
    progress.start()
    t0 = time.monotonic()
    result = _run_loop(run_worker(job, t0, t0 + deadline_s, progress.update))
    return t0, result


def _run_processes(
    jobs: list[WorkerJob], deadline_s: float, progress: Progress
) -> tuple[float, list[WorkerResult]]:
    """One process per job. Workers provision in parallel, start together on "go"."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    conns: list[multiprocessing.connection.Connection] = []
    try:
        for job in jobs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_process, args=(job, child), name=f"fleet-worker-{job.index}"
            )
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        biggest = max(len(j.devices) for j in jobs)
        limit = time.monotonic() + PROVISION_SECONDS_BASE + PROVISION_SECONDS_PER_DEVICE * biggest
        waiting = set(range(len(jobs)))
        while waiting:
            left = limit - time.monotonic()
            if left <= 0:
                raise FleetError("worker processes did not finish provisioning in time")
            for conn in multiprocessing.connection.wait([conns[i] for i in waiting], left):
                i = conns.index(conn)  # type: ignore[arg-type]
                msg = _recv(conn, i)
                if msg[0] == "error":
                    raise FleetError(str(msg[1]))
                if msg[0] == "ready":
                    waiting.discard(i)
        progress.phase(
            f"running {sum(len(j.devices) for j in jobs)} devices in {len(jobs)} processes, "
            f"{sum(j.concurrency for j in jobs)} at once"
        )
        progress.start()
        t0 = time.monotonic()
        deadline = t0 + deadline_s
        for conn in conns:
            conn.send(("go", t0, deadline))
        results: dict[int, WorkerResult] = {}
        while len(results) < len(jobs):
            left = deadline + 2 * GRACE - time.monotonic()
            if left <= 0:
                raise FleetError("worker processes did not finish by the run's deadline")
            live = [c for i, c in enumerate(conns) if i not in results]
            for conn in multiprocessing.connection.wait(live, min(left, 1.0)):
                i = conns.index(conn)  # type: ignore[arg-type]
                msg = _recv(conn, i)
                if msg[0] == "progress":
                    progress.update(i, msg[1])
                elif msg[0] == "result":
                    results[i] = msg[1]
                elif msg[0] == "error":
                    raise FleetError(str(msg[1]))
        return t0, [results[i] for i in range(len(jobs))]
    finally:
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.send(("stop", None))
            conn.close()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():  # pragma: no cover - a worker ignoring SIGTERM
                proc.kill()
                proc.join()


def _recv(conn: Any, index: int) -> tuple[str, Any]:
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        raise FleetError(f"worker process {index} died") from None
    return msg  # type: ignore[no-any-return]


def run_fleet(opts: FleetOptions, stream: TextIO | None = None) -> FleetRunReport:
    """The whole run: setup, update every device, verify, report. Cleans up after itself."""
    from .coap import normalize_base

    stream = stream if stream is not None else sys.stderr
    try:
        server = normalize_base(opts.server)
    except ValueError as exc:
        raise FleetError(str(exc)) from None
    enabled = opts.progress if opts.progress is not None else stream.isatty()
    progress = Progress(opts.devices, enabled, stream)
    if opts.work is not None:
        opts.work.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="fleet-", dir=opts.work))
        keep = True
    else:
        work = Path(tempfile.mkdtemp(prefix="otacoap-fleet-"))
        keep = False
    wall_start = time.monotonic()
    try:
        prepared, server_facts = prepare(opts, work, progress)
        jobs = _jobs(opts, prepared, server, work)
        progress.phase("checking that the server offers the release")
        _run_loop(preflight(server, prepared.devices[0], prepared.seq, jobs[0].szx))
        progress.phase(f"provisioning {opts.devices} flash files in {work}")
        if len(jobs) == 1:
            t0, one = _run_inprocess(jobs[0], opts.run_deadline(), progress)
            results = [one]
        else:
            t0, results = _run_processes(jobs, opts.run_deadline(), progress)
        wall = time.monotonic() - t0
        progress.finish()
        outcomes = [o for r in results for o in r.outcomes]
        if opts.data is not None:
            server_facts.update(_server_check(opts, prepared, outcomes))
        else:
            for out in outcomes:
                if out.outcome == "updated" and out.queued_reports:
                    out.outcome, out.reason = "unconfirmed", "reports still queued on the device"
                    out.seconds = out.duration = None
        order = {dev: i for i, (dev, _) in enumerate(prepared.devices)}
        outcomes.sort(key=lambda o: order.get(o.device, 0))
        report = FleetRunReport(
            devices=list(outcomes),
            wall_seconds=wall,
            image_size=prepared.image_size,
            settings=_settings(opts, prepared, server, work if keep else None, len(jobs)),
            server=server_facts,
            network=_merge_network([r.network for r in results]),
        )
        report.settings["setup_seconds"] = round(t0 - wall_start, 3)
        if opts.report is not None:
            report.write_json(opts.report)
        if opts.plot is not None:
            report.write_plot(opts.plot)
        return report
    finally:
        if not keep:
            _remove_tree(work)


def _remove_tree(path: Path) -> None:
    """Remove the flash directory (thousands of files: seconds) even if a SIGTERM or a
    Ctrl-C arrives while it is being removed; a few repeated interrupts still win."""
    for _ in range(3):
        try:
            shutil.rmtree(path, ignore_errors=True)
            return
        except KeyboardInterrupt:
            continue


def _merge_network(parts: list[dict[str, dict[str, int]]]) -> dict[str, Any]:
    merged: dict[str, dict[str, int]] = {}
    for part in parts:
        for direction, stats in part.items():
            into = merged.setdefault(direction, {})
            for k, v in stats.items():
                into[k] = into.get(k, 0) + v
    return merged


def _settings(
    opts: FleetOptions, prepared: Prepared, server: str, kept: Path | None, processes: int
) -> dict[str, Any]:
    imp = opts.impairment
    return {
        "server": server,
        "mode": "local store" if opts.data is not None else "network (operator)",
        "vendor_domain": prepared.vendor_domain,
        "class_info": prepared.class_info,
        "release_seq": prepared.seq,
        "image_id": prepared.image_id,
        "image_sha256": prepared.image_digest.hex(),
        "block_size": opts.block_size,
        "max_window": opts.max_window,
        "concurrency": opts.concurrency,
        "processes": processes,
        "timeout": opts.timeout,
        "max_time": opts.run_deadline(),
        "attempts": opts.attempts,
        "seed": opts.seed,
        "impairment": asdict(imp) if imp != LinkProfile() else None,
        "work_dir": str(kept) if kept is not None else None,
    }


# --------------------------------------------------------------------------- CLI


# The fleet's own limits; parsing and wording are shared with `python -m device_sim`.
_size = size_type(MAX_IMAGE_SIZE)  # a generated image must fit the server's publish limit
_seconds = positive_float_type("seconds")
_rate = positive_float_type("rate")


def _psk(text: str) -> bytes:
    try:
        psk = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("PSK must be hex") from None
    if len(psk) != PSK_LENGTH:
        raise argparse.ArgumentTypeError(f"PSK must be {PSK_LENGTH} bytes ({2 * PSK_LENGTH} hex)")
    return psk


DESCRIPTION = (
    "Update a whole simulated fleet against a running otacoap server: register N "
    "devices of a fresh class (with --data, through the server's store), provision "
    "their flash with a signed factory image, publish a new signed release, run every "
    "device's update agent concurrently (optionally through a lossy link), verify "
    "each device's flash and the server's confirmed report, and write a report."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """All options of the fleet command (shared by `register` and `main`)."""
    p.add_argument("--server", required=True, metavar="coaps://HOST:PORT", help="the server")
    p.add_argument("--devices", required=True, type=positive_int, metavar="N", help="fleet size")
    p.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="AUTHOR_PRIVATE",
        help="manifest author's private key (PEM): signs factory and release; its public "
        "key becomes every device's trust anchor",
    )
    where = p.add_argument_group("server access (one of)")
    where.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="the server's data directory: register devices and publish through its store",
    )
    where.add_argument(
        "--operator", metavar="NAME", help="publish over the network as this operator"
    )
    where.add_argument("--operator-psk", type=_psk, metavar="HEX", help="the operator's PSK")
    where.add_argument(
        "--devices-file",
        type=Path,
        metavar="FILE",
        help="with --operator: already registered devices, one 'ID PSK_HEX' per line",
    )
    rel = p.add_argument_group("release")
    rel.add_argument(
        "--image-size",
        type=_size,
        default=DEFAULT_IMAGE_SIZE,
        metavar="BYTES",
        help=f"generated image size, K/M suffixes allowed (default {DEFAULT_IMAGE_SIZE // 1024}K)",
    )
    rel.add_argument(
        "--release",
        nargs=2,
        type=Path,
        metavar=("ENVELOPE", "IMAGE"),
        help="use this signed release instead of generating one (needs --class-info)",
    )
    rel.add_argument(
        "--vendor-domain",
        default=DEFAULT_VENDOR,
        metavar="DOMAIN",
        help=f"vendor domain of the fleet (default {DEFAULT_VENDOR})",
    )
    rel.add_argument(
        "--class-info",
        metavar="TEXT",
        help="device class (default: a fresh 'fleet-<random>' per run)",
    )
    rel.add_argument(
        "--seq",
        type=positive_int,
        default=2,
        metavar="N",
        help="sequence number of the generated release; the factory gets N-1 (default 2)",
    )
    link = p.add_argument_group("link impairment (any of them puts a netem proxy in between)")
    link.add_argument("--loss", type=probability, default=0.0, metavar="P", help="loss, 0..1")
    link.add_argument("--delay", type=non_negative_float, default=0.0, metavar="MS", help="one-way")
    link.add_argument("--jitter", type=non_negative_float, default=0.0, metavar="MS", help="jitter")
    link.add_argument("--duplicate", type=probability, default=0.0, metavar="P")
    link.add_argument("--reorder", type=probability, default=0.0, metavar="P")
    link.add_argument("--rate", type=_rate, metavar="KBPS", help="per-device link rate")
    run = p.add_argument_group("run")
    run.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="K",
        help=f"devices updating at once, all processes together (default {DEFAULT_CONCURRENCY})",
    )
    run.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        metavar="M",
        help="worker processes, each with its own event loop (default 1)",
    )
    run.add_argument(
        "--block-size",
        type=int,
        choices=[16, 32, 64, 128, 256, 512, 1024],
        default=1024,
        help="Block2 size the devices ask for (default 1024)",
    )
    run.add_argument(
        "--window",
        type=window,
        default=1,
        metavar="N",
        help="most Block2 requests each device keeps outstanding, adapted by its "
        "congestion controller (default 1, RFC 7959 lock-step: with many devices per "
        "process the simulator's CPU, not the round trip, is the limit)",
    )
    run.add_argument("--seed", type=int, metavar="N", help="seed for the link model and retries")
    run.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"per-device deadline (default {DEFAULT_TIMEOUT:g})",
    )
    run.add_argument(
        "--max-time",
        type=_seconds,
        metavar="SECONDS",
        help="deadline of the whole run (default: waves x --timeout + 60)",
    )
    run.add_argument(
        "--attempts",
        type=positive_int,
        default=DEFAULT_ATTEMPTS,
        metavar="N",
        help="agent runs per device within its deadline, like polls after a failure "
        f"(default {DEFAULT_ATTEMPTS})",
    )
    run.add_argument(
        "--work",
        type=Path,
        metavar="DIR",
        help="put the flash files here and keep them (default: a temp dir, removed)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--report", type=Path, metavar="OUT.json", help="write the JSON report")
    out.add_argument("--plot", type=Path, metavar="OUT.png", help="plot completions over time")
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: only when stderr is a terminal)",
    )
    out.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `fleet` subcommand to a device_sim-style subparsers object."""
    p = subparsers.add_parser(
        "fleet", help="update a simulated fleet against a server", description=DESCRIPTION
    )
    add_arguments(p)
    p.set_defaults(handler=cmd_fleet)
    return p  # type: ignore[no-any-return]


def options_from_args(args: argparse.Namespace) -> FleetOptions:
    """Check the combinations argparse cannot; raise FleetError with one line."""
    local = args.data is not None
    remote = args.operator is not None or args.operator_psk is not None
    if local and remote:
        raise FleetError("give either --data DIR or --operator NAME --operator-psk HEX, not both")
    if not local and not remote:
        raise FleetError(
            "say how to reach the server's store: --data DIR (local), or --operator NAME "
            "--operator-psk HEX --devices-file FILE (network publishing only)"
        )
    if remote:
        if args.operator is None or args.operator_psk is None:
            raise FleetError("--operator and --operator-psk go together")
        if args.devices_file is None or args.class_info is None:
            raise FleetError(
                "with --operator the devices must already be registered (the server has no "
                "network device registration): give --devices-file and --class-info"
            )
    elif args.devices_file is not None:
        raise FleetError("--devices-file only applies with --operator")
    if args.release is not None and args.class_info is None:
        raise FleetError("--release needs --class-info (and --vendor-domain) of its class")
    if args.devices > MAX_DEVICES:
        raise FleetError(f"--devices is limited to {MAX_DEVICES}")
    if args.seq < 2 and args.release is None:
        raise FleetError("--seq must be at least 2 (the factory image has seq - 1)")
    if args.max_time is not None and args.max_time < 1:
        raise FleetError("--max-time must be at least 1 second")
    from .coap import normalize_base

    try:
        normalize_base(args.server)
    except ValueError as exc:
        raise FleetError(str(exc)) from None
    if not args.key.is_file():
        raise FleetError(f"--key {args.key}: no such file")
    if local and not args.data.is_dir():
        raise FleetError(f"--data {args.data}: no such directory")
    imp = LinkProfile(
        loss=args.loss,
        delay_ms=args.delay,
        jitter_ms=args.jitter,
        duplicate=args.duplicate,
        reorder=args.reorder,
        rate_kbps=args.rate,
    )
    return FleetOptions(
        server=args.server,
        devices=args.devices,
        key_path=args.key,
        data=args.data,
        operator=args.operator,
        operator_psk=args.operator_psk,
        devices_file=args.devices_file,
        vendor_domain=args.vendor_domain,
        class_info=args.class_info,
        seq=args.seq,
        image_size=args.image_size,
        release=(args.release[0], args.release[1]) if args.release else None,
        impairment=imp,
        concurrency=args.concurrency,
        processes=args.processes,
        block_size=args.block_size,
        max_window=args.window,
        seed=args.seed if args.seed is not None else secrets.randbelow(1 << 31),
        timeout=args.timeout,
        max_time=args.max_time,
        attempts=args.attempts,
        work=args.work,
        report=args.report,
        plot=args.plot,
        progress=args.progress,
    )


def cmd_fleet(args: argparse.Namespace) -> int:
    import json

    _quiet_aiocoap(getattr(args, "verbose", 0))
    _sigterm_cleans_up()
    opts = options_from_args(args)
    report = run_fleet(opts)
    s = report.summary()
    if getattr(args, "json", False):
        print(json.dumps(s, sort_keys=True))
    else:

        def sec(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} s"

        print(
            f"fleet: {s['completed']}/{s['devices']} updated ({s['success_rate']:.1%}) in "
            f"{s['wall_seconds']:.1f} s; completion p50 {sec(s['p50_seconds'])}, "
            f"p95 {sec(s['p95_seconds'])}, p99 {sec(s['p99_seconds'])}; per-device update "
            f"p50 {sec(s['update_p50_seconds'])}; {s['blocks_per_second']:,.0f} blocks/s"
        )
        if s["failure_reasons"]:
            worst = sorted(s["failure_reasons"].items(), key=lambda kv: -kv[1])[:5]
            print("failures: " + "; ".join(f"{n}x {why}" for why, n in worst))
    return EXIT_OK if s["completed"] == s["devices"] else EXIT_NOT_ALL_UPDATED


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    add_arguments(parser)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return cmd_fleet(args)
    except (FleetError, OtaError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{getattr(exc, 'filename', None) or ''} {exc.strerror or exc}".strip())
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if os.environ.get("OTACOAP_TRACEBACK"):
        raise


if __name__ == "__main__":
    # Re-enter through the importable module: worker processes unpickle jobs and
    # results by module name, and "__main__" is not the same module in a spawned child.
    from device_sim.fleet import main as _main

    sys.exit(_main())
