"""ATTACKS.md manifest cases against the trust gate, with real keys and real signatures.

Cases 1, 2, 3, 4, 5, 7, 9, 11/13, 16 and 17. Every envelope here is built with
otacoap.core.build / cose / suit, or by hand with cbor2 where the library would refuse
to produce the malformed structure, and signed for real, so each test isolates exactly
one fault: the control tests show the same construction is accepted without it.
Each refusal must be the specific OtaError subclass with the right SUIT report reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cbor2 import CBORTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from otacoap.core import build, cbor, cose, ids, suit, trust
from otacoap.core.build import Release
from otacoap.core.errors import (
    AlgorithmError,
    AlreadyInstalled,
    AuthenticationError,
    IncompatibleError,
    ManifestError,
    OtaError,
    PolicyError,
    ReportReason,
    RollbackError,
    SeveredElementError,
)
from otacoap.core.suit import Command, CommandSequence, Parameters, SuitDigest

VENDOR_DOMAIN = "example.com"
CLASS_INFO = "thermostat-v2"
VENDOR = ids.vendor_id(VENDOR_DOMAIN)
CLASS = ids.class_id(VENDOR, CLASS_INFO)
IMAGE_DIGEST = hashlib.sha256(b"firmware 1.2.0").digest()
IMAGE_SIZE = 4096
GOOD_URI = "coaps://fw.example.com/fw/0123456789abcdef"
EVIL_URI = "coaps://evil.example.net/fw/0123456789abcdef"
SLOT = 64 * 1024
MAIN = (b"\x00",)

KEY = cose.generate_key("es256")
ED_KEY = cose.generate_key("ed25519")
OTHER_KEY = cose.generate_key("es256")
ATTACKER = cose.generate_key("es256")
HMAC_SECRET = b"k" * 32

# The manifest-verify view: authenticity only.
SERVER_POLICY = trust.TrustPolicy(anchors=(KEY.public, ED_KEY.public))
# A device: every check on, each satisfied by the good manifest below.
DEVICE_POLICY = trust.TrustPolicy(
    anchors=(KEY.public,),
    current_sequence=10,
    max_sequence_jump=1000,
    vendor_id=VENDOR,
    class_id=CLASS,
    max_image_size=SLOT,
    max_components=1,
    allowed_components=frozenset({MAIN}),
    allow_relative_uris=False,
    allowed_uri_prefixes=("coaps://fw.example.com/",),
)


# -- building blocks ---------------------------------------------------------------------


def shared_commands(
    *,
    vendor: bytes | None = VENDOR,
    klass: bytes | None = CLASS,
    size: Any = IMAGE_SIZE,
    digest: bytes = IMAGE_DIGEST,
    extra: tuple[tuple[int, Any], ...] = (),
) -> list[Command]:
    params: list[tuple[int, Any]] = []
    if vendor is not None:
        params.append((suit.P_VENDOR_ID, vendor))
    if klass is not None:
        params.append((suit.P_CLASS_ID, klass))
    params.append((suit.P_IMAGE_DIGEST, SuitDigest(suit.DIGEST_SHA256, digest)))
    if size is not None:
        params.append((suit.P_IMAGE_SIZE, size))
    params.extend(extra)
    commands = [Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(tuple(params)))]
    if vendor is not None:
        commands.append(Command(suit.CMD_VENDOR_IDENTIFIER, 15))
    if klass is not None:
        commands.append(Command(suit.CMD_CLASS_IDENTIFIER, 15))
    return commands


def fetch_commands(uri: str = GOOD_URI) -> list[Command]:
    return [
        Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_URI, uri),))),
        Command(suit.CMD_FETCH, 2),
        Command(suit.CMD_IMAGE_MATCH, 15),
    ]


def make_manifest(
    *,
    seq: Any = 11,
    shared: list[Command] | None = None,
    install: list[Command] | None = None,
    components: tuple[tuple[bytes, ...], ...] = (MAIN,),
) -> suit.Manifest:
    """build.build_manifest's shape, without its input checks, so bad values get signed."""
    common = suit.Common(
        components, CommandSequence.build(shared if shared is not None else shared_commands())
    )
    install_seq = CommandSequence.build(install if install is not None else fetch_commands())
    validate = CommandSequence.build([Command(suit.CMD_IMAGE_MATCH, 15)])
    return suit.Manifest(
        1, seq, common, ((suit.M_VALIDATE, validate), (suit.M_INSTALL, install_seq))
    )


