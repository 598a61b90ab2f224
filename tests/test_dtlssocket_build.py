"""The project's DTLSSocket build (scripts/dtlssocket_build.sh) speaks the same DTLS as
everyone else.

The set-up rebuilds DTLSSocket with two patches. patches/tinydtls-aesni.patch: tinydtls's
AES block function, its AES-128 key schedule and the whole blocks of its AES-CCM use
AES-NI. A wrong round key order or counter would still let
two patched peers talk to each other, so each check here has a peer whose AES is
*not* the patched code: the table code of the same build (OTACOAP_TINYDTLS_AESNI=0 in
that process only) here, OpenSSL in libcoap's client in tests/test_server_dtls.py
(`test_libcoap_fetches_the_image_byte_identically`, against the patched server).
patches/dtlssocket-per-record.patch: the record callbacks' (host, port) is made in C and
kept while the peer stays the same, and a context with one peer finds it without
hashing; a context with several peers (the last test) must still tell them apart.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import (  # noqa: E402
    CLASS_A,
    DeviceSpec,
    device_provision,
    device_run_once,
    make_image,
    make_setup,
    running_server,
)

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

# The AES-NI code (and its marker) is only compiled for x86-64.
AESNI_MARKER = b"otacoap-tinydtls-aesni-3"
MARKERS = (b"otacoap-dtlssocket-per-record-1",) + (
    (AESNI_MARKER,) if platform.machine() == "x86_64" else ()
)
SWITCH = "OTACOAP_TINYDTLS_AESNI"
PSK = bytes.fromhex("5a17e3c09b2d4f6a8e1c3b5d7f9a0b2c")


def _cpu_has_aes() -> bool:
    flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    return platform.machine() == "x86_64" and "aes" in flags and "ssse3" in flags


needs_aesni = pytest.mark.skipif(not _cpu_has_aes(), reason="no x86-64 CPU with AES-NI")


def test_installed_dtlssocket_is_the_patched_build() -> None:
    """The set-up installed the patched build (else every other test here proves
    nothing about it)."""
    import DTLSSocket.dtls as dtls

    built = Path(dtls.__file__).read_bytes()
    missing = [m.decode() for m in MARKERS if m not in built]
    assert not missing, f"{dtls.__file__} lacks {missing}: run scripts/dtlssocket_build.sh"


@needs_aesni
@pytest.mark.parametrize(
    ("server_aesni", "device_aesni"), [("1", "0"), ("0", "1")], ids=["ni-server", "ni-device"]
)
def test_update_between_aesni_and_table_aes_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_aesni: str, device_aesni: str
) -> None:
    """A whole update (handshake, manifest, 40 blocks, reports) between a server and a
    device whose record ciphers are different implementations: every record one side
    encrypts, the other decrypts and authenticates."""
    device = "aesni-dev-1"
    setup = make_setup(tmp_path, devices=[DeviceSpec(device, CLASS_A, psk=PSK)])
    factory = setup.release(CLASS_A, 1, make_image("factory", 3000))
    flash = tmp_path / "device.flash"
    device_provision(flash, setup, device, factory)
    v2 = setup.release(CLASS_A, 2, make_image("v2", 40_000))
    setup.publish(v2)

    monkeypatch.setenv(SWITCH, server_aesni)
    with running_server(setup.data) as server:
        monkeypatch.setenv(SWITCH, device_aesni)  # the device's process only
        outcome = device_run_once(flash, server.uri)
    assert outcome["outcome"] == "updated" and outcome["sequence_number"] == 2


def test_one_context_with_two_peers_keeps_them_apart() -> None:
    """One client context with sessions to two servers (tinydtls then hashes its peer
    table; each server context has one peer and takes the patch's shortcut), records
    interleaved: every plaintext reaches the right side, and every callback names the
    peer it concerns, as the stock build's did, though the patch keeps the last
    (host, port) per context and reuses it while the peer stays the same."""
    from DTLSSocket import dtls

    ident, psk = b"two-peer-client", bytes(range(16))
    client_port, server_ports = 5555, (1111, 2222)
    wire: list[tuple[str, int, bytes]] = []  # (to whom, port, record)
    got: list[tuple[str, tuple[str, int], bytes]] = []  # (who read, callback peer, data)
    connected: list[str] = []

    def writer(name: str) -> object:
        def write(peer: tuple[str, int], data: bytes) -> int:
            to = "client" if name != "client" else "server"
            wire.append((to, peer[1] if to == "server" else int(name), bytes(data)))
            got.append((name + " wrote", peer, b""))
            return len(data)

        return write

    def reader(name: str) -> object:
        def read(peer: tuple[str, int], data: bytes) -> int:
            got.append((name, peer, bytes(data)))
            return len(data)

        return read

    def event(name: str) -> object:
        def on_event(level: int, code: int) -> None:
            if code == 0x01DE:  # DTLS_EVENT_CONNECTED
                connected.append(name)

        return on_event

    client = dtls.DTLS(
        read=reader("client"),
        write=writer("client"),
        event=event("client"),
        pskId=ident,
        pskStore={ident: psk},
    )
    servers = {
        port: dtls.DTLS(
            read=reader(str(port)),
            write=writer(str(port)),
            event=event(str(port)),
            pskId=b"unused",
            pskStore={ident: psk},
        )
        for port in server_ports
    }
    from_client = dtls.Session("::1", client_port)
    conns = {port: client.connect("::1", port) for port in server_ports}

    def deliver() -> None:
        for _ in range(100):
            if not wire:
                return
            to, port, record = wire.pop(0)
            if to == "server":
                servers[port].handleMessage(from_client, record)
            else:
                client.handleMessage(conns[port], record)
        raise AssertionError("the records never stopped")

    deliver()
    assert sorted(connected) == sorted(["client", "client", "1111", "2222"])
    got.clear()
    for i in range(6):  # alternate: the kept (host, port) must follow the peer
        port = server_ports[i % 2]
        client.write(conns[port], b"to %d #%d" % (port, i))
        servers[port].write(from_client, b"from %d #%d" % (port, i))
        deliver()

    reads = [(who, peer, data) for who, peer, data in got if not who.endswith("wrote")]
    want = []
    for i in range(6):
        port = server_ports[i % 2]
        want.append((str(port), ("::1", client_port), b"to %d #%d" % (port, i)))
        want.append(("client", ("::1", port), b"from %d #%d" % (port, i)))
    assert reads == want
    writes = [(who, peer) for who, peer, _ in got if who.endswith("wrote")]
    assert writes == [
        (who, peer)
        for i in range(6)
        for who, peer in (
            ("client wrote", ("::1", server_ports[i % 2])),
            (f"{server_ports[i % 2]} wrote", ("::1", client_port)),
        )
    ]
