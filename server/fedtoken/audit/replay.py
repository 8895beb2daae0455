"""Replay of the audit spill into Postgres, exactly once and in order.

``SpillReplay`` moves the closed segments of a ``SpillLog`` into the chain,
``max_rows`` lines per transaction, oldest first. Before each COMMIT it
records (``mark_pending``) the seq its last row will have; after it, how far
the segment is done (``mark_done``). A pending entry left by a crash, or by
a commit whose outcome was unknown, is settled by comparing the row at that
seq with the line's event (see ``fedtoken.audit.spill``).

Two pieces are shared with the writer's direct appends:
``append_in_chunks`` (chunked appends that isolate a row Postgres refuses)
and ``not_yet_stored`` (leaving out rows an uncertain commit did store).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from fedtoken.audit.spill import SegmentContents, SpillLog, SpillRecord
from fedtoken.core.audit import AuditEvent
from fedtoken.core.errors import FedtokenError, StoreUnavailable
from fedtoken.store import PgAuditLog

log = logging.getLogger(__name__)


class MaybeStored(Protocol):
    """An event on its way into the chain; ``maybe_seq`` > 0 when an append
    whose commit outcome is unknown may already have stored it at that seq."""

    @property
    def event(self) -> AuditEvent: ...

    @property
    def maybe_seq(self) -> int: ...


M = TypeVar("M", bound=MaybeStored)
T = TypeVar("T")


async def not_yet_stored(audit: PgAuditLog, items: list[M]) -> list[M]:
    """``items`` without those an uncertain commit turned out to have stored."""
    maybe = [i.maybe_seq for i in items if i.maybe_seq]
    if not maybe:
        return items
    stored = await audit.events_at(maybe)  # a few rows by primary key: the request bound
    return [i for i in items if not (i.maybe_seq and stored.get(i.maybe_seq) == i.event)]


async def append_in_chunks(
    items: Sequence[T],
    max_rows: int,
    append: Callable[[Sequence[T]], Awaitable[bool]],
    reject: Callable[[T, FedtokenError], Awaitable[None]],
) -> int:
    """Append ``items`` in order, at most ``max_rows`` per ``append`` call;
    return how many, from the front, are done (appended or rejected).

    ``append(chunk)`` returns False to stop there (none of the chunk is
    done). When Postgres refuses a chunk (a FedtokenError other than
    StoreUnavailable), its rows are tried one at a time, so that only the
    bad one is handed to ``reject`` and the trail goes on. StoreUnavailable
    and any other error propagate.
    """
    done = 0
    single_until = 0  # after a refused chunk: one row at a time, to isolate the bad one
    while done < len(items):
        chunk = items[done : done + (1 if done < single_until else max_rows)]
        try:
            if not await append(chunk):
                return done
        except StoreUnavailable:
            raise
        except FedtokenError as exc:
            if len(chunk) > 1:
                single_until = done + len(chunk)
                continue
            await reject(chunk[0], exc)
        done += len(chunk)
    return done


class ReplayStopped(Exception):
    """The writer is stopping: the replay left off between two transactions."""


class SpillReplay:
    """Drains the closed segments of one spill into Postgres.

    Blocking file I/O runs in threads. ``replayed`` counts rows moved into
    Postgres, ``corrupt_lines`` lines set aside (each segment counted once).
    """

    def __init__(
        self,
        spill: SpillLog,
        audit: PgAuditLog,
        *,
        max_rows: int,
        reject: Callable[[list[SpillRecord], Exception], Awaitable[None]],
        stopping: Callable[[], bool],
        timeout: float | None = None,
    ) -> None:
        self._spill = spill
        self._audit = audit
        self._max_rows = max_rows
        self._timeout = timeout  # of one chunk's transaction (None: the store's request bound)
        self._reject = reject
        self._stopping = stopping
        self._corrupt_seen: set[Path] = set()
        self.replayed = 0
        self.corrupt_lines = 0

    async def replay_backlog(self) -> None:
        """Replay every closed segment, oldest first.

        Raises StoreUnavailable while Postgres is away (an uncertain commit is
        settled by the next call) and ReplayStopped when the writer stops.
        """
        for segment in self._spill.backlog():
            if self._stopping():
                raise ReplayStopped
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
            p = ack.pending
            done = await self._settle(contents, p.start, p.end, p.seq, p.line)
            await asyncio.to_thread(spill.mark_done, segment, done)
        todo = [(n, r) for n, r in contents.records if n >= done]
        last_line = todo[-1][0] if todo else 0

        def end_after(line: int) -> int:
            # The last chunk also covers any bad lines after it.
            return contents.lines if line == last_line else line + 1

        async def mark_done(end: int) -> None:
            nonlocal done
            await asyncio.to_thread(spill.mark_done, segment, end)
            done = end

        async def append(chunk: Sequence[tuple[int, SpillRecord]]) -> bool:
            if self._stopping():
                raise ReplayStopped
            end = end_after(chunk[-1][0])
            records = await not_yet_stored(self._audit, [r for _, r in chunk])
            if records:
                line = next(n for n, r in reversed(chunk) if r is records[-1])

                async def before_commit(seq: int, start: int = done) -> None:
                    await asyncio.to_thread(spill.mark_pending, segment, start, end, seq, line)

                await self._audit.append_chunk(
                    [r.replay_event() for r in records], before_commit=before_commit,
                    timeout=self._timeout,
                )
                self.replayed += len(records)
            await mark_done(end)
            return True

        async def reject(item: tuple[int, SpillRecord], exc: FedtokenError) -> None:
            await self._reject([item[1]], exc)
            await mark_done(end_after(item[0]))

        await append_in_chunks(todo, self._max_rows, append, reject)
        await asyncio.to_thread(spill.remove_segment, segment)

    async def _settle(
        self, contents: SegmentContents, start: int, end: int, seq: int, line: int
    ) -> int:
        """Where to resume after a replay transaction whose commit was not confirmed."""
        record = contents.record_at(line)
        stored = await self._audit.events_at([seq])
        committed = record is not None and stored.get(seq) == record.replay_event()
        log.warning("audit spill: unconfirmed replay of lines %d..%d %s", start, end - 1,
                    "had committed" if committed else "had not committed; replaying it")
        return end if committed else start
