"""Database roles (fault 8): the embedded server takes passwords only, and the
service's role can neither switch the audit protections off nor rewrite the
trail, while everything the service does still works.

One embedded server of this module's own, started the way ``fedtoken serve``
starts it (``prepare_database``), plus short-lived clusters made the way
earlier versions made them (``initdb --auth=trust``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio

from fedtoken.app import migrate_database, migration_dsn, prepare_database, start_app
from fedtoken.config import Settings
from fedtoken.core.errors import FedtokenError
from fedtoken.core.model import KeyRecord, KeyState, Tenant
from fedtoken.hsm import HsmConfig
from fedtoken.store import EVENTS_CHANNEL, AuditEvent, PgStore, apply_migrations, create_pool
from fedtoken.store.embedded import EmbeddedPostgres, _scram_verifier
from fedtoken.store.migrate import APP_ROLE, OWNER_ROLE, load_migrations, service_role_problems
from tests._pg_fixture import app_dsn, create_database, drop_database
from tests.support import make_settings

pytestmark = pytest.mark.integration

SUPERUSER = "postgres"
NO_PASSFILE = "/nonexistent/no-passfile"
# What 0001-0003 create, and who must own it.
TABLES = ("tenants", "keys", "revocations", "audit_events", "audit_head", "schema_migrations")
ALL = [m.version for m in load_migrations()]


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A private temporary directory (pytest's basetemp rotation is shared with
    concurrent sessions on the same machine, which may remove it mid-test)."""
    with tempfile.TemporaryDirectory(prefix="fedtoken-roles-") as name:
        yield Path(name)


@dataclass
class Embedded:
    settings: Settings
    app_dsn: str
    pg: EmbeddedPostgres


@pytest.fixture(scope="module")
def embedded() -> Iterator[Embedded]:
    # A private directory: pytest's basetemp rotation is shared with other
    # sessions on this machine and may remove it while the server runs.
    with tempfile.TemporaryDirectory(prefix="fedtoken-roles-") as name:
        settings = make_settings(Path(name))
        dsn, pg = prepare_database(settings)
        assert pg is not None
        try:
            yield Embedded(settings, dsn, pg)
        finally:
            pg.stop()


@dataclass
class Db:
    admin: str  # the superuser
    app: str  # fedtoken_app


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(embedded: Embedded) -> AsyncIterator[Db]:
    """A database migrated by the superuser, used by the service's role."""
    name = f"roles_{uuid.uuid4().hex[:12]}"
    admin = await asyncio.to_thread(create_database, embedded.pg.dsn, name)
    assert await apply_migrations(admin) == ALL
    assert app_dsn(admin) == embedded.pg.dsn_for(name, APP_ROLE)
    yield Db(admin, app_dsn(admin))
    await asyncio.to_thread(drop_database, embedded.pg.dsn, name)


async def _refused(port: int, user: str, database: str = "postgres", **kwargs: str) -> None:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user, database=database,
                                     passfile=NO_PASSFILE, **kwargs)
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InterfaceError):
        return
    await conn.close()
    pytest.fail(f"{user} connected to {database} with {kwargs or 'no password'}")


def _old_style_cluster(data_dir: Path, *, running: bool) -> EmbeddedPostgres:
    """A data dir as earlier versions made it: initdb --auth=trust, no passwords."""
    pg = EmbeddedPostgres(data_dir)
    pg._make_data_dir()
    pg._run("initdb", ["-D", str(data_dir), "--auth=trust", "-U", SUPERUSER,
                       "--encoding=UTF8", "--no-locale", "--no-instructions"], check=True)
    if running:  # an earlier version's server outlives the process that started it
        pg._pg_ctl_start(pg._choose_port())
    return pg


async def _passwordless(pg: EmbeddedPostgres, database: str = "postgres",
                        user: str = SUPERUSER) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=pg.port, user=user, database=database,
                                 passfile=NO_PASSFILE)


