"""Server-side attack cases of ATTACKS.md that the other server tests leave open:
#28 replayed records and reports, #29 amplification and spoofed sources, #30 bad
credentials run in parallel with a real device, #32 cross-device URI mutations, #35
hostile names and content-addressed storage, #37 slowloris uploads.

Everything is real: `otacoap serve` subprocesses on 127.0.0.1, DTLS handshakes through
tinydtls (aiocoap clients, and tinydtls' own client state machine driven over sockets we
own so that a test can bind the source address, see every datagram and pause between
flights), SQLite files read back directly. "Spoofed" sources are other loopback
addresses (127.0.0.2, 127.0.0.3: Linux routes all of 127/8 to lo), and the bytes the
server sends back to them are counted on the same socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import socket
import sqlite3
import stat
import statistics
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import CON, NON
from DTLSSocket import dtls
from server_helpers import (
    CLASS_A,
    CLASS_B,
    HOST,
    DeviceSpec,
    ReleaseFiles,
    ServerProcess,
    Setup,
    cli,
    cli_ok,
    coaps_client,
    fetch_blocks,
    get,
    make_image,
    make_setup,
    request,
    running_server,
    squeeze,
)

from otacoap.core import protocol
from otacoap.core.report import Report, State
from otacoap.operator.client import post_blockwise

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore:DTLS module did not shut down"),
]

T = TypeVar("T")

SPOOFED = ("127.0.0.2", "127.0.0.3")
CLASS_C = "gateway-g7"

# Small upload limits so that #37 can fill them and watch them expire quickly; the
# default DTLS session cap (256) is what #29/#30 attack.
CONFIG = """
[uploads]
max_concurrent = 4
max_per_peer = 2
idle_timeout = 3.0
busy_max_age = 7
"""
IDLE_TIMEOUT = 3.0
SWEEP_INTERVAL = 5.0  # otacoap.server.app._SWEEP_INTERVAL
MAX_DTLS_SESSIONS = 256  # ServerConfig default


def _run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """asyncio.run with an overall bound, typed."""
    try:
        return asyncio.run(asyncio.wait_for(coro, timeout))
    finally:
        _PINNED.clear()


_PINNED: list[aiocoap.Message] = []


def pin(response: aiocoap.Message) -> None:
    """Keep the DTLS session a response came on. aiocoap's client holds its DTLS
    connections weakly (only messages' .remote keep them), so without this a client
    may quietly handshake again from a new source port: to the server, a new peer."""
    _PINNED.append(response)


# --- the world: one production-like server (DTLS only) -----------------------------


@dataclass
class World:
    setup: Setup
    server: ServerProcess
    a1: ReleaseFiles  # class A seq 1: pinned for t2
    a2: ReleaseFiles  # class A seq 2: current for t1, mallory, r1
    b1: ReleaseFiles  # class B seq 1: s1's

    def psk(self, device: str) -> bytes:
        return self.setup.devices[device].psk

    @property
    def data(self) -> Path:
        return self.setup.data

    @property
    def tmp_dir(self) -> Path:
        return self.setup.data / "blobs" / "tmp"

    @property
    def addr(self) -> tuple[str, int]:
        return (HOST, self.server.port)

    def upload_temp_files(self) -> list[str]:
        return sorted(p.name for p in self.tmp_dir.iterdir() if p.name.startswith("upload-"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    setup = make_setup(
        tmp_path_factory.mktemp("attacks"),
        devices=[
            DeviceSpec("t1"),
            DeviceSpec("t2"),
            DeviceSpec("mallory"),
            DeviceSpec("r1"),
            DeviceSpec("s1", CLASS_B),
            DeviceSpec("c1", CLASS_C),
        ],
        operators=["ops"],
        config=CONFIG,
    )
    a1 = setup.release(CLASS_A, 1, make_image("attacks-a1", 20_000))
    a2 = setup.release(CLASS_A, 2, make_image("attacks-a2", 100_000))  # 98 blocks
    b1 = setup.release(CLASS_B, 1, make_image("attacks-b1", 3000))
    for rel in (a1, a2, b1):
        setup.publish(rel)
    cli_ok("release", "assign", "--data", setup.data, "t2", "1")
    with running_server(setup.data) as server:
        yield World(setup, server, a1, a2, b1)


# --- process probes ----------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# --- raw DTLS 1.2 records (RFC 6347 §4.1, §4.2, §4.3.2) -----------------------------

CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APP = 20, 21, 22, 23
HS_CLIENT_HELLO, HS_SERVER_HELLO, HS_HELLO_VERIFY = 1, 2, 3
HS_SERVER_HELLO_DONE, HS_CLIENT_KEY_EXCHANGE = 14, 16
# What tinydtls' own client offers after the cookie field: TLS_PSK_WITH_AES_128_CCM_8,
# TLS_PSK_WITH_AES_128_CCM, the empty-renegotiation SCSV; null compression; the
# extended_master_secret extension (RFC 7627), which tinydtls requires.
_HELLO_TAIL = bytes.fromhex("0006c0a8c0a400ff0100000400170000")


def dtls_record(ctype: int, seq: int, payload: bytes, epoch: int = 0) -> bytes:
    return (
        bytes((ctype,))
        + b"\xfe\xfd"
        + epoch.to_bytes(2, "big")
        + seq.to_bytes(6, "big")
        + len(payload).to_bytes(2, "big")
        + payload
    )


def dtls_handshake(
    mtype: int, mseq: int, fragment: bytes, offset: int = 0, total: int | None = None
) -> bytes:
    total = len(fragment) if total is None else total
    return (
        bytes((mtype,))
        + total.to_bytes(3, "big")
        + mseq.to_bytes(2, "big")
        + offset.to_bytes(3, "big")
        + len(fragment).to_bytes(3, "big")
        + fragment
    )


def client_hello(random: bytes, cookie: bytes = b"", seq: int = 0) -> bytes:
    body = b"\xfe\xfd" + random + b"\x00" + bytes((len(cookie),)) + cookie + _HELLO_TAIL
    return dtls_record(CT_HANDSHAKE, seq, dtls_handshake(HS_CLIENT_HELLO, seq, body))


def parse_records(datagram: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i + 13 <= len(datagram):
        n = int.from_bytes(datagram[i + 11 : i + 13], "big")
        out.append((datagram[i], datagram[i + 13 : i + 13 + n]))
        i += 13 + n
    return out


def shape(datagram: bytes) -> tuple[int, int, int]:
    """(content type, handshake type or -1, length): what an observer learns."""
    ctype, payload = parse_records(datagram)[0]
    return ctype, payload[0] if ctype == CT_HANDSHAKE and payload else -1, len(datagram)


def hvr_cookie(datagram: bytes) -> bytes:
    ((ctype, hs),) = parse_records(datagram)
    assert ctype == CT_HANDSHAKE and hs[0] == HS_HELLO_VERIFY, datagram.hex()
    body = hs[12:]  # server_version (2), cookie length (1), cookie
    return body[3 : 3 + body[2]]


def udp(source: str = HOST) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    return sock


def drain(sock: socket.socket, quiet: float) -> list[bytes]:
    """Every datagram that arrives until `quiet` seconds pass without one."""
    got: list[bytes] = []
    sock.settimeout(quiet)
    try:
        while True:
            got.append(sock.recv(70_000))
    except TimeoutError:
        pass
    return got


def exchange(
    source: str, dest: tuple[str, int], datagrams: Sequence[bytes], quiet: float = 0.5
) -> list[bytes]:
    with udp(source) as sock:
        for d in datagrams:
            sock.sendto(d, dest)
        return drain(sock, quiet)


def key_exchange(
    dest: tuple[str, int],
    identity: bytes,
    *,
    declared: int | None = None,
    fragment: int | None = None,
) -> tuple[list[bytes], list[bytes]]:
    """A hand-made PSK handshake up to ClientKeyExchange carrying `identity` (with its
    uint16 length field `declared`, default the real length), optionally split into
    handshake fragments of `fragment` bytes (RFC 6347 §4.2.3). Returns (the server's
    ServerHello flight, everything it sent after the ClientKeyExchange)."""
    with udp() as sock:
        random = os.urandom(32)
        sock.sendto(client_hello(random), dest)
        (hvr,) = drain(sock, 0.5)
        sock.sendto(client_hello(random, hvr_cookie(hvr), seq=1), dest)
        flight = drain(sock, 0.5)
        size = len(identity) if declared is None else declared
        body = size.to_bytes(2, "big") + identity
        if fragment is None:
            hs = dtls_handshake(HS_CLIENT_KEY_EXCHANGE, 2, body)
            sock.sendto(dtls_record(CT_HANDSHAKE, 2, hs), dest)
        else:
            for k, off in enumerate(range(0, len(body), fragment)):
                piece = body[off : off + fragment]
                hs = dtls_handshake(HS_CLIENT_KEY_EXCHANGE, 2, piece, off, len(body))
                sock.sendto(dtls_record(CT_HANDSHAKE, 2 + k, hs), dest)
        return flight, drain(sock, 0.5)


DTLS_EVENT_CONNECTED = 0x1DE


class RawDtlsClient:
    """tinydtls' client state machine (DTLSSocket, as aiocoap's client uses it) over a
    UDP socket this test owns: any source address, every datagram visible, and the
    test decides when each flight goes out."""

    def __init__(
        self, dest: tuple[str, int], identity: bytes, psk: bytes, source: str = HOST
    ) -> None:
        assert len(psk) == 16  # DTLSSocket copies the key into a 16-byte buffer unchecked
        assert len(identity) <= 32  # and the identity into tinydtls' 32-byte one
        self.dest = dest
        self.sock = udp(source)
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self.plaintext: list[bytes] = []
        self.events: list[tuple[int, int]] = []
        self.after_final_flight: Callable[[], None] | None = None
        self._dtls = dtls.DTLS(
            read=self._read,
            write=self._write,
            event=self._event,
            pskId=identity,
            pskStore={identity: psk},
        )
        self._session: Any = None

    def _read(self, sender: Any, data: bytes) -> int:
        self.plaintext.append(bytes(data))
        return len(data)

    def _write(self, recipient: Any, data: bytes) -> int:
        self.sent.append(bytes(data))
        self.sock.sendto(data, self.dest)
        return len(data)

    def _event(self, level: int, code: int) -> int:
        self.events.append((level, code))
        return 0

    @property
    def connected(self) -> bool:
        return any(code == DTLS_EVENT_CONNECTED for _, code in self.events)

    def _final_flight_sent(self) -> bool:
        return any(d[0] == CT_CCS for d in self.sent)

    def handshake(self, timeout: float = 3.0, settle: float = 0.25) -> bool:
        """Run the handshake; after our Finished, wait `settle` s for the server's."""
        self._session = self._dtls.connect("::1", 1234)  # tinydtls needs an address
        deadline = time.monotonic() + timeout
        final_at: float | None = None
        while not self.connected and time.monotonic() < deadline:
            if final_at is not None and time.monotonic() > final_at + settle:
                break
            self.sock.settimeout(0.05)
            try:
                data = self.sock.recv(70_000)
            except TimeoutError:
                continue
            self.received.append(data)
            had_final = self._final_flight_sent()
            self._dtls.handleMessage(self._session, data)
            if not had_final and self._final_flight_sent():
                final_at = time.monotonic()
                if self.after_final_flight is not None:
                    self.after_final_flight()
        return self.connected

    def step_until(self, wanted: Callable[[bytes], bool], timeout: float = 2.0) -> bytes:
        """Receive (and process) datagrams until one satisfies `wanted`; return it."""
        if self._session is None:
            self._session = self._dtls.connect("::1", 1234)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(70_000)
            except TimeoutError:
                break
            self.received.append(data)
            if wanted(data):
                return data
            self._dtls.handleMessage(self._session, data)
        raise AssertionError(f"no such datagram; got {[shape(d) for d in self.received]}")

    def feed(self, data: bytes) -> None:
        self._dtls.handleMessage(self._session, data)

    def collect(self, quiet: float) -> list[bytes]:
        got = drain(self.sock, quiet)
        for data in got:
            self.received.append(data)
            self._dtls.handleMessage(self._session, data)
        return got

    def send_app(self, payload: bytes) -> None:
        self._dtls.write(self._session, payload)

    def close(self) -> None:
        self.sock.close()


