"""Scheduled rotation with an injected clock: the pure schedule and step
machine (core.rotation) and the scheduler over fakes (service.rotation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from fedtoken.core.errors import PolicyViolation
from fedtoken.core.model import KeyRecord, KeyState, Tenant, TenantPolicy
from fedtoken.core.ports import CallContext
from fedtoken.core.rotation import (
    DESTROY_SETTLE,
    Step,
    StepKind,
    Timings,
    check_policy,
    plan,
    schedule,
)
from fedtoken.service.rotation import Fenced, Rotation
from fedtoken.service.types import NewTenant, TenantUpdate
from tests.unit.fakes import MemoryLeaderLock, Services, build_services

# --- the schedule ----------------------------------------------------------------------


def test_defaults_for_thirty_days() -> None:
    s = Timings().of(30 * 86_400, 3600)
    assert s.jwks_max_age == 300  # the configured bound, far below P/6
    assert s.prepublish == 30 * 86_400 // 4  # a week ahead: far more than max-age + leeway
    assert s.grace == 3600 + 300 + 30
    check_policy(s, min_period=3600)


def test_max_age_never_lets_a_cache_miss_the_next_key() -> None:
    for period in (20, 60, 3600, 86_400, 30 * 86_400):
        for configured in (1, 3, 300, 86_400):
            s = schedule(period, 1, configured_max_age=configured, leeway=1)
            assert 1 <= s.jwks_max_age <= configured
            assert s.prepublish >= s.jwks_max_age + s.leeway


def test_a_token_lifetime_the_grace_does_not_cover_is_refused() -> None:
    t = Timings(configured_max_age=3, leeway=1, min_period=10)
    t.check(20, 76)  # 76 + 3 + 1 = 80 = 4 periods: just fits
    with pytest.raises(PolicyViolation) as info:
        t.check(20, 77)
    assert info.value.field == "max_token_lifetime"
    assert "81" in info.value.message and "76" in info.value.message  # names the numbers


def test_short_periods_need_the_setting() -> None:
    with pytest.raises(PolicyViolation) as info:
        Timings().check(1800, 60)
    assert info.value.field == "rotation_period"
    Timings(min_period=60).check(1800, 60)
    with pytest.raises(PolicyViolation):  # the lead would not fit in half the period
        Timings(configured_max_age=300, leeway=30, min_period=1).check(40, 1)


# --- the step machine under a simulated clock --------------------------------------------

P, T, MAX_AGE, LEEWAY = 60, 60, 30, 2
SCHED = schedule(P, T, configured_max_age=MAX_AGE, leeway=LEEWAY)


class World:
    """Keys and a fake HSM driven only by ``plan``'s steps (the scheduler's
    logic, without I/O), one check per simulated second."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}
        self.private: set[str] = set()
        self.n = 0
        self.k0 = self.generate(0)
        self.keys[self.k0] = dataclasses.replace(self.keys[self.k0], state=KeyState.ACTIVE,
                                                 activated_at=0)

    def generate(self, now: int) -> str:
        kid = f"k{self.n}"
        self.n += 1
        self.keys[kid] = KeyRecord(kid=kid, tenant="t", alg="RS256", key_size=2048,
                                   state=KeyState.PENDING, public_jwk={}, hsm_label=kid,
                                   created_at=now)
        self.private.add(kid)
        return kid

    def apply(self, step: Step, now: int) -> None:
        for kid, state in step.expects.items():
            assert self.keys[kid].state is state
        k = self.keys.get(step.kid)
        if step.kind is StepKind.GENERATE:
            self.generate(now)
        elif step.kind is StepKind.ACTIVATE:
            assert k is not None
            if step.previous:
                self.keys[step.previous] = dataclasses.replace(
                    self.keys[step.previous], state=KeyState.RETIRING, retiring_at=now)
            self.keys[k.kid] = dataclasses.replace(k, state=KeyState.ACTIVE, activated_at=now)
        elif step.kind is StepKind.DESTROY_PRIVATE:
            assert k is not None and k.state is not KeyState.ACTIVE
            self.private.discard(k.kid)
            self.keys[k.kid] = dataclasses.replace(k, private_destroyed_at=now)
        else:
            assert k is not None
            self.keys[k.kid] = dataclasses.replace(k, state=KeyState.RETIRED, retired_at=now)

    def tick(self, now: int) -> list[Step]:
        done = []
        for _ in range(10):
            p = plan(SCHED, self.keys.values(), now)
            if not p.due:
                return done
            self.apply(p.due[0], now)
            done.append(p.due[0])
        raise AssertionError("the plan does not converge")

    def published(self) -> set[str]:
        return {k.kid for k in self.keys.values() if k.state.published}

    def active(self) -> list[str]:
        return [k.kid for k in self.keys.values() if k.state is KeyState.ACTIVE]


