"""GET /fw/<id> Block2 without aiocoap's per-request machinery: the hot path, made lean.

Why: a device downloads an image as hundreds of identical-looking requests, one per
block. Through aiocoap each costs a `Message` decode, a dedup-cache entry (kept 247 s,
the RSS growth seen under load), a piggyback timer, a Pipe, a render task, Site's
path-stripping `Message.copy`, a response `Message` and its option encoding. Profiled
under Block2 load (bench/bench_block2_throughput.py) that machinery, not DTLS or disk,
took ~90 % of the server's CPU: ~470 µs per block.

What stays aiocoap: the DTLS sessions (tinydtls_server), the socket, and every request
that is not the plain success case. The fast path sits at the message-interface
boundary (plaintext CoAP bytes in, response bytes out) and answers only a request it
fully understands: a CON GET whose options are exactly Uri-Path "fw", Uri-Path <id>
and optionally Block2 (Uri-Host, Uri-Port and Size2 are tolerated, as aiocoap's Site
ignores them), from a principal that may read that image (server.access, the rule
FirmwareResource applies too), for a block the Block2 responder answers. Everything
else (NON, any other option, a payload, an unauthorised or unknown identity, a bad
block, a short read) returns None and aiocoap handles it exactly as before, so
refusals, their 4.0x codes and their audit entries have one implementation.

Semantics kept (ATTACKS.md #24/#25/#32): identity from the DTLS session's claims (or
the one --insecure-plain-identity principal on plain CoAP), the one access rule
(`server.access.readable_image`), the answer from `core.block2_responder` (which
FirmwareResource renders through aiocoap), exactly the answered range of the blob,
its options encoded as aiocoap would (tests compare the bytes). The responder's
answer and its encoded options are memoised per block, so a request costs a lookup,
a slice of the image (held in memory within a budget, else a pread) and a join.

RFC 7252 §4.5: a duplicate CON is answered again instead of from a dedup cache. That
rule "MAY be relaxed" for idempotent requests, and a GET of one block is idempotent
and stateless, so nothing is remembered per request and memory does not grow with
the request rate.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from ..core import blockwise, ids, protocol
from ..core.block2_responder import answer
from ..core.coap_numbers import (
    CONTENT,
    GET,
    OPT_BLOCK2,
    OPT_SIZE2,
    OPT_URI_HOST,
    OPT_URI_PATH,
    OPT_URI_PORT,
    PAYLOAD_MARKER,
    TYPE_ACK,
    TYPE_CON,
    VERSION,
)
from ..core.coap_options import field, header, option
from ..core.errors import OtaError
from ..store import Principal
from . import access
from .store_view import StoreView

log = logging.getLogger(__name__)

_TOLERATED = frozenset((OPT_URI_HOST, OPT_URI_PORT, OPT_SIZE2))
_FW = ids.IMAGE_PATH_PREFIX.encode()
_CON_V1 = (VERSION << 6) | (TYPE_CON << 4)  # RFC 7252 §3: Ver and T of a request byte 0
_MAX_IMAGES = 64  # open image files; the current releases' images, in practice
_IMAGE_BITS = 6  # 1 << 6 == _MAX_IMAGES: an image's slot in a memo key
_MAX_GRANTS = 8192  # principals with a cached verdict
_MAX_MEMO = 1 << 15  # memoised blocks, all images (~250 bytes each: <= ~8 MB)
_MAX_CACHED = 32 << 20  # image bytes held in memory, all images; beyond, pread per block


def _read_all(fd: int, size: int) -> bytes:
    """Up to `size` bytes from the start of `fd` (fewer if the file is shorter)."""
    parts = []
    offset = 0
    while offset < size:
        part = os.pread(fd, size - offset, offset)
        if not part:
            break
        parts.append(part)
        offset += len(part)
    return b"".join(parts)


class _Image:
    """One image as the fast path serves it: its bytes (or open file), identity, block
    memo."""

    def __init__(
        self, digest: bytes, size: int, path: Any, slot: int, memo: dict[int, Any], cache: bool
    ) -> None:
        self.digest = digest
        self.size = size
        self.image_id = ids.image_id(digest).encode()  # the Uri-Path segment naming it
        self.etag = protocol.etag_for(digest)
        # (block2 request value, max SZX, slot) -> (offset, length, encoded options +
        # payload marker). Deterministic per image, so computed once per block, not per
        # request; shared by all images so that one cap bounds it.
        self.slot = slot
        self.memo = memo
        # An image within the fast path's memory budget is read once and answered
        # from memory (a block is a slice: no pread system call per response); a
        # larger one is read per block from its open file. Either way the bytes are
        # the blob's as stored: blobs are content-addressed and replaced only by an
        # atomic rename. A file shorter than recorded gives a short block, which
        # `handle` declines (FirmwareResource then reports it) as before.
        # A memoryview: a block is then sliced without a copy, and copied once, into
        # the response, by the join.
        self.data: memoryview | None = None
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if cache:
            try:
                self.data = memoryview(_read_all(self.fd, size))
            finally:
                self.close()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def key(self, block2: int, max_szx: int) -> int:
        """The memo key of block `block2` (-1: no Block2 option) at `max_szx`."""
        return ((((block2 + 1) << 3) | max_szx) << _IMAGE_BITS) | self.slot

    def block(self, block2: int, max_szx: int) -> tuple[int, int, bytes] | None:
        """Where block `block2` (-1: no Block2 option) is and its response options, as
        core.block2_responder decides (the /fw resource answers with it too); None
        for a block it refuses (the 4.00 then comes from FirmwareResource)."""
        key = self.key(block2, max_szx)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        if block2 < 0:
            asked = None
        else:
            num, _, szx = blockwise.parse_block_value(block2)
            asked = (num, szx)
        try:
            reply = answer(
                self.size, asked, max_szx, content_format=protocol.CF_IMAGE, etag=self.etag
            )
        except blockwise.BlockError:
            return None
        if len(self.memo) >= _MAX_MEMO:
            self.memo.clear()
        hit = self.memo[key] = (reply.offset, reply.length, reply.encoded_options())
        return hit


def _claimed(remote: Any, plain: Principal | None) -> Principal | None:
    """The claim the session holds (not yet checked against the store): on DTLS a
    `SessionClaim` (the principal and its key tag), the one verdicts are cached for."""
    for claim in getattr(remote, "authenticated_claims", ()):
        if isinstance(claim, Principal):  # a SessionClaim on DTLS
            return claim
    if plain is not None and getattr(remote, "scheme", None) == "coap":
        return plain
    return None


class FirmwareFastPath:
    """Answers GET /fw/<id> Block2 requests from raw CoAP bytes, or declines (None)."""

    def __init__(self, view: StoreView) -> None:
        self.view = view
        # id(claim) -> (that claim, its image or None). The entry holds the claim, so
        # its id cannot be reused while the entry exists. Any change of principals or
        # keys bumps the view's epoch, which drops every verdict (`_grant`): a session
        # whose key was revoked is looked up again and refused (issue 10 §1).
        self._grants: dict[int, tuple[Principal, _Image | None]] = {}
        self._images: dict[bytes, _Image] = {}
        self._memo: dict[int, tuple[int, int, bytes]] = {}
        self._epoch = view.epoch
        # Bumped by every _forget (which closes the images' files): a verdict cached
        # on a DTLS session object is only used while its generation is current.
        self._generation = 0
        self._max_szx = min(view.config.server.max_block_szx, blockwise.MAX_SZX)
        self._cached = 0  # bytes of the open images held in memory (_MAX_CACHED)
        self.served = 0

    def close(self) -> None:
        self._forget()

    def _forget(self) -> None:
        self._grants.clear()
        for image in self._images.values():
            image.close()
        self._images.clear()
        self._memo.clear()  # keyed by image slots, which are reused from here on
        self._cached = 0
        self._epoch = self.view.epoch
        self._generation += 1

    def _grant(self, remote: Any) -> _Image | None:
        if self._epoch != self.view.epoch:
            # Principals or releases changed: everything cached may be stale.
            self._forget()
        # A DTLS session's claims never change (aiocoap's SecurityStore refuses a
        # second identity), so its verdict can live on the session object itself.
        cached = getattr(remote, "otacoap_fw_grant", None)
        if cached is not None and cached[0] == self._generation:
            return cached[1]
        image = self._lookup(remote)
        with contextlib.suppress(AttributeError):  # plain CoAP remotes are tuples
            remote.otacoap_fw_grant = (self._generation, image)
        return image

    def _lookup(self, remote: Any) -> _Image | None:
        claimed = _claimed(remote, self.view.plain_principal)
        if claimed is None:
            return None
        hit = self._grants.get(id(claimed))
        if hit is not None and hit[0] is claimed:
            return hit[1]
        image: _Image | None = None
        # The one rule FirmwareResource.render_get applies too (server.access).
        principal = self.view.principal_of(remote)
        readable = access.readable_image(self.view, principal) if principal else None
        if readable is not None:
            image = self._image(readable.digest, readable.size)
        if len(self._grants) >= _MAX_GRANTS:
            self._grants.clear()
        self._grants[id(claimed)] = (claimed, image)
        return image

    def _image(self, digest: bytes, size: int) -> _Image | None:
        image = self._images.get(digest)
        if image is None:
            if len(self._images) >= _MAX_IMAGES:
                self._forget()
            try:
                path = self.view.blobs.path_of(digest)
                cache = self._cached + size <= _MAX_CACHED
                image = _Image(digest, size, path, len(self._images), self._memo, cache)
            except OSError:
                return None  # FirmwareResource reports it (5.00, logged)
            self._images[digest] = image
            if cache:
                self._cached += size
        return image

    def handle(self, remote: Any, data: bytes) -> bytes | None:
        """The encoded response to `data`, or None: aiocoap should handle it."""
        n = len(data)
        # RFC 7252 §3: version 1, type CON (0), TKL 0..8; code 0.01 GET.
        if n < 4 or data[0] & 0xF0 != _CON_V1 or data[1] != GET:
            return None
        tkl = data[0] & 0x0F
        i = 4 + tkl
        if tkl > 8 or i > n:
            return None
        # What devices send: Uri-Path "fw", Uri-Path <16 hex>, Block2 (0-3 bytes) and
        # nothing else. Recognised by layout; any other shape takes the option walk.
        end = i + _TYPICAL_LEN
        rest = n - end
        if data.startswith(_TYPICAL, i) and (
            rest == 0
            or (0 < rest <= 4 and data[end] >> 4 == _B2_DELTA and rest == 1 + (data[end] & 0x0F))
        ):
            image_id = data[i + _TYPICAL_PATH : end]
            # The Block2 value, 0-3 bytes big-endian (RFC 7959 §2.2); 1 and 2 bytes
            # (blocks below 4096) spelled out, which costs less than int.from_bytes.
            if rest == 3:
                block2 = (data[end + 1] << 8) | data[end + 2]
            elif rest == 2:
                block2 = data[end + 1]
            else:
                block2 = int.from_bytes(data[end + 1 :], "big") if rest else -1
        else:
            parsed = _walk_options(data, i)
            if parsed is None:
                return None
            image_id, block2 = parsed
        # `_grant`'s first answer, inline: the verdict on the session, still current.
        cached = getattr(remote, "otacoap_fw_grant", None)
        if cached is not None and cached[0] == self._generation and self._epoch == self.view.epoch:
            image = cached[1]
        else:
            try:
                image = self._grant(remote)
            except OtaError:
                return None  # the store is unavailable: FirmwareResource answers 5.03
        if image is None or image_id != image.image_id:
            return None  # 4.01/4.04 and the audit entry come from FirmwareResource
        max_szx = self._max_szx
        remote_max = getattr(remote, "maximum_block_size_exp", max_szx)
        if remote_max < max_szx:
            max_szx = remote_max
        # `image.block`'s memo hit, inline (the key as `_Image.key` makes it); a miss
        # asks it.
        key = ((((block2 + 1) << 3) | max_szx) << _IMAGE_BITS) | image.slot
        where = self._memo.get(key) or image.block(block2, max_szx)
        if where is None:
            return None
        offset, length, options = where
        body = image.data
        payload: bytes | memoryview
        if body is not None:
            payload = body[offset : offset + length]
        else:
            payload = os.pread(image.fd, length, offset)
        if len(payload) != length:
            return None  # the blob is shorter than recorded: FirmwareResource logs it
        self.served += 1
        self.view.count_served(image.digest, length)
        # RFC 7252 §5.2.1: a piggybacked ACK with the request's Message ID and token.
        return b"".join((_ACK_CONTENT[tkl], data[2 : 4 + tkl], options, payload))


# Uri-Path (delta 11, length 2) "fw", then Uri-Path (delta 0, length 13 + 3) <16 hex>.
_TYPICAL = option(OPT_URI_PATH, _FW) + header(0, ids.IMAGE_ID_HEX_CHARS)
_TYPICAL_PATH = len(_TYPICAL)
_TYPICAL_LEN = _TYPICAL_PATH + ids.IMAGE_ID_HEX_CHARS
_B2_DELTA = OPT_BLOCK2 - OPT_URI_PATH  # Block2 right after the path: delta 12
_ACK_CONTENT = [bytes(((VERSION << 6) | (TYPE_ACK << 4) | tkl, CONTENT)) for tkl in range(9)]


def _walk_options(data: bytes, i: int) -> tuple[bytes, int] | None:
    """(image id segment, Block2 value or -1) from a strict walk of the options, or
    None for anything but two Uri-Path segments "fw"/<id>, at most one Block2 of up to
    3 bytes, and the options aiocoap's Site ignores (Uri-Host, Uri-Port, Size2)."""
    n = len(data)
    number = 0
    path: list[bytes] = []
    block2 = -1
    while i < n:
        b = data[i]
        if b == PAYLOAD_MARKER:
            return None  # a payload on a GET: aiocoap decides what that means
        delta, i = field(b >> 4, data, i + 1)
        length, i = field(b & 0x0F, data, i)
        if delta < 0 or length < 0:
            return None  # 15 is reserved (a message format error) or truncated
        number += delta
        end = i + length
        if end > n:
            return None
        if number == OPT_URI_PATH:
            if len(path) == 2:
                return None
            path.append(data[i:end])
        elif number == OPT_BLOCK2:
            if block2 >= 0 or length > 3:
                return None
            block2 = int.from_bytes(data[i:end], "big")
        elif number not in _TOLERATED:
            return None
        i = end
    if len(path) != 2 or path[0] != _FW:
        return None
    return path[1], block2
