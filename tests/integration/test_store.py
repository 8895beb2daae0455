"""The Postgres store against a real server: schema, repositories, audit chain."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from fedtoken.core.audit import GENESIS_HASH
from fedtoken.core.errors import (
    AlreadyExists,
    ErrorReason,
    InvalidKeyTransition,
    InvalidRequest,
    KeyNotFound,
    StoreUnavailable,
    TenantExists,
    TenantNotFound,
)
from fedtoken.core.model import KeyRecord, KeyState, Tenant, TenantPolicy
from fedtoken.store import (
    EVENTS_CHANNEL,
    AuditEvent,
    ChainProblem,
    PgStore,
    apply_migrations,
    create_pool,
)
from fedtoken.store.embedded import EmbeddedPostgres
from fedtoken.store.migrate import load_migrations
from tests._pg_fixture import create_database, drop_database

pytestmark = pytest.mark.integration


# --- fixtures -------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(fresh_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(fresh_dsn, min_size=1, max_size=10)
    assert await apply_migrations(pool) == [m.version for m in load_migrations()]
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> PgStore:
    return PgStore(pool)


@pytest.fixture
def own_db(pg_dsn: str) -> Iterator[str]:
    """A database for one test (migrations not applied)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield create_database(pg_dsn, name)
    drop_database(pg_dsn, name)


