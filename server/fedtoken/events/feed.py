"""The one LISTEN feed of a replica: revocations, keys and tenants.

It keeps the InMemoryRevocationView current from Postgres (LISTEN/NOTIFY)
and relays tenant and key changes to the catalog (``on_change``, which
decides whether its snapshot already reflects them), and asks the catalog
for a full reload after every (re)connect and periodic resync
(``on_resync``): notifications are not queued for a disconnected listener.

One dedicated connection LISTENs on ``fedtoken_events``. Every heartbeat
interval the task sends a NOTIFY carrying its own id and a counter on that
same connection; Postgres delivers notifications in commit order, so when a
heartbeat comes back, every revocation committed before it was sent has been
delivered. That is what advances the view's freshness watermark.

Failure handling, all of it failing closed:

- the connection terminates: the view is marked stale at once;
- the connection hangs without any TCP error (a frozen server, a silent
  network partition): the heartbeat statement times out, or heartbeats stop
  coming back, and the session is torn down (``terminate``, not a polite
  close that would wait for the dead peer); the watermark has meanwhile
  expired on its own, since nothing confirms it;
- a revocation notification that cannot be applied: the session is torn
  down and the view reloaded, rather than risk having lost a revocation.

After (re)connecting, the task LISTENs first, then loads a full snapshot:
notifications arriving during the load are applied and also buffered, and
the buffer is re-applied on top of the snapshot, so a revocation committed
at any moment is either in the snapshot or in the buffer. Only then do
heartbeats start, so the view stays stale until a heartbeat sent after the
resync comes back. A periodic full resync (and purge of expired entries)
repairs anything a bug could lose; it runs beside the heartbeats, so a long
snapshot load does not let the watermark lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from fedtoken.core.ports import RevocationEntry, RevocationRepository
from fedtoken.revocation.view import InMemoryRevocationView, SnapshotBuilder
from fedtoken.store import EVENTS_CHANNEL as CHANNEL

log = logging.getLogger(__name__)

_DAY = 86400
_MIN_HEARTBEAT_TIMEOUT = 2.0
_SNAPSHOT_TIMEOUT = 120.0

# A snapshot is either awaited whole, or streamed (an async iterator of
# entries, built into the view chunk by chunk: a million revocations then
# never exist as Python objects at once).
SnapshotLoader = Callable[
    [], Awaitable[Iterable[RevocationEntry]] | AsyncIterator[RevocationEntry]
]
# A tenant or key changed (called on the event loop; must not block).
ChangeCallback = Callable[[dict[str, Any]], None]
# Everything may have changed (after a reconnect or a periodic resync).
ResyncCallback = Callable[[], Awaitable[None]]


def revocation_loader(
    repo: RevocationRepository, now: Callable[[], float]
) -> Callable[[], AsyncIterator[RevocationEntry]]:
    """A snapshot loader streaming the revocations in force from the store."""

    async def load() -> AsyncIterator[RevocationEntry]:
        async for chunk in repo.iter_active(datetime.fromtimestamp(now(), UTC)):
            for tenant, kind, value, expires_at, not_before in chunk:
                yield RevocationEntry(tenant, kind, value, expires_at, not_before)

    return load


class FeedBroken(ConnectionError):
    """The notification feed can no longer be trusted; reconnect and resync."""


class EventFeed:
    """Feeds the revocation view; relays tenant/key changes to the catalog."""

    def __init__(
        self,
        dsn: str,
        view: InMemoryRevocationView,
        load_snapshot: SnapshotLoader,
        *,
        heartbeat: float,
        resync: float,
        on_change: ChangeCallback | None = None,
        on_resync: ResyncCallback | None = None,
    ) -> None:
        self._dsn = dsn
        self._view = view
        self._load_snapshot = load_snapshot
        self._heartbeat = heartbeat
        self._resync = resync
        self._on_change = on_change
        self._on_resync = on_resync
        self._id = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._pending: dict[int, float] = {}
        self._counter = 0
        self._buffers: list[list[RevocationEntry]] = []
        self._lost = asyncio.Event()
        self._broken = ""
        self.ready = asyncio.Event()
        # Bounds for a hung connection. They follow the staleness bound, not
        # the heartbeat: a heartbeat delayed by load only lets freshness lapse
        # (verdicts fail closed at exactly the bound), whereas tearing the
        # session down forces a reconnect and a full resync, so a replica
        # under load would stay fail-closed far longer than the delay itself.
        # Only a feed silent for twice the bound is declared broken.
        bound = view.staleness
        self._hb_timeout = max(2 * heartbeat, _MIN_HEARTBEAT_TIMEOUT, bound)
        self._hb_overdue = max(3 * heartbeat, _MIN_HEARTBEAT_TIMEOUT, 2 * bound)

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
            self._task = None
        await self._close_conn()
        self._view.mark_stale()

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), self._hb_timeout)
        except Exception:  # noqa: BLE001 - a hung or broken peer: drop the socket
            conn.terminate()

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: stale, reconnect
                log.warning("revocation feed lost (%s: %s); verdicts fail closed until resynced",
                            type(exc).__name__, exc)
            else:  # pragma: no cover - _session only ends by raising
                backoff = 0.2
            self._view.mark_stale()
            await self._close_conn()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_terminated(self, conn: object) -> None:
        if conn is self._conn:  # not our own close of an old connection
            self._view.mark_stale()
            self._lost.set()

    async def _session(self) -> None:
        self._lost.clear()
        self._broken = ""
        self._pending.clear()
        conn = await asyncpg.connect(self._dsn, timeout=5)
        self._conn = conn
        conn.add_termination_listener(self._on_terminated)
        # LISTEN before the snapshot: nothing committed from here on is missed.
        await asyncio.wait_for(conn.add_listener(CHANNEL, self._on_notify), self._hb_timeout)
        await self._full_load()
        connected = time.monotonic()
        resyncer = asyncio.create_task(self._periodic_resync(), name="revocation-resync")
        try:
            while not self._lost.is_set():
                await self._beat(conn)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), self._heartbeat)
                if resyncer.done():
                    resyncer.result()  # re-raise what stopped it
                oldest = min(self._pending.values(), default=None)
                if oldest is not None and time.monotonic() - oldest > self._hb_overdue:
                    # Sent, acknowledged by the server, never delivered back.
                    raise FeedBroken("heartbeats not delivered")
        finally:
            resyncer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await resyncer
        if self._broken:
            raise FeedBroken(self._broken)
        raise FeedBroken(f"listener connection terminated after "
                         f"{time.monotonic() - connected:.1f}s")

    async def _beat(self, conn: asyncpg.Connection) -> None:
        self._counter += 1
        sent = time.monotonic()
        self._pending[self._counter] = sent
        payload = json.dumps({"type": "heartbeat", "from": self._id, "n": self._counter})
        await asyncio.wait_for(conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload),
                               self._hb_timeout)

    async def _periodic_resync(self) -> None:
        """Full reload every ``resync`` seconds, beside the heartbeats.

        A failed reload (Postgres briefly unable to answer) is retried at the
        next period: the feed itself is still proven by the heartbeats.
        """
        while True:
            await asyncio.sleep(self._resync)
            try:
                await self._full_load()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the feed; retry later
                log.warning("periodic revocation resync failed (%s)", type(exc).__name__)
            self._view.purge_expired()

    async def _full_load(self) -> None:
        buffer: list[RevocationEntry] = []
        self._buffers.append(buffer)
        try:
            async with asyncio.timeout(_SNAPSHOT_TIMEOUT):
                snapshot = self._load_snapshot()
                if isinstance(snapshot, AsyncIterator):
                    builder = SnapshotBuilder()
                    async for entry in snapshot:
                        builder.add(entry)
                    self._view.install(builder)
                else:
                    self._view.replace_all(await snapshot)
            for entry in buffer:
                self._view.add(entry)
        finally:
            self._buffers = [b for b in self._buffers if b is not buffer]
        if self._on_resync is not None:
            await self._on_resync()

    def _fail(self, why: str) -> None:
        log.error("%s; reloading the revocation view", why)
        self._broken = why
        self._view.mark_stale()
        self._lost.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            log.warning("ignoring a non-JSON notification on %s", CHANNEL)
            return
        if not isinstance(event, dict):
            log.warning("ignoring a non-object notification on %s", CHANNEL)
            return
        kind = event.get("type")
        if kind == "heartbeat":
            if event.get("from") == self._id:
                try:
                    n = int(event["n"])
                except (KeyError, TypeError, ValueError):
                    return
                sent = self._pending.pop(n, None)
                if sent is not None:
                    for earlier in [m for m in self._pending if m < n]:
                        del self._pending[earlier]
                    self._view.confirm_fresh(sent)
                    self.ready.set()
            return
        if kind == "revocation":
            try:
                entry = RevocationEntry(
                    tenant=str(event["tenant"]),
                    kind=str(event["kind"]),
                    value=str(event["value"]),
                    # Without an expiry, keep it a day: forgetting late fails closed.
                    expires_at=int(event.get("expires_at") or time.time() + _DAY),
                    not_before=int(event.get("not_before") or 0),
                )
                self._view.add(entry)
            except (KeyError, TypeError, ValueError) as exc:
                # A revocation we cannot apply must not be silently lost.
                self._fail(f"unusable revocation notification ({exc!r})")
                return
            for buffer in self._buffers:
                buffer.append(entry)
            # A key revocation also changes the key's state, which the keys
            # trigger notifies on its own: nothing to relay here.
            return
        if kind in ("keys", "tenant") and self._on_change is not None:
            try:
                self._on_change(event)
            except Exception:
                log.exception("handling a %s notification failed", kind)
