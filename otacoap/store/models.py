"""Frozen records the store hands out; raw rows never leave the store (principle 6)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

from ..core import cose, ids, protocol, suit, trust
from ..core.campaign import MemberState, Policy, Progress, Target, WaveCounts, WaveSize

ClassKey = tuple[bytes, bytes]
"""(vendor_id, class_id): what a release is published for (manifest-34 §8.4.8.2)."""


class Role(StrEnum):
    DEVICE = "device"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Principal:
    """Who is talking: the DTLS PSK identity resolved to a role and a name.

    Instances are the `claims` the DTLS layer records for a session, so equality and
    hashing must be by value.
    """

    role: Role
    name: str

    @property
    def identity(self) -> str:
        if self.role is Role.OPERATOR:
            return protocol.operator_identity(self.name)
        return self.name

    def __str__(self) -> str:
        return f"{self.role.value}:{self.name}" if self.role is Role.DEVICE else self.identity


def key_tag_of(sealed_psk: bytes) -> bytes:
    """Which registration of a key a DTLS session was made with (8 bytes).

    Derived from the sealed PSK, whose random nonce (secrets.py) is new at every add
    and rekey: a remove and re-add of the same name, even with the same PSK, gives a
    new tag, so sessions made before it are told apart without a schema change. The
    tag says nothing about the key (SHA-256 of ciphertext and nonce).
    """
    return hashlib.sha256(sealed_psk).digest()[:8]


@dataclass(frozen=True)
class Credential:
    """A DTLS identity's principal, plain PSK and key tag, read in one row."""

    principal: Principal
    psk: bytes = field(repr=False)
    key_tag: bytes


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    vendor_domain: str
    class_info: str
    vendor_id: bytes
    class_id: bytes
    created_at: str
    last_counter: int | None = None
    assigned_release: int | None = None
    # The release a rollout campaign admitted this device to (store/campaigns.py).
    campaign_release: int | None = None

    @property
    def class_key(self) -> ClassKey:
        return (self.vendor_id, self.class_id)

    @property
    def class_label(self) -> str:
        return f"{self.vendor_domain}/{self.class_info}"


@dataclass(frozen=True)
class OperatorRecord:
    name: str
    created_at: str

    @property
    def identity(self) -> str:
        return protocol.operator_identity(self.name)


@dataclass(frozen=True)
class AnchorRecord:
    key_id: str
    kind: str
    added_at: str
    anchor: cose.TrustAnchor = field(repr=False)


@dataclass(frozen=True)
class ImageRecord:
    digest: bytes
    size: int

    @property
    def image_id(self) -> str:
        return ids.image_id(self.digest)

    @property
    def uri(self) -> str:
        return ids.image_uri(self.digest)

    @property
    def etag(self) -> bytes:
        return protocol.etag_for(self.digest)


@dataclass(frozen=True)
class ReleaseRecord:
    id: int
    vendor_id: bytes
    class_id: bytes
    class_label: str
    sequence_number: int
    manifest_digest: bytes
    envelope: bytes = field(repr=False)
    image: ImageRecord
    signer: str
    published_at: str
    published_by: str

    @property
    def class_key(self) -> ClassKey:
        return (self.vendor_id, self.class_id)

    @functools.cached_property
    def etag(self) -> bytes:
        """ETag of the /m representation: a prefix of the envelope's SHA-256."""
        return protocol.etag_for(hashlib.sha256(self.envelope).digest())

    @functools.cached_property
    def more_images(self) -> tuple[ImageRecord, ...]:
        """The images of components 1.. of a multi-component release (empty: one image).

        Named by the release's own envelope, which the publisher verified and checked
        image by image (docs/decisions/multi-component.md), so no column holds them:
        `image` is component 0's, the envelope says which others belong to the release.
        """
        return more_images_of(self.envelope)

    @functools.cached_property
    def signed_image(self) -> trust.ImageInfo | None:
        """Component 0's full-image fetch as the release's own envelope (verified at
        publish) signs it: digest, size, URI, encryption info. None if it has not one."""
        summary = trust.summarize(suit.decode_envelope(self.envelope))
        fetches = [f for f in summary.fetches if f.component == 0 and f.delta is None]
        return fetches[0] if len(fetches) == 1 else None

    @property
    def running_digest(self) -> bytes:
        """The SHA-256 of the image a device runs after installing this release.

        `image` is what the server stores and serves: for an encrypted release the
        ciphertext, whose digest no device's slot ever holds; the plaintext digest is
        the one its manifest signs. A delta's source digest is compared with this
        (store/deltas.py)."""
        signed = self.signed_image
        if signed is not None and signed.encryption_info is not None and signed.digest:
            return bytes(signed.digest.value)
        return self.image.digest


def more_images_of(envelope: bytes) -> tuple[ImageRecord, ...]:
    """(digest, size) of the fetched images of components 1.. in a stored envelope."""
    summary = trust.summarize(suit.decode_envelope(envelope))
    out = []
    for image in sorted(summary.images, key=lambda i: i.component):
        if image.component > 0 and image.uri is not None and image.digest is not None:
            out.append(ImageRecord(image.digest.value, image.size or 0))
    return tuple(out)


@dataclass(frozen=True)
class ReleaseCandidate:
    """A release that passed every publish check and may be committed.

    `previous_release_id` is the class's latest release when the checks ran; the commit
    refuses if another publisher moved the class meanwhile (optimistic concurrency, so the
    sequence check cannot be raced).
    """

    vendor_id: bytes
    class_id: bytes
    class_label: str
    sequence_number: int
    manifest_digest: bytes
    envelope: bytes = field(repr=False)
    image: ImageRecord
    signer: str
    previous_release_id: int | None
    more_images: tuple[ImageRecord, ...] = ()  # components 1.. (multi-component release)


@dataclass(frozen=True)
class ReportRecord:
    id: int
    device_id: str
    counter: int
    state: str
    reason: int
    sequence_number: int | None
    manifest_digest: bytes | None
    bytes_received: int | None
    installed_sequence: int | None
    detail: str
    received_at: str
    lost: int = 0  # reports the device dropped from its outbox before this one (in all)


@dataclass(frozen=True)
class ReportOutcome:
    """What `record_report` did: `stored` is False for an exact retransmission."""

    stored: bool
    report_id: int


@dataclass(frozen=True)
class CampaignRecord:
    """A rollout campaign as the store keeps it (rules: otacoap/core/campaign.py)."""

    id: int
    release_id: int
    class_label: str
    sequence_number: int
    target: Target
    waves: tuple[WaveSize, ...]
    policy: Policy
    progress: Progress
    created_at: str
    created_by: str
    updated_at: str

    @property
    def state(self) -> str:
        return self.progress.state.value


@dataclass(frozen=True)
class CampaignMember:
    device_id: str
    wave: int  # 0-based
    state: MemberState
    admitted_at: float | None
    done_at: float | None
    reason: str


@dataclass(frozen=True)
class CampaignStatus:
    """A campaign with its members counted per wave (what `campaign show` prints)."""

    campaign: CampaignRecord
    waves: tuple[WaveCounts, ...]
    members: tuple[CampaignMember, ...]
