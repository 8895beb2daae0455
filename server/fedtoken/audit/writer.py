"""The audit writer: durable records for changes, batched records for verdicts.

Two paths into the hash-chained trail (``audit_events``):

- ``record_durable(event)`` (issuance, revocation, key and tenant events)
  returns only once the event is durable: committed in Postgres, or, while
  Postgres is away, appended to the local spill and fsync'ed. If neither is
  possible it raises ``AuditUnavailable`` and the caller refuses the
  operation (fail closed).
- ``record_verifications(...)`` and ``record_event(event)`` (verdicts,
  introspection) are synchronous and cheap on the request path: one append
  to an in-memory queue per call, whatever the number of tokens. The writer
  task empties the queue every ``flush_interval`` and COPYs the rows.

**Grouping.** One row per token would cost the verify path more than the
verification itself, so one ``token.verified`` row covers every verdict of
one flush window for one (tenant, actor), at most ``max_items_per_row`` of
them. Its ``details`` hold ``fields`` (the names below), ``items`` (one
compact entry per token: jti, subject, kid, "valid"/"invalid", reason,
request id, unix time in ms precision), and the counts ``count``, ``valid``,
``invalid``; ``outcome`` is "valid", "invalid" or "mixed", and
``request_id`` is set when all items share one. Every token's context is
in the row and so covered by the chain hash. Strings from tokens are
sanitised (NUL and lone surrogates become U+FFFD, which Postgres would
refuse) and capped at ``MAX_ITEM_CHARS``.

**Modes and order.** In *direct* mode events go to Postgres. The first
``StoreUnavailable`` switches to *spill* mode: from then on every event,
durable or queued, is appended to the spill, in the order it was
produced, until the replay task has drained the spill into Postgres (COPY,
``max_rows_per_copy`` rows per transaction, oldest first). The switch back
happens only when the spill is empty; to guarantee that it eventually is
under steady load, the last small remainder is replayed with new appends
held at a gate for that moment. So the order of the trail is the order of
production, across outages. (Order between a durable event and verdicts
queued around the same time is the queue's: verdict rows reach the trail
within a flush window; each item carries its own time.)

**Exactly once.** An append whose COMMIT fails with the outcome unknown
(``AuditCommitUncertain``) is spilled with the seq it would have had, and
the replay skips it when that row turns out to be it. The replay itself
records, before each COMMIT, the seq its last row will have, so a crash
at any point is settled the same way (see ``fedtoken.audit.spill``).

**Queue bound (backpressure).** ``queued`` counts items (tokens, events) not
yet durable. Over ``max_queue`` the record_* calls still enqueue (nothing
is dropped) but return False and count ``blocked``: the caller then awaits
``wait_for_room()`` before answering, so callers slow down to the writer's
pace instead of the process growing without bound. Over twice
``max_queue`` (the writer can write neither to Postgres nor to the spill)
the calls raise ``AuditUnavailable`` and count ``refused``: the verdict is
then not returned at all rather than returned unaudited.

A spilled event's replayed row gains ``details["spilled_at"]`` (unix
seconds): its ``ts`` is the time of the replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

from fedtoken.audit.spill import (
    DEFAULT_MAX_SEGMENT_BYTES,
    SegmentContents,
    SpillLog,
    SpillRecord,
    encode_record,
)
from fedtoken.core.errors import AuditUnavailable, FedtokenError, StoreUnavailable
from fedtoken.core.audit import AuditEvent
from fedtoken.store.repo import AuditCommitUncertain, Store

log = logging.getLogger(__name__)

VERIFIED_EVENT: Final = "token.verified"
VERIFIED_FIELDS: Final = ("jti", "sub", "kid", "outcome", "reason", "request_id", "time")
"""Meaning of the positions of each entry of a ``token.verified`` row's ``items``."""
MAX_ITEM_CHARS: Final = 1024

_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
_BAD_JSON = re.compile(r"[\ud800-\udfff]|\\u0000")


