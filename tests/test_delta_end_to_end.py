"""Issue 13 §2 end to end over real DTLS: a device goes from MicroPython v1.9.4 to v1.10
(the esp8266 pair of ../shared/delta) by delta, through the real server.

The command lines a user would type: `otacoap manifest build --delta-from`, `otacoap
publish --server ... --delta` (the network publish, as an operator), `python -m
device_sim run`. The device runs v1.9.4 (installed as release 2, full image); release 3
is v1.10 with a delta from v1.9.4. The server serves the delta envelope because the
device reported v1.9.4's sequence number as installed; the device fetches only the
patch, and its DOWNLOADED report says it used the delta.
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

DEVICE = "delta-dev-1"
PSK = bytes.fromhex("1f1e2d3c4b5a69788796a5b4c3d2e1f0")


def test_esp8266_micropython_v1_9_4_to_v1_10_by_delta_over_dtls(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec(DEVICE, CLASS_A, psk=PSK)])
    ops_psk = setup.add_operator("release-bot")
    cli_ok("keygen", "--out", tmp_path / "author")
    cli_ok("trust", "add", "--data", setup.data, tmp_path / "author.pub")
    old, new = pair("esp8266")
    old_bin, new_bin = tmp_path / "v1.9.4.bin", tmp_path / "v1.10.bin"
    old_bin.write_bytes(old)
    new_bin.write_bytes(new)

    def build(image: Path, seq: int, out: str, *extra: str | Path) -> Path:
        cli_ok(
            "manifest", "build", "--image", image, "--vendor-domain", VENDOR,
            "--class-info", CLASS_A, "--seq", str(seq), "--key", tmp_path / "author",
            "-o", tmp_path / out, *extra,
        )  # fmt: skip
        return tmp_path / out

    factory = setup.release(CLASS_A, 1, make_image("factory", 3000))
    flash = tmp_path / "device.flash"
    device_provision(
        flash, setup, DEVICE, factory, "--trust", str(tmp_path / "author.pub"), slot_size="640K"
    )

    v2 = build(old_bin, 2, "v2.suit")
    v3 = build(new_bin, 3, "v3.suit")
    v3_delta = build(new_bin, 3, "v3-from-v2.suit", "--delta-from", old_bin)
    patch_size = (tmp_path / "v3-from-v2.suit.patch").stat().st_size
    assert patch_size < len(new) // 5

    with running_server(setup.data) as server:
        remote = ("--server", server.uri, "--identity", "release-bot", "--psk", ops_psk.hex())
        cli_ok("publish", v2, old_bin, *remote)
        outcome = device_run_once(flash, server.uri)
        assert outcome["outcome"] == "updated" and outcome["sequence_number"] == 2, outcome

        out = cli_ok(
            "publish", v3, new_bin, "--delta", v3_delta, tmp_path / "v3-from-v2.suit.patch",
            *remote,
        )  # fmt: skip
        assert out.count("published") == 2, out
        outcome = device_run_once(flash, server.uri)
        assert outcome["outcome"] == "updated" and outcome["sequence_number"] == 3, outcome
        assert outcome["image_digest"] == hashlib.sha256(new).hexdigest()

        # Up to date afterwards: it is served the envelope it installed.
        again = device_cli("run", "--flash", str(flash), "--server", server.uri)
        assert again.returncode == 0 and again.stdout.startswith("up-to-date"), again.stdout

    records = device_reports(setup.data, DEVICE)
    v3_reports = [(r.state, r.detail, r.bytes_received) for r in records if r.sequence_number == 3]
    downloaded = [(d, n) for s, d, n in v3_reports if s == "downloaded"]
    assert len(downloaded) == 1 and downloaded[0][0].startswith("delta from "), v3_reports
    assert ("confirmed", "", None) in [(s, d, None) for s, d, _ in v3_reports]