def test_short_and_malformed_datagrams_on_an_established_session_change_nothing(
    world: World,
) -> None:
    """From an established session's own address (anyone can send from it): an empty
    datagram, bytes shorter than a record header, an application-data header whose
    length field disagrees with the datagram, and a record of garbage. The server drops
    each without an answer and without an error in its log, and the session goes on
    serving Block2 (the one-record shortcut in dtls_pool must not read past the end)."""
    client = RawDtlsClient(world.addr, b"t1", world.psk("t1"))
    try:
        assert client.handshake()
        log_before = world.server.log()
        junk = [
            b"",
            bytes([CT_APP]),
            dtls_record(CT_APP, 7, b"", epoch=1)[:12],
            dtls_record(CT_APP, 7, os.urandom(40), epoch=1)[:30],  # says 40, holds 17
            dtls_record(CT_APP, 7, os.urandom(40), epoch=1) + b"\x00",  # one byte more
            dtls_record(CT_APP, 7, os.urandom(40), epoch=1),  # does not decrypt
        ]
        for datagram in junk:
            client.sock.sendto(datagram, world.addr)
        assert client.collect(quiet=0.3) == []
        client.plaintext.clear()
        client.send_app(coap_get_bytes(("fw", world.a2.image_id), block2=(1, 0, 6)))
        assert _wait_for(lambda: bool(client.collect(quiet=0.05)) or bool(client.plaintext), 5)
        assert client.plaintext and client.plaintext[-1][1] == 0x45  # 2.05 Content
        new_log = world.server.log()[len(log_before) :]
        assert "Traceback" not in new_log and "Error" not in new_log, new_log[-2000:]
    finally:
        client.close()


