"""RFC 7252 §5.4.1: a response with a critical option the device does not know is rejected.

An option number with its lowest bit set is critical: an endpoint that does not
recognise it must not act on the message. aiocoap's client hands such responses to the
application as if the option were not there, so the device checks them itself and
treats the exchange as failed (a `TransportError`: the agent retries or gives up as for
any unusable response). Rejecting here is the device's half of §5.4.1; aiocoap has
already acknowledged a CON response by then, and a piggybacked response is rejected by
ignoring it (§4.2), which for the device means the exchange yields nothing usable.
"""

from __future__ import annotations

from aiocoap import Message
from aiocoap.numbers.optionnumbers import OptionNumber

from ..transport import TransportError

# The critical options the device processes in a response: Block2 (RFC 7959 §2.2).
# Every other one it would ignore, which §5.4.1 forbids for critical options.
UNDERSTOOD_CRITICAL: frozenset[int] = frozenset({OptionNumber.BLOCK2})


class UnrecognizedCriticalOption(TransportError):
    """A response carried a critical option the device does not process (RFC 7252 §5.4.1)."""


def reject_unrecognized_critical(msg: Message) -> None:
    """Raise UnrecognizedCriticalOption unless every critical option of `msg` is understood.

    A second occurrence of a non-repeatable option counts as unrecognised (RFC 7252
    §5.4.5); Block2 is not repeatable (RFC 7959 §2.1).
    """
    seen: set[int] = set()
    for option in msg.opt.option_list():
        number = int(option.number)
        if option.number.is_critical() and (number not in UNDERSTOOD_CRITICAL or number in seen):
            raise UnrecognizedCriticalOption(
                f"response rejected: critical option {number} not recognised (RFC 7252 §5.4.1)"
            )
        seen.add(number)
