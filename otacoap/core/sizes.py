"""Size arithmetic shared by the flash layout, the record store and the update machine."""

from __future__ import annotations


def round_up(n: int, align: int) -> int:
    """The smallest multiple of `align` that is >= `n` (sectors, write units, blocks)."""
    if align <= 0:
        raise ValueError("alignment must be positive")
    return -(-n // align) * align
