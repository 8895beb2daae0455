"""The Postgres store against a real server: schema, repositories, audit chain."""

from __future__ import annotations

import asyncio
import itertools
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from fedtoken.core.model import KeyRecord, KeyState, Tenant, TenantPolicy
from fedtoken.core.errors import (
    AlreadyExists,
    ErrorReason,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
)
from fedtoken.store import (
    AuditEvent,
    ChainProblem,
    Store,
    apply_migrations,
    create_pool,
)
from fedtoken.core.audit import GENESIS_HASH
from fedtoken.store.embedded import EmbeddedPostgres
from tests._pg_fixture import create_database, drop_database

pytestmark = pytest.mark.integration


# --- fixtures -------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(fresh_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(fresh_dsn, min_size=1, max_size=10)
    assert await apply_migrations(pool) == [1]
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> Store:
    return Store(pool)


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


async def _tenant(store: Store) -> Tenant:
    tid = _slug()
    return await store.create_tenant(Tenant(id=tid, issuer=f"https://{tid}.example"))


def _key(tenant: str, state: KeyState = KeyState.PENDING, created_at: int = 0) -> KeyRecord:
    kid = uuid.uuid4().hex
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
        assert await apply_migrations(conn) == [1]
        assert await apply_migrations(conn) == []
        rows = await conn.fetch("SELECT version, name FROM schema_migrations")
        assert [(r["version"], r["name"]) for r in rows] == [(1, "init")]
        head = await conn.fetchrow("SELECT seq, hash FROM audit_head")
        assert (head["seq"], bytes(head["hash"])) == (0, GENESIS_HASH)
    finally:
        await conn.close()


