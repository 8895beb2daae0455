"""Audit retention on a real server: rows older than the retention period
leave Postgres for an archive file once a signed checkpoint covers them, the
retained chain is verified from the anchor, the archives verify offline with
the pinned checkpoint key, and neither the service role nor a superuser who
moves the anchor can remove rows without it showing."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fedtoken.audit.archive import read_archive_lines
from fedtoken.core.archive import verify_archive
from fedtoken.core.checkpoint import parse_line, pinned_keys
from fedtoken.hsm import HsmConfig
from tests._pg_fixture import app_dsn, create_database, drop_database
from tests.support import ServerThread, make_settings

PERIOD = 0.3
KEEP = 1.0


def _sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """One statement (fetch), or a script when there are no arguments."""
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            if not args and ";" in query:
                await conn.execute(query)
                return []
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def retaining(
    tmp_path_factory: pytest.TempPathFactory, pg_dsn: str, hsm_config: HsmConfig
) -> Iterator[tuple[ServerThread, str]]:
    """A server that checkpoints every PERIOD s and keeps rows KEEP s, on a
    database of its own whose retention floor (normally an hour) is 0."""
    name = f"retention_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_dsn, name)
    settings = make_settings(tmp_path_factory.mktemp("retention"),
                             audit_checkpoint_seconds=PERIOD, audit_retention_seconds=KEEP,
                             audit_retention_check_seconds=PERIOD)
    srv = ServerThread(settings, dsn, hsm_config).start()
    _sql(dsn, "UPDATE audit_retention_floor SET min_age_s = 0")
    yield srv, dsn
    srv.stop()
    drop_database(pg_dsn, name)


def _anchor(dsn: str) -> asyncpg.Record | None:
    rows = _sql(dsn, "SELECT seq, hash, checkpoint, archive FROM audit_anchor")
    return rows[0] if rows else None


def _wait_for_anchor_past(dsn: str, seq: int, timeout: float = 30) -> asyncpg.Record:
    """Let retention run (floor 0) until it archived row ``seq``, then hold it
    (floor one hour), so what the test reads next is not moved underneath."""
    _sql(dsn, "UPDATE audit_retention_floor SET min_age_s = 0")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        anchor = _anchor(dsn)
        if anchor is not None and anchor["seq"] >= seq:
            _sql(dsn, "UPDATE audit_retention_floor SET min_age_s = 3600")
            time.sleep(2 * PERIOD)  # a round that started before the floor went up ends
            return _anchor(dsn)
        time.sleep(PERIOD / 2)
    raise AssertionError(f"retention did not archive row {seq} within {timeout} s")


def _issue_and_checkpoint(srv: ServerThread, *subjects: str) -> int:
    """Issue tokens, wait for a checkpoint covering them, then add one newer
    row (retention always keeps the newest row). The seq of the last token's row."""
    with srv.client() as c:
        for subject in subjects:
            c.issue(subject, "svc")
        (row,) = c.list_audit(subject=subjects[-1]).events
    journal = srv.state / "audit" / "checkpoints.jsonl"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = journal.read_text().splitlines() if journal.exists() else []
        if lines and parse_line(lines[-1]).checkpoint.seq >= row.seq:
            break
        time.sleep(PERIOD / 3)
    with srv.client() as c:
        c.issue(f"newer-than-{subjects[-1]}", "svc")
    return int(row.seq)


def _archives(srv: ServerThread) -> list[Path]:
    return sorted((srv.state / "audit" / "archive").glob("audit-*.jsonl.gz"))


def _keys(srv: ServerThread) -> dict[str, Any]:
    return dict(pinned_keys(json.loads(
        (srv.state / "audit" / "checkpoint-key.jwk").read_text())))


