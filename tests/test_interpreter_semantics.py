"""The SUIT command interpreter (otacoap.core.interpreter), driven like a device would.

manifest-34 §6 / §8.4.10 semantics (DIGEST.md §4): the order of actions for the update
and invocation procedures, identity conditions, set-component-index, try-each,
run-sequence with soft-failure, unknown conditions, multi-component rules and severed
members; then the draft's own examples 0-5 driven by a host that answers every check
with True.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Generator
from typing import Any

import pytest
from conftest import Vector

from otacoap.core import build, ids, interpreter, suit
from otacoap.core.build import Release
from otacoap.core.errors import CommandError, ConditionFailed, SeveredElementError
from otacoap.core.interpreter import (
    INVOKE,
    UPDATE,
    Action,
    CheckCondition,
    CheckImage,
    Copy,
    DeviceDescription,
    Fetch,
    Invoke,
    Write,
)
from otacoap.core.suit import Command, CommandSequence, Parameters, SuitDigest

VENDOR = ids.vendor_id("example.com")
CLASS = ids.class_id(VENDOR, "board")
DEVICE = DeviceDescription(VENDOR, CLASS)
ARM_VENDOR = ids.vendor_id("arm.com")
ARM_DEVICE = DeviceDescription(ARM_VENDOR, ids.class_id(ARM_VENDOR, "suit"))
DIGEST = SuitDigest(suit.DIGEST_SHA256, hashlib.sha256(b"image").digest())
EXAMPLE_DIGEST = SuitDigest(
    suit.DIGEST_SHA256,
    bytes.fromhex("00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"),
)
EXAMPLE_DIGEST_2 = SuitDigest(
    suit.DIGEST_SHA256,
    bytes.fromhex("0123456789abcdeffedcba987654321000112233445566778899aabbccddeeff"),
)


def seq(*commands: tuple[int, Any]) -> CommandSequence:
    return CommandSequence.build([Command(code, arg) for code, arg in commands])


def params(**named: Any) -> Parameters:
    keys = {
        "vendor": suit.P_VENDOR_ID,
        "klass": suit.P_CLASS_ID,
        "digest": suit.P_IMAGE_DIGEST,
        "size": suit.P_IMAGE_SIZE,
        "uri": suit.P_URI,
        "slot": suit.P_COMPONENT_SLOT,
        "soft": suit.P_SOFT_FAILURE,
        "content": suit.P_CONTENT,
        "source": suit.P_SOURCE_COMPONENT,
    }
    return Parameters(tuple((keys[k], v) for k, v in named.items()))


OVERRIDE = suit.CMD_OVERRIDE_PARAMETERS


def envelope(
    *,
    components: int = 1,
    shared: CommandSequence | None = None,
    members: dict[int, Any] | None = None,
    severable: tuple[tuple[int, bytes], ...] = (),
) -> suit.Envelope:
    common = suit.Common(tuple((bytes([i]),) for i in range(components)), shared)
    manifest = suit.Manifest(1, 1, common, tuple(sorted((members or {}).items())))
    return suit.make_envelope(manifest, severable=severable)


def answer_true(action: Action) -> Any:
    return True if isinstance(action, CheckImage | CheckCondition) else None


def run(
    env: suit.Envelope,
    procedure: str = UPDATE,
    device: DeviceDescription = DEVICE,
    answer: Callable[[Action], Any] = answer_true,
    seen: list[Action] | None = None,
) -> list[Action]:
    """Drive the generator; `seen` keeps the actions yielded before an exception."""
    gen: Generator[Action, Any, None] = interpreter.run(env, procedure, device)
    actions = seen if seen is not None else []
    try:
        action = next(gen)
        while True:
            actions.append(action)
            action = gen.send(answer(action))
    except StopIteration:
        return actions


_PROBE = """
from otacoap.core import interpreter, suit
seq = suit.CommandSequence.build([
    suit.Command(suit.CMD_OVERRIDE_PARAMETERS, suit.Parameters(((suit.P_URI, "/fw/1"),))),
    suit.Command(suit.CMD_FETCH, 2),
])
manifest = suit.Manifest(1, 1, suit.Common(((b"\\x00",),)), ((suit.M_INSTALL, seq),))
env = suit.make_envelope(manifest)
gen = interpreter.run(env, "update", interpreter.DeviceDescription())
actions = interpreter.drive(gen, lambda a: None)
assert actions == [interpreter.Fetch(0, "/fw/1", None, None)], actions
"""


def test_override_parameters_runs_without_crashing() -> None:
    """In a fresh interpreter, so no patch loaded by another test module can mask a bug."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# -- our own manifests -------------------------------------------------------------------

