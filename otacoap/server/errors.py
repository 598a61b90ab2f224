"""How a refusal looks on the wire: the one place an `OtaError` becomes a CoAP response.

The resources raise; `_Base.render` (resources.py) catches and calls `error_response`,
the way aiocoap's `RenderableError.to_message` works, so no handler builds an error
response by hand. The error itself says its code and any options it carries
(`OtaError.coap_code`, `OtaError.coap_options`); `str()` of it is the outward-safe
diagnostic payload. The refusals only the server makes (no identity, wrong role, wrong
Content-Format) are defined here.
"""

from __future__ import annotations

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber

from ..core import coap_numbers
from ..core.errors import OtaError
from ..store.errors import StoreUnavailable

MAX_DIAGNOSTIC = 200  # bytes of diagnostic payload at most (keeps refusals small, §11.3)


class Unauthenticated(OtaError):
    """4.01: no principal (no DTLS identity, or one the store no longer knows)."""

    coap_code = coap_numbers.UNAUTHORIZED

    def __init__(self, message: str = "DTLS identity required") -> None:
        super().__init__(message)


class WrongRole(OtaError):
    """4.03: an identified principal on a resource for the other role."""

    coap_code = coap_numbers.FORBIDDEN


class UnsupportedFormat(OtaError):
    """4.15: a request body in a Content-Format the resource does not take."""

    coap_code = coap_numbers.UNSUPPORTED_CONTENT_FORMAT


def error_response(exc: OtaError) -> aiocoap.Message:
    """The CoAP response that refuses with `exc`.

    RFC 7252 §5.5.2: a diagnostic payload is human-readable text without a
    Content-Format. The options the error names (e.g. Size1 on 4.13, RFC 7959 §2.9.3;
    Max-Age on 5.03, RFC 7252 §5.9.3.4) are uints.
    """
    if isinstance(exc, StoreUnavailable):
        # Its message names the database and the cause: for the log, not for clients.
        exc = StoreUnavailable("store unavailable, retry after Max-Age", max_age=exc.max_age)
    msg = aiocoap.Message(
        code=Code(exc.coap_code), payload=str(exc).encode("utf-8", "replace")[:MAX_DIAGNOSTIC]
    )
    for number, value in exc.coap_options():
        msg.opt.add_option(OptionNumber(number).create_option(value=value))
    return msg
