"""A bench data directory: devices, a signed release and its image, made with the CLI.

Built through `otacoap.cli.main` (the operator's own commands, in this process) rather
than internal APIs, so a bench measures the server exactly as an operator sets it up.
The same image and device PSKs feed the baselines (stock aiocoap, libcoap), so every
target serves identical bytes to identical clients.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from otacoap.cli import main as cli_main

VENDOR = "bench.example"
CLASS = "bench-class"


@dataclass(frozen=True)
class Device:
    identity: str
    psk: bytes


@dataclass(frozen=True)
class Fixture:
    base: Path
    data: Path
    image: Path
    image_path: str  # "fw/<id>": the Uri-Path devices ask for
    devices: tuple[Device, ...]
    devices_json: Path  # [[identity, pskhex], ...] for bench/stock_aiocoap_server.py

    @property
    def size(self) -> int:
        return self.image.stat().st_size


def _cli(*args: str | Path) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([str(a) for a in args])
    if code != 0:
        raise RuntimeError(f"otacoap {' '.join(map(str, args))}: {err.getvalue()}")
    return out.getvalue()


def image_bytes(size: int) -> bytes:
    """Deterministic, incompressible bytes (a SHA-256 counter stream)."""
    out = bytearray()
    n = 0
    while len(out) < size:
        out += hashlib.sha256(b"bench:%d" % n).digest()
        n += 1
    return bytes(out[:size])


def psk_for(i: int) -> bytes:
    """16 printable bytes: libcoap's command-line tools take a PSK as text."""
    return f"bench-psk-{i:06d}".encode()


def make_fixture(base: Path, devices: int, image_size: int) -> Fixture:
    base.mkdir(parents=True, exist_ok=True)
    data = base / "data"
    _cli("init", data)
    _cli("keygen", "--alg", "es256", "--out", base / "author")
    _cli("trust", "add", "--data", data, base / "author.pub")
    devs = []
    for i in range(devices):
        dev = Device(f"bench{i:04d}", psk_for(i))
        _cli(
            "device", "add", "--data", data, dev.identity,
            "--vendor-domain", VENDOR, "--class-info", CLASS, "--psk", dev.psk.hex(),
        )  # fmt: skip
        devs.append(dev)
    image = base / "image.bin"
    image.write_bytes(image_bytes(image_size))
    envelope = base / "image.suit"
    _cli(
        "manifest", "build", "--image", image, "--vendor-domain", VENDOR,
        "--class-info", CLASS, "--seq", "1", "--key", base / "author", "-o", envelope,
    )  # fmt: skip
    _cli("publish", "--data", data, envelope, image)
    digest = hashlib.sha256(image.read_bytes()).digest()
    devices_json = base / "devices.json"
    devices_json.write_text(json.dumps([[d.identity, d.psk.hex()] for d in devs]))
    return Fixture(base, data, image, "fw/" + digest.hex()[:16], tuple(devs), devices_json)


def open_fixture(base: Path) -> Fixture:
    """A fixture `make_fixture` built earlier in `base` (a large one takes minutes to
    build: each device is added by the CLI, as an operator would)."""
    devices_json = base / "devices.json"
    devs = tuple(Device(i, bytes.fromhex(p)) for i, p in json.loads(devices_json.read_text()))
    image = base / "image.bin"
    digest = hashlib.sha256(image.read_bytes()).digest()
    return Fixture(base, base / "data", image, "fw/" + digest.hex()[:16], devs, devices_json)