class CachingVerifier:
    """Fetches the JWKS and keeps it for exactly the advertised max-age,
    never refetching on an unknown kid (the strictest honest cache)."""

    def __init__(self, phase: int) -> None:
        self.phase = phase
        self.fetched_at: int | None = None
        self.kids: set[str] = set()

    def view(self, now: int, published: set[str], max_age: int) -> set[str]:
        if now < self.phase:
            return self.kids
        if self.fetched_at is None or now - self.fetched_at >= max_age:
            self.fetched_at, self.kids = now, set(published)
        return self.kids


def test_three_rotations_every_instant_every_cache_holds_every_key_it_needs() -> None:
    world = World()
    verifiers = [CachingVerifier(phase) for phase in range(SCHED.jwks_max_age)]
    tokens: list[tuple[str, int]] = []  # (kid, exp)
    activations = 0
    # Three rotations, and the first two retired keys unpublished, before the
    # fourth generation.
    end = 4 * P - SCHED.prepublish
    assert end > 2 * P + SCHED.grace
    for now in range(end):
        for step in world.tick(now):
            activations += step.kind is StepKind.ACTIVATE
        published = world.published()
        active = world.active()
        assert len(active) == 1, (now, active)
        signer = active[0]
        assert signer in published, now
        assert signer in world.private  # the signing key can sign
        tokens.append((signer, now + T))
        live = [(kid, exp) for kid, exp in tokens if exp > now]
        for kid, _ in live:
            assert kid in published, (now, kid)
        for v in verifiers:
            view = v.view(now, published, SCHED.jwks_max_age)
            if now >= v.phase:
                for kid, _ in live:
                    assert kid in view, (now, v.phase, kid)
        for k in world.keys.values():
            if k.state in (KeyState.RETIRING, KeyState.RETIRED) and \
                    now >= k.retiring_at + DESTROY_SETTLE:
                assert k.kid not in world.private, (now, k.kid)
    assert activations == 3
    assert sorted(k.state.value for k in world.keys.values()) == [
        "ACTIVE", "RETIRED", "RETIRED", "RETIRING"]
    # Idempotent: replanning at the same instant finds nothing more to do.
    assert plan(SCHED, world.keys.values(), end - 1).due == ()


def _key(kid: str, state: KeyState, **times: int) -> KeyRecord:
    return KeyRecord(kid=kid, tenant="t", alg="RS256", key_size=2048, state=state,
                     public_jwk={}, hsm_label=kid, **times)


def test_plan_resumes_from_every_intermediate_state() -> None:
    a = _key("a", KeyState.ACTIVE, created_at=0, activated_at=0)
    # Nothing due before the generation time; upcoming names it.
    p = plan(SCHED, [a], 10)
    assert p.due == () and p.upcoming is not None
    assert (p.upcoming.kind, p.upcoming.at) == (StepKind.GENERATE, P - SCHED.prepublish)
    # Generated late (a crash or a pause): still a full lead before it signs.
    b = _key("b", KeyState.PENDING, created_at=P + 5)
    p = plan(SCHED, [a, b], P + 6)
    assert p.due == () and p.upcoming is not None
    assert (p.upcoming.kind, p.upcoming.at) == (StepKind.ACTIVATE, P + 5 + SCHED.prepublish)
    # A pending key and no active one (crash between generate and activate).
    p = plan(SCHED, [b], 100)
    assert [s.kind for s in p.due] == [StepKind.ACTIVATE] and p.notes
    # A retiring key whose private half still exists, past the settle time.
    r = _key("r", KeyState.RETIRING, retiring_at=100)
    a2 = _key("a2", KeyState.ACTIVE, activated_at=100)
    p = plan(SCHED, [r, a2], 100 + DESTROY_SETTLE)
    assert [(s.kind, s.kid) for s in p.due] == [(StepKind.DESTROY_PRIVATE, "r")]
    # ... destroyed: only the unpublication remains, after the grace.
    r = dataclasses.replace(r, private_destroyed_at=101)
    p = plan(SCHED, [r, a2], 100 + SCHED.grace - 1)
    assert StepKind.UNPUBLISH not in {s.kind for s in p.due}
    p = plan(SCHED, [r, a2], 100 + SCHED.grace)
    assert (StepKind.UNPUBLISH, "r") in [(s.kind, s.kid) for s in p.due]
    # A RETIRED key from before this feature still holding its private half.
    old = _key("old", KeyState.RETIRED, retiring_at=1, retired_at=2)
    assert StepKind.DESTROY_PRIVATE in [s.kind for s in plan(SCHED, [old, a2], 200).due]
    # No key at all: nothing (the operator starts a tenant's keys).
    assert plan(SCHED, [], 0) == plan(SCHED, [], 0) and plan(SCHED, [], 0).due == ()


