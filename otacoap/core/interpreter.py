"""The SUIT command-sequence interpreter (manifest-34 §6, §8.4.10), sans-I/O.

`run(...)` is a generator: it yields an *action* whenever the device must touch the
world (fetch, write, copy, swap, invoke, or answer a condition it cannot judge from the
device description) and receives the result through `send()`. So the same interpreter
serves a real agent (which streams blocks into flash), a bootloader, and tests, and the
core never does I/O itself.

Semantics implemented (DIGEST.md §4):
- parameters are cleared at the start of a procedure and kept per component;
- set-component-index: an int, `true` (every component) or a list; with more than one
  component every sequence must begin with it;
- override-parameters replaces, set-parameters (trust-domains) only fills unset keys;
- a failed condition ends the sequence; a failed directive always aborts;
- try-each: alternatives with soft-failure defaulting to True, first success wins, a
  trailing nil always succeeds, none succeeding is a failure;
- run-sequence: soft-failure defaults to False; with it True a failed condition only
  ends that nested sequence;
- setting soft-failure outside try-each / run-sequence aborts;
- unknown conditions fail, unknown directives abort.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from . import suit
from .errors import CommandError, ConditionFailed, SeveredElementError

# --- what the interpreter asks of its host ----------------------------------------


@dataclass(frozen=True)
class Fetch:
    """Fetch `uri` into component `component`; the host checks digest and size."""

    component: int
    uri: str
    digest: suit.SuitDigest | None
    size: int | None
    # suit-parameter-encryption-info (firmware-encryption §4): the payload is ciphertext
    # the host decrypts while it stores it; digest and size are the plaintext's.
    encryption_info: bytes | None = None


@dataclass(frozen=True)
class Write:
    component: int
    content: bytes
    encryption_info: bytes | None = None


@dataclass(frozen=True)
class Copy:
    component: int
    source: int
    encryption_info: bytes | None = None


@dataclass(frozen=True)
class Swap:
    component: int
    source: int


@dataclass(frozen=True)
class Invoke:
    component: int
    args: bytes | None


@dataclass(frozen=True)
class CheckImage:
    """condition-image-match: does the component hold an image with this digest/size?"""

    component: int
    digest: suit.SuitDigest
    size: int | None


@dataclass(frozen=True)
class CheckCondition:
    """A condition the host must judge (slot, content, battery, version, ...).

    The host answers True or False; a host that does not know the condition must
    answer False (manifest-34 §8.4.10: unknown conditions report failure).
    """

    code: int
    component: int
    parameters: dict[int, Any]


Action = Fetch | Write | Copy | Swap | Invoke | CheckImage | CheckCondition


@dataclass(frozen=True)
class DeviceDescription:
    """What the device knows about itself, to judge identity conditions."""

    vendor_id: bytes | None = None
    class_id: bytes | None = None
    device_id: bytes | None = None


UPDATE = "update"
INVOKE = "invoke"
PROCEDURES = {
    # manifest-34 §6.2 / trust-domains: Staging then Installation, then validate.
    UPDATE: (
        suit.M_DEPENDENCY_RESOLUTION,
        suit.M_PAYLOAD_FETCH,
        suit.M_CANDIDATE_VERIFICATION,
        suit.M_INSTALL,
        suit.M_VALIDATE,
    ),
    INVOKE: (suit.M_VALIDATE, suit.M_LOAD, suit.M_INVOKE),
}

_SOFT_FAILURE_KEY = suit.P_SOFT_FAILURE


class _SoftStop(Exception):
    """A condition failed where soft-failure is on: the current sequence just ends."""


class _Run:
    def __init__(self, components: int, device: DeviceDescription) -> None:
        self.n = components
        self.device = device
        self.params: list[dict[int, Any]] = [{} for _ in range(components)]

    def indices(self, arg: Any) -> list[int]:
        if arg is True:
            return list(range(self.n))
        wanted = [arg] if isinstance(arg, int) else list(arg)
        for i in wanted:
            if not 0 <= i < self.n:
                raise CommandError(f"component index {i} out of range (0..{self.n - 1})")
        return wanted

    def sequence(
        self, seq: suit.CommandSequence, current: list[int], soft: bool, nested: bool
    ) -> Generator[Action, Any, None]:
        """Run one sequence for the components in `current` (mutated by index changes)."""
        cmds = seq.commands
        if self.n > 1 and not nested and (not cmds or cmds[0].code != suit.CMD_SET_COMPONENT_INDEX):
            raise CommandError(
                "with several components a sequence must begin with set-component-index"
            )
        for cmd in cmds:
            code, arg = cmd.code, cmd.arg
            if code == suit.CMD_SET_COMPONENT_INDEX:
                current[:] = self.indices(arg)
            elif code in (suit.CMD_OVERRIDE_PARAMETERS, suit.CMD_SET_PARAMETERS):
                if _SOFT_FAILURE_KEY in arg and not nested:
                    raise CommandError(
                        "soft-failure may only be set inside try-each or run-sequence"
                    )
                for i in current:
                    for k, v in arg.items:
                        if code == suit.CMD_OVERRIDE_PARAMETERS or k not in self.params[i]:
                            self.params[i][k] = v
                if nested and _SOFT_FAILURE_KEY in arg:
                    soft = bool(arg.get(_SOFT_FAILURE_KEY))
            elif code == suit.CMD_TRY_EACH:
                for i in list(current):
                    yield from self.try_each(arg, i)
            elif code == suit.CMD_RUN_SEQUENCE:
                for i in list(current):
                    with contextlib.suppress(_SoftStop):
                        yield from self.sequence(arg, [i], soft=False, nested=True)
            else:
                for i in list(current):
                    ok = yield from self.command(code, i)
                    if not ok:
                        if soft:
                            raise _SoftStop
                        raise ConditionFailed(f"{cmd.name} failed for component {i}")

    def try_each(
        self, alternatives: tuple[suit.CommandSequence | None, ...], index: int
    ) -> Generator[Action, Any, None]:
        for alt in alternatives:
            if alt is None:
                return  # manifest-34 §8.4.10.2: a trailing nil makes try-each succeed
            saved = [dict(p) for p in self.params]
            try:
                yield from self.sequence(alt, [index], soft=True, nested=True)
                return
            except (_SoftStop, ConditionFailed):
                self.params = saved
        raise ConditionFailed("no alternative of try-each succeeded")

    def command(self, code: int, i: int) -> Generator[Action, Any, bool]:
        p = self.params[i]
        if code == suit.CMD_VENDOR_IDENTIFIER:
            return _same(p.get(suit.P_VENDOR_ID), self.device.vendor_id)
        if code == suit.CMD_CLASS_IDENTIFIER:
            return _same(p.get(suit.P_CLASS_ID), self.device.class_id)
        if code == suit.CMD_DEVICE_IDENTIFIER:
            return _same(p.get(suit.P_DEVICE_ID), self.device.device_id)
        if code == suit.CMD_ABORT:
            return False
        if code in (suit.CMD_IMAGE_MATCH, suit.CMD_IMAGE_NOT_MATCH):
            digest = p.get(suit.P_IMAGE_DIGEST)
            if digest is None:
                raise CommandError("image-match without an image-digest parameter")
            match = yield CheckImage(i, digest, p.get(suit.P_IMAGE_SIZE))
            return bool(match) == (code == suit.CMD_IMAGE_MATCH)
        if code == suit.CMD_FETCH:
            uri = p.get(suit.P_URI)
            if uri is None:
                raise CommandError("fetch without a uri parameter")
            yield Fetch(
                i,
                uri,
                p.get(suit.P_IMAGE_DIGEST),
                p.get(suit.P_IMAGE_SIZE),
                p.get(suit.P_ENCRYPTION_INFO),
            )
            return True
        if code == suit.CMD_WRITE:
            content = p.get(suit.P_CONTENT)
            if content is None:
                raise CommandError("write without a content parameter")
            yield Write(i, content, p.get(suit.P_ENCRYPTION_INFO))
            return True
        if code in (suit.CMD_COPY, suit.CMD_SWAP):
            src = p.get(suit.P_SOURCE_COMPONENT)
            if src is None or not 0 <= src < self.n:
                raise CommandError(f"{suit.COMMAND_NAMES[code]} needs a valid source-component")
            if code == suit.CMD_SWAP:
                if suit.P_ENCRYPTION_INFO in p:
                    raise CommandError("swap cannot decrypt (firmware-encryption: write, copy)")
                yield Swap(i, src)
            else:
                yield Copy(i, src, p.get(suit.P_ENCRYPTION_INFO))
            return True
        if code == suit.CMD_INVOKE:
            yield Invoke(i, p.get(suit.P_INVOKE_ARGS))
            return True
        if code in suit.COMMAND_NAMES and suit.COMMAND_NAMES[code].startswith("condition-"):
            answer = yield CheckCondition(code, i, dict(p))
            return bool(answer)
        if code < 0 or code not in suit.COMMAND_NAMES:
            # Unknown (or custom) command: we cannot tell a condition from a directive,
            # so it fails; outside soft-failure that aborts (manifest-34 §8.4.10).
            return False
        raise CommandError(f"{suit.COMMAND_NAMES[code]} is not supported by this processor")


def _same(expected: Any, actual: bytes | None) -> bool:
    if not isinstance(expected, bytes) or actual is None:
        return False
    return hmac.compare_digest(expected, actual)


def resolve_sequence(envelope: suit.Envelope, key: int) -> suit.CommandSequence | None:
    """The sequence for `key`, taking a severed one from the envelope when present.

    The caller must have passed the envelope through the trust gate, which checks every
    severable element against its digest.
    """
    manifest = envelope.manifest
    seq = manifest.sequence(key)
    if seq is not None:
        return seq
    if manifest.severed_digest(key) is not None:
        member = suit.severed_member(envelope, key)
        if not isinstance(member, suit.CommandSequence):
            raise SeveredElementError(
                f"{suit.SEQUENCE_NAMES.get(key, key)} is severed and not in the envelope"
            )
        return member
    return None


def run(
    envelope: suit.Envelope, procedure: str, device: DeviceDescription
) -> Generator[Action, Any, None]:
    """Run a procedure ("update" or "invoke"): yield actions, receive their results."""
    manifest = envelope.manifest
    run_ = _Run(suit.component_count(manifest.common), device)
    shared = manifest.common.shared_sequence
    for key in PROCEDURES[procedure]:
        seq = resolve_sequence(envelope, key)
        if seq is None:
            continue
        # manifest-34 §6.3: the shared sequence runs before each sequence.
        current = [0] if run_.n == 1 else []
        if shared is not None:
            yield from _top(run_, shared, current)
        yield from _top(run_, seq, current)


def _top(run_: _Run, seq: suit.CommandSequence, current: list[int]) -> Generator[Action, Any, None]:
    try:
        yield from run_.sequence(seq, current, soft=False, nested=False)
    except _SoftStop as exc:  # pragma: no cover - soft is False at the top level
        raise ConditionFailed("condition failed") from exc


def drive(gen: Generator[Action, Any, None], answer: Any) -> list[Action]:
    """Run a generator to the end, answering each action with `answer(action)`.

    For synchronous hosts (the bootloader, tests); the async agent drives it itself.
    """
    actions: list[Action] = []
    try:
        action = next(gen)
        while True:
            actions.append(action)
            action = gen.send(answer(action))
    except StopIteration:
        return actions
