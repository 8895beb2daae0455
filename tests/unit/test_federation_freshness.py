"""The pure rules of the remote JWKS cache (fedtoken.federation): caching
directives, clamping, the refresh schedule, backoff, the fetch budget, the
cooldown, the negative cache, the URL rule, discovery documents and pinning
a key set to its issuer's algorithms. No network, no clock: every time is a
number in the test."""

from __future__ import annotations

import json

import pytest

from fedtoken.core.errors import PolicyViolation
from fedtoken.core.trust import FetchOutcome, TrustedIssuer
from fedtoken.federation.cache import CacheSettings, pin_key_set
from fedtoken.federation.fetch import FetchFailed, check_url, discovery_url, parse_discovery
from fedtoken.federation.freshness import (
    CacheDirectives,
    FetchBudget,
    NegativeCache,
    cooldown_over,
    error_backoff,
    freshness_lifetime,
    parse_cache_control,
    refresh_delay,
)
from tests._jwks_fixture import jwk_of, jwks_body, rsa_key

ISSUER = "https://idp.partner.example"

# --- Cache-Control ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "age", "expected"),
    [
        (None, None, CacheDirectives()),
        ("max-age=300", None, CacheDirectives(max_age=300)),
        ("public, MAX-AGE=300, must-revalidate", None, CacheDirectives(max_age=300)),
        ('max-age="120"', None, CacheDirectives(max_age=120)),
        ("max-age=300, max-age=60", None, CacheDirectives(max_age=60)),  # the sooner
        ("max-age=-5", None, CacheDirectives()),  # unusable: the default applies
        ("max-age=1e3", None, CacheDirectives()),
        ("max-age=", None, CacheDirectives()),
        ("max-age=99999999999999999999", None, CacheDirectives(max_age=2**31)),
        ("no-store", None, CacheDirectives(no_store=True)),
        ("no-cache, max-age=300", None, CacheDirectives(max_age=300, no_cache=True)),
        ("max-age=300", "100", CacheDirectives(max_age=300, age=100)),
        ("max-age=300", "garbage", CacheDirectives(max_age=300)),
    ],
)
def test_cache_control_parsing(header: str | None, age: str | None,
                               expected: CacheDirectives) -> None:
    assert parse_cache_control(header, age) == expected


BOUNDS = {"default": 900.0, "minimum": 60.0, "maximum": 3600.0}


@pytest.mark.parametrize(
    ("directives", "lifetime"),
    [
        (CacheDirectives(), 900.0),  # absent: the default
        (CacheDirectives(max_age=300), 300.0),
        (CacheDirectives(max_age=0), 60.0),  # clamped up: no polling
        (CacheDirectives(max_age=5), 60.0),
        (CacheDirectives(max_age=10**9), 3600.0),  # clamped down
        (CacheDirectives(max_age=300, age=200), 100.0),  # already 200 s old
        (CacheDirectives(max_age=300, age=10**6), 60.0),
        (CacheDirectives(max_age=3000, no_store=True), 60.0),
        (CacheDirectives(no_cache=True), 60.0),
    ],
)
def test_freshness_lifetime_is_clamped(directives: CacheDirectives, lifetime: float) -> None:
    assert freshness_lifetime(directives, **BOUNDS) == lifetime


def test_default_lifetime_is_clamped_too() -> None:
    assert freshness_lifetime(CacheDirectives(), default=10, minimum=60, maximum=100) == 60


# --- schedule and backoff ---------------------------------------------------------


def test_refresh_happens_before_expiry_with_jitter() -> None:
    delays = [refresh_delay(1000, 10**6, fraction=0.8, jitter=0.1, u=u / 10) for u in range(10)]
    assert all(700 < d <= 800 for d in delays)
    assert len(set(delays)) == 10  # spread out, not all at once
    assert refresh_delay(1000, 10**6, fraction=0.8, jitter=0.0, u=0.99) == 800


def test_refresh_comes_before_max_staleness_when_that_is_shorter() -> None:
    assert refresh_delay(1000, 100, fraction=0.8, jitter=0.0, u=0.0) == 80


