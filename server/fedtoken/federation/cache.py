"""The remote JWKS cache of the trusted foreign issuers (``TrustedKeys``).

Two sides, two rules:

* The hot path (``issuer_keys``) is a dictionary lookup in an immutable
  snapshot plus one clock read, from any thread, and never waits: keys are
  fetched in the background before they expire, and an issuer that is slow,
  down or hostile costs its own tokens nothing until its last good set runs
  past the issuer's maximum staleness.
* Everything that mutates (fetches, schedule, budgets, negative cache,
  persistence) runs on the event loop that called ``start``; ``configure``,
  ``await_kid``, ``refresh`` and ``close`` must be called there too.

Bounds, per issuer (the numbers are ``CacheSettings``):

* one fetch in flight at a time; everyone who needs a fetch waits on it;
* at most ``fetch_budget`` fetches per ``budget_window`` of every kind
  (scheduled, kid-miss, operator): a token bucket, so one issuer's flood
  never spends another's budget;
* at most one kid-miss refetch per ``kid_miss_cooldown``; a kid such a fetch
  did not find is answered "unknown" for ``negative_ttl`` without asking;
* a document is fresh for its Cache-Control max-age clamped to
  [``min_max_age``, ``max_max_age``] (``default_max_age`` when it says
  nothing), refreshed at a jittered ``refresh_fraction`` of that, retried
  with capped exponential backoff after failures;
* a key set serves until ``fetched_at + max_stale_seconds`` of its issuer
  (stale-if-error), then the issuer's tokens fail closed (no keys) until a
  fetch succeeds again.

A fetch that fails, for whatever reason, never replaces or empties the last
good set (pyjwt #1162, step-ca #2769); that includes a document with no key
we can use. Keys are looked up by (issuer, kid): each issuer has its own
dictionary, and a key only ever verifies for the issuer whose document
listed it (cyoda-go #97).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from fedtoken.core.errors import ErrorReason, NotFound, PolicyViolation
from fedtoken.core.jose import is_valid_kid, loads_strict
from fedtoken.core.jwks import MAX_JWKS_BYTES, parse_trusted_jwks
from fedtoken.core.model import KeyState
from fedtoken.core.ports import Clock, IssuerKeys, KeySetStore, VerificationKey
from fedtoken.core.trust import (
    FEDERATION_ALGORITHMS,
    FetchOutcome,
    IssuerStatus,
    StoredKeySet,
    TrustedIssuer,
)
from fedtoken.federation.fetch import FetchFailed, HttpDocument, JwksFetcher, check_url, tls_context
from fedtoken.federation.freshness import (
    FetchBudget,
    NegativeCache,
    cooldown_over,
    error_backoff,
    freshness_lifetime,
    refresh_delay,
)
from fedtoken.ops import metrics

if TYPE_CHECKING:
    from fedtoken.core.ports import TrustedKeys

__all__ = ["CacheSettings", "RemoteJwksCache", "pin_key_set"]

log = logging.getLogger(__name__)

# last_error is shown to operators and audited: bounded, and always our own
# words (fetch.py never quotes a response).
MAX_ERROR_LENGTH: Final = 300

OnFetch = Callable[[str, FetchOutcome, str], None]


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The bounds of the remote JWKS cache (seconds unless named otherwise).

    Defaults suit production; tests shrink the waits to fractions of a
    second. Per-issuer settings (algorithms, maximum staleness) live on
    ``TrustedIssuer``.
    """

    # One HTTP request (connect, headers and body) must finish within this;
    # a fetch that needs discovery first makes two requests.
    fetch_timeout: float = 5.0
    # Size caps of a JWKS (core.jwks's own bound) and a discovery document.
    max_jwks_bytes: int = MAX_JWKS_BYTES
    max_discovery_bytes: int = 65536
    # Freshness: Cache-Control max-age clamped to [min_max_age, max_max_age];
    # default_max_age when the issuer sends none. The floor stops an issuer
    # from making us poll it (max-age=0, no-store); the ceiling bounds how
    # long a key the issuer withdrew (say, after a compromise) still verifies.
    default_max_age: float = 900.0
    min_max_age: float = 60.0
    max_max_age: float = 6 * 3600.0
    # Refresh at refresh_fraction of the lifetime, up to refresh_jitter of it
    # earlier (so replicas do not refresh in step).
    refresh_fraction: float = 0.8
    refresh_jitter: float = 0.1
    # After consecutive failures: error_backoff_min doubled per failure,
    # capped at error_backoff_max (the longest an issuer that came back waits
    # to be noticed by the background refresh).
    error_backoff_min: float = 5.0
    error_backoff_max: float = 300.0
    # Unknown kids: at most one refetch per kid_miss_cooldown per issuer;
    # kids that a refetch did not find are answered unknown for negative_ttl
    # (longer than the cooldown, so one repeated bad kid does not cost a
    # fetch per cooldown), at most negative_max_entries kids per issuer.
    kid_miss_cooldown: float = 30.0
    negative_ttl: float = 60.0
    negative_max_entries: int = 1024
    # Every fetch of an issuer spends one of fetch_budget, refilled at
    # fetch_budget per budget_window (token bucket).
    fetch_budget: int = 10
    budget_window: float = 300.0
    # How often the background scheduler looks for due refreshes.
    scheduler_tick: float = 1.0
    # Bound of one KeySetStore call (load at start, save after a fetch).
    store_timeout: float = 10.0

    def __post_init__(self) -> None:
        positive = {
            "fetch_timeout": self.fetch_timeout,
            "min_max_age": self.min_max_age,
            "error_backoff_min": self.error_backoff_min,
            "budget_window": self.budget_window,
            "scheduler_tick": self.scheduler_tick,
            "store_timeout": self.store_timeout,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"CacheSettings.{name} must be positive")
        if not self.min_max_age <= self.default_max_age <= self.max_max_age:
            raise ValueError("CacheSettings needs min_max_age <= default_max_age <= max_max_age")
        if self.error_backoff_max < self.error_backoff_min:
            raise ValueError("CacheSettings needs error_backoff_min <= error_backoff_max")
        fraction, jitter = self.refresh_fraction, self.refresh_jitter
        if not 0 < fraction <= 1 or not 0 <= jitter < fraction:
            raise ValueError("CacheSettings needs 0 <= refresh_jitter < refresh_fraction <= 1")
        if self.fetch_budget < 1 or self.max_jwks_bytes < 1 or self.max_discovery_bytes < 1:
            raise ValueError("CacheSettings needs fetch_budget and the size caps >= 1")
        if self.kid_miss_cooldown < 0 or self.negative_ttl < 0 or self.negative_max_entries < 0:
            raise ValueError("CacheSettings needs non-negative cooldown and negative cache")


