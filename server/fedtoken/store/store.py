"""The repositories together, over the pool or bound to one transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import asyncpg

from fedtoken.store.audit_log import PgAuditLog
from fedtoken.store.keys import PgKeys
from fedtoken.store.pool import (
    LONG_TIMEOUT,
    PAGE_TIMEOUT,
    REQUEST_TIMEOUT,
    BoundSource,
    ConnectionSource,
    PoolSource,
    db_errors,
)
from fedtoken.store.revocations import PgRevocations
from fedtoken.store.tenants import PgTenants
from fedtoken.store.trust import PgKeySetStore, PgTrustRepository

if TYPE_CHECKING:
    from fedtoken.core import ports


class PgStore:
    """The Postgres repositories (``fedtoken.core.ports.Store``).

    ``PgStore(pool)`` borrows a pool connection per operation; the store that
    ``transaction()`` yields runs everything on one connection, in one
    transaction.

    Bounds (seconds; see ``fedtoken.store.pool``): each request-path
    operation, acquire to release, ends within ``request_timeout`` (or the
    caller's deadline, if sooner); long operations (snapshot streams, chain
    walks, purges) within ``long_timeout``, each of their pages within
    ``page_timeout``; ``acquire_timeout`` caps the wait for a pool connection.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout: float = 5.0,
        request_timeout: float = REQUEST_TIMEOUT,
        long_timeout: float = LONG_TIMEOUT,
        page_timeout: float = PAGE_TIMEOUT,
    ) -> None:
        self._setup(PoolSource(pool, acquire_timeout=acquire_timeout,
                               request_timeout=request_timeout, long_timeout=long_timeout,
                               page_timeout=page_timeout))

    @classmethod
    def _over(cls, source: ConnectionSource) -> PgStore:
        store = cls.__new__(cls)
        store._setup(source)
        return store

    def _setup(self, source: ConnectionSource) -> None:
        self._source = source
        self._tenants = PgTenants(source)
        self._keys = PgKeys(source)
        self._revocations = PgRevocations(source)
        self._audit = PgAuditLog(source)
        self._trust = PgTrustRepository(source)
        self._key_sets = PgKeySetStore(source)

    @property
    def request_timeout(self) -> float:
        """The bound of one request-path operation (before the caller's deadline)."""
        return self._source.request_timeout

    @property
    def tenants(self) -> PgTenants:
        return self._tenants

    @property
    def keys(self) -> PgKeys:
        return self._keys

    @property
    def revocations(self) -> PgRevocations:
        return self._revocations

    @property
    def audit(self) -> PgAuditLog:
        return self._audit

    @property
    def trust(self) -> PgTrustRepository:
        """Trusted foreign issuers (injected into the trust service by
        ``fedtoken.app``; not part of the ``Store`` port, which nothing needs
        it through)."""
        return self._trust

    @property
    def key_sets(self) -> PgKeySetStore:
        """The last good key set of each trusted issuer (for the remote JWKS cache)."""
        return self._key_sets

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgStore]:
        """A PgStore bound to one connection in one transaction (a savepoint
        when this store is already in one).

        Everything done through it commits or rolls back together, e.g. a key
        state change, its revocation and their audit record.
        """
        with db_errors("transaction"):
            async with self._source.transaction() as conn:
                yield PgStore._over(BoundSource(conn))

    @asynccontextmanager
    async def advisory_lock(self, key: int) -> AsyncIterator[None]:
        """Hold the session advisory lock ``key`` for the block.

        For once-only work across replicas (e.g. first-start bootstrap). The
        lock lives on one held connection; the block's own statements may use
        other pool connections. Waiting for the lock is bounded by the long
        bound, releasing it by the request bound (a connection that cannot
        release it is terminated, which releases it too).
        """
        source = self._source
        with db_errors("advisory lock"):
            async with source.held_connection() as conn:
                await conn.execute("SELECT pg_advisory_lock($1)", key,
                                   timeout=source.long_timeout)
                try:
                    yield
                finally:
                    if not conn.is_closed():
                        await conn.execute("SELECT pg_advisory_unlock($1)", key,
                                           timeout=source.request_timeout)


if TYPE_CHECKING:  # mypy checks that the adapters implement the ports exactly

    def _ports(store: PgStore) -> ports.Store:
        return store

    def _repositories(
        store: PgStore,
    ) -> tuple[ports.TenantRepository, ports.KeyRepository, ports.RevocationRepository,
               ports.AuditLog]:
        return store.tenants, store.keys, store.revocations, store.audit

    def _trust_repositories(
        store: PgStore,
    ) -> tuple[ports.TrustRepository, ports.KeySetStore]:
        return store.trust, store.key_sets
