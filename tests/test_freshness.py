"""core.freshness: signed expiry in the trust gate and nonce-bound statements (ATTACKS.md #8)."""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacoap.core import cbor, cose, freshness, ids, suit, trust
from otacoap.core.build import Release, build_envelope
from otacoap.core.errors import AuthenticationError, ManifestError, OtaError
from otacoap.core.freshness import Freshness, ManifestExpired, Statement

VENDOR = ids.vendor_id("acme.example")
CLASS = ids.class_id(VENDOR, "thermostat-t1")
KEY = cose.generate_key("es256")
FRESH_KEY = cose.generate_key("es256")
NONCE = bytes(range(16))


def envelope(expires: Any = None, seq: int = 7) -> bytes:
    release = Release(b"\x11" * 32, 100, "acme.example", "thermostat-t1", seq)
    if expires is not None and not (type(expires) is int and expires >= 0):
        # A malformed value: build it by hand around the real manifest.
        manifest = suit.Manifest(
            1,
            seq,
            build_envelope(release).manifest.common,
            extensions=((freshness.M_EXPIRES, expires),),
        )
        return suit.encode_envelope(_signed(manifest))
    release = Release(b"\x11" * 32, 100, "acme.example", "thermostat-t1", seq, expires=expires)
    return suit.encode_envelope(build_envelope(release, KEY))


def _signed(manifest: suit.Manifest) -> suit.Envelope:
    from otacoap.core.build import sign_envelope

    return sign_envelope(suit.make_envelope(manifest), KEY)


def policy(now: int | None, current: int | None = None) -> trust.TrustPolicy:
    return trust.TrustPolicy(
        anchors=(KEY.public,), now=now, current_sequence=current, vendor_id=VENDOR
    )


# --- signed expiry ----------------------------------------------------------------------


def test_expiry_is_a_signed_manifest_member() -> None:
    vm = trust.accept(envelope(expires=2_000_000_000), policy(None))
    assert freshness.manifest_expiry(vm.manifest) == 2_000_000_000
    assert (freshness.M_EXPIRES, 2_000_000_000) in vm.manifest.extensions


def test_device_with_a_clock_refuses_an_expired_manifest() -> None:
    env = envelope(expires=1000)
    assert trust.accept(env, policy(now=999)).sequence_number == 7
    with pytest.raises(ManifestExpired, match="expired"):
        trust.accept(env, policy(now=1000))


def test_device_without_a_clock_cannot_enforce_expiry() -> None:
    assert trust.accept(envelope(expires=1000), policy(now=None)).sequence_number == 7


def test_manifest_without_expiry_never_expires() -> None:
    assert trust.accept(envelope(), policy(now=1 << 40)).sequence_number == 7


def test_expired_installed_manifest_is_refused_not_up_to_date() -> None:
    """A frozen server serving the installed but expired manifest is detected (#8)."""
    env = envelope(expires=1000, seq=7)
    with pytest.raises(ManifestExpired):
        trust.accept(env, policy(now=5000, current=7))


@pytest.mark.parametrize("bad", [-1, 1.5, "1000", b"\x01", True, [1]])
def test_malformed_expiry_is_refused_with_or_without_clock(bad: Any) -> None:
    env = envelope(expires=bad)
    for now in (None, 5):
        with pytest.raises(ManifestError):
            trust.accept(env, policy(now=now))


def test_expiry_cannot_be_changed_without_the_author_key() -> None:
    env = cbor2.loads(envelope(expires=1000))
    manifest = cbor2.loads(env.value[suit.ENV_MANIFEST])
    manifest[freshness.M_EXPIRES] = 1 << 40
    env.value[suit.ENV_MANIFEST] = cbor.dumps(manifest)
    with pytest.raises(AuthenticationError):
        trust.accept(cbor2.dumps(env), policy(now=5000))


# --- statements -------------------------------------------------------------------------


def statement(**kw: Any) -> Statement:
    base: dict[str, Any] = dict(
        nonce=NONCE, vendor_id=VENDOR, class_id=CLASS, sequence=7, anchor_version=2, time=1
    )
    base.update(kw)
    return Statement(**base)


def verify(data: bytes, nonce: bytes = NONCE, keys: tuple[Any, ...] | None = None) -> Statement:
    return freshness.verify_statement(
        data,
        nonce=nonce,
        keys=(FRESH_KEY.public,) if keys is None else keys,
        vendor_id=VENDOR,
        class_id=CLASS,
    )


@settings(max_examples=50, deadline=None)
@given(
    nonce=st.binary(min_size=8, max_size=32),
    seq=st.integers(0, (1 << 64) - 1),
    anchors=st.integers(0, (1 << 63) - 1),
    time=st.integers(0, 1 << 40),
)
def test_statement_round_trips(nonce: bytes, seq: int, anchors: int, time: int) -> None:
    s = statement(nonce=nonce, sequence=seq, anchor_version=anchors, time=time)
    assert verify(freshness.sign_statement(s, FRESH_KEY), nonce=nonce) == s


def test_replayed_statement_for_another_nonce_is_refused() -> None:
    old = freshness.sign_statement(statement(), FRESH_KEY)
    with pytest.raises(AuthenticationError, match="nonce"):
        verify(old, nonce=b"\x99" * 16)


def test_statement_from_an_untrusted_key_is_refused() -> None:
    with pytest.raises(AuthenticationError):
        verify(freshness.sign_statement(statement(), KEY))
    with pytest.raises(AuthenticationError, match="no freshness key"):
        verify(freshness.sign_statement(statement(), FRESH_KEY), keys=())


def test_statement_for_another_class_is_refused() -> None:
    other = ids.class_id(VENDOR, "soil-sensor-s3")
    with pytest.raises(AuthenticationError):
        verify(freshness.sign_statement(statement(class_id=other), FRESH_KEY))


def test_anchor_list_payload_is_not_a_statement() -> None:
    payload = cbor.dumps({0: "otacoap-anchors", 1: NONCE})
    data = cbor.dumps([payload, cose.sign1(payload, FRESH_KEY)])
    with pytest.raises(ManifestError):
        verify(data)


@pytest.mark.parametrize("nonce", [b"", b"\x01" * 7, b"\x01" * 33])
def test_nonce_length_is_bounded(nonce: bytes) -> None:
    with pytest.raises(ManifestError):
        freshness.sign_statement(statement(nonce=nonce), FRESH_KEY)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_statement_verification(data: bytes) -> None:
    with contextlib.suppress(OtaError):
        verify(data)


@pytest.mark.parametrize(
    "s,installed,anchors,expected",
    [
        (None, 7, 2, Freshness.UNKNOWN),
        (statement(sequence=7, anchor_version=2), 7, 2, Freshness.FRESH),
        (statement(sequence=3, anchor_version=1), 7, 2, Freshness.FRESH),
        (statement(sequence=8, anchor_version=2), 7, 2, Freshness.STALE),
        (statement(sequence=7, anchor_version=3), 7, 2, Freshness.STALE),
    ],
)
def test_judge_tells_fresh_from_stale_from_unknown(
    s: Statement | None, installed: int, anchors: int, expected: Freshness
) -> None:
    assert freshness.judge(s, installed=installed, anchor_version=anchors) == expected
