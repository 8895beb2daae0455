"""Versioned SQL migrations.

Files ``migrations/NNNN_name.sql`` are applied in version order, each in its
own transaction together with its ``schema_migrations`` row, so a failed
migration leaves nothing behind. A session advisory lock makes replicas that
start together take turns: the first applies, the others then find nothing
left to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg

from fedtoken.store.pool import db_errors

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
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


async def apply_migrations(db: asyncpg.Pool | asyncpg.Connection) -> list[int]:
    """Apply the missing migrations; return the versions applied by this call.

    Raises StoreUnavailable when Postgres cannot be reached.
    """
    migrations = load_migrations()
    with db_errors("apply migrations"):
        if isinstance(db, asyncpg.Pool):
            async with db.acquire() as conn:
                return await _apply(conn, migrations)
        return await _apply(db, migrations)


async def _apply(conn: Any, migrations: list[Migration]) -> list[int]:
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied: list[int] = []
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
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
