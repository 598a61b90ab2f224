"""Report keys -20 (anchor version) and -21 (freshness), and the identity's root keys:
strict, round-tripping, and backwards compatible with what was written before them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import cbor2
import pytest
from evil_server import make_rig
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.device_state import DeviceState, StateFile
from device_sim.layout import Identity, ProvisioningError, open_flash
from otacoap.core import cbor, cose
from otacoap.core.errors import ManifestError
from otacoap.core.report import (
    K_ANCHOR_VERSION,
    K_FRESHNESS,
    Report,
    State,
    decode_report,
    stamp_anchor_version,
)
from otacoap.store.secrets import PskSealer
from otacoap.store.sqlite import MIGRATIONS, SQLiteStore


@settings(max_examples=100, deadline=None)
@given(
    version=st.none() | st.integers(0, (1 << 64) - 1),
    fresh=st.none() | st.integers(0, 3),
)
def test_anchor_fields_round_trip(version: int | None, fresh: int | None) -> None:
    r = Report(3, State.UP_TO_DATE, anchor_version=version, freshness=fresh)
    assert decode_report(r.encode()) == r


def test_report_without_the_new_fields_decodes_as_before() -> None:
    old = cbor.dumps({-4: 1, -1: "confirmed", 4: True})
    r = decode_report(old)
    assert r.anchor_version is None and r.freshness is None


@pytest.mark.parametrize("bad", [4, -1, "fresh", 1.0, True])
def test_freshness_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(ManifestError):
        decode_report(cbor2.dumps({-4: 1, -1: "up-to-date", K_FRESHNESS: bad}))


@pytest.mark.parametrize("bad", [-1, "1", 1 << 64])
def test_anchor_version_must_be_uint64(bad: object) -> None:
    with pytest.raises(ManifestError):
        decode_report(cbor2.dumps({-4: 1, -1: "up-to-date", K_ANCHOR_VERSION: bad}))


def test_stamping_adds_the_version_to_any_report() -> None:
    body = Report(7, State.REJECTED, detail="x").encode()
    stamped = stamp_anchor_version(body, 4)
    assert decode_report(stamped) == Report(7, State.REJECTED, detail="x", anchor_version=4)
    assert cbor.dumps(cbor2.loads(stamped)) == stamped


def test_anchors_updated_is_a_report_state() -> None:
    assert decode_report(Report(1, State.ANCHORS_UPDATED).encode()).state == State.ANCHORS_UPDATED


def test_identity_with_roots_round_trips_and_old_identities_read_as_before(
    tmp_path: Path,
) -> None:
    author, root = cose.generate_key("es256"), cose.generate_key("ed25519")
    plain = Identity("d", b"\x01" * 16, "v.example", "c", (author.public.public_pem(),))
    decoded = Identity.decode(plain.encode())
    assert decoded == plain and decoded.provisioned_anchors() is None
    rooted = Identity(
        "d",
        b"\x01" * 16,
        "v.example",
        "c",
        (author.public.public_pem(),),
        roots_pem=(root.public.public_pem(),),
    )
    again = Identity.decode(rooted.encode())
    assert again == rooted
    anchors = again.provisioned_anchors()
    assert anchors is not None and anchors.version == 0 and anchors.threshold == 1


@pytest.mark.parametrize("threshold", [0, 2])
def test_root_threshold_must_fit_the_roots(threshold: int) -> None:
    key = cose.generate_key("es256").public.public_pem()
    with pytest.raises(ProvisioningError):
        Identity("d", b"\x01" * 16, "v", "c", (key,), roots_pem=(key,), root_threshold=threshold)


def test_state_record_without_anchors_reads_as_before(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    flash, identity = open_flash(rig.path)
    try:
        state = StateFile(flash, identity.layout).load()
    finally:
        flash.close()
    assert state.anchors is None and "anc" not in cbor2.loads(state.encode())
    assert DeviceState.decode(state.encode()) == state
    # No anchors: reports are not stamped.
    body = state.with_report(lambda c, lost: Report(c, State.FAILED).encode()).reports[-1]
    assert decode_report(body).anchor_version is None


def test_migration_5_keeps_existing_devices_and_reports(tmp_path: Path) -> None:
    """A database from before anchor lists migrates: devices hold no version yet, and a
    report carrying one (key -20) records it."""
    db_path = tmp_path / "old.db"
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
        "applied_at TEXT NOT NULL)"
    )
    for version, name, statements in MIGRATIONS:
        if version >= 5:
            break
        for statement in statements:
            db.execute(statement)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?, 'x')", (version, name))
    db.close()
    store = SQLiteStore(db_path, PskSealer(b"\x01" * 32))
    try:
        assert 5 in store.applied_migrations
        store.add_device("d1", "acme.example", "t1", b"\x02" * 16, "test")
        assert [(s.device_id, s.anchor_version) for s in store.anchor_status()] == [("d1", None)]
        body = Report(1, State.UP_TO_DATE, anchor_version=3, freshness=0).encode()
        store.record_report("d1", decode_report(body), body)
        (status,) = store.anchor_status()
        assert (status.anchor_version, status.freshness) == (3, 0)
        # A later report without the fields keeps what the device said last.
        body = Report(2, State.CONFIRMED).encode()
        store.record_report("d1", decode_report(body), body)
        (status,) = store.anchor_status()
        assert (status.anchor_version, status.freshness) == (3, 0)
    finally:
        store.close()
