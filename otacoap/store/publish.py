"""Publishing: every check a release must pass before any device can see it.

RFC 9124 REQ.SEC.MFST.CHECK / ATTACKS.md #36: the server refuses a manifest that does
not verify against its trust anchors, is not fresh for its class, names no registered
class, or does not describe exactly the image handed in. The checks run on bytes that
are not yet visible; the commit is one blob rename plus one DB transaction. A refusal
leaves only its audit entry behind: the temp blob is deleted, nothing is committed.

The local CLI (`otacoap publish`) and the network path (`/admin/release`) both end here.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..core import ids, suit, trust
from ..core.errors import (
    AlreadyInstalled,
    AuthenticationError,
    IncompatibleError,
    LimitExceeded,
    OtaError,
    PolicyError,
    RollbackError,
)
from .blobs import BlobStore, TempBlob
from .config import PublishConfig
from .errors import ImageMismatch
from .interface import Store
from .models import ImageRecord, ReleaseCandidate, ReleaseRecord

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 16


class Publisher:
    def __init__(self, store: Store, blobs: BlobStore, config: PublishConfig) -> None:
        self._store = store
        self._blobs = blobs
        self._config = config

    def check(self, envelope: bytes, image_digest: bytes, image_size: int) -> ReleaseCandidate:
        """Validate a release without side effects; return what may be committed."""
        cfg = self._config
        if len(envelope) > cfg.max_envelope_size:
            raise LimitExceeded(
                f"envelope of {len(envelope)} bytes exceeds the {cfg.max_envelope_size}-byte cap"
            )
        anchors = tuple(a.anchor for a in self._store.list_anchors())
        if not anchors:
            # Principle 10: an empty trust set is an error, never "accept anything".
            raise AuthenticationError("no trust anchors configured (otacoap trust add KEY.pem)")
        # 1. Authenticate (and parse strictly) before looking at what the manifest says.
        base = trust.TrustPolicy(
            anchors=anchors,
            max_envelope_size=cfg.max_envelope_size,
            max_image_size=cfg.max_image_size,
        )
        first = trust.accept(envelope, base)
        if len(first.vendor_ids) != 1 or len(first.class_ids) != 1:
            raise IncompatibleError(
                "a release must name exactly one vendor-id and one class-id "
                f"(this one names {len(first.vendor_ids)} and {len(first.class_ids)})"
            )
        key = (first.vendor_ids[0], first.class_ids[0])
        label = self._store.class_has_devices(key)
        if label is None:
            raise IncompatibleError(
                f"no registered device has vendor {ids.uuid_str(key[0])} "
                f"class {ids.uuid_str(key[1])}"
            )
        # 2. Freshness against the class's current release, through the same gate the
        # devices use (seq must be above it; equal is refused; bounded jump).
        current = self._store.current_release(key)
        policy = trust.TrustPolicy(
            anchors=anchors,
            max_envelope_size=cfg.max_envelope_size,
            max_image_size=cfg.max_image_size,
            current_sequence=current.sequence_number if current else None,
            current_manifest_digest=current.manifest_digest if current else None,
            max_sequence_jump=cfg.max_sequence_jump,
            vendor_id=key[0],
            class_id=key[1],
        )
        try:
            verified = trust.accept(envelope, policy)
        except (RollbackError, AlreadyInstalled) as exc:
            now = current.sequence_number if current else "none"
            raise RollbackError(
                f"{exc}: the current release of {label} is seq {now}, "
                "a new release needs a higher one"
            ) from None
        # 3. Exactly one fetched image, and it is the one handed in.
        fetched = verified.payload_images()
        if len(fetched) != 1:
            raise PolicyError(
                f"a release must fetch exactly one image; this manifest fetches {len(fetched)}"
            )
        image = fetched[0]
        uri = image.uri or ""
        if uri.startswith("#"):
            raise PolicyError("integrated payloads are not published; give the image a /fw/ URI")
        if image.digest is None or image.digest.algorithm != suit.DIGEST_SHA256:
            raise PolicyError("the image digest must be SHA-256 (the blob store's address)")
        if image.size is None:
            raise PolicyError("the manifest does not state the image size")
        if image.size != image_size:
            raise ImageMismatch(
                f"image is {image_size} bytes, the manifest says {image.size}",
            )
        if image.digest.value != image_digest:
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
            envelope=bytes(envelope),
            image=ImageRecord(image_digest, image_size),
            signer=verified.signer,
            previous_release_id=current.id if current else None,
        )

    def image_digest_of(self, envelope: bytes) -> bytes:
        """The SHA-256 of the one image an authentic envelope fetches (or raise)."""
        anchors = tuple(a.anchor for a in self._store.list_anchors())
        if not anchors:
            raise AuthenticationError("no trust anchors configured (otacoap trust add KEY.pem)")
        verified = trust.accept(
            envelope,
            trust.TrustPolicy(anchors=anchors, max_envelope_size=self._config.max_envelope_size),
        )
        fetched = verified.payload_images()
        if len(fetched) != 1 or fetched[0].digest is None:
            raise PolicyError("a release must fetch exactly one image with a digest")
        return fetched[0].digest.value

    def publish_file(self, envelope: bytes, image_path: Path, actor: str) -> ReleaseRecord:
        """Stream an image file into a temp blob, check, commit; audit either way."""
        try:
            with self._blobs.temp(cap=self._config.max_image_size) as blob:
                with open(image_path, "rb") as f:
                    while chunk := f.read(_COPY_CHUNK):
                        blob.write(chunk)
                blob.finish()
                return self._check_and_commit(envelope, blob, actor)
        except OtaError as exc:
            self.refused(envelope, actor, exc)
            raise

    def publish_staged(self, envelope: bytes, blob: TempBlob, actor: str) -> ReleaseRecord:
        """Publish an image already streamed into a temp blob (network upload)."""
        try:
            blob.finish()
            return self._check_and_commit(envelope, blob, actor)
        except OtaError as exc:
            self.refused(envelope, actor, exc)
            raise
        finally:
            blob.discard()

    def refused(self, envelope: bytes, actor: str, exc: OtaError) -> None:
        subject = "envelope sha256:" + hashlib.sha256(envelope).hexdigest()[:16]
        detail = str(exc) + (f" ({exc.detail})" if exc.detail else "")
        log.info("publish refused by %s: %s: %s", actor, subject, detail)
        self._store.audit(actor, "publish", subject, "refused", detail)

    def _check_and_commit(self, envelope: bytes, blob: TempBlob, actor: str) -> ReleaseRecord:
        candidate = self.check(envelope, blob.digest, blob.size)
        created = self._blobs.commit(blob)
        try:
            release = self._store.commit_release(candidate, actor)
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