def _hba_rules(pg: EmbeddedPostgres) -> list[list[str]]:
    text = (pg.data_dir / "pg_hba.conf").read_text()
    return [line.split() for line in text.splitlines() if line.split() and line[0] != "#"]


# --- the embedded server: passwords only ---------------------------------------


async def test_passwordless_connection_is_refused(embedded: Embedded) -> None:
    port = embedded.pg.port
    for user in (SUPERUSER, APP_ROLE, OWNER_ROLE):
        await _refused(port, user)
        await _refused(port, user, password="wrong")
    # The owner role logs in with nothing: it is NOLOGIN.
    await _refused(port, OWNER_ROLE, password=secrets.token_urlsafe(8))
    assert _hba_rules(embedded.pg) == [
        ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"],
        ["host", "all", "all", "::1/128", "scram-sha-256"],
    ]
    for dsn in (embedded.app_dsn, embedded.pg.dsn):
        conn = await asyncpg.connect(dsn)
        await conn.close()


def test_password_file_is_private_and_dsns_carry_no_password(embedded: Embedded) -> None:
    pg = embedded.pg
    info = pg.password_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert pg.password_file.parent == pg.data_dir.parent  # under the state dir
    passwords = [line.rsplit(":", 1)[1] for line in pg.password_file.read_text().splitlines()
                 if line and not line.startswith("#")]
    assert len(passwords) == 2 and all(len(p) >= 40 for p in passwords)
    for dsn in (pg.dsn, pg.app_dsn, pg.dsn_for("x", APP_ROLE), embedded.app_dsn):
        assert urlsplit(dsn).password is None
        assert not any(p in dsn for p in passwords)
    assert urlsplit(embedded.app_dsn).username == APP_ROLE
    # initdb's copy of the superuser's password is gone.
    assert not list(pg.data_dir.parent.glob(".initdb-*"))


def test_migrations_run_as_the_superuser_the_service_as_its_role(embedded: Embedded) -> None:
    settings, pg = embedded.settings, embedded.pg
    assert migration_dsn(settings, embedded.app_dsn) == pg.dsn
    assert migration_dsn(settings, pg.dsn_for("other", APP_ROLE)) == pg.dsn_for("other")
    # Any other DSN migrates with itself (one DSN for both, as before).
    assert migration_dsn(settings, pg.dsn) == pg.dsn
    elsewhere = "postgresql://fedtoken_app@127.0.0.1:1/postgres"
    assert migration_dsn(settings, elsewhere) == elsewhere


# --- the service's role -----------------------------------------------------------


async def test_roles_have_no_powers_and_the_service_owns_nothing(db: Db) -> None:
    conn = await asyncpg.connect(db.admin)
    try:
        roles = {r["rolname"]: r for r in await conn.fetch(
            "SELECT * FROM pg_roles WHERE rolname = ANY($1)", [APP_ROLE, OWNER_ROLE])}
        for name, login in ((APP_ROLE, True), (OWNER_ROLE, False)):
            role = roles[name]
            assert role["rolcanlogin"] is login, name
            for power in ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication",
                          "rolbypassrls"):
                assert role[power] is False, (name, power)
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_auth_members WHERE member = $1::regrole", APP_ROLE) == 0
        for catalog, owner in (("pg_class", "relowner"), ("pg_proc", "proowner"),
                               ("pg_namespace", "nspowner"), ("pg_type", "typowner")):
            owned = await conn.fetchval(
                f"SELECT count(*) FROM {catalog} WHERE {owner} = $1::regrole", APP_ROLE)
            assert owned == 0, catalog
        owners = await conn.fetch(
            "SELECT relname, pg_get_userbyid(relowner) AS owner FROM pg_class"
            " WHERE oid = ANY(SELECT to_regclass(t) FROM unnest($1::text[]) t)", list(TABLES))
        assert {r["relname"]: r["owner"] for r in owners} == dict.fromkeys(TABLES, OWNER_ROLE)
        functions = await conn.fetch(
            "SELECT proname, pg_get_userbyid(proowner) AS owner, prosecdef, proconfig"
            " FROM pg_proc WHERE pronamespace = 'public'::regnamespace")
        assert {f["owner"] for f in functions} == {OWNER_ROLE}
        chain = next(f for f in functions if f["proname"] == "audit_events_chain")
        assert chain["prosecdef"] and chain["proconfig"] == ["search_path=public, pg_temp"]
        assert await service_role_problems(conn)  # the superuser is none
    finally:
        await conn.close()
    assert await service_role_problems(db.app) == []


