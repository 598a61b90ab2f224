"""The operator's view (issue 12 §1): every list and show command answers `--json` that
parses, the text tables have a header line, `device list` shows what each device last
said (running sequence number, state, last seen, reason by name), and `--version`."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import CLASS_A, DeviceSpec, cli, cli_ok, make_image, make_setup

from otacoap.cli import build_parser
from otacoap.core.errors import ReportReason
from otacoap.core.report import Report, State
from otacoap.store import DataDir

LISTS = [
    ("trust", "list"),
    ("device", "list"),
    ("operator", "list"),
    ("release", "list"),
    ("report", "list"),
    ("audit", "list"),
]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1"), DeviceSpec("t2")], operators=["ops"])
    setup.publish(setup.release(CLASS_A, 3, make_image("fw", 3000)))
    with contextlib.closing(DataDir(setup.data).open_store()) as store:
        for counter, state, reason, seq in (
            (1, State.DOWNLOADING, ReportReason.OK, None),
            (2, State.FAILED, ReportReason.CONDITION_FAILED, 2),
        ):
            report = Report(counter, state, reason, 3, installed_sequence=seq, detail="\x1b[2Jx")
            store.record_report("t1", report, report.encode())
    return setup.data


@pytest.mark.parametrize("command", LISTS, ids=" ".join)
def test_every_list_answers_json_that_parses_and_text_with_a_header(
    data: Path, command: tuple[str, str]
) -> None:
    rows = json.loads(cli_ok(*command, "--data", data, "--json"))
    assert isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
    text = cli_ok(*command, "--data", data).splitlines()
    assert text[0].split()[0].isupper() or text[0].startswith("#"), text[0]
    assert len(text) == 1 + len(rows)
    assert "\x1b" not in "\n".join(text)  # device text is escaped, never raw


def test_empty_lists_are_an_empty_json_array(tmp_path: Path) -> None:
    cli_ok("init", tmp_path / "d")
    for command in LISTS[:-1]:  # init itself is audited
        assert json.loads(cli_ok(*command, "--data", tmp_path / "d", "--json")) == []


def test_device_list_shows_what_each_device_last_said(data: Path) -> None:
    rows = {r["id"]: r for r in json.loads(cli_ok("device", "list", "--data", data, "--json"))}
    t1, t2 = rows["t1"], rows["t2"]
    assert (t1["running_seq"], t1["state"], t1["reason"]) == (2, "failed", "condition_failed")
    assert t1["last_seen"] and t1["last_report_counter"] == 2
    assert (t2["running_seq"], t2["state"], t2["last_seen"]) == (None, None, None)
    header, *lines = cli_ok("device", "list", "--data", data).splitlines()
    assert header.split() == ["DEVICE", "CLASS", "RUNNING", "SEQ", "STATE", "LAST", "SEEN",
                              "LAST", "REASON"]  # fmt: skip
    assert "condition_failed" in lines[0] and "reason 10" not in lines[0]


def test_device_show_answers_json_and_names_the_reason(data: Path) -> None:
    shown = json.loads(cli_ok("device", "show", "--data", data, "t1", "--json"))
    assert (
        shown["id"] == "t1" and shown["release_seq"] == 3 and shown["reason"] == "condition_failed"
    )
    assert "last reason: condition_failed" in cli_ok("device", "show", "--data", data, "t1")
    missing = cli("device", "show", "--data", data, "ghost", "--json")
    assert missing.code == 1 and missing.out == "" and "ghost" in missing.err


def test_report_list_names_reasons(data: Path) -> None:
    rows = json.loads(cli_ok("report", "list", "--data", data, "--json"))
    assert [(r["state"], r["reason"], r["reason_code"]) for r in rows] == [
        ("downloading", "ok", 0),
        ("failed", "condition_failed", 10),
    ]


def test_version() -> None:
    result = cli("--version")
    assert result.code == 0 and result.out.startswith("otacoap ")


def test_status_summarises_classes_releases_and_campaigns(data: Path) -> None:
    status = json.loads(cli_ok("status", "--data", data, "--json"))
    assert status["devices"] == 2
    ((label, klass),) = status["classes"].items()
    assert label.endswith(CLASS_A) and klass["devices"] == 2
    assert klass["by_state"] == {"failed": 1, "no report yet": 1}
    assert {(r["seq"], r["devices"]) for r in status["running"]} == {(2, 1), (None, 1)}
    text = cli_ok("status", "--data", data)
    assert "2 devices in 1 class\n" in text and "LAST REPORTED STATE" in text


def test_status_shows_an_active_campaign_per_wave(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec(f"d{i}") for i in range(4)])
    setup.publish(setup.release(CLASS_A, 2, make_image("fw2", 2000)))
    rel = setup.release(CLASS_A, 3, make_image("fw3", 2000))
    cli_ok("publish", "--data", setup.data, "--rollout", "none", rel.envelope_path,
           rel.image_path)  # fmt: skip
    cli_ok("campaign", "create", "--data", setup.data, f"{CLASS_A}:3", "--waves", "1,100%")
    status = json.loads(cli_ok("status", "--data", setup.data, "--json"))
    (camp,) = status["campaigns"]
    assert camp["state"] == "running" and [w["size"] for w in camp["waves"]] == [1, 3]
    assert camp["waves"][0]["admitted"] == 1
    text = cli_ok("status", "--data", setup.data)
    assert "campaign 1 " in text and "1 of 2 waves open" in text and "SUCCEEDED" in text


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def test_every_list_and_show_command_takes_json() -> None:
    readers = {"list", "show", "status", "inspect", "stats", "watch"}
    missing = [
        " ".join(path)
        for path, sub in _commands(build_parser())
        if path[-1] in readers
        and "--json" not in {o for a in sub._actions for o in a.option_strings}
    ]
    assert missing == []
