"""The baseline: stock aiocoap serving an image with its automatic block-wise handling.

A plain `aiocoap.resource.Resource` returns the whole image; aiocoap slices Block2 and
keeps the assembled response in its block-wise cache. DTLS-PSK via aiocoap's
tinydtls_server, devices given as identity:pskhex pairs in a JSON file. `--loop uvloop`
runs it on the same event loop `otacoap serve` uses by default, so a comparison measures
the request handling, not the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import aiocoap
import aiocoap.resource as resource
from aiocoap.credentials import DTLS, CredentialsMap

from otacoap import eventloop


class Image(resource.Resource):
    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=self.data)


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--devices", required=True, help="JSON file: [[identity, pskhex], ...]")
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    return ap.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    site = resource.Site()
    site.add_resource(["fw", "image"], Image(Path(args.image).read_bytes()))
    creds = CredentialsMap()
    for ident, psk in json.loads(Path(args.devices).read_text()):
        creds[f":{ident}"] = DTLS(psk=bytes.fromhex(psk), client_identity=ident.encode())
    # aiocoap binds tinydtls_server at the given port + 1 (the coap/coaps pair), so ask
    # for port - 1 to listen where clients are told to go.
    transports = ["udp6"] if args.plain else ["tinydtls_server"]
    await aiocoap.Context.create_server_context(
        site,
        bind=("127.0.0.1", args.port - (0 if args.plain else 1)),
        transports=transports,
        server_credentials=creds,
    )
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    ARGS = _args(sys.argv[1:])
    eventloop.run(main(ARGS), ARGS.loop)
