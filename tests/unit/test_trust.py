"""Federation trust without I/O: the rules of a trust definition
(``fedtoken.core.trust``), the TrustAdmin use cases with their audit events
and authorization, the TrustCatalog's reloads, and FetchAudit's choice of
which fetch outcomes become audit rows.

The service runs over the fakes (tests/unit/fakes.py) with the real caller
policy (``Callers``) as authorizer. Errors are asserted by class, reason and
field, never by message (one exception, said where).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from fedtoken.core.errors import (
    AlreadyExists,
    AuditUnavailable,
    ErrorReason,
    FailedPrecondition,
    FedtokenError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PolicyViolation,
)
from fedtoken.core.model import Tenant
from fedtoken.core.ports import CallContext, Principal
from fedtoken.core.trust import (
    DEFAULT_MAX_STALE_SECONDS,
    FetchOutcome,
    IssuerStatus,
    StoredKeySet,
    TrustedIssuer,
    check_trust_url,
    default_namespace,
    validate_trusted_issuer,
)
from fedtoken.service.trust import REPEAT_EVERY, FetchAudit, NewTrust, NullTrustedKeys
from tests.unit.fakes import (
    NOW,
    FakeClock,
    MemoryAudit,
    Services,
    Trust,
    build_services,
    build_trust,
)

OPERATOR = CallContext(Principal(identity="spiffe://example.org/ops/operator",
                                 peer="ipv4:10.0.0.1:4000", declared="ops-laptop"), "req-op")
PARTNER = "https://b.example/t/payments"
LOCAL_A = "https://auth.example/t/a"
LOCAL_B = "https://auth.example/t/b"


def trust(issuer: str = PARTNER, **kw: Any) -> TrustedIssuer:
    kw.setdefault("tenants", frozenset({"a"}))
    return TrustedIssuer(issuer=issuer, **kw)


def refused(exc: FedtokenError) -> tuple[type[FedtokenError], ErrorReason, str]:
    return type(exc), exc.reason, exc.field


# --- the rules: what is accepted, and the defaults ------------------------------------


def test_a_minimal_definition_gets_the_documented_defaults() -> None:
    checked = validate_trusted_issuer(trust())
    assert checked.algorithms == frozenset({"RS256"})
    assert checked.namespace == "b.example/t/payments:"
    assert checked.max_stale_seconds == DEFAULT_MAX_STALE_SECONDS
    assert checked.jwks_uri == "" and checked.audiences == frozenset()


def test_a_full_definition_is_kept_as_given() -> None:
    given = trust(jwks_uri="https://keys.b.example/jwks.json", algorithms=frozenset(
        {"RS256", "PS256"}), audiences=frozenset({"api://orders"}), namespace="partner-b:",
        max_stale_seconds=3600, tenants=frozenset({"a", "b"}))
    assert validate_trusted_issuer(given) == given


@pytest.mark.parametrize(("issuer", "namespace"), [
    ("https://b.example", "b.example:"),
    ("https://b.example/", "b.example:"),
    ("https://B.Example/Tenant/X/", "b.example/Tenant/X:"),
    ("https://b.example:443/t/x", "b.example/t/x:"),
    ("https://b.example:8443/t/x", "b.example_8443/t/x:"),
    ("https://10.1.2.3/t", "10.1.2.3/t:"),
    ("https://[2001:db8::1]/t", None),  # IPv6: the operator names one
    ("https://b.example/t/%7Eu", None),  # percent-encoding: likewise
])
def test_the_default_namespace_is_host_port_and_path(issuer: str, namespace: str | None) -> None:
    assert default_namespace(issuer) == namespace


def test_an_issuer_without_a_derivable_namespace_needs_one() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_trusted_issuer(trust("https://[2001:db8::1]/t"))
    assert info.value.field == "namespace"
    assert validate_trusted_issuer(trust("https://[2001:db8::1]/t", namespace="v6:")
                                   ).namespace == "v6:"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8443/t/a", "http://127.9.9.9/t", "http://localhost:9000", "http://[::1]:9/t",
])
def test_http_is_allowed_for_a_loopback_host_only_when_the_setting_is_on(url: str) -> None:
    assert check_trust_url(url, "issuer", allow_http_loopback=True) == url
    with pytest.raises(InvalidRequest) as info:
        check_trust_url(url, "issuer")
    assert refused(info.value) == (InvalidRequest, ErrorReason.INVALID_FIELD, "issuer")


# --- the rules: each refusal ---------------------------------------------------------------


BAD_URLS = {
    "http-not-loopback": "http://b.example/t",
    "http-private-address": "http://10.0.0.1/t",
    "http-loopback-lookalike": "http://localhost.b.example/t",
    "user-info": "https://user:secret@b.example/t",
    "user-only": "https://admin@b.example",
    "query": "https://b.example/t?tenant=x",
    "empty-query": "https://b.example/t?",
    "fragment": "https://b.example/t#x",
    "space": "https://b.example/t x",
    "control-character": "https://b.example/t\x00",
    "line-break": "https://b.example/t\n",
    "bidi-override": "https://b.example/\u202et",
    "backslash": "https://b.example\\@evil.example/",
    "percent-host": "https://b%2eexample/t",
    "dot-segment": "https://b.example/t/../admin",
    "dot-only": "https://b.example/./t",
    "no-host": "https:///t",
    "bad-port": "https://b.example:99999/t",
    "unbalanced-bracket": "https://[::1/t",
    "bracketed-name": "https://[b.example]/t",
    "other-scheme": "ftp://b.example/t",
    "uppercase-scheme": "HTTPS://b.example/t",
    "relative": "b.example/t",
    "empty": "",
    "too-long": "https://b.example/" + "a" * 600,
}


@pytest.mark.parametrize(("case", "field"), [
    (case, field) for case in sorted(BAD_URLS) for field in ("issuer", "jwks_uri")
    if BAD_URLS[case] or field == "issuer"  # an empty jwks_uri means OIDC discovery
])
def test_a_bad_url_is_refused_for_the_field(case: str, field: str) -> None:
    url = BAD_URLS[case]
    given = trust(**{field: url}) if field == "jwks_uri" else trust(url)
    with pytest.raises(InvalidRequest) as info:
        validate_trusted_issuer(given)
    assert refused(info.value) == (InvalidRequest, ErrorReason.INVALID_FIELD, field)
    # The message never carries what was given (a user info may be a password).
    assert "secret" not in info.value.message and "admin" not in info.value.message


@pytest.mark.parametrize("algorithms", [
    {"HS256"}, {"HS512"}, {"hs256"}, {"none"}, {"NONE"}, {"RS256", "HS256"},
])
def test_symmetric_and_unsigned_algorithms_are_never_allowed(algorithms: set[str]) -> None:
    with pytest.raises(PolicyViolation) as info:
        validate_trusted_issuer(trust(algorithms=frozenset(algorithms)))
    assert refused(info.value) == (PolicyViolation, ErrorReason.POLICY_VIOLATION, "algorithms")


def test_es256_is_refused_as_not_supported_yet() -> None:
    with pytest.raises(PolicyViolation) as info:
        validate_trusted_issuer(trust(algorithms=frozenset({"ES256"})))
    assert refused(info.value) == (PolicyViolation, ErrorReason.POLICY_VIOLATION, "algorithms")
    # The one message check: the brief of this refusal is to say "not yet".
    assert "not supported" in info.value.message and "yet" in info.value.message


@pytest.mark.parametrize("algorithms", [{"rs256"}, {"RS384"}, {"EdDSA"}, {""},
                                        {f"RS{i}" for i in range(9)}])
def test_algorithms_outside_the_federation_list_are_refused(algorithms: set[str]) -> None:
    with pytest.raises(PolicyViolation) as info:
        validate_trusted_issuer(trust(algorithms=frozenset(algorithms)))
    assert info.value.field == "algorithms"


@pytest.mark.parametrize(("change", "field"), [
    ({"tenants": frozenset()}, "tenants"),
    ({"tenants": frozenset({"Not_A_Tenant"})}, "tenants"),
    ({"tenants": frozenset(f"t{i}" for i in range(257))}, "tenants"),
    ({"audiences": frozenset({""})}, "audiences"),
    ({"audiences": frozenset({"api\x00"})}, "audiences"),
    ({"audiences": frozenset({"a" * 256})}, "audiences"),
    ({"audiences": frozenset(f"a{i}" for i in range(17))}, "audiences"),
    ({"namespace": "no-colon"}, "namespace"),
    ({"namespace": "two:colons:"}, "namespace"),
    ({"namespace": ":"}, "namespace"),
    ({"namespace": "-leading:"}, "namespace"),
    ({"namespace": "white space:"}, "namespace"),
    ({"namespace": "a" * 128 + ":"}, "namespace"),
])
def test_bad_tenants_audiences_and_namespaces_are_refused(change: dict[str, Any],
                                                          field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_trusted_issuer(trust(**change))
    assert refused(info.value) == (InvalidRequest, ErrorReason.INVALID_FIELD, field)


@pytest.mark.parametrize("seconds", [-1, 1, 59, 30 * 86400 + 1, 10**12])
def test_max_staleness_is_bounded(seconds: int) -> None:
    with pytest.raises(PolicyViolation) as info:
        validate_trusted_issuer(trust(max_stale_seconds=seconds))
    assert info.value.field == "max_stale_seconds"
    for ok in (60, 30 * 86400):
        assert validate_trusted_issuer(trust(max_stale_seconds=ok)).max_stale_seconds == ok


@pytest.mark.parametrize("issuer", [LOCAL_A, LOCAL_A + "/", "https://AUTH.example/t/a"])
def test_one_of_our_own_issuers_is_never_trusted(issuer: str) -> None:
    with pytest.raises(PolicyViolation) as info:
        validate_trusted_issuer(trust(issuer), local_issuers=[LOCAL_A, LOCAL_B])
    assert refused(info.value) == (PolicyViolation, ErrorReason.POLICY_VIOLATION, "issuer")
    # Ours even where the URL rule would refuse it (a dev tenant on http).
    with pytest.raises(PolicyViolation):
        validate_trusted_issuer(trust("http://127.0.0.1:8080/t/a"),
                                local_issuers=["http://127.0.0.1:8080/t/a"])
    # Another path of the same host is another issuer.
    assert validate_trusted_issuer(trust("https://auth.example/t/c"),
                                   local_issuers=[LOCAL_A, LOCAL_B])


# --- TrustAdmin ---------------------------------------------------------------------------


@pytest.fixture
async def svc() -> AsyncIterator[Services]:
    """Tenants a and b; the operator is a bootstrap admin."""
    s = build_services(bootstrap=(OPERATOR.principal.identity,))
    for tid, issuer in (("a", LOCAL_A), ("b", LOCAL_B)):
        await s.store.tenants.create(Tenant(id=tid, issuer=issuer),
                                     now=datetime.fromtimestamp(NOW, UTC))
    yield s
    await s.aclose()


@pytest.fixture
async def t(svc: Services) -> AsyncIterator[Trust]:
    world = build_trust(svc)
    yield world
    await world.catalog.close()


def events(svc: Services, event_type: str) -> list[Any]:
    return [e for e in svc.audit.events if e.event_type == event_type]


def denials(svc: Services) -> list[Any]:
    return [e for e in svc.audit.queued if e.event_type == "access.denied"]


async def identity(svc: Services, name: str, *grants: tuple[str, tuple[str, ...]]) -> CallContext:
    """A caller holding ``grants`` ((role, tenants) each)."""
    spiffe = f"spiffe://example.org/ns/{name}"
    for role, tenants in grants:
        await svc.callers.grant(spiffe, role, list(tenants), [], 0, OPERATOR)
    return CallContext(Principal(identity=spiffe, peer="ipv4:10.0.0.9:1"), f"req-{name}")


async def test_add_stores_audits_per_tenant_and_configures_the_cache(
        svc: Services, t: Trust) -> None:
    view = await t.admin.add(NewTrust(issuer=PARTNER, tenants=["b", "a", "a"],
                                      audiences=["api://orders"]), OPERATOR)
    assert view.created
    stored = await svc.store.trust.get(PARTNER)
    assert stored == view.trust
    assert stored is not None and stored.tenants == {"a", "b"}
    assert stored.added_by == OPERATOR.actor and stored.created_at == NOW
    assert stored.algorithms == {"RS256"} and stored.namespace == "b.example/t/payments:"
    assert t.keys.issuers == {PARTNER: stored}  # this replica reads its own write
    added = events(svc, "trust.added")
    assert [e.tenant for e in added] == ["a", "b"]
    assert {e.request_id for e in added} == {"req-op"}
    assert all(e.subject == PARTNER and e.actor == OPERATOR.actor for e in added)
    assert added[0].details == {
        "tenants": ["a", "b"], "jwks_uri": "", "algorithms": ["RS256"],
        "audiences": ["api://orders"], "namespace": "b.example/t/payments:",
        "max_stale_s": DEFAULT_MAX_STALE_SECONDS, "declared_caller": "ops-laptop"}


async def test_adding_again_replaces_the_definition_as_an_update(
        svc: Services, t: Trust) -> None:
    await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a"]), OPERATOR)
    svc.clock.advance(60)
    view = await t.admin.add(NewTrust(issuer=PARTNER, tenants=["b"], algorithms=["PS256"],
                                      max_stale_seconds=3600), OPERATOR)
    assert not view.created
    assert view.trust.tenants == {"b"} and view.trust.algorithms == {"PS256"}
    assert (view.trust.created_at, view.trust.updated_at) == (NOW, NOW + 60)
    updated = events(svc, "trust.updated")
    # Both tenants hear of it: b gains the trust, a loses it.
    assert [e.tenant for e in updated] == ["a", "b"]
    assert updated[0].details is not None
    assert updated[0].details["previous"] == {"tenants": ["a"], "algorithms": ["RS256"],
                                              "max_stale_s": DEFAULT_MAX_STALE_SECONDS}
    assert t.keys.issuers[PARTNER].tenants == {"b"}


async def test_add_refuses_unknown_tenants_our_own_issuer_and_a_taken_namespace(
        svc: Services, t: Trust) -> None:
    with pytest.raises(FailedPrecondition) as unknown:
        await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a", "ghost"]), OPERATOR)
    assert refused(unknown.value) == (FailedPrecondition, ErrorReason.TENANT_NOT_FOUND,
                                      "tenants")
    assert unknown.value.tenant == "ghost"
    with pytest.raises(PolicyViolation) as ours:
        await t.admin.add(NewTrust(issuer=LOCAL_B, tenants=["a"]), OPERATOR)
    assert ours.value.field == "issuer"
    await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a"], namespace="partner:"), OPERATOR)
    with pytest.raises(AlreadyExists) as taken:
        await t.admin.add(NewTrust(issuer="https://c.example", tenants=["a"],
                                   namespace="partner:"), OPERATOR)
    assert taken.value.field == "namespace"
    with pytest.raises(InvalidRequest) as empty:
        await t.admin.add(NewTrust(issuer=PARTNER, tenants=[]), OPERATOR)
    assert empty.value.field == "tenants"
    assert [i.issuer for i in await svc.store.trust.list()] == [PARTNER]
    assert len(events(svc, "trust.added")) == 1


async def test_add_refuses_http_unless_loopback_is_allowed(svc: Services) -> None:
    local = "http://127.0.0.1:8443/t/a"
    strict, lax = build_trust(svc), build_trust(svc, allow_http_loopback=True)
    with pytest.raises(InvalidRequest) as info:
        await strict.admin.add(NewTrust(issuer=local, tenants=["a"]), OPERATOR)
    assert info.value.field == "issuer"
    assert (await lax.admin.add(NewTrust(issuer=local, tenants=["a"]), OPERATOR)).created


async def test_list_shows_each_issuers_key_set_status(svc: Services, t: Trust) -> None:
    await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a"]), OPERATOR)
    await t.admin.add(NewTrust(issuer="https://c.example", tenants=["b"]), OPERATOR)
    t.keys.statuses[PARTNER] = IssuerStatus(
        issuer=PARTNER, kids=("k1", "k2"), fetched_at=NOW - 90, next_refresh_at=NOW + 210,
        serving_stale=True, usable=True, last_outcome="error", last_error="timeout",
        fetches=7)
    views = await t.admin.list(OPERATOR)
    assert [v.trust.issuer for v in views] == ["https://b.example/t/payments",
                                               "https://c.example"]
    first, second = views
    assert first.status.kids == ("k1", "k2") and first.age_seconds == 90
    assert first.status.serving_stale and first.status.last_outcome == "error"
    assert second.status == IssuerStatus(issuer="https://c.example") and second.age_seconds == 0
    assert [v.trust.issuer for v in await t.admin.list(OPERATOR, tenant="b")] == [
        "https://c.example"]
    with pytest.raises(InvalidRequest):
        await t.admin.list(OPERATOR, tenant="Bad Tenant")


async def test_list_reads_through_to_the_store(svc: Services, t: Trust) -> None:
    """A trust added on another replica (straight into the store) is listed."""
    await svc.store.trust.put(validate_trusted_issuer(trust()),
                              now=datetime.fromtimestamp(NOW, UTC))
    assert [v.trust.issuer for v in await t.admin.list(OPERATOR)] == [PARTNER]
    assert PARTNER in t.keys.issuers


async def test_remove_forgets_the_issuer_and_its_key_set(svc: Services, t: Trust) -> None:
    with pytest.raises(NotFound) as unknown:
        await t.admin.remove(PARTNER, OPERATOR)
    assert refused(unknown.value) == (NotFound, ErrorReason.ISSUER_NOT_TRUSTED, "issuer")
    await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a", "b"]), OPERATOR)
    await svc.store.key_sets.save_key_set(StoredKeySet(PARTNER, "https://b.example/jwks",
                                                       b"{}", "etag", NOW))
    removed = await t.admin.remove(PARTNER, OPERATOR)
    assert removed.tenants == {"a", "b"}
    assert await svc.store.trust.get(PARTNER) is None
    assert await svc.store.key_sets.load_key_sets() == []
    assert t.keys.issuers == {}
    assert [e.tenant for e in events(svc, "trust.removed")] == ["a", "b"]
    with pytest.raises(NotFound):
        await t.admin.remove(PARTNER, OPERATOR)
    with pytest.raises(InvalidRequest):
        await t.admin.remove("x" * 600, OPERATOR)


async def test_refresh_fetches_now_and_audits_the_outcome(svc: Services, t: Trust) -> None:
    with pytest.raises(NotFound):
        await t.admin.refresh(PARTNER, OPERATOR)
    await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a"]), OPERATOR)
    t.keys.statuses[PARTNER] = IssuerStatus(issuer=PARTNER, kids=("k1",), fetched_at=NOW,
                                            usable=True, last_outcome="ok")
    view = await t.admin.refresh(PARTNER, OPERATOR)
    assert t.keys.refreshed == [PARTNER]
    assert view.status.usable and view.status.kids == ("k1",)
    (event,) = events(svc, "trust.refreshed")
    assert (event.tenant, event.subject, event.outcome) == ("a", PARTNER, "ok")
    assert event.details is not None and event.details["kids"] == ["k1"]


async def test_refresh_of_an_issuer_added_elsewhere_configures_it_first(
        svc: Services, t: Trust) -> None:
    await svc.store.trust.put(validate_trusted_issuer(trust()),
                              now=datetime.fromtimestamp(NOW, UTC))
    assert PARTNER not in t.keys.issuers
    await t.admin.refresh(PARTNER, OPERATOR)
    assert PARTNER in t.keys.issuers and t.keys.refreshed == [PARTNER]


# --- TrustAdmin: authorization --------------------------------------------------------------


async def test_a_caller_with_no_grant_is_denied_every_use_case_once(
        svc: Services, t: Trust) -> None:
    await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a"]), OPERATOR)
    nobody = await identity(svc, "nobody")
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "add": lambda: t.admin.add(NewTrust(issuer="https://c.example", tenants=["a"]), nobody),
        "list": lambda: t.admin.list(nobody),
        "remove": lambda: t.admin.remove(PARTNER, nobody),
        "refresh": lambda: t.admin.refresh(PARTNER, nobody),
    }
    for name, call in calls.items():
        before = len(denials(svc))
        with pytest.raises(PermissionDenied) as info:
            await call()
        assert info.value.reason is ErrorReason.ROLE_NOT_GRANTED, name
        assert len(denials(svc)) == before + 1, name  # one audited denial per call
    assert [i.issuer for i in await svc.store.trust.list()] == [PARTNER]
    assert t.keys.refreshed == []


async def test_a_verifier_may_not_even_list(svc: Services, t: Trust) -> None:
    verifier = await identity(svc, "verifier", ("verifier", ()))
    with pytest.raises(PermissionDenied) as info:
        await t.admin.list(verifier)
    assert info.value.reason is ErrorReason.ROLE_NOT_GRANTED
    (denial,) = denials(svc)
    assert denial.details["role"] == "admin"


async def test_an_auditor_lists_without_a_denial_and_changes_nothing(
        svc: Services, t: Trust) -> None:
    await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a"]), OPERATOR)
    auditor = await identity(svc, "auditor", ("auditor", ()))
    assert [v.trust.issuer for v in await t.admin.list(auditor)] == [PARTNER]
    assert denials(svc) == []
    with pytest.raises(PermissionDenied):
        await t.admin.add(NewTrust(issuer="https://c.example", tenants=["a"]), auditor)
    with pytest.raises(PermissionDenied):
        await t.admin.remove(PARTNER, auditor)


async def test_without_the_role_probe_an_auditor_still_lists(svc: Services) -> None:
    world = build_trust(svc, probe=False)
    await world.admin.add(NewTrust(issuer=PARTNER, tenants=["a"]), OPERATOR)
    auditor = await identity(svc, "auditor", ("auditor", ()))
    assert [v.trust.issuer for v in await world.admin.list(auditor)] == [PARTNER]
    # The cost: the admin check it failed first is on record.
    assert [d.details["role"] for d in denials(svc)] == ["admin"]


async def test_a_tenant_admin_changes_only_its_own_tenants_trust(
        svc: Services, t: Trust) -> None:
    admin_a = await identity(svc, "admin-a", ("admin", ("a",)))
    view = await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a"]), admin_a)
    assert view.trust.tenants == {"a"}
    for tenants in (["b"], ["a", "b"], ["ghost"]):
        with pytest.raises(PermissionDenied) as info:
            await t.admin.add(NewTrust(issuer="https://c.example", tenants=tenants), admin_a)
        # Denied before anything says whether "ghost" exists.
        assert info.value.reason is ErrorReason.TENANT_NOT_GRANTED, tenants
    # An issuer that tenant b trusts too: a's admin can neither narrow it to a
    # (withdrawing b's trust) nor remove it.
    await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a", "b"]), OPERATOR)
    with pytest.raises(PermissionDenied) as narrowed:
        await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a"]), admin_a)
    assert narrowed.value.reason is ErrorReason.TENANT_NOT_GRANTED
    assert narrowed.value.tenant == "b"
    with pytest.raises(PermissionDenied):
        await t.admin.remove(PARTNER, admin_a)
    assert (await svc.store.trust.get(PARTNER)) is not None
    # Refreshing needs only one of its tenants.
    await t.admin.refresh(PARTNER, admin_a)
    assert t.keys.refreshed == [PARTNER]


async def test_a_tenant_scoped_reader_sees_only_its_tenants(svc: Services, t: Trust) -> None:
    await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a", "b"]), OPERATOR)
    await t.admin.add(NewTrust(issuer="https://c.example", tenants=["b"]), OPERATOR)
    auditor_a = await identity(svc, "auditor-a", ("auditor", ("a",)))
    (view,) = await t.admin.list(auditor_a)
    assert view.trust.issuer == PARTNER
    assert view.trust.tenants == {"a"}  # not told that b trusts it too
    assert [v.trust.issuer for v in await t.admin.list(auditor_a, tenant="a")] == [PARTNER]
    with pytest.raises(PermissionDenied) as info:
        await t.admin.list(auditor_a, tenant="b")
    assert info.value.reason is ErrorReason.TENANT_NOT_GRANTED
    # Admin of b and auditor of a: both views, joined.
    both = await identity(svc, "mixed", ("auditor", ("a",)), ("admin", ("b",)))
    listed = {v.trust.issuer: v.trust.tenants for v in await t.admin.list(both)}
    assert listed == {PARTNER: {"a", "b"}, "https://c.example": {"b"}}


async def test_a_failed_audit_record_fails_the_change(svc: Services, t: Trust) -> None:
    svc.audit.fail = True
    with pytest.raises(AuditUnavailable):
        await t.admin.add(NewTrust(issuer=PARTNER, tenants=["a"]), OPERATOR)


# --- TrustCatalog -----------------------------------------------------------------------------


async def test_the_catalog_reloads_on_trust_notifications_only(svc: Services, t: Trust) -> None:
    await t.catalog.reload()
    loads = t.catalog.reloads
    await svc.store.trust.put(validate_trusted_issuer(trust()),
                              now=datetime.fromtimestamp(NOW, UTC))
    for kind in ("keys", "tenant", "callers", "heartbeat"):
        t.catalog.notice({"type": kind})
    await settle()
    assert t.catalog.reloads == loads and PARTNER not in t.keys.issuers
    for _ in range(3):  # a burst: coalesced
        t.catalog.notice({"type": "trust", "issuer": PARTNER})
    await settle()
    assert t.keys.issuers[PARTNER].issuer == PARTNER
    assert t.catalog.get(PARTNER) is not None
    assert loads < t.catalog.reloads <= loads + 2


async def settle() -> None:
    """Let background reloads run (every fake store call yields once)."""
    for _ in range(50):
        await asyncio.sleep(0)


# --- FetchAudit --------------------------------------------------------------------------------


@pytest.fixture
def fetch() -> tuple[FetchAudit, MemoryAudit, FakeClock]:
    audit, clock = MemoryAudit(), FakeClock()
    return FetchAudit(audit, clock), audit, clock


async def test_routine_refreshes_are_counted_not_audited(
        fetch: tuple[FetchAudit, MemoryAudit, FakeClock]) -> None:
    on_fetch, audit, clock = fetch
    on_fetch(PARTNER, FetchOutcome.OK, "2 usable keys")  # the first fetch: a row
    for _ in range(50):
        clock.advance(300)
        on_fetch(PARTNER, FetchOutcome.NOT_MODIFIED, "")
        on_fetch(PARTNER, FetchOutcome.OK, "2 usable keys")
    await on_fetch.drain()
    assert [(e.event_type, e.subject, e.outcome) for e in audit.queued] == [
        ("trust.jwks_fetch", PARTNER, "ok")]
    assert on_fetch.counts[(PARTNER, "not_modified")] == 50
    assert on_fetch.counts[(PARTNER, "ok")] == 51


async def test_changes_of_outcome_and_new_key_sets_are_audited(
        fetch: tuple[FetchAudit, MemoryAudit, FakeClock]) -> None:
    on_fetch, audit, clock = fetch
    sequence = [
        (FetchOutcome.OK, "2 usable keys", True),
        (FetchOutcome.OK, "3 usable keys", True),  # a new key set
        (FetchOutcome.ERROR, "timeout", True),
        (FetchOutcome.ERROR, "timeout", False),  # the same failure, soon after
        (FetchOutcome.REJECTED, "private key members", True),
        (FetchOutcome.STALE, "serving the last good set", True),
        (FetchOutcome.STALE, "serving the last good set, later", False),
        (FetchOutcome.EXPIRED, "past the maximum staleness", True),
        (FetchOutcome.NOT_MODIFIED, "", True),  # recovered
        (FetchOutcome.NOT_MODIFIED, "", False),
    ]
    expected = []
    for outcome, detail, audited in sequence:
        clock.advance(10)
        on_fetch(PARTNER, outcome, detail)
        if audited:
            expected.append(outcome.value)
    await on_fetch.drain()
    assert [e.outcome for e in audit.queued] == expected
    # Another issuer has a state of its own.
    on_fetch("https://c.example", FetchOutcome.NOT_MODIFIED, "")
    await on_fetch.drain()
    assert audit.queued[-1].subject == "https://c.example"


async def test_a_lasting_failure_is_audited_once_per_interval_with_what_was_skipped(
        fetch: tuple[FetchAudit, MemoryAudit, FakeClock]) -> None:
    on_fetch, audit, clock = fetch
    on_fetch(PARTNER, FetchOutcome.ERROR, "connection refused")
    for _ in range(9):
        clock.advance(REPEAT_EVERY / 10)
        on_fetch(PARTNER, FetchOutcome.ERROR, "connection refused")
    clock.advance(REPEAT_EVERY / 10)
    on_fetch(PARTNER, FetchOutcome.ERROR, "connection refused")
    await on_fetch.drain()
    assert [e.outcome for e in audit.queued] == ["error", "error"]
    assert audit.queued[1].details == {"detail": "connection refused", "not_recorded": 9}


async def test_fetch_audit_never_raises_into_the_cache(
        fetch: tuple[FetchAudit, MemoryAudit, FakeClock]) -> None:
    on_fetch, audit, _ = fetch
    audit.queue_full = True
    on_fetch(PARTNER, FetchOutcome.ERROR, "x" * 10_000)
    on_fetch(PARTNER, "no-such-outcome", "")  # an outcome of a newer cache
    await on_fetch.drain()
    assert on_fetch.dropped == 1
    assert on_fetch.counts[(PARTNER, "error")] == 2
    audit.queue_full = False
    on_fetch("https://c.example", FetchOutcome.OK, "y" * 10_000)
    await on_fetch.drain()
    assert len((audit.queued[-1].details or {})["detail"]) == 500


def test_fetch_audit_outside_an_event_loop_only_counts() -> None:
    audit = MemoryAudit()
    on_fetch = FetchAudit(audit, FakeClock())
    on_fetch(PARTNER, FetchOutcome.OK, "")
    assert on_fetch.counts[(PARTNER, "ok")] == 1 and audit.queued == []


# --- NullTrustedKeys -----------------------------------------------------------------------


async def test_the_null_cache_trusts_no_key() -> None:
    keys = NullTrustedKeys()
    keys.configure([replace(trust(), namespace="b:")])
    assert [i.issuer for i in keys.issuers] == [PARTNER]
    assert keys.issuer_keys(PARTNER) is None
    assert not await keys.await_kid(PARTNER, "kid", 0.1)
    status = await keys.refresh(PARTNER)
    assert not status.usable and status.last_outcome == "error" and status.last_error
    assert keys.status() == []
