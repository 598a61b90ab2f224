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

Kinds: `PLAIN_IMAGE` (fetched bytes are the image), the encrypted payload
(`core.encryption.EncryptedPayload`, chosen when the Fetch carries
suit-parameter-encryption-info) and `DeltaKind` (a detools patch applied against the
running slot, `core.delta`, whose `payload_size` is the patch's, not the image's; an
encrypted delta is a `DeltaKind` whose patch is decrypted while it streams). A
decoder whose output can be much longer than its input (a patch) is a
`DrainingDecoder`, which the machine drains in bounded pieces so memory stays flat. How
the next ones plug in is described in `core.update_machine`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from . import delta, encryption, interpreter, trust
from .errors import PolicyError


class PayloadDecoder(Protocol):
    """Fetched bytes in, slot bytes out, strictly in order."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes:
        """Slot bytes still held when the fetch ends (raise if the payload is cut short)."""
        ...


@runtime_checkable
class DrainingDecoder(PayloadDecoder, Protocol):
    """A decoder that may hold more output than one `feed` returns (a patch)."""

    def drain(self) -> bytes:
        """More slot bytes from the input already fed (b'': feed more)."""
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


class _DecryptingPatch:
    """An encrypted delta's decoder: ciphertext -> `Decryptor` -> patch decoder -> slot.

    Both stages stream (the decryptor holds at most a GCM tag, the patch decoder its
    bounded buffers), so no whole patch is ever in RAM. The patch decoder checks the
    *plaintext* patch's size and digest (the manifest's delta-patch-size/-digest); with
    A128GCM the tag is checked first, at the end, so a tampered patch is a
    `CiphertextRejected` (or an earlier `PatchError` if its plaintext does not parse)."""

    def __init__(self, decryptor: encryption.Decryptor, patch: delta.SequentialPatchDecoder):
        self._decryptor = decryptor
        self._patch = patch

    def feed(self, data: bytes) -> bytes:
        return self._patch.feed(self._decryptor.feed(data))

    def drain(self) -> bytes:
        return self._patch.drain()

    def finish(self) -> bytes:
        rest = self._decryptor.finish()  # A128GCM: raises unless the tag verifies
        head = self._patch.feed(rest) if rest else b""
        return head + self._patch.finish()


@dataclass(frozen=True)
class DeltaKind:
    """A detools sequential patch against the running slot (core.delta).

    The decompressor's state cannot be rebuilt from the slot's prefix, so there are no
    mid-stream checkpoints: after a power cut the apply starts over from the first patch
    byte (the source slot is never written, so it is still there). The patch is about a
    ninth of the image on the shared firmware pairs, so a restart costs less air time
    than resuming a full image would save; docs/decisions/delta-updates.md.

    `encryption`: an encrypted delta (the patch is fetched as ciphertext; the CEK was
    unwrapped when the kind was chosen). It is decrypted while it streams into the patch
    decoder; the same restart-from-zero rule covers both ciphers.
    """

    info: delta.DeltaInfo
    source: delta.SourceRegion
    image_size: int
    name: str = "delta"
    checkpoints: bool = False
    encryption: encryption.EncryptedPayload | None = None

    @property
    def label(self) -> str:
        """How the reports name it: "delta", or "delta+encrypted-a128ctr" and the like."""
        return "delta" if self.encryption is None else f"delta+{self.encryption.name}"

    def resume_from(self, durable: int) -> int:
        return 0

    def fetch_offset(self, slot_offset: int) -> int:
        return 0

    def payload_size(self, slot_size: int) -> int:
        # The patch is fetched, not the image (as ciphertext: plus a GCM tag).
        if self.encryption is not None:
            return self.encryption.info.ciphertext_size(self.info.patch_size)
        return self.info.patch_size

    def decoder(self, slot_offset: int) -> PayloadDecoder:
        assert slot_offset == 0, "a delta always starts from its first byte"
        patch = delta.SequentialPatchDecoder(self.info, self.source, self.image_size)
        if self.encryption is None:
            return patch
        return _DecryptingPatch(self.encryption.decoder(0), patch)


def delta_of(action: interpreter.Fetch, vm: trust.VerifiedManifest) -> delta.DeltaInfo | None:
    """The trust gate's DeltaInfo for this Fetch (same component and URI), if it is one."""
    for fetch in vm.fetches:
        same = (fetch.component, fetch.uri) == (action.component, action.uri)
        if fetch.delta is not None and same:
            return fetch.delta
    return None


def delta_in_force(params: Mapping[int, Any], vm: trust.VerifiedManifest) -> delta.DeltaInfo | None:
    """The gate's DeltaInfo whose parameters are those in force (at a condition), if any.

    The machine matches against what the trust gate decoded rather than decoding the
    parameters itself (one place turns the encoding into trusted values)."""
    for fetch in vm.fetches:
        info = fetch.delta
        if info is not None and all(params.get(k) == v for k, v in info.parameters()):
            return info
    return None


def check_multi_component_plain(vm: trust.VerifiedManifest) -> None:
    """PolicyError when a release of several components fetches other than plain images.

    A multi-component release installs both images or neither
    (docs/decisions/multi-component.md); a delta (whose source is the running slot's one
    image) or an encrypted payload of such a release is refused, not half-supported: at
    build (core.build), at publish (store.publish) and by the device (update machine),
    before any payload byte.
    """
    if len(vm.manifest.common.components) < 2:
        return
    for fetch in vm.fetches:
        if fetch.delta is not None:
            raise PolicyError("a multi-component release cannot have a delta payload")
        if fetch.encryption_info is not None:
            raise PolicyError("a multi-component release cannot have an encrypted payload")


def select_kind(
    action: interpreter.Fetch,
    vm: trust.VerifiedManifest,
    keys: encryption.DecryptionKeys | None = None,
    source: delta.SourceRegion | None = None,
) -> PayloadKind:
    """The kind of the payload a Fetch brings, from the verified manifest.

    An encrypted payload is named by suit-parameter-encryption-info on the component
    (draft-ietf-suit-firmware-encryption §4); its CEK is unwrapped here with the device's
    `keys`, once, before any payload byte (a wrong key is a refusal, not a download).
    A delta is named by otacoap's delta parameters (core.delta) and read against
    `source`, the running slot the host injects. A delta fetch that also carries
    encryption info is an encrypted delta: the patch's CEK is unwrapped here too
    (docs/decisions/delta-updates.md). A manifest that asks for a kind this device lacks
    is refused before any payload byte (the caller turns the error into a refusal).
    """
    info = delta_of(action, vm)
    if info is not None:
        if source is None or action.size is None:
            raise PolicyError("this device cannot apply delta payloads")
        encrypted = None
        if action.encryption_info is not None:
            encrypted = encryption.EncryptedPayload.for_fetch(
                action.encryption_info, keys or encryption.DecryptionKeys()
            )
        return DeltaKind(info, source, action.size, encryption=encrypted)
    if action.encryption_info is not None:
        return encryption.EncryptedPayload.for_fetch(
            action.encryption_info, keys or encryption.DecryptionKeys()
        )
    return PLAIN_IMAGE
