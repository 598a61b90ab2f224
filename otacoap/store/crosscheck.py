"""The store against its audit log: every live record must have the entry that made it.

A valid chain only proves the log was not changed; it says nothing about rows written
around it. Someone who can write otacoap.db could insert a release (or a device, an
operator, a trust anchor) directly, and the chain would still verify. Every one of
those is made by a store method that appends its audit entry in the same transaction
(interface.py), so a record without its entry was made behind the store's back.

The rules, over entries with outcome "ok":
- a release needs a `publish` entry naming its class and sequence number and the
  first 16 hex digits of its manifest digest (as `SQLiteStore.commit_release` writes);
- a device, operator or trust anchor needs a lifecycle entry (action `device.*`,
  `operator.*`, `trust.*`) naming it, and the latest such entry must not be a
  `.remove` one (a row put back by hand after a removal is caught too).
Other actions (e.g. `device.rekey`, or ones added later) count as lifecycle entries of
their subject only through their prefix and never make a check fail by themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .audit import AuditEntry

_MANIFEST = re.compile(r"manifest ([0-9a-f]{16})")


def missing_entries(
    entries: Iterable[AuditEntry],
    *,
    releases: Sequence[tuple[str, int, bytes]],
    devices: Sequence[str],
    operators: Sequence[str],
    anchors: Sequence[str],
) -> list[str]:
    """One line per record the log does not account for (empty: all accounted for).

    `releases` are (class label, sequence number, manifest digest).
    """
    published: set[tuple[str, str]] = set()
    latest: dict[tuple[str, str], str] = {}  # (kind, subject) -> last lifecycle action
    for e in entries:
        if e.outcome != "ok":
            continue
        if e.action == "publish":
            m = _MANIFEST.search(e.detail)
            published.add((e.subject, m.group(1) if m else ""))
            continue
        kind, dot, _ = e.action.partition(".")
        if dot and kind in ("device", "operator", "trust"):
            latest[(kind, e.subject)] = e.action

    problems: list[str] = []
    for label, seq, digest in releases:
        if (f"{label} seq {seq}", digest.hex()[:16]) not in published:
            problems.append(f"release {label} seq {seq} has no publish audit entry")
    for kind, noun, names in (
        ("device", "device", devices),
        ("operator", "operator", operators),
        ("trust", "trust anchor", anchors),
    ):
        for name in names:
            action = latest.get((kind, name))
            if action is None:
                problems.append(f"{noun} {name!r} has no {kind}.add audit entry")
            elif action == f"{kind}.remove":
                problems.append(
                    f"{noun} {name!r} was removed according to the audit log, yet it is present"
                )
    return problems
