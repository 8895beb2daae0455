"""The trusted_issuers and trusted_key_sets tables (migrations/0005_trust.sql):
which foreign issuers our tenants trust, and the last good key set of each."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Final

import asyncpg

from fedtoken.core.errors import AlreadyExists, ErrorReason, FailedPrecondition
from fedtoken.core.ports import utc
from fedtoken.core.trust import StoredKeySet, TrustedIssuer
from fedtoken.store.pool import ConnectionSource, PoolSource, aware, db_errors, epoch, row_count

_COLUMNS: Final = ("issuer, jwks_uri, algorithms, audiences, tenants, namespace, max_stale_s, "
                   "created_at, updated_at, added_by")


def _trust(row: asyncpg.Record) -> TrustedIssuer:
    return TrustedIssuer(
        issuer=row["issuer"],
        tenants=frozenset(row["tenants"]),
        jwks_uri=row["jwks_uri"],
        algorithms=frozenset(row["algorithms"]),
        audiences=frozenset(row["audiences"]),
        namespace=row["namespace"],
        max_stale_seconds=row["max_stale_s"],
        created_at=epoch(row["created_at"]),
        updated_at=epoch(row["updated_at"]),
        added_by=row["added_by"],
    )


class PgTrustRepository:
    """Trusted issuers (``TrustRepository``). ``put`` adds an issuer or
    replaces its whole definition (keeping when it was first added)."""

    def __init__(self, source: ConnectionSource) -> None:
        self._source = source

    @classmethod
    def over_pool(cls, pool: asyncpg.Pool) -> PgTrustRepository:
        return cls(PoolSource(pool))

    async def put(self, trust: TrustedIssuer, *, now: datetime) -> TrustedIssuer:
        """Store ``trust``. FailedPrecondition (TENANT_NOT_FOUND) when one of
        its tenants does not exist; AlreadyExists when another issuer has its
        namespace; InvalidRequest for a value the table's checks refuse
        (including a tenant's own issuer)."""
        with db_errors("trust issuer"):
            try:
                async with self._source.connection() as conn:
                    row = await conn.fetchrow(
                        f"""
                        INSERT INTO trusted_issuers AS t ({_COLUMNS})
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)
                        ON CONFLICT (issuer) DO UPDATE
                           SET jwks_uri = EXCLUDED.jwks_uri, algorithms = EXCLUDED.algorithms,
                               audiences = EXCLUDED.audiences, tenants = EXCLUDED.tenants,
                               namespace = EXCLUDED.namespace,
                               max_stale_s = EXCLUDED.max_stale_s,
                               updated_at = EXCLUDED.updated_at, added_by = EXCLUDED.added_by
                        RETURNING {_COLUMNS}
                        """,
                        trust.issuer, trust.jwks_uri, sorted(trust.algorithms),
                        sorted(trust.audiences), sorted(trust.tenants), trust.namespace,
                        trust.max_stale_seconds, aware(now, "now"), trust.added_by,
                    )
            except asyncpg.ForeignKeyViolationError as exc:
                # From the trigger: no foreign key points from an array.
                raise FailedPrecondition(
                    "trust issuer: a tenant it names does not exist; create it first "
                    "(`fedtoken tenants create`)", reason=ErrorReason.TENANT_NOT_FOUND,
                    field="tenants") from exc
            except asyncpg.UniqueViolationError as exc:
                raise AlreadyExists("trust issuer: another trusted issuer has this namespace; "
                                    "give another one", field="namespace") from exc
        return _trust(row)

    async def get(self, issuer: str) -> TrustedIssuer | None:
        with db_errors("get trusted issuer"):
            async with self._source.connection() as conn:
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM trusted_issuers WHERE issuer = $1", issuer)
        return _trust(row) if row is not None else None

    async def list(self) -> builtins.list[TrustedIssuer]:
        with db_errors("list trusted issuers"):
            async with self._source.connection() as conn:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM trusted_issuers ORDER BY issuer")
        return [_trust(r) for r in rows]

    async def remove(self, issuer: str) -> bool:
        """Delete the issuer (and its stored key set); whether it was there."""
        with db_errors("remove trusted issuer"):
            async with self._source.connection() as conn:
                status = await conn.execute("DELETE FROM trusted_issuers WHERE issuer = $1",
                                            issuer)
        return row_count(status) > 0


class PgKeySetStore:
    """The last good key set of each trusted issuer (``KeySetStore``), for
    the remote JWKS cache: loaded at start, saved after each good fetch."""

    def __init__(self, source: ConnectionSource) -> None:
        self._source = source

    @classmethod
    def over_pool(cls, pool: asyncpg.Pool) -> PgKeySetStore:
        return cls(PoolSource(pool))

    async def load_key_sets(self) -> builtins.list[StoredKeySet]:
        """Every stored key set. Up to 64 KiB each, so this one read gets the
        long bound rather than the request bound."""
        with db_errors("load trusted key sets"):
            async with self._source.connection(self._source.long_timeout) as conn:
                rows = await conn.fetch(
                    "SELECT issuer, jwks_uri, body, etag, fetched_at FROM trusted_key_sets "
                    "ORDER BY issuer")
        return [StoredKeySet(issuer=r["issuer"], jwks_uri=r["jwks_uri"], body=bytes(r["body"]),
                             etag=r["etag"], fetched_at=r["fetched_at"].timestamp())
                for r in rows]

    async def save_key_set(self, key_set: StoredKeySet) -> None:
        """Keep ``key_set`` unless the stored one was confirmed later (another
        replica fetched more recently). Saving for an issuer that is no longer
        trusted does nothing: its key set went with it."""
        with db_errors("save trusted key set"):
            try:
                async with self._source.connection() as conn:
                    await conn.execute(
                        """
                        INSERT INTO trusted_key_sets AS k
                               (issuer, jwks_uri, body, etag, fetched_at)
                        SELECT $1, $2, $3, $4, $5
                         WHERE EXISTS (SELECT FROM trusted_issuers WHERE issuer = $1)
                        ON CONFLICT (issuer) DO UPDATE
                           SET jwks_uri = EXCLUDED.jwks_uri, body = EXCLUDED.body,
                               etag = EXCLUDED.etag, fetched_at = EXCLUDED.fetched_at
                         WHERE k.fetched_at <= EXCLUDED.fetched_at
                        """,
                        key_set.issuer, key_set.jwks_uri, key_set.body, key_set.etag,
                        utc(key_set.fetched_at),
                    )
            except asyncpg.ForeignKeyViolationError:
                return  # the issuer was removed meanwhile

