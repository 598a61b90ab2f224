"""RFC 7252 §5.4.1: the device rejects a response carrying a critical option it does not know.

Option numbers with the low bit set are critical: a recipient that does not recognise
one must not act on the message as if it were not there. A hostile (or newer) server on
loopback adds such options to otherwise valid answers; the device's CoAP transport must
fail the exchange with a TransportError (the agent's "no usable response"), while
unknown *elective* options (even numbers) stay ignorable. A second Block2 counts as
unrecognised (§5.4.5: a non-repeatable option repeated).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import ACK
from aiocoap.optiontypes import BlockOption, OpaqueOption
from evil_server import DEVICE_ID, PSK, EvilServer, Script

from device_sim.coap import CoapTransport
from device_sim.coap.critical_options import (
    UnrecognizedCriticalOption,
    reject_unrecognized_critical,
)
from device_sim.transport import TransportError

ENVELOPE = b"\xa0" * 100


class ExtraOptionServer(EvilServer):
    """The H1 server, adding `extra` options to every response it sends."""

    def __init__(self, extra: list[Any]) -> None:
        super().__init__(script=Script(envelope=ENVELOPE))
        self.extra = extra

    async def _answer(
        self, request: Any, path: str, num: int | None, szx: int | None
    ) -> Message | None:
        response = await super()._answer(request, path, num, szx)
        if response is not None:
            for option in self.extra:
                response.opt.add_option(option)
        return response


def _run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


def _opaque(number: int) -> OpaqueOption:
    return OpaqueOption(OptionNumber(number), b"\x01")


def _block2(num: int) -> BlockOption:
    return BlockOption(OptionNumber.BLOCK2, BlockOption.BlockwiseTuple(num, False, 6))


@pytest.mark.parametrize(
    ("options", "rejected"),
    [
        ([], False),
        ([_opaque(2048)], False),  # unknown but elective: ignored (§5.4.1)
        ([_block2(0)], False),  # the one critical option the device processes
        ([_opaque(2049)], True),
        ([_opaque(9)], True),  # OSCORE: known to aiocoap, not processed by the device
        ([_block2(0), _block2(1)], True),  # §5.4.5: a repeated Block2
    ],
)
def test_the_option_rule(options: list[Any], rejected: bool) -> None:
    msg = Message(code=Code.CONTENT, payload=b"x")
    msg.mtype, msg.mid, msg.token = ACK, 1, b"t"  # a piggybacked response, as on the wire
    for option in options:
        msg.opt.add_option(option)
    decoded = Message.decode(msg.encode())  # as the device receives it
    if rejected:
        with pytest.raises(UnrecognizedCriticalOption):
            reject_unrecognized_critical(decoded)
    else:
        reject_unrecognized_critical(decoded)


@pytest.mark.network
@pytest.mark.parametrize("number", [2049, 65001])
def test_a_response_with_an_unknown_critical_option_is_rejected(number: int) -> None:
    async def go() -> None:
        async with ExtraOptionServer([_opaque(number)]) as server:
            transport = CoapTransport(server.base_uri, DEVICE_ID, PSK)
            try:
                with pytest.raises(TransportError, match=f"critical option {number}") as caught:
                    await transport.get("/m", block2=(0, 0, 6), timeout=10.0)
                assert isinstance(caught.value, UnrecognizedCriticalOption)
                with pytest.raises(UnrecognizedCriticalOption):
                    await transport.get_nonconfirmable("/m", block2=(0, 0, 6), timeout=10.0)
                with pytest.raises(UnrecognizedCriticalOption):
                    async for _ in transport.observe("/m"):
                        pytest.fail("an observation yielded a rejected response")
            finally:
                await transport.close()
            assert server.manifest_requests == 3  # the server did answer each time

    _run(go)


@pytest.mark.network
def test_an_unknown_elective_option_is_ignored() -> None:
    async def go() -> None:
        async with ExtraOptionServer([_opaque(2048)]) as server:
            transport = CoapTransport(server.base_uri, DEVICE_ID, PSK)
            try:
                response = await transport.get("/m", block2=(0, 0, 6), timeout=10.0)
            finally:
                await transport.close()
            assert response.successful and response.payload == ENVELOPE

    _run(go)
