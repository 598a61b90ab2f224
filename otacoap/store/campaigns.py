"""Device tags and rollout campaigns in the SQLite store (migration 3).

The rules are otacoap/core/campaign.py's; this module persists what they decide, each
mutation in one transaction with its audit entries (like every store method).

What a device is served on /m (`SQLiteStore.release_for_device`, and the server's
`StoreView.release_for`, which mirrors it): a pinned release (`release assign`) wins;
otherwise the higher sequence number of its class's current release and the release a
campaign admitted it to (`devices.campaign_release`). So a device outside the open
waves keeps what it had, a device admitted gets the campaign's release, and a later
`publish --rollout all` of a higher release still reaches everyone.

Time-driven progress (reports turned into outcomes, timeouts, soak expiry, windows,
admissions) happens in `tick_campaigns`: the server runs it after every stored report
and every couple of seconds, and the CLI before it shows a campaign. It is idempotent
and one transaction, so a server killed mid-wave loses nothing: reports are durable
on their own, an outcome is derived from them again, and a member is admitted at most
once (its row says so, committed with its audit entry and its served release).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..core import campaign as rules
from ..core.campaign import (
    ACTIVE_STATES,
    CampaignError,
    CampaignState,
    MemberState,
    Policy,
    Progress,
    Target,
    WaveCounts,
    WaveSize,
)
from .errors import NotFound
from .models import (
    CampaignMember,
    CampaignRecord,
    CampaignStatus,
    ClassKey,
    DeviceRecord,
    ReleaseRecord,
)

if TYPE_CHECKING:
    from .audit import AuditEntry

MIGRATION = (
    3,
    "device tags and rollout campaigns",
    (
        """CREATE TABLE device_tags (
            device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (device_id, key)) WITHOUT ROWID""",
        "ALTER TABLE devices ADD COLUMN campaign_release INTEGER REFERENCES releases(id)",
        """CREATE TABLE campaigns (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            release_id INTEGER NOT NULL REFERENCES releases(id),
            target TEXT NOT NULL,
            waves TEXT NOT NULL,
            policy TEXT NOT NULL,
            state TEXT NOT NULL,
            opened INTEGER NOT NULL,
            wave_count INTEGER NOT NULL,
            reached_at REAL,
            approved INTEGER NOT NULL,
            failure_ack TEXT NOT NULL,
            halt_reason TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX campaigns_by_state ON campaigns (state)",
        """CREATE TABLE campaign_members (
            campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
            device_id TEXT NOT NULL,
            wave INTEGER NOT NULL,
            rank BLOB NOT NULL,
            state TEXT NOT NULL,
            admitted_at REAL,
            report_mark INTEGER NOT NULL DEFAULT 0,
            done_at REAL,
            reason TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (campaign_id, device_id)) WITHOUT ROWID""",
        "CREATE INDEX campaign_members_by_device ON campaign_members (device_id)",
    ),
)

_ACTIVE_SQL = "('running', 'paused', 'halted')"

# Issue 14 §2: a campaign's --block-rate budget is for all server processes together.
# Each one stores the rates it measured (one row per process and image); an evaluation
# compares the sum of the fresh rows with the budget (docs/decisions/several-workers.md).
BLOCK_RATES_MIGRATION = (
    8,
    "firmware block rates measured by each server process (--block-rate across workers)",
    (
        """CREATE TABLE block_rates (
            source TEXT NOT NULL,
            digest BLOB NOT NULL,
            rate REAL NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (source, digest))""",
    ),
)
RATE_FRESH = 5.0  # seconds a process's measured rate counts after it stored it
_OPEN_MEMBER_SQL = "('pending', 'admitted')"
_CAMPAIGN_COLUMNS = (
    "c.id, c.release_id, r.class_label, r.seq, c.target, c.waves, c.policy, c.state, c.opened, "
    "c.wave_count, c.reached_at, c.approved, c.failure_ack, c.halt_reason, c.created_at, "
    "c.created_by, c.updated_at"
)
_MAX_REASON = 2000


