"""Start, run and stop the update server.

`OtaServer` is the embeddable part (start/stop inside a running loop, used by tests);
`serve` is what `otacoap serve` runs on the loop the CLI chose (otacoap.eventloop):
start, print "listening on coaps://ADDR:PORT" once the socket is bound, and stop
cleanly on SIGINT or SIGTERM (in-flight uploads are dropped with their temp files, the
DB is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import aiocoap
from aiocoap.util import hostportjoin

from ..config import Config, split_host_port
from ..store import DataDir
from ..store.errors import StoreError
from .coap.listeners import (
    DTLSServerInterface,
    PlainServerInterface,
    SharedDTLSServerInterface,
    SharedPlainServerInterface,
    add_transport,
    shutdown,
)
from .fastpath import FirmwareFastPath
from .metrics import MetricsEndpoint
from .resources import ManifestResource, build_site
from .stats import HandshakeFailures, ServerStats, stats_name
from .store_view import StoreView
from .uploads import UPLOAD_PREFIX, StagedImages, Uploads

log = logging.getLogger(__name__)

_SWEEP_INTERVAL = 5.0
_LOAD_LOG_INTERVAL = 60.0  # seconds between 'load:' log lines (only when changed)
_STALE_TEMP = 3600.0
_STATS_INTERVAL = 2.0  # seconds between writes of DATA/server-stats.json (when changed)
LOCK_NAME = "serve.lock"
CAMPAIGN_TICK_INTERVAL = 1.0  # seconds between campaign evaluations (also after reports)


@dataclass(frozen=True)
class ServeOptions:
    """What `otacoap serve`'s command line adds to config.toml.

    `bind`, `port` and `loop` override [server] (None keeps the configured value).
    The plain CoAP listener has no config key on purpose: a dangerous development
    mode is switched on by a loudly named option each time (DESIGN principle 10).
    """

    bind: str | None = None
    port: int | None = None
    loop: str | None = None
    plain_coap: bool = False
    plain_port: int | None = None  # None: the DTLS port - 1, like 5683 beside 5684
    plain_identity: str | None = None
    metrics: str | None = None  # [monitoring] metrics_bind
    log_format: str | None = None  # [monitoring] log_format
    # Set only by `serve --workers N`'s parent (otacoap/server/workers.py) for the
    # worker it starts: its index; the worker shares the port (SO_REUSEPORT) and the
    # data directory's lock is the parent's.
    worker: int | None = None

    def apply(self, config: Config) -> Config:
        """`config` with this command line's overrides (validated again)."""
        overrides = {
            name: value
            for name in ("bind", "port", "loop")
            if (value := getattr(self, name)) is not None
        }
        monitoring = {
            key: value
            for key, value in (("metrics_bind", self.metrics), ("log_format", self.log_format))
            if value is not None
        }
        return dataclasses.replace(
            config,
            server=dataclasses.replace(config.server, **overrides),
            monitoring=dataclasses.replace(config.monitoring, **monitoring),
        )

    def plain_port_for(self, dtls_port: int) -> int:
        # RFC 7252 §6.1/§6.2: plain CoAP sits beside DTLS as 5683 beside 5684.
        return self.plain_port if self.plain_port is not None else max(dtls_port - 1, 0)


