"""Building and signing otacoap's own manifests (the operator side of the core).

The shape follows manifest-34 Appendix B example 1 ("simultaneous download and
installation"): the shared sequence sets vendor, class, digest and size and checks
vendor and class; install fetches and checks the image; validate re-checks it (secure
boot); invoke boots it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import cbor, cose, ids, suit
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
    # suit-parameter-encryption-info (firmware-encryption): the fetched payload is
    # ciphertext; image_digest and image_size stay the plaintext's (§7), and `uri` should
    # name the ciphertext (the server addresses blobs by their SHA-256).
    encryption_info: bytes | None = None


def build_manifest(release: Release) -> suit.Manifest:
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
    fetch_params: tuple[tuple[int, object], ...] = ((suit.P_URI, uri),)
    if release.encryption_info is not None:
        # Decrypt while fetching, into the one component: the device streams, so there is
        # no second component to fetch the ciphertext into and copy from (the draft's
        # examples fetch then copy; write and copy are the directives it names).
        fetch_params = ((suit.P_ENCRYPTION_INFO, release.encryption_info), *fetch_params)
    install = CommandSequence.build(
        [
            Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(fetch_params)),
            Command(suit.CMD_FETCH, REP_FAILURE),
            Command(suit.CMD_IMAGE_MATCH, REP_ALL),
        ]
    )
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
    release: Release, key: cose.SigningKey | None = None, alg: int | None = None
) -> suit.Envelope:
    envelope = suit.make_envelope(build_manifest(release))
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
