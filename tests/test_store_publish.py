"""Publish validation (issue 3 §3, ATTACKS.md #36): refusals leave nothing behind
except their audit entry; a good release becomes current in one step."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import cbor2
import pytest
from server_helpers import (
    CLASS_A,
    CLASS_B,
    VENDOR,
    DeviceSpec,
    Setup,
    cli,
    make_image,
    make_setup,
)

from otacoap.core import cose, ids
from otacoap.core.errors import (
    AuthenticationError,
    LimitExceeded,
    OtaError,
    PolicyError,
    RollbackError,
)
from otacoap.store import DataDir, Publisher
from otacoap.store.errors import ImageMismatch
from otacoap.store.postgres import PostgresStore


@pytest.fixture
def setup(tmp_path: Path, store_url: str) -> Setup:
    """Both backends: SQLite, and PostgreSQL (conftest.store_url)."""
    s = make_setup(
        tmp_path,
        devices=[DeviceSpec("t1"), DeviceSpec("s1", CLASS_B)],
        config="[publish]\nmax_sequence_jump = 100\nmax_image_size = 65536\n",
        store_url=store_url,
    )
    s.publish(s.release(CLASS_A, 10, make_image("base", 3000)))
    return s


def _state(setup: Setup) -> tuple[list[str], list[str], list[tuple[object, ...]]]:
    blobs = sorted(p.name for p in (setup.data / "blobs").iterdir())
    temps = sorted(p.name for p in (setup.data / "blobs" / "tmp").iterdir())
    with contextlib.closing(DataDir(setup.data).open_store()) as store:
        rows = store._db.execute("SELECT id, seq FROM releases ORDER BY id").fetchall()
        releases = [tuple(r) for r in rows]
        if isinstance(store, PostgresStore):  # the images every host fetches from
            chunks = store._db.execute("SELECT DISTINCT digest FROM image_chunks").fetchall()
            blobs += sorted(f"pg:{bytes(r[0]).hex()}" for r in chunks)
    return blobs, temps, releases


def _last_audit(setup: Setup) -> tuple[str, str, str]:
    with contextlib.closing(DataDir(setup.data).open_store()) as store:
        e = store.audit_entries(1)[0]
    return e.action, e.outcome, e.detail


def _publish(setup: Setup, envelope: bytes, image: bytes) -> None:
    d = DataDir(setup.data)
    store = d.open_store()
    image_path = setup.data.parent / "candidate.bin"
    image_path.write_bytes(image)
    try:
        Publisher(store, d.blobs, d.config().publish).publish_file(envelope, image_path, "test")
    finally:
        store.close()


def _flip_signature(envelope: bytes) -> bytes:
    """The same envelope with one bit of its COSE_Sign1 signature flipped."""
    outer = cbor2.loads(envelope)
    env = outer.value if isinstance(outer, cbor2.CBORTag) else outer
    auth = cbor2.loads(env[2])
    block = cbor2.loads(auth[1])
    signature = bytearray(block.value[3])
    signature[0] ^= 1
    block.value[3] = bytes(signature)
    auth[1] = cbor2.dumps(block, canonical=True)
    env[2] = cbor2.dumps(auth, canonical=True)
    return cbor2.dumps(outer, canonical=True)


def _refusals(setup: Setup) -> list[tuple[str, bytes, bytes, type[OtaError], str]]:
    good = make_image("next", 4000)
    other_key = cose.generate_key("es256")
    r = setup.release
    tampered = _flip_signature(r(CLASS_A, 11, good).envelope)
    return [
        ("bad signature", tampered, good, AuthenticationError, "signature"),
        ("untrusted key", r(CLASS_A, 11, good, key=other_key).envelope, good,
         AuthenticationError, "signature"),
        ("digest mismatch", r(CLASS_A, 11, good).envelope, make_image("evil", 4000),
         ImageMismatch, "SHA-256 does not match"),
        ("size mismatch", r(CLASS_A, 11, good).envelope, good[:3999], ImageMismatch,
         "3999 bytes, the manifest says 4000"),
        ("equal seq", r(CLASS_A, 10, good).envelope, good, RollbackError, "current release"),
        ("lower seq", r(CLASS_A, 9, good).envelope, good, RollbackError, "lower"),
        ("seq jump", r(CLASS_A, 111, good).envelope, good, RollbackError, "jumps by 101"),
        ("oversize image", r(CLASS_A, 11, good, size=70000).envelope, good, PolicyError,
         "does not fit"),
        ("absolute uri", r(CLASS_A, 11, good, uri="coaps://elsewhere/fw/x").envelope, good,
         PolicyError, "must be '/fw/"),
        ("other uri", r(CLASS_A, 11, good, uri="/fw/0000000000000000").envelope, good,
         PolicyError, "must be '/fw/"),
        ("not cbor", b"\xff\x00junk", good, OtaError, "CBOR"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(11))
def test_refused_publish_leaves_only_an_audit_entry(setup: Setup, case: int) -> None:
    name, envelope, image, error, message = _refusals(setup)[case]
    before = _state(setup)
    with pytest.raises(error, match=message):
        _publish(setup, envelope, image)
    assert _state(setup) == before, name
    action, outcome, detail = _last_audit(setup)
    assert (action, outcome) == ("publish", "refused")
    assert message in detail


def test_release_for_a_class_without_devices_is_published_and_reaches_nobody(
    setup: Setup,
) -> None:
    """Issue 11: a release may be published before any device of its class exists
    (formerly refused as "no registered device"); it is named by its class ids."""
    good = make_image("toaster", 4000)
    envelope = setup.release("toaster", 11, good).envelope
    _publish(setup, envelope, good)
    action, outcome, _detail = _last_audit(setup)
    assert (action, outcome) == ("publish", "ok")
    store = DataDir(setup.data).open_store()
    try:
        key = ids.class_key_of(VENDOR, "toaster")
        rel = store.latest_release(key)
        assert rel is not None and rel.sequence_number == 11
        assert rel.class_label == f"{ids.uuid_str(key[0])}/{ids.uuid_str(key[1])}"
        # Nobody has it: no device of the class, and others are not served it.
        assert all(store.release_for_device(d.id) != rel for d in store.list_devices())
    finally:
        store.close()


def test_oversize_image_is_cut_off_while_streaming(setup: Setup) -> None:
    image = make_image("huge", 70000)
    envelope = setup.release(CLASS_A, 11, make_image("small", 100)).envelope
    before = _state(setup)
    with pytest.raises(LimitExceeded, match="65536"):
        _publish(setup, envelope, image)
    assert _state(setup) == before


def test_no_trust_anchor_means_nothing_is_published(setup: Setup) -> None:
    d = DataDir(setup.data)
    store = d.open_store()
    for a in store.list_anchors():
        store.remove_anchor(a.key_id, "test")
    store.close()
    with pytest.raises(AuthenticationError, match="no trust anchors"):
        _publish(setup, setup.release(CLASS_A, 11, b"x" * 10).envelope, b"x" * 10)


def test_good_publish_makes_the_release_current(setup: Setup) -> None:
    image = make_image("v11", 5000)
    rel = setup.release(CLASS_A, 11, image)
    out = setup.publish(rel)
    assert f"seq 11: image {rel.image_uri}" in out
    digest = hashlib.sha256(image).digest()
    assert (setup.data / "blobs" / digest.hex()).read_bytes() == image
    assert digest.hex() in "".join(_state(setup)[0])
    d = DataDir(setup.data)
    store = d.open_store()
    current = store.current_release(
        store.get_device("t1").class_key  # type: ignore[union-attr]
    )
    assert current is not None and current.sequence_number == 11
    assert current.image.image_id == ids.image_id(digest)
    assert current.envelope == rel.envelope
    assert store.release_for_device("s1") is None
    store.close()
    listing = json.loads(cli("release", "list", "--data", setup.data, "--json").out)
    assert {
        "class": f"{VENDOR}/{CLASS_A}",
        "seq": 11,
        "image": rel.image_id,
        "size": 5000,
    }.items() <= next(r for r in listing if r["seq"] == 11).items()


def test_concurrent_publisher_cannot_race_the_sequence_check(setup: Setup) -> None:
    """Both candidates were checked against seq 10; only the first may commit."""
    d = DataDir(setup.data)
    store = d.open_store()
    pub = Publisher(store, d.blobs, d.config().publish)
    a = setup.release(CLASS_A, 11, make_image("a", 100))
    b = setup.release(CLASS_A, 12, make_image("b", 100))
    d.blobs.put(a.image), d.blobs.put(b.image)  # as publish_file stores them first
    cand_a = pub.check(pub.authenticate(a.envelope), a.digest, 100)
    cand_b = pub.check(pub.authenticate(b.envelope), b.digest, 100)
    store.commit_release(cand_b, "test")
    with pytest.raises(RollbackError, match="meanwhile"):
        store.commit_release(cand_a, "test")
    store.close()


def test_same_image_in_two_releases_is_one_blob(setup: Setup) -> None:
    image = make_image("shared", 2000)
    setup.publish(setup.release(CLASS_A, 11, image))
    setup.publish(setup.release(CLASS_B, 1, image))
    digest = hashlib.sha256(image).hexdigest()
    assert (setup.data / "blobs" / digest).exists()
    assert cli("audit", "verify", "--data", setup.data).code == 0


def test_cli_publish_refusal_is_one_line(setup: Setup) -> None:
    rel = setup.release(CLASS_A, 10, make_image("again", 100))
    result = cli("publish", "--data", setup.data, rel.envelope_path, rel.image_path)
    assert result.code == 1
    assert result.err.startswith("otacoap publish: error: ")
    assert result.err.count("\n") == 1


def test_release_assign_pins_a_device(setup: Setup) -> None:
    setup.publish(setup.release(CLASS_A, 11, make_image("v11", 100)))
    assert cli("release", "assign", "--data", setup.data, "t1", "10").code == 0
    d = DataDir(setup.data)
    store = d.open_store()
    assert store.release_for_device("t1").sequence_number == 10  # type: ignore[union-attr]
    store.close()
    assert cli("release", "assign", "--data", setup.data, "t1", "current").code == 0
    store = d.open_store()
    assert store.release_for_device("t1").sequence_number == 11  # type: ignore[union-attr]
    store.close()
    assert cli("release", "assign", "--data", setup.data, "t1", "99").code == 1
