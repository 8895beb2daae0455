"""Fail closed when Postgres cannot vouch for the revocation view, and
resync before accepting again.

Runs on a PRIVATE embedded Postgres (this module stops it), never on the
session one. Two replicas in this process:

- A, the replica under test, with a short staleness bound (1.5 s) and a
  fast heartbeat (0.3 s), reaches Postgres through a TCP proxy the test
  controls, so A can be partitioned from a Postgres that is up, or its
  connections can hang without any TCP error;
- B reaches Postgres directly and stays connected whenever Postgres is up.

"A revocation committed while A was disconnected" is made through B, the
realistic way: while Postgres itself is down nothing can be committed at
all, so the case that matters is a replica cut off (partition, hung
connection) while the rest of the fleet keeps revoking. A must not accept
any token again before it has reloaded the revocations it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest

from fedtoken.core.model import Reason
from fedtoken.events.feed import CHANNEL, EventFeed
from fedtoken.hsm import HsmConfig
from fedtoken.revocation.view import InMemoryRevocationView, RevocationEntry
from fedtoken.store.embedded import EmbeddedPostgres
from fedtoken_client import FedtokenClient, FedtokenRpcError, reason_name
from tests._pg_fixture import create_database
from tests.integration._faults import PgControl
from tests.support import ServerThread, make_settings, poll_until

pytestmark = pytest.mark.integration

DEADLINE = 45.0
T = TypeVar("T")


class Proxy:
    """A TCP proxy to Postgres, on its own event loop thread.

    ``forward``: pass bytes both ways. ``cut``: close every connection and
    refuse new ones (a partition that the kernel reports). ``hang``: keep
    every connection open but pass nothing, and accept new connections
    without answering (a partition that nobody reports).
    """

    def __init__(self, upstream: Callable[[], int]) -> None:
        self._upstream = upstream
        self.mode = "forward"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="pg-proxy")
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> Proxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.cut()

        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def forward(self) -> None:
        self.mode = "forward"

    def hang(self) -> None:
        self.mode = "hang"

    def cut(self) -> None:
        self.mode = "cut"

        async def close_all() -> None:
            for w in list(self._writers):
                w.close()
            self._writers.clear()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)

    async def _hold(self) -> bool:
        while self.mode == "hang":
            await asyncio.sleep(0.05)
        return self.mode == "forward"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if not await self._hold():
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream())
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not await self._hold():
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()


def via_port(dsn: str, port: int) -> str:
    """The same DSN (credentials, database, options) on another local port."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


@dataclass
class Env:
    pg: EmbeddedPostgres
    # Stops and starts pg from a helper process: forking pg_ctl from this one
    # while gRPC threads run can crash the child (tests/integration/_faults.py).
    ctl: PgControl
    proxy: Proxy
    a: FedtokenClient
    b: FedtokenClient


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, hsm_config: HsmConfig) -> Iterator[Env]:
    root: Path = tmp_path_factory.mktemp("fail-closed")
    pg = EmbeddedPostgres(root / "pg")
    admin = pg.start()
    ctl = PgControl(pg)
    proxy: Proxy | None = None
    servers: list[ServerThread] = []
    try:
        name = f"fc_{uuid.uuid4().hex[:8]}"
        direct = create_database(admin, name)
        proxy = Proxy(lambda: pg.port).start()
        via_proxy = via_port(direct, proxy.port)
        fast = {"revocation_staleness_seconds": 1.5, "revocation_heartbeat_seconds": 0.3}
        a = ServerThread(make_settings(root / "a", **fast), via_proxy, hsm_config).start()
        servers.append(a)
        b = ServerThread(make_settings(root / "b", **fast), direct, hsm_config).start()
        servers.append(b)
        with a.client(caller="fail-closed-a", timeout=20) as ca, \
                b.client(caller="fail-closed-b", timeout=20) as cb:
            yield Env(pg, ctl, proxy, ca, cb)
    finally:
        if proxy is not None:
            proxy.forward()  # let the servers close their connections cleanly
        with contextlib.suppress(Exception):
            ctl.start()
        for srv in reversed(servers):
            with contextlib.suppress(Exception):
                srv.stop()
        if proxy is not None:
            proxy.stop()
        ctl.stop()
        ctl.close()


