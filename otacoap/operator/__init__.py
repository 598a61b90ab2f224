"""The operator's side of the admin API: publishing to a running server over DTLS-PSK.

Operator code, not server code (DESIGN.md layers: imports core and aiocoap only); the
CLI's `otacoap publish --server` and the fleet simulator's setup use it.
"""