def coap_get_bytes(
    path: Sequence[str],
    *,
    token: bytes = b"",
    mtype: Any = CON,
    block2: tuple[int, int, int] | None = None,
) -> bytes:
    """A plaintext CoAP GET on the wire (RFC 7252 §3), encoded by aiocoap."""
    msg = aiocoap.Message(code=Code.GET, uri_path=tuple(path))
    msg.mtype = mtype
    msg.mid = int.from_bytes(os.urandom(2), "big")
    msg.token = token
    if block2 is not None:
        msg.opt.block2 = block2
    return bytes(msg.encode())


# === #29 Amplification and spoofed sources ===========================================


def test_spoofed_client_hellos_get_one_hello_verify_request_smaller_than_the_hello(
    world: World,
) -> None:
    """RFC 6347 §4.2.1: a ClientHello without a valid cookie is answered with a small
    HelloVerifyRequest only; the cookie is bound to the source address, so a spoofer
    (who never sees the HVR) cannot get the larger ServerHello flight sent anywhere."""
    cookies: dict[str, bytes] = {}
    for source in SPOOFED:
        hello = client_hello(os.urandom(32))
        replies = exchange(source, world.addr, [hello])
        assert [shape(r)[:2] for r in replies] == [(CT_HANDSHAKE, HS_HELLO_VERIFY)], replies
        assert len(replies[0]) <= len(hello)  # amplification <= 1x (ATTACKS.md: <= ~3x)
        cookies[source] = hvr_cookie(replies[0])
    assert cookies[SPOOFED[0]] != cookies[SPOOFED[1]]

    # A guessed cookie, or one from another source address: again only an HVR.
    for cookie in (os.urandom(16), cookies[SPOOFED[0]]):
        replies = exchange(SPOOFED[1], world.addr, [client_hello(os.urandom(32), cookie, 1)])
        assert [shape(r)[:2] for r in replies] == [(CT_HANDSHAKE, HS_HELLO_VERIFY)]
    # Control: the right cookie from the right address does get the ServerHello flight.
    with udp(SPOOFED[0]) as sock:
        random = os.urandom(32)
        sock.sendto(client_hello(random), world.addr)
        (hvr,) = drain(sock, 0.5)
        sock.sendto(client_hello(random, hvr_cookie(hvr), 1), world.addr)
        flight = drain(sock, 0.5)
    assert [shape(r)[1] for r in flight] == [HS_SERVER_HELLO, HS_SERVER_HELLO_DONE]


def test_plain_coap_and_stray_records_to_the_dtls_port_get_no_answer(world: World) -> None:
    """Without --insecure-plain-coap nothing answers plaintext CoAP, and a DTLS record
    that is not a ClientHello (application data, ChangeCipherSpec, an alert) from an
    address without a session gets silence: zero bytes back."""
    requests = [
        coap_get_bytes(("fw", world.a2.image_id), block2=(0, 0, 6)),
        coap_get_bytes(("m",)),
        coap_get_bytes((".well-known", "core"), token=b"\x01"),
        coap_get_bytes(("m",), mtype=NON),
        dtls_record(CT_APP, 1, os.urandom(48), epoch=1),
        dtls_record(CT_CCS, 0, b"\x01"),
        dtls_record(CT_ALERT, 0, b"\x02\x28"),
        dtls_record(CT_HANDSHAKE, 0, b""),  # a handshake record with no message
    ]
    for source in SPOOFED:
        assert exchange(source, world.addr, requests, quiet=0.5) == []


def _hello_flood(dest: tuple[str, int], count: int, batch: int = 100) -> tuple[int, int, int]:
    """`count` ClientHellos, each from a new (spoofed address, port); returns (bytes sent,
    bytes received, HVRs received)."""
    sent = received = answered = 0
    for start in range(0, count, batch):
        socks = []
        for i in range(min(batch, count - start)):
            sock = udp(SPOOFED[i % 2])
            sock.setblocking(False)
            hello = client_hello(os.urandom(32))
            sock.sendto(hello, dest)
            sent += len(hello)
            socks.append(sock)
        pending = list(socks)
        deadline = time.monotonic() + 2.0
        while pending and time.monotonic() < deadline:
            waiting = []
            for sock in pending:
                try:
                    data = sock.recv(2000)
                except BlockingIOError:
                    waiting.append(sock)
                    continue
                received += len(data)
                answered += shape(data)[1] == HS_HELLO_VERIFY
            pending = waiting
            if pending:
                time.sleep(0.005)
        for sock in socks:
            sock.close()
    return sent, received, answered