def _policy_json(p: Policy) -> str:
    return json.dumps(
        {
            "success_threshold": p.success_threshold,
            "failure_threshold": p.failure_threshold,
            "soak": p.soak,
            "approve": p.approve,
            "timeout": p.timeout,
            "window": str(p.window) if p.window else None,
            "urgent": p.urgent,
            "max_downloads": p.max_downloads,
            "block_rate": p.block_rate,
        },
        sort_keys=True,
    )


def _policy(text: str) -> Policy:
    d = json.loads(text)
    window = rules.parse_window(d["window"]) if d.get("window") else None
    return Policy(
        success_threshold=d["success_threshold"],
        failure_threshold=d["failure_threshold"],
        soak=d["soak"],
        approve=d["approve"],
        timeout=d["timeout"],
        window=window,
        urgent=d["urgent"],
        max_downloads=d["max_downloads"],
        block_rate=d.get("block_rate"),
    )


def _target_json(t: Target) -> str:
    return json.dumps({"tags": [list(kv) for kv in t.tags], "devices": list(t.device_ids)})


def _target(text: str) -> Target:
    d = json.loads(text)
    return Target(tuple((k, v) for k, v in d["tags"]), tuple(d["devices"]))


def _campaign(row: Sequence[Any]) -> CampaignRecord:
    (cid, rid, label, seq, target, waves, policy, state, opened, wave_count, reached_at,
     approved, ack, halt_reason, created_at, created_by, updated_at) = row  # fmt: skip
    progress = Progress(
        state=CampaignState(state),
        opened=opened,
        wave_count=wave_count,
        reached_at=reached_at,
        approved=approved,
        failure_ack=tuple(json.loads(ack)),
        halt_reason=halt_reason,
    )
    return CampaignRecord(
        cid,
        rid,
        label,
        seq,
        _target(target),
        rules.parse_waves(waves),
        _policy(policy),
        progress,
        created_at,
        created_by,
        updated_at,
    )


def served_release(
    device: DeviceRecord,
    release_by_id: Callable[[int], ReleaseRecord | None],
    current: Callable[[ClassKey], ReleaseRecord | None],
) -> ReleaseRecord | None:
    """The one rule of what a device is served (module docstring); the store and the
    server's cached view both call it."""
    if device.assigned_release is not None:
        return release_by_id(device.assigned_release)
    base = current(device.class_key)
    if device.campaign_release is None:
        return base
    admitted = release_by_id(device.campaign_release)
    if admitted is None or (base is not None and base.sequence_number >= admitted.sequence_number):
        return base
    return admitted


