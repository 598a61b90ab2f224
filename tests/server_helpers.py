"""Helpers for tests that need a real otacoap server (import them from any test).

Typical use::

    from server_helpers import (DeviceSpec, Setup, make_image, make_setup,
                                running_server, coaps_client, get)

    setup = make_setup(tmp_path, devices=[DeviceSpec("t1", CLASS_A)], operators=["ops"])
    release = setup.release("t1", seq=1, image=make_image("fw", 5000))
    setup.publish(release)                       # local `otacoap publish`
    with running_server(setup.data) as server:   # `otacoap serve --port 0` subprocess
        async def go():
            async with coaps_client(server.port, "t1", setup.devices["t1"].psk) as ctx:
                r = await get(ctx, f"{server.uri}/m")
        asyncio.run(go())

`running_server` starts `otacoap serve` as a subprocess on 127.0.0.1 with a free port
(`--port 0`; the port is read from its "listening on coaps://..." line) and always
stops it (SIGTERM, then SIGKILL). `threaded_server` runs the same server in a thread
of this process when a test wants to look at its internals. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiocoap
from aiocoap.numbers.codes import Code

from otacoap.cli import main as cli_main
from otacoap.core import cose, ids, suit
from otacoap.core.build import Release, build_envelope
from otacoap.fsutil import atomic_write

if TYPE_CHECKING:
    from otacoap.store import ReportRecord

ROOT = Path(__file__).resolve().parent.parent
OTACOAP_CMD = [sys.executable, "-c", "import sys; from otacoap.cli import main; sys.exit(main())"]
HOST = "127.0.0.1"
VENDOR = "acme-devices.example"
CLASS_A = "thermostat-t1"
CLASS_B = "soil-sensor-s3"

_LISTENING = re.compile(r"listening on coaps://(\S+):(\d+)")
_PLAIN = re.compile(r"coap://(\S+):(\d+)")


# --- CLI --------------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def cli(*args: str | os.PathLike[str]) -> CliResult:
    """Run `otacoap ARGS` in this process (fast); capture exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli_main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


def squeeze(table: str) -> str:
    """A text table with its column padding reduced to two spaces, so a test can look
    for "device:t1  admin" whatever the widths of the other rows."""
    return re.sub(r" {2,}", "  ", table)


def cli_ok(*args: str | os.PathLike[str]) -> str:
    result = cli(*args)
    if result.code != 0:
        raise AssertionError(f"otacoap {' '.join(map(str, args))} failed: {result.err}")
    return result.out


# --- data -------------------------------------------------------------------------


