"""The agent holds a block or two, whatever the image size (ATTACKS.md O4, #12).

tracemalloc peak of one whole update (check, download, stage, reboot, trial boot,
confirm, reports), measured after power-on and after the aiocoap context and DTLS
session are up, must stay under 2 x block size + 64 KiB and must not grow with the
image: 1 MiB over real DTLS, 1 MiB and 16 MiB through the in-process transport.

Measurement hygiene, each for a reason:
* the DTLS server runs in a child process, so only the device's allocations count;
* the DTLS run uses uvloop (as the CLI does): asyncio's selector transport calls
  recvfrom with a 256 KiB Python buffer for every datagram, which tracemalloc would
  report as a 256 KiB transient that has nothing to do with the agent;
* CPython's free lists are filled before tracing starts: memory parked on a free list
  stays attributed to its first allocation site, so a free list filling up during the
  run would look like growth.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import subprocess
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from evil_server import free_udp_port, make_rig, manifest_bytes, release, sign

from device_sim.agent import AgentConfig, DeviceAgent, Outcome
from device_sim.firmware import make_image
from device_sim.inprocess import GeneratedImage, InProcessServer, InProcessTransport
from otacoap.core import ids

BLOCK = 1024
BOUND = 2 * BLOCK + 64 * 1024
HERE = Path(__file__).resolve().parent


def _fill_free_lists() -> None:
    junk = [tuple(range(n)) for n in range(1, 20) for _ in range(2100)]
    junk.clear()


async def _measure(device: DeviceAgent, warm_up: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
    device.power_on()
    await warm_up()  # the aiocoap context and the DTLS session are up from here
    gc.collect()
    _fill_free_lists()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = await device.run_once()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, result


def _inprocess_peak(tmp: Path, size: int) -> int:
    rig = make_rig(tmp, slot_size=size + 4096)
    image = GeneratedImage(size, seed=size)
    server = InProcessServer(
        envelope=sign(manifest_bytes(digest=image.digest, size=size, seq=6), rig.key)
    )
    server.add_image(ids.image_uri(image.digest), image)
    device = DeviceAgent(rig.path, "coaps://in-process", transport=InProcessTransport(server))

    async def go() -> int:
        try:
            peak, result = await _measure(device, lambda: asyncio.sleep(0))
        finally:
            await device.close()
        assert result.outcome == Outcome.UPDATED, result
        return peak

    peak = asyncio.run(go())
    assert rig.boots()[1] == image.digest
    return peak


@pytest.mark.slow
def test_memory_does_not_grow_with_the_image_in_process(tmp_path: Path) -> None:
    small = _inprocess_peak(tmp_path / "a", 1 << 20)
    large = _inprocess_peak(tmp_path / "b", 16 << 20)
    print(f"\nin-process tracemalloc peak: 1 MiB {small} B, 16 MiB {large} B (bound {BOUND} B)")
    assert small < BOUND and large < BOUND
    assert large - small < 8 * 1024, "peak must not grow with the image size"


@pytest.mark.network
@pytest.mark.timeout(120)
def test_memory_over_dtls_1mib(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, slot_size=(1 << 20) + 4096)
    image = make_image(1 << 20, version=6)
    envelope, _ = release(rig.key, image, 6)
    (tmp_path / "env").write_bytes(envelope)
    (tmp_path / "img").write_bytes(image)
    port = free_udp_port()
    path = ids.image_uri(hashlib.sha256(image).digest())
    server = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "evil_server.py"),
            str(port),
            str(tmp_path / "env"),
            f"{path}={tmp_path / 'img'}",
        ],
        stdout=subprocess.PIPE,
        cwd=HERE.parent,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == b"ready"
        device = DeviceAgent(rig.path, f"coaps://127.0.0.1:{port}", config=AgentConfig())

        async def go() -> tuple[int, Any]:
            try:

                async def warm_up() -> None:
                    assert device.agent is not None
                    await device.agent.fetch_envelope()

                return await _measure(device, warm_up)
            finally:
                await device.close()

        peak, result = uvloop.run(go())
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"\nDTLS 1 MiB tracemalloc peak: {peak} B (bound {BOUND} B)")
    assert result.outcome == Outcome.UPDATED, result
    assert rig.boots()[1] == hashlib.sha256(image).digest()
    assert peak < BOUND
