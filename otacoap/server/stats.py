"""What the server counts for its operator, in one object: failed DTLS handshakes
(issue 10 §2: an attack must be seen, not only survived) beside the load figures.

`ServerStats.snapshot()` is the one export: `OtaServer` writes it atomically to
`DATA/server-stats.json` every few seconds when it changed, `otacoap server stats` (another
process) reads it back, and a metrics endpoint can serve the same dictionary later.

Failed handshakes are counted by reason, by the PSK identity the peer presented and
by its source address (the host, not the port: one attacker host is one source).
Both identities and sources are chosen by the attacker, so each map keeps at most
`MAX_KEYS` entries and counts the rest in one "not kept" figure. The log gets at most
one line per `log_every` seconds, summing up what happened since the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core.errors import OtaError
from ..fsutil import atomic_write, read_capped

log = logging.getLogger(__name__)

STATS_NAME = "server-stats.json"


def stats_name(worker: int | None) -> str:
    """The stats file of a server: one process's `server-stats.json`, or each worker's
    own `server-stats.worker-I.json` under `serve --workers N` (`otacoap server stats`
    adds them up)."""
    return STATS_NAME if worker is None else f"server-stats.worker-{worker}.json"


MAX_KEYS = 256
_MAX_IDENTITY_SHOWN = 64  # characters of an identity kept in a key (identities are <= 32 B)
_MAX_FILE = 1 << 20  # the stats file is a few KiB; refuse to parse anything huge


def printable(identity: bytes | None) -> str:
    """An attacker-chosen identity as safe, bounded text ("-": none presented)."""
    if identity is None:
        return "-"
    text = identity.decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text[:_MAX_IDENTITY_SHOWN]


class _CappedCounter:
    """Counts per key for at most MAX_KEYS keys; later new keys only count in `not_kept`."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.not_kept = 0

    def add(self, key: str) -> None:
        if key in self.counts:
            self.counts[key] += 1
        elif len(self.counts) < MAX_KEYS:
            self.counts[key] = 1
        else:
            self.not_kept += 1

    def top(self) -> dict[str, int]:
        return dict(sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))


class HandshakeFailures:
    """Failed DTLS handshakes: counted, bounded, logged at a limited rate."""

    def __init__(
        self, *, log_every: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = 0
        self.by_reason: dict[str, int] = {}
        self._identities = _CappedCounter()
        self._sources = _CappedCounter()
        self._log_every = log_every
        self._clock = clock
        self._next_log = 0.0
        self._unlogged = 0
        self._latest = ""

    def record(self, source: str, identity: bytes | None, reason: str) -> None:
        """One failed handshake from host `source`, which presented `identity`."""
        self.total += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        who = printable(identity)
        self._identities.add(who)
        self._sources.add(source)
        self._unlogged += 1
        self._latest = f"identity {who!r} from {source} ({reason})"
        self.flush_log()

    def flush_log(self) -> None:
        """Log what was not logged yet, if the last line is old enough."""
        now = self._clock()
        if not self._unlogged or now < self._next_log:
            return
        log.warning(
            "%d failed DTLS handshake(s) since the last report (%d in all); latest: %s",
            self._unlogged,
            self.total,
            self._latest,
        )
        self._unlogged = 0
        self._next_log = now + self._log_every

    def as_dict(self) -> dict[str, Any]:
        return {
            "failed": self.total,
            "by_reason": dict(sorted(self.by_reason.items())),
            "by_identity": self._identities.top(),
            "identities_not_kept": self._identities.not_kept,
            "by_source": self._sources.top(),
            "sources_not_kept": self._sources.not_kept,
        }


class ServerStats:
    """Everything the operator sees of a running server, as one dictionary."""

    def __init__(self, failures: HandshakeFailures, figures: Callable[[], dict[str, Any]]) -> None:
        self.failures = failures
        self._figures = figures
        self._written: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        figures = dict(self._figures())
        figures.pop("handshakes_failed", None)  # the failures' own figure, below
        handshakes = {"completed": figures.pop("handshakes_completed", 0)}
        handshakes.update(self.failures.as_dict())
        dtls: dict[str, Any] = {
            name: figures.pop(key)
            for key, name in (
                ("dtls_sessions", "sessions"),
                ("dtls_handshakes", "handshaking"),
                ("dtls_unverified", "unverified"),
            )
            if key in figures
        }
        dtls["dropped"] = {
            key[len("dropped_") :]: figures.pop(key)
            for key in list(figures)
            if key.startswith("dropped_")
        }
        return {"dtls": dtls, "handshakes": handshakes, **figures}

    def write(self, path: Path) -> bool:
        """Write the snapshot to `path` (atomically) if it changed; True if written."""
        snap = self.snapshot()
        if snap == self._written:
            return False
        doc = {"written_at": _now(), "pid": os.getpid(), **snap}
        atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n", 0o600)
        self._written = snap
        return True


def read_stats(path: Path) -> dict[str, Any]:
    """The last snapshot a server wrote in its data directory."""
    try:
        data = read_capped(path, _MAX_FILE)
    except FileNotFoundError:
        raise OtaError(
            f"no server statistics in {path.parent} (has 'otacoap serve' run on it?)"
        ) from None
    except ValueError:  # larger than any snapshot
        raise OtaError(f"{path}: not a statistics file") from None
    try:
        doc = json.loads(data)
    except ValueError:
        raise OtaError(f"{path}: not a statistics file") from None
    if not isinstance(doc, dict):
        raise OtaError(f"{path}: not a statistics file")
    return doc


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
