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

Store outages (a networked store: PostgreSQL restarting, a network cut): a request
that needs the store gets `StoreUnavailable`, rendered as 5.03 with Max-Age; what the
caches hold keeps being served (a known device's PSK, release and grant: sessions and
downloads in progress continue). The store connections come back by themselves: the
writer's on its next use (store/postgres.py, bounded backoff), the reader's from the
poll, off the loop (a connect may block). A re-established reader connection missed
whatever was committed meanwhile, so the poll then drops every cache and tells every
listener, as if everything had changed (docs/decisions/postgresql-store.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..config import Config
from ..core.errors import OtaError
from ..store import DataDir, DeviceRecord, Principal, ReleaseRecord, Role, Store
from ..store.campaigns import served_release
from ..store.deltas import DeltaRecord
from ..store.errors import StoreUnavailable
from ..store.models import ClassKey
from .credentials import PskDirectory, SessionClaim

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_CACHED = 8192
_CAMPAIGN_MIN_GAP = 0.2  # seconds between two campaign evaluations

# Seconds between polls for commits of other processes, at most: a removed or re-keyed
# principal's sessions end within this (plus one sweep of the session table).
REVOCATION_POLL = 0.5
_WRITER_RETRY = 1.0  # seconds between attempts to open the writer's connection


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
        self._writer_retry_at = 0.0
        self._outage_since: float | None = None  # clock() when the poll lost the store
        self.psks = PskDirectory(self.reader.lookup_credential, self._sealer.decoy)
        self._devices: dict[str, DeviceRecord | None] = {}
        self._operators: dict[str, bool] = {}
        self._class_releases: dict[ClassKey, ReleaseRecord | None] = {}
        self._releases_by_id: dict[int, ReleaseRecord | None] = {}
        self._has_deltas: dict[int, bool] = {}  # release id -> any delta envelopes?
        self._release_listeners: list[Callable[[], None]] = []
        self._principal_listeners: list[Callable[[], None]] = []
        # Bumped whenever the caches above are dropped, so caches derived from them
        # elsewhere (the /fw fast path's grants) know to drop theirs too.
        self.epoch = 0
        self._refusals: dict[tuple[str, str], float] = {}
        self._campaign_wake = asyncio.Event()
        # Firmware blocks served per image SHA-256 (fast path and /fw resource): the
        # campaigns' --block-rate budgets are checked against their rate.
        # Firmware blocks served per image (campaigns' --block-rate budgets) and bytes in
        # all (metrics), by the /fw resource and the fast path alike (count_served).
        self.blocks_served: collections.Counter[bytes] = collections.Counter()
        # This process's name for the rates it stores (several workers and hosts add
        # theirs up: CampaignStore.tick_campaigns).
        self.rate_source = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.fw_bytes_served = 0
        self.reader.changed_elsewhere()
        self._generations = self.reader.generations()
        self._reconnections = self.reader.reconnections()
        self.plain_principal: Principal | None = None
        if plain_identity is not None:
            found = self.reader.lookup_identity(plain_identity)
            if found is None:
                raise OtaError(f"--insecure-plain-identity {plain_identity!r} is not registered")
            self.plain_principal = found[0]

    # --- DB thread -----------------------------------------------------------------

    def count_served(self, digest: bytes, payload_bytes: int) -> None:
        """One firmware block of `digest` went out with `payload_bytes` bytes."""
        self.blocks_served[digest] += 1
        self.fw_bytes_served += payload_bytes

    def _in_db(self, fn: Callable[[Store], T]) -> T:
        writer = self._writer
        if writer is None:
            # Opened on first use; while the store is down, one attempt per interval
            # (each may take a connect timeout), the calls between refused at once.
            if time.monotonic() < self._writer_retry_at:
                raise StoreUnavailable("store unavailable")
            try:
                writer = self._writer = self.datadir.open_store()
            except StoreUnavailable:
                self._writer_retry_at = time.monotonic() + _WRITER_RETRY
                raise
        # A lost connection is re-established by the store itself, on this thread.
        return fn(writer)

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
        A session made with a key that was removed or replaced since has none, even
        in the moment before the server ends it (issue 10 §1).
        """
        principal: Principal | None = None
        for claim in getattr(remote, "authenticated_claims", ()):
            if isinstance(claim, SessionClaim):
                if not self.psks.is_current(claim):
                    return None
                principal = claim.principal
                break
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
        """What this device should run: the store's one rule (`served_release`: its
        pinned release, else the newer of its class's current and its campaign's)."""
        return served_release(device, self._release_by_id, self._class_release)

    def _with_image(self, release: ReleaseRecord | None) -> ReleaseRecord | None:
        """The release, its image first copied into blobs/ (verified) when the store is
        shared by several hosts (PostgreSQL, `Store.fill_image`); a missing image is
        logged, and /fw answers 5.00 for it as before."""
        if release is not None and not self.blobs.has(release.image.digest):
            try:
                if not self.reader.fill_image(release.image.digest, self.blobs):
                    log.error(
                        "image %s of %s is missing", release.image.image_id, release.class_label
                    )
            except StoreUnavailable:
                raise  # 5.03, and nothing cached: the next request tries again
            except OtaError as exc:
                log.error("image %s: %s", release.image.image_id, exc)
        return release

    def _release_by_id(self, rid: int) -> ReleaseRecord | None:
        if rid not in self._releases_by_id:
            self._releases_by_id[rid] = self._with_image(self.reader.release_by_id(rid))
        return self._releases_by_id[rid]

    def _class_release(self, key: ClassKey) -> ReleaseRecord | None:
        if key not in self._class_releases:
            self._class_releases[key] = self._with_image(self.reader.current_release(key))
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

    def on_principal_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after any device or operator was added, removed or re-keyed
        (the PSK cache is already fresh then: the DTLS pool ends stale sessions)."""
        self._principal_listeners.append(listener)

    def refresh(self) -> None:
        """Drop caches that another connection's commits made stale; tell observers.
        After the reader's connection was re-established: everything (module docstring)."""
        reconnections = self.reader.reconnections()
        if reconnections != self._reconnections:
            self.reader.changed_elsewhere()
            self._generations = self.reader.generations()
            self._reconnections = reconnections
            self._drop_caches(principals=True, releases=True)
            return
        if not self.reader.changed_elsewhere():
            return
        generations = self.reader.generations()
        principals_changed = generations[0] != self._generations[0]
        releases_changed = generations[1] != self._generations[1]
        self._generations = generations
        self._drop_caches(principals=principals_changed, releases=releases_changed)

    def _drop_caches(self, *, principals: bool, releases: bool) -> None:
        if principals or releases:
            # Device rows carry the class and the pinned release: both kinds matter.
            self._devices.clear()
            self.epoch += 1
        if principals:
            self.psks.invalidate()
            self._operators.clear()
            _notify(self._principal_listeners, "principal")
        if releases:
            self._class_releases.clear()
            self._releases_by_id.clear()
            self._has_deltas.clear()
            _notify(self._release_listeners, "release")

    @property
    def store_available(self) -> bool:
        """False from the poll's finding the store unreachable until it is back."""
        return self._outage_since is None

    def _store_lost(self, exc: StoreUnavailable) -> None:
        if self._outage_since is None:
            self._outage_since = self._clock()
            log.warning(
                "store unavailable: requests that need it get 5.03 Max-Age %d; "
                "cached sessions, releases and downloads continue",
                exc.max_age,
            )

    def _store_back(self) -> None:
        if self._outage_since is not None:
            log.warning("store available again after %.1f s", self._clock() - self._outage_since)
            self._outage_since = None

    # --- rollout campaigns ------------------------------------------------------------

    def wake_campaigns(self) -> None:
        """A report was stored: evaluate the campaigns soon (coalesced)."""
        self._campaign_wake.set()

    async def run_campaigns(self, interval: float) -> None:
        """Evaluate the campaigns (Store.tick_campaigns) on the DB thread after reports
        and every `interval` seconds (soak, timeouts and windows are time-driven); tell
        /m observers at once when an admission changed what a device is served."""
        seen = collections.Counter(self.blocks_served)
        since = self._clock()
        while True:
            # asyncio.timeout, not wait_for: in 3.11 wait_for swallows a cancellation
            # that arrives as the wait ends (a report just before shutdown), and this
            # loop would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._campaign_wake.wait()
            self._campaign_wake.clear()
            now = self._clock()
            elapsed = max(now - since, 1e-3)
            rates = {d: (n - seen[d]) / elapsed for d, n in self.blocks_served.items()}
            if now - since >= interval:  # a rate over at least one interval
                seen, since = collections.Counter(self.blocks_served), now
            started = self._clock()
            try:
                events = await self.db(functools.partial(_tick_campaigns, rates, self.rate_source))
            except StoreUnavailable:
                events = []  # the poll logs the outage; the next tick tries again
            except Exception:
                log.exception("evaluating the rollout campaigns failed")
                events = []
            if events:
                log.info("campaigns: %s", ", ".join(events))
                # The writer may be back before the loop's reader: the poll reconnects
                # that and refreshes everything then (this loop must not end here).
                with contextlib.suppress(StoreUnavailable):
                    self.refresh()
            # A burst of reports costs one evaluation per gap, not one each, and a big
            # campaign (an evaluation reads every member) takes at most a third of the
            # DB thread, which also commits the reports themselves.
            took = self._clock() - started
            await asyncio.sleep(max(_CAMPAIGN_MIN_GAP, 2 * took))

    async def poll(self) -> None:
        # Revocation must reach open sessions within a second of the CLI's commit
        # (issue 10 §1), whatever the Observe poll is configured to.
        interval = min(self.config.server.observe_poll_interval, REVOCATION_POLL)
        while True:
            await asyncio.sleep(interval)
            try:
                # A lost reader connection comes back here, off the loop (a connect may
                # block; the store's backoff bounds the attempts).
                if not await asyncio.to_thread(self.reader.reconnect):
                    raise StoreUnavailable("store unavailable")
                self.refresh()
                self._store_back()
            except StoreUnavailable as exc:
                self._store_lost(exc)
            except Exception:
                log.exception("polling the store for changes failed")


def _tick_campaigns(rates: dict[bytes, float], source: str, store: Store) -> list[str]:
    return store.tick_campaigns(block_rates=rates, rate_source=source)


def _notify(listeners: list[Callable[[], None]], what: str) -> None:
    for listener in list(listeners):
        try:
            listener()
        except StoreUnavailable as exc:
            log.warning("%s-change listener: %s", what, exc)
        except Exception:
            log.exception("%s-change listener failed", what)


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("audit write failed: %s", fut.exception())
