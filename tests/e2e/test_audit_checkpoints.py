"""Signed audit checkpoints against a database superuser: a real server signs
the chain head with its HSM checkpoint key into state_dir/audit, and
`fedtoken audit verify --checkpoints` catches a rewrite of the whole chain
that the chain walk alone accepts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from fedtoken.core.checkpoint import CHECKPOINT_LABEL_PREFIX, parse_line, pinned_keys, verify
from fedtoken.core.jwk import b64url_to_int, rsa_public_jwk
from fedtoken.hsm import HsmConfig
from tests._pg_fixture import create_database, drop_database
from tests.support import ServerThread, make_settings

PERIOD = 0.3


@pytest.fixture(scope="module")
def own_server(
    tmp_path_factory: pytest.TempPathFactory, pg_dsn: str, hsm_config: HsmConfig
) -> Iterator[tuple[ServerThread, str]]:
    """A server on a database of its own (this module rewrites its chain),
    checkpointing every PERIOD seconds."""
    name = f"checkpoints_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_dsn, name)
    settings = make_settings(tmp_path_factory.mktemp("checkpoints"),
                             audit_checkpoint_seconds=PERIOD)
    srv = ServerThread(settings, dsn, hsm_config).start()
    yield srv, dsn
    srv.stop()
    drop_database(pg_dsn, name)


def _checkpoints(srv: ServerThread) -> Path:
    return srv.state / "audit" / "checkpoints.jsonl"


def _wait_for_checkpoint_of(srv: ServerThread, seq: int, timeout: float = 20) -> list[str]:
    """The checkpoint lines once one covers ``seq``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = _checkpoints(srv)
        lines = path.read_text().splitlines() if path.exists() else []
        if lines and parse_line(lines[-1]).checkpoint.seq >= seq:
            return lines
        time.sleep(PERIOD / 3)
    raise AssertionError(f"no checkpoint of seq {seq} within {timeout} s")


def _head(srv: ServerThread) -> int:
    with srv.client() as c:
        return int(c.verify_audit_chain().head_seq)


# Rewrites the whole chain consistently, as a database superuser can: the
# append-only and head guards switched off, a subject changed, and every
# row's prev_hash and hash, and the head, recomputed with the chain's own
# canonical form (audit_canonical, migrations/0001_init.sql).
REWRITE = """
LOCK TABLE audit_events, audit_head IN EXCLUSIVE MODE;
ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only;
ALTER TABLE audit_head DISABLE TRIGGER audit_head_guard;
UPDATE audit_events SET subject = 'someone-else' WHERE seq = {victim};
DO $$
DECLARE
    r record;
    prev bytea := decode(repeat('00', 32), 'hex');
    h bytea;
BEGIN
    FOR r IN SELECT * FROM audit_events ORDER BY seq LOOP
        h := sha256(prev || convert_to(audit_canonical(
            r.seq, r.ts, r.tenant_id, r.actor, r.event_type, r.subject, r.jti, r.kid,
            r.outcome, r.reason, r.request_id, r.details), 'UTF8'));
        UPDATE audit_events SET prev_hash = prev, hash = h WHERE seq = r.seq;
        prev := h;
    END LOOP;
    UPDATE audit_head SET hash = prev WHERE id = 1;
END $$;
ALTER TABLE audit_head ENABLE TRIGGER audit_head_guard;
ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only;
"""


def test_checkpoints_are_signed_by_the_hsm_key_and_verify(
    own_server: tuple[ServerThread, str],
) -> None:
    srv, _ = own_server
    with srv.client() as c:
        c.issue("alice", "svc")
    lines = _wait_for_checkpoint_of(srv, _head(srv))

    # The key: in the HSM under its own prefix, never a tenant key, and
    # published for pinning.
    assert srv.app is not None
    key = srv.run(srv.app.signer.checkpoint_key(create=False))
    assert key is not None and key.hsm_label == CHECKPOINT_LABEL_PREFIX + key.kid
    assert key.hsm_label not in srv.app.signer.list_labels()
    jwk_path = srv.state / "audit" / "checkpoint-key.jwk"
    published = json.loads(jwk_path.read_text())
    assert published == key.public_jwk and (jwk_path.stat().st_mode & 0o777) == 0o644
    n, e = b64url_to_int(published["n"]), b64url_to_int(published["e"])
    assert rsa_public_jwk(n, e)["kid"] == key.kid and n.bit_length() == 2048
    with srv.client() as c:
        assert key.kid not in {k.kid for k in c.get_keys().keys}

    (public,) = pinned_keys(published).values()
    signed = [parse_line(line) for line in lines]
    assert all(s.checkpoint.kid == key.kid and verify(s, public) for s in signed)
    seqs = [s.checkpoint.seq for s in signed]
    assert seqs == sorted(set(seqs))  # only when the head moved
    with srv.client() as c:
        (last,) = c.list_audit(after_seq=seqs[-1] - 1, page_size=1).events
        assert bytes.fromhex(last.hash) == signed[-1].checkpoint.hash

    ok = srv.cli("audit", "verify", "--checkpoints", str(_checkpoints(srv)))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["checked"] == len(lines)
    assert report["chain"]["ok"] is True and report["pinned_kids"] == [key.kid]


