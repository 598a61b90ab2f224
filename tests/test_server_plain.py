"""Plain (NoSec) CoAP is off unless asked for, and then serves nothing protected
(ATTACKS.md #29, #31); the explicit development identity mapping is opt-in."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from server_helpers import (
    CLASS_A,
    DeviceSpec,
    Setup,
    coaps_client,
    get,
    make_image,
    make_setup,
    run,
    running_server,
)

from otacoap.core.report import Report, State

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore:DTLS module did not shut down"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    s = make_setup(tmp_path_factory.mktemp("plain"), devices=[DeviceSpec("t1")])
    s.publish(s.release(CLASS_A, 1, make_image("p", 2000)))
    return s


async def _plain(uri: str, code: Code = Code.GET, payload: bytes = b"") -> Code | str:
    ctx = await aiocoap.Context.create_client_context()
    try:
        msg = aiocoap.Message(code=code, uri=uri, payload=payload)
        r = await get_response(ctx, msg)
        return r.code if isinstance(r, aiocoap.Message) else r
    finally:
        await ctx.shutdown()


async def get_response(ctx: aiocoap.Context, msg: aiocoap.Message) -> aiocoap.Message | str:
    try:
        return await asyncio.wait_for(ctx.request(msg, handle_blockwise=False).response, 2)
    except (TimeoutError, aiocoap.error.Error) as exc:
        return type(exc).__name__


def test_no_plain_coap_without_the_flag(setup: Setup) -> None:
    with running_server(setup.data) as server:
        assert server.plain_port is None
        for port in (server.port, server.port - 1):
            outcome = run(_plain(f"coap://127.0.0.1:{port}/m"))
            assert not isinstance(outcome, Code), outcome


def test_plain_listener_answers_every_anonymous_request_4_01(setup: Setup) -> None:
    with running_server(setup.data, args=["--insecure-plain-coap", "--plain-port", "0"]) as server:
        assert "WARNING: --insecure-plain-coap" in server.log()
        base = server.plain_uri
        assert run(_plain(base + "/.well-known/core")) == Code.UNAUTHORIZED
        assert run(_plain(base + "/m")) == Code.UNAUTHORIZED
        assert run(_plain(base + "/fw/" + "0" * 16)) == Code.UNAUTHORIZED
        report = Report(counter=1, state=State.CHECKING).encode()
        assert run(_plain(base + "/r", Code.POST, report)) == Code.UNAUTHORIZED
        assert run(_plain(base + "/admin/image", Code.POST, b"x")) == Code.UNAUTHORIZED

        async def dtls_still_works() -> Code:
            async with coaps_client(server.port, "t1", setup.devices["t1"].psk) as ctx:
                return (await get(ctx, server.uri + "/m")).code

        assert run(dtls_still_works()) == Code.CONTENT


def test_the_dev_identity_mapping_is_explicit(setup: Setup, tmp_path: Path) -> None:
    args = ["--insecure-plain-coap", "--plain-port", "0", "--insecure-plain-identity", "t1"]
    with running_server(setup.data, args=args) as server:
        assert "EVERY plain request acts as 't1'" in server.log()
        assert run(_plain(server.plain_uri + "/m")) == Code.CONTENT
    with (
        pytest.raises(RuntimeError, match="not registered"),
        running_server(setup.data, args=[*args[:-1], "ghost"]),
    ):
        pass