async def test_migrations_race_between_replicas(own_db: str) -> None:
    conns = [await asyncpg.connect(own_db) for _ in range(3)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
        assert sorted(results) == [[], [], [1]]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == 1
    finally:
        for c in conns:
            await c.close()


# --- tenants --------------------------------------------------------------------


async def test_tenant_crud(store: Store) -> None:
    tid = _slug()
    policy = TenantPolicy(
        max_token_lifetime_seconds=7200,
        default_token_lifetime_seconds=600,
        allowed_algorithms=("RS256", "PS256"),
        key_size=3072,
    )
    created = await store.create_tenant(Tenant(id=tid, issuer=f"https://{tid}.x", policy=policy))
    assert created.policy == policy
    assert abs(created.created_at - datetime.now(UTC).timestamp()) < 60
    assert await store.get_tenant(tid) == created
    assert await store.get_tenant_by_issuer(f"https://{tid}.x") == created
    assert await store.get_tenant("nope") is None
    assert await store.get_tenant_by_issuer("https://nope") is None
    listed = await store.list_tenants()
    assert created in listed
    assert [t.id for t in listed] == sorted(t.id for t in listed)


async def test_tenant_exists(store: Store) -> None:
    t = await _tenant(store)
    with pytest.raises(AlreadyExists) as same_id:
        await store.create_tenant(Tenant(id=t.id, issuer="https://other.example"))
    assert same_id.value.reason is ErrorReason.TENANT_EXISTS
    assert same_id.value.field == "id"
    with pytest.raises(AlreadyExists) as same_issuer:
        await store.create_tenant(Tenant(id=_slug(), issuer=t.issuer))
    assert same_issuer.value.reason is ErrorReason.TENANT_EXISTS
    assert same_issuer.value.field == "issuer"


async def test_tenant_id_must_be_a_slug(store: Store) -> None:
    with pytest.raises(InvalidRequest):
        await store.create_tenant(Tenant(id="Not_A_Slug", issuer="https://slug.example"))


# --- keys -----------------------------------------------------------------------


async def test_keys_insert_list_get(store: Store) -> None:
    t = await _tenant(store)
    other = await _tenant(store)
    now = int(datetime.now(UTC).timestamp())
    old = await store.insert_key(_key(t.id, created_at=now - 100))
    new = await store.insert_key(_key(t.id))
    foreign = await store.insert_key(_key(other.id))
    assert old.created_at == now - 100 and old.state is KeyState.PENDING
    assert new.public_jwk["kid"] == new.kid
    assert await store.list_keys(t.id) == [new, old]
    everything = await store.list_keys()
    assert all(k in everything for k in (old, new, foreign))
    assert everything == sorted(everything, key=lambda k: k.created_at, reverse=True)
    assert await store.get_key(new.kid) == new
    assert await store.get_key("missing") is None
    with pytest.raises(AlreadyExists):
        await store.insert_key(new)
    with pytest.raises(NotFound) as no_tenant:
        await store.insert_key(_key("no-such-tenant"))
    assert no_tenant.value.reason is ErrorReason.TENANT_NOT_FOUND


async def test_at_most_one_active_key_per_tenant(store: Store, pool: asyncpg.Pool) -> None:
    t = await _tenant(store)
    active = await store.insert_key(_key(t.id, KeyState.ACTIVE))
    with pytest.raises(FailedPrecondition) as second:
        await store.insert_key(_key(t.id, KeyState.ACTIVE))
    assert second.value.reason is ErrorReason.INVALID_KEY_TRANSITION
    pending = await store.insert_key(_key(t.id))
    with pytest.raises(FailedPrecondition):
        await store.set_key_state(pending.kid, KeyState.ACTIVE, expected=[KeyState.PENDING])
    # The database enforces it whatever the application does.
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute("UPDATE keys SET state = 'ACTIVE' WHERE kid = $1", pending.kid)
    # Another tenant has its own active key.
    other = await _tenant(store)
    await store.insert_key(_key(other.id, KeyState.ACTIVE))
    assert (await store.get_key(active.kid)).state is KeyState.ACTIVE  # type: ignore[union-attr]


async def test_activate_key_rotates(store: Store) -> None:
    t = await _tenant(store)
    first = await store.insert_key(_key(t.id))
    activated = await store.activate_key(t.id, first.kid)
    assert activated.state is KeyState.ACTIVE and activated.activated_at > 0
    second = await store.insert_key(_key(t.id))
    now_active = await store.activate_key(t.id, second.kid)
    assert now_active.state is KeyState.ACTIVE
    retiring = await store.get_key(first.kid)
    assert retiring is not None
    assert retiring.state is KeyState.RETIRING and retiring.retiring_at > 0

    with pytest.raises(FailedPrecondition) as not_pending:
        await store.activate_key(t.id, first.kid)
    assert not_pending.value.reason is ErrorReason.INVALID_KEY_TRANSITION
    with pytest.raises(NotFound) as unknown:
        await store.activate_key(t.id, "no-such-kid")
    assert unknown.value.reason is ErrorReason.KEY_NOT_FOUND
    other = await _tenant(store)
    with pytest.raises(NotFound) as wrong_tenant:
        await store.activate_key(other.id, (await store.insert_key(_key(t.id))).kid)
    assert wrong_tenant.value.reason is ErrorReason.KEY_NOT_FOUND
    with pytest.raises(NotFound) as no_tenant:
        await store.activate_key("no-such-tenant", second.kid)
    assert no_tenant.value.reason is ErrorReason.TENANT_NOT_FOUND


async def test_concurrent_activations_leave_one_active(store: Store) -> None:
    t = await _tenant(store)
    keys = [await store.insert_key(_key(t.id)) for _ in range(4)]
    await asyncio.gather(*(store.activate_key(t.id, k.kid) for k in keys))
    states = sorted(k.state.value for k in await store.list_keys(t.id))
    assert states == ["ACTIVE", "RETIRING", "RETIRING", "RETIRING"]


async def test_key_state_transitions(store: Store, pool: asyncpg.Pool) -> None:
    t = await _tenant(store)
    k = await store.insert_key(_key(t.id))
    with pytest.raises(FailedPrecondition) as bad:
        await store.set_key_state(k.kid, KeyState.RETIRED, expected=[KeyState.RETIRING])
    assert bad.value.reason is ErrorReason.INVALID_KEY_TRANSITION
    assert (await store.get_key(k.kid)).state is KeyState.PENDING  # type: ignore[union-attr]
    with pytest.raises(NotFound) as missing:
        await store.set_key_state("no-such-kid", KeyState.RETIRED, expected=[KeyState.PENDING])
    assert missing.value.reason is ErrorReason.KEY_NOT_FOUND

    k = await store.activate_key(t.id, k.kid)
    k = await store.set_key_state(k.kid, KeyState.RETIRING, expected=[KeyState.ACTIVE])
    k = await store.set_key_state(k.kid, KeyState.RETIRED, expected=[KeyState.RETIRING])
    assert k.state is KeyState.RETIRED and k.retired_at > 0
    k = await store.set_key_state(
        k.kid, KeyState.COMPROMISED, expected=[s for s in KeyState if s is not KeyState.DESTROYED]
    )
    assert k.state is KeyState.COMPROMISED and k.compromised_at > 0
    k = await store.set_key_state(k.kid, KeyState.DESTROYED, expected=[KeyState.COMPROMISED])
    assert k.state is KeyState.DESTROYED
    assert await pool.fetchval("SELECT destroyed_at FROM keys WHERE kid = $1", k.kid) is not None


# --- revocations ----------------------------------------------------------------


async def test_revoke_is_idempotent_and_checked(store: Store) -> None:
    t = await _tenant(store)
    created, at = await store.revoke(t.id, "jti", "j-1", expires_at=_in(), reason="lost")
    assert created and abs((at - datetime.now(UTC)).total_seconds()) < 60
    again, at_again = await store.revoke(t.id, "jti", "j-1", expires_at=_in(0.5))
    assert (again, at_again) == (False, at)
    iat = int(datetime.now(UTC).timestamp())
    assert await store.is_revoked(t.id, "j-1", "alice", iat, "kid-a")
    assert not await store.is_revoked(t.id, "j-2", "alice", iat, "kid-a")
    other = await _tenant(store)
    assert not await store.is_revoked(other.id, "j-1", "alice", iat, "kid-a")

    await store.revoke(t.id, "key", "kid-b", expires_at=_in())
    assert await store.is_revoked(t.id, "j-3", "bob", iat, "kid-b")


async def test_revocations_stream_in_chunks_with_epochs_rounded_up(store: Store) -> None:
    t = await _tenant(store)
    exp = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1, microseconds=1)
    for i in range(5):
        await store.revoke(t.id, "jti", f"s-{i}", expires_at=exp)
    await store.revoke(t.id, "jti", "gone", expires_at=datetime.now(UTC) - timedelta(hours=1))
    chunks = [c async for c in store.iter_revocations(datetime.now(UTC), chunk=2)]
    mine = [r for c in chunks for r in c if r[0] == t.id]
    assert sorted(r[2] for r in mine) == [f"s-{i}" for i in range(5)]  # not the expired one
    assert all(len(c) <= 2 for c in chunks) and len(chunks) >= 3
    assert {r[3] for r in mine} == {int(exp.timestamp()) + 1}  # rounded up
    assert {(r[1], r[4]) for r in mine} == {("jti", 0)}