class OtaServer:
    def __init__(self, datadir: DataDir, config: Config, options: ServeOptions) -> None:
        self.datadir = datadir
        self.config = options.apply(config)
        self.options = options
        self.view: StoreView | None = None
        self.context: aiocoap.Context | None = None
        self.manifest: ManifestResource | None = None
        self.dtls: DTLSServerInterface | None = None
        self.plain: PlainServerInterface | None = None
        self.fastpath: FirmwareFastPath | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.uploads: Uploads | None = None
        self.staged: StagedImages | None = None
        self._lock: TextIO | None = None
        self.failures = HandshakeFailures()
        self.stats = ServerStats(self.failures, self.load_figures)
        self.metrics: MetricsEndpoint | None = None
        self.metrics_address: tuple[str, int] | None = None

    @property
    def dtls_port(self) -> int:
        assert self.dtls is not None
        return self.dtls.port

    @property
    def plain_port(self) -> int | None:
        return self.plain.port if self.plain else None

    @property
    def dtls_uri(self) -> str:
        return "coaps://" + hostportjoin(self.config.server.bind, self.dtls_port)

    async def start(self) -> None:
        """Bind and start serving; on any failure everything started is undone."""
        bind = self.config.server.bind
        if bind in ("", "0.0.0.0", "::"):
            # aiocoap's DTLS server learns its reply address from the bind address.
            raise OSError(f"bind to one address, not {bind or 'the any-address'}")
        self.datadir.check()
        if self.options.worker is None:
            self._lock = lock_datadir(self.datadir)
        else:
            _check_parent_holds_lock(self.datadir)
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        opts, cfg = self.options, self.config
        # A worker of `serve --workers N` leaves its siblings' uploads alone: the parent
        # removed the earlier run's before starting any worker.
        if opts.worker is None:
            clean_uploads(self.datadir)
        view = self.view = StoreView(self.datadir, cfg, plain_identity=opts.plain_identity)
        self.uploads = Uploads(view.blobs, cfg.uploads)
        self.staged = StagedImages(cfg.uploads)
        site, self.manifest = build_site(view, self.uploads, self.staged)
        fast = self.fastpath = FirmwareFastPath(view)
        loop = asyncio.get_running_loop()
        ctx = self.context = aiocoap.Context(
            loop=loop, serversite=site, loggername="otacoap.coap", server_credentials=view.psks
        )
        s = cfg.server
        shared = opts.worker is not None
        dtls_cls = SharedDTLSServerInterface if shared else DTLSServerInterface
        plain_cls = SharedPlainServerInterface if shared else PlainServerInterface
        self.dtls = await add_transport(
            ctx,
            lambda mman: dtls_cls.create_bound(
                (s.bind, s.port),
                mman,
                ctx.log,
                loop,
                view.psks,
                s.max_dtls_sessions,
                s.dtls_idle_timeout,
                s.max_dtls_handshakes,
                self.failures.record,
            ),
            s.dedup_max_entries,
            s.dedup_lifetime,
        )
        self.dtls.fast = fast
        dtls = self.dtls
        # Issue 10 §1: once the view has seen a device or operator removed or re-keyed
        # (by the CLI, another process), end the sessions made with the old key.
        view.on_principal_change(lambda: _revoked(dtls.revoke(view.psks.is_current)))
        if opts.plain_coap:
            self.plain = await add_transport(
                ctx,
                lambda mman: plain_cls.create_bound(
                    (s.bind, opts.plain_port_for(s.port)), mman, ctx.log, loop
                ),
                s.dedup_max_entries,
                s.dedup_lifetime,
            )
            self.plain.fast = fast
        self._tasks = [
            asyncio.create_task(view.poll(), name="otacoap store poll"),
            asyncio.create_task(self._sweep(), name="otacoap upload sweep"),
            asyncio.create_task(
                view.run_campaigns(CAMPAIGN_TICK_INTERVAL), name="otacoap rollout campaigns"
            ),
            asyncio.create_task(self._write_stats(), name="otacoap stats"),
        ]
        if cfg.monitoring.metrics_bind:
            host, port = split_host_port(cfg.monitoring.metrics_bind, "the metrics address")
            self.metrics = MetricsEndpoint(view, self.stats.snapshot)
            self.metrics_address = await self.metrics.start(host, port)

    async def _write_stats(self) -> None:
        path = self.datadir.root / stats_name(self.options.worker)
        while True:
            await asyncio.sleep(_STATS_INTERVAL)
            self.failures.flush_log()
            try:
                self.stats.write(path)
            except OSError as exc:  # a full disk must not stop the server
                log.error("cannot write %s: %s", path, exc)

    async def _sweep(self) -> None:
        logged: dict[str, Any] = {}
        next_log = asyncio.get_running_loop().time() + _LOAD_LOG_INTERVAL
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            if self.uploads is not None:
                self.uploads.sweep()
            if self.staged is not None:
                self.staged.sweep()
            if asyncio.get_running_loop().time() >= next_log:
                next_log += _LOAD_LOG_INTERVAL
                figures = self.load_figures()
                if figures != logged:  # an idle server stays quiet
                    log.info("load: %s", " ".join(f"{k}={v}" for k, v in figures.items()))
                    logged = figures

    def load_figures(self) -> dict[str, Any]:
        """What an operator sizing the server wants to see: DTLS sessions in use and
        why sessions were dropped (raise max_dtls_sessions if `dropped_full` climbs),
        Block2 answers from the fast path, and uploads in progress."""
        figures: dict[str, Any] = {}
        if self.dtls is not None:
            figures["dtls_sessions"] = self.dtls.session_count
            figures["dtls_handshakes"] = self.dtls.handshake_count
            figures["dtls_unverified"] = self.dtls.unverified_count
            figures["handshakes_completed"] = self.dtls.handshakes_completed
            figures["handshakes_failed"] = self.failures.total
            for why, n in self.dtls.dropped.items():
                figures[f"dropped_{why}"] = n
        if self.fastpath is not None:
            figures["fw_blocks_served"] = self.fastpath.served
        if self.uploads is not None:
            figures["uploads"] = len(self.uploads)
        return figures

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        if self.context is not None:
            await shutdown(self.context)
            self.context = None
        if self.uploads is not None:
            self.uploads.close()
        if self.staged is not None:
            self.staged.close()
        if self.fastpath is not None:
            self.fastpath.close()
            self.fastpath = None
        if self.view is not None:
            await self.view.close()
            self.view = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


