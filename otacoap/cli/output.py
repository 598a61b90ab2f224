"""How list and show commands print: an aligned table with a header line for people, or
JSON for scripts (`--json`), from the same rows, so the two never disagree.

Values that came from devices (report details, identities) are made printable first:
they may hold terminal control sequences.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]
Columns = Sequence[tuple[str, str]]  # (header, key of the row)


def json_parent() -> argparse.ArgumentParser:
    """A parent parser adding `--json` (for every list and show command)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of text")
    return p


def printable(text: str) -> str:
    """Device-supplied text may hold terminal control sequences: show them escaped."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return printable(str(value))


def table(rows: Sequence[Row], columns: Columns) -> list[str]:
    """Rows as aligned text lines under a header; the last column is not padded."""
    cells = [[header for header, _ in columns]]
    cells += [[_cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line[:-1], widths[:-1], strict=True)) + "  " + line[-1]
        if len(line) > 1
        else line[0]
        for line in cells
    ]


def emit_list(args: argparse.Namespace, rows: Sequence[Row], columns: Columns, empty: str) -> None:
    """Print `rows` as JSON (a list, empty or not) or as a table (`empty` if none)."""
    if getattr(args, "json", False):
        print(json.dumps(list(map(dict, rows)), sort_keys=True))
    elif not rows:
        print(empty)
    else:
        print("\n".join(table(rows, columns)))


def emit_one(args: argparse.Namespace, row: Row, labels: Columns) -> None:
    """Print one record as JSON (an object) or as "label: value" lines."""
    if getattr(args, "json", False):
        print(json.dumps(dict(row), sort_keys=True))
        return
    for label, key in labels:
        print(f"{label}: {_cell(row.get(key))}")
