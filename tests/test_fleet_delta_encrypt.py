"""`python -m device_sim.fleet --delta` and `--encrypt` (issue 13 §5, last bullet):
small real fleets through the real server over DTLS on loopback.

`--delta`: the devices start on an old release the server knows they run (each checks
in with its running sequence number); the release carries a delta from it. Devices on
the old image must install by delta (only the patch on the air); devices picked by
`--delta-mismatch-fraction` run another image, fail the patch's source check and fall
back to the full image. Every device is still verified on flash (the release's image,
confirmed) and in the server's store (its "confirmed" report), and the server's
DOWNLOADED reports say the same as the devices' transports.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

server_helpers = pytest.importorskip("server_helpers", reason="tests/server_helpers.py missing")

from server_helpers import DeviceSpec, Setup, make_setup, python_m, running_server  # noqa: E402

from device_sim.fleet.preparation import evolve, image_bytes  # noqa: E402
from otacoap.core import ids  # noqa: E402
from otacoap.fsutil import atomic_write  # noqa: E402
from otacoap.store import DataDir  # noqa: E402


def _key_file(setup: Setup, base: Path) -> Path:
    path = base / "author.pem"
    atomic_write(path, setup.key.pem, mode=0o600)
    return path


def _fleet(*args: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    return python_m("device_sim.fleet", *args, timeout=timeout)


def _run_fleet(
    tmp_path: Path, setup: Setup, *args: str
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """`python -m device_sim.fleet` against a real server on `setup`'s data directory,
    signing with `setup`'s key: it must exit 0; its JSON report and the process."""
    key = _key_file(setup, tmp_path)
    out_json = tmp_path / "fleet.json"
    with running_server(setup.data) as server:
        done = _fleet(
            "--server", server.uri, "--key", str(key), *args, "--report", str(out_json)
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out_json.read_text()), done


def _operator_setup(tmp_path: Path, klass: str, prefix: str) -> tuple[Setup, list[str]]:
    """Four devices of class `klass` registered, an operator `ops`; and the fleet options
    that use those devices and publish as that operator over DTLS."""
    specs = [DeviceSpec(f"{prefix}-{i}", klass) for i in range(4)]
    setup = make_setup(tmp_path, devices=specs, operators=["ops"])
    devices_file = tmp_path / "devices.txt"
    devices_file.write_text("".join(f"{d.id} {d.psk.hex()}\n" for d in setup.devices.values()))
    return setup, [
        "--devices", "4", "--operator", "ops", "--operator-psk", setup.operators["ops"].hex(),
        "--devices-file", str(devices_file), "--class-info", klass,
        "--vendor-domain", specs[0].vendor_domain,
    ]  # fmt: skip


def _all_verified(report: dict[str, Any], n: int) -> list[dict[str, Any]]:
    assert report["completed"] == n, report["failure_reasons"]
    per = report["per_device"]
    assert len(per) == n
    for d in per:
        assert d["outcome"] == "updated", d
        assert d["flash_image_ok"] and d["flash_sequence"] == report["settings"]["release_seq"]
    return list(per)


# --------------------------------------------------------------------------- --delta


