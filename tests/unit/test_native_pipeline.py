"""The native batch pipeline (fedtoken._native KeyTable.pipeline) against the
Python path: the same VerifyBatchResponse, byte for byte, and the same audit
entries, on the attack table, on claim shapes the scanner must get exactly
right, on revocations of every kind, under several expectations and caller
scopes, and on hypothesis-generated payloads (signed, so that the claims
checks run, not only the signature check)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtoken.audit.rows import VERIFIED_EVENT, build_rows
from fedtoken.core.model import Expectation, Reason, Verdict, WireBatch
from fedtoken.core.ports import RevocationEntry
from fedtoken.revocation.view import InMemoryRevocationView
from fedtoken.rpc import convert
from fedtoken.verifier import VerificationEngine
from fedtoken.verifier.native import NATIVE_AVAILABLE, pb_string_fields
from fedtoken_client._pb.fedtoken.v1 import token_service_pb2
from tests.unit._world import AUDIENCE, ISS_A, ISS_B, NOW, World, make_world
from tests.unit.test_attacks import CASES

pytestmark = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="fedtoken._native is not built")

RID = "req-1"
AT = 1234.5
ACTOR = "spiffe://test/verifier"


class _Pair:
    """A native engine and a reference (Python only, no cache) over one
    resolver and one real in-memory revocation view."""

    def __init__(self) -> None:
        self.w: World = make_world(native=True)
        self.view = InMemoryRevocationView(staleness=60, monotonic=lambda: 0.0)
        self.view.replace_all([
            RevocationEntry("acme", "jti", "revoked-jti", NOW + 3600),
            RevocationEntry("acme", "subject", "revoked-subject", NOW + 3600, NOW - 30),
            RevocationEntry("beta", "jti", "jti-1", NOW + 3600),
        ])
        self.view.confirm_fresh(0.0)
        self.native = VerificationEngine(self.w.resolver, self.view, clock=self.w.clock,
                                         native=True)
        self.reference = VerificationEngine(self.w.resolver, self.view, clock=self.w.clock,
                                            native=False, token_cache=0)

    async def learn(self, tokens: list[str], expect: Expectation) -> None:
        # The Python path tables the header segments it saw verify.
        await self.native.verify_batch(tokens, expect)

    async def compare(self, tokens: list[Any], expect: Expectation,
                      allowed: frozenset[str] | None = None) -> tuple[int, int]:
        """Assert both paths agree; returns (decided natively, total)."""
        wire = await self.native.verify_batch_wire(
            tokens, expect, allowed=allowed, reason_numbers=convert.REASON_PB,
            request_id=RID, at=AT)
        if wire is None:  # nothing planned: verify_batch answers (the service does so)
            wire = WireBatch(b"", list(range(len(tokens))), [0] * len(tokens),
                             await self.native.verify_batch(tokens, expect), [])
        reference = await self.reference.verify_batch(tokens, expect)
        if allowed is not None:
            reference = [_scoped(v, allowed) for v in reference]
            wire.verdicts = [_scoped(v, allowed) for v in wire.verdicts]
        got = convert.verify_batch_bytes(wire)
        want = convert.verify_batch_response(reference).SerializeToString()
        if got != want:
            parsed = token_service_pb2.VerifyBatchResponse.FromString(got)
            expected = token_service_pb2.VerifyBatchResponse.FromString(want)
            for i, (a, b) in enumerate(zip(parsed.verdicts, expected.verdicts, strict=True)):
                assert a == b, (i, tokens[i], a, b)
            assert got == want
        # The audit: the same entries, in any order (natively decided ones
        # are filed per batch).
        want_items = _items(build_rows([(expect.tenant, ACTOR, RID, AT, reference)], 10**6))
        got_items = _items(build_rows([(expect.tenant, ACTOR, RID, AT, wire.verdicts)], 10**6))
        for tenant, entries in wire.audit:
            got_items.update((tenant, json.dumps(e)) for e in entries)
        assert got_items == want_items
        return len(tokens) - len(wire.rest), len(tokens)


def _scoped(v: Verdict, allowed: frozenset[str]) -> Verdict:
    from fedtoken.service.verification import _scoped as scoped

    return scoped(v, allowed)


def _items(rows: list[Any]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for row in rows:
        assert row.event.event_type == VERIFIED_EVENT
        out.update((row.event.tenant, json.dumps(e)) for e in row.event.details["items"])
    return out


@pytest.fixture
def pair() -> _Pair:
    return _Pair()


def _shapes(w: World) -> list[str]:
    """Tokens of every claim shape the native checks must judge as Python."""
    c = w.claims
    variants: list[dict[str, Any]] = [
        c(),
        c(jti="revoked-jti"),
        c(sub="revoked-subject"),  # iat NOW - 60 is before the cut NOW - 30
        c(sub="revoked-subject", iat=NOW - 10),
        c(exp=NOW - 100),
        c(exp=NOW - 30),
        c(exp=NOW - 29),
        c(nbf=NOW + 31),
        c(nbf=NOW + 30),
        c(iat=NOW + 31),
        c(exp=None),
        c(iat=None),
        c(jti=None),
        c(sub=None),
        c(nbf=None, aud=None),
        c(exp="1900000000"),
        c(exp=True),
        c(exp=-1),
        c(exp=253402300800),
        c(exp=10**17),
        c(exp=1.5),
        c(iat=False),
        c(nbf=None),
        c(sub=""),
        c(jti=""),
        c(sub=7),
        c(jti=None, extra=1),
        c(aud=[AUDIENCE]),
        c(aud=["other", AUDIENCE]),
        c(aud=["other"]),
        c(aud=[]),
        c(aud=[""]),
        c(aud=[AUDIENCE, ""]),
        c(aud=""),
        c(aud="other"),
        c(aud=5),
        c(aud=None),
        c(aud=True),
        c(aud=[AUDIENCE, 1]),
        c(iss=ISS_B),
        c(iss="https://unknown.example"),
        c(iss=""),
        c(iss=None),
        c(sub="é"),
        c(sub="a\\u0041"),
        c(sub="x" * 1025),
        c(jti="j" * 1024),
        c(roles=["a", "b"], flag=True, n=None),
        c(nested={"a": 1}),
        c(scope="read write", client_id="cli"),
    ]
    tokens = [w.token(claims=v) for v in variants]
    tokens.append(w.token(claims=c(), sign_with="b_active"))  # bad signature
    tokens.append(w.token("b_active", claims=c(iss=ISS_B)))
    tokens.append(w.token("b_active", claims=c(iss=ISS_B, jti="jti-1")))  # revoked in beta
    tokens.append(w.token("b_active", claims=c(iss=ISS_A)))  # beta's key under acme's iss
    tokens.append(w.token("a_ps256", claims=c()))
    tokens.append(w.token("a_retiring", claims=c()))
    good = w.token(claims=c())
    head, payload, sig = good.split(".")
    tokens.append(f"{head}.{payload}.{sig[:-2]}AA")
    tokens.append(f"{head}.{payload}x.{sig}")
    tokens.append(f"{head}.{payload}")
    return tokens


EXPECTATIONS = [
    Expectation(audience=AUDIENCE),
    Expectation(audience=""),
    Expectation(audience="other"),
    Expectation(audience=AUDIENCE, tenant="acme"),
    Expectation(audience=AUDIENCE, tenant="beta"),
    Expectation(audience=AUDIENCE, issuer=ISS_A),
    Expectation(audience=AUDIENCE, issuer=ISS_B),
    Expectation(audience=AUDIENCE, check_audience=False),
]


@pytest.mark.parametrize("expect", EXPECTATIONS, ids=repr)
async def test_claim_shapes_and_revocations(pair: _Pair, expect: Expectation) -> None:
    tokens = _shapes(pair.w)
    await pair.learn(tokens, Expectation(audience=AUDIENCE))
    decided, total = await pair.compare(tokens, expect)
    if not expect.tenant == "beta" and expect.issuer != ISS_B:
        assert decided > total // 2, "the pipeline decided too few tokens to be tested"


async def test_attack_table_and_garbage(pair: _Pair) -> None:
    w = pair.w
    tokens: list[Any] = [c.build(w) for c in CASES if c.expect is None]
    tokens += ["", ".", "..", "a.b.c", "é.é.é", "x" * 20000, 7, None, b"bytes"]
    await pair.learn([t for t in tokens if isinstance(t, str)], w.expect)
    for size in (len(tokens), 40):  # inline and on the worker threads
        batch = (tokens * (1 + 80 // len(tokens)))[:max(size, 40)]
        await pair.compare(batch, w.expect)


@pytest.mark.parametrize("allowed", [frozenset({"acme"}), frozenset({"beta"}), frozenset()])
async def test_caller_scope(pair: _Pair, allowed: frozenset[str]) -> None:
    tokens = _shapes(pair.w)
    await pair.learn(tokens, pair.w.expect)
    decided, total = await pair.compare(tokens, pair.w.expect, allowed)
    # Slots of tenants the caller may not see are left to the Python path.
    assert (decided > total // 2) == ("acme" in allowed)


async def test_large_batch_on_threads_keeps_order(pair: _Pair) -> None:
    w = pair.w
    tokens = _shapes(w)
    await pair.learn(tokens, w.expect)
    many = [w.token(claims=w.claims(jti=f"j{i}", sub=f"s{i % 7}")) for i in range(150)]
    batch = [t for pair_ in zip(many, tokens * 3, strict=False) for t in pair_]
    decided, total = await pair.compare(batch, w.expect)
    assert decided > total // 2


async def test_revocations_take_effect_at_once(pair: _Pair) -> None:
    w = pair.w
    token = w.token(claims=w.claims(jti="later", sub="bob"))
    await pair.learn([token], w.expect)
    await pair.compare([token] * 3, w.expect)
    pair.view.add(RevocationEntry("acme", "jti", "later", NOW + 3600))
    await pair.compare([token] * 3, w.expect)
    other = w.token(claims=w.claims(jti="other", sub="carol"))
    pair.view.add(RevocationEntry("acme", "subject", "carol", NOW + 3600, NOW))
    await pair.compare([other, token], w.expect)
    pair.view.add(RevocationEntry("acme", "key", w.kids["a_active"], NOW + 3600))
    # A revoked key is never planned: the Python path answers KEY_REVOKED.
    wire = await pair.native.verify_batch_wire(
        [other], w.expect, allowed=None, reason_numbers=convert.REASON_PB, request_id=RID, at=AT)
    assert wire is None or wire.rest == [0]
    await pair.compare([other, token], w.expect)


async def test_stale_view_is_not_piped(pair: _Pair) -> None:
    w = pair.w
    token = w.token()
    await pair.learn([token], w.expect)
    pair.view.mark_stale()
    wire = await pair.native.verify_batch_wire(
        [token], w.expect, allowed=None, reason_numbers=convert.REASON_PB, request_id=RID, at=AT)
    assert wire is None
    (verdict,) = await pair.native.verify_batch([token], w.expect)
    assert verdict.reason is Reason.REVOCATION_UNAVAILABLE


def test_pb_string_fields_match_protobuf() -> None:
    for tenant, issuer, kid in [("acme", ISS_A, "k1"), ("", "x", ""), ("t" * 200, "é", "k")]:
        want = token_service_pb2.Verdict(tenant=tenant, issuer=issuer, kid=kid)
        assert pb_string_fields((3, tenant), (4, issuer), (5, kid)) == want.SerializeToString()


_values = st.one_of(
    st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1),
    st.sampled_from([NOW - 100, NOW, NOW + 100, 0, 253402300799, 253402300800]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
    st.sampled_from([AUDIENCE, "", ISS_A, "revoked-jti", "revoked-subject"]),
    st.booleans(),
    st.none(),
    st.lists(st.sampled_from([AUDIENCE, "", "x", "y"]), max_size=3),
    st.floats(allow_nan=False, allow_infinity=False),
)
_names = st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "x"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(_names, _values, max_size=5),
       drop=st.sets(st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "jti"]),
                    max_size=2))
def test_generated_payloads(changes: dict[str, Any], drop: set[str]) -> None:
    p = _PAIR
    w = p.w
    claims = w.claims()
    claims.update(changes)
    for name in drop:
        claims.pop(name, None)
    token = w.token(claims=claims)
    asyncio.run(_one(p, token))


async def _one(p: _Pair, token: str) -> None:
    await p.learn([p.w.token()], p.w.expect)
    await p.compare([token, token], p.w.expect)


_PAIR = _Pair() if NATIVE_AVAILABLE else None  # type: ignore[assignment]


# --- the pipeline's signature cache (sigcache.h) ---------------------------------


def _stats(p: _Pair) -> dict[str, int]:
    stats = p.native.signature_cache_stats()
    assert stats is not None
    return stats


async def test_repeated_tokens_hit_and_still_agree(pair: _Pair) -> None:
    w = pair.w
    tokens = _shapes(w)
    await pair.learn(tokens, w.expect)
    await pair.compare(tokens, w.expect)
    before = _stats(pair)
    for expect in EXPECTATIONS:
        await pair.compare(tokens, expect)
    after = _stats(pair)
    assert after["hits"] > before["hits"] + len(EXPECTATIONS)
    # Only verified signatures are stored: the bad signature of _shapes never is.
    bad = w.token(claims=w.claims(), sign_with="b_active")
    stores = _stats(pair)["stores"]
    for _ in range(3):
        await pair.compare([bad, bad], w.expect)
    assert _stats(pair)["stores"] == stores


async def test_attack_table_with_a_warm_signature_cache(pair: _Pair) -> None:
    w = pair.w
    tokens: list[Any] = [c.build(w) for c in CASES if c.expect is None]
    await pair.learn(tokens, w.expect)
    for _ in range(3):
        await pair.compare(tokens * 2, w.expect)
    assert _stats(pair)["hits"] > 0


async def test_a_hit_still_checks_time_revocation_and_key(pair: _Pair) -> None:
    w = pair.w
    token = w.token(claims=w.claims(jti="cached", sub="dave", exp=NOW + 100))
    await pair.learn([token], w.expect)
    await pair.compare([token] * 2, w.expect)
    hits = _stats(pair)["hits"]
    await pair.compare([token] * 2, w.expect)
    assert _stats(pair)["hits"] > hits
    pair.view.add(RevocationEntry("acme", "jti", "cached", NOW + 3600))
    await pair.compare([token], w.expect)  # REVOKED, from a hit
    token2 = w.token(claims=w.claims(jti="cached2", exp=NOW + 100))
    await pair.compare([token2] * 2, w.expect)
    w.clock.t = NOW + 200
    try:
        await pair.compare([token2] * 2, w.expect)  # EXPIRED, from a hit
    finally:
        w.clock.t = NOW
    # The key withdrawn: never planned again, the Python path answers.
    from tests.unit._world import KEYS, TENANTS, record

    records = [record(name, *spec[:3], **spec[3]) for name, spec in KEYS.items()
               if name != "a_active"]
    w.resolver.replace(TENANTS, records)
    await pair.compare([token2, token], w.expect)


def test_signature_cache_bounds() -> None:
    from fedtoken.verifier.native import NATIVE

    assert NATIVE.SignatureCache(1).stats()["capacity"] == 4
    assert NATIVE.SignatureCache(8192).stats()["capacity"] == 8192
    assert NATIVE.SignatureCache(5000).stats()["capacity"] == 8192
    for size in (0, -1, 2**25):
        with pytest.raises(ValueError):
            NATIVE.SignatureCache(size)


async def test_tiny_cache_under_a_flood_still_agrees() -> None:
    p = _Pair()
    p.native = VerificationEngine(p.w.resolver, p.view, clock=p.w.clock, native=True,
                                  token_cache=3)
    w = p.w
    tokens = [w.token(claims=w.claims(jti=f"f{i}")) for i in range(60)]
    await p.learn(tokens[:1], w.expect)
    for _ in range(2):
        await p.compare(tokens, w.expect)
    assert _stats(p)["capacity"] == 4


# --- trusted foreign issuers -------------------------------------------------------


def _foreign_pair() -> tuple[_Pair, Any]:
    from fedtoken.core.model import foreign_ref
    from fedtoken.verifier.federated import FederatedResolver
    from tests.unit.test_federation_engine import ISS_F, Trusted, fkey

    p = _Pair()
    trusted = Trusted(keys={(k := fkey("f1")).kid: k})
    resolver = FederatedResolver(p.w.resolver, trusted)
    p.view.replace_all([
        RevocationEntry("acme", "jti", foreign_ref(ISS_F, "f-revoked"), NOW + 3600),
        RevocationEntry("acme", "jti", "f-jti-local", NOW + 3600),  # a local jti: no effect
        RevocationEntry("acme", "subject", foreign_ref(ISS_F, "mallory"), NOW + 3600, NOW),
        RevocationEntry("beta", "jti", foreign_ref(ISS_F, "f-jti-1"), NOW + 3600),
    ])
    p.view.confirm_fresh(0.0)
    p.native = VerificationEngine(resolver, p.view, clock=p.w.clock, native=True)
    p.reference = VerificationEngine(resolver, p.view, clock=p.w.clock, native=False,
                                     token_cache=0)
    return p, trusted


def _foreign_tokens() -> list[str]:
    from tests.unit.test_federation_engine import kid, token

    k = kid("f1")
    return [
        token("f1", k),
        token("f1", k, jti="f-revoked"),
        token("f1", k, jti="f-jti-local"),
        token("f1", k, sub="mallory"),
        token("f1", k, sub="mallory", iat=NOW + 5),
        token("f1", k, exp=NOW - 100),
        token("f1", k, aud="other"),
        token("f2", k),  # bad signature under f1's kid
        token("f1", k, iss="https://auth.example/t/acme"),
    ]


@pytest.mark.parametrize("tenant", ["acme", "beta", ""])
async def test_foreign_tokens_agree(tenant: str) -> None:
    p, _ = _foreign_pair()
    tokens = _foreign_tokens() + _shapes(p.w)[:10]
    expect = Expectation(audience=AUDIENCE, tenant=tenant)
    await p.learn(tokens, Expectation(audience=AUDIENCE, tenant="acme"))
    for _ in range(2):  # the second time from the signature cache
        decided, _ = await p.compare(tokens, expect)
    if tenant == "acme":
        assert decided >= 8


async def test_foreign_trust_changes_take_effect() -> None:
    from dataclasses import replace

    from fedtoken.core.model import foreign_ref
    from tests.unit.test_federation_engine import ISS_F, fkey, kid

    p, trusted = _foreign_pair()
    tokens = _foreign_tokens()
    expect = Expectation(audience=AUDIENCE, tenant="acme")
    await p.learn(tokens, expect)
    await p.compare(tokens, expect)
    trusted.audiences = frozenset({"only-this"})
    await p.compare(tokens, expect)
    trusted.audiences = frozenset()
    p.view.add(RevocationEntry("acme", "key", foreign_ref(ISS_F, kid("f1")), NOW + 3600))
    await p.compare(tokens, expect)
    trusted.keys = {kid("f1"): replace(fkey("f2"), kid=kid("f1"))}
    await p.compare(tokens, expect)
    trusted.tenants = frozenset()
    await p.compare(tokens, expect)
