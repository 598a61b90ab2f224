"""The server's quarantine for aiocoap internals.

aiocoap documents `Context`, `Message`, resources and the credentials objects; its
message layer and transports are not API (aiocoap says so of its transports). The
server needs them anyway: a DTLS listener on exactly `--port`, bounded
session and duplicate-detection tables, and the Block2 fast path in front of the
message layer. Every use of a name aiocoap does not document lives in this package
and nowhere else, and `contract.RELIES_ON` lists each one with the signature we use,
so `tests/test_aiocoap_contract.py` fails loudly, in one place, when aiocoap changes.

- `dedup`: RFC 7252 §4.5 duplicate detection with an entry cap (`BoundedMessageManager`).
- `dtls_pool`: the DTLS session table: two bounded pools, idle expiry, handshake repair.
- `listeners`: the DTLS and plain message interfaces, the fast-path hook, and the
  TokenManager -> MessageManager -> interface wiring under a `Context`.
- `contract`: what we rely on, for the contract test.
"""
