"""The caller_grants table: which workload identity may do what."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Final

import asyncpg

from fedtoken.core.authz import Grant, Role
from fedtoken.store.pool import ConnectionSource, PoolSource, aware, db_errors, epoch

_COLUMNS: Final = "identity, role, tenants, audiences, max_lifetime_s, created_at, granted_by"


def _grant(row: asyncpg.Record) -> Grant:
    return Grant(
        identity=row["identity"],
        role=Role(row["role"]),
        tenants=frozenset(row["tenants"]),
        audiences=frozenset(row["audiences"]),
        max_lifetime_seconds=row["max_lifetime_s"],
        created_at=epoch(row["created_at"]),
        granted_by=row["granted_by"],
    )


class PgCallers:
    """Grants (``CallerRepository``). A grant is one role of one identity;
    granting it again replaces its scope."""

    def __init__(self, source: ConnectionSource) -> None:
        self._source = source

    @classmethod
    def over_pool(cls, pool: asyncpg.Pool) -> PgCallers:
        return cls(PoolSource(pool))

    async def put(self, grant: Grant, *, now: datetime) -> Grant:
        with db_errors("grant"):
            async with self._source.connection() as conn:
                row = await conn.fetchrow(
                    f"""
                    INSERT INTO caller_grants AS g ({_COLUMNS})
                    VALUES ($1, $2, $3, $4, $5, $6, $7)
                    ON CONFLICT (identity, role) DO UPDATE
                       SET tenants = EXCLUDED.tenants, audiences = EXCLUDED.audiences,
                           max_lifetime_s = EXCLUDED.max_lifetime_s,
                           created_at = EXCLUDED.created_at, granted_by = EXCLUDED.granted_by
                    RETURNING {_COLUMNS}
                    """,
                    grant.identity, grant.role.value, sorted(grant.tenants),
                    sorted(grant.audiences), grant.max_lifetime_seconds, aware(now, "now"),
                    grant.granted_by,
                )
        return _grant(row)

    async def remove(self, identity: str, role: Role | None) -> int:
        """Delete one role (or every role) of ``identity``; how many went."""
        with db_errors("revoke grant"):
            async with self._source.connection() as conn:
                status = await conn.execute(
                    "DELETE FROM caller_grants WHERE identity = $1 AND ($2::text IS NULL "
                    "OR role = $2)", identity, role.value if role else None)
        return int(status.split()[-1])

    async def list(self) -> builtins.list[Grant]:
        with db_errors("list grants"):
            async with self._source.connection() as conn:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM caller_grants ORDER BY identity, role")
        return [_grant(r) for r in rows]
