"""The trust gate: the only code that turns envelope bytes into a VerifiedManifest.

Modelled on python-tuf's TrustedMetadataSet (DESIGN principle 2). It either returns a
VerifiedManifest or raises an OtaError subclass whose `reason` is a SUIT report code
(principle 3: nothing half-verified escapes). Order follows manifest-34 §6.1-6.2:
size cap, then authenticate (digest over the bstr-wrapped manifest, then a COSE block
from a trust anchor) *before* the manifest is interpreted, then version, freshness,
severable digests, identity, and local policy.

Two steps, as python-tuf splits "verify the signatures" from "is it newer, unexpired":
`authenticate` (size, signature, strict parse) makes an AuthenticatedManifest once;
`admit` checks it against one recipient's policy (freshness, severable elements,
identity, local policy). `accept` is both, for a device; the server's publisher
authenticates once and admits against the class it publishes to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

import cbor2

from . import cbor, cose, freshness, suit
from .errors import (
    AlreadyInstalled,
    AuthenticationError,
    IncompatibleError,
    LimitExceeded,
    ManifestError,
    PolicyError,
    RollbackError,
    SeveredElementError,
)
from .untrusted import describe


@dataclass(frozen=True)
class ImageInfo:
    """One payload the manifest describes, as seen by a static walk of its sequences."""

    component: int
    digest: suit.SuitDigest | None
    size: int | None
    uri: str | None
    # suit-parameter-encryption-info when the fetch brings ciphertext (digest and size
    # are then the plaintext's, firmware-encryption §7)
    encryption_info: bytes | None = None


@dataclass(frozen=True)
class TrustPolicy:
    """Everything the gate compares against; safe defaults, passed in (principle 8).

    `None` means "not checked here" (e.g. `manifest verify` has no device to compare
    against); a device sets all of them.
    """

    anchors: tuple[cose.TrustAnchor, ...]
    max_envelope_size: int = cbor.DEFAULT_MAX_SIZE
    max_depth: int = cbor.DEFAULT_MAX_DEPTH
    # Freshness (manifest-34 §8.4.2, ATTACKS.md #4, #5, #7)
    current_sequence: int | None = None
    current_manifest_digest: bytes | None = None
    max_sequence_jump: int | None = None
    # Trusted time, POSIX seconds; None: no trusted clock, the signed expiry is not
    # enforced (core.freshness, ATTACKS.md #8).
    now: int | None = None
    # Identity (ATTACKS.md #9)
    vendor_id: bytes | None = None
    class_id: bytes | None = None
    device_id: bytes | None = None
    # Local policy (ATTACKS.md #13, #16, #17)
    max_image_size: int | None = None
    max_components: int | None = None
    allowed_components: frozenset[tuple[bytes, ...]] | None = None
    allow_relative_uris: bool = True
    allowed_uri_prefixes: tuple[str, ...] | None = None  # None: any absolute URI

    def __post_init__(self) -> None:
        # An empty trust set is an error, not "trust nothing" or "trust all" (principle 10).
        if not self.anchors:
            raise AuthenticationError("no trust anchors configured")


@dataclass(frozen=True)
class AuthenticatedManifest:
    """Step 1 of the gate: bytes whose manifest a trust anchor vouched for, parsed strictly.

    Nothing about the recipient has been checked yet (freshness, identity, local
    policy): `admit` does that. Only `authenticate` makes one, so holding one proves
    that the COSE signature was verified exactly once, with `anchors` and `limits`.
    """

    envelope: suit.Envelope
    envelope_bytes: bytes = field(repr=False)
    signer: cose.TrustAnchor
    anchors: tuple[cose.TrustAnchor, ...] = field(repr=False)
    limits: tuple[int, int]  # (max_envelope_size, max_depth) it was parsed under
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _GATE:
            raise TypeError("AuthenticatedManifest is only made by trust.authenticate()")


@dataclass(frozen=True)
class VerifiedManifest:
    """Step 2 of the gate: an authentic manifest admitted by one recipient's policy."""

    envelope: suit.Envelope
    envelope_bytes: bytes = field(repr=False)
    manifest_digest: suit.SuitDigest
    signer: str  # key id of the anchor that vouched
    images: tuple[ImageInfo, ...]  # per component, for display
    fetches: tuple[ImageInfo, ...]  # every fetch, with the parameters in force then
    vendor_ids: tuple[bytes, ...]
    class_ids: tuple[bytes, ...]
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _GATE:
            raise TypeError("VerifiedManifest is only made by trust.admit()")

    @property
    def manifest(self) -> suit.Manifest:
        return self.envelope.manifest

    @property
    def sequence_number(self) -> int:
        return self.envelope.manifest.sequence_number

    def payload_images(self) -> tuple[ImageInfo, ...]:
        """Images the update fetches (those with a URI)."""
        return tuple(i for i in self.images if i.uri is not None)