def test_error_backoff_doubles_and_is_capped() -> None:
    def backoff(failures: int, u: float = 0.0) -> float:
        return error_backoff(failures, minimum=5, maximum=300, jitter=0.1, u=u)

    assert [backoff(n) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert backoff(10**6) == 300  # no overflow
    assert backoff(0) == 5
    assert 270 <= backoff(20, u=0.999) < 300  # jittered downwards only


# --- budget, cooldown, negative cache -----------------------------------------------


def test_budget_allows_capacity_then_refills_at_its_rate() -> None:
    budget = FetchBudget(3, 300, now=1000)
    assert [budget.try_take(1000) for _ in range(4)] == [True, True, True, False]
    assert budget.next_available_at(1000) == pytest.approx(1100)  # 3 per 300 s
    assert not budget.try_take(1099)
    assert budget.try_take(1100.5)
    assert not budget.try_take(1100.5)
    # never more than capacity, however long it rests
    budget.try_take(10**9)
    assert budget.available(10**9) == pytest.approx(2)


def test_budget_over_any_interval_is_bounded() -> None:
    budget = FetchBudget(5, 100, now=0)
    taken = sum(budget.try_take(t / 10) for t in range(0, 10_000))  # every 0.1 s for 1000 s
    assert taken <= 5 * (1 + 1000 / 100)


def test_budget_survives_a_clock_set_back() -> None:
    budget = FetchBudget(1, 100, now=10_000)
    assert budget.try_take(10_000)
    assert not budget.try_take(5_000)  # back in time: nothing refilled
    assert budget.try_take(5_100)  # and counting resumed from there, not from 10_000


def test_cooldown() -> None:
    assert cooldown_over(None, 30, 0)
    assert not cooldown_over(100, 30, 129.9)
    assert cooldown_over(100, 30, 130)
    assert cooldown_over(100, 30, 50)  # clock set back: not frozen for 50 s


def test_negative_cache_expires_and_is_bounded() -> None:
    negative = NegativeCache(ttl=60, max_entries=3)
    negative.add("a", 0)
    assert negative.hit("a", 59.9)
    assert not negative.hit("a", 60)
    assert "a" not in negative  # expired entries are dropped when seen
    for kid in ("b", "c", "d", "e"):
        negative.add(kid, 100)
    assert len(negative) == 3
    assert not negative.hit("b", 100)  # the oldest went first
    assert all(negative.hit(k, 100) for k in ("c", "d", "e"))
    off = NegativeCache(ttl=0, max_entries=10)
    off.add("x", 0)
    assert not off.hit("x", 0)


# --- the URL rule -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "loopback_http", "allowed"),
    [
        ("https://idp.example/jwks", False, True),
        ("https://idp.example:8443/a/b", False, True),
        ("HTTPS://idp.example/jwks", False, False),  # exactly as core.trust spells it
        ("https://idp.example/jwks?kid=x", False, False),  # no query, no fragment
        ("https://idp.example/jwks#x", False, False),
        ("https://idp.example/a/../jwks", False, False),  # clients would rewrite it
        ("https://127.0.0.1:8443/jwks", False, True),
        ("http://idp.example/jwks", True, False),  # http never, but to loopback in tests
        ("http://127.0.0.1:8080/jwks", False, False),
        ("http://127.0.0.1:8080/jwks", True, True),
        ("http://127.1.2.3/jwks", True, True),
        ("http://[::1]:9/jwks", True, True),
        ("http://localhost/jwks", True, True),
        ("http://10.0.0.1/jwks", True, False),
        ("http://localhost.evil.example/jwks", True, False),
        ("https://user:pw@idp.example/jwks", False, False),
        ("https:///jwks", False, False),
        ("https://idp.example:99999/jwks", False, False),
        ("https://[::1/jwks", False, False),
        ("file:///etc/passwd", True, False),
        ("ftp://idp.example/jwks", False, False),
        ("", False, False),
        ("https://idp.example/" + "a" * 3000, False, False),
        ("https://idp.exämple/jwks", False, False),
    ],
)
def test_url_rule(url: str, loopback_http: bool, allowed: bool) -> None:
    problem = check_url(url, allow_loopback_http=loopback_http)
    assert (problem is None) is allowed
    if problem is not None and url:
        assert url not in problem  # never echoed (a discovered URL is the issuer's text)


def test_discovery_url_drops_one_trailing_slash() -> None:
    assert discovery_url(ISSUER) == ISSUER + "/.well-known/openid-configuration"
    assert discovery_url(ISSUER + "/t/a/") == ISSUER + "/t/a/.well-known/openid-configuration"


def discovery(**document: object) -> bytes:
    return json.dumps(document).encode()


def test_discovery_document_gives_its_jwks_uri() -> None:
    body = discovery(issuer=ISSUER, jwks_uri=ISSUER + "/jwks")
    assert parse_discovery(body, ISSUER, allow_loopback_http=False) == ISSUER + "/jwks"


