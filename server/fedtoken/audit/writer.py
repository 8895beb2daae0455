"""The audit writer: durable records for changes, batched records for verdicts.

``AuditWriter`` is the ``AuditSink`` of ``fedtoken.core.ports``. Two paths
into the hash-chained trail (``audit_events``):

- ``record(event)`` (issuance, revocation, key and tenant events) returns
  only once the event is durable: committed in Postgres, or, while
  Postgres is away, appended to the local spill and fsync'ed. If neither is
  possible it raises ``AuditUnavailable`` and the caller refuses the
  operation (fail closed). ``record_with(event, write)`` does the same for
  a change the caller writes itself: in direct mode ``write`` appends the
  event in the change's own transaction (atomic), in spill mode the event
  follows the change through the spill (so the trail's order holds).
- ``record_verifications(...)`` and ``record_soon(event)`` (verdicts,
  introspection) are cheap on the request path: one append to an in-memory
  queue per call, whatever the number of tokens, and no await while the
  queue has room. The writer task empties the queue every
  ``flush_interval`` and COPYs the rows, one ``token.verified`` row per
  (tenant, actor) and window (see ``fedtoken.audit.rows``).

**Modes and order.** In *direct* mode events go to Postgres. The first
``StoreUnavailable`` switches to *spill* mode: from then on every event,
durable or queued, is appended to the spill, in the order it was
produced, until the replay task has drained the spill into Postgres (COPY,
``max_rows_per_copy`` rows per transaction, oldest first). The switch back
happens only when the spill is empty; to guarantee that it eventually is
under steady load, the last small remainder is replayed with new appends
held at a gate for that moment. That state machine and the replay task
are ``fedtoken.audit.mode``, the replay itself ``fedtoken.audit.replay``;
spill appends go through the group commit of ``fedtoken.audit.appender``
(one fsync per batch). So the order of the trail is the order of
production, across outages. (Order between a durable event and verdicts
queued around the same time is the queue's: verdict rows reach the trail
within a flush window; each item carries its own time.)

**Exactly once.** An append whose COMMIT fails with the outcome unknown
(``AuditCommitUncertain``) is spilled with the seq it would have had, and
the replay skips it when that row turns out to be it. The replay itself
records, before each COMMIT, the seq its last row will have, so a crash
at any point is settled the same way (see ``fedtoken.audit.spill``).

**Queue bound (backpressure).** ``queued`` counts items (tokens, events) not
yet durable. Over ``max_queue`` the queueing calls still enqueue (nothing
is dropped) but count ``blocked`` and wait until the queue is back under
its bound before returning, so callers slow down to the writer's pace
instead of the process growing without bound. Over twice ``max_queue``
(the writer can write neither to Postgres nor to the spill) they raise
``AuditUnavailable`` and count ``refused``: the verdict is then not
returned at all rather than returned unaudited.

A spilled event's replayed row gains ``details["spilled_at"]`` (unix
seconds): its ``ts`` is the time of the replay.

**Time bounds.** A durable append on the request path (``record``, the
direct-mode write of ``record_with``) is bounded by the store's request
bound and the caller's deadline (``fedtoken.store.pool``): against a frozen
Postgres ``record`` falls back to the spill within that bound, exactly as for
a refused connection, so Issue still answers and stays audited, while
``record_with`` raises StoreUnavailable (a revocation must be in Postgres
before Revoke returns). Waiting at the replay's gate is bounded the same
way. The writer task's appends and the replay's chunks are background work,
bounded by ``background_timeout`` each.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedtoken.audit.appender import SpillAppender
from fedtoken.audit.mode import AuditMode, ModeControl
from fedtoken.audit.replay import SpillReplay, append_in_chunks, not_yet_stored
from fedtoken.audit.rows import Entries, Row, VerdictLike, VerifyEntry, build_rows, clean_event
from fedtoken.audit.spill import (
    DEFAULT_MAX_SEGMENT_BYTES,
    SpillLog,
    SpillRecord,
    encode_record,
)
from fedtoken.core.audit import AuditEvent
from fedtoken.core.errors import AuditUnavailable, FedtokenError, StoreUnavailable
from fedtoken.store import AuditCommitUncertain, PgStore
from fedtoken.store.pool import caller_time_left, within_caller_deadline

if TYPE_CHECKING:
    from fedtoken.core.ports import AuditSink

log = logging.getLogger(__name__)

T = TypeVar("T")

# A durable record waiting for its group commit: the event, the time its
# caller still allows (seconds), and the future the caller waits on.
_Durable = tuple[AuditEvent, float, "asyncio.Future[None]"]


class AuditWriter:
    """Writes the audit trail; survives Postgres outages through a local spill.

    Counters (for /metrics): ``queued`` items not yet durable (a gauge);
    ``written`` rows appended straight to Postgres; ``spilled`` rows
    appended to the spill; ``replayed`` rows moved from the spill into
    Postgres; ``failed`` events that could not be made durable (durable
    calls refused with AuditUnavailable, or rows given up at stop);
    ``rejected`` rows Postgres refused outright (kept in the spill
    directory's rejected.jsonl); ``blocked`` and ``refused`` queueing calls
    over the queue bounds; ``corrupt_lines`` spill lines set aside.
    """

    def __init__(
        self,
        store: PgStore,
        spill_dir: Path,
        *,
        max_queue: int = 200_000,
        flush_interval: float = 0.2,
        max_rows_per_copy: int = 2000,
        max_items_per_row: int = 1000,
        retry_interval: float = 0.5,
        max_retry_interval: float = 5.0,
        max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES,
        clock: Callable[[], float] = time.time,
        background_timeout: float = 10.0,
    ) -> None:
        if max_queue < 1 or max_rows_per_copy < 1 or max_items_per_row < 1:
            raise ValueError("max_queue, max_rows_per_copy and max_items_per_row must be >= 1")
        if background_timeout <= 0:
            raise ValueError("background_timeout must be positive")
        self._audit = store.audit
        self._spill = SpillLog(Path(spill_dir), max_segment_bytes)
        self._replay = SpillReplay(self._spill, self._audit, max_rows=max_rows_per_copy,
                                   reject=self._reject, stopping=lambda: self._stopping,
                                   timeout=background_timeout)
        self._request_timeout = store.request_timeout
        self._background_timeout = background_timeout
        self._max_queue = max_queue
        self._flush_interval = flush_interval
        self._max_rows = max_rows_per_copy
        self._max_items = max_items_per_row
        self._retry_interval = retry_interval
        self._clock = clock

        self._appender = SpillAppender(self._spill)  # group commit, one fsync per batch
        self._modes = ModeControl(self._spill, self._appender, self._replay,
                                  retry_interval=retry_interval,
                                  max_retry_interval=max_retry_interval,
                                  stopping=lambda: self._stopping)
        self._queue: deque[VerifyEntry | Entries | AuditEvent] = deque()
        self._backlog: list[Row] = []
        self._running = False
        self._stopping = False
        self._writer_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._cycle = asyncio.Event()
        self._room = asyncio.Event()

        self.queued = 0
        self.written = 0
        self.spilled = 0
        self.failed = 0
        self.rejected = 0
        self.blocked = 0
        self.refused = 0
        self.group_commits = 0  # transactions of the durable path (written / this = group size)
        self._durable: list[_Durable] = []
        self._committer: asyncio.Task[None] | None = None

    # --- lifecycle ----------------------------------------------------------------

    @property
    def mode(self) -> AuditMode:
        return self._modes.mode

    @property
    def spill_dir(self) -> Path:
        return self._spill.directory

    @property
    def replayed(self) -> int:
        return self._replay.replayed

    @property
    def corrupt_lines(self) -> int:
        return self._replay.corrupt_lines

    @property
    def spill_pending(self) -> bool:
        """Whether the spill holds events not yet replayed into Postgres."""
        return not self._modes.idle()

    def stats(self) -> dict[str, int | str]:
        return {
            "mode": self._modes.mode.value,
            "queued": self.queued,
            "written": self.written,
            "spilled": self.spilled,
            "replayed": self.replayed,
            "failed": self.failed,
            "rejected": self.rejected,
            "blocked": self.blocked,
            "refused": self.refused,
            "corrupt_lines": self.corrupt_lines,
        }

    async def start(self) -> None:
        """Open (and lock) the spill directory and start the writer and replay tasks.

        Events left in the spill by an earlier run are replayed first; until
        then new events queue behind them in the spill.
        """
        if self._running:
            return
        await asyncio.to_thread(self._spill.open)
        self._modes.start()
        self._stopping = False
        self._running = True
        self._room.set()
        self._writer_task = asyncio.create_task(self._run_writer(), name="audit-writer")
        self._replay_task = asyncio.create_task(self._modes.run(), name="audit-replay")

    async def stop(self, *, replay_timeout: float = 15.0) -> None:
        """Refuse new events, write everything queued (to Postgres or the spill), close.

        The replay is left between two transactions; what remains in the
        spill is replayed by the next start.
        """
        if not self._running:
            return
        self._running = False
        self._stopping = True
        self._wake.set()
        self._modes.wake.set()
        if self._replay_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._replay_task), replay_timeout)
            except TimeoutError:
                self._replay_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._replay_task
        self._modes.gate.set()
        if self._committer is not None:
            await self._committer  # its groups settle (commit or spill) before the close
        if self._writer_task is not None:
            await self._writer_task
        await self._appender.close()
        self._room.set()
        self._cycle.set()
        log.info("audit writer stopped: %s", self.stats())

    async def flush(self) -> None:
        """Wait until the queue is empty: every item is in Postgres or in the spill."""
        while self.queued > 0 and self._writer_task is not None and not self._writer_task.done():
            cycle = self._cycle
            self._wake.set()
            await cycle.wait()

    # --- the request path (AuditSink) -----------------------------------------------

    async def record_verifications(
        self, tenant: str, actor: str, request_id: str, verdicts: Sequence[VerdictLike]
    ) -> None:
        """Queue the verdicts of one Verify or VerifyBatch call.

        ``tenant`` is the tenant the caller asked for; a verdict that names
        the token's tenant is filed under that one. The sequence is kept as
        is until the writer reads it (do not mutate it). Returns without
        awaiting anything while the queue has room; over its bound, once
        there is room again. Raises AuditUnavailable when the writer is not
        running or the queue is over twice its bound.
        """
        count = len(verdicts)
        if count == 0:
            return
        self._admit(count)
        self._queue.append((tenant, actor, request_id, self._clock(), verdicts))
        if not self._enqueued(count):
            await self._wait_for_room()

    async def record_entries(self, actor: str, groups: Sequence[tuple[str, list[list[Any]]]]
                             ) -> None:
        """Queue verification entries already in the row format (the native
        pipeline's: ``audit.rows.VERIFIED_FIELDS``, clean strings), as
        (tenant, entries) pairs; waits only as ``record_verifications`` does."""
        count = sum(len(items) for _, items in groups)
        if count == 0:
            return
        self._admit(count)
        self._queue.extend(Entries(tenant, actor, items) for tenant, items in groups if items)
        if not self._enqueued(count):
            await self._wait_for_room()

    async def record_soon(self, event: AuditEvent) -> None:
        """Queue one event (e.g. an introspection) to be written as its own row;
        waits only as ``record_verifications`` does."""
        self._admit(1)
        self._queue.append(event)
        if not self._enqueued(1):
            await self._wait_for_room()

    async def _wait_for_room(self) -> None:
        """Return once the queue is back under its bound (at once if it is)."""
        while self.queued >= self._max_queue and self._running:
            self._room.clear()
            await self._room.wait()

    def _admit(self, count: int) -> None:
        if not self._running:
            raise AuditUnavailable("the audit writer is not running")
        if self.queued and self.queued + count > 2 * self._max_queue:
            self.refused += 1
            raise AuditUnavailable("the audit queue is full: the audit trail cannot keep up")

    def _enqueued(self, count: int) -> bool:
        """Count queued items; False when the queue reached its bound."""
        self.queued += count
        if self.queued < self._max_queue:
            return True
        self.blocked += 1
        self._room.clear()
        self._wake.set()
        return False

    async def record_with(
        self, event: AuditEvent, write: Callable[[AuditEvent | None], Awaitable[T]]
    ) -> T:
        """Run ``write`` and make ``event`` durable with it; return what ``write`` returns.

        In direct mode ``write(event)`` must append the event in the same
        transaction as its change, so both commit or neither does. While the
        spill is in use, the event is made durable first (after the events
        spilled before it) and only then does ``write(None)`` make the change,
        so a change is never made without its record; if the change then
        fails, a second record with outcome ``failed`` says so.
        """
        if not self._running:
            raise AuditUnavailable("the audit writer is not running", tenant=event.tenant)
        event = clean_event(event)
        await self._pass_gate()
        if self._modes.mode is AuditMode.DIRECT:
            result = await write(event)
            self.written += 1
            return result
        await self.record(event)
        try:
            return await write(None)
        except BaseException as exc:
            failed = dataclasses.replace(event, outcome="failed", reason=type(exc).__name__)
            try:
                await self.record(failed)
            except Exception:  # noqa: BLE001 - the first record stands; say so in the log
                log.error("%s (request %s) was recorded, then failed, and its failure record "
                          "could not be written", event.event_type, event.request_id)
            raise

    async def record(self, event: AuditEvent) -> None:
        """Return once ``event`` is committed in Postgres or fsync'ed in the spill.

        AuditUnavailable (AUDIT_UNAVAILABLE) when it is neither: the caller
        must refuse the operation.
        """
        if not self._running:
            raise AuditUnavailable("the audit writer is not running", tenant=event.tenant)
        event = clean_event(event)
        await self._pass_gate()
        left = caller_time_left()
        if left is not None and left <= 0:
            # The caller has gone: refuse without touching Postgres, rather than
            # take the lapsed deadline for an outage and switch to the spill.
            self.failed += 1
            raise AuditUnavailable("the caller's deadline passed before the audit record "
                                   "was written", tenant=event.tenant)
        if self._modes.mode is AuditMode.DIRECT:
            # Group commit: join the next transaction of the durable path. The
            # committer task (started by the first caller of a busy period)
            # commits everything queued in one append while later callers
            # queue for the next one; each caller resumes once its own event
            # is committed, spilled, or refused.
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._durable.append(
                (event, within_caller_deadline(self._request_timeout), future))
            if self._committer is None or self._committer.done():
                # A fresh context: the committer serves many callers, so no one
                # caller's deadline (a context variable) may bound its appends.
                self._committer = asyncio.create_task(
                    self._run_group_commits(), name="audit-group-commit",
                    context=contextvars.Context())
            await asyncio.shield(future)
            return
        # No await between the mode decision above and this submission.
        await self._spill_events([(event, 0)])

    async def _spill_events(self, events: Sequence[tuple[AuditEvent, int]]) -> None:
        """Append (event, maybe_seq) pairs to the spill, durably; AuditUnavailable if not.

        The submission is made before the first await, so the order of the
        spill is the order of the calls."""
        now = self._clock()
        lines = [encode_record(SpillRecord(event, now, seq)) for event, seq in events]
        try:
            await self._appender.append(lines)
        except OSError as exc:
            self.failed += len(events)
            log.error("%d audit records could not be spilled: %s", len(events), exc)
            raise AuditUnavailable(
                "the audit record could be written neither to Postgres nor to the spill",
                tenant=events[0][0].tenant,
            ) from exc
        self.spilled += len(events)

    async def _run_group_commits(self) -> None:
        """Commit queued durable events, a group per transaction, until none is left."""
        while self._durable:
            group, self._durable = self._durable, []
            if self._modes.mode is AuditMode.DIRECT:
                await self._commit_group(group)
            else:  # spill mode began while these waited: they follow the spill
                await self._settle_spill(group, 0)

    async def _commit_group(self, group: list[_Durable]) -> None:
        """Append one group in one transaction and settle every caller in it."""
        events = [event for event, _, _ in group]
        timeout = max(bound for _, bound, _ in group)
        try:
            if timeout <= 0:
                raise TimeoutError  # every caller in the group has gone
            await self._audit.append_chunk(events, timeout=timeout)
        except TimeoutError:
            self._refuse(group, None, "the callers' deadlines passed before the audit "
                         "records were written")
        except AuditCommitUncertain as exc:
            self._modes.enter_spill(exc)
            await self._settle_spill(group, exc.seq - len(group) + 1)
        except StoreUnavailable as exc:
            self._modes.enter_spill(exc)
            await self._settle_spill(group, 0)
        except FedtokenError as exc:
            if len(group) > 1:
                # Refused outright: find out whose event it is, one by one, so
                # only that caller is refused.
                for item in group:
                    if self._modes.mode is AuditMode.DIRECT:
                        await self._commit_group([item])
                    else:
                        await self._settle_spill([item], 0)
                return
            self._refuse(group, exc, f"the audit record was refused by the database "
                                     f"({type(exc).__name__})")
        except Exception as exc:  # not committed (see PgAuditLog.append_chunk): spill them
            log.exception("audit writer: unexpected error appending audit records")
            self._modes.enter_spill(exc)
            await self._settle_spill(group, 0)
        else:
            self.written += len(group)
            self.group_commits += 1
            for _, _, future in group:
                if not future.done():
                    future.set_result(None)

    def _refuse(self, group: list[_Durable], cause: Exception | None, message: str) -> None:
        self.failed += len(group)
        for event, _, future in group:
            if not future.done():
                error = AuditUnavailable(message, tenant=event.tenant)
                error.__cause__ = cause
                future.set_exception(error)

    async def _settle_spill(self, group: list[_Durable], first_seq: int) -> None:
        """Spill a group (with the seqs it may have had when first_seq > 0), in order,
        followed by anything queued behind it, and settle every caller."""
        uncertain = len(group) if first_seq > 0 else 0
        group = group + self._durable  # queued as direct, now behind the switch
        self._durable = []
        pairs = [(event, first_seq + k if k < uncertain else 0)
                 for k, (event, _, _) in enumerate(group)]
        try:
            await self._spill_events(pairs)
        except AuditUnavailable as exc:
            for event, _, future in group:
                if not future.done():
                    error = AuditUnavailable(str(exc), tenant=event.tenant)
                    error.__cause__ = exc.__cause__
                    future.set_exception(error)
            return
        for _, _, future in group:
            if not future.done():
                future.set_result(None)

    async def _pass_gate(self) -> None:
        """The replay's gate, waited for no longer than a request-path operation."""
        await self._modes.pass_gate(within_caller_deadline(self._request_timeout))

    # --- the writer task -----------------------------------------------------------

    async def _run_writer(self) -> None:
        while True:
            if not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._flush_interval)
                self._wake.clear()
            try:
                progressed = await self._flush_once()
            except Exception:
                log.exception("audit writer: flush failed")
                progressed = False
                await asyncio.sleep(self._retry_interval)
            self._cycle.set()
            self._cycle = asyncio.Event()
            if self._stopping and not self._queue and not self._backlog:
                return
            if self._stopping and not progressed:
                lost = sum(r.items for r in self._backlog)
                self.failed += len(self._backlog)
                self.queued -= lost
                log.critical("audit writer stopping: %d audit rows (%d items) could be written "
                             "neither to Postgres nor to the spill", len(self._backlog), lost)
                self._backlog = []
                self._queue.clear()
                return

    async def _flush_once(self) -> bool:
        """Write the backlog and the queue; True unless nothing could be written."""
        if self._queue:
            entries, self._queue = self._queue, deque()
            self._backlog.extend(build_rows(entries, self._max_items))
        rows = self._backlog
        if not rows:
            return True
        done = await self._write_rows(rows)
        self._backlog = rows[done:]
        self.queued -= sum(r.items for r in rows[:done])
        if self.queued < self._max_queue:
            self._room.set()
        return done > 0

    async def _write_rows(self, rows: list[Row]) -> int:
        """Write rows in order; return how many (from the front) are durable now."""
        done = await append_in_chunks(rows, self._max_rows, self._append_direct,
                                      self._reject_row)
        if done == len(rows):
            return done
        # Spill mode now: the rest follows the events spilled before it.
        rest = rows[done:]
        now = self._clock()
        lines = [encode_record(SpillRecord(r.event, now, r.maybe_seq)) for r in rest]
        try:
            await self._appender.append(lines)
        except OSError as exc:
            log.error("audit writer: %d rows could not be spilled (%s); retrying", len(rest), exc)
            return done
        self.spilled += len(rest)
        return len(rows)

    async def _append_direct(self, chunk: Sequence[Row]) -> bool:
        """Append a chunk to Postgres; False (not appended) once in spill mode."""
        await self._modes.pass_gate()
        if self._modes.mode is AuditMode.SPILL:
            return False
        todo: list[Row] = []
        try:
            todo = await not_yet_stored(self._audit, list(chunk))
            if todo:
                await self._audit.append_chunk([r.event for r in todo],
                                               timeout=self._background_timeout)
        except AuditCommitUncertain as exc:
            first = exc.seq - len(todo) + 1
            for k, row in enumerate(todo):
                row.maybe_seq = first + k
            self._modes.enter_spill(exc)
            return False
        except StoreUnavailable as exc:
            self._modes.enter_spill(exc)
            return False
        except FedtokenError:
            raise  # refused outright: append_in_chunks isolates the bad row
        except Exception as exc:  # not committed (see PgAuditLog.append_chunk): spill them
            log.exception("audit writer: unexpected error appending audit rows")
            self._modes.enter_spill(exc)
            return False
        self.written += len(todo)
        return True

    async def _reject_row(self, row: Row, exc: FedtokenError) -> None:
        await self._reject([SpillRecord(row.event, self._clock())], exc)

    async def _reject(self, records: list[SpillRecord], exc: Exception) -> None:
        """Keep events Postgres refused outright in the spill's rejected.jsonl."""
        self.rejected += len(records)
        try:
            await asyncio.to_thread(self._spill.reject, records, type(exc).__name__)
        except OSError:
            self.failed += len(records)
            for record in records:
                log.critical("audit event lost (refused by Postgres, not storable): %r",
                             record.event)

if TYPE_CHECKING:  # mypy checks that the writer implements the port exactly

    def _sink(writer: AuditWriter) -> AuditSink:
        return writer


__all__ = ["AuditMode", "AuditWriter"]
