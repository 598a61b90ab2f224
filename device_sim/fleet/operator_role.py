"""The fleet simulator's operator role: its one seam to the server side.

The simulator plays two parts. As devices (`worker`) it only speaks CoAP/DTLS like any
device. As the operator of its own test fleet it also registers devices, publishes the
release and afterwards reads the server's store to check every "confirmed" report.
Every one of those operations is here, and this is the only module of the package
that imports the store (`otacoap.store`) or the operator's network client, so the
layer rule "device_sim imports otacoap.core" has exactly one declared exception.

Two ways to reach the server side, chosen by the options:
* `--data DIR` (local): the server's own store, the code path of `otacoap device add`
  and `otacoap publish`; SQLite in WAL mode lets this process and the running server
  share the file, and the server notices both through its store poll;
* `--operator NAME --operator-psk HEX` (network): publish as an operator over DTLS;
  the devices must already be registered (`--devices-file`), and the store cannot be
  read afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otacoap import eventloop
from otacoap.campaign_args import CampaignPlan, parse_plan
from otacoap.cliargs import CliError
from otacoap.core.errors import OtaError
from otacoap.core.ids import class_key_of
from otacoap.operator.client import publish
from otacoap.store import DataDir, Publisher
from otacoap.store.names import check_device_id
from otacoap.store.publish_delta import publish_file_any

from .options import PSK_LENGTH, FleetError, FleetOptions, read_input
from .report import FleetDeviceOutcome

_log = logging.getLogger(__name__)

# The actor the store's audit log records for the fleet's registrations and publishes.
ACTOR = "fleet-simulator"
# `otacoap serve` holds an exclusive flock on this file while it runs (server/app.py).
SERVE_LOCK = "serve.lock"


def parse_campaign(text: str) -> CampaignPlan:
    """`--campaign "OPTIONS"`: parsed by `otacoap campaign create`'s own option
    definitions (otacoap/campaign_args.py), so both take the same options."""
    try:
        return parse_plan(text)
    except CliError as exc:
        raise FleetError(f"--campaign: {exc}") from None


def check_server_running(data: Path) -> None:
    """Refuse before registering anything unless an `otacoap serve` runs on `data`.

    The server holds an exclusive lock on DATA/serve.lock while it runs; if a shared
    lock can be taken, nobody serves this data directory and every device registered
    now would only be left behind.
    """
    DataDir(data).check()  # not a data directory at all says so first
    path = data / SERVE_LOCK
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise FleetError(
            f"no 'otacoap serve' has run on {data} (no {SERVE_LOCK}): start the server first"
        ) from None
    except OSError as exc:
        raise FleetError(f"cannot check the server's lock {path}: {exc.strerror}") from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # held by the running server
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    raise FleetError(f"no 'otacoap serve' is running on {data}: start the server first")


def read_devices_file(path: Path, n: int) -> tuple[tuple[str, bytes], ...]:
    """Lines of `DEVICE_ID PSK_HEX` (blank lines and # comments ignored)."""
    out: list[tuple[str, bytes]] = []
    text = read_input(path, 16 * 1024 * 1024, "--devices-file").decode("utf-8", "replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise FleetError(f"{path}:{lineno}: expected 'DEVICE_ID PSK_HEX'")
        try:
            check_device_id(parts[0])
            psk = bytes.fromhex(parts[1])
        except (OtaError, ValueError) as exc:
            raise FleetError(f"{path}:{lineno}: {exc}") from None
        if len(psk) != PSK_LENGTH:
            raise FleetError(f"{path}:{lineno}: PSK must be {PSK_LENGTH} bytes")
        out.append((parts[0], psk))
        if len(out) == n:
            break
    if len(out) < n:
        raise FleetError(f"{path} lists {len(out)} devices, --devices asks for {n}")
    return tuple(out)


def register_and_publish(
    opts: FleetOptions,
    devices: Sequence[tuple[str, bytes]],
    vendor: str,
    class_info: str,
    envelope: bytes,
    image_path: Path,
    key: Any,
    *,
    rollout: str = "all",
    factory: tuple[bytes, Path] | None = None,
    registered: list[str] | None = None,
    delta: tuple[bytes, Path] | None = None,
    source_seq: int = 0,
) -> dict[str, Any]:
    """Register through the store (as `otacoap device add`) and publish (as
    `otacoap publish --rollout ROLLOUT`); the server notices both through its store
    poll. With rollout "none" nobody gets the release until `start_campaign`; then
    `factory` (envelope, image) is published first as the class's current release, so
    devices outside the open waves are served what they already run.

    `delta` (envelope, patch): published after the release (as `otacoap publish
    --delta`); the factory is then the delta's source release and must be in the store
    as `source_seq`, published here if the class has none yet."""
    assert opts.data is not None
    datadir = DataDir(opts.data)
    config = datadir.config()
    store = datadir.open_store()
    try:
        if key.public.key_id not in {a.key_id for a in store.list_anchors()}:
            raise FleetError(
                f"the server in {opts.data} does not trust --key (key id "
                f"{key.public.key_id}); run 'otacoap trust add --data {opts.data} KEY.pub'"
            )
        for device_id, psk in devices:
            store.add_device(device_id, vendor, class_info, psk, ACTOR)
            if registered is not None:
                registered.append(device_id)
        key_of_class = class_key_of(vendor, class_info)
        current = store.current_release(key_of_class)
        publisher = Publisher(store, datadir.blobs, config.publish)
        if factory is not None and current is None:
            publisher.publish_file(factory[0], factory[1], ACTOR, make_current=True)
            current = store.current_release(key_of_class)
        if delta is not None:
            assert factory is not None
            _check_delta_source(store, key_of_class, source_seq, factory[0])
        if current is not None and current.envelope == envelope:
            published = "already current"
        else:
            publisher.publish_file(envelope, image_path, ACTOR, make_current=rollout == "all")
            published = "published"
        facts: dict[str, Any] = {}
        if delta is not None:
            try:
                done = publish_file_any(publisher, delta[0], delta[1], ACTOR)
            except OtaError as exc:
                raise FleetError(f"publishing the delta failed: {exc}") from None
            facts["delta"] = done.line()
    finally:
        store.close()
    s = config.server
    if opts.concurrency > s.max_dtls_sessions:
        # Every device in flight needs a session; beyond the cap, newly admitted ones
        # push out the least recently used, which may still be downloading.
        _log.warning(
            "concurrency %d but the server's max_dtls_sessions is %d: devices in flight "
            "will push each other's sessions out; raise it in %s/config.toml",
            opts.concurrency,
            s.max_dtls_sessions,
            opts.data,
        )
    return {
        **facts,
        "data": str(opts.data),
        "release": published,
        "max_dtls_sessions": s.max_dtls_sessions,
        "observe_poll_interval": s.observe_poll_interval,
    }


def _check_delta_source(store: Any, key: Any, source: int, source_envelope: bytes) -> None:
    """--delta: the server serves a device the delta whose source is the image of the
    release with the device's reported sequence number (store/deltas.py), so that
    release must be the fleet's old one."""
    found = store.release_by_seq(key, source)
    if found is None or found.envelope != source_envelope:
        raise FleetError(
            f"--delta: the class already has releases, and its seq {source} is not the "
            "old release the devices run; use a fresh --class-info or another --seq"
        )


def make_patch(old: bytes, new: bytes) -> bytes:
    """The detools patch from `old` to `new` the devices can apply (as `otacoap
    manifest build --delta-from`); making patches is the operator's side."""
    from otacoap import patching  # detools: only --delta needs it

    return patching.create_patch(old, new)


def publish_over_network(opts: FleetOptions, items: Sequence[tuple[bytes, Path]]) -> None:
    """Publish each (envelope, image or patch) in order as operator `--operator` over
    DTLS (as `otacoap publish` with a server URI does; the server tells a delta
    envelope from a release)."""
    assert opts.operator is not None and opts.operator_psk is not None
    psk = opts.operator_psk

    async def all_of_them() -> None:
        for envelope, path in items:
            await publish(opts.server, opts.operator or "", psk, envelope, path)

    try:
        eventloop.run(all_of_them())
    except OtaError as exc:
        raise FleetError(f"publishing over the network failed: {exc}") from None


def check_confirmed(data: Path, seq: int, outcomes: list[FleetDeviceOutcome]) -> dict[str, Any]:
    """The server's side of the verification: each updated device's "confirmed" report
    for the release's sequence number must be in the store. Also the report counts."""
    store = DataDir(data).open_store()
    by_state: dict[str, int] = {}
    downloaded: dict[str, int] = {}
    total = 0
    confirmed = 0
    try:
        for out in outcomes:
            reports = store.list_reports(out.device, 1000)
            total += len(reports)
            for r in reports:
                by_state[r.state] = by_state.get(r.state, 0) + 1
            ok = any(r.state == "confirmed" and r.sequence_number == seq for r in reports)
            out.server_confirmed = ok
            # A delta envelope's DOWNLOADED report names the payload the device used
            # (docs/decisions/delta-updates.md, "Fallback and reports").
            for r in reports:
                if r.state == "downloaded" and r.sequence_number == seq:
                    kind = payload_of_detail(r.detail)
                    if kind is not None:
                        out.server_payload = kind
                        downloaded[kind] = downloaded.get(kind, 0) + 1
            confirmed += ok
            if out.outcome == "updated" and not ok:
                out.outcome, out.reason = "unconfirmed", "the server has no confirmed report"
                out.seconds = out.duration = None
        try:
            audit: Any = store.verify_audit()[0]
        except OtaError as exc:
            audit = f"audit chain broken: {exc}"
    finally:
        store.close()
    return {
        "reports": total,
        "reports_by_state": dict(sorted(by_state.items())),
        "devices_confirmed": confirmed,
        "audit_entries": audit,
        **({"downloaded_by_payload": dict(sorted(downloaded.items()))} if downloaded else {}),
    }


def payload_of_detail(detail: str) -> str | None:
    """The payload a DOWNLOADED report names (update_machine `_payload_detail`):
    "delta", "encrypted delta" ("delta+encrypted-a128ctr from ..."), "full" (a delta
    envelope's fallback, encrypted or not), "encrypted"; None for a plain image."""
    if detail.startswith("delta from"):
        return "delta"
    if detail.startswith("delta+encrypted"):
        return "encrypted delta"
    if detail.startswith("full image"):
        return "full"
    if detail.startswith("payload encrypted"):
        return "encrypted"
    return None


def tag_devices(data: Path, tags: dict[str, dict[str, str]]) -> None:
    """`otacoap device tag ID KEY=VALUE ...` for each device (campaign targets)."""
    store = DataDir(data).open_store()
    try:
        for device_id, kv in tags.items():
            store.set_device_tags(device_id, kv, ACTOR)
    except OtaError as exc:
        raise FleetError(f"tagging: {exc}") from None
    finally:
        store.close()


def start_campaign(
    data: Path,
    vendor: str,
    class_info: str,
    seq: int,
    *,
    target: str = "all",
    waves: str = "1%,10%,50%,100%",
    **policy: Any,
) -> int:
    """`otacoap campaign create VENDOR/CLASS:SEQ --target TARGET --waves WAVES ...`:
    the campaign's id. `policy` takes otacoap.core.campaign.Policy's fields
    (success_threshold, failure_threshold, soak, approve, timeout, window, urgent,
    max_downloads; durations in seconds, shares in (0, 1])."""
    from otacoap.core import campaign as rules

    window = policy.pop("window", None)
    try:
        plan = CampaignPlan(
            rules.parse_target(target),
            rules.parse_waves(waves),
            rules.Policy(window=rules.parse_window(window) if window else None, **policy),
        )
    except OtaError as exc:
        raise FleetError(f"campaign: {exc}") from None
    return create_campaign(data, vendor, class_info, seq, plan)


def create_campaign(data: Path, vendor: str, class_info: str, seq: int, plan: CampaignPlan) -> int:
    """`otacoap campaign create` with a parsed plan (`parse_campaign`): its id."""
    store = DataDir(data).open_store()
    try:
        release = store.release_by_seq(class_key_of(vendor, class_info), seq)
        if release is None:
            raise FleetError(f"no release seq {seq} for {vendor}/{class_info} in {data}")
        c = store.create_campaign(release.id, plan.target, plan.waves, plan.policy, ACTOR)
        store.tick_campaigns()
        return c.id
    except OtaError as exc:
        raise FleetError(f"campaign: {exc}") from None
    finally:
        store.close()


def campaign_progress(
    data: Path, campaign_id: int, *, evaluate: bool = True, members: bool = True
) -> dict[str, Any]:
    """`otacoap campaign show ID --json --members`: state, per-wave counts, members.
    With `evaluate` the campaigns are evaluated first (as the CLI does); without, this
    reads what the server last decided."""
    from otacoap.store.campaigns import status_dict

    store = DataDir(data).open_store()
    try:
        if evaluate:
            store.tick_campaigns()
        return status_dict(store.campaign_status(campaign_id), members)
    finally:
        store.close()


def cleanup(data: Path, devices: Sequence[str], campaign_id: int | None) -> dict[str, Any]:
    """`--cleanup`: cancel the run's campaign if still active, then remove every device
    the run registered (`otacoap device remove`, audited as the fleet simulator)."""
    from otacoap.core.campaign import ACTIVE_STATES

    removed = 0
    cancelled = False
    store = DataDir(data).open_store()
    try:
        if campaign_id is not None:
            status = store.campaign_status(campaign_id)
            if status.campaign.progress.state in ACTIVE_STATES:
                store.cancel_campaign(campaign_id, ACTOR)
                cancelled = True
        for device_id in devices:
            with contextlib.suppress(OtaError):  # already gone: nothing to clean
                store.remove_device(device_id, ACTOR)
                removed += 1
    finally:
        store.close()
    return {"devices_removed": removed, "campaign_cancelled": cancelled}
