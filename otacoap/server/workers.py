"""`otacoap serve --workers N`: one parent, N server processes on one port.

The parent serves nothing itself. It holds the data directory's lock (so a second
`serve` on it is still refused, and a worker started by hand without it refuses to
run: `app._check_parent_holds_lock`), removes the half-done uploads of an earlier run
once, claims the address for this host (`claim_address`: a second `serve --workers` on
another data directory must not join the port's SO_REUSEPORT group), and then:

- starts worker 0 and waits for its "listening on" line (with `--port 0`, that is
  where the port comes from), then the others on the same port (and plain port);
- supervises them: a worker that dies (kill -9, a crash) is started again after a
  back-off that doubles while it keeps dying young (`Backoff`); its devices' DTLS
  sessions died with it, so they handshake again, with whichever worker the kernel's
  SO_REUSEPORT hash now picks;
- on SIGTERM or SIGINT sends SIGTERM to every worker, waits for their clean stop
  (SIGKILL after `stop_timeout`), prints "stopped" and exits 0.

Workers run in their own session (a terminal's Ctrl-C reaches the parent only, which
forwards it exactly once) and get SIGTERM if the parent dies (PR_SET_PDEATHSIG), so no
orphan keeps the port. Everything they share is the store: changes reach every worker
by `StoreView.poll`, campaign admissions are decided in one store transaction
(`CampaignStore.tick_campaigns`), so `--max-downloads` holds across workers.
docs/decisions/several-workers.md says why, and what a restart costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from ..core.errors import OtaError

log = logging.getLogger(__name__)

_LISTENING = re.compile(r"^listening on coaps://(.+):(\d+)$")
_PLAIN = re.compile(r"^plain on coap://(.+):(\d+)$")
_ERROR = re.compile(r"^otacoap serve: error: (.*)$")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LINE_LIMIT = 1 << 20  # bytes of one relayed log line (a JSON line with a traceback)

START_TIMEOUT = 120.0  # seconds a worker may take to print "listening on"
STOP_TIMEOUT = 20.0  # seconds a worker may take to stop cleanly after SIGTERM


class WorkerError(OtaError):
    """A worker could not be started (its own error is on stderr above this one)."""


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Backoff:
    """Seconds to wait before restarting a worker: `first`, doubling up to `cap` while
    the worker keeps dying within `stable` seconds of its start, `first` again after
    it ran that long (a crash loop must not spin, one kill must not cost long)."""

    first: float = 0.5
    cap: float = 30.0
    stable: float = 30.0
    current: float = 0.0

    def next(self, lived: float) -> float:
        if lived >= self.stable or self.current == 0.0:
            self.current = self.first
        else:
            self.current = min(self.cap, self.current * 2)
        return self.current


# The command line of worker `index`: (index, port, plain_port or None, metrics or None).
WorkerCommand = Callable[[int, int, int | None, str | None], list[str]]


@dataclass(eq=False)
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    listening: asyncio.Future[tuple[int, int | None]] | None = None
    reader: asyncio.Task[None] | None = None
    backoff: Backoff = field(default_factory=Backoff)
    restarts: int = 0
    relay: asyncio.Task[None] | None = None
    error: str | None = None  # its one-line error, if it failed to start


def claim_address(bind: str, port: int) -> socket.socket:
    """Hold this host's claim on (bind, port) for one `serve --workers` parent.

    SO_REUSEPORT lets any process of the same user join a port's group, so a second
    `serve --workers` on another data directory would bind without error and the
    kernel would split devices between two unrelated servers. Binding a name in
    Linux's abstract Unix socket namespace is exclusive and vanishes with the process
    (no stale file after kill -9): the second parent is refused here instead.
    """
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        claim.bind(f"\0otacoap-serve {bind} {port}")
    except OSError:
        claim.close()
        where = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
        raise WorkerError(
            f"cannot serve on {where}: another 'otacoap serve --workers' uses it"
        ) from None
    return claim


def probe_bind(bind: str, port: int) -> None:
    """Raise the OSError a worker's bind of (bind, port) with SO_REUSEPORT would get."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((bind, port))


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so no orphan keeps the
    port (prctl(2) PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Supervisor:
    """Start, watch, restart and stop the workers (module docstring)."""

    def __init__(
        self,
        count: int,
        command: WorkerCommand,
        *,
        bind: str,
        port: int,
        plain_port: int | None = None,
        metrics: str | None = None,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        self.count = count
        self.command = command
        self.bind = bind
        self.port = port
        self.plain_port = plain_port
        self.metrics = metrics
        self.out = out
        self.err = err
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.workers = [_Worker(i) for i in range(count)]
        self._stopping = asyncio.Event()
        self._claim: socket.socket | None = None

    # --- metrics: each worker on its own port -----------------------------------------

    def metrics_for(self, index: int) -> str | None:
        """Worker `index`'s metrics address: HOST:PORT+index (port 0: each its own)."""
        if self.metrics is None:
            return None
        host, _, port = self.metrics.rpartition(":")
        n = int(port)
        return f"{host}:{n + index if n else 0}"

    # --- one worker -------------------------------------------------------------------

    async def _spawn(self, w: _Worker) -> None:
        argv = self.command(w.index, self.port, self.plain_port, self.metrics_for(w.index))
        loop = asyncio.get_running_loop()
        w.listening = loop.create_future()
        w.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,  # relayed: its log lines name it
            start_new_session=True,
            preexec_fn=_die_with_parent,
            limit=_LINE_LIMIT,
        )
        w.started = time.monotonic()
        w.error = None
        w.reader = asyncio.create_task(self._read(w, w.proc, w.listening))
        w.relay = asyncio.create_task(self._relay(w, w.proc))
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    async def _read(
        self,
        w: _Worker,
        proc: asyncio.subprocess.Process,
        listening: asyncio.Future[tuple[int, int | None]],
    ) -> None:
        """Follow a worker's stdout: learn its ports, pass its metrics line on."""
        assert proc.stdout is not None
        plain: int | None = None
        while raw := await _line(proc.stdout):
            line = raw.decode(errors="replace").rstrip("\n")
            if m := _PLAIN.match(line):
                plain = int(m.group(2))
            elif m := _LISTENING.match(line):
                if not listening.done():
                    listening.set_result((int(m.group(2)), plain))
            elif line.startswith("metrics on "):
                print(f"worker {w.index}: {line}", file=self.out, flush=True)
        if not listening.done():
            listening.set_exception(WorkerError(f"worker {w.index} exited before listening"))

    async def _relay(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        """Pass a worker's stderr (its log) on to ours, line by line; keep its one-line
        error for the parent's own (so a worker's "port in use" is what the operator
        reads last, once)."""
        assert proc.stderr is not None
        while raw := await _line(proc.stderr):
            line = raw.decode(errors="replace").rstrip("\n")
            if m := _ERROR.match(line):
                w.error = m.group(1)
                continue
            print(line, file=self.err, flush=True)

    async def _until_listening(self, w: _Worker) -> tuple[int, int | None]:
        assert w.listening is not None and w.proc is not None
        try:
            async with asyncio.timeout(self.start_timeout):
                return await asyncio.shield(w.listening)
        except TimeoutError:
            raise WorkerError(
                f"worker {w.index} did not start within {self.start_timeout:.0f} s"
            ) from None
        except WorkerError:
            code = await w.proc.wait()
            await self._reap(w)
            if w.error:
                raise WorkerError(w.error) from None
            raise WorkerError(f"worker {w.index} did not start ({_how(code)})") from None

    async def _reap(self, w: _Worker) -> None:
        for task in (w.reader, w.relay):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        w.reader = w.relay = None

    # --- the whole set ----------------------------------------------------------------

    async def run(self) -> int:
        """Start every worker, keep them running until SIGTERM/SIGINT; exit code 0."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stopping.set)
        try:
            await self._start_all()
            pids = " ".join(f"{w.index}:{w.proc.pid}" for w in self.workers if w.proc)
            log.info("%d workers on port %d (worker:pid %s)", self.count, self.port, pids)
            host = f"[{self.bind}]" if ":" in self.bind else self.bind
            print(f"workers: {self.count} (worker:pid {pids})", file=self.out, flush=True)
            print(f"listening on coaps://{host}:{self.port}", file=self.out, flush=True)
            await self._supervise()
            log.info("shutting down %d workers", self.count)
        finally:
            await self._stop_all()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            if self._claim is not None:
                self._claim.close()
        print("stopped", file=self.out, flush=True)
        return 0

    async def _start_all(self) -> None:
        if self.port:
            self._claim = claim_address(self.bind, self.port)
            # Taken by a server without SO_REUSEPORT: the operator's one-line error
            # (`cli/server_cmds.py` `_serve_failure`), before any worker starts.
            probe_bind(self.bind, self.port)
            if self.plain_port:
                probe_bind(self.bind, self.plain_port)
        first = self.workers[0]
        await self._spawn(first)
        self.port, plain = await self._until_listening(first)
        if self.plain_port is None and plain is not None:
            self.plain_port = plain
        if self._claim is None:
            self._claim = claim_address(self.bind, self.port)
        rest = self.workers[1:]
        for w in rest:
            await self._spawn(w)
        await asyncio.gather(*(self._until_listening(w) for w in rest))

    async def _supervise(self) -> None:
        """Wait for the stop signal; meanwhile each worker has a keeper restarting it."""
        keepers = [asyncio.create_task(self._keep(w)) for w in self.workers]
        try:
            await self._stopping.wait()
        finally:
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)

    async def _keep(self, w: _Worker) -> None:
        """Restart worker `w` whenever it exits (only the parent stops workers)."""
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            await self._reap(w)
            lived = time.monotonic() - w.started
            while True:
                delay = w.backoff.next(lived)
                log.warning(
                    "worker %d (pid %d) exited (%s) after %.1f s; restarting it in %.1f s",
                    w.index,
                    w.proc.pid,
                    _how(code),
                    lived,
                    delay,
                )
                await asyncio.sleep(delay)
                await self._spawn(w)
                try:
                    await self._until_listening(w)
                    break
                except WorkerError as exc:
                    log.warning("%s", exc)
                    _signal(w.proc, signal.SIGKILL)
                    code = await w.proc.wait()
                    await self._reap(w)
                    lived = time.monotonic() - w.started
            w.restarts += 1
            log.info("worker %d restarted (pid %d)", w.index, w.proc.pid)
            print(f"worker {w.index} restarted (pid {w.proc.pid})", file=self.out, flush=True)

    async def _stop_all(self) -> None:
        live = [w for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for w in live:
            assert w.proc is not None
            _signal(w.proc, signal.SIGTERM)
        for w in live:
            assert w.proc is not None
            try:
                async with asyncio.timeout(self.stop_timeout):
                    await w.proc.wait()
            except TimeoutError:
                log.warning("worker %d did not stop; killing it", w.index)
                _signal(w.proc, signal.SIGKILL)
                await w.proc.wait()
        for w in self.workers:
            await self._reap(w)


async def _line(stream: asyncio.StreamReader) -> bytes:
    """The next line (b"" at the end); a line beyond _LINE_LIMIT is cut, not fatal."""
    try:
        return await stream.readline()
    except ValueError:  # asyncio.LimitOverrunError: the buffer was dropped
        return b"(a log line too long to relay)\n"


def _signal(proc: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


def _how(code: int) -> str:
    """How a process ended, in words ("killed by SIGKILL", "exit code 1")."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
