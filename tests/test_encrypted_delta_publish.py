"""Encrypted deltas on the operator's and the server's side (issue 13 §3b).

`manifest build --delta-from OLD --kek K --full-envelope RELEASE.suit` writes the patch
encrypted and signs a delta whose fallback is the release's own ciphertext. The
server never sees plaintext, so `publish` checks what it can (docs/decisions/
delta-updates.md): the result digest and size against those the *release's* signed
manifest names, the fallback (URI and encryption info) against the release's, the
patch ciphertext against its signed URI and its size against the signed patch size,
and it refuses a plaintext patch of an encrypted release and an encrypted patch of a
plaintext one. It cannot check the patch digest or apply the patch (the device does).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import pytest
from delta_rig import synthetic_pair
from server_helpers import CLASS_A, VENDOR, Author, cli, cli_ok

from otacoap import patching
from otacoap.cli.manifest_cmds import load_signing_key
from otacoap.core import delta, encryption, ids, suit, trust
from otacoap.core.build import EncryptedPatch, Release, build_envelope
from otacoap.core.report import Report, State
from otacoap.store import DataDir

KEK = bytes.fromhex("6b" * 16)


class Operator(Author):
    """A data directory trusting an author key, a class KEK, an old/new image pair."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        (tmp / "class.kek").write_text(KEK.hex())
        self.old, self.new = synthetic_pair(20_000)
        self.old_bin = self.file("old.bin", self.old)
        self.new_bin = self.file("new.bin", self.new)

    def encrypted(self, image: Path, seq: int, out: str) -> tuple[Path, Path]:
        enc = self.dir / f"{out}.enc"
        suit_path = self.build(
            image, seq, out, "--kek", self.dir / "class.kek", "--payload-out", enc
        )
        return suit_path, enc

    def releases(self) -> tuple[Path, Path]:
        """Encrypted v1 (old) published, encrypted v2 (new) built: (v2.suit, v2 ciphertext)."""
        v1, v1_enc = self.encrypted(self.old_bin, 1, "v1.suit")
        cli_ok("publish", "--data", self.data, v1, v1_enc)
        return self.encrypted(self.new_bin, 2, "v2.suit")

    def refused(self, *args: str | Path) -> str:
        result = cli("publish", "--data", self.data, *args)
        assert result.code != 0 and result.err.startswith("otacoap publish: error: "), result.err
        assert result.err.count("\n") == 1 and "Traceback" not in result.err
        with contextlib.closing(DataDir(self.data).open_store()) as store:
            assert all(not store.deltas_of(r.id) for r in store.list_releases(current_only=False))
            assert store.audit_entries()[-1].outcome == "refused"
        return result.err

    def signed_delta(
        self,
        name: str,
        *,
        result: bytes | None = None,
        patch_ct: bytes | None = None,
        fallback_info: bytes | None = None,
        encrypt_patch: bool = True,
    ) -> tuple[Path, Path]:
        """An encrypted delta of release v2 signed by the author, built in Python so a
        test can make it lie in one respect; (envelope, patch ciphertext)."""
        key = load_signing_key(str(self.dir / "author"))
        full = trust.summarize(suit.decode_envelope((self.dir / "v2.suit").read_bytes()))
        (fetch,) = full.fetches
        patch = patching.create_patch(self.old, self.new)
        info = delta.DeltaInfo(
            suit.SuitDigest.of(self.old), len(self.old), suit.SuitDigest.of(patch), len(patch)
        )
        target = result if result is not None else self.new
        rel = Release(
            hashlib.sha256(target).digest(), len(target), VENDOR, CLASS_A, 2,
            uri=fetch.uri, encryption_info=fallback_info or fetch.encryption_info,
        )  # fmt: skip
        recipient = encryption.KekRecipient(KEK)
        enc_info, ct = encryption.encrypt(patch, [recipient], os.urandom)
        ct = patch_ct if patch_ct is not None else ct
        encrypted = EncryptedPatch(enc_info, ids.image_uri(hashlib.sha256(ct).digest()))
        if not encrypt_patch:
            rel = Release(rel.image_digest, rel.image_size, VENDOR, CLASS_A, 2)
            env = build_envelope(rel, key, patch=info, fallback=False)
            ct = patch
        else:
            env = build_envelope(rel, key, patch=info, encrypted_patch=encrypted)
        return self.file(name, suit.encode_envelope(env)), self.file(f"{name}.patch", ct)


