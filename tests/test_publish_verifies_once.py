"""A publish verifies the envelope's COSE signature exactly once (issue 9 §1).

The trust gate is two steps (otacoap.core.trust): `authenticate` verifies the
signature and parses, `admit` checks freshness, identity and local policy. The
publisher authenticates once and admits the result for its class, whether the
release comes from `otacoap publish` on the data directory or over the network
through /admin/release. Counting calls to the one verify function in
otacoap/core/cose.py proves it; the device's `trust.accept` still does both steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from delta_rig import synthetic_pair
from server_helpers import (
    CLASS_A,
    VENDOR,
    DeviceSpec,
    Setup,
    ThreadedServer,
    cli_ok,
    make_image,
    make_setup,
)

from otacoap.core import cose, trust
from otacoap.core.errors import RollbackError
from otacoap.fsutil import atomic_write
from otacoap.operator.client import RemoteRefused, publish
from otacoap.store import DataDir, Publisher


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    s = make_setup(tmp_path, devices=[DeviceSpec("t1")], operators=["ops"])
    s.publish(s.release(CLASS_A, 1, make_image("base", 3000)))
    return s


@pytest.fixture
def verifies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every call to cose.verify_block from now on, in this process."""
    return count_verifies(monkeypatch)


def count_verifies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real: Callable[..., cose.TrustAnchor] = cose.verify_block

    def counting(*args: Any, **kwargs: Any) -> cose.TrustAnchor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cose, "verify_block", counting)
    return calls


def test_a_local_publish_verifies_the_signature_once(setup: Setup, verifies: list[int]) -> None:
    rel = setup.release(CLASS_A, 2, make_image("two", 4000))
    d = DataDir(setup.data)
    store = d.open_store()
    try:
        release = Publisher(store, d.blobs, d.config().publish).publish_file(
            rel.envelope, rel.image_path, "test"
        )
    finally:
        store.close()
    assert release.sequence_number == 2
    assert len(verifies) == 1


def test_a_refused_local_publish_verifies_once_too(setup: Setup, verifies: list[int]) -> None:
    stale = setup.release(CLASS_A, 1, make_image("stale", 4000))
    d = DataDir(setup.data)
    store = d.open_store()
    try:
        with pytest.raises(RollbackError):
            Publisher(store, d.blobs, d.config().publish).publish_file(
                stale.envelope, stale.image_path, "test"
            )
    finally:
        store.close()
    assert len(verifies) == 1


@pytest.fixture
def server(setup: Setup) -> Iterator[ThreadedServer]:
    srv = ThreadedServer(setup.data)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.network
@pytest.mark.filterwarnings("ignore:DTLS module did not shut down")
def test_a_network_publish_verifies_the_signature_once(
    setup: Setup, server: ThreadedServer, verifies: list[int]
) -> None:
    rel = setup.release(CLASS_A, 2, make_image("two", 5000))
    stale = setup.release(CLASS_A, 2, make_image("again", 5000))

    async def go() -> str:
        return await publish(
            server.uri, "ops", setup.operators["ops"], rel.envelope, rel.image_path, timeout=10
        )

    assert "seq 2" in asyncio.run(go())
    assert len(verifies) == 1

    async def refused() -> str:
        return await publish(
            server.uri, "ops", setup.operators["ops"], stale.envelope, stale.image_path, timeout=10
        )

    with pytest.raises(RemoteRefused, match="current release"):
        asyncio.run(refused())
    assert len(verifies) == 2


def test_the_device_gate_is_authenticate_then_admit(setup: Setup, verifies: list[int]) -> None:
    rel = setup.release(CLASS_A, 2, make_image("two", 4000))
    policy = trust.TrustPolicy(anchors=(setup.key.public,))
    authentic = trust.authenticate(rel.envelope, policy)
    assert len(verifies) == 1
    assert trust.admit(authentic, policy) == trust.accept(rel.envelope, policy)
    assert len(verifies) == 2  # accept() verified again; admit() did not
    # Admitting under another trust set would launder a signature nobody checked.
    other = trust.TrustPolicy(anchors=(cose.generate_key("es256").public,))
    with pytest.raises(ValueError, match="anchors"):
        trust.admit(authentic, other)
    with pytest.raises(TypeError):
        trust.AuthenticatedManifest(  # type: ignore[call-arg]
            authentic.envelope, rel.envelope, setup.key.public, policy.anchors, (1, 1)
        )


def test_a_release_and_its_delta_are_verified_once_each(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`publish_file_any` authenticates each envelope once and tells a release from a
    delta by the authentic manifest; the delta's checks (`DeltaPublisher`) only admit."""
    cli_ok("keygen", "--out", tmp_path / "author")
    cli_ok("trust", "add", "--data", setup.data, tmp_path / "author.pub")
    old, new = synthetic_pair(20_000)
    old_bin, new_bin = tmp_path / "old.bin", tmp_path / "new.bin"
    atomic_write(old_bin, old)
    atomic_write(new_bin, new)

    def build(seq: int, out: str, *extra: str | Path) -> Path:
        cli_ok(
            "manifest", "build", "--image", new_bin if seq == 3 else old_bin,
            "--vendor-domain", VENDOR, "--class-info", CLASS_A, "--seq", str(seq),
            "--key", tmp_path / "author", "-o", tmp_path / out, *extra,
        )  # fmt: skip
        return tmp_path / out

    cli_ok("publish", "--data", setup.data, build(2, "v2.suit"), old_bin)
    full = build(3, "v3.suit")
    delta_env = build(3, "v3-from-v2.suit", "--delta-from", old_bin)
    calls = count_verifies(monkeypatch)  # from here on: the publish of both
    out = cli_ok(
        "publish", "--data", setup.data, full, new_bin,
        "--delta", delta_env, Path(f"{delta_env}.patch"),
    )  # fmt: skip
    assert "delta from" in out
    assert len(calls) == 2, "one verification for the release, one for its delta"
