"""One whole fleet run: setup, preflight, the workers, verification and the report.

`run_fleet` is what the CLI calls; it cleans up its temporary flash directory however
the run ends (an error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from otacoap import eventloop
from otacoap.core import blockwise
from otacoap.core.coap_numbers import code_str

from ..coap import CoapTransport, normalize_base
from ..netem import LinkProfile
from ..transport import TransportError
from . import operator_role
from .campaign_watch import CampaignWatch
from .operator_role import check_confirmed
from .options import SECTOR_SIZE, FleetError, FleetOptions
from .preparation import Prepared, prepare
from .processes import run_inprocess, run_processes
from .progress import Progress
from .report import DeviceOutcome, FleetDeviceOutcome, FleetRunReport
from .worker import WorkerJob


async def preflight(server: str, device: tuple[str, bytes], seq: int, szx: int) -> None:
    """Ask /m as the first device before launching everyone.

    A server that does not use the data directory the devices were registered in, or
    that is not running at all, would otherwise cost every device its full deadline.
    The server learns of the release by polling its store, so 4.04 is retried briefly.
    """
    transport = CoapTransport(server, device[0], device[1])
    last = "no answer"
    try:
        for _ in range(20):
            try:
                resp = await transport.get("/m", block2=(0, 0, szx), timeout=3.0)
            except TransportError as exc:
                last = str(exc)
                await transport.reset()
                continue
            if resp.successful:
                return
            last = f"answered {code_str(resp.code)}"
            await asyncio.sleep(0.5)
    finally:
        await transport.close()
    raise FleetError(
        f"{server} does not offer seq {seq} to device {device[0]} ({last}): is the server "
        "running, and on the data directory the devices were registered in?"
    )


def _split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    out: list[list[Any]] = [[] for _ in range(parts)]
    for i, item in enumerate(items):
        out[i % parts].append(item)
    return out


def _server_address(server: str) -> tuple[str, int]:
    parts = urlsplit(server)
    assert parts.hostname is not None
    port = parts.port or 5684
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise FleetError(f"cannot resolve {parts.hostname}: {exc}") from None
    return str(infos[0][4][0]), port


def bad_devices(devices: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """--bad-fraction: exactly round(fraction * N) devices, the ones ranked first by
    SHA-256(seed, device id), so the choice is deterministic and independent of the
    campaign's own wave ranking."""
    count = round(fraction * len(devices))
    ranked = sorted(devices, key=lambda d: hashlib.sha256(f"bad:{seed}:{d}".encode()).digest())
    return frozenset(ranked[:count])


