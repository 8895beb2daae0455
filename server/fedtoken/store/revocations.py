"""The revocations table (see migrations/0001_init.sql for the kinds' meaning)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Final

import asyncpg

from fedtoken.core.audit import AuditEvent
from fedtoken.core.errors import InvalidRequest
from fedtoken.store.audit_log import insert_event
from fedtoken.store.pool import (
    ConnectionSource,
    aware,
    db_errors,
    guarded_transaction,
    row_count,
)

REVOCATION_KINDS: Final = frozenset({"jti", "subject", "key"})

_UPSERT_SQL: Final = """
    INSERT INTO revocations AS r
        (tenant_id, kind, value, not_before, expires_at, reason, actor, created_at)
    VALUES ($1, $2, $3,
        CASE WHEN $2 = 'subject' THEN COALESCE($4::timestamptz, $8) END,
        $5, $6, $7, $8)
    ON CONFLICT (tenant_id, kind, value) DO UPDATE
       SET not_before = GREATEST(r.not_before, EXCLUDED.not_before),
           expires_at = GREATEST(r.expires_at, EXCLUDED.expires_at),
           created_at = EXCLUDED.created_at,
           reason = EXCLUDED.reason,
           actor = EXCLUDED.actor
     WHERE EXCLUDED.expires_at > r.expires_at
        OR EXCLUDED.not_before > r.not_before
    RETURNING created_at
"""

_IS_REVOKED_SQL: Final = """
    SELECT EXISTS (
        SELECT 1 FROM revocations
         WHERE tenant_id = $1 AND expires_at > $6
           AND ((kind = 'jti' AND value = $2)
             OR (kind = 'subject' AND value = $3 AND not_before > to_timestamp($4))
             OR (kind = 'key' AND value = $5)))
"""

# Compact rows for the in-memory view; epochs rounded up (see the notify trigger).
_ACTIVE_SQL: Final = """
    SELECT tenant_id, kind, value,
           ceil(extract(epoch FROM expires_at))::bigint,
           coalesce(ceil(extract(epoch FROM not_before))::bigint, 0)
      FROM revocations WHERE expires_at > $1
"""


class PgRevocations:
    """Revoked tokens, subjects and keys (``RevocationRepository``)."""

    def __init__(self, source: ConnectionSource) -> None:
        self._source = source

    async def revoke(
        self,
        tenant_id: str,
        kind: str,
        value: str,
        *,
        expires_at: datetime,
        now: datetime,
        not_before: datetime | None = None,
        reason: str = "",
        actor: str = "",
        audit: AuditEvent | None = None,
    ) -> tuple[bool, datetime]:
        """Record a revocation made at ``now``; return (changed, revoked_at).

        A subject revocation revokes the subject's tokens issued before
        ``not_before`` (default: ``now``); jti and key revocations take no
        not_before. Idempotent: a repeat that changes nothing returns False
        and the time the revocation took effect. A repeat that widens it (a
        later expires_at or not_before) is applied, returns True and is
        notified again: revoking a subject twice must also catch the tokens
        issued between the two calls. ``audit`` (if given) is appended in the
        same transaction, whether or not anything changed, because the
        request itself is auditable.
        """
        if kind not in REVOCATION_KINDS:
            raise InvalidRequest(f"unknown revocation kind {kind!r}", field="kind")
        aware(expires_at, "expires_at")
        aware(now, "now")
        if not_before is not None:
            if kind != "subject":
                raise InvalidRequest("not_before applies to subjects only", field="not_before")
            aware(not_before, "not_before")
        with db_errors("revoke"):
            async with self._source.transaction() as conn:
                row = await conn.fetchrow(
                    _UPSERT_SQL, tenant_id, kind, value, not_before, expires_at, reason, actor, now
                )
                if row is not None:
                    changed, revoked_at = True, row["created_at"]
                else:
                    changed = False
                    revoked_at = await conn.fetchval(
                        """
                        SELECT created_at FROM revocations
                         WHERE tenant_id = $1 AND kind = $2 AND value = $3
                        """,
                        tenant_id,
                        kind,
                        value,
                    )
                if audit is not None:
                    await insert_event(conn, audit)
        return changed, revoked_at

    async def is_revoked(
        self, tenant_id: str, jti: str, subject: str, issued_at: int, kid: str, *, now: datetime
    ) -> bool:
        """The real-time check: jti revoked, subject revoked for tokens issued
        before not_before (iat in Unix seconds), or the signing key revoked.

        Only revocations unexpired at ``now`` count, as in ``iter_active``, so
        this agrees with the in-memory view built from it.
        """
        with db_errors("check revocation"):
            async with self._source.connection() as conn:
                revoked = await conn.fetchval(
                    _IS_REVOKED_SQL, tenant_id, jti, subject, issued_at, kid, aware(now, "now")
                )
        return bool(revoked)

    async def iter_active(
        self, now: datetime, *, chunk: int = 20_000
    ) -> AsyncIterator[list[tuple[str, str, str, int, int]]]:
        """Revocations in force at ``now`` as compact rows (tenant, kind, value,
        expires_at, not_before as Unix seconds rounded up), streamed in chunks
        through a server-side cursor: a million rows never sit in memory at
        once, and no single statement runs long enough to hit the timeout.

        A long operation: the whole stream (including the time the consumer
        takes between chunks) is bounded by the source's long bound, each
        chunk by its page bound.
        """
        aware(now, "now")
        source = self._source
        page = source.page_timeout
        with db_errors("stream revocations"):
            async with source.connection(source.long_timeout) as conn, self._read_tx(conn):
                cursor = await conn.cursor(_ACTIVE_SQL, now, timeout=page)
                while True:
                    rows = await cursor.fetch(chunk, timeout=page)
                    if not rows:
                        return
                    yield [tuple(r) for r in rows]

    def _read_tx(self, conn: asyncpg.Connection) -> AbstractAsyncContextManager[object]:
        # A savepoint inside a transaction cannot change its access mode.
        if self._source.in_transaction:
            return guarded_transaction(conn)
        return guarded_transaction(conn, readonly=True)

    async def purge_expired(self, now: datetime) -> int:
        """Delete revocations that expired by ``now``; return how many."""
        with db_errors("purge revocations"):  # housekeeping: a long operation
            async with self._source.connection(self._source.long_timeout) as conn:
                status = await conn.execute(
                    "DELETE FROM revocations WHERE expires_at <= $1", aware(now, "now")
                )
        return row_count(status)
