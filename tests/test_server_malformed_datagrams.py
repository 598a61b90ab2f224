"""A datagram aiocoap cannot decode is dropped quietly, whatever is wrong with it.

Found by the Block1 fuzz harness (bench/fuzz, ATTACKS.md #43): aiocoap 0.4.17 decodes
string options as UTF-8 inside `Message.decode` and lets the UnicodeDecodeError out of
its receive path, which catches only UnparsableMessage. Each such datagram became an
"Unhandled exception in event loop" traceback in the server's log (log flooding by any
sender, authenticated or not). The listener now drops it like any unparsable message.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from aiocoap.numbers.codes import Code
from server_helpers import DeviceSpec, make_setup, run, running_server
from test_server_plain import _plain

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore:DTLS module did not shut down"),
]

# CON GET, MID 1, no token; Uri-Path (option 11) of two bytes that are not UTF-8.
NOT_UTF8_URI_PATH = bytes([0x40, 0x01, 0x00, 0x01, 0xB2, 0xC3, 0x28])


def test_a_non_utf8_string_option_is_dropped_without_a_traceback(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, devices=[DeviceSpec("t1")])
    with running_server(setup.data, args=["--insecure-plain-coap", "--plain-port", "0"]) as server:
        assert server.plain_port is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(5):
                sock.sendto(NOT_UTF8_URI_PATH, ("127.0.0.1", server.plain_port))
        # The server goes on answering (a request after the bad ones proves they were
        # processed first: one socket, one loop, in order).
        assert run(_plain(server.plain_uri + "/m")) == Code.UNAUTHORIZED
        deadline = time.monotonic() + 10
        while "non-UTF-8" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.log()
        assert "non-UTF-8 string option" in log
        assert "Traceback" not in log
        assert "Unhandled exception" not in log
