"""Rollout campaigns, sans I/O: who is in which wave, and when a campaign moves on.

A campaign rolls one release out to the devices of its class that match its target,
wave by wave. Everything here is a pure function of what the store passes in (member
ids, counts per wave, the time), so the rules are unit- and property-tested without a
database, and the store (otacoap/store/campaigns.py) only persists what they decide.

Waves. `--waves 1%,10%,50%,100%` (or counts: `--waves 2,20,100%`) gives the
*cumulative* size of the campaign when each wave is open; a final 100% wave is added
if the list does not end with one. The members present when the campaign is created
are ranked by SHA-256(campaign id, device id) and cut into waves by those sizes (each
non-zero percentage is at least one device), so membership is deterministic and
stable: the store records each member's wave once and never moves it. A device that
joins the target later goes into the first wave not yet open (the last one if all are
open).

Progress of the current (last opened) wave. It has *reached* its success threshold
when at least ceil(success_threshold * size) of its members confirmed; then, after
`soak` seconds (not for `urgent` campaigns) and, with `approve`, once the operator
approved the next wave, the next wave opens; after the last, the campaign finishes.
Any open wave whose failures (reverted, rejected, failed, timed out) since the last
resume reach failure_threshold * size halts the campaign, naming the wave and the
counts. A halted campaign admits nobody until `resume` (which acknowledges the failures
seen so far) or `cancel`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from .errors import OtaError


class CampaignError(OtaError):
    """A campaign parameter or transition that cannot be (one-line CLI error)."""


class CampaignState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    CANCELLED = "cancelled"
    FINISHED = "finished"
    SUPERSEDED = "superseded"  # newer campaigns took every one of its devices over


ACTIVE_STATES = frozenset((CampaignState.RUNNING, CampaignState.PAUSED, CampaignState.HALTED))


class MemberState(StrEnum):
    PENDING = "pending"  # in a wave, not admitted yet
    ADMITTED = "admitted"  # served the release; no terminal report yet
    SUCCEEDED = "succeeded"  # confirmed (or was already on the release)
    FAILED = "failed"  # reverted, rejected, failed, or timed out
    SUPERSEDED = "superseded"  # a newer campaign took the device over
    LEFT = "left"  # left the class or the target before it was admitted


TERMINAL_MEMBER_STATES = frozenset((MemberState.SUCCEEDED, MemberState.FAILED))
COUNTED_MEMBER_STATES = frozenset(
    (MemberState.PENDING, MemberState.ADMITTED, MemberState.SUCCEEDED, MemberState.FAILED)
)

# Report states (otacoap.core.report.State values) that end a member's attempt.
SUCCESS_REPORTS = frozenset(("confirmed",))
FAILURE_REPORTS = frozenset(("reverted", "rejected", "failed"))


def report_verdict(state: str) -> MemberState | None:
    """SUCCEEDED / FAILED for a terminal report state, None for a progress report."""
    if state in SUCCESS_REPORTS:
        return MemberState.SUCCEEDED
    if state in FAILURE_REPORTS:
        return MemberState.FAILED
    return None


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class WaveSize:
    """One entry of --waves: a cumulative percentage of the members, or a count."""

    value: float
    percent: bool

    def __str__(self) -> str:
        if self.percent:
            return f"{self.value:g}%"
        return str(int(self.value))


def parse_waves(text: str) -> tuple[WaveSize, ...]:
    """`1%,10%,50%,100%` or `2,20,100%`: non-decreasing cumulative sizes."""
    sizes: list[WaveSize] = []
    for part in text.split(","):
        item = part.strip()
        if not item:
            raise CampaignError(f"empty wave in {text!r}")
        try:
            if item.endswith("%"):
                pct = float(item[:-1])
                if not (math.isfinite(pct) and 0 < pct <= 100):
                    raise ValueError
                sizes.append(WaveSize(pct, True))
            else:
                count = int(item)
                if count <= 0:
                    raise ValueError
                sizes.append(WaveSize(count, False))
        except ValueError:
            raise CampaignError(
                f"wave {item!r}: give a percentage in (0, 100] or a positive count"
            ) from None
    if len(sizes) > 32:
        raise CampaignError("at most 32 waves")
    for a, b in itertools.pairwise(sizes):
        if a.percent == b.percent and b.value < a.value:
            raise CampaignError(f"waves must not shrink: {a} then {b}")
    if not (sizes[-1].percent and sizes[-1].value == 100):
        sizes.append(WaveSize(100, True))
    return tuple(sizes)


def format_waves(sizes: Sequence[WaveSize]) -> str:
    return ",".join(str(s) for s in sizes)


def parse_share(text: str) -> float:
    """A share: `90%` or `0.9`; must be in (0, 1]."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise CampaignError(f"not a share: {text!r} (e.g. 90% or 0.9)") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise CampaignError(f"a share must be in (0, 1] (0%..100%], not {text!r}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """`45s`, `30m`, `2h`, `1d` or plain seconds; 0 is allowed (no soak)."""
    m = _DURATION.match(text)
    if m is None:
        raise CampaignError(f"not a duration: {text!r} (e.g. 30s, 30m, 2h, 1d)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value > 366 * 86400:
        raise CampaignError(f"duration {text!r} is longer than a year")
    return value


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Window:
    """A daily UTC maintenance window in minutes after midnight; may wrap midnight."""

    start: int
    end: int

    def __str__(self) -> str:
        (h1, m1), (h2, m2) = divmod(self.start, 60), divmod(self.end, 60)
        return f"{h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}"

    def contains(self, epoch_seconds: float) -> bool:
        minute = int(epoch_seconds // 60) % (24 * 60)  # UTC: the epoch has no time zone
        if self.start <= self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


def parse_window(text: str) -> Window:
    m = _WINDOW.match(text.strip())
    if m is None:
        raise CampaignError(f"not a window: {text!r} (HH:MM-HH:MM, UTC)")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise CampaignError(f"not a time of day in {text!r}")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % (24 * 60):
        raise CampaignError(f"window {text!r} is empty")
    return Window(start, end)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Which devices of the release's class: all, those with every tag, those listed."""

    tags: tuple[tuple[str, str], ...] = ()
    device_ids: tuple[str, ...] = ()

    @property
    def whole_class(self) -> bool:
        return not self.tags and not self.device_ids

    def matches(self, device_id: str, tags: dict[str, str]) -> bool:
        if self.device_ids and device_id not in self.device_ids:
            return False
        return all(tags.get(k) == v for k, v in self.tags)

    def __str__(self) -> str:
        if self.whole_class:
            return "all"
        return ",".join([f"{k}={v}" for k, v in self.tags] + list(self.device_ids))


def parse_target(text: str) -> Target:
    """`all`, or a comma list of KEY=VALUE tag terms (all must hold) and device ids."""
    if text.strip() in ("", "all"):
        return Target()
    tags: dict[str, str] = {}
    devices: list[str] = []
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        if "=" in item:
            key, value = parse_tag(item)
            tags[key] = value
        else:
            devices.append(item)
    return Target(tuple(sorted(tags.items())), tuple(sorted(set(devices))))


_TAG_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TAG_VALUE = re.compile(r"^[A-Za-z0-9_.:/-]{0,128}$")


def check_tag_key(key: str) -> str:
    if not _TAG_KEY.match(key):
        raise CampaignError(f"tag key {key!r}: 1-64 of A-Z a-z 0-9 _ . -")
    return key


def parse_tag(text: str) -> tuple[str, str]:
    """KEY=VALUE with a conservative alphabet (tags end up in logs and the audit)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise CampaignError(f"tag {text!r}: expected KEY=VALUE")
    check_tag_key(key)
    if not _TAG_VALUE.match(value):
        raise CampaignError(f"tag value {value!r}: 0-128 of A-Z a-z 0-9 _ . : / -")
    return key, value


# --------------------------------------------------------------------------- waves


def rank(campaign_id: int, device_id: str) -> bytes:
    """A device's stable, unpredictable place in a campaign's order."""
    return hashlib.sha256(f"otacoap-campaign:{campaign_id}:{device_id}".encode()).digest()


def cumulative_counts(sizes: Sequence[WaveSize], n: int) -> list[int]:
    """How many of `n` members the campaign covers once each wave is open."""
    out: list[int] = []
    prev = 0
    for s in sizes:
        c = math.ceil(n * s.value / 100 - 1e-9) if s.percent else int(s.value)
        c = max(prev, min(n, c))
        out.append(c)
        prev = c
    if out:
        out[-1] = n
    return out


def assign_waves(
    campaign_id: int, device_ids: Iterable[str], sizes: Sequence[WaveSize]
) -> dict[str, int]:
    """Wave index of each initial member: ranked by `rank`, cut by the wave sizes."""
    ordered = sorted(set(device_ids), key=lambda d: rank(campaign_id, d))
    counts = cumulative_counts(sizes, len(ordered))
    out: dict[str, int] = {}
    wave = 0
    for i, device in enumerate(ordered):
        while i >= counts[wave]:
            wave += 1
        out[device] = wave
    return out


def joiner_wave(opened: int, wave_count: int) -> int:
    """The wave of a device that joins during the campaign: the first not yet open."""
    return min(opened, wave_count - 1)


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class Policy:
    success_threshold: float = 0.95
    failure_threshold: float = 0.1
    soak: float = 0.0
    approve: bool = False
    timeout: float = 3600.0
    window: Window | None = None
    urgent: bool = False
    max_downloads: int | None = None
    block_rate: float | None = None  # firmware blocks/s this campaign's image may use

    def __post_init__(self) -> None:
        for name in ("success_threshold", "failure_threshold"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise CampaignError(f"{name.replace('_', '-')} must be in (0, 1]")
        if self.soak < 0 or self.timeout <= 0:
            raise CampaignError("soak must be >= 0 and timeout > 0")
        if self.max_downloads is not None and self.max_downloads < 1:
            raise CampaignError("max-downloads must be at least 1")
        if self.block_rate is not None and not (
            math.isfinite(self.block_rate) and self.block_rate > 0
        ):
            raise CampaignError("block-rate must be a positive number of blocks per second")


@dataclass(frozen=True)
class WaveCounts:
    """A wave's members (superseded and left ones not counted) by where they stand."""

    pending: int = 0
    admitted: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def size(self) -> int:
        return self.pending + self.admitted + self.succeeded + self.failed


@dataclass(frozen=True)
class Progress:
    """What the store keeps of a campaign's progress between evaluations."""

    state: CampaignState
    opened: int  # waves open so far (1 once created)
    wave_count: int
    reached_at: float | None = None  # when the last opened wave reached its threshold
    approved: int = 1  # waves the operator allowed to open
    failure_ack: tuple[int, ...] = field(default=())  # failures per wave acknowledged
    halt_reason: str = ""

    def ack(self, wave: int) -> int:
        return self.failure_ack[wave] if wave < len(self.failure_ack) else 0


@dataclass(frozen=True)
class Decision:
    progress: Progress
    events: tuple[tuple[str, str], ...]  # (audit action, detail) for each transition
    admit: int  # how many more devices may be admitted now (pending, in opened waves)


def needed(threshold: float, size: int) -> int:
    """Members that must succeed (or fail) for a share of `threshold` of `size`."""
    return max(1, math.ceil(threshold * size - 1e-9)) if size else 0


def evaluate(
    policy: Policy,
    progress: Progress,
    waves: Sequence[WaveCounts],
    now: float,
    block_rate: float | None = None,
) -> Decision:
    """The campaign's next progress, the transitions on the way, the admission budget.

    Time-driven steps (soak expiry, windows) happen whenever this is evaluated, so
    the server evaluates on every report and on a periodic tick, and the CLI before it
    shows a campaign (see otacoap/store/campaigns.py).

    `block_rate` is the firmware blocks/s the server measured for this campaign's image
    (None: not measured, e.g. the CLI). With a `policy.block_rate` budget, devices are
    admitted one per evaluation, and only while a measurement says the image's traffic
    is below the budget: network-aware pacing that never fails a device in flight.
    """
    p = progress
    events: list[tuple[str, str]] = []
    if p.state is not CampaignState.RUNNING:
        return Decision(p, (), 0)
    # 1. Failures: any open wave at its failure threshold halts the campaign.
    for i in range(min(p.opened, len(waves))):
        w = waves[i]
        failed = w.failed - p.ack(i)
        if w.size and failed > 0 and failed >= policy.failure_threshold * w.size - 1e-9:
            reason = (
                f"failure threshold: wave {i + 1} has {failed} of {w.size} devices failed "
                f"(threshold {policy.failure_threshold:.0%})"
            )
            p = replace(p, state=CampaignState.HALTED, halt_reason=reason)
            return Decision(p, (("campaign.halt", reason),), 0)
    # 2. The current wave: reached? soaked? approved? then the next one opens.
    while True:
        i = p.opened - 1
        w = waves[i] if i < len(waves) else WaveCounts()
        if w.succeeded < needed(policy.success_threshold, w.size):
            break
        reached = p.reached_at
        if reached is None:
            reached = now
            p = replace(p, reached_at=now)
            events.append(
                ("campaign.wave-reached", f"wave {i + 1}: {w.succeeded} of {w.size} confirmed")
            )
        if w.size and not policy.urgent and now < reached + policy.soak:
            break
        if p.opened >= p.wave_count:
            p = replace(p, state=CampaignState.FINISHED)
            events.append(("campaign.finish", f"all {p.wave_count} waves reached"))
            return Decision(p, tuple(events), 0)
        if policy.approve and p.approved <= p.opened:
            break
        p = replace(p, opened=p.opened + 1, reached_at=None)
        events.append(("campaign.wave-open", f"wave {p.opened} of {p.wave_count}"))
    # 3. Admission: only in the window (urgent ignores it), within max-downloads.
    if policy.window is not None and not policy.urgent and not policy.window.contains(now):
        return Decision(p, tuple(events), 0)
    pending = sum(w.pending for w in waves[: p.opened])
    budget = pending
    if policy.max_downloads is not None:
        in_progress = sum(w.admitted for w in waves)
        budget = min(budget, max(0, policy.max_downloads - in_progress))
    if policy.block_rate is not None:
        under = block_rate is not None and block_rate < policy.block_rate
        budget = min(budget, 1) if under else 0
    return Decision(p, tuple(events), budget)


def resumed(progress: Progress, waves: Sequence[WaveCounts]) -> Progress:
    """`campaign resume`: running again, the failures so far acknowledged."""
    if progress.state not in (CampaignState.HALTED, CampaignState.PAUSED):
        raise CampaignError(f"the campaign is {progress.state.value}, not halted or paused")
    ack = tuple(w.failed for w in waves)
    return replace(progress, state=CampaignState.RUNNING, failure_ack=ack, halt_reason="")


def paused(progress: Progress) -> Progress:
    if progress.state is not CampaignState.RUNNING:
        raise CampaignError(f"the campaign is {progress.state.value}, not running")
    return replace(progress, state=CampaignState.PAUSED)


def cancelled(progress: Progress) -> Progress:
    if progress.state not in ACTIVE_STATES:
        raise CampaignError(f"the campaign is already {progress.state.value}")
    return replace(progress, state=CampaignState.CANCELLED)


def approved(progress: Progress) -> Progress:
    """`campaign approve`: the next wave may open (once its predecessor reached)."""
    if progress.state not in ACTIVE_STATES:
        raise CampaignError(f"the campaign is {progress.state.value}")
    if progress.opened >= progress.wave_count:
        raise CampaignError("every wave is already open")
    return replace(progress, approved=max(progress.approved, progress.opened + 1))