RELEASE = Release(DIGEST.value, 1234, "example.com", "board", 7, "coaps://fw.example.com/fw/1")


def test_update_of_built_manifest_fetches_then_checks_the_image() -> None:
    actions = run(build.build_envelope(RELEASE), UPDATE)
    assert actions == [
        Fetch(0, "coaps://fw.example.com/fw/1", DIGEST, 1234),  # install: fetch
        CheckImage(0, DIGEST, 1234),  # install: image-match
        CheckImage(0, DIGEST, 1234),  # validate: image-match
    ]


def test_invoke_of_built_manifest_checks_the_image_then_invokes() -> None:
    assert run(build.build_envelope(RELEASE), INVOKE) == [
        CheckImage(0, DIGEST, 1234),
        Invoke(0, None),
    ]


def test_invoke_stops_when_the_image_does_not_match() -> None:
    seen: list[Action] = []
    with pytest.raises(ConditionFailed):
        run(build.build_envelope(RELEASE), INVOKE, answer=lambda a: False, seen=seen)
    assert not any(isinstance(a, Invoke) for a in seen)


@pytest.mark.parametrize(
    "device",
    [
        DeviceDescription(ids.vendor_id("other.example"), CLASS),
        DeviceDescription(VENDOR, ids.class_id(VENDOR, "other-board")),
        DeviceDescription(None, None),
    ],
    ids=["other-vendor", "other-class", "unknown-identity"],
)
def test_vendor_or_class_mismatch_fails_before_any_fetch(device: DeviceDescription) -> None:
    seen: list[Action] = []
    with pytest.raises(ConditionFailed):
        run(build.build_envelope(RELEASE), UPDATE, device=device, seen=seen)
    assert seen == []


# -- set-component-index -----------------------------------------------------------------


def _check_all(index: Any, components: int = 3) -> suit.Envelope:
    return envelope(
        components=components,
        members={
            suit.M_VALIDATE: seq(
                (suit.CMD_SET_COMPONENT_INDEX, index),
                (OVERRIDE, params(digest=DIGEST, size=5)),
                (suit.CMD_IMAGE_MATCH, 15),
            )
        },
    )


@pytest.mark.parametrize(
    ("index", "order"),
    [(True, [0, 1, 2]), ((2, 0), [2, 0]), ((1,), [1]), (2, [2])],
    ids=["true", "list", "one-list", "int"],
)
def test_set_component_index_selects_components_in_order(index: Any, order: list[int]) -> None:
    assert run(_check_all(index)) == [CheckImage(i, DIGEST, 5) for i in order]


@pytest.mark.parametrize("index", [3, (0, 3)], ids=["int", "list"])
def test_set_component_index_out_of_range_aborts(index: Any) -> None:
    with pytest.raises(CommandError):
        run(_check_all(index))


def test_several_components_need_a_leading_set_component_index() -> None:
    env = envelope(components=2, members={suit.M_VALIDATE: seq((suit.CMD_IMAGE_MATCH, 15))})
    with pytest.raises(CommandError) as info:
        run(env)
    assert type(info.value) is CommandError


def test_several_components_shared_sequence_also_needs_set_component_index() -> None:
    env = envelope(
        components=2,
        shared=seq((suit.CMD_VENDOR_IDENTIFIER, 15)),
        members={suit.M_VALIDATE: seq((suit.CMD_SET_COMPONENT_INDEX, 0))},
    )
    with pytest.raises(CommandError):
        run(env)


# -- try-each ----------------------------------------------------------------------------


def _slot_alternative(slot: int, uri: str) -> CommandSequence:
    return seq((OVERRIDE, params(slot=slot, uri=uri)), (suit.CMD_COMPONENT_SLOT, 5))


def _try_each(*alternatives: CommandSequence | None) -> suit.Envelope:
    return envelope(
        members={
            suit.M_INSTALL: seq(
                (suit.CMD_TRY_EACH, tuple(alternatives)), (suit.CMD_FETCH, 2), (suit.CMD_INVOKE, 2)
            )
        }
    )