# --- admitting a document ---------------------------------------------------------

# A loaded key is reused while the document names it with the same kid, n, e
# and algorithm (the engine's native table remembers keys by identity).
_KeyIdentity = tuple[str, str, str, str]


def _implied_algorithm(allowed: frozenset[str]) -> str | None:
    """The one algorithm a key without ``alg`` verifies with.

    A VerificationKey carries one algorithm and the engine requires the
    token's to equal it (RFC 8725 section 3.1: one key, one algorithm). A
    JWK without ``alg`` is conventionally RS256 (core.jwks reads it so), so
    it gets RS256 when the issuer is allowed RS256, else the issuer's only
    algorithm; with several and no RS256 there is no single answer and the
    key is not used.
    """
    if "RS256" in allowed:
        return "RS256"
    if len(allowed) == 1:
        return next(iter(allowed))
    return None


def pin_key_set(
    body: bytes,
    trust: TrustedIssuer,
    previous: Mapping[_KeyIdentity, VerificationKey] | None = None,
    *,
    max_bytes: int = MAX_JWKS_BYTES,
) -> tuple[dict[str, VerificationKey], dict[_KeyIdentity, VerificationKey]]:
    """The keys of ``trust``'s document ``body`` it may verify with, by kid
    (and by identity, for the next call's ``previous``).

    ``parse_trusted_jwks`` applies the trust-store rules (whole document
    refused for private members, duplicate kids, bad JSON, oversize;
    unusable keys skipped). On top of it each key is pinned to the issuer's
    algorithms: a key whose ``alg`` the issuer is not allowed is skipped, a
    key without one gets the algorithm ``_implied_algorithm`` says. A
    document left with no key is refused too (PolicyViolation): installing
    it would empty the cache.
    """
    try:
        public = parse_trusted_jwks(body, max_bytes=max_bytes)
        entries = loads_strict(body)["keys"] if public else []
    except PolicyViolation:
        raise
    except Exception as exc:  # any other failure is a refusal too
        # parse_trusted_jwks lets a TypeError out for an unhashable "alg"
        # (a list, an object); whatever it raises, the document is refused.
        raise PolicyViolation(
            f"JWKS refused ({type(exc).__name__} while parsing)", field="jwks"
        ) from exc
    allowed = trust.algorithms & FEDERATION_ALGORITHMS
    implied = _implied_algorithm(allowed)
    previous = previous or {}
    keys: dict[str, VerificationKey] = {}
    loaded: dict[_KeyIdentity, VerificationKey] = {}
    for entry in entries:
        kid = entry.get("kid")
        if type(kid) is not str or kid not in public:
            continue
        alg = entry.get("alg", implied)
        if type(alg) is not str or alg not in allowed:
            continue
        identity = (kid, entry["n"], entry["e"], alg)
        key = previous.get(identity)
        if key is None or key.issuer != trust.issuer:
            key = VerificationKey(
                kid=kid,
                tenant="",
                issuer=trust.issuer,
                alg=alg,
                public_key=public[kid],
                state=KeyState.ACTIVE,
                # The engine namespaces the revocations of a foreign key's
                # tokens by issuer: a foreign jti never matches a local one.
                foreign=True,
            )
        keys[kid] = key
        loaded[identity] = key
    if not keys:
        raise PolicyViolation(
            f"JWKS has no usable key for algorithms {sorted(allowed)} (RSA >= 2048 bits, "
            "use sig); keeping the previous set",
            field="jwks",
        )
    return keys, loaded


