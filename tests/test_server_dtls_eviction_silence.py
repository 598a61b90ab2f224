"""An evicted DTLS peer hears nothing more from the server, however late its tinydtls
context is freed (otacoap/server/coap/dtls_pool.py `SessionAddress.evict`).

tinydtls sends a close_notify to every peer still in a context when the context is
freed, and a dropped peer's context is freed when the garbage collector breaks the
cycle between the address and its DTLSSocket: at some random later moment. A handshake
dropped for a wrong key then sometimes got a plaintext alert and sometimes none, which
made the "unknown identity and wrong key fail the same way" check (ATTACKS.md #30)
fail now and then. Here the server runs in this process with its socket's transport
replaced by a recorder, so the collection can be forced and every datagram seen.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import CLASS_A, DeviceSpec, make_setup  # noqa: E402

PSK = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
PEER = ("127.0.0.1", 40123)
DTLS_EVENT_CONNECTED = 0x01DE


class _Recorder:
    """The server socket's transport: keeps every datagram sent, and to whom."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append((bytes(data), addr))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 0) if name == "sockname" else default


async def _handshake_and_drop(data: Path, psk: bytes, established: bool) -> tuple[int, int]:
    """A handshake with `psk`; the server drops the peer (bad key, or an established
    session evicted). Returns (datagrams to the peer between drop and collection, those
    that were alerts at drop time)."""
    from DTLSSocket import dtls

    from otacoap.server import OtaServer, ServeOptions
    from otacoap.store import DataDir

    datadir = DataDir(data)
    server = OtaServer(datadir, datadir.config(), ServeOptions(bind="127.0.0.1", port=0))
    await server.start()
    try:
        assert server.dtls is not None
        pool: Any = server.dtls._pool
        real = pool._transport
        recorder = pool._transport = _Recorder()
        to_server: list[bytes] = []
        connected: list[bool] = []
        ident = b"silence-dev"
        client = dtls.DTLS(
            read=lambda sender, d: len(d),
            write=lambda recipient, d: to_server.append(bytes(d)) or len(d),
            event=lambda level, code: connected.append(code == DTLS_EVENT_CONNECTED),
            pskId=ident,
            pskStore={ident: psk},
        )
        conn = client.connect("::1", 1234)
        for _ in range(50):
            while to_server:
                pool.datagram_received(to_server.pop(0), PEER)
            while recorder.sent:
                client.handleMessage(conn, recorder.sent.pop(0)[0])
            if not to_server:
                break
            await asyncio.sleep(0)
        assert any(connected) is established
        if established:
            pool._drop(pool._connections[PEER], "full")
        assert PEER not in pool._connections  # dropped (bad key, or just now)
        at_drop = len(recorder.sent)
        del client, conn
        for _ in range(5):  # let the cancelled retransmission task let go of it
            await asyncio.sleep(0)
        gc.collect()
        later = [d for d, addr in recorder.sent[at_drop:] if addr == PEER]
        pool._transport = real
        return len(later), at_drop
    finally:
        await server.stop()


@pytest.mark.parametrize("established", [False, True], ids=["wrong-key", "evicted-session"])
def test_nothing_reaches_a_dropped_peer_after_its_context_is_collected(
    tmp_path: Path, established: bool
) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("silence-dev", CLASS_A, psk=PSK)])
    psk = PSK if established else bytes(16)  # the wrong key: its Finished fails
    later, at_drop = asyncio.run(_handshake_and_drop(setup.data, psk, established))
    assert later == 0, f"{later} datagram(s) to the peer after it was dropped"
    if established:
        assert at_drop == 1  # exactly the close_notify that evict sends on purpose
