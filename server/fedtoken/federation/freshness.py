"""The arithmetic of the remote JWKS cache, with no I/O and no clock of its
own: every function takes ``now`` (and any randomness) as an argument, so
each rule is a unit test with numbers in it.

* How long a fetched document is fresh: Cache-Control ``max-age`` (minus
  ``Age``) clamped to the cache's bounds, a default when the issuer says
  nothing. The lower bound stops an issuer (hostile or careless, e.g.
  ``no-store``) from making us refetch on every tick; the upper bound caps how
  long we may keep trusting a key the issuer has since unpublished (after a
  compromise it is the window of exposure).
* When to refresh: before the document expires, at a jittered fraction of its
  lifetime, so replicas that fetched together do not refetch together (Vault
  #9201) and the hot path never meets an expired set while the issuer is up.
* How long to wait after failures: capped exponential backoff, jittered.
* How many fetches an issuer may cause: a token bucket per issuer
  (``FetchBudget``), so a flood of random kids against one issuer costs that
  issuer's budget and nobody else's (jwks-rsa-java #173).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# A delta-seconds value beyond this is treated as this (RFC 9111 section
# 1.2.2 suggests 2**31 as "infinity"); it is clamped far lower anyway.
_DELTA_SECONDS_CAP: Final = 2**31


@dataclass(frozen=True, slots=True)
class CacheDirectives:
    """What the cache uses of a response's Cache-Control and Age headers."""

    max_age: int | None = None  # None: absent or unusable
    no_store: bool = False
    no_cache: bool = False
    age: int = 0


def _delta_seconds(value: str) -> int | None:
    """RFC 9111 delta-seconds: 1*DIGIT, nothing else (no sign, no space)."""
    value = value.strip()
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        value = value[1:-1]  # tolerated, as most caches do
    if not value or not value.isascii() or not value.isdigit():
        return None
    return min(int(value), _DELTA_SECONDS_CAP)


def parse_cache_control(cache_control: str | None, age: str | None = None) -> CacheDirectives:
    """The directives of a Cache-Control header value (several header lines
    may be passed joined with commas) and the Age header.

    Names are case-insensitive. An unparsable max-age is ignored (the default
    lifetime applies); a repeated one counts at its smallest, the reading
    that refreshes soonest. Directives other than max-age, no-store and
    no-cache do not change how a JWKS is cached and are ignored.
    """
    max_age: int | None = None
    no_store = no_cache = False
    for directive in (cache_control or "").split(","):
        name, _, value = directive.partition("=")
        name = name.strip().lower()
        if name == "max-age":
            seconds = _delta_seconds(value)
            if seconds is not None:
                max_age = seconds if max_age is None else min(max_age, seconds)
        elif name == "no-store":
            no_store = True
        elif name == "no-cache":
            no_cache = True
    age_seconds = _delta_seconds(age) if age is not None else None
    return CacheDirectives(max_age, no_store, no_cache, age_seconds or 0)


def clamp(value: float, minimum: float, maximum: float) -> float:
    return max(minimum, min(maximum, value))


def freshness_lifetime(
    directives: CacheDirectives, *, default: float, minimum: float, maximum: float
) -> float:
    """Seconds a document fetched now stays fresh, within [minimum, maximum].

    ``no-store`` and ``no-cache`` ask for revalidation on every use; for a
    key set that would mean a fetch per token, so they count as the minimum
    lifetime. An ``Age`` from an intermediate cache is subtracted: the
    document was already that old when we received it.
    """
    if directives.no_store or directives.no_cache:
        return minimum
    if directives.max_age is None:
        return clamp(default, minimum, maximum)
    return clamp(directives.max_age - directives.age, minimum, maximum)


