"""PostgreSQL restarted in the middle of a rollout (issue 14 §3), with a REAL PostgreSQL
(tests/pg_server.py, a cluster of this module's own: it is stopped and started again)
and real DTLS devices (device_sim agents against `otacoap serve`).

While the store is down the server answers what needs it with 5.03 and Max-Age
(RFC 7252 §5.9.3.4), keeps serving what its caches hold, never acknowledges a report it
has not committed, and comes back by itself when PostgreSQL does: every device then
completes, every report the server acknowledged is in the store, and the audit chain
verifies. The store-level tests pin the connection's own behaviour (store/postgres.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

import aiocoap  # noqa: E402
from aiocoap.numbers.codes import Code  # noqa: E402
from server_helpers import (  # noqa: E402
    CLASS_A,
    CLASS_B,
    VENDOR,
    DeviceSpec,
    Setup,
    cli,
    cli_ok,
    coaps_client,
    make_image,
    make_setup,
    request,
    running_server,
)

from device_sim.agent import DeviceAgent, Outcome, RunResult  # noqa: E402
from device_sim.provision import inspect, provision  # noqa: E402
from device_sim.transport import Response  # noqa: E402
from otacoap.core import protocol  # noqa: E402
from otacoap.core.campaign import MemberState  # noqa: E402
from otacoap.core.coap_numbers import CHANGED, SERVICE_UNAVAILABLE  # noqa: E402
from otacoap.core.report import Report, State, decode_report  # noqa: E402
from otacoap.store import DataDir  # noqa: E402
from otacoap.store.errors import STORE_RETRY_AFTER, StoreUnavailable  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROLLOUT = [f"roll-{i}" for i in range(6)]
EARLY = ROLLOUT[:4]  # start before the outage; the others start during it
PROBE = "probe-1"  # a CLASS_B device (no release): posts reports by hand
REPORT_URI = "/" + "/".join(protocol.PATH_REPORT)


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    """A PostgreSQL cluster for this module alone: the tests stop and restart it."""
    from pg_server import running_server as running_pg

    with running_pg() as server:
        yield server


@pytest.fixture
def db_url(pg: Any) -> str:
    """A fresh database, on a running cluster (a failed test may have left it stopped)."""
    try:
        pg._run(str(pg.bindir / "pg_ctl"), "status", "-D", str(pg.data))
    except RuntimeError:
        pg.launch()
    return str(pg.new_database())


# --- the store's connection -----------------------------------------------------------


def test_lost_connection_is_unavailable_then_reestablished_by_itself(
    tmp_path: Path, pg: Any, db_url: str
) -> None:
    setup = make_setup(tmp_path, store_url=db_url)
    store = DataDir(setup.data).open_store()
    try:
        assert store.get_device("nobody") is None and store.reconnections() == 0
        pg.stop("fast", check=True)
        # Detected and typed: 5.03 with Max-Age on the wire, one line for the CLI.
        with pytest.raises(StoreUnavailable) as lost:
            store.get_device("nobody")
        assert lost.value.coap_code == SERVICE_UNAVAILABLE
        assert lost.value.coap_options() == ((14, STORE_RETRY_AFTER),)  # Max-Age
        assert "\n" not in str(lost.value)
        with pytest.raises(StoreUnavailable):  # a write: nothing done
            store.add_device("late-1", "example.com", CLASS_A, b"k" * 16, "test")
        # While it is down, calls between two attempts fail at once (bounded backoff).
        started = time.monotonic()
        for _ in range(50):
            with pytest.raises(StoreUnavailable):
                store.list_devices()
        assert time.monotonic() - started < 5.0
        pg.launch()
        # Back without anyone reconnecting by hand: the next call after the backoff.
        deadline = time.monotonic() + 30
        while True:
            try:
                store.add_device("late-1", "example.com", CLASS_A, b"k" * 16, "test")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not come back"
                time.sleep(0.2)
        assert store.reconnections() == 1
        assert [d.id for d in store.list_devices()] == ["late-1"]
        store.verify_audit()
    finally:
        store.close()


def test_a_write_cut_by_the_restart_is_not_half_done(tmp_path: Path, pg: Any, db_url: str) -> None:
    """A transaction whose session dies is rolled back whole by PostgreSQL; the store's
    ROLLBACK on the dead connection is a no-op, so the caller sees StoreUnavailable."""
    setup = make_setup(tmp_path, store_url=db_url)
    store = DataDir(setup.data).open_store()
    try:
        before = store.generations()
        with pytest.raises(StoreUnavailable), store._tx() as db:
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'principal_generation'")
            pg.stop("immediate", check=True)  # like a crash: no checkpoint
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'release_generation'")
        pg.launch()
        assert store.reconnect(), (store._pg.lost, (pg.root / "server.log").read_text()[-3000:])
        assert store.generations() == before
        store.verify_audit()
    finally:
        store.close()


def test_an_event_loop_thread_never_reconnects_inline(tmp_path: Path, pg: Any, db_url: str) -> None:
    """The server's reader runs on the event loop: a connect there could block every
    session, so it raises until reconnect() (the poll, from a worker thread) succeeds."""
    setup = make_setup(tmp_path, store_url=db_url)
    store = DataDir(setup.data).open_store()
    try:
        pg.stop("fast", check=True)
        pg.launch()

        async def on_loop() -> None:
            for _ in range(3):
                with pytest.raises(StoreUnavailable):
                    store.get_device("nobody")
            assert await asyncio.to_thread(store.reconnect)
            assert store.get_device("nobody") is None

        asyncio.run(on_loop())
        assert store.reconnections() == 1
    finally:
        store.close()


# --- the rollout ------------------------------------------------------------------------


@dataclass
class Acks:
    """Every POST /r a device made, with the server's answer (what it acknowledged)."""

    acked: dict[str, list[Report]] = field(default_factory=dict)
    unavailable: dict[str, list[bytes]] = field(default_factory=dict)
    others: list[tuple[str, int]] = field(default_factory=list)
    blocks: int = 0
    blocks_in_outage: int = 0
    outage: bool = False