_GATE = object()


def accept(data: bytes, policy: TrustPolicy) -> VerifiedManifest:
    """Authenticate and check an envelope; return it verified or raise.

    The device's and the bootloader's whole gate: `authenticate` then `admit` with the
    same policy, in the order manifest-34 §6.1-6.2 gives.
    """
    return admit(authenticate(data, policy), policy)


def authenticate(data: bytes, policy: TrustPolicy) -> AuthenticatedManifest:
    """Size cap, signature, strict parse: everything that does not depend on the recipient.

    Only `policy.anchors`, `policy.max_envelope_size` and `policy.max_depth` are used
    here. A publisher calls this once and then `admit`s the result against each policy
    it needs, so the signature is verified once per envelope (python-tuf verifies a
    metadata file's signatures once, then checks its version and expiry).
    """
    if len(data) > policy.max_envelope_size:
        raise LimitExceeded(
            f"envelope of {len(data)} bytes exceeds the {policy.max_envelope_size}-byte cap"
        )
    digest_raw, blocks, manifest_raw = _outer(data, policy)

    # Authenticate before interpreting (manifest-34 §6.2 step 5, §8.3).
    digest = suit.decode_digest(cbor.loads(digest_raw, max_size=policy.max_envelope_size))
    if not digest.matches(cbor.bstr_wrap(manifest_raw)):
        raise AuthenticationError("manifest digest does not match the manifest")
    if not blocks:
        raise AuthenticationError("envelope has no authentication block")
    signer: cose.TrustAnchor | None = None
    for block in blocks:
        try:
            signer = cose.verify_block(block, digest_raw, policy.anchors)
            break
        except AuthenticationError as exc:
            last: AuthenticationError = exc
    if signer is None:
        raise last

    # Parse the now-authentic bytes strictly (version first, manifest-34 §6.1).
    envelope = suit.decode_envelope(
        data, max_size=policy.max_envelope_size, max_depth=policy.max_depth
    )
    return AuthenticatedManifest(
        envelope, bytes(data), signer, policy.anchors, _limits(policy), _GATE
    )


def admit(authentic: AuthenticatedManifest, policy: TrustPolicy) -> VerifiedManifest:
    """Is this authentic manifest fresh and allowed for this recipient? Return it or raise.

    Freshness, severable digests, identity and local policy, in that order. `policy`
    must trust the same anchors under the same limits as the one `authentic` was made
    with: admitting with another trust set would launder a signature it never checked.
    """
    if policy.anchors != authentic.anchors or _limits(policy) != authentic.limits:
        raise ValueError("admit() needs the anchors and limits the manifest was authenticated with")
    envelope = authentic.envelope
    manifest = envelope.manifest
    manifest_digest = envelope.manifest_digest

    # Freshness: the signed expiry first, so a frozen server serving the installed but
    # expired manifest is refused (and reported), not "up to date" (ATTACKS.md #8).
    freshness.check_expiry(manifest, policy.now)
    # Freshness (manifest-34 §8.4.2).
    _check_sequence(manifest.sequence_number, manifest_digest.value, policy)

    # Severable elements must match the digests the signed manifest holds (§8.4.12).
    _check_severable(envelope)

    # Identity and local policy, from a static walk of every sequence.
    summary = summarize(envelope)
    _check_identity(summary.vendor_ids, summary.class_ids, summary.device_ids, policy)
    _check_policy(envelope, summary, policy)

    return VerifiedManifest(
        envelope,
        authentic.envelope_bytes,
        manifest_digest,
        authentic.signer.key_id,
        summary.images,
        summary.fetches,
        summary.vendor_ids,
        summary.class_ids,
        _GATE,
    )


def _limits(policy: TrustPolicy) -> tuple[int, int]:
    return (policy.max_envelope_size, policy.max_depth)


def _outer(data: bytes, policy: TrustPolicy) -> tuple[bytes, list[bytes], bytes]:
    value = cbor.loads(data, max_size=policy.max_envelope_size, max_depth=policy.max_depth)
    if isinstance(value, cbor2.CBORTag):
        if value.tag != suit.ENVELOPE_TAG:
            raise ManifestError(f"CBOR tag {describe(value.tag)} is not a SUIT envelope")
        value = value.value
    if not isinstance(value, dict):
        raise ManifestError("SUIT_Envelope must be a map")
    auth_raw, manifest_raw = value.get(suit.ENV_AUTH), value.get(suit.ENV_MANIFEST)
    if not isinstance(auth_raw, bytes) or not isinstance(manifest_raw, bytes):
        raise ManifestError("envelope lacks a bstr-wrapped authentication wrapper or manifest")
    auth = cbor.loads(auth_raw, max_size=policy.max_envelope_size)
    if not (isinstance(auth, list) and auth and all(isinstance(x, bytes) for x in auth)):
        raise ManifestError("SUIT_Authentication must be [bstr digest, * bstr block]")
    return auth[0], auth[1:], manifest_raw


