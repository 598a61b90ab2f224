"""The CoAP/DTLS update server (aiocoap): resources and transports. Imports core,
config, store and aiocoap only; the operator's client is otacoap.operator."""

from __future__ import annotations

from .app import OtaServer, ServeOptions, serve

__all__ = ["OtaServer", "ServeOptions", "serve"]