class RecordingTransport:
    """The device's real DTLS transport; records every report exchange and counts
    firmware blocks (it answers nothing itself)."""

    def __init__(self, device: str, inner: Any, acks: Acks) -> None:
        self._device = device
        self._inner = inner
        self._acks = acks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def base_uri(self) -> str:
        return str(self._inner.base_uri)

    async def get(self, path: str, *, block2: Any, timeout: float) -> Response:
        resp: Response = await self._inner.get(path, block2=block2, timeout=timeout)
        self._count(path, resp)
        return resp

    async def get_nonconfirmable(self, path: str, *, block2: Any, timeout: float) -> Response:
        resp: Response = await self._inner.get_nonconfirmable(path, block2=block2, timeout=timeout)
        self._count(path, resp)
        return resp

    def _count(self, path: str, resp: Response) -> None:
        if path.startswith("/fw/") and resp.successful:
            self._acks.blocks += 1
            if self._acks.outage:
                self._acks.blocks_in_outage += 1

    async def post(
        self, path: str, payload: bytes, *, content_format: int, timeout: float
    ) -> Response:
        resp: Response = await self._inner.post(
            path, payload, content_format=content_format, timeout=timeout
        )
        if resp.code == CHANGED:
            self._acks.acked.setdefault(self._device, []).append(decode_report(payload))
        elif resp.code == SERVICE_UNAVAILABLE:
            self._acks.unavailable.setdefault(self._device, []).append(payload)
        else:
            self._acks.others.append((self._device, resp.code))
        return resp


