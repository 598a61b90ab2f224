"""The CoAP resources. Each is thin: decode the request, call the store/core, render.

The device contract (DTLS-PSK on the port `otacoap serve` prints; identity = device id):

  GET  /m          2.05 the SUIT envelope of this device's release (CF 60), ETag =
                   8 bytes of SHA-256(envelope); 2.03 if the ETag matches; 4.04 when
                   there is none. Observe (RFC 7641): a notification whenever the
                   release changes. Larger than one block: Block2 like /fw.
  GET  /fw/<id>    the image (CF 42), one Block2 block per request, any block first,
                   SZX 0..6; Size2 = image size, ETag = 8 bytes of the image SHA-256.
                   4.00 for a block past the end or SZX 7; 4.04 unless the image is in
                   this device's release.
  POST /r          a report (otacoap.core.report, CF 60, <= 1024 bytes, no Block1):
                   2.04 once it is committed; 4.09 if its counter is not above the last
                   accepted one (the identical last report again is 2.04, not stored
                   twice); 4.00 malformed; 4.13 too large; 4.15 wrong format.
  POST /admin/image, /admin/release   operators only (4.03 for devices), see below.

Every resource does its own block-wise handling (`needs_blockwise_assembly` is False):
aiocoap's automatic Block2 would render the whole image into memory and cache it per
client, and its Block1 spool is unbounded and keyed without our caps.

Authorisation: the principal comes from the DTLS session (view.principal_of); what
it is served and may read, from the one rule in server.access. No principal: 4.01.
A device asking for something that is not its own: 4.04 (no enumeration oracle,
ATTACKS.md #32). A device on an operator resource: 4.03. Handlers raise refusals;
server.errors renders them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiocoap.resource as resource
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.protocol import ServerObservation

from ..core import block2_responder, blockwise, cbor, coap_numbers, protocol
from ..core.errors import OtaError
from ..core.report import MAX_REPORT_SIZE, decode_report
from ..store import Principal, Publisher, Role, TempBlob
from ..store.errors import NotFound, StoreError, StoreUnavailable
from ..store.publish_delta import publish_uploaded_any
from . import access
from .errors import Unauthenticated, UnsupportedFormat, WrongRole, error_response
from .store_view import StoreView
from .uploads import Block, StagedImages, UploadKey, Uploads, UploadTooLarge

log = logging.getLogger(__name__)


_TAKE_TIMEOUT = 10.0  # seconds; taking a staged image is one dict lookup on the loop


def _max_szx(view: StoreView, request: Message) -> int:
    remote_max = getattr(request.remote, "maximum_block_size_exp", blockwise.MAX_SZX)
    return min(view.config.server.max_block_szx, remote_max, blockwise.MAX_SZX)


def _block2_response(
    view: StoreView,
    request: Message,
    total: int,
    read: Callable[[int, int], bytes],
    content_format: int,
    etag: bytes,
) -> Message:
    """Answer one Block2 request statelessly (RFC 7959 §2.4): read only that block.

    What to answer is core.block2_responder's decision (the /fw fast path answers with
    the same one); this renders it as an aiocoap message. Raises BlockError (4.00) for
    SZX 7 and for a block starting past the end: nothing outside [0, total) is read
    (ATTACKS.md #25).
    """
    asked = request.opt.block2
    answer = block2_responder.answer(
        total,
        None if asked is None else (asked.block_number, asked.size_exponent),
        _max_szx(view, request),
        content_format=content_format,
        etag=etag,
    )
    response = Message(
        code=Code(answer.code),
        payload=read(answer.offset, answer.length),
        content_format=answer.content_format,
        etag=answer.etag,
    )
    if answer.block2 is not None:
        response.opt.block2 = answer.block2
        response.opt.size2 = answer.size2
    return response


def _nothing() -> None:
    pass


class _Base(resource.Resource):
    """Shared plumbing: our own block handling, principal lookup, refusals rendered."""

    def __init__(self, view: StoreView) -> None:
        super().__init__()
        self.view = view

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return False

    async def render(self, request: Message) -> Message:
        # Handlers raise their refusals; they become responses here and only here.
        try:
            return await super().render(request)
        except OtaError as exc:
            return error_response(exc)

    def principal(self, request: Message) -> Principal:
        """The request's principal (from its DTLS session); 4.01 without one."""
        principal = self.view.principal_of(request.remote)
        if principal is None:
            raise Unauthenticated()
        return principal


class ManifestResource(_Base, resource.ObservableResource):
    """/m: the envelope of this device's release, observable (RFC 7641)."""

    ct = protocol.CF_ENVELOPE
    rt = "otacoap.manifest"

    def __init__(self, view: StoreView) -> None:
        super().__init__(view)
        # observation -> (the observing device, ETag last sent)
        self._observers: dict[ServerObservation, tuple[Principal, bytes | None]] = {}
        view.on_release_change(self.releases_changed)

    async def add_observation(self, request: Message, serverobservation: ServerObservation) -> None:
        # aiocoap calls the cancellation callback of every observation it offered,
        # accepted or not, so always accept; declining is an early deregister.
        try:
            principal = self.view.principal_of(request.remote)
            release = access.release_of(self.view, principal) if principal else None
        except OtaError:  # the store is unavailable: render_get answers (5.03)
            principal = release = None
        if principal is None or release is None:
            serverobservation.accept(_nothing)  # the 4.01/4.04 ends it (RFC 7641 §3.2)
            return
        cfg = self.view.config.server
        mine = sum(1 for who, _ in self._observers.values() if who == principal)
        if len(self._observers) >= cfg.max_observers or mine >= cfg.max_observers_per_device:
            # RFC 7641 §4.1: a server may decline; the response then has no Observe.
            log.info("not accepting another observation of /m from %s", principal)
            serverobservation.accept(_nothing)
            serverobservation.deregister()
            return
        self._observers[serverobservation] = (principal, release.etag)

        def cancel(obs: ServerObservation = serverobservation) -> None:
            self._observers.pop(obs, None)

        serverobservation.accept(cancel)

    def releases_changed(self) -> None:
        """Notify each observer whose release actually changed."""
        for obs, (principal, etag) in list(self._observers.items()):
            release = access.release_of(self.view, principal)
            new_etag = release.etag if release else None
            if new_etag != etag:
                self._observers[obs] = (principal, new_etag)
                obs.trigger()

    @property
    def observer_count(self) -> int:
        return len(self._observers)

    async def render_get(self, request: Message) -> Message:
        principal = self.principal(request)
        release = access.release_of(self.view, principal)
        if release is None:
            log.debug("/m for %s: no release", principal)
            raise NotFound("no release")
        # RFC 7252 §5.10.6.2: a matching ETag gets 2.03 Valid without the body.
        if request.opt.block2 is None and release.etag in (request.opt.etags or ()):
            return Message(code=Code.VALID, etag=release.etag)
        envelope = release.envelope
        response = _block2_response(
            self.view,
            request,
            len(envelope),
            lambda off, n: envelope[off : off + n],
            protocol.CF_ENVELOPE,
            release.etag,
        )
        log.debug("/m for %s: seq %d", principal, release.sequence_number)
        return response


class FirmwareResource(_Base, resource.PathCapable):
    """/fw/<image id>: the image, one Block2 block per request, read from the blob store."""

    async def render_get(self, request: Message) -> Message:
        path = request.opt.uri_path
        principal = self.principal(request)
        # Exact match only: case, trailing slashes or encodings are other names. (The
        # fast path takes readable_image; a delta's fallback and a release's other
        # components' images come here.)
        image = access.image_named(self.view, principal, path[0]) if len(path) == 1 else None
        if image is None:
            # ascii(): the path is attacker-chosen text headed for logs and the audit.
            subject = ascii("/fw/" + "/".join(path))[1:-1][:60]
            self.view.refused(str(principal), "fw.get", subject, "not this device's image")
            raise NotFound("not found")
        try:
            response = _block2_response(
                self.view,
                request,
                image.size,
                lambda off, n: self.view.blob_reader.read(image.digest, off, n),
                protocol.CF_IMAGE,
                image.etag,
            )
        except StoreError as exc:
            log.error("reading image %s failed: %s", image.image_id, exc)
            raise StoreError("image unavailable") from None  # 5.00; the cause is logged
        except OtaError as exc:
            log.debug("/fw/%s for %s: %s", image.image_id, principal, exc)
            raise
        self.view.count_served(image.digest, len(response.payload))
        log.debug("/fw/%s for %s: %s", image.image_id, principal, response.opt.block2)
        return response


class ReportResource(_Base):
    """/r: POST a status report; it is on disk before the 2.04 (ATTACKS.md #49)."""

    ct = protocol.CF_REPORT
    rt = "otacoap.report"

    async def render_post(self, request: Message) -> Message:
        principal = self.principal(request)
        if principal.role is not Role.DEVICE:
            raise WrongRole("only devices report")
        if request.opt.content_format not in (None, protocol.CF_REPORT):
            raise UnsupportedFormat("reports are application/cbor")
        b1 = request.opt.block1
        if len(request.payload) > MAX_REPORT_SIZE or (
            b1 is not None and (b1.more or b1.block_number)
        ):
            raise UploadTooLarge("report too large", MAX_REPORT_SIZE)
        body = bytes(request.payload)
        try:
            # The body never names the device: the session does (ATTACKS.md #33).
            report = decode_report(body)
            outcome = await self.view.db(lambda s: s.record_report(principal.name, report, body))
        except NotFound:
            raise Unauthenticated("unknown device") from None
        except StoreUnavailable:
            # Not committed, so not acknowledged: 5.03 with Max-Age, and the device
            # keeps the report queued and sends it again (issue 14 §3).
            raise
        except OtaError as exc:
            self.view.refused(str(principal), "report", principal.name, str(exc))
            raise
        if outcome.stored:
            self.view.wake_campaigns()  # a report may end a campaign member's attempt
        log.info(
            "report from %s: #%d %s %s%s",
            principal.name,
            report.counter,
            report.state.value,
            report.reason.name,
            "" if outcome.stored else " (repeat, not stored again)",
        )
        response = Message(code=Code.CHANGED)
        if b1 is not None:
            response.opt.block1 = b1
        return response


class _AdminUpload(_Base):
    """Shared Block1 handling of /admin/image and /admin/release (operators only)."""

    name = ""

    def __init__(self, view: StoreView, uploads: Uploads, staged: StagedImages) -> None:
        super().__init__(view)
        self.uploads = uploads
        self.staged = staged

    def get_link_description(self) -> dict[str, str] | None:
        return None  # not advertised in /.well-known/core

    def cap(self) -> int:
        raise NotImplementedError

    async def complete(self, principal: Principal, blob: TempBlob) -> Message:
        raise NotImplementedError

    def _operator(self, request: Message) -> Principal:
        principal = self.principal(request)
        if principal.role is not Role.OPERATOR:
            self.view.refused(str(principal), "admin", self.name, "device on an operator resource")
            raise WrongRole("operators only")
        return principal

    def _upload_key(self, principal: Principal, request: Message) -> UploadKey:
        return (
            principal.identity,
            str(request.remote.hostinfo),
            self.name,
            b"".join(request.opt.request_tag or ()),
        )

    async def render_delete(self, request: Message) -> Message:
        """An operator abandons its upload in progress (same Request-Tag, RFC 9175 §3):
        2.02 Deleted whether or not one was still there (DELETE is idempotent)."""
        principal = self._operator(request)
        if self.uploads.cancel(self._upload_key(principal, request)):
            log.info("upload %s from %s cancelled by its operator", self.name, principal)
        return Message(code=Code.DELETED)

    async def render_post(self, request: Message) -> Message:
        principal = self._operator(request)
        b1 = request.opt.block1
        block = Block(b1.block_number, bool(b1.more), b1.size_exponent) if b1 else None
        key = self._upload_key(principal, request)
        try:
            blob = self.uploads.feed(
                key, block, bytes(request.payload), self.cap(), request.opt.size1
            )
        except OtaError as exc:
            self.view.refused(str(principal), "upload", self.name, str(exc))
            raise
        if blob is None:
            # RFC 7959 §2.3: 2.31 Continue acknowledges the block, echoing Block1.
            log.debug(
                "upload %s from %s: block %d", self.name, principal, block.num if block else 0
            )
            return Message(code=Code.CONTINUE, block1=b1)
        try:
            response = await self.complete(principal, blob)
        except OtaError as exc:
            response = error_response(exc)  # with Block1 echoed, below
        if b1 is not None:
            response.opt.block1 = b1
        return response


class AdminImageResource(_AdminUpload):
    """/admin/image: stage an image (Block1, application/octet-stream).

    The response (2.04) carries CBOR [sha256 digest, size]; the image stays invisible
    until an envelope naming it arrives at /admin/release.
    """

    name = "image"

    def cap(self) -> int:
        return self.view.config.publish.max_image_size

    async def complete(self, principal: Principal, blob: TempBlob) -> Message:
        try:
            digest = await self.view.db(lambda _s: blob.finish())  # fsync off the loop
            self.staged.put(principal.identity, blob)
        except BaseException:
            blob.discard()
            raise
        log.info(
            "staged image sha256:%s (%d bytes) from %s", digest.hex()[:16], blob.size, principal
        )
        self.view.audit_soon(
            str(principal),
            "upload",
            f"image sha256:{digest.hex()[:16]}",
            "staged",
            f"{blob.size} bytes",
        )
        return Message(
            code=Code.CHANGED,
            payload=cbor.dumps([digest, blob.size]),
            content_format=coap_numbers.CF_CBOR,
        )


class AdminReleaseResource(_AdminUpload):
    """/admin/release: POST the envelope (Block1 if large) of a staged image.

    The same Publisher checks as the local `otacoap publish` run on the reassembled
    bytes (ATTACKS.md #27: signed artefacts are verified after reassembly). 2.04 with
    CBOR {"class", "seq", "image"} on success; the refusal's code and reason otherwise.
    """

    name = "release"

    def cap(self) -> int:
        return self.view.config.publish.max_envelope_size

    async def complete(self, principal: Principal, blob: TempBlob) -> Message:
        try:
            blob.finish()
            with open(blob.path, "rb") as f:
                envelope = f.read(self.cap() + 1)
        finally:
            blob.discard()
        blobs, cfg = self.view.blobs, self.view.config.publish
        staged = _OwnUploads(self.staged, principal.identity, asyncio.get_running_loop())
        # A release, or a delta envelope of one (store/publish_delta.py tells them apart).
        actor = str(principal)
        release = await self.view.db(
            lambda s: publish_uploaded_any(Publisher(s, blobs, cfg), envelope, staged, actor)
        )
        self.view.refresh()  # tell /m observers now rather than at the next poll
        return Message(
            code=Code.CHANGED,
            payload=cbor.dumps(
                {
                    "class": release.class_label,
                    "seq": release.sequence_number,
                    "image": release.uri,
                    **({"delta_from": release.delta_from} if release.delta_from else {}),
                }
            ),
            content_format=coap_numbers.CF_CBOR,
        )


class _OwnUploads:
    """One operator's staged images, as the publisher on the DB thread sees them.

    StagedImages belongs to the event loop (the sweep runs there), so `take` hops onto
    the loop; the loop is free meanwhile, awaiting the DB thread.
    """

    def __init__(self, staged: StagedImages, owner: str, loop: asyncio.AbstractEventLoop) -> None:
        self._staged = staged
        self._owner = owner
        self._loop = loop

    def take(self, digest: bytes) -> TempBlob | None:
        async def on_loop() -> TempBlob | None:
            return self._staged.take(self._owner, digest)

        # Bounded: a loop stopped meanwhile must not leave the DB thread waiting forever.
        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(_TAKE_TIMEOUT)


class DiscoveryResource(resource.WKCResource):
    """/.well-known/core (RFC 6690), but only for an identified peer.

    An anonymous (plain CoAP) source may be spoofed, and the link document is several
    times the size of the request: serving it would make us an amplifier
    (RFC 7252 §11.3, ATTACKS.md #29).
    """

    def __init__(self, view: StoreView, site: resource.Site) -> None:
        super().__init__(site.get_resources_as_linkheader, impl_info=None)
        self.view = view

    async def render_get(self, request: Message) -> Message:
        if self.view.principal_of(request.remote) is None:
            # No diagnostic text: the source may be spoofed (no amplification, §11.3).
            return error_response(Unauthenticated(""))
        return await super().render_get(request)


def build_site(
    view: StoreView, uploads: Uploads, staged: StagedImages
) -> tuple[resource.Site, ManifestResource]:
    site = resource.Site()
    manifest = ManifestResource(view)
    site.add_resource([".well-known", "core"], DiscoveryResource(view, site))
    site.add_resource(list(protocol.PATH_MANIFEST), manifest)
    site.add_resource(list(protocol.PATH_FIRMWARE), FirmwareResource(view))
    site.add_resource(list(protocol.PATH_REPORT), ReportResource(view))
    site.add_resource([*protocol.PATH_ADMIN, "image"], AdminImageResource(view, uploads, staged))
    site.add_resource(
        [*protocol.PATH_ADMIN, "release"], AdminReleaseResource(view, uploads, staged)
    )
    from .anchor_resources import add_anchor_resources  # /a and /t (imports this module)

    add_anchor_resources(site, view)
    return site, manifest
