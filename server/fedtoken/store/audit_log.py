"""The hash-chained audit trail (``audit_events``, ``audit_head``).

The chain itself is computed by the database (migrations/0001_init.sql):
the chain trigger assigns seq, prev_hash and hash, and ``ts``. ``ts`` is the
one timestamp taken from the database's clock on purpose: it is the time the
row joined the chain (so it never decreases along seq), a record of when,
not an input of any rule. Rules take their "now" from the caller.

JSON columns are sent and read as text (``::text``), so the store does not
depend on type codecs installed on the pool.
"""

from __future__ import annotations

import builtins
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg

from fedtoken.core.audit import (
    GENESIS_HASH,
    ArchivedRow,
    AuditAnchor,
    AuditEvent,
    AuditRecord,
    ChainProblem,
    ChainReport,
)
from fedtoken.core.errors import InvalidRequest, StoreUnavailable
from fedtoken.store.pool import (
    ConnectionSource,
    db_errors,
    guarded_transaction,
    intact_after,
    terminate,
)

MAX_AUDIT_PAGE: Final = 10_000

_COLUMNS: Final = (
    "seq, ts, tenant_id, actor, event_type, subject, jti, kid, outcome, reason, "
    "request_id, details::text AS details, prev_hash, hash"
)
# Columns a writer supplies; seq, ts and the hashes come from the chain trigger.
_INPUT_COLUMNS: Final = (
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
_INSERT_SQL: Final = """
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

_EXPORT_SQL: Final = """
    SELECT seq, prev_hash, hash, audit_canonical(
               seq, ts, tenant_id, actor, event_type, subject, jti, kid,
               outcome, reason, request_id, details) AS canonical
      FROM audit_events
     WHERE seq > $1 AND seq <= $2
     ORDER BY seq
     LIMIT $3
"""
_ANCHOR_SQL: Final = "SELECT seq, hash, checkpoint, archive FROM audit_anchor WHERE id = 1"


class AuditCommitUncertain(StoreUnavailable):
    """The connection failed while committing an audit append: the rows may or may not be in.

    ``seq`` is the seq the last row of the append was given inside the
    transaction. If the commit happened, the row with that seq is that last
    row (rows are immutable and seqs gapless); if it rolled back, the seq is
    free or holds someone else's row. Comparing the row at ``seq`` with the
    event settles it (see ``PgAuditLog.events_at``).
    """

    def __init__(self, message: str, *, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


# --- row mapping -------------------------------------------------------------------


def _null(value: str) -> str | None:
    return value or None


def _values(event: AuditEvent) -> tuple[Any, ...]:
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


def _record(row: asyncpg.Record) -> AuditRecord:
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


async def insert_event(conn: asyncpg.Connection, event: AuditEvent) -> int:
    """Append one event on ``conn`` (in the caller's transaction); return its seq."""
    seq: int = await conn.fetchval(_INSERT_SQL, *_values(event))
    return seq


async def _insert_rows(conn: asyncpg.Connection, records: Sequence[tuple[Any, ...]]) -> int:
    """One INSERT, or one COPY for several; the seq of the last row."""
    if len(records) == 1:
        seq: int = await conn.fetchval(_INSERT_SQL, *records[0])
        return seq
    # COPY fires the BEFORE INSERT row trigger: the rows are chained in order.
    await conn.copy_records_to_table(
        "audit_events", records=records, columns=builtins.list(_INPUT_COLUMNS)
    )
    # Our transaction holds the head's row lock: this is our last row.
    last: int = await conn.fetchval("SELECT seq FROM audit_head WHERE id = 1")
    return last


# --- the repository ------------------------------------------------------------------


class PgAuditLog:
    """Reads, verifies and appends to the audit chain (``AuditLog``)."""

    def __init__(self, source: ConnectionSource) -> None:
        self._source = source

    async def append_chunk(
        self,
        events: Sequence[AuditEvent],
        *,
        before_commit: Callable[[int], Awaitable[None]] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Append events in order in one transaction; return the seq of the last.

        One event is an INSERT, more are one COPY; either way the chain trigger
        assigns the seqs ``last - len(events) + 1 .. last`` to them, in order.
        ``before_commit(last_seq)`` runs inside the transaction after the rows
        are chained (the audit head stays locked meanwhile, so keep it short);
        if it raises, nothing is appended. If the commit itself fails, whether
        it happened is unknown: ``AuditCommitUncertain`` carries the last seq so
        the caller can find out instead of appending the rows twice.

        Inside ``PgStore.transaction()`` the rows go into that transaction (a
        savepoint) and commit or roll back with it.

        ``timeout`` bounds the whole append (None: the request-path bound);
        when it expires the connection is terminated and the append raises
        StoreUnavailable, or AuditCommitUncertain if it expired during COMMIT.
        """
        if not events:
            raise InvalidRequest("no audit events to append", field="events")
        records = [_values(e) for e in events]
        if self._source.in_transaction:
            with db_errors("append audit chunk"):
                async with self._source.transaction() as conn:
                    last = await _insert_rows(conn, records)
                    if before_commit is not None:
                        await before_commit(last)
            return last
        return await self._append_and_commit(records, before_commit, timeout)

    async def _append_and_commit(
        self,
        records: builtins.list[tuple[Any, ...]],
        before_commit: Callable[[int], Awaitable[None]] | None,
        timeout: float | None,
    ) -> int:
        last = 0
        committed = False
        with db_errors("append audit chunk"):
            try:
                async with self._source.connection(timeout) as conn:
                    tx = conn.transaction()
                    await tx.start()
                    try:
                        last = await _insert_rows(conn, records)
                        if before_commit is not None:
                            await before_commit(last)
                    except BaseException as exc:
                        if intact_after(exc):
                            # A lost connection detaches the pool proxy: rollback may fail.
                            with contextlib.suppress(Exception):
                                await tx.rollback()
                        else:  # a ROLLBACK would wait on a statement that may never end
                            terminate(conn)
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

    async def events_at(self, seqs: Iterable[int]) -> dict[int, AuditEvent]:
        """The events stored at these seqs (absent seqs are left out)."""
        wanted = sorted(set(seqs))
        if not wanted:
            return {}
        with db_errors("read audit events"):
            async with self._source.connection() as conn:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM audit_events WHERE seq = ANY($1::bigint[])", wanted
                )
        return {r["seq"]: _record(r).event for r in rows}

    async def verify_chain(self, *, page_size: int = 5000) -> ChainReport:
        """Walk the whole chain in seq order and recompute every hash.

        Runs in one REPEATABLE READ snapshot so concurrent appends do not
        disturb the walk. Stops at the first problem, which is reported with
        the seq where the chain first breaks.

        A long operation: bounded by the source's long bound, each page by its
        page bound.
        """
        source = self._source
        options: dict[str, Any] = (
            {} if source.in_transaction else {"isolation": "repeatable_read", "readonly": True})
        with db_errors("verify audit chain"):
            async with source.connection(source.long_timeout) as conn, \
                    guarded_transaction(conn, **options):
                return await _walk_chain(conn, page_size, source.page_timeout)

    async def list(
        self,
        *,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        event_type: str | None = None,
        subject: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> builtins.list[AuditRecord]:
        """Events in seq order, filtered; page with ``after_seq`` = last seq seen.

        ``since`` is inclusive, ``until`` exclusive.
        """
        if not 1 <= limit <= MAX_AUDIT_PAGE:
            raise InvalidRequest(f"limit must be 1..{MAX_AUDIT_PAGE}", field="limit")
        # Only fixed SQL fragments are concatenated; every value is a parameter.
        clauses = ["seq > $1"]
        args: builtins.list[Any] = [after_seq]
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
            f"SELECT {_COLUMNS} FROM audit_events WHERE {' AND '.join(clauses)} "
            f"ORDER BY seq LIMIT ${len(args)}"
        )
        with db_errors("list audit"):
            async with self._source.connection() as conn:
                rows = await conn.fetch(sql, *args)
        return [_record(r) for r in rows]

    async def anchor(self) -> AuditAnchor | None:
        """Where the retained chain starts (None: no row was ever removed)."""
        with db_errors("read the audit anchor"):
            async with self._source.connection() as conn:
                row = await conn.fetchrow(_ANCHOR_SQL)
        return None if row is None else _anchor(row)

    async def newest_before(self, until: datetime) -> AuditRecord | None:
        """The newest row with ts < ``until`` (ts never decreases along seq)."""
        with db_errors("read an audit event"):
            async with self._source.connection() as conn:
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM audit_events WHERE ts < $1 "
                    "ORDER BY ts DESC, seq DESC LIMIT 1", until)
        return None if row is None else _record(row)

    async def retention_floor(self) -> int:
        """audit_retention_floor.min_age_s (migration 0006; the owner sets it)."""
        with db_errors("read the audit retention floor"):
            async with self._source.connection() as conn:
                floor = await conn.fetchval(
                    "SELECT min_age_s FROM audit_retention_floor WHERE id = 1")
        return int(floor or 0)

    async def at(self, seq: int) -> AuditRecord | None:
        """The row with exactly this seq, if the chain still has it."""
        with db_errors("read an audit event"):
            async with self._source.connection() as conn:
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM audit_events WHERE seq = $1", seq)
        return None if row is None else _record(row)

    async def export(self, after: int, upto: int, *, page_size: int = 5000
                     ) -> AsyncIterator[builtins.list[ArchivedRow]]:
        """Rows ``after < seq <= upto`` in seq order, a page at a time, each
        with its hash input as the chain trigger computed it. The caller
        checks continuity (a gap means the rows are not there to archive)."""
        cursor = after
        while cursor < upto:
            with db_errors("export audit rows"):
                async with self._source.connection(self._source.long_timeout) as conn:
                    rows = await conn.fetch(_EXPORT_SQL, cursor, upto, page_size,
                                            timeout=self._source.page_timeout)
            if not rows:
                return
            page = [ArchivedRow(seq=r["seq"], prev_hash=bytes(r["prev_hash"]),
                                hash=bytes(r["hash"]), canonical=r["canonical"]) for r in rows]
            yield page
            cursor = page[-1].seq

    async def prune(self, upto: int, upto_hash: bytes, *, checkpoint: str, archive: str,
                    actor: str) -> int:
        """Remove the rows up to ``upto`` (``audit_prune`` in
        migrations/0006): only up to a row the checkpoint pins, never the
        newest, never one younger than the database's retention floor. The
        caller has archived them first. Returns how many rows went."""
        with db_errors("prune the audit trail"):
            async with self._source.connection(self._source.long_timeout) as conn:
                removed: int = await conn.fetchval(
                    "SELECT audit_prune($1, $2, $3, $4, $5)", upto, upto_hash, checkpoint,
                    archive, actor, timeout=self._source.long_timeout)
        return removed

    async def newest(self) -> AuditRecord | None:
        """The row with the highest seq (its own hash, not audit_head's)."""
        with db_errors("read the newest audit event"):
            async with self._source.connection() as conn:
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM audit_events ORDER BY seq DESC LIMIT 1")
        return None if row is None else _record(row)


def _anchor(row: asyncpg.Record) -> AuditAnchor:
    return AuditAnchor(seq=row["seq"], hash=bytes(row["hash"]), checkpoint=row["checkpoint"],
                       archive=row["archive"])


async def _walk_chain(conn: asyncpg.Connection, page_size: int, page_timeout: float
                      ) -> ChainReport:
    head = await conn.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1",
                               timeout=page_timeout)
    anchor_row = await conn.fetchrow(_ANCHOR_SQL, timeout=page_timeout)
    anchor = None if anchor_row is None else _anchor(anchor_row)
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
            anchor_seq=anchor.seq if anchor else 0,
            anchor_hash=anchor.hash if anchor else b"",
        )

    # After a retention prune the walk starts at the anchor: its hash is what
    # the first retained row must link to (and a signed checkpoint pins it).
    prev_hash, next_seq, checked = (
        (anchor.hash, anchor.seq + 1, 0) if anchor else (GENESIS_HASH, 1, 0))
    while True:
        rows = await conn.fetch(_VERIFY_PAGE_SQL, next_seq - 1, page_size, timeout=page_timeout)
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
