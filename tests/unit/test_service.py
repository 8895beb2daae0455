"""The use cases of ``fedtoken.service`` over in-memory ports (tests/unit/fakes.py).

Wired as ``fedtoken.app`` wires them, with the real verification engine,
key resolver and revocation view; only the store, the HSM and the audit sink
are fakes. Errors are asserted by class and reason, never by message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from fedtoken.core import jose
from fedtoken.core.audit import AuditEvent
from fedtoken.core.errors import (
    AuditUnavailable,
    ErrorReason,
    FailedPrecondition,
    FedtokenError,
    HsmUnavailable,
    InvalidKeyTransition,
    InvalidRequest,
    KeyNotFound,
    NoActiveKey,
    PolicyViolation,
    StoreUnavailable,
    TenantExists,
    TenantNotFound,
    Unavailable,
)
from fedtoken.core.model import Expectation, KeyRecord, KeyState, Reason, Tenant
from fedtoken.core.ports import CallContext, Principal
from fedtoken.service.jobs import BOOTSTRAP_LOCK
from fedtoken.service.types import AuditQuery, Issued, IssueParams, NewTenant, RevokeParams
from tests.unit.fakes import (
    NOW,
    FakeClock,
    MemoryAudit,
    MemorySigner,
    MemoryStore,
    Services,
    SinkMode,
    VerificationEntry,
    build_services,
    issuer_for,
    rsa_key,
)

AUD = "api://orders"
EXPECT = Expectation(audience=AUD)
LEEWAY = 30
MAX_LIFETIME = 3600  # TenantPolicy() defaults
DEFAULT_LIFETIME = 900
CALLER = Principal(identity="spiffe://example.org/ns/shop/sa/orders", peer="ipv4:10.0.0.7:5000",
                   declared="orders")
CTX = CallContext(CALLER, request_id="req-1")
ADMIN = CallContext(Principal(identity="spiffe://example.org/ns/ops/sa/admin"), "req-admin")


@pytest.fixture
async def svc() -> AsyncIterator[Services]:
    """The services with no tenant yet."""
    s = build_services(leeway=LEEWAY)
    yield s
    await s.aclose()


@pytest.fixture
async def acme(svc: Services) -> Services:
    """After first start: tenant "acme" with one active key."""
    await svc.jobs.bootstrap("acme")
    return svc


async def issue(s: Services, subject: str = "alice", tenant: str = "acme", *,
                lifetime_seconds: int = 0, scope: str = "", extra_claims_json: str = "") -> Issued:
    return await s.tokens.issue(IssueParams(
        tenant=tenant, subject=subject, audience=[AUD], lifetime_seconds=lifetime_seconds,
        scope=scope, extra_claims_json=extra_claims_json), CTX)


def active_kid(s: Services, tenant: str = "acme") -> str:
    (kid,) = [k for k, st in s.store.key_states(tenant).items() if st is KeyState.ACTIVE]
    return kid


def ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def forged_token(issuer: str, kid: str) -> str:
    """A well-formed token for our issuer, signed by a key that is not ours."""
    now = NOW
    claims = {"iss": issuer, "sub": "mallory", "aud": AUD, "iat": now, "nbf": now,
              "exp": now + 600, "jti": "forged-jti"}
    signing_input = jose.encode_signing_input({"alg": "RS256", "typ": "JWT", "kid": kid}, claims)
    signature = rsa_key("forger").sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return jose.assemble(signing_input, signature)


# --- bootstrap --------------------------------------------------------------------


async def test_bootstrap_creates_the_default_tenant_and_one_active_key_exactly_once(
    svc: Services,
) -> None:
    await svc.jobs.bootstrap("acme")
    await svc.jobs.bootstrap("acme")

    assert list(svc.store.data.tenants) == ["acme"]
    assert svc.store.data.tenants["acme"].issuer == issuer_for("acme")
    assert list(svc.store.key_states("acme").values()) == [KeyState.ACTIVE]
    assert len(svc.signer.generated) == 1
    assert [e.event_type for e in svc.store.events()] == [
        "tenant.created", "key.generated", "key.activated"]
    assert {e.actor for e in svc.store.events()} == {"fedtoken:bootstrap"}
    assert svc.store.locks_taken[BOOTSTRAP_LOCK] == 2
    tenant = await svc.catalog.tenant("acme")
    assert svc.catalog.active_key(tenant).kid == active_kid(svc)


async def test_replicas_bootstrapping_together_create_one_tenant_and_one_key() -> None:
    clock, signer = FakeClock(), MemorySigner()
    store = MemoryStore(clock)
    a = build_services(clock=clock, store=store, signer=signer)
    b = build_services(clock=clock, store=store, signer=signer)
    try:
        await asyncio.gather(a.jobs.bootstrap("acme"), b.jobs.bootstrap("acme"))
        assert list(store.data.tenants) == ["acme"]
        assert list(store.key_states().values()) == [KeyState.ACTIVE]
        kid = active_kid(a)
        for s in (a, b):
            assert s.catalog.active_key(await s.catalog.tenant("acme")).kid == kid
    finally:
        await a.aclose()
        await b.aclose()


async def test_bootstrap_without_a_default_tenant_only_loads_the_catalog(svc: Services) -> None:
    await svc.jobs.bootstrap(None)
    assert svc.store.data.tenants == {}
    assert svc.store.loads == 1
    assert svc.store.locks_taken[BOOTSTRAP_LOCK] == 0


# --- issue ------------------------------------------------------------------------


async def test_issued_token_verifies_and_is_audited_with_the_callers_identity(
    acme: Services,
) -> None:
    issued = await issue(acme, lifetime_seconds=600, scope="read")

    verdict = acme.engine.verify(issued.token, EXPECT)
    assert verdict.valid, verdict.reason
    assert (verdict.tenant, verdict.subject, verdict.jti, verdict.kid) == (
        "acme", "alice", issued.jti, active_kid(acme))
    assert verdict.claims is not None
    assert verdict.claims["iss"] == issuer_for("acme")
    assert verdict.claims["scope"] == "read"
    assert (issued.issued_at, issued.expires_at) == (NOW, NOW + 600)
    (event,) = acme.store.events("token.issued")
    assert event.actor == CALLER.actor
    assert (event.tenant, event.subject, event.jti, event.kid, event.request_id) == (
        "acme", "alice", issued.jti, issued.kid, "req-1")
    assert acme.signer.signed[-1][0] == issued.kid


async def test_a_declared_name_is_never_the_actor_only_an_untrusted_detail(
    acme: Services,
) -> None:
    ctx = CallContext(Principal(peer="ipv4:10.0.0.9:4000", declared="batch-job"))
    await acme.tokens.issue(IssueParams(tenant="acme", subject="bob", audience=[AUD]), ctx)
    (event,) = acme.store.events("token.issued")
    assert event.actor == "unauthenticated@ipv4:10.0.0.9:4000"
    assert (event.details or {})["declared_caller"] == "batch-job"


async def test_default_lifetime_comes_from_the_tenant_policy(acme: Services) -> None:
    issued = await issue(acme)
    assert issued.expires_at - issued.issued_at == DEFAULT_LIFETIME


async def test_issue_is_refused_when_the_audit_record_cannot_be_made_durable(
    acme: Services,
) -> None:
    acme.audit.fail = True
    with pytest.raises(AuditUnavailable) as err:
        await issue(acme)
    assert err.value.reason is ErrorReason.AUDIT_UNAVAILABLE
    assert acme.audit.of_type("token.issued") == []
    assert acme.store.events("token.issued") == []


async def test_lifetime_over_the_policy_is_refused_before_signing(acme: Services) -> None:
    with pytest.raises(PolicyViolation) as err:
        await issue(acme, lifetime_seconds=MAX_LIFETIME + 1)
    assert err.value.reason is ErrorReason.LIFETIME_EXCEEDS_POLICY
    assert err.value.field == "lifetime_seconds"
    assert acme.signer.signed == []
    assert acme.audit.of_type("token.issued") == []

    issued = await issue(acme, lifetime_seconds=MAX_LIFETIME)  # the bound itself is allowed
    assert issued.expires_at - issued.issued_at == MAX_LIFETIME


async def test_negative_lifetime_is_refused(acme: Services) -> None:
    with pytest.raises(InvalidRequest) as err:
        await issue(acme, lifetime_seconds=-1)
    assert err.value.field == "lifetime_seconds"
    assert acme.signer.signed == []


async def test_reserved_extra_claims_are_refused(acme: Services) -> None:
    with pytest.raises(InvalidRequest) as err:
        await issue(acme, extra_claims_json=json.dumps({"sub": "root"}))
    assert err.value.reason is ErrorReason.RESERVED_CLAIM
    assert acme.signer.signed == []


@pytest.mark.parametrize("tenant", ["nope", "Bad\n", "../etc"])
async def test_issue_for_an_unknown_tenant_is_refused(acme: Services, tenant: str) -> None:
    with pytest.raises(TenantNotFound) as err:
        await issue(acme, tenant=tenant)
    assert err.value.reason is ErrorReason.TENANT_NOT_FOUND
    assert acme.signer.signed == []


async def test_issue_without_an_active_key_is_refused(acme: Services) -> None:
    await acme.keys.create_tenant(NewTenant(id="beta"), ADMIN)
    with pytest.raises(NoActiveKey) as err:
        await issue(acme, tenant="beta")
    assert err.value.reason is ErrorReason.NO_ACTIVE_KEY
    assert err.value.tenant == "beta"
    assert acme.signer.signed == []


async def test_issue_fails_unavailable_when_the_hsm_is_down(acme: Services) -> None:
    acme.signer.fail = True
    with pytest.raises(HsmUnavailable):
        await issue(acme)
    assert acme.audit.of_type("token.issued") == []


# --- revoke -----------------------------------------------------------------------


async def test_revoke_by_jti_is_stored_enforced_and_idempotent(acme: Services) -> None:
    issued = await issue(acme)
    first = await acme.tokens.revoke(RevokeParams(tenant="acme", jti=issued.jti,
                                                  reason="lost laptop"), ADMIN)
    assert (first.created, first.kind, first.value, first.tenant) == (
        True, "jti", issued.jti, "acme")
    (row,) = acme.store.revocations.rows()
    assert (row.kind, row.value, row.reason, row.actor) == (
        "jti", issued.jti, "lost laptop", ADMIN.actor)
    assert row.expires_at == ts(NOW + MAX_LIFETIME + LEEWAY)
    assert acme.engine.verify(issued.token, EXPECT).reason is Reason.REVOKED
    assert (await acme.tokens.introspect(issued.token, CTX)).reason is Reason.REVOKED

    again = await acme.tokens.revoke(RevokeParams(tenant="acme", jti=issued.jti), ADMIN)
    assert again.created is False
    assert again.revoked_at == first.revoked_at == NOW
    # Later, the default expiry is later: the revocation is widened, a change.
    acme.clock.advance(5)
    wider = await acme.tokens.revoke(RevokeParams(tenant="acme", jti=issued.jti), ADMIN)
    assert (wider.created, wider.revoked_at) == (True, NOW + 5)
    (row,) = acme.store.revocations.rows()
    assert row.expires_at == ts(NOW + 5 + MAX_LIFETIME + LEEWAY)
    # Every request is audited, changed or not.
    assert len(acme.store.events("token.revoked")) == 3


async def test_revoke_by_token_revokes_its_jti_until_it_expires(acme: Services) -> None:
    issued = await issue(acme, lifetime_seconds=600)
    other = await issue(acme)
    revoked = await acme.tokens.revoke(RevokeParams(token=issued.token), ADMIN)
    assert (revoked.created, revoked.kind, revoked.value, revoked.jti, revoked.tenant) == (
        True, "jti", issued.jti, issued.jti, "acme")
    (row,) = acme.store.revocations.rows()
    assert row.expires_at == ts(issued.expires_at + LEEWAY)
    assert acme.engine.verify(issued.token, EXPECT).reason is Reason.REVOKED
    assert acme.engine.verify(other.token, EXPECT).valid


async def test_revoking_an_expired_token_stores_nothing(acme: Services) -> None:
    issued = await issue(acme, lifetime_seconds=600)
    acme.clock.set(issued.expires_at + LEEWAY)
    revoked = await acme.tokens.revoke(RevokeParams(token=issued.token), ADMIN)
    assert revoked.created is False
    assert revoked.value == issued.jti
    assert acme.store.revocations.rows() == []
    assert acme.store.calls["revocations.revoke"] == 0


@pytest.mark.parametrize("token", ["a.b.c", "not-a-token", "forged"])
async def test_revoke_by_token_needs_a_genuine_token_of_ours(acme: Services, token: str) -> None:
    if token == "forged":
        token = forged_token(issuer_for("acme"), active_kid(acme))
    with pytest.raises(InvalidRequest) as err:
        await acme.tokens.revoke(RevokeParams(token=token), ADMIN)
    assert err.value.reason is ErrorReason.INVALID_TOKEN
    assert acme.store.revocations.rows() == []


async def test_revoke_subject_revokes_tokens_issued_before_the_cut(acme: Services) -> None:
    old = await issue(acme, "alice")
    bystander = await issue(acme, "bob")
    acme.clock.advance(10)
    revoked = await acme.tokens.revoke(RevokeParams(tenant="acme", subject="alice"), ADMIN)
    assert (revoked.created, revoked.kind, revoked.value) == (True, "subject", "alice")
    (row,) = acme.store.revocations.rows()
    assert row.not_before is not None
    # The cut is now (or just after it); every token issued before it has
    # expired one maximum lifetime (plus leeway) after it.
    assert ts(NOW + 10) <= row.not_before <= ts(NOW + 11)
    assert row.expires_at == row.not_before + timedelta(seconds=MAX_LIFETIME + LEEWAY)

    acme.clock.advance(1)
    fresh = await issue(acme, "alice")
    assert acme.engine.verify(old.token, EXPECT).reason is Reason.REVOKED
    assert (await acme.tokens.introspect(old.token, CTX)).reason is Reason.REVOKED
    assert acme.engine.verify(fresh.token, EXPECT).valid
    assert (await acme.tokens.introspect(fresh.token, CTX)).active
    assert acme.engine.verify(bystander.token, EXPECT).valid


async def test_revoke_subject_catches_a_token_issued_in_the_same_second(acme: Services) -> None:
    issued = await issue(acme, "alice")
    await acme.tokens.revoke(RevokeParams(tenant="acme", subject="alice"), ADMIN)
    assert acme.engine.verify(issued.token, EXPECT).reason is Reason.REVOKED


@pytest.mark.parametrize("issued_before", [NOW + LEEWAY + 1, NOW + 86400, -5])
async def test_revoke_subject_refuses_a_cut_in_the_future(
    acme: Services, issued_before: int,
) -> None:
    with pytest.raises(InvalidRequest) as err:
        await acme.tokens.revoke(RevokeParams(tenant="acme", subject="alice",
                                              issued_before=issued_before), ADMIN)
    assert err.value.field == "issued_before"
    assert acme.store.revocations.rows() == []
    assert acme.audit.of_type("token.revoked") == []


async def test_revoke_subject_with_an_explicit_past_cut(acme: Services) -> None:
    old = await issue(acme, "alice")
    acme.clock.advance(100)
    newer = await issue(acme, "alice")
    await acme.tokens.revoke(RevokeParams(tenant="acme", subject="alice",
                                          issued_before=NOW + 50), ADMIN)
    assert acme.engine.verify(old.token, EXPECT).reason is Reason.REVOKED
    assert acme.engine.verify(newer.token, EXPECT).valid


async def test_revoke_by_kid_compromises_the_key_and_activates_a_replacement(
    acme: Services,
) -> None:
    old_kid = active_kid(acme)
    old = await issue(acme)
    revoked = await acme.tokens.revoke(RevokeParams(tenant="acme", kid=old_kid,
                                                    reason="key leaked"), ADMIN)
    assert (revoked.created, revoked.kind, revoked.value) == (True, "key", old_kid)

    states = acme.store.key_states("acme")
    assert states[old_kid] is KeyState.COMPROMISED
    new_kid = active_kid(acme)
    assert new_kid != old_kid
    assert len(states) == 2
    (row,) = acme.store.revocations.rows()
    assert (row.kind, row.value) == ("key", old_kid)
    (event,) = acme.store.events("key.compromised")
    assert (event.kid, event.actor, event.reason) == (old_kid, ADMIN.actor, "key leaked")
    assert event.details is not None and event.details["previous_state"] == "ACTIVE"

    new = await issue(acme)
    assert new.kid == new_kid
    assert acme.engine.verify(new.token, EXPECT).valid
    assert acme.engine.verify(old.token, EXPECT).reason is Reason.KEY_REVOKED
    introspected = await acme.tokens.introspect(old.token, CTX)
    assert not introspected.active
    key_set = await acme.catalog.key_set("acme")
    assert [k.kid for k in key_set.keys] == [new_kid]


async def test_compromising_a_pending_key_generates_no_replacement(acme: Services) -> None:
    signing = active_kid(acme)
    pending = await acme.keys.generate_key("acme", 0, False, ADMIN)
    await acme.tokens.revoke(RevokeParams(tenant="acme", kid=pending.kid), ADMIN)
    assert acme.store.key_states("acme") == {signing: KeyState.ACTIVE,
                                             pending.kid: KeyState.COMPROMISED}
    assert len(acme.signer.generated) == 2


async def test_compromise_refuses_foreign_unknown_and_already_compromised_keys(
    acme: Services,
) -> None:
    await acme.keys.create_tenant(NewTenant(id="beta", generate_key=True), ADMIN)
    beta_kid = active_kid(acme, "beta")
    for kid in (beta_kid, "no-such-kid"):
        with pytest.raises(KeyNotFound):
            await acme.tokens.revoke(RevokeParams(tenant="acme", kid=kid), ADMIN)
    assert acme.store.key_states("beta")[beta_kid] is KeyState.ACTIVE

    kid = active_kid(acme)
    await acme.tokens.revoke(RevokeParams(tenant="acme", kid=kid), ADMIN)
    with pytest.raises(InvalidKeyTransition):
        await acme.tokens.revoke(RevokeParams(tenant="acme", kid=kid), ADMIN)
    assert len(acme.store.events("key.compromised")) == 1


async def test_revoke_and_its_audit_event_commit_together_in_direct_mode(
    acme: Services,
) -> None:
    issued = await issue(acme)
    await acme.tokens.revoke(RevokeParams(tenant="acme", jti="other-jti"), ADMIN)
    (event,) = acme.store.events("token.revoked")
    assert acme.audit.handed == [event]  # the store appended it in the write's transaction
    assert event.jti == "other-jti"

    acme.store.faults["audit.append"] = StoreUnavailable("audit append failed")
    with pytest.raises(Unavailable):
        await acme.tokens.revoke(RevokeParams(tenant="acme", jti=issued.jti), ADMIN)
    # Rolled back together: no revocation without its audit record, and not enforced.
    assert [r.value for r in acme.store.revocations.rows()] == ["other-jti"]
    assert len(acme.store.events("token.revoked")) == 1
    assert acme.engine.verify(issued.token, EXPECT).valid


async def test_compromise_rolls_back_the_key_state_when_the_revocation_fails(
    acme: Services,
) -> None:
    kid = active_kid(acme)
    acme.store.faults["audit.append"] = StoreUnavailable("audit append failed")
    with pytest.raises(Unavailable):
        await acme.tokens.revoke(RevokeParams(tenant="acme", kid=kid), ADMIN)
    assert acme.store.key_states("acme") == {kid: KeyState.ACTIVE}
    assert acme.store.revocations.rows() == []
    assert len(acme.signer.generated) == 1
    assert acme.engine.verify((await issue(acme)).token, EXPECT).valid


async def test_revoke_in_spill_mode_writes_first_and_records_the_event_after() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    audit = MemoryAudit(store, mode=SinkMode.SPILL)
    s = build_services(clock=clock, store=store, audit=audit)
    try:
        await s.jobs.bootstrap("acme")
        seen: list[tuple[str, list[str]]] = []

        def on_durable(event: AuditEvent) -> None:
            seen.append((event.event_type, [r.value for r in store.revocations.rows()]))

        audit.on_durable = on_durable
        await s.tokens.revoke(RevokeParams(tenant="acme", jti="j-1"), ADMIN)
        assert audit.handed == [None]
        assert store.events("token.revoked") == []  # not in the store's transaction
        assert [e.event_type for e in audit.spilled][-1] == "token.revoked"
        assert seen == [("token.revoked", ["j-1"])]  # the revocation was already stored
    finally:
        await s.aclose()


@pytest.mark.parametrize("params", [
    RevokeParams(tenant="acme"),
    RevokeParams(tenant="acme", jti="j", subject="alice"),
    RevokeParams(tenant="acme", token="t.t.t", jti="j"),
    RevokeParams(tenant="acme", jti="j", kid="k"),
    RevokeParams(tenant="acme", token="t.t.t", jti="j", subject="s", kid="k"),
], ids=["none", "jti+subject", "token+jti", "jti+kid", "all"])
async def test_revoke_needs_exactly_one_target(acme: Services, params: RevokeParams) -> None:
    with pytest.raises(InvalidRequest) as err:
        await acme.tokens.revoke(params, ADMIN)
    assert err.value.field == "target"
    assert acme.store.revocations.rows() == []
    assert acme.audit.of_type("token.revoked") == []


async def test_revoke_reason_is_bounded(acme: Services) -> None:
    with pytest.raises(InvalidRequest) as err:
        await acme.tokens.revoke(RevokeParams(tenant="acme", jti="j", reason="x" * 201), ADMIN)
    assert err.value.field == "reason"


# --- introspect -------------------------------------------------------------------


async def test_introspect_reports_an_active_token(acme: Services) -> None:
    issued = await issue(acme)
    result = await acme.tokens.introspect(issued.token, CTX)
    assert result.active
    assert result.reason is Reason.OK
    assert (result.tenant, result.kid) == ("acme", issued.kid)
    assert result.claims["sub"] == "alice"
    assert result.claims["aud"] == AUD
    (event,) = acme.audit.of_type("token.introspected")
    assert (event.outcome, event.actor, event.jti) == ("active", CALLER.actor, issued.jti)


async def test_introspect_asks_the_store_not_the_local_view(acme: Services) -> None:
    issued = await issue(acme)
    # Revoked by another replica: this replica's view has not heard of it yet.
    await acme.store.revocations.revoke("acme", "jti", issued.jti,
                                        expires_at=ts(NOW + 3600), now=ts(NOW))
    assert acme.engine.verify(issued.token, EXPECT).valid
    result = await acme.tokens.introspect(issued.token, CTX)
    assert (result.active, result.reason) == (False, Reason.REVOKED)
    assert acme.audit.of_type("token.introspected")[-1].outcome == "inactive"


async def test_introspect_fails_closed_when_the_store_is_unavailable(acme: Services) -> None:
    issued = await issue(acme)
    acme.store.unavailable = True
    result = await acme.tokens.introspect(issued.token, CTX)
    assert (result.active, result.reason) == (False, Reason.REVOCATION_UNAVAILABLE)
    assert result.claims == {}
    assert acme.audit.of_type("token.introspected")[-1].reason == "REVOCATION_UNAVAILABLE"


async def test_introspect_of_a_bad_token_is_inactive(acme: Services) -> None:
    result = await acme.tokens.introspect("a.b.c", CTX)
    assert (result.active, result.reason) == (False, Reason.MALFORMED)
    assert acme.store.calls["revocations.is_revoked"] == 0
    with pytest.raises(InvalidRequest) as err:
        await acme.tokens.introspect("", CTX)
    assert err.value.field == "token"


# --- verify -----------------------------------------------------------------------


async def test_verify_returns_the_verdict_and_records_it(acme: Services) -> None:
    issued = await issue(acme)
    expect = Expectation(audience=AUD, tenant="acme")
    verdict = await acme.verification.verify(issued.token, expect, CTX)
    assert verdict.valid
    assert acme.audit.verifications == [
        VerificationEntry("acme", CALLER.actor, "req-1", (verdict,))]


async def test_verify_batch_keeps_order_and_records_every_verdict(acme: Services) -> None:
    good = await issue(acme, "alice")
    revoked = await issue(acme, "bob")
    await acme.tokens.revoke(RevokeParams(tenant="acme", jti=revoked.jti), ADMIN)
    verdicts = await acme.verification.verify_batch(
        [good.token, "garbage", revoked.token], EXPECT, CTX)
    assert [v.reason for v in verdicts] == [Reason.OK, Reason.MALFORMED, Reason.REVOKED]
    (entry,) = acme.audit.verifications
    assert list(entry.verdicts) == verdicts
    assert (entry.actor, entry.request_id) == (CALLER.actor, "req-1")


async def test_verify_batch_over_the_limit_is_refused(acme: Services) -> None:
    token = (await issue(acme)).token
    with pytest.raises(InvalidRequest) as err:
        await acme.verification.verify_batch([token] * 9, EXPECT, CTX)  # max_batch is 8
    assert err.value.reason is ErrorReason.BATCH_TOO_LARGE
    assert acme.audit.verifications == []
    assert len(await acme.verification.verify_batch([token] * 8, EXPECT, CTX)) == 8


async def test_verify_needs_an_audience_and_a_token(acme: Services) -> None:
    token = (await issue(acme)).token
    no_audience = Expectation(audience="")
    with pytest.raises(InvalidRequest) as err:
        await acme.verification.verify(token, no_audience, CTX)
    assert err.value.field == "audience"
    with pytest.raises(InvalidRequest) as err:
        await acme.verification.verify_batch([token], no_audience, CTX)
    assert err.value.field == "audience"
    with pytest.raises(InvalidRequest) as err:
        await acme.verification.verify("", EXPECT, CTX)
    assert err.value.field == "token"
    assert acme.audit.verifications == []


# --- key administration -----------------------------------------------------------


async def test_key_lifecycle_generate_activate_retire(acme: Services) -> None:
    first = active_kid(acme)
    old = await issue(acme)

    pending = await acme.keys.generate_key("acme", 0, False, ADMIN)
    assert pending.state is KeyState.PENDING
    assert pending.key_size == 2048
    assert {k.kid for k in (await acme.catalog.key_set("acme")).keys} == {first, pending.kid}
    assert (await issue(acme)).kid == first  # a pending key publishes, it does not sign

    activated = await acme.keys.activate_key("acme", pending.kid, ADMIN)
    assert activated.state is KeyState.ACTIVE
    assert acme.store.key_states("acme") == {first: KeyState.RETIRING,
                                             pending.kid: KeyState.ACTIVE}
    assert (await issue(acme)).kid == pending.kid
    assert acme.engine.verify(old.token, EXPECT).valid  # retiring keys still verify

    # Within the grace (max lifetime + max-age + leeway) only an emergency retires it.
    with pytest.raises(FailedPrecondition) as early:
        await acme.keys.retire_key("acme", first, ADMIN)
    assert early.value.reason is ErrorReason.GRACE_NOT_OVER
    assert acme.engine.verify(old.token, EXPECT).valid
    acme.clock.advance(3600 + 300 + 30 + 1)
    retired = await acme.keys.retire_key("acme", first, ADMIN)
    assert retired.state is KeyState.RETIRED
    assert "emergency" not in (acme.store.events("key.retired")[-1].details or {})
    assert acme.engine.verify(old.token, EXPECT).reason is Reason.KEY_INACTIVE
    assert [k.kid for k in (await acme.catalog.key_set("acme")).keys] == [pending.kid]
    assert [(e.event_type, e.kid) for e in acme.store.events() if e.actor == ADMIN.actor] == [
        ("key.generated", pending.kid), ("key.activated", pending.kid),
        ("key.retired", first)]


async def test_retiring_a_pending_key_makes_it_retiring(acme: Services) -> None:
    pending = await acme.keys.generate_key("acme", 0, False, ADMIN)
    record = await acme.keys.retire_key("acme", pending.kid, ADMIN)
    assert record.state is KeyState.RETIRING
    assert acme.store.events()[-1].event_type == "key.retiring"


async def test_the_active_key_cannot_be_retired(acme: Services) -> None:
    kid = active_kid(acme)
    with pytest.raises(InvalidKeyTransition) as err:
        await acme.keys.retire_key("acme", kid, ADMIN)
    assert err.value.reason is ErrorReason.INVALID_KEY_TRANSITION
    assert acme.store.key_states("acme") == {kid: KeyState.ACTIVE}


async def test_only_a_pending_key_can_be_activated(acme: Services) -> None:
    first = active_kid(acme)
    with pytest.raises(InvalidKeyTransition):
        await acme.keys.activate_key("acme", first, ADMIN)
    second = await acme.keys.generate_key("acme", 0, True, ADMIN)
    assert acme.store.key_states("acme")[first] is KeyState.RETIRING
    with pytest.raises(InvalidKeyTransition):
        await acme.keys.activate_key("acme", first, ADMIN)
    assert active_kid(acme) == second.kid


async def test_keys_of_another_tenant_are_not_found(acme: Services) -> None:
    await acme.keys.create_tenant(NewTenant(id="beta", generate_key=True), ADMIN)
    beta_kid = active_kid(acme, "beta")
    for call in (acme.keys.activate_key, acme.keys.retire_key):
        for kid in (beta_kid, "no-such-kid", ""):
            with pytest.raises(KeyNotFound) as err:
                await call("acme", kid, ADMIN)
            assert err.value.reason is ErrorReason.KEY_NOT_FOUND
    assert acme.store.key_states("beta") == {beta_kid: KeyState.ACTIVE}
    assert [k.kid for k in await acme.keys.list_keys("beta", ADMIN)] == [beta_kid]


@pytest.mark.parametrize("bits", [1024, 2049, 16384])
async def test_generate_key_refuses_a_bad_key_size(acme: Services, bits: int) -> None:
    with pytest.raises(PolicyViolation) as err:
        await acme.keys.generate_key("acme", bits, True, ADMIN)
    assert err.value.field == "key_size"
    assert err.value.tenant == "acme"
    assert len(acme.signer.generated) == 1


async def test_generate_key_destroys_the_hsm_key_when_the_store_refuses_it(
    acme: Services,
) -> None:
    before = set(acme.signer.keys)
    acme.store.faults["keys.insert"] = StoreUnavailable("insert failed")
    with pytest.raises(StoreUnavailable):
        await acme.keys.generate_key("acme", 0, True, ADMIN)
    assert set(acme.signer.keys) == before


@pytest.mark.parametrize("tenant_id", ["a\n", "A", "-a", "", "a" * 64, "a/b", "a b", "é"])
async def test_create_tenant_refuses_a_bad_id(svc: Services, tenant_id: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        await svc.keys.create_tenant(NewTenant(id=tenant_id, issuer="https://x.example/t"),
                                     ADMIN)
    assert err.value.field == "id"
    assert svc.store.calls["tenants.create"] == 0


@pytest.mark.parametrize("issuer", [
    "http://auth.example/t/x", "ftp://auth.example/t/x", "https://auth.example/t?x=1",
    "https://auth.example/t#x", "auth.example/t/x", "https://", "https://a.example/" + "x" * 512,
])
async def test_create_tenant_refuses_a_bad_issuer(svc: Services, issuer: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        await svc.keys.create_tenant(NewTenant(id="beta", issuer=issuer), ADMIN)
    assert err.value.field == "issuer"
    assert svc.store.calls["tenants.create"] == 0


async def test_create_tenant_allows_http_on_loopback(svc: Services) -> None:
    tenant = await svc.keys.create_tenant(NewTenant(id="dev", issuer="http://localhost:8080/t"),
                                          ADMIN)
    assert tenant.issuer == "http://localhost:8080/t"


@pytest.mark.parametrize(("request_", "field"), [
    (NewTenant(id="beta", key_size=1024), "key_size"),
    (NewTenant(id="beta", key_size=2050), "key_size"),
    (NewTenant(id="beta", max_token_lifetime_seconds=30), "max_token_lifetime_seconds"),
    (NewTenant(id="beta", max_token_lifetime_seconds=600, default_token_lifetime_seconds=601),
     "default_token_lifetime_seconds"),
    (NewTenant(id="beta", allowed_algorithms=("HS256",)), "allowed_algorithms"),
], ids=["small-key", "odd-key", "short-max", "default-over-max", "hs256"])
async def test_create_tenant_refuses_a_bad_policy(
    svc: Services, request_: NewTenant, field: str,
) -> None:
    with pytest.raises(PolicyViolation) as err:
        await svc.keys.create_tenant(request_, ADMIN)
    assert err.value.field == field
    assert svc.store.calls["tenants.create"] == 0


async def test_create_tenant_applies_defaults_audits_and_can_generate_a_key(
    svc: Services,
) -> None:
    tenant = await svc.keys.create_tenant(
        NewTenant(id="beta", max_token_lifetime_seconds=600, generate_key=True), ADMIN)
    assert tenant.issuer == issuer_for("beta")
    assert (tenant.policy.max_token_lifetime_seconds,
            tenant.policy.default_token_lifetime_seconds) == (600, 600)
    assert tenant.created_at == NOW
    assert (await svc.keys.get_tenant("beta", ADMIN)) == tenant
    assert list(svc.store.key_states("beta").values()) == [KeyState.ACTIVE]
    (event,) = svc.store.events("tenant.created")
    assert (event.tenant, event.actor) == ("beta", ADMIN.actor)


async def test_create_tenant_refuses_a_taken_id_or_issuer(acme: Services) -> None:
    with pytest.raises(TenantExists) as err:
        await acme.keys.create_tenant(NewTenant(id="acme", issuer="https://other.example/t"),
                                      ADMIN)
    assert (err.value.field, err.value.tenant) == ("id", "acme")
    with pytest.raises(TenantExists) as err:
        await acme.keys.create_tenant(NewTenant(id="beta", issuer=issuer_for("acme")), ADMIN)
    assert (err.value.field, err.value.tenant) == ("issuer", "beta")
    assert list(acme.store.data.tenants) == ["acme"]
    assert len(acme.store.events("tenant.created")) == 1


async def test_list_tenants_reads_through_to_the_store(acme: Services) -> None:
    await acme.store.tenants.create(Tenant("zeta", issuer_for("zeta")), now=ts(NOW))
    assert [t.id for t in await acme.keys.list_tenants(ADMIN)] == ["acme", "zeta"]


@pytest.mark.parametrize("query", [
    AuditQuery(page_size=-1), AuditQuery(page_size=1001), AuditQuery(after_seq=-1),
    AuditQuery(since=-1), AuditQuery(until=-1),
], ids=["page-negative", "page-too-big", "after-negative", "since-negative", "until-negative"])
async def test_list_audit_refuses_out_of_bounds_queries(
    acme: Services, query: AuditQuery,
) -> None:
    with pytest.raises(InvalidRequest):
        await acme.keys.list_audit(query, ADMIN)
    assert acme.store.calls["audit.list"] == 0


async def test_list_audit_pages_and_filters(acme: Services) -> None:
    await acme.keys.create_tenant(NewTenant(id="beta"), ADMIN)
    every = await acme.keys.list_audit(AuditQuery(page_size=0), ADMIN)  # 0: the default page
    assert [r.event.event_type for r in every] == [
        "tenant.created", "key.generated", "key.activated", "tenant.created"]
    assert [r.seq for r in every] == [1, 2, 3, 4]
    assert len(await acme.keys.list_audit(AuditQuery(page_size=1000), ADMIN)) == 4

    page = await acme.keys.list_audit(AuditQuery(page_size=2), ADMIN)
    rest = await acme.keys.list_audit(AuditQuery(page_size=2, after_seq=page[-1].seq), ADMIN)
    assert [r.seq for r in page + rest] == [1, 2, 3, 4]
    beta = await acme.keys.list_audit(AuditQuery(tenant="beta"), ADMIN)
    assert [(r.event.tenant, r.event.event_type) for r in beta] == [("beta", "tenant.created")]
    generated = await acme.keys.list_audit(AuditQuery(event_type="key.generated"), ADMIN)
    assert [r.seq for r in generated] == [2]
    assert (await acme.keys.verify_audit_chain(ADMIN)).ok


# --- jobs -------------------------------------------------------------------------


async def test_purge_forgets_expired_revocations_in_store_and_memory(acme: Services) -> None:
    issued = await issue(acme, lifetime_seconds=60)
    await acme.tokens.revoke(RevokeParams(token=issued.token), ADMIN)
    assert await acme.jobs.purge_expired() == 0
    acme.clock.set(issued.expires_at + LEEWAY)
    assert await acme.jobs.purge_expired() == 1
    assert acme.store.revocations.rows() == []
    assert acme.revocations.size == 1  # the view drops entries by the minute
    acme.clock.advance(120)
    assert await acme.jobs.purge_expired() == 0
    assert acme.revocations.size == 0


async def test_purge_reports_store_failures(acme: Services) -> None:
    acme.store.unavailable = True
    with pytest.raises(FedtokenError):
        await acme.jobs.purge_expired()


# --- the fakes keep the store's contract ------------------------------------------


async def test_fake_store_refuses_duplicate_tenants_and_a_second_active_key() -> None:
    store = MemoryStore(FakeClock())
    await store.tenants.create(Tenant("acme", issuer_for("acme")), now=ts(NOW))
    for dup, field in ((Tenant("acme", "https://other.example"), "id"),
                       (Tenant("beta", issuer_for("acme")), "issuer")):
        with pytest.raises(TenantExists) as err:
            await store.tenants.create(dup, now=ts(NOW))
        assert err.value.field == field
    signer = MemorySigner()
    records = []
    for _ in range(2):
        g = await signer.generate("acme", 2048)
        records.append(await store.keys.insert(KeyRecord(
            g.kid, "acme", "RS256", 2048, KeyState.PENDING, g.public_jwk, g.hsm_label)))
    a, b = records
    await store.keys.activate("acme", a.kid, now=ts(NOW))
    with pytest.raises(InvalidKeyTransition):
        await store.keys.set_state(b.kid, KeyState.ACTIVE, expected=[KeyState.PENDING],
                                   now=ts(NOW))
    with pytest.raises(InvalidKeyTransition):  # compare-and-set: a is not PENDING
        await store.keys.set_state(a.kid, KeyState.RETIRED, expected=[KeyState.PENDING],
                                   now=ts(NOW))
    with pytest.raises(KeyNotFound):
        await store.keys.set_state("nope", KeyState.RETIRED, expected=[KeyState.PENDING],
                                   now=ts(NOW))
    await store.keys.activate("acme", b.kid, now=ts(NOW + 1))
    assert store.key_states() == {a.kid: KeyState.RETIRING, b.kid: KeyState.ACTIVE}
    retiring = await store.keys.get(a.kid)
    assert retiring is not None and retiring.retiring_at == NOW + 1


async def test_fake_store_revoke_upserts_widens_and_rolls_back() -> None:
    store = MemoryStore(FakeClock())
    await store.tenants.create(Tenant("acme", issuer_for("acme")), now=ts(NOW))
    event = AuditEvent("token.revoked", tenant="acme")
    revoke = store.revocations.revoke
    assert await revoke("acme", "subject", "alice", expires_at=ts(NOW + 100), now=ts(NOW),
                        audit=event) == (True, ts(NOW))
    assert await revoke("acme", "subject", "alice", expires_at=ts(NOW + 50),
                        now=ts(NOW + 5), not_before=ts(NOW - 5), audit=event) == (False, ts(NOW))
    assert await revoke("acme", "subject", "alice", expires_at=ts(NOW + 50),
                        now=ts(NOW + 9), not_before=ts(NOW + 9)) == (True, ts(NOW + 9))
    (row,) = store.revocations.rows()
    assert (row.not_before, row.expires_at) == (ts(NOW + 9), ts(NOW + 100))
    assert len(store.events("token.revoked")) == 2  # audited, changed or not
    is_revoked = store.revocations.is_revoked
    assert await is_revoked("acme", "", "alice", NOW + 8, "", now=ts(NOW + 10))
    assert not await is_revoked("acme", "", "alice", NOW + 9, "", now=ts(NOW + 10))
    assert not await is_revoked("acme", "", "alice", NOW, "", now=ts(NOW + 100))  # expired
    with pytest.raises(InvalidRequest):
        await revoke("acme", "jti", "j", expires_at=ts(NOW), now=ts(NOW), not_before=ts(NOW))
    with pytest.raises(TenantNotFound):
        await revoke("nope", "jti", "j", expires_at=ts(NOW + 1), now=ts(NOW))

    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.revocations.revoke("acme", "jti", "j", expires_at=ts(NOW + 1), now=ts(NOW))
            raise RuntimeError("roll back")
    assert [r.value for r in store.revocations.rows()] == ["alice"]
    assert (await store.audit.verify_chain()).ok
