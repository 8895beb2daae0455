"""A frozen Postgres (processes stopped, TCP still open) on the request paths.

Probe fault 6: with every Postgres process stopped, the kernel still accepts
connections and buffers bytes, so nothing ever fails; only bounds end the
waits. Issue (its audit record), Revoke and Introspect (the revocation check)
must answer well before a client's deadline: Issue through the fsync'ed
spill, Revoke and Introspect with StoreUnavailable. And once Postgres runs
again everything works, because the hung connections were terminated rather
than left in the pool.

Runs on a PRIVATE embedded Postgres that it freezes with SIGSTOP (and always
thaws with SIGCONT). Durations are asserted generously (bound + 2 s): this
is about "does not hang", not a benchmark.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from fedtoken.audit import AuditMode, AuditWriter
from fedtoken.core.audit import AuditEvent
from fedtoken.core.errors import AuditUnavailable, StoreUnavailable
from fedtoken.core.model import Tenant, TenantPolicy
from fedtoken.store import PgStore, apply_migrations, create_pool
from fedtoken.store.embedded import EmbeddedPostgres
from fedtoken.store.pool import caller_deadline
from tests._pg_fixture import PgFreezer, create_database, private_postgres

pytestmark = pytest.mark.integration

BOUND = 2.0  # the request-path bound under test (the default of PgStore)
LONG = 1.5  # the long-operation bound given to a store below
SLACK = 2.0  # generous: the assertion is "no hang", not a timing benchmark
DEADLINE = 30.0  # for "eventually" after a thaw
T = TypeVar("T")


# --- freezing a private Postgres ----------------------------------------------------


@pytest.fixture(scope="module")
def private_pg() -> Iterator[EmbeddedPostgres]:
    """A Postgres of this module's own: these tests freeze it."""
    with private_postgres("fedtoken-frozen-pg-") as pg:
        yield pg


@pytest.fixture
def freezer(private_pg: EmbeddedPostgres) -> Iterator[PgFreezer]:
    f = PgFreezer(private_pg)
    try:
        yield f
    finally:
        f.thaw()  # whatever happened, never leave it stopped


@pytest.fixture
def db(private_pg: EmbeddedPostgres) -> str:
    return create_database(private_pg.dsn, f"frozen_{uuid.uuid4().hex[:10]}")


@pytest_asyncio.fixture(loop_scope="session")
async def store(db: str) -> AsyncIterator[PgStore]:
    # The composition root's pool and store: create_pool's and PgStore's defaults.
    pool = await create_pool(db, min_size=1, max_size=10)
    await apply_migrations(pool)
    store = PgStore(pool)
    await store.tenants.create(Tenant("t", "https://t.example", TenantPolicy()),
                               now=datetime.now(UTC))
    try:
        yield store
    finally:
        await asyncio.wait_for(pool.close(), 30)


@pytest_asyncio.fixture(loop_scope="session")
async def writer(store: PgStore) -> AsyncIterator[AuditWriter]:
    with tempfile.TemporaryDirectory(prefix="fedtoken-frozen-spill-") as name:
        w = AuditWriter(store, Path(name), retry_interval=0.2, max_retry_interval=0.5)
        await w.start()
        try:
            yield w
        finally:
            await w.stop()


# --- helpers ----------------------------------------------------------------------


async def timed(call: Awaitable[T]) -> tuple[float, T | BaseException]:
    """How long ``call`` took and what it returned or raised (never hangs the test)."""
    start = time.monotonic()
    try:
        result: T | BaseException = await asyncio.wait_for(call, 60)
    except Exception as exc:  # the outcome is what is asserted
        result = exc
    return time.monotonic() - start, result


