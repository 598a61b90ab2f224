"""The update agent over real CoAP/DTLS-PSK on loopback, against the H1 server.

What these show: the agent asks for every block itself (explicit Block2, no automatic
assembly), adapts to a server that lowers the block size, resumes an interrupted
download from its last durable checkpoint (re-hashing the flash prefix), keeps reports
in flash while /r is unreachable and sends them later in counter order, enforces the
slow-retrieval watchdog and the overall deadline (ATTACKS.md #14), survives a server
restart mid-transfer (new DTLS session), and updates when a release appears in --watch
mode.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from evil_server import (
    FAST,
    EvilServer,
    Rig,
    Script,
    at_block,
    honest_block,
    make_rig,
    release,
    run_device,
    stall_from,
)

from device_sim.agent import AgentConfig, DeviceAgent, Outcome
from device_sim.fetcher import FetchConfig
from device_sim.firmware import make_image
from otacoap.core import blockwise, ids
from otacoap.core.check_pacing import PacingConfig
from otacoap.core.errors import ReportReason

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout)

    asyncio.run(bounded())


def publish(rig: Rig, server: EvilServer, size: int, seq: int) -> bytes:
    image = make_image(size, version=seq, seed=seq)
    envelope, _ = release(rig.key, image, seq)
    server.script.envelope = envelope
    server.script.images[ids.image_uri(hashlib.sha256(image).digest())] = image
    return image


def test_update_over_dtls_with_explicit_block2(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)

    async def go() -> None:
        async with EvilServer() as server:
            image = publish(rig, server, 20_000, 6)
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome == Outcome.UPDATED, result
            assert result.sequence_number == 6
            blocks = server.block_log()
            n = blockwise.block_count(len(image), 6)
            assert blocks == [(i, 6) for i in range(n)], "each block asked for once, in order"
            assert server.states() == [
                "downloading",
                "downloaded",
                "installing",
                "installed",
                "confirmed",
            ]
            assert all(r.ok for r in server.reports)
            assert server.reports[0].bytes_received == 0
            assert server.reports[1].bytes_received == len(image)
            counters = [r.counter for r in server.reports]
            assert counters == sorted(counters) and len(set(counters)) == len(counters)
            assert rig.boots() == (1, hashlib.sha256(image).digest())

    run(go)


def test_server_lowering_the_block_size_is_followed(tmp_path: Path) -> None:
    """RFC 7959 §2.3: the server may answer with a smaller SZX; NUM is recomputed."""
    rig = make_rig(tmp_path, seq=5)

    def small(image: bytes, num: int, szx: int) -> tuple[bytes, tuple[int, bool, int] | None]:
        return honest_block(image, num, min(szx, 4))

    async def go() -> None:
        async with EvilServer(script=Script(block=small)) as server:
            image = publish(rig, server, 5_000, 6)
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome == Outcome.UPDATED, result
            log = server.block_log()
            assert log[0] == (0, 6) and all(szx == 4 for _, szx in log[1:])
            assert len(log) == blockwise.block_count(len(image), 4)

    run(go)


def test_interrupted_download_resumes_from_the_durable_checkpoint(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    config = replace(FAST, checkpoint_bytes=8 * 1024)

    async def go() -> None:
        async with EvilServer(script=Script(block=stall_from(21))) as server:
            image = publish(rig, server, 40_000, 6)
            first, _ = await run_device(rig, server.base_uri, config=config)
            assert first.outcome == Outcome.FAILED
            assert first.reason == ReportReason.OPERATION_FAILED
            partial = rig.info()["download"]
            assert partial is not None and partial["bytes"] == 16 * 1024
            failed = server.reports[-1]
            assert failed.state.value == "failed" and "no answer" in failed.detail
            server.log.clear()
            server.script.block = honest_block
            second, _ = await run_device(rig, server.base_uri, config=config)
            assert second.outcome == Outcome.UPDATED, second
            nums = [num for num, _ in server.block_log()]
            assert nums[0] == 16, "resumed at the checkpoint, not at block 0"
            assert nums == list(range(16, blockwise.block_count(len(image), 6)))
            resume = [r for r in server.reports if r.state.value == "downloading"][-1]
            assert resume.bytes_received == 16 * 1024
            assert rig.boots() == (1, hashlib.sha256(image).digest())

    run(go)


def test_reports_wait_in_flash_while_the_server_cannot_take_them(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)

    async def go() -> None:
        async with EvilServer(script=Script(drop_reports=True)) as server:
            image = publish(rig, server, 6_000, 6)
            result, _ = await run_device(rig, server.base_uri)
            assert result.outcome == Outcome.UPDATED
            assert server.reports == []
            queued = rig.info()["queued_reports"]
            assert queued == 5, "downloading .. confirmed wait in the flash outbox"
            server.script.drop_reports = False
            server.script.envelope = None  # nothing new: just power on and flush
            again, _ = await run_device(rig, server.base_uri)
            assert again.outcome == Outcome.UP_TO_DATE
            assert server.states() == [
                "downloading",
                "downloaded",
                "installing",
                "installed",
                "confirmed",
            ]
            assert rig.info()["queued_reports"] == 0
            assert rig.boots()[1] == hashlib.sha256(image).digest()

    run(go)


def test_slow_retrieval_is_aborted_and_stays_resumable(tmp_path: Path) -> None:
    """ATTACKS.md #14: every block arrives, just too slowly; the watchdog aborts."""
    rig = make_rig(tmp_path, seq=5)
    fetch = replace(
        FAST.fetch, szx=4, watchdog_window=0.6, min_throughput=4096.0, request_timeout=2.0
    )
    config = replace(FAST, fetch=fetch, checkpoint_bytes=4096)

    async def go() -> None:
        async with EvilServer(script=Script(delay=0.1)) as server:
            publish(rig, server, 30_000, 6)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            result, _ = await run_device(rig, server.base_uri, config=config)
            assert loop.time() - t0 < 5.0
            assert result.outcome == Outcome.FAILED and "slow retrieval" in result.detail
            failed = server.reports[-1]
            assert failed.state.value == "failed" and "slow retrieval" in failed.detail
            assert failed.reason == ReportReason.OPERATION_FAILED
            assert rig.info()["download"] is not None, "partial download kept for a resume"
            assert rig.boots()[0] == 0

    run(go)


