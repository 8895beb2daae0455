"""The audit trail through the API and the CLI: events recorded with context,
and a tampered row caught by `fedtoken audit verify`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from fedtoken.hsm import HsmConfig
from tests._pg_fixture import create_database, drop_database
from tests.support import ServerThread, make_settings


@pytest.fixture(scope="module")
def own_server(
    tmp_path_factory: pytest.TempPathFactory, pg_dsn: str, hsm_config: HsmConfig
) -> Iterator[tuple[ServerThread, str]]:
    """A server on a database of its own: this module tampers with it."""
    name = f"audit_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_dsn, name)
    srv = ServerThread(make_settings(tmp_path_factory.mktemp("audit")), dsn, hsm_config).start()
    yield srv, dsn
    srv.stop()
    drop_database(pg_dsn, name)


BILLING = "spiffe://fedtoken.test/ns/billing/sa/api"
GATEWAY = "spiffe://fedtoken.test/ns/edge/sa/gateway"


def test_events_carry_context_and_the_chain_verifies(
    own_server: tuple[ServerThread, str],
) -> None:
    srv, _ = own_server
    tls = srv.identity(BILLING, "issuer", "revoker", "auditor")
    with srv.client(tls=tls, caller="billing-api") as c:
        issued = c.issue("olivia", "svc", lifetime_seconds=60)
        c.revoke(token=issued.token, reason="logout")
        page = c.list_audit(subject="olivia", event_type="token.issued")
        (event,) = page.events
        assert (event.tenant, event.jti, event.kid, event.outcome) == (
            "default", issued.jti, issued.kid, "ok")
        # The actor is the authenticated identity and its peer address; the
        # self-declared name is kept apart, as an untrusted detail.
        assert event.actor.startswith(BILLING + "@ipv") and event.request_id
        details = json.loads(event.details_json)
        assert details["aud"] == ["svc"] and details["declared_caller"] == "billing-api"
        (rev,) = [e for e in c.list_audit(event_type="token.revoked").events
                  if e.jti == issued.jti]
        assert rev.actor.startswith(BILLING + "@")
        assert issued.token not in event.details_json  # never a full token
        revoked = c.list_audit(event_type="token.revoked").events
        assert any(e.jti == issued.jti and e.reason == "logout" for e in revoked)
        # Paging walks everything exactly once.
        seen, after = [], 0
        while True:
            page = c.list_audit(after_seq=after, page_size=2)
            seen += [e.seq for e in page.events]
            if not page.next_after_seq:
                break
            after = page.next_after_seq
        assert seen == list(range(1, len(seen) + 1))
        report = c.verify_audit_chain()
        assert report.ok and report.rows_checked == len(seen) and report.head_seq == len(seen)

    ok = srv.cli("audit", "verify")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    tail = srv.cli("audit", "tail", "--subject", "olivia")
    assert tail.returncode == 0
    assert {json.loads(line)["event_type"] for line in tail.stdout.splitlines()} >= {
        "token.issued"}


def test_verification_and_introspection_outcomes_are_audited(
    own_server: tuple[ServerThread, str],
) -> None:
    import time

    srv, _ = own_server
    tls = srv.identity(GATEWAY, "issuer", "verifier", "auditor")
    with srv.client(tls=tls, caller="gateway") as c:
        good = c.issue("victor", "svc")
        verdicts = c.verify_batch([good.token, "junk"], "svc")
        assert [v.valid for v in verdicts] == [True, False]
        assert c.verify(good.token, "svc").valid
        c.introspect(good.token)
        deadline = time.monotonic() + 15
        items: list[list[object]] = []
        introspected = []
        while time.monotonic() < deadline:
            rows = c.list_audit(event_type="token.verified", page_size=1000).events
            items = [it for r in rows if r.actor.startswith(GATEWAY + "@")
                     for it in json.loads(r.details_json)["items"]]
            introspected = [e for e in c.list_audit(event_type="token.introspected").events
                            if e.jti == good.jti]
            if len(items) >= 3 and introspected:
                break
            time.sleep(0.2)
        fields = ("jti", "sub", "kid", "outcome", "reason")
        recorded = [dict(zip(fields, it[:5], strict=True)) for it in items]
        assert {"jti": good.jti, "sub": "victor", "kid": good.kid, "outcome": "valid",
                "reason": "OK"} in recorded
        assert sum(r["jti"] == good.jti for r in recorded) == 2  # batch + unary
        assert any(r["outcome"] == "invalid" and r["reason"] == "MALFORMED" for r in recorded)
        (event,) = introspected
        assert (event.outcome, event.subject, event.actor.split("@")[0]) == (
            "active", "victor", GATEWAY)
        assert c.verify_audit_chain().ok


# Runs last in this module: it breaks the chain of the module's database.
def test_a_row_edited_with_sql_is_named_by_audit_verify(
    own_server: tuple[ServerThread, str],
) -> None:
    srv, dsn = own_server
    with srv.client() as c:
        c.issue("peggy", "svc")
        (victim,) = c.list_audit(subject="peggy").events

    async def tamper() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            # What an attacker with database superuser rights would do.
            await conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
            await conn.execute("UPDATE audit_events SET subject = 'someone-else' WHERE seq = $1",
                               victim.seq)
        finally:
            await conn.close()

    import asyncio

    asyncio.run(tamper())
    bad = srv.cli("audit", "verify")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert int(report["first_bad_seq"]) == victim.seq and report["problem"] == "ALTERED"
