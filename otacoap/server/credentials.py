"""DTLS PSK lookup for aiocoap's tinydtls_server, indexed and cached.

aiocoap's `CredentialsMap.find_dtls_psk` scans every entry on every lookup, and
tinydtls asks three times per handshake. Ours is a dict in front of an indexed DB
lookup (primary key), invalidated when the principal generation changes. Unknown
identities get a stable decoy key, so their handshake fails at the Finished check
exactly like a wrong key would (RFC 4279 §2), and the claims recorded for such a
session are None, which authorises nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..store.models import Principal
from ..store.names import MAX_IDENTITY_BYTES, PSK_LENGTH

log = logging.getLogger(__name__)

Lookup = Callable[[str], tuple[Principal, bytes] | None]
Decoy = Callable[[bytes, int], bytes]


class PskDirectory:
    """The `server_credentials` object aiocoap's DTLS server consults."""

    def __init__(self, lookup: Lookup, decoy: Decoy, max_cached: int = 4096) -> None:
        self._lookup = lookup
        self._decoy = decoy
        self._max = max_cached
        self._cache: dict[str, tuple[Principal, bytes]] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, Principal | None]:
        """Called by tinydtls (through aiocoap's SecurityStore) during the handshake."""
        text: str | None
        try:
            text = bytes(identity).decode("ascii")
        except UnicodeDecodeError:
            text = None
        if text is None or not 0 < len(identity) <= MAX_IDENTITY_BYTES:
            return self._decoy(bytes(identity), PSK_LENGTH), None
        hit = self._cache.get(text)
        if hit is None:
            try:
                found = self._lookup(text)
            except Exception:  # a DB error must not kill the DTLS callback
                log.exception("PSK lookup for %r failed", text)
                found = None
            if found is None:
                # Negative answers are not cached: unknown names are attacker-chosen.
                return self._decoy(bytes(identity), PSK_LENGTH), None
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[text] = hit = found
        principal, psk = hit
        return psk, principal