def signed(manifest: suit.Manifest, key: cose.SigningKey = KEY, **envelope: Any) -> bytes:
    return suit.encode_envelope(build.sign_envelope(suit.make_envelope(manifest, **envelope), key))


def release(**overrides: Any) -> Release:
    base: dict[str, Any] = {
        "image_digest": IMAGE_DIGEST,
        "image_size": IMAGE_SIZE,
        "vendor_domain": VENDOR_DOMAIN,
        "class_info": CLASS_INFO,
        "sequence_number": 11,
        "uri": GOOD_URI,
    }
    base.update(overrides)
    return Release(**base)


def signed_release(key: cose.SigningKey = KEY, **overrides: Any) -> bytes:
    return suit.encode_envelope(build.build_envelope(release(**overrides), key))


def envelope_bytes(digest_raw: bytes, blocks: list[bytes], manifest_raw: bytes) -> bytes:
    body = {suit.ENV_AUTH: cbor.dumps([digest_raw, *blocks]), suit.ENV_MANIFEST: manifest_raw}
    return cbor.dumps(CBORTag(suit.ENVELOPE_TAG, body))


def sign_raw_manifest(manifest_raw: bytes, key: cose.SigningKey = KEY) -> bytes:
    """A correctly signed envelope around arbitrary manifest bytes."""
    digest_raw = SuitDigest.of(cbor.bstr_wrap(manifest_raw)).encode()
    return envelope_bytes(digest_raw, [cose.sign1(digest_raw, key)], manifest_raw)