def _check_sequence(seq: int, digest: bytes, policy: TrustPolicy) -> None:
    current = policy.current_sequence
    if current is None:
        return
    if seq < current:
        raise RollbackError(f"sequence number {seq} is lower than the installed {current}")
    if seq == current:
        if policy.current_manifest_digest is not None and digest == policy.current_manifest_digest:
            raise AlreadyInstalled(f"sequence number {seq} is already installed")
        raise RollbackError(
            f"sequence number {seq} equals the installed one but the manifest differs"
        )
    if policy.max_sequence_jump is not None and seq - current > policy.max_sequence_jump:
        raise RollbackError(
            f"sequence number jumps by {seq - current}, more than the "
            f"allowed {policy.max_sequence_jump}"
        )


def _check_severable(envelope: suit.Envelope) -> None:
    manifest = envelope.manifest
    for key, content in envelope.severable:
        expected = manifest.severed_digest(key)
        if expected is None:
            # Present in the envelope but not vouched for by the manifest: splice attempt.
            raise SeveredElementError(
                f"envelope element {describe(key)} is not covered by the manifest"
            )
        if not expected.matches(cbor.bstr_wrap(content)):
            raise SeveredElementError(
                f"severable element {describe(key)} does not match its digest"
            )
        suit.severed_member(envelope, key)  # must also parse


@dataclass(frozen=True)
class Summary:
    """What a static walk of every sequence found.

    `images` has one entry per component (its final parameters and last fetched URI),
    for display. The policy checks use `fetches` and `uris` instead: every fetch with
    the parameters in force at that moment, and every URI set anywhere, including all
    try-each alternatives, so an early fetch cannot hide behind a later one.
    """

    images: tuple[ImageInfo, ...]
    fetches: tuple[ImageInfo, ...]
    uris: tuple[str, ...]
    vendor_ids: tuple[bytes, ...]
    class_ids: tuple[bytes, ...]
    device_ids: tuple[bytes, ...]


def summarize(envelope: suit.Envelope) -> Summary:
    """Walk every available sequence statically (all try-each alternatives included)."""
    manifest = envelope.manifest
    n = suit.component_count(manifest.common)
    params: list[dict[int, Any]] = [{} for _ in range(n)]
    last_uri: list[str | None] = [None] * n
    fetches: list[ImageInfo] = []
    uris: list[str] = []
    ids: dict[int, list[bytes]] = {suit.P_VENDOR_ID: [], suit.P_CLASS_ID: [], suit.P_DEVICE_ID: []}

    def walk(seq: suit.CommandSequence, current: list[int]) -> None:
        for cmd in seq.commands:
            if cmd.code == suit.CMD_SET_COMPONENT_INDEX:
                arg = cmd.arg
                wanted = range(n) if arg is True else ([arg] if isinstance(arg, int) else arg)
                current[:] = [i for i in wanted if 0 <= i < n]
            elif cmd.code in (suit.CMD_OVERRIDE_PARAMETERS, suit.CMD_SET_PARAMETERS):
                for i in current:
                    for k, v in cmd.arg.items:
                        params[i][k] = v
                        if k in ids and isinstance(v, bytes):
                            ids[k].append(v)
                        elif k == suit.P_URI:
                            uris.append(v)
            elif cmd.code == suit.CMD_FETCH:
                for i in current:
                    p = params[i]
                    uri = p.get(suit.P_URI)
                    last_uri[i] = uri if uri is not None else last_uri[i]
                    fetches.append(
                        ImageInfo(
                            i,
                            p.get(suit.P_IMAGE_DIGEST),
                            p.get(suit.P_IMAGE_SIZE),
                            uri,
                            p.get(suit.P_ENCRYPTION_INFO),
                        )
                    )
            elif cmd.code == suit.CMD_RUN_SEQUENCE:
                for i in list(current):
                    walk(cmd.arg, [i])
            elif cmd.code == suit.CMD_TRY_EACH:
                for i in list(current):
                    for alt in cmd.arg:
                        if alt is not None:
                            walk(alt, [i])

    keys = [
        suit.M_DEPENDENCY_RESOLUTION,
        suit.M_PAYLOAD_FETCH,
        suit.M_CANDIDATE_VERIFICATION,
        suit.M_INSTALL,
        suit.M_VALIDATE,
        suit.M_LOAD,
        suit.M_INVOKE,
    ]
    if manifest.common.shared_sequence is not None:
        walk(manifest.common.shared_sequence, [0] if n == 1 else [])
    for key in keys:
        seq = manifest.sequence(key)
        if seq is None and manifest.severed_digest(key) is not None:
            member = suit.severed_member(envelope, key)
            seq = member if isinstance(member, suit.CommandSequence) else None
        if seq is not None:
            walk(seq, [0] if n == 1 else [])
    images = []
    for i in range(n):
        digest, size = params[i].get(suit.P_IMAGE_DIGEST), params[i].get(suit.P_IMAGE_SIZE)
        if digest is not None or size is not None or last_uri[i] is not None:
            enc = params[i].get(suit.P_ENCRYPTION_INFO)
            images.append(ImageInfo(i, digest, size, last_uri[i], enc))
    return Summary(
        tuple(images),
        tuple(fetches),
        _unique(uris),
        _unique(ids[suit.P_VENDOR_ID]),
        _unique(ids[suit.P_CLASS_ID]),
        _unique(ids[suit.P_DEVICE_ID]),
    )


