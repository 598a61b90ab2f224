"""The device's side of anchor rotation and freshness: GET /a and GET /t (ATTACKS.md #20, #8).

Both run around the update machine in `UpdateAgent.check_and_update`, and only on a
device provisioned with root keys (a device without them keeps its author keys for
life and asks for neither, exactly as before):

* before the manifest check, `update_anchors` walks the class's anchor-list chain one
  version at a time (`GET /a?v=<trusted version>` answers the next one), at most
  `anchor_list.MAX_ROTATIONS_PER_CHECK` per check. Each list is judged by
  `core.anchor_list.verify_update` (old and new roots, exact version + 1, class) and
  committed in ONE state save together with its "anchors-updated" report: a power cut
  leaves the old list or the new one, never a mix. The manifest check that follows
  already uses the new author keys, so a revoked key is refused from then on.
* after a check that found nothing to install, `check_freshness` asks for a freshness
  statement bound to a fresh nonce (`GET /t?n=<hex>`), verifies it with the freshness
  keys of the trusted list and judges it (`core.freshness.judge`): fresh, stale or
  unknown. The outcome is reported when it changes (one report, not one per poll).
  A manifest refused because its signed expiry passed (a device with a trusted clock)
  is reported as EXPIRED the same way.

Refusals of an anchor list are reported once and remembered in RAM by digest, like
refused envelopes (`RefusalMemory`), so a server replaying a bad list cannot make the
device write a report per check. Committing a list clears both memories: every refusal
was judged against the list it replaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING

from otacoap.core import anchor_list, cose, freshness, trust
from otacoap.core.errors import OtaError, ReportReason
from otacoap.core.freshness import Freshness
from otacoap.core.report import Report, State
from otacoap.core.update_record import BootStatus

from .bootloader import read_envelope, trusted_anchors
from .device_state import DeviceState
from .fetcher import BlockFetcher
from .record_store import StateStoreError
from .transport import TransportError

if TYPE_CHECKING:
    from .agent import UpdateAgent

_log = logging.getLogger(__name__)

ANCHORS_PATH = "/a"
VERSION_QUERY = "v"
_REFUSED_SIZE = 8


class AnchorRefusals:
    """Anchor lists this device refused lately (RAM, bounded, by SHA-256)."""

    def __init__(self) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, data: bytes) -> bool:
        return hashlib.sha256(data).digest() in self._seen

    def clear(self) -> None:
        """Forget: a list is judged against the trusted one, which just changed."""
        self._seen.clear()

    def add(self, data: bytes) -> None:
        self._seen[hashlib.sha256(data).digest()] = None
        while len(self._seen) > _REFUSED_SIZE:
            self._seen.popitem(last=False)


async def _fetch(agent: UpdateAgent, path: str, cap: int) -> bytes:
    fetcher = BlockFetcher(
        agent.transport, path, clock=agent.clock, config=agent.config.fetch, cap=cap
    )
    parts = bytearray()
    async with contextlib.aclosing(fetcher.blocks(0)) as stream:
        async for _, payload in stream:
            parts += payload
    return bytes(parts)


def _report(
    state: DeviceState,
    kind: State,
    reason: ReportReason = ReportReason.OK,
    detail: str = "",
    fresh: Freshness | None = None,
) -> DeviceState:
    def encode(counter: int, lost: int) -> bytes:
        return Report(
            counter=counter,
            state=kind,
            reason=reason,
            installed_sequence=state.sequence,
            detail=detail,
            lost=lost,
            freshness=None if fresh is None else int(fresh),
        ).encode()

    return state.with_report(encode)


def running_signer(agent: UpdateAgent, state: DeviceState) -> anchor_list.Key | None:
    """The key that vouches for the running image (None: the factory image, or none)."""
    trusted = trusted_anchors(agent.identity, state)
    info = state.slots[state.running]
    if trusted is None or info is None or info.factory:
        return None
    try:
        envelope = read_envelope(agent.flash, agent.identity, state.running, info)
        policy = trust.TrustPolicy(anchors=trusted.boot_anchors(), max_envelope_size=len(envelope))
        return anchor_list.compact_key(trust.authenticate(envelope, policy).signer)
    except OtaError:
        return None


async def update_anchors(agent: UpdateAgent) -> int:
    """Apply the class's newer anchor lists (at most MAX_ROTATIONS_PER_CHECK); how many."""
    identity = agent.identity
    state = agent.load()
    trusted = trusted_anchors(identity, state)
    if trusted is None or state.boot != BootStatus.CONFIRMED:
        return 0
    applied = 0
    for _ in range(anchor_list.MAX_ROTATIONS_PER_CHECK):
        path = f"{ANCHORS_PATH}?{VERSION_QUERY}={trusted.version}"
        try:
            data = await _fetch(agent, path, anchor_list.MAX_ANCHOR_LIST_SIZE)
        except (OtaError, TransportError) as exc:
            # 4.04: nothing newer. Anything else: try again at the next check.
            _log.debug("anchor list after version %d: %s", trusted.version, exc)
            break
        if data in agent.anchor_refusals:
            break
        try:
            signed = anchor_list.verify_update(
                trusted, data, vendor_id=identity.vendor_id, class_id=identity.class_id
            )
        except OtaError as exc:
            _log.info("anchor list refused: %s", exc)
            agent.anchor_refusals.add(data)
            with contextlib.suppress(StateStoreError):
                agent.state_file.save(
                    _report(state, State.REJECTED, exc.reason, f"anchor list: {exc}")
                )
            break
        new = anchor_list.successor(trusted, signed, running_signer(agent, state))
        committed = _report(
            replace(state, anchors=new),
            State.ANCHORS_UPDATED,
            detail=f"anchor list version {new.version}",
        )
        try:
            state = agent.state_file.save(committed)
        except StateStoreError as exc:
            _log.warning("could not commit anchor list %d: %s", new.version, exc)
            break
        trusted = new
        applied += 1
        # Every refusal, of an envelope or a list, was judged against the old list.
        agent.refused.clear()
        agent.anchor_refusals.clear()
    return applied