def test_an_altered_checkpoint_file_is_refused(
    own_server: tuple[ServerThread, str], tmp_path: Path,
) -> None:
    srv, _ = own_server
    lines = _wait_for_checkpoint_of(srv, 1)
    data = json.loads(lines[0])
    data["hash"] = "00" * 32  # "the chain had this hash": not what the key signed
    forged = tmp_path / "forged.jsonl"
    forged.write_text(json.dumps(data) + "\n" + "\n".join(lines[1:]) + "\n")
    bad = srv.cli("audit", "verify", "--checkpoints", str(forged))
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert (report["problem"], report["line"]) == ("BAD_SIGNATURE", 1)

    other = tmp_path / "other.jwk"
    other.write_text(json.dumps(rsa_public_jwk(
        int.from_bytes(os.urandom(256), "big") | (1 << 2047) | 1, 65537)))
    wrong = srv.cli("audit", "verify", "--checkpoints", str(_checkpoints(srv)),
                 "--checkpoint-key", str(other))
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["problem"] == "KEY_MISMATCH"


# Runs last in this module: it rewrites the chain of the module's database.
def test_a_superuser_rewriting_the_whole_chain_is_caught(
    own_server: tuple[ServerThread, str], caplog: pytest.LogCaptureFixture,
) -> None:
    srv, dsn = own_server
    with srv.client() as c:
        c.issue("victim", "svc")
        (row,) = c.list_audit(subject="victim").events
        c.issue("bystander", "svc")
    lines = _wait_for_checkpoint_of(srv, _head(srv))
    seqs = [parse_line(line).checkpoint.seq for line in lines]
    first_covering = next(s for s in seqs if s >= row.seq)
    assert srv.cli("audit", "verify", "--checkpoints", str(_checkpoints(srv))).returncode == 0

    async def rewrite() -> None:
        conn = await asyncpg.connect(dsn)  # the test's DSN: a database superuser
        try:
            async with conn.transaction():
                await conn.execute(REWRITE.format(victim=int(row.seq)))
        finally:
            await conn.close()

    with caplog.at_level(logging.ERROR, logger="fedtoken.service.jobs"):
        asyncio.run(rewrite())
        with srv.client() as c:
            (rewritten,) = c.list_audit(subject="someone-else").events
            assert rewritten.seq == row.seq and rewritten.hash != row.hash
            # The chain walk alone is satisfied: the rewrite is consistent.
            report = c.verify_audit_chain()
            assert report.ok and report.head_seq >= seqs[-1]
        plain = srv.cli("audit", "verify")
        assert plain.returncode == 0 and json.loads(plain.stdout)["ok"] is True

        # The signed checkpoints are not.
        caught = srv.cli("audit", "verify", "--checkpoints", str(_checkpoints(srv)))
        assert caught.returncode == 1, caught.stdout + caught.stderr
        verdict = json.loads(caught.stdout)
        assert verdict["ok"] is False and verdict["problem"] == "HASH_MISMATCH"
        assert verdict["first_bad_seq"] == first_covering
        assert verdict["line"] == seqs.index(first_covering) + 1
        assert verdict["checked"] == seqs.index(first_covering)  # earlier ones still hold

        # The server noticed too: it signs nothing over the rewritten chain.
        with srv.client() as c:
            c.issue("after", "svc")
            (after,) = c.list_audit(subject="after").events
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                "was rewritten" in r.getMessage() for r in caplog.records):
            time.sleep(PERIOD / 3)
    assert any("was rewritten" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)
    signed_after = [parse_line(line).checkpoint.seq
                    for line in _checkpoints(srv).read_text().splitlines()]
    assert signed_after[: len(lines)] == seqs and max(signed_after) < after.seq
