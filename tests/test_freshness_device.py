"""A device telling "no newer release" from "I cannot learn whether there is one" (ATTACKS.md #8).

In process; the DTLS variant with the H1 evil server is in test_device_attacks.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from evil_server import Rig, make_rig, manifest_bytes, sign
from test_anchor_rotation_device import FAST, OLD, ROOT, anchors

from device_sim.agent import DeviceAgent, Outcome, RunResult
from device_sim.firmware import make_image
from device_sim.inprocess import InProcessServer, InProcessTransport
from otacoap.core import cbor, cose, freshness, ids
from otacoap.core.errors import ReportReason
from otacoap.core.freshness import Freshness, Statement

FRESH_KEY = cose.generate_key("es256")
VENDOR = ids.vendor_id("acme.example")
CLASS = ids.class_id(VENDOR, "thermostat-t1")


def statement_for(
    sequence: int, anchor_version: int = 1, key: cose.SigningKey = FRESH_KEY
) -> Callable[[bytes], bytes]:
    def answer(nonce: bytes) -> bytes:
        return freshness.sign_statement(
            Statement(nonce, VENDOR, CLASS, sequence, anchor_version, 1), key
        )

    return answer


def setup(tmp: Path, fresh: Callable[[bytes], bytes | None] | None) -> tuple[Rig, InProcessServer]:
    rig = make_rig(tmp, seq=5, key=OLD, roots=(ROOT,))
    server = InProcessServer(
        anchor_lists={1: anchors(1, [OLD], freshness=[FRESH_KEY])}, freshness=fresh
    )
    return rig, server


def runs(rig: Rig, server: InProcessServer, n: int = 1, **kw: object) -> list[RunResult]:
    async def go() -> list[RunResult]:
        device = DeviceAgent(
            rig.path,
            "coaps://in-process",
            transport=InProcessTransport(server),
            **kw,  # type: ignore[arg-type]
        )
        try:
            return [await device.run_once() for _ in range(n)]
        finally:
            await device.close()

    return asyncio.run(go())


def freshness_reports(server: InProcessServer) -> list[int | None]:
    return [r.freshness for r in server.reports if r.freshness is not None]


def test_fresh_statement_means_no_newer_release(tmp_path: Path) -> None:
    rig, server = setup(tmp_path, statement_for(5))
    results = runs(rig, server, 3, config=FAST)
    assert [r.freshness for r in results] == [Freshness.FRESH] * 3
    assert server.freshness_requests == 3
    # Reported once, when it changed: not a flash write per poll.
    assert freshness_reports(server) == [Freshness.FRESH]
    last = next(r for r in server.reports if r.freshness is not None)
    assert last.reason == ReportReason.OK and last.anchor_version == 1


def test_frozen_manifest_is_detected_as_stale(tmp_path: Path) -> None:
    """The server vouches, now, that seq 9 exists, yet /m serves nothing newer."""
    rig, server = setup(tmp_path, statement_for(9))
    server.envelope = None  # /m: no release for this device
    (result,) = runs(rig, server, config=FAST)
    assert result.outcome == Outcome.UP_TO_DATE and result.freshness == Freshness.STALE
    alarm = server.reports[-1]
    assert alarm.freshness == Freshness.STALE
    assert alarm.reason == ReportReason.CONDITION_FAILED and "sequence 9" in alarm.detail


def test_withheld_anchor_list_is_detected_as_stale(tmp_path: Path) -> None:
    """A revocation the server hides (/a stops at 1) while it vouches for version 2."""
    rig, server = setup(tmp_path, statement_for(5, anchor_version=2))
    (result,) = runs(rig, server, config=FAST)
    assert result.freshness == Freshness.STALE


def test_replayed_statement_gives_no_freshness(tmp_path: Path) -> None:
    """An old statement (bound to another nonce) proves nothing: 'cannot learn'."""
    captured = statement_for(5)(b"\x01" * 16)
    rig, server = setup(tmp_path, lambda nonce: captured)
    (result,) = runs(rig, server, config=FAST)
    assert result.freshness == Freshness.UNKNOWN
    assert server.reports[-1].freshness == Freshness.UNKNOWN
    assert "nonce" in server.reports[-1].detail


def test_statement_signed_by_an_author_key_is_not_freshness(tmp_path: Path) -> None:
    rig, server = setup(tmp_path, statement_for(5, key=OLD))
    (result,) = runs(rig, server, config=FAST)
    assert result.freshness == Freshness.UNKNOWN


def test_server_without_freshness_key_gives_unknown(tmp_path: Path) -> None:
    rig, server = setup(tmp_path, None)
    (result,) = runs(rig, server, config=FAST)
    assert result.freshness == Freshness.UNKNOWN


def test_list_without_freshness_keys_asks_nothing(tmp_path: Path) -> None:
    rig, server = setup(tmp_path, statement_for(5))
    server.anchor_lists = {1: anchors(1, [OLD])}
    (result,) = runs(rig, server, config=FAST)
    assert result.freshness == Freshness.UNKNOWN and server.freshness_requests == 0


def test_freshness_outcome_change_is_reported_again(tmp_path: Path) -> None:
    rig, server = setup(tmp_path, statement_for(5))
    runs(rig, server, 2, config=FAST)
    server.freshness = None  # the freshness service goes away
    runs(rig, server, 2, config=FAST)
    server.freshness = statement_for(5)
    runs(rig, server, config=FAST)
    assert freshness_reports(server) == [Freshness.FRESH, Freshness.UNKNOWN, Freshness.FRESH]


def _expiring(rig: Rig, server: InProcessServer, expires: int) -> None:
    image = make_image(5000, version=6, seed=6)
    raw = cbor.loads(manifest_bytes(image=image, seq=6))
    raw[freshness.M_EXPIRES] = expires
    server.envelope = sign(cbor.dumps(raw), OLD)
    server.add_image(ids.image_uri(hashlib.sha256(image).digest()), image)


def test_device_with_clock_refuses_expired_manifest_and_raises_the_alarm(
    tmp_path: Path,
) -> None:
    rig, server = setup(tmp_path, statement_for(6))
    _expiring(rig, server, expires=1_000_000)
    config = replace(FAST, trusted_time=lambda: 2_000_000.0)
    (result,) = runs(rig, server, config=config)
    assert result.outcome == Outcome.REJECTED and result.freshness == Freshness.EXPIRED
    assert rig.info()["sequence_number"] == 5
    alarm = server.reports[-1]
    assert alarm.freshness == Freshness.EXPIRED and "no fresh update information" in alarm.detail
    assert any(r.state.value == "rejected" and "expired" in r.detail for r in server.reports)


def test_device_with_clock_accepts_unexpired_manifest(tmp_path: Path) -> None:
    rig, server = setup(tmp_path, statement_for(6))
    _expiring(rig, server, expires=3_000_000)
    config = replace(FAST, trusted_time=lambda: 2_000_000.0)
    (result,) = runs(rig, server, config=config)
    assert result.outcome == Outcome.UPDATED


def test_device_without_clock_cannot_enforce_expiry(tmp_path: Path) -> None:
    rig, server = setup(tmp_path, statement_for(6))
    _expiring(rig, server, expires=1)
    (result,) = runs(rig, server, config=FAST)
    assert result.outcome == Outcome.UPDATED
