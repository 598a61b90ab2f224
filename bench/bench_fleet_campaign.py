"""A fleet update rolled out as a campaign in waves (issue 11 §3).

What it measures: with the real server (`otacoap serve`) and the real device agents
over DTLS on loopback, a fleet of N devices (default 10,000) is updated by a campaign
(`--waves`, default 1%,10%,50%,100%; `--max-downloads`, default 50): the time each wave
took (from its opening to its last member's terminal report, as the operator's view of
the campaign saw it, sampled every 0.25 s), the total, and the peak number of devices
downloading at once, measured two ways against --max-downloads:

* server side: the campaign's members "admitted" and not yet confirmed or failed
  (what --max-downloads bounds), the peak over the samples;
* client side: the peak overlap of the devices' [first saw the release offered,
  update attempt ended] intervals, from the fleet's per-device report. A device is
  counted from the poll that found the release until its verification, so this
  includes the poll delay and the final report and may exceed the server's figure by
  devices whose terminal report is in flight.

Devices not yet admitted poll /m every --poll-interval seconds (jittered +-50%, the
default scales with the fleet: max(2, N/200) s so the waiting fleet costs the server
at most ~200 polls/s); the server's DTLS session table is raised to N + 256 so those
polls do not each cost a handshake (`--max-sessions` to override).

Usage:
    .venv/bin/python -m bench.bench_fleet_campaign                  # 10,000 devices
    .venv/bin/python -m bench.bench_fleet_campaign --devices 1000 --image-size 16384
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_fleet import make_data_dir, server
from .common import PYTHON, ROOT


def client_peak(per_device: list[dict[str, Any]]) -> int:
    """Most devices between "saw the release offered" and "attempt ended" at once."""
    events: list[tuple[float, int]] = []
    for d in per_device:
        if d.get("admitted") is not None and d.get("finished") is not None:
            events += [(d["admitted"], 1), (d["finished"], -1)]
    peak = live = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        live += step
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--waves", default="1%,10%,50%,100%")
    p.add_argument("--max-downloads", type=int, default=50)
    p.add_argument("--image-size", type=int, default=64 * 1024)
    p.add_argument("--concurrency", type=int, default=100, help="fleet-side slots")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--poll-interval", type=float, help="default max(2, devices/200) s")
    p.add_argument("--max-sessions", type=int, help="default devices + 256")
    p.add_argument("--timeout", type=float, default=300.0, help="per-device deadline")
    p.add_argument("--out", type=Path, help="keep the report and plot here")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    n = args.devices
    poll = args.poll_interval or max(2.0, n / 200)
    with tempfile.TemporaryDirectory(prefix="bench-campaign-") as tmp:
        base = Path(tmp)
        out = args.out or base
        out.mkdir(parents=True, exist_ok=True)
        data, key = make_data_dir(base, args.max_sessions or n + 256)
        campaign = f"--waves {args.waves} --max-downloads {args.max_downloads}"
        report_path = out / f"campaign-{n}.json"
        with server(data) as (uri, _pid):
            cmd = [
                PYTHON, "-m", "device_sim.fleet", "--server", uri, "--data", str(data),
                "--key", str(key), "--devices", str(n), "--image-size", str(args.image_size),
                "--concurrency", str(args.concurrency), "--processes", str(args.processes),
                "--timeout", str(args.timeout), "--seed", "1", "--json",
                "--poll-interval", str(poll), "--campaign", campaign,
                "--report", str(report_path), "--plot", str(out / f"campaign-{n}.png"),
            ]  # fmt: skip
            if args.progress:
                cmd.append("--progress")
            start = time.monotonic()
            done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            elapsed = time.monotonic() - start
        if done.returncode not in (0, 3):
            print(f"fleet failed with exit {done.returncode}: {done.stdout}", file=sys.stderr)
            return 1
        report = json.loads(report_path.read_text())
    camp = report["campaign"]
    print(f"# {' '.join(cmd[2:])}".replace(str(base), "$TMP"))
    print(
        f"{n} devices, {args.image_size} B image, waves {camp['waves']}, max-downloads "
        f"{args.max_downloads}, poll {poll:g} s: campaign {camp['state']}, "
        f"{report['completed']}/{n} updated; run {report['wall_seconds']:.1f} s "
        f"(setup {report['settings']['setup_seconds']:.1f} s, whole command {elapsed:.1f} s)"
    )
    print("| wave | size | updated | failed | opened at | completed at | wave time |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for w in camp["per_wave"]:
        o, c = w["opened_seconds"], w["completed_seconds"]
        took = f"{c - o:.1f} s" if o is not None and c is not None else "-"
        print(
            f"| {w['wave']} | {w['size']} | {w['updated']} | {w['failed']} | "
            f"{'-' if o is None else f'{o:.1f} s'} | {'-' if c is None else f'{c:.1f} s'} | "
            f"{took} |"
        )
    print(
        f"peak concurrent downloads: server {camp['peak_admitted']} admitted-not-done, "
        f"client {client_peak(report['per_device'])} mid-update; --max-downloads "
        f"{args.max_downloads}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
