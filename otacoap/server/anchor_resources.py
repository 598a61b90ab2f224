"""/a (the class's signed anchor lists) and /t (nonce-bound freshness statements).

  GET /a?v=N     2.05 the signed anchor list of the requesting device's class with
                 version N+1 (CF 60, Block2 if large, ETag); 4.04 when there is none
                 (the device holds the newest); 4.00 without exactly one `v=<decimal>`.
                 The server only stores and serves what the operator published: the
                 root keys that sign lists never come near it (core.anchor_list).
  GET /t?n=HEX   2.05 a freshness statement (core.freshness) echoing the device's
                 8..32-byte nonce, naming the sequence number of the release this
                 device is served now (server.access, the same rule as /m) and the
                 class's newest anchor list version, signed with this server's online
                 freshness key; 4.04 when the server has no freshness key.

Threat model (docs/decisions/anchor-rotation.md): whoever holds the freshness key (a
compromised server) can claim "nothing newer" and so hide a release or a rotation; it
cannot make a device accept a manifest or an anchor list, which need the offline
author and root keys. Devices only use it to tell "no newer release" from "I cannot
learn whether there is one".
"""

from __future__ import annotations

import logging
import time

import aiocoap.resource as resource
from aiocoap import Message
from aiocoap.numbers.codes import Code

from ..core import coap_numbers, freshness
from ..core.errors import ManifestError
from ..store import Principal, Role
from ..store.anchor_lists import load_freshness_key
from ..store.errors import NotFound
from . import access
from .errors import WrongRole
from .resources import _Base, _block2_response
from .store_view import StoreView

log = logging.getLogger(__name__)

PATH_ANCHORS = ("a",)
PATH_FRESHNESS = (freshness.FRESHNESS_PATH.lstrip("/"),)


def _query(request: Message, name: str) -> str:
    """The one `name=value` query of the request (anything else: 4.00)."""
    queries = tuple(request.opt.uri_query)
    if len(queries) != 1 or not queries[0].startswith(name + "="):
        raise ManifestError(f"expected exactly one query {name}=...")
    return str(queries[0][len(name) + 1 :])


def _device(resource_: _Base, request: Message) -> Principal:
    principal = resource_.principal(request)
    if principal.role is not Role.DEVICE:
        raise WrongRole("devices only")
    return principal


class AnchorListResource(_Base):
    """/a?v=N: the next anchor list of the device's class."""

    ct = coap_numbers.CF_CBOR
    rt = "otacoap.anchors"

    async def render_get(self, request: Message) -> Message:
        principal = _device(self, request)
        text = _query(request, "v")
        if not (text.isascii() and text.isdigit() and len(text) <= 19):
            raise ManifestError("v must be a decimal anchor list version")
        device = self.view.device(principal.name)
        if device is None:
            raise NotFound("not found")
        record = self.view.reader.anchor_list(device.class_key, int(text) + 1)
        if record is None:
            raise NotFound("no newer anchor list")
        body = record.body
        return _block2_response(
            self.view,
            request,
            len(body),
            lambda off, n: body[off : off + n],
            coap_numbers.CF_CBOR,
            record.digest[:8],
        )


class FreshnessResource(_Base):
    """/t?n=HEX: a freshness statement bound to the device's nonce (RFC 9175 Echo style)."""

    ct = coap_numbers.CF_CBOR
    rt = "otacoap.freshness"

    def __init__(self, view: StoreView) -> None:
        super().__init__(view)
        self.key = load_freshness_key(view.datadir.root)

    async def render_get(self, request: Message) -> Message:
        principal = _device(self, request)
        text = _query(request, freshness.NONCE_QUERY)
        try:
            nonce = freshness.check_nonce(bytes.fromhex(text))
        except ValueError:
            raise ManifestError("n must be a hex nonce") from None
        if self.key is None:
            raise NotFound("this server has no freshness key")
        device = self.view.device(principal.name)
        if device is None:
            raise NotFound("not found")
        release = access.release_of(self.view, principal)
        latest = self.view.reader.latest_anchor_list(device.class_key)
        statement = freshness.Statement(
            nonce=nonce,
            vendor_id=device.vendor_id,
            class_id=device.class_id,
            sequence=release.sequence_number if release is not None else 0,
            anchor_version=latest.version if latest is not None else 0,
            time=int(time.time()),
        )
        payload = freshness.sign_statement(statement, self.key)
        return Message(code=Code.CONTENT, payload=payload, content_format=coap_numbers.CF_CBOR)


def add_anchor_resources(site: resource.Site, view: StoreView) -> None:
    site.add_resource(list(PATH_ANCHORS), AnchorListResource(view))
    site.add_resource(list(PATH_FRESHNESS), FreshnessResource(view))