async def test_subject_revocation_cuts_by_issue_time(store: Store) -> None:
    t = await _tenant(store)
    exp = _in()
    cut = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=100)
    created, _ = await store.revoke(t.id, "subject", "carol", expires_at=exp, not_before=cut)
    assert created
    before, after = int(cut.timestamp()) - 1, int(cut.timestamp()) + 1
    assert await store.is_revoked(t.id, "j", "carol", before, "k")
    assert not await store.is_revoked(t.id, "j", "carol", after, "k")
    # Revoking again later (default cut: now) also catches the tokens issued
    # between the two calls.
    widened, _ = await store.revoke(t.id, "subject", "carol", expires_at=exp)
    assert widened
    assert await store.is_revoked(t.id, "j", "carol", after, "k")
    # An earlier cut or expiry does not narrow it.
    narrower, _ = await store.revoke(
        t.id, "subject", "carol", expires_at=exp - timedelta(hours=1), not_before=cut
    )
    assert not narrower
    assert await store.is_revoked(t.id, "j", "carol", after, "k")
    # A later expiry extends it.
    longer, _ = await store.revoke(t.id, "subject", "carol", expires_at=exp + timedelta(hours=1))
    assert longer


async def test_revoke_rejects_bad_input(store: Store) -> None:
    t = await _tenant(store)
    with pytest.raises(InvalidRequest):
        await store.revoke(t.id, "email", "x", expires_at=_in())
    with pytest.raises(InvalidRequest):
        await store.revoke(t.id, "jti", "x", expires_at=_in(), not_before=_in(0))
    with pytest.raises(InvalidRequest):
        await store.revoke(t.id, "jti", "x", expires_at=datetime.now() + timedelta(days=1))
    with pytest.raises(NotFound) as unknown:
        await store.revoke("no-such-tenant", "jti", "x", expires_at=_in())
    assert unknown.value.reason is ErrorReason.TENANT_NOT_FOUND


