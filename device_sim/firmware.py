"""Simulated firmware images: what "running" an image means in the simulator.

A real device finds out whether new firmware works by running it. The simulator needs
the same outcomes on demand (ATTACKS.md #47: an image that crashes at start, one that
boots but fails its health check), so an image may begin with a small header that says
how it behaves. Images without the header (any file a user provisions) are healthy.

Header: ``MAGIC (8) | behaviour (1) | version (4, big-endian)``, then filler.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

MAGIC = b"OTASIMFW"
HEADER_SIZE = len(MAGIC) + 1 + 4


class Behaviour(StrEnum):
    HEALTHY = "healthy"
    CRASH = "crash"  # dies right after boot: never gets to confirm
    UNHEALTHY = "unhealthy"  # boots, but its health check fails

    @property
    def code(self) -> int:
        return _CODES[self]


_CODES = {Behaviour.HEALTHY: 0, Behaviour.CRASH: 1, Behaviour.UNHEALTHY: 2}
_BY_CODE = {v: k for k, v in _CODES.items()}


def make_image(
    size: int, *, version: int = 1, behaviour: Behaviour = Behaviour.HEALTHY, seed: int = 0
) -> bytes:
    """A deterministic image of `size` bytes; different (version, seed) differ everywhere."""
    if size < HEADER_SIZE:
        raise ValueError(f"a simulated image needs at least {HEADER_SIZE} bytes")
    head = MAGIC + bytes([behaviour.code]) + version.to_bytes(4, "big")
    out = bytearray(head)
    counter = 0
    tag = f"{version}:{seed}".encode()
    while len(out) < size:
        out += hashlib.sha256(tag + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def behaviour_of(head: bytes) -> Behaviour:
    """How an image behaves, from its first HEADER_SIZE bytes."""
    if len(head) >= HEADER_SIZE and head.startswith(MAGIC):
        return _BY_CODE.get(head[len(MAGIC)], Behaviour.HEALTHY)
    return Behaviour.HEALTHY


def version_of(head: bytes) -> int | None:
    if len(head) >= HEADER_SIZE and head.startswith(MAGIC):
        return int.from_bytes(head[len(MAGIC) + 1 : HEADER_SIZE], "big")
    return None
