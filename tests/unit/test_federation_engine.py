"""The engine and Verification on foreign tokens (pure, with an in-memory
trusted key cache): a trusted issuer's token verifies only for a tenant that
trusts it, pinned to its algorithms and audiences, revocations of foreign
tokens are namespaced by issuer, and an unknown foreign kid gets one bounded
refetch."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from fedtoken.core.jwk import rsa_public_jwk
from fedtoken.core.keys import load_rsa_public_key
from fedtoken.core.model import Expectation, KeyState, Reason, foreign_ref
from fedtoken.core.ports import IssuerKeys, VerificationKey
from fedtoken.core.trust import IssuerStatus
from fedtoken.verifier import LocalKeyResolver, VerificationEngine
from fedtoken.verifier.federated import FederatedResolver
from tests.unit._world import (
    AUDIENCE,
    NOW,
    TENANTS,
    FakeRevocations,
    FixedClock,
    b64url_encode,
    record,
    rsa_key,
    segment,
    sign,
)

ISS_F = "https://partner.example"


def fkey(name: str, alg: str = "RS256") -> VerificationKey:
    n = rsa_key(name).public_key().public_numbers()
    jwk = rsa_public_jwk(n.n, n.e)
    return VerificationKey(kid=jwk["kid"], tenant="", issuer=ISS_F, alg=alg,
                           public_key=load_rsa_public_key(jwk), state=KeyState.ACTIVE,
                           foreign=True)


@dataclass
class Trusted:
    """TrustedKeys in memory; ``later`` are keys a refetch would find."""

    keys: dict[str, VerificationKey] = field(default_factory=dict)
    later: dict[str, VerificationKey] = field(default_factory=dict)
    tenants: frozenset[str] = frozenset({"acme"})
    audiences: frozenset[str] = frozenset()
    waits: list[tuple[str, str]] = field(default_factory=list)

    def configure(self, issuers: object) -> None:  # pragma: no cover - unused here
        pass

    def issuer_keys(self, issuer: str) -> IssuerKeys | None:
        if issuer != ISS_F:
            return None
        return IssuerKeys(tenant="", issuer=ISS_F, allowed_algorithms=frozenset({"RS256"}),
                          keys=dict(self.keys), withdrawn={}, local=False,
                          trusted_by=self.tenants, audiences=self.audiences)

    async def await_kid(self, issuer: str, kid: str, timeout: float) -> bool:
        self.waits.append((issuer, kid))
        if kid in self.later:
            self.keys[kid] = self.later.pop(kid)
        return kid in self.keys

    async def refresh(self, issuer: str) -> IssuerStatus:  # pragma: no cover
        return IssuerStatus(issuer)

    def status(self) -> list[IssuerStatus]:  # pragma: no cover
        return []


def token(key_name: str, kid: str, **claims: object) -> str:
    body = {"iss": ISS_F, "sub": "bob", "aud": AUDIENCE, "iat": NOW - 10, "exp": NOW + 300,
            "jti": "f-jti-1", **claims}
    header = {"alg": "RS256", "typ": "JWT", "kid": kid}
    signing_input = f"{segment(header)}.{segment(body)}".encode()
    signature = sign(rsa_key(key_name), "RS256", signing_input)
    return f"{signing_input.decode()}.{b64url_encode(signature)}"


@pytest.fixture
def world() -> tuple[VerificationEngine, Trusted, FakeRevocations]:
    local = LocalKeyResolver()
    local.replace(TENANTS, [record("a_active", "acme", KeyState.ACTIVE),
                            record("b_active", "beta", KeyState.ACTIVE)])
    trusted = Trusted(keys={(k := fkey("f1")).kid: k})
    revocations = FakeRevocations()
    engine = VerificationEngine(FederatedResolver(local, trusted), revocations,
                                clock=FixedClock())
    return engine, trusted, revocations


def kid(name: str) -> str:
    return fkey(name).kid


def test_a_foreign_token_verifies_only_for_a_tenant_that_trusts_its_issuer(world) -> None:  # type: ignore[no-untyped-def]
    engine, _, _ = world
    t = token("f1", kid("f1"))
    ok = engine.verify(t, Expectation(audience=AUDIENCE, tenant="acme"))
    assert ok.valid and ok.foreign and (ok.tenant, ok.issuer, ok.subject) == ("acme", ISS_F, "bob")
    # Another tenant, or none at all: untrusted (isolation extends to trust).
    for tenant in ("beta", ""):
        v = engine.verify(t, Expectation(audience=AUDIENCE, tenant=tenant))
        assert (v.valid, v.reason, v.foreign) == (False, Reason.UNTRUSTED_ISSUER, True)
    # An issuer nobody trusts.
    other = token("f1", kid("f1"), iss="https://stranger.example")
    assert engine.verify(other, Expectation(audience=AUDIENCE, tenant="acme")).reason \
        is Reason.UNTRUSTED_ISSUER


def test_foreign_tokens_are_pinned_to_the_issuer_and_its_audiences(world) -> None:  # type: ignore[no-untyped-def]
    engine, trusted, _ = world
    expect = Expectation(audience=AUDIENCE, tenant="acme")
    # Signed by another key under the trusted kid: bad signature.
    assert engine.verify(token("f2", kid("f1")), expect).reason is Reason.BAD_SIGNATURE
    # A local tenant's key id under the foreign iss is just unknown there.
    local_kid = record("a_active", "acme", KeyState.ACTIVE).kid
    assert engine.verify(token("a_active", local_kid), expect).reason is Reason.UNKNOWN_KEY
    trusted.audiences = frozenset({"only-this"})
    v = engine.verify(token("f1", kid("f1")), expect)
    assert (v.reason, v.foreign) == (Reason.AUDIENCE_MISMATCH, True)
    assert engine.verify(token("f1", kid("f1"), aud="only-this"),
                         Expectation(audience="only-this", tenant="acme")).valid


def test_foreign_revocations_are_namespaced_by_issuer(world) -> None:  # type: ignore[no-untyped-def]
    engine, _, revocations = world
    expect = Expectation(audience=AUDIENCE, tenant="acme")
    t = token("f1", kid("f1"))
    revocations.jtis.add(("acme", "f-jti-1"))  # a local jti of the same value
    assert engine.verify(t, expect).valid
    revocations.jtis.add(("acme", foreign_ref(ISS_F, "f-jti-1")))
    assert engine.verify(t, expect).reason is Reason.REVOKED
    revocations.jtis.clear()
    revocations.subjects.add(("acme", foreign_ref(ISS_F, "bob")))
    assert engine.verify(t, expect).reason is Reason.REVOKED
    revocations.subjects.clear()
    revocations.kids.add(foreign_ref(ISS_F, kid("f1")))
    assert engine.verify(t, expect).reason is Reason.KEY_REVOKED


def test_an_unknown_foreign_kid_gets_one_bounded_refetch(world) -> None:  # type: ignore[no-untyped-def]
    from fedtoken.service.verification import MAX_KID_WAITS_PER_CALL, Verification
    from tests.unit.fakes import AllowAll

    engine, trusted, _ = world

    class Catalog:
        async def tenant(self, tenant_id: str) -> object:
            return next(t for t in TENANTS if t.id == tenant_id)

    class Audit:
        async def record_verifications(self, *args: object) -> None:
            pass

    service = Verification(engine=engine, audit=Audit(), max_batch=10_000,  # type: ignore[arg-type]
                           authz=AllowAll(), catalog=Catalog(), trusted=trusted)  # type: ignore[arg-type]
    rotated = fkey("f3")
    trusted.later[rotated.kid] = rotated
    expect = Expectation(audience=AUDIENCE, tenant="acme")
    from fedtoken.core.ports import CallContext, Principal

    ctx = CallContext(Principal(identity="spiffe://test/verifier"))
    new = token("f3", rotated.kid)
    randoms = [token("f1", f"random-{i}") for i in range(100)]
    verdicts = asyncio.run(service.verify_batch([new, *randoms], expect, ctx))
    assert verdicts[0].valid and verdicts[0].kid == rotated.kid
    assert all(v.reason is Reason.UNKNOWN_KEY for v in verdicts[1:])
    # One wait per distinct (issuer, kid), and at most the per-call bound.
    assert len(trusted.waits) == MAX_KID_WAITS_PER_CALL
    assert trusted.waits[0] == (ISS_F, rotated.kid)