class VerdictLike(Protocol):
    """What the writer reads of a verdict (``fedtoken.core.model.Verdict`` is one)."""

    @property
    def valid(self) -> bool: ...
    @property
    def reason(self) -> enum.Enum | str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def jti(self) -> str: ...
    @property
    def kid(self) -> str: ...


class AuditMode(enum.Enum):
    DIRECT = "direct"
    """Events go to Postgres."""
    SPILL = "spill"
    """Events go to the local spill until the replay has drained it."""


_VerifyEntry = tuple[str, str, str, float, Sequence[VerdictLike]]


@dataclass(slots=True)
class _Row:
    """A row built by the writer task, not yet durable."""

    event: AuditEvent
    items: int
    maybe_seq: int = 0


@dataclass(slots=True)
class _Group:
    tenant: str
    actor: str
    entries: list[list[Any]] = field(default_factory=list)

    def row(self) -> _Row:
        entries = self.entries
        count = len(entries)
        valid = sum(1 for e in entries if e[3] == "valid")
        first_request = entries[0][5]
        same_request = all(e[5] == first_request for e in entries)
        event = AuditEvent(
            event_type=VERIFIED_EVENT,
            tenant=self.tenant,
            actor=self.actor,
            outcome="valid" if valid == count else "invalid" if valid == 0 else "mixed",
            request_id=first_request if same_request else "",
            details={
                "fields": list(VERIFIED_FIELDS),
                "items": entries,
                "count": count,
                "valid": valid,
                "invalid": count - valid,
            },
        )
        return _Row(event, count)


class _Stopped(Exception):
    """The writer is stopping: leave the replay between two transactions."""


