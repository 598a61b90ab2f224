"""The operator CLI for the server side: init, trust, device, operator, release,
report and audit commands (issue 3 §1, §2, §5). Errors are one line, never a trace."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from server_helpers import CLASS_A, cli, cli_ok, make_setup

from otacoap.core import cose
from otacoap.fsutil import atomic_write


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    cli_ok("init", d)
    return d


def _one_line_error(result_err: str, command: str) -> None:
    assert result_err.startswith(f"otacoap {command}: error: "), result_err
    assert result_err.count("\n") == 1 and "Traceback" not in result_err


def test_init_is_idempotent_and_takes_data_too(tmp_path: Path) -> None:
    d = tmp_path / "x"
    assert "created" in cli_ok("init", d)
    assert "already initialised" in cli_ok("init", d)
    assert "already initialised" in cli_ok("init", "--data", d)


def test_every_command_defaults_to_otacoap_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("device", "list")
    assert result.code == 1
    _one_line_error(result.err, "device list")
    assert "otacoap-data" in result.err
    cli_ok("init")
    assert (tmp_path / "otacoap-data" / "config.toml").exists()
    assert cli("device", "list").code == 0


def test_device_add_generates_and_prints_the_psk_once(data: Path) -> None:
    out = cli_ok(
        "device", "add", "--data", data, "dev-01", "--vendor-domain", "acme.example",
        "--class-info", "c1",
    )  # fmt: skip
    psk = re.search(r"psk ([0-9a-f]{32})\n", out)
    assert psk, out
    shown = cli_ok("device", "show", "--data", data, "dev-01")
    listed = cli_ok("device", "list", "--data", data)
    assert psk.group(1) not in shown + listed
    assert "dev-01  acme.example/c1" in listed
    assert "class info: c1" in shown and "release: none" in shown


def test_device_add_with_psk_prints_no_psk(data: Path) -> None:
    out = cli_ok(
        "device", "add", "--data", data, "d2", "--vendor-domain", "a.example",
        "--class-info", "c", "--psk", "00" * 16,
    )  # fmt: skip
    assert "psk" not in out


@pytest.mark.parametrize(
    ("device_id", "message"),
    [
        ("has space", "printable ASCII"),
        ("tab\there", "printable ASCII"),
        ("nul\x00byte", "printable ASCII"),
        ("x" * 33, "at most 32"),
        ("", "empty"),
        ("operator:mallory", "operators"),
        ("ünïcode", "printable ASCII"),
    ],
)
def test_device_ids_are_validated(data: Path, device_id: str, message: str) -> None:
    result = cli(
        "device", "add", "--data", data, device_id, "--vendor-domain", "a.example",
        "--class-info", "c",
    )  # fmt: skip
    assert result.code == 1
    _one_line_error(result.err, "device add")
    assert message in result.err


@pytest.mark.parametrize("psk", ["zz", "00" * 15, "00" * 17, ""])
def test_bad_psks_are_refused(data: Path, psk: str) -> None:
    result = cli(
        "device", "add", "--data", data, "d", "--vendor-domain", "a", "--class-info", "c",
        "--psk", psk,
    )  # fmt: skip
    if psk == "":
        assert result.code == 0  # empty means "generate one"
        return
    assert result.code == 1
    _one_line_error(result.err, "device add")


def test_duplicate_and_missing_devices(data: Path) -> None:
    args = ["--vendor-domain", "a.example", "--class-info", "c"]
    cli_ok("device", "add", "--data", data, "d1", *args)
    result = cli("device", "add", "--data", data, "d1", *args)
    assert result.code == 1 and "already registered" in result.err
    cli_ok("device", "remove", "--data", data, "d1")
    for cmd in ("show", "remove"):
        result = cli("device", cmd, "--data", data, "d1")
        assert result.code == 1
        _one_line_error(result.err, f"device {cmd}")


def test_operators(data: Path) -> None:
    out = cli_ok("operator", "add", "--data", data, "alice")
    assert "DTLS identity operator:alice" in out and re.search(r"psk [0-9a-f]{32}", out)
    assert re.search(r"(?m)^alice +operator:alice ", cli_ok("operator", "list", "--data", data))
    result = cli("operator", "add", "--data", data, "a" * 24)
    assert result.code == 1 and "at most 23" in result.err
    cli_ok("operator", "remove", "--data", data, "alice")
    assert cli_ok("operator", "list", "--data", data, "--json") == "[]\n"


def test_trust_add_list_remove(data: Path, tmp_path: Path) -> None:
    key = cose.generate_key("ed25519")
    pub = tmp_path / "k.pub"
    atomic_write(pub, key.public.public_pem())
    assert key.public.key_id in cli_ok("trust", "add", "--data", data, pub)
    assert cli("trust", "add", "--data", data, pub).code == 1
    assert key.public.key_id in cli_ok("trust", "list", "--data", data)
    cli_ok("trust", "remove", "--data", data, key.public.key_id)
    assert "no trust anchors" in cli_ok("trust", "list", "--data", data)
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a key")
    result = cli("trust", "add", "--data", data, bogus)
    assert result.code == 1
    _one_line_error(result.err, "trust add")


def test_every_change_is_audited_and_the_chain_verifies(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, operators=["ops"])
    from server_helpers import DeviceSpec, make_image

    setup.add_device(DeviceSpec("t1"))
    setup.publish(setup.release(CLASS_A, 1, make_image("a", 100)))
    cli_ok("device", "remove", "--data", setup.data, "t1")
    listing = cli_ok("audit", "list", "--data", setup.data).splitlines()
    assert listing[0].split() == ["#", "TIME", "ACTOR", "ACTION", "SUBJECT", "OUTCOME", "DETAIL"]
    actions = [
        e["action"] for e in json.loads(cli_ok("audit", "list", "--data", setup.data, "--json"))
    ]
    assert [line.split()[3] for line in listing[1:]] == actions
    assert actions == [
        "init", "trust.add", "operator.add", "device.add", "publish", "device.remove",
    ]  # fmt: skip
    assert "audit log OK: 6 entries" in cli_ok("audit", "verify", "--data", setup.data)
    assert len(cli_ok("audit", "list", "--data", setup.data, "--limit", "2").splitlines()) == 1 + 2


def test_publish_network_options_need_each_other(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    rel = setup.release(CLASS_A, 1, b"x" * 10)
    result = cli(
        "publish", "--data", setup.data, "--identity", "x", rel.envelope_path, rel.image_path
    )
    assert result.code == 1 and "--server" in result.err
    result = cli("publish", "--server", "coaps://127.0.0.1:1", rel.envelope_path, rel.image_path)
    assert result.code == 1 and "--identity" in result.err
