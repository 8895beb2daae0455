"""Peak memory of a full revocation resync: N active jti revocations in a
private embedded Postgres, streamed into a fresh InMemoryRevocationView the
way a replica resyncs (``PgStore.revocations.iter_active`` + ``SnapshotBuilder``).

    python -m bench.resync_memory [N]      (default 1,000,000)

Prints RSS before, after, and the process's peak (VmHWM). The rows are
inserted by a separate connection before the baseline is read, and the
measuring process holds nothing else.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path


def _rss(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


async def _fill(dsn: str, n: int) -> None:
    import asyncpg

    from fedtoken.store import apply_migrations

    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn)
        await conn.execute(
            "INSERT INTO tenants (id, issuer, max_token_lifetime_s, default_token_lifetime_s,"
            " allowed_algorithms, key_size) VALUES ('t', 'https://t.example', 3600, 900,"
            " '{RS256}', 2048)")
        exp = datetime.now(UTC) + timedelta(days=1)
        rows = [("t", "jti", secrets.token_urlsafe(16), exp) for _ in range(n)]
        await conn.copy_records_to_table("revocations", records=rows, timeout=600,
                                         columns=["tenant_id", "kind", "value", "expires_at"])
    finally:
        await conn.close()


async def _measure(dsn: str) -> str:
    from fedtoken.revocation.view import InMemoryRevocationView, RevocationEntry, SnapshotBuilder
    from fedtoken.store import PgStore, create_pool

    pool = await create_pool(dsn)
    try:
        base = _rss("VmRSS")
        started = time.perf_counter()
        view = InMemoryRevocationView(staleness=5)
        builder = SnapshotBuilder()
        async for chunk in PgStore(pool).revocations.iter_active(datetime.now(UTC)):
            for row in chunk:
                builder.add(RevocationEntry(*row))
        view.install(builder)
        took = time.perf_counter() - started
        return (f"{view.size:,} revocations resynced in {took:.1f} s; RSS before {base:.0f} MB,"
                f" after {_rss('VmRSS'):.0f} MB, peak (VmHWM) {_rss('VmHWM'):.0f} MB")
    finally:
        await pool.close()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        print(asyncio.run(_measure(sys.argv[2])))
        return 0
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    from fedtoken.store.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="fedtoken-resync-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        dsn = pg.start()
        try:
            asyncio.run(_fill(dsn, n))
            # A fresh process, so the baseline holds nothing from the fill.
            subprocess.run([sys.executable, "-m", "bench.resync_memory", "--measure", dsn],
                           check=True)
        finally:
            pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