@pytest.fixture
def op(tmp_path: Path) -> Operator:
    return Operator(tmp_path)


def test_build_an_encrypted_delta_and_publish_it_with_its_release(op: Operator) -> None:
    v2, v2_enc = op.releases()
    out = op.build(
        op.new_bin, 2, "d.suit", "--delta-from", op.old_bin, "--kek", op.dir / "class.kek",
        "--full-envelope", v2,
    )  # fmt: skip
    only = op.build(
        op.new_bin, 2, "only.suit", "--delta-from", op.old_bin, "--kek", op.dir / "class.kek",
        "--full-envelope", v2, "--no-fallback",
    )  # fmt: skip
    assert cli_ok("manifest", "inspect", only).count("encrypted payload:") == 1
    patch_ct = (op.dir / "d.suit.patch").read_bytes()
    patch = patching.create_patch(op.old, op.new)
    assert len(patch_ct) == len(patch) and patch_ct != patch, "the patch file is ciphertext"
    shown = cli_ok("manifest", "inspect", out)
    assert f"detools-sequential patch {len(patch)} bytes" in shown
    assert f"sha256 {hashlib.sha256(patch).hexdigest()}" in shown  # the plaintext patch's
    assert shown.count("encrypted payload: component 0, A128CTR, fetched") == 2, shown
    # `manifest decrypt` of the patch ciphertext gives the plaintext patch back.
    got = cli_ok(
        "manifest", "decrypt", out, "--kek", op.dir / "class.kek", "--payload",
        op.dir / "d.suit.patch", "-o", op.dir / "d.plain",
    )  # fmt: skip
    assert "wrote" in got and (op.dir / "d.plain").read_bytes() == patch
    # ... and of the fallback's ciphertext, the image (the set whose URI names it).
    cli_ok("manifest", "decrypt", out, "--kek", op.dir / "class.kek", "--payload", v2_enc,
           "-o", op.dir / "v2.plain")  # fmt: skip
    assert (op.dir / "v2.plain").read_bytes() == op.new
    assert patching.apply_with_detools(op.old, patch) == op.new

    published = cli_ok(
        "publish", "--data", op.data, v2, v2_enc, "--delta", out, op.dir / "d.suit.patch"
    )
    assert f"{CLASS_A} seq 2: delta from " in published.strip().splitlines()[1]
    with contextlib.closing(DataDir(op.data).open_store()) as store:
        (release,) = store.list_releases(current_only=True)
        (d,) = store.deltas_of(release.id)
        assert d.source_digest == hashlib.sha256(op.old).digest()  # plaintext source
        assert d.patch.digest == hashlib.sha256(patch_ct).digest()  # served: ciphertext
        assert release.image.digest == hashlib.sha256(v2_enc.read_bytes()).digest()
        assert release.running_digest == hashlib.sha256(op.new).digest()
        # A device reporting seq 1 installed (the source, an encrypted release) gets it.
        store.record_report(
            "dev-1", Report(counter=1, state=State.CONFIRMED, installed_sequence=1), b"r1"
        )
        assert store.delta_for_device("dev-1", release) == d


def test_an_encrypted_delta_whose_result_is_not_the_release_image_is_refused(
    op: Operator,
) -> None:
    v2, v2_enc = op.releases()
    cli_ok("publish", "--data", op.data, v2, v2_enc)
    env, patch = op.signed_delta("bad.suit", result=op.new[:-1] + b"\x00")
    assert "resulting image is not the release's image" in op.refused(env, patch)


def test_a_plaintext_patch_of_an_encrypted_release_is_refused(op: Operator) -> None:
    v2, v2_enc = op.releases()
    cli_ok("publish", "--data", op.data, v2, v2_enc)
    env, patch = op.signed_delta("plain.suit", encrypt_patch=False)
    assert "must be encrypted too" in op.refused(env, patch)