CTX = CallContext()

# --- the scheduler over fakes ----------------------------------------------------------


@pytest.fixture
def svc() -> Iterator[Services]:
    s = build_services(leeway=LEEWAY, jwks_max_age=MAX_AGE, min_rotation_period=10)
    yield s


async def _tenant(svc: Services) -> Tenant:
    return await svc.keys.create_tenant(
        NewTenant(id="rot", rotation_period_seconds=P, max_token_lifetime_seconds=T,
                  default_token_lifetime_seconds=T, generate_key=True), CTX)


def _rotation(svc: Services, lock: MemoryLeaderLock, **kw: object) -> Rotation:
    return Rotation(store=svc.store, marks=svc.store.keys, signer=svc.signer, audit=svc.audit,
                    catalog=svc.catalog, clock=svc.clock, lock=lock,
                    timings=Timings(configured_max_age=MAX_AGE, leeway=LEEWAY, min_period=10),
                    **kw)  # type: ignore[arg-type]


def _states(svc: Services) -> dict[KeyState, int]:
    out: dict[KeyState, int] = {}
    for st in svc.store.key_states("rot").values():
        out[st] = out.get(st, 0) + 1
    return out


async def _orphans(svc: Services) -> set[str]:
    labels = {k.hsm_label for k in svc.store.data.keys.values()}
    return {label for label in await svc.signer.key_labels() if label not in labels}


async def test_scheduler_rotates_destroys_and_unpublishes(svc: Services) -> None:
    await _tenant(svc)
    start = svc.clock.now()
    rot = _rotation(svc, MemoryLeaderLock({}))
    for _ in range(4 * P - SCHED.prepublish - 1):  # three rotations, two unpublications
        svc.clock.advance(1)
        await rot.round()
        states = _states(svc)
        assert states.get(KeyState.ACTIVE) == 1
        ks = await svc.catalog.key_set("rot")
        active = svc.catalog.active_key(await svc.catalog.tenant("rot"))
        assert active.kid in {r.kid for r in ks.keys}
        assert ks.max_age == SCHED.jwks_max_age
    scheduled = [e for e in svc.store.events("key.activated") if e.details.get("scheduled")]
    assert len(scheduled) == 3
    for k in svc.store.data.keys.values():
        if k.state in (KeyState.RETIRING, KeyState.RETIRED):
            assert k.private_destroyed_at
            assert (await svc.signer.key_attributes(k.hsm_label)).present is False
    assert await _orphans(svc) == set()
    for event in ("key.generated", "key.retiring", "key.private_destroyed", "key.retired"):
        assert any(e.details.get("scheduled") for e in svc.store.events(event)), event
    assert svc.clock.now() > start


@pytest.mark.parametrize("point", ["generated", "recorded", "activated", "destroyed"])
async def test_a_crash_at_any_point_is_finished_by_the_other_replica(
        svc: Services, point: str) -> None:
    await _tenant(svc)
    registry: dict[str, object] = {}
    lock_a = MemoryLeaderLock(registry)

    async def crash(name: str, step: Step) -> None:
        if name == point:
            lock_a.lose()  # the leader dies: its lock goes with it
            raise RuntimeError(f"killed at {name}")

    a = _rotation(svc, lock_a, hook=crash)
    b = _rotation(svc, MemoryLeaderLock(registry))
    crashed = False
    for _ in range(int(2 * P + SCHED.grace + 5)):
        svc.clock.advance(1)
        if not crashed:
            try:
                await a.round()
            except RuntimeError:
                crashed = True
            continue
        await b.round()
        assert _states(svc).get(KeyState.ACTIVE) == 1
    assert crashed
    assert await _orphans(svc) == set()
    for k in svc.store.data.keys.values():
        if k.state in (KeyState.RETIRING, KeyState.RETIRED):
            assert (await svc.signer.key_attributes(k.hsm_label)).present is False
    activated = [e for e in svc.store.events("key.activated") if e.details.get("scheduled")]
    assert len(activated) == len({e.kid for e in activated}) >= 1  # no key activated twice


