"""An in-process stand-in for the server, behind the same Transport interface.

The power-cut harness (ATTACKS.md H3) and the memory test update a device thousands of
times; the network is not what they test, so they talk to this object instead of a DTLS
socket. It follows the server contract (GET /m, GET /fw/<id> with Block2 and Size2 and
an ETag, POST /r with a strictly increasing counter) using the same core arithmetic as
the real server (core.blockwise.server_slice), and can serve images it never holds in
memory (`GeneratedImage`), so a 16 MiB update costs no 16 MiB buffer.

Fault hooks: `on_request(path, block2)` runs before every request and may raise
TransportError (a lost exchange), advance a FakeClock (a slow link) or change what is
served (a new release mid-download).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from otacoap.core import blockwise, protocol
from otacoap.core.coap_numbers import BAD_REQUEST, CHANGED, CONTENT, NOT_FOUND
from otacoap.core.errors import OtaError
from otacoap.core.report import Report, decode_report

from .transport import Response


class ImageSource(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class BytesImage:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


class GeneratedImage:
    """A large deterministic image produced on demand, block by block (never stored)."""

    CHUNK = 1024

    def __init__(self, size: int, seed: int = 0) -> None:
        self._size = size
        self._seed = seed.to_bytes(8, "big")
        h = hashlib.sha256()
        pos = 0
        while pos < size:
            n = min(self.CHUNK, size - pos)
            h.update(self._chunk(pos // self.CHUNK)[:n])
            pos += n
        self.digest = h.digest()

    @property
    def size(self) -> int:
        return self._size

    def _chunk(self, index: int) -> bytes:
        return hashlib.sha256(self._seed + index.to_bytes(8, "big")).digest() * (self.CHUNK // 32)

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self._size)
        out = bytearray()
        pos = offset
        while pos < end:
            index, within = divmod(pos, self.CHUNK)
            take = min(self.CHUNK - within, end - pos)
            out += self._chunk(index)[within : within + take]
            pos += take
        return bytes(out)


@dataclass
class InProcessServer:
    """What one server offers one device; mutate it between (or during) runs."""

    envelope: bytes | None = None
    images: dict[str, ImageSource] = field(default_factory=dict)
    reports: list[Report] = field(default_factory=list)
    block_requests: int = 0
    manifest_requests: int = 0
    last_counter: int = 0
    on_request: Callable[[str, tuple[int, int, int] | None], None] | None = None
    # /a?v=N answers anchor_lists[N + 1]; /t?n=HEX answers freshness(nonce) (None: 4.04)
    anchor_lists: dict[int, bytes] = field(default_factory=dict)
    freshness: Callable[[bytes], bytes | None] | None = None
    anchor_requests: int = 0
    freshness_requests: int = 0

    def add_image(self, path: str, image: bytes | ImageSource) -> None:
        self.images[path] = BytesImage(image) if isinstance(image, bytes) else image

    def handle_get(self, path: str, block2: tuple[int, int, int] | None) -> Response:
        if self.on_request is not None:
            self.on_request(path, block2)
        if path == "/" + "/".join(protocol.PATH_MANIFEST):
            self.manifest_requests += 1
            if self.envelope is None:
                return Response(NOT_FOUND)
            return _slice(BytesImage(self.envelope), block2, etag=b"m")
        resource, _, query = path.partition("?")
        if resource in ("/a", "/t"):
            return self._anchors_or_freshness(resource, query, block2)
        image = self.images.get(path)
        if image is None:
            return Response(NOT_FOUND)
        self.block_requests += 1
        return _slice(image, block2, etag=b"i" + path.encode()[-7:])

    def _anchors_or_freshness(
        self, resource: str, query: str, block2: tuple[int, int, int] | None
    ) -> Response:
        name, _, value = query.partition("=")
        try:
            if resource == "/a" and name == "v":
                self.anchor_requests += 1
                body = self.anchor_lists.get(int(value) + 1)
            elif resource == "/t" and name == "n":
                self.freshness_requests += 1
                body = self.freshness(bytes.fromhex(value)) if self.freshness else None
            else:
                return Response(BAD_REQUEST)
        except ValueError:
            return Response(BAD_REQUEST)
        if body is None:
            return Response(NOT_FOUND)
        return _slice(BytesImage(body), block2, etag=b"a")

    def handle_post(self, path: str, payload: bytes) -> Response:
        if self.on_request is not None:
            self.on_request(path, None)
        if path != "/" + "/".join(protocol.PATH_REPORT):
            return Response(NOT_FOUND)
        try:
            report = decode_report(payload)
        except OtaError:
            return Response(BAD_REQUEST)
        if report.counter <= self.last_counter:
            return Response(BAD_REQUEST)  # stale or replayed (ATTACKS.md #28)
        self.last_counter = report.counter
        self.reports.append(report)
        return Response(CHANGED)

    def states(self) -> list[str]:
        return [r.state.value for r in self.reports]


def _slice(image: ImageSource, block2: tuple[int, int, int] | None, etag: bytes) -> Response:
    num, _, szx = block2 if block2 is not None else (0, 0, protocol.DEFAULT_BLOCK_SZX)
    try:
        szx_used, piece = blockwise.server_slice(image.size, num, szx)
    except blockwise.BlockError:
        return Response(BAD_REQUEST)
    payload = image.read(piece.offset, piece.length)
    size = blockwise.size_of(szx_used)
    return Response(
        CONTENT,
        payload,
        (piece.offset // size, piece.more, szx_used),
        image.size,
        etag,
    )


class InProcessTransport:
    """Transport that calls an InProcessServer directly (no sockets, no DTLS)."""

    def __init__(self, server: InProcessServer, base_uri: str = "coaps://in-process") -> None:
        self.server = server
        self._base = base_uri
        self.resets = 0

    @property
    def base_uri(self) -> str:
        return self._base

    async def get(
        self, path: str, *, block2: tuple[int, int, int] | None, timeout: float
    ) -> Response:
        return self.server.handle_get(path, block2)

    async def post(
        self, path: str, payload: bytes, *, content_format: int, timeout: float
    ) -> Response:
        return self.server.handle_post(path, payload)

    async def observe(self, path: str) -> AsyncIterator[Response]:
        yield self.server.handle_get(path, None)

    async def reset(self) -> None:
        self.resets += 1

    async def close(self) -> None:
        return None
