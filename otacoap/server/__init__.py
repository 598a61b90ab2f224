"""The CoAP/DTLS update server (aiocoap): resources, transports, and the operator
client for network publishing. Imports core, store and aiocoap only."""

from __future__ import annotations

from .app import OtaServer, ServeOptions, run

__all__ = ["OtaServer", "ServeOptions", "run"]
