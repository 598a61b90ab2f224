"""`otacoap campaign ...`, `device tag|untag`, `publish --rollout` and `release rebuild`
from the command line (reports are stored as the server would store them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_helpers import CLASS_A, VENDOR, DeviceSpec, Setup, cli, cli_ok, make_image, make_setup

from otacoap.core import suit
from otacoap.core.report import Report, State
from otacoap.store import DataDir

N = 8


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    s = make_setup(tmp_path, devices=[DeviceSpec(f"d{i}") for i in range(N)])
    s.publish(s.release(CLASS_A, 10, make_image("v10", 2000)))
    return s


def _report(setup: Setup, device: str, state: State, seq: int, installed: int) -> None:
    store = DataDir(setup.data).open_store()
    try:
        dev = store.get_device(device)
        assert dev is not None
        r = Report((dev.last_counter or 0) + 1, state, sequence_number=seq,
                   installed_sequence=installed)  # fmt: skip
        store.record_report(device, r, r.encode())
    finally:
        store.close()


def _show(setup: Setup, cid: int) -> dict:  # type: ignore[type-arg]
    return json.loads(cli_ok("campaign", "show", "--data", setup.data, str(cid), "--json",
                             "--members"))  # fmt: skip


def _stage(setup: Setup, seq: int, name: str) -> None:
    rel = setup.release(CLASS_A, seq, make_image(name, 2000))
    out = cli_ok("publish", "--data", setup.data, "--rollout", "none", rel.envelope_path,
                 rel.image_path)  # fmt: skip
    assert "rollout by campaign only" in out


def _admitted(status: dict) -> list[str]:  # type: ignore[type-arg]
    return [m["device"] for m in status["members"] if m["state"] == "admitted"]


def test_publish_rollout_none_changes_nobody_and_all_is_the_default(setup: Setup) -> None:
    _stage(setup, 11, "v11")
    assert "release: seq 10" in cli_ok("device", "show", "--data", setup.data, "d0")
    rel = setup.release(CLASS_A, 12, make_image("v12", 2000))
    setup.publish(rel)  # no --rollout: as before campaigns, everybody at once
    assert "release: seq 12" in cli_ok("device", "show", "--data", setup.data, "d0")


def test_bad_release_halts_in_canary_from_the_cli(setup: Setup) -> None:
    _stage(setup, 11, "bad")
    out = json.loads(cli_ok(
        "campaign", "create", "--data", setup.data, f"{CLASS_A}:11", "--waves", "1,100%",
        "--failure-threshold", "50%", "--timeout", "30m", "--json",
    ))  # fmt: skip
    cid = out["id"]
    assert [w["size"] for w in out["per_wave"]] == [1, N - 1]
    status = _show(setup, cid)
    (canary,) = _admitted(status)
    _report(setup, canary, State.REVERTED, 11, 10)
    watch = cli("campaign", "watch", "--data", setup.data, str(cid), "--interval", "0.1")
    assert watch.code == 3, watch.err
    assert "halted: failure threshold" in watch.out and canary in watch.out
    status = _show(setup, cid)
    assert status["state"] == "halted"
    assert _admitted(status) == []
    for i in range(N):
        assert "release: seq 10" in cli_ok("device", "show", "--data", setup.data, f"d{i}")
    audit = cli_ok("audit", "list", "--data", setup.data)
    assert "campaign.create" in audit and "campaign.halt" in audit
    cli_ok("campaign", "cancel", "--data", setup.data, str(cid))
    assert _show(setup, cid)["state"] == "cancelled"
    listing = cli_ok("campaign", "list", "--data", setup.data)
    assert f"campaign {cid}" in listing and "cancelled" in listing


def test_good_release_completes_from_the_cli_with_approval(setup: Setup) -> None:
    _stage(setup, 11, "good")
    cid = json.loads(cli_ok(
        "campaign", "create", "--data", setup.data, "thermostat-t1:11", "--waves", "25%,100%",
        "--success-threshold", "100%", "--approve", "--json",
    ))["id"]  # fmt: skip
    for _ in range(4):
        status = _show(setup, cid)
        for d in _admitted(status):
            _report(setup, d, State.CONFIRMED, 11, 11)
        status = _show(setup, cid)
        if status["state"] == "finished":
            break
        if status["opened"] == 1 and status["per_wave"][0]["succeeded"] == 2:
            assert "wave 2 may open" in cli_ok("campaign", "approve", "--data", setup.data,
                                               str(cid))  # fmt: skip
    assert status["state"] == "finished"
    assert cli("campaign", "watch", "--data", setup.data, str(cid), "--count", "1").code == 0
    audit = cli_ok("audit", "list", "--data", setup.data, "--limit", "200")
    for action in ("campaign.approve", "campaign.wave-open", "campaign.finish"):
        assert action in audit


def test_pause_resume_and_watch_count_bounds(setup: Setup) -> None:
    _stage(setup, 11, "good")
    cid = json.loads(cli_ok("campaign", "create", "--data", setup.data, f"{CLASS_A}:11",
                            "--json"))["id"]  # fmt: skip
    assert "paused" in cli_ok("campaign", "pause", "--data", setup.data, str(cid))
    w = cli("campaign", "watch", "--data", setup.data, str(cid), "--count", "2",
            "--interval", "0.05", "--json")  # fmt: skip
    assert w.code == 0 and len(w.out.strip().splitlines()) == 2
    assert "resumed" in cli_ok("campaign", "resume", "--data", setup.data, str(cid))
    bad = cli("campaign", "resume", "--data", setup.data, str(cid))
    assert bad.code == 1 and bad.err.count("\n") == 1 and "not halted or paused" in bad.err


def test_device_tags_select_a_campaign_target(setup: Setup) -> None:
    cli_ok("device", "tag", "--data", setup.data, "d1", "ring=beta", "site=lab")
    cli_ok("device", "add", "--data", setup.data, "d9", "--vendor-domain", VENDOR,
           "--class-info", CLASS_A, "--tag", "ring=beta")  # fmt: skip
    assert "tags: ring=beta site=lab" in cli_ok("device", "show", "--data", setup.data, "d1")
    cli_ok("device", "untag", "--data", setup.data, "d1", "site")
    assert "tags: ring=beta\n" in cli_ok("device", "show", "--data", setup.data, "d1")
    _stage(setup, 11, "good")
    out = json.loads(cli_ok("campaign", "create", "--data", setup.data, f"{CLASS_A}:11",
                            "--target", "ring=beta", "--waves", "100%", "--json"))  # fmt: skip
    status = _show(setup, out["id"])
    assert sorted(m["device"] for m in status["members"]) == ["d1", "d9"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--waves", "50%,10%"], "must not shrink"),
        (["--window", "25:00-01:00"], "not a time of day"),
        (["--soak", "soon"], "not a duration"),
        (["--failure-threshold", "0"], "share"),
        (["--target", "bad key=x"], "tag key"),
    ],
)
def test_bad_campaign_options_are_one_line_errors(
    setup: Setup, args: list[str], message: str
) -> None:
    _stage(setup, 11, "good")
    r = cli("campaign", "create", "--data", setup.data, f"{CLASS_A}:11", *args)
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1


def test_unknown_release_or_campaign_is_refused(setup: Setup) -> None:
    r = cli("campaign", "create", "--data", setup.data, f"{CLASS_A}:99")
    assert r.code == 1 and "no release" in r.err
    r = cli("campaign", "show", "--data", setup.data, "7")
    assert r.code == 1 and "no campaign 7" in r.err


def test_release_rebuild_makes_a_rollback_release(setup: Setup, tmp_path: Path) -> None:
    key = tmp_path / "author.pem"
    key.write_bytes(setup.key.pem)
    _stage(setup, 11, "bad")
    out = tmp_path / "rollback.suit"
    msg = cli_ok("release", "rebuild", "--data", setup.data, f"{CLASS_A}:10", "--seq", "12",
                 "--key", key, "-o", out)  # fmt: skip
    assert "seq 12 for the image of seq 10" in msg
    env = suit.decode_envelope(out.read_bytes())
    assert env.manifest.sequence_number == 12
    assert (tmp_path / "rollback.suit.bin").read_bytes() == make_image("v10", 2000)
    published = cli_ok("publish", "--data", setup.data, "--rollout", "none", out,
                       tmp_path / "rollback.suit.bin")  # fmt: skip
    assert "seq 12" in published
    r = cli("release", "rebuild", "--data", setup.data, f"{CLASS_A}:10", "--seq", "9",
            "--key", key, "-o", out)  # fmt: skip
    assert r.code == 1 and "must be above" in r.err


def test_network_publish_refuses_rollout_none(setup: Setup) -> None:
    rel = setup.release(CLASS_A, 11, make_image("v11", 2000))
    r = cli("publish", "--data", setup.data, "--server", "coaps://127.0.0.1:1", "--rollout",
            "none", rel.envelope_path, rel.image_path)  # fmt: skip
    assert r.code == 1 and "local publish" in r.err


def test_campaign_for_a_release_not_above_the_current_one_is_refused(setup: Setup) -> None:
    r = cli("campaign", "create", "--data", setup.data, f"{CLASS_A}:10")
    assert r.code == 1 and "not above the class's current release (seq 10)" in r.err


def test_campaign_over_a_class_without_devices_makes_the_release_current(
    setup: Setup,
) -> None:
    rel = setup.release("toaster", 1, make_image("t1", 1000))
    cli_ok("publish", "--data", setup.data, "--rollout", "none", rel.envelope_path,
           rel.image_path)  # fmt: skip
    label = next(
        r["class"]
        for r in json.loads(cli_ok("release", "list", "--data", setup.data, "--all", "--json"))
        if r["seq"] == 1
    )
    out = cli_ok("campaign", "create", "--data", setup.data, f"{label}:1")
    assert "already over; the release is now the class's current one" in out
    cli_ok("device", "add", "--data", setup.data, "toaster-1", "--vendor-domain", VENDOR,
           "--class-info", "toaster")  # fmt: skip
    assert "release: seq 1" in cli_ok("device", "show", "--data", setup.data, "toaster-1")
