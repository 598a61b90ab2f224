"""Data directory, config and schema migrations (issue 3 §1)."""

from __future__ import annotations

import sqlite3
import stat
import tomllib
from pathlib import Path

import pytest

from otacoap.config import Config, ConfigError, default_toml, parse_config
from otacoap.store import DataDir
from otacoap.store.errors import NotInitialised, StoreError
from otacoap.store.sqlite import MIGRATIONS, SCHEMA_VERSION


def test_init_creates_every_piece_with_safe_modes(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    created = d.init()
    assert {"config.toml", "server.key", "blobs/", "otacoap.db"} <= set(created)
    assert stat.S_IMODE(d.key_path.stat().st_mode) == 0o600
    assert d.key_path.stat().st_size == 32
    assert (d.root / "blobs" / "tmp").is_dir()
    db = sqlite3.connect(d.db_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    versions = [r[0] for r in db.execute("SELECT version FROM schema_migrations")]
    # Every migration, in order (numbers are handed out per branch, so this branch's
    # list may have a gap until the merge fills it).
    assert versions == [m[0] for m in MIGRATIONS] and versions[-1] == SCHEMA_VERSION
    db.close()


def test_init_twice_changes_nothing(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    d.init()
    key, config = d.key_path.read_bytes(), d.config_path.read_bytes()
    store = d.open_store()
    store.add_device("dev1", "example.com", "c1", b"k" * 16, "test")
    store.close()
    assert d.init() == []
    assert d.key_path.read_bytes() == key
    assert d.config_path.read_bytes() == config
    store = d.open_store()
    assert [x.id for x in store.list_devices()] == ["dev1"]
    store.close()


def test_init_refuses_new_key_for_sealed_psks(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    d.init()
    store = d.open_store()
    store.add_device("dev1", "example.com", "c1", b"k" * 16, "test")
    store.close()
    d.key_path.unlink()
    with pytest.raises(StoreError, match="sealed PSKs"):
        d.init()
    assert not d.key_path.exists()


def test_commands_refuse_an_uninitialised_dir(tmp_path: Path) -> None:
    with pytest.raises(NotInitialised, match="otacoap init"):
        DataDir(tmp_path / "nothing").open_store()


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    d.init()
    d.key_path.chmod(0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        d.open_store()


def test_migrations_are_recorded_once_and_reapplying_is_a_no_op(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    d.init()
    store = d.open_store()
    assert store.applied_migrations == []
    assert store.migrate() == []
    assert store.schema_version() == SCHEMA_VERSION
    store.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    d.init()
    db = sqlite3.connect(d.db_path)
    db.execute(
        "INSERT INTO schema_migrations VALUES (?, 'from the future', 'x')", (SCHEMA_VERSION + 1,)
    )
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this otacoap"):
        d.open_store()


def test_default_config_text_is_the_default_config() -> None:
    assert parse_config(default_toml()) == Config()
    assert parse_config("") == Config()


# The defaults file as it was written by hand before it was generated (issue 9): the
# generated one must say the same, key for key.
_HAND_WRITTEN_DEFAULTS = """
[server]
bind = "127.0.0.1"
port = 5684
loop = "uvloop"
max_dtls_sessions = 256
dtls_idle_timeout = 300.0
max_dtls_handshakes = 256
dedup_max_entries = 4096
dedup_lifetime = 247.0
max_block_szx = 6
max_observers = 4096
max_observers_per_device = 4
observe_poll_interval = 1.0
refusal_audit_interval = 10.0
[publish]
max_sequence_jump = 1000
max_image_size = 16777216
max_envelope_size = 65536
[uploads]
max_concurrent = 8
max_per_peer = 2
idle_timeout = 60.0
max_duration = 3600.0
staged_ttl = 600.0
max_staged = 4
busy_max_age = 30
[monitoring]
metrics_bind = ""
log_format = "text"
"""


def test_generated_defaults_say_what_the_hand_written_file_said() -> None:
    generated = tomllib.loads(default_toml())
    assert generated == tomllib.loads(_HAND_WRITTEN_DEFAULTS)
    # Every key carries its help text as a comment on its line.
    for line in default_toml().splitlines():
        if "=" in line:
            assert "# " in line.split("=", 1)[1], line


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[server]\nprot = 1\n", "unknown key server.prot"),
        ("[nope]\n", "unknown section"),
        ("[server]\nport = 'x'\n", "server.port must be a int"),
        ("[server]\nport = 70000\n", "0..65535"),
        ("[server]\nloop = 'trio'\n", "uvloop"),
        ("[publish]\nmax_sequence_jump = 0\n", "positive"),
        ("[publish]\nmax_envelope_size = 1000000\n", "may not exceed"),
        ("[server\n", "config.toml"),
        ("[uploads]\nmax_concurrent = true\n", "must be a int"),
    ],
)
def test_bad_config_is_refused(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(text)


def test_config_values_are_read(tmp_path: Path) -> None:
    cfg = parse_config("[server]\nport = 6000\ndedup_lifetime = 10\n[uploads]\nmax_per_peer = 1\n")
    assert cfg.server.port == 6000
    assert cfg.server.dedup_lifetime == 10.0
    assert cfg.uploads.max_per_peer == 1


def test_reports_keep_how_many_reports_the_device_lost(tmp_path: Path) -> None:
    """Migration 2: a device's count of dropped reports reaches `report list`."""
    from otacoap.core.report import Report, State

    d = DataDir(tmp_path / "data")
    d.init()
    store = d.open_store()
    try:
        store.add_device("dev1", "example.com", "c1", b"k" * 16, "test")
        for counter, lost in ((1, 0), (9, 7)):
            report = Report(counter, State.CHECKING, lost=lost)
            store.record_report("dev1", report, report.encode())
        assert [(r.counter, r.lost) for r in store.list_reports("dev1", 10)] == [(1, 0), (9, 7)]
        assert "7 reports lost so far" in store.audit_entries()[-1].detail
    finally:
        store.close()