def test_a_fallback_with_other_encryption_info_is_refused(op: Operator) -> None:
    v2, v2_enc = op.releases()
    cli_ok("publish", "--data", op.data, v2, v2_enc)
    other, _ = encryption.encrypt(op.new, [encryption.KekRecipient(KEK)], os.urandom)
    env, patch = op.signed_delta("fb.suit", fallback_info=other)
    assert "the release's own encryption info" in op.refused(env, patch)


def test_a_patch_ciphertext_of_the_wrong_size_or_bytes_is_refused(op: Operator) -> None:
    v2, v2_enc = op.releases()
    cli_ok("publish", "--data", op.data, v2, v2_enc)
    env, patch = op.signed_delta("d.suit")
    ct = patch.read_bytes()
    short = op.file("short.patch", ct[:-1])
    assert "patch encrypted needs" in op.refused(env, short)
    flipped = op.file("flipped.patch", ct[:-1] + bytes([ct[-1] ^ 1]))
    assert "the patch URI must be" in op.refused(env, flipped)
    cli_ok("publish", "--data", op.data, env, patch)  # the genuine one is fine


def test_an_encrypted_delta_from_an_unknown_source_is_refused(op: Operator) -> None:
    """The server cannot apply an encrypted patch; it can check that its source is the
    image of an earlier release of the class (else no device is ever served it)."""
    v2, v2_enc = op.encrypted(op.new_bin, 2, "v2.suit")  # no v1 published
    cli_ok("publish", "--data", op.data, v2, v2_enc)
    env, patch = op.signed_delta("d.suit")
    assert "is no earlier release's image" in op.refused(env, patch)


def test_an_encrypted_patch_of_a_plaintext_release_is_refused(op: Operator) -> None:
    v1 = op.build(op.old_bin, 1, "v1.suit")
    cli_ok("publish", "--data", op.data, v1, op.old_bin)
    v2 = op.build(op.new_bin, 2, "v2.suit")
    cli_ok("publish", "--data", op.data, v2, op.new_bin)
    key = load_signing_key(str(op.dir / "author"))
    patch = patching.create_patch(op.old, op.new)
    info = delta.DeltaInfo(
        suit.SuitDigest.of(op.old), len(op.old), suit.SuitDigest.of(patch), len(patch)
    )
    enc_info, ct = encryption.encrypt(patch, [encryption.KekRecipient(KEK)], os.urandom)
    # Signed with the fallback pretending to be encrypted (build refuses a plain one).
    rel = Release(hashlib.sha256(op.new).digest(), len(op.new), VENDOR, CLASS_A, 2,
                  encryption_info=enc_info)  # fmt: skip
    enc = EncryptedPatch(enc_info, ids.image_uri(hashlib.sha256(ct).digest()))
    env = op.file(
        "e.suit",
        suit.encode_envelope(
            build_envelope(rel, key, patch=info, fallback=False, encrypted_patch=enc)
        ),
    )
    assert "encrypted patch of a plaintext release" in op.refused(env, op.file("e.patch", ct))


def test_manifest_build_refuses_a_full_envelope_of_another_release(op: Operator) -> None:
    v2, _ = op.releases()
    other = op.file("other.bin", op.new[:-1] + b"\x00")
    for image, seq, says in ((other, "2", "image is not"), (op.new_bin, "3", "is seq 2")):
        result = cli(
            "manifest", "build", "--image", image, "--vendor-domain", VENDOR,
            "--class-info", CLASS_A, "--seq", seq, "--key", op.dir / "author",
            "--delta-from", op.old_bin, "--kek", op.dir / "class.kek", "--full-envelope", v2,
            "-o", op.dir / "x.suit",
        )  # fmt: skip
        assert result.code == 1 and says in result.err, result.err
        assert result.err.count("\n") == 1
        assert not (op.dir / "x.suit").exists() and not (op.dir / "x.suit.patch").exists()
