"""docs/SECURITY.md stays true: every ATTACKS.md case has a row, every test it names exists.

The traceability table (issue 10 §9) names tests as `test_file.py::test_name`, with
`::test_other` continuing the same file. A renamed or deleted test, or a case left
out, fails here instead of leaving the document quietly wrong. `(pending: ...)`
markers name tests other branches are still bringing; they are listed, not checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "SECURITY.md"

_REF = re.compile(r"`(test_[a-z0-9_]+\.py)?::(test_[a-z0-9_]+)(?:\[[^\]]*\])?`")
_ROW = re.compile(r"^\| (\d+) \|", re.MULTILINE)


def _references(text: str) -> list[tuple[str, str]]:
    """(file, function) for every `file::name` and `::name` (same file as before)."""
    out = []
    for line in text.splitlines():
        current = None
        for m in _REF.finditer(line):
            current = m.group(1) or current
            assert current is not None, f"`::{m.group(2)}` with no file before it: {line}"
            out.append((current, m.group(2)))
    return out


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
    }


def test_every_attacks_case_has_a_row() -> None:
    rows = [int(n) for n in _ROW.findall(DOC.read_text())]
    assert sorted(rows) == list(range(1, 51))


def test_every_named_test_exists() -> None:
    refs = _references(DOC.read_text())
    assert len(refs) > 100
    missing = []
    cache: dict[str, set[str]] = {}
    for file, name in refs:
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(f"{file} (no such file)")
            continue
        names = cache.setdefault(file, _test_names(path))
        if name not in names:
            missing.append(f"{file}::{name}")
    assert not missing, missing


def test_named_test_files_exist() -> None:
    text = DOC.read_text()
    for file in set(re.findall(r"`(test_[a-z0-9_]+\.py)`", text)):
        assert (ROOT / "tests" / file).exists(), file
