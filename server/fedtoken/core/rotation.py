"""Scheduled key rotation: the timings of a tenant's schedule and the step
machine that keeps its keys on it. Pure: no clock, no I/O.

One principle (Vault, Dex; docs/architecture.md, "Lessons from peers"): an
honest cache of the JWKS always holds every key a valid token may name. For a
rotation period P, the JWKS max-age A, the leeway L (clock skew and
notification delay) and the tenant's maximum token lifetime T:

* A = clamp(min(configured max-age, P // 6), 1, 86400): a cache refetches
  several times per lead, so a new key reaches it well before it signs;
* the lead (prepublication) = max(P // 4, A + L): the next key is generated
  and published at least one max-age plus the leeway before it signs, so a
  cache that fetched just before it appeared has refetched by then;
* the grace = T + A + L: after it stops signing, a key stays published until
  the last token it signed has expired and every cache has seen that;
* then it is unpublished (RETIRED).

Validation (``check_policy``): P >= the ``min_rotation_period_seconds``
setting; the lead fits in half the period; and the grace ends before the
grace spans at most MAX_GRACE_PERIODS periods (T + A + L <= 4 P), so the
JWKS stays small. No token outlives its key's publication: Issue caps every
token at T, and the grace is derived from T.

The step machine (``plan``) reads a tenant's key records and ``now`` and says
which steps are due and when the next one is. A step is due because of the
state it changes, so applying it makes it not due any more: the machine is
idempotent by construction, and a crash at any point leaves a state from
which ``plan`` names what is left to do (``Plan.notes`` say why).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from fedtoken.core.errors import PolicyViolation
from fedtoken.core.model import KeyRecord, KeyState, TenantPolicy

DAY: Final = 86_400
DEFAULT_ROTATION_PERIOD: Final = 30 * DAY
# The setting min_rotation_period_seconds defaults to this; only tests and
# demos lower it.
DEFAULT_MIN_ROTATION_PERIOD: Final = 3600
MAX_ROTATION_PERIOD: Final = 3650 * DAY
MAX_JWKS_MAX_AGE: Final = DAY
# Fractions of the period (SPIRE prepares the next key well before use).
MAX_AGE_FRACTION: Final = 6
LEAD_FRACTION: Final = 4
# A key's grace may span at most this many periods, so a JWKS holds at most
# MAX_GRACE_PERIODS + 2 keys (retiring ones, the active one, the next one).
MAX_GRACE_PERIODS: Final = 4
# A key that just stopped signing keeps its private half this long, so that
# replicas still on the previous catalog snapshot (until the change
# notification reaches them, milliseconds) do not fail to sign with it.
DESTROY_SETTLE: Final = 2


@dataclass(frozen=True, slots=True)
class Schedule:
    """The derived timings of one tenant's rotation (seconds)."""

    period: int
    max_token_lifetime: int
    leeway: int
    jwks_max_age: int
    prepublish: int
    grace: int
    # Tokens signed under an earlier, longer lifetime expire by then (0:
    # none): no key is unpublished before it plus one max-age and the leeway.
    earlier_tokens_expire_by: int = 0

    def unpublish_at(self, retiring_at: int) -> int:
        """When a key that stopped signing at ``retiring_at`` may leave the JWKS."""
        floor = (self.earlier_tokens_expire_by + self.jwks_max_age + self.leeway
                 if self.earlier_tokens_expire_by else 0)
        return max(retiring_at + self.grace, floor)