# Each one is a way to rewrite or unprotect the trail (or to gain the power to).
FORBIDDEN = (
    "SET session_replication_role = replica",
    "SELECT set_config('session_replication_role', 'replica', false)",
    "ALTER SYSTEM SET session_replication_role = replica",
    "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
    "ALTER TABLE audit_events DISABLE TRIGGER audit_events_chain",
    "ALTER TABLE audit_events DISABLE TRIGGER ALL",
    "ALTER TABLE audit_events DISABLE TRIGGER USER",
    "ALTER TABLE audit_head DISABLE TRIGGER audit_head_guard",
    "ALTER TABLE revocations DISABLE TRIGGER revocations_notify",
    "DROP TRIGGER audit_events_append_only ON audit_events",
    "CREATE TRIGGER t BEFORE INSERT ON audit_events FOR EACH ROW"
    " EXECUTE FUNCTION audit_append_only()",
    "ALTER TABLE audit_events OWNER TO fedtoken_app",
    "DROP TABLE audit_events",
    "UPDATE audit_events SET subject = 'mallory'",
    "DELETE FROM audit_events",
    "TRUNCATE audit_events",
    "INSERT INTO audit_events (seq, event_type, prev_hash, hash)"
    " VALUES (99, 'x', '\\x00', '\\x00')",
    "UPDATE audit_head SET seq = 0",
    "DELETE FROM audit_head",
    "TRUNCATE audit_head",
    "INSERT INTO audit_head VALUES (2, 0, '\\x00')",
    "SELECT audit_events_chain()",
    "CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql"
    " AS $$ BEGIN RETURN NEW; END $$",
    "ALTER FUNCTION audit_events_chain() SECURITY INVOKER",
    "CREATE FUNCTION public.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE TABLE public.evil (x int)",
    "CREATE SCHEMA evil",
    "DELETE FROM keys",
    "DELETE FROM tenants",
    "TRUNCATE revocations",
    "UPDATE schema_migrations SET version = 0",
    "SET ROLE fedtoken_owner",
    "SET ROLE postgres",
    "GRANT fedtoken_owner TO fedtoken_app",
    "ALTER ROLE fedtoken_app SUPERUSER",
    "COPY audit_events (subject) FROM PROGRAM 'true'",
)


async def test_service_role_cannot_switch_the_audit_protection_off(db: Db) -> None:
    pool = await create_pool(db.app, min_size=1, max_size=2)
    try:
        store = PgStore(pool)
        await store.audit.append_chunk([AuditEvent("token.issued", subject="x")])
        allowed = []
        for sql in FORBIDDEN:
            try:
                await pool.execute(sql)
            except asyncpg.InsufficientPrivilegeError:
                continue
            allowed.append(sql)
        assert allowed == []
        assert await pool.fetchval("SHOW session_replication_role") == "origin"
        assert (await store.audit.verify_chain()).ok
    finally:
        await pool.close()
    conn = await asyncpg.connect(db.admin)
    try:
        enabled = await conn.fetch(
            "SELECT tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal")
        assert enabled and {r["tgenabled"] for r in enabled} == {b"O"}  # all enabled
    finally:
        await conn.close()


