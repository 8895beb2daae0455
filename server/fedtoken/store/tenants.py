"""The tenants table."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Final

import asyncpg

from fedtoken.core.errors import TenantExists, TenantNotFound
from fedtoken.core.model import Tenant, TenantPolicy
from fedtoken.store.pool import ConnectionSource, aware, db_errors, epoch

_COLUMNS: Final = (
    "id, issuer, max_token_lifetime_s, default_token_lifetime_s, allowed_algorithms, "
    "key_size, created_at, rotation_period_s, earlier_tokens_expire_by"
)
_ISSUER_UNIQUE: Final = "tenants_issuer_key"


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(
        id=row["id"],
        issuer=row["issuer"],
        policy=TenantPolicy(
            max_token_lifetime_seconds=row["max_token_lifetime_s"],
            default_token_lifetime_seconds=row["default_token_lifetime_s"],
            allowed_algorithms=tuple(row["allowed_algorithms"]),
            key_size=row["key_size"],
            rotation_period_seconds=row["rotation_period_s"],
            earlier_tokens_expire_by=epoch(row["earlier_tokens_expire_by"])
            if row["earlier_tokens_expire_by"] is not None else 0,
        ),
        created_at=epoch(row["created_at"]),
    )


class PgTenants:
    """Tenants and their token policy (``TenantRepository``)."""

    def __init__(self, source: ConnectionSource) -> None:
        self._source = source

    async def create(self, tenant: Tenant, *, now: datetime) -> Tenant:
        """Insert a tenant created at ``now``; TenantExists if its id or issuer is taken."""
        p = tenant.policy
        with db_errors("create tenant"):
            try:
                async with self._source.connection() as conn:
                    row = await conn.fetchrow(
                        f"""
                        INSERT INTO tenants (id, issuer, max_token_lifetime_s,
                            default_token_lifetime_s, allowed_algorithms, key_size, created_at,
                            rotation_period_s)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                        RETURNING {_COLUMNS}
                        """,
                        tenant.id,
                        tenant.issuer,
                        p.max_token_lifetime_seconds,
                        p.default_token_lifetime_seconds,
                        builtins.list(p.allowed_algorithms),
                        p.key_size,
                        aware(now, "now"),
                        p.rotation_period_seconds,
                    )
            except asyncpg.UniqueViolationError as exc:
                field = "issuer" if exc.constraint_name == _ISSUER_UNIQUE else "id"
                raise TenantExists(
                    f"a tenant with this {field} exists", field=field, tenant=tenant.id
                ) from exc
        return _tenant(row)

    async def get(self, tenant_id: str) -> Tenant | None:
        with db_errors("get tenant"):
            async with self._source.connection() as conn:
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM tenants WHERE id = $1", tenant_id
                )
        return None if row is None else _tenant(row)

    async def list(self) -> builtins.list[Tenant]:
        """Every tenant, ordered by id."""
        with db_errors("list tenants"):
            async with self._source.connection() as conn:
                rows = await conn.fetch(f"SELECT {_COLUMNS} FROM tenants ORDER BY id")
        return [_tenant(r) for r in rows]

    async def update_policy(self, tenant_id: str, policy: TenantPolicy) -> Tenant:
        """Replace the rotation period and token lifetimes of a tenant (the
        service validated them); TenantNotFound if there is no such tenant."""
        with db_errors("update tenant"):
            async with self._source.connection() as conn:
                row = await conn.fetchrow(
                    f"""
                    UPDATE tenants SET rotation_period_s = $2, max_token_lifetime_s = $3,
                           default_token_lifetime_s = $4,
                           earlier_tokens_expire_by = CASE WHEN $5::bigint > 0
                               THEN to_timestamp($5::bigint) END
                     WHERE id = $1
                    RETURNING {_COLUMNS}
                    """,
                    tenant_id,
                    policy.rotation_period_seconds,
                    policy.max_token_lifetime_seconds,
                    policy.default_token_lifetime_seconds,
                    policy.earlier_tokens_expire_by,
                )
        if row is None:
            raise TenantNotFound("no such tenant", tenant=tenant_id)
        return _tenant(row)