def _provision(setup: Setup, tmp_path: Path, device: str, factory: Any) -> Path:
    spec = setup.devices[device]
    flash = tmp_path / f"{device}.flash"
    provision(
        flash,
        device_id=device,
        psk=spec.psk,
        vendor_domain=spec.vendor_domain,
        class_info=spec.class_info,
        anchors_pem=(setup.key_pub.read_bytes(),),
        factory_image=factory.image,
        factory_envelope=factory.envelope,
        slot_size=512 * 1024,
    )
    return flash


async def _post_report(port: int, psk: bytes, report: Report) -> aiocoap.Message:
    """POST /r over a NEW DTLS session (a fresh handshake each time)."""
    async with coaps_client(port, PROBE, psk) as ctx:
        msg = aiocoap.Message(
            code=Code.POST,
            uri=f"coaps://127.0.0.1:{port}{REPORT_URI}",
            payload=report.encode(),
            content_format=protocol.CF_REPORT,
        )
        return await request(ctx, msg, timeout=30.0)


_HTTP = ("/health", "/metrics")


def _metrics_url(lines: list[str]) -> str:
    """The metrics address `serve` prints just after "listening on" (bounded wait)."""
    for _ in range(200):
        for line in list(lines):
            if m := re.match(r"metrics on (\S+)/metrics", line):
                return m.group(1)
        time.sleep(0.1)
    raise AssertionError(f"no metrics address in {lines}")


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _members_when_settled(setup: Setup, campaign: int, deadline: float) -> Any:
    """The campaign's members once none is pending or admitted (or at the deadline)."""
    store = DataDir(setup.data).open_store()
    try:
        while True:
            members = store.campaign_status(campaign).members
            busy = [m for m in members if m.state in (MemberState.PENDING, MemberState.ADMITTED)]
            if not busy or time.monotonic() > deadline:
                return members
            time.sleep(0.3)
    finally:
        store.close()


