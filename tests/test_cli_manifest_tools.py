"""`otacoap keygen` and `otacoap manifest build|sign|inspect|verify`, as an operator uses them.

Most runs go through `otacoap.cli.main` in-process (capsys); a few run the installed
console script for real. Every refusal is exactly one line on stderr and a non-zero exit:
1 for a refused input or a missing file, 2 for a usage error; never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from otacoap.cli import main
from otacoap.core import cose, ids, suit, trust

CONSOLE_SCRIPT = Path(sys.executable).parent / "otacoap"
IMAGE = bytes(range(256)) * 12 + b"tail"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def assert_one_line_error(err: str, command: str) -> None:
    assert err.endswith("\n"), err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"otacoap {command}: error: "), err


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "fw.bin"
    path.write_bytes(IMAGE)
    return path


@pytest.fixture
def key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "signing"
    assert cli(capsys, "keygen", "--out", str(path))[0] == 0
    return path


def build_args(image: Path, out: Path, *extra: str, seq: str = "7") -> list[str]:
    return [
        "manifest",
        "build",
        "--image",
        str(image),
        "--vendor-domain",
        "example.com",
        "--class-info",
        "thermostat",
        "--seq",
        seq,
        "-o",
        str(out),
        *extra,
    ]


# -- keygen ------------------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "kind"), [("es256", "p256"), ("ed25519", "ed25519")])
def test_keygen_writes_a_private_key_readable_only_by_the_owner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], alg: str, kind: str
) -> None:
    out = tmp_path / "k"
    code, stdout, err = cli(capsys, "keygen", "--alg", alg, "--out", str(out))
    assert (code, err) == (0, "")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    private = cose.load_private_key(out.read_bytes())
    public = cose.load_public_key((tmp_path / "k.pub").read_bytes())
    assert private.kind == public.kind == kind
    assert private.public.key_id == public.key_id
    assert public.key_id in stdout
    assert b"PRIVATE" not in (tmp_path / "k.pub").read_bytes()


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k"
    assert cli(capsys, "keygen", "--out", str(out))[0] == 0
    before = out.read_bytes(), (tmp_path / "k.pub").read_bytes()
    code, stdout, err = cli(capsys, "keygen", "--out", str(out))
    assert code == 1 and stdout == ""
    assert_one_line_error(err, "keygen")
    assert (out.read_bytes(), (tmp_path / "k.pub").read_bytes()) == before


def test_keygen_refuses_when_only_the_public_half_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "k.pub").write_text("keep me")
    code, _, err = cli(capsys, "keygen", "--out", str(tmp_path / "k"))
    assert code == 1
    assert_one_line_error(err, "keygen")
    assert not (tmp_path / "k").exists()
    assert (tmp_path / "k.pub").read_text() == "keep me"


def test_keygen_force_overwrites_and_keeps_mode_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k"
    out.write_text("old")
    out.chmod(0o644)
    assert cli(capsys, "keygen", "--out", str(out), "--force")[0] == 0
    assert out.read_text() != "old"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_keygen_into_a_missing_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "keygen", "--out", str(tmp_path / "no" / "such" / "k"))
    assert code == 1
    assert_one_line_error(err, "keygen")


# -- build -------------------------------------------------------------------------------


def test_build_unsigned_uses_the_default_image_uri(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fw.suit"
    code, stdout, err = cli(capsys, *build_args(image, out))
    assert (code, err) == (0, "")
    assert "UNSIGNED" in stdout
    envelope = suit.decode_envelope(out.read_bytes())
    assert envelope.authentication.blocks == ()
    summary = trust.summarize(envelope)
    images, vendors, classes = summary.images, summary.vendor_ids, summary.class_ids
    sha = hashlib.sha256(IMAGE).hexdigest()
    assert images == (
        trust.ImageInfo(
            0,
            suit.SuitDigest(suit.DIGEST_SHA256, bytes.fromhex(sha)),
            len(IMAGE),
            f"/fw/{sha[:16]}",
        ),
    )
    assert f"/fw/{sha[:16]}" in stdout
    assert vendors == (ids.vendor_id("example.com"),)
    assert classes == (ids.class_id(ids.vendor_id("example.com"), "thermostat"),)
    assert envelope.manifest.sequence_number == 7


def test_build_unsigned_does_not_verify(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fw.suit"
    cli(capsys, *build_args(image, out))
    code, stdout, err = cli(capsys, "manifest", "verify", str(out), "--key", f"{key}.pub")
    assert code == 1 and stdout == ""
    assert_one_line_error(err, "manifest verify")


def test_build_signed_verifies_and_reports_the_release(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fw.suit"
    uri = "coaps://fw.example.com/fw/thermostat-1.2.0"
    assert cli(capsys, *build_args(image, out, "--key", str(key), "--uri", uri))[0] == 0
    code, stdout, err = cli(capsys, "manifest", "verify", str(out), "--key", f"{key}.pub", "--json")
    assert (code, err) == (0, "")
    report = json.loads(stdout)
    assert report["sequence_number"] == 7
    assert report["signer"] == cose.load_public_key(Path(f"{key}.pub").read_bytes()).key_id
    assert report["images"] == [
        {
            "component": 0,
            "digest": hashlib.sha256(IMAGE).hexdigest(),
            "size": len(IMAGE),
            "uri": uri,
        }
    ]
    assert report["vendor_id"] == str(uuid.UUID(bytes=ids.vendor_id("example.com")))


@pytest.mark.parametrize("seq", ["0", str((1 << 64) - 1)])
def test_build_accepts_the_uint64_range(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], seq: str
) -> None:
    out = tmp_path / "fw.suit"
    assert cli(capsys, *build_args(image, out, seq=seq))[0] == 0
    assert suit.decode_envelope(out.read_bytes()).manifest.sequence_number == int(seq)


@pytest.mark.parametrize("seq", ["-1", "abc", str(1 << 64), "1.5", "", "0x10"])
def test_build_refuses_a_sequence_number_outside_uint64_as_a_usage_error(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], seq: str
) -> None:
    out = tmp_path / "fw.suit"
    code, stdout, err = cli(capsys, *build_args(image, out, seq=seq))
    assert code == 2 and stdout == ""
    assert_one_line_error(err, "manifest build")
    assert "--seq" in err
    assert not out.exists()


def test_build_refuses_an_empty_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    code, _, err = cli(capsys, *build_args(empty, tmp_path / "out"))
    assert code == 1
    assert_one_line_error(err, "manifest build")
    assert not (tmp_path / "out").exists()


# -- sign --------------------------------------------------------------------------------


def test_sign_adds_a_signature_that_verifies(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unsigned, signed = tmp_path / "u.suit", tmp_path / "s.suit"
    cli(capsys, *build_args(image, unsigned))
    code, _, err = cli(
        capsys, "manifest", "sign", "--key", str(key), str(unsigned), "-o", str(signed)
    )
    assert (code, err) == (0, "")
    assert cli(capsys, "manifest", "verify", str(signed), "--key", f"{key}.pub")[0] == 0
    # The signature covers the same manifest the unsigned file held.
    assert (
        suit.decode_envelope(signed.read_bytes()).manifest_raw
        == suit.decode_envelope(unsigned.read_bytes()).manifest_raw
    )


def test_sign_twice_makes_an_envelope_either_key_verifies(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    second = tmp_path / "second"
    cli(capsys, "keygen", "--alg", "ed25519", "--out", str(second))
    once, twice = tmp_path / "1.suit", tmp_path / "2.suit"
    cli(capsys, *build_args(image, once, "--key", str(key)))
    assert (
        cli(capsys, "manifest", "sign", "--key", str(second), str(once), "-o", str(twice))[0] == 0
    )
    assert len(suit.decode_envelope(twice.read_bytes()).authentication.blocks) == 2
    for pub in (f"{key}.pub", f"{second}.pub"):
        assert cli(capsys, "manifest", "verify", str(twice), "--key", pub)[0] == 0


def test_sign_refuses_an_envelope_whose_digest_does_not_match(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.suit", tmp_path / "b.suit"
    cli(capsys, *build_args(image, a, seq="1"))
    cli(capsys, *build_args(image, b, seq="2"))
    env_a, env_b = suit.decode_envelope(a.read_bytes()), suit.decode_envelope(b.read_bytes())
    forged = suit.encode_envelope(
        suit.Envelope(env_a.authentication, env_b.manifest, env_b.manifest_raw)
    )
    (tmp_path / "forged.suit").write_bytes(forged)
    code, _, err = cli(
        capsys,
        "manifest",
        "sign",
        "--key",
        str(key),
        str(tmp_path / "forged.suit"),
        "-o",
        str(tmp_path / "o"),
    )
    assert code == 1
    assert_one_line_error(err, "manifest sign")
    assert not (tmp_path / "o").exists()


# -- inspect -----------------------------------------------------------------------------


def test_inspect_shows_a_readable_summary_and_the_cbor_diagnostic(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fw.suit"
    cli(capsys, *build_args(image, out, "--key", str(key)))
    code, stdout, err = cli(capsys, "manifest", "inspect", str(out))
    assert (code, err) == (0, "")
    sha = hashlib.sha256(IMAGE).hexdigest()
    for needle in (
        "tagged 107",
        "authentication blocks: 1",
        "alg ES256",
        "sequence number: 7",
        str(uuid.UUID(bytes=ids.vendor_id("example.com"))),
        f"sha256 {sha}",
        f"/fw/{sha[:16]}",
        "manifest (CBOR diagnostic notation):",
    ):
        assert needle in stdout, needle
    diagnostic = stdout.split("manifest (CBOR diagnostic notation):", 1)[1]
    assert f"h'{sha}'" in diagnostic  # the bstr-wrapped digest is expanded for reading
    assert "MISMATCH" not in stdout


def test_inspect_reads_a_shared_vector_hex_file(
    keys_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = keys_dir.parent / "vectors" / "ietf-manifest_ex1_signed.hex"
    code, stdout, _ = cli(capsys, "manifest", "inspect", str(path))
    assert code == 0
    assert "http://example.com/file.bin" in stdout
    assert "fa6b4a53-d5ad-5fdf-be9d-e663e4d41ffe" in stdout
    assert "sequence number: 1" in stdout


# -- verify ------------------------------------------------------------------------------


def test_verify_ok_prints_one_line(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fw.suit"
    cli(capsys, *build_args(image, out, "--key", str(key)))
    code, stdout, err = cli(capsys, "manifest", "verify", str(out), "--key", f"{key}.pub")
    assert (code, err) == (0, "")
    assert stdout.startswith("fw.suit: OK, sequence number 7")
    assert len(stdout.splitlines()) == 1


def test_verify_with_the_wrong_key_fails_with_one_line(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    cli(capsys, "keygen", "--out", str(other))
    out = tmp_path / "fw.suit"
    cli(capsys, *build_args(image, out, "--key", str(key)))
    code, stdout, err = cli(
        capsys, "manifest", "verify", str(out), "--key", f"{other}.pub", "--json"
    )
    assert code == 1
    verdict = json.loads(stdout)
    assert verdict["valid"] is False and verdict["reason"] == "UNAUTHORISED"
    assert "does not verify" in verdict["error"]
    assert_one_line_error(err, "manifest verify")


def test_verify_accepts_a_hex_file(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fw.suit"
    cli(capsys, *build_args(image, out, "--key", str(key)))
    hex_file = tmp_path / "fw.hex"
    hex_file.write_text(out.read_bytes().hex().upper() + "\n")
    code, stdout, err = cli(
        capsys, "manifest", "verify", str(hex_file), "--key", f"{key}.pub", "--json"
    )
    assert (code, err) == (0, "")
    assert json.loads(stdout)["sequence_number"] == 7


def test_verify_without_any_key_is_refused(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fw.suit"
    cli(capsys, *build_args(image, out))
    code, _, err = cli(capsys, "manifest", "verify", str(out))
    assert code == 1
    assert_one_line_error(err, "manifest verify")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00",
        b"not hex, not cbor \xff\xfe",
        b"abc",
        b"\xd8\x6b\xa0",
        b"\x81" * 5000 + b"\x00",
    ],
    ids=["empty", "zero", "garbage", "odd-hex", "empty-envelope", "nesting-bomb"],
)
@pytest.mark.parametrize("command", ["verify", "inspect", "sign"])
def test_malformed_envelope_file_is_one_line_error(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str], content: bytes, command: str
) -> None:
    path = tmp_path / "bad.suit"
    path.write_bytes(content)
    extra = {
        "verify": ["--key", f"{key}.pub"],
        "inspect": [],
        "sign": ["--key", str(key), "-o", str(tmp_path / "o")],
    }[command]
    code, stdout, err = cli(capsys, "manifest", command, str(path), *extra)
    assert code == 1 and stdout == ""
    assert_one_line_error(err, f"manifest {command}")


@pytest.mark.parametrize(
    "argv",
    [
        ["manifest", "verify", "{missing}", "--key", "{pub}"],
        ["manifest", "verify", "{env}", "--key", "{missing}"],
        ["manifest", "verify", "{env}", "--hmac-key", "{missing}"],
        ["manifest", "inspect", "{missing}"],
        ["manifest", "sign", "--key", "{missing}", "{env}", "-o", "{out}"],
        ["manifest", "sign", "--key", "{priv}", "{missing}", "-o", "{out}"],
        [
            "manifest",
            "build",
            "--image",
            "{missing}",
            "--vendor-domain",
            "e",
            "--class-info",
            "c",
            "--seq",
            "1",
            "-o",
            "{out}",
        ],
        [
            "manifest",
            "build",
            "--image",
            "{env}",
            "--vendor-domain",
            "e",
            "--class-info",
            "c",
            "--seq",
            "1",
            "--key",
            "{missing}",
            "-o",
            "{out}",
        ],
    ],
    ids=[
        "verify-envelope",
        "verify-key",
        "verify-hmac-key",
        "inspect",
        "sign-key",
        "sign-envelope",
        "build-image",
        "build-key",
    ],
)
def test_missing_file_is_a_one_line_error_naming_it(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    env = tmp_path / "fw.suit"
    cli(capsys, *build_args(image, env, "--key", str(key)))
    missing = tmp_path / "does-not-exist"
    values = {
        "missing": missing,
        "pub": f"{key}.pub",
        "priv": key,
        "env": env,
        "out": tmp_path / "o",
    }
    code, stdout, err = cli(capsys, *(a.format(**values) for a in argv))
    assert code == 1 and stdout == ""
    assert_one_line_error(err, " ".join(argv[:2]))
    assert str(missing) in err
    assert not (tmp_path / "o").exists()


def test_wrong_kind_of_key_file_is_a_one_line_error(
    tmp_path: Path, image: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fw.suit"
    cli(capsys, *build_args(image, out, "--key", str(key)))
    code, _, err = cli(capsys, "manifest", "verify", str(out), "--key", str(image))
    assert code == 1
    assert_one_line_error(err, "manifest verify")
    code, _, err = cli(capsys, *build_args(image, tmp_path / "x", "--key", f"{key}.pub"))
    assert code == 1
    assert_one_line_error(err, "manifest build")


# -- the installed console script --------------------------------------------------------


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_console_script_keygen_build_verify(tmp_path: Path, image: Path) -> None:
    assert _run("keygen", "--alg", "ed25519", "--out", "k", cwd=tmp_path).returncode == 0
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    built = _run(*build_args(image, tmp_path / "fw.suit", "--key", "k"), cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    verified = _run("manifest", "verify", "fw.suit", "--key", "k.pub", "--json", cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["valid"] is True


def test_console_script_refusals_have_no_traceback(tmp_path: Path, image: Path) -> None:
    usage = _run(*build_args(image, tmp_path / "x", seq="-1"), cwd=tmp_path)
    assert usage.returncode == 2
    missing = _run("manifest", "inspect", "nope.suit", cwd=tmp_path)
    assert missing.returncode == 1
    for result in (usage, missing):
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
