"""Building and signing otacoap's own manifests (the operator side of the core).

The shape follows manifest-34 Appendix B example 1 ("simultaneous download and
installation"): the shared sequence sets vendor, class, digest and size and checks
vendor and class; install fetches and checks the image; validate re-checks it (secure
boot); invoke boots it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import cbor, cose, delta, ids, suit
from .suit import Command, CommandSequence, Parameters

# Reporting policies as used by the draft's examples (DIGEST.md §4).
REP_ALL = 15
REP_FAILURE = 2

MAIN_COMPONENT: tuple[bytes, ...] = (b"\x00",)


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


def build_manifest(
    release: Release, patch: delta.DeltaInfo | None = None, *, fallback: bool = True
) -> suit.Manifest:
    """The release's manifest; with `patch`, its delta form (docs/decisions/delta-updates.md).

    The delta form's install is a try-each: first the patch, if the running image is its
    source (the custom condition), else (or if the patch fails) the full image; the
    image-digest and image-size stay the resulting image's, so validate and secure boot
    are the same as for the full manifest. `fallback=False` leaves the full image out
    (a delta-only manifest: a device that cannot use the patch refuses it).
    """
    if not 0 < release.image_size < 1 << 64:
        raise ValueError("image size must be a positive unsigned 64-bit integer")
    if not 0 <= release.sequence_number < 1 << 64:
        raise ValueError("sequence number must be an unsigned 64-bit integer")
    vendor = ids.vendor_id(release.vendor_domain)
    klass = ids.class_id(vendor, release.class_info)
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
    full = [
        Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_URI, uri),))),
        Command(suit.CMD_FETCH, REP_FAILURE),
    ]
    if patch is not None:
        patch_params = ((suit.P_URI, ids.image_uri(patch.patch_digest.value)),)
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
    )


def build_envelope(
    release: Release,
    key: cose.SigningKey | None = None,
    alg: int | None = None,
    *,
    patch: delta.DeltaInfo | None = None,
    fallback: bool = True,
) -> suit.Envelope:
    envelope = suit.make_envelope(build_manifest(release, patch, fallback=fallback))
    return sign_envelope(envelope, key, alg) if key is not None else envelope


def sign_envelope(
    envelope: suit.Envelope, key: cose.SigningKey, alg: int | None = None
) -> suit.Envelope:
    """Add a COSE_Sign1 over the envelope's SUIT_Digest (manifest-34 §8.3).

    The digest is recomputed from the manifest bytes first, so a stale or forged
    digest in the input is never signed.
    """
    actual = envelope.manifest_digest
    if actual != envelope.authentication.digest:
        raise ValueError("the envelope's SUIT_Digest does not match its manifest")
    block = suit.AuthBlock(cose.sign1(envelope.authentication.digest_raw, key, alg))
    return suit.with_blocks(envelope, (*envelope.authentication.blocks, block))
