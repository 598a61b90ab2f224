"""The aiocoap-client load generator, speaking bench/leanload.py's spec and result format.

Kept to show why the lean one exists: with `--loadgen aiocoap` the throughput bench
reports this generator's own CPU per response, which on two cores caps the measurable
server rate near stock aiocoap's. Each client is an aiocoap client context with its own
DTLS-PSK credentials (or plain CoAP), sending `window` explicit Block2 GETs at a time.
Run as `python -m bench.aiocoapload SPEC_JSON`; prints one JSON result line.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any


class _Counts:
    ok = 0
    errors = 0
    counting = False


async def _client(spec: dict[str, Any], ident: str, pskhex: str, counts: _Counts) -> bool:
    import aiocoap
    from aiocoap import GET, Message

    scheme = "coaps" if spec["secure"] else "coap"
    base = f"{scheme}://{spec['host']}:{spec['port']}"
    ctx = await aiocoap.Context.create_client_context()
    if spec["secure"]:
        ctx.client_credentials.load_from_dict(
            {f"{base}/*": {"dtls": {"psk": {"hex": pskhex}, "client-identity": {"ascii": ident}}}}
        )
    blocks, szx, end_at = int(spec["blocks"]), int(spec["szx"]), float(spec["end_at"])
    num = 0
    connected = False

    async def one(n: int) -> None:
        nonlocal connected
        msg = Message(code=GET, uri=f"{base}/{spec['path']}", block2=(n, 0, szx))
        try:
            resp = await asyncio.wait_for(
                ctx.request(msg, handle_blockwise=False).response, timeout=10
            )
        except (TimeoutError, aiocoap.error.Error):
            counts.errors += counts.counting
            return
        connected = True
        if resp.code.is_successful():
            counts.ok += counts.counting
        else:
            counts.errors += counts.counting

    try:
        while time.time() < end_at:
            batch = []
            for _ in range(int(spec["window"])):
                batch.append(one(num))
                num = (num + 1) % blocks
            await asyncio.gather(*batch)
    finally:
        await ctx.shutdown()
    return connected


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    counts = _Counts()
    tasks = [asyncio.create_task(_client(spec, d[0], d[1], counts)) for d in spec["devices"]]
    await asyncio.sleep(max(0.0, float(spec["start_at"]) - time.time()))
    u0, t0, base_ok = resource.getrusage(resource.RUSAGE_SELF), time.time(), counts.ok
    counts.counting = True
    await asyncio.sleep(max(0.0, float(spec["end_at"]) - time.time()))
    u1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    ok = counts.ok - base_ok
    counts.counting = False
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "responses": ok,
        "errors": counts.errors,
        "timeouts": 0,
        "bad_payload": 0,
        "handshakes": len(tasks),
        "connected": sum(r is True for r in results),
        "seconds": t1 - t0,
        "cpu": (u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(_run(spec))), flush=True)


if __name__ == "__main__":
    main()
