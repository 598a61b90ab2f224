"""What a fleet run produced: per-device outcomes, the summary an operator plans with,
the JSON report and the completions-over-time plot.

Kept apart from the runner so the figures can be recomputed from a saved report and
tested without a network. `DeviceOutcome`/`FleetReport` hold what any fleet run has;
`FleetDeviceOutcome`/`FleetRunReport` add what this simulator measures (update times,
attempts, the transport's counters, the link's statistics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from otacoap.fsutil import atomic_write


@dataclass
class DeviceOutcome:
    device: str
    outcome: str  # "updated" | "failed" | "rejected" | "timeout"
    reason: str = ""
    seconds: float | None = None  # time to complete, from the run's start
    bytes: int = 0
    blocks: int = 0
    retransmissions: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome == "updated"


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every figure is one a device had)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class FleetReport:
    devices: list[DeviceOutcome]
    wall_seconds: float
    image_size: int
    settings: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        done = [d for d in self.devices if d.ok]
        times = [d.seconds for d in done if d.seconds is not None]
        blocks = sum(d.blocks for d in self.devices)
        n = len(self.devices)
        return {
            "devices": n,
            "completed": len(done),
            "failed": n - len(done),
            "success_rate": len(done) / n if n else 0.0,
            "p50_seconds": percentile(times, 50),
            "p95_seconds": percentile(times, 95),
            "p99_seconds": percentile(times, 99),
            "max_seconds": max(times) if times else None,
            "wall_seconds": self.wall_seconds,
            "blocks": blocks,
            "blocks_per_second": blocks / self.wall_seconds if self.wall_seconds else 0.0,
            "bytes": sum(d.bytes for d in self.devices),
            "retransmissions": sum(d.retransmissions for d in self.devices),
            "image_size": self.image_size,
            "failure_reasons": _count(d.reason or d.outcome for d in self.devices if not d.ok),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "settings": self.settings,
            "server": self.server,
            "per_device": [asdict(d) for d in self.devices],
        }

    def write_json(self, path: str | Path) -> None:
        atomic_write(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())

    def write_plot(self, path: str | Path) -> None:
        """PNG of cumulative completions over time (matplotlib, headless)."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        times = sorted(d.seconds for d in self.devices if d.ok and d.seconds is not None)
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax.step(
            [0.0, *times],
            list(range(len(times) + 1)),
            where="post",
            label=f"updated ({len(times)}/{len(self.devices)})",
        )
        ax.axhline(len(self.devices), color="grey", linestyle=":", label="fleet size")
        s = self.summary()
        for key, style in (("p50_seconds", "--"), ("p95_seconds", "-.")):
            if s[key] is not None:
                ax.axvline(
                    s[key],
                    color="tab:orange",
                    linestyle=style,
                    label=f"{key.split('_')[0]} {s[key]:.1f} s",
                )
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("devices updated")
        ax.set_title(
            f"otacoap fleet: {len(self.devices)} devices, "
            f"{self.image_size} B image, success {s['success_rate']:.1%}"
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write(path, buf.getvalue())


@dataclass
class FleetDeviceOutcome(DeviceOutcome):
    """One device's run, with what the verification and the transport saw.

    `seconds` (inherited) is when the device finished, counted from the fleet's start:
    what the completions-over-time plot shows. `duration` is its own update time
    from getting a concurrency slot, which is what a single device experiences.
    `retransmissions` counts requests the device sent again unchanged (same method,
    path and block, after a timeout or an error); aiocoap's own CoAP-level CON
    retransmissions below the agent are not exposed and not included.
    """

    started: float | None = None
    duration: float | None = None
    attempts: int = 0
    requests: int = 0
    timeouts: int = 0
    resets: int = 0
    flash_sequence: int | None = None
    flash_image_ok: bool = False
    queued_reports: int | None = None
    server_confirmed: bool | None = None
    worker: int = 0
    earlier: list[str] = field(default_factory=list)  # why earlier attempts failed
    # Campaign runs: the device's wave (1-based, from the server's campaign), when the
    # device first saw the release offered (seconds from the start) and the campaign's
    # last word on it (pending = never admitted, admitted, succeeded, failed).
    wave: int | None = None
    admitted: float | None = None
    finished: float | None = None  # when its update attempt ended, whatever the outcome
    member_state: str | None = None
    # --delta: what the device fetched, from its own transport: "delta" (the patch
    # only), "full" (the image only: its running image was not the patch's source),
    # "delta+full" (the patch failed, then the image), "plain" (the server served it
    # the release's plain envelope); and the bytes of each. A device
    # picked by --delta-mismatch-fraction is `mismatched`. `server_payload`: what its
    # DOWNLOADED report told the server ("delta", "encrypted delta", "full",
    # "encrypted"; --data only).
    payload: str | None = None
    patch_bytes: int = 0
    image_bytes: int = 0
    mismatched: bool = False
    server_payload: str | None = None


@dataclass
class FleetRunReport(FleetReport):
    """FleetReport plus per-device update times, attempts and the link's statistics."""

    network: dict[str, Any] = field(default_factory=dict)
    # Campaign runs (--campaign): the campaign's final state and per-wave outcomes
    # (size, updated, failed/reverted, untouched, when each wave opened and completed,
    # peak devices admitted at once), from device_sim/fleet/campaign_watch.py.
    campaign: dict[str, Any] | None = None

    def fleet_outcomes(self) -> list[FleetDeviceOutcome]:
        return [d for d in self.devices if isinstance(d, FleetDeviceOutcome)]

    def summary(self) -> dict[str, Any]:
        s = super().summary()
        outs = [d for d in self.devices if isinstance(d, FleetDeviceOutcome)]
        durations = [d.duration for d in outs if d.ok and d.duration is not None]
        s.update(
            {
                "update_p50_seconds": percentile(durations, 50),
                "update_p95_seconds": percentile(durations, 95),
                "update_p99_seconds": percentile(durations, 99),
                "requests": sum(d.requests for d in outs),
                "timeouts": sum(d.timeouts for d in outs),
                "dtls_resets": sum(d.resets for d in outs),
                "devices_retried": sum(1 for d in outs if d.attempts > 1),
                "untouched": sum(1 for d in outs if d.outcome == "untouched"),
                "interrupted": sum(1 for d in outs if d.outcome == "interrupted"),
            }
        )
        # Every datagram through the impairment proxy (DTLS records: handshakes,
        # manifests, payload, reports, retransmissions), both directions, per device.
        sent = sum(self.network.get(way, {}).get("received_bytes", 0) for way in ("c2s", "s2c"))
        s["air_bytes_per_device"] = sent / len(outs) if sent and outs else None
        done_bytes = [d.bytes for d in outs if d.ok]
        s["fw_bytes_per_device_mean"] = sum(done_bytes) / len(done_bytes) if done_bytes else None
        s["fw_bytes_per_device_p50"] = percentile(done_bytes, 50)
        if self.settings.get("delta"):
            s["delta"] = delta_summary(outs, self.settings["delta"])
        if self.campaign is not None:
            c = self.campaign
            s["campaign"] = {
                k: c.get(k) for k in ("id", "state", "halt_reason", "peak_admitted", "per_wave")
            }
        return s

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["network"] = self.network
        if self.campaign is not None:
            out["campaign"] = self.campaign
        return out

    def write_plot(self, path: str | Path) -> None:
        if self.campaign is None:
            super().write_plot(path)
        else:
            self._write_campaign_plot(path)

    def _write_campaign_plot(self, path: str | Path) -> None:
        """PNG of adoption over time by wave: cumulative updated devices of each wave,
        with a dotted line where each wave opened (matplotlib, headless)."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assert self.campaign is not None
        outs = self.fleet_outcomes()
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, w in enumerate(self.campaign.get("per_wave", [])):
            n = w["wave"]
            colour = colours[i % len(colours)]
            times = sorted(
                d.seconds for d in outs if d.wave == n and d.ok and d.seconds is not None
            )
            ax.step(
                [0.0, *times],
                list(range(len(times) + 1)),
                where="post",
                color=colour,
                label=f"wave {n}: {len(times)}/{w['size']} updated, {w['failed']} failed, "
                f"{w['untouched']} untouched",
            )
            if w.get("opened_seconds") is not None:
                ax.axvline(w["opened_seconds"], color=colour, linestyle=":", alpha=0.7)
        ax.set_xlabel("seconds since start (dotted: wave opened)")
        ax.set_ylabel("devices updated in the wave")
        ax.set_title(
            f"otacoap campaign {self.campaign.get('id')}: {len(outs)} devices, "
            f"waves {self.campaign.get('waves')}, {self.campaign.get('state')}"
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write(path, buf.getvalue())


def delta_summary(outs: Sequence[FleetDeviceOutcome], setup: dict[str, Any]) -> dict[str, Any]:
    """--delta figures: updated devices by the payload they fetched, and the firmware
    bytes on the air per updated device for each payload (patch and image sizes from
    the run's settings)."""
    done = [d for d in outs if d.ok]
    by = _count(d.payload or "none" for d in done)

    def mean_bytes(kind: str) -> float | None:
        got = [d.bytes for d in done if d.payload == kind]
        return sum(got) / len(got) if got else None

    return {
        "installed_by_delta": by.get("delta", 0),
        "fell_back_to_full": by.get("full", 0) + by.get("delta+full", 0),
        "delta_failed_then_full": by.get("delta+full", 0),
        "served_plain_envelope": by.get("plain", 0),
        "mismatched_devices": sum(1 for d in outs if d.mismatched),
        "mismatched_updated_by_full": sum(1 for d in done if d.mismatched and d.payload == "full"),
        "patch_size": setup.get("patch_size"),
        "image_size": setup.get("image_size"),
        "fw_bytes_per_delta_device": mean_bytes("delta"),
        "fw_bytes_per_full_device": mean_bytes("full"),
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
