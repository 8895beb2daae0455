"""The connection pool, asyncpg error translation, time bounds, and where
repositories get connections.

asyncpg errors are translated here, where they enter fedtoken (see
``db_errors``): callers only ever see ``FedtokenError`` subclasses, and an
unreachable or overloaded database is always ``StoreUnavailable`` so that the
RPC layer answers UNAVAILABLE and clients retry.

**Time bounds.** A frozen Postgres (processes stopped, TCP still open)
answers nothing and reports nothing, so every wait for it is bounded here,
whole operations rather than single statements:

- a *request-path* operation (``ConnectionSource.connection()`` with no
  timeout: acquire, statements, release) gets ``request_timeout`` (2 s by
  default), shortened to the caller's deadline where one is set
  (``caller_deadline``, from the RPC boundary);
- long operations (snapshot streaming, chain walks, purges) get
  ``long_timeout`` in all, and each page or chunk ``page_timeout``.

When a bound expires the connection is *terminated* (its socket dropped), not
closed politely, cancelled or rolled back: each of those waits for an answer
from the server that a frozen server never sends, and would keep the pool
slot and the request waiting. The waiting statement then fails at once and
the operation raises StoreUnavailable. A connection whose state is unknown
after any other interruption (a cancelled task, a lost connection) is
terminated the same way instead of being handed back to the pool.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

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

REQUEST_TIMEOUT: Final = 2.0
"""Default bound of one request-path operation, acquire to release, in seconds:
well below the deadlines clients typically set (fedtoken's client: 10 s)."""
LONG_TIMEOUT: Final = 120.0
"""Default bound of one long operation (snapshot stream, chain walk, purge)."""
PAGE_TIMEOUT: Final = 10.0
"""Default bound of one page or chunk of a long operation."""
COMMAND_TIMEOUT: Final = 30.0
"""The pool's per-statement backstop, for statements with no bound of their own
(migrations); every repository operation is bounded more tightly."""
# Least time given to handing a connection back after an operation finished
# close to its bound (a reset the server does not answer terminates it).
_MIN_RELEASE: Final = 0.25
# Part of the caller's remaining time kept back for sending the answer.
_DEADLINE_MARGIN: Final = 0.1
_MAX_DEADLINE_MARGIN: Final = 0.25

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
    except TimeoutError as exc:
        raise StoreUnavailable(f"{op}: database did not answer in time ({exc or 'timeout'})"
                               ) from exc
    except (OSError, asyncpg.InterfaceError) as exc:
        raise StoreUnavailable(f"{op}: database unreachable ({type(exc).__name__})") from exc
    except asyncpg.exceptions.InternalClientError as exc:
        # A connection that read the server's shutdown FATAL but not yet its
        # close ("cannot switch to state ..."): the database is going away.
        raise StoreUnavailable(f"{op}: database connection broke ({type(exc).__name__})"
                               ) from exc


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


# --- the caller's deadline ----------------------------------------------------------


@dataclass(slots=True)
class _Deadline:
    at: float  # time.monotonic()
    open: bool = True  # False once the call's block has ended


_CALLER_DEADLINE: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar(
    "fedtoken_caller_deadline", default=None)


def caller_deadline(remaining: float | None) -> _CallerDeadline:
    """Within the block, store operations end in time for a caller who waits
    ``remaining`` more seconds (None: no caller deadline).

    For the RPC boundary: ``with caller_deadline(context.time_remaining()):``
    around the servicer. Each operation's bound becomes the smaller of its own
    and the time left (less a small margin for sending the answer); once none
    is left, operations raise StoreUnavailable without touching Postgres.
    Tasks started inside the block (``asyncio.wait_for`` and ``gather`` make
    some) work for the caller and are bound too, but only while the block
    runs: one that outlives the call (a coalesced catalog reload) is then
    back to its own bounds.
    """
    return _CallerDeadline(remaining)


class _CallerDeadline:
    """The context manager of ``caller_deadline`` (a class: it runs on every
    RPC, and a generator-based one costs several times as much)."""

    __slots__ = ("_deadline", "_remaining", "_token")

    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining
        self._deadline: _Deadline | None = None
        self._token: contextvars.Token[_Deadline | None] | None = None

    def __enter__(self) -> None:
        remaining = self._remaining
        if remaining is None:
            return
        margin = min(_MAX_DEADLINE_MARGIN, max(remaining, 0.0) * _DEADLINE_MARGIN)
        self._deadline = _Deadline(time.monotonic() + remaining - margin)
        self._token = _CALLER_DEADLINE.set(self._deadline)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            assert self._deadline is not None
            self._deadline.open = False
            _CALLER_DEADLINE.reset(self._token)
            self._token = None


def caller_time_left() -> float | None:
    """Seconds left under ``caller_deadline`` (None: no caller deadline applies)."""
    deadline = _CALLER_DEADLINE.get()
    if deadline is None or not deadline.open:
        return None
    return deadline.at - time.monotonic()


def within_caller_deadline(bound: float) -> float:
    """``bound``, or less when the caller's deadline comes first (may be <= 0)."""
    left = caller_time_left()
    return bound if left is None else min(bound, left)


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
    command_timeout: float = COMMAND_TIMEOUT,
    connect_timeout: float = 5.0,
) -> asyncpg.Pool:
    """An asyncpg pool; StoreUnavailable names host:port (never the password).

    ``command_timeout`` is only the backstop of statements that have no bound
    of their own (migrations): repositories bound whole operations through
    ``PoolSource`` (see the module docstring), far below it on request paths.
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


# --- connections whose state is known --------------------------------------------------


def intact_after(exc: BaseException) -> bool:
    """Whether a connection is in a known state after ``exc`` interrupted its use.

    True when the server answered (a PostgresError) or our own code raised
    between statements; False after a timeout, a cancellation or a lost
    connection, when a statement may still be running or its answer may
    never come: such a connection is terminated, never rolled back or reused.
    Also False for a stream abandoned by its reader (GeneratorExit): that
    happens on error paths, where a ROLLBACK could wait on a frozen server.
    """
    if isinstance(exc, asyncpg.PostgresError):
        return True
    if not isinstance(exc, Exception):  # CancelledError, GeneratorExit, KeyboardInterrupt
        return False
    return not isinstance(exc, TimeoutError | OSError | asyncpg.InterfaceError
                          | asyncpg.InternalClientError | StoreUnavailable)


def terminate(conn: asyncpg.Connection) -> None:
    """Drop the connection's socket at once (no goodbye to a server that may not answer)."""
    try:
        conn.terminate()
    except Exception:  # noqa: BLE001, S110 - already released or gone: nothing left to drop
        pass