async def test_revoke_audits_in_the_same_transaction(own_pool: asyncpg.Pool) -> None:
    store = Store(own_pool)
    t = await _tenant(store)
    event = AuditEvent("token.revoked", tenant=t.id, actor="ops", jti="j-9", outcome="ok")
    await store.revoke(t.id, "jti", "j-9", expires_at=_in(), audit=event)
    [record] = await store.list_audit(tenant=t.id)
    assert record.event == event
    # A failed revocation leaves no audit record behind.
    with pytest.raises(NotFound):
        await store.revoke("no-such-tenant", "jti", "j-9", expires_at=_in(), audit=event)
    assert len(await store.list_audit()) == 1


async def test_purge_removes_only_expired(store: Store) -> None:
    t = await _tenant(store)
    past = datetime.now(UTC) - timedelta(minutes=5)
    await store.revoke(t.id, "jti", "old", expires_at=past)
    await store.revoke(t.id, "jti", "live", expires_at=_in())
    now = datetime.now(UTC)
    assert not await store.is_revoked(t.id, "old", "", 0, "")
    mine = [r for r in await store.list_revocations(now) if r.tenant == t.id]
    assert [r.value for r in mine] == ["live"]
    assert await store.purge_expired(now) >= 1
    assert await store.purge_expired(now) == 0
    assert await store.is_revoked(t.id, "live", "", 0, "")


# --- notifications --------------------------------------------------------------


async def test_listener_receives_changes_and_learns_of_loss(
    store: Store, pool: asyncpg.Pool
) -> None:
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lost = asyncio.Event()
    listener = await store.listen(received.put_nowait, on_lost=lost.set)
    try:
        t = await _tenant(store)
        expires = _in()
        await store.revoke(t.id, "jti", "j-n", expires_at=expires)
        message = await asyncio.wait_for(received.get(), 5)
        assert message == {
            "type": "revocation",
            "tenant": t.id,
            "kind": "jti",
            "value": "j-n",
            "expires_at": int(expires.timestamp()) + (expires.microsecond > 0),
            "not_before": None,
        }
        key = await store.insert_key(_key(t.id))
        message = await asyncio.wait_for(received.get(), 5)
        assert message == {"type": "keys", "tenant": t.id, "kid": key.kid, "state": "PENDING"}
        await store.activate_key(t.id, key.kid)
        message = await asyncio.wait_for(received.get(), 5)
        assert message["state"] == "ACTIVE"
        # Nothing is notified for a rolled back change.
        with pytest.raises(RuntimeError):
            async with store.transaction() as tx:
                await tx.revoke(t.id, "jti", "never", expires_at=_in())
                raise RuntimeError("abort")
        await pool.execute("SELECT pg_notify('fedtoken_events', 'not json')")
        await pool.execute("""SELECT pg_notify('fedtoken_events', '{"type": "ping"}')""")
        assert (await asyncio.wait_for(received.get(), 5)) == {"type": "ping"}

        assert listener.alive
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
        )
        await asyncio.wait_for(lost.wait(), 5)
        assert not listener.alive
    finally:
        await listener.close()


# --- transactions ---------------------------------------------------------------


async def test_transaction_commits_or_rolls_back_together(own_pool: asyncpg.Pool) -> None:
    store = Store(own_pool)
    async with store.transaction() as tx:
        t = await _tenant(tx)
        await tx.append_audit(AuditEvent("tenant.created", tenant=t.id))
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.create_tenant(Tenant(id="rolled-back", issuer="https://rb.example"))
            await tx.append_audit(AuditEvent("tenant.created", tenant="rolled-back"))
            raise RuntimeError("abort")
    assert await store.get_tenant(t.id) is not None
    assert await store.get_tenant("rolled-back") is None
    assert [r.event.tenant for r in await store.list_audit()] == [t.id]
    assert (await store.verify_audit_chain()).ok


