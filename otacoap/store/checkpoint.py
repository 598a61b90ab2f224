"""Audit checkpoints: the log's length and head, in a file meant to be kept elsewhere.

`otacoap audit checkpoint FILE` writes one; `otacoap audit verify --checkpoint FILE`
proves that nothing up to that point was removed or changed since: the log must still
hold at least `count` entries, and entry `count` must still be the one whose link was
`head` (the chain then vouches for every entry before it). A checkpoint says nothing
about entries added after it; take a new one now and then and keep the copies off the
machine (another host, write-once storage), where whoever can write the data directory
cannot reach them. That is what catches the one thing local state cannot: a whole older
copy of the database put back (its own seal is valid, it simply ends earlier).

The file is small JSON, MACed (HMAC-SHA-256, RFC 2104) with a key derived from
server.key (secrets.AuditKeys), so an edited or foreign checkpoint is refused instead of
being believed. The MAC protects the file in storage; the comparison with the log is
what proves the log intact, which is why the copy must live elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass

from ..core import cbor
from .errors import AuditChainBroken, StoreError

FORMAT = "otacoap audit checkpoint v1"
MAX_CHECKPOINT_FILE = 4096
_DOMAIN = b"otacoap audit checkpoint v1\x00"


class CheckpointInvalid(StoreError):
    """The file is not a checkpoint, or not one this data directory's key made."""


@dataclass(frozen=True)
class Checkpoint:
    count: int
    head: bytes
    created: str


def _mac(key: bytes, cp: Checkpoint) -> bytes:
    body = cbor.dumps([FORMAT, cp.count, cp.head, cp.created])
    return hmac.new(key, _DOMAIN + body, hashlib.sha256).digest()


def encode(cp: Checkpoint, key: bytes) -> bytes:
    doc = {
        "format": FORMAT,
        "count": cp.count,
        "head": cp.head.hex(),
        "created": cp.created,
        "mac": _mac(key, cp).hex(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def decode(data: bytes, key: bytes) -> Checkpoint:
    """The checkpoint in `data`, or CheckpointInvalid (one line, no parser noise)."""
    if len(data) > MAX_CHECKPOINT_FILE:
        raise CheckpointInvalid("not an audit checkpoint (too large)")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointInvalid("not an audit checkpoint (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointInvalid(f"not an audit checkpoint (format is not {FORMAT!r})")
    count, head, created, mac = (doc.get(k) for k in ("count", "head", "created", "mac"))
    try:
        if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise ValueError
        if not (isinstance(head, str) and isinstance(created, str) and isinstance(mac, str)):
            raise ValueError
        cp = Checkpoint(count, bytes.fromhex(head), created)
        mac_bytes = bytes.fromhex(mac)
    except ValueError:
        raise CheckpointInvalid("not an audit checkpoint (malformed fields)") from None
    if not hmac.compare_digest(_mac(key, cp), mac_bytes):
        raise CheckpointInvalid(
            "the checkpoint's MAC does not verify (edited, or made with another server.key)"
        )
    return cp


def check(cp: Checkpoint, count: int, hash_of: Callable[[int], bytes | None]) -> None:
    """Raise AuditChainBroken unless a verified log of `count` entries still holds the
    checkpointed prefix; `hash_of(seq)` is the link of entry seq (GENESIS for 0)."""
    if count < cp.count:
        raise AuditChainBroken(
            f"the audit log has {count} entries, the checkpoint recorded {cp.count}: "
            "entries were removed"
        )
    if hash_of(cp.count) != cp.head:
        raise AuditChainBroken(
            f"audit entry {cp.count} is not the one the checkpoint recorded: the log up to "
            "the checkpoint was rewritten"
        )