async def test_a_stale_leader_does_nothing(svc: Services) -> None:
    await _tenant(svc)
    registry: dict[str, object] = {}
    lock_a, lock_b = MemoryLeaderLock(registry), MemoryLeaderLock(registry)
    a, b = _rotation(svc, lock_a), _rotation(svc, lock_b)
    svc.clock.advance(P - SCHED.prepublish + 1)
    tenant = await svc.catalog.tenant("rot")
    keys = list(svc.store.data.keys.values())
    step = a.plan_for(tenant, keys).due[0]
    assert step.kind is StepKind.GENERATE
    # A lost its lock silently; B leads and generates.
    assert await lock_a.try_acquire()
    lock_a.lose()
    assert await b.round() == 1
    # A, acting on its stale plan: its round does nothing without the lock...
    registry["leader"] = lock_b
    assert await a.round() == 0
    # ... and the step itself is fenced off by the store (state changed).
    before = dict(svc.store.key_states("rot"))
    with pytest.raises(Fenced):
        await a.apply(tenant, step)
    assert svc.store.key_states("rot") == before
    assert await _orphans(svc) == set()  # the fenced generation was destroyed again
    # The same for a stale activation.
    svc.clock.advance(SCHED.prepublish + 1)
    keys = list(svc.store.data.keys.values())
    act = a.plan_for(tenant, keys).due[0]
    assert act.kind is StepKind.ACTIVATE
    assert await b.round() >= 1
    with pytest.raises(Fenced):
        await a.apply(tenant, act)
    assert _states(svc).get(KeyState.ACTIVE) == 1


async def test_update_tenant_validates_and_emergency_rotation_is_audited(
        svc: Services) -> None:
    await _tenant(svc)
    with pytest.raises(PolicyViolation):
        await svc.keys.update_tenant(
            TenantUpdate(id="rot", max_token_lifetime_seconds=4 * P), CTX)
    with pytest.raises(PolicyViolation):
        await svc.keys.update_tenant(TenantUpdate(id="rot", rotation_period_seconds=5), CTX)
    updated = await svc.keys.update_tenant(
        TenantUpdate(id="rot", rotation_period_seconds=2 * P), CTX)
    assert updated.policy.rotation_period_seconds == 2 * P
    assert svc.store.events("tenant.updated")
    timing = svc.keys.timing(updated)
    assert timing.next_step == "GENERATE" and timing.schedule.period == 2 * P
    old = svc.catalog.active_key(updated)
    new = await svc.keys.rotate_now("rot", "suspected leak", CTX)
    assert new.state is KeyState.ACTIVE and new.kid != old.kid
    assert svc.store.data.keys[old.kid].state is KeyState.RETIRING
    assert (await svc.signer.key_attributes(old.hsm_label)).present is False
    for event in ("key.activated", "key.retiring", "key.private_destroyed"):
        assert any(e.details.get("emergency") for e in svc.store.events(event)), event


def test_create_tenant_refuses_an_uncovered_lifetime() -> None:
    svc = build_services(leeway=LEEWAY, jwks_max_age=MAX_AGE, min_rotation_period=10)
    tenant = svc.keys.tenant_from_request(
        NewTenant(id="x", rotation_period_seconds=P, max_token_lifetime_seconds=4 * P))
    with pytest.raises(PolicyViolation):
        svc.keys.check_schedule(tenant.policy)
    assert TenantPolicy().rotation_period_seconds == 30 * 86_400


async def test_lowering_the_token_lifetime_keeps_keys_published_for_earlier_tokens(
        svc: Services) -> None:
    """A token issued just before the lifetime is lowered lives out its old
    lifetime: the key that signed it stays published until then (plus one
    max-age and the leeway), although the new grace alone would be shorter."""
    from fedtoken.core.errors import FailedPrecondition

    long_t = 2 * T
    await svc.keys.create_tenant(
        NewTenant(id="low", rotation_period_seconds=P, max_token_lifetime_seconds=long_t,
                  default_token_lifetime_seconds=T, generate_key=True), CTX)
    lowered_at = int(svc.clock.now())
    updated = await svc.keys.update_tenant(
        TenantUpdate(id="low", max_token_lifetime_seconds=T), CTX)
    assert updated.policy.earlier_tokens_expire_by == lowered_at + long_t + LEEWAY
    old = svc.catalog.active_key(updated)
    await svc.keys.rotate_now("low", "rotate after the change", CTX)
    retiring = svc.store.data.keys[old.kid]
    sched = Timings(configured_max_age=MAX_AGE, leeway=LEEWAY).for_policy(updated.policy)
    unpublish = sched.unpublish_at(retiring.retiring_at)
    assert unpublish >= lowered_at + long_t + sched.jwks_max_age + LEEWAY  # old tokens' exp
    assert unpublish > retiring.retiring_at + sched.grace  # more than the new grace alone
    # RetireKey honours the same bound (without emergency).
    svc.clock.t = retiring.retiring_at + sched.grace + 1
    with pytest.raises(FailedPrecondition):
        await svc.keys.retire_key("low", old.kid, CTX)
    # Raising it again keeps the floor (the earlier tokens still live).
    raised = await svc.keys.update_tenant(
        TenantUpdate(id="low", max_token_lifetime_seconds=long_t), CTX)
    assert raised.policy.earlier_tokens_expire_by == lowered_at + long_t + LEEWAY
