"""The remote JWKS cache (fedtoken.federation) against a real HTTP server
(tests._jwks_fixture) that plays a federated issuer, good or hostile, and
counts the requests it gets.

Time is a FakeClock: freshness, staleness, cooldowns and budgets move when a
test says so. The background scheduler ticks every 10 ms of real time and
looks at that clock, so "advance the clock, then wait until the fetch shows"
is how a test drives a background refresh. Waits are bounded; no test
asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jwt
import pytest

from fedtoken.core.errors import ErrorReason, NotFound
from fedtoken.core.model import Expectation, Reason
from fedtoken.core.ports import IssuerKeys
from fedtoken.core.trust import FetchOutcome, IssuerStatus, StoredKeySet, TrustedIssuer
from fedtoken.federation import CacheSettings, RemoteJwksCache
from fedtoken.federation.fetch import DISCOVERY_PATH
from fedtoken.tls.devca import ensure_dev_pki
from fedtoken.verifier.engine import VerificationEngine
from tests._jwks_fixture import JwksServer, MemoryKeySets, Reply, jwk_of, jwks_body, rsa_key
from tests.unit.fakes import NOW, FakeClock, NoRevocations

PARTNER = "https://partner.example"  # an issuer whose jwks_uri is configured
JWKS = "/jwks"
MARKER = "BODY-MARKER-7f3a"  # put in hostile bodies: must never reach last_error

# Fake-clock seconds, except fetch_timeout, scheduler_tick and store_timeout
# (real time, kept small).
FAST = CacheSettings(
    fetch_timeout=0.5,
    default_max_age=100,
    min_max_age=10,
    max_max_age=1000,
    refresh_fraction=0.8,
    refresh_jitter=0.0,
    error_backoff_min=5,
    error_backoff_max=40,
    kid_miss_cooldown=30,
    negative_ttl=60,
    fetch_budget=100,
    budget_window=300,
    scheduler_tick=0.01,
    store_timeout=1.0,
)


def k1() -> dict[str, Any]:
    return jwk_of(rsa_key("k1"), kid="k1")


def k2() -> dict[str, Any]:
    return jwk_of(rsa_key("k2"), kid="k2")


def trusted(issuer: str = PARTNER, jwks_uri: str = "", **kw: Any) -> TrustedIssuer:
    return TrustedIssuer(issuer=issuer, tenants=frozenset({"t1"}), jwks_uri=jwks_uri, **kw)


@dataclass
class Harness:
    cache: RemoteJwksCache
    clock: FakeClock
    events: list[tuple[str, FetchOutcome, str]] = field(default_factory=list)

    def keys(self, issuer: str = PARTNER) -> IssuerKeys:
        found = self.cache.issuer_keys(issuer)
        assert found is not None
        return found

    def status(self, issuer: str = PARTNER) -> IssuerStatus:
        return next(s for s in self.cache.status() if s.issuer == issuer)

    def outcomes(self, issuer: str = PARTNER) -> list[FetchOutcome]:
        return [o for i, o, _ in self.events if i == issuer]


@contextlib.asynccontextmanager
async def running(
    issuers: Iterable[TrustedIssuer],
    *,
    settings: CacheSettings = FAST,
    store: MemoryKeySets | None = None,
    clock: FakeClock | None = None,
    configure_first: bool = True,
    on_fetch: Callable[[str, FetchOutcome, str], None] | None = None,
    **kw: Any,
) -> AsyncIterator[Harness]:
    clock = clock or FakeClock(NOW)
    events: list[tuple[str, FetchOutcome, str]] = []
    kw.setdefault("allow_loopback_http", True)
    cache = RemoteJwksCache(
        store=store,
        clock=clock,
        settings=settings,
        on_fetch=on_fetch or (lambda i, o, d: events.append((i, o, d))),
        rand=lambda: 0.5,
        **kw,
    )
    if configure_first:
        cache.configure(issuers)
        await cache.start()
    else:
        await cache.start()
        cache.configure(issuers)
    try:
        yield Harness(cache, clock, events)
    finally:
        await cache.close()


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll (real time) until ``predicate`` holds; a bound, not a timing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    srv = await JwksServer().start()
    yield srv
    await srv.stop()


@pytest.fixture
async def elsewhere() -> AsyncIterator[JwksServer]:
    """A second server: another origin (another port)."""
    srv = await JwksServer().start()
    yield srv
    await srv.stop()


# --- discovery, the hot path, status ----------------------------------------------


async def test_discovery_finds_the_jwks_and_the_hot_path_serves_it(server: JwksServer) -> None:
    issuer = server.base
    server.serve_discovery(issuer, server.url(JWKS))
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(issuer)]) as h:
        status = await h.cache.refresh(issuer)
        assert (status.last_outcome, status.usable, status.kids) == ("ok", True, ("k1",))
        keys = h.keys(issuer)
        assert (keys.tenant, keys.issuer, keys.local) == ("", issuer, False)
        assert keys.trusted_by == frozenset({"t1"})
        assert keys.allowed_algorithms == frozenset({"RS256"})
        assert keys.withdrawn == {}
        assert set(keys.keys) == {"k1"}
        assert keys.keys["k1"].issuer == issuer
        assert h.cache.issuer_keys("https://not-configured.example") is None
        assert server.counts == {DISCOVERY_PATH: 1, JWKS: 1}
        assert h.outcomes(issuer) == [FetchOutcome.OK]
        assert status.extra["jwks_uri"] == server.url(JWKS)


async def test_a_configured_jwks_uri_is_fetched_without_discovery(server: JwksServer) -> None:
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        await wait_until(lambda: h.status().usable, "the first (scheduled) fetch")
        assert server.counts == {JWKS: 1}
        [status] = h.cache.status()
        assert status.fetches == 1
        assert status.fetched_at == NOW
        assert not status.serving_stale


async def test_an_issuer_without_keys_yet_fails_closed_but_is_not_untrusted(
    server: JwksServer,
) -> None:
    server.set(JWKS, Reply(status=503))
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        await h.cache.refresh(PARTNER)
        keys = h.cache.issuer_keys(PARTNER)
        assert keys is not None and keys.keys == {}  # UNKNOWN_KEY, not UNTRUSTED_ISSUER
        assert not h.status().usable


# --- caching: max-age, ETag, background refresh --------------------------------------


@pytest.mark.parametrize(
    ("max_age", "lifetime"),
    [(50, 50), (1, 10), (0, 10), (10**6, 1000), (None, 100)],
    ids=["honoured", "clamped-up", "zero", "clamped-down", "absent-default"],
)
async def test_max_age_is_clamped_and_refresh_is_scheduled_before_expiry(
    server: JwksServer, max_age: int | None, lifetime: int
) -> None:
    server.serve_jwks(JWKS, [k1()], max_age=max_age)
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        status = await h.cache.refresh(PARTNER)
        assert float(status.extra["fresh_until"]) == NOW + lifetime
        assert NOW < status.next_refresh_at == NOW + 0.8 * lifetime


async def test_revalidation_with_etag_refreshes_in_the_background(server: JwksServer) -> None:
    reply = server.serve_jwks(JWKS, [k1()], max_age=50)
    store = MemoryKeySets()
    async with running([trusted(jwks_uri=server.url(JWKS))], store=store) as h:
        await h.cache.refresh(PARTNER)
        key = h.keys().keys["k1"]
        h.clock.advance(41)  # past the refresh point (40), before expiry (50)
        await wait_until(lambda: server.counts[JWKS] == 2 and h.status().fetched_at == NOW + 41,
                         "the background revalidation")
        assert server.if_none_match[-1] == (JWKS, reply.headers["ETag"])
        status = h.status()
        assert status.last_outcome == "not_modified"
        assert not status.serving_stale
        assert h.keys().keys["k1"] is key  # the same object: the native table stays valid
        assert h.outcomes() == [FetchOutcome.OK, FetchOutcome.NOT_MODIFIED]
        await wait_until(lambda: len(store.saves) == 2, "the set persisted after the 304")
        assert [s.fetched_at for s in store.saves] == [NOW, NOW + 41]
        assert store.saves[-1].etag == reply.headers["ETag"]


async def test_a_changed_document_keeps_the_objects_of_unchanged_keys(
    server: JwksServer,
) -> None:
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        await h.cache.refresh(PARTNER)
        key = h.keys().keys["k1"]
        server.serve_jwks(JWKS, [k2(), k1()])
        assert (await h.cache.refresh(PARTNER)).last_outcome == "ok"
        assert h.keys().keys["k1"] is key
        assert set(h.keys().keys) == {"k1", "k2"}


# --- hostile issuers -------------------------------------------------------------------


def _gzip_body() -> bytes:
    return gzip.compress(jwks_body([k2()]))


HOSTILE: dict[str, tuple[Callable[[], Reply], FetchOutcome]] = {
    "slow-headers": (lambda: Reply(delay=30, body=jwks_body([k2()])), FetchOutcome.ERROR),
    "slow-body": (
        lambda: Reply(body=b'{"keys": [', stream=10**6, stream_chunk=16, stream_delay=0.05),
        FetchOutcome.ERROR,
    ),
    "50MB-streamed": (lambda: Reply(body=b'{"keys": [', stream=50 * 2**20), FetchOutcome.REJECTED),
    "oversize-declared": (lambda: Reply(body=b" " * 200_000), FetchOutcome.REJECTED),
    "invalid-json": (lambda: Reply(body=b'{"keys": [' + MARKER.encode()), FetchOutcome.REJECTED),
    "private-members": (
        lambda: Reply(body=jwks_body([jwk_of(rsa_key("k1"), kid="k1", private=True)])),
        FetchOutcome.REJECTED,
    ),
    "1024-bit-key": (
        lambda: Reply(body=jwks_body([jwk_of(rsa_key("weak", 1024), kid="k1")])),
        FetchOutcome.REJECTED,
    ),
    "duplicate-kids": (
        lambda: Reply(body=jwks_body([k1(), jwk_of(rsa_key("k2"), kid="k1")])),
        FetchOutcome.REJECTED,
    ),
    "no-usable-key": (
        lambda: Reply(body=jwks_body([jwk_of(rsa_key("k2"), kid="k2", use="enc"),
                                      jwk_of(rsa_key("k2"), kid="k3", alg="PS256")])),
        FetchOutcome.REJECTED,
    ),
    "empty-set": (lambda: Reply(body=b'{"keys": []}'), FetchOutcome.REJECTED),
    "500-with-json": (
        lambda: Reply(status=500, body=jwks_body([k2()]),
                      headers={"Content-Type": "application/json"}),
        FetchOutcome.ERROR,
    ),
    "404": (lambda: Reply(status=404, body=MARKER.encode()), FetchOutcome.ERROR),
    "200-not-jwks-shape": (lambda: Reply(body=b'{"keys": {"kid": "k2"}}'), FetchOutcome.REJECTED),
    "compressed": (
        lambda: Reply(body=_gzip_body(), headers={"Content-Encoding": "gzip"}),
        FetchOutcome.ERROR,
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_a_hostile_document_never_replaces_the_good_set(
    server: JwksServer, case: str
) -> None:
    make, expected = HOSTILE[case]
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        await h.cache.refresh(PARTNER)
        before = h.keys().keys
        server.set(JWKS, make())
        status = await h.cache.refresh(PARTNER)
        assert status.last_outcome == expected.value, status.last_error
        assert h.outcomes()[-1] is expected
        assert h.keys().keys == before and h.keys().keys["k1"] is before["k1"]
        assert status.usable and status.kids == ("k1",)
        assert status.last_error and MARKER not in status.last_error
        assert len(status.last_error) <= 300
        if case == "50MB-streamed":
            await asyncio.wait_for(server.stream_done[JWKS].wait(), 5)
            # cut off early: what was written is socket buffers, not the body
            assert server.stream_sent[JWKS] < 25 * 2**20


async def test_a_redirect_is_not_followed(server: JwksServer, elsewhere: JwksServer) -> None:
    server.serve_jwks(JWKS, [k1()])
    elsewhere.serve_jwks(JWKS, [k2()])
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        await h.cache.refresh(PARTNER)
        server.set(JWKS, Reply(status=302, headers={"Location": elsewhere.url(JWKS)}))
        status = await h.cache.refresh(PARTNER)
        assert status.last_outcome == "error"
        assert "redirect" in status.last_error
        assert elsewhere.counts == {}
        assert set(h.keys().keys) == {"k1"}


@pytest.mark.parametrize("bad", ["issuer-mismatch", "http-jwks-uri", "not-json"])
async def test_a_bad_discovery_document_is_rejected(server: JwksServer, bad: str) -> None:
    issuer = server.base
    server.serve_discovery(issuer, server.url(JWKS), max_age=0)  # lifetime: min_max_age (10)
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(issuer)]) as h:
        await h.cache.refresh(issuer)
        if bad == "issuer-mismatch":
            server.serve_discovery("https://someone-else.example", server.url(JWKS))
        elif bad == "http-jwks-uri":
            server.serve_discovery(issuer, "http://partner.example/jwks")
        else:
            server.set(DISCOVERY_PATH, Reply(body=b"{" + MARKER.encode()))
        server.serve_jwks(JWKS, [k2()])  # must not be fetched
        h.clock.advance(11)  # the discovered jwks_uri must be rediscovered
        status = await h.cache.refresh(issuer)
        assert status.last_outcome == "rejected"
        assert MARKER not in status.last_error
        assert server.counts[DISCOVERY_PATH] == 2 and server.counts[JWKS] == 1
        assert set(h.keys(issuer).keys) == {"k1"}


async def test_plain_http_is_refused_unless_allowed_for_loopback(server: JwksServer) -> None:
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))], allow_loopback_http=False) as h:
        status = await h.cache.refresh(PARTNER)
        assert status.last_outcome == "error" and "https" in status.last_error
        assert server.counts == {}


async def test_https_uses_the_ca_bundle(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    srv = await JwksServer(ssl_context=context).start()
    try:
        srv.serve_jwks(JWKS, [k1()])
        issuers = [trusted(jwks_uri=srv.url(JWKS))]
        async with running(issuers, allow_loopback_http=False, ca_file=str(pki.ca)) as h:
            assert (await h.cache.refresh(PARTNER)).last_outcome == "ok"
        async with running(issuers, allow_loopback_http=False) as h:  # system CAs only
            status = await h.cache.refresh(PARTNER)
            assert status.last_outcome == "error" and "TLS" in status.last_error
    finally:
        await srv.stop()


# --- unknown kids: single flight, cooldown, negative cache, budget --------------------


async def test_rotation_new_kid_after_one_fetch_old_kid_until_unpublished(
    server: JwksServer,
) -> None:
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        await h.cache.refresh(PARTNER)
        old = h.keys().keys["k1"]
        server.serve_jwks(JWKS, [k2(), k1()])  # the issuer publishes its next key
        assert "k2" not in h.keys().keys
        assert await h.cache.await_kid(PARTNER, "k2", timeout=5)
        assert server.counts[JWKS] == 2
        assert h.keys().keys["k1"] is old  # still listed: still verifies
        server.serve_jwks(JWKS, [k2()])  # and unpublishes the old one
        h.clock.advance(31)
        assert not await h.cache.await_kid(PARTNER, "k3", timeout=5)
        assert set(h.keys().keys) == {"k2"}


async def test_a_flood_of_random_kids_costs_one_fetch_per_cooldown(server: JwksServer) -> None:
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        await h.cache.refresh(PARTNER)
        server.reset_counts()

        async def flood() -> list[bool]:
            kids = [secrets.token_urlsafe(12) for _ in range(10_000)]
            return await asyncio.gather(*(h.cache.await_kid(PARTNER, k, 5) for k in kids))

        assert not any(await flood())
        assert server.counts[JWKS] == 1  # one fetch in flight, 10,000 waiters on it
        assert not any(await flood())
        assert server.counts[JWKS] == 1  # within the cooldown: none
        h.clock.advance(FAST.kid_miss_cooldown)
        assert not any(await flood())
        assert server.counts[JWKS] == 2  # the next cooldown: one more
        assert await h.cache.await_kid(PARTNER, "k1", 5)  # known kids never wait


async def test_the_waiter_timeout_never_cancels_the_shared_fetch(server: JwksServer) -> None:
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        await h.cache.refresh(PARTNER)
        slow = server.serve_jwks(JWKS, [k1(), k2()])
        slow.delay = 0.2  # below fetch_timeout: slow, not failed
        impatient = await h.cache.await_kid(PARTNER, "k2", timeout=0.001)
        patient = await asyncio.gather(*(h.cache.await_kid(PARTNER, "k2", 5) for _ in range(50)))
        assert impatient is False  # gave up waiting...
        assert all(patient)  # ...but the fetch went on and everyone else got k2
        assert server.counts[JWKS] == 2


async def test_the_negative_cache_answers_a_repeated_unknown_kid(server: JwksServer) -> None:
    settings = replace(FAST, kid_miss_cooldown=0)
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))], settings=settings) as h:
        await h.cache.refresh(PARTNER)
        assert not await h.cache.await_kid(PARTNER, "nope", 5)
        assert server.counts[JWKS] == 2
        assert not await h.cache.await_kid(PARTNER, "nope", 5)
        assert server.counts[JWKS] == 2  # remembered as not found
        assert not await h.cache.await_kid(PARTNER, "other", 5)
        assert server.counts[JWKS] == 3  # another kid, no cooldown: asked
        h.clock.advance(FAST.negative_ttl)
        assert not await h.cache.await_kid(PARTNER, "nope", 5)
        assert server.counts[JWKS] == 4  # forgotten after negative_ttl
        for impossible in ("", "a b", "x\x00", "k" * 300):
            assert not await h.cache.await_kid(PARTNER, impossible, 5)
        assert server.counts[JWKS] == 4  # a kid no document can list costs nothing


async def test_the_budget_is_per_issuer_and_bounds_every_fetch(server: JwksServer) -> None:
    settings = replace(FAST, kid_miss_cooldown=0, negative_ttl=0, fetch_budget=3,
                       budget_window=300)
    server.serve_jwks("/a", [k1()])
    server.serve_jwks("/b", [k2()])
    a, b = "https://a.example", "https://b.example"
    issuers = [trusted(a, server.url("/a")), trusted(b, server.url("/b"))]
    async with running(issuers, settings=settings) as h:
        await h.cache.refresh(a)  # a's first fetch: 1 of its 3
        await h.cache.refresh(b)
        b_fetches = server.counts["/b"]
        for _ in range(50):
            await h.cache.await_kid(a, secrets.token_urlsafe(8), 5)
        assert server.counts["/a"] == 3  # the budget, not 51
        refused = await h.cache.refresh(a)
        assert "budget" in refused.extra["refresh"]
        assert server.counts["/a"] == 3
        # b is not starved by a's flood
        assert (await h.cache.refresh(b)).last_outcome == "not_modified"
        assert server.counts["/b"] == b_fetches + 1
        h.clock.advance(100)  # 3 per 300 s: one fetch back
        assert not await h.cache.await_kid(a, "x1", 5)
        assert not await h.cache.await_kid(a, "x2", 5)
        assert server.counts["/a"] == 4


# --- stale-if-error, fail closed, recovery, persistence -------------------------------


async def test_stale_if_error_then_fail_closed_then_recovery(server: JwksServer) -> None:
    server.serve_jwks(JWKS, [k1()], max_age=100)
    issuer = trusted(jwks_uri=server.url(JWKS), max_stale_seconds=500)
    async with running([issuer]) as h:
        await h.cache.refresh(PARTNER)
        server.set(JWKS, Reply(status=503, body=b'{"keys": []}'))  # the partner goes down

        h.clock.advance(101)  # past freshness: the background refresh fails
        await wait_until(lambda: FetchOutcome.STALE in h.outcomes(), "a failed refresh")
        status = h.status()
        assert (status.usable, status.serving_stale, status.last_outcome) == (True, True, "error")
        assert set(h.keys().keys) == {"k1"}  # stale-if-error: still serving

        h.clock.set(NOW + 500)  # the last second of the staleness bound
        assert set(h.keys().keys) == {"k1"}
        h.clock.set(NOW + 501)  # past it: fail closed, the issuer is still known
        assert h.keys().keys == {}
        status = h.status()
        assert not status.usable and not status.serving_stale
        await wait_until(lambda: FetchOutcome.EXPIRED in h.outcomes(), "an expired report")
        assert not await h.cache.await_kid(PARTNER, "k1", 5)  # refetch fails: still closed

        server.serve_jwks(JWKS, [k1(), k2()])  # the partner comes back
        h.clock.advance(FAST.error_backoff_max)
        await wait_until(lambda: h.status().usable, "recovery without intervention")
        status = h.status()
        assert (status.last_outcome, status.serving_stale) == ("ok", False)
        assert set(h.keys().keys) == {"k1", "k2"}


@pytest.mark.parametrize("configure_first", [True, False],
                         ids=["configure-start", "start-configure"])
async def test_a_restart_during_an_outage_serves_the_persisted_set(
    server: JwksServer, configure_first: bool
) -> None:
    store = MemoryKeySets()
    issuer = trusted(jwks_uri=server.url(JWKS), max_stale_seconds=3600)
    server.serve_jwks(JWKS, [k1()])
    clock = FakeClock(NOW)
    async with running([issuer], store=store, clock=clock) as h:
        await h.cache.refresh(PARTNER)
        await wait_until(lambda: bool(store.saves), "the set persisted")
    server.set(JWKS, Reply(status=503))  # the partner goes down, we restart
    clock.advance(1000)
    async with running([issuer], store=store, clock=clock, configure_first=configure_first) as h:
        assert set(h.keys().keys) == {"k1"}  # at once, before any fetch answered
        assert h.status().extra["source"] == "store"
        await wait_until(lambda: h.status().last_outcome == "error", "the failed refresh")
        assert set(h.keys().keys) == {"k1"}
        assert h.status().serving_stale
    clock.advance(2601)  # now past fetched_at + max_stale
    async with running([issuer], store=store, clock=clock, configure_first=configure_first) as h:
        assert h.keys().keys == {}


async def test_a_persisted_set_from_another_jwks_uri_is_not_served(server: JwksServer) -> None:
    stored = StoredKeySet(issuer=PARTNER, jwks_uri="https://old.example/jwks",
                          body=jwks_body([k1()]), fetched_at=NOW)
    server.set(JWKS, Reply(status=503))
    async with running([trusted(jwks_uri=server.url(JWKS))],
                       store=MemoryKeySets([stored])) as h:
        assert h.keys().keys == {}


async def test_store_failures_never_break_serving(server: JwksServer) -> None:
    store = MemoryKeySets()
    store.fail = True
    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))], store=store) as h:
        assert (await h.cache.refresh(PARTNER)).last_outcome == "ok"
        assert set(h.keys().keys) == {"k1"}
        server.serve_jwks(JWKS, [k1(), k2()])
        assert (await h.cache.refresh(PARTNER)).last_outcome == "ok"
        assert set(h.keys().keys) == {"k1", "k2"}


async def test_a_failing_on_fetch_listener_is_swallowed(server: JwksServer) -> None:
    def explode(issuer: str, outcome: FetchOutcome, detail: str) -> None:
        raise RuntimeError("listener bug")

    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))], on_fetch=explode) as h:
        assert (await h.cache.refresh(PARTNER)).last_outcome == "ok"
        assert set(h.keys().keys) == {"k1"}


# --- configuration -----------------------------------------------------------------------


async def test_configure_forgets_removed_issuers_at_once(server: JwksServer) -> None:
    server.serve_jwks("/a", [k1()])
    server.serve_jwks("/b", [k2()])
    a, b = trusted("https://a.example", server.url("/a")), trusted("https://b.example",
                                                                   server.url("/b"))
    async with running([a, b], settings=replace(FAST, fetch_timeout=30)) as h:
        await h.cache.refresh(a.issuer)
        await h.cache.refresh(b.issuer)
        server.routes["/a"].delay = 30  # a fetch of a hangs...
        h.clock.advance(31)
        pending = asyncio.ensure_future(h.cache.await_kid(a.issuer, "new", 30))
        await wait_until(lambda: server.counts["/a"] == 2, "a's fetch started")
        h.cache.configure([b])  # ...and a is removed meanwhile
        assert h.cache.issuer_keys(a.issuer) is None
        assert [s.issuer for s in h.cache.status()] == [b.issuer]
        assert await asyncio.wait_for(pending, 5) is False  # its fetch was cancelled
        assert set(h.keys(b.issuer).keys) == {"k2"}
        with pytest.raises(NotFound) as caught:
            await h.cache.refresh(a.issuer)
        assert caught.value.reason is ErrorReason.ISSUER_NOT_TRUSTED


async def test_configure_repins_the_held_set_without_fetching(server: JwksServer) -> None:
    rs, ps = jwk_of(rsa_key("k1"), kid="rs"), jwk_of(rsa_key("k2"), kid="ps", alg="PS256")
    server.serve_jwks(JWKS, [rs, ps])
    issuer = trusted(jwks_uri=server.url(JWKS))
    async with running([issuer]) as h:
        await h.cache.refresh(PARTNER)
        assert set(h.keys().keys) == {"rs"}
        key = h.keys().keys["rs"]
        h.cache.configure([replace(issuer, algorithms=frozenset({"RS256", "PS256"}),
                                   tenants=frozenset({"t1", "t2"}))])
        keys = h.keys()
        assert {k: v.alg for k, v in keys.keys.items()} == {"rs": "RS256", "ps": "PS256"}
        assert keys.keys["rs"] is key
        assert keys.trusted_by == frozenset({"t1", "t2"})
        assert keys.allowed_algorithms == frozenset({"RS256", "PS256"})
        assert server.counts[JWKS] == 1


# --- what the engine makes of it --------------------------------------------------------


class _Resolver:
    def __init__(self, cache: RemoteJwksCache) -> None:
        self.issuer_keys = cache.issuer_keys

    def tenant_of_kid(self, kid: str) -> str | None:
        return None


def _token(issuer: str, kid: str, key_name: str, alg: str = "RS256") -> str:
    claims = {"iss": issuer, "sub": "alice", "aud": "api", "iat": NOW, "exp": NOW + 300,
              "jti": secrets.token_hex(8)}
    return jwt.encode(claims, rsa_key(key_name), algorithm=alg, headers={"kid": kid})


async def test_the_engine_verifies_by_issuer_and_kid_with_the_pinned_algorithm(
    server: JwksServer,
) -> None:
    a, b = "https://a.example", "https://b.example"
    server.serve_jwks("/a", [k1(), jwk_of(rsa_key("k2"), kid="noalg", alg=None)])
    server.serve_jwks("/b", [jwk_of(rsa_key("kb"), kid="kb", alg="PS256")])
    issuers = [trusted(a, server.url("/a"), algorithms=frozenset({"RS256", "PS256"})),
               trusted(b, server.url("/b"), algorithms=frozenset({"PS256"}),
                       audiences=frozenset({"api"}))]
    async with running(issuers) as h:
        await h.cache.refresh(a)
        await h.cache.refresh(b)
        engine = VerificationEngine(_Resolver(h.cache), NoRevocations(), clock=h.clock,
                                    native=False)
        try:
            def verdict(token: str, tenant: str = "t1", audience: str = "api") -> Reason:
                found = engine.verify(token, Expectation(audience=audience, tenant=tenant))
                assert found.foreign or found.reason is Reason.UNTRUSTED_ISSUER
                return found.reason

            assert verdict(_token(a, "k1", "k1")) is Reason.OK
            assert verdict(_token(a, "k1", "k1"), tenant="t2") is Reason.UNTRUSTED_ISSUER
            assert verdict(_token(b, "kb", "kb", "PS256"), audience="other") \
                is Reason.AUDIENCE_MISMATCH  # b's audiences reach the engine
            assert verdict(_token(a, "noalg", "k2")) is Reason.OK  # no alg: RS256
            assert verdict(_token(a, "k1", "k1", "PS256")) is Reason.UNSUPPORTED_ALGORITHM
            assert verdict(_token(b, "kb", "kb", "PS256")) is Reason.OK
            # b's key never speaks for a, nor a's for b: keyed by (issuer, kid)
            assert verdict(_token(a, "kb", "kb", "PS256")) is Reason.UNKNOWN_KEY
            assert verdict(_token(b, "k1", "k1", "PS256")) is Reason.UNKNOWN_KEY
            assert verdict(_token("https://c.example", "k1", "k1")) is Reason.UNTRUSTED_ISSUER
            server.set("/a", Reply(status=503))
            h.clock.advance(trusted().max_stale_seconds + 1)  # no refresh succeeded since
            assert verdict(_token(a, "k1", "k1")) is Reason.UNKNOWN_KEY  # fail closed
        finally:
            engine.close()


async def test_a_verify_batch_flood_of_random_kids_costs_one_fetch_per_cooldown(
    server: JwksServer,
) -> None:
    """10,000 tokens with random kids through the real Verification service
    (VerifyBatch, two batches of 5000): every one is UNKNOWN_KEY, the rest of
    the batch is unaffected, and the issuer is asked at most once per
    cooldown (counted at the server), however many kids were unknown."""
    from fedtoken.core.ports import CallContext, Principal
    from fedtoken.service.verification import Verification
    from tests.unit.fakes import AllowAll

    server.serve_jwks(JWKS, [k1()])
    async with running([trusted(jwks_uri=server.url(JWKS))]) as h:
        await h.cache.refresh(PARTNER)
        engine = VerificationEngine(_Resolver(h.cache), NoRevocations(), clock=h.clock,
                                    native=False)

        class Catalog:
            async def tenant(self, tenant_id: str) -> object:
                return type("T", (), {"id": tenant_id})()

        class Audit:
            async def record_verifications(self, *args: object) -> None:
                pass

        service = Verification(engine=engine, audit=Audit(), max_batch=5000,  # type: ignore[arg-type]
                               authz=AllowAll(), catalog=Catalog(),  # type: ignore[arg-type]
                               trusted=h.cache, kid_wait_seconds=2.0)
        ctx = CallContext(Principal(identity="spiffe://test/gateway"))
        expect = Expectation(audience="api", tenant="t1")
        good = _token(PARTNER, "k1", "k1")
        flood = [_token(PARTNER, secrets.token_urlsafe(12), "k2") for _ in range(10_000)]
        server.reset_counts()
        try:
            for start in (0, 5000):
                verdicts = await service.verify_batch([good, *flood[start:start + 4999]],
                                                      expect, ctx)
                assert verdicts[0].valid  # the known kid is untouched by the flood
                assert {v.reason for v in verdicts[1:]} == {Reason.UNKNOWN_KEY}
            assert server.counts[JWKS] == 1  # one refetch in the cooldown, for all of them
            h.clock.advance(FAST.kid_miss_cooldown + 1)
            await service.verify_batch(flood[5000:5100], expect, ctx)  # not negative-cached
            assert server.counts[JWKS] == 2  # and one more in the next
        finally:
            engine.close()
