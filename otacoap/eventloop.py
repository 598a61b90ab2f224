"""The event loop an entry point runs on, chosen in this one place (uvloop by default).

DESIGN.md: the command line chooses the loop. Two command lines exist, `otacoap` and the
device simulator's (`python -m device_sim`, the fleet), so the choice cannot live in
otacoap/cli (nothing imports the CLI) nor in otacoap/core (no asyncio there). It is a
leaf module instead: it imports nothing of otacoap, so an entry point of any layer may
call it without reaching into another layer. Library code (server, store, device agent)
never picks a loop; it runs on whichever one its caller started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

UVLOOP = "uvloop"
ASYNCIO = "asyncio"


def run(main: Coroutine[Any, Any, T], loop: str = UVLOOP) -> T:
    """Run `main` to completion on a new loop of the named kind ("uvloop" or "asyncio")."""
    if loop == UVLOOP:
        return uvloop.run(main)
    if loop == ASYNCIO:
        return asyncio.run(main)
    main.close()
    raise ValueError(f"unknown event loop {loop!r} (uvloop or asyncio)")
