"""Group commit for spill appends: many submitters, one writer thread, one fsync per batch.

``SpillAppender`` sits between the audit writer (``fedtoken.audit.writer``)
and its ``SpillLog`` (``fedtoken.audit.spill``). ``append(lines)`` returns
once the lines are durable, in submission order; submissions made while a
write is in progress are written together by the next write, with one
fsync. ``rotate`` and ``close`` first write whatever is pending, under the
same lock, so nothing submitted before them ends up after them.
``pending`` tells the writer whether lines are submitted or being written
but not yet in the log (the spill is not idle then).
"""

from __future__ import annotations

import asyncio

from fedtoken.audit.spill import SpillLog


class SpillAppender:
    """Appends to a ``SpillLog`` with group commit; every file operation runs off the loop."""

    def __init__(self, spill: SpillLog) -> None:
        self._spill = spill
        self._io = asyncio.Lock()
        self._submissions: list[tuple[list[bytes], asyncio.Future[None]]] = []
        self._busy = False
        self._flusher: asyncio.Task[None] | None = None

    @property
    def pending(self) -> bool:
        """Whether lines are submitted or being written and not yet in the log."""
        return bool(self._submissions) or self._busy

    async def append(self, lines: list[bytes]) -> None:
        """Append lines durably, in submission order; OSError if they are not durable.

        Submissions made while a write is in progress are written together by
        the next one, with one fsync.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submissions.append((lines, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run_flusher())
        await future

    async def rotate(self) -> None:
        """Write what is pending, then rotate the log's segment."""
        async with self._io:
            await self._drain()
            await asyncio.to_thread(self._spill.rotate)

    async def close(self) -> None:
        """Write what is pending, then close the log."""
        async with self._io:
            await self._drain()
            await asyncio.to_thread(self._spill.close)

    async def _run_flusher(self) -> None:
        async with self._io:
            await self._drain()

    async def _drain(self) -> None:
        """Write every pending submission; the caller holds ``_io``."""
        while self._submissions:
            batch, self._submissions = self._submissions, []
            self._busy = True
            error: OSError | None = None
            try:
                await asyncio.to_thread(
                    self._spill.append, [line for lines, _ in batch for line in lines]
                )
            except OSError as exc:
                error = exc
            finally:
                self._busy = False
            for _, future in batch:
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(OSError(error.errno, str(error)))


__all__ = ["SpillAppender"]