# --- state ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _KeySet:
    """One accepted document of one issuer, with its keys loaded."""

    jwks_uri: str
    body: bytes
    etag: str
    fetched_at: float  # last confirmed (200 or 304)
    lifetime: float  # fresh until fetched_at + lifetime
    keys: Mapping[str, VerificationKey]
    loaded: Mapping[_KeyIdentity, VerificationKey]

    @property
    def fresh_until(self) -> float:
        return self.fetched_at + self.lifetime


@dataclass(frozen=True, slots=True)
class _Published:
    """What the hot path reads for one issuer: its keys until serve_until,
    the same issuer with no keys after (fail closed, UNKNOWN_KEY)."""

    serving: IssuerKeys
    closed: IssuerKeys
    serve_until: float


@dataclass(eq=False, slots=True)
class _Issuer:
    """The mutable state of one configured issuer (event loop only)."""

    config: TrustedIssuer
    budget: FetchBudget
    negative: NegativeCache
    keyset: _KeySet | None = None
    next_refresh_at: float = 0.0
    failures: int = 0
    fetches: int = 0
    last_outcome: FetchOutcome | None = None
    last_error: str = ""
    last_kid_miss_at: float | None = None
    inflight: asyncio.Task[None] | None = None
    discovered_uri: str = ""
    discovered_until: float = -math.inf
    source: str = ""  # "store" while serving what start() loaded
    unsaved: StoredKeySet | None = None
    saver: asyncio.Task[None] | None = None


