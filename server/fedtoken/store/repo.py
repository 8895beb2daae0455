"""Postgres repositories: tenants, key metadata, revocations, the audit trail.

asyncpg errors are translated here, where they enter fedtoken (see
``db_errors``): callers only ever see ``FedtokenError`` subclasses, and an
unreachable or overloaded database is always ``StoreUnavailable`` so that the
RPC layer answers UNAVAILABLE and clients retry.

JSON columns are sent and read as text (``::text``), so the store does not
depend on type codecs installed on the pool.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg

from fedtoken.core.model import KeyRecord, KeyState, Tenant, TenantPolicy
from fedtoken.core.errors import (
    AlreadyExists,
    ErrorReason,
    FailedPrecondition,
    FedtokenError,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
)
from fedtoken.core.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    ChainProblem,
    ChainReport,
)

_log = logging.getLogger(__name__)

EVENTS_CHANNEL: Final = "fedtoken_events"
REVOCATION_KINDS: Final = frozenset({"jti", "subject", "key"})
MAX_AUDIT_PAGE: Final = 10_000

# SQLSTATE classes that mean "the database cannot serve now" rather than "the
# request is wrong": connection exception, insufficient resources, operator
# intervention (includes statement timeout / admin shutdown), system error.
_UNAVAILABLE_CLASSES: Final = frozenset({"08", "53", "57", "58"})
# Transient conflicts a retry resolves: serialization failure, deadlock,
# lock not available.
_RETRYABLE_STATES: Final = frozenset({"40001", "40P01", "55P03"})


class AuditCommitUncertain(StoreUnavailable):
    """The connection failed while committing an audit append: the rows may or may not be in.

    ``seq`` is the seq the last row of the append was given inside the
    transaction. If the commit happened, the row with that seq is that last
    row (rows are immutable and seqs gapless); if it rolled back, the seq is
    free or holds someone else's row. Comparing the row at ``seq`` with the
    event settles it (see ``Store.audit_events_at``).
    """

    def __init__(self, message: str, *, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


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
    if state == "23503":
        return NotFound(f"{op}: tenant does not exist", reason=ErrorReason.TENANT_NOT_FOUND)
    if state in ("23502", "23514") or state[:2] == "22":
        return InvalidRequest(f"{op}: value rejected by the database ({name})")
    return FedtokenError(f"{op}: unexpected database error ({name}, SQLSTATE {state})")


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


# --- row mapping -------------------------------------------------------------------


def _epoch(ts: datetime | None) -> int:
    return int(ts.timestamp()) if ts is not None else 0


def _from_epoch(seconds: int) -> datetime | None:
    return datetime.fromtimestamp(seconds, tz=UTC) if seconds else None


def _aware(ts: datetime, field: str) -> datetime:
    if ts.tzinfo is None:
        raise InvalidRequest(f"{field} must carry a time zone", field=field)
    return ts


def _null(value: str) -> str | None:
    return value or None


_TENANT_COLUMNS: Final = (
    "id, issuer, max_token_lifetime_s, default_token_lifetime_s, allowed_algorithms, "
    "key_size, created_at"
)


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(
        id=row["id"],
        issuer=row["issuer"],
        policy=TenantPolicy(
            max_token_lifetime_seconds=row["max_token_lifetime_s"],
            default_token_lifetime_seconds=row["default_token_lifetime_s"],
            allowed_algorithms=tuple(row["allowed_algorithms"]),
            key_size=row["key_size"],
        ),
        created_at=_epoch(row["created_at"]),
    )


_KEY_COLUMNS: Final = (
    "kid, tenant_id, alg, key_size, state, public_jwk::text AS public_jwk, hsm_label, "
    "created_at, activated_at, retiring_at, retired_at, compromised_at"
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
        created_at=_epoch(row["created_at"]),
        activated_at=_epoch(row["activated_at"]),
        retiring_at=_epoch(row["retiring_at"]),
        retired_at=_epoch(row["retired_at"]),
        compromised_at=_epoch(row["compromised_at"]),
    )


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revocation row (see the revocations table for the kinds' meaning)."""

    tenant: str
    kind: str
    value: str
    not_before: datetime | None
    expires_at: datetime
    created_at: datetime
    reason: str
    actor: str


