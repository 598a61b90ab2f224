"""The servers a bench compares, started the same way for every bench, plus the
measurements taken of them (CPU from /proc, RSS) and the lean load generator driver.

Targets:
- `otacoap`: `otacoap serve` on the bench data dir (DTLS; plain CoAP through
  --insecure-plain-coap --insecure-plain-identity, every request acting as one device).
- `stock`: bench/stock_aiocoap_server.py, stock aiocoap block-wise serving the same
  image (tinydtls_server for DTLS, udp6 for plain CoAP).
- `libcoap`: Debian's `coap-server-openssl` (C, OpenSSL DTLS), the image PUT into a
  dynamic resource (`-d`) with Block1 by `coap-client-openssl`, then served by libcoap's
  own Block2 handling. One PSK (`-k`) for any identity, so clients use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .common import PYTHON, ROOT, free_udp_port, rss_kib, running
from .fixture import Fixture

LIBCOAP_SERVER = "coap-server-openssl"
LIBCOAP_CLIENT = "coap-client-openssl"
LIBCOAP_KEY = b"bench-libcoap-k1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# `otacoap` from this checkout (not whichever one the venv's console script was
# installed from, e.g. another worktree's): run from ROOT with ROOT on the path.
OTACOAP = [PYTHON, "-c", "import sys; from otacoap.cli import main; sys.exit(main())"]
OTACOAP_ENV = {"PYTHONPATH": str(ROOT)}
# otacoap-sw: otacoap with tinydtls's table AES instead of the CPU's AES instructions
# (scripts/dtlssocket_build.sh), the in-run baseline for what the instructions save.
TARGETS = ("otacoap", "otacoap-sw", "stock", "libcoap")
SOFTWARE_AES_ENV = {"OTACOAP_TINYDTLS_AESNI": "0"}
TRANSPORTS = ("dtls", "plain")
LOADGENS = {"lean": "bench.leanload", "aiocoap": "bench.aiocoapload"}


@dataclass(frozen=True)
class Running:
    """A started target: where to send requests and whom to measure."""

    target: str
    transport: str
    pid: int
    port: int
    path: str
    devices: tuple[tuple[str, bytes], ...]  # (identity, psk) per client slot


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc/PID/task/TID/children): a server's worker
    processes, for `otacoap serve --workers N`."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants (a parent and its workers)."""
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):  # a worker that just exited
            total += cpu_seconds(p)
    return total