def test_a_spoofed_client_hello_flood_keeps_memory_flat_and_the_device_served(
    world: World,
) -> None:
    """RFC 7252 §11.4 / ATTACKS.md #29: per-source DTLS state is capped, so RSS stops
    growing once the session table is full (an uncapped table costs ~1.4 KB per source,
    ~11 MB for the 8000 measured here); a device with a session downloads its whole
    image during the flood, and a new device handshake works after it."""
    pid = world.server.proc.pid
    stats: list[tuple[int, int, int]] = []

    async def download() -> bytes:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            pin(first := await get(ctx, world.server.uri + "/m"))
            assert first.code == Code.CONTENT
            flood = asyncio.create_task(asyncio.to_thread(_hello_flood, world.addr, 8000))
            image = await fetch_blocks(ctx, world.server.uri + world.a2.image_uri)
            stats.append(await flood)
            return image

    rss_start = _rss_kib(pid)
    # Past the table's fill (256 sources) the heap still settles for ~14,000 hellos
    # (measured: +4.1 MB over the first 6000, +3.2 MB over the next 8000, +0.1 MB over
    # 8000 more), so the flat part is measured after 12,000: an uncapped table would
    # still grow ~11 MB there.
    warmup = _hello_flood(world.addr, 12_000)
    rss_full = _rss_kib(pid)
    assert _run(download()) == world.a2.image
    rss_end = _rss_kib(pid)
    for sent, received, answered in (warmup, *stats):
        assert received <= sent  # amplification factor below 1
        assert answered >= 0.95 * (sent // len(client_hello(bytes(32)))), (sent, answered)
    assert rss_full - rss_start < 20_000, (rss_start, rss_full)
    assert rss_end - rss_full < 4_000, f"RSS grew {rss_end - rss_full} KiB over 8000 hellos"

    async def fresh_device() -> Code:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            return (await get(ctx, world.server.uri + "/m")).code

    assert _run(fresh_device()) == Code.CONTENT


def test_spoofed_client_hellos_do_not_abort_a_device_handshake_in_progress(
    world: World,
) -> None:
    """A device on a slow link is between the server's ServerHelloDone and its own
    final flight when MAX_DTLS_SESSIONS+100 spoofed ClientHellos arrive (77 bytes each,
    from addresses the attacker need not own). A stateless cookie exchange (RFC 6347
    §4.2.1) would keep nothing for them; the device's handshake must still finish."""
    client = RawDtlsClient(world.addr, b"t1", world.psk("t1"))
    try:
        client.step_until(lambda d: shape(d)[1] == HS_HELLO_VERIFY)
        hvr = client.received[-1]
        client.feed(hvr)  # -> ClientHello with cookie
        client.step_until(lambda d: shape(d)[1] == HS_SERVER_HELLO_DONE)
        _, _, answered = _hello_flood(world.addr, MAX_DTLS_SESSIONS + 100)
        assert answered >= MAX_DTLS_SESSIONS + 50  # the flood did reach the server
        client.feed(client.received[-1])  # now: ClientKeyExchange, CCS, Finished
        client.collect(0.5)
        assert client.connected, [shape(d) for d in client.received]
    finally:
        client.close()


@dataclass
class Plain:
    server: ServerProcess
    image_id: str

    @property
    def plain(self) -> tuple[str, int]:
        assert self.server.plain_port is not None
        return (HOST, self.server.plain_port)


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plain]:
    """A second server, started with --insecure-plain-coap (development mode)."""
    setup = make_setup(tmp_path_factory.mktemp("attacks-plain"), devices=[DeviceSpec("t1")])
    release = setup.release(CLASS_A, 1, make_image("attacks-plain", 5000))
    setup.publish(release)
    args = ["--insecure-plain-coap", "--plain-port", "0"]
    with running_server(setup.data, args=args) as server:
        yield Plain(server, release.image_id)


def test_with_insecure_plain_coap_spoofed_sources_get_only_a_4_01_and_no_content(
    plain_server: Plain,
) -> None:
    """--insecure-plain-coap (development): the protected resources answer a spoofed
    source one bare 4.01 per request, never image or manifest bytes, whatever Block2
    or message type; the DTLS port next to it still answers only an HVR."""
    server, image_id, plain = plain_server.server, plain_server.image_id, plain_server.plain
    requests = [
        coap_get_bytes(("fw", image_id), token=os.urandom(8), block2=(num, 0, szx))
        for num, szx in ((0, 6), (3, 6), (0, 0), (200, 2))
    ] + [coap_get_bytes(("m",), token=b"\x07", mtype=mtype) for mtype in (CON, NON)]
    for source in SPOOFED:
        for req in requests:
            replies = exchange(source, plain, [req], quiet=0.5)
            assert len(replies) == 1, replies
            reply = aiocoap.Message.decode(replies[0])
            assert reply.code == Code.UNAUTHORIZED
            assert reply.opt.block2 is None and reply.opt.size2 is None
            # Header and echoed token, then at most a short diagnostic: no content.
            assert len(replies[0]) - (4 + (req[0] & 0x0F)) <= 32, replies
        hello = client_hello(os.urandom(32))
        (hvr,) = exchange(source, (HOST, server.port), [hello])
        assert shape(hvr)[1] == HS_HELLO_VERIFY and len(hvr) <= len(hello)


def test_with_insecure_plain_coap_no_reply_is_more_than_3x_its_request(
    plain_server: Plain,
) -> None:
    """RFC 7252 §11.3 / RFC 9175 §2.4: to an unverified source a server should not
    send more than ~3x what it received. An attacker picks the smallest request with
    the largest answer: no token, one short Uri-Path, or discovery."""
    plain = plain_server.plain
    ratios: dict[str, float] = {}
    for path in (("m",), ("r",), ("fw",), ("fw", "0" * 16), (".well-known", "core")):
        req = coap_get_bytes(path)
        replies = exchange(SPOOFED[0], plain, [req], quiet=0.5)
        ratios["/" + "/".join(path)] = sum(map(len, replies)) / len(req)
    assert max(ratios.values()) <= 3.0, ratios


# === #30 Wrong PSK, unknown identity, oversized identity, handshake flood ============


@dataclass
class Attempt:
    what: str
    connected: bool = False
    reached_key_check: bool = False  # the server got our identity (and our Finished)
    plaintext: list[bytes] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)

    @property
    def app_records(self) -> int:
        return sum(1 for d in self.replies for ctype, _ in parse_records(d) if ctype == CT_APP)


def _bad_handshake(dest: tuple[str, int], what: str, identity: bytes, psk: bytes) -> Attempt:
    client = RawDtlsClient(dest, identity, psk)
    try:
        connected = client.handshake(timeout=3.0, settle=0.25)
        # Then application data on the session it believes in, and a forged record.
        client.sock.sendto(dtls_record(CT_APP, 1, os.urandom(40), epoch=1), dest)
        late = drain(client.sock, 0.1)
        reached = any(d[0] == CT_CCS for d in client.sent)
        return Attempt(what, connected, reached, client.plaintext, client.received + late)
    finally:
        client.close()


def _control_handshake(dest: tuple[str, int], psk: bytes) -> Attempt:
    """The right key through the same harness: it must see the connection and data."""
    client = RawDtlsClient(dest, b"t1", psk)
    try:
        connected = client.handshake(timeout=3.0)
        client.send_app(coap_get_bytes(("m",), token=b"\x01"))
        client.collect(0.5)
        return Attempt("control", connected, True, client.plaintext, client.received)
    finally:
        client.close()


def _crafted_identity(dest: tuple[str, int], what: str, **kwargs: Any) -> Attempt:
    """key_exchange, retried when the flood around it made the kernel drop one of our
    datagrams (a full socket buffer is UDP, not the server's doing)."""
    for _ in range(3):
        try:
            flight, after = key_exchange(dest, **kwargs)
        except ValueError:  # no HelloVerifyRequest came back
            continue
        if [shape(d)[1] for d in flight] == [HS_SERVER_HELLO, HS_SERVER_HELLO_DONE] and after:
            return Attempt(what, reached_key_check=True, replies=flight + after)
    return Attempt(what)


