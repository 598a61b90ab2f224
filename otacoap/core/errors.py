"""One error root for everything otacoap refuses.

Each subclass stands for what the caller does next (DESIGN principle 7): the server
renders `coap_code` and `coap_options()` as its response (in one place:
otacoap.server.errors), the device puts `reason` into its SUIT report, and the CLI
prints `str(error)` as its one line. Detail that would help an attacker
stays in `detail` for the log; `str()` is safe to show outward.
"""

from __future__ import annotations

from enum import IntEnum

from .coap_numbers import (
    BAD_REQUEST,
    CONFLICT,
    FORBIDDEN,
    PRECONDITION_FAILED,
    REQUEST_ENTITY_TOO_LARGE,
)


class ReportReason(IntEnum):
    """SUIT report reason codes (draft-ietf-suit-report-18, SUIT_Report_Reasons)."""

    OK = 0
    CBOR_PARSE = 1
    COSE_UNSUPPORTED = 2
    ALG_UNSUPPORTED = 3
    UNAUTHORISED = 4
    COMMAND_UNSUPPORTED = 5
    COMPONENT_UNSUPPORTED = 6
    COMPONENT_UNAUTHORISED = 7
    PARAMETER_UNSUPPORTED = 8
    SEVERING_UNSUPPORTED = 9
    CONDITION_FAILED = 10
    OPERATION_FAILED = 11
    INVOKE_PENDING = 12


class OtaError(Exception):
    """Root of every refusal. `str()` is the one-line, outward-safe message."""

    reason: ReportReason = ReportReason.OPERATION_FAILED
    coap_code: int = BAD_REQUEST

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def coap_options(self) -> tuple[tuple[int, int], ...]:
        """The uint options (number, value) its CoAP response carries besides the code
        and the diagnostic payload; most refusals carry none."""
        return ()


class ManifestError(OtaError):
    """The bytes are not a well-formed, supported SUIT envelope (fix the input)."""

    reason = ReportReason.CBOR_PARSE


class LimitExceeded(ManifestError):
    """Input over a size or nesting cap; refused before any decoding work."""

    coap_code = REQUEST_ENTITY_TOO_LARGE


class UnsupportedElement(ManifestError):
    """A critical element this processor does not know (e.g. a legacy draft's numbering)."""

    reason = ReportReason.PARAMETER_UNSUPPORTED


class SeveredElementError(ManifestError):
    """A severable element does not match the digest the signed manifest holds for it."""

    reason = ReportReason.SEVERING_UNSUPPORTED


class AuthenticationError(OtaError):
    """No trusted key vouches for these bytes: never act on them."""

    reason = ReportReason.UNAUTHORISED
    coap_code = FORBIDDEN


class AlgorithmError(AuthenticationError):
    """COSE structure or algorithm outside the allow-list."""

    reason = ReportReason.ALG_UNSUPPORTED


class RollbackError(OtaError):
    """Authentic but not fresh: the sequence number does not move forward."""

    reason = ReportReason.CONDITION_FAILED
    coap_code = CONFLICT


class AlreadyInstalled(OtaError):
    """Equal sequence number and identical bytes: an idempotent no-op, not a failure."""

    reason = ReportReason.OK
    coap_code = CONFLICT


class IncompatibleError(OtaError):
    """Authentic and fresh, but not for this device (vendor, class, device id)."""

    reason = ReportReason.CONDITION_FAILED
    coap_code = PRECONDITION_FAILED


class PolicyError(OtaError):
    """Authentic, but it asks for something local policy forbids (size, URI, component)."""

    reason = ReportReason.COMPONENT_UNAUTHORISED
    coap_code = FORBIDDEN


class CommandError(OtaError):
    """A command sequence failed or used a command this processor cannot run."""

    reason = ReportReason.COMMAND_UNSUPPORTED


class ConditionFailed(CommandError):
    """A SUIT condition evaluated false (manifest-34 §6.4)."""

    reason = ReportReason.CONDITION_FAILED


class TransferError(OtaError):
    """The payload did not arrive as the manifest promised (size, digest, protocol)."""

    reason = ReportReason.OPERATION_FAILED
