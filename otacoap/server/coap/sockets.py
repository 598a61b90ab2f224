"""Binding aiocoap's server sockets to exactly the address we are given.

aiocoap's public `create_server_context` binds DTLS at *bind port + 1*
(`MessageInterfaceSimpleServer.create_server` adds COAPS_PORT - COAP_PORT), so port 0
would become port 1, and it sets SO_REUSEPORT. We bind the sockets ourselves.
"""

from __future__ import annotations

import logging
from typing import Any

from aiocoap.transports.simplesocketserver import _DatagramServerSocketSimple
from aiocoap.util import hostportjoin


async def bind_exclusive(
    cls: Any, bind: tuple[str, int], log: logging.Logger, loop: Any, interface: Any
) -> Any:
    """aiocoap's `_DatagramServerSocketSimple.create`, minus SO_REUSEPORT.

    With SO_REUSEPORT a second server on the same port binds without error and the
    kernel splits datagrams between the two, which breaks DTLS sessions at random; we
    want "address already in use" instead.
    """
    ready = loop.create_future()
    await loop.create_datagram_endpoint(
        lambda: cls(ready.set_result, interface, log), local_addr=bind, reuse_port=False
    )
    self = await ready
    self._loop = loop
    return self


def bound_port(pool: Any) -> int:
    """The UDP port an aiocoap server socket is bound to (port 0: the one the OS chose)."""
    return int(pool._transport.get_extra_info("sockname")[1])


def set_local_hostinfo(pool: Any, host: str) -> None:
    """What aiocoap's `create` would record as the socket's own host and port."""
    pool.hostinfo_local = hostportjoin(host, bound_port(pool))


class PlainSocket(_DatagramServerSocketSimple):
    """aiocoap's plain UDP server socket, bound without SO_REUSEPORT."""

    @classmethod
    async def create(cls, bind: Any, log: Any, loop: Any, message_interface: Any) -> Any:
        return await bind_exclusive(cls, bind, log, loop, message_interface)
