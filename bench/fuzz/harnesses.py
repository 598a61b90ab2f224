"""Fuzz harnesses: every parser that takes bytes from outside, and what it may raise.

ATTACKS.md #43 (issue 10 §8). Each harness takes one input (bytes) and drives one
parser with it. The parser may answer or refuse; a refusal must be an exception of the
harness's *typed error tree*, the one class (with its subclasses) the callers of that
parser handle. Anything else (KeyError, IndexError, TypeError, RecursionError, ...)
escapes the harness and is a finding: a crash the caller would not turn into a clean
refusal (a 5.00 on the server, a dead update on the device).

The trees, one per target family:

| family   | parser                                   | typed error tree                |
| -------- | ---------------------------------------- | ------------------------------- |
| cbor     | core.cbor.loads (strict profile)         | ManifestError (LimitExceeded)   |
| envelope | core.suit.decode_envelope                | ManifestError                   |
| trust    | core.trust.accept, then the interpreter  | OtaError                        |
| report   | core.report.decode_report                | ManifestError                   |
| options  | server fast-path option walk             | none: it returns None           |
|          | core.block2_responder.answer             | BlockError                      |
|          | server Block1: aiocoap decode + Uploads  | dropped datagram (*), OtaError |
| state    | device DeviceState.decode, StateFile.load| StateError                      |

(*) `Message.decode` may raise aiocoap's UnparsableMessage or UnicodeDecodeError (a
non-UTF-8 string option); the listener drops both before any resource runs.

Used by the atheris runner (`python -m bench.fuzz.run NAME`), the bench
(`bench/bench_fuzz.py`) and the bounded run in the test suite
(`tests/test_fuzz_harnesses.py`). Seeds are built here, in code, so a corpus never
goes stale against the encoders.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from device_sim.device_state import DeviceState, StateError, StateFile
from device_sim.flash import SimFlash
from device_sim.layout import FlashLayout
from device_sim.record_store import encode_record
from otacoap.config import UploadConfig
from otacoap.core import (
    block2_responder,
    blockwise,
    cbor,
    cose,
    ids,
    interpreter,
    report,
    suit,
    trust,
)
from otacoap.core.build import Release, build_envelope, build_manifest
from otacoap.core.errors import ManifestError, OtaError, ReportReason
from otacoap.core.update_record import BootStatus, Download, SlotInfo, Trial
from otacoap.server.fastpath import _walk_options
from otacoap.server.uploads import Block, Uploads
from otacoap.store import BlobStore

# -- the typed error trees -------------------------------------------------------------------

CBOR_ERRORS: tuple[type[BaseException], ...] = (ManifestError,)
ENVELOPE_ERRORS: tuple[type[BaseException], ...] = (ManifestError,)
TRUST_ERRORS: tuple[type[BaseException], ...] = (OtaError,)
REPORT_ERRORS: tuple[type[BaseException], ...] = (ManifestError,)
OPTION_WALK_ERRORS: tuple[type[BaseException], ...] = ()  # declines with None, never raises
BLOCK2_ERRORS: tuple[type[BaseException], ...] = (blockwise.BlockError,)
UPLOAD_ERRORS: tuple[type[BaseException], ...] = (OtaError,)
STATE_ERRORS: tuple[type[BaseException], ...] = (StateError,)


@dataclass(frozen=True)
class Harness:
    name: str
    family: str
    errors: tuple[type[BaseException], ...]
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]

    def one(self, data: bytes) -> bool:
        """Run one input; True if it was refused with a typed error. Anything else raises."""
        try:
            self.run(data)
        except self.errors:
            return True
        return False


# -- shared fixtures -------------------------------------------------------------------------

VENDOR, CLASS = "fuzz.example", "board-1"
HMAC_KEY = bytes(range(32))  # fixed: seeds and the gate agree across processes
_ANCHOR = cose.hmac_anchor(HMAC_KEY)
_IMAGE = b"\x5a" * 3000


def _release(seq: int, **kw: Any) -> Release:
    return Release(hashlib.sha256(_IMAGE).digest(), len(_IMAGE), VENDOR, CLASS, seq, **kw)


def _manifests() -> list[bytes]:
    out = [suit.encode_manifest(build_manifest(_release(seq))) for seq in (0, 5, 1 << 40)]
    out.append(suit.encode_manifest(build_manifest(_release(7, uri="coap://h.example/fw/x"))))
    return out


def _shared_vectors() -> list[bytes]:
    """The shared SUIT example envelopes, when ../shared is there (OTACOAP_SHARED)."""
    root = Path(os.environ.get("OTACOAP_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    out = []
    for path in sorted((root / "suit" / "vectors").glob("*.hex"))[:40]:
        try:
            out.append(bytes.fromhex("".join(path.read_text().split())))
        except ValueError:
            continue
    return out


def mac_envelope(manifest_raw: bytes) -> bytes:
    """A tagged envelope around exactly `manifest_raw`, authenticated with HMAC_KEY."""
    digest_raw = cbor2.dumps(
        [suit.DIGEST_SHA256, hashlib.sha256(cbor.bstr_wrap(manifest_raw)).digest()]
    )
    auth = cbor2.dumps([digest_raw, cose.mac0(digest_raw, HMAC_KEY)])
    body = cbor2.dumps({suit.ENV_AUTH: auth, suit.ENV_MANIFEST: manifest_raw}, canonical=True)
    return cbor2.dumps(cbor2.CBORTag(suit.ENVELOPE_TAG, cbor2.loads(body)), canonical=True)


def _envelopes() -> list[bytes]:
    out = [mac_envelope(m) for m in _manifests()]
    out.append(suit.encode_envelope(build_envelope(_release(3))))  # unsigned
    return out + _shared_vectors()


# -- cbor ----------------------------------------------------------------------------------


def _run_cbor(data: bytes) -> None:
    value = cbor.loads(data)
    # What the strict decoder accepts, the deterministic encoder writes back, and that
    # decodes to the same value: server and device cannot disagree on it (#41).
    assert cbor.loads(cbor.dumps(value)) == value


def _cbor_seeds() -> list[bytes]:
    return [
        cbor.dumps({1: [b"x", "y", None, True, -5], "k": {2: 3}}),
        cbor.dumps(cbor2.CBORTag(107, {2: b"a", 3: b"b"})),
        *_envelopes()[:3],
        report.Report(1, report.State.INSTALLED, ReportReason.OK).encode(),
    ]


# -- envelope --------------------------------------------------------------------------------


def _run_envelope(data: bytes) -> None:
    envelope = suit.decode_envelope(data)
    # A decoded envelope re-encodes: the model holds only what the decoder checked.
    suit.encode_envelope(envelope)
    envelope.manifest_digest  # noqa: B018 -- digest over the exact manifest bytes


# -- trust gate ------------------------------------------------------------------------------

_POLICY = trust.TrustPolicy(
    anchors=(_ANCHOR,),
    current_sequence=4,
    current_manifest_digest=b"\x00" * 32,
    vendor_id=None,
    class_id=None,
    max_image_size=1 << 20,
    max_components=2,
    allow_relative_uris=True,
    allowed_uri_prefixes=("coap://h.example/",),
)


_DEVICE = interpreter.DeviceDescription(
    vendor_id=ids.vendor_id(VENDOR), class_id=ids.class_id(ids.vendor_id(VENDOR), CLASS)
)


def _run_trust(data: bytes) -> None:
    """First byte even: the bytes are an envelope (signature and all). Odd: the rest is
    a manifest that the harness authenticates with the trusted key, so the fuzzer
    reaches every check after the signature (freshness, identity, policy)."""
    if not data:
        raise ManifestError("empty")
    envelope = mac_envelope(data[1:]) if data[0] & 1 else data[1:]
    vm = trust.accept(envelope, _POLICY)
    # What the device does next with an accepted manifest: its SUIT command sequences
    # (manifest-34 §6), with image checks answered by bit 1 of the first byte.
    image_ok = bool(data[0] & 2)

    def answer(action: interpreter.Action) -> object:
        if isinstance(action, interpreter.CheckImage):
            return image_ok
        if isinstance(action, interpreter.CheckCondition):
            return False
        return None

    for procedure in (interpreter.UPDATE, interpreter.INVOKE):
        with contextlib.suppress(*TRUST_ERRORS):
            interpreter.drive(interpreter.run(vm.envelope, procedure, _DEVICE), answer)


def _trust_seeds() -> list[bytes]:
    return [b"\x00" + e for e in _envelopes()] + [b"\x01" + m for m in _manifests()]


# -- report ----------------------------------------------------------------------------------


def _run_report(data: bytes) -> None:
    got = report.decode_report(data)
    assert report.decode_report(got.encode()) == got


def _report_seeds() -> list[bytes]:
    digest = suit.SuitDigest(suit.DIGEST_SHA256, b"\x22" * 32)
    return [
        report.Report(1, report.State.INSTALLED, ReportReason.OK).encode(),
        report.Report(
            7,
            report.State.FAILED,
            ReportReason.CONDITION_FAILED,
            sequence_number=9,
            manifest_digest=digest,
            manifest_uri="coap://h/fw/1",
            bytes_received=1024,
            installed_sequence=8,
            detail="image does not match",
            lost=2,
        ).encode(),
    ]


# -- CoAP options: the server's fast-path walk, Block2 answers, Block1 uploads ------------


def _run_option_walk(data: bytes) -> None:
    got = _walk_options(data, 0)
    assert got is None or (isinstance(got[0], bytes) and -1 <= got[1] < 1 << 24)


def _option_walk_seeds() -> list[bytes]:
    from otacoap.core.coap_options import options, uint

    path = [(11, b"fw"), (11, b"0123456789abcdef")]
    return [
        options(path),
        options([*path, (23, uint(0x26))]),
        options([(3, b"host"), (7, uint(5683)), *path, (23, uint(0x3456)), (28, b"")]),
        options([*path, (23, b"\x01\x02\x03\x04")]),
        b"\xd1\x0a\x00",
    ]


def _run_block2(data: bytes) -> None:
    """(size u32, block2 option value u24 or absent, max_szx) -> an answer inside the body."""
    if len(data) < 5:
        raise blockwise.BlockError("short input")
    size, flags = struct.unpack(">IB", data[:5])
    max_szx = flags % 7
    value = int.from_bytes(data[5:8], "big") if len(data) > 5 else None
    asked = None
    if value is not None:
        num, _, szx = blockwise.parse_block_value(value)
        asked = (num, szx)
    got = block2_responder.answer(size, asked, max_szx, content_format=42, etag=b"e")
    # Nothing outside the body is ever read (ATTACKS.md #24, #25).
    assert got.offset >= 0 and got.offset + got.length <= size
    assert got.length <= blockwise.size_of(max_szx) or got.block2 is None
    got.encoded_options()


def _block2_seeds() -> list[bytes]:
    return [
        struct.pack(">IB", 3000, 6),
        struct.pack(">IB", 3000, 6) + bytes([0x00, 0x00, 0x16]),
        struct.pack(">IB", 100_000, 2) + bytes([0x0F, 0xFF, 0xF6]),
        struct.pack(">IB", 0, 0) + b"\x07",
    ]


class _UploadRig:
    """One BlobStore in a private temp dir for the whole process."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="otacoap-fuzz-")
        self.blobs = BlobStore(Path(self._dir.name))
        self.blobs.create_dirs()
        self.now = 0.0


