"""Operator and server side of anchor rotation and freshness, end to end.

`otacoap anchors issue` (offline, root keys) -> `anchors publish` (checked like a
device checks, audited) -> the REAL server serves /a and signs /t with its freshness
key -> a device over DTLS rotates, refuses the revoked key, installs from the new one,
learns "no newer release" and reports the anchor version it holds (`anchors status`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from evil_server import FAST  # noqa: E402
from server_helpers import (  # noqa: E402
    CLASS_A,
    VENDOR,
    DeviceSpec,
    cli,
    cli_ok,
    coaps_client,
    get,
    make_image,
    make_setup,
    threaded_server,
)

from device_sim.agent import DeviceAgent, Outcome, RunResult  # noqa: E402
from device_sim.provision import provision  # noqa: E402
from otacoap.core import cose, ids, suit  # noqa: E402
from otacoap.core.build import Release, build_envelope  # noqa: E402
from otacoap.core.freshness import Freshness  # noqa: E402
from otacoap.fsutil import atomic_write  # noqa: E402
from otacoap.store import DataDir  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

DEVICE = "anchor-dev-1"
PSK = bytes.fromhex("00112233445566778899aabbccddeeff")


def keypair(base: Path, name: str, alg: str = "es256") -> tuple[Path, Path]:
    cli_ok("keygen", "--alg", alg, "--out", base / name)
    return base / name, base / f"{name}.pub"


def issue(base: Path, version: int, out: str, *extra: str | Path) -> Path:
    path = base / out
    cli_ok(
        "anchors", "issue", "--vendor-domain", VENDOR, "--class-info", CLASS_A,
        "--version", str(version), "-o", path, *extra,
    )  # fmt: skip
    return path


def test_cli_issue_publish_and_refusals(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec(DEVICE, CLASS_A, psk=PSK)])
    root, root_pub = keypair(tmp_path, "root")
    other, other_pub = keypair(tmp_path, "other", "ed25519")
    _, author_pub = keypair(tmp_path, "author2")
    l1 = issue(tmp_path, 1, "l1.cbor", "--root", root_pub, "--author", author_pub, "--sign", root)
    shown = cli_ok("anchors", "inspect", l1)
    assert "version: 1" in shown and cose.load_public_key(author_pub.read_bytes()).key_id in shown
    assert json.loads(cli_ok("anchors", "inspect", l1, "--json"))["version"] == 1
    assert "published anchor list version 1" in cli_ok(
        "anchors", "publish", "--data", setup.data, l1
    )

    # The same version again, a skipped one, and one signed only by a new root.
    again = cli("anchors", "publish", "--data", setup.data, l1)
    assert again.code != 0 and "not above" in again.err and "Traceback" not in again.err
    l3 = issue(tmp_path, 3, "l3.cbor", "--root", root_pub, "--author", author_pub, "--sign", root)
    skipped = cli("anchors", "publish", "--data", setup.data, l3)
    assert skipped.code != 0 and "skips" in skipped.err
    bad = issue(
        tmp_path, 2, "l2bad.cbor", "--root", other_pub, "--author", author_pub, "--sign", other
    )
    refused = cli("anchors", "publish", "--data", setup.data, bad)
    assert refused.code != 0 and "trusted roots" in refused.err
    # Root rotation signed by old and new roots: accepted.
    l2 = issue(
        tmp_path, 2, "l2.cbor", "--root", other_pub, "--author", author_pub,
        "--sign", root, "--sign", other,
    )  # fmt: skip
    cli_ok("anchors", "publish", "--data", setup.data, l2)
    listing = json.loads(cli_ok("anchors", "list", "--data", setup.data, "--json"))
    assert [r["version"] for r in listing] == [1, 2]
    audit = cli_ok("audit", "list", "--data", setup.data)
    assert "anchors.publish" in audit and "refused" in audit
    cli_ok("audit", "verify", "--data", setup.data)

    # issue refuses to write a list its own roots did not sign (devices would refuse it).
    orphan = cli(
        "anchors", "issue", "--vendor-domain", VENDOR, "--class-info", CLASS_A,
        "--version", "3", "--root", other_pub, "--author", author_pub, "--sign", root,
        "-o", tmp_path / "orphan.cbor",
    )  # fmt: skip
    assert orphan.code != 0 and "own roots" in orphan.err
    assert not (tmp_path / "orphan.cbor").exists()
    # A class without devices cannot get a list.
    stray = cli_ok(
        "anchors", "issue", "--vendor-domain", VENDOR, "--class-info", "nobody-here",
        "--version", "1", "--root", root_pub, "--author", author_pub, "--sign", root,
        "-o", tmp_path / "stray.cbor",
    )  # fmt: skip
    assert "wrote" in stray
    nobody = cli("anchors", "publish", "--data", setup.data, tmp_path / "stray.cbor")
    assert nobody.code != 0 and "no registered device" in nobody.err
    garbage = tmp_path / "garbage.cbor"
    atomic_write(garbage, b"\xa1\x00")
    junk = cli("anchors", "publish", "--data", setup.data, garbage)
    assert junk.code != 0 and "Traceback" not in junk.err


def test_rotation_and_freshness_through_the_real_server(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec(DEVICE, CLASS_A, psk=PSK)])
    root, root_pub = keypair(tmp_path, "root")
    new_author, new_author_pub = keypair(tmp_path, "author2", "ed25519")
    fresh_pub = tmp_path / "fresh.pub"
    assert "key id" in cli_ok("anchors", "freshness-key", "--data", setup.data, "--out", fresh_pub)
    again = cli("anchors", "freshness-key", "--data", setup.data)
    assert again.code != 0 and "exists" in again.err

    factory = setup.release(CLASS_A, 1, make_image("factory", 3000))
    flash = tmp_path / "device.flash"
    provision(
        flash,
        device_id=DEVICE,
        psk=PSK,
        vendor_domain=VENDOR,
        class_info=CLASS_A,
        anchors_pem=(setup.key_pub.read_bytes(),),
        roots_pem=(root_pub.read_bytes(),),
        factory_image=factory.image,
        factory_envelope=factory.envelope,
        slot_size=64 * 1024,
    )
    # Version 1 revokes the provisioned author key and names the freshness key.
    l1 = issue(
        tmp_path, 1, "l1.cbor", "--root", root_pub, "--author", new_author_pub,
        "--freshness-key", fresh_pub, "--sign", root,
    )  # fmt: skip
    # Published while the old key was current; list 1 revokes that key afterwards.
    setup.publish(setup.release(CLASS_A, 2, make_image("v2", 5000)))
    cli_ok("anchors", "publish", "--data", setup.data, l1)
    # From now on the publisher refuses what devices would refuse: the revoked key.
    late = setup.release(CLASS_A, 3, make_image("late", 5000))
    refused = cli("publish", "--data", setup.data, late.envelope_path, late.image_path)
    assert refused.code != 0 and "not an author" in refused.err

    def run(uri: str) -> RunResult:
        async def go() -> RunResult:
            device = DeviceAgent(flash, uri, config=FAST)
            try:
                return await device.run_once()
            finally:
                await device.close()

        return asyncio.run(asyncio.wait_for(go(), 60))

    with threaded_server(setup.data) as server:
        first = run(server.uri)
        assert first.outcome == Outcome.REJECTED, first
        cli_ok("trust", "add", "--data", setup.data, new_author_pub)
        key = cose.load_private_key(new_author.read_bytes())
        setup.publish(setup.release(CLASS_A, 3, make_image("v3", 5000), key=key))
        server.call(server.server.view.refresh)  # do not wait for the store poll
        second = run(server.uri)
        assert second.outcome == Outcome.UPDATED and second.sequence_number == 3, second
        third = run(server.uri)
        assert third.outcome == Outcome.UP_TO_DATE and third.freshness == Freshness.FRESH

        # /a refuses malformed queries and operators; /t without a nonce is refused.
        async def probes() -> list[str]:
            async with coaps_client(server.port, DEVICE, PSK) as ctx:
                codes = []
                for path in ("/a", "/a?v=x", "/a?v=1&v=2", "/t", "/t?n=00", "/a?v=1"):
                    codes.append(str((await get(ctx, server.uri + path)).code))
                return codes

        codes = asyncio.run(asyncio.wait_for(probes(), 30))
        assert all(c.startswith("4.00") for c in codes[:5]), codes
        assert codes[5].startswith("4.04"), codes  # version 1 is the newest

    store = DataDir(setup.data).open_store()
    try:
        status = {s.device_id: s for s in store.anchor_status()}
        reports = store.list_reports(DEVICE, 100)
    finally:
        store.close()
    assert status[DEVICE].anchor_version == 1
    assert status[DEVICE].freshness == Freshness.FRESH
    assert "anchors-updated" in [r.state for r in reports]
    shown = cli_ok("anchors", "status", "--data", setup.data)
    status = json.loads(cli_ok("anchors", "status", "--data", setup.data, "--json"))
    assert {"device": DEVICE, "anchor_version": 1, "freshness": "fresh"} in status
    assert re.search(rf"(?m)^{DEVICE} +1 +fresh$", shown)


def test_device_cli_with_trusted_clock_refuses_an_expired_release(tmp_path: Path) -> None:
    """`device_sim run --trusted-clock` against the real server: expired -> rejected."""
    setup = make_setup(tmp_path, devices=[DeviceSpec(DEVICE, CLASS_A, psk=PSK)])
    _, root_pub = keypair(tmp_path, "root")
    factory = setup.release(CLASS_A, 1, make_image("factory", 3000))
    flash = tmp_path / "device.flash"
    provision(
        flash,
        device_id=DEVICE,
        psk=PSK,
        vendor_domain=VENDOR,
        class_info=CLASS_A,
        anchors_pem=(setup.key_pub.read_bytes(),),
        roots_pem=(root_pub.read_bytes(),),
        factory_image=factory.image,
        factory_envelope=factory.envelope,
        slot_size=64 * 1024,
    )
    image = make_image("v2", 4000)
    digest = hashlib.sha256(image).digest()
    release = Release(digest, len(image), VENDOR, CLASS_A, 2, ids.image_uri(digest))
    expired = replace(release, expires=int(time.time()) - 60)
    env_path, img_path = tmp_path / "v2.suit", tmp_path / "v2.bin"
    atomic_write(env_path, suit.encode_envelope(build_envelope(expired, setup.key)))
    atomic_write(img_path, image)
    cli_ok("publish", "--data", setup.data, env_path, img_path)
    root = Path(__file__).resolve().parent.parent
    with threaded_server(setup.data) as server:
        done = subprocess.run(
            [
                sys.executable, "-m", "device_sim", "run", "--flash", str(flash),
                "--server", server.uri, "--once", "--json", "--trusted-clock",
            ],
            capture_output=True, text=True, cwd=root, timeout=90,
        )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "rejected" and "expired" in result["detail"], result
    assert result["freshness"] == "expired"