def raw_signature(key: cose.SigningKey, message: bytes) -> bytes:
    """Sign like COSE does (ECDSA as raw r||s, RFC 9053 §2.1), without otacoap.core.cose."""
    private = serialization.load_pem_private_key(key.pem, password=None)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign(message)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(private.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


COMPUTE = object()


def cose_block(
    digest_raw: bytes,
    *,
    key: cose.SigningKey = KEY,
    protected: dict[Any, Any] | bytes | None = None,
    unprotected: Any = None,
    payload: Any = None,
    signature: Any = COMPUTE,
    tag: int | None = cose.TAG_SIGN1,
    context: str = "Signature1",
    external_aad: bytes = b"",
    signed_payload: bytes | None = None,
    mac_key: bytes | None = None,
    body: list[Any] | None = None,
) -> bytes:
    """A COSE_Sign1 / COSE_Mac0 block put together by hand (RFC 9052 §4.2, §4.4, §6.2)."""
    if protected is None:
        protected = {cose.H_ALG: cose.ES256}
    protected_raw = protected if isinstance(protected, bytes) else cbor.dumps(protected)
    if signature is COMPUTE:
        tbs = cbor2.dumps(
            [
                context,
                protected_raw,
                external_aad,
                digest_raw if signed_payload is None else signed_payload,
            ]
        )
        if mac_key is not None:
            signature = hmac.new(mac_key, tbs, hashlib.sha256).digest()
        else:
            signature = raw_signature(key, tbs)
    item: Any = body if body is not None else [protected_raw, unprotected or {}, payload, signature]
    return cbor2.dumps(item if tag is None else CBORTag(tag, item))


BASE = suit.make_envelope(make_manifest())
DIGEST_RAW = BASE.authentication.digest_raw
MANIFEST_RAW = BASE.manifest_raw


def with_blocks(*blocks: bytes) -> bytes:
    return envelope_bytes(DIGEST_RAW, list(blocks), MANIFEST_RAW)


def refused(data: bytes, policy: trust.TrustPolicy) -> OtaError:
    with pytest.raises(OtaError) as info:
        trust.accept(data, policy)
    error = info.value
    assert "\n" not in str(error)
    return error


def assert_refused(
    data: bytes, policy: trust.TrustPolicy, error_type: type[OtaError], reason: ReportReason
) -> OtaError:
    error = refused(data, policy)
    assert type(error) is error_type, f"{type(error).__name__}: {error}"
    assert error.reason is reason
    return error


# -- controls: the constructions themselves are sound ------------------------------------


def test_good_manifest_passes_every_device_check() -> None:
    verified = trust.accept(signed(make_manifest()), DEVICE_POLICY)
    assert verified.sequence_number == 11
    assert verified.images == (
        trust.ImageInfo(0, SuitDigest(suit.DIGEST_SHA256, IMAGE_DIGEST), IMAGE_SIZE, GOOD_URI),
    )


def test_built_release_passes_every_device_check() -> None:
    assert trust.accept(signed_release(), DEVICE_POLICY).signer == KEY.public.key_id


def test_hand_built_sign1_block_is_accepted() -> None:
    assert (
        trust.accept(with_blocks(cose_block(DIGEST_RAW)), DEVICE_POLICY).signer == KEY.public.key_id
    )


def test_hand_built_eddsa_block_is_accepted() -> None:
    block = cose_block(DIGEST_RAW, key=ED_KEY, protected={cose.H_ALG: cose.EDDSA})
    assert trust.accept(with_blocks(block), SERVER_POLICY).signer == ED_KEY.public.key_id


def test_hand_built_mac0_block_is_accepted_under_its_hmac_key() -> None:
    block = cose_block(
        DIGEST_RAW,
        protected={cose.H_ALG: cose.HMAC_256_256},
        tag=cose.TAG_MAC0,
        context="MAC0",
        mac_key=HMAC_SECRET,
    )
    policy = trust.TrustPolicy(anchors=(cose.hmac_anchor(HMAC_SECRET),))
    assert trust.accept(with_blocks(block), policy).signer.startswith("hmac-")


def test_empty_trust_anchor_set_is_an_error_at_construction() -> None:
    with pytest.raises(AuthenticationError):
        trust.TrustPolicy(anchors=())


# -- 1. untrusted key --------------------------------------------------------------------


def test_1_manifest_signed_by_an_untrusted_key_is_refused() -> None:
    data = signed(make_manifest(), ATTACKER)
    assert_refused(data, DEVICE_POLICY, AuthenticationError, ReportReason.UNAUTHORISED)
    assert_refused(data, SERVER_POLICY, AuthenticationError, ReportReason.UNAUTHORISED)


def test_1_untrusted_eddsa_signature_is_refused() -> None:
    data = signed(make_manifest(), cose.generate_key("ed25519"))
    assert_refused(data, SERVER_POLICY, AuthenticationError, ReportReason.UNAUTHORISED)


# -- 2. missing, empty or algorithm-confused signatures ----------------------------------

ALG = AlgorithmError, ReportReason.ALG_UNSUPPORTED
AUTH = AuthenticationError, ReportReason.UNAUTHORISED

MALFORMED_BLOCKS: dict[str, tuple[Callable[[], bytes], tuple[type[OtaError], ReportReason]]] = {
    "no-block": (lambda: with_blocks(), AUTH),
    "empty-block-bstr": (lambda: with_blocks(b""), ALG),
    "block-not-cbor": (lambda: with_blocks(b"\xff\x00"), ALG),
    "empty-signature": (lambda: with_blocks(cose_block(DIGEST_RAW, signature=b"")), ALG),
    "signature-nil": (lambda: with_blocks(cose_block(DIGEST_RAW, signature=None)), ALG),
    "alg-only-in-unprotected": (
        lambda: with_blocks(
            cose_block(DIGEST_RAW, protected=b"", unprotected={cose.H_ALG: cose.ES256})
        ),
        ALG,
    ),
    "alg-in-both-headers": (
        lambda: with_blocks(cose_block(DIGEST_RAW, unprotected={cose.H_ALG: cose.ES256})),
        ALG,
    ),
    "no-alg-at-all": (
        lambda: with_blocks(cose_block(DIGEST_RAW, protected={cose.H_KID: b"k"})),
        ALG,
    ),
    "unknown-crit-protected": (
        lambda: with_blocks(cose_block(DIGEST_RAW, protected={1: -7, 2: [-70000], -70000: 1})),
        ALG,
    ),
    "crit-unprotected": (lambda: with_blocks(cose_block(DIGEST_RAW, unprotected={2: [4]})), ALG),
    "hmac-alg-in-sign1": (
        lambda: with_blocks(
            cose_block(DIGEST_RAW, protected={1: cose.HMAC_256_256}, mac_key=HMAC_SECRET)
        ),
        ALG,
    ),
    "es384-alg": (lambda: with_blocks(cose_block(DIGEST_RAW, protected={1: -35})), ALG),
    "alg-as-text": (lambda: with_blocks(cose_block(DIGEST_RAW, protected={1: "ES256"})), ALG),
    "eddsa-alg-in-mac0": (
        lambda: with_blocks(cose_block(DIGEST_RAW, protected={1: cose.EDDSA}, tag=cose.TAG_MAC0)),
        ALG,
    ),
    "attached-payload": (lambda: with_blocks(cose_block(DIGEST_RAW, payload=DIGEST_RAW)), ALG),
    "untagged-sign1": (lambda: with_blocks(cose_block(DIGEST_RAW, tag=None)), ALG),
    "cose-encrypt0-tag": (lambda: with_blocks(cose_block(DIGEST_RAW, tag=16)), ALG),
    "cose-sign-multi-signer": (
        lambda: with_blocks(
            cose_block(
                DIGEST_RAW,
                tag=cose.TAG_SIGN,
                body=[b"", {}, None, [[cbor.dumps({1: -7}), {}, b"\x00" * 64]]],
            )
        ),
        ALG,
    ),
    "cose-mac-multi-recipient": (
        lambda: with_blocks(
            cose_block(
                DIGEST_RAW, tag=cose.TAG_MAC, body=[cbor.dumps({1: 5}), {}, None, b"\x00" * 32, []]
            )
        ),
        ALG,
    ),
    "three-element-array": (
        lambda: with_blocks(cose_block(DIGEST_RAW, body=[cbor.dumps({1: -7}), {}, None])),
        ALG,
    ),
    "protected-not-a-map": (
        lambda: with_blocks(cose_block(DIGEST_RAW, protected=cbor.dumps([1, -7]))),
        ALG,
    ),
    "protected-duplicate-alg": (
        lambda: with_blocks(cose_block(DIGEST_RAW, protected=b"\xa2\x01\x26\x01\x26")),
        ALG,
    ),
    "unprotected-not-a-map": (lambda: with_blocks(cose_block(DIGEST_RAW, unprotected=[1])), ALG),
    "untrusted-key": (lambda: with_blocks(cose_block(DIGEST_RAW, key=ATTACKER)), AUTH),
    "payload-wrapped-twice": (
        lambda: with_blocks(cose_block(DIGEST_RAW, signed_payload=cbor.bstr_wrap(DIGEST_RAW))),
        AUTH,
    ),
    "nonempty-external-aad": (lambda: with_blocks(cose_block(DIGEST_RAW, external_aad=b"x")), AUTH),
    "wrong-context-string": (
        lambda: with_blocks(cose_block(DIGEST_RAW, context="Signature")),
        AUTH,
    ),
    "truncated-signature": (
        lambda: with_blocks(
            cose_block(DIGEST_RAW, signature=cbor2.loads(cose_block(DIGEST_RAW)).value[3][:-1])
        ),
        AUTH,
    ),
    "zero-signature": (lambda: with_blocks(cose_block(DIGEST_RAW, signature=b"\x00" * 64)), AUTH),
    "mac0-with-untrusted-hmac-key": (
        lambda: with_blocks(
            cose_block(
                DIGEST_RAW, protected={1: 5}, tag=cose.TAG_MAC0, context="MAC0", mac_key=HMAC_SECRET
            )
        ),
        AUTH,
    ),
    "mac0-keyed-with-the-trusted-public-key": (
        lambda: with_blocks(
            cose_block(
                DIGEST_RAW,
                protected={1: 5},
                tag=cose.TAG_MAC0,
                context="MAC0",
                mac_key=KEY.public.material,
            )
        ),
        AUTH,
    ),
    "eddsa-signature-labelled-es256": (
        lambda: with_blocks(cose_block(DIGEST_RAW, key=ED_KEY, protected={1: cose.ES256})),
        AUTH,
    ),
    "es256-signature-labelled-eddsa": (
        lambda: with_blocks(cose_block(DIGEST_RAW, key=KEY, protected={1: cose.EDDSA})),
        AUTH,
    ),
    "attacker-with-kid-of-trusted-key": (
        lambda: with_blocks(
            cose_block(
                DIGEST_RAW, key=ATTACKER, unprotected={cose.H_KID: KEY.public.key_id.encode()}
            )
        ),
        AUTH,
    ),
    "signature-over-another-digest": (
        lambda: with_blocks(
            cose_block(DIGEST_RAW, signed_payload=SuitDigest.of(b"other").encode())
        ),
        AUTH,
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BLOCKS))
def test_2_malformed_or_confused_cose_block_is_refused(case: str) -> None:
    make, (error_type, reason) = MALFORMED_BLOCKS[case]
    assert_refused(make(), SERVER_POLICY, error_type, reason)


@pytest.mark.parametrize("where", ["unprotected", "protected"])
def test_2_kid_naming_another_key_does_not_steer_verification(where: str) -> None:
    """The anchors are tried; the kid is never used to pick (or to refuse) a key."""
    kid = {cose.H_KID: OTHER_KEY.public.key_id.encode()}
    protected = {cose.H_ALG: cose.ES256, **kid} if where == "protected" else None
    block = cose_block(
        DIGEST_RAW, protected=protected, unprotected=kid if where == "unprotected" else None
    )
    policy = trust.TrustPolicy(anchors=(OTHER_KEY.public, KEY.public))
    assert trust.accept(with_blocks(block), policy).signer == KEY.public.key_id
    # ...and a kid naming the trusted key cannot make another key's signature count.
    assert_refused(with_blocks(block), trust.TrustPolicy(anchors=(OTHER_KEY.public,)), *AUTH)


def test_2_mac0_is_refused_when_the_device_expects_signatures() -> None:
    block = cose_block(
        DIGEST_RAW, protected={1: 5}, tag=cose.TAG_MAC0, context="MAC0", mac_key=HMAC_SECRET
    )
    assert_refused(with_blocks(block), DEVICE_POLICY, *AUTH)


# -- 3. signature transplant / envelope mix ----------------------------------------------


def _x_and_y() -> tuple[suit.Envelope, suit.Envelope]:
    x = build.sign_envelope(suit.make_envelope(make_manifest(seq=11)), KEY)
    y = build.sign_envelope(
        suit.make_envelope(make_manifest(seq=12, install=fetch_commands(EVIL_URI))), ATTACKER
    )
    return x, y


def test_3_signature_of_manifest_x_on_manifest_y_is_refused() -> None:
    x, y = _x_and_y()
    data = envelope_bytes(
        y.authentication.digest_raw, [x.authentication.blocks[0].raw], y.manifest_raw
    )
    assert_refused(data, SERVER_POLICY, *AUTH)


def test_3_whole_auth_wrapper_of_x_with_manifest_y_is_refused() -> None:
    x, y = _x_and_y()
    data = envelope_bytes(
        x.authentication.digest_raw, [b.raw for b in x.authentication.blocks], y.manifest_raw
    )
    error = assert_refused(data, SERVER_POLICY, *AUTH)
    assert "digest" in str(error)


def test_3_byte_splice_of_manifest_y_into_envelope_x_is_refused() -> None:
    x, y = _x_and_y()
    x_bytes, y_bytes = suit.encode_envelope(x), suit.encode_envelope(y)
    x_item, y_item = cbor.bstr_wrap(x.manifest_raw), cbor.bstr_wrap(y.manifest_raw)
    assert x_bytes.count(x_item) == 1 and y_item in y_bytes
    spliced = x_bytes.replace(x_item, y_item)
    assert suit.decode_envelope(spliced).manifest.sequence_number == 12  # well-formed
    assert_refused(spliced, SERVER_POLICY, *AUTH)


def _severed(
    install: list[Command], carried: list[Command] | None, key: cose.SigningKey = KEY
) -> bytes:
    seq = CommandSequence.build(install)
    manifest = make_manifest()
    members = tuple(
        (k, SuitDigest.of(cbor.bstr_wrap(seq.raw)) if k == suit.M_INSTALL else v)
        for k, v in manifest.members
    )
    manifest = dataclasses.replace(manifest, members=members)
    severable = () if carried is None else ((suit.ENV_INSTALL, CommandSequence.build(carried).raw),)
    return signed(manifest, key, severable=severable)


def test_3_severed_install_that_matches_its_digest_is_accepted() -> None:
    verified = trust.accept(_severed(fetch_commands(), fetch_commands()), DEVICE_POLICY)
    assert verified.payload_images()[0].uri == GOOD_URI


def test_3_severed_install_may_be_absent() -> None:
    verified = trust.accept(_severed(fetch_commands(), None), SERVER_POLICY)
    assert verified.payload_images() == ()


def test_3_swapped_severable_member_is_refused() -> None:
    data = _severed(fetch_commands(), fetch_commands(EVIL_URI))
    assert_refused(data, SERVER_POLICY, SeveredElementError, ReportReason.SEVERING_UNSUPPORTED)


def test_3_envelope_element_covered_by_no_digest_is_refused() -> None:
    extra = CommandSequence.build(fetch_commands(EVIL_URI)).raw
    data = signed(make_manifest(), severable=((suit.ENV_PAYLOAD_FETCH, extra),))
    assert_refused(data, SERVER_POLICY, SeveredElementError, ReportReason.SEVERING_UNSUPPORTED)


def test_3_severable_copy_of_an_unsevered_member_is_refused() -> None:
    extra = CommandSequence.build(fetch_commands(EVIL_URI)).raw
    data = signed(make_manifest(), severable=((suit.ENV_INSTALL, extra),))
    assert_refused(data, SERVER_POLICY, SeveredElementError, ReportReason.SEVERING_UNSUPPORTED)


def test_3_swapped_text_member_is_refused() -> None:
    text = cbor.dumps({1: "release notes"})
    manifest = make_manifest()
    manifest = dataclasses.replace(
        manifest, members=(*manifest.members, (suit.M_TEXT, SuitDigest.of(cbor.bstr_wrap(text))))
    )
    assert trust.accept(signed(manifest, severable=((suit.ENV_TEXT, text),)), SERVER_POLICY)
    forged = cbor.dumps({1: "install me, I am safe"})
    data = signed(manifest, severable=((suit.ENV_TEXT, forged),))
    assert_refused(data, SERVER_POLICY, SeveredElementError, ReportReason.SEVERING_UNSUPPORTED)


# -- 4/5. rollback and equal sequence numbers --------------------------------------------


@pytest.mark.parametrize("seq", [9, 0, 1])
def test_4_lower_sequence_number_is_a_rollback(seq: int) -> None:
    assert_refused(
        signed_release(sequence_number=seq),
        DEVICE_POLICY,
        RollbackError,
        ReportReason.CONDITION_FAILED,
    )


def test_4_next_sequence_number_is_accepted() -> None:
    assert trust.accept(signed_release(sequence_number=11), DEVICE_POLICY).sequence_number == 11


def _installed(data: bytes) -> trust.TrustPolicy:
    current = trust.accept(data, DEVICE_POLICY)
    return dataclasses.replace(
        DEVICE_POLICY,
        current_sequence=current.sequence_number,
        current_manifest_digest=current.manifest_digest.value,
    )


def test_5_equal_sequence_identical_manifest_is_already_installed() -> None:
    data = signed_release()
    error = assert_refused(data, _installed(data), AlreadyInstalled, ReportReason.OK)
    assert error.reason is ReportReason.OK


def test_5_equal_sequence_same_manifest_resigned_is_already_installed() -> None:
    policy = _installed(signed_release())
    resigned = signed_release()  # ECDSA: new signature bytes, same manifest
    assert_refused(resigned, policy, AlreadyInstalled, ReportReason.OK)


def test_5_equal_sequence_different_content_is_a_rollback() -> None:
    policy = _installed(signed_release())
    other = signed_release(image_digest=hashlib.sha256(b"other firmware").digest())
    assert_refused(other, policy, RollbackError, ReportReason.CONDITION_FAILED)


def test_5_equal_sequence_without_a_known_digest_is_a_rollback() -> None:
    policy = dataclasses.replace(DEVICE_POLICY, current_sequence=11)
    assert_refused(signed_release(), policy, RollbackError, ReportReason.CONDITION_FAILED)


# -- 7. fast-forward and sequence-number encodings ---------------------------------------

TOP = (1 << 64) - 1


def test_7_largest_uint64_sequence_number_is_accepted_without_a_jump_limit() -> None:
    data = signed_release(sequence_number=TOP)
    assert trust.accept(data, SERVER_POLICY).sequence_number == TOP
    no_limit = dataclasses.replace(DEVICE_POLICY, max_sequence_jump=None)
    assert trust.accept(data, no_limit).sequence_number == TOP


def test_7_jump_limit_refuses_a_fast_forward() -> None:
    assert_refused(
        signed_release(sequence_number=TOP),
        DEVICE_POLICY,
        RollbackError,
        ReportReason.CONDITION_FAILED,
    )


def test_7_jump_limit_is_inclusive() -> None:
    assert trust.accept(signed_release(sequence_number=1010), DEVICE_POLICY).sequence_number == 1010
    assert_refused(
        signed_release(sequence_number=1011),
        DEVICE_POLICY,
        RollbackError,
        ReportReason.CONDITION_FAILED,
    )


@pytest.mark.parametrize(
    "seq",
    [
        -1,
        -(1 << 63),
        11.0,
        11.5,
        float("inf"),
        1 << 64,
        CBORTag(2, b"\x0b"),
        "11",
        b"\x0b",
        True,
        None,
        [11],
    ],
    ids=[
        "negative",
        "large-negative",
        "float-integral",
        "float",
        "infinity",
        "bignum-2^64",
        "bignum-small",
        "text",
        "bstr",
        "bool",
        "null",
        "array",
    ],
)
def test_7_sequence_number_that_is_not_a_uint64_is_refused(seq: Any) -> None:
    data = signed(make_manifest(seq=seq))
    error = refused(data, SERVER_POLICY)
    assert isinstance(error, ManifestError), f"{type(error).__name__}: {error}"
    assert error.reason is ReportReason.CBOR_PARSE


def test_7_non_shortest_sequence_number_is_refused() -> None:
    raw = suit.encode_manifest(make_manifest(seq=11))
    assert raw[1:5] == b"\x01\x01\x02\x0b"
    forged = raw[:4] + b"\x18\x0b" + raw[5:]
    assert cbor2.loads(forged)[2] == 11  # same value, longer encoding
    error = refused(sign_raw_manifest(forged), SERVER_POLICY)
    assert isinstance(error, ManifestError) and error.reason is ReportReason.CBOR_PARSE


# -- 9. other vendor or class ------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"vendor_domain": "attacker.example"}, {"class_info": "other-board"}],
    ids=["other-vendor", "other-class"],
)
def test_9_manifest_for_another_vendor_or_class_is_incompatible(overrides: dict[str, str]) -> None:
    data = signed_release(**overrides)
    assert trust.accept(data, SERVER_POLICY)  # authentic...
    assert_refused(
        data, DEVICE_POLICY, IncompatibleError, ReportReason.CONDITION_FAILED
    )  # ...not for us