def make_image(name: str, size: int) -> bytes:
    """Deterministic firmware bytes (SHA-256 counter stream seeded by `name`)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@dataclass(frozen=True)
class DeviceSpec:
    id: str
    class_info: str = CLASS_A
    vendor_domain: str = VENDOR
    psk: bytes = b""  # empty: 16 random bytes

    def with_psk(self) -> DeviceSpec:
        return (
            self
            if self.psk
            else DeviceSpec(self.id, self.class_info, self.vendor_domain, os.urandom(16))
        )


@dataclass(frozen=True)
class ReleaseFiles:
    seq: int
    class_info: str
    image: bytes
    envelope: bytes
    image_path: Path
    envelope_path: Path

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.image).digest()

    @property
    def image_id(self) -> str:
        return ids.image_id(self.digest)

    @property
    def image_uri(self) -> str:
        return ids.image_uri(self.digest)


@dataclass
class Setup:
    """An initialised data directory plus the secrets a test needs to talk to it."""

    data: Path
    key: cose.SigningKey
    key_pub: Path
    devices: dict[str, DeviceSpec] = field(default_factory=dict)
    operators: dict[str, bytes] = field(default_factory=dict)

    def release(
        self,
        class_info: str,
        seq: int,
        image: bytes,
        *,
        vendor_domain: str = VENDOR,
        uri: str | None = None,
        key: cose.SigningKey | None = None,
        size: int | None = None,
        digest: bytes | None = None,
    ) -> ReleaseFiles:
        """Build and sign an envelope for `image`; `size`/`digest` override what it states."""
        real = hashlib.sha256(image).digest()
        rel = Release(
            digest if digest is not None else real,
            size if size is not None else len(image),
            vendor_domain,
            class_info,
            seq,
            uri if uri is not None else ids.image_uri(real),
        )
        envelope = suit.encode_envelope(build_envelope(rel, key or self.key))
        stem = f"{class_info}-{seq}-{real.hex()[:8]}"
        out = self.data.parent / "releases"
        out.mkdir(exist_ok=True)
        image_path, env_path = out / f"{stem}.bin", out / f"{stem}.suit"
        atomic_write(image_path, image)
        atomic_write(env_path, envelope)
        return ReleaseFiles(seq, class_info, image, envelope, image_path, env_path)

    def publish(self, release: ReleaseFiles) -> str:
        return cli_ok("publish", "--data", self.data, release.envelope_path, release.image_path)

    def add_device(self, spec: DeviceSpec) -> DeviceSpec:
        spec = spec.with_psk()
        cli_ok(
            "device", "add", "--data", self.data, spec.id,
            "--vendor-domain", spec.vendor_domain, "--class-info", spec.class_info,
            "--psk", spec.psk.hex(),
        )  # fmt: skip
        self.devices[spec.id] = spec
        return spec

    def add_operator(self, name: str, psk: bytes | None = None) -> bytes:
        psk = psk or os.urandom(16)
        cli_ok("operator", "add", "--data", self.data, name, "--psk", psk.hex())
        self.operators[name] = psk
        return psk


def make_setup(
    base: Path,
    *,
    devices: Sequence[DeviceSpec] = (),
    operators: Sequence[str] = (),
    config: str | None = None,
    store_url: str = "",
) -> Setup:
    """`otacoap init` a data dir under `base`, trust a fresh ES256 key, register all;
    `store_url`: keep the store in that PostgreSQL database (`init --store`)."""
    data = base / "data"
    cli_ok("init", data, *(["--store", store_url] if store_url else []))
    if config is not None:
        if store_url:
            config += f"\n[store]\nurl = {json.dumps(store_url)}\n"
        atomic_write(data / "config.toml", config.encode())
    key = cose.generate_key("es256")
    pub = base / "signing.pub"
    atomic_write(pub, key.public.public_pem())
    cli_ok("trust", "add", "--data", data, pub)
    setup = Setup(data, key, pub)
    for spec in devices:
        setup.add_device(spec)
    for name in operators:
        setup.add_operator(name)
    return setup


@dataclass
class SessionRemote:
    """What the server reads of an aiocoap remote: its DTLS session's claims, its scheme
    and its block-size limit. For calling a resource or the /fw fast path without sockets."""

    authenticated_claims: list[Any]
    scheme: str = "coaps"
    maximum_block_size_exp: int = 6


# --- a server subprocess ------------------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    host: str
    port: int
    plain_port: int | None
    log_path: Path
    lines: list[str]

    @property
    def uri(self) -> str:
        return f"coaps://{self.host}:{self.port}"

    @property
    def plain_uri(self) -> str:
        return f"coap://{self.host}:{self.plain_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return int(self.proc.returncode)


def start_server(
    data: Path,
    *,
    args: Sequence[str] = (),
    port: int = 0,
    timeout: float = 20.0,
    verbose: bool = False,
) -> ServerProcess:
    """Start `otacoap serve` and wait (bounded) for its "listening on" line."""
    log_path = data.parent / f"server-{time.monotonic_ns()}.log"
    cmd = [*OTACOAP_CMD]
    if verbose:
        cmd.append("-vv")
    cmd += ["serve", "--data", str(data), "--bind", HOST, "--port", str(port), *args]
    if "--workers" not in args:
        # One process, as these tests were written for (`serve` defaults to one worker
        # per core; tests/test_serve_workers.py asks for workers explicitly).
        cmd += ["--workers", "1"]
    log_file = open(log_path, "w")  # noqa: SIM115 - owned by the child, closed below
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True, bufsize=1
    )
    log_file.close()
    lines: list[str] = []
    found: list[tuple[str, int]] = []
    ready = threading.Event()

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m:
                found.append((m.group(1), int(m.group(2))))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(
            f"otacoap serve did not start: {lines} {log_path.read_text(errors='replace')}"
        )
    plain_port = None
    for text in log_path.read_text(errors="replace").splitlines():
        m = _PLAIN.search(text)
        if m and "--insecure-plain-coap" in text:
            plain_port = int(m.group(2))
    return ServerProcess(proc, found[0][0], found[0][1], plain_port, log_path, lines)


@contextlib.contextmanager
def running_server(data: Path, **kwargs: object) -> Iterator[ServerProcess]:
    server = start_server(data, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


# --- an in-process server (in its own thread and loop) ----------------------------


class ThreadedServer:
    """`OtaServer` on its own event loop in a thread, for tests that inspect it."""

    def __init__(self, data: Path, **options: object) -> None:
        from otacoap.server import OtaServer, ServeOptions
        from otacoap.store import DataDir

        datadir = DataDir(data)
        self.server = OtaServer(
            datadir,
            datadir.config(),
            ServeOptions(bind=HOST, port=0, loop="asyncio", **options),  # type: ignore[arg-type]
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=20)
        except BaseException:
            self._stop_loop()
            raise
        self.port = self.server.dtls_port
        self.uri = f"coaps://{HOST}:{self.port}"

    def call(self, fn: object, timeout: float = 10.0) -> object:
        """Run a plain callable on the server's loop and return its result."""

        async def wrapper() -> object:
            return fn()  # type: ignore[operator]

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=20)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@contextlib.contextmanager
def threaded_server(data: Path, **options: object) -> Iterator[ThreadedServer]:
    server = ThreadedServer(data, **options)
    try:
        yield server
    finally:
        server.stop()


