"""The core stays pure: no transport, database, HSM or client imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "server" / "fedtoken" / "core"
FORBIDDEN = {"grpc", "asyncpg", "pkcs11", "aiohttp", "fedtoken_client"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


CORE_FILES = sorted(CORE.glob("*.py"))


def test_core_files_found() -> None:
    assert {"jose.py", "claims.py", "keys.py", "jwks.py"} <= {p.name for p in CORE_FILES}


@pytest.mark.parametrize("path", CORE_FILES, ids=[p.name for p in CORE_FILES])
def test_core_imports(path: Path) -> None:
    assert not imported_roots(path) & FORBIDDEN


def test_scanner_sees_nested_and_from_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import grpc.aio\nfrom asyncpg import pool\n")
    assert {"grpc", "asyncpg"} <= imported_roots(probe)
