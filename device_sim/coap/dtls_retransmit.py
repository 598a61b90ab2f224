"""A DTLS handshake retransmission timer for aiocoap's tinydtls client that does not hang.

Each context the device creates gets `run_dtls_retransmissions` on its DTLS client
connections (`harden_dtls`), replacing aiocoap's `DTLSClientConnection.
_run_retransmissions` per instance: scoped to the device's own contexts, not a global
patch of aiocoap. The names it relies on are in device_sim.coap.contract; an aiocoap
without them fails the contract test, and `harden_dtls` raises rather than leaving the
device with the hanging timer.
"""

from __future__ import annotations

import asyncio
import types
import weakref
from typing import Any

import aiocoap
from aiocoap.transports.tinydtls import DTLSClientConnection, MessageInterfaceTinyDTLS

# How often a pending DTLS handshake retransmission is looked at (see below).
DTLS_POLL = 0.1


async def run_dtls_retransmissions(self: DTLSClientConnection) -> None:
    """tinydtls' retransmission timer for one client connection, without the hang.

    Why: DTLSSocket calls tinydtls' `dtls_init()` for every new DTLS object, which
    resets tinydtls' process-wide clock base to `time(NULL)`; aiocoap converts
    tinydtls' timestamps with a base taken once, at import (`DTLS_CLOCK_OFFSET`).
    After the first session the two disagree, so aiocoap's timer (`sleep(when -
    now)`) sleeps a negative time and spins, sees the retransmission queue empty for
    an instant between two handshake flights, and returns for good: a client flight
    lost after that (say its Finished) is never retransmitted, and the handshake hangs
    until the fetcher resets the transport, where it can happen again (it did,
    deterministically, in bench/bench_download_window.py at 10 % loss). Here the timer
    asks tinydtls (which retransmits whatever is due on its own clock) every DTLS_POLL
    seconds for as long as the handshake runs (RFC 6347 §4.2.4) or a retransmission
    is pending, and stops, like aiocoap's, once connected with nothing pending.
    """
    while True:
        pending = self._dtls_socket.checkRetransmit()  # retransmits what is due
        if pending == 0 and self._queue is None:  # connected, nothing to retransmit
            return
        await asyncio.sleep(DTLS_POLL)


def shutdown_even_half_built(self: DTLSClientConnection) -> None:
    """aiocoap's `shutdown`, also for a connection whose `_start` task never got as far
    as creating its retransmission timer.

    Why: a context shut down right after the request that created a connection (Ctrl-C
    or SIGTERM in the fleet, a device giving up) tears the connection down before its
    `_start` ran; aiocoap's `shutdown` then raises AttributeError on
    `_retransmission_task`, out of `Context.shutdown` and again from `__del__`
    ("Exception ignored in ... Traceback"). Such a connection has no DTLS session to
    close: leave the pool, stop the start task, close the socket if there is one.
    """
    if "_retransmission_task" in vars(self):
        DTLSClientConnection.shutdown(self)
        return
    self._remove_from_pool()
    self._startup.cancel()
    transport = vars(self).get("_transport")
    if transport is not None:
        transport.close()


class Handshakes:
    """The DTLS client connections of one context, to tell a request that timed out
    because its handshake never completed (a wrong identity or PSK: tinydtls' server
    drops the client's Finished without an alert) from one lost on a working session."""

    def __init__(self) -> None:
        self._connections: weakref.WeakSet[DTLSClientConnection] = weakref.WeakSet()

    def add(self, connection: DTLSClientConnection) -> None:
        self._connections.add(connection)

    def incomplete(self) -> bool:
        """Whether a connection is still handshaking and none has ever completed."""
        states = [c._queue is None for c in self._connections]
        return bool(states) and not any(states)


def harden_dtls(ctx: aiocoap.Context) -> Handshakes:
    """Give this context's DTLS client connections `run_dtls_retransmissions` and
    `shutdown_even_half_built`, and return what watches their handshakes.

    An instance attribute on each new connection, set when aiocoap's
    `_connection_for_address` creates it, before its handshake task first runs.
    """
    handshakes = Handshakes()
    hardened = 0
    for tokens in ctx.request_interfaces:
        messages = tokens.token_interface.message_interface
        if not isinstance(messages, MessageInterfaceTinyDTLS):
            continue
        connect = messages._connection_for_address

        def connection_for_address(*args: Any, _connect: Any = connect) -> Any:
            connection = _connect(*args)
            if "_run_retransmissions" not in vars(connection):
                connection._run_retransmissions = types.MethodType(
                    run_dtls_retransmissions, connection
                )
                connection.shutdown = types.MethodType(shutdown_even_half_built, connection)
                handshakes.add(connection)
            return connection

        messages._connection_for_address = connection_for_address
        hardened += 1
    if not hardened:
        raise RuntimeError("this aiocoap context has no tinydtls client transport to harden")
    return handshakes
