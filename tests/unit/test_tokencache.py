"""The verified-token cache: it skips only decoding and the signature check;
key state, claims and revocation are judged on every call."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from fedtoken.core.model import Expectation, KeyState, Reason
from fedtoken.verifier.native import NATIVE_AVAILABLE
from fedtoken.verifier.tokencache import CachedToken, TokenCache, digest
from tests.unit._world import ISS_B, KEYS, NOW, TENANTS, World, make_world, record
from tests.unit.test_attacks import CASES

PATHS = [False] + ([None] if NATIVE_AVAILABLE else [])


@pytest.fixture(params=PATHS, ids=lambda n: "python" if n is False else "native")
def w(request: Any) -> World:
    world = make_world(native=request.param, token_cache=64)
    # Warm both the native table and the cache with a valid token.
    assert world.verify(world.token()).valid
    assert world.verify(world.token()).valid
    return world


def _cached(w: World, token: str) -> bool:
    key = digest(token)
    return key is not None and w.engine._cache is not None and w.engine._cache.get(key) is not None


def test_valid_token_is_cached_and_hits(w: World) -> None:
    token = w.token()
    first = w.verify(token)
    assert first.valid and _cached(w, token)
    second = w.verify(token)
    assert second == first
    assert second.claims is not first.claims  # each caller its own dict


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_attack_table_with_a_warm_cache(w: World, c: Any) -> None:
    token = c.build(w)
    for _ in range(2):  # the second call may come from the cache
        verdict = w.verify(token, c.expect)
        assert verdict.reason is c.reason
        assert verdict.valid is (c.reason is Reason.OK)


async def test_attack_table_as_batches_with_a_warm_cache(w: World) -> None:
    plain = [c for c in CASES if c.expect is None]
    tokens = [c.build(w) for c in plain] * 2
    for _ in range(2):
        verdicts = await w.engine.verify_batch(tokens, w.expect)
        assert [v.reason for v in verdicts] == [c.reason for c in plain] * 2


def test_same_payload_other_signature_never_hits(w: World) -> None:
    good = w.token()
    w.verify(good)
    forged = w.token(sign_with="attacker")
    assert good.rsplit(".", 1)[0] == forged.rsplit(".", 1)[0]
    assert w.verify(forged).reason is Reason.BAD_SIGNATURE
    assert not _cached(w, forged)


def test_revocation_after_caching(w: World) -> None:
    token = w.token(claims=w.claims(jti="later", sub="carol"))
    assert w.verify(token).valid and _cached(w, token)
    w.revocations.jtis.add(("acme", "later"))
    assert w.verify(token).reason is Reason.REVOKED
    w.revocations.jtis.clear()
    w.revocations.subjects.add(("acme", "carol"))
    assert w.verify(token).reason is Reason.REVOKED
    w.revocations.subjects.clear()
    w.revocations.kids.add(w.kids["a_active"])
    assert w.verify(token).reason is Reason.KEY_REVOKED
    w.revocations.kids.clear()
    w.revocations.stale = True
    assert w.verify(token).reason is Reason.REVOCATION_UNAVAILABLE


def test_expiry_and_not_before_after_caching(w: World) -> None:
    token = w.token(claims=w.claims(nbf=NOW - 5, exp=NOW + 100))
    assert w.verify(token).valid and _cached(w, token)
    w.clock.t = NOW + 1000
    assert w.verify(token).reason is Reason.EXPIRED
    w.clock.t = NOW - 1000
    assert w.verify(token).reason is Reason.NOT_YET_VALID


def test_other_expectations_after_caching(w: World) -> None:
    token = w.token()
    assert w.verify(token).valid
    assert w.verify(token, Expectation(audience="other")).reason is Reason.AUDIENCE_MISMATCH
    assert w.verify(token, Expectation(audience=w.expect.audience, issuer=ISS_B)).reason \
        is Reason.ISSUER_MISMATCH
    assert w.verify(token, Expectation(audience=w.expect.audience, tenant="beta")).reason \
        is Reason.TENANT_MISMATCH


def _replace(w: World, **states: tuple[KeyState, dict[str, int]]) -> None:
    records = []
    for name, (tenant, state, alg, extra) in KEYS.items():
        if name in states:
            state, extra = states[name]
        records.append(record(name, tenant, state, alg, **extra))
    w.resolver.replace(TENANTS, records)


@pytest.mark.parametrize(
    ("state", "extra", "reason"),
    [
        (KeyState.RETIRED, {}, Reason.KEY_INACTIVE),
        (KeyState.DESTROYED, {}, Reason.KEY_INACTIVE),
        (KeyState.COMPROMISED, {"compromised_at": NOW - 1}, Reason.KEY_REVOKED),
    ],
)
def test_key_withdrawn_after_caching(
    w: World, state: KeyState, extra: dict[str, int], reason: Reason
) -> None:
    token = w.token()
    assert w.verify(token).valid and _cached(w, token)
    _replace(w, a_active=(state, extra))
    assert w.verify(token).reason is reason


def test_key_state_change_gives_a_new_object_and_still_verifies(w: World) -> None:
    token = w.token()
    assert w.verify(token).valid
    _replace(w, a_active=(KeyState.RETIRING, {}))
    assert w.verify(token).valid  # re-verified under the new key object


def test_key_removed_after_caching(w: World) -> None:
    token = w.token()
    assert w.verify(token).valid
    records = [record(n, t, s, a, **x) for n, (t, s, a, x) in KEYS.items() if n != "a_active"]
    w.resolver.replace(TENANTS, records)
    assert w.verify(token).reason is Reason.UNKNOWN_KEY


def test_replaced_key_under_the_same_kid_must_verify_again(w: World) -> None:
    token = w.token()
    assert w.verify(token).valid
    # The same kid now names another public key: the cached check no longer
    # holds, the token must be verified again (and fails).
    impostor = record("attacker", "acme", KeyState.ACTIVE)
    forged_jwk = dict(impostor.public_jwk, kid=w.kids["a_active"])
    records = [record(n, t, s, a, **x) for n, (t, s, a, x) in KEYS.items() if n != "a_active"]
    from dataclasses import replace as dc_replace

    records.append(dc_replace(impostor, kid=w.kids["a_active"], public_jwk=forged_jwk))
    w.resolver.replace(TENANTS, records)
    assert w.verify(token).reason is Reason.BAD_SIGNATURE
    assert not _cached(w, token) or w.verify(token).reason is Reason.BAD_SIGNATURE


def test_bound_holds_under_a_flood() -> None:
    w = make_world(native=False, token_cache=16)
    for i in range(100):
        assert w.verify(w.token(claims=w.claims(jti=f"j{i}"))).valid
    cache = w.engine._cache
    assert cache is not None and len(cache) <= 16


def test_oversized_payload_is_not_cached() -> None:
    w = make_world(native=False, token_cache=16)
    token = w.token(claims=w.claims(pad="x" * 4000))
    assert w.verify(token).valid
    assert not _cached(w, token)


def test_cache_off() -> None:
    w = make_world(native=False, token_cache=0)
    assert w.engine._cache is None
    assert w.verify(w.token()).valid


def test_unit_cache_eviction() -> None:
    cache = TokenCache(2)
    entry = CachedToken({}, b"{}", "RS256", "k", None)  # type: ignore[arg-type]
    for i in range(5):
        cache.put(bytes([i]), entry)
    assert len(cache) == 2 and cache.get(bytes([4])) is entry


def test_threads_hammering_hits_and_invalidations(w: World) -> None:
    token = w.token()
    good = {Reason.OK, Reason.KEY_REVOKED, Reason.REVOKED}
    stop = threading.Event()
    seen: list[Reason] = []

    def verifier() -> None:
        while not stop.is_set():
            seen.append(w.verify(token).reason)

    threads = [threading.Thread(target=verifier) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            if i % 3 == 0:
                _replace(w, a_active=(KeyState.COMPROMISED, {"compromised_at": NOW - 1}))
            elif i % 3 == 1:
                w.revocations.jtis.add(("acme", "jti-1"))
                _replace(w)
            else:
                w.revocations.jtis.clear()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen and set(seen) <= good
    # Back to a good state: the token verifies again.
    w.revocations.jtis.clear()
    _replace(w)
    assert w.verify(token).valid
    assert asyncio.run(w.engine.verify_batch([token] * 40, w.expect))[0].valid
