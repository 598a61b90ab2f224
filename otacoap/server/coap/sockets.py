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
    want "address already in use" instead. The one exception is the workers of one
    `otacoap serve --workers N` (`cls.reuse_port`, set only by otacoap/server/workers.py's
    worker mode): they share the port on purpose, and the kernel's SO_REUSEPORT hash of
    the source address and port keeps each device's datagrams with one of them.
    """
    ready = loop.create_future()
    await loop.create_datagram_endpoint(
        lambda: cls(ready.set_result, interface, log),
        local_addr=bind,
        reuse_port=bool(getattr(cls, "reuse_port", False)),
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

    reuse_port = False

    @classmethod
    async def create(cls, bind: Any, log: Any, loop: Any, message_interface: Any) -> Any:
        return await bind_exclusive(cls, bind, log, loop, message_interface)


class SharedPlainSocket(PlainSocket):
    """The plain socket of one worker of `serve --workers N`: SO_REUSEPORT on purpose."""

    reuse_port = True
