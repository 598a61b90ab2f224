"""Secrets off the command line (issue 10 §5).

Every command that takes a PSK also reads it from a file (`--psk-file FILE`, `-` for
standard input) or an environment variable (OTACOAP_PSK; OTACOAP_OPERATOR_PSK for
`publish --server`), so it need not show in `ps`, /proc/*/cmdline or shell history;
`--psk HEX` still works but warns. A private key given where a public one belongs is
refused with one line: the author key stays offline.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest
from evil_server import CLASS, DEVICE_ID, VENDOR, manifest_bytes, sign
from server_helpers import CLASS_A, DeviceSpec, cli, cli_ok, make_image, make_setup, running_server

from device_sim import cli as device_cli
from device_sim.firmware import make_image as device_image
from device_sim.layout import open_flash
from otacoap.core import cose
from otacoap.store import DataDir

ROOT = Path(__file__).resolve().parent.parent
PSK = bytes(range(16))
WARNING = "--psk exposes the key in the process list"


@pytest.fixture(autouse=True)
def _no_psk_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTACOAP_PSK", raising=False)
    monkeypatch.delenv("OTACOAP_OPERATOR_PSK", raising=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    cli_ok("init", d)
    return d


def _stored_psk(data: Path, identity: str) -> bytes:
    store = DataDir(data).open_store()
    try:
        found = store.lookup_identity(identity)
    finally:
        store.close()
    assert found is not None
    return found[1]


def _psk_file(tmp_path: Path, psk: bytes = PSK, name: str = "psk.hex") -> Path:
    path = tmp_path / name
    path.write_text(psk.hex() + "\n")
    path.chmod(0o600)
    return path


def _one_line(err: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err


_DEVICE = ["--vendor-domain", "v.example", "--class-info", "c"]


# --- otacoap device add / operator add -------------------------------------------------


def test_device_add_reads_the_psk_from_a_file(data: Path, tmp_path: Path) -> None:
    result = cli("device", "add", "--data", data, "d1", *_DEVICE, "--psk-file", _psk_file(tmp_path))
    assert result.code == 0, result.err
    assert result.err == "" and "psk" not in result.out
    assert _stored_psk(data, "d1") == PSK


def test_device_add_reads_the_psk_from_standard_input(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PSK.hex() + "\n"))
    result = cli("device", "add", "--data", data, "d1", *_DEVICE, "--psk-file", "-")
    assert result.code == 0, result.err
    assert _stored_psk(data, "d1") == PSK


def test_device_and_operator_add_read_the_psk_from_the_environment(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTACOAP_PSK", PSK.hex())
    result = cli("device", "add", "--data", data, "d1", *_DEVICE)
    assert result.code == 0 and result.err == "" and "psk" not in result.out
    assert _stored_psk(data, "d1") == PSK
    other = bytes(reversed(PSK))
    monkeypatch.setenv("OTACOAP_PSK", other.hex())
    result = cli("operator", "add", "--data", data, "ops")
    assert result.code == 0 and result.err == "" and "psk" not in result.out
    assert _stored_psk(data, "operator:ops") == other


def test_operator_add_reads_the_psk_from_a_file(data: Path, tmp_path: Path) -> None:
    result = cli("operator", "add", "--data", data, "ops", "--psk-file", _psk_file(tmp_path))
    assert result.code == 0 and result.err == "", result.err
    assert _stored_psk(data, "operator:ops") == PSK


@pytest.mark.parametrize("command", ["device", "operator"])
def test_psk_on_the_command_line_still_works_but_warns(data: Path, command: str) -> None:
    extra = _DEVICE if command == "device" else []
    result = cli(command, "add", "--data", data, "x1", *extra, "--psk", PSK.hex())
    assert result.code == 0
    assert WARNING in result.err and "--psk-file" in result.err and "OTACOAP_PSK" in result.err
    _one_line(result.err)
    identity = "x1" if command == "device" else "operator:x1"
    assert _stored_psk(data, identity) == PSK


def test_psk_sources_are_refused_with_one_line(data: Path, tmp_path: Path) -> None:
    both = cli(
        "device", "add", "--data", data, "d1", *_DEVICE, "--psk", PSK.hex(),
        "--psk-file", _psk_file(tmp_path),
    )  # fmt: skip
    assert both.code == 1 and "not both" in both.err
    missing = cli("device", "add", "--data", data, "d1", *_DEVICE, "--psk-file", tmp_path / "no")
    assert missing.code == 1 and "no such file" in missing.err
    _one_line(missing.err)
    bad = tmp_path / "bad.hex"
    bad.write_text("zz" * 16)
    result = cli("device", "add", "--data", data, "d1", *_DEVICE, "--psk-file", bad)
    assert result.code == 1 and str(bad) in result.err and "hexadecimal" in result.err
    _one_line(result.err)
    short = _psk_file(tmp_path, PSK[:15], "short.hex")
    result = cli("operator", "add", "--data", data, "ops", "--psk-file", short)
    assert result.code == 1 and "16 bytes" in result.err
    _one_line(result.err)
    assert "d1" not in cli_ok("device", "list", "--data", data)


def test_help_names_the_psk_file_and_the_environment_variables() -> None:
    for args, env in (
        (["device", "add"], "OTACOAP_PSK"),
        (["operator", "add"], "OTACOAP_PSK"),
        (["publish"], "OTACOAP_OPERATOR_PSK"),
    ):
        result = cli(*args, "--help")
        assert result.code == 0
        assert "--psk-file" in result.out and env in result.out, result.out


# --- otacoap publish --server ----------------------------------------------------------


def test_network_publish_takes_the_operator_psk_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")], operators=["ops"])
    psk_file = _psk_file(tmp_path, setup.operators["ops"], "ops.hex")
    v1 = setup.release(CLASS_A, 1, make_image("p1", 2000))
    v2 = setup.release(CLASS_A, 2, make_image("p2", 2000))
    with running_server(setup.data) as server:
        result = cli(
            "publish", "--server", server.uri, "--identity", "ops", "--psk-file", psk_file,
            "--timeout", "20", v1.envelope_path, v1.image_path,
        )  # fmt: skip
        assert result.code == 0, result.err
        assert "seq 1" in result.out and result.err == ""
        monkeypatch.setenv("OTACOAP_OPERATOR_PSK", setup.operators["ops"].hex())
        monkeypatch.setenv("OTACOAP_PSK", "00" * 16)  # the device/operator-add one: not used
        result = cli(
            "publish", "--server", server.uri, "--identity", "ops", "--timeout", "20",
            v2.envelope_path, v2.image_path,
        )  # fmt: skip
        assert result.code == 0, result.err
        assert "seq 2" in result.out and result.err == ""


def test_network_publish_without_any_operator_psk_names_the_sources(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    rel = setup.release(CLASS_A, 1, b"x" * 10)
    result = cli(
        "publish", "--server", "coaps://127.0.0.1:1", "--identity", "ops",
        rel.envelope_path, rel.image_path,
    )  # fmt: skip
    assert result.code == 1 and "--psk-file" in result.err and "OTACOAP_OPERATOR_PSK" in result.err
    _one_line(result.err)
    local = cli(
        "publish", "--data", setup.data, "--psk-file", _psk_file(tmp_path),
        rel.envelope_path, rel.image_path,
    )  # fmt: skip
    assert local.code == 1 and "--server" in local.err


# --- python -m device_sim provision ----------------------------------------------------


@pytest.fixture
def factory(tmp_path: Path) -> dict[str, Path]:
    key = cose.generate_key("es256")
    files = {
        "pub": tmp_path / "author.pub",
        "private": tmp_path / "author",
        "image": tmp_path / "fw.bin",
        "envelope": tmp_path / "fw.suit",
    }
    image = device_image(3000, version=4)
    files["pub"].write_bytes(key.public.public_pem())
    files["private"].write_bytes(key.pem)
    files["image"].write_bytes(image)
    files["envelope"].write_text(sign(manifest_bytes(image=image, seq=4), key).hex())
    return files


def _provision(
    flash: Path, factory: dict[str, Path], *psk_args: str, trust: str = "pub"
) -> tuple[int, str, str]:
    args = [
        "provision", "--flash", str(flash), "--id", DEVICE_ID, *psk_args,
        "--vendor-domain", VENDOR, "--class-info", CLASS, "--trust", str(factory[trust]),
        "--factory-image", str(factory["image"]), "--factory-envelope", str(factory["envelope"]),
        "--slot-size", "64K",
    ]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    from contextlib import redirect_stderr, redirect_stdout

    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = device_cli.main(args)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _flash_psk(flash: Path) -> bytes:
    f, identity = open_flash(flash)
    f.close()
    return identity.psk


def test_provision_reads_the_psk_from_a_file_stdin_or_the_environment(
    tmp_path: Path, factory: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = _provision(
        tmp_path / "a.flash", factory, "--psk-file", str(_psk_file(tmp_path))
    )
    assert code == 0 and err == "" and "seq 4" in out, err
    assert _flash_psk(tmp_path / "a.flash") == PSK
    monkeypatch.setattr(sys, "stdin", io.StringIO(PSK.hex()))
    code, _, err = _provision(tmp_path / "b.flash", factory, "--psk-file", "-")
    assert code == 0 and err == "", err
    assert _flash_psk(tmp_path / "b.flash") == PSK
    monkeypatch.setenv("OTACOAP_PSK", PSK.hex())
    code, _, err = _provision(tmp_path / "c.flash", factory)
    assert code == 0 and err == "", err
    assert _flash_psk(tmp_path / "c.flash") == PSK


def test_provision_psk_on_the_command_line_warns_and_a_missing_one_is_refused(
    tmp_path: Path, factory: dict[str, Path]
) -> None:
    code, _, err = _provision(tmp_path / "a.flash", factory, "--psk", PSK.hex())
    assert code == 0 and WARNING in err
    _one_line(err)
    code, _, err = _provision(tmp_path / "b.flash", factory)
    assert code != 0 and "--psk-file" in err and "OTACOAP_PSK" in err
    _one_line(err)
    assert not (tmp_path / "b.flash").exists()


def test_provision_help_names_the_psk_file_and_the_environment_variable() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "device_sim", "provision", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0
    assert "--psk-file" in done.stdout and "OTACOAP_PSK" in done.stdout


# --- private keys where public ones belong ---------------------------------------------


def _cose_private_key() -> bytes:
    key = cose.generate_key("es256")
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(key.pem, password=None)
    numbers = private.private_numbers()  # type: ignore[union-attr]
    x = numbers.public_numbers.x.to_bytes(32, "big")
    y = numbers.public_numbers.y.to_bytes(32, "big")
    d = numbers.private_value.to_bytes(32, "big")
    # RFC 9053 §7.1.1: kty EC2 (2), crv P-256 (1), x (-2), y (-3), d (-4).
    return cbor2.dumps({1: 2, -1: 1, -2: x, -3: y, -4: d})


def test_trust_add_refuses_a_private_key(data: Path, tmp_path: Path) -> None:
    for kind in ("es256", "ed25519"):
        key = cose.generate_key(kind)
        path = tmp_path / f"{kind}.pem"
        path.write_bytes(key.pem)
        result = cli("trust", "add", "--data", data, path)
        assert result.code == 1 and "private key" in result.err and str(path) in result.err
        _one_line(result.err)
    cose_key = tmp_path / "author.cose"
    cose_key.write_bytes(_cose_private_key())
    result = cli("trust", "add", "--data", data, cose_key)
    assert result.code == 1 and "private key" in result.err
    _one_line(result.err)
    assert "no trust anchors" in cli_ok("trust", "list", "--data", data)


def test_manifest_verify_refuses_a_private_key(tmp_path: Path) -> None:
    key = cose.generate_key("es256")
    (tmp_path / "author").write_bytes(key.pem)
    (tmp_path / "fw.bin").write_bytes(b"x" * 100)
    cli_ok(
        "manifest", "build", "--image", tmp_path / "fw.bin", "--vendor-domain", "v.example",
        "--class-info", "c", "--seq", "1", "--key", tmp_path / "author", "-o", tmp_path / "fw.suit",
    )  # fmt: skip
    result = cli("manifest", "verify", tmp_path / "fw.suit", "--key", tmp_path / "author")
    assert result.code == 1 and "private key" in result.err
    _one_line(result.err)


def test_provision_refuses_a_private_trust_key(tmp_path: Path, factory: dict[str, Path]) -> None:
    code, _, err = _provision(
        tmp_path / "a.flash", factory, "--psk-file", str(_psk_file(tmp_path)), trust="private"
    )
    assert code == 1 and "private key" in err and str(factory["private"]) in err
    _one_line(err)
    assert not (tmp_path / "a.flash").exists()
