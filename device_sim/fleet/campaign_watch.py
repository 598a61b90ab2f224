"""Following a fleet run's rollout campaign from the operator's side.

A thread samples the campaign's status (as `otacoap campaign show --json` would, read
through the operator role) while the devices run: when each wave opened and completed,
how many devices were admitted and not yet done at once (the server's view of
concurrent downloads, against `--max-downloads`), and whether the campaign is over.
When it is (halted, finished, cancelled), it drops a marker file the device workers
look for, so devices still waiting to be admitted stop polling and end "untouched".
Devices never read the store; this is the operator's view only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from otacoap.fsutil import atomic_write

from . import operator_role
from .report import FleetDeviceOutcome

_log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 0.25  # seconds between status samples
WAITING_STATES = frozenset(("running", "paused"))


class CampaignWatch:
    """Samples campaign `cid` every SAMPLE_INTERVAL from `start()` until `stop()`."""

    def __init__(self, data: Path, cid: int, t0: float, stop_file: Path) -> None:
        self.data, self.cid, self.t0, self.stop_file = data, cid, t0, stop_file
        self.opened_at: dict[int, float] = {}  # wave (1-based) -> seconds since t0
        self.completed_at: dict[int, float] = {}
        self.peak_admitted = 0
        self.samples = 0
        self.over_at: float | None = None
        self.last: dict[str, Any] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="campaign-watch", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._halt.wait(SAMPLE_INTERVAL):
            try:
                self.sample()
            except Exception:  # a busy store: the next sample will do
                _log.debug("campaign sample failed", exc_info=True)

    def sample(self, evaluate: bool = False) -> None:
        """Read what the server last decided (`evaluate`: evaluate first, as
        `otacoap campaign show` does: the server may not have ticked since the last
        report)."""
        s = operator_role.campaign_progress(self.data, self.cid, evaluate=evaluate, members=False)
        now = max(0.0, time.monotonic() - self.t0)
        self.samples += 1
        self.last = s
        waves = s["per_wave"]
        self.peak_admitted = max(self.peak_admitted, sum(w["admitted"] for w in waves))
        for w in waves:
            n = w["wave"]
            if w["open"] and n not in self.opened_at:
                self.opened_at[n] = now
            if w["open"] and not w["pending"] and not w["admitted"] and n not in self.completed_at:
                self.completed_at[n] = now
        if s["state"] not in WAITING_STATES and self.over_at is None:
            self.over_at = now
            with contextlib.suppress(OSError):
                atomic_write(self.stop_file, s["state"].encode())

    def finish(self, outcomes: list[FleetDeviceOutcome]) -> dict[str, Any]:
        """The campaign's final word: each outcome's wave and member state, and the
        per-wave outcomes the report gives."""
        self.sample(evaluate=True)
        final = operator_role.campaign_progress(self.data, self.cid, evaluate=False)
        members = {m["device"]: m for m in final["members"]}
        for out in outcomes:
            m = members.get(out.device)
            if m is not None:
                out.wave, out.member_state = int(m["wave"]), str(m["state"])
        per_wave = []
        for w in final["per_wave"]:
            n = w["wave"]
            mine = [o for o in outcomes if o.wave == n]
            ends = [o.finished for o in mine if o.outcome != "untouched"]
            # Completed: when its last member's update attempt ended (the devices' view:
            # a campaign that reached its thresholds stops following its stragglers).
            done = bool(mine) and len(ends) == len(mine) and None not in ends
            per_wave.append(
                {
                    "wave": n,
                    "size": w["size"],
                    "updated": sum(o.outcome == "updated" for o in mine),
                    "failed": sum(o.outcome not in ("updated", "untouched") for o in mine),
                    "reverted": sum(o.outcome == "reverted" for o in mine),
                    "untouched": sum(o.outcome == "untouched" for o in mine),
                    "server": {k: w[k] for k in ("pending", "admitted", "succeeded", "failed")},
                    "opened_seconds": _round(self.opened_at.get(n)),
                    "completed_seconds": _round(max(e for e in ends if e is not None))
                    if done
                    else None,
                    "server_completed_seconds": _round(self.completed_at.get(n)),
                }
            )
        return {
            "id": self.cid,
            "state": final["state"],
            "halt_reason": final["halt_reason"],
            "waves": final["waves"],
            "policy": final["policy"],
            "opened": final["opened"],
            "wave_count": final["wave_count"],
            "ended_seconds": _round(self.over_at),
            "peak_admitted": self.peak_admitted,
            "samples": self.samples,
            "per_wave": per_wave,
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
