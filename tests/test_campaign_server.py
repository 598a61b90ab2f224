"""Rollout campaigns end to end: the real server (subprocess, DTLS) and real simulated
devices, driven from the CLI.

* A bad release (its image fails the health check, so the device reverts) halts the
  campaign inside its canary wave, by the server's own evaluation of the report, and
  no device outside the canary is touched.
* A good release completes every wave; the devices of the second wave, watching /m,
  are told by an Observe notification when their wave opens.
* kill -9 of the server in the middle of a wave: after a restart no report is lost
  and no device is admitted twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from evil_server import CLASS, FAST, VENDOR, make_rig, run_device
from server_helpers import (
    DeviceSpec,
    Setup,
    assert_no_report_lost,
    campaign_admissions,
    cli_ok,
    make_setup,
    report_trail,
    running_server,
    start_server,
)

from device_sim.agent import AgentConfig, DeviceAgent, Outcome
from device_sim.firmware import Behaviour, make_image
from otacoap.core.campaign import CampaignState, MemberState
from otacoap.store import DataDir

pytestmark = [pytest.mark.network, pytest.mark.timeout(240)]

PSK = bytes.fromhex("000102030405060708090a0b0c0d0e0f")


def _setup(tmp_path: Path, n: int) -> tuple[Setup, dict[str, object]]:
    ids = [f"cmp{i}" for i in range(n)]
    setup = make_setup(tmp_path, devices=[DeviceSpec(d, CLASS, VENDOR, PSK) for d in ids])
    rigs = {
        d: make_rig(tmp_path, seq=5, key=setup.key, name=f"{d}.flash", device_id=d, psk=PSK)
        for d in ids
    }
    # What every device runs today, published the old way (--rollout all is the default).
    setup.publish(
        setup.release(CLASS, 5, make_image(3000, version=5, seed=1), vendor_domain=VENDOR)
    )
    return setup, rigs  # type: ignore[return-value]


def _stage(setup: Setup, seq: int, behaviour: Behaviour, size: int = 6000) -> None:
    rel = setup.release(
        CLASS, seq, make_image(size, version=seq, behaviour=behaviour, seed=seq),
        vendor_domain=VENDOR,
    )  # fmt: skip
    cli_ok("publish", "--data", setup.data, "--rollout", "none", rel.envelope_path, rel.image_path)


def _create(setup: Setup, seq: int, *extra: str) -> int:
    out = cli_ok("campaign", "create", "--data", setup.data, f"{VENDOR}/{CLASS}:{seq}", "--json",
                 *extra)  # fmt: skip
    return int(json.loads(out)["id"])


def _members(setup: Setup, cid: int) -> dict[str, MemberState]:
    """Read the store as the server left it (no evaluation by the test)."""
    store = DataDir(setup.data).open_store()
    try:
        return {m.device_id: m.state for m in store.campaign_members(cid)}
    finally:
        store.close()


def _campaign_state(setup: Setup, cid: int) -> tuple[CampaignState, str]:
    store = DataDir(setup.data).open_store()
    try:
        c = store.get_campaign(cid)
        assert c is not None
        return c.progress.state, c.progress.halt_reason
    finally:
        store.close()


def _wait(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _run(rig: object, uri: str, config: AgentConfig = FAST) -> Outcome:
    async def go() -> Outcome:
        result, _ = await run_device(rig, uri, config=config)  # type: ignore[arg-type]
        return result.outcome

    return asyncio.run(asyncio.wait_for(go(), 90))


def test_bad_release_halts_in_canary_then_good_release_completes_by_observe(
    tmp_path: Path,
) -> None:
    setup, rigs = _setup(tmp_path, 4)
    _stage(setup, 6, Behaviour.UNHEALTHY)
    with running_server(setup.data) as server:
        cid = _create(setup, 6, "--waves", "1,100%", "--failure-threshold", "50%")
        members = _members(setup, cid)
        (canary,) = [d for d, s in members.items() if s is MemberState.ADMITTED]
        for device, rig in rigs.items():
            outcome = _run(rig, server.uri)
            assert outcome == (Outcome.REVERTED if device == canary else Outcome.UP_TO_DATE)
        # The server evaluates the "reverted" report itself and halts.
        _wait("the halt", lambda: _campaign_state(setup, cid)[0] is CampaignState.HALTED)
        reason = _campaign_state(setup, cid)[1]
        assert "failure threshold" in reason and canary in reason and "reverted" in reason
        for device, rig in rigs.items():
            if device != canary:
                assert rig.info()["sequence_number"] == 5  # type: ignore[attr-defined]
                assert report_trail(setup, device) == [], "a device outside the canary was touched"
        assert all(s is MemberState.PENDING for d, s in _members(setup, cid).items() if d != canary)
        cli_ok("campaign", "cancel", "--data", setup.data, str(cid))

        # The fix, as a new release: the canary first, then everyone else by Observe.
        _stage(setup, 7, Behaviour.HEALTHY)
        cid2 = _create(setup, 7, "--waves", "1,100%", "--success-threshold", "100%")
        (canary2,) = [d for d, s in _members(setup, cid2).items() if s is MemberState.ADMITTED]
        others = [d for d in rigs if d != canary2]

        async def phase() -> list[list[Outcome]]:
            agents = [DeviceAgent(rigs[d].path, server.uri) for d in others]  # type: ignore[attr-defined]
            try:
                watchers = [asyncio.create_task(a.watch(max_time=60)) for a in agents]
                await asyncio.sleep(1.0)  # they observe /m, up to date with seq 5
                result, _ = await run_device(rigs[canary2], server.uri)  # type: ignore[arg-type]
                assert result.outcome == Outcome.UPDATED
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if all(
                        rigs[d].info()["sequence_number"] == 7
                        for d in others  # type: ignore[attr-defined]
                    ):
                        break
                    await asyncio.sleep(0.3)
                for w in watchers:
                    w.cancel()
                done = await asyncio.gather(*watchers, return_exceptions=True)
                return [r for r in done if isinstance(r, list)]
            finally:
                for a in agents:
                    await a.close()

        asyncio.run(asyncio.wait_for(phase(), 120))
        for d, rig in rigs.items():
            assert rig.info()["sequence_number"] == 7, d  # type: ignore[attr-defined]
        _wait("the finish", lambda: _campaign_state(setup, cid2)[0] is CampaignState.FINISHED)
        releases = json.loads(cli_ok("release", "list", "--data", setup.data, "--json"))
        assert 7 in [r["seq"] for r in releases]
        audit = cli_ok("audit", "list", "--data", setup.data, "--limit", "500")
        for action in ("campaign.halt", "campaign.cancel", "campaign.wave-open",
                       "campaign.finish"):  # fmt: skip
            assert action in audit


def test_kill_9_mid_wave_loses_no_report_and_admits_nobody_twice(tmp_path: Path) -> None:
    setup, rigs = _setup(tmp_path, 4)
    _stage(setup, 6, Behaviour.HEALTHY, size=48_000)
    server = start_server(setup.data)
    try:
        # An interrupted download reports "failed", a failure by the definition;
        # the threshold lets the campaign carry on through the one this test causes.
        cid = _create(setup, 6, "--waves", "2,100%", "--success-threshold", "100%",
                      "--failure-threshold", "100%")  # fmt: skip
        first = [d for d, s in _members(setup, cid).items() if s is MemberState.ADMITTED]
        assert len(first) == 2
        assert _run(rigs[first[0]], server.uri) == Outcome.UPDATED
        # kill -9 in the middle of wave 1, while the other canary downloads (its
        # "downloading" report is stored before it asks for the first block).
        second: list[Outcome] = []
        small_blocks = dataclasses.replace(FAST, fetch=dataclasses.replace(FAST.fetch, szx=0))
        worker = threading.Thread(
            target=lambda: second.append(_run(rigs[first[1]], server.uri, small_blocks))
        )
        worker.start()
        _wait(
            "the download to start",
            lambda: any(s == "downloading" for _, s, _ in report_trail(setup, first[1])),
        )
        server.stop(signal.SIGKILL)
        worker.join(90)
        assert second and second[0] in (Outcome.FAILED, Outcome.UNREACHABLE, Outcome.UPDATED)
        server = start_server(setup.data)
        if second[0] is not Outcome.UPDATED:
            assert _run(rigs[first[1]], server.uri) == Outcome.UPDATED
        _wait(
            "wave 2",
            lambda: sum(s is MemberState.ADMITTED for s in _members(setup, cid).values()) == 2,
        )
        for d in rigs:
            if d not in first:
                assert _run(rigs[d], server.uri) == Outcome.UPDATED
        _wait("the finish", lambda: _campaign_state(setup, cid)[0] is CampaignState.FINISHED)
    finally:
        server.stop()
    # No report lost: every device's reports are all stored, counters without a gap,
    # ending in its confirmation; nothing is left in any device's outbox.
    assert_no_report_lost(setup, rigs, 6)
    # Nobody admitted twice: each device appears in exactly one admission entry.
    assert sorted(campaign_admissions(setup)) == sorted(rigs)


def test_block_rate_budget_paces_admissions_through_the_server(tmp_path: Path) -> None:
    """--block-rate: the server measures the image's block rate and admits one device
    per evaluation while under budget; every device still gets the release."""
    setup, rigs = _setup(tmp_path, 3)
    _stage(setup, 6, Behaviour.HEALTHY)
    with running_server(setup.data) as server:
        cid = _create(setup, 6, "--waves", "100%", "--block-rate", "500")
        assert not any(s is MemberState.ADMITTED for s in _members(setup, cid).values())
        end = time.monotonic() + 90
        updated: set[str] = set()
        while len(updated) < len(rigs) and time.monotonic() < end:
            for d in _members(setup, cid):
                if d not in updated and _members(setup, cid)[d] is MemberState.ADMITTED:
                    assert _run(rigs[d], server.uri) == Outcome.UPDATED
                    updated.add(d)
            time.sleep(0.3)
        assert updated == set(rigs)
        _wait("the finish", lambda: _campaign_state(setup, cid)[0] is CampaignState.FINISHED)
        store = DataDir(setup.data).open_store()
        try:
            admits = [e.detail for e in store.audit_entries() if e.action == "campaign.admit"]
        finally:
            store.close()
        assert all(a.startswith("1 device(s)") for a in admits) and len(admits) == 3