def test_bad_credentials_in_parallel_never_connect_and_the_device_still_updates(
    world: World,
) -> None:
    """While t1 downloads its 100 KB image: 40 wrong-key handshakes naming t1, 10
    unknown identities, and hand-made ClientKeyExchanges with identities of 33 B, 1 KiB,
    60 000 B (one datagram), 64 KiB in 66 handshake fragments, and a length field that
    lies. None connects, none gets an application-data record or plaintext back, the
    server keeps running, t1's image is byte-exact and t1 is not locked out afterwards
    (no per-identity lockout)."""
    dest = world.addr

    def attacks() -> list[Attempt]:
        jobs: list[Callable[[], Attempt]] = []
        for i in range(40):
            jobs.append(lambda i=i: _bad_handshake(dest, f"t1/wrong{i}", b"t1", os.urandom(16)))
        for i in range(10):
            ident = f"ghost-{i}".encode()
            jobs.append(lambda ident=ident: _bad_handshake(dest, "unknown", ident, os.urandom(16)))
        for size in (33, 1024, 60_000):
            jobs.append(
                lambda size=size: _crafted_identity(dest, f"id{size}", identity=b"i" * size)
            )
        jobs.append(lambda: _crafted_identity(dest, "id64k", identity=b"i" * 65_535, fragment=1000))
        jobs.append(lambda: _crafted_identity(dest, "lie", identity=b"i" * 100, declared=65_535))
        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(lambda job: job(), jobs))

    async def go() -> tuple[bytes, list[Attempt]]:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            attempts = asyncio.create_task(asyncio.to_thread(attacks))
            await asyncio.sleep(0.05)
            image = await fetch_blocks(ctx, world.server.uri + world.a2.image_uri, timeout=10)
            return image, await attempts

    image, attempts = _run(go(), timeout=90)
    assert image == world.a2.image
    assert len(attempts) == 55
    for a in attempts:
        assert not a.connected and not a.plaintext and a.app_records == 0, a.what
    # The attacks did get as far as the key check (the flood may cost a few datagrams).
    assert sum(a.reached_key_check for a in attempts) >= 45, [a.what for a in attempts]
    # Oversized identities are refused with a fatal alert, not silently half-kept.
    for a in attempts:
        if a.what.startswith(("id", "lie")):
            alerts = [p for d in a.replies for t, p in parse_records(d) if t == CT_ALERT]
            assert alerts and all(p[0] == 2 for p in alerts), (a.what, alerts)
    assert world.server.proc.poll() is None
    # Control: the same harness with t1's real key connects and gets data back.
    control = _control_handshake(dest, world.psk("t1"))
    assert control.connected and len(control.plaintext) == 1
    assert aiocoap.Message.decode(control.plaintext[0]).code == Code.CONTENT
    assert control.app_records >= 1

    async def t1_again() -> Code:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            return (await get(ctx, world.server.uri + "/m")).code

    assert _run(t1_again()) == Code.CONTENT


def _probe_latency(
    dest: tuple[str, int], identity: bytes
) -> tuple[float, list[tuple[int, int, int]]]:
    """Handshake with a wrong key; the moment the final flight is out, a ClientHello from
    another socket: its HVR comes back once the server has processed that flight (one
    socket, one loop), so its latency includes the PSK lookup for `identity`."""
    probe = udp()
    probe.settimeout(2.0)
    hello = client_hello(os.urandom(32))
    latency: list[float] = []

    def fire() -> None:
        t0 = time.perf_counter()
        probe.sendto(hello, dest)
        probe.recv(2000)
        latency.append(time.perf_counter() - t0)

    client = RawDtlsClient(dest, identity, os.urandom(16))
    client.after_final_flight = fire
    try:
        assert not client.handshake(timeout=3.0, settle=0.05)
        return latency[0], [shape(d) for d in client.received] + [
            (-2, lvl, code) for lvl, code in client.events
        ]
    finally:
        client.close()
        probe.close()


def test_unknown_identity_and_wrong_key_fail_the_same_way(world: World) -> None:
    """RFC 4279 §2 / ATTACKS.md #30: no existence oracle. A registered identity with a
    wrong key and an unregistered one get the same server datagrams (types and sizes),
    no alert either way, and the server takes the same time class to process the final
    flight (medians within 2 ms; the lookups are sub-millisecond)."""
    known: list[float] = []
    unknown: list[float] = []
    shapes: set[tuple[tuple[int, int, int], ...]] = set()
    for i in range(20):
        dt, seen = _probe_latency(world.addr, b"t1")
        known.append(dt)
        shapes.add(tuple(seen))
        dt, seen = _probe_latency(world.addr, f"nobody-{i:02d}".encode())
        unknown.append(dt)
        shapes.add(tuple(seen))
    assert len(shapes) == 1, shapes
    (seen,) = shapes
    assert not any(s[0] == -2 and s[1] == 2 for s in seen)  # no fatal alert event
    assert not any(s[0] == CT_ALERT for s in seen)  # and no alert record
    k, u = statistics.median(known), statistics.median(unknown)
    assert abs(k - u) < 0.002, (
        f"median probe latency: known {k * 1e3:.3f} ms, unknown {u * 1e3:.3f} ms"
    )


# === #32 Device A asks for device B's image or manifest ==============================


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) for c in text)


