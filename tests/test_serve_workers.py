"""`otacoap serve --workers N` (issue 14 §2, §3): one parent, N server processes on one
port, on SQLite and on a real PostgreSQL, with real DTLS clients and simulated devices.

* The workers share the port; a worker killed with SIGKILL is started again by the
  parent; SIGTERM stops them all cleanly.
* Nothing else joins the port or the data directory: a plain second `serve`, a second
  `serve --workers` on another data directory, a hand-started worker are all refused.
* A release published by the CLI reaches /m observers on every worker, and a re-keyed
  device's sessions end whichever worker holds them.
* `--max-downloads` holds across workers: the devices admitted at once never exceed it.
* kill -9 of one worker in the middle of a rollout: its devices handshake again and
  finish, no acknowledged report is lost, the parent restarts the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from evil_server import CLASS, FAST, VENDOR, make_rig, run_device
from server_helpers import (
    CLASS_A,
    HOST,
    DeviceSpec,
    ServerProcess,
    Setup,
    assert_no_report_lost,
    campaign_admissions,
    cli,
    cli_ok,
    make_setup,
    report_trail,
    start_server,
)
from server_helpers import make_image as image_of

from device_sim.agent import AgentConfig, Outcome
from device_sim.firmware import Behaviour, make_image
from otacoap.core.campaign import MemberState, Policy, Target, parse_waves
from otacoap.server.workers import Backoff
from otacoap.store import DataDir, Publisher
from otacoap.store.models import CampaignRecord

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

PSK = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
_WORKERS = re.compile(r"^workers: (\d+) \(worker:pid ([\d: ]+)\)$")
_RESTARTED = re.compile(r"^worker (\d+) restarted \(pid (\d+)\)$")
FAST_POLL = "[server]\nobserve_poll_interval = 0.2\n"


def _pids(server: ServerProcess) -> dict[int, int]:
    """Worker index -> pid, from the parent's "workers:" line (and later restarts)."""
    pids: dict[int, int] = {}
    for line in server.lines:
        if m := _WORKERS.match(line):
            for pair in m.group(2).split():
                index, pid = pair.split(":")
                pids[int(index)] = int(pid)
        elif m := _RESTARTED.match(line):
            pids[int(m.group(1))] = int(m.group(2))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(what: str, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _setup(tmp_path: Path, n: int, store_url: str = "", config: str | None = None) -> Setup:
    return make_setup(
        tmp_path,
        devices=[DeviceSpec(f"wd{i}", CLASS, VENDOR, PSK) for i in range(n)],
        store_url=store_url,
        config=config,
    )


def _rigs(tmp_path: Path, setup: Setup) -> dict[str, object]:
    rigs = {
        d: make_rig(tmp_path, seq=5, key=setup.key, name=f"{d}.flash", device_id=d, psk=PSK)
        for d in setup.devices
    }
    setup.publish(
        setup.release(CLASS, 5, make_image(3000, version=5, seed=1), vendor_domain=VENDOR)
    )
    return rigs


def _release(setup: Setup, seq: int, size: int, *, rollout: str = "all") -> None:
    rel = setup.release(
        CLASS, seq, make_image(size, version=seq, behaviour=Behaviour.HEALTHY, seed=seq),
        vendor_domain=VENDOR,
    )  # fmt: skip
    cli_ok("publish", "--data", setup.data, "--rollout", rollout, rel.envelope_path,
           rel.image_path)  # fmt: skip


def _until_updated(rig: object, uri: str, config: AgentConfig, tries: int = 6) -> list[Outcome]:
    """Run the device until it is updated (a worker's death may cost it a run)."""
    outcomes: list[Outcome] = []

    async def once() -> Outcome:
        result, _ = await run_device(rig, uri, config=config)  # type: ignore[arg-type]
        return result.outcome

    for _ in range(tries):
        outcomes.append(asyncio.run(asyncio.wait_for(once(), 120)))
        if outcomes[-1] is Outcome.UPDATED:
            break
    return outcomes


# --- the parent and its workers ------------------------------------------------------


def test_backoff_doubles_while_a_worker_dies_young_and_resets_after_it_lived() -> None:
    b = Backoff(first=0.5, cap=4.0, stable=30.0)
    assert [b.next(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.next(31.0) == 0.5


def test_workers_share_the_port_a_killed_one_is_restarted_and_sigterm_stops_all(
    tmp_path: Path,
) -> None:
    setup = _setup(tmp_path, 1)
    rigs = _rigs(tmp_path, setup)
    server = start_server(setup.data, args=["--workers", "2"], timeout=60)
    try:
        pids = _pids(server)
        assert sorted(pids) == [0, 1] and all(_alive(p) for p in pids.values())
        log = server.log()
        assert f"worker 0 pid {pids[0]} INFO" in log and f"worker 1 pid {pids[1]} INFO" in log
        os.kill(pids[1], signal.SIGKILL)
        _wait("the restart", lambda: any(_RESTARTED.match(x) for x in server.lines))
        again = _pids(server)
        assert again[0] == pids[0] and again[1] != pids[1] and _alive(again[1])
        assert f"worker 1 (pid {pids[1]}) exited (killed by SIGKILL)" in server.log()
        _release(setup, 6, 20_000)
        (rig,) = rigs.values()
        assert _until_updated(rig, server.uri, FAST)[-1] is Outcome.UPDATED

        # `server stats`: each worker's counters (each writes its own file).
        def stats_pid(i: int) -> int | None:
            try:
                text = (setup.data / f"server-stats.worker-{i}.json").read_text()
            except FileNotFoundError:
                return None
            return int(json.loads(text)["pid"])

        _wait("both workers' stats", lambda: [stats_pid(0), stats_pid(1)] == [pids[0], again[1]])
        out = cli_ok("server", "stats", "--data", setup.data)
        assert "worker 0:\n  as of" in out and "worker 1:\n  as of" in out, out
        doc = json.loads(cli_ok("server", "stats", "--data", setup.data, "--json"))
        assert sorted(doc["workers"]) == ["0", "1"]
        assert doc["workers"]["1"]["pid"] == again[1]
    finally:
        code = server.stop()
    assert code == 0 and server.lines[-1] == "stopped"
    _wait("the workers to end", lambda: not any(_alive(p) for p in _pids(server).values()), 30)


def test_nothing_else_joins_the_port_or_the_data_directory(tmp_path: Path) -> None:
    setup = _setup(tmp_path / "a", 0)
    other = _setup(tmp_path / "b", 0)
    server = start_server(setup.data, args=["--workers", "2"], timeout=60)
    try:
        port = str(server.port)
        # A plain serve (no SO_REUSEPORT) on the workers' port: the kernel refuses it.
        r = cli("serve", "--data", other.data, "--bind", HOST, "--port", port, "--workers", "1")
        assert r.code == 1 and "the port is in use" in r.err
        # Another parent on another data directory would join the SO_REUSEPORT group.
        r = cli("serve", "--data", other.data, "--bind", HOST, "--port", port, "--workers", "2")
        assert r.code == 1 and "another 'otacoap serve --workers' uses it" in r.err
        # The same data directory: its lock is the parent's.
        r = cli("serve", "--data", setup.data, "--bind", HOST, "--port", "0", "--workers", "2")
        assert r.code == 1 and "already using" in r.err
        # A worker started by hand: not this data directory's parent's child.
        r = cli("serve", "--data", setup.data, "--bind", HOST, "--port", port, "--worker", "5")
        assert r.code == 1 and "needs its 'otacoap serve --workers' parent" in r.err
        assert all(_alive(p) for p in _pids(server).values())
    finally:
        assert server.stop() == 0


def test_a_worker_refuses_to_run_without_its_parent(tmp_path: Path) -> None:
    setup = _setup(tmp_path, 0)
    r = cli("serve", "--data", setup.data, "--bind", HOST, "--port", "0", "--worker", "0")
    assert r.code == 1 and "needs its 'otacoap serve --workers' parent" in r.err


# --- changes reach every worker -------------------------------------------------------


def _sessions_by_worker(data: Path, n: int) -> list[int]:
    counts = []
    for i in range(n):
        path = data / f"server-stats.worker-{i}.json"
        try:
            counts.append(int(json.loads(path.read_text())["dtls"]["sessions"]))
        except (OSError, ValueError, KeyError):
            counts.append(0)
    return counts


def test_publish_and_rekey_reach_devices_on_every_worker(tmp_path: Path, store_url: str) -> None:
    n = 10
    setup = _setup(tmp_path, n, store_url, FAST_POLL)
    setup.publish(setup.release(CLASS, 5, make_image(3000, version=5, seed=1),
                                vendor_domain=VENDOR))  # fmt: skip
    rel = setup.release(CLASS, 6, make_image(4000, version=6, seed=6), vendor_domain=VENDOR)
    server = start_server(setup.data, args=["--workers", "2"], timeout=60)

    async def go() -> None:
        contexts = []
        try:
            # One client (so one source port) per device: the kernel's SO_REUSEPORT
            # hash spreads them over the workers.
            observers = []
            for d in setup.devices:
                ctx = await aiocoap.Context.create_client_context()
                contexts.append(ctx)
                ctx.client_credentials.load_from_dict(
                    {
                        f"coaps://{HOST}:{server.port}/*": {
                            "dtls": {"psk": {"hex": PSK.hex()}, "client-identity": {"ascii": d}}
                        }
                    }
                )
                req = ctx.request(
                    aiocoap.Message(code=Code.GET, uri=server.uri + "/m", observe=0),
                    handle_blockwise=False,
                )
                first = await asyncio.wait_for(req.response, 30)
                assert first.code == Code.CONTENT
                observers.append(req.observation.__aiter__())
            # The stats files show where the sessions are (written every 2 s).
            end = time.monotonic() + 30
            while sum(_sessions_by_worker(setup.data, 2)) < n and time.monotonic() < end:
                await asyncio.sleep(0.5)
            spread = _sessions_by_worker(setup.data, 2)
            assert sum(spread) == n and all(spread), spread  # 2/2**10: both have some
            # A release published by the CLI: every observer is told, on both workers.
            started = time.monotonic()
            await asyncio.to_thread(setup.publish, rel)
            notes = await asyncio.gather(*(asyncio.wait_for(o.__anext__(), 30) for o in observers))
            took = time.monotonic() - started
            assert all(note.payload == rel.envelope for note in notes)
            assert took < 10, took  # about the poll (0.2 s) on an idle machine
            # Every device re-keyed by the CLI: the old sessions end on both workers
            # (issue 10 §1): a request on one answers 4.01 or is not answered.
            for d in setup.devices:
                await asyncio.to_thread(
                    cli_ok,
                    "device",
                    "rekey",
                    "--data",
                    setup.data,
                    d,
                    "--psk",
                    os.urandom(16).hex(),
                )
            await asyncio.sleep(3)

            async def old_key_refused(ctx: aiocoap.Context) -> None:
                msg = aiocoap.Message(code=Code.GET, uri=server.uri + "/m")
                try:
                    r = await asyncio.wait_for(ctx.request(msg).response, 15)
                except Exception:
                    return  # the session is gone and a new handshake fails: fine
                assert r.code != Code.CONTENT, r

            await asyncio.gather(*(old_key_refused(ctx) for ctx in contexts))
        finally:
            for ctx in contexts:
                await ctx.shutdown()

    try:
        asyncio.run(asyncio.wait_for(go(), 200))
    finally:
        assert server.stop() == 0


# --- campaign pacing across workers ---------------------------------------------------


def test_max_downloads_holds_across_workers(tmp_path: Path) -> None:
    cap = 2
    setup = _setup(tmp_path, 6, config=FAST_POLL)
    rigs = _rigs(tmp_path, setup)
    _release(setup, 6, 24_000, rollout="none")
    server = start_server(setup.data, args=["--workers", "3"], timeout=90)
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        store = DataDir(setup.data).open_store()
        try:
            while not stop.is_set():
                members = store.campaign_members(cid)
                seen.append(sum(m.state is MemberState.ADMITTED for m in members))
                time.sleep(0.05)
        finally:
            store.close()

    try:
        out = cli_ok("campaign", "create", "--data", setup.data, f"{VENDOR}/{CLASS}:6",
                     "--waves", "100%", "--max-downloads", str(cap), "--json")  # fmt: skip
        cid = int(json.loads(out)["id"])
        sampler = threading.Thread(target=sample)
        sampler.start()
        outcomes: dict[str, list[Outcome]] = {}

        def device(d: str) -> None:
            end = time.monotonic() + 200
            while time.monotonic() < end:
                result = _until_updated(rigs[d], server.uri, FAST, tries=1)
                if result[-1] is Outcome.UPDATED:
                    outcomes[d] = result
                    return
                time.sleep(0.3)  # not admitted yet: /m still serves seq 5

        threads = [threading.Thread(target=device, args=(d,)) for d in rigs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        stop.set()
        sampler.join(10)
    finally:
        stop.set()
        assert server.stop() == 0
    assert set(outcomes) == set(rigs)
    assert seen and max(seen) <= cap, max(seen)
    assert max(seen) == cap  # the cap was reached, so it was what held them back
    assert_no_report_lost(setup, rigs, 6)


# --- kill -9 of a worker in the middle of a rollout -------------------------------------


def test_kill_9_of_a_worker_mid_rollout_loses_no_report(tmp_path: Path, store_url: str) -> None:
    setup = _setup(tmp_path, 6, store_url, FAST_POLL)
    rigs = _rigs(tmp_path, setup)
    server = start_server(setup.data, args=["--workers", "2"], timeout=90)
    try:
        _release(setup, 6, 40_000)
        # Small blocks: each download takes a while, so the kill lands in the middle.
        small = dataclasses.replace(FAST, fetch=dataclasses.replace(FAST.fetch, szx=0))
        outcomes: dict[str, list[Outcome]] = {}

        def device(d: str) -> None:
            outcomes[d] = _until_updated(rigs[d], server.uri, small)

        threads = [threading.Thread(target=device, args=(d,)) for d in rigs]
        for t in threads:
            t.start()

        def downloading() -> list[str]:
            return [d for d in rigs if (r := report_trail(setup, d)) and r[-1][1] == "downloading"]

        # The victim holds sessions (its stats file says so) while downloads run.
        _wait(
            "worker 1 to serve a download",
            lambda: _sessions_by_worker(setup.data, 2)[1] > 0 and len(downloading()) >= 2,
            120,
        )
        victim = _pids(server)[1]
        os.kill(victim, signal.SIGKILL)
        _wait("the restart", lambda: _pids(server)[1] != victim, 60)
        for t in threads:
            t.join(280)
        assert all(_alive(p) for p in _pids(server).values())
    finally:
        code = server.stop()
    assert code == 0
    assert {d: o[-1] for d, o in outcomes.items()} == {d: Outcome.UPDATED for d in rigs}
    assert "exited (killed by SIGKILL)" in server.log()
    assert_no_report_lost(setup, rigs, 6)
    store = DataDir(setup.data).open_store()
    try:
        store.verify_audit()
    finally:
        store.close()


def test_workers_option_is_checked(tmp_path: Path) -> None:
    setup = _setup(tmp_path, 0)
    for bad in ("0", "many", "1000"):
        r = cli("serve", "--data", setup.data, "--workers", bad)
        assert r.code == 2 and "--workers" in r.err, r.err


# Each process: evaluate the campaigns as a worker does, confirm the devices it sees
# admitted (as their reports would), and record the most it ever saw admitted at once.
_EVALUATOR = """
import json, sys, time
from pathlib import Path
from otacoap.core.campaign import MemberState, Policy, Target, parse_waves
from otacoap.core.report import Report, State
from otacoap.store import DataDir, Publisher

data, cid, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
store = DataDir(Path(data)).open_store()
most, ticks = 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    store.tick_campaigns()
    ticks += 1
    admitted = [m.device_id for m in store.campaign_members(cid)
                if m.state is MemberState.ADMITTED]
    most = max(most, len(admitted))
    for device in admitted[:1]:
        dev = store.get_device(device)
        report = Report((dev.last_counter or 0) + 1, State.CONFIRMED,
                        sequence_number=11, installed_sequence=11)
        try:
            store.record_report(device, report, report.encode())
        except Exception:
            pass  # another process reported this counter first
store.close()
print(json.dumps({"most": most, "ticks": ticks}))
"""


def _v11_campaign(setup: Setup, policy: Policy) -> tuple[DataDir, CampaignRecord, bytes]:
    """v10 current, v11 published but not made current, and a campaign (every device,
    one wave) for v11 under `policy`: the data directory, the campaign, v11's digest."""
    setup.publish(setup.release(CLASS_A, 10, image_of("v10", 3000)))
    rel = setup.release(CLASS_A, 11, image_of("v11", 3000))
    d = DataDir(setup.data)
    store = d.open_store()
    try:
        record = Publisher(store, d.blobs, d.config().publish).publish_file(
            rel.envelope, rel.image_path, "test", make_current=False
        )
        c = store.create_campaign(record.id, Target(), parse_waves("100%"), policy, "test")
    finally:
        store.close()
    return d, c, record.image.digest


def test_max_downloads_holds_when_several_processes_evaluate_at_once(
    tmp_path: Path, store_url: str
) -> None:
    """The admission count lives in the store: N processes evaluating the same campaign
    at the same time (each in its own write transaction) never admit more than the cap."""

    cap, n = 3, 24
    setup = make_setup(
        tmp_path, devices=[DeviceSpec(f"p{i:02d}", CLASS_A) for i in range(n)],
        store_url=store_url,
    )  # fmt: skip
    d, c, _ = _v11_campaign(setup, Policy(max_downloads=cap))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _EVALUATOR, str(setup.data), str(c.id), "20"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert max(r["most"] for r in results) == cap, results
    store = d.open_store()
    try:
        states = [m.state for m in store.campaign_members(c.id)]
    finally:
        store.close()
    admitted = campaign_admissions(setup)
    # Progress was made by all of them together, and nobody was admitted twice.
    assert states.count(MemberState.SUCCEEDED) >= n // 2, states
    assert len(admitted) == len(set(admitted))


def test_block_rate_budget_counts_every_worker_s_traffic(tmp_path: Path, store_url: str) -> None:
    """--block-rate: each server process stores its measured rate; admission compares
    the budget with their sum, so two workers at 60 % of the budget each admit nobody,
    while one of them alone would (and a stopped worker's rate is forgotten)."""
    setup = make_setup(
        tmp_path, devices=[DeviceSpec(f"r{i}", CLASS_A) for i in range(4)], store_url=store_url
    )
    d, c, digest = _v11_campaign(setup, Policy(block_rate=500.0))
    store = d.open_store()
    try:

        def admitted() -> int:
            return sum(m.state is MemberState.ADMITTED for m in store.campaign_members(c.id))

        t = time.time()
        store.tick_campaigns(now=t, block_rates={digest: 300.0}, rate_source="host-a:1")
        first = admitted()
        assert first == 1  # 300 < 500: one admitted, as with one process
        store.tick_campaigns(now=t + 1, block_rates={digest: 300.0}, rate_source="host-b:2")
        assert admitted() == first  # 300 + 300 >= 500: the budget is used up
        store.tick_campaigns(now=t + 2, block_rates={digest: 300.0}, rate_source="host-a:1")
        assert admitted() == first
        # host-b stopped reporting: after its rate went stale, host-a alone is under.
        store.tick_campaigns(now=t + 8, block_rates={digest: 300.0}, rate_source="host-a:1")
        assert admitted() == first + 1
    finally:
        store.close()