async def _drive(agent: DeviceAgent, deadline: float) -> RunResult | None:
    """Run the device until it runs sequence 2 with an empty outbox (or the deadline):
    what a device in the field does, checking again after every failed attempt."""
    while time.monotonic() < deadline:
        result = await agent.run_once()
        assert agent.agent is not None
        queued = len(agent.agent.load().reports)
        done = result.outcome in (Outcome.UPDATED, Outcome.UP_TO_DATE)
        if done and queued == 0 and result.sequence_number == 2:
            return result
        await asyncio.sleep(0.5)
    return None


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restart_mid_rollout_loses_no_acknowledged_report(
    tmp_path: Path, pg: Any, db_url: str, mode: str
) -> None:
    """`mode`: pg_ctl stop -m fast (sessions terminated, a clean shutdown) or immediate
    (like a crash: PostgreSQL recovers from its WAL when it starts again)."""
    specs = [DeviceSpec(d, CLASS_A) for d in ROLLOUT] + [DeviceSpec(PROBE, CLASS_B)]
    setup = make_setup(tmp_path, devices=specs, store_url=db_url)
    factory = setup.release(CLASS_A, 1, make_image("factory", 4000))
    setup.publish(factory)  # what every device runs today
    # The rollout: a campaign, three downloads at a time (admissions are store writes).
    v2 = setup.release(CLASS_A, 2, make_image("v2", 320 * 1024))
    cli_ok("publish", "--data", setup.data, "--rollout", "none", v2.envelope_path, v2.image_path)
    created = cli_ok(
        "campaign", "create", "--data", setup.data, f"{VENDOR}/{CLASS_A}:2", "--json",
        "--waves", "100%", "--max-downloads", "3",
    )  # fmt: skip
    campaign = int(json.loads(created)["id"])
    flashes = {d: _provision(setup, tmp_path, d, factory) for d in ROLLOUT}
    probe_psk = setup.devices[PROBE].psk
    acks = Acks()
    phases: dict[str, Any] = {}

    with running_server(setup.data, args=["--metrics", "127.0.0.1:0"]) as server:
        metrics = _metrics_url(server.lines)

        async def main() -> dict[str, RunResult | None]:
            deadline = time.monotonic() + 240
            agents: dict[str, DeviceAgent] = {}
            transports: list[Any] = []

            def start(device: str) -> asyncio.Task[RunResult | None]:
                from device_sim.coap import CoapTransport

                spec = setup.devices[device]
                inner = CoapTransport(server.uri, device, spec.psk)
                transports.append(inner)
                agent = agents[device] = DeviceAgent(
                    flashes[device],
                    server.uri,
                    transport=RecordingTransport(device, inner, acks),
                )
                return asyncio.create_task(_drive(agent, deadline), name=device)

            # The probe's first report is acknowledged; its PSK is now cached.
            first = await _post_report(server.port, probe_psk, Report(1, State.CHECKING))
            assert first.code == Code.CHANGED, first
            tasks = {d: start(d) for d in EARLY}
            # Mid-rollout: a device has reported that its download started.
            while not any(r.state == State.DOWNLOADING for rs in acks.acked.values() for r in rs):
                assert time.monotonic() < deadline, "no download started"
                await asyncio.sleep(0.05)
            phases["blocks_before_outage"] = acks.blocks
            await asyncio.to_thread(pg.stop, mode, check=True)
            acks.outage = True
            stopped = time.monotonic()
            # Devices that never handshook start now: their PSK is not cached, so their
            # handshakes fail (cleanly) until the store is back.
            tasks.update({d: start(d) for d in ROLLOUT if d not in EARLY})
            # A known device's new session (its PSK is cached) reaches /r: 5.03 Max-Age.
            asked = time.monotonic()
            during = await _post_report(server.port, probe_psk, Report(2, State.CHECKING))
            phases["during"] = (during.code, during.opt.max_age, during.payload)
            phases["during_seconds"] = time.monotonic() - asked
            # Health and metrics read the store: 503 while it is down (not a 500).
            phases["http"] = [await asyncio.to_thread(_http_status, metrics + p) for p in _HTTP]
            # A few seconds at least, and until a rollout device's report met the outage
            # (its download went on meanwhile, from the verified local image cache).
            while time.monotonic() - stopped < 6.0 or not acks.unavailable:
                if time.monotonic() - stopped > 90:
                    break
                await asyncio.sleep(0.2)
            await asyncio.to_thread(pg.launch)
            acks.outage = False
            phases["outage_seconds"] = time.monotonic() - stopped
            # The same report again, once the server is back: acknowledged now.
            for _ in range(60):
                again = await _post_report(server.port, probe_psk, Report(2, State.CHECKING))
                if again.code != Code.SERVICE_UNAVAILABLE:
                    break
                await asyncio.sleep(1.0)
            phases["after"] = again.code
            results = {d: await t for d, t in tasks.items()}
            for agent in agents.values():
                await agent.close()
            for inner in transports:
                await inner.close()
            return results

        results = asyncio.run(asyncio.wait_for(main(), 300))
        # The campaign's evaluation (a store write on the server) came back too: every
        # member's last report is counted a success within a few ticks.
        members = _members_when_settled(setup, campaign, time.monotonic() + 60)
        log = server.log()

    code, max_age, payload = phases["during"]
    assert code == Code.SERVICE_UNAVAILABLE, phases
    assert max_age is not None and max_age > 0, phases  # RFC 7252 §5.9.3.4
    assert b"postgresql" not in payload  # the cause stays in the server's log
    assert phases["during_seconds"] < 20, phases  # answered, not hung
    assert phases["http"] == [503, 503], phases
    assert phases["after"] == Code.CHANGED, phases
    assert all(r is not None for r in results.values()), (results, log[-3000:])
    # The devices' own exchanges: only 2.04 and 5.03 on /r, and every report that got
    # a 5.03 was kept and acknowledged later (device_sim keeps it in its outbox).
    assert acks.others == [], acks.others
    assert acks.unavailable, "no rollout device met the outage with a report"
    for device, bodies in acks.unavailable.items():
        later = {r.encode() for r in acks.acked.get(device, [])}
        for body in bodies:
            assert decode_report(body).encode() in later, (device, decode_report(body))

    # Every device runs v2, confirmed, with nothing left to send.
    for device, flash in flashes.items():
        info = inspect(flash)
        assert info["running_sequence_number"] == 2, (device, info)
        assert info["boot_status"] == "confirmed" and info["queued_reports"] == 0, info

    # Nothing the server acknowledged is missing from the store.
    store = DataDir(setup.data).open_store()
    try:
        for device, reports in [*acks.acked.items(), (PROBE, [Report(1, State.CHECKING)])]:
            stored = {(r.counter, r.state) for r in store.list_reports(device, 1000)}
            for r in reports:
                assert (r.counter, r.state.value) in stored, (device, r)
        probe_stored = sorted(r.counter for r in store.list_reports(PROBE, 10))
        assert probe_stored == [1, 2]
        for device in ROLLOUT:
            last = max(store.list_reports(device, 1000), key=lambda r: r.counter)
            assert last.state == "confirmed" and last.sequence_number == 2, (device, last)
        assert sorted(m.device_id for m in members) == ROLLOUT
        assert all(m.state == MemberState.SUCCEEDED for m in members), members
    finally:
        store.close()
    verified = cli("audit", "verify", "--data", setup.data)
    assert verified.code == 0, verified

    # The outage in the server's log: seen, announced once, recovered; no traceback.
    assert "Traceback" not in log, log[-4000:]
    assert log.count("requests that need it get 5.03") == 1, log[-4000:]
    assert "store available again" in log, log[-4000:]
    # A device whose PSK was not cached could not handshake during the outage (a clean
    # failure, logged in one line); it completed once the store was back.
    late = [d for d in ROLLOUT if d not in EARLY]
    assert any(f"PSK lookup for {d!r}: " in log for d in late), log[-4000:]
    print(
        f"outage {phases['outage_seconds']:.1f} s; blocks before {phases['blocks_before_outage']},"
        f" during {acks.blocks_in_outage}; 5.03 to devices: "
        f"{sum(len(b) for b in acks.unavailable.values())}"
    )


