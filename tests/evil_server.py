"""H1 (ATTACKS.md): a hostile CoAP/DTLS server holding the devices' real PSKs.

It stands for a compromised server, mirror or CDN (the TUF/Uptane threat model): the
channel is authentic, the content is not. Each test scripts what it serves through a
mutable `Script`: crafted envelopes, images, and Block2 streams that break the rules
(wrong NUM, SZX 7, larger blocks, extra or missing bytes, endless M=1, another image of
the same length, slow or stalled responses). It counts every request, logs every Block2
request it got, and decodes every report the device posts, so tests can assert "no
Block2 request was made" and "the failure was reported with reason X".

The module also carries the helpers the device tests share: manifest crafting (down to
hand-built CBOR and COSE for malformed cases), device provisioning, a flash that
records where it was written, and the oracles O1-O5.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from device_sim.agent import AgentConfig, DeviceAgent, Outcome, RunResult
from device_sim.bootloader import Bootloader
from device_sim.fetcher import FetchConfig
from device_sim.firmware import make_image
from device_sim.flash import SimFlash
from device_sim.layout import open_flash
from device_sim.provision import inspect, provision
from otacoap.core import blockwise, build, cbor, cose, ids, suit
from otacoap.core.build import MAIN_COMPONENT, REP_ALL, REP_FAILURE
from otacoap.core.errors import OtaError
from otacoap.core.report import Report, decode_report

VENDOR = "acme.example"
CLASS = "thermostat-t1"
DEVICE_ID = "dev-001"
PSK = bytes.fromhex("00112233445566778899aabbccddeeff")


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port free now, for a server started next. Taken below the kernel's
    ephemeral range: a port the kernel handed out for port 0 could be handed out again
    to any client socket before the server binds it ("Address already in use", seen
    with a fleet running beside the suite); below the range only an explicit bind can
    take it."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 8192), low) if low > 2048 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free UDP port below the ephemeral range")


# --- crafting manifests -------------------------------------------------------------------


def manifest_bytes(
    *,
    image: bytes | None = None,
    digest: bytes | None = None,
    size: Any = None,
    seq: Any = 1,
    vendor: str = VENDOR,
    klass: str = CLASS,
    uri: str | None = None,
    components: list[list[bytes]] | None = None,
    device_uuid: bytes | None = None,
    validate: bool = True,
    invoke: bool = True,
    encryption_info: bytes | None = None,
) -> bytes:
    """A SUIT_Manifest encoding shaped like core.build's, with every knob exposed.

    Values are put into the CBOR as given (no validation), so tests can craft negative
    sizes, bignum or float sequence numbers, foreign components and so on.
    """
    if digest is None:
        assert image is not None
        digest = hashlib.sha256(image).digest()
    if size is None:
        assert image is not None
        size = len(image)
    vendor_id = ids.vendor_id(vendor)
    class_id = ids.class_id(vendor_id, klass)
    params: dict[int, Any] = {
        suit.P_VENDOR_ID: vendor_id,
        suit.P_CLASS_ID: class_id,
        suit.P_IMAGE_DIGEST: cbor2.dumps([suit.DIGEST_SHA256, digest]),
        suit.P_IMAGE_SIZE: size,
    }
    shared_cmds: list[Any] = [suit.CMD_OVERRIDE_PARAMETERS, params]
    shared_cmds += [suit.CMD_VENDOR_IDENTIFIER, REP_ALL, suit.CMD_CLASS_IDENTIFIER, REP_ALL]
    if device_uuid is not None:
        params[suit.P_DEVICE_ID] = device_uuid
        shared_cmds += [suit.CMD_DEVICE_IDENTIFIER, REP_ALL]
    comps = components if components is not None else [list(MAIN_COMPONENT)]
    if len(comps) > 1:
        shared_cmds = [suit.CMD_SET_COMPONENT_INDEX, True, *shared_cmds]
    common = {suit.C_COMPONENTS: comps, suit.C_SHARED_SEQUENCE: cbor2.dumps(shared_cmds)}
    install_uri = uri if uri is not None else ids.image_uri(digest)
    fetch_params: dict[int, Any] = {suit.P_URI: install_uri}
    if encryption_info is not None:
        fetch_params[suit.P_ENCRYPTION_INFO] = encryption_info
    install = [
        suit.CMD_OVERRIDE_PARAMETERS,
        fetch_params,
        suit.CMD_FETCH,
        REP_FAILURE,
        suit.CMD_IMAGE_MATCH,
        REP_ALL,
    ]
    if len(comps) > 1:
        install = [suit.CMD_SET_COMPONENT_INDEX, True, *install]
    body: dict[int, Any] = {
        suit.M_VERSION: 1,
        suit.M_SEQUENCE_NUMBER: seq,
        suit.M_COMMON: cbor2.dumps(common),
        suit.M_INSTALL: cbor2.dumps(install),
    }
    if validate:
        body[suit.M_VALIDATE] = cbor2.dumps([suit.CMD_IMAGE_MATCH, REP_ALL])
    if invoke:
        body[suit.M_INVOKE] = cbor2.dumps([suit.CMD_INVOKE, REP_FAILURE])
    return cbor2.dumps(body, canonical=True)


def digest_bytes(manifest_raw: bytes) -> bytes:
    """The SUIT_Digest encoding over the bstr-wrapped manifest (manifest-34 §8.3)."""
    return cbor2.dumps([suit.DIGEST_SHA256, hashlib.sha256(cbor2.dumps(manifest_raw)).digest()])


def envelope_bytes(
    manifest_raw: bytes,
    blocks: list[bytes],
    *,
    digest_raw: bytes | None = None,
    extra: dict[Any, Any] | None = None,
) -> bytes:
    """A tagged SUIT_Envelope around exactly these bytes (no checks)."""
    auth = [digest_raw if digest_raw is not None else digest_bytes(manifest_raw), *blocks]
    env: dict[Any, Any] = {suit.ENV_AUTH: cbor2.dumps(auth), suit.ENV_MANIFEST: manifest_raw}
    if extra:
        env.update(extra)
    return cbor2.dumps(cbor2.CBORTag(suit.ENVELOPE_TAG, env), canonical=True)


def sign(manifest_raw: bytes, key: cose.SigningKey, **kw: Any) -> bytes:
    """A correctly signed envelope (COSE_Sign1, detached payload = the SUIT_Digest)."""
    return envelope_bytes(manifest_raw, [cose.sign1(digest_bytes(manifest_raw), key)], **kw)


def multi_envelope(key: cose.SigningKey, main: bytes, aux: bytes, seq: int, **kw: Any) -> bytes:
    """A genuine two-component release (core.build): `main` is component 0, `aux` 1."""
    rel = build.Release(
        hashlib.sha256(main).digest(),
        len(main),
        VENDOR,
        CLASS,
        seq,
        more=(build.ComponentImage(hashlib.sha256(aux).digest(), len(aux)),),
        **kw,
    )
    return suit.encode_envelope(build.build_envelope(rel, key))


def release(key: cose.SigningKey, image: bytes, seq: int, **kw: Any) -> tuple[bytes, bytes]:
    """(envelope, image) for a genuine release."""
    return sign(manifest_bytes(image=image, seq=seq, **kw), key), image


# --- the evil server ----------------------------------------------------------------------

BlockAnswer = tuple[bytes, tuple[int, bool, int] | None]
BlockScript = Callable[[bytes, int, int], BlockAnswer | None]


def honest_block(image: bytes, num: int, szx: int) -> BlockAnswer:
    szx_used, piece = blockwise.server_slice(len(image), num, szx)
    size = blockwise.size_of(szx_used)
    payload = image[piece.offset : piece.offset + piece.length]
    return payload, (piece.offset // size, piece.more, szx_used)


@dataclass
class Script:
    """What the evil server serves; tests mutate it freely, even mid-transfer."""

    envelope: bytes | None = None
    images: dict[str, bytes] = field(default_factory=dict)
    # (image, num, szx) -> (payload, (NUM, M, SZX) or None for no Block2) or None to stall
    block: BlockScript = honest_block
    manifest_endless: bool = False
    delay: float = 0.0  # seconds before every /fw response
    manifest_delay: float = 0.0
    size2: int | None = None  # None: the real size
    report_code: Code = Code.CHANGED
    drop_reports: bool = False  # never answer POST /r (server "unreachable" for reports)
    # /a?v=N answers anchor_lists[N + 1]; /t?n=HEX answers freshness(nonce) (None: 4.04)
    anchor_lists: dict[int, bytes] = field(default_factory=dict)
    freshness: Callable[[bytes], bytes | None] | None = None


@dataclass
class Logged:
    path: str
    num: int | None
    szx: int | None


class _Creds:
    """aiocoap server credentials: identity -> (PSK, claims). Claims must be hashable."""

    def __init__(self, psks: dict[str, bytes]) -> None:
        self.psks = psks

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, str]:
        name = identity.decode("ascii", "replace")
        return self.psks[name], name


class EvilServer:
    """An aiocoap DTLS server on 127.0.0.1 whose answers come from a Script."""

    def __init__(self, psks: dict[str, bytes] | None = None, script: Script | None = None):
        self.psks = psks if psks is not None else {DEVICE_ID: PSK}
        self.script = script or Script()
        self.log: list[Logged] = []
        self.reports: list[Report] = []
        self.bad_reports = 0
        self.last_counters: dict[str, int] = {}
        self.reporters: list[str] = []  # DTLS identity of each accepted report
        self.manifest_requests = 0
        self.block_requests = 0
        self.anchor_requests = 0
        self.freshness_requests = 0
        self.port = 0
        self._ctx: aiocoap.Context | None = None
        self._stop = asyncio.Event()

    @property
    def base_uri(self) -> str:
        return f"coaps://127.0.0.1:{self.port}"

    async def start(self, port: int | None = None) -> EvilServer:
        # aiocoap's tinydtls_server listens on the bind port + 1 (COAPS_PORT - COAP_PORT).
        self.port = port or free_udp_port()
        self._ctx = await aiocoap.Context.create_server_context(
            self,
            bind=("127.0.0.1", self.port - 1),
            transports=["tinydtls_server"],
            server_credentials=_Creds(self.psks),
        )
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                await self._ctx.shutdown()
        self._ctx = None

    async def __aenter__(self) -> EvilServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def block_log(self, path: str | None = None) -> list[tuple[int | None, int | None]]:
        return [
            (e.num, e.szx)
            for e in self.log
            if e.path.startswith("/fw/") and (path is None or e.path == path)
        ]

    def states(self) -> list[str]:
        return [r.state.value for r in self.reports]

    # aiocoap site interface ---------------------------------------------------------------

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        path = "/" + "/".join(request.opt.uri_path)
        b2 = request.opt.block2
        num, szx = (b2.block_number, b2.size_exponent) if b2 is not None else (None, None)
        self.log.append(Logged(path, num, szx))
        response = await self._answer(request, path, num, szx)
        if response is not None:
            pipe.add_response(response, is_last=True)

    async def _answer(
        self, request: Any, path: str, num: int | None, szx: int | None
    ) -> Message | None:
        s = self.script
        if path == "/m" and request.code == Code.GET:
            self.manifest_requests += 1
            if s.manifest_delay:
                await self._sleep(s.manifest_delay)
            if s.manifest_endless:
                n, z = num or 0, szx if szx is not None else 6
                size = blockwise.size_of(min(z, 6))
                return Message(
                    code=Code.CONTENT,
                    payload=b"\xa0" * size,
                    block2=BlockOption.BlockwiseTuple(n, True, min(z, 6)),
                    size2=1 << 32,
                )
            if s.envelope is None:
                return Message(code=Code.NOT_FOUND)
            payload, opt = honest_block(s.envelope, num or 0, szx if szx is not None else 6)
            return _content(payload, opt, len(s.envelope), b"env")
        if path in ("/a", "/t") and request.code == Code.GET:
            return self._anchors_or_freshness(path, tuple(request.opt.uri_query), num, szx)
        if path == "/r" and request.code == Code.POST:
            if s.drop_reports:
                await self._sleep(3600)
                return None
            try:
                report = decode_report(request.payload)
            except OtaError:
                self.bad_reports += 1
                return Message(code=Code.BAD_REQUEST)
            # Identity comes from the DTLS session only (ATTACKS.md #33); the counter
            # must grow per device (#28).
            claims = getattr(request.remote, "authenticated_claims", None) or ["?"]
            who = str(claims[0])
            if report.counter <= self.last_counters.get(who, 0):
                self.bad_reports += 1
                return Message(code=Code.BAD_REQUEST)
            if s.report_code == Code.CHANGED:
                self.last_counters[who] = report.counter
                self.reports.append(report)
                self.reporters.append(who)
            return Message(code=s.report_code)
        if path.startswith("/fw/") and request.code == Code.GET:
            self.block_requests += 1
            image = s.images.get(path)
            if image is None:
                return Message(code=Code.NOT_FOUND)
            if s.delay:
                await self._sleep(s.delay)
            answer = s.block(image, num or 0, szx if szx is not None else 6)
            if answer is None:
                await self._sleep(3600)  # stall: never answer this one
                return None
            payload, opt = answer
            size2 = s.size2 if s.size2 is not None else len(image)
            return _content(payload, opt, size2, hashlib.sha256(image).digest()[:8])
        return Message(code=Code.NOT_FOUND)

    def _anchors_or_freshness(
        self, path: str, query: tuple[str, ...], num: int | None, szx: int | None
    ) -> Message:
        s = self.script
        name, _, value = query[0].partition("=") if len(query) == 1 else ("", "", "")
        try:
            if path == "/a" and name == "v":
                self.anchor_requests += 1
                body = s.anchor_lists.get(int(value) + 1)
            elif path == "/t" and name == "n":
                self.freshness_requests += 1
                body = s.freshness(bytes.fromhex(value)) if s.freshness else None
            else:
                return Message(code=Code.BAD_REQUEST)
        except ValueError:
            return Message(code=Code.BAD_REQUEST)
        if body is None:
            return Message(code=Code.NOT_FOUND)
        payload, opt = honest_block(body, num or 0, szx if szx is not None else 6)
        return _content(payload, opt, len(body), b"anc")

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # unused parts of the aiocoap resource interface
    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False


def _content(payload: bytes, opt: tuple[int, bool, int] | None, size2: int, etag: bytes) -> Message:
    msg = Message(code=Code.CONTENT, payload=payload, content_format=60, etag=etag)
    if opt is not None:
        msg.opt.block2 = BlockOption.BlockwiseTuple(opt[0], opt[1], opt[2])
        msg.opt.size2 = size2
    return msg


# --- Block2 scripts for the attack matrix ---------------------------------------------------


def at_block(k: int, bad: BlockScript) -> BlockScript:
    """Honest until block k, then `bad`."""

    def script(image: bytes, num: int, szx: int) -> BlockAnswer | None:
        return bad(image, num, szx) if num >= k else honest_block(image, num, szx)

    return script


def wrong_num(image: bytes, num: int, szx: int) -> BlockAnswer:
    payload, _ = honest_block(image, num + 1, szx)
    return payload, (num + 1, True, szx)


def szx7(image: bytes, num: int, szx: int) -> BlockAnswer:
    payload, (n, m, _) = honest_block(image, num, szx)  # type: ignore[misc]
    return payload, (n, m, 7)


def larger_block(image: bytes, num: int, szx: int) -> BlockAnswer:
    size = blockwise.size_of(szx)
    return image[num * size : num * size + 2 * size], (num, True, szx)


def raised_szx(image: bytes, num: int, szx: int) -> BlockAnswer:
    bigger = min(szx + 1, 6)
    size = blockwise.size_of(bigger)
    return image[num * size : (num + 1) * size], (num, True, bigger)


def endless(image: bytes, num: int, szx: int) -> BlockAnswer:
    size = blockwise.size_of(szx)
    chunk = image[num * size : (num + 1) * size]
    return chunk + b"\x00" * (size - len(chunk)), (num, True, szx)


def last_block(image: bytes, szx: int) -> int:
    return blockwise.block_count(len(image), szx) - 1


def extra_byte(image: bytes, num: int, szx: int) -> BlockAnswer:
    payload, opt = honest_block(image, num, szx)
    if num == last_block(image, szx):
        payload += b"\x00"
    return payload, opt


def extra_block(image: bytes, num: int, szx: int) -> BlockAnswer:
    payload, (n, m, z) = honest_block(image, num, szx)  # type: ignore[misc]
    if num == last_block(image, szx):
        return payload, (n, True, z)
    return payload, (n, m, z)


def short_byte(image: bytes, num: int, szx: int) -> BlockAnswer:
    payload, opt = honest_block(image, num, szx)
    if num == last_block(image, szx):
        payload = payload[:-1]
    return payload, opt


def short_block(image: bytes, num: int, szx: int) -> BlockAnswer:
    payload, (n, m, z) = honest_block(image, num, szx)  # type: ignore[misc]
    if num == last_block(image, szx) - 1:
        return payload, (n, False, z)
    return payload, (n, m, z)


def substitute(other: bytes) -> BlockScript:
    """Serve another image of the same length (ATTACKS.md #10)."""

    def script(image: bytes, num: int, szx: int) -> BlockAnswer:
        return honest_block(other, num, szx)

    return script


def stall_from(k: int) -> BlockScript:
    def script(image: bytes, num: int, szx: int) -> BlockAnswer | None:
        return None if num >= k else honest_block(image, num, szx)

    return script


def no_block2(image: bytes, num: int, szx: int) -> BlockAnswer:
    payload, _ = honest_block(image, num, szx)
    return payload, None


# --- flash that records where it was written ------------------------------------------------


class RecordingFlash(SimFlash):
    """SimFlash that logs every erase and write range (for O1: who wrote where)."""

    ops_log: list[tuple[str, int, int]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ops_log = []
        RecordingFlash.instances.append(self)

    instances: list[RecordingFlash] = []  # noqa: RUF012 - a test-only registry

    def erase(self, offset: int, length: int) -> None:
        self.ops_log.append(("erase", offset, length))
        super().erase(offset, length)

    def write(self, offset: int, data: Any) -> None:
        self.ops_log.append(("write", offset, memoryview(data).nbytes))
        super().write(offset, data)

    def touched(self, start: int, length: int) -> list[tuple[str, int, int]]:
        end = start + length
        return [op for op in self.ops_log if op[1] < end and op[1] + op[2] > start]


# --- a provisioned device and the oracles ----------------------------------------------------


@dataclass
class Rig:
    """One provisioned device: its flash file, signing key and what it accepted."""

    path: Path
    key: cose.SigningKey
    factory: bytes
    factory_envelope: bytes
    accepted: set[bytes] = field(default_factory=set)  # image digests the device may run
    slot_size: int = 64 * 1024
    factory_aux: bytes = b""  # multi-component rigs: the factory's second image

    def info(self) -> dict[str, Any]:
        return inspect(self.path)

    def accept(self, image: bytes) -> None:
        self.accepted.add(hashlib.sha256(image).digest())

    def area(self, name: str) -> tuple[int, int]:
        flash, identity = open_flash(self.path)
        flash.close()
        return identity.layout.areas()[name]

    def slot_bytes(self, slot: int) -> bytes:
        start, length = self.area(f"slot{slot}")
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(length)

    def boots(self) -> tuple[int, bytes]:
        """O2: power on as a fresh device; return (running slot, running image digest)."""
        flash, _ = open_flash(self.path)
        try:
            boot = Bootloader(flash).boot()
        finally:
            flash.close()
        return boot.slot, boot.info.image_digest

    def running_pair(self) -> tuple[bytes, bytes]:
        """Multi-component rigs: (main, second) image digests of the running slot, both
        hashed from flash (not taken from the state record)."""
        info = self.info()
        aux = info["component_image_digests"]
        return bytes.fromhex(info["image_digest"]), bytes.fromhex(aux[0]) if aux else b""


def make_rig(
    tmp: Path,
    *,
    seq: int = 5,
    factory_size: int = 3000,
    slot_size: int = 64 * 1024,
    sector_size: int = 4096,
    key: cose.SigningKey | None = None,
    max_trial_boots: int = 3,
    name: str = "flash.bin",
    device_id: str = DEVICE_ID,
    psk: bytes = PSK,
    roots: tuple[cose.SigningKey, ...] = (),
    root_threshold: int = 1,
    decryption_keks: tuple[bytes, ...] = (),
    decryption_ec_der: bytes = b"",
    seal: bool = False,
    aux_slot_size: int = 0,
    factory_aux_size: int = 2000,
) -> Rig:
    """`aux_slot_size` > 0: a two-component device whose factory release has a second
    image of `factory_aux_size` bytes (docs/decisions/multi-component.md)."""
    key = key or cose.generate_key("es256")
    factory = make_image(factory_size, version=seq, seed=1)
    factory_aux = make_image(factory_aux_size, version=seq, seed=2) if aux_slot_size else b""
    if aux_slot_size:
        env = multi_envelope(key, factory, factory_aux, seq)
    else:
        env = sign(manifest_bytes(image=factory, seq=seq), key)
    path = tmp / name
    provision(
        path,
        device_id=device_id,
        psk=psk,
        vendor_domain=VENDOR,
        class_info=CLASS,
        anchors_pem=(key.public.public_pem(),),
        factory_image=factory,
        factory_envelope=env,
        slot_size=slot_size,
        sector_size=sector_size,
        max_trial_boots=max_trial_boots,
        force=True,
        roots_pem=tuple(r.public.public_pem() for r in roots),
        root_threshold=root_threshold,
        decryption_keks=decryption_keks,
        decryption_ec_der=decryption_ec_der,
        seal=seal,
        aux_slot_size=aux_slot_size,
        factory_aux_image=factory_aux,
    )
    rig = Rig(path, key, factory, env, slot_size=slot_size, factory_aux=factory_aux)
    rig.accept(factory)
    return rig


FAST = AgentConfig(
    fetch=FetchConfig(
        szx=6,
        request_timeout=0.5,
        attempts=4,
        backoff_initial=0.05,
        backoff_max=0.2,
        deadline=30.0,
        watchdog_window=5.0,
        min_throughput=64.0,
    ),
    report_timeout=0.5,
)


async def run_device(
    rig: Rig,
    server_uri: str,
    *,
    config: AgentConfig = FAST,
    flash_class: type[SimFlash] = RecordingFlash,
    **kw: Any,
) -> tuple[RunResult, DeviceAgent]:
    device = DeviceAgent(rig.path, server_uri, config=config, flash_class=flash_class, **kw)
    try:
        result = await device.run_once()
    finally:
        await device.close()
    return result, device


def stage(rig: Rig, image: bytes, seq: int) -> None:
    """Download and stage a genuine release of `image` (PENDING), without rebooting into
    it: the state a power-on finds right after an update was staged."""
    envelope, _ = release(rig.key, image, seq)

    async def go() -> None:
        script = Script(envelope=envelope)
        script.images[ids.image_uri(hashlib.sha256(image).digest())] = image
        async with EvilServer(script=script) as server:
            device = DeviceAgent(rig.path, server.base_uri, config=FAST)
            try:
                device.power_on()
                assert device.agent is not None
                staged = await device.agent.check_and_update()
                assert staged.outcome == Outcome.STAGED, staged
            finally:
                await device.close()

    asyncio.run(asyncio.wait_for(go(), 90))


@contextlib.contextmanager
def recording() -> Iterator[list[RecordingFlash]]:
    start = len(RecordingFlash.instances)
    out: list[RecordingFlash] = []
    try:
        yield out
    finally:
        out.extend(RecordingFlash.instances[start:])
        del RecordingFlash.instances[start:]


def encode_cbor(value: Any) -> bytes:
    return cbor.dumps(value)


# --- a standalone honest H1, for measurements that must not count the server ---------------


async def _serve_forever(port: int, envelope: bytes, images: dict[str, bytes]) -> None:
    server = EvilServer(script=Script(envelope=envelope, images=images))
    await server.start(port)
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def _main(argv: list[str] | None = None) -> None:
    """`python tests/evil_server.py PORT ENVELOPE_FILE PATH=IMAGE_FILE...` (honest script)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    port, envelope = int(args[0]), Path(args[1]).read_bytes()
    images = {}
    for spec in args[2:]:
        path, file = spec.split("=", 1)
        images[path] = Path(file).read_bytes()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(port, envelope, images))


if __name__ == "__main__":
    _main()
