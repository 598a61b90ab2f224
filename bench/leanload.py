"""A lean CoAP(S) Block2 load generator: raw sockets, epoll, DTLSSocket, hand-made GETs.

Why not aiocoap as the client: an aiocoap request costs a Message, options objects,
a Pipe, a task and timers on the client side too, so with two cores the aiocoap load
generator saturates before the server does (bench/common.py's `run_load` tops out near
the stock server's rate). This one keeps per-request work to what a device must do: one
DTLS record out, one in (tinydtls via DTLSSocket, as aiocoap's own transport uses it),
a GET encoded from a precomputed prefix, and a glance at the response's code.

Each client is its own UDP socket and DTLS session (its own PSK identity), keeps
`window` requests outstanding (1 = RFC 7252 NSTART), and walks the image block by
block, wrapping around. Every 64th response's payload is compared with the image, so a
server answering garbage fails loudly rather than scoring.

Timing is absolute: the parent passes `start_at`/`end_at` (time.time()), so it can read
the server's CPU at the same instants the children start and stop counting. Run as
`python -m bench.leanload SPEC_JSON`; prints one JSON result line.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTLS_EVENT_CONNECTED = 0x01DE
LEVEL_FATAL = 2
CODE_CONTENT = 0x45  # 2.05
TYPE_CON, TYPE_NON, TYPE_ACK, TYPE_RST = 0, 1, 2, 3
OPT_URI_PATH, OPT_BLOCK2 = 11, 23
REQUEST_TIMEOUT = 2.0
HANDSHAKE_TIMEOUT = 5.0
VERIFY_EVERY = 64


def _opt_header(delta: int, length: int) -> bytes:
    """RFC 7252 §3.1 option header with extended delta/length."""

    def nib(v: int) -> tuple[int, bytes]:
        if v < 13:
            return v, b""
        if v < 269:
            return 13, bytes([v - 13])
        return 14, (v - 269).to_bytes(2, "big")

    dn, dx = nib(delta)
    ln, lx = nib(length)
    return bytes([(dn << 4) | ln]) + dx + lx


def path_options(path: str) -> bytes:
    out = b""
    last = 0
    for seg in path.strip("/").split("/"):
        raw = seg.encode()
        out += _opt_header(OPT_URI_PATH - last, len(raw)) + raw
        last = OPT_URI_PATH
    return out


def block2_option(num: int, szx: int, last: int = OPT_URI_PATH) -> bytes:
    v = (num << 4) | szx
    raw = b"" if v == 0 else v.to_bytes((v.bit_length() + 7) // 8, "big")
    return _opt_header(OPT_BLOCK2 - last, len(raw)) + raw


def parse_response(data: bytes) -> tuple[int, int, bytes, int | None, bytes]:
    """(type, code, token, block2 num or None, payload) of a CoAP message."""
    tkl = data[0] & 0x0F
    token = data[4 : 4 + tkl]
    i = 4 + tkl
    number = 0
    num: int | None = None
    n = len(data)
    while i < n:
        b = data[i]
        if b == 0xFF:
            return data[0] >> 4 & 3, data[1], token, num, data[i + 1 :]
        i += 1
        delta, length = b >> 4, b & 0x0F
        if delta == 13:
            delta = data[i] + 13
            i += 1
        elif delta == 14:
            delta = int.from_bytes(data[i : i + 2], "big") + 269
            i += 2
        if length == 13:
            length = data[i] + 13
            i += 1
        elif length == 14:
            length = int.from_bytes(data[i : i + 2], "big") + 269
            i += 2
        number += delta
        if number == OPT_BLOCK2:
            num = int.from_bytes(data[i : i + length], "big") >> 4
        i += length
    return data[0] >> 4 & 3, data[1], token, num, b""


@dataclass
class Stats:
    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    handshakes: int = 0
    bad_payload: int = 0
    counting: bool = False


@dataclass
class Client:
    identity: bytes
    psk: bytes
    server: tuple[str, int]
    secure: bool
    gen: Load
    sock: socket.socket = field(init=False)
    dtls: Any = None
    conn: Any = None
    connected: bool = False
    started: float = 0.0
    mid: int = 0
    token: int = 0
    num: int = 0
    inflight: dict[bytes, tuple[int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock = self._socket()
        self.mid = int.from_bytes(os.urandom(2), "big")

    def _socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.connect(self.server)
        s.setblocking(False)
        return s

    # --- DTLS ------------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.started = now
        self.inflight.clear()
        if not self.secure:
            self.connected = True
            return
        from DTLSSocket import dtls

        self.connected = False
        self.dtls = dtls.DTLS(
            read=self._read,
            write=self._write,
            event=self._event,
            pskId=self.identity,
            pskStore={self.identity: self.psk},
        )
        self.conn = self.dtls.connect("::1", 1234)
        self.gen.stats.handshakes += 1

    def _read(self, sender: Any, data: bytes) -> int:
        self.gen.on_response(self, data)
        return len(data)

    def _write(self, recipient: Any, data: bytes) -> int:
        # A full socket buffer drops the datagram: the request times out and is counted.
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            self.sock.send(data)
        return len(data)

    def _event(self, level: int, code: int) -> None:
        if code == DTLS_EVENT_CONNECTED:
            self.connected = True
            self.gen.fill(self)
        elif level == LEVEL_FATAL:
            self.connected = False
            self.gen.stats.errors += self.gen.stats.counting

    def received(self, data: bytes) -> None:
        if self.secure:
            self.dtls.handleMessage(self.conn, data)
        else:
            self.gen.on_response(self, data)

    def send(self, data: bytes) -> None:
        if self.secure:
            self.dtls.write(self.conn, data)
        else:
            self._write(None, data)

    def close(self) -> None:
        if self.secure and self.dtls is not None and self.conn is not None:
            try:
                self.dtls.close(self.conn)  # close_notify: the server frees the session
                self.dtls.resetPeer(self.conn)
            except Exception:
                pass
            self.conn = None
        self.sock.close()


class Load:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.stats = Stats()
        self.path_opts = path_options(spec["path"])
        self.szx = int(spec["szx"])
        self.block = 16 << self.szx
        self.blocks = int(spec["blocks"])
        self.window = int(spec["window"])
        self.image = Path(spec["image"]).read_bytes() if spec.get("image") else b""
        host, port = spec["host"], int(spec["port"])
        self.clients = [
            Client(d[0].encode(), bytes.fromhex(d[1]), (host, port), bool(spec["secure"]), self)
            for d in spec["devices"]
        ]
        self.by_fd = {c.sock.fileno(): c for c in self.clients}
        # Everything after the token, per block number: built once, not per request.
        self.tails = [self.path_opts + block2_option(n, self.szx) for n in range(self.blocks)]
        self._header = struct.Struct(">BBHI").pack
        self.verify_tick = 0
        self.now = time.monotonic()

    def request(self, c: Client, now: float) -> None:
        c.mid = mid = (c.mid + 1) & 0xFFFF
        c.token = tok = (c.token + 1) & 0xFFFFFFFF
        num = c.num
        c.num = (num + 1) % self.blocks
        head = self._header(0x44, 0x01, mid, tok)  # CON GET, 4-byte token
        c.inflight[head[4:]] = (num, now)
        c.send(head + self.tails[num])

    def fill(self, c: Client) -> None:
        now = time.monotonic()
        self.now = now
        while c.connected and len(c.inflight) < self.window:
            self.request(c, now)

    def on_response(self, c: Client, data: bytes) -> None:
        if len(data) < 4:
            return
        mtype = data[0] >> 4 & 3
        if data[1] == 0:  # empty ACK/RST
            return
        if mtype == TYPE_CON:  # a separate response: acknowledge it (RFC 7252 §4.2)
            c.send(bytes([0x60, 0x00, data[2], data[3]]))
        token = data[4 : 4 + (data[0] & 0x0F)]
        sent = c.inflight.pop(token, None)
        if sent is None:
            return
        st = self.stats
        if st.counting:
            if data[1] == CODE_CONTENT:
                st.ok += 1
                self.verify_tick += 1
                if self.image and self.verify_tick % VERIFY_EVERY == 0:
                    self._verify(data, sent[0])
            else:
                st.errors += 1
        self.request(c, self.now)

    def _verify(self, data: bytes, asked: int) -> None:
        _, _, _, num, payload = parse_response(data)
        off = asked * self.block
        if num != asked or payload != self.image[off : off + self.block]:
            self.stats.bad_payload += 1

    def housekeeping(self, now: float) -> None:
        for c in self.clients:
            if not c.connected:
                if now - c.started > HANDSHAKE_TIMEOUT:
                    c.start(now)
                elif c.dtls is not None:
                    c.dtls.checkRetransmit()
                continue
            stale = [t for t, (_, at) in c.inflight.items() if now - at > REQUEST_TIMEOUT]
            for t in stale:
                del c.inflight[t]
                if self.stats.counting:
                    self.stats.timeouts += 1
            if stale or not c.inflight:
                self.fill(c)

    def run(self) -> dict[str, Any]:
        start_at, end_at = float(self.spec["start_at"]), float(self.spec["end_at"])
        ep = select.epoll()
        for fd in self.by_fd:
            ep.register(fd, select.EPOLLIN)
        now = time.monotonic()
        for c in self.clients:
            c.start(now)
            if not c.secure:
                self.fill(c)
        last_hk = now
        usage0: resource.struct_rusage | None = None
        t0 = 0.0
        by_fd = self.by_fd
        while True:
            wall = time.time()
            if usage0 is None and wall >= start_at:
                usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), wall
                self.stats.counting = True
            if wall >= end_at:
                break
            events = ep.poll(0.05)
            self.now = now = time.monotonic()
            for fd, _ in events:
                # One datagram per readiness: epoll is level-triggered, so anything
                # left is reported by the next poll, and no recv ends in EAGAIN.
                c = by_fd[fd]
                try:
                    data = c.sock.recv(4096)
                except (BlockingIOError, ConnectionRefusedError):
                    continue
                c.received(data)
            if now - last_hk > 0.1:
                last_hk = now
                self.housekeeping(now)
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = time.time() - t0 if usage0 is not None else 0.0
        self.stats.counting = False
        connected = sum(c.connected for c in self.clients)
        for c in self.clients:
            c.close()
        cpu = 0.0
        if usage0 is not None:
            cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        s = self.stats
        return {
            "responses": s.ok,
            "errors": s.errors + s.timeouts + s.bad_payload,
            "timeouts": s.timeouts,
            "bad_payload": s.bad_payload,
            "handshakes": s.handshakes,
            "connected": connected,
            "seconds": elapsed,
            "cpu": cpu,
        }


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(Load(spec).run()), flush=True)


if __name__ == "__main__":
    main()