class AuditWriter:
    """Writes the audit trail; survives Postgres outages through a local spill.

    Counters (for /metrics): ``queued`` items not yet durable (a gauge);
    ``written`` rows appended straight to Postgres; ``spilled`` rows
    appended to the spill; ``replayed`` rows moved from the spill into
    Postgres; ``failed`` events that could not be made durable (durable
    calls refused with AuditUnavailable, or rows given up at stop);
    ``rejected`` rows Postgres refused outright (kept in the spill
    directory's rejected.jsonl); ``blocked`` and ``refused`` record_* calls
    over the queue bounds; ``corrupt_lines`` spill lines set aside.
    """

    def __init__(
        self,
        store: Store,
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
    ) -> None:
        if max_queue < 1 or max_rows_per_copy < 1 or max_items_per_row < 1:
            raise ValueError("max_queue, max_rows_per_copy and max_items_per_row must be >= 1")
        self._store = store
        self._spill = SpillLog(Path(spill_dir), max_segment_bytes)
        self._max_queue = max_queue
        self._flush_interval = flush_interval
        self._max_rows = max_rows_per_copy
        self._max_items = max_items_per_row
        self._retry_interval = retry_interval
        self._max_retry_interval = max_retry_interval
        self._clock = clock

        self._queue: deque[_VerifyEntry | AuditEvent] = deque()
        self._backlog: list[_Row] = []
        self._mode = AuditMode.DIRECT
        self._running = False
        self._stopping = False
        self._writer_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._replay_wake = asyncio.Event()
        self._cycle = asyncio.Event()
        self._room = asyncio.Event()
        self._gate = asyncio.Event()
        # Spill appends: group commit, one writer thread at a time.
        self._spill_io = asyncio.Lock()
        self._submissions: list[tuple[list[bytes], asyncio.Future[None]]] = []
        self._spill_busy = False
        self._flusher: asyncio.Task[None] | None = None
        self._corrupt_seen: set[Path] = set()

        self.queued = 0
        self.written = 0
        self.spilled = 0
        self.replayed = 0
        self.failed = 0
        self.rejected = 0
        self.blocked = 0
        self.refused = 0
        self.corrupt_lines = 0

    # --- lifecycle ----------------------------------------------------------------

    @property
    def mode(self) -> AuditMode:
        return self._mode

    @property
    def spill_dir(self) -> Path:
        return self._spill.directory

    @property
    def spill_pending(self) -> bool:
        """Whether the spill holds events not yet replayed into Postgres."""
        return not self._spill_idle()

    def stats(self) -> dict[str, int | str]:
        return {
            "mode": self._mode.value,
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
        self._mode = AuditMode.SPILL if self._spill.has_backlog() else AuditMode.DIRECT
        self._stopping = False
        self._running = True
        self._gate.set()
        self._room.set()
        self._writer_task = asyncio.create_task(self._run_writer(), name="audit-writer")
        self._replay_task = asyncio.create_task(self._run_replay(), name="audit-replay")
        if self._mode is AuditMode.SPILL:
            self._replay_wake.set()

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
        self._replay_wake.set()
        if self._replay_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._replay_task), replay_timeout)
            except TimeoutError:
                self._replay_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._replay_task
        self._gate.set()
        if self._writer_task is not None:
            await self._writer_task
        async with self._spill_io:
            await self._drain_submissions()
            await asyncio.to_thread(self._spill.close)
        self._room.set()
        self._cycle.set()
        log.info("audit writer stopped: %s", self.stats())

    async def flush(self) -> None:
        """Wait until the queue is empty: every item is in Postgres or in the spill."""
        while self.queued > 0 and self._writer_task is not None and not self._writer_task.done():
            cycle = self._cycle
            self._wake.set()
            await cycle.wait()

    # --- the request path -----------------------------------------------------------

    def record_verifications(
        self, tenant: str, actor: str, request_id: str, verdicts: Sequence[VerdictLike]
    ) -> bool:
        """Queue the verdicts of one Verify or VerifyBatch call; never blocks.

        ``tenant`` is the tenant the caller asked for; a verdict that names
        the token's tenant is filed under that one. The sequence is kept as
        is until the writer reads it (do not mutate it). Returns False when
        the queue is over its bound: await ``wait_for_room()`` before
        answering. Raises AuditUnavailable when the writer is not running or
        the queue is over twice its bound.
        """
        count = len(verdicts)
        if count == 0:
            return True
        self._admit(count)
        self._queue.append((tenant, actor, request_id, self._clock(), verdicts))
        return self._enqueued(count)

    def record_event(self, event: AuditEvent) -> bool:
        """Queue one event (e.g. an introspection) to be written as its own row."""
        self._admit(1)
        self._queue.append(event)
        return self._enqueued(1)

    async def wait_for_room(self) -> None:
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
        self.queued += count
        if self.queued < self._max_queue:
            return True
        self.blocked += 1
        self._room.clear()
        self._wake.set()
        return False

    async def record_durable(self, event: AuditEvent) -> None:
        """Return once ``event`` is committed in Postgres or fsync'ed in the spill.

        AuditUnavailable (AUDIT_UNAVAILABLE) when it is neither: the caller
        must refuse the operation.
        """
        if not self._running:
            raise AuditUnavailable("the audit writer is not running", tenant=event.tenant)
        event = clean_event(event)
        if not self._gate.is_set():
            await self._gate.wait()
        maybe_seq = 0
        if self._mode is AuditMode.DIRECT:
            try:
                await self._store.append_audit_chunk([event])
            except AuditCommitUncertain as exc:
                maybe_seq = exc.seq
                self._enter_spill(exc)
            except StoreUnavailable as exc:
                self._enter_spill(exc)
            except FedtokenError as exc:
                self.failed += 1
                raise AuditUnavailable(
                    f"the audit record was refused by the database ({type(exc).__name__})",
                    tenant=event.tenant,
                ) from exc
            except Exception as exc:  # not committed (see append_audit_chunk): spill it
                log.exception("audit writer: unexpected error appending an audit record")
                self._enter_spill(exc)
            else:
                self.written += 1
                return
        # No await between the mode decision above and this submission.
        line = encode_record(SpillRecord(event, self._clock(), maybe_seq))
        try:
            await self._spill_lines([line])
        except OSError as exc:
            self.failed += 1
            log.error("audit record %s could not be spilled: %s", event.event_type, exc)
            raise AuditUnavailable(
                "the audit record could be written neither to Postgres nor to the spill",
                tenant=event.tenant,
            ) from exc
        self.spilled += 1

    # --- mode ------------------------------------------------------------------

    def _enter_spill(self, exc: Exception) -> None:
        if self._mode is AuditMode.DIRECT:
            self._mode = AuditMode.SPILL
            log.warning("audit trail: Postgres unavailable (%s); spilling events to %s",
                        exc, self._spill.directory)
        self._replay_wake.set()

    def _spill_idle(self) -> bool:
        return not (self._submissions or self._spill_busy or self._spill.has_backlog())

    # --- spill appends (group commit) -------------------------------------------------

    async def _spill_lines(self, lines: list[bytes]) -> None:
        """Append lines durably, in submission order; OSError if they are not durable.

        Submissions made while a write is in progress are written together by
        the next one, with one fsync.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submissions.append((lines, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run_flusher())
        await future

    async def _run_flusher(self) -> None:
        async with self._spill_io:
            await self._drain_submissions()

    async def _drain_submissions(self) -> None:
        """Write every pending submission; the caller holds ``_spill_io``."""
        while self._submissions:
            batch, self._submissions = self._submissions, []
            self._spill_busy = True
            error: OSError | None = None
            try:
                await asyncio.to_thread(
                    self._spill.append, [line for lines, _ in batch for line in lines]
                )
            except OSError as exc:
                error = exc
            finally:
                self._spill_busy = False
            for _, future in batch:
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(OSError(error.errno, str(error)))

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
            self._backlog.extend(self._build_rows(entries))
        rows = self._backlog
        if not rows:
            return True
        done = await self._write_rows(rows)
        self._backlog = rows[done:]
        self.queued -= sum(r.items for r in rows[:done])
        if self.queued < self._max_queue:
            self._room.set()
        return done > 0

    def _build_rows(self, entries: deque[_VerifyEntry | AuditEvent]) -> list[_Row]:
        out: list[_Row | _Group] = []
        groups: dict[tuple[str, str], _Group] = {}
        max_items = self._max_items
        for entry in entries:
            if isinstance(entry, AuditEvent):
                out.append(_Row(clean_event(entry), 1))
                continue
            tenant, actor, request_id, at, verdicts = entry
            added = 0
            try:
                request_id = _clean(request_id)
                at = round(at, 3)
                for v in verdicts:
                    key = (v.tenant or tenant, actor)
                    group = groups.get(key)
                    if group is None or len(group.entries) >= max_items:
                        group = groups[key] = _Group(_clean(key[0]), _clean(actor))
                        out.append(group)
                    reason = v.reason
                    group.entries.append([
                        _clean(v.jti),
                        _clean(v.subject),
                        _clean(v.kid),
                        "valid" if v.valid else "invalid",
                        reason if isinstance(reason, str) else str(reason.value),
                        request_id,
                        at,
                    ])
                    added += 1
            except Exception as exc:  # a bad verdict must not stop the writer
                # Not silent: the trail says how many verdicts of which call it
                # could not describe.
                log.exception("audit writer: unreadable verdicts")
                missing = len(verdicts) - added
                out.append(_Row(clean_event(AuditEvent(
                    event_type="audit.unrecordable", tenant=tenant, actor=actor,
                    request_id=request_id, outcome="error",
                    details={"error": type(exc).__name__, "lost_items": missing},
                )), missing))
        return [g.row() if isinstance(g, _Group) else g for g in out]

    async def _write_rows(self, rows: list[_Row]) -> int:
        """Write rows in order; return how many (from the front) are durable now."""
        i = 0
        single_until = 0  # after a refused chunk: one row at a time, to isolate the bad one
        while i < len(rows):
            if not self._gate.is_set():
                await self._gate.wait()
            if self._mode is AuditMode.SPILL:
                chunk = rows[i:]
                now = self._clock()
                lines = [encode_record(SpillRecord(r.event, now, r.maybe_seq)) for r in chunk]
                try:
                    await self._spill_lines(lines)
                except OSError as exc:
                    log.error("audit writer: %d rows could not be spilled (%s); retrying",
                              len(chunk), exc)
                    return i
                self.spilled += len(chunk)
                return len(rows)
            chunk = rows[i : i + (1 if i < single_until else self._max_rows)]
            try:
                todo = await self._not_yet_stored(chunk)
                if todo:
                    await self._store.append_audit_chunk([r.event for r in todo])
            except AuditCommitUncertain as exc:
                first = exc.seq - len(todo) + 1
                for k, row in enumerate(todo):
                    row.maybe_seq = first + k
                self._enter_spill(exc)
                continue
            except StoreUnavailable as exc:
                self._enter_spill(exc)
                continue
            except FedtokenError as exc:
                if len(chunk) > 1:
                    single_until = i + len(chunk)
                    continue
                await self._reject([SpillRecord(chunk[0].event, self._clock())], exc)
                i += 1
                continue
            except Exception as exc:  # not committed (see append_audit_chunk): spill them
                log.exception("audit writer: unexpected error appending audit rows")
                self._enter_spill(exc)
                continue
            self.written += len(todo)
            i += len(chunk)
        return i

    async def _not_yet_stored(self, rows: list[_Row]) -> list[_Row]:
        """Leave out rows an uncertain commit turned out to have stored."""
        maybe = [r.maybe_seq for r in rows if r.maybe_seq]
        if not maybe:
            return rows
        stored = await self._store.audit_events_at(maybe)
        return [r for r in rows if not (r.maybe_seq and stored.get(r.maybe_seq) == r.event)]

    async def _reject(self, records: list[SpillRecord], exc: Exception) -> None:
        self.rejected += len(records)
        try:
            await asyncio.to_thread(self._spill.reject, records, type(exc).__name__)
        except OSError:
            self.failed += len(records)
            for record in records:
                log.critical("audit event lost (refused by Postgres, not storable): %r",
                             record.event)

    # --- the replay task -------------------------------------------------------------

    async def _run_replay(self) -> None:
        delay = self._retry_interval
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._replay_wake.wait(), delay)
            self._replay_wake.clear()
            if self._stopping or self._mode is AuditMode.DIRECT:
                continue
            try:
                await self._replay()
            except _Stopped:
                return
            except (StoreUnavailable, OSError) as exc:
                log.info("audit spill replay paused: %s", exc)
                delay = min(delay * 2, self._max_retry_interval)
                continue
            except Exception:
                log.exception("audit spill replay failed")
                delay = self._max_retry_interval
                continue
            delay = self._retry_interval

    async def _replay(self) -> None:
        """Drain the spill into Postgres, then switch back to direct mode."""
        for _ in range(3):
            await self._replay_backlog()  # fails fast while Postgres is still away
            await self._rotate()
            await self._replay_backlog()
            if self._spill_idle():
                self._switch_to_direct()
                return
        # Under steady load the spill may never be empty at the instant we
        # look: hold new events at the gate while the remainder is replayed.
        self._gate.clear()
        try:
            while not self._spill_idle():
                await self._rotate()
                await self._replay_backlog()
            self._switch_to_direct()
        finally:
            self._gate.set()

    def _switch_to_direct(self) -> None:
        if self._spill_idle() and self._mode is AuditMode.SPILL:
            self._mode = AuditMode.DIRECT
            log.warning("audit trail: spill replayed (%d rows so far); writing to Postgres again",
                        self.replayed)

    async def _rotate(self) -> None:
        async with self._spill_io:
            await self._drain_submissions()
            await asyncio.to_thread(self._spill.rotate)

    async def _replay_backlog(self) -> None:
        for segment in self._spill.backlog():
            if self._stopping:
                raise _Stopped
            await self._replay_segment(segment)

    async def _replay_segment(self, segment: Path) -> None:
        spill = self._spill
        try:
            contents = await asyncio.to_thread(spill.read_segment, segment)
        except FileNotFoundError:
            await asyncio.to_thread(spill.remove_segment, segment)
            return
        if segment not in self._corrupt_seen:
            self._corrupt_seen.add(segment)
            self.corrupt_lines += contents.bad_lines
        ack = await asyncio.to_thread(spill.read_ack, segment)
        done = ack.done
        if ack.pending is not None:
            done = await self._settle(contents, ack.pending.start, ack.pending.end,
                                      ack.pending.seq, ack.pending.line)
            await asyncio.to_thread(spill.mark_done, segment, done)
        todo = [(n, r) for n, r in contents.records if n >= done]
        i = 0
        single_until = 0
        while i < len(todo):
            if self._stopping:
                raise _Stopped
            chunk = todo[i : i + (1 if i < single_until else self._max_rows)]
            end = chunk[-1][0] + 1 if i + len(chunk) < len(todo) else contents.lines
            records = await self._unstored([r for _, r in chunk])
            if records:
                last_line = next(n for n, r in reversed(chunk) if r is records[-1])
                start = done

                async def before_commit(seq: int, start: int = start, end: int = end,
                                        line: int = last_line) -> None:
                    await asyncio.to_thread(spill.mark_pending, segment, start, end, seq, line)

                try:
                    await self._store.append_audit_chunk(
                        [r.replay_event() for r in records], before_commit=before_commit
                    )
                except StoreUnavailable:
                    raise  # an uncertain commit is settled by the next round
                except FedtokenError as exc:
                    if len(chunk) > 1:
                        single_until = i + len(chunk)
                        continue
                    await self._reject(records, exc)
                else:
                    self.replayed += len(records)
            await asyncio.to_thread(spill.mark_done, segment, end)
            done = end
            i += len(chunk)
        await asyncio.to_thread(spill.remove_segment, segment)

    async def _settle(self, contents: SegmentContents, start: int, end: int, seq: int,
                      line: int) -> int:
        """Whether a replay transaction whose commit was not confirmed happened."""
        record = contents.record_at(line)
        stored = await self._store.audit_events_at([seq])
        committed = record is not None and stored.get(seq) == record.replay_event()
        log.warning("audit spill: unconfirmed replay of lines %d..%d %s", start, end - 1,
                    "had committed" if committed else "had not committed; replaying it")
        return end if committed else start

    async def _unstored(self, records: list[SpillRecord]) -> list[SpillRecord]:
        """Leave out records whose uncertain direct commit did happen."""
        maybe = [r.maybe_seq for r in records if r.maybe_seq]
        if not maybe:
            return records
        stored = await self._store.audit_events_at(maybe)
        return [r for r in records if not (r.maybe_seq and stored.get(r.maybe_seq) == r.event)]


# --- sanitising ------------------------------------------------------------------------


def _clean(value: str) -> str:
    """A string Postgres accepts, bounded (for strings taken from tokens)."""
    if len(value) <= MAX_ITEM_CHARS and value.isascii() and "\x00" not in value:
        return value
    value = _BAD_CHARS.sub("\ufffd", value)
    if len(value) > MAX_ITEM_CHARS:
        value = f"{value[:MAX_ITEM_CHARS]}...[{len(value)} chars]"
    return value


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return _BAD_CHARS.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_BAD_CHARS.sub("\ufffd", str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_json(v) for v in value]
    return value


def clean_event(event: AuditEvent) -> AuditEvent:
    """The event with what Postgres would refuse replaced (NUL, lone surrogates,
    details that are not JSON), so that a hostile string can never block the trail."""
    changes: dict[str, Any] = {}
    for name in ("event_type", "tenant", "actor", "subject", "jti", "kid", "outcome", "reason",
                 "request_id"):
        value = getattr(event, name)
        if _BAD_CHARS.search(value):
            changes[name] = _BAD_CHARS.sub("\ufffd", value)
    if event.details is not None:
        try:
            text = json.dumps(event.details, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):
            changes["details"] = {"unserialisable_details": _clean(repr(event.details))}
        else:
            if _BAD_JSON.search(text):
                changes["details"] = _clean_json(event.details)
    return replace(event, **changes) if changes else event


__all__ = [
    "MAX_ITEM_CHARS",
    "VERIFIED_EVENT",
    "VERIFIED_FIELDS",
    "AuditMode",
    "AuditWriter",
    "VerdictLike",
    "clean_event",
]
