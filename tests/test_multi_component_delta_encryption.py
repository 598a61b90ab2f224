"""Multi-component releases (issue 13 §4) meet deltas and payload encryption (§2, §1).

A two-component release installs both images or neither; a delta (whose source is the
running slot's one image) or an encrypted payload of such a release is not supported,
so each is refused with one typed line wherever it can show up: when the release is
built, when it is published, and by the device (before any payload byte), rather than
half-supported (`core.payload_kind.check_multi_component_plain`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import cbor2
import evil_server
import pytest
from evil_server import make_rig, sign
from server_helpers import CLASS_A, VENDOR, cli, cli_ok, make_setup

from device_sim.agent import DeviceAgent, Outcome, RunResult
from device_sim.firmware import make_image
from device_sim.inprocess import InProcessServer, InProcessTransport
from otacoap.core import build, delta, encryption, ids, suit
from otacoap.core.errors import OtaError
from otacoap.fsutil import atomic_write
from otacoap.store import DataDir

KEK = bytes(range(16))
AUX_SLOT = 16 * 1024


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def multi_release(
    main: bytes, aux: bytes, seq: int, class_info: str = CLASS_A, vendor: str = VENDOR
) -> build.Release:
    return build.Release(
        sha(main),
        len(main),
        vendor,
        class_info,
        seq,
        more=(build.ComponentImage(sha(aux), len(aux)),),
    )


def a_delta_info(old: bytes, patch: bytes) -> delta.DeltaInfo:
    return delta.DeltaInfo(suit.SuitDigest.of(old), len(old), suit.SuitDigest.of(patch), len(patch))


def with_component1_params(manifest: bytes, extra: dict[int, Any]) -> bytes:
    """A two-component manifest whose install sets `extra` before component 1's fetch:
    what an author's own tooling (not core.build, which refuses it) could sign."""
    body = cbor2.loads(manifest)
    install = cbor2.loads(body[suit.M_INSTALL])
    # [set-index 0, override, fetch, match, set-index 1, override {uri}, fetch, match]
    i = next(
        n
        for n in range(0, len(install), 2)
        if install[n] == suit.CMD_SET_COMPONENT_INDEX and install[n + 1] == 1
    )
    assert install[i + 2] == suit.CMD_OVERRIDE_PARAMETERS
    install[i + 3] = {**install[i + 3], **extra}
    body[suit.M_INSTALL] = cbor2.dumps(install)
    return cbor2.dumps(body, canonical=True)


def encrypted_multi_manifest(release: build.Release, aux: bytes) -> bytes:
    info, _ = encryption.encrypt(aux, [encryption.KekRecipient(KEK)], os.urandom)
    raw = suit.encode_manifest(build.build_manifest(release))
    return with_component1_params(raw, {suit.P_ENCRYPTION_INFO: info})


# -- build ---------------------------------------------------------------------------


def test_build_refuses_a_delta_form_of_a_multi_component_release() -> None:
    main, aux = make_image(5_000, version=2), make_image(3_000, version=2, seed=3)
    info = a_delta_info(make_image(5_000, version=1), b"patch")
    with pytest.raises(OtaError, match="multi-component release cannot have a delta form"):
        build.build_manifest(multi_release(main, aux, 2), info)


def test_build_refuses_an_encrypted_multi_component_release() -> None:
    main, aux = make_image(5_000, version=2), make_image(3_000, version=2, seed=3)
    release = multi_release(main, aux, 2)
    info, _ = encryption.encrypt(main, [encryption.KekRecipient(KEK)], os.urandom)
    with pytest.raises(OtaError, match="encrypted multi-component release is not supported"):
        build.build_manifest(build.Release(**{**release.__dict__, "encryption_info": info}))


def test_manifest_build_refuses_delta_from_with_two_images(tmp_path: Path) -> None:
    old, main, aux = (tmp_path / n for n in ("old.bin", "main.bin", "aux.bin"))
    atomic_write(old, make_image(5_000, version=1))
    atomic_write(main, make_image(5_000, version=2))
    atomic_write(aux, make_image(3_000, version=2, seed=3))
    out = tmp_path / "r.suit"
    done = cli(
        "manifest", "build", "--image", main, "--image", aux, "--vendor-domain", VENDOR,
        "--class-info", CLASS_A, "--seq", "2", "--delta-from", old, "-o", out,
    )  # fmt: skip
    assert done.code != 0 and len(done.err.strip().splitlines()) == 1, done.err
    assert "multi-component" in done.err and "Traceback" not in done.err
    assert not out.exists() and not (tmp_path / "r.suit.patch").exists()


# -- publish -------------------------------------------------------------------------


