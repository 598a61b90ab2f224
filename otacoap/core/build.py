"""Building and signing otacoap's own manifests (the operator side of the core).

The shape follows manifest-34 Appendix B example 1 ("simultaneous download and
installation"): the shared sequence sets vendor, class, digest and size and checks
vendor and class; install fetches and checks the image; validate re-checks it (secure
boot); invoke boots it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import cbor, cose, delta, freshness, ids, suit
from .errors import OtaError
from .suit import Command, CommandSequence, Parameters

# Reporting policies as used by the draft's examples (DIGEST.md §4).
REP_ALL = 15
REP_FAILURE = 2

MAIN_COMPONENT: tuple[bytes, ...] = (b"\x00",)
SECOND_COMPONENT: tuple[bytes, ...] = (b"\x01",)
"""A release that updates two components (docs/decisions/multi-component.md) names the
main image component 0 and its second image (a data image, another processor's image)
component 1, in this order: the device maps index i to its i-th slot pair."""
DEVICE_COMPONENTS: tuple[tuple[bytes, ...], ...] = (MAIN_COMPONENT, SECOND_COMPONENT)

# RFC 1035 §2.3.1 labels (letters, digits, inner hyphens), at most 253 characters.
_DOMAIN = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")  # RFC 3986 §3.1


def check_release_names(vendor_domain: str, uri: str | None) -> None:
    """Refuse names a device could never match or fetch, before anything is signed
    (the operator's `manifest build` calls it; the model itself takes any text):
    the vendor-id is derived from the domain (UUID5, manifest-34 §8.4.8.2), so a typo
    or an empty domain silently makes a manifest for no device at all."""
    if not _DOMAIN.fullmatch(vendor_domain):
        raise OtaError(f"vendor domain {vendor_domain!r} is not a DNS name (e.g. example.com)")
    if uri is None:
        return
    if not uri or any(c.isspace() for c in uri) or not uri.isprintable():
        raise OtaError(f"URI {uri!r} is empty or contains spaces or control characters")
    if uri.startswith("/"):
        return  # server-relative, resolved against the server the device talks to
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        parts = None
    if parts is None or not _SCHEME.fullmatch(parts.scheme) or not parts.hostname:
        raise OtaError(
            f"URI {uri!r} is neither an absolute URI with a host (coaps://host/path) "
            "nor a server-relative path (/fw/...)"
        )


@dataclass(frozen=True)
class Release:
    """What an operator says about a release; everything else is derived."""

    image_digest: bytes  # SHA-256 of the image
    image_size: int
    vendor_domain: str
    class_info: str
    sequence_number: int
    uri: str | None = None  # None: the server-relative /fw/<id> (ids.image_uri)
    component: tuple[bytes, ...] = MAIN_COMPONENT
    description: str | None = None
    expires: int | None = None  # POSIX seconds: core.freshness.M_EXPIRES (signed expiry)
    # suit-parameter-encryption-info (firmware-encryption): the fetched payload is
    # ciphertext; image_digest and image_size stay the plaintext's (§7), and `uri` should
    # name the ciphertext (the server addresses blobs by their SHA-256).
    encryption_info: bytes | None = None
    # More images installed together with this one (component 1, ...): both or neither.
    more: tuple[ComponentImage, ...] = ()


@dataclass(frozen=True)
class ComponentImage:
    """A further image of a multi-component release (component index 1, 2, ...)."""

    image_digest: bytes
    image_size: int
    uri: str | None = None  # None: /fw/<id> of this image
    component: tuple[bytes, ...] = SECOND_COMPONENT


@dataclass(frozen=True)
class EncryptedPatch:
    """How an encrypted delta's patch is fetched (docs/decisions/delta-updates.md).

    `encryption_info` is the patch's own SUIT_Encryption_Info (a fresh CEK and IV, never
    the image's), `uri` names the patch *ciphertext* by its SHA-256 (`/fw/<id>`), as an
    encrypted image's URI does. The DeltaInfo's patch digest and size stay the
    plaintext patch's (firmware-encryption §7: digests are over plaintext)."""

    encryption_info: bytes
    uri: str


def build_manifest(
    release: Release,
    patch: delta.DeltaInfo | None = None,
    *,
    fallback: bool = True,
    encrypted_patch: EncryptedPatch | None = None,
) -> suit.Manifest:
    """The release's manifest; with `patch`, its delta form (docs/decisions/delta-updates.md).

    The delta form's install is a try-each: first the patch, if the running image is its
    source (the custom condition), else (or if the patch fails) the full image; the
    image-digest and image-size stay the resulting image's, so validate and secure boot
    are the same as for the full manifest. `fallback=False` leaves the full image out
    (a delta-only manifest: a device that cannot use the patch refuses it). The delta of
    an encrypted release is encrypted too (`encrypted_patch`: its encryption info goes
    on the patch's fetch, beside the delta parameters); a plaintext patch of an
    encrypted release would reveal the firmware's diff, so it is refused, and so is an
    encrypted patch of a plaintext release.
    """
    if patch is not None and (release.encryption_info is None) != (encrypted_patch is None):
        raise OtaError(
            "an encrypted release's delta must be encrypted too"
            if encrypted_patch is None
            else "an encrypted patch needs an encrypted release"
        )
    if patch is not None and release.more:
        # Both-or-neither install has no delta form (docs/decisions/multi-component.md).
        raise OtaError("a multi-component release cannot have a delta form")
    if not 0 < release.image_size < 1 << 64:
        raise ValueError("image size must be a positive unsigned 64-bit integer")
    if not 0 <= release.sequence_number < 1 << 64:
        raise ValueError("sequence number must be an unsigned 64-bit integer")
    if release.expires is not None and not 0 <= release.expires < 1 << 64:
        raise ValueError("expiry must be an unsigned 64-bit POSIX time")
    vendor = ids.vendor_id(release.vendor_domain)
    klass = ids.class_id(vendor, release.class_info)
    if release.more:
        return _build_multi(release, vendor, klass)
    digest = suit.SuitDigest(suit.DIGEST_SHA256, release.image_digest)
    uri = release.uri if release.uri is not None else ids.image_uri(release.image_digest)
    shared = CommandSequence.build(
        [
            Command(
                suit.CMD_OVERRIDE_PARAMETERS,
                Parameters(
                    (
                        (suit.P_VENDOR_ID, vendor),
                        (suit.P_CLASS_ID, klass),
                        (suit.P_IMAGE_DIGEST, digest),
                        (suit.P_IMAGE_SIZE, release.image_size),
                    )
                ),
            ),
            Command(suit.CMD_VENDOR_IDENTIFIER, REP_ALL),
            Command(suit.CMD_CLASS_IDENTIFIER, REP_ALL),
        ]
    )
    fetch_params: tuple[tuple[int, object], ...] = ((suit.P_URI, uri),)
    if release.encryption_info is not None:
        # Decrypt while fetching, into the one component: the device streams, so there is
        # no second component to fetch the ciphertext into and copy from (the draft's
        # examples fetch then copy; write and copy are the directives it names).
        fetch_params = ((suit.P_ENCRYPTION_INFO, release.encryption_info), *fetch_params)
    full = [
        Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(fetch_params)),
        Command(suit.CMD_FETCH, REP_FAILURE),
    ]
    if patch is not None:
        patch_params: tuple[tuple[int, object], ...] = (
            (suit.P_URI, ids.image_uri(patch.patch_digest.value)),
        )
        if encrypted_patch is not None:
            # draft-ietf-suit-firmware-encryption §4: the info on the fetch's parameters;
            # the device decrypts the patch while it streams into the patch decoder.
            patch_params = (
                (suit.P_ENCRYPTION_INFO, encrypted_patch.encryption_info),
                (suit.P_URI, encrypted_patch.uri),
            )
        by_delta = CommandSequence.build(
            [
                Command(
                    suit.CMD_OVERRIDE_PARAMETERS, Parameters(patch_params + patch.parameters())
                ),
                Command(suit.CMD_DELTA_SOURCE_MATCH, REP_ALL),
                Command(suit.CMD_FETCH, REP_FAILURE),
            ]
        )
        if fallback:
            full = [Command(suit.CMD_TRY_EACH, (by_delta, CommandSequence.build(full)))]
        else:
            full = list(by_delta.commands)
    install = CommandSequence.build([*full, Command(suit.CMD_IMAGE_MATCH, REP_ALL)])
    validate = CommandSequence.build([Command(suit.CMD_IMAGE_MATCH, REP_ALL)])
    invoke = CommandSequence.build([Command(suit.CMD_INVOKE, REP_FAILURE)])
    common = suit.Common((release.component,), shared)
    common = suit.Common(common.components, shared, None, cbor.dumps(common.to_cbor()))
    return suit.Manifest(
        1,
        release.sequence_number,
        common,
        ((suit.M_VALIDATE, validate), (suit.M_INVOKE, invoke), (suit.M_INSTALL, install)),
        extensions=() if release.expires is None else ((freshness.M_EXPIRES, release.expires),),
    )


def _build_multi(release: Release, vendor: bytes, klass: bytes) -> suit.Manifest:
    """A manifest installing several images (manifest-34 §8.4.10.1 set-component-index).

    Every sequence begins with set-component-index, as the draft requires with more than
    one component: shared sets vendor and class for all and digest and size per
    component; install fetches and checks each in turn; validate checks all (secure boot
    of every component); invoke boots component 0.
    """
    if release.encryption_info is not None:
        raise OtaError("an encrypted multi-component release is not supported")
    parts = [
        ComponentImage(release.image_digest, release.image_size, release.uri, release.component),
        *release.more,
    ]
    comps = [p.component for p in parts]
    if len(set(comps)) != len(comps):
        raise ValueError("every image of a release needs its own component")
    for part in parts:
        if not 0 < part.image_size < 1 << 64:
            raise ValueError("image size must be a positive unsigned 64-bit integer")
    shared_cmds = [
        Command(suit.CMD_SET_COMPONENT_INDEX, True),
        Command(
            suit.CMD_OVERRIDE_PARAMETERS,
            Parameters(((suit.P_VENDOR_ID, vendor), (suit.P_CLASS_ID, klass))),
        ),
        Command(suit.CMD_VENDOR_IDENTIFIER, REP_ALL),
        Command(suit.CMD_CLASS_IDENTIFIER, REP_ALL),
    ]
    install_cmds = []
    for i, part in enumerate(parts):
        digest = suit.SuitDigest(suit.DIGEST_SHA256, part.image_digest)
        uri = part.uri if part.uri is not None else ids.image_uri(part.image_digest)
        shared_cmds += [
            Command(suit.CMD_SET_COMPONENT_INDEX, i),
            Command(
                suit.CMD_OVERRIDE_PARAMETERS,
                Parameters(((suit.P_IMAGE_DIGEST, digest), (suit.P_IMAGE_SIZE, part.image_size))),
            ),
        ]
        install_cmds += [
            Command(suit.CMD_SET_COMPONENT_INDEX, i),
            Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_URI, uri),))),
            Command(suit.CMD_FETCH, REP_FAILURE),
            Command(suit.CMD_IMAGE_MATCH, REP_ALL),
        ]
    shared = CommandSequence.build(shared_cmds)
    install = CommandSequence.build(install_cmds)
    validate = CommandSequence.build(
        [Command(suit.CMD_SET_COMPONENT_INDEX, True), Command(suit.CMD_IMAGE_MATCH, REP_ALL)]
    )
    invoke = CommandSequence.build(
        [Command(suit.CMD_SET_COMPONENT_INDEX, 0), Command(suit.CMD_INVOKE, REP_FAILURE)]
    )
    common = suit.Common(tuple(comps), shared)
    common = suit.Common(common.components, shared, None, cbor.dumps(common.to_cbor()))
    return suit.Manifest(
        1,
        release.sequence_number,
        common,
        ((suit.M_VALIDATE, validate), (suit.M_INVOKE, invoke), (suit.M_INSTALL, install)),
        extensions=() if release.expires is None else ((freshness.M_EXPIRES, release.expires),),
    )