async def eventually(probe: Any, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            value = await probe()
        except StoreUnavailable:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {DEADLINE}s: {what}"
        await asyncio.sleep(0.1)


def _now() -> datetime:
    return datetime.now(UTC)


async def is_revoked(store: PgStore, jti: str) -> bool:
    return await store.revocations.is_revoked("t", jti, "s", 0, "k", now=_now())


def revocation_write(store: PgStore, jti: str) -> Any:
    async def write(audit: AuditEvent | None) -> tuple[bool, datetime]:
        now = _now()
        return await store.revocations.revoke("t", "jti", jti, expires_at=now + timedelta(1),
                                              now=now, reason="frozen test", audit=audit)
    return write


def revoked_event(jti: str) -> AuditEvent:
    return AuditEvent(event_type="token.revoked", tenant="t", jti=jti, outcome="ok")


def issued_event(jti: str) -> AuditEvent:
    return AuditEvent(event_type="token.issued", tenant="t", jti=jti, subject="frozen-user",
                      outcome="ok")


# --- the request paths --------------------------------------------------------------


async def test_introspections_revocation_check_fails_fast_and_recovers(
    store: PgStore, freezer: PgFreezer
) -> None:
    assert not await is_revoked(store, "warm")
    with freezer.frozen():
        # One at a time, then more at once than the pool has connections: each
        # ends within the bound (a hung connection is terminated, so the pool
        # neither stays wedged nor lets a queue build up behind it).
        for _ in range(2):
            took, outcome = await timed(is_revoked(store, "frozen"))
            assert isinstance(outcome, StoreUnavailable), outcome
            assert took < BOUND + SLACK, f"is_revoked waited {took:.1f}s on a frozen Postgres"
        start = time.monotonic()
        outcomes = await asyncio.gather(*(timed(is_revoked(store, f"c{i}")) for i in range(15)))
        assert all(isinstance(o, StoreUnavailable) for _, o in outcomes), outcomes
        assert time.monotonic() - start < 2 * BOUND + SLACK
    assert await eventually(lambda: _answers(store), "the revocation check works after a thaw")
    # Every pool connection is usable again.
    answers = await asyncio.gather(*(is_revoked(store, f"after{i}") for i in range(10)))
    assert answers == [False] * 10


async def _answers(store: PgStore) -> bool:
    return await is_revoked(store, "after-thaw") is False


async def test_revoke_fails_fast_while_frozen_and_is_durable_after_a_thaw(
    store: PgStore, writer: AuditWriter, freezer: PgFreezer
) -> None:
    with freezer.frozen():
        took, outcome = await timed(writer.record_with(revoked_event("r1"),
                                                       revocation_write(store, "r1")))
        assert isinstance(outcome, StoreUnavailable), outcome  # Revoke: STORE_UNAVAILABLE
        assert took < BOUND + SLACK, f"revoke waited {took:.1f}s on a frozen Postgres"
    assert writer.mode is AuditMode.DIRECT  # a refused revocation does not start the spill

    async def revoke() -> bool:
        await writer.record_with(revoked_event("r1"), revocation_write(store, "r1"))
        return True

    await eventually(revoke, "revoke works after a thaw")
    assert await is_revoked(store, "r1")
    rows = await store.audit.list(event_type="token.revoked")
    assert [r.event.jti for r in rows].count("r1") == 1  # only the revoke that succeeded


async def test_issue_is_audited_through_the_spill_while_frozen(
    store: PgStore, writer: AuditWriter, freezer: PgFreezer
) -> None:
    await writer.record(issued_event("before"))
    assert writer.mode is AuditMode.DIRECT
    with freezer.frozen():
        took, outcome = await timed(writer.record(issued_event("i1")))
        assert outcome is None, outcome  # Issue succeeds ...
        assert took < BOUND + SLACK, f"the audit record waited {took:.1f}s"
        assert writer.mode is AuditMode.SPILL  # ... audited through the fsync'ed spill
        took, outcome = await timed(writer.record(issued_event("i2")))
        assert outcome is None and took < SLACK  # from then on straight to the spill
        assert writer.spilled == 2
    await eventually(lambda: _replayed(writer), "the spill is replayed after a thaw")
    rows = await store.audit.list(event_type="token.issued")
    assert [r.event.jti for r in rows] == ["before", "i1", "i2"]  # once each, in order
    assert all("spilled_at" in (r.event.details or {}) for r in rows[1:])
    assert (await store.audit.verify_chain()).ok


async def _replayed(writer: AuditWriter) -> bool:
    return writer.mode is AuditMode.DIRECT and writer.replayed >= 2


async def test_the_callers_deadline_shortens_the_bound(
    store: PgStore, writer: AuditWriter, freezer: PgFreezer
) -> None:
    with freezer.frozen():
        with caller_deadline(0.5):
            took, outcome = await timed(is_revoked(store, "deadline"))
        assert isinstance(outcome, StoreUnavailable), outcome
        assert took < 0.5 + 0.5, f"the caller's 0.5s deadline was not honoured ({took:.2f}s)"
    await eventually(lambda: _answers(store), "Postgres answers after a thaw")

    # A deadline that has passed: refused without touching Postgres, and not
    # mistaken for an outage (the writer stays in direct mode).
    with caller_deadline(0.0):
        took, outcome = await timed(is_revoked(store, "late"))
        assert isinstance(outcome, StoreUnavailable) and took < 0.5
        took, outcome = await timed(writer.record(issued_event("late")))
        assert isinstance(outcome, AuditUnavailable), outcome
        outliving = asyncio.create_task(_after(0.2, is_revoked(store, "outliving")))
    assert writer.mode is AuditMode.DIRECT
    # A task started during the call but running after it keeps its own bounds.
    assert await outliving is False


async def _after(delay: float, call: Awaitable[T]) -> T:
    await asyncio.sleep(delay)
    return await call


async def test_long_operations_have_their_own_bound(db: str, freezer: PgFreezer) -> None:
    pool = await create_pool(db, min_size=1, max_size=4)
    try:
        await apply_migrations(pool)
        store = PgStore(pool, long_timeout=LONG, page_timeout=1.0)

        async def stream() -> int:
            return sum([len(c) async for c in store.revocations.iter_active(_now())])

        assert await stream() == 0
        with freezer.frozen():
            for call in (stream(), store.audit.verify_chain(),
                         store.revocations.purge_expired(_now())):
                took, outcome = await timed(call)
                assert isinstance(outcome, StoreUnavailable), outcome
                assert took < LONG + SLACK, f"a long operation waited {took:.1f}s"
        assert await eventually(lambda: _chain_ok(store), "the chain verifies after a thaw")
    finally:
        await asyncio.wait_for(pool.close(), 30)


async def _chain_ok(store: PgStore) -> bool:
    return (await store.audit.verify_chain()).ok
