"""Where the workers run: in this process (one worker), or one process each.

Worker processes are spawned (a fresh interpreter: no event loop, socket or lock
inherited from the parent), provision their devices' flash files in parallel, say
"ready", and start together on "go" with the parent's time axis (CLOCK_MONOTONIC is
system-wide on Linux), so every device's completion time is comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import time
from collections.abc import Callable
from typing import Any

from otacoap import eventloop

from .options import FleetError
from .progress import Progress
from .runtime import quiet_aiocoap, sigterm_cleans_up
from .worker import GRACE, WorkerJob, WorkerResult, provision_worker, run_worker

# Provisioning and start-up of a worker process are bounded too.
PROVISION_SECONDS_PER_DEVICE = 0.05
PROVISION_SECONDS_BASE = 60.0


def _worker_process(job: WorkerJob, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process: provision, say ready, wait for go, run, reply."""
    logging.basicConfig(level=logging.WARNING)
    quiet_aiocoap(0)
    sigterm_cleans_up()
    # Ctrl-C is the parent's to handle: it stops the workers (SIGTERM) and collects
    # what they had done for its partial report.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    partial: list[Any] = []
    try:
        provision_worker(job)
        conn.send(("ready", None))
        msg = conn.recv()
        if msg[0] != "go":
            return
        _, t0, deadline = msg

        def progress(index: int, snap: tuple[int, int, int, int]) -> None:
            conn.send(("progress", snap))

        result = eventloop.run(_stoppable(job, t0, deadline, progress, partial))
        # None: stopped by the parent (Ctrl-C there): say what was done so far.
        conn.send(("result", result) if result is not None else ("partial", partial))
    except KeyboardInterrupt:  # SIGTERM before the run: nothing done yet
        with contextlib.suppress(Exception):
            conn.send(("partial", partial))
    except BaseException as exc:  # report, then die: the parent decides what happens
        with contextlib.suppress(Exception):
            conn.send(("error", f"worker {job.index}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


async def _stoppable(
    job: WorkerJob, t0: float, deadline: float, progress: Any, partial: list[Any]
) -> WorkerResult | None:
    """run_worker, which a SIGTERM cancels like any task (None) instead of raising
    KeyboardInterrupt wherever the loop happens to be, inside aiocoap's tasks too."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    stopped = False

    def stop() -> None:
        nonlocal stopped
        stopped = True
        me.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        return await run_worker(job, t0, deadline, progress, partial)
    except asyncio.CancelledError:
        if stopped:
            return None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def run_inprocess(
    job: WorkerJob,
    deadline_s: float,
    progress: Progress,
    on_start: Callable[[float], None] | None = None,
    sink: list[Any] | None = None,
) -> tuple[float, WorkerResult]:
    """`on_start(t0)` runs once the flash files exist, right before the devices start
    (the campaign is created then); `sink` receives the outcome objects as they are
    made, so a Ctrl-C can still report on them."""
    provision_worker(job)
    progress.phase(f"running {len(job.devices)} devices, {job.concurrency} at once")
    progress.start()
    t0 = time.monotonic()
    if on_start is not None:
        on_start(t0)
    result = eventloop.run(run_worker(job, t0, t0 + deadline_s, progress.update, sink))
    return t0, result


def run_processes(
    jobs: list[WorkerJob],
    deadline_s: float,
    progress: Progress,
    on_start: Callable[[float], None] | None = None,
    sink: list[Any] | None = None,
) -> tuple[float, list[WorkerResult]]:
    """One process per job. Workers provision in parallel, start together on "go".

    On Ctrl-C the workers are stopped (SIGTERM) and the outcomes they send back go to
    `sink` before KeyboardInterrupt propagates (the caller's partial report)."""
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
        if on_start is not None:
            on_start(t0)
        deadline = t0 + deadline_s
        for conn in conns:
            conn.send(("go", t0, deadline))
        results: dict[int, WorkerResult] = {}
        try:
            _collect(conns, results, deadline, progress)
        except KeyboardInterrupt:
            _stop_and_gather(procs, conns, results, sink)
            raise
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


PARTIAL_SECONDS = 15.0  # how long a stopped worker may take to send its outcomes


def _stop_and_gather(
    procs: list[Any],
    conns: list[multiprocessing.connection.Connection],
    results: dict[int, WorkerResult],
    sink: list[Any] | None,
) -> None:
    """Ctrl-C: SIGTERM each running worker and gather its outcomes so far."""
    for i, proc in enumerate(procs):
        if i in results and sink is not None:
            sink.extend(results[i].outcomes)
        elif proc.is_alive():
            proc.terminate()
    limit = time.monotonic() + PARTIAL_SECONDS
    live = {i for i in range(len(procs)) if i not in results}
    while live and time.monotonic() < limit:
        ready = multiprocessing.connection.wait([conns[i] for i in live], 0.5)
        for conn in ready:
            i = conns.index(conn)  # type: ignore[arg-type]
            try:
                kind, body = conns[i].recv()
            except (EOFError, OSError):
                live.discard(i)
                continue
            if kind == "partial" and sink is not None:
                sink.extend(body)
            elif kind == "result" and sink is not None:
                sink.extend(body.outcomes)
            if kind in ("partial", "result", "error"):
                live.discard(i)


def _collect(
    conns: list[multiprocessing.connection.Connection],
    results: dict[int, WorkerResult],
    deadline: float,
    progress: Progress,
) -> None:
    """Wait for every worker's result, showing their progress."""
    while len(results) < len(conns):
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


def _recv(conn: Any, index: int) -> tuple[str, Any]:
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        raise FleetError(f"worker process {index} died") from None
    return msg