def eventually(probe: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    return poll_until(probe, done, what, deadline=DEADLINE, interval=0.05)


def verdict(client: FedtokenClient, token: str) -> str:
    v = client.verify(token, "svc")
    assert v.valid == (reason_name(v.reason) == "OK"), v  # valid exactly when OK
    return "OK" if v.valid else reason_name(v.reason)


def revoke_when_possible(client: FedtokenClient, token: str) -> None:
    """Revoke through a replica whose pool may still be reconnecting."""
    def attempt() -> str:
        try:
            client.revoke(token=token, reason="fail-closed test")
            return "done"
        except FedtokenRpcError as exc:
            if exc.code is not grpc.StatusCode.UNAVAILABLE:
                raise
            return exc.reason
    eventually(attempt, lambda r: r == "done", "revoke through B once Postgres is back")


def recovers_without_accepting(env: Env, kept: str, revoked: str) -> None:
    """Poll A until it accepts ``kept``; at no point may it accept ``revoked``."""
    def probe() -> tuple[str, str]:
        r = verdict(env.a, revoked)  # checked first: a resync must precede any acceptance
        k = verdict(env.a, kept)
        assert r in ("REVOCATION_UNAVAILABLE", "REVOKED"), f"A accepted a revoked token: {r}"
        return k, r
    eventually(probe, lambda kr: kr[0] == "OK", "A accepts tokens again")
    assert verdict(env.a, revoked) == "REVOKED"


def test_postgres_outage_fails_closed_and_resyncs_before_accepting(env: Env) -> None:
    kept = env.a.issue("outage-user", "svc").token
    missed = env.a.issue("outage-user", "svc").token
    eventually(lambda: verdict(env.a, kept), lambda r: r == "OK", "A fresh at start")
    assert env.a.introspect(kept).active

    env.ctl.stop()
    eventually(lambda: verdict(env.a, kept), lambda r: r == "REVOCATION_UNAVAILABLE",
               "A fails closed once Postgres is gone")
    assert verdict(env.a, missed) == "REVOCATION_UNAVAILABLE"
    batch = env.a.verify_batch([kept, missed], "svc")
    assert [reason_name(v.reason) for v in batch] == ["REVOCATION_UNAVAILABLE"] * 2
    assert not any(v.valid for v in batch)
    answer = env.a.introspect(kept)
    assert not answer.active
    assert reason_name(answer.reason) == "REVOCATION_UNAVAILABLE"
    with pytest.raises(FedtokenRpcError) as refused:
        env.a.revoke(token=missed)
    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "STORE_UNAVAILABLE"

    # Postgres comes back while A is still cut off from it; B revokes meanwhile.
    env.proxy.cut()
    env.ctl.start()
    revoke_when_possible(env.b, missed)
    eventually(lambda: verdict(env.b, missed), lambda r: r == "REVOKED", "B enforces it")
    assert verdict(env.a, kept) == "REVOCATION_UNAVAILABLE"  # A cannot vouch for anything

    env.proxy.forward()
    recovers_without_accepting(env, kept, missed)
    assert env.a.introspect(kept).active
    answer = env.a.introspect(missed)
    assert not answer.active and reason_name(answer.reason) == "REVOKED"


def test_a_hung_connection_fails_closed_and_resyncs_before_accepting(env: Env) -> None:
    kept = env.a.issue("hang-user", "svc").token
    missed = env.a.issue("hang-user", "svc").token
    eventually(lambda: verdict(env.a, kept), lambda r: r == "OK", "A fresh at start")

    env.proxy.hang()  # no RST, no FIN: bytes just stop
    eventually(lambda: verdict(env.a, kept), lambda r: r == "REVOCATION_UNAVAILABLE",
               "A fails closed while its connection hangs")
    env.b.revoke(token=missed, reason="fail-closed test")
    eventually(lambda: verdict(env.b, missed), lambda r: r == "REVOKED", "B enforces it")
    assert verdict(env.a, missed) == "REVOCATION_UNAVAILABLE"

    env.proxy.forward()
    recovers_without_accepting(env, kept, missed)


# -- the feed itself (EventFeed on the private Postgres, stub snapshots) --------


def test_a_slow_periodic_resync_does_not_let_the_watermark_lapse(env: Env) -> None:
    """Heartbeats keep proving the feed while a long snapshot loads, and what
    is notified during the load survives the swap."""
    exp = int(time.time()) + 3600

    async def scenario() -> None:
        view = InMemoryRevocationView(staleness=3.0)
        loads = 0

        async def load() -> list[RevocationEntry]:
            nonlocal loads
            loads += 1
            snapshot = [RevocationEntry("t", "jti", "in-snapshot", exp)]  # taken now
            if loads == 2:
                await asyncio.sleep(6)  # longer than the staleness bound
            elif loads > 2:
                await asyncio.sleep(3600)  # keep the state the second load left
            return snapshot

        sync = EventFeed(env.pg.dsn, view, load, heartbeat=0.2, resync=0.5)
        await sync.start()
        try:
            assert await sync.wait_ready(DEADLINE)
            while loads < 2:
                await asyncio.sleep(0.05)
            conn = await asyncpg.connect(env.pg.dsn)
            try:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps({
                    "type": "revocation", "tenant": "t", "kind": "jti", "value": "during-load",
                    "expires_at": exp, "not_before": None}))
            finally:
                await conn.close()
            fresh = []
            while loads == 2:
                fresh.append(view.is_fresh)
                await asyncio.sleep(0.1)
            assert fresh and all(fresh), "the view went stale during a periodic resync"
            assert view.check("t", "in-snapshot", "s", 0, "k") is Reason.REVOKED
            assert view.check("t", "during-load", "s", 0, "k") is Reason.REVOKED
        finally:
            await sync.stop()
        assert not view.is_fresh  # stopped: nobody vouches for it any more

    asyncio.run(scenario())


