"""Keeps an InMemoryRevocationView current from Postgres (LISTEN/NOTIFY).

One dedicated connection LISTENs on ``fedtoken_events``. Every heartbeat
interval the task sends a NOTIFY carrying its own id and a counter on that
same connection; Postgres delivers notifications in commit order, so when a
heartbeat comes back, every revocation committed before it was sent has been
delivered. That is what advances the view's freshness watermark. If the
connection dies, the view is marked stale at once (verdicts fail closed),
and after reconnecting the task reloads a full snapshot before it confirms
freshness again. A periodic full resync repairs anything a bug could lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from fedtoken.revocation.view import InMemoryRevocationView, RevocationEntry

log = logging.getLogger(__name__)

CHANNEL = "fedtoken_events"
_DAY = 86400

SnapshotLoader = Callable[[], Awaitable[list[RevocationEntry]]]
KeysChanged = Callable[[dict[str, Any]], Awaitable[None]]


class RevocationSync:
    """Feeds the view; also relays key/tenant change events to a callback."""

    def __init__(
        self,
        dsn: str,
        view: InMemoryRevocationView,
        load_snapshot: SnapshotLoader,
        *,
        heartbeat: float,
        resync: float,
        on_keys_changed: KeysChanged | None = None,
    ) -> None:
        self._dsn = dsn
        self._view = view
        self._load_snapshot = load_snapshot
        self._heartbeat = heartbeat
        self._resync = resync
        self._on_keys_changed = on_keys_changed
        self._id = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._pending: dict[int, float] = {}
        self._counter = 0
        self._buffer: list[RevocationEntry] | None = None
        self._lost = asyncio.Event()
        self.ready = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="revocation-sync")

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout)
        return self._view.is_fresh

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_conn()

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._session()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: stale, reconnect
                log.warning("revocation feed lost (%s); verdicts fail closed until resynced",
                            type(exc).__name__)
            self._view.mark_stale()
            await self._close_conn()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _session(self) -> None:
        self._lost.clear()
        self._pending.clear()
        conn = await asyncpg.connect(self._dsn, timeout=5)
        self._conn = conn
        conn.add_termination_listener(lambda _c: self._lost.set())
        await conn.add_listener(CHANNEL, self._on_notify)
        await self._full_load()
        if self._on_keys_changed is not None:
            await self._on_keys_changed({"type": "resync"})
        last_resync = time.monotonic()
        while not self._lost.is_set():
            self._counter += 1
            sent = time.monotonic()
            self._pending[self._counter] = sent
            payload = json.dumps({"type": "heartbeat", "from": self._id, "n": self._counter})
            await asyncio.wait_for(conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload),
                                   self._heartbeat * 2)
            if sent - last_resync > self._resync:
                await self._full_load()
                self._view.purge_expired()
                last_resync = sent
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._heartbeat)
            if self._pending and time.monotonic() - min(self._pending.values()) > max(
                3 * self._heartbeat, 2.0
            ):
                # Heartbeats are not coming back: the feed is broken.
                raise ConnectionError("heartbeats not delivered")
        raise ConnectionError("listener connection terminated")

    async def _full_load(self) -> None:
        self._buffer = []
        try:
            entries = await self._load_snapshot()
            self._view.replace_all(entries)
            for entry in self._buffer:
                self._view.add(entry)
        finally:
            self._buffer = None

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            log.warning("ignoring a non-JSON notification on %s", CHANNEL)
            return
        kind = event.get("type")
        if kind == "heartbeat":
            if event.get("from") == self._id:
                sent = self._pending.pop(int(event.get("n", -1)), None)
                if sent is not None:
                    for n in [n for n in self._pending if n < int(event["n"])]:
                        del self._pending[n]
                    self._view.confirm_fresh(sent)
                    self.ready.set()
            return
        if kind == "revocation":
            entry = RevocationEntry(
                tenant=str(event.get("tenant", "")),
                kind=str(event.get("kind", "")),
                value=str(event.get("value", "")),
                # Without an expiry, keep it a day: forgetting late fails closed.
                expires_at=int(event.get("expires_at") or time.time() + _DAY),
                not_before=int(event.get("not_before") or 0),
            )
            self._view.add(entry)
            if self._buffer is not None:
                self._buffer.append(entry)
            if entry.kind == "key" and self._on_keys_changed is not None:
                self._spawn(self._on_keys_changed(event))
            return
        if kind in ("keys", "tenants", "tenant", "key") and self._on_keys_changed is not None:
            self._spawn(self._on_keys_changed(event))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
