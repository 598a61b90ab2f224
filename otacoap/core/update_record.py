"""What a device persists about its updates: the vocabulary of the update machine.

The device's persisted record (`device_sim.device_state.DeviceState`: its fields, CBOR
encoding and storage) belongs to the device. The *meaning* of its fields is decided here,
in the core, because the update machine (`core.update_machine`) and the boot status
table (`core.boot_status`) are the only code that decides how they change:

* `BootStatus`: does the other slot hold a staged candidate (PENDING) or run on trial
  (TESTING)?
* `SlotInfo`: what vouches for the image in one slot;
* `Download`: a partial download, keyed by manifest digest (ATTACKS.md #23, #50);
* `Trial`: unconfirmed trial boots of one candidate.

`UpdateRecord` is the structural type the machines need of the record: a frozen
dataclass (they derive new records with `dataclasses.replace`, never mutate one) with
these fields and an outbox (`with_report`). The device's `DeviceState` satisfies it; a
test can use it as is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol, Self

from .errors import OtaError


class TransitionError(OtaError):
    """An event a transition table does not allow (a host bug, or a sticky failure)."""


class BootStatus(StrEnum):
    CONFIRMED = "confirmed"  # boot the active slot
    PENDING = "pending"  # the other slot holds a staged candidate: verify, then test-boot
    TESTING = "testing"  # the candidate is running on trial, not yet confirmed


ReportEncoder = Callable[[int, int], bytes]
"""Builds one report body from (counter, reports lost so far); see `with_report`."""


@dataclass(frozen=True)
class SlotInfo:
    """What vouches for the image in one slot."""

    image_size: int
    image_digest: bytes  # SHA-256 of the image
    sequence: int
    manifest_digest: bytes | None  # None: factory image without an envelope
    envelope_length: int = 0
    envelope_sha256: bytes = b""
    # (size, SHA-256) of the images of components 1.. of a multi-component release, each
    # in the same slot's region of that component (docs/decisions/multi-component.md)
    extra: tuple[tuple[int, bytes], ...] = ()

    @property
    def factory(self) -> bool:
        return self.envelope_length == 0


@dataclass(frozen=True)
class Download:
    """A partial (or complete but not yet staged) download into `slot`."""

    manifest_digest: bytes
    slot: int
    durable: int  # bytes of the image known to be in flash (a resume point)
    image_size: int
    envelope_length: int
    envelope_sha256: bytes


@dataclass(frozen=True)
class Trial:
    """Trial boots of one candidate that ended without a confirmation."""

    manifest_digest: bytes
    boots: int


class UpdateRecord(Protocol):
    """The persisted facts the machines read, as a frozen dataclass they `replace`."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def sequence(self) -> int: ...

    @property
    def sequence_digest(self) -> bytes | None: ...

    @property
    def active(self) -> int: ...

    @property
    def boot(self) -> BootStatus: ...

    @property
    def slots(self) -> tuple[SlotInfo | None, SlotInfo | None]: ...

    @property
    def download(self) -> Download | None: ...

    @property
    def trial(self) -> Trial | None: ...

    @property
    def candidate(self) -> int:
        """The slot an update is staged into: always the one that is not active."""
        ...

    @property
    def running(self) -> int:
        """The slot the device is executing now (the candidate while on trial)."""
        ...

    @property
    def reports(self) -> tuple[bytes, ...]: ...

    def with_report(self, encode: ReportEncoder) -> Self:
        """This record with one more report in its bounded outbox (counter allocated)."""
        ...


Slots = tuple[SlotInfo | None, SlotInfo | None]


def with_slot(slots: Slots, index: int, info: SlotInfo | None) -> Slots:
    """`slots` with slot `index` replaced by `info`."""
    return (info, slots[1]) if index == 0 else (slots[0], info)
