"""Device status reports (otacoap.core.report): one strict codec for both directions.

A report's sender is the DTLS identity, so the body must not be able to name a device
(ATTACKS.md #33); the decoder is strict about keys and types (ATTACKS.md #40).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacoap.core import cbor
from otacoap.core.errors import ManifestError, ReportReason
from otacoap.core.report import (
    K_BYTES,
    K_COUNTER,
    K_DETAIL,
    K_INSTALLED_SEQUENCE,
    K_REFERENCE,
    K_RESULT,
    K_RESULT_REASON,
    K_SEQUENCE,
    K_STATE,
    MAX_DETAIL,
    MAX_REPORT_SIZE,
    Report,
    State,
    decode_report,
)
from otacoap.core.suit import DIGEST_SHA256, SuitDigest

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


@st.composite
def reports(draw: st.DrawFn) -> Report:
    digest = draw(
        st.none()
        | st.builds(
            SuitDigest,
            st.sampled_from([DIGEST_SHA256, -43, -44]),
            st.binary(min_size=32, max_size=64),
        )
    )
    return Report(
        counter=draw(U64),
        state=draw(st.sampled_from(list(State))),
        reason=draw(st.sampled_from(list(ReportReason))),
        sequence_number=draw(st.none() | U64),
        manifest_digest=digest,
        manifest_uri="" if digest is None else draw(st.text(max_size=60)),
        bytes_received=draw(st.none() | U64),
        installed_sequence=draw(st.none() | U64),
        detail=draw(st.text(max_size=60)),
    )


@settings(max_examples=200, deadline=None)
@given(reports())
def test_report_round_trips_through_encode_and_decode(report: Report) -> None:
    data = report.encode()
    assert len(data) <= MAX_REPORT_SIZE
    assert decode_report(data) == report


@settings(max_examples=50, deadline=None)
@given(reports())
def test_report_encoding_is_deterministic(report: Report) -> None:
    data = report.encode()
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data
    assert decode_report(data).encode() == data


def test_ok_report_encodes_result_true_and_failure_encodes_reason() -> None:
    ok = cbor2.loads(Report(1, State.CONFIRMED).encode())
    assert ok[K_RESULT] is True
    bad = cbor2.loads(Report(2, State.REJECTED, ReportReason.UNAUTHORISED).encode())
    assert bad[K_RESULT] == {K_RESULT_REASON: int(ReportReason.UNAUTHORISED)}
    assert decode_report(cbor.dumps(bad)).reason is ReportReason.UNAUTHORISED
    assert not decode_report(cbor.dumps(bad)).ok


def test_longest_allowed_detail_round_trips_and_longer_is_truncated() -> None:
    exact = Report(1, State.FAILED, ReportReason.OPERATION_FAILED, detail="x" * MAX_DETAIL)
    assert decode_report(exact.encode()) == exact
    long = dataclasses.replace(exact, detail="y" * (MAX_DETAIL + 50))
    assert decode_report(long.encode()).detail == "y" * MAX_DETAIL


# -- the body cannot carry a device identity ---------------------------------------------


def test_report_model_has_no_device_identity_field() -> None:
    names = {f.name for f in dataclasses.fields(Report)}
    assert not any("device" in n or n in ("id", "identity", "sender", "psk") for n in names)


def _body() -> dict[Any, Any]:
    return {K_COUNTER: 5, K_STATE: "installed", K_RESULT: True}


def _with(key: Any, value: Any) -> dict[Any, Any]:
    body = _body()
    body[key] = value
    return body


@pytest.mark.parametrize(
    "key",
    ["device", "device_id", "id", 1, 2, 3, 5, 6, 8, 24, 98, 100, 1 << 32],
    ids=str,
)
def test_unknown_or_identity_keys_are_refused(key: Any) -> None:
    body = _body()
    body[key] = "device-B" if isinstance(key, str) else b"B" * 16
    with pytest.raises(ManifestError):
        decode_report(cbor.dumps(body))


def test_device_id_under_a_negative_key_cannot_reach_the_decoded_report() -> None:
    body = _body()
    body[-100] = "device-B"
    decoded = decode_report(cbor.dumps(body))
    assert "device-B" not in repr(decoded)
    assert decoded == Report(5, State.INSTALLED)


# -- bad types ---------------------------------------------------------------------------


BAD_BODIES: list[tuple[str, Any]] = [
    ("not-a-map", [K_COUNTER, 1]),
    ("missing-counter", {K_STATE: "installed"}),
    ("missing-state", {K_COUNTER: 1}),
    ("counter-negative", _with(K_COUNTER, -1)),
    ("counter-text", _with(K_COUNTER, "1")),
    ("counter-bool", _with(K_COUNTER, True)),
    ("counter-bstr", _with(K_COUNTER, b"\x01")),
    ("state-unknown", _with(K_STATE, "exploded")),
    ("state-int", _with(K_STATE, 3)),
    ("state-bstr", _with(K_STATE, b"installed")),
    ("result-false", _with(K_RESULT, False)),
    ("result-int", _with(K_RESULT, 0)),
    ("result-empty-map", _with(K_RESULT, {})),
    ("result-reason-text", _with(K_RESULT, {K_RESULT_REASON: "ok"})),
    ("result-reason-unknown", _with(K_RESULT, {K_RESULT_REASON: 99})),
    ("result-reason-negative", _with(K_RESULT, {K_RESULT_REASON: -1})),
    ("sequence-text", _with(K_SEQUENCE, "7")),
    ("sequence-negative", _with(K_SEQUENCE, -7)),
    ("bytes-negative", _with(K_BYTES, -1)),
    ("installed-seq-bool", _with(K_INSTALLED_SEQUENCE, False)),
    ("detail-bstr", _with(K_DETAIL, b"oops")),
    ("detail-too-long", _with(K_DETAIL, "z" * (MAX_DETAIL + 1))),
    ("reference-not-list", _with(K_REFERENCE, "coaps://x")),
    ("reference-short", _with(K_REFERENCE, ["coaps://x"])),
    ("reference-uri-bstr", _with(K_REFERENCE, [b"coaps://x", [-16, b"\x00" * 32]])),
    ("reference-digest-bad", _with(K_REFERENCE, ["coaps://x", [-16]])),
    ("reference-digest-alg-text", _with(K_REFERENCE, ["coaps://x", ["sha", b"\x00" * 32]])),
]


@pytest.mark.parametrize(("name", "body"), BAD_BODIES, ids=[n for n, _ in BAD_BODIES])
def test_bad_types_are_refused(name: str, body: Any) -> None:
    with pytest.raises(ManifestError):
        decode_report(cbor2.dumps(body, canonical=True))


@pytest.mark.parametrize("flag", [True, False])
def test_boolean_result_reason_is_refused(flag: bool) -> None:
    with pytest.raises(ManifestError):
        decode_report(cbor.dumps(_with(K_RESULT, {K_RESULT_REASON: flag})))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xa2\x23\x01\x23\x02",  # duplicate counter key
        cbor.dumps(_body()) + b"\x00",  # trailing byte
        b"\xbf\x23\x01\x20\x69installed\xff",  # indefinite-length map
        b"\xa2\x23\xf9\x3c\x00\x20\x69installed",  # float counter
        b"\xa2\x23\xc2\x41\x01\x20\x69installed",  # bignum counter
        b"\xa2\x23\x18\x01\x20\x69installed",  # non-shortest counter
        b"\xa2\x23\x01\x20\x62\xc3\x28",  # invalid UTF-8 state
        cbor.dumps(_with(-50, b"x" * MAX_REPORT_SIZE)),
    ],
    ids=[
        "empty",
        "duplicate-key",
        "trailing-byte",
        "indefinite-map",
        "float-counter",
        "bignum-counter",
        "non-shortest-counter",
        "invalid-utf8",
        "oversize",
    ],
)
def test_malformed_cbor_bodies_are_refused(data: bytes) -> None:
    with pytest.raises(ManifestError):
        decode_report(data)


def test_largest_uint64_counter_is_accepted_and_bignum_beyond_is_refused() -> None:
    top = Report((1 << 64) - 1, State.CHECKING)
    assert decode_report(top.encode()).counter == (1 << 64) - 1
    beyond = cbor2.dumps({K_COUNTER: 1 << 64, K_STATE: "checking"}, canonical=True)
    with pytest.raises(ManifestError):
        decode_report(beyond)
