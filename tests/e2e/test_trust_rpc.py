"""Trusted issuers end to end: the KeyAdmin trust RPCs over real mTLS against
the shared server (real Postgres, real SoftHSM), through the client package
and the CLI, with who may do what and what the audit trail records.

The server has no remote JWKS cache fetching here (or an unreachable
partner): these tests are about the administration of trust, never about a
key set being usable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from fedtoken_client import FedtokenClient, FedtokenRpcError, Tls
from tests.support import ServerThread, child_env

AUDIT_DEADLINE = 10.0


def _spiffe(name: str) -> str:
    return f"spiffe://fedtoken.test/trust/{name}-{uuid.uuid4().hex[:8]}"


def _partner(name: str = "b") -> str:
    return f"https://{name}-{uuid.uuid4().hex[:8]}.partner.example/t/payments"


@contextmanager
def _refused(code: grpc.StatusCode, reason: str,
             field: str | None = None) -> Iterator[pytest.ExceptionInfo[FedtokenRpcError]]:
    with pytest.raises(FedtokenRpcError) as info:
        yield info
    assert (info.value.code, info.value.reason) == (code, reason), info.value
    if field is not None:
        assert info.value.field == field, info.value


@dataclass
class World:
    server: ServerThread
    admin: FedtokenClient
    a: str
    b: str
    issuer_a: str  # tenant a's own issuer


@pytest.fixture(scope="module")
def world(server: ServerThread, client: FedtokenClient) -> World:
    suffix = uuid.uuid4().hex[:6]
    a, b = f"tr-a-{suffix}", f"tr-b-{suffix}"
    created = client.create_tenant(a, generate_key=False)
    client.create_tenant(b, generate_key=False)
    return World(server, client, a, b, created.issuer)


def _events(admin: FedtokenClient, **filters: Any) -> list[Any]:
    out: list[Any] = []
    after = 0
    while True:
        page = admin.list_audit(after_seq=after, page_size=1000, **filters)
        out += list(page.events)
        if not page.next_after_seq:
            return out
        after = page.next_after_seq


def _wait_for(probe: Callable[[], list[Any]], what: str) -> list[Any]:
    end = time.monotonic() + AUDIT_DEADLINE
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > end:
            pytest.fail(f"not within {AUDIT_DEADLINE}s: {what}")
        time.sleep(0.05)


def test_an_admin_adds_lists_updates_and_removes_a_trusted_issuer(world: World) -> None:
    admin, issuer = world.admin, _partner()
    added = admin.add_trusted_issuer(issuer, tenants=[world.a], audiences=["api://orders"],
                                     max_stale_seconds=3600)
    assert added.created
    assert (added.issuer, list(added.tenants), list(added.algorithms)) == (
        issuer, [world.a], ["RS256"])
    assert added.namespace == issuer.removeprefix("https://") + ":"
    assert added.max_stale_seconds == 3600 and added.jwks_uri == ""
    assert added.added_by.startswith("spiffe://fedtoken.dev/operator")
    assert added.created_at > 0 and added.created_at == added.updated_at
    assert not added.key_set.usable  # nothing fetched (yet): its tokens are refused

    listed = {i.issuer: i for i in admin.list_trusted_issuers()}
    assert listed[issuer].tenants == added.tenants
    assert issuer not in {i.issuer for i in admin.list_trusted_issuers(world.b)}

    updated = admin.add_trusted_issuer(issuer, tenants=[world.a, world.b],
                                       algorithms=["RS256", "PS256"],
                                       jwks_uri=issuer + "/jwks.json")
    assert not updated.created
    assert sorted(updated.tenants) == sorted([world.a, world.b])
    assert list(updated.algorithms) == ["PS256", "RS256"]
    assert updated.created_at == added.created_at
    assert issuer in {i.issuer for i in admin.list_trusted_issuers(world.b)}

    removed = admin.remove_trusted_issuer(issuer)
    assert removed.issuer == issuer and sorted(removed.tenants) == sorted([world.a, world.b])
    assert issuer not in {i.issuer for i in admin.list_trusted_issuers()}
    with _refused(grpc.StatusCode.NOT_FOUND, "ISSUER_NOT_TRUSTED", "issuer"):
        admin.remove_trusted_issuer(issuer)
    with _refused(grpc.StatusCode.NOT_FOUND, "ISSUER_NOT_TRUSTED", "issuer"):
        admin.refresh_trusted_issuer(issuer)

    # Every change is in the audit trail, under each tenant concerned.
    def mine(event_type: str, tenant: str) -> list[Any]:
        return [e for e in _events(admin, event_type=event_type, tenant=tenant)
                if e.subject == issuer]

    assert len(mine("trust.added", world.a)) == 1
    assert [len(mine("trust.updated", t)) for t in (world.a, world.b)] == [1, 1]
    assert [len(mine("trust.removed", t)) for t in (world.a, world.b)] == [1, 1]
    (event,) = mine("trust.added", world.a)
    details = json.loads(event.details_json)
    assert details["tenants"] == [world.a] and details["max_stale_s"] == 3600
    assert event.actor.startswith("spiffe://fedtoken.dev/operator@")


def test_refresh_answers_with_the_key_set_state_and_is_audited(world: World) -> None:
    admin, issuer = world.admin, _partner("r")
    admin.add_trusted_issuer(issuer, tenants=[world.a])
    try:
        refreshed = admin.refresh_trusted_issuer(issuer)
        assert refreshed.issuer == issuer
        # An unreachable partner: nothing usable, and the outcome says why.
        assert not refreshed.key_set.usable and refreshed.key_set.last_outcome
        (event,) = [e for e in _events(admin, event_type="trust.refreshed", tenant=world.a)
                    if e.subject == issuer]
        assert event.outcome == refreshed.key_set.last_outcome
    finally:
        admin.remove_trusted_issuer(issuer)


BAD_INPUT = {
    # name: (request changes, status, reason, field)
    "http issuer": ({"issuer": "http://b.partner.example"}, "INVALID_ARGUMENT",
                    "INVALID_FIELD", "issuer"),
    "http loopback (setting off)": ({"issuer": "http://127.0.0.1:8443/t/a"},
                                    "INVALID_ARGUMENT", "INVALID_FIELD", "issuer"),
    "user info": ({"issuer": "https://u:p@b.partner.example"}, "INVALID_ARGUMENT",
                  "INVALID_FIELD", "issuer"),
    "query": ({"issuer": "https://b.partner.example/?x=1"}, "INVALID_ARGUMENT",
              "INVALID_FIELD", "issuer"),
    "http jwks_uri": ({"jwks_uri": "http://b.partner.example/jwks"}, "INVALID_ARGUMENT",
                      "INVALID_FIELD", "jwks_uri"),
    "HS256": ({"algorithms": ["HS256"]}, "INVALID_ARGUMENT", "POLICY_VIOLATION",
              "algorithms"),
    "none": ({"algorithms": ["none"]}, "INVALID_ARGUMENT", "POLICY_VIOLATION", "algorithms"),
    "ES256": ({"algorithms": ["ES256"]}, "INVALID_ARGUMENT", "POLICY_VIOLATION",
              "algorithms"),
    "no tenant": ({"tenants": []}, "INVALID_ARGUMENT", "INVALID_FIELD", "tenants"),
    "bad namespace": ({"namespace": "no-colon"}, "INVALID_ARGUMENT", "INVALID_FIELD",
                      "namespace"),
    "staleness too short": ({"max_stale_seconds": 5}, "INVALID_ARGUMENT",
                            "POLICY_VIOLATION", "max_stale_seconds"),
    "unknown tenant": ({"tenants": ["no-such-tenant-x"]}, "FAILED_PRECONDITION",
                       "TENANT_NOT_FOUND", "tenants"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_refused_with_a_reason_and_a_field(world: World, case: str) -> None:
    changes, code, reason, field = BAD_INPUT[case]
    request: dict[str, Any] = {"issuer": _partner("bad"), "tenants": [world.a], **changes}
    with _refused(getattr(grpc.StatusCode, code), reason, field):
        world.admin.add_trusted_issuer(request.pop("issuer"), **request)


def test_our_own_issuer_and_a_taken_namespace_are_refused(world: World) -> None:
    with _refused(grpc.StatusCode.INVALID_ARGUMENT, "POLICY_VIOLATION", "issuer"):
        world.admin.add_trusted_issuer(world.issuer_a, tenants=[world.b])
    issuer = _partner("ns")
    namespace = f"ns-{uuid.uuid4().hex[:8]}:"
    world.admin.add_trusted_issuer(issuer, tenants=[world.a], namespace=namespace)
    try:
        with _refused(grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS", "namespace"):
            world.admin.add_trusted_issuer(_partner("ns2"), tenants=[world.a],
                                           namespace=namespace)
    finally:
        world.admin.remove_trusted_issuer(issuer)


def test_a_verifier_is_denied_every_trust_rpc(world: World) -> None:
    issuer = _partner("v")
    world.admin.add_trusted_issuer(issuer, tenants=[world.a])
    identity = _spiffe("verifier")
    tls = world.server.identity(identity, "verifier")
    try:
        with world.server.client(tls=tls) as c:
            calls: dict[str, Callable[[], object]] = {
                "AddTrustedIssuer": lambda: c.add_trusted_issuer(_partner("x"),
                                                                 tenants=[world.a]),
                "ListTrustedIssuers": c.list_trusted_issuers,
                "RemoveTrustedIssuer": lambda: c.remove_trusted_issuer(issuer),
                "RefreshTrustedIssuer": lambda: c.refresh_trusted_issuer(issuer),
            }
            for call in calls.values():
                with _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED"):
                    call()
        assert issuer in {i.issuer for i in world.admin.list_trusted_issuers()}

        def denied() -> list[Any]:
            found = [e for e in _events(world.admin, event_type="access.denied")
                     if e.actor.startswith(identity + "@")]
            return found if len(found) >= len(calls) else []

        events = _wait_for(denied, "an access.denied record for every trust RPC")
        assert sorted(json.loads(e.details_json)["method"] for e in events) == sorted(calls)
    finally:
        world.admin.remove_trusted_issuer(issuer)


def test_an_auditor_lists_and_a_tenant_admin_is_held_to_its_tenant(world: World) -> None:
    shared, own = _partner("s"), _partner("o")
    world.admin.add_trusted_issuer(shared, tenants=[world.a, world.b])
    auditor = world.server.identity(_spiffe("auditor"), "auditor")
    admin_a = world.server.identity(_spiffe("admin-a"), "admin", tenants=(world.a,))
    try:
        with world.server.client(tls=auditor) as c:
            assert shared in {i.issuer for i in c.list_trusted_issuers()}
            with _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED"):
                c.add_trusted_issuer(own, tenants=[world.a])
        with world.server.client(tls=admin_a) as c:
            assert c.add_trusted_issuer(own, tenants=[world.a]).created
            with _refused(grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_GRANTED"):
                c.add_trusted_issuer(_partner("x"), tenants=[world.b])
            with _refused(grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_GRANTED"):
                c.remove_trusted_issuer(shared)  # b trusts it too
            seen = {i.issuer: list(i.tenants) for i in c.list_trusted_issuers()}
            assert seen[shared] == [world.a]  # b's part is not its business
            assert c.remove_trusted_issuer(own).issuer == own
    finally:
        world.admin.remove_trusted_issuer(shared)


def test_a_trusted_issuer_is_not_a_local_tenant(world: World) -> None:
    """A tenant can never take a trusted issuer's URL (tokens of the two
    would be indistinguishable)."""
    issuer = _partner("t")
    world.admin.add_trusted_issuer(issuer, tenants=[world.a])
    try:
        with pytest.raises(FedtokenRpcError) as info:
            world.admin.create_tenant(f"tr-x-{uuid.uuid4().hex[:6]}", issuer,
                                      generate_key=False)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        world.admin.remove_trusted_issuer(issuer)


# -- the CLI ----------------------------------------------------------------------------


def _ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_trust_through_the_cli(world: World) -> None:
    srv, issuer = world.server, _partner("cli")
    added = _ok(srv.cli("trust", "add", issuer, "--tenant", world.a, "--tenant", world.b,
                        "--alg", "RS256", "--alg", "PS256", "--audience", "api://orders",
                        "--namespace", f"cli-{uuid.uuid4().hex[:6]}:", "--max-stale", "12h",
                        "--jwks-uri", issuer + "/jwks.json"))
    assert added["created"] is True and added["issuer"] == issuer
    assert sorted(added["tenants"]) == sorted([world.a, world.b])
    assert added["algorithms"] == ["PS256", "RS256"] and added["audiences"] == ["api://orders"]
    assert int(added["max_stale_seconds"]) == 12 * 3600
    assert added["key_set"]["usable"] is False  # shown, defaults included

    listed = [i for i in _ok(srv.cli("trust", "list")) if i["issuer"] == issuer]
    assert len(listed) == 1 and set(listed[0]["key_set"]) >= {
        "kids", "fetched_at", "age_seconds", "next_refresh_at", "serving_stale", "usable",
        "last_outcome", "last_error"}
    assert [i["issuer"] for i in _ok(srv.cli("trust", "list", "--tenant", world.b))
            if i["issuer"] == issuer] == [issuer]

    refreshed = srv.cli("trust", "refresh", issuer)
    assert refreshed.returncode == 1, refreshed.stderr  # not usable: scripts notice
    assert json.loads(refreshed.stdout)["issuer"] == issuer

    removed = _ok(srv.cli("trust", "remove", issuer))
    assert removed["issuer"] == issuer  # the definition that was removed
    assert not [i for i in _ok(srv.cli("trust", "list")) if i["issuer"] == issuer]

    again = srv.cli("trust", "remove", issuer)
    assert again.returncode == 2 and "NOT_FOUND ISSUER_NOT_TRUSTED" in again.stderr, again
    hs = srv.cli("trust", "add", issuer, "--tenant", world.a, "--alg", "HS256")
    assert hs.returncode == 2 and "INVALID_ARGUMENT POLICY_VIOLATION" in hs.stderr, hs
    none = srv.cli("trust", "add", issuer)
    assert none.returncode == 2 and "INVALID_ARGUMENT INVALID_FIELD" in none.stderr, none
    duration = srv.cli("trust", "add", issuer, "--tenant", world.a, "--max-stale", "soon")
    assert duration.returncode == 2 and "not a duration" in duration.stderr, duration
    assert issuer not in {i.issuer for i in world.admin.list_trusted_issuers()}


def test_the_cli_trust_commands_need_a_role(world: World) -> None:
    tls: Tls = world.server.identity(_spiffe("cli-nobody"))
    result = subprocess.run(
        [sys.executable, "-m", "fedtoken.cli.main", "--target", world.server.target,
         "--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key),
         "trust", "list"],
        capture_output=True, text=True, env=child_env(), timeout=60)
    assert result.returncode == 2 and "PERMISSION_DENIED ROLE_NOT_GRANTED" in result.stderr
