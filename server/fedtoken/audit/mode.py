"""The audit writer's mode (direct or spill) and the replay task that ends spill mode.

``ModeControl`` owns the state machine of ``fedtoken.audit.writer``:
*direct* mode (events go to Postgres) switches to *spill* mode on the
first outage (``enter_spill``); the replay task (``run``) then drains the
spill into Postgres with ``fedtoken.audit.replay`` and switches back to
direct mode only when the spill is empty (``idle``: nothing in the log and
nothing submitted to the ``SpillAppender``). Under steady load the last
remainder is replayed with new events held at ``gate``, so the switch
eventually happens. Failed replays are retried with a doubling delay,
from ``retry_interval`` up to ``max_retry_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable

from fedtoken.audit.appender import SpillAppender
from fedtoken.audit.replay import ReplayStopped, SpillReplay
from fedtoken.audit.spill import SpillLog
from fedtoken.core.errors import StoreUnavailable

log = logging.getLogger("fedtoken.audit.writer")


class AuditMode(enum.Enum):
    DIRECT = "direct"
    """Events go to Postgres."""
    SPILL = "spill"
    """Events go to the local spill until the replay has drained it."""


class ModeControl:
    """The current ``AuditMode``, the gate new events pass, and the replay task."""

    def __init__(
        self,
        spill: SpillLog,
        appender: SpillAppender,
        replay: SpillReplay,
        *,
        retry_interval: float,
        max_retry_interval: float,
        stopping: Callable[[], bool],
    ) -> None:
        self._spill = spill
        self._appender = appender
        self._replay = replay
        self._retry_interval = retry_interval
        self._max_retry_interval = max_retry_interval
        self._stopping = stopping
        self.mode = AuditMode.DIRECT
        self.gate = asyncio.Event()
        """Set except while the replay moves the spill's last remainder."""
        self.wake = asyncio.Event()
        """Set to make the replay task look at the spill now."""

    def start(self) -> None:
        """Pick the mode at start: spill while an earlier run's events are left in it."""
        self.mode = AuditMode.SPILL if self._spill.has_backlog() else AuditMode.DIRECT
        self.gate.set()
        if self.mode is AuditMode.SPILL:
            self.wake.set()

    async def pass_gate(self, timeout: float | None = None) -> None:
        """Return once the gate is open (without awaiting if it is), or after
        ``timeout`` seconds (None: no limit) with the gate still closed.

        The gate only guarantees that the final replay ends under steady
        load; order does not depend on it (while it is closed the mode is
        SPILL, and an event appended then is replayed in its turn), so a
        request may pass a gate held closed too long, e.g. by a replay
        waiting for a frozen Postgres.
        """
        if self.gate.is_set():
            return
        if timeout is None:
            await self.gate.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gate.wait(), max(timeout, 0.0))

    def idle(self) -> bool:
        """Whether the spill holds nothing: no backlog, nothing submitted or being written."""
        return not (self._appender.pending or self._spill.has_backlog())

    def enter_spill(self, exc: Exception) -> None:
        """Switch to spill mode (if not already in it) and wake the replay task."""
        if self.mode is AuditMode.DIRECT:
            self.mode = AuditMode.SPILL
            log.warning("audit trail: Postgres unavailable (%s); spilling events to %s",
                        exc, self._spill.directory)
        self.wake.set()

    async def run(self) -> None:
        """The replay task: until stopping, drain the spill whenever in spill mode."""
        delay = self._retry_interval
        while not self._stopping():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)
            self.wake.clear()
            if self._stopping() or self.mode is AuditMode.DIRECT:
                continue
            try:
                await self._drain_spill()
            except ReplayStopped:
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

    async def _drain_spill(self) -> None:
        """Replay the spill into Postgres, then switch back to direct mode."""
        for _ in range(3):
            await self._replay.replay_backlog()  # fails fast while Postgres is still away
            await self._appender.rotate()
            await self._replay.replay_backlog()
            if self.idle():
                self._switch_to_direct()
                return
        # Under steady load the spill may never be empty at the instant we
        # look: hold new events at the gate while the remainder is replayed.
        self.gate.clear()
        try:
            while not self.idle():
                await self._appender.rotate()
                await self._replay.replay_backlog()
            self._switch_to_direct()
        finally:
            self.gate.set()

    def _switch_to_direct(self) -> None:
        if self.idle() and self.mode is AuditMode.SPILL:
            self.mode = AuditMode.DIRECT
            log.warning("audit trail: spill replayed (%d rows so far); writing to Postgres again",
                        self._replay.replayed)


__all__ = ["AuditMode", "ModeControl"]
