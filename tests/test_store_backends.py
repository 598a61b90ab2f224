"""The store behaves the same on SQLite and on a real PostgreSQL server (issue 14 §1):
one broad scenario through the `Store` API, the CLI and the Publisher on both backends,
and `otacoap store migrate --to postgresql://...` carrying a data directory over with
its audit chain verifying afterwards."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from pg_server import PgServer
from server_helpers import CLASS_A, CLASS_B, VENDOR, DeviceSpec, Setup, cli, cli_ok, make_image
from server_helpers import make_setup as _make_setup

from otacoap.config import load_config
from otacoap.core.campaign import MemberState, Policy, Target, parse_waves
from otacoap.core.errors import RollbackError
from otacoap.core.report import Report, State
from otacoap.store import BlobStore, DataDir, Publisher, SQLiteStore
from otacoap.store.errors import (
    AlreadyExists,
    AuditChainBroken,
    NotFound,
    ReportReplayed,
    StoreError,
)
from otacoap.store.postgres import PostgresStore, translate_ddl, translate_dml

ACTOR = "test"
MAX = (1 << 63) - 1


def make_setup(tmp_path: Path, store_url: str) -> Setup:
    devices = [DeviceSpec("t1"), DeviceSpec("t2"), DeviceSpec("B-upper"), DeviceSpec("s1", CLASS_B)]
    return _make_setup(tmp_path, devices=devices, operators=["alice"], store_url=store_url)


def _open(setup: Setup) -> SQLiteStore:
    return DataDir(setup.data).open_store()


def _report(store: SQLiteStore, device: str, counter: int, state: State, seq: int) -> Report:
    report = Report(counter, state, sequence_number=seq, installed_sequence=seq)
    store.record_report(device, report, report.encode())
    return report


def _issue_anchor_list(setup: Setup, base: Path) -> Path:
    cli_ok("keygen", "--alg", "es256", "--out", base / "root")
    path = base / "l1.cbor"
    cli_ok(
        "anchors", "issue", "--vendor-domain", VENDOR, "--class-info", CLASS_A,
        "--version", "1", "-o", path, "--root", base / "root.pub",
        "--author", setup.key_pub, "--sign", base / "root",
    )  # fmt: skip
    return path


def test_the_store_api_behaves_alike_on_both_backends(tmp_path: Path, store_url: str) -> None:
    setup = make_setup(tmp_path, store_url)
    store = _open(setup)
    other = _open(setup)  # a second connection: what another process (or host) sees
    try:
        assert isinstance(store, PostgresStore) == bool(store_url)
        # Principals: bytewise order (SQLite's BINARY collation, "C" on PostgreSQL).
        assert [d.id for d in store.list_devices()] == ["B-upper", "s1", "t1", "t2"]
        assert [o.name for o in store.list_operators()] == ["alice"]
        with pytest.raises(AlreadyExists):
            store.add_device("t1", VENDOR, CLASS_A, b"k" * 16, ACTOR)
        with pytest.raises(NotFound):
            store.remove_anchor("nope", ACTOR)
        before = store.lookup_credential("t1")
        assert before is not None and before.psk == setup.devices["t1"].psk
        other.changed_elsewhere()
        store.changed_elsewhere()
        generations = other.generations()
        store.rekey_device("t1", b"n" * 16, ACTOR)
        assert not store.changed_elsewhere()  # its own commit is not "elsewhere"
        after = store.lookup_credential("t1")
        assert after is not None and after.psk == b"n" * 16 and after.key_tag != before.key_tag
        assert other.changed_elsewhere() and not other.changed_elsewhere()
        assert other.generations()[0] == generations[0] + 1
        store.rekey_operator("alice", b"o" * 16, ACTOR)
        found = store.lookup_identity("operator:alice")
        assert found is not None and found[1] == b"o" * 16

        # Releases through the CLI and the Publisher (a staged one, for a campaign).
        setup.publish(setup.release(CLASS_A, 10, make_image("v10", 3000)))
        staged_files = setup.release(CLASS_A, 11, make_image("v11", 2000))
        d = DataDir(setup.data)
        staged = Publisher(store, d.blobs, d.config().publish).publish_file(
            staged_files.envelope, staged_files.image_path, ACTOR, make_current=False
        )
        key = store.get_device("t1").class_key  # type: ignore[union-attr]
        current = store.current_release(key)
        assert current is not None and current.sequence_number == 10
        latest = store.latest_release(key)
        assert latest is not None and latest.id == staged.id and staged.id > current.id
        assert [r.sequence_number for r in store.list_releases(current_only=True)] == [10]
        assert sorted(r.sequence_number for r in store.list_releases(current_only=False)) == [
            10,
            11,
        ]
        assert store.image_referenced(staged_files.digest)
        assert store.release_by_id(staged.id).envelope == staged_files.envelope  # type: ignore[union-attr]
        # The same sequence number again is a rollback, refused.
        with pytest.raises(RollbackError):
            Publisher(store, d.blobs, d.config().publish).publish_file(
                staged_files.envelope, staged_files.image_path, ACTOR
            )
        store.assign_release("t2", 11, ACTOR)
        assert store.release_for_device("t2").sequence_number == 11  # type: ignore[union-attr]
        store.assign_release("t2", None, ACTOR)
        assert store.release_for_device("t2").sequence_number == 10  # type: ignore[union-attr]

        # Reports: stored, the same one again idempotent, an older counter refused.
        first = _report(store, "t1", 1, State.INSTALLED, 10)
        again = store.record_report("t1", first, first.encode())
        assert not again.stored
        with pytest.raises(ReportReplayed):
            _report(store, "t1", 1, State.FAILED, 10)
        _report(store, "t1", MAX, State.INSTALLED, 10)  # uint64 counters up to 2^63-1
        assert store.report_counts() == {"installed": 2}
        assert store.latest_reports()["t1"].counter == MAX
        assert [r.counter for r in store.list_reports("t1", 10)] == [1, MAX]

        # Tags, and a campaign for the staged release: create, tick, members.
        store.set_device_tags("t1", {"site": "north"}, ACTOR)
        store.set_device_tags("t2", {"site": "north", "ring": "0"}, ACTOR)
        store.remove_device_tags("t2", ["ring"], ACTOR)
        assert store.device_tags("t2") == {"site": "north"}
        c = store.create_campaign(
            staged.id, Target((("site", "north"),)), parse_waves("50%,100%"), Policy(), ACTOR
        )
        assert store.tick_campaigns() == ["campaign.admit"]
        members = store.campaign_members(c.id)
        assert sorted(m.device_id for m in members) == ["t1", "t2"]
        admitted = [m.device_id for m in members if m.state is MemberState.ADMITTED]
        assert len(admitted) == 1
        assert store.release_for_device(admitted[0]).sequence_number == 11  # type: ignore[union-attr]
        assert store.pause_campaign(c.id, ACTOR).state == "paused"
        assert [x.id for x in store.list_campaigns(active_only=True)] == [c.id]
        assert store.campaign_status(c.id).waves[0].admitted == 1

        # Anchor lists through the CLI; the report fields that go with them.
        l1 = _issue_anchor_list(setup, tmp_path)
        assert "version 1" in cli_ok("anchors", "publish", "--data", setup.data, l1)
        assert store.latest_anchor_list(key).version == 1  # type: ignore[union-attr]
        assert [a.version for a in store.list_anchor_lists()] == [1]

        # The audit chain, its checkpoint, and a device removal at the end.
        store.remove_device("B-upper", ACTOR)
        checkpoint = store.audit_checkpoint()
        count, head = store.verify_audit(checkpoint)
        assert count == len(store.audit_entries()) and store.audit_entries(1)[0].hash == head
        assert other.verify_audit(checkpoint) == (count, head)
        actions = [e.action for e in store.audit_entries()]
        for action in ("device.rekey", "publish", "release.assign", "report", "campaign.create"):
            assert action in actions
    finally:
        other.close()
        store.close()


def test_the_audit_log_is_append_only_on_both_backends(tmp_path: Path, store_url: str) -> None:
    setup = make_setup(tmp_path, store_url)
    store = _open(setup)
    try:
        for statement in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"):
            with pytest.raises(Exception, match="append-only"), store._tx() as db:
                db.execute(statement)
        store.verify_audit()
    finally:
        store.close()


def test_dialect_translates_the_sqlite_subset_the_store_uses() -> None:
    assert translate_ddl("CREATE TABLE x (id INTEGER PRIMARY KEY AUTOINCREMENT, b BLOB)") == (
        "CREATE TABLE x (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, b BYTEA)"
    )
    assert translate_ddl("CREATE TABLE y (k TEXT, v REAL, PRIMARY KEY (k)) WITHOUT ROWID") == (
        'CREATE TABLE y (k TEXT COLLATE "C", v DOUBLE PRECISION, PRIMARY KEY (k))'
    )
    assert translate_dml("INSERT OR IGNORE INTO t (a) VALUES (?)", frozenset()) == (
        "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING",
        False,
    )
    assert translate_dml("INSERT INTO x (a) VALUES (?)", frozenset({"x"})) == (
        "INSERT INTO x (a) VALUES (%s) RETURNING id",
        True,
    )
    assert translate_dml("SELECT 1 WHERE a LIKE 'd.%' AND b = ?", frozenset())[0] == (
        "SELECT 1 WHERE a LIKE 'd.%%' AND b = %s"
    )


def test_init_store_url_is_written_to_config_and_refuses_a_password(tmp_path: Path) -> None:
    bad = cli("init", tmp_path / "d", "--store", "postgresql://u:secret@localhost/db")
    assert bad.code != 0 and "password" in bad.err and "Traceback" not in bad.err
    assert not (tmp_path / "d" / "server.key").exists()
    bad = cli("init", tmp_path / "e", "--store", "mysql://localhost/db")
    assert bad.code != 0 and "postgresql://" in bad.err


def test_init_on_postgresql(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.new_database()
    data = tmp_path / "data"
    out = cli_ok("init", data, "--store", url)
    assert "otacoap.db" not in out and not (data / "otacoap.db").exists()
    assert load_config(data / "config.toml").store.url == url
    assert "already initialised" in cli_ok("init", data)  # idempotent
    clash = cli("init", data, "--store", pg_server.new_database())
    assert clash.code != 0 and "already names the store" in clash.err
    with contextlib.closing(DataDir(data).open_store()) as store:
        assert isinstance(store, PostgresStore)
        assert [e.action for e in store.audit_entries()] == ["init"]
    # A new server.key for a database that holds sealed PSKs is refused.
    cli_ok("device", "add", "--data", data, "t9", "--vendor-domain", VENDOR, "--class-info", "c")
    (data / "server.key").unlink()
    refused = cli("init", data)
    assert refused.code != 0 and "restore the key file" in refused.err


def test_store_migrate_copies_a_sqlite_data_dir_into_postgresql(
    tmp_path: Path, pg_server: PgServer
) -> None:
    setup = make_setup(tmp_path, "")
    setup.publish(setup.release(CLASS_A, 10, make_image("v10", 3000)))
    staged_files = setup.release(CLASS_A, 11, make_image("v11", 2000))
    cli_ok("publish", "--data", setup.data, staged_files.envelope_path, staged_files.image_path,
           "--rollout", "none")  # fmt: skip
    with contextlib.closing(_open(setup)) as store:
        _report(store, "t1", 1, State.INSTALLED, 10)
        store.set_device_tags("t1", {"site": "north"}, ACTOR)
        staged = store.latest_release(store.get_device("t1").class_key)  # type: ignore[union-attr]
        assert staged is not None
        c = store.create_campaign(staged.id, Target(), parse_waves("100%"), Policy(), ACTOR)
        store.tick_campaigns()
        store.remove_device("B-upper", ACTOR)
        checkpoint = store.audit_checkpoint()
        before = (
            store.list_devices(),
            store.list_releases(current_only=False),
            store.list_reports(None, 100),
            store.campaign_status(c.id),
            store.device_tags("t1"),
            store.audit_entries(),
            store.lookup_credential("t1"),
        )

    url = pg_server.new_database()
    out = cli_ok("store", "migrate", "--data", setup.data, "--to", url)
    assert "audit entries verified" in out
    assert load_config(setup.data / "config.toml").store.url == url
    with contextlib.closing(_open(setup)) as store:
        assert isinstance(store, PostgresStore)
        # The chain verifies on PostgreSQL, with a checkpoint taken on SQLite.
        store.verify_audit(checkpoint)
        after = (
            store.list_devices(),
            store.list_releases(current_only=False),
            store.list_reports(None, 100),
            store.campaign_status(c.id),
            store.device_tags("t1"),
            store.audit_entries()[: len(before[5])],
            store.lookup_credential("t1"),
        )
        assert after == before
        assert store.audit_entries()[-1].action == "store.migrate"
        # Life goes on: new ids continue after the copied ones, replays are still refused.
        with pytest.raises(ReportReplayed):
            _report(store, "t1", 1, State.FAILED, 10)
        _report(store, "t1", 2, State.INSTALLED, 10)
        assert store.list_reports("t1", 10)[-1].id > before[2][-1].id
        assert store.add_device("t5", VENDOR, CLASS_A, b"k" * 16, ACTOR).id == "t5"
        # The images went along: a host with an empty blobs/ gets them, verified.
        fresh = BlobStore(tmp_path / "fresh-blobs")
        fresh.create_dirs()
        assert store.fill_image(staged_files.digest, fresh)
        assert fresh.path_of(staged_files.digest).read_bytes() == staged_files.image
        store.verify_audit(checkpoint)

    # Nothing left to migrate; and an occupied target database is refused.
    again = cli("store", "migrate", "--data", setup.data, "--to", url)
    assert again.code != 0 and "already keeps its store" in again.err
    other = _make_setup(tmp_path / "other", devices=[DeviceSpec("x1")])
    occupied = cli("store", "migrate", "--data", other.data, "--to", url)
    assert occupied.code != 0 and "empty database" in occupied.err
    assert load_config(other.data / "config.toml").store.url == ""


def test_store_migrate_refuses_a_broken_audit_chain(tmp_path: Path, pg_server: PgServer) -> None:
    import sqlite3

    setup = make_setup(tmp_path, "")
    db = sqlite3.connect(setup.data / "otacoap.db")
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    db.commit()
    db.close()
    with contextlib.closing(_open(setup)) as store, pytest.raises(AuditChainBroken):
        store.verify_audit()
    url = pg_server.new_database()
    refused = cli("store", "migrate", "--data", setup.data, "--to", url)
    assert refused.code != 0 and "audit entry 2" in refused.err
    assert load_config(setup.data / "config.toml").store.url == ""


def _second_host(tmp_path: Path, name: str, first: Setup, url: str) -> DataDir:
    """Another host's data directory on the same PostgreSQL store: its own blobs/, the
    same server.key (copied, as an operator would), `init --store URL`."""
    root = tmp_path / name
    root.mkdir(mode=0o700)
    key = root / "server.key"
    key.write_bytes((first.data / "server.key").read_bytes())
    key.chmod(0o600)
    cli_ok("init", root, "--store", url)
    return DataDir(root)


def test_a_second_host_serves_an_image_it_fetched_from_postgresql_and_verified(
    tmp_path: Path, pg_server: PgServer
) -> None:
    import psycopg
    from server_helpers import coaps_client, fetch_blocks, run, threaded_server

    url = pg_server.new_database()
    a = _make_setup(tmp_path / "a", devices=[DeviceSpec("t1")], store_url=url)
    rel = a.release(CLASS_A, 10, make_image("v10", 5000))
    a.publish(rel)
    b = _second_host(tmp_path, "b", a, url)
    assert not b.blobs.has(rel.digest)
    with threaded_server(b.root) as server:

        async def go() -> bytes:
            async with coaps_client(server.port, "t1", a.devices["t1"].psk) as ctx:
                uri = f"coaps://127.0.0.1:{server.port}{rel.image_uri}"
                return await fetch_blocks(ctx, uri)

        assert run(go()) == rel.image
    assert b.blobs.path_of(rel.digest).read_bytes() == rel.image

    # A chunk changed in the database: the next host refuses it, nothing is cached.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE image_chunks SET data = %s WHERE idx = 0", (b"x" * 5000,))
    c = _second_host(tmp_path, "c", a, url)
    with (
        contextlib.closing(c.open_store()) as store,
        pytest.raises(StoreError, match="does not match its digest"),
    ):
        store.fill_image(rel.digest, c.blobs)
    assert not c.blobs.has(rel.digest) and c.blobs.temp_files() == []


def test_concurrent_writers_keep_one_audit_chain(tmp_path: Path, store_url: str) -> None:
    """Writers in several threads, each with its own connection (as several processes or
    hosts): the store's one-writer rule (BEGIN IMMEDIATE on SQLite, the advisory lock on
    PostgreSQL) keeps the chain linear and every report counted."""
    import threading

    setup = _make_setup(
        tmp_path, devices=[DeviceSpec(f"w{i}") for i in range(4)], store_url=store_url
    )
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with contextlib.closing(_open(setup)) as store:
                for counter in range(1, 16):
                    _report(store, f"w{i}", counter, State.DOWNLOADING, 1)
                    store.set_device_tags(f"w{i}", {"n": str(counter)}, ACTOR)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with contextlib.closing(_open(setup)) as store:
        count, _ = store.verify_audit()
        assert store.report_counts() == {"downloading": 60}
        assert count == len(store.audit_entries())
        assert [e.seq for e in store.audit_entries()] == list(range(1, count + 1))


def test_an_unreachable_postgresql_is_one_line(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.new_database()
    setup = _make_setup(tmp_path, devices=[DeviceSpec("t1")], store_url=url)
    dead = f"postgresql://otacoap@/x?host={tmp_path / 'nowhere'}"
    text = (setup.data / "config.toml").read_text().replace(url, dead)
    (setup.data / "config.toml").write_text(text)
    result = cli("device", "list", "--data", setup.data)
    assert result.code != 0 and "cannot connect" in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


def test_missing_postgresql_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pg_server

    monkeypatch.setattr(pg_server, "find_pg_bin", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"scripts/bootstrap\.sh"):
        pg_server.require_pg_bin()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        pg_server.require_pg_bin()


def test_every_image_row_a_transaction_inserts_goes_into_postgresql_with_it(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """Not only commit_release: any store method inserting into `images` (a delta's
    patch, a migrated image) has the bytes stored before its transaction commits; an
    image whose bytes are not in blobs/ makes the whole transaction roll back."""
    setup = _make_setup(tmp_path, devices=[DeviceSpec("t1")], store_url=pg_server.new_database())
    d = DataDir(setup.data)
    blob = make_image("patch", 300_000)  # more than one chunk
    digest = d.blobs.put(blob)
    insert = "INSERT INTO images (digest, image_id, size, created_at) VALUES (?, ?, ?, ?)"
    with contextlib.closing(d.open_store()) as store:
        with store._tx() as db:
            db.execute(insert, (digest, "p1", len(blob), "now"))
            store.audit(ACTOR, "test.image", "p1", "ok")
        fresh = BlobStore(tmp_path / "fresh")
        fresh.create_dirs()
        assert store.fill_image(digest, fresh)
        assert fresh.path_of(digest).read_bytes() == blob

        missing = bytes(32)
        count = len(store.audit_entries())
        with pytest.raises(StoreError, match="not in blobs/"), store._tx() as db:
            db.execute(insert, (missing, "p2", 10, "now"))
            store.audit(ACTOR, "test.image", "p2", "ok")
        assert len(store.audit_entries()) == count  # nothing of it was committed
        assert not store.fill_image(missing, fresh)
        store.add_device("t2", VENDOR, CLASS_A, b"k" * 16, ACTOR)  # and the store goes on
        store.verify_audit()
