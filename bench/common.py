"""Shared bench plumbing: free ports, waiting for a server, a CoAP/DTLS Block2 load generator.

Benchmarks print ratios against a baseline measured in the same run (never absolute
pass/fail); each target runs in its own process so the load generator and the server
compete for the same two cores the same way for every target.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
OTACOAP = str(Path(sys.executable).parent / "otacoap")


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class Device:
    identity: str
    psk: bytes


async def _client(
    uri: str,
    dev: Device,
    path: str,
    blocks: int,
    szx: int,
    deadline: float,
    counts: list[int],
    errors: list[int],
) -> None:
    import aiocoap
    from aiocoap import GET, Message

    ctx = await aiocoap.Context.create_client_context()
    ctx.client_credentials.load_from_dict(
        {
            f"{uri}/*": {
                "dtls": {"psk": {"hex": dev.psk.hex()}, "client-identity": {"ascii": dev.identity}}
            }
        }
    )
    num = 0
    try:
        while time.monotonic() < deadline:
            msg = Message(code=GET, uri=f"{uri}/{path}", block2=(num, 0, szx))
            try:
                resp = await asyncio.wait_for(
                    ctx.request(msg, handle_blockwise=False).response, timeout=10
                )
            except (TimeoutError, aiocoap.error.Error):
                errors[0] += 1
                continue
            if resp.code.is_successful():
                counts[0] += 1
            else:
                errors[0] += 1
            num = (num + 1) % blocks
    finally:
        await ctx.shutdown()


async def _load(
    uri: str,
    devices: Sequence[Device],
    path: str,
    blocks: int,
    szx: int,
    seconds: float,
    warmup: float,
) -> dict[str, float]:
    counts, errors = [0], [0]
    start = time.monotonic()
    deadline = start + warmup + seconds
    tasks = [
        asyncio.create_task(_client(uri, d, path, blocks, szx, deadline, counts, errors))
        for d in devices
    ]
    await asyncio.sleep(warmup)
    base, t0 = counts[0], time.monotonic()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - t0
    return {"responses": counts[0] - base, "seconds": elapsed, "errors": errors[0]}


def load_main() -> None:
    """Entry for a load-generator child process: args as one JSON object on argv[2]."""
    spec = json.loads(sys.argv[2])
    devices = [Device(d["identity"], bytes.fromhex(d["psk"])) for d in spec["devices"]]
    result = asyncio.run(
        _load(
            spec["uri"],
            devices,
            spec["path"],
            spec["blocks"],
            spec["szx"],
            spec["seconds"],
            spec["warmup"],
        )
    )
    print(json.dumps(result), flush=True)


def run_load(
    uri: str,
    devices: Sequence[Device],
    path: str,
    blocks: int,
    *,
    szx: int = 6,
    seconds: float = 10.0,
    warmup: float = 2.0,
    processes: int = 1,
) -> dict[str, float]:
    """Run the Block2 load from `processes` child processes; sum their counts."""
    shares = [list(devices[i::processes]) for i in range(processes)]
    procs = []
    for share in shares:
        if not share:
            continue
        spec = {
            "uri": uri,
            "path": path,
            "blocks": blocks,
            "szx": szx,
            "seconds": seconds,
            "warmup": warmup,
            "devices": [{"identity": d.identity, "psk": d.psk.hex()} for d in share],
        }
        procs.append(
            subprocess.Popen(
                [PYTHON, "-m", "bench.common", "load", json.dumps(spec)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    total = {"responses": 0.0, "seconds": 0.0, "errors": 0.0}
    for p in procs:
        out, _ = p.communicate(timeout=seconds + warmup + 120)
        r = json.loads(out.strip().splitlines()[-1])
        total["responses"] += r["responses"]
        total["errors"] += r["errors"]
        total["seconds"] = max(total["seconds"], r["seconds"])
    total["rate"] = total["responses"] / total["seconds"] if total["seconds"] else 0.0
    return total


def wait_udp_ready(check: subprocess.Popen[bytes] | subprocess.Popen[str], seconds: float) -> None:
    """Give a server subprocess a moment; fail early if it died."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check.poll() is not None:
            raise RuntimeError(f"server exited early with {check.returncode}")
        time.sleep(0.1)


@contextlib.contextmanager
def running(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    ready_text: str | None = None,
    timeout: float = 20,
) -> Iterator[subprocess.Popen[str]]:
    """Start a server process, wait for `ready_text` on its output, stop it afterwards."""
    proc = subprocess.Popen(
        list(cmd),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        if ready_text is not None:
            end = time.monotonic() + timeout
            assert proc.stdout is not None
            while time.monotonic() < end:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"{cmd[0]} exited before it was ready")
                if ready_text in line:
                    break
            else:
                raise RuntimeError(f"{cmd[0]} not ready after {timeout} s")
            # Keep draining output so the server never blocks on a full pipe.
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        else:
            wait_udp_ready(proc, 2.0)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "load":
    load_main()


class ForwardingTransport:
    """A device transport (device_sim.transport.Transport) that hands everything to
    `inner`; a bench subclasses it to time or disturb `get` alone.

    No `get_nonconfirmable` here: the windowed fetcher uses NON requests only where
    the transport offers them, so a subclass offers it only if its inner one does.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def base_uri(self) -> str:
        return str(self.inner.base_uri)

    async def get(self, path: str, *, block2: tuple[int, int, int] | None, timeout: float) -> Any:
        return await self.inner.get(path, block2=block2, timeout=timeout)

    async def post(self, path: str, payload: bytes, *, content_format: int, timeout: float) -> Any:
        return await self.inner.post(path, payload, content_format=content_format, timeout=timeout)

    async def observe(self, path: str) -> AsyncIterator[Any]:
        async for note in self.inner.observe(path):
            yield note

    async def reset(self) -> None:
        await self.inner.reset()

    async def close(self) -> None:
        await self.inner.close()