def trusted_time(agent: UpdateAgent) -> int | None:
    """POSIX seconds from the device's trusted clock, or None if it has none."""
    clock = agent.config.trusted_time
    return None if clock is None else int(clock())


async def check_freshness(agent: UpdateAgent, outcome: str) -> Freshness | None:
    """After a check: how fresh is what the device was served? Report it if it changed.

    None for a device without root keys, and after checks that installed something or
    failed for another reason (they report for themselves).
    """
    identity = agent.identity
    state = agent.load()
    trusted = trusted_anchors(identity, state)
    if trusted is None:
        return None
    detail = ""
    if outcome == "rejected" and isinstance(agent.refusal, freshness.ManifestExpired):
        verdict = Freshness.EXPIRED
        detail = f"no fresh update information: {agent.refusal}"
    elif outcome == "up-to-date":
        statement, detail = await _statement(agent, trusted.freshness_anchors())
        verdict = freshness.judge(
            statement, installed=state.sequence, anchor_version=trusted.version
        )
        if verdict == Freshness.STALE:
            assert statement is not None
            detail = (
                f"server vouches for sequence {statement.sequence} and anchor list "
                f"{statement.anchor_version}, the device was served neither"
            )
    else:
        return None
    if verdict != trusted.reported:
        reason = {
            Freshness.FRESH: ReportReason.OK,
            Freshness.UNKNOWN: ReportReason.OPERATION_FAILED,
        }.get(verdict, ReportReason.CONDITION_FAILED)
        kind = State.REJECTED if verdict == Freshness.EXPIRED else State.UP_TO_DATE
        marked = replace(state, anchors=replace(trusted, reported=int(verdict)))
        with contextlib.suppress(StateStoreError):
            agent.state_file.save(_report(marked, kind, reason, detail, verdict))
    return verdict


async def _statement(
    agent: UpdateAgent, keys: tuple[cose.TrustAnchor, ...]
) -> tuple[freshness.Statement | None, str]:
    if not keys:
        return None, "no freshness key is trusted: cannot learn whether a newer release exists"
    nonce = os.urandom(16)
    path = f"{freshness.FRESHNESS_PATH}?{freshness.NONCE_QUERY}={nonce.hex()}"
    try:
        data = await _fetch(agent, path, freshness.MAX_STATEMENT_SIZE)
        statement = freshness.verify_statement(
            data,
            nonce=nonce,
            keys=keys,
            vendor_id=agent.identity.vendor_id,
            class_id=agent.identity.class_id,
        )
    except (OtaError, TransportError) as exc:
        return None, f"no freshness proof: {exc}"
    return statement, ""
