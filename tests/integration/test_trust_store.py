"""Trusted issuers in a real Postgres (migrations/0005_trust.sql): the
repositories' round trips, the table's own checks, the notifications, the
persisted key sets, the service role's privileges, and a trust change on one
replica reaching another replica's TrustCatalog through the event feed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from fedtoken.core.authz import Ask, Role
from fedtoken.core.errors import (
    AlreadyExists,
    ErrorReason,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
)
from fedtoken.core.model import Tenant
from fedtoken.core.ports import CallContext, Principal
from fedtoken.core.trust import StoredKeySet, TrustedIssuer, validate_trusted_issuer
from fedtoken.events import EventFeed, revocation_loader
from fedtoken.revocation import InMemoryRevocationView
from fedtoken.service.trust import NewTrust, TrustAdmin, TrustCatalog
from fedtoken.store import EVENTS_CHANNEL, PgStore, apply_migrations, create_pool
from fedtoken.store.migrate import APP_ROLE, OWNER_ROLE, load_migrations
from fedtoken.store.trust import PgKeySetStore, PgTrustRepository
from tests._pg_fixture import app_dsn
from tests.unit.fakes import MemoryAudit, RecordingTrustedKeys

pytestmark = pytest.mark.integration

PROPAGATION = 5.0  # seconds: a change on one replica is configured on another within this
NO_RESYNC = 600.0  # the feed's periodic resync, far beyond the test: only NOTIFY can help
OPERATOR = CallContext(Principal(identity="spiffe://example.org/ops/operator"), "req-op")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(fresh_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(fresh_dsn, min_size=1, max_size=10)
    assert await apply_migrations(pool) == [m.version for m in load_migrations()]
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> PgStore:
    return PgStore(pool)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


async def _tenant(store: PgStore) -> Tenant:
    tid = f"t-{uuid.uuid4().hex[:8]}"
    return await store.tenants.create(Tenant(id=tid, issuer=f"https://{tid}.local.example"),
                                      now=_now())


def _trust(tenants: set[str], **kw: Any) -> TrustedIssuer:
    issuer = kw.pop("issuer", f"https://{uuid.uuid4().hex[:8]}.partner.example/t/x")
    return validate_trusted_issuer(TrustedIssuer(issuer=issuer, tenants=frozenset(tenants),
                                                 **kw))


async def _within(bound: float, probe: Callable[[], bool], what: str) -> float:
    """Poll ``probe`` until true; how long it took (never asserts timings)."""
    start = time.monotonic()
    while not probe():
        if time.monotonic() - start > bound:
            pytest.fail(f"not within {bound}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


class _AllowAll:
    async def require(self, ctx: CallContext, ask: Ask) -> None:
        return None

    async def scope(self, ctx: CallContext, role: Role) -> frozenset[str] | None:
        return None


# --- trusted_issuers ---------------------------------------------------------------------


async def test_a_trusted_issuer_round_trips(store: PgStore) -> None:
    a, b = await _tenant(store), await _tenant(store)
    given = _trust({a.id, b.id}, jwks_uri="https://keys.partner.example/jwks.json",
                   algorithms=frozenset({"RS256", "PS256"}),
                   audiences=frozenset({"api://orders", "api://billing"}),
                   max_stale_seconds=7200, added_by="spiffe://example.org/ops@ipv4:1")
    created = _now() - timedelta(days=2)  # the caller's clock, not the database's
    stored = await store.trust.put(given, now=created)
    stamp = int(created.timestamp())
    assert stored == replace(given, created_at=stamp, updated_at=stamp)
    assert await store.trust.get(given.issuer) == stored
    assert stored in await store.trust.list()
    assert await store.trust.get("https://nobody.example") is None

    later = created + timedelta(hours=1)
    narrowed = _trust({b.id}, issuer=given.issuer, namespace=given.namespace)
    updated = await store.trust.put(narrowed, now=later)
    assert updated.tenants == {b.id} and updated.algorithms == {"RS256"}
    assert (updated.created_at, updated.updated_at) == (stamp, int(later.timestamp()))
    assert updated.audiences == frozenset() and updated.jwks_uri == ""

    assert await store.trust.remove(given.issuer)
    assert not await store.trust.remove(given.issuer)
    assert await store.trust.get(given.issuer) is None


async def test_the_list_is_ordered_by_issuer(store: PgStore) -> None:
    t = await _tenant(store)
    names = [f"https://{c}-{uuid.uuid4().hex[:6]}.order.example" for c in "cab"]
    for name in names:
        await store.trust.put(_trust({t.id}, issuer=name), now=_now())
    listed = [i.issuer for i in await store.trust.list() if ".order.example" in i.issuer]
    assert listed == sorted(names)


async def test_the_store_refuses_unknown_tenants_our_issuers_and_taken_namespaces(
        store: PgStore) -> None:
    t = await _tenant(store)
    with pytest.raises(FailedPrecondition) as unknown:
        await store.trust.put(_trust({t.id, "ghost-tenant"}), now=_now())
    assert (unknown.value.reason, unknown.value.field) == (ErrorReason.TENANT_NOT_FOUND,
                                                           "tenants")
    with pytest.raises(InvalidRequest):
        await store.trust.put(_trust({t.id}, issuer=t.issuer, namespace="ours:"), now=_now())
    first = await store.trust.put(_trust({t.id}, namespace=f"ns-{t.id}:"), now=_now())
    with pytest.raises(AlreadyExists) as taken:
        await store.trust.put(_trust({t.id}, namespace=first.namespace), now=_now())
    assert taken.value.field == "namespace"
    # And the converse: no tenant may take a trusted issuer's URL.
    with pytest.raises(InvalidRequest):
        await store.tenants.create(Tenant(id=f"x{t.id}", issuer=first.issuer), now=_now())
    assert await store.tenants.get(f"x{t.id}") is None


BAD_ROWS: dict[str, dict[str, Any]] = {
    "hs256": {"algorithms": ["HS256"]},
    "no algorithm": {"algorithms": []},
    "none": {"algorithms": ["RS256", "none"]},
    "no tenant": {"tenants": []},
    "query": {"issuer": "https://q.example/t?x=1"},
    "user info": {"issuer": "https://u:p@q.example/t"},
    "ftp": {"issuer": "ftp://q.example/t"},
    "space": {"issuer": "https://q.example/a b"},
    "long issuer": {"issuer": "https://q.example/" + "a" * 600},
    "jwks query": {"jwks_uri": "https://q.example/jwks?x"},
    "namespace without colon": {"namespace": "plain"},
    "namespace with two colons": {"namespace": "a:b:"},
    "zero staleness": {"max_stale_s": 0},
    "17 audiences": {"audiences": [f"a{i}" for i in range(17)]},
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
async def test_the_table_checks_refuse_what_the_service_would(
        pool: asyncpg.Pool, store: PgStore, case: str) -> None:
    """Backstops for any other writer (an operator with psql)."""
    t = await _tenant(store)
    row: dict[str, Any] = {
        "issuer": f"https://{uuid.uuid4().hex[:8]}.raw.example", "jwks_uri": "",
        "algorithms": ["RS256"], "audiences": [], "tenants": [t.id],
        "namespace": f"raw-{uuid.uuid4().hex[:8]}:", "max_stale_s": 60,
    }
    row.update(BAD_ROWS[case])
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "INSERT INTO trusted_issuers (issuer, jwks_uri, algorithms, audiences, tenants, "
            "namespace, max_stale_s, created_at, updated_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now())", *row.values())


async def test_every_change_is_notified_on_commit(store: PgStore, fresh_dsn: str) -> None:
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    conn = await asyncpg.connect(fresh_dsn)
    await conn.add_listener(EVENTS_CHANNEL,
                            lambda *args: received.put_nowait(json.loads(args[-1])))

    async def next_trust() -> dict[str, Any]:
        while True:
            message = await asyncio.wait_for(received.get(), 5)
            if message.get("type") in ("trust", "ping"):
                return message

    try:
        t = await _tenant(store)
        given = _trust({t.id})
        await store.trust.put(given, now=_now())
        assert await next_trust() == {"type": "trust", "issuer": given.issuer}
        await store.trust.put(given, now=_now())  # an update
        assert await next_trust() == {"type": "trust", "issuer": given.issuer}
        await store.trust.remove(given.issuer)
        assert await next_trust() == {"type": "trust", "issuer": given.issuer}
        # Nothing for a rolled back change.
        with pytest.raises(RuntimeError):
            async with store.transaction() as tx:
                await tx.trust.put(_trust({t.id}), now=_now())
                raise RuntimeError("abort")
        await conn.execute("""SELECT pg_notify('fedtoken_events', '{"type": "ping"}')""")
        assert await next_trust() == {"type": "ping"}
    finally:
        await conn.close()


# --- trusted_key_sets ----------------------------------------------------------------------


async def test_the_last_good_key_set_round_trips_and_newer_wins(store: PgStore) -> None:
    t = await _tenant(store)
    issuer = (await store.trust.put(_trust({t.id}), now=_now())).issuer
    body = json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "n": "AQAB", "e": "AQAB"}]}).encode()
    fetched = time.time() - 3600.25
    first = StoredKeySet(issuer, "https://keys.partner.example/jwks.json", body, 'W/"e1"',
                         fetched)
    await store.key_sets.save_key_set(first)
    (loaded,) = [k for k in await store.key_sets.load_key_sets() if k.issuer == issuer]
    assert (loaded.jwks_uri, loaded.body, loaded.etag) == (first.jwks_uri, body, 'W/"e1"')
    assert loaded.fetched_at == pytest.approx(fetched, abs=1e-5)
    # A confirmation from longer ago (another replica, late) does not win...
    await store.key_sets.save_key_set(StoredKeySet(issuer, first.jwks_uri, b'{"keys":[]}', "",
                                                   fetched - 10))
    assert [k.body for k in await store.key_sets.load_key_sets() if k.issuer == issuer] == [
        body]
    # ... a later one does.
    newer = StoredKeySet(issuer, first.jwks_uri, b'{"keys":[]}', '"e2"', fetched + 10)
    await store.key_sets.save_key_set(newer)
    (loaded,) = [k for k in await store.key_sets.load_key_sets() if k.issuer == issuer]
    assert (loaded.body, loaded.etag) == (b'{"keys":[]}', '"e2"')
    # Gone with its issuer; and saving for an issuer not trusted does nothing.
    await store.trust.remove(issuer)
    await store.key_sets.save_key_set(newer)
    assert [k for k in await store.key_sets.load_key_sets() if k.issuer == issuer] == []


async def test_a_key_set_is_bounded(store: PgStore) -> None:
    t = await _tenant(store)
    issuer = (await store.trust.put(_trust({t.id}), now=_now())).issuer
    for body in (b"", b"x" * 65537):
        with pytest.raises(InvalidRequest):
            await store.key_sets.save_key_set(StoredKeySet(issuer, "https://k.example/j",
                                                           body, "", time.time()))
    await store.key_sets.save_key_set(StoredKeySet(issuer, "https://k.example/j",
                                                   b"x" * 65536, "", time.time()))


# --- the service's role -----------------------------------------------------------------------


TRUST_FORBIDDEN = (
    "DELETE FROM trusted_key_sets",
    "TRUNCATE trusted_issuers",
    "TRUNCATE trusted_key_sets",
    "ALTER TABLE trusted_issuers DISABLE TRIGGER trusted_issuers_notify",
    "ALTER TABLE trusted_issuers DISABLE TRIGGER trusted_issuers_check",
    "ALTER TABLE tenants DISABLE TRIGGER tenants_issuer_not_trusted",
    "DROP TRIGGER trusted_issuers_check ON trusted_issuers",
    "DROP TABLE trusted_key_sets",
    "ALTER TABLE trusted_issuers DROP CONSTRAINT trusted_issuers_algorithms_check",
    "ALTER TABLE trusted_issuers OWNER TO fedtoken_app",
    "CREATE OR REPLACE FUNCTION fedtoken_check_trust() RETURNS trigger LANGUAGE plpgsql"
    " AS $$ BEGIN RETURN NEW; END $$",
    "ALTER FUNCTION fedtoken_notify_trust() OWNER TO fedtoken_app",
    "SELECT fedtoken_notify_trust()",
)


async def test_the_service_role_does_its_trust_work_and_nothing_more(
        pool: asyncpg.Pool, store: PgStore, fresh_dsn: str) -> None:
    owners = {r["name"]: r["owner"] for r in await pool.fetch(
        "SELECT relname AS name, pg_get_userbyid(relowner) AS owner FROM pg_class"
        " WHERE relname IN ('trusted_issuers', 'trusted_key_sets')"
        " UNION ALL SELECT proname, pg_get_userbyid(proowner) FROM pg_proc"
        " WHERE proname IN ('fedtoken_check_trust', 'fedtoken_check_tenant_issuer',"
        " 'fedtoken_notify_trust')")}
    assert owners == dict.fromkeys(
        ("trusted_issuers", "trusted_key_sets", "fedtoken_check_trust",
         "fedtoken_check_tenant_issuer", "fedtoken_notify_trust"), OWNER_ROLE)
    tenant = await _tenant(store)
    app = await create_pool(app_dsn(fresh_dsn), min_size=1, max_size=2)
    try:
        assert await app.fetchval("SELECT current_user") == APP_ROLE
        trust, sets = PgTrustRepository.over_pool(app), PgKeySetStore.over_pool(app)
        given = _trust({tenant.id})
        await trust.put(given, now=_now())
        await trust.put(given, now=_now())
        assert await trust.get(given.issuer) is not None
        assert given.issuer in {i.issuer for i in await trust.list()}
        await sets.save_key_set(StoredKeySet(given.issuer, "https://k.example/j", b"{}", "",
                                             time.time()))
        await sets.save_key_set(StoredKeySet(given.issuer, "https://k.example/j", b"{}", "",
                                             time.time() + 1))
        assert given.issuer in {k.issuer for k in await sets.load_key_sets()}
        # The key set goes with its issuer although the role may not delete it.
        assert await trust.remove(given.issuer)
        assert given.issuer not in {k.issuer for k in await sets.load_key_sets()}
        # Tenants still work as the service role, trigger and all.
        await PgStore(app).tenants.create(
            Tenant(id=f"r{tenant.id}", issuer=f"https://r{tenant.id}.example"), now=_now())
        allowed = []
        for sql in TRUST_FORBIDDEN:
            try:
                await app.execute(sql)
            except asyncpg.InsufficientPrivilegeError:
                continue
            allowed.append(sql)
        assert allowed == []
    finally:
        await app.close()


# --- a second replica hears of it ---------------------------------------------------------------


async def test_a_trust_added_on_one_replica_is_configured_on_another(
        pool: asyncpg.Pool, store: PgStore, fresh_dsn: str) -> None:
    """Replica 1 changes trust through TrustAdmin; replica 2 has only its own
    event feed (periodic resync far out) and TrustCatalog, whose TrustedKeys
    must be reconfigured by the notification alone."""
    a, b = await _tenant(store), await _tenant(store)
    one_keys = RecordingTrustedKeys()
    one = TrustAdmin(repo=store.trust, tenants=store.tenants,
                     catalog=TrustCatalog(repo=store.trust, keys=one_keys), keys=one_keys,
                     audit=MemoryAudit(), clock=_Clock(), authz=_AllowAll())
    two_keys = RecordingTrustedKeys()
    two = TrustCatalog(repo=PgTrustRepository.over_pool(pool), keys=two_keys)
    view = InMemoryRevocationView(staleness=5.0)
    feed = EventFeed(fresh_dsn, view, revocation_loader(store.revocations, time.time),
                     heartbeat=0.2, resync=NO_RESYNC, on_change=two.notice,
                     on_resync=two.reload)
    await feed.start()
    try:
        assert await feed.wait_ready(10)
        issuer = f"https://{uuid.uuid4().hex[:8]}.replica.example/t/x"
        loads = two.reloads
        await one.add(NewTrust(issuer=issuer, tenants=[a.id]), OPERATOR)
        await _within(PROPAGATION, lambda: issuer in two_keys.issuers,
                      "the new trust configured on replica 2")
        assert two_keys.issuers[issuer].tenants == {a.id}
        assert two.reloads > loads  # by the notification, not a resync
        await one.add(NewTrust(issuer=issuer, tenants=[b.id], algorithms=["PS256"]), OPERATOR)
        await _within(PROPAGATION, lambda: two_keys.issuers.get(issuer) is not None
                      and two_keys.issuers[issuer].tenants == {b.id},
                      "the changed trust configured on replica 2")
        assert two_keys.issuers[issuer].algorithms == {"PS256"}
        await one.remove(issuer, OPERATOR)
        await _within(PROPAGATION, lambda: issuer not in two_keys.issuers,
                      "the removed trust forgotten on replica 2")
        with pytest.raises(NotFound):
            await one.remove(issuer, OPERATOR)
    finally:
        await feed.stop()
        await two.close()


class _Clock:
    def now(self) -> float:
        return time.time()

