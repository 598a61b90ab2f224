"""The device's CoAP-over-DTLS transport, and its quarantine for aiocoap internals.

`CoapTransport` (device_sim.coap.client) is what the agent, the fetcher and the fleet
use; `device_sim.coap` exports it and `normalize_base` as this package's interface.
aiocoap's client needs repairs that reach into names aiocoap does not document
(`Request._stop_interest`, the tinydtls client's `_connection_for_address` and
`_run_retransmissions`, ...). Every such use lives in this package and nowhere else,
and `contract.RELIES_ON` lists each one with the signature or behaviour we use, so
`tests/test_aiocoap_contract.py` fails loudly, in one place, when aiocoap changes.

- `client`: `CoapTransport`, one request and one response at a time (Transport protocol).
- `request_cleanup`: ending an aiocoap request without leaks or late set_result.
- `dtls_retransmit`: a handshake retransmission timer that does not hang.
- `critical_options`: RFC 7252 §5.4.1 rejection of unknown critical options.
- `contract`: what we rely on, for the contract test.
"""

from .client import CoapTransport, normalize_base

__all__ = ["CoapTransport", "normalize_base"]
