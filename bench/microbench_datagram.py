"""The server's per-datagram cost for a DTLS Block2 request, without the kernel.

    .venv/bin/python -m bench.microbench_datagram [--requests 20000] [--rounds 5] [--profile]

A real `OtaServer` (its DTLS pool, fast path, store view) runs in this process; its
socket's transport is swapped for one that keeps what the server sends, and one
DTLSSocket client (as bench/leanload.py uses it) talks to it by calling the pool's
`datagram_received` directly. Only that call is timed: DTLS record decryption, the
fast path, encryption of the answer and the hand-over to `sendto`, i.e. everything
the server does for a request except the kernel's socket work and the event loop's
wake-up. CPU time of this thread, best of `--rounds`: steady on a loaded machine, so it shows
what a change to the per-datagram path saves; bench_block2_throughput measures the
whole process.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/microbench_datagram.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from .fixture import make_fixture
from .leanload import block2_option, path_options

PEER = ("127.0.0.1", 40000)


class _Sink:
    """Stands in for the server socket's transport: keeps every datagram sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 0) if name == "sockname" else default


async def _run(args: argparse.Namespace, data: Path, image_path: str, dev: Any) -> None:
    from DTLSSocket import dtls

    from otacoap.server import OtaServer, ServeOptions
    from otacoap.store import DataDir

    datadir = DataDir(data)
    server = OtaServer(datadir, datadir.config(), ServeOptions(bind="127.0.0.1", port=0))
    await server.start()
    try:
        assert server.dtls is not None
        pool: Any = server.dtls._pool
        real_transport = pool._transport
        sink = _Sink()
        pool._transport = sink
        to_client: list[bytes] = sink.sent
        to_server: list[bytes] = []
        answers: list[bytes] = []
        connected = [False]

        def c_read(sender: Any, data: bytes) -> int:
            answers.append(bytes(data))
            return len(data)

        def c_write(recipient: Any, data: bytes) -> int:
            to_server.append(bytes(data))
            return len(data)

        def c_event(level: int, code: int) -> None:
            if code == 0x01DE:
                connected[0] = True

        ident = dev.identity.encode()
        client = dtls.DTLS(
            read=c_read, write=c_write, event=c_event, pskId=ident, pskStore={ident: dev.psk}
        )
        conn = client.connect("::1", 1234)
        for _ in range(50):  # the handshake: a few flights each way
            while to_server:
                pool.datagram_received(to_server.pop(0), PEER)
            while to_client:
                client.handleMessage(conn, to_client.pop(0))
            if connected[0] and not to_server:
                break
            await asyncio.sleep(0)
        if not connected[0]:
            raise SystemExit("handshake did not complete")
        prefix = path_options(image_path)
        blocks = 256
        requests = []
        for i in range(blocks):
            mid = i.to_bytes(2, "big")
            requests.append(bytes([0x41, 0x01]) + mid + b"\x07" + prefix + block2_option(i, 6))
        # Every round encrypts fresh records: replaying one is what a retransmission
        # looks like, and tinydtls' replay window would drop it.
        prof = cProfile.Profile() if args.profile else None
        best = float("inf")
        for _ in range(args.rounds):
            fresh = []
            for i in range(args.requests):
                client.write(conn, requests[i % blocks])
                fresh.append(to_server.pop())
            to_client.clear()
            received = pool.datagram_received
            clock = time.thread_time
            if prof is not None:
                prof.enable()
            t0 = clock()
            for rec in fresh:
                received(rec, PEER)
            t1 = clock()
            if prof is not None:
                prof.disable()
            if len(to_client) != args.requests:
                raise SystemExit(f"{len(to_client)} answers to {args.requests} requests")
            answers.clear()
            client.handleMessage(conn, to_client[-1])
            if not answers or answers[-1][1] != 0x45:
                raise SystemExit(f"not a 2.05: {answers[-1][:4].hex() if answers else None}")
            to_client.clear()
            best = min(best, (t1 - t0) / args.requests)
            print(f"  {1e6 * (t1 - t0) / args.requests:.2f} µs per request", flush=True)
        print(f"best of {args.rounds}: {1e6 * best:.2f} µs per request (server side, no kernel)")
        # The floor no Python change moves: tinydtls encrypting a response-sized record
        # (the client's context, same cipher suite, same record size).
        size = len(answers[-1])
        payload = bytes(size)
        floor = float("inf")
        for _ in range(args.rounds):
            t0 = time.thread_time()
            for _ in range(2000):
                client.write(conn, payload)
            floor = min(floor, (time.thread_time() - t0) / 2000)
            to_server.clear()
        print(f"tinydtls alone, encrypting one {size}-byte record: {1e6 * floor:.2f} µs")
        # ... and decrypting a request-sized one (the server's session encrypts them,
        # the client decrypts: the same work the server does per request).
        address = pool._connections[PEER]
        small = bytes(len(requests[1]))
        dec = float("inf")
        for _ in range(args.rounds):
            to_client.clear()
            for _ in range(2000):
                address._dtls_socket.write(address._dtls_session, small)
            records, answers[:] = list(to_client), []
            to_client.clear()
            t0 = time.thread_time()
            for rec in records:
                client.handleMessage(conn, rec)
            dec = min(dec, (time.thread_time() - t0) / 2000)
            if len(answers) != len(records):
                raise SystemExit("the client did not decrypt the records")
        print(f"tinydtls alone, decrypting one {len(small)}-byte request: {1e6 * dec:.2f} µs")
        rest = best - floor - dec
        print(f"so the rest (Python, callbacks, bookkeeping): {1e6 * rest:.2f} µs per request")
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        pool._transport = real_transport
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile the timed calls")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="otacoap-micro-") as tmp:
        fx = make_fixture(Path(tmp), 1, 256 * 1024)
        asyncio.run(_run(args, fx.data, fx.image_path, fx.devices[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