_UPLOAD_RIG: _UploadRig | None = None


def _run_upload(data: bytes) -> None:
    """A sequence of CoAP requests (each: u16 length, then the message bytes) fed to one
    Uploads exactly as resources._AdminUpload does: aiocoap decodes the message, its
    Block1/Request-Tag/Size1 options become the upload's key and block."""
    from aiocoap import Message
    from aiocoap import error as aerror

    global _UPLOAD_RIG
    if _UPLOAD_RIG is None:
        _UPLOAD_RIG = _UploadRig()
    rig = _UPLOAD_RIG
    config = UploadConfig(max_concurrent=2, max_per_peer=2, idle_timeout=5.0, max_duration=50.0)
    uploads = Uploads(rig.blobs, config, clock=lambda: rig.now)
    refused: OtaError | None = None
    try:
        pos = 0
        while pos + 2 <= len(data):
            (n,) = struct.unpack_from(">H", data, pos)
            raw = data[pos + 2 : pos + 2 + min(n, 2048)]
            pos += 2 + min(n, 2048)
            rig.now += 1.0
            try:
                request = Message.decode(raw)
            except (aerror.UnparsableMessage, UnicodeDecodeError):
                # Dropped before any resource sees it: aiocoap drops the first, the
                # listener the second (server.coap.listeners._FastPathFirst).
                continue
            b1 = request.opt.block1
            block = Block(b1.block_number, bool(b1.more), b1.size_exponent) if b1 else None
            key = ("op", "peer", "image", b"".join(request.opt.request_tag or ()))
            try:
                blob = uploads.feed(key, block, bytes(request.payload), 4096, request.opt.size1)
            except OtaError as exc:
                refused = exc
                continue
            if blob is not None:
                blob.discard()
            uploads.sweep()
    finally:
        uploads.close()
    if refused is not None:
        raise refused


