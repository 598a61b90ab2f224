"""Publishing a release's delta envelopes: the same gate as a release, plus the patch.

A delta envelope is signed by the author like any envelope and checked the same way
(`Publisher.authenticate` once, then `trust.admit`), and more:

* it is for an existing release: same vendor, class and sequence number, and the image
  it results in (image-digest and image-size) is that release's image, else
  ImageMismatch (issue 13 §2: "a delta whose result digest does not match the release's
  image is refused at publish");
* it fetches the patch handed in (digest, size, the server-relative /fw/<id> URI) and,
  besides it, at most the release's own image (the full-image fallback);
* when the server holds the source image (an earlier release's image), the patch is
  applied with the device's own decoder (core.delta) and must produce the release's
  image, so a patch that would only fail on the devices is refused here.

An encrypted release's delta is an encrypted delta (docs/decisions/delta-updates.md):
the server holds ciphertext only, so what it can check differs. Still checked: the
signature and admission; that the result digest and size are those the *release's
signed manifest* names (plaintext digests, compared as signed values); that the patch
fetch carries encryption info (a plaintext patch of an encrypted release is refused)
and the fallback exactly the release's ciphertext URI and encryption info; that the
handed-in ciphertext is the one the signed URI names (its SHA-256) and its size fits
the patch size and content algorithm; and that the source is the (plaintext) image of
an earlier release of the class, the only source a device is ever served a delta
for. Not checkable without the plaintext: the patch
digest, and applying the patch to the source (the device does both, and falls back
to the full image or refuses).

The commit is one blob rename plus one transaction (`DeltaTables.commit_delta`); a
refusal leaves only its audit entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import delta, encryption, ids, suit, trust
from ..core.errors import IncompatibleError, OtaError, PolicyError
from ..core.payload_kind import check_multi_component_plain
from .anchor_lists import check_publish_signer
from .blobs import TempBlob
from .deltas import DeltaCandidate, DeltaRecord
from .errors import ImageMismatch, NotFound
from .models import ImageRecord, ReleaseRecord
from .publish import Publisher, StagedImages

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 16


class _FileSource:
    """The source image read from a blob file (bounded reads, like the device's slot)."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()

    def read(self, offset: int, length: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(length)

    def close(self) -> None:
        self._f.close()


class DeltaPublisher:
    """Checks and commits delta envelopes (see the module docstring)."""

    def __init__(self, publisher: Publisher) -> None:
        self._p = publisher
        self._store: Any = publisher._store
        self._blobs = publisher._blobs
        self._config = publisher._config

    def check(
        self, authentic: trust.AuthenticatedManifest, patch_digest: bytes, patch_size: int
    ) -> tuple[DeltaCandidate, delta.DeltaInfo]:
        """Validate a delta envelope without side effects."""
        verified = trust.admit(authentic, self._p._policy(authentic.anchors))
        check_multi_component_plain(verified)
        if len(verified.vendor_ids) != 1 or len(verified.class_ids) != 1:
            raise IncompatibleError("a delta must name exactly one vendor-id and one class-id")
        key = (verified.vendor_ids[0], verified.class_ids[0])
        # A class with a signed anchor list: its current authors only, as for a release.
        check_publish_signer(self._store, key, authentic.signer)
        release = self._store.release_by_seq(key, verified.sequence_number)
        if release is None:
            raise NotFound(
                f"no release with seq {verified.sequence_number} for this class: "
                "publish the release (its full envelope) first"
            )
        if release.more_images:
            # Both-or-neither install of several images has no delta form yet
            # (docs/decisions/multi-component.md): refused rather than half-supported.
            raise PolicyError("a multi-component release cannot have a delta")
        deltas = [f for f in verified.fetches if f.delta is not None]
        if len(deltas) != 1:
            raise PolicyError(f"a delta envelope fetches one patch; this one {len(deltas)}")
        patch_fetch = deltas[0]
        info = patch_fetch.delta
        assert info is not None
        full = release.image
        signed = release.signed_image  # the release's image as its manifest signs it
        if signed is None:
            raise PolicyError("the release's envelope does not fetch exactly one image")
        encrypted = signed.encryption_info is not None
        want = (signed.digest.value, signed.size) if encrypted and signed.digest else None
        for fetch in verified.fetches:
            if fetch.digest is None or fetch.size is None:
                raise PolicyError("every fetch must state the resulting image digest and size")
            # Plain: the stored image itself. Encrypted: the plaintext digest and size
            # the release's signed manifest names (the server never sees the plaintext).
            result = want or (full.digest, full.size)
            if (fetch.digest.value, fetch.size) != result:
                raise ImageMismatch(
                    "the delta's resulting image is not the release's image",
                    detail=f"release {result[0].hex()}, manifest {fetch.digest.value.hex()}",
                )
            if fetch.delta is None and fetch.uri != full.uri:
                raise PolicyError(f"the fallback must fetch the release's image {full.uri!r}")
            if fetch.delta is None and fetch.encryption_info != signed.encryption_info:
                raise PolicyError("the fallback must carry the release's own encryption info")
        if encrypted:
            _check_encrypted_patch(patch_fetch, info, patch_size)
            self._check_known_source(release, info)
        elif patch_fetch.encryption_info is not None:
            raise PolicyError("an encrypted patch of a plaintext release is refused")
        else:
            if info.patch_digest.algorithm != suit.DIGEST_SHA256:
                raise PolicyError("the patch digest must be SHA-256 (the blob store's address)")
            if info.patch_digest.value != patch_digest or info.patch_size != patch_size:
                raise ImageMismatch("the patch handed in is not the one the manifest signs")
        if patch_fetch.uri != ids.image_uri(patch_digest):
            raise PolicyError(f"the patch URI must be {ids.image_uri(patch_digest)!r}")
        if info.source_digest.algorithm != suit.DIGEST_SHA256:
            raise PolicyError("the source digest must be SHA-256")
        candidate = DeltaCandidate(
            release,
            info.source_digest.value,
            verified.manifest_digest.value,
            authentic.envelope_bytes,
            ImageRecord(patch_digest, patch_size),
            verified.signer,
        )
        return candidate, info

    def _check_known_source(self, release: ReleaseRecord, info: delta.DeltaInfo) -> None:
        """An encrypted delta's source must be the image an earlier release of the class
        installs (`running_digest`): the one check relating a patch the server cannot
        apply to anything it knows. (Devices are only ever served a delta whose source
        is such a release, `deltas.delta_for_device`, so no other delta is of use.)"""
        source = info.source_digest.value
        for other in self._store.list_releases(current_only=False):
            if other.class_key != release.class_key:
                continue
            if other.sequence_number < release.sequence_number and (other.running_digest == source):
                return
        raise NotFound(
            f"the delta's source {source.hex()[:16]} is no earlier release's image in "
            "this class: publish that release first"
        )

    def _try_apply(self, info: delta.DeltaInfo, patch: Path, image: ImageRecord) -> None:
        """Apply the patch to the source, if the server has it; it must make the image.

        Not for an encrypted delta: the server holds neither the plaintext patch nor the
        plaintext source (the caller skips it)."""
        source_digest = info.source_digest.value
        if not self._blobs.has(source_digest):
            log.info("delta source %s not on this server: not applied", source_digest.hex()[:16])
            return
        source = _FileSource(self._blobs.path_of(source_digest))
        try:
            decoder = delta.SequentialPatchDecoder(info, source, image.size)
            out = hashlib.sha256()
            with open(patch, "rb") as f:
                while chunk := f.read(1024):
                    piece = decoder.feed(chunk)
                    while piece:
                        out.update(piece)
                        piece = decoder.drain()
            out.update(decoder.finish())
        except delta.PatchError as exc:
            raise ImageMismatch(f"the patch does not apply to its source: {exc}") from None
        finally:
            source.close()
        if out.digest() != image.digest:
            raise ImageMismatch("the patch applied to its source does not make the release's image")

    def _check_and_commit(
        self, authentic: trust.AuthenticatedManifest, blob: TempBlob, actor: str
    ) -> DeltaRecord:
        candidate, info = self.check(authentic, blob.digest, blob.size)
        signed = candidate.release.signed_image
        if signed is not None and signed.encryption_info is None:
            self._try_apply(info, blob.path, candidate.release.image)
        created = self._blobs.commit(blob)
        try:
            record: DeltaRecord = self._store.commit_delta(candidate, actor)
        except BaseException:
            if created and not self._store.image_referenced(candidate.patch.digest):
                self._blobs.remove(candidate.patch.digest)
            raise
        log.info(
            "published delta of %s seq %d from %s: patch %s (%d bytes) by %s",
            candidate.release.class_label,
            candidate.release.sequence_number,
            candidate.source_digest.hex()[:16],
            candidate.patch.image_id,
            candidate.patch.size,
            actor,
        )
        return record

    def commit_file(
        self, authentic: trust.AuthenticatedManifest, patch_path: Path, actor: str
    ) -> DeltaRecord:
        """The local path: stream the patch into a temp blob, check, commit.

        The caller authenticated the envelope (once) and audits a refusal."""
        with self._blobs.temp(cap=self._config.max_image_size) as blob:
            with open(patch_path, "rb") as f:
                while chunk := f.read(_COPY_CHUNK):
                    blob.write(chunk)
            blob.finish()
            return self._check_and_commit(authentic, blob, actor)

    def commit_uploaded(
        self, authentic: trust.AuthenticatedManifest, staged: StagedImages, actor: str
    ) -> DeltaRecord:
        """The network path: the envelope names its patch among the operator's uploads."""
        verified = trust.admit(authentic, self._p._policy(authentic.anchors))
        patches = [f for f in verified.fetches if f.delta is not None]
        if len(patches) != 1:
            raise PolicyError("a delta envelope fetches exactly one patch")
        assert patches[0].delta is not None
        named = patches[0].delta.patch_digest.value
        if patches[0].encryption_info is not None:
            # The patch digest is the plaintext's; the signed URI names the ciphertext.
            named = _uri_id(patches[0].uri)
        blob = staged.take(named)
        if blob is None:
            raise NotFound("no uploaded patch matches the manifest (POST it to /admin/image)")
        try:
            blob.finish()
            return self._check_and_commit(authentic, blob, actor)
        finally:
            blob.discard()


def _uri_id(uri: str | None) -> bytes:
    """The SHA-256 prefix a server-relative `/fw/<id>` URI names (else PolicyError)."""
    head, _, tail = (uri or "").rpartition("/")
    if head != "/" + ids.IMAGE_PATH_PREFIX or not ids.is_image_id(tail):
        raise PolicyError("an encrypted patch must be named as /fw/<id> of its ciphertext")
    return bytes.fromhex(tail)


def _check_encrypted_patch(fetch: trust.ImageInfo, info: delta.DeltaInfo, size: int) -> None:
    """What the server can check of an encrypted patch it cannot read (module docstring):
    that it is encrypted, and that the ciphertext's size fits the signed patch size
    under the content algorithm (A128GCM adds its tag). The URI check (the ciphertext's
    SHA-256) follows in `check`."""
    if fetch.encryption_info is None:
        raise PolicyError(
            "the delta of an encrypted release must be encrypted too (a plaintext patch "
            "reveals the firmware's diff)"
        )
    enc = encryption.parse_encryption_info(fetch.encryption_info)
    want = enc.ciphertext_size(info.patch_size)
    if size != want:
        raise ImageMismatch(
            f"the patch ciphertext is {size} bytes; the signed {info.patch_size}-byte "
            f"patch encrypted needs {want}"
        )


@dataclass(frozen=True)
class Published:
    """What a publish made visible: a release or a delta of one."""

    class_label: str
    sequence_number: int
    uri: str  # the image (a release) or the patch (a delta)
    size: int
    signer: str
    delta_from: bytes | None = None  # the source image digest of a delta
    more: tuple[ImageRecord, ...] = ()  # a multi-component release's other images

    def line(self) -> str:
        what = "image" if self.delta_from is None else f"delta from {self.delta_from.hex()[:16]}:"
        return (
            f"published {self.class_label} seq {self.sequence_number}: {what} {self.uri} "
            f"({self.size} bytes), signed by {self.signer}"
            + "".join(f", {i.uri} ({i.size} bytes)" for i in self.more)
        )


def _published(record: ReleaseRecord | DeltaRecord, release: ReleaseRecord | None) -> Published:
    if isinstance(record, DeltaRecord):
        assert release is not None
        return Published(
            release.class_label,
            release.sequence_number,
            record.patch.uri,
            record.patch.size,
            record.signer,
            record.source_digest,
        )
    return Published(
        record.class_label,
        record.sequence_number,
        record.image.uri,
        record.image.size,
        record.signer,
        more=record.more_images,
    )


def _is_delta(publisher: Publisher, authentic: trust.AuthenticatedManifest) -> bool:
    verified = trust.admit(authentic, publisher._policy(authentic.anchors))
    return any(f.delta is not None for f in verified.fetches)


def publish_file_any(
    publisher: Publisher,
    envelope: bytes,
    path: Path | Sequence[Path],
    actor: str,
    *,
    make_current: bool = True,
) -> Published:
    """`otacoap publish`: a release (IMAGE, or each image of a multi-component release)
    or a delta of one (PATCH), told apart by the authenticated envelope; one signature
    verification, a refusal audited. `make_current` is `Publisher.publish_file`'s (a
    release only)."""
    paths = [path] if isinstance(path, Path) else list(path)
    try:
        authentic = publisher.authenticate(envelope)
        if _is_delta(publisher, authentic):
            if len(paths) != 1:
                raise PolicyError("a delta envelope is published with its one PATCH")
            dp = DeltaPublisher(publisher)
            record = dp.commit_file(authentic, paths[0], actor)
            return _published(record, dp._store.release_by_id(record.release_id))
        with contextlib.ExitStack() as stack:
            blobs = []
            for one in paths:
                cap = publisher._config.max_image_size
                blob = stack.enter_context(publisher._blobs.temp(cap=cap))
                with open(one, "rb") as f:
                    while chunk := f.read(_COPY_CHUNK):
                        blob.write(chunk)
                blob.finish()
                blobs.append(blob)
            release = publisher._check_and_commit(
                authentic, blobs[0], actor, make_current=make_current, more=blobs[1:]
            )
            return _published(release, None)
    except OtaError as exc:
        publisher.refused(envelope, actor, exc)
        raise


def publish_uploaded_any(
    publisher: Publisher, envelope: bytes, staged: StagedImages, actor: str
) -> Published:
    """/admin/release: the same for an envelope whose image or patch was uploaded."""
    try:
        authentic = publisher.authenticate(envelope)
        if _is_delta(publisher, authentic):
            dp = DeltaPublisher(publisher)
            record = dp.commit_uploaded(authentic, staged, actor)
            return _published(record, dp._store.release_by_id(record.release_id))
        return _published(publisher.commit_uploaded(authentic, staged, actor), None)
    except OtaError as exc:
        publisher.refused(envelope, actor, exc)
        raise
