"""The one-line progress display of a fleet run."""

from __future__ import annotations

import time
from typing import TextIO

# Progress: a TTY line is redrawn at most twice a second; an explicitly requested
# progress log on a non-TTY (CI) gets a new line at most every few seconds.
TTY_INTERVAL = 0.5
LOG_INTERVAL = 5.0


class Progress:
    """The one-line progress display on stderr (never on stdout, never flooding logs)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = TTY_INTERVAL if self.tty else LOG_INTERVAL
        self.snaps: dict[int, tuple[int, int, int, int]] = {}
        self.t0 = time.monotonic()
        self._last_print = 0.0
        self._last_blocks = 0
        self._last_t = self.t0
        self._shown = False

    def phase(self, text: str) -> None:
        if self.enabled:
            self._clear()
            print(f"fleet: {text}", file=self.stream, flush=True)

    def start(self) -> None:
        self.t0 = self._last_t = time.monotonic()

    def update(self, worker: int, snap: tuple[int, int, int, int]) -> None:
        self.snaps[worker] = snap
        now = time.monotonic()
        if self.enabled and now - self._last_print >= self.interval:
            self._draw(now)

    def _draw(self, now: float, *, average: bool = False) -> None:
        updated = sum(s[0] for s in self.snaps.values())
        failed = sum(s[1] for s in self.snaps.values())
        flying = sum(s[2] for s in self.snaps.values())
        blocks = sum(s[3] for s in self.snaps.values())
        since = self.t0 if average else self._last_t
        rate = (blocks - (0 if average else self._last_blocks)) / max(1e-6, now - since)
        self._last_blocks, self._last_t, self._last_print = blocks, now, now
        line = (
            f"fleet: {updated + failed}/{self.total} done, {failed} failed, "
            f"{flying} in flight, {rate:,.0f} blocks/s, {now - self.t0:.0f} s"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self._shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[2K")
            self._shown = False

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), average=True)
            if self.tty:
                self.stream.write("\n")
                self._shown = False
            self.stream.flush()