def _upload_seeds() -> list[bytes]:
    from aiocoap import CON, POST, Message
    from aiocoap.optiontypes import BlockOption

    def req(num: int, more: bool, szx: int, payload: bytes, tag: bytes = b"t") -> bytes:
        m = Message(code=POST, payload=payload)
        m.mtype, m.mid, m.token = CON, num & 0xFFFF, b"k"
        m.opt.block1 = BlockOption.BlockwiseTuple(num, more, szx)
        m.opt.request_tag = (tag,)
        m.opt.size1 = 100
        raw = bytes(m.encode())
        return struct.pack(">H", len(raw)) + raw

    return [
        req(0, True, 2, b"a" * 64) + req(1, False, 2, b"b" * 36),
        req(0, True, 0, b"a" * 16) + req(2, True, 0, b"c" * 16),
        req(0, False, 6, b"x" * 10, b"") + req(0, True, 7, b"y" * 5),
    ]


# -- device state records ---------------------------------------------------------------------


def _state_samples() -> list[DeviceState]:
    d = b"\x11" * 32
    return [
        DeviceState(7, None, 0, BootStatus.CONFIRMED, (SlotInfo(3000, d, 7, None), None)),
        DeviceState(
            sequence=9,
            sequence_digest=d,
            active=1,
            boot=BootStatus.TESTING,
            slots=(SlotInfo(100, d, 7, d, 50, d), SlotInfo(200, d, 9, d, 60, d)),
            download=Download(d, 0, 10, 200, 60, d),
            trial=Trial(d, 1),
            report_counter=3,
            reports=(b"r1", b"r2"),
            reports_lost=1,
        ),
    ]


