"""A notification storm on /m cannot wear out the device's flash.

Found against the old code: a hostile server sending about 200 Observe notifications per
second (each an older genuine envelope) drove about 170 manifest checks and 170 state
record writes per second in `run --watch`. On NOR flash with ~100,000 erase cycles that
is minutes of life. Now notifications only ask for a check, `CheckPacer` decides when it
may start, and an envelope refused once is neither fetched for a notification nor
verified and reported again.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiocoap.numbers.codes import Code
from evil_server import FAST, EvilServer, Rig, Script, _content, honest_block, make_rig, release
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.agent import DeviceAgent, Outcome
from device_sim.device_state import StateFile
from device_sim.firmware import make_image
from device_sim.layout import open_flash
from otacoap.core.check_pacing import CheckPacer, PacingConfig

STORM_RATE = 200.0  # notifications per second
STORM_SECONDS = 3.0


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout)

    asyncio.run(bounded())


class StormServer(EvilServer):
    """EvilServer whose /m is observable and notifies STORM_RATE times a second."""

    def __init__(self, envelopes: list[bytes], **kw: Any) -> None:
        super().__init__(**kw)
        self.envelopes = envelopes
        self.notifications = 0
        self.checks = 0  # plain GETs of /m (not registrations)
        self._tasks: list[asyncio.Task[None]] = []

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        path = "/" + "/".join(request.opt.uri_path)
        if path != "/m" or request.opt.observe != 0:
            if path == "/m":
                self.checks += 1
            await super().render_to_pipe(pipe)
            return
        first = self._note(0)
        pipe.add_response(first, is_last=False)
        self._tasks.append(asyncio.create_task(self._storm(pipe)))

    def _note(self, n: int) -> Any:
        envelope = self.envelopes[n % len(self.envelopes)]
        self.script.envelope = envelope  # what a GET of /m now returns too
        payload, opt = honest_block(envelope, 0, 6)
        msg = _content(payload, opt, len(envelope), envelope[-8:])
        msg.opt.observe = n
        return msg

    async def _storm(self, pipe: Any) -> None:
        n = 0
        end = asyncio.get_running_loop().time() + STORM_SECONDS + 2
        while asyncio.get_running_loop().time() < end:  # bounded in time
            await asyncio.sleep(1 / STORM_RATE)
            n += 1
            pipe.add_response(self._note(n), is_last=False)
            self.notifications += 1

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await super().stop()


def state_writes(rig: Rig) -> int:
    """The state store's record counter: +1 per save, whatever the save held."""
    flash, identity = open_flash(rig.path)
    try:
        loaded = StateFile(flash, identity.layout).store.load()
        assert loaded is not None
        return loaded[0]
    finally:
        flash.close()


def older_envelopes(rig: Rig, count: int) -> list[bytes]:
    """Genuine envelopes, signed by the real author, all older than the device's seq 5."""
    return [
        release(rig.key, make_image(1500, version=1 + i % 4, seed=i), 1 + i % 4)[0]
        for i in range(count)
    ]


PACING = PacingConfig(min_gap=0.25, max_gap=2.0)


async def storm(
    rig: Rig, envelopes: list[bytes], report_code: Code = Code.SERVICE_UNAVAILABLE
) -> tuple[StormServer, list[Outcome], int]:
    script = Script(report_code=report_code)  # 5.03 (the default): reports stay queued
    config = replace(FAST, poll_interval=60.0, pacing=PACING)
    before = state_writes(rig)
    async with StormServer(envelopes, script=script) as server:
        script.envelope = envelopes[0]
        device = DeviceAgent(rig.path, server.base_uri, config=config)
        try:
            results = await device.watch(max_time=STORM_SECONDS)
        finally:
            await device.close()
    return server, [r.outcome for r in results], state_writes(rig) - before