@pytest.mark.parametrize(
    "shared",
    [
        shared_commands(vendor=None),
        shared_commands(klass=None),
        [
            *shared_commands(),
            Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_VENDOR_ID, b"\x01" * 16),))),
        ],
        [
            *shared_commands(),
            Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_CLASS_ID, b"\x02" * 16),))),
        ],
    ],
    ids=["no-vendor-named", "no-class-named", "vendor-overridden", "class-overridden"],
)
def test_9_manifest_that_does_not_prove_it_is_for_this_class_is_incompatible(
    shared: list[Command],
) -> None:
    data = signed(make_manifest(shared=shared))
    assert_refused(data, DEVICE_POLICY, IncompatibleError, ReportReason.CONDITION_FAILED)


def test_9_device_id_for_another_device_is_incompatible() -> None:
    shared = shared_commands(extra=((suit.P_DEVICE_ID, b"\x0b" * 16),))
    data = signed(make_manifest(shared=shared))
    assert trust.accept(data, dataclasses.replace(DEVICE_POLICY, device_id=b"\x0b" * 16))
    policy = dataclasses.replace(DEVICE_POLICY, device_id=b"\x0a" * 16)
    assert_refused(data, policy, IncompatibleError, ReportReason.CONDITION_FAILED)


# -- 11/13. image size -------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, SLOT + 1, 1 << 63, TOP], ids=["zero", "slot+1", "2^63", "2^64-1"]
)
def test_13_image_size_outside_the_slot_is_refused(size: int) -> None:
    data = signed(make_manifest(shared=shared_commands(size=size)))
    assert_refused(data, DEVICE_POLICY, PolicyError, ReportReason.COMPONENT_UNAUTHORISED)