@pytest_asyncio.fixture(loop_scope="session")
async def own_pool(own_db: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database of its own, for tests that break or count the chain."""
    pool = await create_pool(own_db, min_size=1, max_size=10)
    await apply_migrations(pool)
    yield pool
    await pool.close()


def _slug() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _now() -> datetime:
    """The caller's clock: every rule of the store takes its "now" from here."""
    return datetime.now(UTC)


def _epoch(ts: datetime) -> int:
    return int(ts.timestamp())


async def _tenant(store: PgStore) -> Tenant:
    tid = _slug()
    return await store.tenants.create(Tenant(id=tid, issuer=f"https://{tid}.example"), now=_now())


def _key(
    tenant: str, state: KeyState = KeyState.PENDING, created_at: int | None = None
) -> KeyRecord:
    kid = uuid.uuid4().hex
    if created_at is None:
        created_at = _epoch(_now())
    return KeyRecord(
        kid=kid,
        tenant=tenant,
        alg="RS256",
        key_size=2048,
        state=state,
        public_jwk={"kty": "RSA", "n": "AQAB" * 4, "e": "AQAB", "kid": kid},
        hsm_label=f"fedtoken-{kid}",
        created_at=created_at,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _in(days: float = 1) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


# --- migrations -----------------------------------------------------------------


async def test_migrations_apply_once_and_are_idempotent(own_db: str) -> None:
    conn = await asyncpg.connect(own_db)
    try:
        shipped = load_migrations()
        assert [m.version for m in shipped][:2] == [1, 2]
        assert await apply_migrations(conn) == [m.version for m in shipped]
        assert await apply_migrations(conn) == []
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in shipped]
        assert [m.name for m in shipped][:2] == ["init", "tenant_notify"]
        head = await conn.fetchrow("SELECT seq, hash FROM audit_head")
        assert (head["seq"], bytes(head["hash"])) == (0, GENESIS_HASH)
    finally:
        await conn.close()


async def test_migrations_race_between_replicas(own_db: str) -> None:
    conns = [await asyncpg.connect(own_db) for _ in range(3)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
        assert sorted(results) == [[], [], [m.version for m in load_migrations()]]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(
            load_migrations())
    finally:
        for c in conns:
            await c.close()


# --- tenants --------------------------------------------------------------------


async def test_tenant_crud(store: PgStore) -> None:
    tid = _slug()
    policy = TenantPolicy(
        max_token_lifetime_seconds=7200,
        default_token_lifetime_seconds=600,
        allowed_algorithms=("RS256", "PS256"),
        key_size=3072,
    )
    now = _now() - timedelta(days=3)  # the caller's clock, not the database's
    created = await store.tenants.create(
        Tenant(id=tid, issuer=f"https://{tid}.x", policy=policy), now=now
    )
    assert created.policy == policy
    assert created.created_at == _epoch(now)
    assert await store.tenants.get(tid) == created
    assert await store.tenants.get("nope") is None
    listed = await store.tenants.list()
    assert created in listed
    assert [t for t in listed if t.issuer == f"https://{tid}.x"] == [created]
    assert [t.id for t in listed] == sorted(t.id for t in listed)


async def test_tenant_exists(store: PgStore) -> None:
    t = await _tenant(store)
    with pytest.raises(TenantExists) as same_id:
        await store.tenants.create(Tenant(id=t.id, issuer="https://other.example"), now=_now())
    assert same_id.value.reason is ErrorReason.TENANT_EXISTS
    assert same_id.value.field == "id"
    with pytest.raises(TenantExists) as same_issuer:
        await store.tenants.create(Tenant(id=_slug(), issuer=t.issuer), now=_now())
    assert same_issuer.value.reason is ErrorReason.TENANT_EXISTS
    assert same_issuer.value.field == "issuer"


async def test_tenant_id_must_be_a_slug(store: PgStore) -> None:
    with pytest.raises(InvalidRequest):
        await store.tenants.create(Tenant(id="Not_A_Slug", issuer="https://slug.example"),
                                   now=_now())
    with pytest.raises(InvalidRequest) as naive:
        await store.tenants.create(Tenant(id=_slug(), issuer="https://naive.example"),
                                   now=datetime.now())  # naive: refused
    assert naive.value.field == "now"


# --- keys -----------------------------------------------------------------------


async def test_keys_insert_list_get(store: PgStore) -> None:
    t = await _tenant(store)
    other = await _tenant(store)
    now = _epoch(_now())
    old = await store.keys.insert(_key(t.id, created_at=now - 100))
    new = await store.keys.insert(_key(t.id, created_at=now))
    foreign = await store.keys.insert(_key(other.id))
    assert old.created_at == now - 100 and old.state is KeyState.PENDING
    assert new.created_at == now
    assert new.public_jwk["kid"] == new.kid
    assert await store.keys.list(t.id) == [new, old]
    everything = await store.keys.list()
    assert all(k in everything for k in (old, new, foreign))
    assert everything == sorted(everything, key=lambda k: k.created_at, reverse=True)
    assert await store.keys.get(new.kid) == new
    assert await store.keys.get("missing") is None
    with pytest.raises(AlreadyExists) as same_kid:
        await store.keys.insert(new)
    assert same_kid.value.reason is ErrorReason.INVALID_FIELD
    with pytest.raises(TenantNotFound) as no_tenant:
        await store.keys.insert(_key("no-such-tenant"))
    assert no_tenant.value.reason is ErrorReason.TENANT_NOT_FOUND


async def test_at_most_one_active_key_per_tenant(store: PgStore, pool: asyncpg.Pool) -> None:
    t = await _tenant(store)
    active = await store.keys.insert(_key(t.id, KeyState.ACTIVE))
    with pytest.raises(InvalidKeyTransition) as second:
        await store.keys.insert(_key(t.id, KeyState.ACTIVE))
    assert second.value.reason is ErrorReason.INVALID_KEY_TRANSITION
    pending = await store.keys.insert(_key(t.id))
    with pytest.raises(InvalidKeyTransition) as by_state:
        await store.keys.set_state(pending.kid, KeyState.ACTIVE, expected=[KeyState.PENDING],
                                   now=_now())
    assert by_state.value.reason is ErrorReason.INVALID_KEY_TRANSITION
    # The database enforces it whatever the application does.
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute("UPDATE keys SET state = 'ACTIVE' WHERE kid = $1", pending.kid)
    # Another tenant has its own active key.
    other = await _tenant(store)
    await store.keys.insert(_key(other.id, KeyState.ACTIVE))
    assert (await store.keys.get(active.kid)).state is KeyState.ACTIVE  # type: ignore[union-attr]


async def test_activate_key_rotates(store: PgStore) -> None:
    t = await _tenant(store)
    first = await store.keys.insert(_key(t.id))
    at_first = _now() - timedelta(hours=2)  # the caller's clock stamps the states
    activated = await store.keys.activate(t.id, first.kid, now=at_first)
    assert activated.state is KeyState.ACTIVE and activated.activated_at == _epoch(at_first)
    second = await store.keys.insert(_key(t.id))
    at_second = _now() - timedelta(hours=1)
    now_active = await store.keys.activate(t.id, second.kid, now=at_second)
    assert now_active.state is KeyState.ACTIVE and now_active.activated_at == _epoch(at_second)
    retiring = await store.keys.get(first.kid)
    assert retiring is not None
    assert retiring.state is KeyState.RETIRING and retiring.retiring_at == _epoch(at_second)

    with pytest.raises(InvalidKeyTransition) as not_pending:
        await store.keys.activate(t.id, first.kid, now=_now())
    assert not_pending.value.reason is ErrorReason.INVALID_KEY_TRANSITION
    with pytest.raises(KeyNotFound) as unknown:
        await store.keys.activate(t.id, "no-such-kid", now=_now())
    assert unknown.value.reason is ErrorReason.KEY_NOT_FOUND
    other = await _tenant(store)
    with pytest.raises(KeyNotFound) as wrong_tenant:
        await store.keys.activate(other.id, (await store.keys.insert(_key(t.id))).kid, now=_now())
    assert wrong_tenant.value.reason is ErrorReason.KEY_NOT_FOUND
    with pytest.raises(TenantNotFound) as no_tenant:
        await store.keys.activate("no-such-tenant", second.kid, now=_now())
    assert no_tenant.value.reason is ErrorReason.TENANT_NOT_FOUND


async def test_concurrent_activations_leave_one_active(store: PgStore) -> None:
    t = await _tenant(store)
    keys = [await store.keys.insert(_key(t.id)) for _ in range(4)]
    await asyncio.gather(*(store.keys.activate(t.id, k.kid, now=_now()) for k in keys))
    states = sorted(k.state.value for k in await store.keys.list(t.id))
    assert states == ["ACTIVE", "RETIRING", "RETIRING", "RETIRING"]


async def test_key_state_transitions(store: PgStore, pool: asyncpg.Pool) -> None:
    t = await _tenant(store)
    k = await store.keys.insert(_key(t.id))
    with pytest.raises(InvalidKeyTransition) as bad:
        await store.keys.set_state(k.kid, KeyState.RETIRED, expected=[KeyState.RETIRING],
                                   now=_now())
    assert bad.value.reason is ErrorReason.INVALID_KEY_TRANSITION
    assert (await store.keys.get(k.kid)).state is KeyState.PENDING  # type: ignore[union-attr]
    with pytest.raises(KeyNotFound) as missing:
        await store.keys.set_state("no-such-kid", KeyState.RETIRED, expected=[KeyState.PENDING],
                                   now=_now())
    assert missing.value.reason is ErrorReason.KEY_NOT_FOUND

    times = [_now() - timedelta(minutes=m) for m in (50, 40, 30, 20, 10)]
    k = await store.keys.activate(t.id, k.kid, now=times[0])
    k = await store.keys.set_state(k.kid, KeyState.RETIRING, expected=[KeyState.ACTIVE],
                                   now=times[1])
    assert k.retiring_at == _epoch(times[1])
    k = await store.keys.set_state(k.kid, KeyState.RETIRED, expected=[KeyState.RETIRING],
                                   now=times[2])
    assert k.state is KeyState.RETIRED and k.retired_at == _epoch(times[2])
    k = await store.keys.set_state(
        k.kid, KeyState.COMPROMISED, expected=[s for s in KeyState if s is not KeyState.DESTROYED],
        now=times[3],
    )
    assert k.state is KeyState.COMPROMISED and k.compromised_at == _epoch(times[3])
    k = await store.keys.set_state(k.kid, KeyState.DESTROYED, expected=[KeyState.COMPROMISED],
                                   now=times[4])
    assert k.state is KeyState.DESTROYED
    assert await pool.fetchval("SELECT destroyed_at FROM keys WHERE kid = $1", k.kid) == times[4]
    assert k.activated_at == _epoch(times[0])


# --- revocations ----------------------------------------------------------------


async def _active(
    store: PgStore, tenant: str, now: datetime
) -> list[tuple[str, str, str, int, int]]:
    """The tenant's revocations in force at ``now``, as the in-memory view loads them."""
    return [r async for chunk in store.revocations.iter_active(now) for r in chunk
            if r[0] == tenant]


async def test_revoke_is_idempotent_and_checked(store: PgStore) -> None:
    t = await _tenant(store)
    now = _now() - timedelta(minutes=5)  # the caller's clock, not the database's
    created, at = await store.revocations.revoke(
        t.id, "jti", "j-1", expires_at=_in(), now=now, reason="lost"
    )
    assert created and at == now
    again, at_again = await store.revocations.revoke(
        t.id, "jti", "j-1", expires_at=_in(0.5), now=_now()
    )
    assert (again, at_again) == (False, at)
    iat = _epoch(_now())
    assert await store.revocations.is_revoked(t.id, "j-1", "alice", iat, "kid-a", now=_now())
    assert not await store.revocations.is_revoked(t.id, "j-2", "alice", iat, "kid-a", now=_now())
    other = await _tenant(store)
    assert not await store.revocations.is_revoked(other.id, "j-1", "alice", iat, "kid-a",
                                                  now=_now())

    await store.revocations.revoke(t.id, "key", "kid-b", expires_at=_in(), now=_now())
    assert await store.revocations.is_revoked(t.id, "j-3", "bob", iat, "kid-b", now=_now())


async def test_revocation_expiry_follows_the_callers_clock(store: PgStore) -> None:
    t = await _tenant(store)
    expires = _in(1)
    await store.revocations.revoke(t.id, "jti", "j-c", expires_at=expires, now=_now())
    before, after = expires - timedelta(seconds=1), expires + timedelta(seconds=1)
    assert await store.revocations.is_revoked(t.id, "j-c", "", 0, "", now=before)
    assert not await store.revocations.is_revoked(t.id, "j-c", "", 0, "", now=after)
    assert [r[2] for r in await _active(store, t.id, before)] == ["j-c"]
    assert await _active(store, t.id, after) == []


async def test_revocations_stream_in_chunks_with_epochs_rounded_up(store: PgStore) -> None:
    t = await _tenant(store)
    exp = _now().replace(microsecond=0) + timedelta(hours=1, microseconds=1)
    for i in range(5):
        await store.revocations.revoke(t.id, "jti", f"s-{i}", expires_at=exp, now=_now())
    await store.revocations.revoke(
        t.id, "jti", "gone", expires_at=_now() - timedelta(hours=1), now=_now()
    )
    chunks = [c async for c in store.revocations.iter_active(_now(), chunk=2)]
    mine = [r for c in chunks for r in c if r[0] == t.id]
    assert sorted(r[2] for r in mine) == [f"s-{i}" for i in range(5)]  # not the expired one
    assert all(len(c) <= 2 for c in chunks) and len(chunks) >= 3
    assert {r[3] for r in mine} == {int(exp.timestamp()) + 1}  # rounded up
    assert {(r[1], r[4]) for r in mine} == {("jti", 0)}


async def test_subject_revocation_cuts_by_issue_time(store: PgStore) -> None:
    t = await _tenant(store)
    revs = store.revocations
    exp = _in()
    cut = _now().replace(microsecond=0) - timedelta(seconds=100)
    created, _ = await revs.revoke(t.id, "subject", "carol", expires_at=exp, not_before=cut,
                                   now=_now())
    assert created
    before, after = _epoch(cut) - 1, _epoch(cut) + 1
    assert await revs.is_revoked(t.id, "j", "carol", before, "k", now=_now())
    assert not await revs.is_revoked(t.id, "j", "carol", after, "k", now=_now())
    # Revoking again later (default cut: the caller's now) also catches the
    # tokens issued between the two calls.
    later = _now()
    widened, _ = await revs.revoke(t.id, "subject", "carol", expires_at=exp, now=later)
    assert widened
    assert await revs.is_revoked(t.id, "j", "carol", after, "k", now=_now())
    [row] = await _active(store, t.id, _now())
    assert row[4] == _epoch(later) + (later.microsecond > 0)  # not_before = now, rounded up
    # An earlier cut or expiry does not narrow it.
    narrower, _ = await revs.revoke(
        t.id, "subject", "carol", expires_at=exp - timedelta(hours=1), not_before=cut, now=_now()
    )
    assert not narrower
    assert await revs.is_revoked(t.id, "j", "carol", after, "k", now=_now())
    # A later expiry extends it.
    longer, _ = await revs.revoke(t.id, "subject", "carol", expires_at=exp + timedelta(hours=1),
                                  now=_now())
    assert longer


async def test_revoke_rejects_bad_input(store: PgStore) -> None:
    t = await _tenant(store)
    revs = store.revocations
    with pytest.raises(InvalidRequest):
        await revs.revoke(t.id, "email", "x", expires_at=_in(), now=_now())
    with pytest.raises(InvalidRequest):
        await revs.revoke(t.id, "jti", "x", expires_at=_in(), not_before=_in(0), now=_now())
    with pytest.raises(InvalidRequest):
        await revs.revoke(t.id, "jti", "x", expires_at=datetime.now() + timedelta(days=1),
                          now=_now())
    with pytest.raises(InvalidRequest) as naive_now:
        await revs.revoke(t.id, "jti", "x", expires_at=_in(), now=datetime.now())
    assert naive_now.value.field == "now"
    with pytest.raises(TenantNotFound) as unknown:
        await revs.revoke("no-such-tenant", "jti", "x", expires_at=_in(), now=_now())
    assert unknown.value.reason is ErrorReason.TENANT_NOT_FOUND


async def test_revoke_audits_in_the_same_transaction(own_pool: asyncpg.Pool) -> None:
    store = PgStore(own_pool)
    t = await _tenant(store)
    event = AuditEvent("token.revoked", tenant=t.id, actor="ops", jti="j-9", outcome="ok")
    await store.revocations.revoke(t.id, "jti", "j-9", expires_at=_in(), now=_now(), audit=event)
    [record] = await store.audit.list(tenant=t.id)
    assert record.event == event
    # A failed revocation leaves no audit record behind.
    with pytest.raises(TenantNotFound):
        await store.revocations.revoke("no-such-tenant", "jti", "j-9", expires_at=_in(),
                                       now=_now(), audit=event)
    assert len(await store.audit.list()) == 1


async def test_purge_removes_only_expired(store: PgStore) -> None:
    t = await _tenant(store)
    past = _now() - timedelta(minutes=5)
    await store.revocations.revoke(t.id, "jti", "old", expires_at=past, now=_now())
    await store.revocations.revoke(t.id, "jti", "live", expires_at=_in(), now=_now())
    now = _now()
    assert not await store.revocations.is_revoked(t.id, "old", "", 0, "", now=now)
    assert [r[2] for r in await _active(store, t.id, now)] == ["live"]
    assert await store.revocations.purge_expired(now) >= 1
    assert await store.revocations.purge_expired(now) == 0
    assert await store.revocations.is_revoked(t.id, "live", "", 0, "", now=now)
    # Expired by the caller's clock: purged, although the database's clock disagrees.
    assert await store.revocations.purge_expired(_in(2)) >= 1
    assert await _active(store, t.id, now) == []


# --- notifications --------------------------------------------------------------


async def test_changes_are_notified_on_commit(store: PgStore, fresh_dsn: str) -> None:
    """The triggers' payloads, as any LISTENing replica receives them."""
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    conn = await asyncpg.connect(fresh_dsn)

    def on_notify(_conn: object, _pid: int, channel: str, payload: str) -> None:
        assert channel == EVENTS_CHANNEL
        received.put_nowait(json.loads(payload))

    await conn.add_listener(EVENTS_CHANNEL, on_notify)

    async def next_message() -> dict[str, Any]:
        return await asyncio.wait_for(received.get(), 5)

    try:
        tid = _slug()
        t = await store.tenants.create(Tenant(id=tid, issuer=f"https://{tid}.example"),
                                       now=_now())
        assert await next_message() == {
            "type": "tenant", "tenant": t.id, "issuer": t.issuer,
            "max_token_lifetime_s": t.policy.max_token_lifetime_seconds,
            "default_token_lifetime_s": t.policy.default_token_lifetime_seconds,
            "allowed_algorithms": list(t.policy.allowed_algorithms),
            "key_size": t.policy.key_size,
            "rotation_period_s": t.policy.rotation_period_seconds,
        }
        # An update of the row (e.g. by an operator with psql) too.
        await store.revocations.revoke(t.id, "jti", "j-n0", expires_at=_in(), now=_now())
        await conn.execute("UPDATE tenants SET default_token_lifetime_s = 60 WHERE id = $1", t.id)
        assert (await next_message())["type"] == "revocation"
        updated = await next_message()
        assert (updated["type"], updated["tenant"], updated["default_token_lifetime_s"]) == (
            "tenant", t.id, 60)

        expires = _in()
        await store.revocations.revoke(t.id, "jti", "j-n", expires_at=expires, now=_now())
        assert await next_message() == {
            "type": "revocation",
            "tenant": t.id,
            "kind": "jti",
            "value": "j-n",
            "expires_at": int(expires.timestamp()) + (expires.microsecond > 0),
            "not_before": None,
        }
        key = await store.keys.insert(_key(t.id))
        assert await next_message() == {
            "type": "keys", "tenant": t.id, "kid": key.kid, "state": "PENDING"
        }
        await store.keys.activate(t.id, key.kid, now=_now())
        assert (await next_message())["state"] == "ACTIVE"
        # Nothing is notified for a rolled back change.
        with pytest.raises(RuntimeError):
            async with store.transaction() as tx:
                await tx.revocations.revoke(t.id, "jti", "never", expires_at=_in(), now=_now())
                rid = _slug()
                await tx.tenants.create(Tenant(id=rid, issuer=f"https://{rid}.example"),
                                        now=_now())
                raise RuntimeError("abort")
        await conn.execute("""SELECT pg_notify('fedtoken_events', '{"type": "ping"}')""")
        assert await next_message() == {"type": "ping"}
    finally:
        await conn.close()


# --- transactions ---------------------------------------------------------------


async def test_transaction_commits_or_rolls_back_together(own_pool: asyncpg.Pool) -> None:
    store = PgStore(own_pool)
    async with store.transaction() as tx:
        t = await _tenant(tx)
        await tx.audit.append_chunk([AuditEvent("tenant.created", tenant=t.id)])
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.tenants.create(Tenant(id="rolled-back", issuer="https://rb.example"),
                                    now=_now())
            await tx.audit.append_chunk([AuditEvent("tenant.created", tenant="rolled-back")])
            raise RuntimeError("abort")
    assert await store.tenants.get(t.id) is not None
    assert await store.tenants.get("rolled-back") is None
    assert [r.event.tenant for r in await store.audit.list()] == [t.id]
    assert (await store.audit.verify_chain()).ok


async def test_key_compromise_and_its_revocation_commit_together(
    own_pool: asyncpg.Pool,
) -> None:
    store = PgStore(own_pool)
    t = await _tenant(store)
    key = await store.keys.activate(t.id, (await store.keys.insert(_key(t.id))).kid, now=_now())
    event = AuditEvent("key.compromised", tenant=t.id, kid=key.kid)

    async def compromise(tx: PgStore) -> None:
        now = _now()
        await tx.keys.set_state(key.kid, KeyState.COMPROMISED, expected=[KeyState.ACTIVE],
                                now=now)
        await tx.revocations.revoke(t.id, "key", key.kid, expires_at=_in(), now=now,
                                    audit=event)

    # The revocation fails (here: a database refusal): the state change is undone too.
    with pytest.raises(InvalidRequest):
        async with store.transaction() as tx:
            await compromise(tx)
            await tx.revocations.revoke(t.id, "jti", "x" * 2000, expires_at=_in(), now=_now())
    assert (await store.keys.get(key.kid)).state is KeyState.ACTIVE  # type: ignore[union-attr]
    assert not await store.revocations.is_revoked(t.id, "", "", 0, key.kid, now=_now())
    assert await store.audit.list() == []

    async with store.transaction() as tx:
        await compromise(tx)
    assert (await store.keys.get(key.kid)).state is KeyState.COMPROMISED  # type: ignore[union-attr]
    assert await store.revocations.is_revoked(t.id, "", "", 0, key.kid, now=_now())
    assert [r.event for r in await store.audit.list()] == [event]


# --- audit chain ----------------------------------------------------------------


async def _fifty_events(store: PgStore) -> None:
    """10 single inserts, a COPY batch of 20, then 20 from 4 concurrent writers."""
    for i in range(10):
        await store.audit.append_chunk([
            AuditEvent(
                "token.issued", tenant="acme", subject=f"s{i}", jti=f"j{i}", details={"i": i}
            )
        ])
    batch = [AuditEvent("token.verified", tenant="beta", subject=f"b{i}") for i in range(20)]
    assert await store.audit.append_chunk(batch) == 30  # the seq of the last row

    async def writer(w: int) -> None:
        for _ in range(5):
            await store.audit.append_chunk([
                AuditEvent("key.rotated", actor=f"w{w}", reason='multi\nline "quoted" ✓')
            ])

    await asyncio.gather(*(writer(w) for w in range(4)))


async def test_audit_chain_appends_and_verifies(own_pool: asyncpg.Pool) -> None:
    store = PgStore(own_pool)
    await _fifty_events(store)
    report = await store.audit.verify_chain(page_size=7)
    assert report.ok and report.problem is None and report.first_bad_seq is None
    assert (report.rows_checked, report.head_seq) == (50, 50)

    records = await store.audit.list(limit=100)
    assert [r.seq for r in records] == list(range(1, 51))
    assert records[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(records))
    assert report.head_hash == records[-1].hash
    # The COPY batch went through the trigger, in the order given.
    copied = await store.audit.list(event_type="token.verified")
    assert [r.event.subject for r in copied] == [f"b{i}" for i in range(20)]
    assert [r.seq for r in copied] == list(range(11, 31))
    assert await store.audit.events_at([12, 999, 11]) == {
        11: copied[0].event, 12: copied[1].event
    }

    assert records[3].event.details == {"i": 3}
    assert [r.seq for r in await store.audit.list(tenant="acme", after_seq=5, limit=3)] == [
        6, 7, 8
    ]
    assert [r.event.subject for r in await store.audit.list(subject="s4")] == ["s4"]
    assert len(await store.audit.list(since=records[10].ts, until=records[20].ts)) >= 10
    with pytest.raises(InvalidRequest):
        await store.audit.list(limit=0)
    with pytest.raises(InvalidRequest):
        await store.audit.append_chunk([])


async def test_audit_trail_is_append_only(own_pool: asyncpg.Pool) -> None:
    store = PgStore(own_pool)
    await store.audit.append_chunk([AuditEvent("token.issued", subject="x")])
    for sql in (
        "UPDATE audit_events SET subject = 'y' WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 1",
        "TRUNCATE audit_events",
        "UPDATE audit_head SET seq = 0",
        "DELETE FROM audit_head",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await own_pool.execute(sql)
    assert (await store.audit.verify_chain()).ok


async def test_audit_chain_exposes_tampering(own_pool: asyncpg.Pool) -> None:
    store = PgStore(own_pool)
    await _fifty_events(store)
    # A superuser can switch the protection off; the chain still tells.
    await own_pool.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")

    original = await own_pool.fetchrow("SELECT subject, hash FROM audit_events WHERE seq = 17")
    await own_pool.execute("UPDATE audit_events SET subject = 'mallory' WHERE seq = 17")
    report = await store.audit.verify_chain()
    assert (report.ok, report.first_bad_seq, report.problem) == (False, 17, ChainProblem.ALTERED)
    assert report.rows_checked == 16

    # Recomputing the altered row's hash moves the break to the next link.
    await own_pool.execute(
        """
        UPDATE audit_events
           SET hash = sha256(prev_hash || convert_to(audit_canonical(seq, ts, tenant_id, actor,
                   event_type, subject, jti, kid, outcome, reason, request_id, details), 'UTF8'))
         WHERE seq = 17
        """
    )
    report = await store.audit.verify_chain()
    assert (report.first_bad_seq, report.problem) == (18, ChainProblem.BROKEN_LINK)

    await own_pool.execute(
        "UPDATE audit_events SET subject = $1, hash = $2 WHERE seq = 17",
        original["subject"],
        original["hash"],
    )
    assert (await store.audit.verify_chain()).ok

    await own_pool.execute("DELETE FROM audit_events WHERE seq = 30")
    report = await store.audit.verify_chain(page_size=10)
    assert (report.first_bad_seq, report.problem) == (30, ChainProblem.GAP)

    await own_pool.execute("DELETE FROM audit_events WHERE seq >= 30")
    report = await store.audit.verify_chain()
    assert (report.first_bad_seq, report.problem) == (30, ChainProblem.GAP)


# --- availability ---------------------------------------------------------------


async def test_unreachable_database_is_store_unavailable() -> None:
    port = _free_port()
    dsn = f"postgresql://fedtoken:s3cret-pw@127.0.0.1:{port}/fedtoken"
    with pytest.raises(StoreUnavailable) as at_start:
        await create_pool(dsn, connect_timeout=2)
    assert at_start.value.reason is ErrorReason.STORE_UNAVAILABLE
    assert f"127.0.0.1:{port}" in at_start.value.message
    assert "s3cret" not in str(at_start.value)

    pool = await create_pool(dsn, min_size=0, connect_timeout=2)
    try:
        store = PgStore(pool)
        with pytest.raises(StoreUnavailable) as later:
            await store.tenants.get("acme")
        assert later.value.reason is ErrorReason.STORE_UNAVAILABLE
        with pytest.raises(StoreUnavailable):
            await apply_migrations(pool)
    finally:
        await pool.close()


# --- embedded server --------------------------------------------------------------


async def test_embedded_postgres_restart_keeps_data(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg" / "data")
    try:
        dsn = await asyncio.to_thread(pg.start)
        assert pg.is_running()
        assert await asyncio.to_thread(pg.start) == dsn == pg.dsn
        assert dsn.startswith("postgresql://postgres@127.0.0.1:")
        conn = await asyncpg.connect(dsn)
        try:
            settings = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in ("fsync", "max_connections", "shared_buffers", "listen_addresses")
            }
            assert settings == {
                "fsync": "on",
                "max_connections": "200",
                "shared_buffers": "128MB",
                "listen_addresses": "127.0.0.1",
            }
            await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('hello')")
        finally:
            await conn.close()
        db_dsn = await asyncio.to_thread(pg.create_database, "extra_db")
        assert db_dsn == pg.dsn_for("extra_db")

        pool = await create_pool(dsn, min_size=0, connect_timeout=2)
        try:
            await asyncio.to_thread(pg.stop)
            assert not pg.is_running()
            with pytest.raises(StoreUnavailable):
                await PgStore(pool).tenants.list()
        finally:
            await pool.close()

        assert await asyncio.to_thread(pg.start) == dsn
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT v FROM kept") == "hello"
        finally:
            await conn.close()

        # If the persisted port has been taken meanwhile, another one is chosen.
        await asyncio.to_thread(pg.stop)
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", pg.port))
            squatter.listen()
            moved = await asyncio.to_thread(pg.start)
        assert moved != dsn
        assert await asyncio.to_thread(pg.start) == moved
    finally:
        await asyncio.to_thread(pg.stop)