def test_every_mutation_of_another_devices_image_uri_is_4_04_and_logged(world: World) -> None:
    """mallory (class A, current release seq 2) asks for s1's image (class B) and for
    t2's (class A, pinned to seq 1) under every spelling we could think of. Each /fw
    attempt is a 4.04 with no image bytes and a refusal log line (attacker-chosen text
    escaped: no forged log lines); the audit log records it; other prefixes are 4.04;
    identity hints in the URI never change whose manifest /m returns."""
    bid, oid, own = world.b1.image_id, world.a1.image_id, world.a2.image_id
    bhex = world.b1.digest.hex()
    fw = [
        (bid,), (oid,), (bid.upper(),), (bid[:8] + bid[8:].upper(),), (oid.upper(),),
        (bid, ""), (bid + "/",), (bid + "%2F",), (bid + "%2f..",), (bid, ".."), ("..", bid),
        (own, "..", bid), (".", bid), (bid, "extra"), (bid, own), ("%2e%2e", bid),
        ("".join(f"%{ord(c):02x}" for c in bid),), (bid[:15],), (bid[:12],), (bid[:8],),
        (bid + "0",), (bhex,), ("sha256:" + bhex,), (bid + "\x00",), (" " + bid,),
        (bid + "\nINFO otacoap forged line",), (_fullwidth(bid),), (bid + "\u200b",),
        ("..\\" + bid,),
    ]  # fmt: skip
    other = [("fw",), ("FW", bid), ("Fw", bid), ("", "fw", bid), ("fw/" + bid,), ("fw%2F" + bid,)]
    queries = [("device=s1",), ("id=" + bid,), ("image=" + bid, "as=s1")]

    def msg(path: Sequence[str], query: Sequence[str] = ()) -> aiocoap.Message:
        m = aiocoap.Message(code=Code.GET, uri=world.server.uri)
        m.opt.uri_path = tuple(path)
        m.opt.uri_query = tuple(query)
        return m

    log_before = world.server.log().count("refused device:mallory fw.get")
    audit_before = len(
        cli_ok("audit", "list", "--data", world.data, "--limit", "1000").splitlines()
    )

    async def go() -> list[tuple[str, Code, bytes]]:
        out = []
        async with coaps_client(world.server.port, "mallory", world.psk("mallory")) as ctx:
            for rest in fw:
                r = await request(ctx, msg(("fw", *rest)))
                out.append((f"fw {rest!r}", r.code, bytes(r.payload)))
            for path in other:
                r = await request(ctx, msg(path))
                out.append((repr(path), r.code, bytes(r.payload)))
            for q in queries:
                r = await request(ctx, msg(("fw", bid), q))
                out.append((f"fw {bid}?{q}", r.code, bytes(r.payload)))
                r = await request(ctx, msg(("fw", oid), q))
                out.append((f"fw {oid}?{q}", r.code, bytes(r.payload)))
            for path in (("m", "s1"), ("m", bid), ("m", ""), ("m", "..", "m")):
                r = await request(ctx, msg(path))
                out.append((repr(path), r.code, bytes(r.payload)))
            # /m with identity hints: still mallory's own class manifest.
            for q in queries:
                r = await request(ctx, msg(("m",), q))
                assert r.code == Code.CONTENT and r.payload == world.a2.envelope, q
            # Control: the attacker's own image is served on the same session.
            r = await get(ctx, world.server.uri + world.a2.image_uri, block2=(0, 0, 6))
            assert r.code == Code.CONTENT and r.payload == world.a2.image[:1024]
        return out

    results = _run(go())
    leaks = (world.b1.image[:32], world.a1.image[:32], world.b1.envelope[:64])
    for what, code, payload in results:
        assert code == Code.NOT_FOUND, (what, code)
        assert not any(leak in payload for leak in leaks), what

    fw_attempts = len(fw) + 2 * len(queries)

    def logged() -> int:
        return world.server.log().count("refused device:mallory fw.get") - log_before

    assert _wait_for(lambda: logged() >= fw_attempts, 3.0), (logged(), fw_attempts)
    log = world.server.log()
    assert not any(line.startswith("INFO otacoap forged") for line in log.splitlines())
    # Control characters in the path are logged escaped, never raw.
    assert f"/fw/{bid}\\x00: " in log and f"/fw/{bid}\\nINFO otacoap forged line" in log

    def audited() -> list[str]:
        lines = cli_ok("audit", "list", "--data", world.data, "--limit", "1000").splitlines()
        return [x for x in map(squeeze, lines[audit_before:]) if "device:mallory  fw.get" in x]

    assert _wait_for(lambda: bool(audited()), 3.0)
    assert all("refused" in line for line in audited())


# === #28 Replayed records and reports ================================================


class _Relay(asyncio.DatagramProtocol):
    """A UDP relay between one DTLS client and the server that keeps every datagram
    (ATTACKS.md H2 in capture-and-replay mode)."""

    def __init__(self) -> None:
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.client: tuple[str, int] | None = None
        self.downstream: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.downstream = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client = addr
        self.to_server.append(data)
        assert self.upstream is not None
        self.upstream.sendto(data)

    def from_server(self, data: bytes) -> None:
        self.to_client.append(data)
        if self.downstream is not None and self.client is not None:
            self.downstream.sendto(data, self.client)

    def replay(self, data: bytes) -> None:
        """Inject a captured datagram into the same DTLS association (same address)."""
        assert self.upstream is not None
        self.upstream.sendto(data)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: _Relay) -> None:
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.relay.upstream = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay.from_server(data)


def _report_msg(uri: str, body: bytes) -> aiocoap.Message:
    return aiocoap.Message(
        code=Code.POST, uri=uri + "/r", payload=body, content_format=protocol.CF_REPORT
    )


def _reports_state(db: Path, device: str) -> tuple[list[tuple[Any, ...]], tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT id, counter, state, body, received_at FROM reports WHERE device_id = ? "
            "ORDER BY id",
            (device,),
        ).fetchall()
        dev = conn.execute(
            "SELECT last_counter, last_report_hash FROM devices WHERE id = ?", (device,)
        ).fetchone()
        total = conn.execute("SELECT COUNT(*) FROM reports").fetchone()
    finally:
        conn.close()
    return rows, (*dev, *total)


def test_replayed_records_and_reports_change_nothing(world: World) -> None:
    """Captured DTLS records of two accepted reports, re-injected into the same session
    (the newest and an older one) and from a new source, get no answer at all (DTLS
    anti-replay, RFC 6347 §4.1.2.6). In a new session the application level decides:
    the identical last report is acknowledged but not stored again; an older report,
    byte for byte, and a new body with a used counter are 4.09. The reports table and
    the device's counter are unchanged by all of it, and the next fresh report is
    stored (the snapshot can change)."""
    db = world.data / "otacoap.db"
    bodies = {n: Report(n, State.DOWNLOADING, bytes_received=1024 * n).encode() for n in (1, 2)}

    async def go() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        relay = _Relay()
        down, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=(HOST, 0))
        up, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(relay), remote_addr=world.addr
        )
        out: dict[str, Any] = {}
        try:
            port = down.get_extra_info("sockname")[1]
            records: dict[int, bytes] = {}
            async with coaps_client(port, "r1", world.psk("r1")) as ctx:
                for n in (1, 2):
                    mark = len(relay.to_server)
                    r = await request(ctx, _report_msg(f"coaps://{HOST}:{port}", bodies[n]))
                    assert r.code == Code.CHANGED
                    pin(r)
                    (records[n],) = [d for d in relay.to_server[mark:] if d[0] == CT_APP]
                out["before"] = _reports_state(db, "r1")
                mark = len(relay.to_client)
                relay.replay(records[2])
                relay.replay(records[1])
                await asyncio.sleep(0.5)
                out["same_session_answers"] = relay.to_client[mark:]
                out["other_source_answers"] = await asyncio.to_thread(
                    exchange, SPOOFED[0], world.addr, [records[2], records[1]], 0.5
                )
            async with coaps_client(world.server.port, "r1", world.psk("r1")) as ctx:
                uri = world.server.uri
                out["last_again"] = (await request(ctx, _report_msg(uri, bodies[2]))).code
                out["older_again"] = (await request(ctx, _report_msg(uri, bodies[1]))).code
                reused = Report(2, State.INSTALLED).encode()
                out["reused_counter"] = (await request(ctx, _report_msg(uri, reused))).code
                lower = Report(0, State.CONFIRMED).encode()
                out["lower_counter"] = (await request(ctx, _report_msg(uri, lower))).code
                out["after"] = _reports_state(db, "r1")
                fresh = Report(3, State.DOWNLOADED).encode()
                out["fresh"] = (await request(ctx, _report_msg(uri, fresh))).code
        finally:
            down.close()
            up.close()
        return out

    out = _run(go())
    assert out["same_session_answers"] == []
    assert out["other_source_answers"] == []
    assert out["last_again"] == Code.CHANGED
    assert out["older_again"] == Code.CONFLICT
    assert out["reused_counter"] == Code.CONFLICT
    assert out["lower_counter"] == Code.CONFLICT
    assert out["after"] == out["before"]
    rows, dev = out["before"]
    assert [r[1] for r in rows] == [1, 2] and dev[0] == 2
    rows3, dev3 = _reports_state(db, "r1")
    assert out["fresh"] == Code.CHANGED
    assert [r[1] for r in rows3] == [1, 2, 3] and rows3[:2] == rows and dev3[0] == 3
    assert dev3[2] == dev[2] + 1  # exactly one row more in the whole table
    audit = cli_ok("audit", "list", "--data", world.data, "--limit", "50")
    assert re.search(r"device:r1  report  r1  refused  report counter \d", squeeze(audit))