def test_13_image_exactly_the_slot_size_is_accepted() -> None:
    data = signed(make_manifest(shared=shared_commands(size=SLOT)))
    assert trust.accept(data, DEVICE_POLICY).images[0].size == SLOT


def test_11_fetched_image_without_a_size_is_refused() -> None:
    data = signed(make_manifest(shared=shared_commands(size=None)))
    assert_refused(data, DEVICE_POLICY, PolicyError, ReportReason.COMPONENT_UNAUTHORISED)


@pytest.mark.parametrize("size", [-1, 4096.0, "4096"], ids=["negative", "float", "text"])
def test_13_image_size_of_the_wrong_type_is_refused(size: Any) -> None:
    error = refused(signed(make_manifest(shared=shared_commands(size=size))), DEVICE_POLICY)
    assert isinstance(error, ManifestError) and error.reason is ReportReason.CBOR_PARSE


# -- 16. URIs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        EVIL_URI,
        "coaps://10.0.0.1/fw/0123456789abcdef",
        "coap://fw.example.com/fw/0123456789abcdef",
        "http://fw.example.com/fw/0123456789abcdef",
        "COAPS://evil.example.net/fw",
        "coaps://fw.example.com.evil.net/fw",
        "//evil.example.net/fw/0123456789abcdef",
        "/fw/0123456789abcdef",
        "fw/0123456789abcdef",
        "#not-in-the-envelope",
    ],
    ids=[
        "other-host",
        "ip-literal",
        "plain-coap",
        "http",
        "upper-case-other-host",
        "lookalike-host",
        "network-path-reference",
        "server-relative",
        "path-relative",
        "missing-integrated-payload",
    ],
)
def test_16_uri_outside_the_allowed_origins_is_refused(uri: str) -> None:
    data = signed(make_manifest(install=fetch_commands(uri)))
    assert_refused(data, DEVICE_POLICY, PolicyError, ReportReason.COMPONENT_UNAUTHORISED)


