"""Every aiocoap (and DTLSSocket) name the server uses that is not documented API.

`tests/test_aiocoap_contract.py` walks this table against the installed aiocoap
(pinned in pyproject.toml). Each key is one of:

- `module:Name.attr`: the name exists (a class attribute, or `self.attr` assigned in
  the class or one of its bases);
- `module:Name.method(params)`: a callable whose parameters (annotations left out) are
  exactly these;
- `module:Name.method ~ text`: the source of that function contains `text`, for the
  behaviour we depend on (who calls what).

The value says where we use it. The test also fails when this package reaches a private
attribute that no key names, so the table stays complete.
"""

from __future__ import annotations

_MM = "aiocoap.messagemanager:MessageManager"
_TM = "aiocoap.tokenmanager:TokenManager"
_CTX = "aiocoap.protocol:Context"
_GEN = "aiocoap.transports.generic_udp:GenericMessageInterface"
_SOCK = "aiocoap.transports.simplesocketserver:_DatagramServerSocketSimple"
_PLAIN = "aiocoap.transports.simplesocketserver:MessageInterfaceSimpleServer"
_ADDR = "aiocoap.transports.simplesocketserver:_Address"
_DSOCK = "aiocoap.transports.tinydtls_server:_DatagramServerSocketSimpleDTLS"
_DADDR = "aiocoap.transports.tinydtls_server:_AddressDTLS"
_DECRYPT = "aiocoap.transports.tinydtls_server:GoingThroughMessageDecryption"
_DSERVER = "aiocoap.transports.tinydtls_server:MessageInterfaceTinyDTLSServer"
_STORE = "aiocoap.transports.tinydtls_server:SecurityStore"