def _slot_host(free_slot: int | None) -> Callable[[Action], Any]:
    def answer(action: Action) -> Any:
        if isinstance(action, CheckCondition):
            assert action.code == suit.CMD_COMPONENT_SLOT
            return action.parameters.get(suit.P_COMPONENT_SLOT) == free_slot
        return None

    return answer


def test_try_each_takes_the_first_alternative_that_succeeds() -> None:
    env = _try_each(
        _slot_alternative(0, "/a"), _slot_alternative(1, "/b"), _slot_alternative(2, "/c")
    )
    actions = run(env, answer=_slot_host(1))
    checks = [a for a in actions if isinstance(a, CheckCondition)]
    assert [c.parameters[suit.P_COMPONENT_SLOT] for c in checks] == [
        0,
        1,
    ]  # stops at the first success
    assert [a for a in actions if not isinstance(a, CheckCondition)] == [
        Fetch(0, "/b", None, None),
        Invoke(0, None),
    ]


def test_try_each_rolls_back_parameters_of_a_failed_alternative() -> None:
    failing = seq(
        (OVERRIDE, params(slot=0, uri="/from-failed", size=99)), (suit.CMD_COMPONENT_SLOT, 5)
    )
    succeeding = seq((OVERRIDE, params(slot=1)), (suit.CMD_COMPONENT_SLOT, 5))
    env = envelope(
        members={
            suit.M_INSTALL: seq(
                (OVERRIDE, params(uri="/default")),
                (suit.CMD_TRY_EACH, (failing, succeeding)),
                (suit.CMD_FETCH, 2),
            )
        }
    )
    actions = run(env, answer=_slot_host(1))
    assert actions[-1] == Fetch(0, "/default", None, None)


def test_try_each_with_trailing_nil_always_succeeds() -> None:
    env = _try_each(_slot_alternative(0, "/a"), _slot_alternative(1, "/b"), None)
    with pytest.raises(CommandError, match="uri"):
        # Every alternative failed, nil made try-each succeed, so the fetch runs (and,
        # with no uri set by any surviving alternative, aborts as a directive must).
        run(env, answer=_slot_host(None))


def test_try_each_with_trailing_nil_continues_with_the_sequence() -> None:
    env = envelope(
        members={
            suit.M_INSTALL: seq(
                (OVERRIDE, params(uri="/default")),
                (suit.CMD_TRY_EACH, (_slot_alternative(0, "/a"), None)),
                (suit.CMD_FETCH, 2),
            )
        }
    )
    actions = run(env, answer=_slot_host(None))
    assert actions[-1] == Fetch(0, "/default", None, None)


def test_try_each_fails_when_every_alternative_fails() -> None:
    env = _try_each(_slot_alternative(0, "/a"), _slot_alternative(1, "/b"))
    seen: list[Action] = []
    with pytest.raises(ConditionFailed):
        run(env, answer=_slot_host(7), seen=seen)
    assert not any(isinstance(a, Fetch) for a in seen)


def test_directive_failure_inside_try_each_aborts_instead_of_trying_the_next() -> None:
    broken = seq((suit.CMD_FETCH, 2))  # fetch without a uri: a directive failure
    env = _try_each(broken, _slot_alternative(1, "/b"))
    with pytest.raises(CommandError) as info:
        run(env, answer=_slot_host(1))
    assert not isinstance(info.value, ConditionFailed)


# -- run-sequence and soft-failure -------------------------------------------------------


def test_run_sequence_with_soft_failure_ends_only_the_nested_sequence() -> None:
    nested = seq((OVERRIDE, params(soft=True)), (suit.CMD_ABORT, 2), (suit.CMD_INVOKE, 2))
    env = envelope(
        members={
            suit.M_INVOKE: seq(
                (suit.CMD_RUN_SEQUENCE, nested),
                (OVERRIDE, params(content=b"x")),
                (suit.CMD_WRITE, 2),
            )
        }
    )
    assert run(env, INVOKE) == [Write(0, b"x")]  # the nested invoke never ran, the outer went on


def test_run_sequence_without_soft_failure_fails_the_whole_sequence() -> None:
    nested = seq((suit.CMD_ABORT, 2), (suit.CMD_INVOKE, 2))
    env = envelope(
        members={suit.M_INVOKE: seq((suit.CMD_RUN_SEQUENCE, nested), (suit.CMD_INVOKE, 2))}
    )
    seen: list[Action] = []
    with pytest.raises(ConditionFailed):
        run(env, INVOKE, seen=seen)
    assert seen == []


