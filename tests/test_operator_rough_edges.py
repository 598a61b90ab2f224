"""What a new operator trying every command with bad input met (issue 12 §2): each case
is one line on stderr, a non-zero exit and no traceback, naming what is wrong."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import OTACOAP_CMD, ROOT, cli, cli_ok

NOBODY = 65534


def _one_line_error(err: str, command: str) -> None:
    assert err.startswith(f"otacoap {command}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    cli_ok("init", d)
    return d


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "fw.bin"
    path.write_bytes(os.urandom(3000))
    return path


def _build(image: Path, out: Path, *extra: str) -> list[str | Path]:
    return [
        "manifest", "build", "--image", image, "--vendor-domain", "example.com",
        "--class-info", "c1", "--seq", "3", "-o", out, *extra,
    ]  # fmt: skip


# --- the store's file -----------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_named_not_traced(data: Path) -> None:
    (data / "otacoap.db").write_bytes(b"this is not SQLite\n" * 10)
    result = cli("device", "list", "--data", data)
    assert result.code == 1
    _one_line_error(result.err, "device list")
    assert "otacoap.db: not an otacoap database or damaged" in result.err


def test_a_truncated_database_is_named_not_traced(data: Path) -> None:
    cli_ok("device", "add", "--data", data, "d1", "--vendor-domain", "a.example",
           "--class-info", "c")  # fmt: skip
    for suffix in ("-wal", "-shm"):
        (data / f"otacoap.db{suffix}").unlink(missing_ok=True)
    db = data / "otacoap.db"
    db.write_bytes(db.read_bytes()[:5000])
    result = cli("device", "list", "--data", data)
    assert result.code == 1
    _one_line_error(result.err, "device list")
    assert "otacoap.db" in result.err and "restore it from a backup" in result.err


def _as_nobody(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI as an unprivileged user: root writes through any permission bits."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("needs setpriv (util-linux) to drop root for a read-only test")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", "import otacoap"],
            cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )  # fmt: skip
        if probe.returncode != 0:
            pytest.skip("the checkout is not readable by an unprivileged user")
    return subprocess.run(
        [*prefix, *OTACOAP_CMD, *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def _read_only_datadir(tmp_path: Path) -> Path:
    base = tmp_path / "ro"
    base.mkdir()
    cli_ok("init", base / "data")
    for path in [base, *base.rglob("*")]:
        if os.geteuid() == 0:
            os.chown(path, NOBODY, NOBODY)
        path.chmod(0o500 if path.is_dir() else 0o400)
    tmp_path.chmod(0o755)
    return base


def test_a_read_only_data_directory_is_named_by_store_commands(tmp_path: Path) -> None:
    base = _read_only_datadir(tmp_path)
    try:
        for command in (["device", "list"], ["audit", "verify"]):
            result = _as_nobody([*command, "--data", "data"], base)
            assert result.returncode == 1
            _one_line_error(result.stderr, " ".join(command))
            assert "read-only" in result.stderr
    finally:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o700)


def test_serve_on_a_read_only_data_directory_names_the_directory_not_the_address(
    tmp_path: Path,
) -> None:
    base = _read_only_datadir(tmp_path)
    try:
        result = _as_nobody(["serve", "--data", "data", "--port", "0"], base)
        assert result.returncode == 1
        _one_line_error(result.stderr.splitlines()[-1] + "\n", "serve")
        assert "cannot serve on" not in result.stderr
        assert "data" in result.stderr and (
            "read-only" in result.stderr or "writable" in result.stderr
        )
    finally:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o700)


def test_serve_names_a_port_in_use(tmp_path: Path, data: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*OTACOAP_CMD, "serve", "--data", str(data), "--bind", "127.0.0.1",
             "--port", str(port)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"otacoap serve: error: cannot serve on 127.0.0.1:{port}: the port is in use "
        "(another otacoap serve, or another CoAP server?)"
    ), result.stderr


# --- files the operator names -----------------------------------------------------------


def test_errors_name_the_file_asked_for_not_a_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "k"
    result = cli("keygen", "--out", target)
    assert result.code == 1
    _one_line_error(result.err, "keygen")
    assert ".tmp" not in result.err and str(target) in result.err


@pytest.mark.parametrize("content", [b"hello\n", b"\xa1\x01\x02", b"\x82"])
def test_a_file_that_is_not_an_envelope_is_named_as_such(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "thing.bin"
    path.write_bytes(content)
    cli_ok("keygen", "--out", tmp_path / "k")
    for argv, command in (
        (["manifest", "inspect", path], "manifest inspect"),
        (["manifest", "verify", path, "--key", tmp_path / "k.pub"], "manifest verify"),
        (["manifest", "sign", path, "--key", tmp_path / "k", "-o", tmp_path / "o"],
         "manifest sign"),
    ):  # fmt: skip
        result = cli(*argv)
        assert result.code == 1
        _one_line_error(result.err, command)
        assert f"{path}: not a valid SUIT envelope" in result.err


def test_report_list_for_an_unknown_device_fails(data: Path) -> None:
    result = cli("report", "list", "--data", data, "--device", "ghost")
    assert result.code == 1
    _one_line_error(result.err, "report list")
    assert "ghost" in result.err


# --- manifest build and sign --------------------------------------------------------------


@pytest.mark.parametrize("uri", ["ht tp://:::", "coaps://", "no-scheme-or-slash", ""])
def test_build_refuses_a_uri_no_device_could_fetch(tmp_path: Path, image: Path, uri: str) -> None:
    out = tmp_path / "fw.suit"
    result = cli(*_build(image, out, "--uri", uri))
    assert result.code == 1
    _one_line_error(result.err, "manifest build")
    assert "URI" in result.err and not out.exists()


def test_build_accepts_absolute_and_server_relative_uris(tmp_path: Path, image: Path) -> None:
    for i, uri in enumerate(["coaps://[2001:db8::1]:5684/fw/x", "/fw/abc", "coap://h/p"]):
        cli_ok(*_build(image, tmp_path / f"fw{i}.suit", "--uri", uri))


@pytest.mark.parametrize("domain", ["", "exa mple.com", "bad-.example", "a..b"])
def test_build_refuses_a_vendor_domain_that_is_not_a_dns_name(
    tmp_path: Path, image: Path, domain: str
) -> None:
    argv = _build(image, tmp_path / "fw.suit")
    argv[argv.index("example.com")] = domain
    result = cli(*argv)
    assert result.code == 1
    _one_line_error(result.err, "manifest build")
    assert "vendor domain" in result.err


def test_build_does_not_overwrite_its_output_unless_forced(tmp_path: Path, image: Path) -> None:
    out = tmp_path / "fw.suit"
    out.write_bytes(b"precious")
    result = cli(*_build(image, out))
    assert result.code == 1
    _one_line_error(result.err, "manifest build")
    assert out.read_bytes() == b"precious"
    cli_ok(*_build(image, out, "--force"))
    assert out.read_bytes() != b"precious"


@pytest.mark.parametrize("alg", ["es256", "ed25519"])
def test_signing_twice_with_the_same_key_is_refused(tmp_path: Path, image: Path, alg: str) -> None:
    cli_ok("keygen", "--alg", alg, "--out", tmp_path / "k")
    cli_ok("keygen", "--out", tmp_path / "k2")
    signed = tmp_path / "fw.suit"
    cli_ok(*_build(image, signed, "--key", tmp_path / "k"))
    result = cli("manifest", "sign", signed, "--key", tmp_path / "k", "-o", tmp_path / "again")
    assert result.code == 1
    _one_line_error(result.err, "manifest sign")
    assert "already signed" in result.err and not (tmp_path / "again").exists()
    # A second, different key is still welcome.
    cli_ok("manifest", "sign", signed, "--key", tmp_path / "k2", "-o", tmp_path / "both")


# --- the server's log when strangers knock ---------------------------------------------


@pytest.mark.network
@pytest.mark.timeout(120)
def test_bad_credentials_are_counted_in_the_log_not_dumped_as_tracebacks(tmp_path: Path) -> None:
    import asyncio

    from server_helpers import DeviceSpec, coaps_client, get, make_setup, running_server

    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")])
    with running_server(setup.data) as server:

        async def knock(identity: str, psk: bytes) -> None:
            with contextlib.suppress(Exception):
                async with coaps_client(server.port, identity, psk) as ctx:
                    await asyncio.wait_for(get(ctx, server.uri + "/m"), 6)

        async def go() -> None:
            await knock("t1", os.urandom(16))  # a wrong key
            await knock("ghost", os.urandom(16))  # an unknown identity

        asyncio.run(go())
        log = server.log()
    for noise in ("Traceback", "Unhandled exception", "Error in close", "tried accessing"):
        assert noise not in log, log
    assert "failed DTLS handshake" in log and "(bad key)" in log