async def serve(datadir: DataDir, config: Config, options: ServeOptions) -> int:
    """Serve until SIGINT/SIGTERM; the exit code for `otacoap serve`."""
    who = None if options.worker is None else f"worker {options.worker}"
    default_logging(options.apply(config).monitoring.log_format, who)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = OtaServer(datadir, config, options)
    await server.start()
    try:
        if options.plain_coap:
            warning = (
                "WARNING: --insecure-plain-coap: unencrypted, unauthenticated CoAP on "
                f"coap://{hostportjoin(server.config.server.bind, server.plain_port)}"
            )
            if options.plain_identity:
                warning += f"; EVERY plain request acts as {options.plain_identity!r}"
            else:
                warning += "; every request answers a bare 4.01 there"
            log.warning(warning)
            print(warning, file=sys.stderr, flush=True)
        log.info(
            "serving %s from %s (%s loop)", server.dtls_uri, datadir.root, server.config.server.loop
        )
        if options.worker is not None and server.plain_port is not None:
            # For the parent, which starts the other workers on the same ports.
            plain = hostportjoin(server.config.server.bind, server.plain_port)
            print(f"plain on coap://{plain}", flush=True)
        print(f"listening on {server.dtls_uri}", flush=True)
        if server.metrics_address is not None:
            host, port = server.metrics_address
            where = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            print(f"metrics on {where}/metrics, health on {where}/health", flush=True)
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print("stopped", flush=True)
    return 0


def _revoked(count: int) -> None:
    if count:
        log.info("ended %d DTLS session(s) made with a removed or replaced key", count)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (`[monitoring] log_format = "json"`), for log shippers;
    a worker of `serve --workers N` adds its index and pid."""

    def __init__(self, who: str | None = None) -> None:
        super().__init__()
        self.who = who

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.who is not None:
            doc["process"] = self.who
            doc["pid"] = record.process
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def default_logging(log_format: str = "text", who: str | None = None) -> None:
    """A server logs its publishes, refusals and reports at info level by default; the
    processes of `serve --workers N` name themselves on every line ("worker 2 pid 4711",
    "supervisor pid 4700")."""
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter(who))
    elif who is not None:
        text = f"%(asctime)s {who} pid %(process)d %(levelname)s %(name)s: %(message)s"
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(text))
    ota = logging.getLogger("otacoap")
    if ota.getEffectiveLevel() > logging.INFO:
        ota.setLevel(logging.INFO)
    if logging.getLogger().level > logging.DEBUG:
        # aiocoap logs every failed handshake and shutdown race at warning level;
        # keep that for -vv.
        logging.getLogger("otacoap.coap").setLevel(logging.ERROR)


def lock_datadir(datadir: DataDir) -> TextIO:
    """One server per data directory: its upload temp files and caches assume it."""
    f = open(datadir.root / LOCK_NAME, "a")  # noqa: SIM115 - held until stop()
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StoreError(f"another 'otacoap serve' is already using {datadir.root}") from None
    return f


def clean_uploads(datadir: DataDir) -> None:
    """Half-done uploads of an earlier run are never published (ATTACKS.md #49): delete
    them all; old CLI temp files too (a crash left them)."""
    blobs = datadir.blobs
    removed = blobs.clean_tmp(prefix=UPLOAD_PREFIX)
    removed += blobs.clean_tmp(older_than=_STALE_TEMP)
    if removed:
        log.info("removed %d stale temporary upload file(s)", removed)


def mark_supervisor(lock: TextIO) -> None:
    """Write this process's pid into the data directory's lock it holds: the workers of
    `serve --workers N` check that it is their parent's (`_check_parent_holds_lock`)."""
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()


def _check_parent_holds_lock(datadir: DataDir) -> None:
    """A worker starts only under the parent that holds the data directory's lock: the
    hidden worker option is no way around "one server per data directory"."""
    path = datadir.root / LOCK_NAME
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            if f.read().strip() == str(os.getppid()):
                return  # held by our parent (it started us, and we die with it)
        else:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    raise StoreError(f"a worker needs its 'otacoap serve --workers' parent ({datadir.root})")
