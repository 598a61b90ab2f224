"""Payload kinds: how the bytes a device fetches become the bytes of its staging slot.

The update machine (`core.update_machine`) streams a payload into the staging slot and
persists resume points; what the fetched bytes *are* is a small strategy it asks for:

* `resume_from(durable)`: given `durable` slot bytes known to be in flash, the slot
  offset a restart resumes at (0 = start over; a kind whose decoder state cannot be
  rebuilt from the flash prefix answers 0, or its own checkpoint);
* `fetch_offset(slot_offset)`: the offset in the fetched payload that produces the
  slot bytes from `slot_offset` on;
* `checkpoints`: whether progress may be persisted mid-stream at all;
* `decoder(slot_offset)`: a `PayloadDecoder` that turns fetched bytes into slot bytes,
  starting there;
* `payload_size(slot_size)`: how many bytes the fetch brings for a slot image of
  `slot_size` bytes (an A128GCM payload carries its 16-byte tag after the image).

The slot's size and digest are always those of the *slot bytes* (the manifest's
image-size and image-digest, manifest-34 §8.4.8.6/§8.4.8.7), checked by the image writer
whatever the kind, so a decoder never decides what is trusted.

Kinds: `PLAIN_IMAGE` (fetched bytes are the image) and the encrypted payload
(`core.encryption.EncryptedPayload`, chosen when the Fetch carries
suit-parameter-encryption-info). How the next ones plug in is described in
`core.update_machine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from . import encryption, interpreter, trust


class PayloadDecoder(Protocol):
    """Fetched bytes in, slot bytes out, strictly in order."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes:
        """Slot bytes still held when the fetch ends (raise if the payload is cut short)."""
        ...


class PayloadKind(Protocol):
    """One kind of payload (see the module docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def checkpoints(self) -> bool: ...

    def resume_from(self, durable: int) -> int: ...

    def fetch_offset(self, slot_offset: int) -> int: ...

    def decoder(self, slot_offset: int) -> PayloadDecoder: ...

    def payload_size(self, slot_size: int) -> int: ...


class _PassThrough:
    """The plain image's decoder: the fetched bytes are the slot bytes (no copy)."""

    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b""


@dataclass(frozen=True)
class PlainImage:
    """The fetched payload is the image itself: resume at any checkpoint (RFC 7959 blocks).

    The writer re-hashes the flash prefix on a resume (ATTACKS.md #23), so the durable
    prefix is all the state a resume needs.
    """

    name: str = "plain"
    checkpoints: bool = True

    def resume_from(self, durable: int) -> int:
        return durable

    def fetch_offset(self, slot_offset: int) -> int:
        return slot_offset

    def decoder(self, slot_offset: int) -> PayloadDecoder:
        return _PassThrough()

    def payload_size(self, slot_size: int) -> int:
        return slot_size


PLAIN_IMAGE = PlainImage()


def select_kind(
    action: interpreter.Fetch,
    vm: trust.VerifiedManifest,
    keys: encryption.DecryptionKeys | None = None,
) -> PayloadKind:
    """The kind of the payload a Fetch brings, from the verified manifest.

    An encrypted payload is named by suit-parameter-encryption-info on the component
    (draft-ietf-suit-firmware-encryption §4); its CEK is unwrapped here with the device's
    `keys`, once, before any payload byte (a wrong key is a refusal, not a download).
    A delta (source component and a detools patch) will be recognised here too; a
    manifest that asks for a kind this device lacks is refused before any payload byte
    (the caller turns the error into a refusal).
    """
    if action.encryption_info is not None:
        return encryption.EncryptedPayload.for_fetch(
            action.encryption_info, keys or encryption.DecryptionKeys()
        )
    return PLAIN_IMAGE