def test_publish_refuses_an_encrypted_multi_component_release(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    main, aux = make_image(5_000, version=2), make_image(3_000, version=2, seed=3)
    env = tmp_path / "r.suit"
    atomic_write(env, sign(encrypted_multi_manifest(multi_release(main, aux, 2), aux), setup.key))
    paths = [tmp_path / "main.bin", tmp_path / "aux.bin"]
    atomic_write(paths[0], main)
    atomic_write(paths[1], aux)
    done = cli("publish", "--data", setup.data, env, *paths)
    assert done.code != 0 and len(done.err.strip().splitlines()) == 1, done.err
    assert "multi-component release cannot have an encrypted payload" in done.err
    store = DataDir(setup.data).open_store()
    try:
        assert store.list_releases(current_only=False) == []
    finally:
        store.close()


def test_publish_refuses_a_delta_of_a_multi_component_release(tmp_path: Path) -> None:
    """The release itself is published; its --delta is refused, one line, not stored."""
    setup = make_setup(tmp_path)
    main, aux = make_image(5_000, version=2), make_image(3_000, version=2, seed=3)
    old = make_image(5_000, version=1)
    env = tmp_path / "r.suit"
    atomic_write(env, suit.encode_envelope(build.build_envelope(
        multi_release(main, aux, 2, CLASS_A), setup.key
    )))  # fmt: skip
    # A (single-component) delta envelope whose result is component 0's image.
    patch = b"never applied: refused before"
    single = build.Release(sha(main), len(main), VENDOR, CLASS_A, 2)
    denv, patch_path = tmp_path / "d.suit", tmp_path / "d.patch"
    envelope = build.build_envelope(single, setup.key, patch=a_delta_info(old, patch))
    atomic_write(denv, suit.encode_envelope(envelope))
    atomic_write(patch_path, patch)
    paths = [tmp_path / "main.bin", tmp_path / "aux.bin"]
    atomic_write(paths[0], main)
    atomic_write(paths[1], aux)
    done = cli("publish", "--data", setup.data, env, *paths, "--delta", denv, patch_path)
    assert done.code != 0 and len(done.err.strip().splitlines()) == 1, done.err
    assert "multi-component release cannot have a delta" in done.err
    # ... and the delta envelope alone (as ENVELOPE) the same way
    done = cli("publish", "--data", setup.data, denv, patch_path)
    assert done.code != 0 and "multi-component release cannot have a delta" in done.err
    assert "release list" not in done.err
    out = cli_ok("release", "list", "--data", setup.data)
    assert "seq 2" in out or " 2 " in out
    store = DataDir(setup.data).open_store()
    try:
        (release,) = store.list_releases(current_only=False)
        assert [i.digest for i in release.more_images] == [sha(aux)]
        assert not store.image_referenced(sha(patch))
    finally:
        store.close()


# -- device --------------------------------------------------------------------------


async def run_in_process(path: Path, server: InProcessServer) -> RunResult:
    device = DeviceAgent(path, "coaps://in-process", transport=InProcessTransport(server))
    try:
        return await device.run_once()
    finally:
        await device.close()


@pytest.mark.parametrize("kind", ["encrypted", "delta"])
def test_a_two_component_device_refuses_a_delta_or_encrypted_two_component_release(
    tmp_path: Path, kind: str
) -> None:
    """Refused before any payload byte: one rejected report, the running pair intact."""
    rig = make_rig(
        tmp_path, seq=5, slot_size=32 * 1024, aux_slot_size=AUX_SLOT, decryption_keks=(KEK,)
    )
    main, aux = make_image(8_000, version=6), make_image(4_000, version=6, seed=3)
    release = multi_release(main, aux, 6, evil_server.CLASS, evil_server.VENDOR)
    if kind == "encrypted":
        raw = encrypted_multi_manifest(release, aux)
    else:
        raw = with_component1_params(
            suit.encode_manifest(build.build_manifest(release)),
            dict(a_delta_info(rig.factory_aux, b"patch").parameters()),
        )
    server = InProcessServer(envelope=sign(raw, rig.key))
    server.add_image(ids.image_uri(sha(main)), main)
    server.add_image(ids.image_uri(sha(aux)), aux)
    fetched: list[str] = []
    server.on_request = lambda path, b2: fetched.append(path)
    pristine = rig.path.read_bytes()
    result = asyncio.run(run_in_process(rig.path, server))
    assert result.outcome == Outcome.REJECTED, result
    want = "an encrypted payload" if kind == "encrypted" else "a delta payload"
    assert f"multi-component release cannot have {want}" in result.detail
    assert [r.state.value for r in server.reports] == ["rejected"]
    assert not any("/fw/" in p for p in fetched)
    for area in ("slot0", "aux0", "envelope0"):
        start, length = rig.area(area)
        assert rig.path.read_bytes()[start : start + length] == pristine[start : start + length]
