"""Every shared SUIT vector gives the outcome its JSON names, through the API and the CLI.

The vectors are read in place from ../shared/suit/vectors (tests/conftest.py). The API
route is `trust.accept` with a policy that trusts every public key in shared/suit/keys
plus the HMAC key; the CLI route is `otacoap manifest verify FILE --key ... --hmac-key
... --json`, mostly in-process through `otacoap.cli.main`, twice as a real subprocess of
the console script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import ALL_VECTORS, Vector

from otacoap.cli import main
from otacoap.cli.manifest_cmds import verification_report
from otacoap.core import cose, trust
from otacoap.core.errors import AuthenticationError, ManifestError, OtaError, ReportReason

ACCEPTED = [v.name for v in ALL_VECTORS if v.should_accept]
REJECTED = [v.name for v in ALL_VECTORS if not v.should_accept]
CONSOLE_SCRIPT = Path(sys.executable).parent / "otacoap"
DRAFT_KEY = "draft-examples_p256_public.pem"
DEPENDENCY_KEY = "fwenc-dependency-signer_p256_public.pem"
HMAC_KEY = "fwenc_hmac256_key.hex"


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def by_name(vectors: list[Vector]) -> dict[str, Vector]:
    return {v.name: v for v in vectors}


@pytest.fixture(scope="module")
def public_keys(keys_dir: Path) -> list[Path]:
    keys = sorted(keys_dir.glob("*_public.pem"))
    assert keys, f"no public keys in {keys_dir}"
    return keys


@pytest.fixture(scope="module")
def policy(keys_dir: Path, public_keys: list[Path]) -> trust.TrustPolicy:
    anchors = [cose.load_public_key(p.read_bytes()) for p in public_keys]
    anchors.append(cose.hmac_anchor(bytes.fromhex((keys_dir / HMAC_KEY).read_text().strip())))
    return trust.TrustPolicy(anchors=tuple(anchors))


@pytest.fixture(scope="module")
def key_args(keys_dir: Path, public_keys: list[Path]) -> list[str]:
    args: list[str] = []
    for p in public_keys:
        args += ["--key", str(p)]
    return [*args, "--hmac-key", str(keys_dir / HMAC_KEY)]


def _hex_path(keys_dir: Path, name: str) -> Path:
    return keys_dir.parent / "vectors" / f"{name}.hex"


def test_corpus_has_every_vector_the_index_lists(vectors: list[Vector]) -> None:
    """A missing or partial corpus fails here (and in CI=true the fixture itself fails)."""
    assert len(vectors) == 44
    assert len(ACCEPTED) == 31
    assert sorted(REJECTED) == sorted(
        [f"ietf-manifest_ex{i}_unsigned" for i in (0, 1, 3, 4, 5)]
        + ["ietf-manifest_ex2_severed_unsigned"]
        + [f"legacy-d18_ex{i}" for i in range(1, 8)]
    )


# -- what an accepted vector must show ---------------------------------------------------


def _check_report_against_expected(report: dict[str, Any], vector: Vector) -> None:
    """Compare the verify report (CLI --json shape) with the vector's expected values."""
    e = vector.expected
    assert report["valid"] is True
    assert report["sequence_number"] == e["sequence_number"]
    assert report["manifest_digest"] == e["manifest_digest"]["digest-bytes"]
    assert report["manifest_digest_algorithm"] == e["manifest_digest"]["algorithm-id"]
    assert report["components"] == e["components_hex"]
    assert report["tagged"] is (e["outer_tag"] == 107)
    if "reference_uri" in e:
        assert report["reference_uri"] == e["reference_uri"]

    images: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for image in report["images"]:
        images[image["component"]].append(image)
    for field, out_key, value_of in (
        ("image_digests", "digest", lambda d: d["digest-bytes"]),
        ("image_sizes", "size", lambda d: d["image-size"]),
        ("uris", "uri", lambda d: d["uri"]),
    ):
        expected_by_component: dict[int, set[Any]] = defaultdict(set)
        for entry in e[field]:
            comp, value = entry["component-index"], value_of(entry)
            expected_by_component[comp].add(value)
            got = [i[out_key] for i in images[comp]]
            if "try-each" not in entry["section"]:
                # Set unconditionally: the static summary must show exactly this value.
                assert value in got, (field, comp, value, got)
        # Values under try-each are alternatives: the summary can show only one per
        # component, but whatever it shows must be one the manifest offers.
        for comp, offered in expected_by_component.items():
            for image in images[comp]:
                if image[out_key] is not None:
                    assert image[out_key] in offered, (field, comp, image[out_key], offered)

    for which in ("vendor", "class"):
        named = {
            ps["params"][f"{which}-id"]
            for ps in e["parameter_sets"]
            if isinstance(ps["params"].get(f"{which}-id"), str)
        }
        shown = report[f"{which}_id"]
        if named:
            assert shown is not None and uuid.UUID(shown).hex in named
        else:
            assert shown is None


