"""Issue 13 §4 through the REAL server: a two-component release is published (locally
with `otacoap publish ENV IMG IMG2`, and over the network, each image uploaded), the
server lets the device read both images and no other, and a two-component device
installs both over DTLS. A publish that hands in the wrong images is refused, one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from aiocoap.numbers.codes import Code
from server_helpers import (
    CLASS_A,
    CLASS_B,
    ROOT,
    VENDOR,
    DeviceSpec,
    cli,
    cli_ok,
    coaps_client,
    get,
    make_setup,
    running_server,
)

from device_sim.agent import DeviceAgent, Outcome, RunResult
from device_sim.firmware import make_image
from device_sim.provision import inspect
from otacoap.core import build, cose, suit
from otacoap.fsutil import atomic_write
from otacoap.store import DataDir

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

DEVICE = "multi-dev-1"
PSK = bytes.fromhex("00112233445566778899aabbccddeeff")


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def two_component_envelope(key: cose.SigningKey, main: bytes, aux: bytes, seq: int) -> bytes:
    release = build.Release(
        sha(main),
        len(main),
        VENDOR,
        CLASS_A,
        seq,
        more=(build.ComponentImage(sha(aux), len(aux)),),
    )
    return suit.encode_envelope(build.build_envelope(release, key))


def write_release(base: Path, name: str, envelope: bytes, *images: bytes) -> list[Path]:
    paths = [base / f"{name}.suit"]
    atomic_write(paths[0], envelope)
    for i, image in enumerate(images):
        paths.append(base / f"{name}-{i}.bin")
        atomic_write(paths[-1], image)
    return paths


async def run_device(flash: Path, uri: str) -> RunResult:
    device = DeviceAgent(flash, uri)
    try:
        return await device.run_once()
    finally:
        await device.close()


def pair(flash: Path) -> tuple[bytes, bytes]:
    info = inspect(flash)
    return bytes.fromhex(info["image_digest"]), bytes.fromhex(info["component_image_digests"][0])


def test_publish_serve_and_install_a_two_component_release(tmp_path: Path) -> None:
    other = DeviceSpec("other-dev", CLASS_B, psk=bytes(range(16)))
    setup = make_setup(
        tmp_path, devices=[DeviceSpec(DEVICE, CLASS_A, psk=PSK), other], operators=["ops"]
    )
    factory, factory_aux = make_image(3000, version=1), make_image(1500, version=1, seed=2)
    flash = tmp_path / "device.flash"
    env1, img1, aux1 = write_release(
        tmp_path, "r1", two_component_envelope(setup.key, factory, factory_aux, 1), factory,
        factory_aux,
    )  # fmt: skip
    done = subprocess.run(
        [
            sys.executable, "-m", "device_sim", "provision", "--flash", str(flash),
            "--id", DEVICE, "--psk", PSK.hex(), "--vendor-domain", VENDOR,
            "--class-info", CLASS_A, "--trust", str(setup.key_pub),
            "--factory-image", str(img1), "--factory-aux-image", str(aux1),
            "--factory-envelope", str(env1), "--slot-size", "64K", "--aux-slot-size", "32K",
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert pair(flash) == (sha(factory), sha(factory_aux))

    # Local publish: the images in any order, matched to the components by digest.
    main2, aux2 = make_image(40_000, version=2), make_image(20_000, version=2, seed=3)
    env2, img2, aux2_path = write_release(
        tmp_path, "r2", two_component_envelope(setup.key, main2, aux2, 2), main2, aux2
    )
    refused = cli("publish", "--data", setup.data, env2, img2)
    assert refused.code != 0 and len(refused.err.strip().splitlines()) == 1
    assert "2 image(s), 1 were handed in" in refused.err
    wrong = tmp_path / "wrong.bin"
    atomic_write(wrong, aux2[:-1] + b"\x00")
    refused = cli("publish", "--data", setup.data, env2, img2, wrong)
    assert refused.code != 0 and "component 1" in refused.err
    out = cli_ok("publish", "--data", setup.data, env2, aux2_path, img2)
    assert "seq 2" in out and ("/fw/" + sha(aux2).hex()[:16]) in out

    store = DataDir(setup.data).open_store()
    try:
        (release,) = [r for r in store.list_releases(current_only=False) if r.sequence_number == 2]
    finally:
        store.close()
    assert release.image.digest == sha(main2)
    assert [i.digest for i in release.more_images] == [sha(aux2)]

    # Release 3 built by the operator's command line: --image twice.
    main3, aux3 = make_image(30_000, version=3), make_image(25_000, version=3, seed=4)
    img3, aux3_path, env3 = tmp_path / "r3-0.bin", tmp_path / "r3-1.bin", tmp_path / "r3.suit"
    atomic_write(img3, main3)
    atomic_write(aux3_path, aux3)
    key_file = tmp_path / "author.key"
    atomic_write(key_file, setup.key.pem)
    cli_ok(
        "manifest", "build", "--image", img3, "--image", aux3_path, "--vendor-domain", VENDOR,
        "--class-info", CLASS_A, "--seq", "3", "--key", key_file, "-o", env3,
    )  # fmt: skip
    psk_file = tmp_path / "ops.psk"
    psk_file.write_text(setup.operators["ops"].hex())

    async def verdicts(identity: str, psk: bytes, port: int) -> list[Code]:
        async with coaps_client(port, identity, psk) as ctx:
            uris = [f"coaps://127.0.0.1:{port}/fw/{sha(i).hex()[:16]}" for i in (main2, aux2)]
            return [(await get(ctx, uri, block2=(0, False, 6))).code for uri in uris]

    with running_server(setup.data) as server:
        # ATTACKS.md #32: the device reads each image of its release, another device none.
        mine = asyncio.run(asyncio.wait_for(verdicts(DEVICE, PSK, server.port), 30))
        assert mine == [Code.CONTENT, Code.CONTENT]
        theirs = asyncio.run(asyncio.wait_for(verdicts(other.id, other.psk, server.port), 30))
        assert theirs == [Code.NOT_FOUND, Code.NOT_FOUND]
        result = asyncio.run(asyncio.wait_for(run_device(flash, server.uri), 60))
        assert result.outcome == Outcome.UPDATED, result
        assert result.sequence_number == 2
        assert pair(flash) == (sha(main2), sha(aux2))

        # Network publish: each image uploaded to /admin/image, then the envelope.
        out = cli_ok(
            "publish", "--server", server.uri, "--identity", "ops", "--psk-file", psk_file,
            env3, img3, aux3_path,
        )  # fmt: skip
        assert "seq 3" in out
        result = asyncio.run(asyncio.wait_for(run_device(flash, server.uri), 60))
        assert (result.outcome, result.sequence_number) == (Outcome.UPDATED, 3), result
        assert pair(flash) == (sha(main3), sha(aux3))
