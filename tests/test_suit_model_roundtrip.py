"""The SUIT model round-trips: bytes -> values -> the same bytes, values -> bytes -> values.

Digests and signatures cover exact bytes (manifest-34 §8.3), so decode -> encode must be
byte-exact for every real envelope, and a model built in code must come back equal after
encoding. Signing with each supported key type must verify through the trust gate, and
only under the key that signed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from conftest import ALL_VECTORS, Vector
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacoap.core import build, cbor, cose, ids, suit, trust
from otacoap.core.build import Release
from otacoap.core.errors import AuthenticationError, ManifestError
from otacoap.core.suit import Command, CommandSequence, Parameters, SuitDigest

DECODABLE = [
    v.name for v in ALL_VECTORS if not v.name.startswith("legacy-d18_ex") or v.should_accept
]
LEGACY = [v.name for v in ALL_VECTORS if v.name not in DECODABLE]
U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
MAX = cbor.DEFAULT_MAX_SIZE

ES256_KEY = cose.generate_key("es256")
ED25519_KEY = cose.generate_key("ed25519")
OTHER_KEY = cose.generate_key("es256")


@pytest.fixture(scope="module")
def by_name(vectors: list[Vector]) -> dict[str, Vector]:
    return {v.name: v for v in vectors}


# -- real envelopes ----------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODABLE)
def test_decode_then_encode_is_byte_exact(name: str, by_name: dict[str, Vector]) -> None:
    data = by_name[name].data
    envelope = suit.decode_envelope(data)
    assert suit.encode_envelope(envelope) == data
    assert suit.decode_envelope(suit.encode_envelope(envelope)) == envelope
    assert envelope.tagged is (by_name[name].expected["outer_tag"] == 107)


@pytest.mark.parametrize("name", DECODABLE)
def test_decoded_manifest_keeps_the_signed_bytes(name: str, by_name: dict[str, Vector]) -> None:
    vector = by_name[name]
    envelope = suit.decode_envelope(vector.data)
    digest = envelope.manifest_digest
    assert digest.value.hex() == vector.expected["manifest_digest"]["digest-bytes"]
    assert envelope.authentication.digest == digest
    # Every vector's manifest is canonical, so the model re-encodes to the signed bytes.
    assert suit.encode_manifest(envelope.manifest) == envelope.manifest_raw
    assert suit.decode_manifest(envelope.manifest_raw) == envelope.manifest


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_numbering_is_not_decoded_as_current(name: str, by_name: dict[str, Vector]) -> None:
    with pytest.raises(ManifestError):
        suit.decode_envelope(by_name[name].data)


def test_every_vector_is_covered(vectors: list[Vector]) -> None:
    assert len(DECODABLE) + len(LEGACY) == len(vectors)
    assert len(LEGACY) == 7


# -- Release -> envelope -> bytes -> envelope --------------------------------------------

component_ids = st.lists(st.binary(max_size=8), min_size=1, max_size=4).map(tuple)


# Path text `build.check_release_names` lets through: printable, no whitespace.
_path_text = st.text(max_size=40).filter(
    lambda s: s.isprintable() and not any(c.isspace() for c in s)
)
# URIs the default trust policy accepts: absolute, or server-relative ("/...").
acceptable_uris = (
    st.none()
    | _path_text.map(lambda s: "/" + s)
    | _path_text.map(lambda s: "coaps://fw.example.com/" + s)
)
# Vendor domains the builder accepts (RFC 1035 labels; other names are refused before
# anything is built: tests/test_operator_rough_edges.py).
_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
domains = st.lists(_label, min_size=1, max_size=3).map(".".join)


@st.composite
def releases(draw: st.DrawFn, uris: st.SearchStrategy[str | None] | None = None) -> Release:
    return Release(
        image_digest=draw(st.binary(min_size=32, max_size=32)),
        image_size=draw(st.integers(min_value=1, max_value=(1 << 64) - 1)),
        vendor_domain=draw(domains),
        class_info=draw(st.text(min_size=1, max_size=30)),
        sequence_number=draw(U64),
        uri=draw(uris if uris is not None else acceptable_uris),
        component=draw(st.just(build.MAIN_COMPONENT) | component_ids),
    )


@settings(max_examples=80, deadline=None)
@given(releases())
def test_built_envelope_round_trips(release: Release) -> None:
    envelope = build.build_envelope(release)
    data = suit.encode_envelope(envelope)
    decoded = suit.decode_envelope(data)
    assert decoded == envelope
    assert suit.encode_envelope(decoded) == data
    manifest = decoded.manifest
    assert manifest.sequence_number == release.sequence_number
    assert manifest.common.components == (release.component,)
    shared = manifest.common.shared_sequence
    assert shared is not None
    params = shared.commands[0].arg
    assert params.get(suit.P_VENDOR_ID) == ids.vendor_id(release.vendor_domain)
    assert params.get(suit.P_IMAGE_DIGEST) == SuitDigest(suit.DIGEST_SHA256, release.image_digest)
    assert params.get(suit.P_IMAGE_SIZE) == release.image_size


@settings(max_examples=40, deadline=None)
@given(releases(acceptable_uris), st.sampled_from(["es256", "esp256", "ed25519"]))
def test_signed_release_is_accepted_with_the_values_it_was_built_from(
    release: Release, alg: str
) -> None:
    key = ED25519_KEY if alg == "ed25519" else ES256_KEY
    envelope = build.build_envelope(release, key, cose.ESP256 if alg == "esp256" else None)
    data = suit.encode_envelope(envelope)
    verified = trust.accept(data, trust.TrustPolicy(anchors=(OTHER_KEY.public, key.public)))
    assert verified.signer == key.public.key_id
    assert verified.envelope == envelope
    assert verified.sequence_number == release.sequence_number
    uri = release.uri if release.uri is not None else ids.image_uri(release.image_digest)
    assert verified.images == (
        trust.ImageInfo(
            0, SuitDigest(suit.DIGEST_SHA256, release.image_digest), release.image_size, uri
        ),
    )
    vendor = ids.vendor_id(release.vendor_domain)
    assert verified.vendor_ids == (vendor,)
    assert verified.class_ids == (ids.class_id(vendor, release.class_info),)


@pytest.mark.parametrize(
    ("kind", "alg"), [("es256", None), ("es256", cose.ESP256), ("ed25519", None)]
)
def test_signature_by_one_key_is_rejected_under_a_policy_with_another(
    kind: str, alg: int | None
) -> None:
    signer = cose.generate_key(kind)
    release = Release(hashlib.sha256(b"fw").digest(), 2, "example.com", "board", 1)
    data = suit.encode_envelope(build.build_envelope(release, signer, alg))
    assert (
        trust.accept(data, trust.TrustPolicy(anchors=(signer.public,))).signer
        == signer.public.key_id
    )
    others = (cose.generate_key("es256").public, cose.generate_key("ed25519").public)
    with pytest.raises(AuthenticationError):
        trust.accept(data, trust.TrustPolicy(anchors=others))


def test_two_signatures_each_verify_alone() -> None:
    release = Release(hashlib.sha256(b"fw").digest(), 2, "example.com", "board", 9)
    envelope = build.sign_envelope(build.build_envelope(release, ES256_KEY), ED25519_KEY)
    data = suit.encode_envelope(envelope)
    assert len(suit.decode_envelope(data).authentication.blocks) == 2
    for key in (ES256_KEY, ED25519_KEY):
        verified = trust.accept(data, trust.TrustPolicy(anchors=(key.public,)))
        assert verified.signer == key.public.key_id


def test_build_refuses_sequence_numbers_outside_uint64_and_empty_images() -> None:
    digest = hashlib.sha256(b"fw").digest()
    for seq in (-1, 1 << 64):
        with pytest.raises(ValueError):
            build.build_manifest(Release(digest, 1, "example.com", "board", seq))
    with pytest.raises(ValueError):
        build.build_manifest(Release(digest, 0, "example.com", "board", 1))


def test_build_refuses_an_image_size_outside_uint64() -> None:
    release = Release(hashlib.sha256(b"fw").digest(), 1 << 64, "example.com", "board", 1)
    with pytest.raises(ValueError):
        build.build_manifest(release)


# -- command sequences and parameters built in code ---------------------------------------

CONDITIONS = [1, 2, 3, 4, 5, 6, 7, 8, 14, 24, 25, 26, 27, 28]
SIMPLE_DIRECTIVES = [11, 18, 21, 22, 23, 29, 31, 33]

_PARAM_VALUES: dict[int, st.SearchStrategy[Any]] = {
    suit.P_VENDOR_ID: st.binary(min_size=16, max_size=16),
    suit.P_CLASS_ID: st.binary(min_size=16, max_size=16),
    suit.P_DEVICE_ID: st.binary(min_size=16, max_size=16),
    suit.P_IMAGE_DIGEST: st.builds(
        SuitDigest, st.sampled_from([-16, -43, -44]), st.binary(min_size=32, max_size=64)
    ),
    suit.P_USE_BEFORE: U64,
    suit.P_COMPONENT_SLOT: U64,
    suit.P_STRICT_ORDER: st.booleans(),
    suit.P_SOFT_FAILURE: st.booleans(),
    suit.P_IMAGE_SIZE: U64,
    suit.P_CONTENT: st.binary(max_size=20),
    suit.P_ENCRYPTION_INFO: st.binary(max_size=20),
    suit.P_URI: st.text(max_size=30),
    suit.P_SOURCE_COMPONENT: U64,
    suit.P_INVOKE_ARGS: st.binary(max_size=20),
    suit.P_FETCH_ARGUMENTS: st.binary(max_size=20),
    suit.P_MINIMUM_BATTERY: U64,
    suit.P_UPDATE_PRIORITY: st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    suit.P_VERSION: st.binary(max_size=10),
    suit.P_WAIT_INFO: st.binary(max_size=10),
    suit.P_COMPONENT_METADATA: st.binary(max_size=10),
}
_CUSTOM_VALUE = (
    st.integers(-1000, 1000) | st.booleans() | st.text(max_size=10) | st.binary(max_size=10)
)


@st.composite
def parameters(draw: st.DrawFn) -> Parameters:
    keys = draw(st.sets(st.sampled_from(sorted(_PARAM_VALUES)), max_size=6))
    custom = draw(st.sets(st.integers(min_value=-1000, max_value=-1), max_size=2))
    if not keys and not custom:
        keys = {suit.P_URI}
    items = [(k, draw(_PARAM_VALUES[k])) for k in keys]
    items += [(k, draw(_CUSTOM_VALUE)) for k in custom]
    # Deterministic CBOR orders map keys by their encoding (RFC 8949 §4.2.1); a decoded
    # Parameters keeps that order, so build it in that order too.
    items.sort(key=lambda kv: (len(cbor.dumps(kv[0])), cbor.dumps(kv[0])))
    return Parameters(tuple(items))


def _leaf_commands() -> st.SearchStrategy[Command]:
    return st.one_of(
        st.builds(Command, st.sampled_from(CONDITIONS + SIMPLE_DIRECTIVES), st.integers(0, 15)),
        st.builds(
            Command,
            st.just(suit.CMD_SET_COMPONENT_INDEX),
            st.just(True)
            | st.integers(0, 15)
            | st.lists(st.integers(0, 15), min_size=1, max_size=4).map(tuple),
        ),
        st.builds(Command, st.sampled_from([19, 20]), parameters()),
        st.builds(
            Command,
            st.just(suit.CMD_OVERRIDE_MULTIPLE),
            st.dictionaries(
                st.integers(0, 4),
                st.dictionaries(st.integers(1, 30), st.integers(0, 9), min_size=1),
                min_size=1,
                max_size=2,
            ),
        ),
        st.builds(
            Command,
            st.just(suit.CMD_COPY_PARAMS),
            st.dictionaries(
                st.integers(0, 4),
                st.lists(st.integers(-30, 30), min_size=1, max_size=3),
                min_size=1,
                max_size=2,
            ),
        ),
        st.builds(
            Command,
            st.integers(-1000, -257),
            st.none()
            | st.integers(-(1 << 63), (1 << 64) - 1)
            | st.text(max_size=5)
            | st.binary(max_size=5),
        ),
    )


def _sequences(commands: st.SearchStrategy[Command]) -> st.SearchStrategy[CommandSequence]:
    return st.lists(commands, min_size=1, max_size=5).map(CommandSequence.build)


command_sequences = st.recursive(
    _sequences(_leaf_commands()),
    lambda inner: _sequences(
        st.one_of(
            _leaf_commands(),
            st.builds(Command, st.just(suit.CMD_RUN_SEQUENCE), inner),
            st.builds(
                Command,
                st.just(suit.CMD_TRY_EACH),
                st.tuples(st.lists(inner, min_size=2, max_size=3), st.booleans()).map(
                    lambda t: (*t[0], None) if t[1] else tuple(t[0])
                ),
            ),
        )
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_sequences)
def test_command_sequence_built_in_code_round_trips(seq: CommandSequence) -> None:
    decoded = suit.decode_sequence(seq.raw, MAX)
    assert decoded == seq
    assert decoded.raw == seq.raw
    assert CommandSequence.build(list(decoded.commands)).raw == seq.raw


@settings(max_examples=150, deadline=None)
@given(parameters())
def test_parameters_built_in_code_round_trip(params: Parameters) -> None:
    raw = cbor.dumps(params.to_cbor())
    assert suit.decode_parameters(cbor.loads(raw), MAX) == params


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_sequences, command_sequences, U64)
def test_manifest_built_from_random_sequences_round_trips_signed(
    install: CommandSequence, validate: CommandSequence, seq: int
) -> None:
    common = suit.Common(((b"\x00",), (b"\x01",)), validate)
    manifest = suit.Manifest(
        1, seq, common, ((suit.M_VALIDATE, validate), (suit.M_INSTALL, install))
    )
    envelope = build.sign_envelope(suit.make_envelope(manifest), ED25519_KEY)
    data = suit.encode_envelope(envelope)
    decoded = suit.decode_envelope(data)
    assert decoded.manifest == manifest
    assert suit.encode_envelope(decoded) == data
    assert trust.accept(data, trust.TrustPolicy(anchors=(ED25519_KEY.public,))).manifest == manifest