async def test_service_role_does_the_services_work(db: Db) -> None:
    pool = await create_pool(db.app, min_size=1, max_size=4)
    listener = await asyncpg.connect(db.app)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(EVENTS_CHANNEL, lambda *args: heard.put_nowait(args[-1]))
    try:
        assert await apply_migrations(pool) == []  # nothing left: no DDL
        store = PgStore(pool)
        now = datetime.now(UTC)
        tid = f"t-{uuid.uuid4().hex[:8]}"
        await store.tenants.create(Tenant(id=tid, issuer=f"https://{tid}.example"), now=now)
        assert (await store.tenants.get(tid)) is not None
        kid = uuid.uuid4().hex
        await store.keys.insert(KeyRecord(
            kid=kid, tenant=tid, alg="RS256", key_size=2048, state=KeyState.PENDING,
            public_jwk={"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": kid},
            hsm_label=f"fedtoken/{tid}/{kid}", created_at=int(now.timestamp())))
        await store.keys.activate(tid, kid, now=now)
        async with store.transaction() as tx:
            await tx.keys.set_state(kid, KeyState.RETIRING, expected=[KeyState.ACTIVE], now=now)
            await tx.audit.append_chunk([AuditEvent("key.retiring", tenant=tid, kid=kid)])
        soon = now + timedelta(seconds=1)
        for kind, value, not_before in (("jti", "j1", None), ("subject", "s1", now),
                                        ("key", kid, None)):
            await store.revocations.revoke(
                tid, kind, value, expires_at=soon, now=now, not_before=not_before,
                audit=AuditEvent("token.revoked", tenant=tid, subject=value))
        assert await store.revocations.is_revoked(tid, "j1", "s", 0, "k", now=now)
        assert sum(len(c) for c in [c async for c in store.revocations.iter_active(now)]) == 3
        assert await store.revocations.purge_expired(soon) == 3
        # Several at once go in by COPY.
        last = await store.audit.append_chunk(
            [AuditEvent("token.verified", tenant=tid, subject=f"v{i}") for i in range(5)])
        assert set(await store.audit.events_at([last])) == {last}
        assert len(await store.audit.list(tenant=tid)) == 9
        assert (await store.audit.verify_chain()).ok
        async with store.advisory_lock(12345):
            pass
        await pool.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, '{"type": "hb"}')
        payloads = []
        while '{"type": "hb"}' not in payloads:
            payloads.append(await asyncio.wait_for(heard.get(), 5))
        # The triggers' notifications, all delivered before the later one.
        assert {'"type" : "tenant"', '"type" : "keys"', '"type" : "revocation"'} <= {
            p.split(",")[0].lstrip("{ ") for p in payloads}
    finally:
        await listener.close()
        await pool.close()


async def test_the_service_role_cannot_apply_migrations(embedded: Embedded) -> None:
    name = f"roles_{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(create_database, embedded.pg.dsn, name)
    try:
        with pytest.raises(FedtokenError) as refused:
            await apply_migrations(embedded.pg.dsn_for(name, APP_ROLE))
        assert APP_ROLE in refused.value.message
        assert "owner" in refused.value.message
    finally:
        await asyncio.to_thread(drop_database, embedded.pg.dsn, name)


