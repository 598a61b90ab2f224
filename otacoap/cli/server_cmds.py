"""Server-side operator commands (init, trust, device, publish, serve, audit, ...)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Filled in by the server work (issue 3)."""
