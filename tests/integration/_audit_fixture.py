"""The audit writer + Postgres setup shared by test_audit_writer and
test_audit_group_commit (and only those): a database of the test's own, a
Postgres of the module's own the tests may stop and restart, a private
temporary directory, and the helpers that read the audit rows back.

Import the fixtures by name into the test module for pytest to find them.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fedtoken.audit import AuditWriter
from fedtoken.store import AuditRecord, PgStore, apply_migrations
from fedtoken.store import create_pool as store_pool
from fedtoken.store.embedded import EmbeddedPostgres
from tests._pg_fixture import create_database, drop_database, private_postgres

__all__ = [
    "DEADLINE_S",
    "all_rows",
    "eventually",
    "own_db",
    "private_pg",
    "private_store",
    "store",
    "tmp_path",
    "writer_for",
]

# Generous bound for "eventually" conditions; tests never assert durations.
DEADLINE_S = 120.0


# --- fixtures -------------------------------------------------------------------


@pytest.fixture
def own_db(pg_dsn: str) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield create_database(pg_dsn, name)
    drop_database(pg_dsn, name)


@pytest_asyncio.fixture(loop_scope="session")
async def store(own_db: str) -> AsyncIterator[PgStore]:
    pool = await store_pool(own_db, min_size=1, max_size=10)
    await apply_migrations(pool)
    yield PgStore(pool)
    await pool.close()


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A private temporary directory (pytest's basetemp rotation is shared with
    concurrent sessions on the same machine, which may remove it mid-test)."""
    with tempfile.TemporaryDirectory(prefix="fedtoken-audit-") as name:
        yield Path(name)


@pytest.fixture(scope="module")
def private_pg() -> Iterator[EmbeddedPostgres]:
    """A Postgres of this module's own: these tests stop and restart it."""
    with private_postgres("fedtoken-audit-pg-") as pg:
        yield pg


@pytest_asyncio.fixture(loop_scope="session")
async def private_store(private_pg: EmbeddedPostgres) -> AsyncIterator[PgStore]:
    if not private_pg.is_running():
        await asyncio.to_thread(private_pg.start)
    dsn = await asyncio.to_thread(
        create_database, private_pg.dsn, f"test_{uuid.uuid4().hex[:12]}"
    )
    pool = await store_pool(dsn, min_size=1, max_size=10, connect_timeout=2)
    await apply_migrations(pool)
    try:
        yield PgStore(pool, acquire_timeout=2)
    finally:
        await pool.close()
        if not private_pg.is_running():
            await asyncio.to_thread(private_pg.start)


# --- helpers --------------------------------------------------------------------


def writer_for(store: PgStore, spill_dir: Path, **kwargs: Any) -> AuditWriter:
    options: dict[str, Any] = {
        "flush_interval": 0.05,
        "retry_interval": 0.05,
        "max_retry_interval": 0.5,
    }
    options.update(kwargs)
    return AuditWriter(store, spill_dir, **options)


async def all_rows(store: PgStore) -> list[AuditRecord]:
    rows: list[AuditRecord] = []
    while True:
        page = await store.audit.list(after_seq=rows[-1].seq if rows else 0, limit=10_000)
        rows.extend(page)
        if len(page) < 10_000:
            return rows


async def eventually(condition: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)
