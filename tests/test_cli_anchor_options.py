"""Command-line options for anchors and expiry: `manifest build --expires-in` and
`python -m device_sim provision --root/--root-threshold`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from server_helpers import cli, cli_ok

from device_sim.cli import main as device_main
from device_sim.firmware import make_image
from otacoap.core import freshness, suit


def test_manifest_build_writes_a_signed_expiry(tmp_path: Path) -> None:
    cli_ok("keygen", "--out", tmp_path / "author")
    image = tmp_path / "fw.bin"
    image.write_bytes(make_image(3000, version=1, seed=1))
    out = tmp_path / "fw.suit"
    cli_ok(
        "manifest", "build", "--image", image, "--vendor-domain", "acme.example",
        "--class-info", "t1", "--seq", "3", "--key", tmp_path / "author",
        "--expires-in", "3600", "-o", out,
    )  # fmt: skip
    expires = freshness.manifest_expiry(suit.decode_envelope(out.read_bytes()).manifest)
    assert expires is not None and abs(expires - (time.time() + 3600)) < 120
    cli_ok("manifest", "verify", out, "--key", tmp_path / "author.pub")
    bad = cli(
        "manifest", "build", "--image", image, "--vendor-domain", "acme.example",
        "--class-info", "t1", "--seq", "3", "--expires-in", "0", "-o", tmp_path / "x.suit",
    )  # fmt: skip
    assert bad.code != 0 and "expires-in" in bad.err


def test_device_provisioned_with_roots_reports_anchor_version_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_ok("keygen", "--out", tmp_path / "author")
    cli_ok("keygen", "--alg", "ed25519", "--out", tmp_path / "root")
    image = tmp_path / "fw.bin"
    image.write_bytes(make_image(3000, version=1, seed=1))
    flash = tmp_path / "dev.flash"
    common = [
        "provision", "--flash", str(flash), "--id", "d1", "--psk", "00" * 16,
        "--vendor-domain", "acme.example", "--class-info", "t1",
        "--trust", str(tmp_path / "author.pub"), "--factory-image", str(image),
        "--slot-size", "64K",
    ]  # fmt: skip
    assert (
        device_main([*common, "--root", str(tmp_path / "root.pub"), "--root-threshold", "2"]) != 0
    )
    assert "root keys" in capsys.readouterr().err
    assert device_main([*common, "--root", str(tmp_path / "root.pub")]) == 0
    capsys.readouterr()
    assert device_main(["status", "--flash", str(flash), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["anchor_version"] == 0
    assert device_main(["status", "--flash", str(flash)]) == 0
    assert "anchors   list version 0" in capsys.readouterr().out
