"""Inputs the fuzz harnesses found (bench/fuzz, ATTACKS.md #43), kept as regressions.

Each one once raised outside its parser's typed error tree. The raw crash input is
replayed through its harness, and the underlying rule is pinned by a direct test.
"""

from __future__ import annotations

import base64
import hashlib

import pytest

from bench.fuzz.harnesses import HARNESSES, HMAC_KEY, mac_envelope
from otacoap.core import cose, suit, trust
from otacoap.core.build import Release, build_manifest
from otacoap.core.errors import PolicyError
from otacoap.core.update_machine import resolve_uri

# (harness, base64 of the input libFuzzer saved, what it raised then)
FOUND = [
    (
        "trust",
        "AaYBAQIHA1hfogKBgUEABFhWhhSkAVB1V3JJ1IBZDIBNox5OIhSYAlBBNq5niaxWHrmR03/QOJDgA1gkgi9Y"
        "INjoJxEDjQoW7KgZRMTz8+xN6Z0cWEmMXL0iPKwK74ZaDhkLuAEPAg8HQ4IDDwlDghcCFFgehhShFXVjYXBw"
        "Oi8vaC5leGFtXWxlL2Z3L3gVAgMP",
        "ValueError: Invalid IPv6 URL (urlsplit in trust._check_uri)",
    ),
]


@pytest.mark.parametrize(("name", "data", "then"), FOUND, ids=[f[2] for f in FOUND])
def test_a_found_input_is_now_refused_with_the_typed_error(name: str, data: str, then: str) -> None:
    assert HARNESSES[name].one(base64.b64decode(data)) is True


def _signed_with_uri(uri: str) -> bytes:
    image = b"\x5a" * 3000
    release = Release(hashlib.sha256(image).digest(), len(image), "v.example", "c", 5, uri=uri)
    return mac_envelope(suit.encode_manifest(build_manifest(release)))


@pytest.mark.parametrize(
    "uri",
    [
        "coap://h.exam]le/fw/x",  # "]" without "[": Invalid IPv6 URL
        "coaps://[::1/fw/x",  # "[" without "]"
        "coaps://[not-an-ip]/fw/x",
        "coaps://h.example:99999/fw/x",  # port out of range
        "coaps://h.example:port/fw/x",
    ],
)
def test_a_signed_uri_that_does_not_parse_is_a_policy_error(uri: str) -> None:
    policy = trust.TrustPolicy(
        anchors=(cose.hmac_anchor(HMAC_KEY),),
        allowed_uri_prefixes=("coaps://h.example/",),
    )
    with pytest.raises(PolicyError):
        trust.accept(_signed_with_uri(uri), policy)


@pytest.mark.parametrize("uri", ["coap://h.exam]le/fw/x", "//[::1/fw", "coaps://[x/fw/1"])
def test_the_device_refuses_an_unparsable_uri_when_resolving_it(uri: str) -> None:
    with pytest.raises(PolicyError):
        resolve_uri("coaps://127.0.0.1:5684", uri)
