"""Issue 13 §3b end to end over real DTLS: a device goes from programmer 0.8.0 to 0.9.0
(the small pair of ../shared/delta) by an *encrypted* delta, through the real server.

The command lines a user would type: `otacoap manifest build --kek CLASS.key` for the
encrypted releases, `otacoap manifest build --delta-from OLD --kek CLASS.key
--full-envelope v3.suit` for the encrypted delta, `otacoap publish --server ... --delta`
(the network publish, as an operator), `python -m device_sim provision --kek` and
`run`. The server stores and serves only ciphertext (neither image nor patch in
plaintext); the device fetches only the patch ciphertext, decrypts and patches while
streaming, and its DOWNLOADED report says "delta+encrypted-<alg>".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from delta_rig import DELTA_DIR, pair  # noqa: E402
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

pytestmark = [
    pytest.mark.network,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not DELTA_DIR.is_dir(), reason="../shared/delta not available"),
]

DEVICE = "encdelta-dev-1"
PSK = bytes.fromhex("2f1e2d3c4b5a69788796a5b4c3d2e1f0")


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + 48] for i in range(0, len(data) - 48, 1499)]


@pytest.mark.parametrize("alg", ["a128ctr", "a128gcm"])
def test_programmer_0_8_to_0_9_by_encrypted_delta_over_dtls(tmp_path: Path, alg: str) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec(DEVICE, CLASS_A, psk=PSK)])
    ops_psk = setup.add_operator("release-bot")
    cli_ok("keygen", "--out", tmp_path / "author")
    cli_ok("trust", "add", "--data", setup.data, tmp_path / "author.pub")
    (tmp_path / "class.kek").write_text("6b" * 16)
    old, new = pair("programmer")
    old_bin, new_bin = tmp_path / "v0.8.bin", tmp_path / "v0.9.bin"
    old_bin.write_bytes(old)
    new_bin.write_bytes(new)

    def build(image: Path, seq: int, out: str, *extra: str | Path) -> Path:
        cli_ok(
            "manifest", "build", "--image", image, "--vendor-domain", VENDOR,
            "--class-info", CLASS_A, "--seq", str(seq), "--key", tmp_path / "author",
            "--kek", tmp_path / "class.kek", "--content-alg", alg, "-o", tmp_path / out, *extra,
        )  # fmt: skip
        return tmp_path / out

    factory = setup.release(CLASS_A, 1, make_image("factory", 3000))
    flash = tmp_path / "device.flash"
    device_provision(
        flash, setup, DEVICE, factory, "--trust", str(tmp_path / "author.pub"),
        "--kek", str(tmp_path / "class.kek"), slot_size="64K",
    )  # fmt: skip

    v2 = build(old_bin, 2, "v2.suit", "--payload-out", tmp_path / "v2.enc")
    v3 = build(new_bin, 3, "v3.suit", "--payload-out", tmp_path / "v3.enc")
    v3_delta = build(new_bin, 3, "v3-from-v2.suit", "--delta-from", old_bin, "--full-envelope", v3)
    patch_ct = (tmp_path / "v3-from-v2.suit.patch").read_bytes()
    assert len(patch_ct) < len(new) // 5
    inspect = cli_ok("manifest", "inspect", v3_delta)
    assert inspect.count("encrypted payload:") == 2, inspect  # the patch and the fallback

    with running_server(setup.data) as server:
        remote = ("--server", server.uri, "--identity", "release-bot", "--psk", ops_psk.hex())
        cli_ok("publish", v2, tmp_path / "v2.enc", *remote)
        outcome = device_run_once(flash, server.uri)
        assert outcome["outcome"] == "updated" and outcome["sequence_number"] == 2, outcome

        out = cli_ok(
            "publish", v3, tmp_path / "v3.enc", "--delta", v3_delta,
            tmp_path / "v3-from-v2.suit.patch", *remote,
        )  # fmt: skip
        assert out.count("published") == 2, out
        # The server holds ciphertext only: neither image nor the patch in plaintext.
        blobs = [p for p in (setup.data / "blobs").rglob("*") if p.is_file()]
        stored = b"".join(p.read_bytes() for p in blobs)
        assert patch_ct in stored
        assert not [c for c in _chunks(new) + _chunks(old) if c in stored]

        outcome = device_run_once(flash, server.uri)
        assert outcome["outcome"] == "updated" and outcome["sequence_number"] == 3, outcome
        assert outcome["image_digest"] == hashlib.sha256(new).hexdigest()

        again = device_cli("run", "--flash", str(flash), "--server", server.uri)
        assert again.returncode == 0 and again.stdout.startswith("up-to-date"), again.stdout

    records = device_reports(setup.data, DEVICE)
    v3_reports = [(r.state, r.detail, r.bytes_received) for r in records if r.sequence_number == 3]
    downloaded = [d for s, d, _ in v3_reports if s == "downloaded"]
    assert len(downloaded) == 1, v3_reports
    assert downloaded[0].startswith(f"delta+encrypted-{alg} from "), v3_reports
    assert "confirmed" in [s for s, _, _ in v3_reports]
