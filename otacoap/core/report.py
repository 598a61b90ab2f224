"""Device status reports, modelled on draft-ietf-suit-report-18, in one strict codec.

A report travels over the device's own DTLS session to `/r`; the device's identity is
the session's, so the body carries no device id at all (ATTACKS.md #33). A per-device
counter that must strictly increase makes replays and stale reports detectable
(ATTACKS.md #28). Keys: 99 suit-reference and 4 result as in the draft; otacoap's own
fields use negative (application-specific) keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from . import cbor
from .errors import ManifestError, ReportReason
from .suit import SuitDigest, decode_digest
from .untrusted import describe

MAX_REPORT_SIZE = 1024

K_REFERENCE = 99  # [manifest-uri tstr, manifest-digest SUIT_Digest]
K_RESULT = 4  # true / {7: reason}
K_RESULT_REASON = 7
K_STATE = -1
K_SEQUENCE = -2
K_BYTES = -3
K_COUNTER = -4
K_DETAIL = -5
K_INSTALLED_SEQUENCE = -6
K_LOST = -7  # reports the device dropped from its outbox before this one (cumulative)
K_ANCHOR_VERSION = -20  # version of the anchor list the device trusts (core.anchor_list)
K_FRESHNESS = -21  # core.freshness.Freshness: fresh 0, unknown 1, stale 2, expired 3
MAX_FRESHNESS = 3

MAX_DETAIL = 200
"""Longest detail in UTF-8 *bytes*: a cut by characters could be four times as long."""


def cut_detail(text: str) -> str:
    """`text` cut to at most MAX_DETAIL UTF-8 bytes, never inside a character."""
    # "replace": a lone surrogate would make the CBOR encoder fail on the device.
    return text.encode("utf-8", "replace")[:MAX_DETAIL].decode("utf-8", "ignore")


class State(StrEnum):
    """Where a device stands in an update; one report per transition."""

    CHECKING = "checking"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    INSTALLING = "installing"
    INSTALLED = "installed"
    CONFIRMED = "confirmed"
    REVERTED = "reverted"
    REJECTED = "rejected"
    FAILED = "failed"
    UP_TO_DATE = "up-to-date"
    ANCHORS_UPDATED = "anchors-updated"  # a new signed anchor list was committed


@dataclass(frozen=True)
class Report:
    counter: int
    state: State
    reason: ReportReason = ReportReason.OK
    sequence_number: int | None = None
    manifest_digest: SuitDigest | None = None
    manifest_uri: str = ""
    bytes_received: int | None = None
    installed_sequence: int | None = None
    detail: str = ""
    lost: int = 0
    anchor_version: int | None = None
    freshness: int | None = None

    @property
    def ok(self) -> bool:
        return self.reason == ReportReason.OK

    def encode(self) -> bytes:
        body: dict[int, Any] = {K_COUNTER: self.counter, K_STATE: self.state.value}
        body[K_RESULT] = True if self.ok else {K_RESULT_REASON: int(self.reason)}
        if self.manifest_digest is not None:
            body[K_REFERENCE] = [self.manifest_uri, self.manifest_digest.to_cbor()]
        if self.sequence_number is not None:
            body[K_SEQUENCE] = self.sequence_number
        if self.bytes_received is not None:
            body[K_BYTES] = self.bytes_received
        if self.installed_sequence is not None:
            body[K_INSTALLED_SEQUENCE] = self.installed_sequence
        if self.detail:
            body[K_DETAIL] = cut_detail(self.detail)
        if self.lost:
            body[K_LOST] = self.lost
        if self.anchor_version is not None:
            body[K_ANCHOR_VERSION] = self.anchor_version
        if self.freshness is not None:
            body[K_FRESHNESS] = self.freshness
        return cbor.dumps(body)


def stamp_anchor_version(body: bytes, version: int) -> bytes:
    """An encoded report with the device's anchor version added (key -20).

    The device stamps every report it queues with it, whoever built the report.
    """
    value = cbor.loads(body, max_size=MAX_REPORT_SIZE, max_depth=4)
    if not isinstance(value, dict):
        raise ManifestError("report must be a CBOR map")
    value[K_ANCHOR_VERSION] = version
    return cbor.dumps(value)


def _uint(v: Any, name: str) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64):
        raise ManifestError(f"report field {name} must be an unsigned integer")
    return v


def decode_report(data: bytes) -> Report:
    """Strictly decode a report body; unknown positive keys are refused."""
    value = cbor.loads(data, max_size=MAX_REPORT_SIZE, max_depth=4)
    if not isinstance(value, dict):
        raise ManifestError("report must be a CBOR map")
    known = {
        K_REFERENCE,
        K_RESULT,
        K_STATE,
        K_SEQUENCE,
        K_BYTES,
        K_COUNTER,
        K_DETAIL,
        K_INSTALLED_SEQUENCE,
        K_LOST,
        K_ANCHOR_VERSION,
        K_FRESHNESS,
    }
    for k in value:
        if not isinstance(k, int) or (k > 0 and k not in known):
            raise ManifestError(f"unknown report field {describe(k)}")
    if K_COUNTER not in value or K_STATE not in value:
        raise ManifestError("report lacks its counter or state")
    try:
        state = State(value[K_STATE])
    except (ValueError, TypeError):
        raise ManifestError("unknown report state") from None
    result = value.get(K_RESULT, True)
    if result is True:
        reason = ReportReason.OK
    elif isinstance(result, dict) and type(result.get(K_RESULT_REASON)) is int:
        try:
            reason = ReportReason(result[K_RESULT_REASON])
        except ValueError:
            raise ManifestError("unknown report reason code") from None
    else:
        raise ManifestError("report result must be true or {7: reason}")
    digest, uri = None, ""
    if K_REFERENCE in value:
        ref = value[K_REFERENCE]
        if not (isinstance(ref, list) and len(ref) == 2 and isinstance(ref[0], str)):
            raise ManifestError("report reference must be [uri, digest]")
        uri, digest = ref[0], decode_digest(ref[1])
    detail = value.get(K_DETAIL, "")
    if not isinstance(detail, str) or len(detail.encode("utf-8", "replace")) > MAX_DETAIL:
        raise ManifestError("report detail must be a short text string")

    def opt(key: int, name: str) -> int | None:
        return _uint(value[key], name) if key in value else None

    return Report(
        counter=_uint(value[K_COUNTER], "counter"),
        state=state,
        reason=reason,
        sequence_number=opt(K_SEQUENCE, "sequence"),
        manifest_digest=digest,
        manifest_uri=uri,
        bytes_received=opt(K_BYTES, "bytes"),
        installed_sequence=opt(K_INSTALLED_SEQUENCE, "installed sequence"),
        detail=detail,
        lost=opt(K_LOST, "lost") or 0,
        anchor_version=opt(K_ANCHOR_VERSION, "anchor version"),
        freshness=_freshness(value.get(K_FRESHNESS)),
    )


def _freshness(v: Any) -> int | None:
    if v is None:
        return None
    if not (type(v) is int and 0 <= v <= MAX_FRESHNESS):
        raise ManifestError("report freshness must be 0..3")
    return int(v)
