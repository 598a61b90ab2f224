"""The operator's side of network publishing: Block1 uploads over DTLS-PSK.

`otacoap publish --server coaps://HOST:PORT --identity NAME --psk-file FILE ENVELOPE IMAGE`
(or the PSK in $OTACOAP_OPERATOR_PSK) streams IMAGE to /admin/image and then ENVELOPE
to /admin/release, each as an explicit Block1 sequence (RFC 7959 §2.3) under its own
random Request-Tag (RFC 9175 §3) so the server can never splice it with another body.
The image is read block by block from the file, never whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import aiocoap
from aiocoap.numbers.codes import Code

from ..core import blockwise, cbor, protocol
from ..core.errors import OtaError


class RemoteError(OtaError):
    """The server could not be reached or the DTLS handshake failed."""


class RemoteRefused(OtaError):
    """The server answered with an error code."""

    def __init__(self, message: str, code: Code) -> None:
        super().__init__(message)
        self.code = code


@contextlib.asynccontextmanager
async def dtls_client(base_uri: str, identity: str, psk: bytes) -> AsyncIterator[aiocoap.Context]:
    """An aiocoap client context whose requests to `base_uri` use this DTLS PSK."""
    ctx = await aiocoap.Context.create_client_context()
    ctx.client_credentials.load_from_dict(
        {
            base_uri.rstrip("/") + "/*": {
                "dtls": {"psk": {"hex": psk.hex()}, "client-identity": {"ascii": identity}}
            }
        }
    )
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def request(ctx: aiocoap.Context, msg: aiocoap.Message, timeout: float) -> aiocoap.Message:
    try:
        return await asyncio.wait_for(ctx.request(msg, handle_blockwise=False).response, timeout)
    except TimeoutError:
        raise RemoteError(
            f"no answer from {msg.get_request_uri()} within {timeout:g} s "
            "(server down, or the DTLS handshake failed: check identity and PSK)"
        ) from None
    except aiocoap.error.Error as exc:
        raise RemoteError(f"{msg.get_request_uri()}: {exc or type(exc).__name__}") from None


async def post_blockwise(
    ctx: aiocoap.Context,
    uri: str,
    source: BinaryIO,
    total: int,
    *,
    content_format: int,
    timeout: float,
    szx: int = protocol.DEFAULT_BLOCK_SZX,
    request_tag: bytes | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> aiocoap.Message:
    """POST `total` bytes from `source` as Block1; return the final response.

    `progress(sent, total)` is called after each acknowledged block. If the upload is
    cancelled (Ctrl-C), the server is asked to drop the partial body (DELETE under the
    same Request-Tag) before the cancellation goes on, so no partial file waits there
    for the idle timeout.
    """
    tag = os.urandom(4) if request_tag is None else request_tag
    try:
        return await _post_blocks(ctx, uri, source, total, content_format, timeout, szx, tag,
                                  progress)  # fmt: skip
    except asyncio.CancelledError:
        withdraw = aiocoap.Message(code=Code.DELETE, uri=uri)
        withdraw.opt.request_tag = [tag]
        with contextlib.suppress(OtaError, asyncio.CancelledError):
            await request(ctx, withdraw, WITHDRAW_TIMEOUT)
        raise


WITHDRAW_TIMEOUT = 2.0  # seconds an interrupted upload waits for the server's 2.02


async def _post_blocks(
    ctx: aiocoap.Context,
    uri: str,
    source: BinaryIO,
    total: int,
    content_format: int,
    timeout: float,
    szx: int,
    tag: bytes,
    progress: Callable[[int, int], None] | None,
) -> aiocoap.Message:
    num = 0
    while True:
        size = blockwise.size_of(szx)
        offset = num * size
        source.seek(offset)
        chunk = source.read(size)
        more = offset + len(chunk) < total
        msg = aiocoap.Message(
            code=Code.POST,
            uri=uri,
            payload=chunk,
            content_format=content_format,
            block1=(num, more, szx),
        )
        msg.opt.request_tag = [tag]
        if num == 0:
            msg.opt.size1 = total  # RFC 7959 §4: lets the server refuse early (4.13)
        response = await request(ctx, msg, timeout)
        if progress is not None and response.code.is_successful():
            progress(offset + len(chunk), total)
        if not more:
            return response
        if response.code != Code.CONTINUE:
            return response
        got = response.opt.block1
        if got is not None and got.size_exponent < szx:
            # RFC 7959 §2.3: the server asked for smaller blocks; continue at the same
            # byte offset with the smaller size.
            szx = got.size_exponent
            num = (offset + len(chunk)) // blockwise.size_of(szx)
        else:
            num += 1


def _check(response: aiocoap.Message, what: str) -> None:
    if not response.code.is_successful():
        text = response.payload.decode("utf-8", "replace") or "(no reason given)"
        raise RemoteRefused(f"server refused the {what}: {response.code}: {text}", response.code)


async def publish(
    server: str,
    operator: str,
    psk: bytes,
    envelope: bytes,
    image: Path,
    *,
    timeout: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
    more: Sequence[Path] = (),
) -> str:
    """Upload each image (`image`, then `more`: a multi-component release's other
    images), then the envelope that names them."""
    base = server.rstrip("/")
    if not base.startswith("coaps://"):
        raise RemoteError("--server must be a coaps:// URI (operators authenticate with DTLS)")
    identity = protocol.operator_identity(operator)
    async with dtls_client(base, identity, psk) as ctx:
        for path in (image, *more):
            size = path.stat().st_size
            with open(path, "rb") as f:
                response = await post_blockwise(
                    ctx,
                    f"{base}/admin/image",
                    f,
                    size,
                    content_format=protocol.CF_IMAGE,
                    timeout=timeout,
                    progress=progress if path == image else None,
                )
            _check(response, "image")
        response = await post_blockwise(
            ctx,
            f"{base}/admin/release",
            io.BytesIO(envelope),
            len(envelope),
            content_format=protocol.CF_ENVELOPE,
            timeout=timeout,
        )
        _check(response, "release")
    try:
        info = cbor.loads(response.payload, max_size=4096, max_depth=2)
        return f"published {info['class']} seq {info['seq']}: image {info['image']} via {base}"
    except (OtaError, KeyError, TypeError):
        return f"published via {base}"