@asynccontextmanager
async def guarded_transaction(
    conn: asyncpg.Connection, **options: Any
) -> AsyncIterator[asyncpg.Connection]:
    """``conn.transaction(**options)`` that never waits on a connection in an unknown state.

    After an error the server answered, it rolls back as usual. After a
    timeout, a cancellation or a lost connection it leaves the transaction
    alone and terminates the connection: the server rolls back when the
    socket goes, whereas a ROLLBACK would first wait for the interrupted
    statement to be cancelled, which a frozen server never acknowledges.
    """
    tx = conn.transaction(**options)
    await tx.start()
    try:
        yield conn
    except BaseException as exc:
        if not intact_after(exc):
            terminate(conn)
        else:
            try:
                await tx.rollback()
            except Exception:  # noqa: BLE001 - the connection broke: the original error matters
                terminate(conn)
        raise
    await tx.commit()


# --- connection sources ------------------------------------------------------------


class ConnectionSource(abc.ABC):
    """Where a repository gets its connection: the pool, or one connection
    that is inside a transaction (so several repositories commit together)."""

    in_transaction: bool = False
    request_timeout: float = REQUEST_TIMEOUT
    """Bound of a request-path operation (see the module docstring)."""
    long_timeout: float = LONG_TIMEOUT
    """Bound of a long operation (see the module docstring)."""
    page_timeout: float = PAGE_TIMEOUT
    """Bound of one page or chunk of a long operation."""

    @abc.abstractmethod
    def connection(
        self, timeout: float | None = None
    ) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection for one operation, bounded by ``timeout`` seconds in all
        (None: the request-path bound); the caller's deadline shortens it."""

    @abc.abstractmethod
    def held_connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection held for as long as the block runs (a session advisory
        lock): only getting it is bounded; bound its statements yourself."""

    @asynccontextmanager
    async def transaction(
        self, timeout: float | None = None, **options: Any
    ) -> AsyncIterator[asyncpg.Connection]:
        """A transaction (a savepoint when the source is already in one)."""
        async with self.connection(timeout) as conn, guarded_transaction(conn, **options):
            yield conn


class PoolSource(ConnectionSource):
    """Each operation borrows a pool connection, bounded as a whole (acquire,
    statements, release): an exhausted pool or a frozen server is
    "unavailable", not a hang."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout: float = 5.0,
        request_timeout: float = REQUEST_TIMEOUT,
        long_timeout: float = LONG_TIMEOUT,
        page_timeout: float = PAGE_TIMEOUT,
    ) -> None:
        if min(acquire_timeout, request_timeout, long_timeout, page_timeout) <= 0:
            raise ValueError("store timeouts must be positive")
        self.pool = pool
        self.request_timeout = request_timeout
        self.long_timeout = long_timeout
        self.page_timeout = page_timeout
        self._acquire_timeout = acquire_timeout

    async def _acquire(self, budget: float) -> asyncpg.Connection:
        if budget <= 0:
            raise TimeoutError("no time left before the caller's deadline")
        try:
            return await self.pool.acquire(timeout=min(budget, self._acquire_timeout))
        except TimeoutError as exc:
            raise TimeoutError(f"no pool connection within {budget:.2f}s") from exc

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        budget = within_caller_deadline(self.request_timeout if timeout is None else timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        conn = await self._acquire(budget)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            terminate(conn)  # every wait on it fails now, cleanup included

        timer = loop.call_at(deadline, expire)
        try:
            yield conn
        except BaseException as exc:
            timer.cancel()
            if expired or not intact_after(exc):
                terminate(conn)  # then the release below returns at once
            await self._release(conn, loop.time() + _MIN_RELEASE)
            if expired and isinstance(exc, Exception) and not isinstance(exc, FedtokenError):
                raise TimeoutError(f"no answer from Postgres within {budget:.2f}s") from exc
            raise  # a cancellation stays one; AuditCommitUncertain keeps its seq
        timer.cancel()
        # The answer is in: a reset the server does not answer in time only
        # costs this connection, never the operation.
        await self._release(conn, max(deadline, loop.time() + _MIN_RELEASE))

    async def _release(self, conn: asyncpg.Connection, by: float) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_at(by, terminate, conn)
        try:
            await self.pool.release(conn, timeout=max(by - loop.time(), 0.001))
        except Exception:  # noqa: BLE001, S110 - asyncpg terminated it; the pool has the slot back
            pass
        finally:
            timer.cancel()

    @asynccontextmanager
    async def held_connection(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await self._acquire(within_caller_deadline(self.request_timeout))
        try:
            yield conn
        except BaseException as exc:
            if not intact_after(exc):
                terminate(conn)
            await self._release(conn, asyncio.get_running_loop().time() + self.request_timeout)
            raise
        await self._release(conn, asyncio.get_running_loop().time() + self.request_timeout)


class BoundSource(ConnectionSource):
    """Every operation runs on one connection, inside its open transaction
    (whose bound covers them all)."""

    in_transaction = True

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        yield self._conn

    def held_connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return self.connection()


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