def build_envelope(
    release: Release,
    key: cose.SigningKey | None = None,
    alg: int | None = None,
    *,
    patch: delta.DeltaInfo | None = None,
    fallback: bool = True,
    encrypted_patch: EncryptedPatch | None = None,
) -> suit.Envelope:
    manifest = build_manifest(release, patch, fallback=fallback, encrypted_patch=encrypted_patch)
    envelope = suit.make_envelope(manifest)
    return sign_envelope(envelope, key, alg) if key is not None else envelope


def sign_envelope(
    envelope: suit.Envelope, key: cose.SigningKey, alg: int | None = None
) -> suit.Envelope:
    """Add a COSE_Sign1 over the envelope's SUIT_Digest (manifest-34 §8.3).

    The digest is recomputed from the manifest bytes first, so a stale or forged
    digest in the input is never signed. A second signature by the same key adds
    nothing but bytes every device must download and check, so it is refused.
    """
    actual = envelope.manifest_digest
    if actual != envelope.authentication.digest:
        raise ValueError("the envelope's SUIT_Digest does not match its manifest")
    payload = envelope.authentication.digest_raw
    for existing in envelope.authentication.blocks:
        try:
            cose.verify_block(existing.raw, payload, (key.public,))
        except OtaError:
            continue
        raise ValueError(f"the envelope is already signed with key {key.public.key_id}")
    block = suit.AuthBlock(cose.sign1(envelope.authentication.digest_raw, key, alg))
    return suit.with_blocks(envelope, (*envelope.authentication.blocks, block))


def rebuild_envelope(envelope: bytes, sequence_number: int, key: cose.SigningKey) -> bytes:
    """A new signed envelope for the same manifest with another sequence number.

    SUIT forbids going back to a lower sequence number (manifest-34 §8.4.2), so a
    rollback is a new release: the old manifest's components, conditions, image digest,
    size and URI unchanged, a higher sequence number, a new signature (`otacoap release
    rebuild`). Severable members travel along; their digests in the manifest still hold.
    """
    if not 0 <= sequence_number < 1 << 64:
        raise ValueError("sequence number must be an unsigned 64-bit integer")
    old = suit.decode_envelope(envelope)
    manifest = dataclasses.replace(old.manifest, sequence_number=sequence_number)
    fresh = suit.make_envelope(manifest, severable=old.severable, integrated=old.integrated)
    return suit.encode_envelope(sign_envelope(fresh, key))
