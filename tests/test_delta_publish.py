"""Delta envelopes on the operator's and the server's side (issue 13 §2): `manifest build
--delta-from`, `publish --delta`, the publish checks (a delta must result in its
release's image, carry the patch it names, apply to its source when the server has it),
and which envelope a device is served (the delta when its installed image is the
source, else the full one)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from delta_rig import synthetic_pair
from server_helpers import CLASS_A, VENDOR, Author, DeviceSpec, cli, cli_ok

from otacoap import patching
from otacoap.core import delta, suit
from otacoap.core.report import Report, State
from otacoap.store import DataDir, Principal


class Operator(Author):
    """The operator of these tests: a data directory trusting an author key."""


@pytest.fixture
def op(tmp_path: Path) -> Operator:
    return Operator(tmp_path)


def _two_releases(op: Operator) -> tuple[bytes, bytes, Path, Path]:
    old, new = synthetic_pair(20_000)
    old_bin, new_bin = op.file("old.bin", old), op.file("new.bin", new)
    cli_ok("publish", "--data", op.data, op.build(old_bin, 1, "v1.suit"), old_bin)
    return old, new, old_bin, new_bin


def test_build_delta_and_publish_it_with_its_release(op: Operator) -> None:
    old, new, old_bin, new_bin = _two_releases(op)
    full = op.build(new_bin, 2, "v2.suit")
    out = cli_ok("manifest", "build", "--image", new_bin, "--vendor-domain", VENDOR,
                 "--class-info", CLASS_A, "--seq", "2", "--key", op.dir / "author",
                 "--delta-from", old_bin, "-o", op.dir / "v2-from-v1.suit")  # fmt: skip
    assert "patch " in out and "% of the image" in out
    patch = (op.dir / "v2-from-v1.suit.patch").read_bytes()
    assert patching.apply_with_detools(old, patch) == new
    shown = cli_ok("manifest", "inspect", op.dir / "v2-from-v1.suit")
    assert f"delta: component 0, detools-sequential patch {len(patch)} bytes" in shown
    assert f"from source {len(old)} bytes sha256 {suit.SuitDigest.of(old).value.hex()}" in shown
    d_env, d_patch = op.dir / "v2-from-v1.suit", op.dir / "v2-from-v1.suit.patch"
    out = cli_ok("publish", "--data", op.data, full, new_bin, "--delta", d_env, d_patch)
    listing = cli_ok("release", "list", "--data", op.data)
    assert f"from {suit.SuitDigest.of(old).value.hex()[:16]} patch " in listing  # DELTAS
    (row,) = json.loads(cli_ok("release", "list", "--data", op.data, "--json"))
    (listed,) = row["deltas"]
    assert listed["from"] == suit.SuitDigest.of(old).value.hex()
    assert listed["size"] == len(patch)
    lines = out.strip().splitlines()
    assert f"{CLASS_A} seq 2: image /fw/" in lines[0]
    assert f"{CLASS_A} seq 2: delta from " in lines[1]
    with contextlib.closing(DataDir(op.data).open_store()) as store:
        release = store.current_release(store.list_releases(current_only=True)[0].class_key)
        assert release is not None
        (d,) = store.deltas_of(release.id)
        assert d.source_digest == suit.SuitDigest.of(old).value
        assert d.patch.size == len(patch)
        assert store.image_referenced(d.patch.digest)
        entries = [(e.action, e.outcome) for e in store.audit_entries()]
        assert ("publish.delta", "ok") in entries


def _refused(op: Operator, *args: str | Path) -> str:
    result = cli("publish", "--data", op.data, *args)
    assert result.code != 0 and result.err.startswith("otacoap publish: error: "), result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    return result.err


def test_a_delta_whose_result_is_not_the_release_image_is_refused(op: Operator) -> None:
    _, new, old_bin, new_bin = _two_releases(op)
    cli_ok("publish", "--data", op.data, op.build(new_bin, 2, "v2.suit"), new_bin)
    other = op.file("other.bin", new[:-1] + b"\x00")
    bad = op.build(other, 2, "bad.suit", "--delta-from", old_bin)
    err = _refused(op, bad, op.dir / "bad.suit.patch")
    assert "resulting image is not the release's image" in err
    with contextlib.closing(DataDir(op.data).open_store()) as store:
        assert all(not store.deltas_of(r.id) for r in store.list_releases(current_only=False))
        assert store.audit_entries()[-1].outcome == "refused"


def test_a_patch_that_does_not_make_the_image_from_its_source_is_refused(op: Operator) -> None:
    old, new, old_bin, new_bin = _two_releases(op)
    cli_ok("publish", "--data", op.data, op.build(new_bin, 2, "v2.suit"), new_bin)
    good = op.build(new_bin, 2, "d.suit", "--delta-from", old_bin)
    # Sign a manifest over a patch to another image (the digest matches what is signed).
    wrong = patching.create_patch(old, new[:-1] + b"\x01")
    wrong_path = op.file("wrong.patch", wrong)
    from otacoap.cli.manifest_cmds import load_signing_key
    from otacoap.core.build import Release, build_envelope

    key = load_signing_key(str(op.dir / "author"))
    info = delta.DeltaInfo(suit.SuitDigest.of(old), len(old), suit.SuitDigest.of(wrong), len(wrong))
    rel = Release(suit.SuitDigest.of(new).value, len(new), VENDOR, CLASS_A, 2)
    env = op.file("wrong.suit", suit.encode_envelope(build_envelope(rel, key, patch=info)))
    err = _refused(op, env, wrong_path)
    assert "does not make the release's image" in err
    cli_ok("publish", "--data", op.data, good, op.dir / "d.suit.patch")  # the good one is fine


def test_a_delta_needs_its_release_and_is_not_a_release(op: Operator) -> None:
    _, _, old_bin, new_bin = _two_releases(op)
    d = op.build(new_bin, 2, "d.suit", "--delta-from", old_bin)
    err = _refused(op, d, op.dir / "d.suit.patch")
    assert "publish the release (its full envelope) first" in err
    # A delta envelope given with the full image is still a delta: the patch is expected.
    err = _refused(op, d, new_bin)
    assert "not the one the manifest signs" in err or "first" in err


def test_the_device_is_served_the_delta_for_the_image_it_reports_installed(op: Operator) -> None:
    _, _, old_bin, new_bin = _two_releases(op)
    full = op.build(new_bin, 2, "v2.suit")
    d = op.build(new_bin, 2, "d.suit", "--delta-from", old_bin)
    cli_ok("publish", "--data", op.data, full, new_bin, "--delta", d, op.dir / "d.suit.patch")
    with contextlib.closing(DataDir(op.data).open_store()) as store:
        (release,) = [r for r in store.list_releases(current_only=True)]
        (delta_record,) = store.deltas_of(release.id)
        # No report yet: nothing is known about its image, so the full envelope.
        assert store.delta_for_device("dev-1", release) is None
        # It reports running seq 1 (the delta's source image): the delta.
        store.record_report("dev-1", Report(counter=1, state=State.CONFIRMED,
                            installed_sequence=1), b"r1")  # fmt: skip
        assert store.delta_for_device("dev-1", release) == delta_record
        # Installed by delta: it keeps seeing the envelope it installed.
        by_delta = suit.SuitDigest(suit.DIGEST_SHA256, delta_record.manifest_digest)
        store.record_report("dev-1", Report(counter=2, state=State.CONFIRMED, sequence_number=2,
                            manifest_digest=by_delta, installed_sequence=2), b"r2")  # fmt: skip
        assert store.delta_for_device("dev-1", release) == delta_record
        # Installed from the full envelope: the full one.
        by_full = suit.SuitDigest(suit.DIGEST_SHA256, release.manifest_digest)
        store.record_report("dev-1", Report(counter=3, state=State.CONFIRMED, sequence_number=2,
                            manifest_digest=by_full, installed_sequence=2), b"r3")  # fmt: skip
        assert store.delta_for_device("dev-1", release) is None


def test_access_serves_and_lets_read_the_patch_only_to_a_device_on_its_source(
    op: Operator,
) -> None:
    """server.access: the delta envelope and its patch for a device whose installed
    image is the source; its full image stays readable (the fallback); for any other
    device, the full envelope and no patch. Both /fw paths agree."""
    import asyncio

    from server_helpers import SessionRemote
    from test_server_access import _request, _resource_code

    from otacoap.server import access
    from otacoap.server.fastpath import FirmwareFastPath
    from otacoap.server.store_view import StoreView

    op.setup.add_device(DeviceSpec("dev-2"))
    _, _, old_bin, new_bin = _two_releases(op)
    full = op.build(new_bin, 2, "v2.suit")
    d = op.build(new_bin, 2, "d.suit", "--delta-from", old_bin)
    cli_ok("publish", "--data", op.data, full, new_bin, "--delta", d, op.dir / "d.suit.patch")
    with contextlib.closing(DataDir(op.data).open_store()) as store:
        store.record_report("dev-1", Report(counter=1, state=State.CONFIRMED,
                            installed_sequence=1), b"r1")  # fmt: skip
        (release,) = store.list_releases(current_only=True)
        (dr,) = store.deltas_of(release.id)
        old_release = store.release_by_seq(release.class_key, 1)
        assert old_release is not None
    datadir = DataDir(op.data)
    view = StoreView(datadir, datadir.config())
    try:
        on_source = view.psks.find_dtls_psk(b"dev-1")[1]
        other = view.psks.find_dtls_psk(b"dev-2")[1]
        assert isinstance(on_source, Principal) and isinstance(other, Principal)
        served = access.release_of(view, on_source)
        assert served is not None and served.envelope == dr.envelope
        assert served.manifest_digest == dr.manifest_digest
        plain = access.release_of(view, other)
        assert plain is not None and plain.envelope == release.envelope
        assert access.readable_image(view, on_source) == dr.patch
        assert access.readable_image(view, other) == release.image

        def verdicts(principal: Principal) -> dict[str, tuple[bool, int]]:
            remote = SessionRemote([principal])
            fast = FirmwareFastPath(view)
            try:
                out = {}
                for name, image in (
                    ("patch", dr.patch),
                    ("full", release.image),
                    ("old", old_release.image),
                ):
                    data = _request(image.image_id)
                    code = _resource_code(view, remote, data)
                    out[name] = (fast.handle(remote, data) is not None, int(code))
                return out
            finally:
                fast.close()

        content, not_found = 69, 132  # 2.05, 4.04
        assert verdicts(on_source) == {
            "patch": (True, content),
            "full": (False, content),  # the fallback: through the resource
            "old": (False, not_found),
        }
        assert verdicts(other) == {
            "patch": (False, not_found),
            "full": (True, content),
            "old": (False, not_found),
        }
    finally:
        asyncio.run(view.close())


def test_publish_rollout_none_with_a_delta_leaves_the_current_release_alone(
    op: Operator,
) -> None:
    """--rollout none applies to the release; its delta is published with it (whoever a
    campaign later serves the release gets the delta envelope)."""
    old, _, old_bin, new_bin = _two_releases(op)
    full = op.build(new_bin, 2, "v2.suit")
    d_env = op.build(new_bin, 2, "v2-from-v1.suit", "--delta-from", old_bin)
    out = cli_ok("publish", "--data", op.data, "--rollout", "none", full, new_bin,
                 "--delta", d_env, op.dir / "v2-from-v1.suit.patch")  # fmt: skip
    first, second = out.strip().splitlines()
    assert first.endswith("; rollout by campaign only") and "seq 2: image /fw/" in first
    assert "seq 2: delta from " in second and "campaign" not in second
    (current,) = json.loads(cli_ok("release", "list", "--data", op.data, "--json"))
    assert current["seq"] == 1 and current["deltas"] == []
    listed = json.loads(cli_ok("release", "list", "--data", op.data, "--all", "--json"))
    v2 = next(r for r in listed if r["seq"] == 2)
    assert not v2["current"]
    assert [d["from"] for d in v2["deltas"]] == [suit.SuitDigest.of(old).value.hex()]


def test_delta_by_a_revoked_author_is_refused_at_publish(op: Operator) -> None:
    """A class with a signed anchor list takes delta envelopes from its current authors
    only, like releases (store/anchor_lists.py check_publish_signer)."""
    _, _, old_bin, new_bin = _two_releases(op)
    cli_ok("publish", "--data", op.data, op.build(new_bin, 2, "v2.suit"), new_bin)
    d_env = op.build(new_bin, 2, "v2-from-v1.suit", "--delta-from", old_bin)
    cli_ok("keygen", "--out", op.dir / "root")
    cli_ok("keygen", "--alg", "ed25519", "--out", op.dir / "author2")
    anchors = op.dir / "l1.cbor"
    cli_ok("anchors", "issue", "--vendor-domain", VENDOR, "--class-info", CLASS_A,
           "--version", "1", "--root", op.dir / "root.pub", "--author", op.dir / "author2.pub",
           "--sign", op.dir / "root", "-o", anchors)  # fmt: skip
    cli_ok("anchors", "publish", "--data", op.data, anchors)  # revokes "author"
    refused = cli("publish", "--data", op.data, d_env, op.dir / "v2-from-v1.suit.patch")
    assert refused.code != 0 and "not an author" in refused.err, refused.err
    assert "Traceback" not in refused.err
    with contextlib.closing(DataDir(op.data).open_store()) as store:
        (release,) = store.list_releases(current_only=True)
        assert store.deltas_of(release.id) == []