_AUDIT_COLUMNS: Final = (
    "seq, ts, tenant_id, actor, event_type, subject, jti, kid, outcome, reason, "
    "request_id, details::text AS details, prev_hash, hash"
)
# Columns a writer supplies; seq, ts and the hashes come from the chain trigger.
_AUDIT_INPUT_COLUMNS: Final = (
    "tenant_id",
    "actor",
    "event_type",
    "subject",
    "jti",
    "kid",
    "outcome",
    "reason",
    "request_id",
    "details",
)


def _audit_values(event: AuditEvent) -> tuple[Any, ...]:
    if not event.event_type:
        raise InvalidRequest("audit event without event_type", field="event_type")
    details = None if event.details is None else json.dumps(event.details, sort_keys=True)
    return (
        _null(event.tenant),
        _null(event.actor),
        event.event_type,
        _null(event.subject),
        _null(event.jti),
        _null(event.kid),
        _null(event.outcome),
        _null(event.reason),
        _null(event.request_id),
        details,
    )


def _audit_record(row: asyncpg.Record) -> AuditRecord:
    return AuditRecord(
        seq=row["seq"],
        ts=row["ts"],
        event=AuditEvent(
            event_type=row["event_type"],
            tenant=row["tenant_id"] or "",
            actor=row["actor"] or "",
            subject=row["subject"] or "",
            jti=row["jti"] or "",
            kid=row["kid"] or "",
            outcome=row["outcome"] or "",
            reason=row["reason"] or "",
            request_id=row["request_id"] or "",
            details=None if row["details"] is None else json.loads(row["details"]),
        ),
        prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]),
    )


_INSERT_AUDIT_SQL: Final = """
    INSERT INTO audit_events (tenant_id, actor, event_type, subject, jti, kid,
        outcome, reason, request_id, details)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::text::jsonb)
    RETURNING seq
"""

# The hash each row should carry, recomputed by the same SQL function the chain
# trigger uses, so the verifier and the writer cannot disagree on the encoding.
_VERIFY_PAGE_SQL: Final = """
    SELECT seq, prev_hash, hash,
           sha256(prev_hash || convert_to(audit_canonical(
               seq, ts, tenant_id, actor, event_type, subject, jti, kid,
               outcome, reason, request_id, details), 'UTF8')) AS expected
      FROM audit_events
     WHERE seq > $1
     ORDER BY seq
     LIMIT $2
"""


# --- notifications -------------------------------------------------------------------

NotificationCallback = Callable[[dict[str, Any]], None]


class Listener:
    """LISTENs on ``fedtoken_events`` on one connection held from the pool.

    Notifications are not queued for a disconnected listener, so when the
    connection dies ``on_lost`` is called (once) and the owner must resync
    its in-memory state from the tables and listen again. Close it before
    closing the pool (the pool waits for the held connection).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        conn: asyncpg.Connection,
        callback: NotificationCallback,
        on_lost: Callable[[], None] | None,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._callback = callback
        self._on_lost = on_lost
        self._closed = False
        self._lost = False

    @property
    def alive(self) -> bool:
        """False once closed or once the connection was lost."""
        return not (self._closed or self._lost or self._conn.is_closed())

    async def _start(self) -> None:
        await self._conn.add_listener(EVENTS_CHANNEL, self._on_notification)
        self._conn.add_termination_listener(self._on_termination)

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        if not isinstance(message, dict) or "type" not in message:
            _log.warning("ignoring malformed %s notification", EVENTS_CHANNEL)
            return
        try:
            self._callback(message)
        except Exception:  # noqa: BLE001 - a bad callback must not stop the listener
            _log.exception("%s callback failed", EVENTS_CHANNEL)

    def _on_termination(self, _conn: object) -> None:
        if self._closed or self._lost:
            return
        self._lost = True
        _log.warning("%s listener connection lost; state must be resynced", EVENTS_CHANNEL)
        if self._on_lost is not None:
            self._on_lost()

    async def close(self) -> None:
        """Stop listening and give the connection back to the pool."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._conn.is_closed():
                self._conn.remove_termination_listener(self._on_termination)
                await self._conn.remove_listener(EVENTS_CHANNEL, self._on_notification)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            _log.info("listener connection failed while closing: %s", type(exc).__name__)
        finally:
            await self._pool.release(self._conn)


# --- the store -----------------------------------------------------------------------


