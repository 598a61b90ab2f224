"""How an error message may mention a value that came from an unauthenticated party.

Refusal messages end up in logs and, on the device, in status reports stored in flash
and sent to the server. A message that copies attacker-chosen text is an amplifier: a
180-character `alg` string became an 800-byte report detail and, ten refusals later, a
state record too large to save (issue: the outbox brick). So a message says *what* was
wrong and describes the offending value by its kind and size; it never repeats it.
"""

from __future__ import annotations

from typing import Any

_SMALL_INT = 1 << 31


def describe(value: Any) -> str:
    """A short, bounded description of `value`, safe to put in any message.

    Small integers (COSE labels, SUIT keys, CBOR tags) are shown as they are: they are
    what a reader needs to diagnose an interop problem, and cannot be long.
    """
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if -_SMALL_INT <= value < _SMALL_INT else "a large integer"
    if isinstance(value, str):
        return f"a text string of {len(value)} characters"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"a byte string of {len(value)} bytes"
    if isinstance(value, list | tuple):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return f"a map of {len(value)} entries"
    return f"a value of type {type(value).__name__}"
