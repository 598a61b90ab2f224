"""When a device may check its server for an update again (sans-I/O: time is passed in).

A server (or whoever holds a device's PSK) can send Observe notifications as fast as it
likes (RFC 7641 §4.5 leaves the rate to the server). Each check the device makes can
write its state record (a report, a download checkpoint), and NOR flash wears out after
about 100,000 erase cycles: a notification storm must not turn into a flash-write storm.
So notifications only *ask* for a check; this pacer decides when it may start:

* never sooner than `min_gap` seconds after the previous check started;
* after a check that did not end well (refused, failed, unreachable, reverted) the gap
  doubles, up to `max_gap`, and it drops back to `min_gap` after a good one (up to date
  or updated): exponential backoff, as RFC 7252 §4.2 does for retransmissions.

So under any server behaviour, the checks in an hour are at most about
3600 / min_gap, and while the server keeps making them fail, about 3600 / max_gap
after the first few (`max_checks`). Each check writes the state record a bounded number
of times, which makes the flash writes per hour bounded too (tests measure both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PacingConfig:
    min_gap: float = 5.0
    """Seconds between the starts of two checks, whatever triggered them."""
    max_gap: float = 900.0
    """Longest backoff after repeated bad checks (a poll at the latest every max_gap)."""

    def __post_init__(self) -> None:
        if not (0 < self.min_gap <= self.max_gap) or math.isinf(self.max_gap):
            raise ValueError("need 0 < min_gap <= max_gap < infinity")


class CheckPacer:
    """Earliest start of the next check, from the history of checks it was told about."""

    def __init__(self, config: PacingConfig | None = None) -> None:
        self.config = config or PacingConfig()
        self._last_start: float | None = None
        self._gap = self.config.min_gap

    @property
    def gap(self) -> float:
        """The current minimum gap between two check starts."""
        return self._gap

    def earliest(self) -> float:
        """The earliest time the next check may start (-inf before the first one)."""
        if self._last_start is None:
            return -math.inf
        return self._last_start + self._gap

    def started(self, now: float) -> None:
        """A check starts at `now` (the caller waited until `earliest()`)."""
        self._last_start = now

    def finished(self, good: bool) -> None:
        """The check ended; `good` means up to date or updated."""
        cfg = self.config
        self._gap = cfg.min_gap if good else min(cfg.max_gap, self._gap * 2)

    @staticmethod
    def max_checks(config: PacingConfig, duration: float) -> int:
        """Most checks that can start within `duration` seconds, whatever happens."""
        return 1 + math.floor(duration / config.min_gap)