def test_old_rows_are_archived_then_removed_and_everything_still_verifies(
    retaining: tuple[ServerThread, str],
) -> None:
    srv, dsn = retaining
    anchor = _wait_for_anchor_past(dsn, _issue_and_checkpoint(srv, *(f"old-{i}" for i in range(5))))

    # Gone from Postgres, up to the anchor; the anchor is a signed checkpoint.
    assert _sql(dsn, "SELECT count(*) AS n FROM audit_events WHERE seq <= $1",
                anchor["seq"])[0]["n"] == 0
    signed = parse_line(anchor["checkpoint"]).checkpoint
    assert (signed.seq, signed.hash) == (anchor["seq"], bytes(anchor["hash"]))
    lines = (srv.state / "audit" / "checkpoints.jsonl").read_text().splitlines()
    assert anchor["checkpoint"] in lines
    pruned = _sql(dsn, "SELECT details::text AS d FROM audit_events "
                       "WHERE event_type = 'audit.pruned' ORDER BY seq")
    assert pruned and json.loads(pruned[0]["d"])["from_seq"] == 1

    # Every removed row is in the archives, which prove themselves and link up
    # from the genesis hash to the anchor.
    files = _archives(srv)
    assert files and files[-1].name == anchor["archive"]
    previous: tuple[int, bytes] | None = None
    subjects: list[str] = []
    for path in files:
        archive_lines = read_archive_lines(path)
        report = verify_archive(archive_lines, _keys(srv), expect_prev=previous)
        assert report.ok, report
        previous = (report.to_seq, report.last_hash)
        subjects += [json.loads(json.loads(line)["canonical"])[6] or ""
                     for line in archive_lines[1:]]
    assert previous == (anchor["seq"], bytes(anchor["hash"]))
    assert {f"old-{i}" for i in range(5)} <= set(subjects)

    # The retained chain verifies from the anchor, the checkpoints with it
    # (the older ones as archived), and the archives with the CLI.
    with srv.client() as c:
        c.issue("recent", "svc")
        chain = c.verify_audit_chain()
    assert chain.ok and chain.anchor_seq >= anchor["seq"]
    cp = srv.cli("audit", "verify", "--checkpoints", str(srv.state / "audit" / "checkpoints.jsonl"))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert json.loads(cp.stdout)["ok"] is True
    offline = srv.cli("audit", "verify-archive", *map(str, files))
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert json.loads(offline.stdout)["ok"] is True


def test_an_altered_or_missing_archive_is_caught(
    retaining: tuple[ServerThread, str], tmp_path: Path,
) -> None:
    srv, dsn = retaining
    _wait_for_anchor_past(dsn, _issue_and_checkpoint(srv, "for-the-archive"))
    files = _archives(srv)
    target = next(p for p in files if any("for-the-archive" in line
                                          for line in read_archive_lines(p)))
    lines = read_archive_lines(target)
    forged = [line.replace("for-the-archive", "someone-else") for line in lines]
    bad = tmp_path / target.name
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write("\n".join(forged) + "\n")
    altered = srv.cli("audit", "verify-archive", str(bad))
    assert altered.returncode == 1
    assert json.loads(altered.stdout)["archives"][-1]["problem"] == "BROKEN"