def refresh_delay(
    lifetime: float, max_stale: float, *, fraction: float, jitter: float, u: float
) -> float:
    """Seconds after a successful fetch at which to refresh in the background.

    At ``fraction`` of the lifetime, made earlier by up to ``jitter`` of it
    (``u`` is a uniform random number in [0, 1)). The lifetime counted is the
    smaller of the freshness lifetime and the issuer's maximum staleness, so
    a set that must stop serving soon is refreshed before it does.
    """
    span = min(lifetime, max_stale)
    return max(0.0, span * (fraction - jitter * u))


def error_backoff(
    failures: int, *, minimum: float, maximum: float, jitter: float, u: float
) -> float:
    """Seconds to wait before retrying after ``failures`` consecutive failed
    fetches (1 or more): minimum, doubled per failure, capped at maximum,
    made shorter by up to ``jitter`` of itself (``u`` uniform in [0, 1)).

    The cap keeps retrying while the issuer is away, so it is picked up again
    without intervention within about ``maximum`` seconds of coming back.
    """
    exponent = min(max(failures, 1) - 1, 62)  # 2**62 * minimum is past any cap
    delay = min(maximum, minimum * 2.0**exponent)
    return delay * (1.0 - jitter * u)


class FetchBudget:
    """A token bucket: at most ``capacity`` fetches at once, refilled at
    ``capacity`` per ``window`` seconds. So in any interval of length T an
    issuer gets at most ``capacity * (1 + T / window)`` fetches.

    Mutable, but with no clock of its own: every call says what time it is.
    Time that goes backwards (a clock set back) refills nothing, and counting
    resumes from the earlier time, so a jump back does not freeze the bucket.
    """

    __slots__ = ("_capacity", "_rate", "_tokens", "_updated")

    def __init__(self, capacity: int, window: float, now: float) -> None:
        if capacity < 1 or window <= 0:
            raise ValueError("a fetch budget needs capacity >= 1 and a positive window")
        self._capacity = float(capacity)
        self._rate = capacity / window
        self._tokens = float(capacity)
        self._updated = now

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
        self._updated = now

    def available(self, now: float) -> float:
        """Fetches that may start now (fractional: a refill in progress)."""
        self._refill(now)
        return self._tokens

    def try_take(self, now: float) -> bool:
        """Spend one fetch if there is one; False (nothing spent) otherwise."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def next_available_at(self, now: float) -> float:
        """When the next whole fetch will be available (``now`` if it is)."""
        self._refill(now)
        if self._tokens >= 1.0:
            return now
        return now + (1.0 - self._tokens) / self._rate


def cooldown_over(last: float | None, cooldown: float, now: float) -> bool:
    """Whether a kid-miss refetch may start: none yet, or the last one
    started at least ``cooldown`` seconds ago. A clock set back (``now``
    before ``last``) ends the cooldown rather than extending it by the size
    of the jump; the budget still bounds what that can cost."""
    return last is None or now < last or now - last >= cooldown


class NegativeCache:
    """Kids recently looked for and not found, each until its own expiry.

    Bounded: when full, the oldest entries go first (a flood of random kids
    must not grow memory; losing an entry only costs one more cooldown-bound
    fetch). Mutable, no clock of its own.
    """

    __slots__ = ("_entries", "_max_entries", "_ttl")

    def __init__(self, ttl: float, max_entries: int) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: dict[str, float] = {}  # kid -> expires at; insertion order = age

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, kid: str, now: float) -> None:
        if self._max_entries <= 0 or self._ttl <= 0:
            return
        self._entries.pop(kid, None)  # re-inserted as the newest
        while len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[kid] = now + self._ttl

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and item in self._entries

    def hit(self, kid: str, now: float) -> bool:
        """Whether ``kid`` was not found less than ttl seconds ago."""
        expires = self._entries.get(kid)
        if expires is None:
            return False
        if now < expires:
            return True
        del self._entries[kid]
        return False

    def discard(self, kid: str) -> None:
        self._entries.pop(kid, None)

    def clear(self) -> None:
        self._entries.clear()
