"""The connection pool, asyncpg error translation, and where repositories get connections.

asyncpg errors are translated here, where they enter fedtoken (see
``db_errors``): callers only ever see ``FedtokenError`` subclasses, and an
unreachable or overloaded database is always ``StoreUnavailable`` so that the
RPC layer answers UNAVAILABLE and clients retry.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Final

import asyncpg

from fedtoken.core.errors import (
    FedtokenError,
    InvalidRequest,
    StoreUnavailable,
    TenantNotFound,
)

# SQLSTATE classes that mean "the database cannot serve now" rather than "the
# request is wrong": connection exception, insufficient resources, operator
# intervention (includes statement timeout / admin shutdown), system error.
_UNAVAILABLE_CLASSES: Final = frozenset({"08", "53", "57", "58"})
# Transient conflicts a retry resolves: serialization failure, deadlock,
# lock not available.
_RETRYABLE_STATES: Final = frozenset({"40001", "40P01", "55P03"})
_FOREIGN_KEY_VIOLATION: Final = "23503"  # every foreign key points at tenants


# --- error translation -----------------------------------------------------------


@contextmanager
def db_errors(op: str) -> Iterator[None]:
    """Translate asyncpg/OS errors raised inside the block; ``op`` names the operation.

    Messages name the operation and the error class, never row values or DSNs;
    the original exception stays chained for the server log.
    """
    try:
        yield
    except FedtokenError:
        raise
    except asyncpg.PostgresError as exc:
        raise _from_postgres(op, exc) from exc
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise StoreUnavailable(f"{op}: database unreachable ({type(exc).__name__})") from exc


def _from_postgres(op: str, exc: asyncpg.PostgresError) -> FedtokenError:
    state: str = exc.sqlstate or ""
    name = type(exc).__name__
    if state[:2] in _UNAVAILABLE_CLASSES or state in _RETRYABLE_STATES:
        return StoreUnavailable(f"{op}: database unavailable ({name}, SQLSTATE {state})")
    if state == _FOREIGN_KEY_VIOLATION:
        return TenantNotFound(f"{op}: tenant does not exist")
    if state in ("23502", "23514") or state[:2] == "22":
        return InvalidRequest(f"{op}: value rejected by the database ({name})")
    return FedtokenError(f"{op}: unexpected database error ({name}, SQLSTATE {state})")


# --- the pool ----------------------------------------------------------------------


def _dsn_location(dsn: str) -> str:
    """host:port part of a URL DSN (after any user:password@), for error hints."""
    netloc = dsn.partition("://")[2].partition("/")[0].partition("?")[0]
    return netloc.rpartition("@")[2] or "the default host/port"


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float = 10.0,
    connect_timeout: float = 5.0,
) -> asyncpg.Pool:
    """An asyncpg pool; StoreUnavailable names host:port (never the password).

    ``command_timeout`` bounds every statement, so a stuck database surfaces
    as StoreUnavailable instead of hanging requests.
    """
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout,
            timeout=connect_timeout,
            server_settings={"application_name": "fedtoken"},
        )
    except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise StoreUnavailable(
            f"cannot connect to Postgres at {_dsn_location(dsn)} ({type(exc).__name__})"
        ) from exc


# --- connection sources ------------------------------------------------------------


class ConnectionSource(abc.ABC):
    """Where a repository gets its connection: the pool, or one connection
    that is inside a transaction (so several repositories commit together)."""

    in_transaction: bool = False

    @abc.abstractmethod
    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection for one operation."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction (a savepoint when the source is already in one)."""
        async with self.connection() as conn, conn.transaction():
            yield conn


class PoolSource(ConnectionSource):
    """Each operation borrows a pool connection, with a bounded wait: an
    exhausted pool is "unavailable", not a hang."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout: float) -> None:
        self.pool = pool
        self._acquire_timeout = acquire_timeout

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire(timeout=self._acquire_timeout) as conn:
            yield conn


class BoundSource(ConnectionSource):
    """Every operation runs on one connection, inside its open transaction."""

    in_transaction = True

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        yield self._conn


# --- small helpers ------------------------------------------------------------------


def epoch(ts: datetime | None) -> int:
    """Unix seconds of a timestamp column (0 for NULL)."""
    return int(ts.timestamp()) if ts is not None else 0


def from_epoch(seconds: int) -> datetime | None:
    """A timestamptz parameter from Unix seconds (None for 0)."""
    return datetime.fromtimestamp(seconds, tz=UTC) if seconds else None


def aware(ts: datetime, field: str) -> datetime:
    """``ts`` itself; InvalidRequest when it has no time zone (it would be ambiguous)."""
    if ts.tzinfo is None:
        raise InvalidRequest(f"{field} must carry a time zone", field=field)
    return ts


def row_count(status: str) -> int:
    """Rows affected, from a command status such as ``DELETE 3``."""
    return int(status.split()[-1])
