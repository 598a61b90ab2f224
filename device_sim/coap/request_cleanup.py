"""Ending an aiocoap client request cleanly: two repairs to aiocoap 0.4's `Request`.

Both reach into `aiocoap.protocol.Request` (`_pipe`, `_runner`, `_stop_interest`) and
`aiocoap.pipe.Pipe._event_callbacks`; device_sim.coap.contract lists them, and the
contract test fails if aiocoap changes them.
"""

from __future__ import annotations

from aiocoap.protocol import Request


def _noop() -> None:
    return None


def release(request: Request) -> None:
    """Break the reference cycle aiocoap 0.4 leaves behind a finished request.

    The cycle is Request -> `_stop_interest` (a partial holding the `process` closure)
    -> closure cell -> Request. Once the pipe has ended (`_event_callbacks is False`:
    the response came, or the cancellation handler already unregistered the interest;
    asyncio.wait_for runs that handler before it returns), `_stop_interest` has
    nothing left to do, and replacing it lets reference counting free the request,
    its pipe and both messages at once. Why it matters: with several requests in
    flight (a windowed transfer), the `collect_every` young-generation collections
    run while other requests are alive, promote them to the oldest generation, and
    their cycles would then wait for a full collection (megabytes for a 1 MiB image).
    """
    if request._pipe._event_callbacks is False:
        request._stop_interest = _noop


def abandon(request: Request) -> None:
    """Stop listening for a request we no longer wait for, before cancelling it.

    Why: aiocoap unregisters a cancelled request in a done-callback of its response
    future, which asyncio runs one loop step *after* the cancel; a response that
    arrives in between (common in a windowed transfer, whose retransmission timer
    gives up on requests all the time) makes aiocoap call set_result on the
    cancelled future, and the InvalidStateError escapes through tinydtls' read
    callback into the event loop. So the transport waits on a shield and, when it
    stops waiting, does what aiocoap's `_response_cancellation_handler` does, now.
    """
    response = request.response
    if response.done():
        return
    if request._runner is not None:
        request._runner = None
        request._stop_interest()
    response.cancel()
