"""otacoap/core takes bytes and returns values: no I/O, no clocks, no randomness.

DESIGN.md layers table and principles 1 and 4: the core may import the stdlib's pure
parts, cbor2, cwt and cryptography, never asyncio, aiocoap, sockets, files, subprocesses,
clocks or random sources. Checked twice: statically on the AST of every module, and
dynamically by importing every module in a fresh interpreter where those modules are
poisoned in sys.modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "otacoap" / "core"
CORE_FILES = sorted(CORE.glob("*.py"))

FORBIDDEN_MODULES = frozenset(
    {
        "asyncio",
        "aiocoap",
        "uvloop",
        "socket",
        "ssl",
        "selectors",
        "select",
        "sqlite3",
        "subprocess",
        "multiprocessing",
        "os",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
        "glob",
        "fcntl",
        "mmap",
        "time",
        "datetime",
        "random",
        "secrets",
    }
)
# Builtins that reach the outside world or import by name behind the AST check's back.
FORBIDDEN_CALLS = frozenset({"open", "input", "print", "__import__", "breakpoint", "exec", "eval"})
# File methods of pathlib/io objects, in case one arrives by another route.
FORBIDDEN_METHODS = frozenset(
    {"read_text", "write_text", "read_bytes", "write_bytes", "import_module", "urlopen"}
)


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _violations(source: str) -> list[str]:
    tree = ast.parse(source)
    bad = [
        f"line {line}: imports {name}"
        for line, name in _imported_modules(tree)
        if name.split(".")[0] in FORBIDDEN_MODULES
    ]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
            bad.append(f"line {node.lineno}: calls {func.id}()")
        elif isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_METHODS:
            bad.append(f"line {node.lineno}: calls .{func.attr}()")
    return bad


def test_core_package_has_modules() -> None:
    names = {p.name for p in CORE_FILES}
    assert {"cbor.py", "suit.py", "cose.py", "trust.py", "interpreter.py"} <= names


@pytest.mark.parametrize("path", CORE_FILES, ids=[p.name for p in CORE_FILES])
def test_core_module_imports_and_calls_no_io(path: Path) -> None:
    assert _violations(path.read_text()) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import asyncio",
        "import os.path",
        "from time import monotonic",
        "from socket import socket",
        "import random as r",
        "def f():\n    import sqlite3",
        "data = open('x').read()",
        "p.read_bytes()",
        "__import__('subprocess')",
    ],
)
def test_the_ast_check_catches_io(snippet: str) -> None:
    """The static check is able to fail: each of these is flagged."""
    assert _violations(snippet)


def test_allowed_imports_are_not_flagged() -> None:
    src = "import hashlib, hmac, uuid\nimport cbor2\nfrom cwt import COSEKey\nfrom . import suit\n"
    assert _violations(src) == []


_POISON_PROGRAM = """
import importlib, sys
# Allowed dependencies may use these modules internally: load them first.
import cbor2, cwt, hashlib, hmac, uuid, urllib.parse, contextlib, dataclasses, enum, typing
import cryptography.hazmat.primitives.serialization
import cryptography.hazmat.primitives.asymmetric.ec
import cryptography.hazmat.primitives.asymmetric.ed25519
for name in sys.argv[2:]:
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]
    sys.modules[name] = None  # any later `import name` raises ImportError
failed = []
for module in sys.argv[1].split(","):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        failed.append(f"{module}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _import_with_poison(
    modules: list[str], poisoned: list[str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _POISON_PROGRAM, ",".join(modules), *poisoned],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=CORE.parent.parent,
    )


def test_every_core_module_imports_with_io_modules_poisoned() -> None:
    modules = [f"otacoap.core.{p.stem}" for p in CORE_FILES if p.stem != "__init__"]
    result = _import_with_poison(modules, sorted(FORBIDDEN_MODULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_poisoning_does_block_a_direct_import() -> None:
    """The dynamic check is able to fail: a module importing a poisoned name is caught."""
    result = _import_with_poison(["otacoap.core.cbor", "sqlite3"], ["sqlite3"])
    assert result.returncode == 1
    assert "sqlite3" in result.stdout