def mismatched_devices(devices: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """--delta-mismatch-fraction: exactly round(fraction * N) devices, ranked by
    SHA-256(seed, device id) like `bad_devices` but under another label, so the two
    choices are independent."""
    count = round(fraction * len(devices))
    ranked = sorted(devices, key=lambda d: hashlib.sha256(f"odd:{seed}:{d}".encode()).digest())
    return frozenset(ranked[:count])


def check_outputs(opts: FleetOptions) -> None:
    """Refuse, before anything is registered, output paths that cannot be written."""
    for what, path in (("--report", opts.report), ("--plot", opts.plot)):
        if path is None:
            continue
        parent = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise FleetError(f"{what} {path}: is a directory")
        if not parent.is_dir():
            raise FleetError(f"{what} {path}: no such directory {parent}")
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise FleetError(f"{what} {path}: not writable")
    if opts.work is not None:
        existing = opts.work
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise FleetError(f"--work {opts.work}: cannot create or write {existing}")


def _jobs(
    opts: FleetOptions, prepared: Prepared, server: str, work: Path, lazy: bool = False
) -> list[WorkerJob]:
    upstream = None
    if opts.impairment != LinkProfile():
        upstream = _server_address(server)
        if not ipaddress.ip_address(upstream[0]).is_loopback:
            raise FleetError(
                "impairment options need a server on loopback (the netem proxy only "
                f"relays to 127.0.0.0/8 or ::1, not {upstream[0]})"
            )
    # No worker without a device or without a concurrency slot of its own.
    m = max(1, min(opts.processes, len(prepared.devices), opts.concurrency))
    shares = _split(prepared.devices, m)
    dx = prepared.delta
    largest = max(
        prepared.image_size,
        len(prepared.factory_image),
        len(dx.variant_image) if dx is not None else 0,
    )
    slot = -(-largest // SECTOR_SIZE) * SECTOR_SIZE
    ids = [d for d, _ in prepared.devices]
    bad = bad_devices(ids, opts.bad_fraction, opts.seed)
    odd = mismatched_devices(ids, opts.delta_mismatch_fraction, opts.seed)
    jobs = []
    for i in range(m):
        conc = opts.concurrency // m + (1 if i < opts.concurrency % m else 0)
        jobs.append(
            WorkerJob(
                index=i,
                server_uri=server,
                upstream=upstream,
                impairment=opts.impairment,
                seed=opts.seed + i,
                devices=tuple(shares[i]),
                flash_dir=str(work / f"w{i}"),
                vendor_domain=prepared.vendor_domain,
                class_info=prepared.class_info,
                anchors_pem=prepared.anchors_pem,
                factory_image=prepared.factory_image,
                factory_envelope=prepared.factory_envelope,
                slot_size=slot,
                szx=blockwise.szx_of(opts.block_size),
                max_window=opts.max_window,
                concurrency=max(1, conc),
                timeout=opts.timeout,
                attempts=opts.attempts,
                expected_seq=prepared.seq,
                decryption_keks=prepared.decryption_keks,
                expected_digest=prepared.image_digest.hex(),
                campaign=opts.campaign is not None,
                poll_interval=opts.poll_interval,
                stop_file=str(work / STOP_FILE),
                bad=frozenset(d for d, _ in shares[i] if d in bad),
                check_in=dx is not None,
                mismatched=frozenset(d for d, _ in shares[i] if d in odd),
                variant_image=dx.variant_image if dx is not None else b"",
                variant_envelope=dx.variant_envelope if dx is not None else b"",
                patch_uri=dx.patch_uri if dx is not None else "",
                image_uri=dx.image_uri if dx is not None else "",
                lazy_flash=lazy,
            )
        )
    return jobs


STOP_FILE = "campaign-over"
# Longer than the server's store poll (otacoap.server.store_view: at most 1 s).
STORE_POLL_WAIT = 2.0


def run_fleet(opts: FleetOptions, stream: TextIO | None = None) -> FleetRunReport:
    """The whole run: setup, update every device, verify, report. Cleans up after itself."""
    stream = stream if stream is not None else sys.stderr
    try:
        server = normalize_base(opts.server)
    except ValueError as exc:
        raise FleetError(str(exc)) from None
    enabled = opts.progress if opts.progress is not None else stream.isatty()
    progress = Progress(opts.devices, enabled, stream)
    check_outputs(opts)
    if opts.work is not None:
        opts.work.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="fleet-", dir=opts.work))
        keep = True
    else:
        work = Path(tempfile.mkdtemp(prefix="otacoap-fleet-"))
        keep = False
    wall_start = time.monotonic()
    registered: list[str] = []
    watch: CampaignWatch | None = None
    sink: list[FleetDeviceOutcome] = []
    try:
        prepared, server_facts = prepare(opts, work, progress, registered)
        # Without --work nobody reads the flash files after the run: each device makes
        # its own when it starts and removes it when done (campaign mode still makes
        # them all up front: every device polls from the start).
        lazy = not keep and opts.campaign is None
        jobs = _jobs(opts, prepared, server, work, lazy)
        if opts.campaign is None:
            progress.phase("checking that the server offers the release")
            eventloop.run(preflight(server, prepared.devices[0], prepared.seq, jobs[0].szx))
            if prepared.delta is not None and opts.data is not None:
                # The release and its delta are two commits; the server may have seen
                # only the first when it answered. One more store poll sees both.
                time.sleep(STORE_POLL_WAIT)
        else:
            # Nobody is offered the release before the campaign starts; /m must
            # answer with the factory release though.
            progress.phase("checking that the server answers")
            eventloop.run(preflight(server, prepared.devices[0], prepared.seq - 1, jobs[0].szx))

        def on_start(t0: float) -> None:
            nonlocal watch
            if opts.campaign is None:
                return
            assert opts.data is not None
            cid = operator_role.create_campaign(
                opts.data, prepared.vendor_domain, prepared.class_info, prepared.seq, opts.campaign
            )
            watch = CampaignWatch(opts.data, cid, t0, work / STOP_FILE)
            watch.start()

        if not lazy:
            progress.phase(f"provisioning {opts.devices} flash files in {work}")
        t0 = time.monotonic()
        try:
            if len(jobs) == 1:
                t0, one = run_inprocess(jobs[0], opts.run_deadline(), progress, on_start, sink)
                results = [one]
            else:
                t0, results = run_processes(jobs, opts.run_deadline(), progress, on_start, sink)
        except KeyboardInterrupt:
            _partial_report(opts, prepared, sink, time.monotonic() - t0, server, work, watch)
            _quiet_teardown()
            raise
        finally:
            if watch is not None:
                watch.stop()
        wall = time.monotonic() - t0
        progress.finish()
        outcomes = [o for r in results for o in r.outcomes]
        if opts.data is not None:
            server_facts.update(check_confirmed(opts.data, prepared.seq, outcomes))
        else:
            for out in outcomes:
                if out.outcome == "updated" and out.queued_reports:
                    out.outcome, out.reason = "unconfirmed", "reports still queued on the device"
                    out.seconds = out.duration = None
        order = {dev: i for i, (dev, _) in enumerate(prepared.devices)}
        outcomes.sort(key=lambda o: order.get(o.device, 0))
        report = FleetRunReport(
            devices=list(outcomes),
            wall_seconds=wall,
            image_size=prepared.image_size,
            settings=_settings(opts, prepared, server, work if keep else None, len(jobs)),
            server=server_facts,
            network=_merge_network([r.network for r in results]),
        )
        if watch is not None:
            report.campaign = watch.finish(report.fleet_outcomes())
        report.settings["setup_seconds"] = round(t0 - wall_start, 3)
        if opts.cleanup and opts.data is not None:
            report.server["cleanup"] = operator_role.cleanup(
                opts.data, registered, watch.cid if watch is not None else None
            )
            registered.clear()
        if opts.report is not None:
            report.write_json(opts.report)
        if opts.plot is not None:
            report.write_plot(opts.plot)
        return report
    finally:
        if opts.cleanup and opts.data is not None and registered:
            # An error or Ctrl-C: still leave nothing behind, without hiding why we stop.
            try:
                operator_role.cleanup(
                    opts.data, registered, watch.cid if watch is not None else None
                )
            except Exception as exc:
                print(f"fleet: --cleanup failed: {exc}", file=stream)
        if not keep:
            _remove_tree(work)


