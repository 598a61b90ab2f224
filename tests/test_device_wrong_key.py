"""A device whose identity or PSK the server does not accept says so (issue 12 §2).

tinydtls' server drops a client Finished it cannot verify without an alert, so the
client sees only silence. Before, the device retried until its slow-retrieval watchdog
fired and reported "slow retrieval: 0 B/s" after 33 s; now a second session failing its
handshake ends the attempt with "DTLS handshake failed: check ... identity and key".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from evil_server import EvilServer, make_rig

from device_sim.agent import AgentConfig, DeviceAgent, Outcome

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]


def test_a_wrong_psk_is_reported_as_a_failed_handshake_not_a_slow_link(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, psk=bytes(range(16)))  # the server knows another key

    async def go() -> None:
        async with EvilServer() as server:
            device = DeviceAgent(rig.path, server.base_uri, config=AgentConfig())
            started = time.monotonic()
            try:
                result = await asyncio.wait_for(device.run_once(), 100)
            finally:
                await device.close()
            assert result.outcome == Outcome.UNREACHABLE, result
            assert result.detail.startswith("DTLS handshake failed"), result.detail
            assert "identity and key" in result.detail
            # Before the slow-retrieval watchdog's 30 s window could end it.
            assert time.monotonic() - started < 30

    asyncio.run(go())