class Store:
    """The repositories, over a pool or (inside ``transaction()``) one connection."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout: float = 5.0) -> None:
        self._pool: asyncpg.Pool | None = pool
        self._bound_conn: asyncpg.Connection | None = None
        self._acquire_timeout = acquire_timeout

    @classmethod
    def _bound(cls, conn: asyncpg.Connection, acquire_timeout: float) -> Store:
        store = cls.__new__(cls)
        store._pool = None
        store._bound_conn = conn
        store._acquire_timeout = acquire_timeout
        return store

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._bound_conn is not None:
            yield self._bound_conn
            return
        assert self._pool is not None
        # A bounded wait: an exhausted pool is "unavailable", not a hang.
        async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
            yield conn

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction (a savepoint when the store is already in one)."""
        async with self._connection() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Store]:
        """A Store bound to one connection in one transaction.

        Everything done through it commits or rolls back together, e.g. an
        issuance and its audit record.
        """
        with db_errors("transaction"):
            async with self._tx() as conn:
                yield Store._bound(conn, self._acquire_timeout)

    @asynccontextmanager
    async def advisory_lock(self, key: int) -> AsyncIterator[None]:
        """Hold the session advisory lock ``key`` for the block.

        For once-only work across replicas (e.g. first-start bootstrap). The
        lock lives on one held connection; the block's own statements may use
        other pool connections.
        """
        with db_errors("advisory lock"):
            async with self._connection() as conn:
                await conn.execute("SELECT pg_advisory_lock($1)", key)
                try:
                    yield
                finally:
                    if not conn.is_closed():
                        await conn.execute("SELECT pg_advisory_unlock($1)", key)

    # --- tenants -----------------------------------------------------------------

    async def create_tenant(self, t: Tenant) -> Tenant:
        """Insert a tenant; AlreadyExists (TENANT_EXISTS) if its id or issuer is taken."""
        p = t.policy
        with db_errors("create tenant"):
            try:
                async with self._connection() as conn:
                    row = await conn.fetchrow(
                        f"""
                        INSERT INTO tenants (id, issuer, max_token_lifetime_s,
                            default_token_lifetime_s, allowed_algorithms, key_size)
                        VALUES ($1, $2, $3, $4, $5, $6)
                        RETURNING {_TENANT_COLUMNS}
                        """,
                        t.id,
                        t.issuer,
                        p.max_token_lifetime_seconds,
                        p.default_token_lifetime_seconds,
                        list(p.allowed_algorithms),
                        p.key_size,
                    )
            except asyncpg.UniqueViolationError as exc:
                field = "issuer" if exc.constraint_name == "tenants_issuer_key" else "id"
                raise AlreadyExists(
                    f"a tenant with this {field} exists", field=field, tenant=t.id
                ) from exc
        return _tenant(row)

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        with db_errors("get tenant"):
            async with self._connection() as conn:
                row = await conn.fetchrow(
                    f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE id = $1", tenant_id
                )
        return None if row is None else _tenant(row)

    async def get_tenant_by_issuer(self, issuer: str) -> Tenant | None:
        with db_errors("get tenant by issuer"):
            async with self._connection() as conn:
                row = await conn.fetchrow(
                    f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE issuer = $1", issuer
                )
        return None if row is None else _tenant(row)

    async def list_tenants(self) -> list[Tenant]:
        """Every tenant, ordered by id."""
        with db_errors("list tenants"):
            async with self._connection() as conn:
                rows = await conn.fetch(f"SELECT {_TENANT_COLUMNS} FROM tenants ORDER BY id")
        return [_tenant(r) for r in rows]

    # --- keys --------------------------------------------------------------------

    async def insert_key(self, k: KeyRecord) -> KeyRecord:
        """Record a new key; timestamps left at 0 are unset (created_at: now)."""
        with db_errors("insert key"):
            try:
                async with self._connection() as conn:
                    row = await conn.fetchrow(
                        f"""
                        INSERT INTO keys (kid, tenant_id, alg, key_size, state, public_jwk,
                            hsm_label, created_at, activated_at, retiring_at, retired_at,
                            compromised_at)
                        VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7,
                            COALESCE($8, now()), $9, $10, $11, $12)
                        RETURNING {_KEY_COLUMNS}
                        """,
                        k.kid,
                        k.tenant,
                        k.alg,
                        k.key_size,
                        k.state.value,
                        json.dumps(k.public_jwk, sort_keys=True),
                        k.hsm_label,
                        _from_epoch(k.created_at),
                        _from_epoch(k.activated_at),
                        _from_epoch(k.retiring_at),
                        _from_epoch(k.retired_at),
                        _from_epoch(k.compromised_at),
                    )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == _ONE_ACTIVE_INDEX:
                    raise FailedPrecondition(
                        "the tenant already has an active key", tenant=k.tenant, kid=k.kid
                    ) from exc
                raise AlreadyExists(
                    "a key with this kid or HSM label exists",
                    reason=ErrorReason.INVALID_FIELD,
                    field="kid",
                    tenant=k.tenant,
                    kid=k.kid,
                ) from exc
        return _key(row)

    async def list_keys(self, tenant_id: str | None = None) -> list[KeyRecord]:
        """Keys of one tenant, or of all tenants when None; newest first."""
        with db_errors("list keys"):
            async with self._connection() as conn:
                rows = await conn.fetch(
                    f"""
                    SELECT {_KEY_COLUMNS} FROM keys
                     WHERE $1::text IS NULL OR tenant_id = $1
                     ORDER BY created_at DESC, kid
                    """,
                    tenant_id,
                )
        return [_key(r) for r in rows]

    async def get_key(self, kid: str) -> KeyRecord | None:
        with db_errors("get key"):
            async with self._connection() as conn:
                row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM keys WHERE kid = $1", kid)
        return None if row is None else _key(row)

    async def set_key_state(
        self, kid: str, state: KeyState, *, expected: Iterable[KeyState]
    ) -> KeyRecord:
        """Move a key to ``state`` if it is in one of ``expected`` (compare-and-set).

        NotFound (KEY_NOT_FOUND) for an unknown kid; FailedPrecondition
        (INVALID_KEY_TRANSITION) when the current state is not expected or the
        move would make a second ACTIVE key.
        """
        allowed = [s.value for s in expected]
        stamp = f", {_STATE_COLUMN[state]} = now()" if state in _STATE_COLUMN else ""
        with db_errors("set key state"):
            try:
                async with self._tx() as conn:
                    row = await conn.fetchrow(
                        f"""
                        UPDATE keys SET state = $2{stamp}
                         WHERE kid = $1 AND state = ANY($3::text[])
                        RETURNING {_KEY_COLUMNS}
                        """,
                        kid,
                        state.value,
                        allowed,
                    )
                    if row is None:
                        current = await conn.fetchval("SELECT state FROM keys WHERE kid = $1", kid)
                        if current is None:
                            raise NotFound("no such key", reason=ErrorReason.KEY_NOT_FOUND, kid=kid)
                        raise FailedPrecondition(
                            f"key is {current}, cannot become {state.value}", kid=kid
                        )
            except asyncpg.UniqueViolationError as exc:
                raise FailedPrecondition("the tenant already has an active key", kid=kid) from exc
        return _key(row)

    async def activate_key(self, tenant_id: str, kid: str) -> KeyRecord:
        """Make the PENDING key ``kid`` the tenant's signing key, in one transaction.

        The previous ACTIVE key (if any) becomes RETIRING. The tenant row is
        locked first, so concurrent activations of one tenant take turns.
        """
        with db_errors("activate key"):
            async with self._tx() as conn:
                if (
                    await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
                    is None
                ):
                    raise NotFound("no such tenant", tenant=tenant_id)
                current = await conn.fetchval(
                    "SELECT state FROM keys WHERE kid = $1 AND tenant_id = $2", kid, tenant_id
                )
                if current is None:
                    raise NotFound(
                        "no such key in this tenant",
                        reason=ErrorReason.KEY_NOT_FOUND,
                        tenant=tenant_id,
                        kid=kid,
                    )
                if current != KeyState.PENDING.value:
                    raise FailedPrecondition(
                        f"key is {current}, only a PENDING key can be activated",
                        tenant=tenant_id,
                        kid=kid,
                    )
                await conn.execute(
                    """
                    UPDATE keys SET state = 'RETIRING', retiring_at = now()
                     WHERE tenant_id = $1 AND state = 'ACTIVE'
                    """,
                    tenant_id,
                )
                row = await conn.fetchrow(
                    f"""
                    UPDATE keys SET state = 'ACTIVE', activated_at = now()
                     WHERE kid = $1
                    RETURNING {_KEY_COLUMNS}
                    """,
                    kid,
                )
        return _key(row)

    # --- revocations -------------------------------------------------------------

    async def revoke(
        self,
        tenant_id: str,
        kind: str,
        value: str,
        *,
        expires_at: datetime,
        not_before: datetime | None = None,
        reason: str = "",
        actor: str = "",
        audit: AuditEvent | None = None,
    ) -> tuple[bool, datetime]:
        """Record a revocation; return (changed, revoked_at).

        A subject revocation revokes the subject's tokens issued before
        ``not_before`` (default: now); jti and key revocations take no
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
        _aware(expires_at, "expires_at")
        if not_before is not None:
            if kind != "subject":
                raise InvalidRequest("not_before applies to subjects only", field="not_before")
            _aware(not_before, "not_before")
        with db_errors("revoke"):
            async with self._tx() as conn:
                row = await conn.fetchrow(
                    """
                    INSERT INTO revocations AS r
                        (tenant_id, kind, value, not_before, expires_at, reason, actor)
                    VALUES ($1, $2, $3,
                        CASE WHEN $2 = 'subject' THEN COALESCE($4::timestamptz, now()) END,
                        $5, $6, $7)
                    ON CONFLICT (tenant_id, kind, value) DO UPDATE
                       SET not_before = GREATEST(r.not_before, EXCLUDED.not_before),
                           expires_at = GREATEST(r.expires_at, EXCLUDED.expires_at),
                           created_at = now(),
                           reason = EXCLUDED.reason,
                           actor = EXCLUDED.actor
                     WHERE EXCLUDED.expires_at > r.expires_at
                        OR EXCLUDED.not_before > r.not_before
                    RETURNING created_at
                    """,
                    tenant_id,
                    kind,
                    value,
                    not_before,
                    expires_at,
                    reason,
                    actor,
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
                    await self._insert_audit(conn, audit)
        return changed, revoked_at

    async def is_revoked(
        self, tenant_id: str, jti: str, subject: str, issued_at: int, kid: str
    ) -> bool:
        """The real-time check: jti revoked, subject revoked for tokens issued
        before not_before (iat in Unix seconds), or the signing key revoked.

        Only unexpired revocations count, as in ``list_revocations``, so this
        agrees with the in-memory view built from it.
        """
        with db_errors("check revocation"):
            async with self._connection() as conn:
                revoked = await conn.fetchval(
                    """
                    SELECT EXISTS (
                        SELECT 1 FROM revocations
                         WHERE tenant_id = $1 AND expires_at > now()
                           AND ((kind = 'jti' AND value = $2)
                             OR (kind = 'subject' AND value = $3
                                 AND not_before > to_timestamp($4))
                             OR (kind = 'key' AND value = $5)))
                    """,
                    tenant_id,
                    jti,
                    subject,
                    issued_at,
                    kid,
                )
        return bool(revoked)

    async def list_revocations(self, now: datetime) -> list[Revocation]:
        """Every revocation still in force at ``now``, for the in-memory view."""
        with db_errors("list revocations"):
            async with self._connection() as conn:
                rows = await conn.fetch(
                    """
                    SELECT tenant_id, kind, value, not_before, expires_at, created_at,
                           reason, actor
                      FROM revocations WHERE expires_at > $1
                     ORDER BY tenant_id, kind, value
                    """,
                    _aware(now, "now"),
                )
        return [
            Revocation(
                tenant=r["tenant_id"],
                kind=r["kind"],
                value=r["value"],
                not_before=r["not_before"],
                expires_at=r["expires_at"],
                created_at=r["created_at"],
                reason=r["reason"],
                actor=r["actor"],
            )
            for r in rows
        ]

    async def iter_revocations(
        self, now: datetime, *, chunk: int = 20_000
    ) -> AsyncIterator[list[tuple[str, str, str, int, int]]]:
        """Revocations in force at ``now`` as compact rows (tenant, kind, value,
        expires_at, not_before as Unix seconds rounded up), streamed in chunks
        through a server-side cursor: a million rows never sit in memory at
        once, and no single statement runs long enough to hit the timeout."""
        with db_errors("stream revocations"):
            async with self._connection() as conn, conn.transaction(readonly=True):
                cursor = await conn.cursor(
                    """
                    SELECT tenant_id, kind, value,
                           ceil(extract(epoch FROM expires_at))::bigint,
                           coalesce(ceil(extract(epoch FROM not_before))::bigint, 0)
                      FROM revocations WHERE expires_at > $1
                    """,
                    _aware(now, "now"),
                )
                while True:
                    rows = await cursor.fetch(chunk)
                    if not rows:
                        return
                    yield [tuple(r) for r in rows]

    async def purge_expired(self, now: datetime) -> int:
        """Delete revocations that expired by ``now``; return how many."""
        with db_errors("purge revocations"):
            async with self._connection() as conn:
                status = await conn.execute(
                    "DELETE FROM revocations WHERE expires_at <= $1", _aware(now, "now")
                )
        return int(status.split()[-1])

    # --- audit -------------------------------------------------------------------

    @staticmethod
    async def _insert_audit(conn: asyncpg.Connection, event: AuditEvent) -> int:
        seq: int = await conn.fetchval(_INSERT_AUDIT_SQL, *_audit_values(event))
        return seq

    async def append_audit(self, event: AuditEvent) -> int:
        """Append one event to the chain; return its seq."""
        with db_errors("append audit"):
            async with self._connection() as conn:
                return await self._insert_audit(conn, event)

    async def append_audit_many(self, events: Sequence[AuditEvent]) -> int:
        """Append events in order with one COPY; return how many.

        COPY fires the BEFORE INSERT row trigger, so the batch is chained
        exactly like single inserts, in the order given.
        """
        if not events:
            return 0
        records = [_audit_values(e) for e in events]
        with db_errors("append audit batch"):
            async with self._tx() as conn:
                status = await conn.copy_records_to_table(
                    "audit_events", records=records, columns=list(_AUDIT_INPUT_COLUMNS)
                )
        return int(status.split()[-1])

    async def append_audit_chunk(
        self,
        events: Sequence[AuditEvent],
        *,
        before_commit: Callable[[int], Awaitable[None]] | None = None,
    ) -> int:
        """Append events in order in one transaction; return the seq of the last.

        One event is an INSERT, more are one COPY; either way the chain trigger
        assigns the seqs ``last - len(events) + 1 .. last`` to them, in order.
        ``before_commit(last_seq)`` runs inside the transaction after the rows
        are chained (the audit head stays locked meanwhile, so keep it short);
        if it raises, nothing is appended. If the commit itself fails, whether
        it happened is unknown: ``AuditCommitUncertain`` carries the last seq so
        the caller can find out instead of appending the rows twice. Use it on
        the pool-backed store (inside ``transaction()`` the commit is a
        savepoint's).
        """
        if not events:
            raise InvalidRequest("no audit events to append", field="events")
        records = [_audit_values(e) for e in events]
        last = 0
        committed = False
        with db_errors("append audit chunk"):
            try:
                async with self._connection() as conn:
                    tx = conn.transaction()
                    await tx.start()
                    try:
                        if len(records) == 1:
                            last = await conn.fetchval(_INSERT_AUDIT_SQL, *records[0])
                        else:
                            await conn.copy_records_to_table(
                                "audit_events",
                                records=records,
                                columns=list(_AUDIT_INPUT_COLUMNS),
                            )
                            # Our transaction holds the head's row lock: this is our last row.
                            last = await conn.fetchval("SELECT seq FROM audit_head WHERE id = 1")
                        if before_commit is not None:
                            await before_commit(last)
                    except BaseException:
                        # A lost connection detaches the pool proxy: even is_closed() may fail.
                        with contextlib.suppress(Exception):
                            if not conn.is_closed():
                                await tx.rollback()
                        raise
                    try:
                        await tx.commit()
                    except Exception as exc:
                        raise AuditCommitUncertain(
                            f"append audit chunk: commit outcome unknown ({type(exc).__name__})",
                            seq=last,
                        ) from exc
                    committed = True
            except asyncpg.exceptions.InternalClientError as exc:
                if not committed:
                    raise StoreUnavailable(
                        f"append audit chunk: connection failed ({type(exc).__name__})"
                    ) from exc
            except Exception:
                # Committed: only giving the connection back to the pool failed
                # (e.g. the server is shutting down). The rows are in.
                if not committed:
                    raise
        return last

    async def audit_events_at(self, seqs: Iterable[int]) -> dict[int, AuditEvent]:
        """The events stored at these seqs (absent seqs are left out)."""
        wanted = sorted(set(seqs))
        if not wanted:
            return {}
        with db_errors("read audit events"):
            async with self._connection() as conn:
                rows = await conn.fetch(
                    f"SELECT {_AUDIT_COLUMNS} FROM audit_events WHERE seq = ANY($1::bigint[])",
                    wanted,
                )
        return {r["seq"]: _audit_record(r).event for r in rows}

    async def list_audit(
        self,
        *,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        event_type: str | None = None,
        subject: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Events in seq order, filtered; page with ``after_seq`` = last seq seen.

        ``since`` is inclusive, ``until`` exclusive.
        """
        if not 1 <= limit <= MAX_AUDIT_PAGE:
            raise InvalidRequest(f"limit must be 1..{MAX_AUDIT_PAGE}", field="limit")
        # Only fixed SQL fragments are concatenated; every value is a parameter.
        clauses = ["seq > $1"]
        args: list[Any] = [after_seq]
        for column, op, value in (
            ("tenant_id", "=", tenant),
            ("ts", ">=", since),
            ("ts", "<", until),
            ("event_type", "=", event_type),
            ("subject", "=", subject),
        ):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} {op} ${len(args)}")
        args.append(limit)
        sql = (
            f"SELECT {_AUDIT_COLUMNS} FROM audit_events WHERE {' AND '.join(clauses)} "
            f"ORDER BY seq LIMIT ${len(args)}"
        )
        with db_errors("list audit"):
            async with self._connection() as conn:
                rows = await conn.fetch(sql, *args)
        return [_audit_record(r) for r in rows]

    async def verify_audit_chain(self, *, page_size: int = 5000) -> ChainReport:
        """Walk the whole chain in seq order and recompute every hash.

        Runs in one REPEATABLE READ snapshot so concurrent appends do not
        disturb the walk. Stops at the first problem, which is reported with
        the seq where the chain first breaks.
        """
        with db_errors("verify audit chain"):
            async with self._connection() as conn:
                if self._bound_conn is None:
                    tx = conn.transaction(isolation="repeatable_read", readonly=True)
                else:
                    tx = conn.transaction()
                async with tx:
                    return await self._walk_chain(conn, page_size)

    @staticmethod
    async def _walk_chain(conn: asyncpg.Connection, page_size: int) -> ChainReport:
        head = await conn.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1")
        if head is None:  # only a superuser bypassing the guard trigger can do this
            return ChainReport(
                ok=False,
                rows_checked=0,
                head_seq=0,
                head_hash=b"",
                first_bad_seq=0,
                problem=ChainProblem.HEAD_MISMATCH,
            )
        head_seq: int = head["seq"]
        head_hash = bytes(head["hash"])

        def report(bad_seq: int | None, problem: ChainProblem | None, checked: int) -> ChainReport:
            return ChainReport(
                ok=problem is None,
                rows_checked=checked,
                head_seq=head_seq,
                head_hash=head_hash,
                first_bad_seq=bad_seq,
                problem=problem,
            )

        prev_hash, next_seq, checked = GENESIS_HASH, 1, 0
        while True:
            rows = await conn.fetch(_VERIFY_PAGE_SQL, next_seq - 1, page_size)
            for row in rows:
                if row["seq"] != next_seq:
                    return report(next_seq, ChainProblem.GAP, checked)
                if bytes(row["hash"]) != bytes(row["expected"]):
                    return report(next_seq, ChainProblem.ALTERED, checked)
                if bytes(row["prev_hash"]) != prev_hash:
                    return report(next_seq, ChainProblem.BROKEN_LINK, checked)
                prev_hash = bytes(row["hash"])
                next_seq += 1
                checked += 1
            if len(rows) < page_size:
                break
        last_seq = next_seq - 1
        if head_seq > last_seq:  # the newest rows were deleted
            return report(last_seq + 1, ChainProblem.GAP, checked)
        if head_seq != last_seq or head_hash != prev_hash:
            return report(last_seq, ChainProblem.HEAD_MISMATCH, checked)
        return report(None, None, checked)

    # --- notifications -----------------------------------------------------------

    async def listen(
        self, callback: NotificationCallback, *, on_lost: Callable[[], None] | None = None
    ) -> Listener:
        """Deliver each ``fedtoken_events`` payload (a dict) to ``callback``.

        Runs on a connection held from the pool until ``Listener.close()``.
        """
        if self._pool is None:
            raise RuntimeError("listen() needs the pool-backed Store, not a transaction")
        with db_errors("listen"):
            conn = await self._pool.acquire(timeout=self._acquire_timeout)
            listener = Listener(self._pool, conn, callback, on_lost)
            try:
                await listener._start()
            except BaseException:
                await self._pool.release(conn)
                raise
        return listener