def _bounded(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


class RemoteJwksCache:
    """Implements ``TrustedKeys``: see the module docstring for the rules.

    ``store`` persists the last good set of each issuer (None: nothing
    survives a restart). ``ca_file`` replaces the system CA store for https.
    ``allow_loopback_http`` lets tests use plain http to 127.0.0.1.
    ``on_fetch(issuer, outcome, detail)`` hears every fetch outcome (and
    STALE / EXPIRED when a failed fetch leaves an old set serving or none);
    it must not block, and whatever it raises is logged and swallowed.
    """

    def __init__(
        self,
        *,
        store: KeySetStore | None,
        clock: Clock,
        settings: CacheSettings | None = None,
        ca_file: str | None = None,
        allow_loopback_http: bool = False,
        on_fetch: OnFetch | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``rand``: uniform [0, 1) numbers for jitter (tests pass a constant)."""
        self._store = store
        self._clock = clock
        self._settings = settings or CacheSettings()
        self._allow_loopback_http = allow_loopback_http
        self._on_fetch = on_fetch
        self._rand = rand
        self._fetcher = JwksFetcher(
            timeout=self._settings.fetch_timeout,
            ssl_context=tls_context(ca_file),
            allow_loopback_http=allow_loopback_http,
        )
        self._states: dict[str, _Issuer] = {}
        # The hot path's snapshot: replaced whole, never mutated in place.
        self._published: Mapping[str, _Published] = {}
        self._persisted: dict[str, StoredKeySet] = {}
        self._started = False
        self._closed = False
        self._scheduler: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    @property
    def settings(self) -> CacheSettings:
        return self._settings

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP client, load the persisted key sets (those within
        their issuer's maximum staleness serve at once, so a restart during a
        partner's outage is not an outage here) and start the background
        refresh. Never waits on any issuer."""
        if self._started:
            return
        self._started = True
        await self._fetcher.open()
        if self._store is not None:
            try:
                async with asyncio.timeout(self._settings.store_timeout):
                    stored = await self._store.load_key_sets()
                self._persisted = {s.issuer: s for s in stored}
            except Exception as exc:  # noqa: BLE001 - serving goes on without them
                log.warning(
                    "could not load the persisted JWKS of trusted issuers (%s); "
                    "fetching them from the issuers instead",
                    type(exc).__name__,
                )
        for state in self._states.values():
            self._seed(state)
            self._publish(state)
        self._wake = asyncio.Event()
        self._scheduler = asyncio.get_running_loop().create_task(
            self._schedule(), name="fedtoken-jwks-scheduler"
        )

    async def close(self) -> None:
        """Stop refreshing: cancel fetches in flight, give pending saves up
        to ``store_timeout``, close the HTTP client. The last snapshot keeps
        answering ``issuer_keys``."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._scheduler,) if t is not None]
        tasks += [s.inflight for s in self._states.values() if s.inflight is not None]
        for task in tasks:
            task.cancel()
        savers = [s.saver for s in self._states.values() if s.saver is not None]
        if savers:
            _, pending = await asyncio.wait(savers, timeout=self._settings.store_timeout)
            for task in pending:
                task.cancel()
            tasks += list(pending)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._fetcher.close()

    def configure(self, issuers: Iterable[TrustedIssuer]) -> None:
        """Replace the trusted issuers. New ones are fetched at once (in the
        background; a persisted set serves meanwhile if fresh enough),
        removed ones are forgotten at once (their fetch is cancelled and
        their tokens find no issuer). A changed jwks_uri starts the issuer
        afresh; other changes (algorithms, tenants, staleness) apply to the
        key set already held."""
        wanted: dict[str, TrustedIssuer] = {}
        for trust in issuers:
            if trust.issuer in wanted:
                log.warning("trusted issuer %r configured twice; the last one counts",
                            trust.issuer)
            wanted[trust.issuer] = trust
        now = self._clock.now()
        states: dict[str, _Issuer] = {}
        for issuer, trust in wanted.items():
            state = self._states.get(issuer)
            if state is not None and state.config.jwks_uri == trust.jwks_uri:
                if state.config != trust:
                    self._reconfigure(state, trust)
            else:
                if state is not None:
                    # Another jwks_uri: what was fetched from the old one
                    # (in memory or persisted) no longer speaks for it.
                    self._forget(state)
                    self._persisted.pop(issuer, None)
                state = self._new_state(trust, now)
                if self._started:
                    self._seed(state)
            states[issuer] = state
        for issuer, state in self._states.items():
            if issuer not in states:
                self._forget(state)
                self._persisted.pop(issuer, None)
        self._states = states
        self._published = {issuer: self._entry(state) for issuer, state in states.items()}
        if self._wake is not None:
            self._wake.set()

    # --- the hot path -------------------------------------------------------------

    def issuer_keys(self, issuer: str) -> IssuerKeys | None:
        """The keys of a trusted issuer (local=False, tenant "", trusted_by
        its tenants, its audiences), or None when it is not configured.

        An issuer with no key set yet, or past its maximum staleness, gets
        IssuerKeys with no keys: its tokens are refused as UNKNOWN_KEY (and
        the caller may ``await_kid``), never accepted, and never mistaken
        for an issuer nobody trusts."""
        entry = self._published.get(issuer)
        if entry is None:
            return None
        return entry.serving if self._clock.now() <= entry.serve_until else entry.closed

    def _known(self, issuer: str, kid: str) -> bool:
        keys = self.issuer_keys(issuer)
        return keys is not None and kid in keys.keys

    # --- unknown kids and operator refreshes --------------------------------------

    async def await_kid(self, issuer: str, kid: str, timeout: float) -> bool:
        """Whether ``kid`` is (now) a usable key of ``issuer``.

        Asks the issuer only when all of these allow it: the kid is not in
        the negative cache, no kid-miss refetch started within the
        cooldown, and the issuer's budget has a fetch left. A fetch already
        in flight (of any kind) is joined instead of starting another. The
        wait is bounded by ``timeout``; giving up never cancels the fetch,
        which other waiters (and the cache) still want.
        """
        if self._known(issuer, kid):
            return True
        state = self._states.get(issuer)
        if state is None or not self._started or self._closed:
            return False
        if not is_valid_kid(kid):
            return False  # no document can list it (pin_key_set skips such kids)
        now = self._clock.now()
        if state.negative.hit(kid, now):
            return False
        task = state.inflight
        if task is None:
            if not cooldown_over(state.last_kid_miss_at, self._settings.kid_miss_cooldown, now):
                return False
            if not state.budget.try_take(now):
                return False
            state.last_kid_miss_at = now
            task = self._launch(state, "unknown kid")
        if timeout > 0:
            await asyncio.wait({task}, timeout=timeout)
        if self._known(issuer, kid):
            return True
        # Only a fetch that got the issuer's document shows the kid is not
        # there; a failed one says nothing about it (the cooldown and the
        # budget bound the retries instead).
        answered = state.last_outcome in (FetchOutcome.OK, FetchOutcome.NOT_MODIFIED)
        if task.done() and answered and self._states.get(issuer) is state:
            state.negative.add(kid, self._clock.now())
        return False

    async def refresh(self, issuer: str) -> IssuerStatus:
        """Fetch now (an operator's request), within the issuer's budget but
        regardless of the schedule and the kid-miss cooldown; joins a fetch
        already in flight. Returns the status afterwards; when the budget is
        spent, the status says so in ``extra["refresh"]`` and nothing is
        fetched. NotFound when the issuer is not configured."""
        state = self._states.get(issuer)
        if state is None:
            raise NotFound(f"issuer {issuer!r} is not a trusted issuer",
                           reason=ErrorReason.ISSUER_NOT_TRUSTED, field="issuer")
        if not self._started or self._closed:
            return self._status_of(state, refusal="the JWKS cache is not running")
        task = state.inflight
        if task is None:
            now = self._clock.now()
            if not state.budget.try_take(now):
                wait = state.budget.next_available_at(now) - now
                return self._status_of(
                    state, refusal=f"fetch budget spent; next fetch possible in {wait:.0f} s"
                )
            task = self._launch(state, "operator refresh")
        # The fetch bounds itself (fetch_timeout per request); a cancelled
        # caller does not cancel it.
        await asyncio.wait({task})
        current = self._states.get(issuer)
        return self._status_of(current if current is not None else state)

    def status(self) -> list[IssuerStatus]:
        """Every configured issuer, sorted by issuer."""
        return [self._status_of(self._states[i]) for i in sorted(self._states)]

    def _status_of(self, state: _Issuer, *, refusal: str = "") -> IssuerStatus:
        now = self._clock.now()
        keyset = state.keyset
        serve_until = keyset.fetched_at + state.config.max_stale_seconds if keyset else -math.inf
        usable = keyset is not None and now <= serve_until
        extra: dict[str, str] = {}
        extra["jwks_uri"] = keyset.jwks_uri if keyset else (
            state.config.jwks_uri or state.discovered_uri
        )
        extra["budget"] = f"{state.budget.available(now):.1f}"
        if keyset is not None:
            extra["fresh_until"] = f"{keyset.fresh_until:.3f}"
            extra["serve_until"] = f"{serve_until:.3f}"
        if state.source:
            extra["source"] = state.source
        if refusal:
            extra["refresh"] = refusal
        return IssuerStatus(
            issuer=state.config.issuer,
            kids=tuple(sorted(keyset.keys)) if keyset else (),
            fetched_at=keyset.fetched_at if keyset else 0.0,
            next_refresh_at=state.next_refresh_at,
            serving_stale=usable and keyset is not None and now > keyset.fresh_until,
            usable=usable,
            last_outcome=state.last_outcome.value if state.last_outcome else "",
            last_error=state.last_error,
            fetches=state.fetches,
            extra=extra,
        )

    # --- configuration helpers ----------------------------------------------------

    def _new_state(self, trust: TrustedIssuer, now: float) -> _Issuer:
        s = self._settings
        return _Issuer(
            config=trust,
            budget=FetchBudget(s.fetch_budget, s.budget_window, now),
            negative=NegativeCache(s.negative_ttl, s.negative_max_entries),
            next_refresh_at=now,
        )

    def _reconfigure(self, state: _Issuer, trust: TrustedIssuer) -> None:
        """Same issuer and jwks_uri, other settings: re-pin the set we hold."""
        state.config = trust
        keyset = state.keyset
        if keyset is None:
            return
        try:
            keys, loaded = pin_key_set(
                keyset.body, trust, keyset.loaded, max_bytes=self._settings.max_jwks_bytes
            )
        except PolicyViolation as exc:
            log.warning("issuer %r: its key set has no usable key under the new settings (%s)",
                        trust.issuer, exc.message)
            state.keyset = None
            state.next_refresh_at = self._clock.now()
            return
        state.keyset = replace(keyset, keys=keys, loaded=loaded)

    def _forget(self, state: _Issuer) -> None:
        if state.inflight is not None:
            state.inflight.cancel()
        state.unsaved = None

    def _seed(self, state: _Issuer) -> None:
        """Serve the persisted set of this issuer, if there is one it may
        still serve; a refresh is due at once either way."""
        stored = self._persisted.get(state.config.issuer)
        if stored is None or state.keyset is not None:
            return
        trust = state.config
        now = self._clock.now()
        if trust.jwks_uri and stored.jwks_uri != trust.jwks_uri:
            return  # fetched from a URL no longer configured
        if check_url(stored.jwks_uri, allow_loopback_http=self._allow_loopback_http):
            return
        if now > stored.fetched_at + trust.max_stale_seconds:
            return
        try:
            keys, loaded = pin_key_set(stored.body, trust, max_bytes=self._settings.max_jwks_bytes)
        except PolicyViolation as exc:
            log.warning("issuer %r: the persisted key set is refused (%s)", trust.issuer,
                        exc.message)
            return
        # Its Cache-Control was not kept: count it fresh for the shortest
        # lifetime, and revalidate it (with its ETag) at once.
        state.keyset = _KeySet(stored.jwks_uri, stored.body, stored.etag, stored.fetched_at,
                               self._settings.min_max_age, keys, loaded)
        state.source = "store"
        if not trust.jwks_uri:
            state.discovered_uri = stored.jwks_uri  # discovery is redone first
        state.next_refresh_at = now

    # --- publishing ---------------------------------------------------------------

    def _entry(self, state: _Issuer) -> _Published:
        trust = state.config
        allowed = trust.algorithms & FEDERATION_ALGORITHMS
        keyset = state.keyset

        def keys_of(keys: Mapping[str, VerificationKey]) -> IssuerKeys:
            return IssuerKeys(
                tenant="",
                issuer=trust.issuer,
                allowed_algorithms=allowed,
                keys=dict(keys),
                withdrawn={},
                local=False,
                trusted_by=trust.tenants,
                audiences=trust.audiences,
            )

        closed = keys_of({})
        if keyset is None:
            return _Published(closed, closed, -math.inf)
        return _Published(
            keys_of(keyset.keys), closed, keyset.fetched_at + trust.max_stale_seconds
        )

    def _publish(self, state: _Issuer) -> None:
        issuer = state.config.issuer
        if self._states.get(issuer) is state:
            self._published = {**self._published, issuer: self._entry(state)}

    # --- fetching -----------------------------------------------------------------

    def _launch(self, state: _Issuer, trigger: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(
            self._fetch(state, trigger), name=f"fedtoken-jwks-fetch {state.config.issuer}"
        )
        state.inflight = task

        def done(finished: asyncio.Task[None]) -> None:
            if state.inflight is finished:
                state.inflight = None

        task.add_done_callback(done)
        return task

    async def _jwks_uri(self, state: _Issuer, now: float) -> str:
        trust = state.config
        if trust.jwks_uri:
            return trust.jwks_uri
        if state.discovered_uri and now < state.discovered_until:
            return state.discovered_uri
        s = self._settings
        uri, directives = await self._fetcher.discover(
            trust.issuer, max_bytes=s.max_discovery_bytes
        )
        state.discovered_uri = uri
        state.discovered_until = now + freshness_lifetime(
            directives, default=s.default_max_age, minimum=s.min_max_age, maximum=s.max_max_age
        )
        return uri

    async def _fetch(self, state: _Issuer, trigger: str) -> None:
        state.fetches += 1
        issuer = state.config.issuer
        previous = state.keyset
        try:
            uri = await self._jwks_uri(state, self._clock.now())
            etag = previous.etag if previous is not None and previous.jwks_uri == uri else ""
            document = await self._fetcher.get(
                uri, max_bytes=self._settings.max_jwks_bytes, etag=etag
            )
            keyset, outcome, detail = self._admit(state, uri, document)
        except FetchFailed as failure:
            self._failed(state, failure.outcome, failure.detail, trigger)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a fetch must never take the cache down
            log.exception("issuer %r: unexpected error while fetching its JWKS", issuer)
            self._failed(state, FetchOutcome.ERROR, f"internal error ({type(exc).__name__})",
                         trigger)
            return
        if self._states.get(issuer) is not state:
            return  # removed or reconfigured while the fetch ran
        s = self._settings
        state.keyset = keyset
        state.source = ""
        state.failures = 0
        state.last_outcome = outcome
        state.last_error = ""
        state.next_refresh_at = keyset.fetched_at + refresh_delay(
            keyset.lifetime,
            state.config.max_stale_seconds,
            fraction=s.refresh_fraction,
            jitter=s.refresh_jitter,
            u=self._rand(),
        )
        self._publish(state)
        log.debug("issuer %r: %s (%s)", issuer, outcome.value, trigger)
        metrics.observe_jwks_fetch(issuer, outcome.value)
        self._report(issuer, outcome, detail)
        self._save(state, StoredKeySet(issuer=issuer, jwks_uri=keyset.jwks_uri,
                                       body=keyset.body, etag=keyset.etag,
                                       fetched_at=keyset.fetched_at))

    def _admit(
        self, state: _Issuer, uri: str, document: HttpDocument
    ) -> tuple[_KeySet, FetchOutcome, str]:
        """The key set a fetched answer makes current, or FetchFailed."""
        s = self._settings
        now = self._clock.now()
        lifetime = freshness_lifetime(
            document.directives,
            default=s.default_max_age,
            minimum=s.min_max_age,
            maximum=s.max_max_age,
        )
        previous = state.keyset
        if document.status == 304:
            if previous is None or previous.jwks_uri != uri:
                raise FetchFailed(FetchOutcome.ERROR, "HTTP 304 but no cached set for this URL")
            keyset = replace(previous, fetched_at=now, lifetime=lifetime,
                             etag=document.etag or previous.etag)
            return keyset, FetchOutcome.NOT_MODIFIED, f"revalidated {len(keyset.keys)} keys"
        try:
            keys, loaded = pin_key_set(
                document.body,
                state.config,
                previous.loaded if previous is not None else None,
                max_bytes=s.max_jwks_bytes,
            )
        except PolicyViolation as exc:
            raise FetchFailed(FetchOutcome.REJECTED, exc.message) from exc
        keyset = _KeySet(uri, document.body, document.etag, now, lifetime, keys, loaded)
        # The digest of the kids makes a rotation that keeps the key count a
        # new detail, so the audit trail records it as a new key set.
        kids = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
        return keyset, FetchOutcome.OK, f"{len(keys)} usable keys (kids {kids})"

    def _failed(self, state: _Issuer, outcome: FetchOutcome, detail: str, trigger: str) -> None:
        issuer = state.config.issuer
        if self._states.get(issuer) is not state:
            return
        s = self._settings
        now = self._clock.now()
        detail = _bounded(detail)
        state.failures += 1
        state.last_outcome = outcome
        state.last_error = detail
        if state.next_refresh_at <= now:
            # A failed demand fetch leaves a later scheduled refresh alone.
            state.next_refresh_at = now + error_backoff(
                state.failures,
                minimum=s.error_backoff_min,
                maximum=s.error_backoff_max,
                jitter=s.refresh_jitter,
                u=self._rand(),
            )
        log.warning("issuer %r: JWKS fetch %s (%s): %s; keeping the last good set",
                    issuer, outcome.value, trigger, detail)
        metrics.observe_jwks_fetch(issuer, outcome.value)
        self._report(issuer, outcome, detail)
        keyset = state.keyset
        if keyset is None:
            return
        serve_until = keyset.fetched_at + state.config.max_stale_seconds
        if now > serve_until:
            self._report(issuer, FetchOutcome.EXPIRED,
                         f"last good set is {now - keyset.fetched_at:.0f} s old, past the "
                         f"maximum staleness of {state.config.max_stale_seconds} s: "
                         "tokens of this issuer are refused")
        elif now > keyset.fresh_until:
            self._report(issuer, FetchOutcome.STALE,
                         f"serving the last good set, {now - keyset.fetched_at:.0f} s old, "
                         f"for at most {serve_until - now:.0f} s more")

    def _report(self, issuer: str, outcome: FetchOutcome, detail: str) -> None:
        if self._on_fetch is None:
            return
        try:
            self._on_fetch(issuer, outcome, detail)
        except Exception:  # a listener must never break the cache
            log.exception("on_fetch listener failed for issuer %r (%s)", issuer, outcome.value)

    # --- the background refresh ---------------------------------------------------

    def _due(self, state: _Issuer, now: float) -> bool:
        # A next_refresh_at further ahead than any schedule could put it
        # means the clock was set back: refresh rather than wait it out.
        s = self._settings
        horizon = max(s.max_max_age, s.error_backoff_max)
        return now >= state.next_refresh_at or state.next_refresh_at - now > horizon

    async def _schedule(self) -> None:
        wake = self._wake
        assert wake is not None
        while not self._closed:
            try:
                now = self._clock.now()
                for state in list(self._states.values()):
                    if (
                        state.inflight is None
                        and self._due(state, now)
                        and state.budget.try_take(now)
                    ):
                        self._launch(state, "scheduled refresh")
            except Exception:  # the scheduler must outlive any bug
                log.exception("JWKS refresh scheduler")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that arrives as the event is set (close() right
            # after configure()), and the scheduler would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.scheduler_tick):
                    await wake.wait()
            wake.clear()

    # --- persistence --------------------------------------------------------------

    def _save(self, state: _Issuer, stored: StoredKeySet) -> None:
        """Persist ``stored`` in the background, latest wins. Best effort: a
        store that fails or hangs is logged and never delays serving."""
        self._persisted[stored.issuer] = stored
        if self._store is None:
            return
        state.unsaved = stored
        if state.saver is None or state.saver.done():
            state.saver = asyncio.get_running_loop().create_task(
                self._saver(state), name=f"fedtoken-jwks-save {stored.issuer}"
            )

    async def _saver(self, state: _Issuer) -> None:
        store = self._store
        assert store is not None
        while state.unsaved is not None and self._states.get(state.config.issuer) is state:
            stored, state.unsaved = state.unsaved, None
            try:
                async with asyncio.timeout(self._settings.store_timeout):
                    await store.save_key_set(stored)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - best effort, serving goes on
                log.warning("issuer %r: could not persist its key set (%s); it still serves "
                            "from memory", stored.issuer, type(exc).__name__)


if TYPE_CHECKING:

    def _implements(cache: RemoteJwksCache) -> TrustedKeys:
        return cache  # mypy checks the port
