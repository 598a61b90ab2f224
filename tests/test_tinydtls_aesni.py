"""tinydtls with the CPU's AES instructions (scripts/dtlssocket_aesni.sh,
patches/tinydtls-aesni.patch) speaks the same DTLS as everyone else.

The set-up rebuilds DTLSSocket so that tinydtls's AES block function and the whole
blocks of its AES-CCM use AES-NI. A wrong round key order or counter would still let
two patched peers talk to each other, so each check here has a peer whose AES is
*not* the patched code: the table code of the same build (OTACOAP_TINYDTLS_AESNI=0 in
that process only) here, OpenSSL in libcoap's client in tests/test_server_dtls.py
(`test_libcoap_fetches_the_image_byte_identically`, against the patched server).
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import (  # noqa: E402
    CLASS_A,
    DeviceSpec,
    device_provision,
    device_run_once,
    make_image,
    make_setup,
    running_server,
)

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

MARKER = b"otacoap-tinydtls-aesni-2"
SWITCH = "OTACOAP_TINYDTLS_AESNI"
PSK = bytes.fromhex("5a17e3c09b2d4f6a8e1c3b5d7f9a0b2c")


def _cpu_has_aes() -> bool:
    flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    return platform.machine() == "x86_64" and "aes" in flags and "ssse3" in flags


needs_aesni = pytest.mark.skipif(not _cpu_has_aes(), reason="no x86-64 CPU with AES-NI")


@needs_aesni
def test_installed_dtlssocket_is_the_aesni_build() -> None:
    """The set-up installed the patched build (else every other test here proves
    nothing about it)."""
    import DTLSSocket.dtls as dtls

    assert MARKER in Path(dtls.__file__).read_bytes(), (
        f"{dtls.__file__} is the stock build: run scripts/dtlssocket_aesni.sh"
    )


@needs_aesni
@pytest.mark.parametrize(
    ("server_aesni", "device_aesni"), [("1", "0"), ("0", "1")], ids=["ni-server", "ni-device"]
)
def test_update_between_aesni_and_table_aes_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_aesni: str, device_aesni: str
) -> None:
    """A whole update (handshake, manifest, 40 blocks, reports) between a server and a
    device whose record ciphers are different implementations: every record one side
    encrypts, the other decrypts and authenticates."""
    device = "aesni-dev-1"
    setup = make_setup(tmp_path, devices=[DeviceSpec(device, CLASS_A, psk=PSK)])
    factory = setup.release(CLASS_A, 1, make_image("factory", 3000))
    flash = tmp_path / "device.flash"
    device_provision(flash, setup, device, factory)
    v2 = setup.release(CLASS_A, 2, make_image("v2", 40_000))
    setup.publish(v2)

    monkeypatch.setenv(SWITCH, server_aesni)
    with running_server(setup.data) as server:
        monkeypatch.setenv(SWITCH, device_aesni)  # the device's process only
        outcome = device_run_once(flash, server.uri)
    assert outcome["outcome"] == "updated" and outcome["sequence_number"] == 2