@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_storm_of_changing_refused_envelopes_is_paced(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, seq=5)
    box: dict[str, Any] = {}

    async def go() -> None:
        box["server"], box["outcomes"], box["writes"] = await storm(rig, older_envelopes(rig, 24))

    run(go)
    server, outcomes, writes = box["server"], box["outcomes"], box["writes"]
    assert server.notifications >= 100, "the storm did not happen"
    assert set(outcomes) == {Outcome.REJECTED}
    bound = CheckPacer.max_checks(PACING, STORM_SECONDS)
    assert len(outcomes) <= bound and server.checks <= bound + 1
    # A refusal writes its report once; a flush that the server answers 5.03 writes
    # nothing. So at most one state write per check.
    assert writes <= len(outcomes), (writes, len(outcomes))
    assert rig.boots()[1] == rig.boots()[1]


@pytest.mark.network
@pytest.mark.timeout(60)
def test_the_same_refused_envelope_is_not_fetched_verified_or_reported_again(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, seq=5)
    box: dict[str, Any] = {}

    async def go() -> None:
        box["server"], box["outcomes"], box["writes"] = await storm(rig, older_envelopes(rig, 1))

    run(go)
    server, outcomes, writes = box["server"], box["outcomes"], box["writes"]
    assert server.notifications >= 100, "the storm did not happen"
    assert outcomes == [Outcome.REJECTED], "one check, then every notification ignored"
    assert server.checks == 1
    assert writes == 1, "one report for one refusal"


@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_storm_from_a_server_that_takes_every_report_costs_two_writes_a_check(
    tmp_path: Path,
) -> None:
    """The other server behaviour: every report answered 2.04. Each refusal is saved
    with its report, and the flush that follows saves the emptied outbox: two state
    writes per check at most, so with the pacer's bound on checks the writes per hour
    are bounded whether the server keeps reports queued or takes them."""
    rig = make_rig(tmp_path, seq=5)
    box: dict[str, Any] = {}

    async def go() -> None:
        box["server"], box["outcomes"], box["writes"] = await storm(
            rig, older_envelopes(rig, 24), Code.CHANGED
        )

    run(go)
    server, outcomes, writes = box["server"], box["outcomes"], box["writes"]
    assert server.notifications >= 100, "the storm did not happen"
    assert set(outcomes) == {Outcome.REJECTED}
    assert len(outcomes) <= CheckPacer.max_checks(PACING, STORM_SECONDS)
    assert len(server.reports) == len(outcomes), "every refusal reported, once"
    assert writes <= 2 * len(outcomes), (writes, len(outcomes))


# -- the pacer itself, under any server behaviour ----------------------------------------------


def simulate(
    config: PacingConfig, notes: list[float], good: list[bool], horizon: float
) -> list[float]:
    """Check starts of a device that checks as soon as the pacer lets a notification in."""
    pacer = CheckPacer(config)
    starts: list[float] = []
    pending = sorted(notes)
    now, i = 0.0, 0
    while True:
        # The next notification (or a poll at max_gap) asks; the pacer may delay it.
        ask = pending.pop(0) if pending else now + config.max_gap
        now = max(ask, pacer.earliest(), now)
        if now >= horizon:
            return starts
        pacer.started(now)
        starts.append(now)
        pacer.finished(good[i % len(good)] if good else False)
        i += 1
        pending = [t for t in pending if t > now]


@settings(max_examples=200, deadline=None)
@given(
    notes=st.lists(st.floats(0, 3600, allow_nan=False), max_size=300),
    good=st.lists(st.booleans(), max_size=50),
)
def test_checks_per_hour_are_bounded_whatever_the_server_does(
    notes: list[float], good: list[bool]
) -> None:
    config = PacingConfig()
    starts = simulate(config, notes, good, 3600.0)
    assert len(starts) <= CheckPacer.max_checks(config, 3600.0)
    assert all(b - a >= config.min_gap - 1e-9 for a, b in itertools.pairwise(starts))


def test_a_server_that_keeps_checks_failing_gets_a_few_checks_an_hour() -> None:
    config = PacingConfig()
    flood = [i / 200 for i in range(200 * 3600)]  # 200 notifications/s for an hour
    starts = simulate(config, flood, [False], 3600.0)
    # 5, 10, ..., 640 s, then every 900 s: 8 doublings and the rest at the cap.
    doublings = math.ceil(math.log2(config.max_gap / config.min_gap))
    assert len(starts) <= doublings + 1 + math.ceil(3600 / config.max_gap)
    assert len(starts) <= 16