def test_an_unusable_revocation_notification_forces_a_full_reload(env: Env) -> None:
    async def scenario() -> None:
        view = InMemoryRevocationView(staleness=3.0)
        loads = 0

        async def load() -> list[RevocationEntry]:
            nonlocal loads
            loads += 1
            return []

        sync = EventFeed(env.pg.dsn, view, load, heartbeat=0.2, resync=3600)
        await sync.start()
        try:
            assert await sync.wait_ready(DEADLINE)
            assert loads == 1
            conn = await asyncpg.connect(env.pg.dsn)
            try:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL,
                                   json.dumps({"type": "revocation", "tenant": "t"}))
            finally:
                await conn.close()
            deadline = time.monotonic() + DEADLINE
            while not (loads >= 2 and view.is_fresh):
                assert time.monotonic() < deadline, "no reload after a bad revocation"
                await asyncio.sleep(0.05)
        finally:
            await sync.stop()

    asyncio.run(scenario())


def test_issuance_during_an_outage_is_audited_through_the_spill(env: Env) -> None:
    """Postgres away: Issue still answers, because its audit record is fsync'ed
    to the local spill first; the record reaches the chain when Postgres is back."""
    env.ctl.stop()
    issued = env.b.issue("spill-user", "svc")
    env.ctl.start()

    def replayed() -> list[str]:
        try:
            events = env.b.list_audit(subject="spill-user", event_type="token.issued").events
        except FedtokenRpcError:
            return []
        return [e.details_json for e in events if e.jti == issued.jti]

    (details,) = eventually(replayed, bool, "the spilled issuance record is replayed")
    assert "spilled_at" in details
    eventually(lambda: env.b.verify_audit_chain().ok, bool, "the chain verifies")
