"""The audit log's hash chain, as pure functions over entries.

Each entry carries the SHA-256 of the previous entry, computed over a canonical CBOR
encoding (RFC 8949 §4.2.1 deterministic encoding, so the same entry always hashes the
same). Changing, reordering or deleting an entry breaks a link; verification names the
first entry where it breaks. Truncating the tail is caught by the entry count the
store keeps beside the chain; against an attacker who rewrites both, keep the head hash
that `audit verify` prints somewhere else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from ..core import cbor
from .errors import AuditChainBroken

GENESIS = bytes(32)
_DOMAIN = b"otacoap audit v1\x00"


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: str
    actor: str
    action: str
    subject: str
    outcome: str
    detail: str
    prev_hash: bytes
    hash: bytes


def entry_hash(
    seq: int,
    ts: str,
    actor: str,
    action: str,
    subject: str,
    outcome: str,
    detail: str,
    prev_hash: bytes,
) -> bytes:
    body = cbor.dumps([seq, ts, actor, action, subject, outcome, detail, prev_hash])
    return hashlib.sha256(_DOMAIN + body).digest()


def make_entry(
    seq: int,
    ts: str,
    actor: str,
    action: str,
    subject: str,
    outcome: str,
    detail: str,
    prev_hash: bytes,
) -> AuditEntry:
    h = entry_hash(seq, ts, actor, action, subject, outcome, detail, prev_hash)
    return AuditEntry(seq, ts, actor, action, subject, outcome, detail, prev_hash, h)


def verify_chain(entries: Iterable[AuditEntry], expected_count: int | None = None) -> bytes:
    """Check every link; return the head hash or raise AuditChainBroken naming the entry."""
    prev = GENESIS
    expected_seq = 1
    for e in entries:
        if e.seq != expected_seq:
            if e.seq > expected_seq:
                raise AuditChainBroken(
                    f"audit entry {expected_seq} is missing (next present entry is {e.seq})"
                )
            raise AuditChainBroken(f"audit entry {e.seq} is out of order")
        if e.prev_hash != prev:
            raise AuditChainBroken(
                f"audit entry {e.seq}: link to the previous entry is broken "
                "(an entry was reordered, deleted or changed before it)"
            )
        recomputed = entry_hash(
            e.seq, e.ts, e.actor, e.action, e.subject, e.outcome, e.detail, e.prev_hash
        )
        if recomputed != e.hash:
            raise AuditChainBroken(f"audit entry {e.seq}: content does not match its hash")
        prev = e.hash
        expected_seq += 1
    count = expected_seq - 1
    if expected_count is not None and count != expected_count:
        if count < expected_count:
            raise AuditChainBroken(
                f"audit entry {count + 1} is missing (log has {count} of "
                f"{expected_count} entries: truncated)"
            )
        raise AuditChainBroken(
            f"audit entry {expected_count + 1} was added outside the store "
            f"({count} entries, {expected_count} recorded)"
        )
    return prev