class CampaignStore:
    """Tags and campaigns; mixed into SQLiteStore (its connection, transactions, audit)."""

    if TYPE_CHECKING:
        _db: sqlite3.Connection
        _clock: Callable[[], float]

        def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...
        def _bump(self, key: str) -> None: ...
        def _now(self) -> str: ...
        def audit(
            self, actor: str, action: str, subject: str, outcome: str, detail: str = ""
        ) -> AuditEntry: ...
        def get_device(self, device_id: str) -> DeviceRecord | None: ...
        def release_by_id(self, release_id: int) -> ReleaseRecord | None: ...
        def current_release(self, key: ClassKey) -> ReleaseRecord | None: ...

    # --- tags --------------------------------------------------------------------------

    def device_tags(self, device_id: str) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT key, value FROM device_tags WHERE device_id = ? ORDER BY key", (device_id,)
        ).fetchall()
        return dict(rows)

    def set_device_tags(self, device_id: str, tags: Mapping[str, str], actor: str) -> None:
        """Add or overwrite tags (checked by core.campaign.parse_tag's alphabet)."""
        for k, v in tags.items():
            rules.parse_tag(f"{k}={v}")
        with self._tx() as db:
            if self.get_device(device_id) is None:
                raise NotFound(f"no device {device_id!r}")
            for k, v in sorted(tags.items()):
                db.execute(
                    "INSERT INTO device_tags (device_id, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (device_id, key) DO UPDATE SET value = excluded.value",
                    (device_id, k, v),
                )
            detail = " ".join(f"{k}={v}" for k, v in sorted(tags.items()))
            self.audit(actor, "device.tag", device_id, "ok", detail)

    def remove_device_tags(self, device_id: str, keys: Sequence[str], actor: str) -> None:
        for k in keys:
            rules.check_tag_key(k)
        with self._tx() as db:
            if self.get_device(device_id) is None:
                raise NotFound(f"no device {device_id!r}")
            for k in keys:
                db.execute(
                    "DELETE FROM device_tags WHERE device_id = ? AND key = ?", (device_id, k)
                )
            self.audit(actor, "device.untag", device_id, "ok", " ".join(sorted(keys)))

    # --- releases ----------------------------------------------------------------------

    def latest_release(self, key: ClassKey) -> ReleaseRecord | None:
        """The class's release with the highest sequence number, current or not."""
        row = self._db.execute(
            "SELECT id FROM releases WHERE vendor_id = ? AND class_id = ? ORDER BY seq DESC "
            "LIMIT 1",
            key,
        ).fetchone()
        return self.release_by_id(row[0]) if row else None

    # --- campaigns: reading ------------------------------------------------------------

    def get_campaign(self, campaign_id: int) -> CampaignRecord | None:
        row = self._db.execute(
            f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns c JOIN releases r ON r.id = c.release_id "
            "WHERE c.id = ?",
            (campaign_id,),
        ).fetchone()
        return _campaign(row) if row else None

    def _campaign_or_raise(self, campaign_id: int) -> CampaignRecord:
        c = self.get_campaign(campaign_id)
        if c is None:
            raise NotFound(f"no campaign {campaign_id}")
        return c

    def list_campaigns(self, *, active_only: bool = False) -> list[CampaignRecord]:
        where = f"WHERE c.state IN {_ACTIVE_SQL}" if active_only else ""
        rows = self._db.execute(
            f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns c JOIN releases r ON r.id = c.release_id "
            f"{where} ORDER BY c.id"
        ).fetchall()
        return [_campaign(r) for r in rows]

    def campaign_members(self, campaign_id: int) -> list[CampaignMember]:
        rows = self._db.execute(
            "SELECT device_id, wave, state, admitted_at, done_at, reason FROM campaign_members "
            "WHERE campaign_id = ? ORDER BY wave, rank",
            (campaign_id,),
        ).fetchall()
        return [CampaignMember(d, w, MemberState(s), a, t, r) for d, w, s, a, t, r in rows]

    def campaign_status(self, campaign_id: int) -> CampaignStatus:
        c = self._campaign_or_raise(campaign_id)
        members = self.campaign_members(campaign_id)
        return CampaignStatus(c, _counts(members, c.progress.wave_count), tuple(members))

    # --- campaigns: operator transitions -----------------------------------------------

    def create_campaign(
        self,
        release_id: int,
        target: Target,
        waves: Sequence[WaveSize],
        policy: Policy,
        actor: str,
    ) -> CampaignRecord:
        """A new running campaign; its first wave opens now (admission: `tick_campaigns`).

        Devices of the target that are in an older active campaign (not yet done
        there) are taken over: superseded there, members here.
        """
        now_s = self._now()
        waves = tuple(waves)
        if not waves or waves[-1] != WaveSize(100, True):
            waves = rules.parse_waves(rules.format_waves(waves) or "100%")
        with self._tx() as db:
            release = self.release_by_id(release_id)
            if release is None:
                raise NotFound(f"no release {release_id}")
            current = self.current_release(release.class_key)
            if current is not None and current.sequence_number >= release.sequence_number:
                # Every device is already served it or something newer: the campaign
                # could only time out. A rollback is a new release (release rebuild).
                raise CampaignError(
                    f"{release.class_label} seq {release.sequence_number} is not above the "
                    f"class's current release (seq {current.sequence_number})"
                )
            cur = db.execute(
                "INSERT INTO campaigns (release_id, target, waves, policy, state, opened, "
                "wave_count, reached_at, approved, failure_ack, halt_reason, created_at, "
                "created_by, updated_at) VALUES (?, ?, ?, ?, 'running', 1, ?, NULL, 1, '[]', '', "
                "?, ?, ?)",
                (
                    release_id,
                    _target_json(target),
                    rules.format_waves(waves),
                    _policy_json(policy),
                    len(waves),
                    now_s,
                    actor,
                    now_s,
                ),
            )
            cid = int(cur.lastrowid or 0)
            devices = self._targeted(release.class_key, target)
            initial = rules.assign_waves(cid, devices, waves)
            sizes = [0] * len(waves)
            for device_id, wave in initial.items():
                self._join(cid, release, device_id, wave, actor)
                sizes[wave] += 1
            self.audit(
                actor,
                "campaign.create",
                f"campaign {cid}",
                "ok",
                f"{release.class_label} seq {release.sequence_number}, target {target}, waves "
                f"{rules.format_waves(waves)} (sizes {'/'.join(map(str, sizes))}), "
                f"policy {_policy_json(policy)}",
            )
        return self._campaign_or_raise(cid)

    def _transition(
        self,
        campaign_id: int,
        actor: str,
        action: str,
        change: Callable[[Progress, tuple[WaveCounts, ...]], Progress],
    ) -> CampaignRecord:
        with self._tx():
            c = self._campaign_or_raise(campaign_id)
            counts = _counts(self.campaign_members(campaign_id), c.progress.wave_count)
            new = change(c.progress, counts)
            self._save_progress(campaign_id, new)
            detail = f"state {c.progress.state.value} -> {new.state.value}"
            if action == "campaign.approve":
                detail = f"wave {new.approved} may open"
            self.audit(actor, action, f"campaign {campaign_id}", "ok", detail)
            if new.state is CampaignState.CANCELLED:
                self._withdraw_unfinished(campaign_id, c.release_id)
        return self._campaign_or_raise(campaign_id)

    def pause_campaign(self, campaign_id: int, actor: str) -> CampaignRecord:
        return self._transition(campaign_id, actor, "campaign.pause", lambda p, _w: rules.paused(p))

    def resume_campaign(self, campaign_id: int, actor: str) -> CampaignRecord:
        return self._transition(campaign_id, actor, "campaign.resume", rules.resumed)

    def cancel_campaign(self, campaign_id: int, actor: str) -> CampaignRecord:
        """Cancelled: nobody more is admitted; admitted devices not yet done go back to
        what they had (their download stops at the next check); updated ones stay."""
        return self._transition(
            campaign_id, actor, "campaign.cancel", lambda p, _w: rules.cancelled(p)
        )

    def approve_campaign(self, campaign_id: int, actor: str) -> CampaignRecord:
        return self._transition(
            campaign_id, actor, "campaign.approve", lambda p, _w: rules.approved(p)
        )

    # --- campaigns: progress -----------------------------------------------------------

    def tick_campaigns(
        self,
        now: float | None = None,
        block_rates: Mapping[bytes, float] | None = None,
        rate_source: str | None = None,
    ) -> list[str]:
        """Evaluate every active campaign once (module docstring); the audit actions of
        the transitions that happened. Cheap when no campaign is active.

        `block_rates`: firmware blocks/s per image SHA-256 as the server measured them;
        a campaign with a --block-rate budget admits only when given one (the server's
        evaluation), never from the CLI's. With `rate_source` (one server process's
        name) they are stored as that process's, and the campaigns are evaluated against
        the sum of every process's fresh rates: the budget holds across workers."""
        active = [
            r[0]
            for r in self._db.execute(
                f"SELECT id FROM campaigns WHERE state IN {_ACTIVE_SQL} ORDER BY id DESC"
            ).fetchall()
        ]
        if not active:
            return []
        t = self._clock() if now is None else now
        events: list[str] = []
        with self._tx():
            if block_rates is not None and rate_source is not None:
                block_rates = self._all_block_rates(rate_source, block_rates, t)
            served_changed = False
            # Newest first: a device joining the targets of two campaigns joins the newest.
            for cid in active:
                changed, happened = self._tick_one(cid, t, block_rates)
                served_changed |= changed
                events += happened
            if served_changed:
                self._bump("release_generation")
        return events

    def _all_block_rates(
        self, source: str, measured: Mapping[bytes, float], now: float
    ) -> dict[bytes, float]:
        """Store this process's rates, forget stale ones; every process's, summed."""
        for digest, rate in measured.items():
            self._db.execute(
                "INSERT INTO block_rates (source, digest, rate, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (source, digest) DO UPDATE SET rate = excluded.rate, "
                "at = excluded.at",
                (source, digest, rate, now),
            )
        self._db.execute("DELETE FROM block_rates WHERE at < ?", (now - RATE_FRESH,))
        return {
            bytes(digest): float(total)
            for digest, total in self._db.execute(
                "SELECT digest, SUM(rate) FROM block_rates GROUP BY digest"
            ).fetchall()
        }

    def _tick_one(
        self, cid: int, now: float, block_rates: Mapping[bytes, float] | None
    ) -> tuple[bool, list[str]]:
        c = self._campaign_or_raise(cid)
        if c.progress.state not in ACTIVE_STATES:
            return False, []  # ended by another connection since the list was read
        release = self.release_by_id(c.release_id)
        assert release is not None  # releases are never deleted
        actor = "campaign"
        changed = False
        members = {m.device_id: m for m in self.campaign_members(cid)}
        # 1. Membership: joiners to a later wave; pending members who left the target.
        targeted = set(self._targeted(release.class_key, c.target))
        if c.progress.state in ACTIVE_STATES:
            wave = rules.joiner_wave(c.progress.opened, c.progress.wave_count)
            for device_id in sorted(targeted - members.keys()):
                if self._in_newer_campaign(cid, device_id):
                    continue
                self._join(cid, release, device_id, wave, actor)
        existing = {
            r[0]
            for r in self._db.execute(
                "SELECT id FROM devices WHERE vendor_id = ? AND class_id = ?", release.class_key
            )
        }
        gone = {
            d
            for d, m in members.items()
            if m.state in (MemberState.PENDING, MemberState.ADMITTED) and d not in existing
        }
        for device_id, m in members.items():
            if device_id in gone:
                self._set_member(cid, device_id, MemberState.LEFT, now, "device removed")
            elif m.state is MemberState.PENDING and device_id not in targeted:
                self._set_member(cid, device_id, MemberState.LEFT, now, "left the target")
        # 2. Outcomes of admitted (and failed) members, from the reports stored since
        # their admission.
        for m in self.campaign_members(cid):
            if m.state in (MemberState.ADMITTED, MemberState.FAILED):
                changed |= self._settle(cid, m, release, c.policy, now)
        # 3. The rules: halt, reach, soak, approve, open, finish; then admit.
        members_now = self.campaign_members(cid)
        counts = _counts(members_now, c.progress.wave_count)
        if not any(w.size for w in counts) and any(
            m.state is MemberState.SUPERSEDED for m in members_now
        ):
            # Nothing of it is left: it did not finish, it was replaced.
            self._save_progress(cid, replace(c.progress, state=CampaignState.SUPERSEDED))
            self.audit(
                actor,
                "campaign.superseded",
                f"campaign {cid}",
                "ok",
                "every one of its devices was taken over by a newer campaign",
            )
            return changed, ["campaign.superseded"]
        measured = None
        if block_rates is not None:
            measured = block_rates.get(release.image.digest, 0.0)
        decision = rules.evaluate(c.policy, c.progress, counts, now, measured)
        progress = decision.progress
        happened: list[str] = []
        for action, detail in decision.events:
            if action == "campaign.halt":
                detail = self._halt_detail(cid, detail, progress)
                progress = replace(progress, halt_reason=detail[:_MAX_REASON])
            self.audit(actor, action, f"campaign {cid}", "ok", detail)
            happened.append(action)
        if progress != c.progress:
            self._save_progress(cid, progress)
        if decision.admit:
            admitted = self._admit(cid, release, progress.opened, decision.admit, now)
            if admitted:
                changed = True
                happened.append("campaign.admit")
                self.audit(
                    actor,
                    "campaign.admit",
                    f"campaign {cid}",
                    "ok",
                    f"{len(admitted)} device(s): {' '.join(admitted)}",
                )
        if progress.state is CampaignState.FINISHED and c.target.whole_class:
            current = self.current_release(release.class_key)
            if current is None or current.sequence_number < release.sequence_number:
                # The whole class is on it: devices registered from now on get it too.
                self._db.execute(
                    "INSERT INTO current_releases (vendor_id, class_id, release_id) "
                    "VALUES (?, ?, ?) ON CONFLICT (vendor_id, class_id) "
                    "DO UPDATE SET release_id = excluded.release_id",
                    (*release.class_key, release.id),
                )
                changed = True
                self.audit(
                    actor,
                    "release.current",
                    f"{release.class_label} seq {release.sequence_number}",
                    "ok",
                    f"campaign {cid} finished over the whole class",
                )
        return changed, happened

    # --- helpers -----------------------------------------------------------------------

    def _targeted(self, key: ClassKey, target: Target) -> list[str]:
        """Device ids of the class that the target selects; pinned devices are left out
        (a pin is an explicit assignment, and wins: see the module docstring)."""
        rows = self._db.execute(
            "SELECT id FROM devices WHERE vendor_id = ? AND class_id = ? "
            "AND assigned_release IS NULL ORDER BY id",
            key,
        ).fetchall()
        ids = [r[0] for r in rows]
        if target.whole_class:
            return ids
        if target.device_ids:
            ids = [d for d in ids if d in target.device_ids]
        if not target.tags:
            return ids
        tags: dict[str, dict[str, str]] = {}
        for device_id, k, v in self._db.execute(
            "SELECT t.device_id, t.key, t.value FROM device_tags t JOIN devices d "
            "ON d.id = t.device_id WHERE d.vendor_id = ? AND d.class_id = ?",
            key,
        ):
            tags.setdefault(device_id, {})[k] = v
        return [d for d in ids if target.matches(d, tags.get(d, {}))]

    def _in_newer_campaign(self, cid: int, device_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM campaign_members m JOIN campaigns c ON c.id = m.campaign_id "
            f"WHERE m.device_id = ? AND c.id > ? AND c.state IN {_ACTIVE_SQL} "
            "AND m.state NOT IN ('superseded', 'left') LIMIT 1",
            (device_id, cid),
        ).fetchone()
        return row is not None

    def _join(
        self, cid: int, release: ReleaseRecord, device_id: str, wave: int, actor: str
    ) -> None:
        """Make `device_id` a member in `wave`, superseding older active campaigns."""
        older = self._db.execute(
            "SELECT m.campaign_id FROM campaign_members m JOIN campaigns c "
            "ON c.id = m.campaign_id WHERE m.device_id = ? AND c.id < ? "
            f"AND c.state IN {_ACTIVE_SQL} AND m.state IN {_OPEN_MEMBER_SQL}",
            (device_id, cid),
        ).fetchall()
        for (old,) in older:
            self._set_member(
                old, device_id, MemberState.SUPERSEDED, self._clock(), f"campaign {cid}"
            )
            self.audit(
                actor, "campaign.supersede", f"campaign {old}", "ok", f"{device_id} -> {cid}"
            )
        state, reason = MemberState.PENDING, ""
        installed = self._installed_seq(device_id)
        if installed is not None and installed >= release.sequence_number:
            state, reason = MemberState.SUCCEEDED, f"already on seq {installed}"
        self._db.execute(
            "INSERT INTO campaign_members (campaign_id, device_id, wave, rank, state, done_at, "
            "reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                cid,
                device_id,
                wave,
                rules.rank(cid, device_id),
                state.value,
                self._clock() if state is MemberState.SUCCEEDED else None,
                reason,
            ),
        )

    def _installed_seq(self, device_id: str) -> int | None:
        row = self._db.execute(
            "SELECT installed_seq FROM reports WHERE device_id = ? AND installed_seq IS NOT NULL "
            "ORDER BY id DESC LIMIT 1",
            (device_id,),
        ).fetchone()
        return int(row[0]) if row else None

    def _set_member(
        self, cid: int, device_id: str, state: MemberState, now: float, reason: str
    ) -> None:
        self._db.execute(
            "UPDATE campaign_members SET state = ?, done_at = ?, reason = ? "
            "WHERE campaign_id = ? AND device_id = ?",
            (state.value, now, reason[:500], cid, device_id),
        )

    def _settle(
        self, cid: int, m: CampaignMember, release: ReleaseRecord, policy: Policy, now: float
    ) -> bool:
        """Turn an admitted member's reports (or its silence) into an outcome; True if
        what the device is served changed.

        A failure counts at once (thresholds), but only a reverted or rejected release
        is withdrawn from the device: after a failed download (a link problem) it keeps
        being served, resumes, and a later confirmation turns the failure into a
        success (so does one after a timeout).
        """
        mark = self._db.execute(
            "SELECT report_mark FROM campaign_members WHERE campaign_id = ? AND device_id = ?",
            (cid, m.device_id),
        ).fetchone()[0]
        seq = release.sequence_number
        state_now = m.state
        for state, reason_code, rseq, installed, detail in self._db.execute(
            "SELECT state, reason, seq, installed_seq, detail FROM reports "
            "WHERE device_id = ? AND id > ? ORDER BY id",
            (m.device_id, mark),
        ).fetchall():
            verdict = rules.report_verdict(state) if rseq == seq else None
            if verdict is None and installed is not None and installed >= seq:
                verdict = MemberState.SUCCEEDED
            if verdict is MemberState.SUCCEEDED:
                self._set_member(cid, m.device_id, verdict, now, state)
                if m.state is MemberState.FAILED:  # late success: serve what it runs
                    return self._serve(m.device_id, release.id)
                return False
            if verdict is MemberState.FAILED and state_now is MemberState.ADMITTED:
                why = f"{state} (reason {reason_code})" + (f": {detail}" if detail else "")
                self._set_member(cid, m.device_id, verdict, now, why)
                state_now = MemberState.FAILED
                if state in ("reverted", "rejected"):
                    # Not served the failing release again: back to what it had.
                    return self._withdraw(m.device_id, release.id)
        if (
            state_now is MemberState.ADMITTED
            and m.admitted_at is not None
            and now - m.admitted_at >= policy.timeout
        ):
            self._set_member(
                cid,
                m.device_id,
                MemberState.FAILED,
                now,
                f"timed out ({rules.format_duration(policy.timeout)} without confirming)",
            )
        return False

    def _serve(self, device_id: str, release_id: int) -> bool:
        cur = self._db.execute(
            "UPDATE devices SET campaign_release = ? WHERE id = ? "
            "AND (campaign_release IS NULL OR campaign_release != ?)",
            (release_id, device_id, release_id),
        )
        return cur.rowcount > 0

    def _withdraw(self, device_id: str, release_id: int) -> bool:
        cur = self._db.execute(
            "UPDATE devices SET campaign_release = NULL WHERE id = ? AND campaign_release = ?",
            (device_id, release_id),
        )
        return cur.rowcount > 0

    def _withdraw_unfinished(self, cid: int, release_id: int) -> None:
        rows = self._db.execute(
            "SELECT device_id FROM campaign_members WHERE campaign_id = ? AND state = 'admitted'",
            (cid,),
        ).fetchall()
        if any([self._withdraw(d, release_id) for (d,) in rows]):
            self._bump("release_generation")

    def _admit(
        self, cid: int, release: ReleaseRecord, opened: int, budget: int, now: float
    ) -> list[str]:
        rows = self._db.execute(
            "SELECT m.device_id FROM campaign_members m JOIN devices d ON d.id = m.device_id "
            "WHERE m.campaign_id = ? AND m.state = 'pending' AND m.wave < ? "
            "AND d.assigned_release IS NULL ORDER BY m.wave, m.rank LIMIT ?",
            (cid, opened, budget),
        ).fetchall()
        admitted: list[str] = []
        for (device_id,) in rows:
            mark = self._db.execute(
                "SELECT COALESCE(MAX(id), 0) FROM reports WHERE device_id = ?", (device_id,)
            ).fetchone()[0]
            cur = self._db.execute(
                "UPDATE campaign_members SET state = 'admitted', admitted_at = ?, report_mark = ? "
                "WHERE campaign_id = ? AND device_id = ? AND state = 'pending'",
                (now, mark, cid, device_id),
            )
            if cur.rowcount != 1:  # pragma: no cover - one writer at a time
                continue
            self._db.execute(
                "UPDATE devices SET campaign_release = ? WHERE id = ?", (release.id, device_id)
            )
            admitted.append(device_id)
        return admitted

    def _halt_detail(self, cid: int, reason: str, progress: Progress) -> str:
        failed = [
            f"{m.device_id} (wave {m.wave + 1}: {m.reason})"
            for m in self.campaign_members(cid)
            if m.state is MemberState.FAILED and m.wave < progress.opened
        ]
        return f"{reason}; failed: {', '.join(failed)}" if failed else reason

    def _save_progress(self, cid: int, p: Progress) -> None:
        self._db.execute(
            "UPDATE campaigns SET state = ?, opened = ?, reached_at = ?, approved = ?, "
            "failure_ack = ?, halt_reason = ?, updated_at = ? WHERE id = ?",
            (
                p.state.value,
                p.opened,
                p.reached_at,
                p.approved,
                json.dumps(list(p.failure_ack)),
                p.halt_reason,
                self._now(),
                cid,
            ),
        )


