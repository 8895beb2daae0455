"""Federation metrics from a real RemoteJwksCache against a local JWKS server
(tests._jwks_fixture): fetch outcomes counted per configured issuer, the
sampler's key set age, stale serving and usability; nothing from a token."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from fedtoken.core.trust import TrustedIssuer
from fedtoken.federation import CacheSettings, RemoteJwksCache
from fedtoken.ops import metrics
from tests._jwks_fixture import JwksServer, Reply, jwk_of, rsa_key
from tests.unit._metrics_fixture import fresh, rendered_samples
from tests.unit.fakes import NOW, FakeClock

__all__ = ["fresh"]  # the fixture, used by name

PARTNER = "https://partner.example"
SETTINGS = CacheSettings(fetch_timeout=0.5, default_max_age=100, min_max_age=10,
                         max_max_age=1000, refresh_fraction=0.8, refresh_jitter=0.0,
                         error_backoff_min=5, error_backoff_max=40, kid_miss_cooldown=30,
                         negative_ttl=60, fetch_budget=100, budget_window=300,
                         scheduler_tick=0.01, store_timeout=1.0)


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    srv = await JwksServer().start()
    yield srv
    await srv.stop()


def scrape() -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = collections.defaultdict(dict)
    for name, labels, v in rendered_samples():
        out[name][frozenset(labels.items())] = v
    return out


async def test_fetch_outcomes_and_key_set_gauges_of_a_configured_issuer(
        fresh: None, server: JwksServer) -> None:
    server.serve_jwks("/jwks", [jwk_of(rsa_key("k1"), kid="k1")])
    clock = FakeClock(NOW)
    cache = RemoteJwksCache(store=None, clock=clock, settings=SETTINGS,
                            allow_loopback_http=True, rand=lambda: 0.5)
    cache.configure([TrustedIssuer(issuer=PARTNER, tenants=frozenset({"t1"}),
                                   jwks_uri=server.url("/jwks"))])
    await cache.start()
    try:
        assert (await cache.refresh(PARTNER)).usable
        sampler = metrics._Sampler(SimpleNamespace(trusted_keys=cache))
        clock.advance(30)
        sampler.run_once()
        s = scrape()
        issuer = frozenset({("issuer", PARTNER)})
        assert s["fedtoken_jwks_key_set_age_seconds"] == {issuer: 30}
        assert s["fedtoken_jwks_serving_stale"] == {issuer: 0}
        assert s["fedtoken_jwks_usable"] == {issuer: 1}

        server.set("/jwks", Reply(status=503))
        clock.advance(400)  # past the set's freshness (max-age 300)
        await cache.refresh(PARTNER)
        sampler.run_once()
        s = scrape()
        fetches = {dict(k)["outcome"]: v for k, v in s["fedtoken_jwks_fetches_total"].items()}
        assert {dict(k)["issuer"] for k in s["fedtoken_jwks_fetches_total"]} == {PARTNER}
        assert fetches["ok"] >= 1 and fetches["error"] >= 1
        assert set(fetches) <= metrics.FETCH_OUTCOMES  # stale/expired are gauges
        assert s["fedtoken_jwks_serving_stale"] == {issuer: 1}
        assert s["fedtoken_jwks_usable"] == {issuer: 1}
        assert s["fedtoken_jwks_key_set_age_seconds"] == {issuer: 430}

        cache.configure([])  # trust withdrawn
        sampler.run_once()
        s = scrape()
        assert s["fedtoken_jwks_usable"] == {issuer: 0}
    finally:
        await cache.close()