def _run_state_decode(data: bytes) -> None:
    state = DeviceState.decode(data)
    assert DeviceState.decode(state.encode()) == state


class _StateRig:
    """A small simulated flash whose two state copies the fuzzer writes directly."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="otacoap-fuzz-")
        self.layout = FlashLayout(sector_size=4096, slot_size=16 * 4096)
        path = Path(self._dir.name) / "flash.bin"
        self.flash = SimFlash.create(path, self.layout.total_size, sector_size=4096)
        self.file = StateFile(self.flash, self.layout)


_STATE_RIG: _StateRig | None = None


def _run_state_load(data: bytes) -> None:
    """Two records with valid CRCs (u32 counter, u16 length, payload; twice) planted in
    the two copies, then StateFile.load: the newest copy that decodes, or StateError."""
    global _STATE_RIG
    if _STATE_RIG is None:
        _STATE_RIG = _StateRig()
    rig = _STATE_RIG
    store = rig.file.store
    pos = 0
    for copy in (0, 1):
        base = store.copy_offset(copy)
        rig.flash.erase(base, rig.layout.state_copy_size)
        if pos + 6 > len(data):
            continue
        counter, n = struct.unpack_from(">IH", data, pos)
        payload = data[pos + 6 : pos + 6 + min(n, store.max_payload)]
        pos += 6 + len(payload)
        rig.flash.write(base, encode_record(counter, payload, rig.flash.write_align))
    state = rig.file.load()
    decodable = [p for _, _, p in store.load_all() if _decodes(p)]
    assert decodable and DeviceState.decode(decodable[0]) == state


def _decodes(payload: bytes) -> bool:
    try:
        DeviceState.decode(payload)
    except StateError:
        return False
    return True


def _state_seeds() -> list[bytes]:
    return [s.encode() for s in _state_samples()]


def _state_load_seeds() -> list[bytes]:
    a, b = (s.encode() for s in _state_samples())
    return [
        struct.pack(">IH", 1, len(a)) + a + struct.pack(">IH", 2, len(b)) + b,
        struct.pack(">IH", 5, len(a)) + a + struct.pack(">IH", 6, 3) + b"\xa1\x61v",
    ]


HARNESSES: dict[str, Harness] = {
    h.name: h
    for h in (
        Harness("cbor", "cbor", CBOR_ERRORS, _run_cbor, _cbor_seeds),
        Harness("envelope", "envelope", ENVELOPE_ERRORS, _run_envelope, _envelopes),
        Harness("trust", "trust", TRUST_ERRORS, _run_trust, _trust_seeds),
        Harness("report", "report", REPORT_ERRORS, _run_report, _report_seeds),
        Harness("option-walk", "options", OPTION_WALK_ERRORS, _run_option_walk, _option_walk_seeds),
        Harness("block2", "options", BLOCK2_ERRORS, _run_block2, _block2_seeds),
        Harness("block1-upload", "options", UPLOAD_ERRORS, _run_upload, _upload_seeds),
        Harness("state-decode", "state", STATE_ERRORS, _run_state_decode, _state_seeds),
        Harness("state-load", "state", STATE_ERRORS, _run_state_load, _state_load_seeds),
    )
}