@pytest.mark.parametrize("where", ["top", "shared"])
def test_soft_failure_set_outside_try_each_or_run_sequence_aborts(where: str) -> None:
    bad = seq((OVERRIDE, params(soft=True)), (suit.CMD_INVOKE, 2))
    if where == "top":
        env = envelope(members={suit.M_INVOKE: bad})
    else:
        env = envelope(shared=bad, members={suit.M_INVOKE: seq((suit.CMD_INVOKE, 2))})
    seen: list[Action] = []
    with pytest.raises(CommandError) as info:
        run(env, INVOKE, seen=seen)
    assert type(info.value) is CommandError
    assert seen == []


# -- conditions --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [13, 17, 30, 99, -257], ids=str)
def test_unknown_condition_fails(code: int) -> None:
    env = envelope(members={suit.M_INVOKE: seq((code, 15), (suit.CMD_INVOKE, 2))})
    seen: list[Action] = []
    with pytest.raises(ConditionFailed):
        run(env, INVOKE, seen=seen)
    assert seen == []


def test_unknown_condition_inside_try_each_moves_on_to_the_next_alternative() -> None:
    env = _try_each(seq((99, 15)), seq((OVERRIDE, params(uri="/ok"))))
    assert run(env) == [Fetch(0, "/ok", None, None), Invoke(0, None)]


def test_abort_condition_fails() -> None:
    env = envelope(members={suit.M_INVOKE: seq((suit.CMD_ABORT, 2), (suit.CMD_INVOKE, 2))})
    with pytest.raises(ConditionFailed):
        run(env, INVOKE)


def test_host_judged_condition_answered_false_fails() -> None:
    env = envelope(
        members={suit.M_INVOKE: seq((suit.CMD_MINIMUM_BATTERY, 15), (suit.CMD_INVOKE, 2))}
    )
    seen: list[Action] = []
    with pytest.raises(ConditionFailed):
        run(env, INVOKE, answer=lambda a: False, seen=seen)
    assert seen == [CheckCondition(suit.CMD_MINIMUM_BATTERY, 0, {})]


def test_image_match_without_a_digest_aborts() -> None:
    env = envelope(members={suit.M_VALIDATE: seq((suit.CMD_IMAGE_MATCH, 15))})
    with pytest.raises(CommandError):
        run(env)


# -- severed members ---------------------------------------------------------------------


def _severed_install(carried: bool) -> suit.Envelope:
    install = seq((suit.CMD_INVOKE, 2))
    digest = SuitDigest.of(suit.cbor.bstr_wrap(install.raw))
    return envelope(
        members={suit.M_INSTALL: digest},
        severable=((suit.ENV_INSTALL, install.raw),) if carried else (),
    )


def test_severed_install_absent_is_an_error() -> None:
    with pytest.raises(SeveredElementError):
        run(_severed_install(carried=False))


def test_severed_install_present_is_run() -> None:
    assert run(_severed_install(carried=True)) == [Invoke(0, None)]


def test_severed_install_absent_does_not_block_invocation() -> None:
    env = _severed_install(carried=False)
    assert run(env, INVOKE) == []


def test_vector_with_severed_install_cannot_update(by_name: dict[str, Vector]) -> None:
    env = suit.decode_envelope(by_name["ietf-manifest_ex2_severed_signed"].data)
    with pytest.raises(SeveredElementError):
        run(env, UPDATE, device=ARM_DEVICE)


# -- the draft's examples ----------------------------------------------------------------


@pytest.fixture(scope="module")
def by_name(vectors: list[Vector]) -> dict[str, Vector]:
    return {v.name: v for v in vectors}


def _example(by_name: dict[str, Vector], n: int) -> suit.Envelope:
    return suit.decode_envelope(by_name[f"ietf-manifest_ex{n}_signed"].data)


def _plausible(actions: list[Action], components: int) -> None:
    """Every fetched component is then checked, and nothing names a missing component."""
    for i, action in enumerate(actions):
        assert 0 <= action.component < components
        if isinstance(action, Fetch):
            assert any(
                isinstance(a, CheckImage) and a.component == action.component
                for a in actions[i + 1 :]
            )
    invokes = [i for i, a in enumerate(actions) if isinstance(a, Invoke)]
    assert invokes in ([], [len(actions) - 1])