def test_the_service_role_cannot_remove_rows_except_through_audit_prune(
    retaining: tuple[ServerThread, str],
) -> None:
    srv, dsn = retaining
    app = app_dsn(dsn)
    # From here on retention must not remove the rows this test looks at.
    _sql(dsn, "UPDATE audit_retention_floor SET min_age_s = 3600")
    with srv.client() as c:
        c.issue("kept", "svc")
        (row,) = c.list_audit(subject="kept").events
        c.issue("newer", "svc")

    def refused(query: str, *args: Any) -> str:
        with pytest.raises(asyncpg.PostgresError) as info:
            _sql(app, query, *args)
        return str(info.value)

    assert "permission denied" in refused("DELETE FROM audit_events WHERE seq = $1", row.seq)
    assert "permission denied" in refused("SET fedtoken.audit_prune = 'on'; "
                                          "DELETE FROM audit_events WHERE seq = 1")
    assert "permission denied" in refused("UPDATE audit_anchor SET seq = seq + 1")
    assert "permission denied" in refused("UPDATE audit_retention_floor SET min_age_s = 0")
    # audit_prune itself refuses what no checkpoint pins, and the newest row.
    head = _sql(app, "SELECT seq, hash FROM audit_head")[0]
    assert "checkpointed hash" in refused(
        "SELECT audit_prune($1, $2, '{}', 'x', 'me')", row.seq, b"\x00" * 32)
    assert "newest" in refused("SELECT audit_prune($1, $2, '{}', 'x', 'me')",
                               head["seq"], bytes(head["hash"]))
    real_hash = _sql(app, "SELECT hash FROM audit_events WHERE seq = $1", row.seq)[0]["hash"]
    assert "checkpoint does not sign" in refused(
        "SELECT audit_prune($1, $2, $3, 'x', 'me')", row.seq, bytes(real_hash),
        json.dumps({"seq": row.seq + 1, "hash": bytes(real_hash).hex(), "sig": "x"}))


def test_the_database_floor_holds_whatever_the_service_asks(pg_dsn: str) -> None:
    """With the default floor (one hour), even a well-formed prune of fresh
    rows is refused by Postgres itself."""
    name = f"floor_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_dsn, name)
    try:
        from fedtoken.store.migrate import apply_migrations

        asyncio.run(apply_migrations(dsn))
        for subject in ("a", "b"):
            _sql(dsn, "INSERT INTO audit_events (event_type, subject) VALUES ('test', $1)",
                 subject)
        (row,) = _sql(dsn, "SELECT seq, hash FROM audit_events WHERE seq = 1")
        line = json.dumps({"seq": 1, "hash": bytes(row["hash"]).hex(), "sig": "x"})
        with pytest.raises(asyncpg.PostgresError, match="retention floor"):
            _sql(app_dsn(dsn), "SELECT audit_prune(1, $1, $2, 'x', 'me')",
                 bytes(row["hash"]), line)
    finally:
        drop_database(pg_dsn, name)


# Runs last in this module: it tampers with the module's database.
def test_a_superuser_moving_the_anchor_is_caught(retaining: tuple[ServerThread, str]) -> None:
    srv, dsn = retaining
    # Retention must not move the anchor on (legitimately) meanwhile.
    _sql(dsn, "UPDATE audit_retention_floor SET min_age_s = 3600")
    assert _anchor(dsn) is not None
    with srv.client() as c:
        c.issue("victim", "svc")
        (victim,) = c.list_audit(subject="victim").events
        c.issue("after-victim", "svc")
        c.issue("after-victim-2", "svc")
    anchor = _anchor(dsn)
    assert anchor is not None and victim.seq > anchor["seq"]
    # Remove rows up to one that no checkpoint signs, without an archive, and
    # move the anchor so the chain walk starts after them.
    signed = {parse_line(line).checkpoint.seq for line in
              (srv.state / "audit" / "checkpoints.jsonl").read_text().splitlines()}
    cut = next(s for s in range(victim.seq, victim.seq + 3) if s not in signed)
    hidden = _sql(dsn, "SELECT seq, hash FROM audit_events WHERE seq = $1", cut)[0]
    _sql(dsn, f"""
        BEGIN;
        ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only;
        DELETE FROM audit_events WHERE seq <= {cut};
        ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only;
        UPDATE audit_anchor SET seq = {cut}, hash = $1;
        COMMIT;""".replace("$1", f"'\\x{bytes(hidden['hash']).hex()}'::bytea"))
    with srv.client() as c:
        assert c.verify_audit_chain().ok  # the walk alone is satisfied
    caught = srv.cli("audit", "verify", "--checkpoints",
                     str(srv.state / "audit" / "checkpoints.jsonl"))
    assert caught.returncode == 1, caught.stdout
    verdict = json.loads(caught.stdout)
    assert verdict["problem"] == "ANCHOR_UNSIGNED", verdict
