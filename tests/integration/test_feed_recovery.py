"""The revocation feed recovers, always: frozen Postgres in every phase, and
the ways a session can wedge without noticing its own loss.

Probe fault 7: after a frozen Postgres one worker stayed fail-closed while the
other recovered, until it was killed. Here two feeds (two workers, each with
its own pool, store-backed snapshot and catalog-like reload) go through
repeated freezes (SIGSTOP/SIGCONT of a PRIVATE Postgres) landing in each
phase of a session (connecting, loading the snapshot, heartbeats, a periodic
resync), and each must be fresh again soon after the last thaw, and live.
Then the paths by which a session could wait forever are taken one at a
time: a callback that never returns, a cancellation nobody asked for, a load
that ignores being cancelled; for each the feed must come back on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from fedtoken.core.model import Reason, Tenant, TenantPolicy
from fedtoken.events.feed import CHANNEL, EventFeed, revocation_loader
from fedtoken.revocation.view import InMemoryRevocationView, RevocationEntry
from fedtoken.store import PgStore, apply_migrations, create_pool
from fedtoken.store.embedded import EmbeddedPostgres
from tests._pg_fixture import PgFreezer, create_database, private_postgres

pytestmark = pytest.mark.integration

STALENESS = 1.5
HEARTBEAT = 0.3
RECOVERY = 15.0  # after the last thaw: reconnect backoff (<= 5 s), connect, load, heartbeat
EXP = int(time.time()) + 3600


@pytest.fixture(scope="module")
def private_pg() -> Iterator[EmbeddedPostgres]:
    """A Postgres of this module's own: these tests freeze it."""
    with private_postgres("fedtoken-feed-pg-") as pg:
        yield pg


@pytest.fixture
def freezer(private_pg: EmbeddedPostgres) -> Iterator[PgFreezer]:
    f = PgFreezer(private_pg)
    try:
        yield f
    finally:
        f.thaw()


@pytest.fixture
def db(private_pg: EmbeddedPostgres) -> str:
    return create_database(private_pg.dsn, f"feed_{uuid.uuid4().hex[:10]}")


# --- a worker: a feed over its own pool, as fedtoken.app wires it ---------------------


@dataclass
class Worker:
    feed: EventFeed
    view: InMemoryRevocationView
    pool: asyncpg.Pool
    loads: int = 0
    hold: asyncio.Event | None = None  # while set up, the next load waits for it
    at_gate: asyncio.Event = field(default_factory=asyncio.Event)


async def start_worker(dsn: str, **options: Any) -> Worker:
    pool = await create_pool(dsn, min_size=1, max_size=4, connect_timeout=2)
    store = PgStore(pool)
    view = InMemoryRevocationView(staleness=STALENESS)
    stream = revocation_loader(store.revocations, time.time)

    async def load() -> AsyncIterator[RevocationEntry]:
        worker.loads += 1
        hold = worker.hold
        if hold is not None:
            worker.at_gate.set()
            await hold.wait()
        async for entry in stream():
            yield entry

    async def reload_catalog() -> None:  # what Catalog.reload asks the store
        await store.tenants.list()
        await store.keys.list(None)

    feed = EventFeed(dsn, view, load, heartbeat=HEARTBEAT, resync=options.pop("resync", 1.0),
                     on_resync=reload_catalog, **options)
    worker = Worker(feed, view, pool)
    await feed.start()
    return worker


async def stop_worker(worker: Worker) -> None:
    await asyncio.wait_for(worker.feed.stop(), 15)
    await asyncio.wait_for(worker.pool.close(), 15)


async def wait_until(condition: Any, bound: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < bound, f"not within {bound}s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def notify(dsn: str, payload: dict[str, Any]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps(payload))
    finally:
        await conn.close()


async def revoke(dsn: str, jti: str) -> None:
    """A revocation committed the way Revoke commits it (the trigger notifies)."""
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        store = PgStore(pool)
        now = datetime.now(UTC)
        await store.revocations.revoke("t", "jti", jti, expires_at=now + timedelta(hours=1),
                                       now=now)
    finally:
        await pool.close()


def revoked(view: InMemoryRevocationView, jti: str) -> bool:
    return view.check("t", jti, "s", 0, "k") is Reason.REVOKED


async def drop_listeners(dsn: str) -> None:
    """Terminate the feeds' listening connections (the only ones without an
    application_name), as a server restart or a network cut would."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND backend_type = 'client backend' AND application_name = ''
            """)
    finally:
        await conn.close()


# --- repeated freezes, in every phase --------------------------------------------------