@pytest.mark.parametrize(
    "body",
    [
        discovery(issuer=ISSUER + "/", jwks_uri=ISSUER + "/jwks"),  # exact match only
        discovery(issuer="https://IDP.partner.example", jwks_uri=ISSUER + "/jwks"),
        discovery(issuer="https://evil.example", jwks_uri=ISSUER + "/jwks"),
        discovery(jwks_uri=ISSUER + "/jwks"),
        discovery(issuer=ISSUER),
        discovery(issuer=ISSUER, jwks_uri=["https://idp.example/jwks"]),
        discovery(issuer=ISSUER, jwks_uri="http://idp.partner.example/jwks"),
        b'{"issuer": "x", "issuer": "' + ISSUER.encode() + b'", "jwks_uri": "https://a/j"}',
        b"[]",
        b"not json",
        b"\xff\xfe",
    ],
)
def test_bad_discovery_documents_are_rejected(body: bytes) -> None:
    with pytest.raises(FetchFailed) as caught:
        parse_discovery(body, ISSUER, allow_loopback_http=True)
    assert caught.value.outcome is FetchOutcome.REJECTED


# --- settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"fetch_timeout": 0},
        {"min_max_age": 100, "default_max_age": 50},
        {"max_max_age": 10, "default_max_age": 50},
        {"error_backoff_min": 10, "error_backoff_max": 5},
        {"refresh_fraction": 0},
        {"refresh_fraction": 0.5, "refresh_jitter": 0.5},
        {"fetch_budget": 0},
        {"kid_miss_cooldown": -1},
        {"max_jwks_bytes": 0},
    ],
)
def test_settings_refuse_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CacheSettings(**bad)  # type: ignore[arg-type]


def test_default_settings_are_consistent() -> None:
    s = CacheSettings()
    assert s.min_max_age <= s.default_max_age <= s.max_max_age
    assert s.negative_ttl >= s.kid_miss_cooldown  # see CacheSettings


# --- pinning a key set to its issuer -------------------------------------------------


def trust(*algorithms: str) -> TrustedIssuer:
    return TrustedIssuer(issuer=ISSUER, tenants=frozenset({"t"}),
                         algorithms=frozenset(algorithms or {"RS256"}))


def test_keys_are_pinned_to_the_issuers_algorithms() -> None:
    body = jwks_body([
        jwk_of(rsa_key("a"), kid="rs", alg="RS256"),
        jwk_of(rsa_key("b"), kid="ps", alg="PS256"),
        jwk_of(rsa_key("c"), kid="rs384", alg="RS384"),  # fine for core, not for this issuer
        jwk_of(rsa_key("d"), kid="noalg", alg=None),
    ])
    keys, _ = pin_key_set(body, trust("RS256"))
    assert {k: v.alg for k, v in keys.items()} == {"rs": "RS256", "noalg": "RS256"}
    keys, _ = pin_key_set(body, trust("PS256"))
    assert {k: v.alg for k, v in keys.items()} == {"ps": "PS256", "noalg": "PS256"}
    keys, _ = pin_key_set(body, trust("RS256", "PS256"))
    assert {k: v.alg for k, v in keys.items()} == {"rs": "RS256", "ps": "PS256",
                                                    "noalg": "RS256"}
    for key in keys.values():
        assert (key.issuer, key.tenant, key.foreign) == (ISSUER, "", True)
        assert key.state.published


def test_pinning_keeps_the_key_objects_of_unchanged_keys() -> None:
    a, b = jwk_of(rsa_key("a"), kid="a"), jwk_of(rsa_key("b"), kid="b")
    first, loaded = pin_key_set(jwks_body([a]), trust())
    second, _ = pin_key_set(jwks_body([b, a]), trust(), loaded)
    assert second["a"] is first["a"]
    # the same kid with another key is another object
    third, _ = pin_key_set(jwks_body([jwk_of(rsa_key("c"), kid="a")]), trust(), loaded)
    assert third["a"] is not first["a"]


@pytest.mark.parametrize(
    "keys",
    [
        [],
        [jwk_of(rsa_key("weak", 1024), kid="weak")],
        [jwk_of(rsa_key("a"), kid="enc", use="enc")],
        [jwk_of(rsa_key("a"), kid="ps", alg="PS256")],  # only RS256 allowed
        [jwk_of(rsa_key("a"), kid="list", alg=["RS256"])],  # core raises TypeError on this
        [jwk_of(rsa_key("a"), kid="x", alg=None, kty="EC")],
    ],
    ids=["empty", "1024-bit", "enc", "other-alg", "alg-list", "not-rsa"],
)
def test_a_document_without_usable_keys_is_refused(keys: list[dict[str, object]]) -> None:
    with pytest.raises(PolicyViolation):
        pin_key_set(jwks_body(keys), trust("RS256"))