def test_16_server_relative_uri_is_accepted_only_when_allowed() -> None:
    data = signed(make_manifest(install=fetch_commands("/fw/0123456789abcdef")))
    relative_ok = dataclasses.replace(DEVICE_POLICY, allow_relative_uris=True)
    assert trust.accept(data, relative_ok).images[0].uri == "/fw/0123456789abcdef"


def test_16_integrated_payload_present_in_the_envelope_is_accepted() -> None:
    data = signed(make_manifest(install=fetch_commands("#fw")), integrated=(("#fw", b"\x00" * 16),))
    assert trust.accept(data, DEVICE_POLICY).images[0].uri == "#fw"


def test_16_every_fetched_uri_is_checked_not_only_the_last() -> None:
    install = [*fetch_commands(EVIL_URI), *fetch_commands(GOOD_URI)]
    data = signed(make_manifest(install=install))
    assert_refused(data, DEVICE_POLICY, PolicyError, ReportReason.COMPONENT_UNAUTHORISED)


def test_16_uri_in_a_try_each_alternative_is_checked() -> None:
    def alternative(uri: str) -> CommandSequence:
        return CommandSequence.build(
            [Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_URI, uri),)))]
        )

    install = [
        Command(suit.CMD_TRY_EACH, (alternative(EVIL_URI), alternative(GOOD_URI))),
        Command(suit.CMD_FETCH, 2),
        Command(suit.CMD_IMAGE_MATCH, 15),
    ]
    data = signed(make_manifest(install=install))
    assert_refused(data, DEVICE_POLICY, PolicyError, ReportReason.COMPONENT_UNAUTHORISED)