def _unique(items: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


def _check_identity(
    vendors: tuple[bytes, ...],
    classes: tuple[bytes, ...],
    devices: tuple[bytes, ...],
    policy: TrustPolicy,
) -> None:
    # RFC 9124 REQ.SEC.COMPATIBLE: checked before anything is downloaded. A manifest
    # that names no vendor or class cannot prove it is meant for this device.
    for name, declared, mine in (
        ("vendor", vendors, policy.vendor_id),
        ("class", classes, policy.class_id),
    ):
        if mine is None:
            continue
        if not declared:
            raise IncompatibleError(f"manifest does not name a {name} identifier")
        if any(d != mine for d in declared):
            raise IncompatibleError(f"manifest is for another {name}")
    if devices and policy.device_id is not None and any(d != policy.device_id for d in devices):
        raise IncompatibleError("manifest is for another device")


def _check_policy(envelope: suit.Envelope, summary: Summary, policy: TrustPolicy) -> None:
    components = envelope.manifest.common.components
    if policy.max_components is not None and len(components) > policy.max_components:
        raise PolicyError(
            f"manifest has {len(components)} components, the device {policy.max_components}"
        )
    if policy.allowed_components is not None:
        for comp in components:
            if comp not in policy.allowed_components:
                raise PolicyError(
                    "manifest targets a component this device does not allow to be written"
                )
    if policy.max_image_size is not None:
        for fetch in summary.fetches:
            if fetch.size is None:
                raise PolicyError("a fetched image has no image-size")
            if not 0 < fetch.size <= policy.max_image_size:
                raise PolicyError(
                    f"image-size {fetch.size} does not fit the {policy.max_image_size}-byte slot"
                )
    for uri in summary.uris:
        _check_uri(envelope, uri, policy)


def _check_uri(envelope: suit.Envelope, uri: str, policy: TrustPolicy) -> None:
    if uri.startswith("#"):
        if envelope.integrated_payload(uri) is None:
            raise PolicyError(f"integrated payload {uri!r} is not in the envelope")
        return
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 -- validates the port (RFC 3986 §3.2.3), ValueError if bad
    except ValueError:
        # RFC 3986 §3.2.2: "[" / "]" only around an IP literal. urlsplit raises here, and
        # an untyped ValueError would escape the gate (found by fuzzing, ATTACKS.md #43).
        raise PolicyError(f"URI ({describe(uri)}) does not parse") from None
    if not parts.scheme and not parts.netloc:
        # A relative reference resolves against the server the envelope came from.
        if not policy.allow_relative_uris:
            raise PolicyError(f"relative URI {uri!r} is not allowed")
        return
    if policy.allowed_uri_prefixes is not None and not any(
        _within(parts, p) for p in policy.allowed_uri_prefixes
    ):
        raise PolicyError(f"URI {uri!r} is outside the allowed origins")


def _within(parts: SplitResult, prefix: str) -> bool:
    """Same scheme and exact host:port as `prefix`, path under its path (RFC 3986 §6.2).

    A plain string prefix would let coaps://fw.example.com.evil.net/ or
    coaps://fw.example.com@evil.net/ through.
    """
    allowed = urlsplit(prefix)
    if parts.username is not None or parts.password is not None:
        return False
    if parts.scheme.lower() != allowed.scheme.lower():
        return False
    if parts.netloc.lower() != allowed.netloc.lower():
        return False
    base = allowed.path if allowed.path.endswith("/") else allowed.path + "/"
    return parts.path == allowed.path or parts.path.startswith(base) or not allowed.path