@pytest.mark.network
@pytest.mark.timeout(240)
def test_delta_fleet_installs_by_patch_and_mismatching_devices_fall_back(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    report, done = _run_fleet(
        tmp_path, setup, "--data", str(setup.data),
        "--devices", "8", "--image-size", "32K", "--concurrency", "8",
        "--processes", "2", "--timeout", "90", "--max-time", "150", "--seed", "7",
        "--delta", "--delta-mismatch-fraction", "0.25",
    )  # fmt: skip
    per = _all_verified(report, 8)
    assert all(d["server_confirmed"] for d in per)

    dx = report["settings"]["delta"]
    patch_size, image_size = dx["patch_size"], report["image_size"]
    assert 0 < patch_size < image_size // 4  # a small change makes a small patch
    odd = [d for d in per if d["mismatched"]]
    same = [d for d in per if not d["mismatched"]]
    assert len(odd) == 2 and len(same) == 6
    # Devices on the old image fetched only the patch; the others only the image.
    for d in same:
        assert d["payload"] == "delta" and d["patch_bytes"] == patch_size, d
        assert d["image_bytes"] == 0 and d["bytes"] == patch_size
    for d in odd:
        assert d["payload"] == "full" and d["image_bytes"] == image_size, d
        assert d["patch_bytes"] == 0
    summary = report["delta"]
    assert summary["installed_by_delta"] == 6 and summary["fell_back_to_full"] == 2
    assert summary["mismatched_devices"] == 2 and summary["mismatched_updated_by_full"] == 2
    assert summary["served_plain_envelope"] == 0  # every check-in reached the server first
    assert summary["fw_bytes_per_delta_device"] == patch_size
    assert summary["fw_bytes_per_full_device"] == image_size
    # The server heard the same from the devices' DOWNLOADED reports.
    assert report["server"]["downloaded_by_payload"] == {"delta": 6, "full": 2}
    assert all(d["server_payload"] == d["payload"] for d in per)
    assert "delta: 6 installed by delta" in done.stdout, done.stdout

    # The store holds the old release (the delta's source) and the delta of the new one.
    store = DataDir(setup.data).open_store()
    try:
        klass = report["settings"]["class_info"]
        releases = [
            r for r in store.list_releases(current_only=False) if r.class_label.endswith(klass)
        ]
        assert sorted(r.sequence_number for r in releases) == [1, 2]
        new = next(r for r in releases if r.sequence_number == 2)
        (d,) = store.deltas_of(new.id)
        assert d.patch.size == patch_size
        assert d.source_digest.hex() == dx["old_image_sha256"]
    finally:
        store.close()


@pytest.mark.network
@pytest.mark.timeout(240)
def test_delta_fleet_under_a_campaign_installs_by_patch(tmp_path: Path) -> None:
    """--delta with --campaign: waiting devices are served the old release (what they
    run); admitted ones get the delta envelope."""
    setup = make_setup(tmp_path)
    report, _ = _run_fleet(
        tmp_path, setup, "--data", str(setup.data),
        "--devices", "6", "--image-size", "16K", "--concurrency", "6",
        "--timeout", "90", "--max-time", "150", "--poll-interval", "0.5",
        "--campaign", "--waves 50%,100% --success-threshold 100%", "--delta",
    )  # fmt: skip
    per = _all_verified(report, 6)
    assert all(d["payload"] == "delta" and d["server_confirmed"] for d in per)
    assert report["campaign"]["state"] == "finished", report["campaign"]
    assert report["delta"]["installed_by_delta"] == 6


@pytest.mark.network
@pytest.mark.timeout(240)
def test_delta_fleet_from_a_given_old_image_over_the_operator_network_path(
    tmp_path: Path,
) -> None:
    """--old-image FILE and network publishing (--operator): the old release, the
    release and its delta are uploaded over DTLS; devices install by delta."""
    klass = "fleet-net-delta"
    setup, operator = _operator_setup(tmp_path, klass, "netdelta")
    old = tmp_path / "old.bin"
    old.write_bytes(image_bytes("a given old image", 20_000))
    report, _ = _run_fleet(
        tmp_path, setup, *operator, "--timeout", "90",
        "--delta", "--old-image", str(old),
    )  # fmt: skip
    per = _all_verified(report, 4)
    assert all(d["payload"] == "delta" for d in per)
    assert (
        report["settings"]["delta"]["old_image_sha256"]
        == hashlib.sha256(old.read_bytes()).hexdigest()
    )
    assert report["image_size"] == 20_000


@pytest.mark.network
@pytest.mark.timeout(240)
def test_delta_of_a_given_release_from_a_variant_of_it(tmp_path: Path) -> None:
    """--release ENVELOPE IMAGE --delta: the fleet signs a delta envelope for that
    release (same seq, same image) from a generated older variant of its image; the
    devices install the given image by patch."""
    from server_helpers import VENDOR

    setup = make_setup(tmp_path)
    klass = "fleet-given-delta"
    image = image_bytes("a given release", 12_000)
    release = setup.release(klass, 5, image)
    report, _ = _run_fleet(
        tmp_path, setup, "--data", str(setup.data),
        "--devices", "3", "--class-info", klass, "--vendor-domain", VENDOR,
        "--timeout", "90", "--delta",
        "--release", str(release.envelope_path), str(release.image_path),
    )  # fmt: skip
    per = _all_verified(report, 3)
    assert report["settings"]["release_seq"] == 5
    assert report["settings"]["image_sha256"] == hashlib.sha256(image).hexdigest()
    assert all(d["payload"] == "delta" and d["server_confirmed"] for d in per)
    assert report["settings"]["delta"]["old_image_sha256"] != report["settings"]["image_sha256"]


# --------------------------------------------------------------------------- --encrypt


@pytest.mark.network
@pytest.mark.timeout(240)
def test_encrypted_fleet_reports_encrypted_installs(tmp_path: Path) -> None:
    """--encrypt: every device decrypts (its DOWNLOADED report names the encrypted
    payload), ends on the plaintext image, and the report says the run was encrypted."""
    setup = make_setup(tmp_path)
    report, done = _run_fleet(
        tmp_path, setup, "--data", str(setup.data),
        "--devices", "6", "--image-size", "16K", "--concurrency", "6",
        "--timeout", "90", "--max-time", "150", "--encrypt",
    )  # fmt: skip
    per = _all_verified(report, 6)
    assert report["settings"]["encrypted"] is True
    assert "A128KW" in report["settings"]["encryption"]
    assert report["server"]["downloaded_by_payload"] == {"encrypted": 6}
    assert all(d["server_payload"] == "encrypted" and d["server_confirmed"] for d in per)
    assert "encrypted" in done.stdout


@pytest.mark.network
@pytest.mark.timeout(240)
def test_encrypted_fleet_over_the_operator_network_path(tmp_path: Path) -> None:
    """--encrypt with network publishing: the ciphertext is uploaded, the class key
    goes only into the devices' flash; every device ends on the plaintext image."""
    klass = "fleet-net-enc"
    setup, operator = _operator_setup(tmp_path, klass, "netenc")
    report, _ = _run_fleet(
        tmp_path, setup, *operator, "--image-size", "12K",
        "--timeout", "90", "--encrypt",
    )  # fmt: skip
    _all_verified(report, 4)
    assert report["settings"]["encrypted"] is True
    image_sha256 = report["settings"]["image_sha256"]
    blobs = [p.read_bytes() for p in (setup.data / "blobs").rglob("*") if p.is_file()]
    assert blobs and all(hashlib.sha256(b).hexdigest() != image_sha256 for b in blobs)
    store = DataDir(setup.data).open_store()
    try:
        for spec in setup.devices.values():
            details = [r.detail for r in store.list_reports(spec.id, 50) if r.state == "downloaded"]
            assert details and details[-1].startswith("payload encrypted"), details
    finally:
        store.close()


@pytest.mark.network
@pytest.mark.timeout(240)
def test_encrypted_fleet_under_a_campaign(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    report, _ = _run_fleet(
        tmp_path, setup, "--data", str(setup.data),
        "--devices", "4", "--image-size", "8K", "--concurrency", "4",
        "--timeout", "90", "--max-time", "150", "--poll-interval", "0.5",
        "--campaign", "--waves 50%,100% --success-threshold 100%", "--encrypt",
    )  # fmt: skip
    per = _all_verified(report, 4)
    assert report["campaign"]["state"] == "finished", report["campaign"]
    assert all(d["server_payload"] == "encrypted" for d in per)


# --------------------------------------------------------------------------- --delta --encrypt


def _no_plaintext_blob(data: Path, *sha256_hex: str) -> None:
    """The server holds ciphertext only: no stored blob is any of these plaintexts."""
    blobs = [p.read_bytes() for p in (data / "blobs").rglob("*") if p.is_file()]
    assert blobs
    assert not {hashlib.sha256(b).hexdigest() for b in blobs} & set(sha256_hex)


def _check_encrypted_delta_run(report: dict[str, Any], n: int, odd: int) -> list[dict[str, Any]]:
    """Devices on the old image fetched only the encrypted patch, the mismatched ones
    only the encrypted full image; all are verified on flash."""
    per = _all_verified(report, n)
    assert report["settings"]["encrypted"] is True
    dx = report["settings"]["delta"]
    patch_size, image_size = dx["patch_size"], report["image_size"]
    assert 0 < patch_size < image_size // 4  # A128CTR: the ciphertext is the patch's size
    same = [d for d in per if not d["mismatched"]]
    assert len(same) == n - odd
    for d in same:
        assert d["payload"] == "delta" and d["patch_bytes"] == patch_size, d
        assert d["image_bytes"] == 0
    for d in (d for d in per if d["mismatched"]):
        assert d["payload"] == "full" and d["image_bytes"] == image_size, d
        assert d["patch_bytes"] == 0
    summary = report["delta"]
    assert summary["installed_by_delta"] == n - odd and summary["fell_back_to_full"] == odd
    assert summary["mismatched_devices"] == odd == summary["mismatched_updated_by_full"]
    return per


@pytest.mark.network
@pytest.mark.timeout(240)
def test_encrypted_delta_fleet_installs_by_encrypted_patch_and_falls_back_encrypted(
    tmp_path: Path,
) -> None:
    """--delta --encrypt: the release, the old release and the patch are encrypted under
    the class key (the server stores ciphertext only); devices on the old image install
    by encrypted delta (their DOWNLOADED report says `delta+encrypted-a128ctr from
    <source>`), the mismatched one falls back to the encrypted full image."""
    setup = make_setup(tmp_path)
    report, done = _run_fleet(
        tmp_path, setup, "--data", str(setup.data),
        "--devices", "5", "--image-size", "16K", "--concurrency", "5",
        "--timeout", "90", "--max-time", "150", "--seed", "3",
        "--delta", "--delta-mismatch-fraction", "0.2", "--encrypt",
    )  # fmt: skip
    per = _check_encrypted_delta_run(report, 5, 1)
    assert all(d["server_confirmed"] for d in per)
    # The server heard it from the devices: the patch was decrypted, not a plain delta.
    assert report["server"]["downloaded_by_payload"] == {"encrypted delta": 4, "full": 1}
    for d in per:
        assert d["server_payload"] == ("full" if d["mismatched"] else "encrypted delta"), d
    assert "delta: 4 installed by encrypted delta" in done.stdout, done.stdout
    assert "fell back to the encrypted full image" in done.stdout, done.stdout

    dx = report["settings"]["delta"]
    store = DataDir(setup.data).open_store()
    try:
        for d in per:
            details = [
                r.detail
                for r in store.list_reports(d["device"], 50)
                if r.state == "downloaded" and r.sequence_number == 2
            ]
            want = (
                "full image (running image is not the patch's source)"
                if d["mismatched"]
                else f"delta+encrypted-a128ctr from {dx['old_image_sha256'][:16]}"
            )
            assert details == [want], (d["device"], details)
        klass = report["settings"]["class_info"]
        releases = [
            r for r in store.list_releases(current_only=False) if r.class_label.endswith(klass)
        ]
        assert sorted(r.sequence_number for r in releases) == [1, 2]
        new = next(r for r in releases if r.sequence_number == 2)
        (record,) = store.deltas_of(new.id)
        assert record.source_digest.hex() == dx["old_image_sha256"]
        assert dx["patch_uri"] == ids.image_uri(record.patch.digest)  # its ciphertext's id
    finally:
        store.close()
    _no_plaintext_blob(setup.data, report["settings"]["image_sha256"], dx["old_image_sha256"])


@pytest.mark.network
@pytest.mark.timeout(240)
def test_encrypted_delta_fleet_over_the_operator_network_path(tmp_path: Path) -> None:
    """--delta --encrypt with network publishing: the encrypted old release, the
    encrypted release and the encrypted patch are uploaded over DTLS (the server finds
    the patch by its URI's id); devices install by encrypted delta or fall back."""
    klass = "fleet-net-encdelta"
    setup, operator = _operator_setup(tmp_path, klass, "netencdelta")
    report, _ = _run_fleet(
        tmp_path, setup, *operator, "--image-size", "12K",
        "--timeout", "90", "--max-time", "150", "--delta",
        "--delta-mismatch-fraction", "0.25", "--encrypt",
    )  # fmt: skip
    per = _check_encrypted_delta_run(report, 4, 1)
    dx = report["settings"]["delta"]
    store = DataDir(setup.data).open_store()
    try:
        for d in per:
            details = [
                r.detail for r in store.list_reports(d["device"], 50) if r.state == "downloaded"
            ]
            assert details, d
            if d["mismatched"]:
                assert details[-1].startswith("full image"), details
            else:
                assert details[-1] == f"delta+encrypted-a128ctr from {dx['old_image_sha256'][:16]}"
    finally:
        store.close()
    _no_plaintext_blob(setup.data, report["settings"]["image_sha256"], dx["old_image_sha256"])


# --------------------------------------------------------------------------- refusals


def test_a_given_encrypted_release_is_refused_in_one_line(tmp_path: Path) -> None:
    """The fleet cannot provision devices with the key of a release it did not encrypt
    (nor encrypt a patch for its recipients): one line, before anything is registered."""
    import os

    from server_helpers import VENDOR

    from otacoap.core import build, encryption, suit

    setup = make_setup(tmp_path)
    key = _key_file(setup, tmp_path)
    image = image_bytes("given encrypted", 4000)
    info, ct = encryption.encrypt(
        image, [encryption.KekRecipient(os.urandom(16))], os.urandom, encryption.A128CTR
    )
    release = build.Release(
        hashlib.sha256(image).digest(), len(image), VENDOR, "fleet-given-enc", 3,
        ids.image_uri(hashlib.sha256(ct).digest()), encryption_info=info,
    )  # fmt: skip
    env = tmp_path / "rel.suit"
    env.write_bytes(suit.encode_envelope(build.build_envelope(release, setup.key)))
    img = tmp_path / "rel.bin"
    img.write_bytes(image)
    for extra in ([], ["--delta"]):
        done = _fleet(
            "--server", "coaps://127.0.0.1:1", "--data", str(setup.data), "--key", str(key),
            "--devices", "1", "--class-info", "fleet-given-enc", "--vendor-domain", VENDOR,
            "--release", str(env), str(img), *extra, timeout=60,
        )  # fmt: skip
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "--release is encrypted" in lines[0], done.stderr
    store = DataDir(setup.data).open_store()
    try:
        assert store.list_devices() == []  # nothing registered
    finally:
        store.close()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--old-image", "x.bin"], "need --delta"),
        (["--delta-mismatch-fraction", "0.5"], "need --delta"),
        (["--delta", "--old-image", "/nonexistent/old.bin"], "no such file"),
    ],
)
def test_unsupported_combinations_are_one_line_errors(
    tmp_path: Path, extra: list[str], needle: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    key = tmp_path / "k.pem"
    key.write_text("x")
    done = _fleet(
        "--server", "coaps://127.0.0.1:1", "--data", str(data), "--key", str(key),
        "--devices", "1", *extra, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


def test_evolve_changes_a_little_and_keeps_the_size() -> None:
    old = image_bytes("evolve", 65536)
    new = evolve(old, "next")
    assert len(new) == len(old) and new != old
    assert evolve(old, "next") == new  # deterministic
    same = sum(a == b for a, b in zip(old[:32768], new[:32768], strict=True))
    assert same > 0.98 * 32768  # before the insertion: about 1 % rewritten
    # After it, the old bytes shifted by 256 (the last 256 dropped), again ~1 % rewritten.
    tail = sum(a == b for a, b in zip(new[32768 + 256 :], old[32768:-256], strict=True))
    assert tail > 0.98 * (32768 - 256)
    assert new[32768 : 32768 + 256] != old[32768 : 32768 + 256]  # the insertion
    assert evolve(b"\x00", "x") != b"\x00"


def test_delta_summary_counts_payloads_from_each_devices_own_view() -> None:
    from device_sim.fleet.report import FleetDeviceOutcome, FleetRunReport
    from device_sim.fleet.worker import _note_payload

    class Job:
        mismatched = frozenset({"d3"})
        patch_uri, image_uri = "/fw/patch", "/fw/image"

    seen = {
        "d1": ({"/fw/patch": 900}, "delta from 0011"),
        "d2": ({"/fw/patch": 300, "/fw/image": 5000}, "full image (delta failed: ...)"),
        "d3": ({"/fw/image": 5000}, "full image (running image is not the patch's source)"),
        "d4": ({"/fw/image": 5000}, ""),  # the server served the plain envelope
    }
    outs = []
    for dev, (fw, detail) in seen.items():
        out = FleetDeviceOutcome(dev, "updated", bytes=sum(fw.values()))
        _note_payload(Job(), out, fw, detail)  # type: ignore[arg-type]
        outs.append(out)
    assert [o.payload for o in outs] == ["delta", "delta+full", "full", "plain"]
    assert [o.mismatched for o in outs] == [False, False, True, False]
    report = FleetRunReport(
        devices=list(outs),
        wall_seconds=1.0,
        image_size=5000,
        settings={"delta": {"patch_size": 900, "image_size": 5000}},
        network={"c2s": {"received_bytes": 1000}, "s2c": {"received_bytes": 7000}},
    )
    s = report.summary()["delta"]
    assert s["installed_by_delta"] == 1 and s["fell_back_to_full"] == 2
    assert s["delta_failed_then_full"] == 1 and s["served_plain_envelope"] == 1
    assert s["mismatched_devices"] == 1 and s["mismatched_updated_by_full"] == 1
    assert s["fw_bytes_per_delta_device"] == 900 and s["fw_bytes_per_full_device"] == 5000
    assert report.summary()["air_bytes_per_device"] == 2000


def test_check_in_is_resent_on_a_new_session_until_the_server_has_it(tmp_path: Path) -> None:
    """A device whose DTLS session is dead (its handshake failed: every POST times out
    until the session starts over) still delivers its check-in before it asks /m:
    the fleet's outbox drain starts a new session after two flushes without progress."""
    import asyncio
    import random

    from device_sim.agent import DeviceAgent
    from device_sim.fleet.worker import _drain_outbox, queue_check_in
    from device_sim.inprocess import InProcessServer, InProcessTransport
    from device_sim.provision import provision
    from device_sim.transport import Response, TransportError
    from otacoap.core import cose

    class DeadSession(InProcessTransport):
        async def post(
            self, path: str, payload: bytes, *, content_format: int, timeout: float
        ) -> Response:
            if not self.resets:
                raise TransportError("no answer (the handshake failed)")
            return await super().post(path, payload, content_format=content_format, timeout=timeout)

    key = cose.generate_key("ed25519")
    flash = tmp_path / "dev.flash"
    provision(
        flash, device_id="d", psk=b"\x01" * 16, vendor_domain="v.example", class_info="c",
        anchors_pem=(key.public.public_pem(),), factory_image=b"\x07" * 5000,
        slot_size=8192,
    )  # fmt: skip
    queue_check_in(flash)
    server = InProcessServer()
    transport = DeadSession(server)
    agent = DeviceAgent(flash, "coaps://in-process", transport=transport)

    async def go() -> None:
        agent.power_on()
        await asyncio.wait_for(_drain_outbox(agent, random.Random(1)), 30)

    asyncio.run(go())
    agent.abandon()
    assert transport.resets == 1
    (report,) = server.reports
    assert report.state.value == "up-to-date" and report.installed_sequence == 0
    assert report.detail == "check-in: running seq 0"
