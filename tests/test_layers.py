"""The layer table of docs/ARCHITECTURE.md, held by a test: which package may import which.

Every import statement of the project's own code is read with `ast` (function-level
imports included, since a lazy import is still a dependency), and each must be allowed by
the table below, which is the table in docs/ARCHITECTURE.md. A new dependency between
layers is a design decision: make it in both places, or not at all.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STDLIB = frozenset(sys.stdlib_module_names)
IO_STDLIB = frozenset(
    {"asyncio", "socket", "sqlite3", "subprocess", "selectors", "ssl", "threading", "time"}
)
"""Standard modules the sans-I/O core must not import (DESIGN principle 1 and 4)."""

# layer -> (the project layers it may import, the third-party packages it may import)
LAYERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "otacoap.core": (frozenset(), frozenset({"cbor2", "cwt", "cryptography"})),
    "otacoap.fsutil": (frozenset(), frozenset()),
    # The event loop an entry point runs on, chosen in one place (a leaf: imports no otacoap).
    "otacoap.eventloop": (frozenset(), frozenset({"uvloop"})),
    # The argparse pieces (parser, CliError, value types) every command line shares (a leaf).
    "otacoap.cliargs": (frozenset(), frozenset()),
    # Making delta patches (the operator's side; the device's decoder is core.delta).
    "otacoap.patching": (frozenset({"otacoap.core"}), frozenset({"detools"})),
    "otacoap.config": (frozenset({"otacoap.core"}), frozenset()),
    # `otacoap campaign create`'s options, shared with the fleet simulator's --campaign.
    "otacoap.campaign_args": (frozenset({"otacoap.core", "otacoap.cliargs"}), frozenset()),
    "otacoap.store": (
        frozenset({"otacoap.core", "otacoap.config", "otacoap.fsutil"}),
        # psycopg: the PostgreSQL backend (store/postgres.py), imported only when used.
        frozenset({"cryptography", "psycopg"}),
    ),
    "otacoap.operator": (
        frozenset({"otacoap.core", "otacoap.config"}),
        frozenset({"aiocoap"}),
    ),
    "otacoap.server": (
        frozenset({"otacoap.core", "otacoap.config", "otacoap.store", "otacoap.fsutil"}),
        frozenset({"aiocoap", "DTLSSocket", "uvloop", "prometheus_client"}),
    ),
    "otacoap.cli": (
        frozenset(
            {
                "otacoap.core",
                "otacoap.config",
                "otacoap.store",
                "otacoap.server",
                "otacoap.operator",
                "otacoap.fsutil",
                "otacoap.eventloop",
                "otacoap.cliargs",
                "otacoap.campaign_args",
                "otacoap.cli",
                "otacoap.patching",
            }
        ),
        frozenset({"aiocoap", "uvloop"}),
    ),
    "device_sim": (
        frozenset(
            {"otacoap.core", "otacoap.fsutil", "otacoap.eventloop", "otacoap.cliargs", "device_sim"}
        ),
        frozenset({"aiocoap", "DTLSSocket", "uvloop", "matplotlib"}),
    ),
    # The fleet simulator's one declared seam to the operator's side ("I am the operator"):
    # it registers devices and publishes releases like an operator would.
    "device_sim.fleet.operator_role": (
        frozenset(
            {
                "otacoap.core",
                "otacoap.config",
                "otacoap.store",
                "otacoap.operator",
                "otacoap.fsutil",
                "otacoap.eventloop",
                "otacoap.cliargs",
                # `--campaign` parses like `otacoap campaign create`
                "otacoap.campaign_args",
                # `--delta` makes its patch like `otacoap manifest build --delta-from`
                "otacoap.patching",
                "device_sim",
            }
        ),
        frozenset({"aiocoap", "detools"}),
    ),
}
"""Within a layer, modules import each other freely (their own name is implied)."""


def _layer_of(module: str) -> str | None:
    best = None
    for layer in LAYERS:
        if (module == layer or module.startswith(layer + ".")) and (
            best is None or len(layer) > len(best)
        ):
            best = layer
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from otacoap import store` imports the layer otacoap.store.
            for alias in node.names:
                full = f"{name}.{alias.name}"
                if _layer_of(full) not in (None, _layer_of(name)):
                    found.append((node.lineno, full))
    return found


def _sources() -> list[Path]:
    files = sorted((ROOT / "otacoap").rglob("*.py")) + sorted((ROOT / "device_sim").rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def _violations() -> list[str]:
    problems: list[str] = []
    for path in _sources():
        module = _module_name(path)
        # The package root holds only the version: held to the core's rules.
        layer = "otacoap.core" if module == "otacoap" else _layer_of(module)
        if layer is None:
            problems.append(f"{module}: belongs to no layer of the table")
            continue
        own, third_party = LAYERS[layer]
        allowed = own | {layer}
        for line, name in _imports(path):
            top = name.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}"
            if top in ("otacoap", "device_sim"):
                target = _layer_of(name)
                if target is None:
                    if name in ("otacoap", "device_sim"):
                        continue  # the package itself (version string)
                    problems.append(f"{where}: {name} belongs to no layer")
                elif target not in allowed and not any(target.startswith(a + ".") for a in allowed):
                    problems.append(f"{where}: {layer} may not import {target}")
            elif top in STDLIB or top == "__future__":
                if layer == "otacoap.core" and top in IO_STDLIB:
                    problems.append(f"{where}: the core does no I/O, yet imports {name}")
            elif top not in third_party:
                problems.append(f"{where}: {layer} may not import the package {top}")
    return problems


def test_every_import_follows_the_layer_table() -> None:
    problems = _violations()
    assert not problems, "\n".join(problems)


def test_the_table_is_the_one_in_the_architecture_document() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for layer in LAYERS:
        path = "`" + layer.replace(".", "/") + "`"
        assert path in doc or "`" + layer + "`" in doc, f"{layer} is not in docs/ARCHITECTURE.md"


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("otacoap/core/x.py", "import asyncio\n", "does no I/O"),
        ("otacoap/core/x.py", "from ..store import sqlite\n", "may not import otacoap.store"),
        ("otacoap/store/x.py", "from otacoap.server import app\n", "may not import"),
        ("device_sim/x.py", "from otacoap.store import sqlite\n", "may not import"),
        ("otacoap/server/x.py", "import device_sim\n", "may not import device_sim"),
        ("otacoap/core/x.py", "def f():\n    import aiocoap\n", "may not import the package"),
    ],
)
def test_the_checker_catches_a_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str, bad: str
) -> None:
    """The checker itself can fail: a planted bad import is reported."""
    fake = tmp_path / module
    fake.parent.mkdir(parents=True)
    for parent in fake.relative_to(tmp_path).parents:
        if parent != Path("."):
            (tmp_path / parent / "__init__.py").touch()
    fake.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert any(bad in p for p in _violations()), _violations()


def _doc_layers(doc: str) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """The layer table of docs/ARCHITECTURE.md, read back: layer -> (project, third party).

    "everything above" means every layer in a row above; "nothing" and "none" are empty;
    a parenthesis, or a clause after ";", only comments on the names before it.
    """
    section = doc.split("## Layers and who may import whom", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        layer = cells[0].strip("`").replace("/", ".")
        own_cell = re.sub(r"\([^)]*\)", "", cells[2])
        if own_cell.strip().startswith("everything above"):
            own = frozenset(table)
        else:
            own = frozenset(
                n if n.startswith(("otacoap", "device_sim")) else f"otacoap.{n}"
                for n in re.findall(r"[a-z_]+(?:\.[a-z_]+)*", own_cell)
                if n != "nothing"
            )
        third_cell = re.sub(r"\([^)]*\)", "", cells[3]).split(";")[0]  # "; no I/O ..."
        third = frozenset(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", third_cell))
        table[layer] = (own, third - {"none"})
    return table


def _expected_layers() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """LAYERS as the document writes it: a layer's own name implied, not listed."""
    return {layer: (own - {layer}, third) for layer, (own, third) in LAYERS.items()}


def test_the_documented_permissions_are_the_tested_ones() -> None:
    """Not only the layer names: each row's imports, project and third party, match LAYERS."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert _doc_layers(doc) == _expected_layers()


def test_a_drifted_document_row_is_caught() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    drifted = doc.replace(
        "| core, config, fsutil | cryptography, psycopg |", "| core | cryptography |"
    )
    assert drifted != doc
    assert _doc_layers(drifted) != _expected_layers()
