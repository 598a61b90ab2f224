"""The audit log's chain, as pure functions over entries.

Each entry carries the MAC of the previous entry, computed over a canonical CBOR
encoding (RFC 8949 §4.2.1 deterministic encoding, so the same entry always hashes the
same). The MAC is HMAC-SHA-256 (RFC 2104) under a key derived from server.key
(secrets.AuditKeys), which is never stored in the database: whoever can write
otacoap.db but cannot read server.key can neither edit an entry nor recompute the
chain after one. Changing, reordering or deleting an entry breaks a link; verification
names the first entry where it breaks.

Truncating the tail leaves a valid prefix, so the store also keeps a *seal*: the entry
count and head, MACed with the same key, rewritten with every entry. Lowering the
count to match a truncation breaks the seal. Restoring a whole older copy of the
database (with its own, older, valid seal) is a rollback no local state can see: a
checkpoint file kept elsewhere (checkpoint.py) catches that.

Data directories written before migration 4 hold a chain of plain SHA-256 links. They
are kept as they are (history is not rewritten): entries 1..P stay plain, and the
entry right after them is a keyed `audit.rekey` marker whose subject names P and
whose previous-hash is the plain head, so the keyed MAC covers both. P sits in the
meta table; changing it is caught because the marker that names P no longer sits at
P+1. Someone who rewrote the plain part *and* made the database look un-migrated
before the upgrade ran would get it re-anchored; a checkpoint taken before the upgrade
catches that.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from ..core import cbor
from .errors import AuditChainBroken

GENESIS = bytes(32)
_DOMAIN = b"otacoap audit v1\x00"  # the plain SHA-256 chain written before migration 4
_KEYED_DOMAIN = b"otacoap audit v2\x00"
_SEAL_DOMAIN = b"otacoap audit seal v1\x00"
REKEY_ACTION = "audit.rekey"
"""The entry that starts the keyed chain in a data directory upgraded from a plain one."""


def rekey_subject(plain_count: int) -> str:
    return f"plain 1..{plain_count}"


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
    *,
    key: bytes | None = None,
) -> bytes:
    """The entry's link: HMAC-SHA-256 under `key`, or, with key=None, the plain SHA-256
    of the chain written before migration 4 (kept only to verify those entries)."""
    body = cbor.dumps([seq, ts, actor, action, subject, outcome, detail, prev_hash])
    if key is None:
        return hashlib.sha256(_DOMAIN + body).digest()
    return hmac.new(key, _KEYED_DOMAIN + body, hashlib.sha256).digest()


def make_entry(
    seq: int,
    ts: str,
    actor: str,
    action: str,
    subject: str,
    outcome: str,
    detail: str,
    prev_hash: bytes,
    *,
    key: bytes | None = None,
) -> AuditEntry:
    h = entry_hash(seq, ts, actor, action, subject, outcome, detail, prev_hash, key=key)
    return AuditEntry(seq, ts, actor, action, subject, outcome, detail, prev_hash, h)


def seal_mac(key: bytes, count: int, head: bytes) -> bytes:
    """The MAC that pins the log's length and head (see the module docstring)."""
    return hmac.new(key, _SEAL_DOMAIN + cbor.dumps([count, head]), hashlib.sha256).digest()


def check_seal(key: bytes, count: int, head: bytes, seal: tuple[int, bytes, bytes] | None) -> None:
    """Raise AuditChainBroken unless `seal` (count, head, mac) vouches for this log."""
    if seal is None:
        raise AuditChainBroken(
            "the audit log's seal is missing (it was deleted: entries may have been "
            "removed from the end)"
        )
    sealed_count, sealed_head, mac = seal
    if not hmac.compare_digest(seal_mac(key, sealed_count, sealed_head), mac):
        raise AuditChainBroken(
            "the audit log's seal does not verify (edited, or written without this server.key)"
        )
    if sealed_count > count:
        raise AuditChainBroken(
            f"audit entries {count + 1}..{sealed_count} were removed from the end "
            f"(the log has {count} entries, its seal names {sealed_count})"
        )
    if sealed_count != count or sealed_head != head:
        raise AuditChainBroken(
            f"the audit log's head (entry {count}) is not the one its seal names "
            f"(entry {sealed_count})"
        )


def verify_chain(
    entries: Iterable[AuditEntry],
    expected_count: int | None = None,
    *,
    key: bytes | None = None,
    plain_count: int | None = None,
) -> bytes:
    """Check every link; return the head hash or raise AuditChainBroken naming the entry.

    With key=None every entry is checked as a plain SHA-256 link (the pre-migration-4
    chain). With a key, entries 1..plain_count are plain, entry plain_count+1 must be
    the keyed `audit.rekey` marker naming plain_count (when plain_count > 0), and every
    later entry is keyed.
    """
    plain = -1 if key is None else (plain_count or 0)  # -1: every entry is plain
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
        keyed = plain >= 0 and e.seq > plain
        recomputed = entry_hash(
            e.seq,
            e.ts,
            e.actor,
            e.action,
            e.subject,
            e.outcome,
            e.detail,
            e.prev_hash,
            key=key if keyed else None,
        )
        if not hmac.compare_digest(recomputed, e.hash):
            how = "MAC (changed, or recomputed without this server.key)" if keyed else "hash"
            raise AuditChainBroken(f"audit entry {e.seq}: content does not match its {how}")
        is_marker = e.action == REKEY_ACTION and e.subject == rekey_subject(plain)
        if plain > 0 and e.seq == plain + 1 and not is_marker:
            raise AuditChainBroken(
                f"audit entry {e.seq} is not the re-keying marker for {plain} plain "
                "entries (the recorded count of plain entries was changed)"
            )
        prev = e.hash
        expected_seq += 1
    count = expected_seq - 1
    if plain > 0 and count <= plain:
        raise AuditChainBroken(
            f"the audit log ends at entry {count}, before its re-keying marker (entry "
            f"{plain + 1}): truncated, or the recorded count of plain entries was changed"
        )
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