def test_overall_deadline(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    fetch = replace(FAST.fetch, deadline=0.8, min_throughput=0.0)
    config = replace(FAST, fetch=fetch)

    async def go() -> None:
        async with EvilServer(script=Script(delay=0.1)) as server:
            publish(rig, server, 30_000, 6)
            result, _ = await run_device(rig, server.base_uri, config=config)
            assert result.outcome == Outcome.FAILED and "deadline" in result.detail
            assert server.block_requests < 15

    run(go)


def test_server_restart_mid_transfer_needs_a_new_dtls_session(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    fetch = replace(FAST.fetch, attempts=12, request_timeout=0.4, backoff_max=0.4)
    config = AgentConfig(fetch=fetch, report_timeout=0.5)

    async def go() -> None:
        server = await EvilServer(script=Script(block=at_block(8, stall_from(0)))).start()
        image = publish(rig, server, 20_000, 6)
        script = server.script
        port = server.port

        async def restart() -> None:
            while len(server.block_log()) < 9:
                await asyncio.sleep(0.02)
            await server.stop()
            await asyncio.sleep(0.3)
            script.block = honest_block
            replacement = EvilServer(script=script)
            await replacement.start(port)
            holder.append(replacement)

        holder: list[EvilServer] = []
        task = asyncio.create_task(restart())
        try:
            result, _device = await run_device(rig, f"coaps://127.0.0.1:{port}", config=config)
            assert result.outcome == Outcome.UPDATED, result
            assert rig.boots()[1] == hashlib.sha256(image).digest()
            assert holder and holder[0].block_requests > 0
        finally:
            await task
            for s in holder:
                await s.stop()

    run(go)


def test_watch_updates_when_a_release_appears(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    config = replace(FAST, poll_interval=0.3, pacing=PacingConfig(min_gap=0.2, max_gap=1.0))

    async def go() -> None:
        async with EvilServer() as server:
            device = DeviceAgent(rig.path, server.base_uri, config=config)
            seen: list[Outcome] = []

            async def later() -> bytes:
                await asyncio.sleep(0.8)
                return publish(rig, server, 4_000, 6)

            task = asyncio.create_task(later())
            try:
                results = await device.watch(
                    max_time=3.0, on_result=lambda r: seen.append(r.outcome)
                )
            finally:
                await device.close()
            image = await task
            assert Outcome.UP_TO_DATE in seen and Outcome.UPDATED in seen
            assert results[-1].sequence_number == 6
            assert rig.boots()[1] == hashlib.sha256(image).digest()

    run(go)


def test_many_agents_in_one_event_loop(tmp_path: Path) -> None:
    """The fleet-simulator use: N DeviceAgents, one process, one loop, own DTLS each."""
    from otacoap.core import cose

    key = cose.generate_key("es256")
    psks = {f"dev-{i:03d}": bytes([i + 1]) * 16 for i in range(8)}
    rigs = [
        make_rig(tmp_path / name, seq=5, key=key, device_id=name, psk=psk)
        for name, psk in psks.items()
    ]

    async def go() -> None:
        async with EvilServer(psks=psks) as server:
            image = publish(rigs[0], server, 12_000, 6)
            devices = [DeviceAgent(r.path, server.base_uri, config=FAST) for r in rigs]
            try:
                results = await asyncio.gather(*(d.run_once() for d in devices))
            finally:
                await asyncio.gather(*(d.close() for d in devices))
            assert [r.outcome for r in results] == [Outcome.UPDATED] * len(rigs)
            confirmed = {
                w
                for w, r in zip(server.reporters, server.reports, strict=True)
                if r.state.value == "confirmed"
            }
            assert confirmed == set(psks), "each device reported under its own identity"
            for r in rigs:
                assert r.boots()[1] == hashlib.sha256(image).digest()

    run(go)


def test_fetch_config_validates() -> None:
    with pytest.raises(ValueError):
        FetchConfig(attempts=0)
    with pytest.raises(blockwise.BlockError):
        FetchConfig(szx=7)