def schedule(period: int, max_token_lifetime: int, *, configured_max_age: int,
             leeway: int) -> Schedule:
    """The timings for a period and token lifetime (see the module docstring);
    no validation (``check_policy`` does that)."""
    period = max(1, period)
    max_age = max(1, min(configured_max_age, period // MAX_AGE_FRACTION, MAX_JWKS_MAX_AGE))
    lead = max(period // LEAD_FRACTION, max_age + leeway)
    return Schedule(period=period, max_token_lifetime=max_token_lifetime, leeway=leeway,
                    jwks_max_age=max_age, prepublish=lead,
                    grace=max_token_lifetime + max_age + leeway)


def check_policy(s: Schedule, *, min_period: int) -> None:
    """Refuse (PolicyViolation, naming the numbers) a schedule under which a
    cache could miss a key or a token could outlive its key's publication."""
    if not min_period <= s.period <= MAX_ROTATION_PERIOD:
        raise PolicyViolation(
            f"rotation period {s.period} s is outside {min_period}..{MAX_ROTATION_PERIOD} s "
            "(the setting min_rotation_period_seconds allows shorter periods)",
            field="rotation_period")
    if 2 * s.prepublish > s.period:
        raise PolicyViolation(
            f"rotation period {s.period} s is too short: each key must be published "
            f"{s.prepublish} s (JWKS max-age {s.jwks_max_age} s + leeway {s.leeway} s) before "
            "it signs, more than half the period; choose a longer period",
            field="rotation_period")
    if s.grace > MAX_GRACE_PERIODS * s.period:
        allowed = max(0, MAX_GRACE_PERIODS * s.period - s.jwks_max_age - s.leeway)
        raise PolicyViolation(
            f"max token lifetime {s.max_token_lifetime} s is too long for rotation period "
            f"{s.period} s: the grace a key stays published after it stops signing "
            f"({s.max_token_lifetime} + max-age {s.jwks_max_age} + leeway {s.leeway} = "
            f"{s.grace} s) must not exceed {MAX_GRACE_PERIODS} periods "
            f"({MAX_GRACE_PERIODS * s.period} s); allow at most {allowed} s, or a longer period",
            field="max_token_lifetime")


class StepKind(enum.Enum):
    """The rotation steps, in the order a key meets them."""

    GENERATE = "GENERATE"  # a new key, PENDING: published, not signing
    ACTIVATE = "ACTIVATE"  # pending -> ACTIVE; the previous active -> RETIRING
    DESTROY_PRIVATE = "DESTROY_PRIVATE"  # a key that will never sign again
    UNPUBLISH = "UNPUBLISH"  # RETIRING -> RETIRED after the grace


@dataclass(frozen=True, slots=True)
class Step:
    """One step, due ``at`` (Unix seconds).

    ``expects`` is the fencing condition: the states (by kid) this step was
    planned on. The scheduler applies it in one transaction that re-checks
    them, so a leader acting on a stale view changes nothing. ``kid`` is the
    key the step is about (empty for GENERATE); ``previous`` is the active
    key an ACTIVATE retires (empty when there is none).
    """

    kind: StepKind
    at: int
    kid: str = ""
    previous: str = ""
    expects: Mapping[str, KeyState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``plan`` found: the steps due now (in order), the next one
    after them (None: nothing scheduled), and notes on states a crash or a
    manual change left behind (for logs and the operator)."""

    due: tuple[Step, ...]
    upcoming: Step | None
    notes: tuple[str, ...] = ()


def _oldest(keys: Iterable[KeyRecord]) -> KeyRecord | None:
    return min(keys, key=lambda k: (k.created_at, k.kid), default=None)


def plan(s: Schedule, keys: Iterable[KeyRecord], now: int) -> Plan:
    """The steps one tenant's keys are due for at ``now``, and the next one.

    Rules (each re-derived from the records, so a crash anywhere resumes):

    * ACTIVE key A (activated at a): the next key is generated at
      a + P - lead; it is activated at max(a + P, its creation + lead), so
      even a successor generated late (after a crash, or a paused scheduler)
      is published one full lead before it signs.
    * No ACTIVE key but a PENDING one (a crash between generation and
      activation of a tenant's first or replacement key): nothing signs, so
      the oldest pending key is activated at once.
    * No ACTIVE and no PENDING key: nothing (the operator has not started
      this tenant's keys, or withdrew them; ``keys generate --activate``).
    * A key that can never sign again (RETIRING, RETIRED, COMPROMISED) whose
      private half is not known destroyed: DESTROY_PRIVATE (a RETIRING key
      DESTROY_SETTLE seconds after it stopped signing, others now; a crash
      between the HSM destroy and its record repeats the idempotent destroy).
    * RETIRING key R: UNPUBLISH at R's retiring time + grace.
    * Extra PENDING keys (generated by hand): left alone, noted.
    """
    records = list(keys)
    by_state: dict[KeyState, list[KeyRecord]] = {st: [] for st in KeyState}
    for k in records:
        by_state[k.state].append(k)
    steps: list[Step] = []
    notes: list[str] = []

    active = max(by_state[KeyState.ACTIVE], key=lambda k: (k.activated_at, k.kid),
                 default=None)
    if len(by_state[KeyState.ACTIVE]) > 1:
        notes.append("more than one ACTIVE key: the store's one-active rule was bypassed")
    pending = _oldest(by_state[KeyState.PENDING])
    for extra in sorted(by_state[KeyState.PENDING], key=lambda k: (k.created_at, k.kid))[1:]:
        notes.append(f"extra PENDING key {extra.kid} left alone (generated by hand?)")

    if active is not None:
        rotate_at = active.activated_at + s.period
        if pending is None:
            steps.append(Step(StepKind.GENERATE, rotate_at - s.prepublish,
                              previous=active.kid, expects={active.kid: KeyState.ACTIVE}))
        else:
            at = max(rotate_at, pending.created_at + s.prepublish)
            steps.append(Step(StepKind.ACTIVATE, at, kid=pending.kid, previous=active.kid,
                              expects={pending.kid: KeyState.PENDING,
                                       active.kid: KeyState.ACTIVE}))
    elif pending is not None:
        notes.append(f"PENDING key {pending.kid} and no ACTIVE key: activating it at once "
                     "(a rotation interrupted between generation and activation)")
        steps.append(Step(StepKind.ACTIVATE, now, kid=pending.kid,
                          expects={pending.kid: KeyState.PENDING}))

    for k in records:
        if k.state in (KeyState.RETIRING, KeyState.RETIRED, KeyState.COMPROMISED) \
                and not k.private_destroyed_at:
            at = k.retiring_at + DESTROY_SETTLE \
                if k.state is KeyState.RETIRING and k.retiring_at else now
            steps.append(Step(StepKind.DESTROY_PRIVATE, at, kid=k.kid,
                              expects={k.kid: k.state}))
            if k.state is KeyState.RETIRED:
                notes.append(f"RETIRED key {k.kid} still has its private half: destroying it")
        if k.state is KeyState.RETIRING:
            steps.append(Step(StepKind.UNPUBLISH, s.unpublish_at(k.retiring_at), kid=k.kid,
                              expects={k.kid: KeyState.RETIRING}))

    order = list(StepKind)
    steps.sort(key=lambda st: (st.at, order.index(st.kind), st.kid))
    due = tuple(st for st in steps if st.at <= now)
    upcoming = next((st for st in steps if st.at > now), None)
    return Plan(due=due, upcoming=upcoming, notes=tuple(notes))


@dataclass(frozen=True, slots=True)
class Timings:
    """The settings every tenant's schedule is derived with: the configured
    JWKS max-age (an upper bound), the leeway and the shortest period allowed
    (``min_rotation_period_seconds``)."""

    configured_max_age: int = 300
    leeway: int = 30
    min_period: int = DEFAULT_MIN_ROTATION_PERIOD

    def of(self, period: int, max_token_lifetime: int) -> Schedule:
        return schedule(period, max_token_lifetime, configured_max_age=self.configured_max_age,
                        leeway=self.leeway)

    def for_policy(self, policy: TenantPolicy) -> Schedule:
        """A tenant's schedule, including what an earlier lowering of its token
        lifetime still requires."""
        return dataclasses.replace(
            self.of(policy.rotation_period_seconds, policy.max_token_lifetime_seconds),
            earlier_tokens_expire_by=policy.earlier_tokens_expire_by)

    def check(self, period: int, max_token_lifetime: int) -> Schedule:
        """The schedule, or PolicyViolation when it is not safe."""
        s = self.of(period, max_token_lifetime)
        check_policy(s, min_period=self.min_period)
        return s