async def test_two_feeds_recover_from_repeated_freezes_in_every_phase(
    db: str, freezer: PgFreezer
) -> None:
    pool = await create_pool(db, min_size=1, max_size=1)
    await apply_migrations(pool)
    await PgStore(pool).tenants.create(Tenant("t", "https://t.example", TenantPolicy()),
                                       now=datetime.now(UTC))
    await pool.close()
    await revoke(db, "before")
    rng = random.Random(7)
    workers = [await start_worker(db), await start_worker(db)]
    try:
        await wait_until(lambda: all(w.view.is_fresh for w in workers), RECOVERY, "fresh at start")
        assert all(revoked(w.view, "before") for w in workers)
        for phase in ("connect", "snapshot", "heartbeat", "resync", "heartbeat"):
            if phase != "heartbeat":  # the others start from a session in its heartbeats
                await wait_until(lambda: all(w.view.is_fresh for w in workers), RECOVERY,
                                 f"fresh before the {phase} phase")
            if phase == "connect":
                # The listeners go; the feeds reconnect into a frozen server.
                await drop_listeners(db)
            elif phase in ("snapshot", "resync"):
                # Freeze while both are inside a load: after a reconnect, or a
                # periodic resync beside the heartbeats.
                hold = asyncio.Event()
                for w in workers:
                    w.at_gate.clear()
                    w.hold = hold
                if phase == "snapshot":
                    await drop_listeners(db)
                await wait_until(lambda: all(w.at_gate.is_set() for w in workers), 10,
                                 f"both feeds loading ({phase})")
                for w in workers:
                    w.hold = None
                asyncio.get_running_loop().call_later(0.05, hold.set)  # they go on, frozen
            else:
                await asyncio.sleep(rng.uniform(0.1, 0.6))
            freezer.freeze()
            if phase == "resync":
                # Long enough for the heartbeat to fail (ending the session, so
                # cancelling its resync) and then for the cancelled resync's
                # pool connection to outwait its release (5 s): asyncpg then
                # raises a TimeoutError in place of the cancellation, which an
                # "except Exception" around the resync swallowed, so the resync
                # never ended and the session waited for it for good.
                await asyncio.sleep(9.0)
            else:
                await asyncio.sleep(rng.uniform(2.5, 3.5))  # longer than a heartbeat may take
            freezer.thaw()
            await asyncio.sleep(rng.uniform(0.2, 1.0))  # the next freeze may catch it recovering
        took = await wait_until(lambda: all(w.view.is_fresh for w in workers), RECOVERY,
                                "both feeds fresh after the last thaw")
        # Live, not only fresh: what is revoked now reaches both views.
        await revoke(db, "after")
        await wait_until(lambda: all(revoked(w.view, "after") for w in workers), RECOVERY,
                         "a revocation after the thaws reaches both feeds")
        assert all(revoked(w.view, "before") for w in workers)
        assert took < RECOVERY
    finally:
        for w in workers:
            await stop_worker(w)
    assert not any(w.view.is_fresh for w in workers)


# --- each way a session could wedge -----------------------------------------------------


@contextlib.asynccontextmanager
async def feed_of(dsn: str, load: Any, **options: Any) -> AsyncIterator[
        tuple[EventFeed, InMemoryRevocationView]]:
    view = InMemoryRevocationView(staleness=STALENESS)
    feed = EventFeed(dsn, view, load, heartbeat=HEARTBEAT, **options)
    await feed.start()
    try:
        yield feed, view
    finally:
        start = time.monotonic()
        await asyncio.wait_for(feed.stop(), 30)
        assert time.monotonic() - start < 10, "stop() waited on a wedged session"
    assert not view.is_fresh


async def test_a_resync_callback_that_never_returns_does_not_wedge_the_feed(db: str) -> None:
    """The catalog reload after a reconnect can hang (a hung pool connection, a
    lock held by a hung reload): the session gives up on it and reconnects."""
    release = asyncio.Event()
    calls = 0

    async def on_resync() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()

    async def load() -> list[RevocationEntry]:
        return [RevocationEntry("t", "jti", "snap", EXP)]

    try:
        async with feed_of(db, load, resync=3600, on_resync=on_resync,
                           callback_timeout=1.0) as (_feed, view):
            await wait_until(lambda: view.is_fresh, RECOVERY, "fresh despite a hung reload")
            assert calls >= 2 and revoked(view, "snap")
    finally:
        release.set()


@pytest.mark.parametrize("when", ["first load", "periodic resync"])
async def test_a_stray_cancellation_is_a_failed_session_not_the_end_of_the_feed(
    db: str, when: str
) -> None:
    """A CancelledError the feed did not ask for (raised by a cancelled future
    inside asyncpg or a callback) once ended the feed's task for good."""
    loads = 0
    stray_at = 1 if when == "first load" else 2

    async def load() -> list[RevocationEntry]:
        nonlocal loads
        loads += 1
        if loads == stray_at:
            raise asyncio.CancelledError
        return []

    async with feed_of(db, load, resync=0.5) as (_feed, view):
        await wait_until(lambda: loads > stray_at and view.is_fresh, RECOVERY,
                         f"fresh after a stray cancellation in the {when}")
        await notify(db, {"type": "revocation", "tenant": "t", "kind": "jti",
                          "value": "later", "expires_at": EXP})
        await wait_until(lambda: revoked(view, "later") and view.is_fresh, RECOVERY,
                         "the feed is still live")


async def test_the_watchdog_replaces_a_session_that_ignores_cancellation(db: str) -> None:
    """A load that swallows its cancellation defeats every timeout around it;
    the watchdog sees no progress, abandons that session and starts a new one,
    and the abandoned one, when it finally returns, changes nothing."""
    release = asyncio.Event()
    loads = 0

    async def load() -> list[RevocationEntry]:
        nonlocal loads
        loads += 1
        if loads == 1:
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()
            return []  # an old, empty snapshot
        return [RevocationEntry("t", "jti", "snap", EXP)]

    try:
        async with feed_of(db, load, resync=3600, stall_timeout=1.0,
                           watchdog=3.0) as (feed, view):
            await wait_until(lambda: view.is_fresh, RECOVERY, "fresh after a wedged load")
            assert feed.restarts >= 1 and revoked(view, "snap")
            await notify(db, {"type": "revocation", "tenant": "t", "kind": "jti",
                              "value": "since", "expires_at": EXP})
            await wait_until(lambda: revoked(view, "since"), RECOVERY, "the new session is live")
            release.set()  # the abandoned load returns its empty snapshot now
            await asyncio.sleep(0.5)
            assert revoked(view, "snap") and revoked(view, "since"), \
                "an abandoned session replaced the view with its old snapshot"
            assert view.is_fresh
    finally:
        release.set()
