"""ATTACKS.md 38-42 (and the H5 fuzz of 43) against every decoder of untrusted bytes.

The targets are otacoap.core.cbor.loads, suit.decode_envelope, trust.accept and
report.decode_report. Each hostile input must end in a ManifestError subclass (never
RecursionError, MemoryError or anything else), quickly (< 50 ms) and in little memory
(tracemalloc peak < 1 MiB). Envelope-level cases are re-signed with a real key so the
refusal is the parser's, not the signature check's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cbor2 import CBORTag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacoap.core import build, cbor, cose, ids, report, suit, trust
from otacoap.core.build import Release
from otacoap.core.errors import ManifestError, OtaError
from otacoap.core.suit import Command, CommandSequence, Parameters, SuitDigest

TIME_LIMIT = 0.050  # seconds per decode (ATTACKS.md #38)
MEMORY_LIMIT = 1 << 20  # bytes of tracemalloc peak per decode (ATTACKS.md #39)

KEY = cose.generate_key("es256")
OTHER_KEY = cose.generate_key("es256")
POLICY = trust.TrustPolicy(anchors=(KEY.public,))
VENDOR = ids.vendor_id("example.com")
CLASS = ids.class_id(VENDOR, "board")


def _release(seq: int, uri: str) -> Release:
    return Release(
        hashlib.sha256(b"image %d" % seq).digest(), 4096, "example.com", "board", seq, uri
    )


VALID = suit.encode_envelope(build.build_envelope(_release(5, "coaps://fw.example.com/fw/a"), KEY))
OTHER = suit.encode_envelope(
    build.build_envelope(_release(6, "coaps://evil.example.net/x"), OTHER_KEY)
)
VALID_ENVELOPE = suit.decode_envelope(VALID)


def sign_raw_manifest(manifest_raw: bytes) -> bytes:
    """A correctly signed envelope around arbitrary (possibly malformed) manifest bytes."""
    digest_raw = SuitDigest.of(cbor.bstr_wrap(manifest_raw)).encode()
    auth = cbor.dumps([digest_raw, cose.sign1(digest_raw, KEY)])
    return cbor.dumps(
        CBORTag(suit.ENVELOPE_TAG, {suit.ENV_AUTH: auth, suit.ENV_MANIFEST: manifest_raw})
    )


def _map_head(n: int) -> bytes:
    assert n < 24
    return bytes([0xA0 + n])


def manifest_with(
    seq_item: bytes = b"\x05",
    *,
    extra: bytes = b"",
    extra_pairs: int = 0,
    install: bytes | None = None,
) -> bytes:
    """The VALID manifest re-assembled pair by pair, with a hand-encoded sequence number.

    `extra` is inserted right after the sequence-number pair (for duplicates); `install`
    replaces the install sequence's bstr contents.
    """
    pairs = []
    for key, value in VALID_ENVELOPE.manifest.to_cbor().items():
        if key == suit.M_SEQUENCE_NUMBER:
            pairs.append(b"\x02" + seq_item + extra)
        elif key == suit.M_INSTALL and install is not None:
            pairs.append(cbor.dumps(key) + cbor.dumps(install))
        else:
            pairs.append(cbor.dumps(key) + cbor.dumps(value))
    return _map_head(len(pairs) + extra_pairs) + b"".join(pairs)


def test_manifest_with_reassembles_the_valid_manifest_exactly() -> None:
    """The hand assembly is faithful, so each case below differs only by its fault."""
    assert manifest_with() == VALID_ENVELOPE.manifest_raw
    assert trust.accept(sign_raw_manifest(manifest_with()), POLICY).sequence_number == 5


# -- the corpus --------------------------------------------------------------------------

# Raw CBOR that no decoder may accept (all far below the 64 KiB cap except the first).
RAW_CORPUS: dict[str, bytes] = {
    # 38: nesting bombs
    "array-nesting-200000": b"\x81" * 200_000 + b"\x00",
    "array-nesting-60000": b"\x81" * 60_000 + b"\x00",
    "array-nesting-17": b"\x81" * 17 + b"\x00",
    "tag-6-chain": b"\xc6" * 60_000 + b"\x00",
    "allowed-tag-chain": b"\xd8\x6b" * 30_000 + b"\xa0",
    "cose-tag-chain": b"\xd2" * 60_000 + b"\x00",
    "indefinite-array-nesting": b"\x9f" * 60_000 + b"\xff" * 100,
    "indefinite-map-nesting": b"\xbf\x00" * 30_000,
    "map-nesting": b"\xa1\x00" * 30_000 + b"\x00",
    "mixed-nesting": (b"\x81\xa1\x00\xd8\x6b") * 10_000 + b"\x00",
    # 39: length bombs
    "bstr-2^64-1": b"\x5b" + b"\xff" * 8,
    "tstr-2^64-1": b"\x7b" + b"\xff" * 8,
    "array-2^64-1": b"\x9b" + b"\xff" * 8,
    "map-2^64-1": b"\xbb" + b"\xff" * 8,
    "array-2^32-1": b"\x9a" + b"\xff" * 4,
    "map-2^32-1": b"\xba" + b"\xff" * 4,
    "bstr-2^32-1": b"\x5a" + b"\xff" * 4 + b"abc",
    "array-of-huge-bstr": b"\x82\x5b" + b"\x7f" + b"\xff" * 7 + b"\x00",
    "map-count-exceeds-input": b"\xb9\xff\xff" + b"\x00" * 10,
    # 40: strictness
    "duplicate-int-key": b"\xa2\x01\x01\x01\x02",
    "duplicate-text-key": b"\xa2\x61a\x01\x61a\x02",
    "nested-duplicate-key": b"\xa1\x01\xa2\x02\x00\x02\x01",
    "trailing-byte": b"\xa1\x01\x01\x00",
    "two-items": b"\x01\x02",
    "truncated-map": b"\xa2\x01\x01",
    "truncated-head": b"\x19\x01",
    "empty": b"",
    "float16": b"\xf9\x3c\x00",
    "float64": b"\xfb" + b"\x3f\xf0" + b"\x00" * 6,
    "float-in-map": b"\xa1\x02\xfa\x3f\x80\x00\x00",
    "bignum": b"\xc2\x49\x01" + b"\x00" * 8,
    "negative-bignum": b"\xc3\x41\x01",
    "undefined": b"\xf7",
    "simple-value-16": b"\xf0",
    "simple-value-two-byte": b"\xf8\x20",
    "true-in-two-bytes": b"\xf8\x15",
    "reserved-additional-info": b"\x1c",
    "break-outside-indefinite": b"\xff",
    "non-shortest-uint-1": b"\x18\x05",
    "non-shortest-uint-2": b"\x19\x00\xff",
    "non-shortest-uint-4": b"\x1a\x00\x00\xff\xff",
    "non-shortest-uint-8": b"\x1b" + b"\x00" * 4 + b"\xff\xff\xff\xff",
    "non-shortest-negative": b"\x38\x05",
    "non-shortest-bstr-length": b"\x58\x01\x00",
    "non-shortest-array-length": b"\x98\x01\x00",
    "non-shortest-map-length": b"\xb8\x01\x01\x01",
    "non-shortest-tag": b"\xd9\x00\x6b\xa0",
    "indefinite-bstr": b"\x5f\x41\x00\xff",
    "indefinite-tstr": b"\x7f\x61a\xff",
    "indefinite-array": b"\x9f\x01\xff",
    "indefinite-map": b"\xbf\x01\x01\xff",
    "map-as-key": b"\xa1\xa0\x00",
    "float-as-key": b"\xa1\xf9\x3c\x00\x00",
    "null-as-key": b"\xa1\xf6\x00",
    # 42: value sharing
    "shareable-tag-28": b"\xd8\x1c\x81\x00",
    "shared-ref-tag-29": b"\xd8\x1d\x00",
    "shareable-inside-map": b"\xa1\x01\xd8\x1c\x01",
    # other tags cbor2 would reinterpret
    "date-tag-1": b"\xc1\x00",
    "regex-tag-35": b"\xd8\x23\x61a",
    "set-tag-258": b"\xd9\x01\x02\x80",
    "invalid-utf8": b"\x62\xc3\x28",
    "invalid-utf8-key": b"\xa1\x62\xc3\x28\x00",
    "overlong-utf8": b"\x62\xc0\xaf",
    "utf8-surrogate": b"\x63\xed\xa0\x80",
}

# Validly signed envelopes whose manifest (or envelope) breaks the strict profile.
_DUP_PARAM_INSTALL = b"\x84\x14\xa2\x15\x61a\x15\x61b\x15\x02"  # [20, {21:"a", 21:"b"}, 21, 2]
ENVELOPE_CORPUS: dict[str, Callable[[], bytes]] = {
    "duplicate-sequence-number": lambda: sign_raw_manifest(
        manifest_with(extra=b"\x02\x18\x64", extra_pairs=1)
    ),
    "duplicate-sequence-number-same-value": lambda: sign_raw_manifest(
        manifest_with(extra=b"\x02\x05", extra_pairs=1)
    ),
    "duplicate-key-in-parameters": lambda: sign_raw_manifest(
        manifest_with(install=_DUP_PARAM_INSTALL)
    ),
    "float-sequence-number": lambda: sign_raw_manifest(manifest_with(b"\xf9\x45\x00")),
    "float32-sequence-number": lambda: sign_raw_manifest(manifest_with(b"\xfa\x40\xa0\x00\x00")),
    "bignum-sequence-number": lambda: sign_raw_manifest(manifest_with(b"\xc2\x41\x05")),
    "bignum-2^64-sequence-number": lambda: sign_raw_manifest(
        manifest_with(b"\xc2\x49\x01" + b"\x00" * 8)
    ),
    "negative-sequence-number": lambda: sign_raw_manifest(manifest_with(b"\x24")),
    "non-shortest-sequence-number": lambda: sign_raw_manifest(manifest_with(b"\x18\x05")),
    "non-shortest-sequence-number-8": lambda: sign_raw_manifest(
        manifest_with(b"\x1b" + b"\x00" * 7 + b"\x05")
    ),
    "shared-value-sequence-number": lambda: sign_raw_manifest(manifest_with(b"\xd8\x1c\x05")),
    "indefinite-manifest-map": lambda: sign_raw_manifest(b"\xbf" + manifest_with()[1:] + b"\xff"),
    "indefinite-install-bstr": lambda: sign_raw_manifest(
        manifest_with(install=b"\x5f\x41\x84\x43\x14\xa1\x15\x61a\x42\x15\x02\xff")
    ),
    "invalid-utf8-uri": lambda: sign_raw_manifest(
        manifest_with(install=b"\x84\x14\xa1\x15\x62\xc3\x28\x15\x02")
    ),
    "trailing-bytes-in-manifest": lambda: sign_raw_manifest(manifest_with() + b"\x00"),
    "trailing-bytes-after-envelope": lambda: VALID + b"\x00",
    "trailing-envelope-after-envelope": lambda: VALID + VALID,
    "nested-manifest-bomb": lambda: sign_raw_manifest(b"\x81" * 1000 + b"\x00"),
    "install-nesting-bomb": lambda: sign_raw_manifest(
        manifest_with(install=b"\x81" * 1000 + b"\x00")
    ),
    "oversized-envelope": lambda: VALID + b"\x00" * cbor.DEFAULT_MAX_SIZE,
}


def _run(func: Callable[[bytes], Any], data: bytes) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        func(data)
    return info.value


def _bounded(func: Callable[[bytes], Any], data: bytes) -> None:
    """Refused with a ManifestError, fast, and in bounded memory."""
    _run(func, data)  # warm-up: lazy imports and caches are not the input's fault
    elapsed = min(_timed(func, data) for _ in range(3))
    assert elapsed < TIME_LIMIT, f"{elapsed * 1000:.1f} ms"
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        _run(func, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"peak {peak} bytes"


def _timed(func: Callable[[bytes], Any], data: bytes) -> float:
    start = time.perf_counter()
    _run(func, data)
    return time.perf_counter() - start


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "cbor.loads": cbor.loads,
    "suit.decode_envelope": suit.decode_envelope,
    "trust.accept": lambda data: trust.accept(data, POLICY),
    "report.decode_report": report.decode_report,
}


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("case", sorted(RAW_CORPUS))
def test_hostile_cbor_is_refused_quickly_in_bounded_memory(case: str, decoder: str) -> None:
    _bounded(DECODERS[decoder], RAW_CORPUS[case])


@pytest.mark.parametrize(
    "case", ["array-nesting-200000", "tag-6-chain", "indefinite-array-nesting"]
)
def test_nesting_bomb_is_refused_by_depth_even_with_the_size_cap_lifted(case: str) -> None:
    data = RAW_CORPUS[case]
    _bounded(lambda d: cbor.loads(d, max_size=len(d)), data)


@pytest.mark.parametrize("decoder", ["suit.decode_envelope", "trust.accept"])
@pytest.mark.parametrize("case", sorted(ENVELOPE_CORPUS))
def test_malformed_but_signed_envelope_is_refused(case: str, decoder: str) -> None:
    _bounded(DECODERS[decoder], ENVELOPE_CORPUS[case]())


def test_duplicate_key_in_a_cose_protected_header_is_refused() -> None:
    digest_raw = VALID_ENVELOPE.authentication.digest_raw
    protected = b"\xa2\x01\x26\x01\x26"  # {1: -7, 1: -7}
    block = cbor2.dumps(CBORTag(18, [protected, {}, None, b"\x00" * 64]))
    auth = cbor.dumps([digest_raw, block])
    data = cbor.dumps(CBORTag(107, {2: auth, 3: VALID_ENVELOPE.manifest_raw}))
    with pytest.raises(OtaError) as info:  # an AlgorithmError: the COSE block is unusable
        trust.accept(data, POLICY)
    assert "header" in str(info.value)


@pytest.mark.parametrize(
    "body",
    [b"\x81" * 1000 + b"\x00", b"\xa1\x23" * 6 + b"\x00", b"\xa3\x23\x01\x23\x02\x20\x61x"],
    ids=["nesting-in-report", "nested-maps-in-report", "duplicate-counter"],
)
def test_hostile_report_body_is_refused(body: bytes) -> None:
    _bounded(report.decode_report, body)


def test_distinct_array_keys_of_equal_length_are_not_duplicates() -> None:
    data = cbor2.dumps({(b"\x00",): {1: "a"}, (b"\x01",): {1: "b"}}, canonical=True)
    assert cbor.loads(data) == {(b"\x00",): {1: "a"}, (b"\x01",): {1: "b"}}


def test_signed_manifest_with_text_for_two_components_is_accepted() -> None:
    text = cbor.dumps({"en": {1: "two parts", (b"\x00",): {1: "ACME"}, (b"\x01",): {1: "ACME"}}})
    manifest = VALID_ENVELOPE.manifest
    manifest = dataclasses.replace(manifest, members=(*manifest.members, (suit.M_TEXT, text)))
    data = suit.encode_envelope(build.sign_envelope(suit.make_envelope(manifest), KEY))
    assert trust.accept(data, POLICY).manifest.member(suit.M_TEXT) == text


def test_equal_array_keys_are_duplicates() -> None:
    with pytest.raises(ManifestError):
        cbor.loads(b"\xa2\x81\x41\x00\x01\x81\x41\x00\x02")


# -- 42. no state shared between messages -----------------------------------------------


def test_a_value_shared_by_one_message_is_not_visible_to_the_next() -> None:
    first = cbor2.dumps([CBORTag(28, b"secret-of-device-B"), 1])
    second = cbor2.dumps([CBORTag(29, 0)])
    for decode in (cbor.loads, report.decode_report, suit.decode_envelope):
        with pytest.raises(ManifestError):
            decode(first)
        with pytest.raises(ManifestError):
            decode(second)


def test_decoding_in_sequence_returns_independent_values() -> None:
    a = report.Report(1, report.State.DOWNLOADING, bytes_received=10, detail="device A")
    b = report.Report(2, report.State.FAILED, detail="device B")
    first = cbor.loads(a.encode())
    first[-5] = "tampered"
    assert report.decode_report(b.encode()) == b
    assert report.decode_report(a.encode()) == a
    x, y = cbor.loads(a.encode()), cbor.loads(a.encode())
    assert x == y and x is not y


def test_decoding_two_envelopes_in_sequence_shares_nothing() -> None:
    one = trust.accept(VALID, POLICY)
    two = trust.accept(OTHER, trust.TrustPolicy(anchors=(OTHER_KEY.public,)))
    again = trust.accept(VALID, POLICY)
    assert one.envelope == again.envelope and one.images == again.images
    assert two.sequence_number == 6 and one.sequence_number == 5
    assert two.images[0].uri != one.images[0].uri


# -- 41 + 43. differential and mutation fuzzing ------------------------------------------

# The server validates with the authenticity-only view (as `manifest verify` does); the
# device adds its own identity and policy checks. Both are built from the same anchors
# and the device's checks are all satisfied by VALID, so any difference in decision or
# decoded values is a parser differential (ATTACKS.md #41).
SERVER = trust.TrustPolicy(anchors=(KEY.public,))
DEVICE = trust.TrustPolicy(
    anchors=(KEY.public,),
    current_sequence=4,
    max_sequence_jump=100,
    vendor_id=VENDOR,
    class_id=CLASS,
    max_image_size=1 << 20,
    allowed_components=frozenset({build.MAIN_COMPONENT}),
    allow_relative_uris=False,
    allowed_uri_prefixes=("coaps://fw.example.com/",),
)


def test_valid_envelope_passes_both_server_and_device_policies() -> None:
    assert trust.accept(VALID, SERVER).envelope == trust.accept(VALID, DEVICE).envelope


@st.composite
def mutants(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "splice", "insert", "delete"]))
        n = len(data)
        if n == 0:
            break
        at = draw(st.integers(0, n - 1))
        if kind == "flip":
            data[at] ^= draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 0xFF]))
        elif kind == "set":
            data[at] = draw(
                st.sampled_from(
                    [0x00, 0x17, 0x18, 0x1B, 0x1F, 0x40, 0x5B, 0x9F, 0xA0, 0xBF, 0xC2, 0xF9, 0xFF]
                )
            )
        elif kind == "truncate":
            del data[at:]
        elif kind == "splice":
            start = draw(st.integers(0, len(OTHER) - 1))
            piece = OTHER[start : start + draw(st.integers(1, 64))]
            data[at : at + draw(st.integers(0, 64))] = piece
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def _outcome(data: bytes, policy: trust.TrustPolicy) -> tuple[str, Any]:
    try:
        verified = trust.accept(data, policy)
    except OtaError as exc:
        return "reject", type(exc)
    return "accept", verified


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutants())
def test_server_and_device_agree_on_every_mutant(data: bytes) -> None:
    server, device = _outcome(data, SERVER), _outcome(data, DEVICE)
    assert server[0] == device[0]
    if server[0] == "reject":
        assert server[1] is device[1]
        return
    assert server[1].envelope == device[1].envelope
    assert server[1].images == device[1].images
    assert server[1].manifest_digest == device[1].manifest_digest
    # The parser alone sees the same envelope the gate vouched for.
    assert suit.decode_envelope(data) == server[1].envelope


@settings(max_examples=320, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutants())
def test_mutated_envelope_is_accepted_only_if_semantically_identical(data: bytes) -> None:
    """H5: the only outcomes are a typed OtaError or acceptance of the same manifest."""
    try:
        verified = trust.accept(data, DEVICE)
    except OtaError:
        return
    assert verified.envelope.manifest_raw == VALID_ENVELOPE.manifest_raw
    assert verified.manifest == VALID_ENVELOPE.manifest
    assert verified.manifest_digest == VALID_ENVELOPE.manifest_digest
    assert verified.images == trust.accept(VALID, DEVICE).images


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_ever_raise_manifest_errors(data: bytes) -> None:
    for name in ("cbor.loads", "suit.decode_envelope", "report.decode_report"):
        with contextlib.suppress(ManifestError):
            DECODERS[name](data)
    with pytest.raises(OtaError):
        trust.accept(data, POLICY)


def test_untagged_copy_of_the_valid_envelope_is_accepted_by_both() -> None:
    """Control for the fuzz oracle: dropping the optional tag keeps the same manifest."""
    untagged = VALID[2:]
    assert VALID[:2] == b"\xd8\x6b"
    server, device = _outcome(untagged, SERVER), _outcome(untagged, DEVICE)
    assert server[0] == device[0] == "accept"
    assert dataclasses.replace(server[1].envelope, tagged=True) == VALID_ENVELOPE


def test_sequences_built_in_code_carry_no_shared_state() -> None:
    a = CommandSequence.build(
        [Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_URI, "/a"),)))]
    )
    b = CommandSequence.build(
        [Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_URI, "/b"),)))]
    )
    assert suit.decode_sequence(a.raw, 1024) == a
    assert suit.decode_sequence(b.raw, 1024) == b
