"""Publishing: every check a release must pass before any device can see it.

RFC 9124 REQ.SEC.MFST.CHECK / ATTACKS.md #36: the server refuses a manifest that does
not verify against its trust anchors, is not fresh for its class, names no registered
class, or does not describe exactly the image handed in. The checks run on bytes that
are not yet visible; the commit is one blob rename plus one DB transaction. A refusal
leaves only its audit entry behind: the temp blob is deleted, nothing is committed.

The local CLI (`otacoap publish`) and the network path (`/admin/release`) both end here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..config import PublishConfig
from ..core import cose, encryption, ids, suit, trust
from ..core.errors import (
    AlreadyInstalled,
    AuthenticationError,
    IncompatibleError,
    LimitExceeded,
    OtaError,
    PolicyError,
    RollbackError,
)
from ..core.payload_kind import check_multi_component_plain
from .anchor_lists import check_publish_signer
from .blobs import BlobStore, TempBlob
from .errors import ImageMismatch, NotFound
from .interface import Store
from .models import ImageRecord, ReleaseCandidate, ReleaseRecord

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 16


class StagedImages(Protocol):
    """Where a network publish finds the image its envelope names (server/uploads.py).

    `take` hands over the caller's own upload with this SHA-256, or None; once taken,
    the blob is the publisher's to commit or discard. A shorter `digest` is an image id
    (the SHA-256 prefix a `/fw/<id>` URI names): an encrypted release names its
    ciphertext only that way, and the upload must be the only one with that prefix.
    """

    def take(self, digest: bytes) -> TempBlob | None: ...


class Publisher:
    def __init__(self, store: Store, blobs: BlobStore, config: PublishConfig) -> None:
        self._store = store
        self._blobs = blobs
        self._config = config

    def authenticate(self, envelope: bytes) -> trust.AuthenticatedManifest:
        """Verify the envelope's signature against the store's anchors: once per publish.

        The policy here carries only what does not depend on the class (anchors and
        size limits, image-size cap); `check` admits the result for its class.
        """
        return trust.authenticate(envelope, self._base_policy(envelope))

    def _base_policy(self, envelope: bytes) -> trust.TrustPolicy:
        cfg = self._config
        if len(envelope) > cfg.max_envelope_size:
            raise LimitExceeded(
                f"envelope of {len(envelope)} bytes exceeds the {cfg.max_envelope_size}-byte cap"
            )
        anchors = tuple(a.anchor for a in self._store.list_anchors())
        if not anchors:
            # Principle 10: an empty trust set is an error, never "accept anything".
            raise AuthenticationError("no trust anchors configured (otacoap trust add KEY.pem)")
        return self._policy(anchors)

    def _policy(self, anchors: tuple[cose.TrustAnchor, ...]) -> trust.TrustPolicy:
        """What every release must meet whatever its class; `check` adds the class's."""
        cfg = self._config
        return trust.TrustPolicy(
            anchors=anchors,
            max_envelope_size=cfg.max_envelope_size,
            max_image_size=cfg.max_image_size,
        )

    def check(
        self,
        authentic: trust.AuthenticatedManifest,
        image_digest: bytes,
        image_size: int,
        more: Sequence[tuple[bytes, int]] = (),
    ) -> ReleaseCandidate:
        """Validate a release without side effects; return what may be committed.

        No signature is verified here: `authentic` says it was, by `authenticate`.
        `image_*` is component 0's image; `more` the (SHA-256, size) of the images of a
        multi-component release's other components, each matched by digest.
        """
        cfg = self._config
        base = self._policy(authentic.anchors)
        # 1. The class-independent policy, and which class the release is for.
        first = trust.admit(authentic, base)
        if len(first.vendor_ids) != 1 or len(first.class_ids) != 1:
            raise IncompatibleError(
                "a release must name exactly one vendor-id and one class-id "
                f"(this one names {len(first.vendor_ids)} and {len(first.class_ids)})"
            )
        key = (first.vendor_ids[0], first.class_ids[0])
        # A class may have no device yet (campaigns decide who gets a release, and
        # devices registered later join them): it is then named by its ids.
        current = self._store.latest_release(key)
        label = self._store.class_has_devices(key) or (
            current.class_label
            if current is not None
            else f"{ids.uuid_str(key[0])}/{ids.uuid_str(key[1])}"
        )
        # 1b. A class with a signed anchor list: its current authors only (revocation).
        check_publish_signer(self._store, key, authentic.signer)
        # 2. Freshness against the class's latest release (current or only handed out
        # by a campaign), through the same gate the devices use (seq must be above it;
        # equal is refused; bounded jump).
        policy = dataclasses.replace(
            base,
            current_sequence=current.sequence_number if current else None,
            current_manifest_digest=current.manifest_digest if current else None,
            max_sequence_jump=cfg.max_sequence_jump,
            vendor_id=key[0],
            class_id=key[1],
        )
        try:
            verified = trust.admit(authentic, policy)
        except (RollbackError, AlreadyInstalled) as exc:
            now = current.sequence_number if current else "none"
            served = self._store.current_release(key)
            which = "current" if current is None or served == current else "latest"
            raise RollbackError(
                f"{exc}: the {which} release of {label} is seq {now}, "
                "a new release needs a higher one"
            ) from None
        check_multi_component_plain(verified)
        if any(f.delta is not None for f in verified.fetches):
            raise PolicyError(
                "this is a delta envelope: publish it as a delta of its release "
                "(otacoap publish ... --delta ENVELOPE PATCH)"
            )
        # 3. Exactly one fetched image per component, and it is the one handed in.
        image = _the_image(verified)
        more_images = _more_images(verified, more)
        uri = image.uri or ""
        if uri.startswith("#"):
            raise PolicyError("integrated payloads are not published; give the image a /fw/ URI")
        if image.digest is None or image.digest.algorithm != suit.DIGEST_SHA256:
            raise PolicyError("the image digest must be SHA-256 (the blob store's address)")
        if image.size is None:
            raise PolicyError("the manifest does not state the image size")
        if image.encryption_info is not None:
            # An encrypted payload (firmware-encryption): the server stores and serves
            # the ciphertext and never sees the plaintext, so it cannot check the image
            # digest (the plaintext's; the device does). The signed URI below names the
            # ciphertext by its SHA-256, and its size must fit the content algorithm.
            info = encryption.parse_encryption_info(image.encryption_info)
            want = info.ciphertext_size(image.size)
            if image_size != want:
                raise ImageMismatch(
                    f"ciphertext is {image_size} bytes; the manifest's encrypted "
                    f"{image.size}-byte image needs {want}"
                )
        elif image.size != image_size:
            raise ImageMismatch(
                f"image is {image_size} bytes, the manifest says {image.size}",
            )
        elif image.digest.value != image_digest:
            raise ImageMismatch(
                "image SHA-256 does not match the manifest's image digest",
                detail=f"image {image_digest.hex()}, manifest {image.digest.value.hex()}",
            )
        expected_uri = ids.image_uri(image_digest)
        if uri != expected_uri:
            # Devices resolve the URI against this server; anything else would send
            # them elsewhere or to a path this server does not serve.
            raise PolicyError(
                f"payload URI {uri!r} must be {expected_uri!r}, the server-relative "
                "/fw/<first 16 hex of the image SHA-256> this server serves"
            )
        return ReleaseCandidate(
            vendor_id=key[0],
            class_id=key[1],
            class_label=label,
            sequence_number=verified.sequence_number,
            manifest_digest=verified.manifest_digest.value,
            envelope=authentic.envelope_bytes,
            image=ImageRecord(image_digest, image_size),
            signer=verified.signer,
            previous_release_id=current.id if current else None,
            more_images=more_images,
        )

    def publish_file(
        self,
        envelope: bytes,
        image_path: Path | Sequence[Path],
        actor: str,
        *,
        make_current: bool = True,
    ) -> ReleaseRecord:
        """Stream image files into temp blobs, check, commit; audit either way.

        `make_current` (publish --rollout all, the default): every device of the class
        is served it at once; otherwise only a campaign hands it out (otacoap campaign).
        Several files: the images of a multi-component release, in any order (each is
        matched to its component by digest).
        """
        paths = [image_path] if isinstance(image_path, Path) else list(image_path)
        try:
            with contextlib.ExitStack() as stack:
                blobs = []
                for path in paths:
                    blob = stack.enter_context(self._blobs.temp(cap=self._config.max_image_size))
                    with open(path, "rb") as f:
                        while chunk := f.read(_COPY_CHUNK):
                            blob.write(chunk)
                    blob.finish()
                    blobs.append(blob)
                authentic = self.authenticate(envelope)
                return self._check_and_commit(
                    authentic, blobs[0], actor, make_current=make_current, more=blobs[1:]
                )
        except OtaError as exc:
            self.refused(envelope, actor, exc)
            raise

    def publish_uploaded(self, envelope: bytes, staged: StagedImages, actor: str) -> ReleaseRecord:
        """The network publish (/admin/release): the envelope names its staged image.

        Authenticate once; the one image the authentic manifest fetches names the
        operator's upload to take; check and commit that (ATTACKS.md #27: signed
        artefacts are verified after reassembly). Audited either way.
        """
        try:
            return self.commit_uploaded(self.authenticate(envelope), staged, actor)
        except OtaError as exc:
            self.refused(envelope, actor, exc)
            raise

    def commit_uploaded(
        self, authentic: trust.AuthenticatedManifest, staged: StagedImages, actor: str
    ) -> ReleaseRecord:
        """`publish_uploaded` after its authentication; the caller audits a refusal."""
        digests = [self._image_digest(authentic), *self._more_digests(authentic)]
        blobs: list[TempBlob] = []
        try:
            for digest in digests:  # every component's image was uploaded before
                blob = staged.take(digest)
                if blob is None:
                    raise NotFound(
                        f"no uploaded image matches the manifest's {digest.hex()[:16]} "
                        "(POST it to /admin/image)"
                    )
                blobs.append(blob)
                blob.finish()
            return self._check_and_commit(authentic, blobs[0], actor, more=blobs[1:])
        finally:
            for blob in blobs:
                blob.discard()

    def _image_digest(self, authentic: trust.AuthenticatedManifest) -> bytes:
        """The SHA-256 of the one image an authentic envelope fetches (or raise).

        Only what names the upload is checked here; `check` applies the rest.
        """
        verified = trust.admit(
            authentic,
            trust.TrustPolicy(
                anchors=authentic.anchors, max_envelope_size=self._config.max_envelope_size
            ),
        )
        check_multi_component_plain(verified)
        image = _the_image(verified)
        if image.digest is None:
            raise PolicyError("a release must fetch exactly one image with a digest")
        if image.encryption_info is not None:
            # The manifest's digest is the plaintext's (firmware-encryption §7), which
            # the server never sees; the signed URI names the ciphertext by its id.
            uri = image.uri or ""
            head, _, tail = uri.rpartition("/")
            if head != "/" + ids.IMAGE_PATH_PREFIX or not ids.is_image_id(tail):
                raise PolicyError("an encrypted release must name its ciphertext as /fw/<id>")
            return bytes.fromhex(tail)
        return image.digest.value

    def _more_digests(self, authentic: trust.AuthenticatedManifest) -> list[bytes]:
        """The SHA-256s of a multi-component release's images of components 1.."""
        verified = trust.admit(
            authentic,
            trust.TrustPolicy(
                anchors=authentic.anchors, max_envelope_size=self._config.max_envelope_size
            ),
        )
        fetched = verified.payload_images()
        if len(fetched) < 2:
            return []
        return [i.digest.value for i in fetched if i.component > 0 and i.digest is not None]

    def refused(self, envelope: bytes, actor: str, exc: OtaError) -> None:
        subject = "envelope sha256:" + hashlib.sha256(envelope).hexdigest()[:16]
        detail = str(exc) + (f" ({exc.detail})" if exc.detail else "")
        log.info("publish refused by %s: %s: %s", actor, subject, detail)
        self._store.audit(actor, "publish", subject, "refused", detail)

    def _check_and_commit(
        self,
        authentic: trust.AuthenticatedManifest,
        blob: TempBlob,
        actor: str,
        *,
        make_current: bool = True,
        more: Sequence[TempBlob] = (),
    ) -> ReleaseRecord:
        if more:
            # The images of a multi-component release, handed in any order: component 0's
            # is the one its digest names, the others are matched in `check`.
            main = self._image_digest(authentic)
            blobs = [blob, *more]
            found = next((b for b in blobs if b.digest == main), None)
            if found is None:
                raise ImageMismatch("no image handed in matches the manifest's component 0")
            blob, more = found, [b for b in blobs if b is not found]
        candidate = self.check(
            authentic, blob.digest, blob.size, [(b.digest, b.size) for b in more]
        )
        created = self._blobs.commit(blob)
        for other in more:  # left in place should the commit fail (content-addressed)
            self._blobs.commit(other)
        try:
            release = self._store.commit_release(candidate, actor, make_current=make_current)
        except BaseException:
            # Only undo what we added: a blob another release already uses stays.
            if created and not self._store.image_referenced(candidate.image.digest):
                self._blobs.remove(candidate.image.digest)
            raise
        log.info(
            "published %s seq %d: image %s (%d bytes) by %s",
            release.class_label,
            release.sequence_number,
            release.image.image_id,
            release.image.size,
            actor,
        )
        return release


