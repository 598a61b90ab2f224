"""DTLS PSK lookup for aiocoap's tinydtls_server, indexed and cached.

aiocoap's `CredentialsMap.find_dtls_psk` scans every entry on every lookup, and
tinydtls asks three times per handshake. Ours is a dict in front of an indexed DB
lookup (primary key), invalidated when the principal generation changes. Unknown
identities get a stable decoy key, so their handshake fails at the Finished check
exactly like a wrong key would (RFC 4279 §2), and the claims recorded for such a
session are None, which authorises nothing.

A session's claims are a `SessionClaim`: the principal *and* the tag of the key
registration it was made with (`store.models.key_tag_of`). Removing a principal or
changing its key changes what `current_tag` answers, so the sessions made with the
old key are told apart from new ones even when the same name is added back (issue
10 §1): the server ends them, and until it has, `StoreView.principal_of` refuses them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..store.errors import StoreUnavailable
from ..store.models import Credential, Principal
from ..store.names import MAX_IDENTITY_BYTES, PSK_LENGTH

log = logging.getLogger(__name__)

Lookup = Callable[[str], Credential | None]
Decoy = Callable[[bytes, int], bytes]


@dataclass(frozen=True)
class SessionClaim(Principal):
    """A principal as one DTLS session authenticated it: with the tag of the key
    registration it used. A Principal still (role, name, `str`), so whatever reads
    claims for the identity keeps working; `principal` is the bare principal.

    Compared by value: aiocoap's SecurityStore checks that tinydtls' repeated lookups
    during one handshake return the same claims."""

    key_tag: bytes

    @functools.cached_property
    def principal(self) -> Principal:
        return Principal(self.role, self.name)


class PskDirectory:
    """The `server_credentials` object aiocoap's DTLS server consults."""

    def __init__(self, lookup: Lookup, decoy: Decoy, max_cached: int = 4096) -> None:
        self._lookup = lookup
        self._decoy = decoy
        self._max = max_cached
        self._cache: dict[str, tuple[SessionClaim, bytes]] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    def _find(self, text: str, *, strict: bool = False) -> tuple[SessionClaim, bytes] | None:
        """The cached or looked-up claim and PSK. A DB error is "unknown" for a
        handshake (it must not kill the DTLS callback) but raises when `strict`: a
        revocation check must not take a passing DB error for a removed key and end
        every session."""
        hit = self._cache.get(text)
        if hit is None:
            try:
                found = self._lookup(text)
            except StoreUnavailable as exc:
                # The store is down (StoreView logs the outage): an identity not cached
                # cannot handshake now; it fails at Finished like an unknown one and
                # the device tries again later. Cached identities are not affected.
                if strict:
                    raise
                log.info("PSK lookup for %r: %s", text, exc)
                found = None
            except Exception:
                if strict:
                    raise
                log.exception("PSK lookup for %r failed", text)
                found = None
            if found is None:
                # Negative answers are not cached: unknown names are attacker-chosen.
                return None
            if len(self._cache) >= self._max:
                self._cache.clear()
            who = found.principal
            hit = (SessionClaim(who.role, who.name, found.key_tag), found.psk)
            self._cache[text] = hit
        return hit

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, SessionClaim | None]:
        """Called by tinydtls (through aiocoap's SecurityStore) during the handshake."""
        text: str | None
        try:
            text = bytes(identity).decode("ascii")
        except UnicodeDecodeError:
            text = None
        hit = None
        if text is not None and 0 < len(identity) <= MAX_IDENTITY_BYTES:
            hit = self._find(text)
        if hit is None:
            return self._decoy(bytes(identity), PSK_LENGTH), None
        claim, psk = hit
        return psk, claim

    def current_tag(self, principal: Principal) -> bytes | None:
        """The key tag `principal` has now, None if it is gone (cached like the PSK)."""
        hit = self._find(principal.identity, strict=True)
        if hit is None or hit[0].principal != Principal(principal.role, principal.name):
            return None
        return hit[0].key_tag

    def is_current(self, claim: object) -> bool:
        """False for a session claim whose key was removed or replaced since."""
        if not isinstance(claim, SessionClaim):
            return True  # no key to check (claims of another kind authorise nothing)
        return self.current_tag(claim.principal) == claim.key_tag
