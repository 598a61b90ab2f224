"""The SUIT envelope and manifest of draft-ietf-suit-manifest-34 as frozen values.

`decode_envelope` parses (it does not authenticate: that is `trust.py`'s job) and
`encode_envelope` emits deterministic CBOR. Every bstr-wrapped element keeps the exact
bytes it arrived in (`raw`), because digests and signatures cover those bytes
(manifest-34 §8.3, §8.4.12) and re-encoding could change them; a model built in code
gets its `raw` from the deterministic encoder, so decode(encode(x)) == x and
encode(decode(b)) == b for canonical input.

Numbers are the -34 ones (shared/suit/DIGEST.md §1-§5). Unknown *positive* integer
keys are treated as critical and refused, which is what keeps a -18 era manifest
(install = 17) from being misread as current; negative keys (application-specific,
manifest-34 §8.1) and text keys are kept untouched so round trips stay byte-exact.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cbor2

from . import cbor
from .errors import ManifestError, UnsupportedElement
from .untrusted import describe

# --- numbers (shared/suit/DIGEST.md) -------------------------------------------------

ENVELOPE_TAG = 107
_ENVELOPE_TAG_HEAD = bytes([0xD8, ENVELOPE_TAG])  # tag 107: major 6, 1-byte argument
MANIFEST_TAG = 1070

# Envelope elements (manifest-34 §11.1 + IANA).
ENV_AUTH = 2
ENV_MANIFEST = 3
ENV_COSWID = 14
ENV_DEPENDENCY_RESOLUTION = 15
ENV_PAYLOAD_FETCH = 16
ENV_CANDIDATE_VERIFICATION = 18
ENV_INSTALL = 20
ENV_TEXT = 23
SEVERABLE_KEYS = frozenset(
    {
        ENV_COSWID,
        ENV_DEPENDENCY_RESOLUTION,
        ENV_PAYLOAD_FETCH,
        ENV_CANDIDATE_VERIFICATION,
        ENV_INSTALL,
        ENV_TEXT,
    }
)

# Manifest elements (manifest-34 §11.2).
M_VERSION = 1
M_SEQUENCE_NUMBER = 2
M_COMMON = 3
M_REFERENCE_URI = 4
M_COMPONENT_ID = 5
M_SET_VERSION = 6
M_VALIDATE = 7
M_LOAD = 8
M_INVOKE = 9
M_COSWID = 14
M_DEPENDENCY_RESOLUTION = 15
M_PAYLOAD_FETCH = 16
M_CANDIDATE_VERIFICATION = 18
M_INSTALL = 20
M_TEXT = 23
M_UNINSTALL = 24
# Members that hold a command sequence; the severable ones may instead be a SUIT_Digest.
SEQUENCE_KEYS = frozenset(
    {
        M_VALIDATE,
        M_LOAD,
        M_INVOKE,
        M_DEPENDENCY_RESOLUTION,
        M_PAYLOAD_FETCH,
        M_CANDIDATE_VERIFICATION,
        M_INSTALL,
        M_UNINSTALL,
    }
)
SEVERABLE_MEMBERS = frozenset(
    {M_COSWID, M_DEPENDENCY_RESOLUTION, M_PAYLOAD_FETCH, M_INSTALL, M_TEXT}
)
SEQUENCE_NAMES = {
    M_VALIDATE: "validate",
    M_LOAD: "load",
    M_INVOKE: "invoke",
    M_DEPENDENCY_RESOLUTION: "dependency-resolution",
    M_PAYLOAD_FETCH: "payload-fetch",
    M_CANDIDATE_VERIFICATION: "candidate-verification",
    M_INSTALL: "install",
    M_UNINSTALL: "uninstall",
}

# SUIT_Common (manifest-34 §11.3; 1 from trust-domains).
C_DEPENDENCIES = 1
C_COMPONENTS = 2
C_SHARED_SEQUENCE = 4

# Commands (manifest-34 §11.4, trust-domains, update-management).
CMD_VENDOR_IDENTIFIER = 1
CMD_CLASS_IDENTIFIER = 2
CMD_IMAGE_MATCH = 3
CMD_USE_BEFORE = 4
CMD_COMPONENT_SLOT = 5
CMD_CHECK_CONTENT = 6
CMD_DEPENDENCY_INTEGRITY = 7
CMD_IS_DEPENDENCY = 8
CMD_PROCESS_DEPENDENCY = 11
CMD_SET_COMPONENT_INDEX = 12
CMD_ABORT = 14
CMD_TRY_EACH = 15
CMD_WRITE = 18
CMD_SET_PARAMETERS = 19
CMD_OVERRIDE_PARAMETERS = 20
CMD_FETCH = 21
CMD_COPY = 22
CMD_INVOKE = 23
CMD_DEVICE_IDENTIFIER = 24
CMD_IMAGE_NOT_MATCH = 25
CMD_MINIMUM_BATTERY = 26
CMD_UPDATE_AUTHORIZED = 27
CMD_VERSION = 28
CMD_WAIT = 29
CMD_SWAP = 31
CMD_RUN_SEQUENCE = 32
CMD_UNLINK = 33
CMD_OVERRIDE_MULTIPLE = 34
CMD_COPY_PARAMS = 35

COMMAND_NAMES = {
    1: "condition-vendor-identifier",
    2: "condition-class-identifier",
    3: "condition-image-match",
    4: "condition-use-before",
    5: "condition-component-slot",
    6: "condition-check-content",
    7: "condition-dependency-integrity",
    8: "condition-is-dependency",
    11: "directive-process-dependency",
    12: "directive-set-component-index",
    14: "condition-abort",
    15: "directive-try-each",
    18: "directive-write",
    19: "directive-set-parameters",
    20: "directive-override-parameters",
    21: "directive-fetch",
    22: "directive-copy",
    23: "directive-invoke",
    24: "condition-device-identifier",
    25: "condition-image-not-match",
    26: "condition-minimum-battery",
    27: "condition-update-authorized",
    28: "condition-version",
    29: "directive-wait",
    31: "directive-swap",
    32: "directive-run-sequence",
    33: "directive-unlink",
    34: "directive-override-multiple",
    35: "directive-copy-params",
    # otacoap's delta extension (custom, negative: manifest-34 §8.4.9 suit-condition-custom;
    # docs/decisions/delta-updates.md): the running image is the patch's source.
    -1001: "condition-delta-source-match",
}
CMD_DELTA_SOURCE_MATCH = -1001

# Parameters (manifest-34 §11.5, firmware-encryption, update-management).
P_VENDOR_ID = 1
P_CLASS_ID = 2
P_IMAGE_DIGEST = 3
P_USE_BEFORE = 4
P_COMPONENT_SLOT = 5
P_STRICT_ORDER = 12
P_SOFT_FAILURE = 13
P_IMAGE_SIZE = 14
P_CONTENT = 18
P_ENCRYPTION_INFO = 19
P_URI = 21
P_SOURCE_COMPONENT = 22
P_INVOKE_ARGS = 23
P_DEVICE_ID = 24
P_FETCH_ARGUMENTS = 25
P_MINIMUM_BATTERY = 26
P_UPDATE_PRIORITY = 27
P_VERSION = 28
P_WAIT_INFO = 29
P_COMPONENT_METADATA = 30
# otacoap's delta extension (custom parameters, negative: manifest-34 §8.4.8
# suit-parameter-custom; docs/decisions/delta-updates.md). Digests are bstr .cbor
# SUIT_Digest, like image-digest.
P_DELTA_SOURCE_DIGEST = -1001
P_DELTA_SOURCE_SIZE = -1002
P_DELTA_PATCH_DIGEST = -1003
P_DELTA_PATCH_SIZE = -1004
P_DELTA_FORMAT = -1005
PARAMETER_NAMES = {
    1: "vendor-id",
    2: "class-id",
    3: "image-digest",
    4: "use-before",
    5: "component-slot",
    12: "strict-order",
    13: "soft-failure",
    14: "image-size",
    18: "content",
    19: "encryption-info",
    21: "uri",
    22: "source-component",
    23: "invoke-args",
    24: "device-id",
    25: "fetch-arguments",
    26: "minimum-battery",
    27: "update-priority",
    28: "version",
    29: "wait-info",
    30: "component-metadata",
    -1001: "delta-source-digest",
    -1002: "delta-source-size",
    -1003: "delta-patch-digest",
    -1004: "delta-patch-size",
    -1005: "delta-format",
}

# Digest algorithms (manifest-34 §10). SHAKE variants are OPTIONAL and not supported.
DIGEST_SHA256 = -16
_HASHES = {-16: "sha256", -43: "sha384", -44: "sha512"}

# The profile's caps (ATTACKS.md #38-#40): a manifest processor for a constrained
# device has no use for more.
MAX_COMPONENTS = 16
MAX_COMPONENT_ID_PARTS = 8
MAX_COMMANDS = 256


# --- values --------------------------------------------------------------------------


@dataclass(frozen=True)
class SuitDigest:
    """SUIT_Digest = [algorithm-id, digest-bytes, * ext]."""

    algorithm: int
    value: bytes

    @classmethod
    def of(cls, data: bytes, algorithm: int = DIGEST_SHA256) -> SuitDigest:
        return cls(algorithm, hash_bytes(algorithm, data))

    def to_cbor(self) -> list[Any]:
        return [self.algorithm, self.value]

    def encode(self) -> bytes:
        return cbor.dumps(self.to_cbor())

    def matches(self, data: bytes) -> bool:
        """Constant-time comparison against the digest of `data`."""
        return hmac.compare_digest(hash_bytes(self.algorithm, data), self.value)


def hash_bytes(algorithm: int, data: bytes) -> bytes:
    name = _HASHES.get(algorithm)
    if name is None:
        raise UnsupportedElement(f"digest algorithm {describe(algorithm)} is not supported")
    return hashlib.new(name, data).digest()


def new_hasher(algorithm: int) -> Any:
    name = _HASHES.get(algorithm)
    if name is None:
        raise UnsupportedElement(f"digest algorithm {describe(algorithm)} is not supported")
    return hashlib.new(name)


@dataclass(frozen=True)
class Parameters:
    """A SUIT parameter map, key order preserved; image-digest (3) is kept decoded."""

    items: tuple[tuple[int, Any], ...]

    def get(self, key: int, default: Any = None) -> Any:
        for k, v in self.items:
            if k == key:
                return v
        return default

    def keys(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.items)

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self.items)

    def to_cbor(self) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for k, v in self.items:
            out[k] = cbor.dumps(v.to_cbor()) if k == P_IMAGE_DIGEST else _to_cbor(v)
        return out


@dataclass(frozen=True)
class Command:
    """One (code, argument) pair of a command sequence.

    The argument is decoded by code: Parameters for 19/20, a CommandSequence for 32,
    a tuple of CommandSequence (and a trailing None) for 15, int | bool | tuple[int]
    for 12, a reporting policy int for conditions and simple directives, and the raw
    decoded value for everything else (34, 35, custom commands).
    """

    code: int
    arg: Any

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.code, f"command-{self.code}")


@dataclass(frozen=True)
class CommandSequence:
    commands: tuple[Command, ...]
    raw: bytes = field(compare=False, default=b"")

    @classmethod
    def build(cls, commands: list[Command] | tuple[Command, ...]) -> CommandSequence:
        seq = cls(tuple(commands))
        return cls(seq.commands, cbor.dumps(seq.to_cbor()))

    def to_cbor(self) -> list[Any]:
        out: list[Any] = []
        for c in self.commands:
            out.append(c.code)
            out.append(_arg_to_cbor(c.code, c.arg))
        return out

    def __iter__(self) -> Iterator[Command]:
        return iter(self.commands)


@dataclass(frozen=True)
class Common:
    components: tuple[tuple[bytes, ...], ...]
    shared_sequence: CommandSequence | None = None
    dependencies: Any = None
    raw: bytes = field(compare=False, default=b"")

    def to_cbor(self) -> dict[int, Any]:
        out: dict[int, Any] = {}
        if self.dependencies is not None:
            out[C_DEPENDENCIES] = self.dependencies
        out[C_COMPONENTS] = [list(c) for c in self.components]
        if self.shared_sequence is not None:
            out[C_SHARED_SEQUENCE] = _raw_or_encode(self.shared_sequence)
        return out


def component_count(common: Common) -> int:
    """Size of the component index space: components, then trust-domains dependencies."""
    deps = [k for k in (common.dependencies or {}) if _is_uint(k)]
    return max(len(common.components), max(deps, default=-1) + 1)


@dataclass(frozen=True)
class Manifest:
    """SUIT_Manifest. `members` holds every other element by key.

    A command-sequence member is a CommandSequence; a severed member is the SuitDigest
    of the envelope element that carries it; text, coswid and set-version stay as their
    bstr contents.
    """

    version: int
    sequence_number: int
    common: Common
    members: tuple[tuple[int, Any], ...] = ()
    reference_uri: str | None = None
    component_id: tuple[bytes, ...] | None = None
    extensions: tuple[tuple[Any, Any], ...] = ()

    def member(self, key: int) -> Any:
        for k, v in self.members:
            if k == key:
                return v
        return None

    def sequence(self, key: int) -> CommandSequence | None:
        """The sequence under `key`, or None when absent or severed."""
        value = self.member(key)
        return value if isinstance(value, CommandSequence) else None

    def severed_digest(self, key: int) -> SuitDigest | None:
        value = self.member(key)
        return value if isinstance(value, SuitDigest) else None

    def to_cbor(self) -> dict[Any, Any]:
        out: dict[Any, Any] = {
            M_VERSION: self.version,
            M_SEQUENCE_NUMBER: self.sequence_number,
            M_COMMON: _raw_or_encode(self.common),
        }
        if self.reference_uri is not None:
            out[M_REFERENCE_URI] = self.reference_uri
        if self.component_id is not None:
            out[M_COMPONENT_ID] = list(self.component_id)
        for k, v in self.members:
            if isinstance(v, SuitDigest):
                out[k] = v.to_cbor()
            elif isinstance(v, CommandSequence):
                out[k] = _raw_or_encode(v)
            else:
                out[k] = v
        for k, v in self.extensions:
            out[k] = v
        return out


@dataclass(frozen=True)
class AuthBlock:
    """One COSE structure of the authentication wrapper, kept as its exact bytes."""

    raw: bytes


@dataclass(frozen=True)
class Authentication:
    digest: SuitDigest
    digest_raw: bytes  # the SUIT_Digest encoding: the COSE detached payload (§8.3)
    blocks: tuple[AuthBlock, ...]
    raw: bytes = field(compare=False, default=b"")

    def to_cbor(self) -> list[bytes]:
        return [self.digest_raw, *(b.raw for b in self.blocks)]


@dataclass(frozen=True)
class Envelope:
    authentication: Authentication
    manifest: Manifest
    manifest_raw: bytes  # exactly the signed bytes (contents of envelope key 3)
    severable: tuple[tuple[int, bytes], ...] = ()  # envelope key -> bstr contents
    integrated: tuple[tuple[str, bytes], ...] = ()  # "#name" -> payload bytes
    extensions: tuple[tuple[Any, Any], ...] = ()
    tagged: bool = True

    def severable_element(self, key: int) -> bytes | None:
        for k, v in self.severable:
            if k == key:
                return v
        return None

    def integrated_payload(self, name: str) -> bytes | None:
        for k, v in self.integrated:
            if k == name:
                return v
        return None

    @property
    def manifest_digest(self) -> SuitDigest:
        """Digest over the bstr-wrapped manifest, header included (manifest-34 §8.3)."""
        return SuitDigest.of(
            cbor.bstr_wrap(self.manifest_raw), self.authentication.digest.algorithm
        )


# --- decoding ------------------------------------------------------------------------


def _fail(msg: str) -> ManifestError:
    return ManifestError(msg)


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ManifestError(msg)


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(1 << 64) <= v < 1 << 64


def decode_digest(value: Any) -> SuitDigest:
    _expect(isinstance(value, list) and len(value) >= 2, "SUIT_Digest must be [alg, bytes]")
    alg, digest = value[0], value[1]
    _expect(_is_int(alg) and isinstance(digest, bytes), "SUIT_Digest has wrong types")
    return SuitDigest(alg, digest)


def _decode_wrapped(raw: Any, what: str, max_size: int) -> Any:
    _expect(isinstance(raw, bytes), f"{what} must be a bstr-wrapped CBOR item")
    return cbor.loads(raw, max_size=max_size)


def decode_parameters(value: Any, max_size: int) -> Parameters:
    _expect(isinstance(value, dict) and bool(value), "parameters must be a non-empty map")
    items: list[tuple[int, Any]] = []
    for k, v in value.items():
        _expect(_is_int(k), "parameter keys must be integers")
        if k in (P_VENDOR_ID, P_CLASS_ID, P_DEVICE_ID):
            ok = (isinstance(v, bytes) and len(v) == 16) or (
                k == P_VENDOR_ID
                and isinstance(v, cbor2.CBORTag)
                and v.tag == 112
                and isinstance(v.value, bytes)
            )
            _expect(ok, f"{PARAMETER_NAMES[k]} must be a 16-byte UUID")
        elif k == P_IMAGE_DIGEST:
            v = decode_digest(_decode_wrapped(v, "image-digest", max_size))
        elif k in (
            P_IMAGE_SIZE,
            P_COMPONENT_SLOT,
            P_SOURCE_COMPONENT,
            P_USE_BEFORE,
            P_MINIMUM_BATTERY,
        ):
            _expect(_is_uint(v), f"{PARAMETER_NAMES[k]} must be an unsigned integer")
        elif k in (P_STRICT_ORDER, P_SOFT_FAILURE):
            _expect(isinstance(v, bool), f"{PARAMETER_NAMES[k]} must be a boolean")
        elif k == P_URI:
            _expect(isinstance(v, str), "uri must be a text string")
        elif k in (
            P_CONTENT,
            P_INVOKE_ARGS,
            P_FETCH_ARGUMENTS,
            P_ENCRYPTION_INFO,
            P_VERSION,
            P_WAIT_INFO,
            P_COMPONENT_METADATA,
        ):
            _expect(isinstance(v, bytes), f"{PARAMETER_NAMES[k]} must be a byte string")
        elif k == P_UPDATE_PRIORITY:
            _expect(_is_int(v), "update-priority must be an integer")
        elif k > 0:
            raise UnsupportedElement(f"unknown SUIT parameter {describe(k)}")
        items.append((k, v))
    return Parameters(tuple(items))


def decode_sequence(raw: bytes, max_size: int, budget: list[int] | None = None) -> CommandSequence:
    """Parse a bstr-wrapped SUIT_Command_Sequence (and nested ones) into values."""
    value = _decode_wrapped(raw, "command sequence", max_size)
    _expect(
        isinstance(value, list) and bool(value) and len(value) % 2 == 0,
        "command sequence must be a non-empty list of (code, argument) pairs",
    )
    budget = budget if budget is not None else [MAX_COMMANDS]
    commands: list[Command] = []
    for i in range(0, len(value), 2):
        budget[0] -= 1
        if budget[0] < 0:
            raise ManifestError(f"more than {MAX_COMMANDS} commands")
        code, arg = value[i], value[i + 1]
        _expect(_is_int(code), "command code must be an integer")
        commands.append(Command(code, _decode_arg(code, arg, max_size, budget)))
    return CommandSequence(tuple(commands), bytes(raw))


def _decode_arg(code: int, arg: Any, max_size: int, budget: list[int]) -> Any:
    if code in (CMD_OVERRIDE_PARAMETERS, CMD_SET_PARAMETERS):
        return decode_parameters(arg, max_size)
    if code == CMD_RUN_SEQUENCE:
        return decode_sequence(arg, max_size, budget)
    if code == CMD_TRY_EACH:
        _expect(isinstance(arg, list) and len(arg) >= 1, "try-each needs a list of sequences")
        seqs: list[CommandSequence | None] = []
        for n, item in enumerate(arg):
            if item is None and n == len(arg) - 1:
                seqs.append(None)  # manifest-34 §8.4.10.2: trailing nil = always succeed
            else:
                seqs.append(decode_sequence(item, max_size, budget))
        return tuple(seqs)
    if code == CMD_SET_COMPONENT_INDEX:
        if arg is True or _is_uint(arg):
            return arg
        _expect(
            isinstance(arg, list) and bool(arg) and all(_is_uint(x) for x in arg),
            "set-component-index takes uint, true or a list of uints",
        )
        return tuple(arg)
    if code in (CMD_OVERRIDE_MULTIPLE, CMD_COPY_PARAMS):
        _expect(isinstance(arg, dict), f"{COMMAND_NAMES[code]} takes a map")
        return arg
    if code in COMMAND_NAMES:
        _expect(_is_uint(arg), f"{COMMAND_NAMES[code]} takes a reporting policy (uint)")
        return arg
    if code > 0:
        # Unknown positive commands are kept: a condition must *report failure* when run
        # (manifest-34 §8.4.10), which is the interpreter's call, not the parser's.
        return arg
    return arg  # custom (negative) command: opaque


def _decode_common(raw: bytes, max_size: int) -> Common:
    value = _decode_wrapped(raw, "common", max_size)
    _expect(isinstance(value, dict), "SUIT_Common must be a map")
    components: tuple[tuple[bytes, ...], ...] | None = None
    shared: CommandSequence | None = None
    deps: Any = None
    for k, v in value.items():
        if k == C_COMPONENTS:
            _expect(
                isinstance(v, list) and 0 < len(v) <= MAX_COMPONENTS,
                f"components must list 1..{MAX_COMPONENTS} component identifiers",
            )
            components = tuple(_decode_component_id(c) for c in v)
        elif k == C_SHARED_SEQUENCE:
            shared = decode_sequence(v, max_size)
        elif k == C_DEPENDENCIES:
            _expect(
                isinstance(v, dict) and all(_is_uint(i) and i < MAX_COMPONENTS for i in v),
                f"dependencies must map component indices below {MAX_COMPONENTS}",
            )
            deps = v
        elif _is_int(k) and k < 0:
            continue
        else:
            raise UnsupportedElement(f"unknown critical SUIT_Common element {describe(k)}")
    _expect(components is not None, "SUIT_Common lacks the components list")
    assert components is not None
    return Common(components, shared, deps, bytes(raw))


def _decode_component_id(value: Any) -> tuple[bytes, ...]:
    _expect(
        isinstance(value, list)
        and len(value) <= MAX_COMPONENT_ID_PARTS
        and all(isinstance(p, bytes) for p in value),
        "a component identifier is a list of byte strings",
    )
    return tuple(value)


def decode_manifest(raw: bytes, *, max_size: int = cbor.DEFAULT_MAX_SIZE) -> Manifest:
    value = cbor.loads(raw, max_size=max_size)
    if isinstance(value, cbor2.CBORTag) and value.tag == MANIFEST_TAG:
        value = value.value
    _expect(isinstance(value, dict), "SUIT_Manifest must be a map")
    # manifest-34 §6.1: check the version before anything else.
    version = value.get(M_VERSION)
    _expect(version is not None, "manifest-version is missing")
    if version != 1:
        raise UnsupportedElement(f"manifest-version {describe(version)} is not supported (only 1)")
    seq = value.get(M_SEQUENCE_NUMBER)
    _expect(_is_uint(seq), "manifest-sequence-number must be an unsigned 64-bit integer")
    _expect(M_COMMON in value, "manifest lacks the common element")
    common = _decode_common(value[M_COMMON], max_size)
    members: list[tuple[int, Any]] = []
    extensions: list[tuple[Any, Any]] = []
    ref_uri: str | None = None
    comp_id: tuple[bytes, ...] | None = None
    for k, v in value.items():
        if k in (M_VERSION, M_SEQUENCE_NUMBER, M_COMMON):
            continue
        if k == M_REFERENCE_URI:
            _expect(isinstance(v, str), "reference-uri must be a text string")
            ref_uri = v
        elif k == M_COMPONENT_ID:
            comp_id = _decode_component_id(v)
        elif k in SEVERABLE_MEMBERS and isinstance(v, list):
            members.append((k, decode_digest(v)))
        elif k in SEQUENCE_KEYS:
            members.append((k, decode_sequence(v, max_size)))
        elif k in (M_TEXT, M_COSWID, M_SET_VERSION):
            _expect(isinstance(v, bytes), f"manifest element {k} must be a bstr")
            cbor.scan(v, max_size=max_size)
            members.append((k, v))
        elif _is_int(k) and k < 0:
            extensions.append((k, v))
        else:
            raise UnsupportedElement(f"unknown critical manifest element {describe(k)}")
    return Manifest(version, seq, common, tuple(members), ref_uri, comp_id, tuple(extensions))


def _decode_authentication(raw: Any, max_size: int) -> Authentication:
    value = _decode_wrapped(raw, "authentication wrapper", max_size)
    _expect(
        isinstance(value, list) and len(value) >= 1 and all(isinstance(x, bytes) for x in value),
        "SUIT_Authentication must be [bstr digest, * bstr block]",
    )
    digest = decode_digest(cbor.loads(value[0], max_size=max_size))
    blocks = tuple(AuthBlock(b) for b in value[1:])
    return Authentication(digest, value[0], blocks, bytes(raw))


def decode_envelope(
    data: bytes, *, max_size: int = cbor.DEFAULT_MAX_SIZE, max_depth: int = cbor.DEFAULT_MAX_DEPTH
) -> Envelope:
    """Parse an envelope (tagged 107 or untagged). Parsing is not authenticating."""
    value = cbor.loads(data, max_size=max_size, max_depth=max_depth)
    tagged = False
    if isinstance(value, cbor2.CBORTag):
        _expect(value.tag == ENVELOPE_TAG, f"CBOR tag {describe(value.tag)} is not a SUIT envelope")
        value, tagged = value.value, True
    _expect(isinstance(value, dict), "SUIT_Envelope must be a map")
    _expect(ENV_AUTH in value, "envelope lacks the authentication wrapper")
    _expect(ENV_MANIFEST in value, "envelope lacks the manifest")
    auth = _decode_authentication(value[ENV_AUTH], max_size)
    manifest_raw = value[ENV_MANIFEST]
    _expect(isinstance(manifest_raw, bytes), "manifest must be bstr-wrapped")
    manifest = decode_manifest(manifest_raw, max_size=max_size)
    severable: list[tuple[int, bytes]] = []
    integrated: list[tuple[str, bytes]] = []
    extensions: list[tuple[Any, Any]] = []
    for k, v in value.items():
        if k in (ENV_AUTH, ENV_MANIFEST):
            continue
        if k in SEVERABLE_KEYS:
            _expect(isinstance(v, bytes), f"severable element {k} must be a bstr")
            severable.append((k, v))
        elif isinstance(k, str):
            _expect(isinstance(v, bytes), f"integrated payload {describe(k)} must be a bstr")
            integrated.append((k, v))
        elif _is_int(k) and k < 0:
            extensions.append((k, v))
        else:
            raise UnsupportedElement(f"unknown critical envelope element {describe(k)}")
    return Envelope(
        auth,
        manifest,
        bytes(manifest_raw),
        tuple(severable),
        tuple(integrated),
        tuple(extensions),
        tagged,
    )


def severed_member(
    envelope: Envelope, key: int, max_size: int = cbor.DEFAULT_MAX_SIZE
) -> CommandSequence | bytes | None:
    """The decoded severable member `key` taken from the envelope (digest checked by trust).

    A command sequence for the sequence keys; the checked raw bytes for any other (text).
    """
    raw = envelope.severable_element(key)
    if raw is None:
        return None
    if key in SEQUENCE_KEYS:
        return decode_sequence(raw, max_size)
    cbor.scan(raw, max_size=max_size)
    return raw


# --- encoding ------------------------------------------------------------------------


def _to_cbor(v: Any) -> Any:
    if hasattr(v, "to_cbor"):
        return v.to_cbor()
    if isinstance(v, tuple):
        return [_to_cbor(x) for x in v]
    return v


def _raw_or_encode(obj: Any) -> bytes:
    return obj.raw if getattr(obj, "raw", b"") else cbor.dumps(obj.to_cbor())


def _arg_to_cbor(code: int, arg: Any) -> Any:
    if isinstance(arg, Parameters):
        return arg.to_cbor()
    if isinstance(arg, CommandSequence):
        return _raw_or_encode(arg)
    if code == CMD_TRY_EACH:
        return [None if s is None else _raw_or_encode(s) for s in arg]
    if isinstance(arg, tuple):
        return list(arg)
    return arg


def encode_manifest(manifest: Manifest) -> bytes:
    return cbor.dumps(manifest.to_cbor())


def encode_envelope(envelope: Envelope) -> bytes:
    """Deterministic encoding; the authentication wrapper comes first (manifest-34 §8.3)."""
    body: dict[Any, Any] = {
        ENV_AUTH: _raw_or_encode(envelope.authentication),
        ENV_MANIFEST: envelope.manifest_raw,
    }
    for k, v in envelope.severable:
        body[k] = v
    for k, v in envelope.extensions:
        body[k] = v
    for name, payload in envelope.integrated:
        body[name] = payload
    encoded = cbor.dumps(body)  # deterministic order already puts 2 before 3
    return _ENVELOPE_TAG_HEAD + encoded if envelope.tagged else encoded


def make_envelope(
    manifest: Manifest,
    blocks: tuple[AuthBlock, ...] = (),
    *,
    severable: tuple[tuple[int, bytes], ...] = (),
    integrated: tuple[tuple[str, bytes], ...] = (),
    digest_alg: int = DIGEST_SHA256,
) -> Envelope:
    """Assemble an envelope around a manifest built in code (its digest computed here)."""
    manifest_raw = encode_manifest(manifest)
    digest = SuitDigest.of(cbor.bstr_wrap(manifest_raw), digest_alg)
    auth = Authentication(digest, digest.encode(), tuple(blocks))
    auth = Authentication(auth.digest, auth.digest_raw, auth.blocks, cbor.dumps(auth.to_cbor()))
    return Envelope(auth, manifest, manifest_raw, severable, integrated)


def with_blocks(envelope: Envelope, blocks: tuple[AuthBlock, ...]) -> Envelope:
    """The same envelope with a different set of authentication blocks (signing)."""
    a = envelope.authentication
    auth = Authentication(a.digest, a.digest_raw, tuple(blocks))
    auth = Authentication(auth.digest, auth.digest_raw, auth.blocks, cbor.dumps(auth.to_cbor()))
    return Envelope(
        auth,
        envelope.manifest,
        envelope.manifest_raw,
        envelope.severable,
        envelope.integrated,
        envelope.extensions,
        envelope.tagged,
    )
