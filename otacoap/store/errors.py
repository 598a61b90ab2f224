"""Refusals raised by the store, each a core `OtaError` so the CLI and the server
render them the same way (DESIGN principle 7: one error root, a CoAP code each)."""

from __future__ import annotations

from ..core.coap_numbers import (
    BAD_REQUEST,
    CONFLICT,
    INTERNAL_SERVER_ERROR,
    NOT_FOUND,
    OPT_MAX_AGE,
    SERVICE_UNAVAILABLE,
)
from ..core.errors import OtaError, ReportReason


class StoreError(OtaError):
    """Something about the data directory or its contents is wrong."""

    coap_code = INTERNAL_SERVER_ERROR


# Seconds a client is told to wait before retrying while the store is unreachable: about
# the longest gap between two reconnection attempts (store/postgres.py), so a retry
# after Max-Age meets a fresh attempt.
STORE_RETRY_AFTER = 5


class StoreUnavailable(StoreError):
    """The store's server cannot be reached now (a PostgreSQL restart, a network cut):
    nothing was done, or, for a lost COMMIT, it may have been (an idempotent retry is
    safe: a report sent again is recognised). 5.03 Service Unavailable with Max-Age
    (RFC 7252 §5.9.3.4): the client keeps what it sent and tries again later."""

    coap_code = SERVICE_UNAVAILABLE

    def __init__(self, message: str, *, max_age: int = STORE_RETRY_AFTER) -> None:
        super().__init__(message)
        self.max_age = max_age

    def coap_options(self) -> tuple[tuple[int, int], ...]:
        return ((OPT_MAX_AGE, self.max_age),)


class NotInitialised(StoreError):
    """The data directory is missing a piece `otacoap init` creates."""


class InvalidName(OtaError):
    """An identifier (device id, operator name, key id, label) breaks the naming rules."""

    coap_code = BAD_REQUEST


class NotFound(OtaError):
    """The named record does not exist."""

    coap_code = NOT_FOUND


class AlreadyExists(OtaError):
    """A record with that name exists; we never overwrite silently."""

    coap_code = CONFLICT


class ImageMismatch(OtaError):
    """The image handed in is not the one the signed manifest describes."""

    coap_code = BAD_REQUEST
    reason = ReportReason.CONDITION_FAILED


class ReportReplayed(OtaError):
    """A status report whose counter is not above the last one accepted (ATTACKS.md #28)."""

    coap_code = CONFLICT
    reason = ReportReason.CONDITION_FAILED


class AuditChainBroken(StoreError):
    """The audit log's hash chain does not verify; the message names the entry."""
