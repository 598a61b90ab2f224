"""Every aiocoap (and DTLSSocket) name the device uses that is not documented API.

The same table format as otacoap.server.coap.contract (see there);
`tests/test_aiocoap_contract.py` walks both against the installed aiocoap.
"""

from __future__ import annotations

_REQ = "aiocoap.protocol:Request"
_PIPE = "aiocoap.pipe:Pipe"
_DTLS = "aiocoap.transports.tinydtls:MessageInterfaceTinyDTLS"
_CONN = "aiocoap.transports.tinydtls:DTLSClientConnection"

RELIES_ON: dict[str, str] = {
    # request_cleanup: ending requests without cycles or a late set_result.
    f"{_REQ}.__init__ ~ self._stop_interest = self._pipe.on_event(process)": (
        "request_cleanup.release: the cycle it breaks"
    ),
    f"{_REQ}._pipe": "request_cleanup.release",
    f"{_REQ}._runner": "request_cleanup.abandon",
    f"{_REQ}._stop_interest": "request_cleanup.release, abandon",
    f"{_REQ}._response_cancellation_handler ~ self._runner = None": "request_cleanup.abandon",
    f"{_PIPE}._event_callbacks": "request_cleanup.release",
    f"{_PIPE}._end ~ self._event_callbacks = False": "request_cleanup.release: pipe ended",
    # dtls_retransmit: the handshake timer, per connection.
    "aiocoap.protocol:Context.request_interfaces": "dtls_retransmit.harden_dtls",
    "aiocoap.protocol:Context._append_tokenmanaged_messagemanaged_transport ~ "
    "tman.token_interface = mman": "dtls_retransmit.harden_dtls",
    "aiocoap.protocol:Context._append_tokenmanaged_messagemanaged_transport ~ "
    "mman.message_interface = transport": "dtls_retransmit.harden_dtls",
    f"{_DTLS}._connection_for_address(self, host, port, pskId, psk)": (
        "dtls_retransmit.harden_dtls wraps it"
    ),
    f"{_DTLS}.determine_remote ~ self._connection_for_address(": (
        "dtls_retransmit: looked up on the instance per request"
    ),
    f"{_CONN}._run_retransmissions(self)": "dtls_retransmit: replaced per instance",
    f"{_CONN}._start ~ self._run_retransmissions()": (
        "dtls_retransmit: started after _connection_for_address returns"
    ),
    f"{_CONN}._dtls_socket": "dtls_retransmit.run_dtls_retransmissions",
    f"{_CONN}.shutdown(self)": "dtls_retransmit.shutdown_even_half_built: replaced per instance",
    f"{_CONN}.__del__ ~ self.shutdown()": "dtls_retransmit: __del__ reaches the replacement",
    f"{_CONN}.shutdown ~ self._retransmission_task.cancel()": (
        "dtls_retransmit.shutdown_even_half_built: what fails on a half-built connection"
    ),
    f"{_CONN}._start ~ self._retransmission_task = ": "dtls_retransmit: set late in _start",
    f"{_CONN}._remove_from_pool(self)": "dtls_retransmit.shutdown_even_half_built",
    f"{_CONN}._startup": "dtls_retransmit.shutdown_even_half_built",
    f"{_CONN}._start ~ self._transport, _ = await": "dtls_retransmit.shutdown_even_half_built",
    f"{_CONN}._queue": "dtls_retransmit: None once connected",
    "aiocoap.transports.tinydtls:DTLS_CLOCK_OFFSET": (
        "the clock base whose drift dtls_retransmit works around (tests shift it)"
    ),
    "DTLSSocket.dtls:DTLS.checkRetransmit": "dtls_retransmit.run_dtls_retransmissions",
}