# -- API ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_vector_passes_the_trust_gate_with_expected_values(
    name: str, by_name: dict[str, Vector], policy: trust.TrustPolicy
) -> None:
    vector = by_name[name]
    verified = trust.accept(vector.data, policy)
    assert verified.envelope_bytes == vector.data
    assert verified.sequence_number == vector.expected["sequence_number"]
    assert (
        verified.manifest_digest.value.hex() == vector.expected["manifest_digest"]["digest-bytes"]
    )
    _check_report_against_expected(verification_report(verified), vector)


@pytest.mark.parametrize("name", REJECTED)
def test_rejected_vector_is_refused_by_the_trust_gate(
    name: str, by_name: dict[str, Vector], policy: trust.TrustPolicy
) -> None:
    with pytest.raises(OtaError) as info:
        trust.accept(by_name[name].data, policy)
    if name.endswith("unsigned"):
        # Digest only, no SUIT_Authentication_Block: nobody vouches for it.
        assert type(info.value) is AuthenticationError
        assert info.value.reason is ReportReason.UNAUTHORISED
    else:
        # Valid signature, obsolete (-18) numbering: refused as unsupported input.
        assert isinstance(info.value, ManifestError)


def test_dependency_vector_fails_with_the_common_draft_key_only(
    by_name: dict[str, Vector], keys_dir: Path
) -> None:
    only_draft = trust.TrustPolicy(
        anchors=(cose.load_public_key((keys_dir / DRAFT_KEY).read_bytes()),)
    )
    with pytest.raises(AuthenticationError):
        trust.accept(by_name["fw-encryption_es-ecdh_dependency"].data, only_draft)
    # Its twin, signed with the draft key, passes under the same policy (the key is fine).
    trust.accept(by_name["libcsuit_expED_es-ecdh_dependency_draftkey"].data, only_draft)


def test_dependency_vector_passes_with_the_second_key(
    by_name: dict[str, Vector], keys_dir: Path
) -> None:
    second = cose.load_public_key((keys_dir / DEPENDENCY_KEY).read_bytes())
    verified = trust.accept(
        by_name["fw-encryption_es-ecdh_dependency"].data, trust.TrustPolicy(anchors=(second,))
    )
    assert verified.signer == second.key_id


# -- CLI, in process ---------------------------------------------------------------------


def _verify(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["manifest", "verify", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ACCEPTED)
def test_cli_verify_accepts_vector_and_reports_expected_values(
    name: str,
    by_name: dict[str, Vector],
    keys_dir: Path,
    key_args: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _verify([str(_hex_path(keys_dir, name)), *key_args, "--json"], capsys)
    assert code == 0, err
    assert err == ""
    assert len(out.strip().splitlines()) == 1
    _check_report_against_expected(json.loads(out), by_name[name])


@pytest.mark.parametrize("name", REJECTED)
def test_cli_verify_rejects_vector_with_one_line_and_exit_1(
    name: str, keys_dir: Path, key_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _verify([str(_hex_path(keys_dir, name)), *key_args, "--json"], capsys)
    assert code == 1
    assert json.loads(out)["valid"] is False  # --json answers JSON on failure too
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    assert err.startswith("otacoap manifest verify: error: ")
    assert "Traceback" not in err


def test_cli_dependency_vector_needs_the_second_key(
    keys_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(_hex_path(keys_dir, "fw-encryption_es-ecdh_dependency"))
    code, _, err = _verify([path, "--key", str(keys_dir / DRAFT_KEY)], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    code, out, err = _verify([path, "--key", str(keys_dir / DEPENDENCY_KEY), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["sequence_number"] == 1


# -- CLI, as a real process --------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_console_script_verifies_an_accepted_vector(
    by_name: dict[str, Vector], keys_dir: Path, key_args: list[str]
) -> None:
    name = "ietf-manifest_ex1_signed"
    result = _run("manifest", "verify", str(_hex_path(keys_dir, name)), *key_args, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    _check_report_against_expected(report, by_name[name])
    assert report["images"] == [
        {
            "component": 0,
            "digest": "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210",
            "size": 34768,
            "uri": "http://example.com/file.bin",
        }
    ]


def test_console_script_rejects_a_legacy_vector_without_traceback(
    keys_dir: Path, key_args: list[str]
) -> None:
    result = _run("manifest", "verify", str(_hex_path(keys_dir, "legacy-d18_ex1")), *key_args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