RELIES_ON: dict[str, str] = {
    # dedup.BoundedMessageManager: RFC 7252 §4.5 with an entry cap.
    f"{_MM}.__init__(self, token_manager)": "dedup: BoundedMessageManager.__init__",
    f"{_MM}._deduplicate_message(self, message)": "dedup: overridden",
    f"{_MM}._store_response_for_duplicates(self, message)": "dedup: overridden",
    f"{_MM}.dispatch_message ~ self._deduplicate_message(message)": "dedup: called per message",
    f"{_MM}._send_initially ~ self._store_response_for_duplicates(message)": "dedup: stores",
    f"{_MM}._send_initially(self, message, messageerror_monitor=None)": "dedup: replays",
    f"{_MM}._recent_messages": "dedup: replaced by our DedupCache",
    f"{_MM}.log": "dedup: duplicate log lines",
    f"{_TM}.__init__(self, context)": "listeners.add_transport",
    f"{_TM}.loop": "dedup: the cache's clock",
    # listeners.add_transport mirrors how aiocoap wires a UDP transport under a Context.
    f"{_CTX}._append_tokenmanaged_messagemanaged_transport ~ tman.token_interface = mman": (
        "listeners.add_transport"
    ),
    f"{_CTX}._append_tokenmanaged_messagemanaged_transport ~ "
    "mman.message_interface = transport": "listeners.add_transport",
    f"{_CTX}.request_interfaces": "listeners.add_transport, listeners.shutdown",
    # listeners: the message interfaces, built without create_server (port + 1).
    f"{_GEN}.__init__(self, mman, log, loop)": "listeners: cls(mman, log, loop)",
    f"{_GEN}._mman": "listeners._FastPathFirst: None once shutting down",
    f"{_GEN}._received_datagram(self, address, datagram)": "listeners._FastPathFirst",
    f"{_GEN}._received_datagram ~ except error.UnparsableMessage:": (
        "listeners._FastPathFirst drops the UnicodeDecodeError aiocoap lets out"
    ),
    f"{_GEN}.shutdown ~ self._pool.shutdown()": "listeners: we set _pool ourselves",
    f"{_PLAIN}._serversocket": "listeners: our socket classes",
    f"{_PLAIN}.create_server ~ self._pool = await self._serversocket.create(": (
        "listeners.create_bound does the same, without the port shift"
    ),
    f"{_DSERVER}._serversocket": "listeners.DTLSServerInterface",
    f"{_DSERVER}.create_server ~ self._pool._server_credentials = server_credentials": (
        "listeners.DTLSServerInterface.create_bound"
    ),
    f"{_DSERVER}.shutdown ~ c._inject_error(": "dtls_pool.SessionAddress._inject_error",
    f"{_ADDR}.send(self, data)": "listeners._FastPathFirst sends encoded bytes (plain)",
    # sockets: binding without SO_REUSEPORT and without the port shift.
    f"{_SOCK}.__init__(self, ready_callback, message_interface, log)": "sockets.bind_exclusive",
    f"{_SOCK}.create(bind, log, loop, message_interface)": "sockets.PlainSocket.create",
    f"{_SOCK}.create ~ protocol.hostinfo_local = ": "sockets.set_local_hostinfo",
    f"{_SOCK}._loop": "sockets.bind_exclusive",
    f"{_SOCK}._transport": "sockets.bound_port, dtls_pool.SessionAddress",
    f"{_SOCK}._message_interface": "dtls_pool: the decrypting adapter",
    # dtls_pool: the bounded session table.
    f"{_DSOCK}.__init__(self, *args, **kwargs)": "dtls_pool.BoundedDTLSSocket.__init__",
    f"{_DSOCK}.create(bind, log, loop, message_interface)": "dtls_pool: overridden",
    f"{_DSOCK}.datagram_received(self, data, sockaddr)": "dtls_pool: overridden",
    f"{_DSOCK}._Address": "dtls_pool: SessionAddress",
    f"{_DSOCK}.max_sockets": "dtls_pool: the session cap",
    f"{_DSOCK}._connections": "dtls_pool: the session table, last-heard order",
    f"{_DADDR}.__init__(self, protocol, underlying_address)": "dtls_pool.SessionAddress",
    f"{_DADDR}.__init__ ~ SecurityStore(protocol._server_credentials)": "PSK lookup",
    f"{_DADDR}._read(self, sender, data)": "dtls_pool: overridden tinydtls callback",
    f"{_DADDR}._write(self, recipient, data)": "dtls_pool: overridden tinydtls callback",
    f"{_DADDR}._inject_error(self, e)": "dtls_pool: overridden",
    f"{_DADDR}._inject_error ~ self._protocol._connections.pop(": "dtls_pool: KeyError",
    f"{_DADDR}._run_retransmissions(self)": "dtls_pool.Decrypting",
    f"{_DADDR}.send(self, message)": "listeners._FastPathFirst sends encoded bytes (DTLS)",
    f"{_DADDR}._dtls_socket": "dtls_pool: handleMessage, checkRetransmit, close",
    f"{_DADDR}._dtls_session": "dtls_pool",
    f"{_DADDR}._retransmission_task": "dtls_pool.Decrypting",
    f"{_DADDR}._protocol": "dtls_pool.SessionAddress._inject_error",
    f"{_DADDR}._event(self, level, code)": "dtls_pool.SessionAddress: handshake done/failed",
    f"{_DADDR}._event ~ self._inject_error(FatalDTLSError(code))": "dtls_pool: a failed handshake",
    f"{_DADDR}._psk_store": "dtls_pool.SessionAddress: records the presented identity",
    f"{_STORE}._server_credentials": "dtls_pool.SessionAddress: asked through the address",
    f"{_STORE}._claims": "dtls_pool.SessionAddress.claims (what revocation checks)",
    "aiocoap.transports.tinydtls:DTLS_EVENT_CONNECTED": "dtls_pool: handshake complete",
    "aiocoap.transports.tinydtls:LEVEL_NOALERT": "dtls_pool.SessionAddress._event",
    "aiocoap.transports.tinydtls:LEVEL_FATAL": "dtls_pool.SessionAddress._event",
    f"{_DECRYPT}.__init__(self, plaintext_interface)": "dtls_pool.BoundedDTLSSocket.create",
    f"{_DECRYPT}._plaintext_interface": "dtls_pool.SessionAddress",
    f"{_DECRYPT}._received_datagram(self, address, data)": "dtls_pool.Decrypting",
    f"{_STORE}.__getitem__ ~ self._server_credentials.find_dtls_psk(key)": (
        "otacoap.server.credentials.PskDirectory.find_dtls_psk"
    ),
    "DTLSSocket.dtls:DTLS.handleMessage": "dtls_pool.Decrypting",
    "DTLSSocket.dtls:DTLS.checkRetransmit": "dtls_pool.Decrypting",
    "DTLSSocket.dtls:DTLS.close": "dtls_pool.SessionAddress.evict (close_notify)",
}