async def test_owner_role_migrates_an_external_database(embedded: Embedded) -> None:
    """The documented external setup: roles made by a DBA, migrations as the
    owner role (who may not create roles), the service as fedtoken_app."""
    pg = embedded.pg
    name = f"ext_{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(24)
    admin = await asyncpg.connect(pg.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" OWNER {OWNER_ROLE}')
        await admin.execute(
            f"ALTER ROLE {OWNER_ROLE} LOGIN PASSWORD '{_scram_verifier(password)}'")
        owner_dsn = f"postgresql://{OWNER_ROLE}:{password}@127.0.0.1:{pg.port}/{name}"
        assert await apply_migrations(owner_dsn) == ALL
        assert await service_role_problems(owner_dsn)
        app = pg.dsn_for(name, APP_ROLE)
        assert await service_role_problems(app) == []
        conn = await asyncpg.connect(app)
        try:
            await conn.execute("INSERT INTO audit_events (event_type) VALUES ('x')")
            for sql in ("ALTER TABLE audit_events DISABLE TRIGGER ALL",
                        "SET session_replication_role = replica", "DELETE FROM audit_events"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
        finally:
            await conn.close()
    finally:
        await admin.execute(f"ALTER ROLE {OWNER_ROLE} NOLOGIN PASSWORD NULL")
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_migrations_without_the_roles_grant_nothing(tmp_path: Path) -> None:
    """An external database whose DBA made no fedtoken roles, migrated by a
    plain role that may not create any: 0003 creates none and still applies."""
    pg = await asyncio.to_thread(_old_style_cluster, tmp_path / "pg", running=True)
    try:
        conn = await _passwordless(pg)
        try:
            await conn.execute("CREATE ROLE plain LOGIN")
            await conn.execute("CREATE DATABASE plain OWNER plain")
        finally:
            await conn.close()
        conn = await _passwordless(pg, "plain", "plain")
        try:
            assert await apply_migrations(conn) == ALL
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'fedtoken%'") == 0
            assert await conn.fetchval(
                "SELECT pg_get_userbyid(relowner) FROM pg_class"
                " WHERE oid = 'audit_events'::regclass") == "plain"
            assert await conn.fetchval(
                "SELECT prosecdef FROM pg_proc WHERE proname = 'audit_events_chain'")
            await conn.execute("INSERT INTO audit_events (event_type) VALUES ('x')")
            assert any("owns" in p for p in await service_role_problems(conn))
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)


# --- earlier versions' data dirs --------------------------------------------------


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "left-running"])
async def test_trust_data_dir_is_migrated_to_passwords(tmp_path: Path, running: bool) -> None:
    pg = await asyncio.to_thread(_old_style_cluster, tmp_path / "pg", running=running)
    try:
        if not running:
            await asyncio.to_thread(pg._pg_ctl_start, pg._choose_port())
        conn = await _passwordless(pg)  # the hole
        try:
            await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('hello')")
        finally:
            await conn.close()
        if not running:
            await asyncio.to_thread(pg.stop)

        upgraded = EmbeddedPostgres(tmp_path / "pg")
        dsn = await asyncio.to_thread(upgraded.start)
        for user in (SUPERUSER, APP_ROLE):
            await _refused(upgraded.port, user)
        assert _hba_rules(upgraded) == [
            ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"],
            ["host", "all", "all", "::1/128", "scram-sha-256"],
        ]
        assert stat.S_IMODE(upgraded.password_file.stat().st_mode) == 0o600
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT v FROM kept") == "hello"
        finally:
            await conn.close()
        conn = await asyncpg.connect(upgraded.app_dsn)
        await conn.close()

        # A restart keeps it so, and the same passwords work.
        await asyncio.to_thread(upgraded.stop)
        assert await asyncio.to_thread(upgraded.start) == dsn
        await _refused(upgraded.port, SUPERUSER)
        conn = await asyncpg.connect(dsn)
        await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)


def test_lost_password_file_is_a_clear_error(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    try:
        pg.stop()
        pg.password_file.unlink()
        with pytest.raises(Exception, match="password is not in"):
            EmbeddedPostgres(tmp_path / "pg").start()
    finally:
        pg.stop()


# --- the whole service as fedtoken_app ----------------------------------------------


async def test_service_runs_as_its_role(embedded: Embedded, hsm_config: HsmConfig) -> None:
    """start_app on the embedded server's app DSN: bootstrap (advisory lock,
    tenant, HSM key, audit), the event feed (LISTEN, heartbeats, snapshot)."""
    settings, dsn = embedded.settings, embedded.app_dsn
    await migrate_database(settings, dsn)  # as the superuser, before the pool
    assert await migrate_database(settings, dsn) == []
    app = await start_app(settings, dsn=dsn, hsm_config=hsm_config, http=False)
    try:
        assert app.dsn == dsn
        keys = await app.store.keys.list(settings.default_tenant)
        assert [k.state for k in keys] == [KeyState.ACTIVE]
        assert (await app.store.audit.verify_chain()).ok
        assert await app.store.audit.list(tenant=settings.default_tenant)
        for _ in range(100):
            if app.revocations.is_fresh:
                break
            await asyncio.sleep(0.1)
        assert app.revocations.is_fresh
    finally:
        await app.stop(0)