# --- DTLS clients -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def coaps_client(port: int, identity: str, psk: bytes) -> AsyncIterator[aiocoap.Context]:
    """An aiocoap client context using DTLS-PSK (identity, psk) for 127.0.0.1:port."""
    ctx = await aiocoap.Context.create_client_context()
    ctx.client_credentials.load_from_dict(
        {
            f"coaps://{HOST}:{port}/*": {
                "dtls": {"psk": {"hex": psk.hex()}, "client-identity": {"ascii": identity}}
            }
        }
    )
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def request(
    ctx: aiocoap.Context, msg: aiocoap.Message, timeout: float = 5.0
) -> aiocoap.Message:
    return await asyncio.wait_for(ctx.request(msg, handle_blockwise=False).response, timeout)


async def get(
    ctx: aiocoap.Context,
    uri: str,
    *,
    block2: tuple[int, int, int] | None = None,
    timeout: float = 5.0,
) -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.GET, uri=uri)
    if block2 is not None:
        msg.opt.block2 = block2
    return await request(ctx, msg, timeout)


async def fetch_blocks(
    ctx: aiocoap.Context, uri: str, *, start: int = 0, szx: int = 6, timeout: float = 5.0
) -> bytes:
    """Explicit Block2 loop from block `start` to the end (like a device does)."""
    out = bytearray()
    num = start
    for _ in range(1 << 16):
        r = await get(ctx, uri, block2=(num, 0, szx), timeout=timeout)
        if r.code != Code.CONTENT:
            raise AssertionError(f"{uri} block {num}: {r.code} {r.payload!r}")
        out += r.payload
        if not r.opt.block2.more:
            return bytes(out)
        num = r.opt.block2.block_number + 1
    raise AssertionError("too many blocks")