# === #35 Hostile names and content-addressed storage =================================


def _tree(root: Path, ignore: Callable[[Path], bool]) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` (relative) -> (mode, size, mtime_ns) for files and links,
    (mode, 0, 0) for directories (their entries are listed themselves); no symlink is
    followed."""
    out = {}
    for path in sorted(root.rglob("*")):
        if ignore(path):
            continue
        st = path.lstat()
        key = str(path.relative_to(root))
        if stat.S_ISDIR(st.st_mode):
            out[key] = (st.st_mode, 0, 0)
        else:
            out[key] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _is_db(path: Path) -> bool:
    return path.name.startswith("otacoap.db")


HOSTILE_NAMES = [
    "../../etc/x",
    "/abs",
    "/etc/passwd",
    "..%2f..%2fx",
    "%2e%2e/%2e%2e/x",
    "..\\..\\win",
    "..",
    "./.",
    "a/../../../b",
    "nul\x00byte",
    "bell\x07",
    "esc\x1b[31mred",
    "line\nbreak",
    "cr\rx",
    "del\x7f",
    "t\u0445",  # Cyrillic look-alike of "tx"
    "\uff54\uff11",  # fullwidth "t1"
    "t1\u200b",  # zero-width space
    "\u202eevil",  # right-to-left override
    "x" * 4096,
    "a b",
]
# Anything a terminal or log would interpret, or that is not plain ASCII, or too long
# for a DTLS identity, must be refused. Path-like ASCII may be accepted: names are
# metadata (DB keys, DTLS identities), never file names (otacoap/store/names.py).
MUST_REFUSE = [n for n in HOSTILE_NAMES if not (n.isascii() and n.isprintable() and " " not in n)]
MUST_REFUSE += [n for n in HOSTILE_NAMES if len(n) > 32]


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("attacks-names") / "data"
    cli_ok("init", data)
    return data


@pytest.mark.parametrize("kind", ["device", "operator"])
@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: ascii(n)[1:-1][:24])
def test_hostile_names_are_refused_in_one_line_or_kept_as_metadata_only(
    cli_data: Path, kind: str, name: str
) -> None:
    """ATTACKS.md #35: a hostile device id or operator name either gets a one-line,
    printable refusal, or is stored as DB metadata only: in both cases no file anywhere
    under the data dir's parent changes except the SQLite database itself."""
    base = cli_data.parent
    before = _tree(base, _is_db)
    if kind == "device":
        args = ["--vendor-domain", "v.example", "--class-info", "c", "--psk", "00" * 16]
        result = cli("device", "add", "--data", cli_data, name, *args)
    else:
        result = cli("operator", "add", "--data", cli_data, name, "--psk", "00" * 16)
    assert _tree(base, _is_db) == before
    if result.code != 0 or name in MUST_REFUSE:
        assert result.code == 1, result
        assert result.err.startswith(f"otacoap {kind} add: error: "), result.err
        assert result.err.count("\n") == 1 and result.err.rstrip("\n").isprintable()
        assert "Traceback" not in result.err
        listing = cli_ok(kind, "list", "--data", cli_data)
        assert not any(line.split()[0] == name for line in listing.splitlines())
    else:
        shown = cli_ok(kind, "list", "--data", cli_data)
        assert name in shown
    # Looking a hostile name up is a one-line answer too.
    result = cli(kind, "remove", "--data", cli_data, name)
    if result.code != 0:
        assert result.err.count("\n") == 1 and result.err.rstrip("\n").isprintable()
    assert _tree(base, _is_db) == before


def test_network_uploads_only_create_content_addressed_blobs(world: World) -> None:
    """Operator uploads carry no file name at all: hostile Request-Tags, queries and
    paths are only keys or 4.04s. Snapshot the data dir's whole parent around a network
    upload+publish and around refused hostile-path posts: the only new file is the image
    blob, named by its SHA-256, inside the blob store; the temp dir ends empty; nothing
    else changed except the database."""
    s = world.setup
    rel = s.release(CLASS_C, 1, make_image("attacks-c1", 7000))
    base = world.data.parent

    def ignore(p: Path) -> bool:
        return _is_db(p) or p.name.startswith("server-")  # the server log

    before = _tree(base, ignore)
    between: dict[str, tuple[int, int, int]] = {}
    ops = s.operators["ops"]

    def post(
        path: Sequence[str], payload: bytes, tag: bytes, query: Sequence[str] = ()
    ) -> aiocoap.Message:
        m = aiocoap.Message(
            code=Code.POST,
            uri=world.server.uri,
            payload=payload,
            content_format=protocol.CF_IMAGE,
            block1=(0, False, 6),
        )
        m.opt.uri_path = tuple(path)
        m.opt.uri_query = tuple(query)
        m.opt.request_tag = [tag]
        return m

    async def go() -> tuple[list[Code], Code, Code]:
        async with coaps_client(world.server.port, "operator:ops", ops) as ctx:
            refused = []
            for path in (
                ("admin", "image", "..", "..", "..", "escape"),
                ("admin", "..", "..", "escape"),
                ("admin", "image/../../escape"),
                ("admin", "image", "%2e%2e%2fescape"),
                ("admin", "..%2f..%2fescape"),
                ("admin", "/tmp/escape"),
                ("admin", "image\x00.bin"),
            ):
                r = await request(ctx, post(path, b"x" * 100, b"../../etc/passwd"))
                refused.append(r.code)
            await asyncio.sleep(0.2)  # let any (wrongly) started write land
            between.update(_tree(base, ignore))
            uri = world.server.uri
            image = rel.image
            up = await post_blockwise(
                ctx, uri + "/admin/image?name=../../../escape.bin", io.BytesIO(image),
                len(image), content_format=protocol.CF_IMAGE, timeout=5,
                request_tag=b"../../etc/passwd\x00",
            )  # fmt: skip
            env = await post_blockwise(
                ctx, uri + "/admin/release?file=/etc/cron.d/x", io.BytesIO(rel.envelope),
                len(rel.envelope), content_format=protocol.CF_ENVELOPE, timeout=5,
                request_tag=b"/abs/..\\..\\x",
            )  # fmt: skip
            return refused, up.code, env.code

    refused, up_code, env_code = _run(go())
    assert refused == [Code.NOT_FOUND] * len(refused)
    assert (up_code, env_code) == (Code.CHANGED, Code.CHANGED)
    assert between == before  # the refused posts created nothing
    after = _tree(base, ignore)
    digest = hashlib.sha256(rel.image).hexdigest()
    new = sorted(set(after) - set(before))
    assert new == [f"{world.data.name}/blobs/{digest}"], new
    assert set(before) - set(after) == set()
    assert [p for p in before if before[p] != after[p]] == []
    blob = world.data / "blobs" / digest
    assert blob.read_bytes() == rel.image and not blob.is_symlink()
    assert blob.resolve().is_relative_to((world.data / "blobs").resolve())
    assert world.upload_temp_files() == []
    assert re.search(
        rf"(?m)/{CLASS_C}  1  ", squeeze(cli_ok("release", "list", "--data", world.data))
    )


# === #37 Slowloris and never-ending uploads ==========================================


def _upload_block(uri: str, num: int, more: bool, tag: bytes) -> aiocoap.Message:
    msg = aiocoap.Message(
        code=Code.POST,
        uri=uri + "/admin/image",
        payload=os.urandom(1024),
        content_format=protocol.CF_IMAGE,
        block1=(num, more, 6),
    )
    msg.opt.request_tag = [tag]
    return msg


def test_slowloris_uploads_keep_fds_and_memory_bounded_while_a_device_downloads(
    world: World,
) -> None:
    """Three operator peers try to open 11 uploads and never finish them: 4 get slots
    (max_concurrent), 2 per peer at most, the rest 5.03 with Max-Age (no temp file, no
    fd). Two are then drip-fed one block a second, beyond the idle timeout, while the
    other two go idle; meanwhile t1 downloads its whole image. Server fds never exceed
    the baseline by more than the 4 slots; idle uploads expire (later blocks get 4.08),
    their slots go to a waiting peer, and once everything stops the periodic sweep
    deletes every temp file and the fd count returns to the baseline."""
    assert _wait_for(lambda: world.upload_temp_files() == [], IDLE_TIMEOUT + SWEEP_INTERVAL + 2)
    pid = world.server.proc.pid
    uri = world.server.uri
    ops = world.setup.operators["ops"]

    async def warm() -> None:
        async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
            await fetch_blocks(ctx, uri + world.a2.image_uri)
            # A refusal, so the server's DB writer connection is open before the baseline.
            assert (await request(ctx, _upload_block(uri, 0, True, b"t"))).code == Code.FORBIDDEN
        await asyncio.sleep(0.3)

    _run(warm())
    fds_base, rss_base = _fd_count(pid), _rss_kib(pid)
    fd_samples: list[int] = []

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with (
            coaps_client(world.server.port, "operator:ops", ops) as o0,
            coaps_client(world.server.port, "operator:ops", ops) as o1,
            coaps_client(world.server.port, "operator:ops", ops) as o2,
        ):
            first: list[tuple[str, Code, int | None]] = []
            peers = (("o0", o0, b"abc"), ("o1", o1, b"abc"), ("o2", o2, b"abcde"))
            for name, ctx, tags in peers:
                for tag in tags:
                    r = await request(ctx, _upload_block(uri, 0, True, bytes((tag,))))
                    first.append((f"{name}/{chr(tag)}", r.code, r.opt.max_age))
                    pin(r)
            out["first"] = first
            fd_samples.append(_fd_count(pid))

            async def drip() -> list[Code]:
                codes = []
                for num in range(1, 7):  # 6 s of one block a second > idle timeout 3 s
                    await asyncio.sleep(1.0)
                    for tag in b"ab":
                        r = await request(o0, _upload_block(uri, num, True, bytes((tag,))))
                        codes.append(r.code)
                    fd_samples.append(_fd_count(pid))
                return codes

            async def waiting_peer() -> list[Code]:
                codes = []
                for i in range(7):
                    await asyncio.sleep(1.0)
                    r = await request(o2, _upload_block(uri, 0, True, b"w%d" % i))
                    codes.append(r.code)
                    if r.code == Code.CONTINUE:
                        break
                return codes

            async def device() -> tuple[bytes, float]:
                # A slow device: one block every 50 ms, ~5 s for its 98 blocks.
                t0 = time.monotonic()
                image = bytearray()
                async with coaps_client(world.server.port, "t1", world.psk("t1")) as ctx:
                    for num in range(200):
                        r = await get(ctx, uri + world.a2.image_uri, block2=(num, 0, 6))
                        assert r.code == Code.CONTENT, r
                        image += r.payload
                        if not r.opt.block2.more:
                            break
                        await asyncio.sleep(0.05)
                return bytes(image), time.monotonic() - t0

            out["drip"], out["waiting"], out["device"] = await asyncio.gather(
                drip(), waiting_peer(), device()
            )
            # o1's uploads went idle for > 3 s: dropped, so their next block is 4.08.
            r = await request(o1, _upload_block(uri, 1, True, b"a"))
            out["idle_next"] = r.code
        return out

    out = _run(go(), timeout=60)
    first = out["first"]
    accepted = [w for w, code, _ in first if code == Code.CONTINUE]
    busy = [(w, age) for w, code, age in first if code == Code.SERVICE_UNAVAILABLE]
    assert accepted == ["o0/a", "o0/b", "o1/a", "o1/b"], first
    assert len(busy) == 7 and all(age == 7 for _, age in busy), first
    assert out["drip"] == [Code.CONTINUE] * 12
    assert out["waiting"][-1] == Code.CONTINUE and out["waiting"][0] == Code.SERVICE_UNAVAILABLE
    assert out["idle_next"] == Code.REQUEST_ENTITY_INCOMPLETE
    image, seconds = out["device"]
    assert image == world.a2.image and seconds < 15
    assert max(fd_samples) <= fds_base + 4 + 2, (fds_base, fd_samples)
    assert _rss_kib(pid) - rss_base < 15_000

    # Everything stops: the periodic sweep (every 5 s) drops what idled > 3 s.
    deadline = IDLE_TIMEOUT + SWEEP_INTERVAL + 4
    assert _wait_for(lambda: world.upload_temp_files() == [], deadline), world.upload_temp_files()
    assert _wait_for(lambda: _fd_count(pid) <= fds_base, 2.0), (fds_base, _fd_count(pid))