def _counts(members: Sequence[CampaignMember], wave_count: int) -> tuple[WaveCounts, ...]:
    tally = [[0, 0, 0, 0] for _ in range(wave_count)]
    slot = {
        MemberState.PENDING: 0,
        MemberState.ADMITTED: 1,
        MemberState.SUCCEEDED: 2,
        MemberState.FAILED: 3,
    }
    for m in members:
        i = slot.get(m.state)
        if i is not None and m.wave < wave_count:
            tally[m.wave][i] += 1
    return tuple(WaveCounts(*t) for t in tally)


def campaign_dict(c: CampaignRecord) -> dict[str, Any]:
    """A campaign as plain JSON-able data (`campaign ... --json`, the fleet simulator)."""
    p, pol = c.progress, c.policy
    return {
        "id": c.id,
        "release": {"class": c.class_label, "seq": c.sequence_number, "id": c.release_id},
        "state": c.state,
        "target": str(c.target),
        "waves": rules.format_waves(c.waves),
        "opened": p.opened,
        "wave_count": p.wave_count,
        "approved": p.approved,
        "halt_reason": p.halt_reason,
        "policy": {
            "success_threshold": pol.success_threshold,
            "failure_threshold": pol.failure_threshold,
            "soak": pol.soak,
            "approve": pol.approve,
            "timeout": pol.timeout,
            "window": str(pol.window) if pol.window else None,
            "urgent": pol.urgent,
            "max_downloads": pol.max_downloads,
            "block_rate": pol.block_rate,
        },
        "created_at": c.created_at,
        "created_by": c.created_by,
        "updated_at": c.updated_at,
    }


def status_dict(s: CampaignStatus, members: bool) -> dict[str, Any]:
    d = campaign_dict(s.campaign)
    d["per_wave"] = [
        {
            "wave": i + 1,
            "open": i < s.campaign.progress.opened,
            "size": w.size,
            "pending": w.pending,
            "admitted": w.admitted,
            "succeeded": w.succeeded,
            "failed": w.failed,
        }
        for i, w in enumerate(s.waves)
    ]
    if members:
        d["members"] = [
            {
                "device": m.device_id,
                "wave": m.wave + 1,
                "state": m.state.value,
                "reason": m.reason,
            }
            for m in s.members
        ]
    return d


__all__ = [
    "MIGRATION",
    "CampaignError",
    "CampaignStore",
    "campaign_dict",
    "served_release",
    "status_dict",
]
