"""The one LISTEN feed of a replica: revocations, keys, tenants, callers, trust.

It keeps the InMemoryRevocationView current from Postgres (LISTEN/NOTIFY)
and relays tenant, key, caller-grant and trusted-issuer changes
(``on_change``: the catalog, the caller policy and the trust catalog each
decide whether a change concerns them and whether their snapshot already
reflects it), and asks for a full reload after every (re)connect and
periodic resync (``on_resync``): notifications are not queued for a
disconnected listener.

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

**Recovery is certain.** Every await of a session is bounded: connecting
(startup and authentication included), LISTEN, each heartbeat, the snapshot
(``snapshot_timeout`` in all, and no more than ``stall_timeout`` without a
new entry), the ``on_resync`` callback, and the clean-up of the resync task.
A session's state (its connection, pending heartbeats, buffers) is its own,
and only the current session may touch the view, so a session that is torn
down, or one that ignores being cancelled, can neither confirm freshness nor
install an old snapshot over a newer one. A cancellation the feed did not ask
for (one raised inside asyncpg or a callback) counts as a failed session,
never as the end of the feed. And a watchdog task, independent of the
sessions, restarts the whole reconnect loop when it has made no progress
(no heartbeat delivered, no snapshot entries, no connection attempt ending)
for ``watchdog`` seconds, or when it has ended: whatever wedges a session,
the feed gets a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import asyncpg

from fedtoken.core.ports import RevocationEntry, RevocationRepository, utc
from fedtoken.revocation.view import InMemoryRevocationView, SnapshotBuilder
from fedtoken.store import EVENTS_CHANNEL as CHANNEL

log = logging.getLogger(__name__)

_DAY = 86400
_MIN_HEARTBEAT_TIMEOUT = 2.0
SNAPSHOT_TIMEOUT = 120.0
"""Default bound of a whole snapshot load."""
CONNECT_TIMEOUT = 5.0
"""Default bound of opening the listening connection (startup and auth included)."""
CALLBACK_TIMEOUT = 15.0
"""Default bound of the ``on_resync`` callback (a catalog reload: two queries)."""
_STOP_TIMEOUT = 5.0  # stop(): how long the tasks get to end before they are abandoned
_ABANDON_TIMEOUT = 2.0  # how long a cancelled task gets to end before it is abandoned
_CLOSE_TIMEOUT = 1.0  # a polite close at stop(), before the socket is simply dropped
_PROGRESS_EVERY = 1024  # snapshot entries between two progress marks
# Notification types relayed to ``on_change`` (the triggers of migrations
# 0001, 0002, 0004 and 0005 send them).
_RELAYED = frozenset({"keys", "tenant", "callers", "trust"})

# A snapshot is either awaited whole, or streamed (an async iterator of
# entries, built into the view chunk by chunk: a million revocations then
# never exist as Python objects at once).
SnapshotLoader = Callable[
    [], Awaitable[Iterable[RevocationEntry]] | AsyncIterator[RevocationEntry]
]
# A tenant, key, grant or trusted issuer changed (called on the event loop;
# must not block).
ChangeCallback = Callable[[dict[str, Any]], None]
# Everything may have changed (after a reconnect or a periodic resync).
ResyncCallback = Callable[[], Awaitable[None]]


def revocation_loader(
    repo: RevocationRepository, now: Callable[[], float]
) -> Callable[[], AsyncIterator[RevocationEntry]]:
    """A snapshot loader streaming the revocations in force from the store."""

    async def load() -> AsyncIterator[RevocationEntry]:
        async for chunk in repo.iter_active(utc(now())):
            for tenant, kind, value, expires_at, not_before in chunk:
                yield RevocationEntry(tenant, kind, value, expires_at, not_before)

    return load


class FeedBroken(ConnectionError):
    """The notification feed can no longer be trusted; reconnect and resync."""


def _terminate(conn: asyncpg.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.terminate()


class _Session:
    """One listening connection and everything that belongs to it.

    The feed's callbacks for this connection are bound to it; once it is not
    the feed's current session (torn down, or abandoned by the watchdog)
    nothing it receives or loads reaches the view.
    """

    def __init__(self, feed: EventFeed, generation: int) -> None:
        self.feed = feed
        self.source = f"{feed.id}.{generation}"  # the "from" of its heartbeats
        self.conn: asyncpg.Connection | None = None
        self.pending: dict[int, float] = {}
        self.counter = 0
        self.buffers: list[list[RevocationEntry]] = []
        self.lost = asyncio.Event()
        self.broken = ""
        self.confirmed = False
        self.ended = False
        self.resyncer: asyncio.Task[None] | None = None

    @property
    def current(self) -> bool:
        return self.feed._session is self

    def on_terminated(self, conn: object) -> None:
        if conn is self.conn and self.current:
            self.feed._view.mark_stale()
            self.lost.set()

    def on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if self.current:
            self.feed._on_notify(self, payload)


class EventFeed:
    """Feeds the revocation view; relays tenant/key changes to the catalog.

    Counters: ``sessions`` connections made, ``restarts`` restarts by the
    watchdog.
    """

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
        connect_timeout: float = CONNECT_TIMEOUT,
        snapshot_timeout: float = SNAPSHOT_TIMEOUT,
        stall_timeout: float | None = None,
        callback_timeout: float = CALLBACK_TIMEOUT,
        watchdog: float | None = None,
    ) -> None:
        self._dsn = dsn
        self._view = view
        self._load_snapshot = load_snapshot
        self._heartbeat = heartbeat
        self._resync = resync
        self._on_change = on_change
        self._on_resync = on_resync
        self.id = uuid.uuid4().hex
        self.ready = asyncio.Event()
        self.sessions = 0
        self.restarts = 0
        self._session: _Session | None = None
        self._generation = 0
        self._run_id = 0
        self._runner: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._abandoned: set[asyncio.Task[None]] = set()
        self._progress_at = time.monotonic()
        # Bounds for a hung connection. They follow the staleness bound, not
        # the heartbeat: a heartbeat delayed by load only lets freshness lapse
        # (verdicts fail closed at exactly the bound), whereas tearing the
        # session down forces a reconnect and a full resync, so a replica
        # under load would stay fail-closed far longer than the delay itself.
        # Only a feed silent for twice the bound is declared broken.
        bound = view.staleness
        self._hb_timeout = max(2 * heartbeat, _MIN_HEARTBEAT_TIMEOUT, bound)
        self._hb_overdue = max(3 * heartbeat, _MIN_HEARTBEAT_TIMEOUT, 2 * bound)
        self._connect_timeout = connect_timeout
        self._snapshot_timeout = snapshot_timeout
        self._stall = stall_timeout if stall_timeout is not None else max(
            2 * self._hb_timeout, 10.0)
        self._callback_timeout = callback_timeout
        # The watchdog waits longer than any one bounded step may take.
        longest = max(connect_timeout + 1, self._hb_timeout, self._hb_overdue, self._stall,
                      callback_timeout)
        self._watchdog = watchdog if watchdog is not None else max(6 * bound, longest + 5)
        self._check = min(1.0, self._watchdog / 4)

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="revocation-watchdog")

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout)
        return self._view.is_fresh

    async def stop(self) -> None:
        """Stop the watchdog and the session; returns within a few seconds, always."""
        tasks = {t for t in (self._supervisor, self._runner) if t is not None and not t.done()}
        self._supervisor = self._runner = None
        self._run_id += 1  # a loop that ignored its cancellation ends at its next turn
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)
            for task in pending:
                log.error("revocation feed task %s did not stop; abandoned", task.get_name())
        session, self._session = self._session, None
        self._view.mark_stale()
        if session is not None and session.conn is not None:
            try:  # a goodbye to a healthy server, but never a wait on a hung one
                await asyncio.wait_for(session.conn.close(), _CLOSE_TIMEOUT)
            except Exception:  # noqa: BLE001, S110 - dropped below
                pass
            finally:
                _terminate(session.conn)

    # --- the watchdog ----------------------------------------------------------------

    def _mark_progress(self, session: _Session) -> None:
        if session.current:
            self._progress_at = time.monotonic()

    async def _supervise(self) -> None:
        """Run the reconnect loop; restart it if it ends or stops making progress."""
        while True:
            self._run_id += 1
            self._progress_at = time.monotonic()
            runner = asyncio.create_task(self._run(self._run_id), name="revocation-sync")
            self._runner = runner
            why = await self._watch(runner)
            self.restarts += 1
            log.error("revocation feed restarted by its watchdog: %s; verdicts fail closed "
                      "until resynced", why)
            try:
                await self._abandon(runner)
            except Exception:  # pragma: no cover - the watchdog itself must not end
                log.exception("revocation feed watchdog: abandoning the old loop failed")

    async def _watch(self, runner: asyncio.Task[None]) -> str:
        """Return why ``runner`` must be replaced, once it must."""
        while True:
            await asyncio.sleep(self._check)
            if runner.done():
                error = None if runner.cancelled() else runner.exception()
                return "its loop ended" + (f" ({type(error).__name__}: {error})" if error else "")
            idle = time.monotonic() - self._progress_at
            if idle > self._watchdog:
                return f"no progress for {idle:.1f}s"

    async def _abandon(self, runner: asyncio.Task[None]) -> None:
        """Detach the current session, cancel the loop, and let it go if it will not end."""
        self._run_id += 1
        session, self._session = self._session, None
        self._view.mark_stale()
        if session is not None:
            _terminate(session.conn)
            if session.resyncer is not None:
                session.resyncer.cancel()
        if runner.done():
            return
        runner.cancel()
        _, pending = await asyncio.wait({runner}, timeout=_ABANDON_TIMEOUT)
        if pending:  # it ignores cancellation; as a non-current session it can do no harm
            log.error("revocation feed: the wedged loop did not end when cancelled; abandoned")
            self._abandoned.add(runner)
            runner.add_done_callback(self._abandoned.discard)

    # --- the reconnect loop --------------------------------------------------------

    async def _run(self, run_id: int) -> None:
        backoff = 0.2
        while run_id == self._run_id:
            self._generation += 1
            session = _Session(self, self._generation)
            self._session = session
            try:
                await self._serve(session)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    self._end(session, drop=False)  # stop() closes it, the watchdog drops it
                    raise
                # Not ours to obey: raised inside asyncpg or a callback.
                log.warning("revocation feed session interrupted by a stray cancellation; "
                            "verdicts fail closed until resynced")
            except Exception as exc:  # noqa: BLE001 - any failure means: stale, reconnect
                log.warning("revocation feed lost (%s: %s); verdicts fail closed until resynced",
                            type(exc).__name__, exc)
            self._end(session)
            if session.confirmed:
                backoff = 0.2
            self._mark_progress(session)  # an attempt ended: the loop is alive
            if not session.current:
                return  # abandoned meanwhile
            await self._reap(session)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _end(self, session: _Session, *, drop: bool = True) -> None:
        """Tear a session down: stale view, socket dropped (no wait on the peer)."""
        session.ended = True
        if session.current:
            self._view.mark_stale()
        if drop:
            _terminate(session.conn)
        if session.resyncer is not None:
            session.resyncer.cancel()

    async def _reap(self, session: _Session) -> None:
        """Give the session's resync task a moment to release what it holds."""
        resyncer = session.resyncer
        if resyncer is not None and not resyncer.done():
            await asyncio.wait({resyncer}, timeout=_ABANDON_TIMEOUT)

    async def _serve(self, session: _Session) -> None:
        """One session: connect, LISTEN, load, then heartbeats until it breaks."""
        conn = await asyncio.wait_for(
            asyncpg.connect(self._dsn, timeout=self._connect_timeout,
                            command_timeout=self._hb_timeout),
            self._connect_timeout + 1)
        session.conn = conn
        if not session.current:
            raise FeedBroken("abandoned while connecting")
        self.sessions += 1
        conn.add_termination_listener(session.on_terminated)
        self._mark_progress(session)
        # LISTEN before the snapshot: nothing committed from here on is missed.
        await asyncio.wait_for(conn.add_listener(CHANNEL, session.on_notify), self._hb_timeout)
        self._mark_progress(session)
        await self._full_load(session)
        connected = time.monotonic()
        session.resyncer = asyncio.create_task(self._periodic_resync(session),
                                               name="revocation-resync")
        while not session.lost.is_set():
            await self._beat(session, conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.lost.wait(), self._heartbeat)
            if session.resyncer.done():
                if session.resyncer.cancelled():
                    raise FeedBroken("the periodic resync was cancelled")
                session.resyncer.result()  # re-raise what stopped it
                raise FeedBroken("the periodic resync ended")
            oldest = min(session.pending.values(), default=None)
            if oldest is not None and time.monotonic() - oldest > self._hb_overdue:
                # Sent, acknowledged by the server, never delivered back.
                raise FeedBroken("heartbeats not delivered")
            if not session.current:
                raise FeedBroken("abandoned")
        if session.broken:
            raise FeedBroken(session.broken)
        raise FeedBroken(f"listener connection terminated after "
                         f"{time.monotonic() - connected:.1f}s")

    async def _beat(self, session: _Session, conn: asyncpg.Connection) -> None:
        session.counter += 1
        sent = time.monotonic()
        session.pending[session.counter] = sent
        payload = json.dumps({"type": "heartbeat", "from": session.source,
                              "n": session.counter})
        await asyncio.wait_for(conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload),
                               self._hb_timeout)

    async def _periodic_resync(self, session: _Session) -> None:
        """Full reload every ``resync`` seconds, beside the heartbeats.

        A failed reload (Postgres briefly unable to answer) is retried at the
        next period: the feed itself is still proven by the heartbeats. It
        ends with its session even if its cancellation is lost (asyncpg can
        raise a TimeoutError in place of a CancelledError while it releases a
        connection): the session never waits for it unboundedly either.
        """
        while session.current and not session.ended:
            await asyncio.sleep(self._resync)
            try:
                await self._full_load(session)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is None or me.cancelling() or not session.current:
                    raise
                log.warning("periodic revocation resync interrupted by a stray cancellation")
            except Exception as exc:  # noqa: BLE001 - keep the feed; retry later
                log.warning("periodic revocation resync failed (%s)", type(exc).__name__)
            if session.current:
                self._view.purge_expired()

    # --- loading ---------------------------------------------------------------------

    async def _full_load(self, session: _Session) -> None:
        buffer: list[RevocationEntry] = []
        session.buffers.append(buffer)
        try:
            loop = asyncio.get_running_loop()
            give_up = loop.time() + self._snapshot_timeout
            async with asyncio.timeout(min(give_up, loop.time() + self._stall)) as bound:
                snapshot = self._load_snapshot()
                if isinstance(snapshot, AsyncIterator):
                    builder = SnapshotBuilder()
                    count = 0
                    try:
                        async for entry in snapshot:
                            builder.add(entry)
                            count += 1
                            if count % _PROGRESS_EVERY == 0:  # not stalled: more time
                                bound.reschedule(min(give_up, loop.time() + self._stall))
                                self._mark_progress(session)
                    finally:
                        aclose = getattr(snapshot, "aclose", None)
                        if aclose is not None:  # a stream left early releases its connection
                            await aclose()
                    self._install(session, builder)
                else:
                    entries = await snapshot
                    builder = SnapshotBuilder(
                        len(entries) if isinstance(entries, list | tuple) else 0)
                    for entry in entries:
                        builder.add(entry)
                    self._install(session, builder)
            for entry in buffer:
                self._view.add(entry)
        finally:
            session.buffers = [b for b in session.buffers if b is not buffer]
        self._mark_progress(session)
        if self._on_resync is not None:
            await asyncio.wait_for(self._on_resync(), self._callback_timeout)

    def _install(self, session: _Session, builder: SnapshotBuilder) -> None:
        if not session.current:  # an old snapshot must never replace a newer state
            raise FeedBroken("abandoned while loading")
        self._view.install(builder)

    # --- notifications ----------------------------------------------------------------

    def _fail(self, session: _Session, why: str) -> None:
        log.error("%s; reloading the revocation view", why)
        session.broken = why
        self._view.mark_stale()
        session.lost.set()

    def _on_notify(self, session: _Session, payload: str) -> None:
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
            if event.get("from") == session.source:
                try:
                    n = int(event["n"])
                except (KeyError, TypeError, ValueError):
                    return
                sent = session.pending.pop(n, None)
                if sent is not None:
                    for earlier in [m for m in session.pending if m < n]:
                        del session.pending[earlier]
                    self._view.confirm_fresh(sent)
                    session.confirmed = True
                    self._mark_progress(session)
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
                self._fail(session, f"unusable revocation notification ({exc!r})")
                return
            for buffer in session.buffers:
                buffer.append(entry)
            # A key revocation also changes the key's state, which the keys
            # trigger notifies on its own: nothing to relay here.
            return
        if kind in _RELAYED and self._on_change is not None:
            try:
                self._on_change(event)
            except Exception:
                log.exception("handling a %s notification failed", kind)
