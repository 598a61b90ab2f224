"""The device's persistent state: one CBOR record in the power-safe record store.

Every fact the device must not forget lives in one record, written by one save, so a
transition and everything that goes with it (the report it produces, the counter that
report uses, the slot it activates) become durable together or not at all:

* `sequence` / `sequence_digest`: the trusted sequence number (the anti-rollback
  floor, RFC 9124 REQ.SEC.SEQUENCE) and the manifest digest that set it. Never lowered.
* `active`: the slot booted in normal mode. `boot` (core.update_record.BootStatus)
  says whether the other slot holds a candidate (PENDING) or runs on trial (TESTING).
* `slots`: per slot, what vouches for its image (envelope length and SHA-256 in the
  envelope area, manifest digest, sequence, image size and digest).
* `download`: a partial download, keyed by manifest digest (ATTACKS.md #50), with the
  number of bytes that are durable in the staging slot.
* `trial`: unconfirmed trial boots of one manifest; too many and the release is given up.
* `report_counter` and `reports`: the outbox of status reports, each already encoded
  with its counter, so a report survives power cuts and offline periods. The outbox is
  bounded in count *and bytes* (`MAX_QUEUED_REPORTS`, `MAX_OUTBOX_BYTES`); the oldest
  reports make way first and are counted in `reports_lost`, which every later report
  carries (report key K_LOST), so the server learns that reports were lost.
* `anchors`: the signed anchor list the device accepted last (core.anchor_list
  TrustedAnchors: roots, author and freshness keys, version), or None while it trusts
  what provisioning wrote. Committed in one save like everything else, so a power cut
  leaves the old list or the new one; every queued report carries its version.

The record can never outgrow its space: every field has a bounded size, the worst
case (`worst_case_record_size`) fits the smallest state copy a layout may have
(`layout.MIN_STATE_COPY_SIZE`, checked by a test), and `StateFile.save` drops queued
reports rather than fail if a record were still too large. An unauthenticated server
that makes the device refuse envelopes with long messages, and then never accepts a
report, can therefore fill the outbox but never the state record (the outbox brick).

The meaning of these fields and every decision that changes them live in the core
(`core.update_record`, `core.update_machine`, `core.boot_status`); this module owns the
record's encoding and its place in flash (`device_sim.record_store`).

`load` falls back to the other StateStore copy on damage; when neither copy is valid
it raises instead of inventing defaults (ATTACKS.md #45: never "factory default =
accept seq 0").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from otacoap.core import cbor
from otacoap.core.anchor_list import TrustedAnchors
from otacoap.core.errors import OtaError
from otacoap.core.report import stamp_anchor_version
from otacoap.core.update_record import (
    BootStatus,
    Download,
    ReportEncoder,
    SlotInfo,
    Trial,
)

from .flash import SimFlash
from .layout import FlashLayout
from .record_store import RecordTooLarge, StateStore

STATE_FORMAT = 1
MAX_QUEUED_REPORTS = 16
MAX_OUTBOX_BYTES = 2048
"""Bytes of encoded reports the outbox may hold (report.MAX_REPORT_SIZE is 1024)."""
MAX_DIGEST_SIZE = 64  # SHA-512, the longest SUIT digest this device knows


class StateError(Exception):
    """No valid state record: the device refuses to guess (fail closed)."""


@dataclass(frozen=True)
class DeviceState:
    sequence: int
    sequence_digest: bytes | None
    active: int
    boot: BootStatus
    slots: tuple[SlotInfo | None, SlotInfo | None]
    download: Download | None = None
    trial: Trial | None = None
    report_counter: int = 0
    reports: tuple[bytes, ...] = field(default=())
    reports_lost: int = 0
    anchors: TrustedAnchors | None = None

    @property
    def anchor_version(self) -> int | None:
        return self.anchors.version if self.anchors is not None else None

    @property
    def candidate(self) -> int:
        """The slot an update is staged into: always the one that is not active."""
        return 1 - self.active

    @property
    def running(self) -> int:
        """The slot the device is executing now (the candidate while on trial)."""
        return self.candidate if self.boot == BootStatus.TESTING else self.active

    def with_report(self, encode: ReportEncoder) -> DeviceState:
        """Append a report to the outbox; `encode(counter, lost) -> bytes` builds it.

        The counter is allocated here, in the same record as the report, so it is
        durable before the report can be sent and is never reused (ATTACKS.md #28).
        The outbox is bounded in count and in bytes; the oldest reports make way and
        are counted, and the new report already carries the count it caused.
        """
        counter = self.report_counter + 1
        queue, lost = self.reports, self.reports_lost
        version = self.anchor_version
        while True:
            body = encode(counter, lost)
            if version is not None:
                # Every report says which anchor list the device holds (report key -20).
                body = stamp_anchor_version(body, version)
            if len(body) > MAX_OUTBOX_BYTES:
                raise ValueError("a single report larger than the outbox")
            drop = _overflow(queue, body)
            if not drop:
                break
            queue, lost = queue[drop:], lost + drop
        return replace(self, report_counter=counter, reports=(*queue, body), reports_lost=lost)

    def without_oldest_report(self) -> DeviceState:
        """The same state with the oldest queued report dropped (and counted as lost)."""
        if not self.reports:
            raise ValueError("the outbox is empty")
        return replace(self, reports=self.reports[1:], reports_lost=self.reports_lost + 1)

    def encode(self) -> bytes:
        return cbor.dumps(
            {
                "v": STATE_FORMAT,
                "seq": self.sequence,
                "seqd": self.sequence_digest,
                "active": self.active,
                "boot": self.boot.value,
                "slots": [_slot_to_cbor(s) if s else None for s in self.slots],
                "dl": _download_to_cbor(self.download) if self.download else None,
                "trial": [self.trial.manifest_digest, self.trial.boots] if self.trial else None,
                "rc": self.report_counter,
                "q": list(self.reports),
                "rl": self.reports_lost,
                **({"anc": self.anchors.to_cbor()} if self.anchors is not None else {}),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> DeviceState:
        """The state in `data`, or StateError: never any other exception.

        The store's CRC only proves these are the bytes some save wrote; buggy firmware
        or a deliberate flash write can still store a record that lacks a field or has
        one of the wrong type (issue 10 §4). Every field is looked up and type-checked
        here, so such a record is refused like a torn one and `StateFile.load` falls
        back to the other copy.
        """
        try:
            v = cbor.loads(data, max_size=len(data) + 1, max_depth=6)
        except Exception as exc:
            raise StateError("state record does not decode") from exc
        _expect(isinstance(v, dict) and v.get("v") == STATE_FORMAT, "state format")
        slots = _field(v, "slots")
        _expect(isinstance(slots, list) and len(slots) == 2, "slots")
        queue = _field(v, "q")
        _expect(isinstance(queue, list) and all(isinstance(r, bytes) for r in queue), "queue")
        boot_value = _field(v, "boot")
        _expect(isinstance(boot_value, str), "boot status")
        try:
            boot = BootStatus(boot_value)
        except ValueError:
            raise StateError("state record: unknown boot status") from None
        return cls(
            sequence=_u(_field(v, "seq")),
            sequence_digest=_ob(_field(v, "seqd")),
            active=_slot(_field(v, "active")),
            boot=boot,
            slots=(_slot_from_cbor(slots[0]), _slot_from_cbor(slots[1])),
            download=_download_from_cbor(_field(v, "dl")),
            trial=_trial_from_cbor(_field(v, "trial")),
            report_counter=_u(_field(v, "rc")),
            reports=tuple(queue),
            # Absent in records written before the outbox was bounded in bytes.
            reports_lost=_u(v.get("rl", 0)),
            # Absent until the device accepts its first anchor list.
            anchors=_anchors_from_cbor(v.get("anc")),
        )


MAX_EXTRA_IMAGES = 1
"""Images of further components per slot (layout: at most one aux region)."""


def _slot_to_cbor(s: SlotInfo) -> list[Any]:
    out = [
        s.image_size,
        s.image_digest,
        s.sequence,
        s.manifest_digest,
        s.envelope_length,
        s.envelope_sha256,
    ]
    for size, digest in s.extra:  # multi-component: (size, digest) pairs follow
        out += [size, digest]
    return out


def _slot_from_cbor(v: Any) -> SlotInfo | None:
    if v is None:
        return None
    _expect(isinstance(v, list) and len(v) in range(6, 7 + 2 * MAX_EXTRA_IMAGES, 2), "slot info")
    extra = tuple((_u(v[i]), _b(v[i + 1])) for i in range(6, len(v), 2))
    return SlotInfo(_u(v[0]), _b(v[1]), _u(v[2]), _ob(v[3]), _u(v[4]), _b(v[5]), extra)


def _download_to_cbor(d: Download) -> list[Any]:
    return [
        d.manifest_digest,
        d.slot,
        d.durable,
        d.image_size,
        d.envelope_length,
        d.envelope_sha256,
    ]


def _download_from_cbor(v: Any) -> Download | None:
    if v is None:
        return None
    _expect(isinstance(v, list) and len(v) == 6, "download")
    return Download(_b(v[0]), _slot(v[1]), _u(v[2]), _u(v[3]), _u(v[4]), _b(v[5]))


def _trial_from_cbor(v: Any) -> Trial | None:
    if v is None:
        return None
    _expect(isinstance(v, list) and len(v) == 2, "trial")
    return Trial(_b(v[0]), _u(v[1]))


def _anchors_from_cbor(v: Any) -> TrustedAnchors | None:
    if v is None:
        return None
    try:
        return TrustedAnchors.from_cbor(v)
    except OtaError:
        raise StateError("state record: bad anchors") from None


def _overflow(queue: tuple[bytes, ...], new: bytes) -> int:
    """How many of the oldest queued reports must go so that `new` fits the outbox."""
    total = len(new) + sum(len(r) for r in queue)
    drop = max(0, len(queue) + 1 - MAX_QUEUED_REPORTS)
    total -= sum(len(r) for r in queue[:drop])
    while total > MAX_OUTBOX_BYTES:
        total -= len(queue[drop])
        drop += 1
    return drop


def worst_case_record_size() -> int:
    """The largest record `DeviceState.encode` can produce, full outbox included.

    Every integer at its 64-bit maximum, every digest at MAX_DIGEST_SIZE, and an outbox
    of MAX_OUTBOX_BYTES spread over MAX_QUEUED_REPORTS reports (CBOR byte-string heads
    of 3 bytes each, the most a report up to 1024 bytes needs).
    """
    top = (1 << 64) - 1
    digest = b"\xff" * MAX_DIGEST_SIZE
    slot = SlotInfo(top, digest, top, digest, top, digest, ((top, digest),) * MAX_EXTRA_IMAGES)
    state = DeviceState(
        sequence=top,
        sequence_digest=digest,
        active=1,
        boot=BootStatus.TESTING,
        slots=(slot, slot),
        download=Download(digest, 1, top, top, top, digest),
        trial=Trial(digest, top),
        report_counter=top,
        reports=(),
        reports_lost=top,
        anchors=TrustedAnchors.worst_case(),
    )
    # The empty array head (1 byte) grows to at most 3 bytes for MAX_QUEUED_REPORTS.
    return len(state.encode()) + 2 + MAX_OUTBOX_BYTES + 3 * MAX_QUEUED_REPORTS


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise StateError(f"state record: bad {what}")


def _field(record: dict[Any, Any], key: str) -> Any:
    if key not in record:
        raise StateError(f"state record: no {key!r} field")
    return record[key]


def _u(v: Any) -> int:
    _expect(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64, "integer")
    return int(v)


def _b(v: Any) -> bytes:
    _expect(isinstance(v, bytes), "byte string")
    return bytes(v)


def _ob(v: Any) -> bytes | None:
    return None if v is None else _b(v)


def _slot(v: Any) -> int:
    _expect(v in (0, 1) and not isinstance(v, bool), "slot number")
    return int(v)


class StateFile:
    """DeviceState on top of the StateStore area the layout reserves."""

    def __init__(self, flash: SimFlash, layout: FlashLayout) -> None:
        self._store = StateStore(flash, layout.state_offset, layout.state_copy_size)
        self._memo: tuple[bytes, DeviceState] | None = None  # see _decode

    @property
    def store(self) -> StateStore:
        return self._store

    def load(self) -> DeviceState:
        """The newest copy that decodes; StateError when neither does.

        A copy whose CRC holds but whose record does not decode is treated like a torn
        one (issue 10 §4): the older copy is used, and the next save overwrites the bad
        copy rather than the good one (see `save`).
        """
        found = self._newest_decodable()
        if found is not None:
            return found[1]
        # Both copies torn, corrupt or undecodable. Defaults would mean "seq 0, accept
        # anything"; refusing to run is the only safe answer (ATTACKS.md #45).
        raise StateError("no valid state record in either copy")

    def save(self, state: DeviceState) -> DeviceState:
        """Persist `state`; returns what was saved.

        The outbox bound keeps every record within `worst_case_record_size`; should a
        record still not fit this store, the oldest reports give way (counted as lost),
        because a state that cannot be saved stops the device, and a lost report only
        costs the server some history. Raises RecordTooLarge (a StateStoreError) only
        when even an empty outbox does not fit, and StateStoreError when flash fails.
        """
        data = state.encode()
        while len(data) > self._store.max_payload and state.reports:
            state = state.without_oldest_report()
            data = state.encode()
        if len(data) > self._store.max_payload:
            raise RecordTooLarge(f"state record of {len(data)} bytes does not fit its area")
        # Spare the newest copy that *decodes*, not merely the newest valid one: were the
        # newest copy undecodable, the store alone would erase the only good record, and
        # a power cut in this save would leave none. Decided afresh on every save (no
        # cached copy index), since other StateFiles (bootloader, agent) share the flash.
        found = self._newest_decodable()
        self._store.save(data, keep=None if found is None else found[0])
        return state

    def _newest_decodable(self) -> tuple[int, DeviceState] | None:
        """(copy index, state) of the newest copy whose record decodes, if any."""
        for index, _counter, payload in self._store.load_all():
            try:
                return index, self._decode(payload)
            except StateError:
                continue
        return None

    def _decode(self, payload: bytes) -> DeviceState:
        """DeviceState.decode, remembering the last record this StateFile decoded.

        The agent and the bootloader each look for the newest decodable copy on every
        load and save, mostly finding the record they decoded last: in a fleet that was
        9 % of a simulated device's CPU (issue 14 §4). Decoding is a pure function of the
        bytes and DeviceState is immutable, so the memo answers exactly what decoding
        would; an undecodable record is never remembered. One entry per StateFile: the
        device holds its current state anyway, so its memory bound is unchanged
        (tests/test_device_memory.py).
        """
        memo = self._memo
        if memo is not None and memo[0] == payload:
            return memo[1]
        state = DeviceState.decode(payload)
        self._memo = (bytes(payload), state)
        return state


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