# --- audit chain ----------------------------------------------------------------


async def _fifty_events(store: Store) -> None:
    """10 single inserts, a COPY batch of 20, then 20 from 4 concurrent writers."""
    for i in range(10):
        await store.append_audit(
            AuditEvent(
                "token.issued", tenant="acme", subject=f"s{i}", jti=f"j{i}", details={"i": i}
            )
        )
    batch = [AuditEvent("token.verified", tenant="beta", subject=f"b{i}") for i in range(20)]
    assert await store.append_audit_many(batch) == 20

    async def writer(w: int) -> None:
        for _ in range(5):
            await store.append_audit(
                AuditEvent("key.rotated", actor=f"w{w}", reason='multi\nline "quoted" ✓')
            )

    await asyncio.gather(*(writer(w) for w in range(4)))


async def test_audit_chain_appends_and_verifies(own_pool: asyncpg.Pool) -> None:
    store = Store(own_pool)
    await _fifty_events(store)
    report = await store.verify_audit_chain(page_size=7)
    assert report.ok and report.problem is None and report.first_bad_seq is None
    assert (report.rows_checked, report.head_seq) == (50, 50)

    records = await store.list_audit(limit=100)
    assert [r.seq for r in records] == list(range(1, 51))
    assert records[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(records))
    assert report.head_hash == records[-1].hash
    # The COPY batch went through the trigger, in the order given.
    copied = await store.list_audit(event_type="token.verified")
    assert [r.event.subject for r in copied] == [f"b{i}" for i in range(20)]
    assert [r.seq for r in copied] == list(range(11, 31))

    assert records[3].event.details == {"i": 3}
    assert [r.seq for r in await store.list_audit(tenant="acme", after_seq=5, limit=3)] == [6, 7, 8]
    assert [r.event.subject for r in await store.list_audit(subject="s4")] == ["s4"]
    assert len(await store.list_audit(since=records[10].ts, until=records[20].ts)) >= 10
    with pytest.raises(InvalidRequest):
        await store.list_audit(limit=0)


async def test_audit_trail_is_append_only(own_pool: asyncpg.Pool) -> None:
    store = Store(own_pool)
    await store.append_audit(AuditEvent("token.issued", subject="x"))
    for sql in (
        "UPDATE audit_events SET subject = 'y' WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 1",
        "TRUNCATE audit_events",
        "UPDATE audit_head SET seq = 0",
        "DELETE FROM audit_head",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await own_pool.execute(sql)
    assert (await store.verify_audit_chain()).ok


async def test_audit_chain_exposes_tampering(own_pool: asyncpg.Pool) -> None:
    store = Store(own_pool)
    await _fifty_events(store)
    # A superuser can switch the protection off; the chain still tells.
    await own_pool.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")

    original = await own_pool.fetchrow("SELECT subject, hash FROM audit_events WHERE seq = 17")
    await own_pool.execute("UPDATE audit_events SET subject = 'mallory' WHERE seq = 17")
    report = await store.verify_audit_chain()
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
    report = await store.verify_audit_chain()
    assert (report.first_bad_seq, report.problem) == (18, ChainProblem.BROKEN_LINK)

    await own_pool.execute(
        "UPDATE audit_events SET subject = $1, hash = $2 WHERE seq = 17",
        original["subject"],
        original["hash"],
    )
    assert (await store.verify_audit_chain()).ok

    await own_pool.execute("DELETE FROM audit_events WHERE seq = 30")
    report = await store.verify_audit_chain(page_size=10)
    assert (report.first_bad_seq, report.problem) == (30, ChainProblem.GAP)

    await own_pool.execute("DELETE FROM audit_events WHERE seq >= 30")
    report = await store.verify_audit_chain()
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
        store = Store(pool)
        with pytest.raises(StoreUnavailable) as later:
            await store.get_tenant("acme")
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
        assert db_dsn == dsn.rsplit("/", 1)[0] + "/extra_db"

        pool = await create_pool(dsn, min_size=0, connect_timeout=2)
        try:
            await asyncio.to_thread(pg.stop)
            assert not pg.is_running()
            with pytest.raises(StoreUnavailable):
                await Store(pool).list_tenants()
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