@pytest.mark.parametrize("n", range(6))
@pytest.mark.parametrize("procedure", [UPDATE, INVOKE])
def test_example_runs_to_completion_with_a_yes_host(
    by_name: dict[str, Vector], n: int, procedure: str
) -> None:
    env = _example(by_name, n)
    actions = run(env, procedure, device=ARM_DEVICE)
    _plausible(actions, suit.component_count(env.manifest.common))
    if procedure == INVOKE:
        assert not any(isinstance(a, Fetch) for a in actions)


def test_example_0_secure_boot_checks_then_boots(by_name: dict[str, Vector]) -> None:
    env = _example(by_name, 0)
    assert run(env, UPDATE, device=ARM_DEVICE) == [CheckImage(0, EXAMPLE_DIGEST, 34768)]
    assert run(env, INVOKE, device=ARM_DEVICE) == [
        CheckImage(0, EXAMPLE_DIGEST, 34768),
        Invoke(0, None),
    ]


def test_example_1_fetches_file_bin_into_component_0(by_name: dict[str, Vector]) -> None:
    actions = run(_example(by_name, 1), UPDATE, device=ARM_DEVICE)
    assert actions[0] == Fetch(0, "http://example.com/file.bin", EXAMPLE_DIGEST, 34768)
    assert actions[1:] == [CheckImage(0, EXAMPLE_DIGEST, 34768)] * 2


def test_example_1_refuses_another_vendor_before_fetching(by_name: dict[str, Vector]) -> None:
    seen: list[Action] = []
    with pytest.raises(ConditionFailed):
        run(_example(by_name, 1), UPDATE, device=DEVICE, seen=seen)
    assert seen == []


def test_example_2_fetches_its_long_uri(by_name: dict[str, Vector]) -> None:
    actions = run(_example(by_name, 2), UPDATE, device=ARM_DEVICE)
    assert actions[0] == Fetch(
        0, "http://example.com/very/long/path/to/file/file.bin", EXAMPLE_DIGEST, 34768
    )


@pytest.mark.parametrize(
    ("free_slot", "uri", "digest", "size"),
    [
        (0, "http://example.com/file1.bin", EXAMPLE_DIGEST, 34768),
        (1, "http://example.com/file2.bin", EXAMPLE_DIGEST_2, 76834),
    ],
)
def test_example_3_fetches_the_image_for_the_free_slot(
    by_name: dict[str, Vector], free_slot: int, uri: str, digest: SuitDigest, size: int
) -> None:
    def host(action: Action) -> Any:
        if isinstance(action, CheckCondition):
            return action.parameters.get(suit.P_COMPONENT_SLOT) == free_slot
        return True if isinstance(action, CheckImage) else None

    fetches = [
        a
        for a in run(_example(by_name, 3), UPDATE, device=ARM_DEVICE, answer=host)
        if isinstance(a, Fetch)
    ]
    assert fetches == [Fetch(0, uri, digest, size)]


def test_example_4_loads_from_external_storage(by_name: dict[str, Vector]) -> None:
    env = _example(by_name, 4)
    update = run(env, UPDATE, device=ARM_DEVICE)
    assert update[0] == Fetch(1, "http://example.com/file.bin", EXAMPLE_DIGEST, None)
    assert Copy(0, 1) in update
    assert update.index(Copy(0, 1)) > update.index(CheckImage(1, EXAMPLE_DIGEST, None))
    invoke = run(env, INVOKE, device=ARM_DEVICE)
    assert Copy(2, 0) in invoke
    assert invoke[-1] == Invoke(2, None)


def test_example_5_fetches_two_images_into_two_components(by_name: dict[str, Vector]) -> None:
    env = _example(by_name, 5)
    fetches = [a for a in run(env, UPDATE, device=ARM_DEVICE) if isinstance(a, Fetch)]
    assert fetches == [
        Fetch(0, "http://example.com/file1.bin", EXAMPLE_DIGEST, 34768),
        Fetch(1, "http://example.com/file2.bin", EXAMPLE_DIGEST_2, 76834),
    ]
    assert run(env, INVOKE, device=ARM_DEVICE)[-1] == Invoke(0, None)
