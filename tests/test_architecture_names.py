"""docs/ARCHITECTURE.md names real code (issue 9 §5: "the walk of one envelope ...
naming the functions on the way").

A name in the architecture document that no longer exists sends a reader to nothing:
`SQLiteStore.add_release` outlived its rename to `commit_release` that way. Each
`Class.member` the document names must be a member of that class (or of a project base
class), and each name given right after a module (`` `core/trust.py` `authenticate` ``)
must be defined in that module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("otacoap", "device_sim")


def _classes() -> dict[str, tuple[set[str], list[str]]]:
    """class name -> (members defined in it, names of its bases), over the project."""
    found: dict[str, tuple[set[str], list[str]]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ClassDef):
                    continue
                members, bases = found.setdefault(node.name, (set(), []))
                bases += [ast.unparse(b).split(".")[-1].split("[")[0] for b in node.bases]
                for sub in ast.walk(node):
                    if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                        members.add(sub.name)
                    elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        members.add(sub.id)
                    elif (
                        isinstance(sub, ast.Attribute)
                        and isinstance(sub.ctx, ast.Store)
                        and isinstance(sub.value, ast.Name)
                        and sub.value.id == "self"
                    ):
                        members.add(sub.attr)
    return found


def _has(classes: dict[str, tuple[set[str], list[str]]], cls: str, member: str) -> bool:
    seen: set[str] = set()
    todo = [cls]
    while todo:
        name = todo.pop()
        if name in seen or name not in classes:
            continue
        seen.add(name)
        members, bases = classes[name]
        if member in members:
            return True
        todo += bases
    return False


def _module_definitions(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _module_path(text: str) -> Path | None:
    for base in ("", "otacoap/", "device_sim/"):
        path = ROOT / (base + text)
        if path.is_file():
            return path
    return None


def test_every_class_member_the_document_names_exists() -> None:
    doc = DOC.read_text()
    classes = _classes()
    named = set(re.findall(r"`([A-Z][A-Za-z0-9]+)\.([a-z_][A-Za-z0-9_]*)`", doc))
    named |= set(re.findall(r"`([A-Z][A-Za-z0-9]+)\.([a-z_][A-Za-z0-9_]*)[` (]", doc))
    project = {(c, m) for c, m in named if c in classes}
    assert len(project) > 20, "the document names code"
    missing = sorted(f"{c}.{m}" for c, m in project if not _has(classes, c, m))
    assert missing == []


def test_every_name_given_after_its_module_is_defined_there() -> None:
    doc = DOC.read_text()
    missing = []
    checked = 0
    # `path/to/module.py` `name`, `name2` (only names that follow the module directly)
    for module, names in re.findall(r"`([a-z_/]+\.py)`((?:,? `[A-Za-z_][A-Za-z0-9_]*`)+)", doc):
        path = _module_path(module)
        if path is None:
            missing.append(module)
            continue
        defined = _module_definitions(path)
        for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", names):
            checked += 1
            if name not in defined:
                missing.append(f"{module} {name}")
    assert checked > 20, "the document names code"
    assert missing == []
