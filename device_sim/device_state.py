"""The device's persistent state: one CBOR record in the power-safe StateStore.

Every fact the device must not forget lives in one record, written by one save, so a
transition and everything that goes with it (the report it produces, the counter that
report uses, the slot it activates) become durable together or not at all:

* `sequence` / `sequence_digest`: the trusted sequence number (the anti-rollback
  floor, RFC 9124 REQ.SEC.SEQUENCE) and the manifest digest that set it. Never lowered.
* `active`: the slot booted in normal mode. `boot` (core.session.BootStatus) says
  whether the other slot holds a candidate (PENDING) or runs on trial (TESTING).
* `slots`: per slot, what vouches for its image (envelope length and SHA-256 in the
  envelope area, manifest digest, sequence, image size and digest).
* `download`: a partial download, keyed by manifest digest (ATTACKS.md #50), with the
  number of bytes that are durable in the staging slot.
* `trial`: unconfirmed trial boots of one manifest; too many and the release is given up.
* `report_counter` and `reports`: the outbox of status reports (bounded), each already
  encoded with its counter, so a report survives power cuts and offline periods.

`load` falls back to the other StateStore copy on damage; when neither copy is valid
it raises instead of inventing defaults (ATTACKS.md #45: never "factory default =
accept seq 0").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from otacoap.core import cbor
from otacoap.core.session import BootStatus

from .flash import SimFlash
from .layout import FlashLayout
from .state import StateStore

STATE_FORMAT = 1
MAX_QUEUED_REPORTS = 16


class StateError(Exception):
    """No valid state record: the device refuses to guess (fail closed)."""


@dataclass(frozen=True)
class SlotInfo:
    """What vouches for the image in one slot."""

    image_size: int
    image_digest: bytes  # SHA-256 of the image
    sequence: int
    manifest_digest: bytes | None  # None: factory image without an envelope
    envelope_length: int = 0
    envelope_sha256: bytes = b""

    @property
    def factory(self) -> bool:
        return self.envelope_length == 0

    def to_cbor(self) -> list[Any]:
        return [
            self.image_size,
            self.image_digest,
            self.sequence,
            self.manifest_digest,
            self.envelope_length,
            self.envelope_sha256,
        ]

    @classmethod
    def from_cbor(cls, v: Any) -> SlotInfo | None:
        if v is None:
            return None
        _expect(isinstance(v, list) and len(v) == 6, "slot info")
        return cls(_u(v[0]), _b(v[1]), _u(v[2]), _ob(v[3]), _u(v[4]), _b(v[5]))


@dataclass(frozen=True)
class Download:
    """A partial (or complete but not yet staged) download into `slot`."""

    manifest_digest: bytes
    slot: int
    durable: int  # bytes of the image known to be in flash (a resume point)
    image_size: int
    envelope_length: int
    envelope_sha256: bytes

    def to_cbor(self) -> list[Any]:
        return [
            self.manifest_digest,
            self.slot,
            self.durable,
            self.image_size,
            self.envelope_length,
            self.envelope_sha256,
        ]

    @classmethod
    def from_cbor(cls, v: Any) -> Download | None:
        if v is None:
            return None
        _expect(isinstance(v, list) and len(v) == 6, "download")
        return cls(_b(v[0]), _slot(v[1]), _u(v[2]), _u(v[3]), _u(v[4]), _b(v[5]))


@dataclass(frozen=True)
class Trial:
    """Trial boots of one candidate that ended without a confirmation."""

    manifest_digest: bytes
    boots: int

    def to_cbor(self) -> list[Any]:
        return [self.manifest_digest, self.boots]

    @classmethod
    def from_cbor(cls, v: Any) -> Trial | None:
        if v is None:
            return None
        _expect(isinstance(v, list) and len(v) == 2, "trial")
        return cls(_b(v[0]), _u(v[1]))


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

    @property
    def candidate(self) -> int:
        """The slot an update is staged into: always the one that is not active."""
        return 1 - self.active

    @property
    def running(self) -> int:
        """The slot the device is executing now (the candidate while on trial)."""
        return self.candidate if self.boot == BootStatus.TESTING else self.active

    def with_report(self, encode: Any) -> DeviceState:
        """Append a report to the outbox; `encode(counter) -> bytes` builds it.

        The counter is allocated here, in the same record as the report, so it is
        durable before the report can be sent and is never reused (ATTACKS.md #28).
        The outbox is bounded; the oldest report goes first when it is full.
        """
        counter = self.report_counter + 1
        queue = (*self.reports, encode(counter))[-MAX_QUEUED_REPORTS:]
        return replace(self, report_counter=counter, reports=queue)

    def encode(self) -> bytes:
        return cbor.dumps(
            {
                "v": STATE_FORMAT,
                "seq": self.sequence,
                "seqd": self.sequence_digest,
                "active": self.active,
                "boot": self.boot.value,
                "slots": [s.to_cbor() if s else None for s in self.slots],
                "dl": self.download.to_cbor() if self.download else None,
                "trial": self.trial.to_cbor() if self.trial else None,
                "rc": self.report_counter,
                "q": list(self.reports),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> DeviceState:
        try:
            v = cbor.loads(data, max_size=len(data) + 1, max_depth=6)
        except Exception as exc:
            raise StateError("state record does not decode") from exc
        _expect(isinstance(v, dict) and v.get("v") == STATE_FORMAT, "state format")
        slots = v["slots"]
        _expect(isinstance(slots, list) and len(slots) == 2, "slots")
        queue = v["q"]
        _expect(isinstance(queue, list) and all(isinstance(r, bytes) for r in queue), "queue")
        try:
            boot = BootStatus(v["boot"])
        except ValueError:
            raise StateError("state record: unknown boot status") from None
        return cls(
            sequence=_u(v["seq"]),
            sequence_digest=_ob(v["seqd"]),
            active=_slot(v["active"]),
            boot=boot,
            slots=(SlotInfo.from_cbor(slots[0]), SlotInfo.from_cbor(slots[1])),
            download=Download.from_cbor(v["dl"]),
            trial=Trial.from_cbor(v["trial"]),
            report_counter=_u(v["rc"]),
            reports=tuple(queue),
        )


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise StateError(f"state record: bad {what}")


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

    @property
    def store(self) -> StateStore:
        return self._store

    def load(self) -> DeviceState:
        loaded = self._store.load()
        if loaded is None:
            # Both copies torn or corrupt. Defaults would mean "seq 0, accept anything";
            # refusing to run is the only safe answer (ATTACKS.md #45).
            raise StateError("no valid state record in either copy")
        return DeviceState.decode(loaded[1])

    def save(self, state: DeviceState) -> None:
        self._store.save(state.encode())


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