def workers_available() -> bool:
    """Whether this `otacoap serve` has `--workers` (issue 14 §2)."""
    r = subprocess.run(
        [*OTACOAP, "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **OTACOAP_ENV},
    )
    return "--workers" in r.stdout


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), for telling how
    much of a window went to neither the server nor the load generator."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (at most `max_wait` s) until the machine is idle: less than `threshold` of
    one core busy over a second. On a shared machine another job's CPU would count
    against whichever process it displaces. Returns the last busy fraction seen."""
    end = time.monotonic() + max_wait
    while True:
        b0 = machine_busy_seconds()
        time.sleep(1.0)
        busy = machine_busy_seconds() - b0
        if busy < threshold or time.monotonic() >= end:
            return busy


def libcoap_available() -> bool:
    return shutil.which(LIBCOAP_SERVER) is not None and shutil.which(LIBCOAP_CLIENT) is not None


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiocoap.meta

    return (
        f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, aiocoap {aiocoap.meta.version}"
    )


@contextlib.contextmanager
def start(
    target: str, transport: str, fx: Fixture, loop: str = "uvloop", workers: int = 0
) -> Iterator[Running]:
    """Start one target serving the fixture's image; stop it afterwards. `workers`
    (otacoap only): `serve --workers N`, N processes on the one port."""
    port = free_udp_port()
    devices = tuple((d.identity, d.psk) for d in fx.devices)
    if target in ("otacoap", "otacoap-sw"):
        env = {**OTACOAP_ENV, **(SOFTWARE_AES_ENV if target == "otacoap-sw" else {})}
        cmd = [*OTACOAP, "serve", "--data", str(fx.data), "--bind", "127.0.0.1"]
        cmd += ["--port", str(port), "--loop", loop]
        # With workers the parent's "workers: N (worker:pid ...)" line comes once all
        # of them listen. Not just "workers: ": the supervisor's first log line
        # ("otacoap.server.workers: worker 0 started") holds that too, and waiting for
        # it started the load (and read the process tree) before the other workers ran.
        ready = "listening on"
        if workers:
            cmd += ["--workers", str(workers)]
            ready = f"workers: {workers} (worker:pid"
        else:
            cmd += ["--workers", "1"]  # one process: CPU and RSS read by its pid
        if transport == "plain":
            plain = free_udp_port()
            ident = fx.devices[0].identity
            cmd += ["--insecure-plain-coap", "--plain-port", str(plain)]
            cmd += ["--insecure-plain-identity", ident]
            port = plain
        with running(cmd, env=env, ready_text=ready) as proc:
            yield Running(target, transport, proc.pid, port, fx.image_path, devices)
    elif target == "stock":
        cmd = [PYTHON, "-m", "bench.stock_aiocoap_server", "--port", str(port)]
        cmd += ["--image", str(fx.image), "--devices", str(fx.devices_json), "--loop", loop]
        if transport == "plain":
            cmd.append("--plain")
        with running(cmd, ready_text="ready") as proc:
            yield Running(target, transport, proc.pid, port, "fw/image", devices)
    elif target == "libcoap":
        # libcoap listens for plain CoAP on -p and DTLS on -p + 1.
        base = port
        cmd = [LIBCOAP_SERVER, "-v", "0", "-A", "127.0.0.1", "-p", str(base)]
        cmd += ["-k", LIBCOAP_KEY.decode(), "-d", "4"]
        with running(cmd) as proc:
            _libcoap_put(base, fx)
            lib_devices = tuple((ident, LIBCOAP_KEY) for ident, _ in devices)
            yield Running(
                target,
                transport,
                proc.pid,
                base + (1 if transport == "dtls" else 0),
                "fw/image",
                lib_devices,
            )
    else:
        raise ValueError(target)


def _libcoap_put(port: int, fx: Fixture) -> None:
    uri = f"coap://127.0.0.1:{port}/fw/image"
    for _ in range(20):
        r = subprocess.run(
            [LIBCOAP_CLIENT, "-m", "put", "-b", "1024", "-f", str(fx.image), uri],
            capture_output=True,
            timeout=30,
        )
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"could not PUT the image into libcoap: {r.stderr!r}")


@dataclass(frozen=True)
class LoadResult:
    responses: int
    errors: int
    seconds: float
    loadgen_cpu: float
    server_cpu: float
    handshakes: int
    connected: int
    machine_cpu: float = 0.0  # all cores, all processes, kernel included

    @property
    def rest_cpu(self) -> float:
        """Everything else: other processes, and kernel work charged to no process."""
        return max(0.0, self.machine_cpu - self.server_cpu - self.loadgen_cpu)

    @property
    def rate(self) -> float:
        return self.responses / self.seconds if self.seconds else 0.0


def spawn_load(
    srv: Running,
    fx: Fixture,
    *,
    clients: int,
    start_at: float,
    end_at: float,
    processes: int = 1,
    window: int = 1,
    szx: int = 6,
    loadgen: str = "lean",
) -> list[subprocess.Popen[str]]:
    """Start the load generator children: bench/leanload.py, or bench/aiocoapload.py
    (`loadgen="aiocoap"`, the aiocoap client, to show where it saturates)."""
    if clients > len(srv.devices):
        raise ValueError(f"only {len(srv.devices)} devices in the fixture")
    block = 16 << szx
    base_spec: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": srv.port,
        "secure": srv.transport == "dtls",
        "path": srv.path,
        "szx": szx,
        "blocks": -(-fx.size // block),
        "window": window,
        "image": str(fx.image),
        "start_at": start_at,
        "end_at": end_at,
    }
    slots = [[ident, psk.hex()] for ident, psk in srv.devices[:clients]]
    procs = []
    for i in range(processes):
        share = slots[i::processes]
        if share:
            spec = {**base_spec, "devices": share}
            procs.append(
                subprocess.Popen(
                    [PYTHON, "-m", LOADGENS[loadgen], json.dumps(spec)],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
    return procs


def collect(procs: Sequence[subprocess.Popen[str]], timeout: float) -> dict[str, float]:
    total: dict[str, float] = {}
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        lines = out.strip().splitlines()
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"load generator failed ({p.returncode})")
        r = json.loads(lines[-1])
        for k, v in r.items():
            total[k] = max(total.get(k, 0.0), v) if k == "seconds" else total.get(k, 0.0) + v
    return total


def measure(
    srv: Running,
    fx: Fixture,
    *,
    clients: int,
    seconds: float,
    warmup: float,
    processes: int = 1,
    window: int = 1,
    loadgen: str = "lean",
    quiet_wait: float = 0.0,
) -> LoadResult:
    """Load `srv` for warmup + seconds; count and take CPU over the last `seconds`."""
    if quiet_wait > 0:
        busy = wait_quiet(quiet_wait)
        if busy >= 0.15:
            print(f"  (machine still {100 * busy:.0f} % busy after {quiet_wait:g} s: measuring)")
    startup = 1.0  # interpreter start and DTLS handshakes happen before the warm-up ends
    start_at = time.time() + startup + warmup
    end_at = start_at + seconds
    procs = spawn_load(
        srv,
        fx,
        clients=clients,
        start_at=start_at,
        end_at=end_at,
        processes=processes,
        window=window,
        loadgen=loadgen,
    )
    time.sleep(max(0.0, start_at - time.time()))
    c0, m0 = tree_cpu_seconds(srv.pid), machine_busy_seconds()
    time.sleep(max(0.0, end_at - time.time()))
    c1, m1 = tree_cpu_seconds(srv.pid), machine_busy_seconds()
    r = collect(procs, timeout=seconds + warmup + 60)
    return LoadResult(
        responses=int(r["responses"]),
        errors=int(r["errors"]),
        seconds=r["seconds"],
        loadgen_cpu=r["cpu"],
        server_cpu=c1 - c0,
        handshakes=int(r["handshakes"]),
        connected=int(r["connected"]),
        machine_cpu=m1 - m0,
    )


def rss_mib(pid: int) -> float:
    """RSS of the largest process of the server (with workers: the largest worker)."""
    sizes = []
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            sizes.append(rss_kib(p))
    return max(sizes, default=0) / 1024
