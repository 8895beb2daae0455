"""Versioned SQL migrations.

Files ``migrations/NNNN_name.sql`` are applied in version order, each in its
own transaction together with its ``schema_migrations`` row, so a failed
migration leaves nothing behind. A session advisory lock makes replicas that
start together take turns: the first applies, the others then find nothing
left to do.

Roles (0003, docs/security.md "Database roles"): migrations run as the owner
of the schema (``fedtoken_owner``, or a superuser); the service runs as
``fedtoken_app``, which owns nothing. With nothing left to apply,
``apply_migrations`` issues no DDL at all, so the service's own role may
call it. A migration that creates an object must also hand it to
``fedtoken_owner`` and grant ``fedtoken_app`` what the service needs, as 0003
does for the objects of 0001 and 0002.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg

from fedtoken.core.errors import FedtokenError
from fedtoken.store.pool import db_errors

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
# The roles of migrations/0003_roles.sql: the owner of every fedtoken object
# (NOLOGIN in the embedded server), and the service's role, which owns nothing.
OWNER_ROLE: Final = "fedtoken_owner"
APP_ROLE: Final = "fedtoken_app"
_INSUFFICIENT_PRIVILEGE: Final = "42501"
# Advisory lock key: the ASCII bytes of "fedtoken" as a bigint, shared by
# every fedtoken replica and by nothing else in the database.
MIGRATION_LOCK_KEY: Final = int.from_bytes(b"fedtoken", "big")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations shipped with this build, by version; duplicate versions are a bug."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name {path.name!r} is not NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations with version {version}")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def apply_migrations(db: asyncpg.Pool | asyncpg.Connection | str) -> list[int]:
    """Apply the missing migrations; return the versions applied by this call.

    ``db`` is a pool, a connection, or a DSN (connected for this call only;
    give the owner's or a superuser's, see the module doc). Raises
    StoreUnavailable when Postgres cannot be reached, and FedtokenError
    naming the migration when the role may not apply it.
    """
    migrations = load_migrations()
    with db_errors("apply migrations"):
        if isinstance(db, str):
            conn = await asyncpg.connect(db)
            try:
                return await _apply(conn, migrations)
            finally:
                await conn.close()
        if isinstance(db, asyncpg.Pool):
            async with db.acquire() as conn:
                return await _apply(conn, migrations)
        return await _apply(db, migrations)


async def _apply(conn: Any, migrations: list[Migration]) -> list[int]:
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        user: str = await conn.fetchval("SELECT current_user")
        # Not CREATE TABLE IF NOT EXISTS: that needs CREATE on the schema even
        # when the table exists, which the service's role does not have.
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
            await _as_migration(conn, user, "create schema_migrations", """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied: list[int] = []
        for migration in migrations:
            if migration.version in done:
                continue
            what = f"migration {migration.version:04d}_{migration.name}"
            async with conn.transaction():
                await _as_migration(conn, user, what, migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration.version)
        return applied
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _as_migration(conn: Any, user: str, what: str, sql: str) -> None:
    try:
        await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        if exc.sqlstate != _INSUFFICIENT_PRIVILEGE:
            raise
        raise FedtokenError(
            f"{what}: role {user!r} may not apply it; run migrations as the schema's "
            f"owner ({OWNER_ROLE}) or a superuser (docs/security.md, Database roles)"
        ) from exc


_ROLE_SQL: Final = """
    SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication,
           r.rolbypassrls,
           EXISTS (SELECT FROM pg_class c
                    WHERE c.oid IN (to_regclass('audit_events'), to_regclass('audit_head'),
                                    to_regclass('revocations'), to_regclass('keys'),
                                    to_regclass('tenants'))
                      AND pg_has_role(r.oid, c.relowner, 'MEMBER')) AS owns_tables
      FROM pg_roles r WHERE r.rolname = current_user
    """


async def service_role_problems(db: asyncpg.Connection | str) -> list[str]:
    """What makes the role of ``db`` (a connection or a DSN) more than a service
    role should be: a superuser or other powerful attributes, owning (or able
    to act as the owner of) the fedtoken tables, whose triggers an owner can
    disable. [] when none."""
    with db_errors("check the service's role"):
        if isinstance(db, str):
            conn = await asyncpg.connect(db)
            try:
                row = await conn.fetchrow(_ROLE_SQL)
            finally:
                await conn.close()
        else:
            row = await db.fetchrow(_ROLE_SQL)
    if row is None:
        return []
    flags = {
        "rolsuper": "is a superuser",
        "rolcreaterole": "may create roles",
        "rolcreatedb": "may create databases",
        "rolreplication": "may replicate",
        "rolbypassrls": "bypasses row security",
        "owns_tables": "owns, or may act as the owner of, the fedtoken tables (and so may "
                       "disable their audit triggers)",
    }
    return [f"role {row['rolname']!r} {text}" for key, text in flags.items() if row[key]]
