"""The verification engine and the local key resolver, with real RSA keys.

The shared fixtures (``World``, ``make_world``, key and token helpers) live in
tests/unit/_world.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import replace

import pytest

from fedtoken.core.errors import PolicyViolation
from fedtoken.core.jwk import b64url_encode
from fedtoken.core.model import (
    Expectation,
    KeyRecord,
    KeyState,
    Reason,
    Tenant,
    TenantPolicy,
    Verdict,
)
from fedtoken.core.ports import KeyResolver, KeyTable
from fedtoken.verifier import NATIVE_AVAILABLE, LocalKeyResolver, VerificationEngine
from tests.unit._world import (
    AUDIENCE,
    ISS_A,
    ISS_B,
    KEYS,
    NOW,
    TENANTS,
    FixedClock,
    World,
    make_world,
    record,
    segment,
)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


# --- happy path and verdict contents --------------------------------------------


def test_valid_token_verdict_carries_claims(world: World) -> None:
    claims = world.claims()
    token = world.token(claims=claims)
    verdict = world.verify(token)
    assert verdict.valid and verdict.reason is Reason.OK
    assert (verdict.tenant, verdict.issuer, verdict.kid) == ("acme", ISS_A, world.kids["a_active"])
    assert (verdict.subject, verdict.jti, verdict.expires_at) == ("alice", "jti-1", NOW + 600)
    assert verdict.claims == claims
    assert json.loads(verdict.claims_json) == claims
    # claims_json is the payload exactly as signed, not a re-encoding.
    assert b64url_encode(verdict.claims_json) == token.split(".")[1]


@pytest.mark.parametrize("key", ["a_active", "a_pending", "a_retiring"])
def test_published_states_verify(world: World, key: str) -> None:
    assert world.verify(world.token(key)).reason is Reason.OK


def test_ps256_key_verifies_ps256_tokens(world: World) -> None:
    token = world.token("a_ps256", header=world.header("a_ps256", alg="PS256"))
    assert world.verify(token).reason is Reason.OK


def test_bytes_token_is_accepted(world: World) -> None:
    assert world.verify(world.token().encode()).reason is Reason.OK


def test_invalid_verdict_has_no_claims(world: World) -> None:
    verdict = world.verify(world.token(claims=world.claims(exp=NOW - 3600)))
    assert verdict.reason is Reason.EXPIRED
    assert verdict.claims is None and verdict.claims_json == b""
    # Authentic (signature checked), so the identifying claims are reported.
    assert (verdict.subject, verdict.jti, verdict.expires_at) == ("alice", "jti-1", NOW - 3600)


def test_unauthenticated_claims_are_not_reported(world: World) -> None:
    token = world.token(sign_with="b_active")  # header names a_active
    verdict = world.verify(token)
    assert verdict.reason is Reason.BAD_SIGNATURE
    assert (verdict.tenant, verdict.issuer, verdict.kid) == ("acme", ISS_A, world.kids["a_active"])
    assert (verdict.subject, verdict.jti, verdict.expires_at) == ("", "", 0)


def test_expected_issuer_and_tenant(world: World) -> None:
    token = world.token()
    assert world.verify(token, Expectation(AUDIENCE, issuer=ISS_A, tenant="acme")).valid
    wrong_iss = Expectation(AUDIENCE, issuer=ISS_B)
    assert world.verify(token, wrong_iss).reason is Reason.ISSUER_MISMATCH
    wrong_tenant = Expectation(AUDIENCE, tenant="beta")
    assert world.verify(token, wrong_tenant).reason is Reason.TENANT_MISMATCH


def test_audience_can_be_left_to_the_caller(world: World) -> None:
    token = world.token(claims=world.claims(aud="api://other"))
    assert world.verify(token).reason is Reason.AUDIENCE_MISMATCH
    introspect = Expectation(audience="", check_audience=False)
    assert world.verify(token, introspect).reason is Reason.OK


def test_leeway_applies(world: World) -> None:
    just_expired = world.token(claims=world.claims(exp=NOW - 10))
    assert world.verify(just_expired).reason is Reason.OK  # within the 30 s leeway
    strict = make_world(leeway=0)
    assert strict.verify(just_expired).reason is Reason.EXPIRED


def test_token_size_limit_is_configurable(world: World) -> None:
    token = world.token(claims=world.claims(pad="x" * 600))
    assert world.verify(token).reason is Reason.OK
    small = make_world(max_token_size=len(token) - 1)
    assert small.verify(token).reason is Reason.MALFORMED


def test_issuer_algorithm_allowlist_applies() -> None:
    # Tenant beta allows RS256 only: a PS256 token is refused before any key
    # lookup, even when it is correctly signed.
    w = make_world()
    header = w.header("b_active", alg="PS256")
    token = w.token("b_active", header=header, claims=w.claims(iss=ISS_B))
    assert w.verify(token).reason is Reason.UNSUPPORTED_ALGORITHM


# --- batches ----------------------------------------------------------------------


def _mixed_batch(world: World, count: int) -> tuple[list[str], list[Reason]]:
    good = world.token()
    expired = world.token(claims=world.claims(exp=NOW - 3600))
    forged = world.token(sign_with="b_active")
    pattern = [
        (good, Reason.OK),
        (expired, Reason.EXPIRED),
        (forged, Reason.BAD_SIGNATURE),
        ("not a token", Reason.MALFORMED),
    ]
    items = [pattern[i % len(pattern)] for i in range(count)]
    return [t for t, _ in items], [r for _, r in items]


@pytest.mark.parametrize("count", [0, 1, 31, 32, 64, 129, 1000])
async def test_batch_preserves_order(world: World, count: int) -> None:
    tokens, reasons = _mixed_batch(world, count)
    verdicts = await world.engine.verify_batch(tokens, world.expect)
    assert [v.reason for v in verdicts] == reasons


@pytest.mark.parametrize("threads", [1, 3])
async def test_batch_with_other_thread_counts(threads: int) -> None:
    w = make_world(threads=threads)
    tokens, reasons = _mixed_batch(w, 300)
    assert [v.reason for v in await w.engine.verify_batch(tokens, w.expect)] == reasons
    w.engine.close()


async def test_batch_reads_the_clock_once(world: World) -> None:
    class CountingClock(FixedClock):
        reads = 0

        def now(self) -> float:
            self.reads += 1
            return super().now()

    clock = CountingClock()
    engine = VerificationEngine(world.resolver, world.revocations, clock=clock)
    tokens, _ = _mixed_batch(world, 200)
    await engine.verify_batch(tokens, world.expect)
    assert clock.reads == 1
    engine.close()


async def test_unexpected_error_becomes_malformed_and_is_logged_without_token(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    class ExplodingRevocations:
        def check(self, tenant: str, jti: str, subject: str, issued_at: int, kid: str) -> None:
            raise RuntimeError(f"boom {jti}")

    engine = VerificationEngine(world.resolver, ExplodingRevocations(), clock=world.clock)
    good = world.token(claims=world.claims(jti="secret-jti-value"))
    caplog.set_level(logging.ERROR)
    verdicts = await engine.verify_batch(["x", good, "y"], world.expect)
    assert [v.reason for v in verdicts] == [Reason.MALFORMED] * 3
    assert engine.verify(good, world.expect).reason is Reason.MALFORMED
    assert "RuntimeError" in caplog.text
    assert good not in caplog.text and "secret-jti-value" not in caplog.text
    engine.close()


async def test_resolver_failure_becomes_malformed(world: World) -> None:
    class BrokenResolver:
        def issuer_keys(self, issuer: str) -> None:
            raise KeyError(issuer)

        def tenant_of_kid(self, kid: str) -> None:
            return None

    engine = VerificationEngine(BrokenResolver(), world.revocations, clock=world.clock)
    tokens = [world.token(), "junk"] * 50
    verdicts = await engine.verify_batch(tokens, world.expect)
    assert [v.reason for v in verdicts] == [Reason.MALFORMED] * 100
    engine.close()


def test_threads_must_be_positive(world: World) -> None:
    with pytest.raises(ValueError):
        VerificationEngine(world.resolver, world.revocations, clock=world.clock, threads=0)


def test_batch_runs_concurrently_with_the_event_loop(world: World) -> None:
    async def main() -> list[Verdict]:
        tokens, _ = _mixed_batch(world, 500)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        verdicts = await world.engine.verify_batch(tokens, world.expect)
        task.cancel()
        assert ticks > 1  # the loop kept running while the workers verified
        return verdicts

    assert len(asyncio.run(main())) == 500


# --- the local resolver -------------------------------------------------------------


def test_resolver_maps_issuers_states_and_owners(world: World) -> None:
    acme = world.resolver.issuer_keys(ISS_A)
    assert acme is not None and acme.tenant == "acme" and acme.local
    assert acme.allowed_algorithms == frozenset({"RS256", "PS256"})
    assert set(acme.keys) == {
        world.kids[k] for k in ("a_active", "a_pending", "a_retiring", "a_ps256")
    }
    assert acme.withdrawn == {
        world.kids["a_retired"]: KeyState.RETIRED,
        world.kids["a_destroyed"]: KeyState.DESTROYED,
        world.kids["a_compromised"]: KeyState.COMPROMISED,
        # destroyed after a compromise: still reported as compromised
        world.kids["a_burnt"]: KeyState.COMPROMISED,
    }
    assert world.resolver.tenant_of_kid(world.kids["b_active"]) == "beta"
    assert world.resolver.tenant_of_kid("nope") is None
    assert world.resolver.issuer_keys("https://evil.example") is None


def test_resolver_reuses_loaded_keys_and_swaps_whole() -> None:
    w = make_world()
    before = w.resolver.issuer_keys(ISS_A)
    assert before is not None
    records = [record(name, *spec[:3], **spec[3]) for name, spec in KEYS.items()]
    # Rotate: the active key starts retiring.
    records = [
        replace(r, state=KeyState.RETIRING) if r.hsm_label == "a_active" else r for r in records
    ]
    w.resolver.replace(TENANTS, records)
    after = w.resolver.issuer_keys(ISS_A)
    assert after is not None and after is not before
    kid = w.kids["a_active"]
    assert after.keys[kid].state is KeyState.RETIRING
    assert after.keys[kid].public_key is before.keys[kid].public_key
    # The old snapshot a reader may still hold is untouched.
    assert before.keys[kid].state is KeyState.ACTIVE
    # Unchanged keys keep their VerificationKey object (the native table
    # remembers keys by identity); the changed one got a new object.
    pending = w.kids["a_pending"]
    assert after.keys[pending] is before.keys[pending]
    assert after.keys[kid] is not before.keys[kid]
    w.resolver.replace(TENANTS, records)  # the same records again
    again = w.resolver.issuer_keys(ISS_A)
    assert again is not None and all(again.keys[k] is after.keys[k] for k in after.keys)


def test_resolver_implements_both_ports() -> None:
    resolver = LocalKeyResolver()
    table: KeyTable = resolver
    keys: KeyResolver = resolver
    table.replace(TENANTS, [record("a_active", "acme", KeyState.ACTIVE)])
    assert keys.tenant_of_kid(record("a_active", "acme", KeyState.ACTIVE).kid) == "acme"


def test_resolver_refuses_shared_issuer_and_duplicate_kids_keeping_old_state() -> None:
    w = make_world()
    twins = [*TENANTS, Tenant(id="gamma", issuer=ISS_A)]
    with pytest.raises(PolicyViolation):
        w.resolver.replace(twins, [])
    dup = record("b_active", "acme", KeyState.ACTIVE)
    with pytest.raises(PolicyViolation):
        w.resolver.replace(TENANTS, [record("b_active", "beta", KeyState.ACTIVE), dup])
    assert w.verify(w.token()).reason is Reason.OK


def test_resolver_skips_unusable_key_and_unknown_tenant() -> None:
    good = record("a_active", "acme", KeyState.ACTIVE)
    bad = record("b_active", "acme", KeyState.ACTIVE)
    bad = replace(bad, public_jwk={**bad.public_jwk, "d": "AQAB"})
    orphan = record("a_pending", "nobody", KeyState.ACTIVE)
    resolver = LocalKeyResolver()
    resolver.replace(TENANTS, [good, bad, orphan])
    acme = resolver.issuer_keys(ISS_A)
    assert acme is not None and set(acme.keys) == {good.kid}
    assert resolver.tenant_of_kid(orphan.kid) is None


def test_algorithm_policy_cannot_admit_symmetric_algorithms() -> None:
    tenant = Tenant(
        id="acme", issuer=ISS_A, policy=TenantPolicy(allowed_algorithms=("RS256", "HS256", "none"))
    )
    resolver = LocalKeyResolver()
    resolver.replace([tenant], [])
    keys = resolver.issuer_keys(ISS_A)
    assert keys is not None and keys.allowed_algorithms == frozenset({"RS256"})


# --- the header cache ---------------------------------------------------------------


def test_cached_header_is_still_scoped_to_this_tokens_issuer() -> None:
    w = make_world()
    good = w.token()
    assert w.verify(good).valid  # caches the header segment of a_active
    # Same exact header segment (a_active's kid), payload naming tenant B's
    # issuer, signed by a_active: the kid must be looked up under ISS_B.
    cross = w.token(claims=w.claims(iss=ISS_B, tenant="beta"))
    assert cross.split(".")[0] == good.split(".")[0]
    assert w.verify(cross).reason is Reason.TENANT_MISMATCH
    # The same header segment with a broken payload or signature segment is
    # refused exactly as the uncached path refuses it.
    head, payload, sig = good.split(".")
    assert w.verify(f"{head}.{payload}.").reason is Reason.MALFORMED
    assert w.verify(f"{head}.{payload}A.{sig}").reason is Reason.MALFORMED
    assert w.verify(f"{head}.{segment('[1]')}.{sig}").reason is Reason.MALFORMED
    assert w.verify(f"{head}.{payload}.{sig}x").reason is Reason.MALFORMED
    zeros = b64url_encode(bytes(256))
    assert w.verify(f"{head}.{payload}.{zeros}").reason is Reason.BAD_SIGNATURE


def test_cached_and_uncached_verdicts_agree() -> None:
    w = make_world()
    tokens = [
        w.token(),
        w.token(claims=w.claims(exp=NOW - 3600)),
        w.token(claims=w.claims(jti="revoked-jti")),
        w.token(sign_with="b_active"),
        w.token("a_retired"),
        w.token("b_active", claims=w.claims(iss=ISS_B, tenant="beta")),
    ]
    first = [w.verify(t) for t in tokens]  # fills the cache
    again = [w.verify(t) for t in tokens]  # served from it
    fresh = [make_world().verify(t) for t in tokens]  # an empty cache each time
    assert first == again == fresh


def test_header_cache_is_bounded() -> None:
    from fedtoken.verifier.engine import HEADER_CACHE_SIZE

    w = make_world()
    for i in range(HEADER_CACHE_SIZE + 10):
        header = w.header(x=i)  # a distinct, valid header segment each time
        assert w.verify(w.token(header=header)).valid
    assert len(w.engine._headers) <= HEADER_CACHE_SIZE


# --- concurrency: verify threads while the keys are replaced ---------------------


def _hammer_snapshots() -> list[list[KeyRecord]]:
    """Key sets the replacer cycles through; every install builds new records."""
    a, r = KeyState.ACTIVE, KeyState.RETIRING
    return [
        [record("h1", "acme", a), record("h2", "acme", KeyState.PENDING)],
        [record("h1", "acme", r), record("h2", "acme", a)],
        [record("h1", "acme", r), record("h2", "acme", a)],  # unchanged: objects reused
        [record("h1", "acme", KeyState.RETIRED), record("h2", "acme", a)],
        [record("h1", "acme", KeyState.COMPROMISED, compromised_at=NOW - 5)],
        [],
    ]


@pytest.mark.parametrize(
    "native",
    [
        False,
        pytest.param(
            True, marks=pytest.mark.skipif(not NATIVE_AVAILABLE, reason="native not built")
        ),
    ],
)
def test_verify_threads_while_keys_are_replaced(native: bool) -> None:
    w = make_world()
    kid1 = record("h1", "acme", KeyState.ACTIVE).kid
    kid2 = record("h2", "acme", KeyState.ACTIVE).kid
    kid_x = record("hx", "acme", KeyState.ACTIVE).kid  # never in any snapshot
    tokens: list[str] = []
    # 2 x 40 distinct learnable header segments: more than the native table
    # holds (NATIVE_SLOTS), so it is also cleared and refilled meanwhile.
    for i in range(40):
        claims = w.claims(jti=f"j{i}", sub=f"s{i}")
        tokens += [
            w.token(header=w.header(kid=kid1, x=i), claims=claims, sign_with="h1"),
            w.token(header=w.header(kid=kid2, x=i), claims=claims, sign_with="h2"),
            # Never valid: a tabled header with another key's signature, a
            # kid no snapshot has, and h1's token under tenant B's issuer.
            w.token(header=w.header(kid=kid1, x=i), claims=claims, sign_with="hx"),
            w.token(header=w.header(kid=kid_x), claims=claims, sign_with="hx"),
            w.token(
                header=w.header(kid=kid1, x=i), claims=w.claims(iss=ISS_B, jti=f"j{i}"),
                sign_with="h1",
            ),
        ]
    never_valid = {t for i, t in enumerate(tokens) if i % 5 >= 2}
    snapshots = _hammer_snapshots()
    # What each snapshot allows, from a single-threaded Python-only engine.
    reference_resolver = LocalKeyResolver()
    reference = VerificationEngine(
        reference_resolver, w.revocations, clock=w.clock, native=False
    )
    allowed: list[dict[str, Verdict]] = []
    for keys in snapshots:
        reference_resolver.replace(TENANTS, keys)
        allowed.append({t: reference.verify(t, w.expect) for t in tokens})
    reference.close()
    assert any(v.valid for v in allowed[0].values())
    assert not any(allowed[k][t].valid for k in range(len(snapshots)) for t in never_valid)

    resolver = LocalKeyResolver()
    resolver.replace(TENANTS, _hammer_snapshots()[0])
    engine = VerificationEngine(resolver, w.revocations, clock=w.clock, threads=3, native=native)
    installed = 0  # index (into the endless cycle) of the last finished replace
    done = threading.Event()
    errors: list[BaseException] = []
    checked = 0

    def replacer() -> None:
        nonlocal installed
        k = 0
        while not done.is_set():
            k += 1
            resolver.replace(TENANTS, _hammer_snapshots()[k % len(snapshots)])
            installed = k
            time.sleep(0.002)

    def judge(lo: int, hi: int, batch: list[str], verdicts: list[Verdict]) -> None:
        nonlocal checked
        # In force at some point of the call: the snapshot installed when it
        # started, up to one more than the last finished at its end (a
        # replace may have swapped without having counted yet).
        window = [allowed[k % len(snapshots)] for k in range(lo, hi + 2)]
        assert len(verdicts) == len(batch)
        for token, verdict in zip(batch, verdicts, strict=True):
            if not any(verdict == a[token] for a in window):
                raise AssertionError(
                    f"{lo}..{hi} token#{tokens.index(token)}: {verdict} not in "
                    f"{[a[token] for a in window]}"
                )
            assert not (verdict.valid and token in never_valid)
            checked += 1

    def verifier(seed: int) -> None:
        async def run() -> None:
            for round_ in range(30):
                start = (seed * 7 + round_ * 11) % len(tokens)
                batch = tokens[start:] + tokens[:start]
                lo = installed
                verdicts = await engine.verify_batch(batch, w.expect)
                judge(lo, installed, batch, verdicts)
                lo = installed
                small = batch[:5]
                inline = [engine.verify(t, w.expect) for t in small]
                judge(lo, installed, small, inline)

        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)

    replacing = threading.Thread(target=replacer)
    replacing.start()
    verifiers = [threading.Thread(target=verifier, args=(n,)) for n in range(4)]
    for t in verifiers:
        t.start()
    for t in verifiers:
        t.join()
    done.set()
    replacing.join()
    engine.close()
    assert not errors, errors
    assert checked == 4 * 30 * (len(tokens) + 5)
    assert installed > len(snapshots)  # the keys really changed underneath
    if native:
        assert engine._native is not None and engine._native.snapshot() is not None
