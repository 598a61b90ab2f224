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

Held sessions (bench/bench_server_sessions.py, issue 14 §4): with `interval` > 0 each
client sends one request every `interval` seconds instead of flat out (enough to keep
its session from idle expiry); `max_handshaking` paces the handshakes (the server keeps
at most `max_dtls_handshakes` in progress and lets newer ones push out older ones);
`control`: print an `{"event": "established"}` line once every client's first
handshake is done, then take `start_at`/`end_at` as one JSON line on stdin; `verify`:
after `end_at`, send every client one more request and count the sessions that answer
without a new handshake ("alive").
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
VERIFY_WINDOW = 256  # final liveness requests in flight at once (one per client)
VERIFY_ATTEMPTS = 3


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
    handshakes: int = 0  # started by this client (a retried one counts again)
    sessions: int = 0  # handshakes completed: 1 means its first session held
    next_at: float = 0.0  # with `interval`: when the next request is due
    answered: bool = False  # the final liveness request got a 2.05

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
        self.handshakes += 1
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
            self.sessions += 1
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
        self.interval = float(spec.get("interval", 0.0))  # 0: flat out
        self.max_handshaking = int(spec.get("max_handshaking", 0))  # 0: all at once
        self.verifying = False
        self.waiting = 0  # clients not started yet (handshake pacing)

    def request(self, c: Client, now: float) -> None:
        c.mid = mid = (c.mid + 1) & 0xFFFF
        c.token = tok = (c.token + 1) & 0xFFFFFFFF
        num = c.num
        c.num = (num + 1) % self.blocks
        head = self._header(0x44, 0x01, mid, tok)  # CON GET, 4-byte token
        c.inflight[head[4:]] = (num, now)
        c.next_at = now + self.interval
        c.send(head + self.tails[num])

    def fill(self, c: Client) -> None:
        now = time.monotonic()
        self.now = now
        if self.verifying or (self.interval and now < c.next_at):
            return
        while c.connected and len(c.inflight) < self.window:
            self.request(c, now)
            if self.interval:
                break

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
        if self.verifying:
            c.answered = data[1] == CODE_CONTENT
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
        if not self.interval:
            self.request(c, self.now)

    def _verify(self, data: bytes, asked: int) -> None:
        _, _, _, num, payload = parse_response(data)
        off = asked * self.block
        if num != asked or payload != self.image[off : off + self.block]:
            self.stats.bad_payload += 1

    def housekeeping(self, now: float) -> None:
        handshaking = 0
        for c in self.clients:
            if c.secure and not c.handshakes:
                continue  # not started yet: `admit` starts it
            if not c.connected:
                handshaking += 1
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
        self.admit(now, handshaking)

    def admit(self, now: float, handshaking: int) -> None:
        """Start waiting clients while fewer than `max_handshaking` handshakes run."""
        limit = self.max_handshaking or len(self.clients)
        while self.waiting and handshaking < limit:
            c = self.clients[len(self.clients) - self.waiting]
            self.waiting -= 1
            c.start(now)
            if not c.secure:
                self.fill(c)
            handshaking += c.secure

    def pump(self, ep: select.epoll, timeout: float) -> float:
        """Wait up to `timeout` for datagrams and hand each to its client."""
        events = ep.poll(timeout)
        self.now = now = time.monotonic()
        by_fd = self.by_fd
        for fd, _ in events:
            # One datagram per readiness: epoll is level-triggered, so anything
            # left is reported by the next poll, and no recv ends in EAGAIN.
            c = by_fd[fd]
            try:
                data = c.sock.recv(4096)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            c.received(data)
        return now

    def run(self) -> dict[str, Any]:
        control = bool(self.spec.get("control"))
        start_at = float(self.spec.get("start_at") or "inf")
        end_at = float(self.spec.get("end_at") or "inf")
        ep = select.epoll()
        for fd in self.by_fd:
            ep.register(fd, select.EPOLLIN)
        now = time.monotonic()
        self.waiting = len(self.clients)
        self.admit(now, 0)
        last_hk = now
        usage0: resource.struct_rusage | None = None
        t0 = 0.0
        began = time.time()
        established_at: float | None = None
        while True:
            wall = time.time()
            if usage0 is None and wall >= start_at:
                usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), wall
                self.stats.counting = True
            if wall >= end_at:
                break
            now = self.pump(ep, 0.05)
            if now - last_hk > 0.1:
                last_hk = now
                self.housekeeping(now)
                if (
                    control
                    and established_at is None
                    and not self.waiting
                    and all(c.connected for c in self.clients)
                ):
                    established_at = time.time()
                    event = {"event": "established", "seconds": established_at - began}
                    print(json.dumps(event), flush=True)
                if control and select.select([sys.stdin], [], [], 0)[0]:
                    line = sys.stdin.readline()  # the parent's times, or EOF: stop now
                    times = json.loads(line) if line.strip() else {}
                    start_at = float(times.get("start_at", time.time()))
                    end_at = float(times.get("end_at", time.time()))
                    control = False
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = time.time() - t0 if usage0 is not None else 0.0
        self.stats.counting = False
        connected = sum(c.connected for c in self.clients)
        verified = self.verify(ep) if self.spec.get("verify") else {}
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
            "sessions": sum(c.sessions for c in self.clients),
            "established": sum(c.sessions > 0 for c in self.clients),
            "held": sum(c.connected and c.sessions == 1 for c in self.clients),
            "rehandshaked": sum(c.sessions > 1 for c in self.clients),
            **verified,
        }

    def verify(self, ep: select.epoll) -> dict[str, int]:
        """One more request per client: "alive" counts the sessions that answer it
        2.05 and never completed a second handshake (their first session held)."""
        self.verifying = True
        queue = [c for c in reversed(self.clients) if c.connected]
        attempts: dict[int, int] = {}
        waiting: dict[int, tuple[Client, float]] = {}
        deadline = time.monotonic() + 60.0 + len(self.clients) / 50
        for c in self.clients:
            c.inflight.clear()
            c.answered = False
        while (queue or waiting) and time.monotonic() < deadline:
            now = time.monotonic()
            while queue and len(waiting) < VERIFY_WINDOW:
                c = queue.pop()
                attempts[id(c)] = attempts.get(id(c), 0) + 1
                c.inflight.clear()
                self.request(c, now)
                waiting[id(c)] = (c, now)
            now = self.pump(ep, 0.02)
            for key, (c, sent) in list(waiting.items()):
                if c.answered:
                    del waiting[key]
                elif now - sent > REQUEST_TIMEOUT or not c.connected:
                    del waiting[key]
                    if c.connected and attempts[key] < VERIFY_ATTEMPTS:
                        queue.append(c)
        alive = sum(c.answered and c.sessions == 1 for c in self.clients)
        return {"alive": alive, "answered": sum(c.answered for c in self.clients)}


def raise_fd_limit(needed: int) -> None:
    """One UDP socket per client: lift the soft RLIMIT_NOFILE up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main() -> None:
    spec = json.loads(sys.argv[1])
    raise_fd_limit(len(spec["devices"]) + 64)
    print(json.dumps(Load(spec).run()), flush=True)


if __name__ == "__main__":
    main()