def _quiet_teardown() -> None:
    """After Ctrl-C, DTLS clients torn down half-way complain from __del__ and asyncio
    about tasks it cancelled; the run is over and its report written, so the exit
    stays one line (the documented exit 130), not tracebacks."""
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)


def _partial_report(
    opts: FleetOptions,
    prepared: Prepared,
    sink: list[FleetDeviceOutcome],
    wall: float,
    server: str,
    work: Path,
    watch: CampaignWatch | None,
) -> None:
    """Ctrl-C: write what is known (devices done so far; the rest "interrupted")."""
    if opts.report is None:
        return
    final = {"updated", "reverted", "rejected", "failed", "untouched", "unverified"}
    known = {o.device: o for o in sink}
    outcomes: list[DeviceOutcome] = []
    for device_id, _ in prepared.devices:
        out = known.get(device_id)
        if (
            out is None
            or out.outcome not in final
            or (out.outcome == "untouched" and out.flash_sequence is None)
        ):
            out = FleetDeviceOutcome(device_id, "interrupted", "the run was interrupted (Ctrl-C)")
        outcomes.append(out)
    report = FleetRunReport(
        devices=outcomes,
        wall_seconds=wall,
        image_size=prepared.image_size,
        settings=_settings(opts, prepared, server, None, 0),
    )
    report.settings["interrupted"] = True
    if watch is not None:
        try:
            report.campaign = watch.finish(report.fleet_outcomes())
        except Exception:  # the store may be busy; the devices' side is what matters
            report.campaign = {"id": watch.cid}
    report.write_json(opts.report)


def _remove_tree(path: Path) -> None:
    """Remove the flash directory (thousands of files: seconds) even if a SIGTERM or a
    Ctrl-C arrives while it is being removed; a few repeated interrupts still win."""
    for _ in range(3):
        try:
            shutil.rmtree(path, ignore_errors=True)
            return
        except KeyboardInterrupt:
            continue


def _merge_network(parts: list[dict[str, dict[str, int]]]) -> dict[str, Any]:
    merged: dict[str, dict[str, int]] = {}
    for part in parts:
        for direction, stats in part.items():
            into = merged.setdefault(direction, {})
            for k, v in stats.items():
                into[k] = into.get(k, 0) + v
    return merged


def _settings(
    opts: FleetOptions, prepared: Prepared, server: str, kept: Path | None, processes: int
) -> dict[str, Any]:
    imp = opts.impairment
    return {
        "server": server,
        "mode": "local store" if opts.data is not None else "network (operator)",
        "vendor_domain": prepared.vendor_domain,
        "class_info": prepared.class_info,
        "release_seq": prepared.seq,
        "image_id": prepared.image_id,
        "image_sha256": prepared.image_digest.hex(),
        "encrypted": bool(prepared.decryption_keks),
        "encryption": "A128CTR, CEK wrapped under a class A128KW key"
        if prepared.decryption_keks
        else None,
        "delta": _delta_settings(opts, prepared),
        "block_size": opts.block_size,
        "max_window": opts.max_window,
        "concurrency": opts.concurrency,
        "processes": processes,
        "timeout": opts.timeout,
        "max_time": opts.run_deadline(),
        "attempts": opts.attempts,
        "seed": opts.seed,
        "impairment": asdict(imp) if imp != LinkProfile() else None,
        "work_dir": str(kept) if kept is not None else None,
        "campaign": opts.campaign_text,
        "poll_interval": opts.poll_interval if opts.campaign is not None else None,
        "bad_fraction": opts.bad_fraction,
        "cleanup": opts.cleanup,
    }


def _delta_settings(opts: FleetOptions, prepared: Prepared) -> dict[str, Any] | None:
    dx = prepared.delta
    if dx is None:
        return None
    return {
        "patch_size": dx.patch_size,
        "image_size": prepared.image_size,
        "patch_uri": dx.patch_uri,
        "old_image": str(opts.old_image) if opts.old_image is not None else "generated",
        "old_image_sha256": dx.old_image_sha256,
        "mismatch_fraction": opts.delta_mismatch_fraction,
    }
