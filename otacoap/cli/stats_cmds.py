"""`otacoap server stats`: what a running server counts, read from its data directory.

The server writes `DATA/server-stats.json` every few seconds (otacoap/server/stats.py):
DTLS sessions and handshakes, why sessions were dropped, and failed handshakes by
reason, identity and source address, so an attack is seen, not only survived
(issue 10 §2). Identities and addresses are attacker-chosen: printed escaped.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..server.stats import STATS_NAME, read_stats
from ..store import DEFAULT_DATA_DIR

_SHOWN = 10  # identities and sources listed in the text form


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("server", help="look at a running server")
    g = p.add_subparsers(dest="server_command", metavar="SUBCOMMAND", parser_class=type(p))
    g.required = True
    s = g.add_parser(
        "stats",
        help="sessions, dropped sessions and failed DTLS handshakes",
        description="Show the counters the server in DIR last wrote (every few seconds "
        f"while it runs, to DIR/{STATS_NAME}): DTLS sessions and handshakes, why "
        "sessions were dropped, and failed handshakes by reason, identity and source.",
    )
    s.add_argument(
        "--data",
        metavar="DIR",
        default=DEFAULT_DATA_DIR,
        help=f"data directory (default: ./{DEFAULT_DATA_DIR})",
    )
    s.add_argument("--json", action="store_true", help="the file as written, JSON")
    s.set_defaults(handler=cmd_server_stats, _cmd_path=["server", "stats"])


def cmd_server_stats(args: argparse.Namespace) -> int:
    workers = _worker_files(Path(args.data))
    if not workers:
        doc = read_stats(Path(args.data) / STATS_NAME)
        if args.json:
            print(json.dumps(doc, indent=1, sort_keys=True))
            return 0
        for line in render(doc):
            print(line)
        return 0
    # `serve --workers N`: each worker's own counters (docs/decisions/several-workers.md).
    docs = {index: read_stats(path) for index, path in workers.items()}
    if args.json:
        print(json.dumps({"workers": docs}, indent=1, sort_keys=True))
        return 0
    for index, doc in docs.items():
        print(f"worker {index}:")
        for line in render(doc):
            print("  " + line)
    return 0


def _worker_files(data: Path) -> dict[int, Path]:
    """The stats files of `serve --workers N`'s workers, if they are newer than a single
    server's `server-stats.json` (the data directory's last server had workers)."""
    found: dict[int, Path] = {}
    for path in data.glob("server-stats.worker-*.json"):
        index = path.name[len("server-stats.worker-") : -len(".json")]
        if index.isdigit():
            found[int(index)] = path
    single = data / STATS_NAME
    try:
        if found and single.stat().st_mtime > max(p.stat().st_mtime for p in found.values()):
            return {}
    except FileNotFoundError:
        pass
    return dict(sorted(found.items()))


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 checks without sending anything)."""
    if not 0 < pid < 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _safe(text: object) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(text))


def _pairs(counts: Any) -> str:
    if not isinstance(counts, dict) or not counts:
        return "-"
    return ", ".join(f"{_safe(k)} {_safe(v)}" for k, v in counts.items())


def render(doc: dict[str, Any]) -> list[str]:
    """The text form: one fact a line."""
    dtls = doc.get("dtls", {})
    hs = doc.get("handshakes", {})
    pid = doc.get("pid")
    state = "running" if isinstance(pid, int) and _alive(pid) else "not running any more"
    lines = [
        f"as of {_safe(doc.get('written_at', '?'))} (server pid {_safe(pid)}, {state})",
        f"DTLS sessions: {_safe(dtls.get('sessions', '?'))} authenticated, "
        f"{_safe(dtls.get('handshaking', '?'))} handshaking, "
        f"{_safe(dtls.get('unverified', '?'))} before the cookie",
        f"dropped sessions: {_pairs(dtls.get('dropped'))}",
        f"completed DTLS handshakes: {_safe(hs.get('completed', '?'))}",
        f"failed DTLS handshakes: {_safe(hs.get('failed', '?'))} ({_pairs(hs.get('by_reason'))})",
    ]
    for title, key, rest in (
        ("by identity", "by_identity", "identities_not_kept"),
        ("by source", "by_source", "sources_not_kept"),
    ):
        counts = hs.get(key) or {}
        if not isinstance(counts, dict):
            continue
        lines.append(f"  {title}:")
        for name, n in list(counts.items())[:_SHOWN]:
            lines.append(f"    {_safe(name)}  {_safe(n)}")
        hidden = len(counts) - _SHOWN
        if hidden > 0:
            lines.append(f"    ... {hidden} more (--json lists them)")
        if hs.get(rest):
            lines.append(f"    and {_safe(hs[rest])} from more than the ones kept")
    for key in ("fw_blocks_served", "uploads"):
        if key in doc:
            lines.append(f"{key.replace('_', ' ')}: {_safe(doc[key])}")
    return lines