def test_the_server_view_treats_a_new_connection_as_everything_changed(
    tmp_path: Path, pg: Any, db_url: str
) -> None:
    """Commits made while the reader's connection was down were never seen by its
    caches: after the poll re-establishes it, every cache is dropped and every listener
    told, although the store's generations say nothing changed."""
    from otacoap.server.store_view import StoreView

    setup = make_setup(tmp_path, devices=[DeviceSpec("view-1", CLASS_A)], store_url=db_url)
    datadir = DataDir(setup.data)
    told: list[str] = []

    async def scenario() -> None:
        view = StoreView(datadir, datadir.config())
        view.on_principal_change(lambda: told.append("principal"))
        view.on_release_change(lambda: told.append("release"))
        poll = asyncio.create_task(view.poll())
        try:
            assert view.device("view-1") is not None  # cached from here on
            epoch = view.epoch
            await asyncio.to_thread(pg.stop, "fast", check=True)
            with pytest.raises(StoreUnavailable):  # not cached: the store is needed
                view.device("view-2")
            assert view.device("view-1") is not None  # cached: still served
            for _ in range(100):  # the poll notices the outage (bounded)
                if not view.store_available:
                    break
                await asyncio.sleep(0.1)
            assert not view.store_available
            await asyncio.to_thread(pg.launch)
            for _ in range(300):  # ... and brings the reader back by itself
                if view.store_available and told:
                    break
                await asyncio.sleep(0.1)
            assert view.store_available and sorted(told) == ["principal", "release"], told
            assert view.epoch == epoch + 1
            assert view.device("view-2") is None  # the store answers again
            assert await view.db(lambda s: s.get_device("view-1")) is not None  # writer too
        finally:
            poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poll
            await view.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))