def run(coro: object, timeout: float = 60.0) -> object:
    """asyncio.run with an overall bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


# --- libcoap -----------------------------------------------------------------------


def coap_client(
    uri: str,
    identity: str,
    psk: bytes,
    *args: str,
    out: Path | None = None,
    timeout: float = 5.0,
) -> subprocess.CompletedProcess[str]:
    """libcoap's `coap-client-openssl` with DTLS-PSK; `psk` must be printable ASCII
    (libcoap 4.3.1 takes -k as text, not hex)."""
    cmd = [
        "coap-client-openssl",
        "-B",
        str(int(timeout)),
        "-u",
        identity,
        "-k",
        psk.decode("ascii"),
    ]
    if out is not None:
        cmd += ["-o", str(out)]
    cmd += [*args, uri]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)


@contextlib.asynccontextmanager
async def dtls_relay(
    server_port: int, forward: Callable[[bytes, bool], bool]
) -> AsyncIterator[int]:
    """A UDP relay on loopback in front of `server_port` for one client; yields its port.

    `forward(datagram, from_server)` decides, datagram by datagram, whether it goes on:
    the way to lose exactly one DTLS record of a handshake, deterministically.
    """
    loop = asyncio.get_running_loop()

    class Relay(asyncio.DatagramProtocol):
        client: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            from_server = addr[1] == server_port
            if not from_server:
                self.client = addr
            if forward(data, from_server):
                self.transport.sendto(data, self.client if from_server else (HOST, server_port))

    relay, _ = await loop.create_datagram_endpoint(Relay, local_addr=(HOST, 0))
    try:
        yield relay.get_extra_info("sockname")[1]
    finally:
        relay.close()


def python_m(module: str, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS`, as a user would type it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def device_cli(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """`python -m device_sim ARGS`."""
    return python_m("device_sim", *args, timeout=timeout)


def device_provision(
    flash: Path,
    setup: Setup,
    device: str,
    factory: ReleaseFiles,
    *extra: str,
    slot_size: str = "128K",
) -> None:
    """`python -m device_sim provision` for `device` of `setup` (its PSK, vendor and class),
    trusting the setup's signing key, running `factory`; `extra`: more provision options."""
    spec = setup.devices[device]
    done = device_cli(
        "provision", "--flash", str(flash), "--id", device, "--psk", spec.psk.hex(),
        "--vendor-domain", spec.vendor_domain, "--class-info", spec.class_info,
        "--trust", str(setup.key_pub), "--factory-image", str(factory.image_path),
        "--factory-envelope", str(factory.envelope_path), "--slot-size", slot_size, *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def device_run_once(flash: Path, uri: str) -> dict[str, Any]:
    """`python -m device_sim run --once --json` against `uri`: it must exit 0; its last
    JSON line (the outcome) is returned."""
    run = device_cli("run", "--flash", str(flash), "--server", uri, "--once", "--json")
    assert run.returncode == 0, run.stderr + run.stdout
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def device_reports(data: Path, device: str) -> list[ReportRecord]:
    """The reports the server's store holds for `device`, in the device's counter order."""
    from otacoap.store import DataDir

    store = DataDir(data).open_store()
    try:
        return sorted(store.list_reports(device, 100), key=lambda r: r.counter)
    finally:
        store.close()


class Author:
    """A data directory (one device, `dev-1`) whose trust list holds an author key made
    by `otacoap keygen`, and `otacoap manifest build` as that author types it."""

    def __init__(self, tmp: Path) -> None:
        self.setup = make_setup(tmp, devices=[DeviceSpec("dev-1")])
        self.data = self.setup.data
        self.dir = tmp
        cli_ok("keygen", "--out", tmp / "author")
        cli_ok("trust", "add", "--data", self.data, tmp / "author.pub")

    def file(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        atomic_write(path, data)
        return path

    def build(self, image: Path, seq: int, out: str, *extra: str | Path) -> Path:
        cli_ok(
            "manifest", "build", "--image", image, "--vendor-domain", VENDOR,
            "--class-info", CLASS_A, "--seq", str(seq), "--key", self.dir / "author",
            "-o", self.dir / out, *extra,
        )  # fmt: skip
        return self.dir / out


def report_trail(setup: Setup, device: str) -> list[tuple[int, str, int | None]]:
    """(counter, state, sequence number) of each report the store holds for `device`, in
    the store's order."""
    from otacoap.store import DataDir

    store = DataDir(setup.data).open_store()
    try:
        return [(r.counter, r.state, r.sequence_number) for r in store.list_reports(device, 1000)]
    finally:
        store.close()


def assert_no_report_lost(setup: Setup, rigs: dict[str, object], seq: int) -> None:
    """Every device's reports are stored, counters without a gap, ending in its
    confirmation of `seq`; nothing is left in any device's outbox."""
    for d, rig in rigs.items():
        reports = report_trail(setup, d)
        counters = [c for c, _, _ in reports]
        assert counters == list(range(counters[0], counters[0] + len(counters))), d
        assert reports[-1][1:] == ("confirmed", seq), d
        assert rig.info()["queued_reports"] == 0  # type: ignore[attr-defined]


def campaign_admissions(setup: Setup) -> list[str]:
    """The devices the `campaign.admit` audit entries name, in order; the audit chain
    must verify."""
    from otacoap.store import DataDir

    store = DataDir(setup.data).open_store()
    try:
        admitted: list[str] = []
        for e in store.audit_entries():
            if e.action == "campaign.admit":
                admitted += e.detail.split(": ", 1)[1].split()
        store.verify_audit()
    finally:
        store.close()
    return admitted
