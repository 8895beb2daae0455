"""Group commit of durable audit records against a real Postgres.

Concurrent ``AuditWriter.record`` callers share transactions; each still
returns only once its own record is committed (or spilled), and is refused
precisely when its record could not be made durable. No timing assertions.
"""

# ruff: noqa: F811 - the fixtures are imported from tests.integration._audit_fixture

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from fedtoken.audit import AuditMode
from fedtoken.core.errors import AuditUnavailable, ErrorReason
from fedtoken.store import AuditEvent, PgStore
from fedtoken.store.embedded import EmbeddedPostgres
from tests.integration._audit_fixture import (  # noqa: F401 - fixtures, found by name
    all_rows,
    eventually,
    own_db,
    private_pg,
    private_store,
    store,
    tmp_path,
    writer_for,
)

pytestmark = pytest.mark.integration


def issued(jti: str) -> AuditEvent:
    return AuditEvent("token.issued", tenant="acme", actor="svc", subject="alice", jti=jti,
                      kid="k1", outcome="ok", request_id=f"r-{jti}")


async def test_concurrent_records_share_commits_and_each_is_durable_on_return(
    store: PgStore, own_db: str, tmp_path: Path
) -> None:
    writer = writer_for(store, tmp_path / "spill")
    await writer.start()
    other = await asyncpg.connect(own_db)
    seen_on_return: list[bool] = []
    one_query = asyncio.Lock()  # one connection, one statement at a time

    async def one(jti: str) -> None:
        await writer.record(issued(jti))
        async with one_query:
            row = await other.fetchrow("SELECT 1 FROM audit_events WHERE jti = $1", jti)
        seen_on_return.append(row is not None)

    jtis = [f"g{i}" for i in range(150)]
    try:
        await asyncio.gather(*(one(j) for j in jtis))
        # A second wave while nothing else runs: commits go on after an idle period.
        await asyncio.gather(*(writer.record(issued(f"h{i}")) for i in range(60)))
    finally:
        await other.close()
        await writer.stop()
    assert seen_on_return == [True] * len(jtis)
    assert (writer.written, writer.spilled, writer.failed) == (210, 0, 0)
    assert 2 <= writer.group_commits < 210  # shared transactions
    rows = await all_rows(store)
    # The chain's order is the order of the calls.
    assert [r.event.jti for r in rows] == jtis + [f"h{i}" for i in range(60)]
    assert (await store.audit.verify_chain()).ok


async def test_a_failed_group_commit_spills_every_caller_in_it_in_order(
    private_pg: EmbeddedPostgres, private_store: PgStore, tmp_path: Path
) -> None:
    writer = writer_for(private_store, tmp_path / "spill")
    await writer.start()
    try:
        await writer.record(issued("before"))
        await asyncio.to_thread(private_pg.stop, "fast")
        # Decided direct, the group's commit fails: every caller is spilled and returns.
        jtis = [f"s{i}" for i in range(100)]
        await asyncio.gather(*(writer.record(issued(j)) for j in jtis))
        assert writer.mode is AuditMode.SPILL
        assert (writer.spilled, writer.failed) == (100, 0)
        await asyncio.to_thread(private_pg.start)
        await eventually(lambda: writer.mode is AuditMode.DIRECT, "direct mode again")
        await writer.record(issued("after"))
    finally:
        await writer.stop()
    rows = await all_rows(private_store)
    assert [r.event.jti for r in rows] == ["before", *jtis, "after"]
    assert (await private_store.audit.verify_chain()).ok


async def test_every_caller_of_a_group_is_refused_when_nothing_is_durable(
    private_pg: EmbeddedPostgres, private_store: PgStore, tmp_path: Path
) -> None:
    spill_dir = tmp_path / "audit-spill"
    writer = writer_for(private_store, spill_dir)
    await writer.start()
    try:
        await writer.record(issued("before"))
        await asyncio.to_thread(private_pg.stop, "fast")
        spill_dir.rename(tmp_path / "moved-away")
        spill_dir.write_text("not a directory")
        results = await asyncio.gather(*(writer.record(issued(f"x{i}")) for i in range(50)),
                                       return_exceptions=True)
        assert all(isinstance(r, AuditUnavailable) for r in results)
        assert all(r.reason is ErrorReason.AUDIT_UNAVAILABLE for r in results
                   if isinstance(r, AuditUnavailable))
        assert writer.failed == 50
        spill_dir.unlink()
        (tmp_path / "moved-away").rename(spill_dir)
        await asyncio.to_thread(private_pg.start)
        await eventually(lambda: writer.mode is AuditMode.DIRECT, "direct mode again")
        await writer.record(issued("after"))
    finally:
        await writer.stop()
    rows = await all_rows(private_store)
    assert [r.event.jti for r in rows] == ["before", "after"]
    assert (await private_store.audit.verify_chain()).ok
