"""Audit volume per million verifications, on the real service.

Runs ``fedtoken serve`` (1 worker, default configuration: revocation view and
audit on) against an embedded Postgres, issues distinct tokens, verifies them
with VerifyBatch, waits until the audit writer has flushed every verdict, and
reports how much the audit table grew
(table, TOAST and indexes:
``pg_total_relation_size``) per verification, scaled to one million.

    .venv/bin/python -m bench.audit_volume [--tokens N] [--rounds R] [--batch B]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.load import issue_tokens
from bench.service import Service, create_database

AUDIENCE = "bench"


async def _audit_stats(dsn: str) -> tuple[int, int, int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE audit_events")
        wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")
        size = await conn.fetchval("SELECT pg_total_relation_size('audit_events')")
        rows = await conn.fetchval("SELECT count(*) FROM audit_events")
        verified = await conn.fetchval(
            "SELECT coalesce(sum((details->>'count')::bigint), 0) FROM audit_events "
            "WHERE event_type = 'token.verified'")
        return int(size), int(rows), int(verified), int(wal)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.audit_volume", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=20, help="times each token is verified")
    p.add_argument("--batch", type=int, default=5000)
    args = p.parse_args(argv)
    from fedtoken.store.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="fedtoken-audit-volume-") as tmp:
        state = Path(tmp)
        pg = EmbeddedPostgres(state / "pg")
        admin = pg.start()
        dsn = create_database(admin)
        service = Service(state / "svc", dsn)
        service.state.mkdir()
        try:
            service.start(1)
            tokens = asyncio.run(issue_tokens(service.target, args.tokens, AUDIENCE,
                                              tls=service.tls))
            time.sleep(2)
            size0, rows0, verified0, wal0 = asyncio.run(_audit_stats(dsn))
            with service.client() as c:
                for _ in range(args.rounds):
                    for i in range(0, len(tokens), args.batch):
                        c.verify_batch(tokens[i:i + args.batch], audience=AUDIENCE)
            expected = verified0 + args.rounds * len(tokens)
            deadline = time.monotonic() + 60
            while True:
                size1, rows1, verified1, wal1 = asyncio.run(_audit_stats(dsn))
                if verified1 >= expected or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            service.stop()
            pg.stop()
    n = verified1 - verified0
    grown = size1 - size0
    print(f"verifications recorded: {n} (expected {args.rounds * len(tokens)}) in "
          f"{rows1 - rows0} rows")
    print(f"audit table growth: {grown} bytes = {grown / max(n, 1):.1f} bytes per verification "
          f"= {grown / max(n, 1):.1f} MB per million verifications")
    wal = wal1 - wal0
    print(f"WAL written meanwhile (whole server, includes the token issue's tail): {wal} bytes "
          f"= {wal / max(n, 1):.1f} bytes per verification")
    return 0 if n == args.rounds * len(tokens) else 1


if __name__ == "__main__":
    sys.exit(main())
