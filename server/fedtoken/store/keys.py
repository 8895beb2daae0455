"""The keys table: key metadata and lifecycle (private keys never leave the HSM)."""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Final

import asyncpg

from fedtoken.core.errors import (
    AlreadyExists,
    ErrorReason,
    InvalidKeyTransition,
    KeyNotFound,
    TenantNotFound,
)
from fedtoken.core.model import KeyRecord, KeyState
from fedtoken.store.pool import ConnectionSource, aware, db_errors, epoch, from_epoch

_COLUMNS: Final = (
    "kid, tenant_id, alg, key_size, state, public_jwk::text AS public_jwk, hsm_label, "
    "created_at, activated_at, retiring_at, retired_at, compromised_at, private_destroyed_at"
)
# The timestamp column each state sets when it is entered (PENDING: created_at).
_STATE_COLUMN: Final[dict[KeyState, str]] = {
    KeyState.ACTIVE: "activated_at",
    KeyState.RETIRING: "retiring_at",
    KeyState.RETIRED: "retired_at",
    KeyState.DESTROYED: "destroyed_at",
    KeyState.COMPROMISED: "compromised_at",
}
_ONE_ACTIVE_INDEX: Final = "keys_one_active_per_tenant"


def _key(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        kid=row["kid"],
        tenant=row["tenant_id"],
        alg=row["alg"],
        key_size=row["key_size"],
        state=KeyState(row["state"]),
        public_jwk=json.loads(row["public_jwk"]),
        hsm_label=row["hsm_label"],
        created_at=epoch(row["created_at"]),
        activated_at=epoch(row["activated_at"]),
        retiring_at=epoch(row["retiring_at"]),
        retired_at=epoch(row["retired_at"]),
        compromised_at=epoch(row["compromised_at"]),
        private_destroyed_at=epoch(row["private_destroyed_at"]),
    )


def _second_active(tenant: str, kid: str) -> InvalidKeyTransition:
    return InvalidKeyTransition("the tenant already has an active key", tenant=tenant, kid=kid)