def _the_image(verified: trust.VerifiedManifest) -> trust.ImageInfo:
    """The one fetched image, or component 0's of a multi-component release."""
    fetched = verified.payload_images()
    if len(fetched) == 1:
        return fetched[0]
    if sorted(i.component for i in fetched) != list(range(len(fetched))):
        raise PolicyError(
            "a release must fetch exactly one image per component (0, 1, ...); this "
            f"manifest fetches {len(fetched)}"
        )
    return next(i for i in fetched if i.component == 0)


def _more_images(
    verified: trust.VerifiedManifest, handed: Sequence[tuple[bytes, int]]
) -> tuple[ImageRecord, ...]:
    """Components 1..: each fetched image must be one handed in (digest and size) and be
    served by this server (/fw/<id>); every image handed in must be one of them."""
    fetched = verified.payload_images()
    extra = sorted((i for i in fetched if i.component > 0), key=lambda i: i.component)
    if len(fetched) < 2:
        extra = []
    if len(handed) != len(extra):
        raise ImageMismatch(
            f"the manifest fetches {len(extra) + 1} image(s), {len(handed) + 1} were handed in"
        )
    sizes = dict(handed)
    out = []
    for image in extra:
        if image.encryption_info is not None:
            raise PolicyError("an encrypted image in a multi-component release is not supported")
        if image.digest is None or image.digest.algorithm != suit.DIGEST_SHA256:
            raise PolicyError("the image digest must be SHA-256 (the blob store's address)")
        digest = image.digest.value
        if digest not in sizes:
            raise ImageMismatch(
                f"no image handed in matches component {image.component}'s digest",
                detail=f"manifest {digest.hex()}",
            )
        if image.size != sizes[digest]:
            raise ImageMismatch(
                f"component {image.component}'s image is {sizes[digest]} bytes, "
                f"the manifest says {image.size}"
            )
        if image.uri != ids.image_uri(digest):
            raise PolicyError(
                f"payload URI {image.uri!r} of component {image.component} must be "
                f"{ids.image_uri(digest)!r}"
            )
        out.append(ImageRecord(digest, sizes[digest]))
    return tuple(out)
