"""RFC 7252 §4.5 duplicate detection with a hard entry cap.

aiocoap's MessageManager keeps every request's response for EXCHANGE_LIFETIME (247 s)
in `_recent_messages` plus one timer handle each, so memory grows with the request
rate (2.5-4 KB per request). `BoundedMessageManager` keeps the same semantics in an
LRU with a hard entry cap and lazy expiry (no per-entry timers). Under the cap nothing
changes; beyond it the oldest entries are forgotten early, which can only turn a late
retransmission into a re-executed request. Our state-changing requests are idempotent
under that (a repeated report is recognised).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiocoap.message import Message
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.types import CON
from aiocoap.tokenmanager import TokenManager


class DedupCache:
    """(remote, message id) -> stored response, with lifetime and an entry cap."""

    def __init__(self, max_entries: int, lifetime: float, clock: Callable[[], float]) -> None:
        self._entries: OrderedDict[Any, list[Any]] = OrderedDict()
        self._max = max_entries
        self._lifetime = lifetime
        self._clock = clock
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self) -> None:
        now = self._clock()
        entries = self._entries
        # Insertion order is arrival order and the lifetime is fixed, so expired
        # entries are always at the front.
        while entries:
            first = next(iter(entries.values()))
            if first[0] > now:
                break
            entries.popitem(last=False)

    def lookup(self, key: Any) -> tuple[bool, Message | None]:
        self._expire()
        entry = self._entries.get(key)
        return (False, None) if entry is None else (True, entry[1])

    def add(self, key: Any) -> None:
        self._expire()
        while len(self._entries) >= self._max:
            self._entries.popitem(last=False)
            self.evicted += 1
        self._entries[key] = [self._clock() + self._lifetime, None]

    def store_response(self, key: Any, response: Message) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry[1] = response


class BoundedMessageManager(MessageManager):
    """aiocoap's MessageManager with a bounded duplicate-detection cache.

    Overrides the two private dedup methods aiocoap calls from `dispatch_message`
    and `_send_initially` (see contract.RELIES_ON).
    """

    def __init__(self, token_manager: TokenManager, max_entries: int, lifetime: float) -> None:
        super().__init__(token_manager)
        self.dedup = DedupCache(max_entries, lifetime, token_manager.loop.time)
        self._recent_messages = None  # replaced by self.dedup

    def _deduplicate_message(self, message: Message) -> bool:
        """RFC 7252 §4.5: a CON with a known (endpoint, Message ID) gets the same response."""
        key = (message.remote, message.mid)
        known, response = self.dedup.lookup(key)
        if known:
            if message.mtype is CON and response is not None:
                self.log.info("Duplicate CON received, sending old response again")
                self._send_initially(response)
            else:
                self.log.info("Duplicate message received, no response to send (yet)")
            return True
        self.dedup.add(key)
        return False

    def _store_response_for_duplicates(self, message: Message) -> None:
        self.dedup.store_response((message.remote, message.mid), message)
