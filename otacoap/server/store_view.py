"""What the resources share: read caches, the DB writer thread, identity resolution.

Threading: the event loop thread owns a read connection (PSK lookups happen inside a
synchronous tinydtls callback, so they cannot await) and small caches in front of it.
Every write (reports, audit entries, publishes) runs on one dedicated DB thread with
its own connection, so an fsync never stalls the loop and writes stay serialised.

Change detection: a cheap poll (`Store.changed_elsewhere`; SQLite's `PRAGMA
data_version`) notices commits made by any other connection (the CLI in another
process, or our own writer thread); then the generation counters say whether
principals or releases changed, and only those caches are dropped and /m observers
told.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..config import Config
from ..core.errors import OtaError
from ..store import DataDir, DeviceRecord, Principal, ReleaseRecord, Role, Store
from ..store.deltas import DeltaRecord
from ..store.models import ClassKey
from .credentials import PskDirectory

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_CACHED = 8192


class StoreView:
    def __init__(
        self,
        datadir: DataDir,
        config: Config,
        *,
        plain_identity: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.datadir = datadir
        self.config = config
        self.blobs = datadir.blobs
        self.blob_reader = self.blobs.reader()
        self.reader: Store = datadir.open_store()
        self._sealer = datadir.sealer()
        self._clock = clock
        self._db_executor = ThreadPoolExecutor(1, thread_name_prefix="otacoap-db")
        self._writer: Store | None = None
        self.psks = PskDirectory(self.reader.lookup_identity, self._sealer.decoy)
        self._devices: dict[str, DeviceRecord | None] = {}
        self._operators: dict[str, bool] = {}
        self._class_releases: dict[ClassKey, ReleaseRecord | None] = {}
        self._releases_by_id: dict[int, ReleaseRecord | None] = {}
        self._has_deltas: dict[int, bool] = {}  # release id -> any delta envelopes?
        self._release_listeners: list[Callable[[], None]] = []
        # Bumped whenever the caches above are dropped, so caches derived from them
        # elsewhere (the /fw fast path's grants) know to drop theirs too.
        self.epoch = 0
        self._refusals: dict[tuple[str, str], float] = {}
        self.reader.changed_elsewhere()
        self._generations = self.reader.generations()
        self.plain_principal: Principal | None = None
        if plain_identity is not None:
            found = self.reader.lookup_identity(plain_identity)
            if found is None:
                raise OtaError(f"--insecure-plain-identity {plain_identity!r} is not registered")
            self.plain_principal = found[0]

    # --- DB thread -----------------------------------------------------------------

    def _in_db(self, fn: Callable[[Store], T]) -> T:
        if self._writer is None:
            self._writer = self.datadir.open_store()
        return fn(self._writer)

    async def db(self, fn: Callable[[Store], T]) -> T:
        """Run `fn(writer_store)` on the DB thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_executor, self._in_db, fn)

    def audit_soon(self, actor: str, action: str, subject: str, outcome: str, detail: str) -> None:
        """Append an audit entry without waiting (fire and forget, errors logged)."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            self._db_executor,
            self._in_db,
            lambda s: s.audit(actor, action, subject, outcome, detail),
        )
        fut.add_done_callback(_log_failure)

    def refused(self, who: str, action: str, subject: str, detail: str) -> None:
        """Log a refused request; audit it at most once per interval per (who, action).

        Without the limit a hostile but authenticated device could turn each of its
        requests into a synchronous, fsynced DB write.
        """
        log.info("refused %s %s %s: %s", who, action, subject, detail)
        key = (who, action)
        now = self._clock()
        last = self._refusals.get(key)
        if last is not None and now - last < self.config.server.refusal_audit_interval:
            return
        if len(self._refusals) > _MAX_CACHED:
            self._refusals.clear()
        self._refusals[key] = now
        self.audit_soon(who, action, subject, "refused", detail)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._db_executor, self._close_writer)
        self._db_executor.shutdown(wait=True)
        self.reader.close()
        self.blob_reader.close()

    # --- identities ----------------------------------------------------------------

    def principal_of(self, remote: Any) -> Principal | None:
        """The authenticated principal of a request's remote, if it still exists.

        Identity comes only from the DTLS session's claims (ATTACKS.md #32/#33); on
        the plain-CoAP development listener it is the one configured identity or none.
        """
        principal: Principal | None = None
        for claim in getattr(remote, "authenticated_claims", ()):
            if isinstance(claim, Principal):
                principal = claim
                break
        if principal is None:
            if getattr(remote, "scheme", None) == "coap" and self.plain_principal is not None:
                principal = self.plain_principal
            else:
                return None
        if principal.role is Role.DEVICE:
            return principal if self.device(principal.name) is not None else None
        return principal if self._operator_exists(principal) else None

    def device(self, device_id: str) -> DeviceRecord | None:
        if device_id in self._devices:
            return self._devices[device_id]
        record = self.reader.get_device(device_id)
        if len(self._devices) >= _MAX_CACHED:
            self._devices.clear()
        self._devices[device_id] = record
        return record

    def _operator_exists(self, principal: Principal) -> bool:
        hit = self._operators.get(principal.name)
        if hit is None:
            hit = self.reader.principal_exists(principal)
            if len(self._operators) >= _MAX_CACHED:
                self._operators.clear()
            self._operators[principal.name] = hit
        return hit

    # --- releases ------------------------------------------------------------------

    def release_for(self, device: DeviceRecord) -> ReleaseRecord | None:
        """What this device should run: its pinned release, else its class's current."""
        if device.assigned_release is not None:
            rid = device.assigned_release
            if rid not in self._releases_by_id:
                self._releases_by_id[rid] = self.reader.release_by_id(rid)
            return self._releases_by_id[rid]
        key = device.class_key
        if key not in self._class_releases:
            self._class_releases[key] = self.reader.current_release(key)
        return self._class_releases[key]

    def delta_for(self, device: DeviceRecord, release: ReleaseRecord) -> DeltaRecord | None:
        """The delta envelope of `release` this device is served instead, if any
        (store/deltas.py says which); one cached lookup for a release without deltas."""
        has = self._has_deltas.get(release.id)
        if has is None:
            has = self._has_deltas[release.id] = bool(self.reader.deltas_of(release.id))
        return self.reader.delta_for_device(device.id, release) if has else None

    def on_release_change(self, listener: Callable[[], None]) -> None:
        self._release_listeners.append(listener)

    def refresh(self) -> None:
        """Drop caches that another connection's commits made stale; tell observers."""
        if not self.reader.changed_elsewhere():
            return
        generations = self.reader.generations()
        principals_changed = generations[0] != self._generations[0]
        releases_changed = generations[1] != self._generations[1]
        self._generations = generations
        if principals_changed or releases_changed:
            # Device rows carry the class and the pinned release: both kinds matter.
            self._devices.clear()
            self.epoch += 1
        if principals_changed:
            self.psks.invalidate()
            self._operators.clear()
        if releases_changed:
            self._class_releases.clear()
            self._releases_by_id.clear()
            self._has_deltas.clear()
            for listener in list(self._release_listeners):
                try:
                    listener()
                except Exception:
                    log.exception("release-change listener failed")

    async def poll(self) -> None:
        interval = self.config.server.observe_poll_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self.refresh()
            except Exception:
                log.exception("polling the store for changes failed")


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("audit write failed: %s", fut.exception())