class PgKeys:
    """Key metadata and state changes (``KeyRepository``)."""

    def __init__(self, source: ConnectionSource) -> None:
        self._source = source

    async def insert(self, key: KeyRecord) -> KeyRecord:
        """Record a new key with the timestamps it carries (0: unset).

        The caller sets ``created_at`` (its clock's now); 0 falls back to the
        database's time only as a safety net.
        """
        with db_errors("insert key"):
            try:
                async with self._source.connection() as conn:
                    row = await conn.fetchrow(
                        f"""
                        INSERT INTO keys (kid, tenant_id, alg, key_size, state, public_jwk,
                            hsm_label, created_at, activated_at, retiring_at, retired_at,
                            compromised_at, private_destroyed_at)
                        VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7,
                            COALESCE($8, now()), $9, $10, $11, $12, $13)
                        RETURNING {_COLUMNS}
                        """,
                        key.kid,
                        key.tenant,
                        key.alg,
                        key.key_size,
                        key.state.value,
                        json.dumps(key.public_jwk, sort_keys=True),
                        key.hsm_label,
                        from_epoch(key.created_at),
                        from_epoch(key.activated_at),
                        from_epoch(key.retiring_at),
                        from_epoch(key.retired_at),
                        from_epoch(key.compromised_at),
                        from_epoch(key.private_destroyed_at),
                    )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == _ONE_ACTIVE_INDEX:
                    raise _second_active(key.tenant, key.kid) from exc
                raise AlreadyExists(
                    "a key with this kid or HSM label exists",
                    reason=ErrorReason.INVALID_FIELD,
                    field="kid",
                    tenant=key.tenant,
                    kid=key.kid,
                ) from exc
        return _key(row)

    async def get(self, kid: str) -> KeyRecord | None:
        with db_errors("get key"):
            async with self._source.connection() as conn:
                row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM keys WHERE kid = $1", kid)
        return None if row is None else _key(row)

    async def set_state(
        self, kid: str, state: KeyState, *, expected: Iterable[KeyState], now: datetime
    ) -> KeyRecord:
        """Move a key to ``state`` if it is in one of ``expected`` (compare-and-set),
        stamping the state's timestamp column with ``now``.

        KeyNotFound for an unknown kid; InvalidKeyTransition when the current
        state is not expected or the move would make a second ACTIVE key.
        """
        aware(now, "now")
        allowed = [s.value for s in expected]
        column = _STATE_COLUMN.get(state)
        stamp = f", {column} = $4" if column is not None else ""
        args = [kid, state.value, allowed] + ([now] if column is not None else [])
        with db_errors("set key state"):
            try:
                async with self._source.transaction() as conn:
                    row = await conn.fetchrow(
                        f"""
                        UPDATE keys SET state = $2{stamp}
                         WHERE kid = $1 AND state = ANY($3::text[])
                        RETURNING {_COLUMNS}
                        """,
                        *args,
                    )
                    if row is None:
                        current = await conn.fetchval("SELECT state FROM keys WHERE kid = $1", kid)
                        if current is None:
                            raise KeyNotFound("no such key", kid=kid)
                        raise InvalidKeyTransition(
                            f"key is {current}, cannot become {state.value}", kid=kid
                        )
            except asyncpg.UniqueViolationError as exc:
                raise _second_active("", kid) from exc
        return _key(row)

    async def activate(self, tenant_id: str, kid: str, *, now: datetime) -> KeyRecord:
        """Make the PENDING key ``kid`` the tenant's signing key, in one transaction.

        The previous ACTIVE key (if any) becomes RETIRING; both are stamped
        with ``now``. The tenant row is locked first, so concurrent
        activations of one tenant take turns.
        """
        aware(now, "now")
        with db_errors("activate key"):
            async with self._source.transaction() as conn:
                locked = await conn.fetchval(
                    "SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant_id
                )
                if locked is None:
                    raise TenantNotFound("no such tenant", tenant=tenant_id)
                current = await conn.fetchval(
                    "SELECT state FROM keys WHERE kid = $1 AND tenant_id = $2", kid, tenant_id
                )
                if current is None:
                    raise KeyNotFound("no such key in this tenant", tenant=tenant_id, kid=kid)
                if current != KeyState.PENDING.value:
                    raise InvalidKeyTransition(
                        f"key is {current}, only a PENDING key can be activated",
                        tenant=tenant_id,
                        kid=kid,
                    )
                await conn.execute(
                    """
                    UPDATE keys SET state = 'RETIRING', retiring_at = $2
                     WHERE tenant_id = $1 AND state = 'ACTIVE'
                    """,
                    tenant_id,
                    now,
                )
                row = await conn.fetchrow(
                    f"""
                    UPDATE keys SET state = 'ACTIVE', activated_at = $2
                     WHERE kid = $1
                    RETURNING {_COLUMNS}
                    """,
                    kid,
                    now,
                )
        return _key(row)

    async def list(self, tenant_id: str | None = None) -> builtins.list[KeyRecord]:
        """Keys of one tenant, or of all tenants when None; newest first."""
        with db_errors("list keys"):
            async with self._source.connection() as conn:
                rows = await conn.fetch(
                    f"""
                    SELECT {_COLUMNS} FROM keys
                     WHERE $1::text IS NULL OR tenant_id = $1
                     ORDER BY created_at DESC, kid
                    """,
                    tenant_id,
                )
        return [_key(r) for r in rows]

    async def mark_private_destroyed(self, kid: str, *, now: datetime) -> KeyRecord:
        """Record that the private half of ``kid`` is gone from the HSM (the
        first time only: a repeated destroy keeps the first stamp), unless
        the key is one that may still sign (PENDING, ACTIVE): that would be a
        lie the compliance report could not catch, so it is refused."""
        aware(now, "now")
        with db_errors("mark private key destroyed"):
            async with self._source.transaction() as conn:
                row = await conn.fetchrow(
                    f"""
                    UPDATE keys SET private_destroyed_at = COALESCE(private_destroyed_at, $2)
                     WHERE kid = $1 AND state NOT IN ('PENDING', 'ACTIVE')
                    RETURNING {_COLUMNS}
                    """,
                    kid,
                    now,
                )
                if row is None:
                    current = await conn.fetchval("SELECT state FROM keys WHERE kid = $1", kid)
                    if current is None:
                        raise KeyNotFound("no such key", kid=kid)
                    raise InvalidKeyTransition(
                        f"key is {current}: its private half must exist while it may sign",
                        kid=kid)
        return _key(row)
