"""Two replicas over one Postgres: what one learns, the other learns.

The replicas are two real ``fedtoken serve`` processes (not two apps in the
test process): each has its own event loop, pool, LISTEN connection and
in-memory view, exactly as in production, and nothing can leak between them
through shared Python state. They share one --state-dir, hence one SoftHSM
dev token, because the keys' private halves live in the HSM and a tenant's
key generated through A must be usable by B. A is started alone first (it
creates the token, the schema and the default tenant), then B.

Propagation is asynchronous, so every cross-replica assertion polls with a
generous deadline; nothing here asserts how fast it is (bench/revocation.py
measures that).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from fedtoken_client import FedtokenClient, reason_name
from tests._pg_fixture import create_database, drop_database
from tests.support import ServeProcess, poll_until

pytestmark = pytest.mark.integration

DEADLINE = 30.0  # seconds; a shared 2-core box can be slow, a broken feed never converges
T = TypeVar("T")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory,
             pg_dsn: str) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    name = f"replicas_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_dsn, name)
    state = tmp_path_factory.mktemp("replicas")
    a, b = ServeProcess(state, dsn, name="a"), ServeProcess(state, dsn, name="b")
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()
        drop_database(pg_dsn, name)


@pytest.fixture(scope="module")
def clients(
    replicas: tuple[ServeProcess, ServeProcess],
) -> Iterator[tuple[FedtokenClient, FedtokenClient]]:
    a, b = replicas
    with a.client(caller="replica-test") as ca, \
            b.client(caller="replica-test") as cb:
        yield ca, cb


def eventually(probe: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    """Poll ``probe`` until ``done`` holds, or fail after DEADLINE seconds."""
    return poll_until(probe, done, what, deadline=DEADLINE, interval=0.02)


def verdict_on(client: FedtokenClient, token: str, aud: str = "svc") -> Callable[[], str]:
    def probe() -> str:
        v = client.verify(token, aud)
        return "OK" if v.valid else reason_name(v.reason)
    return probe


def test_jti_revoked_through_a_is_revoked_on_b(
        clients: tuple[FedtokenClient, FedtokenClient]) -> None:
    a, b = clients
    revoked = a.issue("jti-user", "svc")
    kept = a.issue("jti-user", "svc")
    by_jti = b.issue("jti-user", "svc")  # issued on B, revoked by jti on A
    for t in (revoked, kept, by_jti):
        eventually(verdict_on(b, t.token), lambda r: r == "OK", "fresh token valid on B")
        assert a.verify(t.token, "svc").valid
    a.revoke(token=revoked.token, reason="replica test")
    a.revoke(jti=by_jti.jti)
    eventually(verdict_on(b, revoked.token), lambda r: r == "REVOKED", "revoked on B")
    eventually(verdict_on(b, by_jti.token), lambda r: r == "REVOKED", "jti revoked on B")
    assert reason_name(a.verify(revoked.token, "svc").reason) == "REVOKED"
    assert b.verify(kept.token, "svc").valid
    assert not b.introspect(revoked.token).active


def test_subject_revocation_through_a_applies_on_b_before_the_cut_only(
        clients: tuple[FedtokenClient, FedtokenClient]) -> None:
    a, b = clients
    subject = f"sub-{uuid.uuid4().hex[:8]}"
    before = [a.issue(subject, "svc"), b.issue(subject, "svc")]
    other = a.issue(f"other-{subject}", "svc")
    cut = max(t.issued_at for t in before) + 1
    a.revoke(subject=subject, issued_before=cut, reason="account compromised")
    # iat is in whole seconds: a token issued once the cut has passed is after it.
    while time.time() < cut + 0.05:
        time.sleep(0.05)
    after = a.issue(subject, "svc")
    assert after.issued_at >= cut
    for t in before:
        eventually(verdict_on(b, t.token), lambda r: r == "REVOKED", "subject revoked on B")
        assert reason_name(a.verify(t.token, "svc").reason) == "REVOKED"
    eventually(verdict_on(b, after.token), lambda r: r == "OK", "token after the cut on B")
    assert a.verify(after.token, "svc").valid
    assert b.verify(other.token, "svc").valid


def test_key_revocation_through_a_rejects_its_tokens_and_unpublishes_it_on_b(
        replicas: tuple[ServeProcess, ServeProcess],
        clients: tuple[FedtokenClient, FedtokenClient]) -> None:
    ra, rb = replicas
    a, b = clients
    tenant = f"kr-{uuid.uuid4().hex[:8]}"
    a.create_tenant(tenant, f"https://auth.example.com/{tenant}", generate_key=True)
    victim = a.issue("key-user", "svc", tenant=tenant)
    kid = victim.kid
    eventually(verdict_on(b, victim.token), lambda r: r == "OK", "new tenant's token valid on B")

    def b_kids() -> set[str]:
        return {k["kid"] for k in json.loads(b.get_keys(tenant).jwks_json)["keys"]}

    def b_http_kids() -> set[str]:
        return {k["kid"] for k in rb.http_json(f"/t/{tenant}/.well-known/jwks.json")["keys"]}

    assert kid in eventually(b_kids, lambda kids: kid in kids, "kid published by B")
    assert kid in b_http_kids()

    a.revoke(kid=kid, tenant=tenant, reason="key compromised")
    eventually(verdict_on(b, victim.token), lambda r: r == "KEY_REVOKED", "key revoked on B")
    assert reason_name(a.verify(victim.token, "svc").reason) == "KEY_REVOKED"
    eventually(b_kids, lambda kids: kid not in kids, "kid gone from B's GetKeys")
    eventually(b_http_kids, lambda kids: kid not in kids, "kid gone from B's HTTP JWKS")
    assert kid not in {k["kid"] for k in ra.http_json(f"/t/{tenant}/.well-known/jwks.json")["keys"]}
    assert not b.introspect(victim.token).active


def test_a_tenant_and_key_created_on_a_verify_on_b(
        clients: tuple[FedtokenClient, FedtokenClient]) -> None:
    a, b = clients
    tenant = f"nt-{uuid.uuid4().hex[:8]}"
    a.create_tenant(tenant, f"https://auth.example.com/{tenant}", generate_key=True)
    first = a.issue("new-tenant-user", "svc", tenant=tenant)
    eventually(verdict_on(b, first.token), lambda r: r == "OK", "new tenant's token on B")
    # Rotate on A: the new key signs, and B verifies with it.
    new_key = a.generate_key(tenant, activate=True)
    second = a.issue("new-tenant-user", "svc", tenant=tenant)
    assert second.kid == new_key.kid != first.kid
    eventually(verdict_on(b, second.token), lambda r: r == "OK", "rotated key's token on B")
    assert b.verify(first.token, "svc").valid  # the old key is RETIRING: still verifies
    # B can sign for the tenant too: the shared HSM token holds the private key.
    third = b.issue("new-tenant-user", "svc", tenant=tenant)
    assert third.kid == new_key.kid
    assert a.verify(third.token, "svc").valid
