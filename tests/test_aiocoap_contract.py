"""The aiocoap internals otacoap relies on, checked in one place.

aiocoap documents its Context, Message and resource API; its message layer and
transports are not API. The server (otacoap/server/coap/) and the device
(device_sim/coap/) use some of them anyway, each package listing what it uses in
`contract.RELIES_ON`. This test walks both tables against the installed aiocoap (pinned
in pyproject.toml), so an upgrade that renames a method, changes a signature or stops
calling a hook we override fails here, loudly, instead of degrading at run time
(unbounded dedup memory, lost DoS bounds, hung handshakes). It also keeps the quarantine
closed: no private aiocoap name outside the two packages, and no private attribute in
them that their table does not name.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from device_sim.coap import contract as device_contract
from otacoap.server.coap import contract as server_contract

ROOT = Path(__file__).resolve().parent.parent
QUARANTINES = {
    "otacoap/server/coap": server_contract.RELIES_ON,
    "device_sim/coap": device_contract.RELIES_ON,
}
ENTRIES = [(pkg, spec) for pkg, table in QUARANTINES.items() for spec in table]
# The project's own check (issue 9, a grep of otacoap and device_sim): private aiocoap
# names only inside a quarantine.
PRIVATE_USE = re.compile(
    r"from aiocoap[.a-z_]* import _|aiocoap\.transports\.|messagemanager"
    r"|_run_retransmissions|_dtls_socket|request_interfaces"
)


def _split(spec: str) -> tuple[str, str | None, str | None]:
    """(module:Name.path, signature or None, source snippet or None)."""
    if " ~ " in spec:
        name, snippet = spec.split(" ~ ", 1)
        return name, None, snippet
    if spec.endswith(")"):
        at = spec.index("(")
        return spec[:at], spec[at:], None
    return spec, None, None


def _assigned_on_self(cls: type, attr: str) -> bool:
    """Whether `self.<attr> = ...` appears in the source of `cls` or one of its bases."""
    assignment = re.compile(rf"\bself\.{re.escape(attr)}\s*(?::[^=\n]*)?=(?!=)")
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # a C extension type: no Python source
            continue
        if assignment.search(source):
            return True
    return False


def _resolve(name: str) -> Any:
    module_name, path = name.split(":")
    obj: Any = importlib.import_module(module_name)
    parts = path.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif i == len(parts) - 1 and inspect.isclass(obj) and _assigned_on_self(obj, part):
            return None  # an instance attribute: it exists, there is no object to inspect
        else:
            raise AssertionError(f"{name}: {'.'.join(parts[: i + 1])} is gone")
    return obj


def _bare_signature(obj: Any) -> str:
    """The signature without annotations: what we call or override, not how it is typed."""
    sig = inspect.signature(obj)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize(("package", "spec"), ENTRIES, ids=[s for _, s in ENTRIES])
def test_each_private_name_we_rely_on_is_there_as_we_use_it(package: str, spec: str) -> None:
    name, signature, snippet = _split(spec)
    obj = _resolve(name)
    if signature is not None:
        assert obj is not None and callable(obj), f"{name} is no longer callable"
        assert _bare_signature(obj) == signature, (
            f"{name}{_bare_signature(obj)} changed; {package} uses {name}{signature}"
        )
    if snippet is not None:
        source = inspect.getsource(obj)
        assert snippet in source, f"{name} no longer does `{snippet}` ({package} relies on it)"


def _private_names(tree: ast.AST) -> set[str]:
    """Private attributes reached and private names imported."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def _own_names(tree: ast.Module) -> set[str]:
    """Private names the package defines itself: functions, classes, module and class
    level assignments, and attributes its own classes set on `self` in `__init__`."""
    own: set[str] = set()

    def targets(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Assign):
                own.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                own.add(stmt.target.id)

    targets(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        if isinstance(node, ast.ClassDef):
            targets(node.body)
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            own.update(
                sub.attr
                for sub in ast.walk(node)
                if isinstance(sub, ast.Attribute)
                and isinstance(sub.ctx, ast.Store)
                and isinstance(sub.value, ast.Name)
                and sub.value.id == "self"
            )
    return own


@pytest.mark.parametrize("package", list(QUARANTINES))
def test_every_private_name_a_quarantine_reaches_is_in_its_table(package: str) -> None:
    used: set[str] = set()
    own: set[str] = set()
    for path in sorted((ROOT / package).glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        used |= _private_names(tree)
        own |= _own_names(tree)
    declared = " ".join(QUARANTINES[package])
    missing = sorted(n for n in used - own if not re.search(rf"\b{n}\b", declared))
    assert not missing, f"{package} uses private names its contract.RELIES_ON does not list"


def test_no_private_aiocoap_name_outside_the_quarantines() -> None:
    offenders = []
    for top in ("otacoap", "device_sim"):
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if "/coap/" not in relative and PRIVATE_USE.search(path.read_text()):
                offenders.append(relative)
    assert offenders == []


def test_the_pin_is_the_version_this_contract_was_checked_against() -> None:
    import aiocoap.meta

    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"aiocoap\[tinydtls\]==([0-9.]+)"', pyproject)
    assert pin is not None, "pyproject.toml must pin aiocoap to one exact version"
    assert aiocoap.meta.version == pin.group(1)


def test_the_device_hardens_every_dtls_client_context() -> None:
    """`harden_dtls` wraps the tinydtls client's connection factory, and refuses a
    context without one instead of leaving the hanging timer in place."""
    import asyncio

    import aiocoap

    from device_sim.coap.dtls_retransmit import harden_dtls, run_dtls_retransmissions

    async def go() -> None:
        ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
        try:
            harden_dtls(ctx)
            messages = ctx.request_interfaces[0].token_interface.message_interface
            factory = messages._connection_for_address
            assert factory.__name__ == "connection_for_address", factory
            assert run_dtls_retransmissions.__name__ in inspect.getsource(factory)
        finally:
            await ctx.shutdown()
        plain = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            with pytest.raises(RuntimeError, match="no tinydtls client transport"):
                harden_dtls(plain)
        finally:
            await plain.shutdown()

    asyncio.run(go())
