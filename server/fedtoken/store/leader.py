"""One leader among replicas: a Postgres session advisory lock
(``core.ports.LeaderLock``).

The lock lives on a dedicated connection, never a pooled one: a pooled
connection goes back to the pool (and to whoever borrows it next) with the
lock still held, and the pool may close it at any time, releasing the lock
without telling anyone. Here the lock and the connection live and die
together, and the loss of either is noticed:

* the connection's termination listener clears ``held`` as soon as asyncpg
  sees the socket close (a terminated backend, a restarted server);
* ``try_acquire`` while holding pings the connection within a bound, so a
  silent loss (a partition, a frozen server) also ends the leadership, at
  the latest on the next round of the leader's loop.

Losing the lock never stops a stale leader's write already under way: every
write the leader makes is fenced (one transaction that re-checks the state it
depends on), which is what keeps a stale leader harmless (Wolverine #2602).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from fedtoken.store.pool import terminate

log = logging.getLogger(__name__)


class PgLeaderLock:
    """``pg_try_advisory_lock(key)`` on a connection of its own."""

    def __init__(self, dsn: str, key: int, *, connect_timeout: float = 5.0,
                 ping_timeout: float = 2.0, name: str = "leader") -> None:
        self._dsn = dsn
        self._key = key
        self._connect_timeout = connect_timeout
        self._ping_timeout = ping_timeout
        self._name = name
        self._conn: asyncpg.Connection | None = None
        self._held = False

    @property
    def held(self) -> bool:
        """Whether this process holds the lock, as far as it can know without
        a round trip (a closed connection is noticed at once)."""
        conn = self._conn
        return self._held and conn is not None and not conn.is_closed()

    async def try_acquire(self) -> bool:
        """Take the lock if it is free, or confirm (ping) that we still hold
        it; never waits for another holder. False on any database error."""
        try:
            if self.held:
                assert self._conn is not None
                await self._conn.fetchval("SELECT 1", timeout=self._ping_timeout)
                return self.held
            await self._drop()
            conn = await asyncpg.connect(
                self._dsn, timeout=self._connect_timeout,
                server_settings={"application_name": f"fedtoken-{self._name}"})
            self._conn = conn
            conn.add_termination_listener(self._lost)
            got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key,
                                           timeout=self._ping_timeout))
            if not got:
                await self._drop()  # no connection kept open while we wait our turn
                return False
            self._held = True
            log.info("%s lock acquired", self._name)
            return True
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            if self._held:
                log.warning("%s lock lost (%s)", self._name, type(exc).__name__)
            await self._drop()
            return False

    def _lost(self, conn: asyncpg.Connection) -> None:
        if conn is self._conn and self._held:
            log.warning("%s lock lost: its connection closed", self._name)
            self._held = False

    async def _drop(self) -> None:
        conn, self._conn, self._held = self._conn, None, False
        if conn is not None and not conn.is_closed():
            # Closing the session releases the lock; terminate if the server
            # does not answer within the bound.
            try:
                await asyncio.wait_for(conn.close(), self._ping_timeout)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                terminate(conn)

    async def release(self) -> None:
        """Give the lock up (closing its connection) so another replica leads."""
        if self._held and self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                                     TimeoutError):
                await self._conn.fetchval("SELECT pg_advisory_unlock($1)", self._key,
                                          timeout=self._ping_timeout)
        await self._drop()

    @property
    def backend_pid(self) -> int | None:
        """The server process of the lock's connection (for operators and
        tests: ``pg_terminate_backend`` of it ends this leadership)."""
        conn = self._conn
        return conn.get_server_pid() if conn is not None and not conn.is_closed() else None
