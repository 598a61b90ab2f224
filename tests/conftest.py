"""Shared fixtures: the IETF/libcsuit vectors in ../shared, read in place (never copied)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("OTACOAP_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "suit" / "vectors"
KEYS = SHARED / "suit" / "keys"


@dataclass(frozen=True)
class Vector:
    name: str
    data: bytes
    meta: dict[str, Any]

    @property
    def expected(self) -> dict[str, Any]:
        return self.meta["expected"]

    @property
    def should_accept(self) -> bool:
        """accept/reject as the vector's JSON names it (legacy -18 schema: reject)."""
        outcome = self.meta["expected_processor_outcome"].lower()
        return outcome.startswith("accept")


def _load_vectors() -> list[Vector]:
    if not VECTORS.is_dir():
        return []
    out = []
    for hexfile in sorted(VECTORS.glob("*.hex")):
        meta = json.loads(hexfile.with_suffix(".json").read_text())
        out.append(Vector(hexfile.stem, bytes.fromhex(hexfile.read_text().strip()), meta))
    return out


ALL_VECTORS = _load_vectors()


def require_vectors() -> None:
    """In CI the shared vectors must be there: a missing corpus fails, it never skips."""
    if ALL_VECTORS:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"shared SUIT vectors missing at {VECTORS} (set OTACOAP_SHARED)")
    pytest.skip(f"shared SUIT vectors not found at {VECTORS}")


@pytest.fixture(scope="session")
def vectors() -> list[Vector]:
    require_vectors()
    return ALL_VECTORS


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    require_vectors()
    return KEYS


# --- store backends ----------------------------------------------------------------
# The store's tests run against both backends: the embedded SQLite file and a real
# PostgreSQL server the suite starts itself (tests/pg_server.py), one per session.


@pytest.fixture(scope="session")
def pg_server() -> Any:
    from pg_server import running_server

    with running_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """'' for SQLite in the data directory, or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return ""
    server = request.getfixturevalue("pg_server")
    return str(server.new_database())
