"""Where the workers run: in this process (one worker), or one process each.

Worker processes are spawned (a fresh interpreter: no event loop, socket or lock
inherited from the parent), provision their devices' flash files in parallel, say
"ready", and start together on "go" with the parent's time axis (CLOCK_MONOTONIC is
system-wide on Linux), so every device's completion time is comparable.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
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
    try:
        provision_worker(job)
        conn.send(("ready", None))
        msg = conn.recv()
        if msg[0] != "go":
            return
        _, t0, deadline = msg

        def progress(index: int, snap: tuple[int, int, int, int]) -> None:
            conn.send(("progress", snap))

        result = eventloop.run(run_worker(job, t0, deadline, progress))
        conn.send(("result", result))
    except BaseException as exc:  # report, then die: the parent decides what happens
        with contextlib.suppress(Exception):
            conn.send(("error", f"worker {job.index}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


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
        if on_start is not None:
            on_start(t0)
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
    return msg
