"""A DTLS client connection torn down before its handshake task ever ran (a context
shut down right after the request that created it: Ctrl-C in a fleet) ends quietly."""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

import aiocoap
from aiocoap import GET, Message

from device_sim.coap.dtls_retransmit import harden_dtls


def test_a_connection_shut_down_before_its_start_ends_without_an_error() -> None:
    unraisable: list[Any] = []
    old = sys.unraisablehook
    sys.unraisablehook = unraisable.append

    async def scenario() -> None:
        ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
        harden_dtls(ctx)
        ctx.client_credentials.load_from_dict(
            {"coaps://127.0.0.1:9/*": {"dtls": {"psk": b"k" * 16, "client-identity": b"id"}}}
        )
        req = ctx.request(Message(code=GET, uri="coaps://127.0.0.1:9/m"))
        await asyncio.sleep(0)  # the request picks its connection; its _start not yet run
        await ctx.shutdown()
        req.response.cancel()
        del req

    try:
        asyncio.run(scenario())
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert [str(u.exc_value) for u in unraisable] == []
