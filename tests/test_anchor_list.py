"""core.anchor_list: the signed anchor list format and its acceptance rules (ATTACKS.md #20).

The rotation cases follow tuf-conformance `test_updater_key_rotations.py`
(`test_root_rotation`): a new list must be signed by the threshold of the trusted roots
AND the threshold of its own roots; python-tuf's `test_intermediate_root_incorrectly_
signed` (no skipping versions) and `test_max_root_rotations` (a bounded walk).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacoap.core import anchor_list, cbor, cose, ids
from otacoap.core.anchor_list import AnchorList, AnchorListError, TrustedAnchors
from otacoap.core.errors import AuthenticationError, ManifestError, OtaError, RollbackError

VENDOR = ids.vendor_id("acme.example")
CLASS = ids.class_id(VENDOR, "thermostat-t1")
OTHER_CLASS = ids.class_id(VENDOR, "soil-sensor-s3")

_KEYS = [cose.generate_key("es256") for _ in range(6)] + [
    cose.generate_key("ed25519") for _ in range(3)
]


def ck(key: cose.SigningKey) -> anchor_list.Key:
    return anchor_list.compact_key(key.public)


def trusted_of(roots: list[cose.SigningKey], threshold: int, version: int = 0) -> TrustedAnchors:
    return TrustedAnchors(version, tuple(ck(k) for k in roots), threshold, (ck(_KEYS[8]),))


def listing(
    version: int,
    roots: list[cose.SigningKey],
    threshold: int = 1,
    authors: list[cose.SigningKey] | None = None,
    klass: bytes = CLASS,
) -> AnchorList:
    return AnchorList(
        version=version,
        vendor_id=VENDOR,
        class_id=klass,
        roots=tuple(ck(k) for k in roots),
        threshold=threshold,
        authors=tuple(ck(k) for k in (authors or [_KEYS[7]])),
        freshness=(ck(_KEYS[6]),),
    )


def accept(trusted: TrustedAnchors, data: bytes) -> anchor_list.SignedAnchorList:
    return anchor_list.verify_update(trusted, data, vendor_id=VENDOR, class_id=CLASS)


# --- round trip ------------------------------------------------------------------------

key_indexes = st.lists(st.integers(0, len(_KEYS) - 1), unique=True)


@settings(max_examples=60, deadline=None)
@given(
    version=st.integers(1, anchor_list.MAX_VERSION),
    roots=key_indexes.filter(lambda x: 1 <= len(x) <= 3),
    authors=key_indexes.filter(lambda x: 1 <= len(x) <= 4),
    fresh=key_indexes.filter(lambda x: len(x) <= 2),
    data=st.data(),
)
def test_anchor_list_round_trips(
    version: int, roots: list[int], authors: list[int], fresh: list[int], data: Any
) -> None:
    threshold = data.draw(st.integers(1, len(roots)))
    contents = AnchorList(
        version,
        VENDOR,
        CLASS,
        tuple(ck(_KEYS[i]) for i in roots),
        threshold,
        tuple(ck(_KEYS[i]) for i in authors),
        tuple(ck(_KEYS[i]) for i in fresh),
    )
    signed = anchor_list.sign(contents, [_KEYS[i] for i in roots])
    parsed = anchor_list.decode_signed(signed)
    assert parsed.contents == contents
    assert cbor.dumps(cbor2.loads(signed)) == signed  # deterministic
    assert anchor_list.signers(parsed, contents.roots) == frozenset(contents.roots)
    trusted = TrustedAnchors(
        version, contents.roots, threshold, contents.authors, contents.freshness
    )
    assert TrustedAnchors.from_cbor(trusted.to_cbor()) == trusted


def test_compact_keys_name_the_same_key() -> None:
    for key in (_KEYS[0], _KEYS[7]):
        assert anchor_list.anchor_of(*ck(key)).key_id == key.public.key_id


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    with contextlib.suppress(OtaError):
        anchor_list.decode_signed(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.integers(0, 255))
def test_any_single_byte_change_is_refused(pos: int, value: int) -> None:
    good = anchor_list.sign(listing(1, [_KEYS[0]]), [_KEYS[0]])
    pos %= len(good)
    bad = bytearray(good)
    if bad[pos] == value:
        return
    bad[pos] = value
    with pytest.raises(OtaError):
        accept(trusted_of([_KEYS[0]], 1), bytes(bad))


# --- hostile structure -----------------------------------------------------------------


def _payload(**changes: Any) -> bytes:
    body: dict[int, Any] = cbor2.loads(listing(1, [_KEYS[0]]).payload())
    for k, v in changes.items():
        key = int(k[1:])
        if v is ...:
            del body[key]
        else:
            body[key] = v
    return cbor.dumps(body)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"k0": "otacoap-freshness"}, id="wrong type"),
        pytest.param({"k0": ...}, id="no type"),
        pytest.param({"k1": 0}, id="version 0"),
        pytest.param({"k1": -1}, id="negative version"),
        pytest.param({"k1": 1.0}, id="float version"),
        pytest.param({"k1": 1 << 63}, id="version 2^63"),
        pytest.param({"k2": b"\x00" * 15}, id="short vendor"),
        pytest.param({"k4": []}, id="no roots"),
        pytest.param({"k4": [[1, b"\x02" + b"\x01" * 32]] * 2}, id="duplicate root"),
        pytest.param({"k5": 0}, id="threshold 0"),
        pytest.param({"k5": 2}, id="threshold above roots"),
        pytest.param({"k6": []}, id="no authors"),
        pytest.param({"k6": [[1, b"\x04" + b"\x01" * 32]]}, id="uncompressed prefix"),
        pytest.param({"k6": [[1, b"\x02" + b"\xff" * 32]]}, id="not on the curve"),
        pytest.param({"k6": [[2, b"\x02" * 49]]}, id="P-384"),
        pytest.param({"k6": [[6, b"\x01" * 31]]}, id="short Ed25519"),
        pytest.param({"k6": [[1, b"\x02" + b"\x01" * 32, 0]]}, id="three-element key"),
        pytest.param({"k7": [[6, b"\x01" * 32]] * 3}, id="three freshness keys"),
        pytest.param({"k8": 1}, id="unknown field"),
        pytest.param({"k7": ...}, id="missing freshness field"),
    ],
)
def test_malformed_lists_are_refused(changes: dict[str, Any]) -> None:
    payload = _payload(**changes)
    signed = cbor.dumps([payload, [cose.sign1(payload, _KEYS[0])]])
    with pytest.raises(ManifestError):
        anchor_list.decode_signed(signed)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([b"x"], id="one element"),
        pytest.param([b"x", [], b"y"], id="three elements"),
        pytest.param([b"x", []], id="no signatures"),
        pytest.param(["x", [b"s"]], id="text payload"),
        pytest.param([b"x", [b"s"] * 7], id="seven signatures"),
        pytest.param({"p": b"x"}, id="map"),
    ],
)
def test_malformed_envelopes_are_refused(value: Any) -> None:
    with pytest.raises(ManifestError):
        anchor_list.decode_signed(cbor2.dumps(value))


def test_oversized_list_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestError, match="cap"):
        anchor_list.decode_signed(b"\x82" + b"\x00" * anchor_list.MAX_ANCHOR_LIST_SIZE)


def test_non_deterministic_cbor_is_refused() -> None:
    payload = listing(1, [_KEYS[0]]).payload()
    good = cbor2.dumps([payload, [cose.sign1(payload, _KEYS[0])]])
    # The same array with an indefinite-length head.
    bad = b"\x9f" + good[1:] + b"\xff"
    with pytest.raises(ManifestError):
        anchor_list.decode_signed(bad)


# --- rotation rules (tuf-conformance test_root_rotation parameter sets) -----------------

R = _KEYS  # short names for the tables below


@pytest.mark.parametrize(
    "trusted_roots,trusted_k,new_roots,new_k,signers,ok",
    [
        # same single root, signed: ok
        ([0], 1, [0], 1, [0], True),
        # root rotation 0 -> 1 signed by both: ok
        ([0], 1, [1], 1, [0, 1], True),
        # signed only by the new root: refused (the rotation of ATTACKS.md #20)
        ([0], 1, [1], 1, [1], False),
        # signed only by the old root: refused (the new roots must accept their role)
        ([0], 1, [1], 1, [0], False),
        # 2-of-3 trusted, signed by 2: ok
        ([0, 1, 2], 2, [0, 1, 2], 2, [0, 2], True),
        # 2-of-3 trusted, signed by 1: refused
        ([0, 1, 2], 2, [0, 1, 2], 2, [1], False),
        # same key signing twice counts once
        ([0, 1, 2], 2, [0, 1, 2], 2, [1, 1], False),
        # threshold raised 1 -> 2 with the same keys, signed by 1: refused by the new rule
        ([0, 1], 1, [0, 1], 2, [0], False),
        # threshold raised, signed by 2: ok
        ([0, 1], 1, [0, 1], 2, [0, 1], True),
        # one root replaced in 2-of-3 (0,1,2 -> 0,1,3): signed by 0,1 suffices for both
        ([0, 1, 2], 2, [0, 1, 3], 2, [0, 1], True),
        # replaced root set 0,1,2 -> 3,4,5 (2-of-3 each): 2 old + 2 new
        ([0, 1, 2], 2, [3, 4, 5], 2, [0, 1, 3, 4], True),
        # 1 old + 2 new: refused
        ([0, 1, 2], 2, [3, 4, 5], 2, [0, 3, 4], False),
        # mixed algorithms: ed25519 roots
        ([6, 7], 2, [6, 7], 2, [6, 7], True),
        # an unrelated key's signature counts for nothing
        ([0], 1, [0], 1, [5], False),
    ],
)
def test_root_rotation_needs_old_and_new_thresholds(
    trusted_roots: list[int],
    trusted_k: int,
    new_roots: list[int],
    new_k: int,
    signers: list[int],
    ok: bool,
) -> None:
    trusted = trusted_of([R[i] for i in trusted_roots], trusted_k)
    data = anchor_list.sign(listing(1, [R[i] for i in new_roots], new_k), [R[i] for i in signers])
    if ok:
        assert accept(trusted, data).contents.version == 1
    else:
        with pytest.raises(AnchorListError):
            accept(trusted, data)


@pytest.mark.parametrize(
    "version,error",
    [(0, RollbackError), (1, RollbackError), (3, RollbackError), (4, None)],
)
def test_version_must_be_exactly_the_next(version: int, error: type[Exception] | None) -> None:
    trusted = trusted_of([R[0]], 1, version=3)
    data = anchor_list.sign(listing(version or 1, [R[0]]), [R[0]])
    if version == 0:  # below any list: also refused
        data = anchor_list.sign(listing(1, [R[0]]), [R[0]])
    if error is None:
        assert accept(trusted, data).contents.version == 4
    else:
        with pytest.raises(error):
            accept(trusted, data)


def test_list_for_another_class_is_refused() -> None:
    data = anchor_list.sign(listing(1, [R[0]], klass=OTHER_CLASS), [R[0]])
    with pytest.raises(AuthenticationError, match="another vendor or class"):
        accept(trusted_of([R[0]], 1), data)


def test_signature_over_other_payload_is_refused() -> None:
    """A signature is over the exact payload: transplanting one onto another list fails."""
    a = listing(1, [R[0]], authors=[R[7]])
    b = listing(1, [R[0]], authors=[R[5]])
    sig_a = cbor2.loads(anchor_list.sign(a, [R[0]]))[1]
    forged = cbor.dumps([b.payload(), sig_a])
    with pytest.raises(AnchorListError):
        accept(trusted_of([R[0]], 1), forged)


def test_a_manifest_signature_does_not_sign_a_list() -> None:
    """Domain separation: the list type field means no other signed payload is a list."""
    payload = cbor.dumps([-16, b"\x00" * 32])  # a SUIT_Digest, what author keys sign
    data = cbor.dumps([payload, [cose.sign1(payload, R[0])]])
    with pytest.raises(ManifestError):
        accept(trusted_of([R[0]], 1), data)


def test_chain_walk_applies_each_version_in_turn() -> None:
    """1 -> 2 -> 3 with a root change at each step, as a device walks /a."""
    trusted = trusted_of([R[0]], 1)
    chain = [
        anchor_list.sign(listing(1, [R[1]]), [R[0], R[1]]),
        anchor_list.sign(listing(2, [R[2]]), [R[1], R[2]]),
        anchor_list.sign(listing(3, [R[2]], authors=[R[5]]), [R[2]]),
    ]
    for data in chain:
        trusted = anchor_list.successor(trusted, accept(trusted, data), None)
    assert trusted.version == 3 and trusted.authors == (ck(R[5]),)
    # The first root is gone: it cannot sign version 4 any more.
    with pytest.raises(AnchorListError):
        accept(trusted, anchor_list.sign(listing(4, [R[0]]), [R[0]]))


def test_successor_keeps_the_running_images_signer_as_grace_only() -> None:
    trusted = TrustedAnchors(0, (ck(R[0]),), 1, (ck(R[7]),))
    signed = accept(trusted, anchor_list.sign(listing(1, [R[0]], authors=[R[5]]), [R[0]]))
    new = anchor_list.successor(trusted, signed, ck(R[7]))
    assert new.grace == ck(R[7])
    assert [a.key_id for a in new.author_anchors()] == [R[5].public.key_id]
    assert {a.key_id for a in new.boot_anchors()} == {R[5].public.key_id, R[7].public.key_id}
    # A signer the new list keeps needs no grace.
    assert anchor_list.successor(trusted, signed, ck(R[5])).grace is None


def test_worst_case_trusted_anchors_is_the_largest_encoding() -> None:
    worst = len(cbor.dumps(TrustedAnchors.worst_case().to_cbor()))
    for roots, authors in itertools.product(range(1, 4), range(1, 5)):
        t = TrustedAnchors(
            anchor_list.MAX_VERSION,
            tuple(ck(R[i]) for i in range(roots)),
            roots,
            tuple(ck(R[i]) for i in range(authors)),
            (ck(R[4]), ck(R[5])),
            ck(R[0]),
            3,
        )
        assert len(cbor.dumps(t.to_cbor())) <= worst


def test_too_many_signers_cannot_be_issued() -> None:
    with pytest.raises(ManifestError):
        anchor_list.sign(listing(1, [R[0]]), [R[0]] * 7)