def test_13_every_fetched_image_size_is_checked_not_only_the_last() -> None:
    big = Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_IMAGE_SIZE, 1 << 40),)))
    small = Command(suit.CMD_OVERRIDE_PARAMETERS, Parameters(((suit.P_IMAGE_SIZE, IMAGE_SIZE),)))
    install = [big, *fetch_commands(), small, *fetch_commands()]
    data = signed(make_manifest(install=install))
    assert_refused(data, DEVICE_POLICY, PolicyError, ReportReason.COMPONENT_UNAUTHORISED)


# -- 17. components ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "component",
    [(b"\x01",), (b"bootloader",), (b"\x00", b"\x00"), ()],
    ids=["slot-1", "bootloader", "nested", "empty"],
)
def test_17_component_outside_the_allow_list_is_refused(component: tuple[bytes, ...]) -> None:
    data = signed(make_manifest(components=(component,)))
    assert_refused(data, DEVICE_POLICY, PolicyError, ReportReason.COMPONENT_UNAUTHORISED)


def test_17_second_component_outside_the_allow_list_is_refused() -> None:
    shared = [Command(suit.CMD_SET_COMPONENT_INDEX, True), *shared_commands()]
    install = [Command(suit.CMD_SET_COMPONENT_INDEX, 0), *fetch_commands()]
    data = signed(
        make_manifest(components=(MAIN, (b"bootloader",)), shared=shared, install=install)
    )
    roomy = dataclasses.replace(DEVICE_POLICY, max_components=2)
    assert_refused(data, roomy, PolicyError, ReportReason.COMPONENT_UNAUTHORISED)
    both = dataclasses.replace(roomy, allowed_components=frozenset({MAIN, (b"bootloader",)}))
    assert trust.accept(data, both).sequence_number == 11


def test_17_more_components_than_the_device_has_is_refused() -> None:
    shared = [Command(suit.CMD_SET_COMPONENT_INDEX, True), *shared_commands()]
    install = [Command(suit.CMD_SET_COMPONENT_INDEX, 0), *fetch_commands()]
    data = signed(make_manifest(components=(MAIN, (*MAIN, b"x")), shared=shared, install=install))
    no_list = dataclasses.replace(DEVICE_POLICY, allowed_components=None)
    assert_refused(data, no_list, PolicyError, ReportReason.COMPONENT_UNAUTHORISED)
