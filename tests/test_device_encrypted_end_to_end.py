"""End to end over real DTLS with the REAL server: an encrypted release (issue 13 §1, §5).

The operator builds with `otacoap manifest build --encrypt-for DEVICE.pub` (ECDH-ES) or
`--kek CLASS.key` (A128KW) and publishes the *ciphertext*: the server stores and serves
bytes it cannot read. The device (`python -m device_sim provision --decryption-key` /
`--kek`) decrypts while streaming, boots the plaintext, and its DOWNLOADED report says
the payload was encrypted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import (  # noqa: E402
    CLASS_A,
    VENDOR,
    DeviceSpec,
    cli_ok,
    device_cli,
    device_provision,
    device_reports,
    device_run_once,
    make_image,
    make_setup,
    running_server,
)

from otacoap.core import cose  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

DEVICE = "enc-dev-1"
PSK = bytes.fromhex("00112233445566778899aabbccddeeff")


@pytest.mark.parametrize("scheme", ["ecdh-es", "a128kw", "a128kw-network"])
def test_encrypted_release_through_the_server(tmp_path: Path, scheme: str) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec(DEVICE, CLASS_A, psk=PSK)], operators=["ops"])
    factory = setup.release(CLASS_A, 1, make_image("factory", 3000))
    key_pem = tmp_path / "signing.pem"
    key_pem.write_bytes(setup.key.pem)
    device_key = cose.generate_key("es256")
    (tmp_path / "device.pem").write_bytes(device_key.pem)
    (tmp_path / "device.pub").write_bytes(device_key.public.public_pem())
    (tmp_path / "class.kek").write_text("5a" * 16)
    keys = (
        ["--decryption-key", str(tmp_path / "device.pem")]
        if scheme == "ecdh-es"
        else ["--kek", str(tmp_path / "class.kek")]
    )
    flash = tmp_path / "device.flash"
    device_provision(flash, setup, DEVICE, factory, *keys)

    image = make_image("v2-secret", 40_000)
    (tmp_path / "v2.bin").write_bytes(image)
    build = (
        [
            "--profile",
            "suit-sha256-esp256-ecdh-a128ctr",
            "--encrypt-for",
            str(tmp_path / "device.pub"),
        ]
        if scheme == "ecdh-es"
        else ["--kek", str(tmp_path / "class.kek"), "--content-alg", "a128gcm"]
    )
    cli_ok(
        "manifest", "build", "--image", tmp_path / "v2.bin", "--vendor-domain", VENDOR,
        "--class-info", CLASS_A, "--seq", "2", "--key", key_pem,
        "--payload-out", tmp_path / "v2.enc", "-o", tmp_path / "v2.suit", *build,
    )  # fmt: skip
    ciphertext = (tmp_path / "v2.enc").read_bytes()
    assert image[:64] not in ciphertext
    network = scheme.endswith("-network")
    if not network:
        cli_ok("publish", "--data", setup.data, tmp_path / "v2.suit", tmp_path / "v2.enc")

    with running_server(setup.data) as server:
        if network:  # as an operator over DTLS: the upload is taken by the URI's id
            cli_ok(
                "publish", "--server", server.uri, "--identity", "ops",
                "--psk", setup.operators["ops"].hex(), tmp_path / "v2.suit", tmp_path / "v2.enc",
            )  # fmt: skip
        # The server holds the ciphertext, never the plaintext.
        blobs = [p for p in (setup.data / "blobs").rglob("*") if p.is_file()]
        stored = b"".join(p.read_bytes() for p in blobs)
        assert ciphertext in stored and image[:4096] not in stored
        outcome = device_run_once(flash, server.uri)
        assert outcome["outcome"] == "updated" and outcome["sequence_number"] == 2
    status = device_cli("status", "--flash", str(flash), "--json")
    info = json.loads(status.stdout)
    assert info["image_digest"] == hashlib.sha256(image).hexdigest()
    assert info["boot_status"] == "confirmed"

    records = device_reports(setup.data, DEVICE)
    downloaded = [r for r in records if r.state == "downloaded"]
    alg = "a128ctr" if scheme == "ecdh-es" else "a128gcm"
    assert downloaded and downloaded[-1].detail == f"payload encrypted-{alg}"
    assert [r.state for r in records][-1] == "confirmed"
