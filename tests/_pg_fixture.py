"""A real Postgres for tests: ``FEDTOKEN_TEST_DSN`` or an embedded server.

``pg_dsn`` (session): a superuser DSN of the server (for the embedded one,
its password comes from the server's password file, named in the DSN).
``fresh_dsn`` (module): a new, empty database per test module (no migrations
applied), dropped at the end. ``create_database`` is synchronous so that
sync fixtures can use it; the DSNs it returns are the superuser's, which
migrations need. ``app_dsn`` gives the same database as the service's
least-privileged role (docs/security.md, "Database roles").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from fedtoken.store.embedded import EmbeddedPostgres
from fedtoken.store.migrate import APP_ROLE

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even under a running loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def dsn_with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database (URL DSNs only)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def app_dsn(dsn: str) -> str:
    """The same server and database as the service's role ``fedtoken_app``.

    The embedded server's password file (named in its DSNs) holds that role's
    password; for a ``FEDTOKEN_TEST_DSN`` server, whose DBA set it, give it in
    ``FEDTOKEN_TEST_APP_PASSWORD``.
    """
    parts = urlsplit(dsn)
    password = os.environ.get("FEDTOKEN_TEST_APP_PASSWORD", "")
    user = f"{APP_ROLE}:{quote(password, safe='')}" if password else APP_ROLE
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def create_database(admin_dsn: str, name: str) -> str:
    """CREATE DATABASE ``name`` and return its DSN."""

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    _run(create())
    return dsn_with_database(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    """DROP DATABASE ``name``, disconnecting whoever is still on it."""

    async def drop() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    _run(drop())


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """Superuser DSN of a running Postgres, shared by the whole session
    (password logins only; the embedded server's passwords are in its
    password file beside the data dir).

    The embedded server lives in a private temporary directory, not under
    pytest's basetemp: concurrent sessions on the machine rotate basetemps
    and would delete the data dir and the password file mid-session.
    """
    configured = os.environ.get("FEDTOKEN_TEST_DSN")
    if configured:
        yield configured
        return
    with tempfile.TemporaryDirectory(prefix="fedtoken-test-pg-") as name:
        pg = EmbeddedPostgres(Path(name) / "data")
        dsn = pg.start()
        try:
            yield dsn
        finally:
            pg.stop()


@pytest.fixture(scope="module")
def fresh_dsn(pg_dsn: str) -> Iterator[str]:
    """DSN of a new empty database for this test module."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    dsn = create_database(pg_dsn, name)
    try:
        yield dsn
    finally:
        drop_database(pg_dsn, name)


@contextlib.contextmanager
def private_postgres(prefix: str) -> Iterator[EmbeddedPostgres]:
    """A running Postgres of the caller's own, under a private temporary
    directory (tests that stop, freeze or restart their server use one)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        pg = EmbeddedPostgres(Path(name) / "data")
        pg.start()
        try:
            yield pg
        finally:
            pg.stop()


def postgres_pids(pg: EmbeddedPostgres) -> list[int]:
    """The postmaster (from postmaster.pid) and all its descendants."""
    import psutil

    postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    try:
        children = psutil.Process(postmaster).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [postmaster, *(c.pid for c in children)]


class PgFreezer:
    """SIGSTOP every process of one Postgres (TCP stays open, nothing answers);
    ``thaw`` sends SIGCONT to each of them. Prefer ``frozen()``, which always
    thaws."""

    def __init__(self, pg: EmbeddedPostgres) -> None:
        self._pg = pg
        self._stopped: list[int] = []

    def freeze(self) -> int:
        """How many processes were stopped (a second call changes nothing)."""
        if self._stopped:
            return len(self._stopped)
        pids = postgres_pids(self._pg)
        os.kill(pids[0], signal.SIGSTOP)  # the postmaster first: it forks no more
        self._stopped = [pids[0]]
        for pid in postgres_pids(self._pg)[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self._stopped.append(pid)
        return len(self._stopped)

    def thaw(self) -> None:
        stopped, self._stopped = self._stopped, []
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[int]:
        try:
            yield self.freeze()
        finally:
            self.thaw()
