"""Scheduled rotation over real components: Postgres (leader lock, fenced
steps), SoftHSM (generation, destruction of private halves) and two
replicas.

* The leader lock: terminating its connection ends the leadership before
  the next action; another replica takes over; the first re-acquires later.
* Two schedulers on one database with a settable clock (no waiting for
  periods): the leader dies after generating and recording the next key,
  before activating it; the other finishes the rotation: one ACTIVE key, no
  orphan HSM object, the retired key's private object gone from the token
  while its public key stays published until the grace ends.
* Two real app replicas (ServerThread) with seconds-scale settings: the
  scheduled rotations happen once per period, never twice.

Timing is polled with bounds; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from fedtoken.audit import AuditWriter
from fedtoken.core.model import KeyRecord, KeyState, Tenant, TenantPolicy
from fedtoken.core.ports import utc
from fedtoken.core.rotation import DESTROY_SETTLE, Step, StepKind, Timings
from fedtoken.hsm import LABEL_PREFIX, HsmConfig, Pkcs11Hsm
from fedtoken.service.catalog import Catalog
from fedtoken.service.rotation import ROTATION_LEADER_LOCK, Fenced, Rotation
from fedtoken.store import PgStore, apply_migrations, create_pool
from fedtoken.store.leader import PgLeaderLock
from fedtoken.verifier import LocalKeyResolver
from fedtoken_client._pb.fedtoken.v1 import common_pb2
from tests._pg_fixture import create_database, drop_database
from tests.support import ServerThread, make_settings

pytestmark = pytest.mark.integration

DEADLINE = 30.0
P, T = 16, 60  # the shortest period that covers the 60 s minimum token lifetime
TIMINGS = Timings(configured_max_age=3, leeway=1, min_period=1)


class StepClock:
    """A wall clock the test moves by hand (the scheduler's only time source)."""

    def __init__(self) -> None:
        self.t = float(int(time.time()))

    def now(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def db(pg_dsn: str) -> Iterator[str]:
    name = f"rotation_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_dsn, name)
    drop_database(pg_dsn, name)


@pytest_asyncio.fixture(loop_scope="session")
async def pool(db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(db, min_size=1, max_size=10)
    await apply_migrations(pool)
    yield pool
    await pool.close()


@pytest_asyncio.fixture(loop_scope="session")
async def hsm(hsm_config: HsmConfig) -> AsyncIterator[Pkcs11Hsm]:
    instance = Pkcs11Hsm(hsm_config)
    await asyncio.to_thread(instance.open)
    yield instance
    await instance.aclose()


@dataclass
class Replica:
    rotation: Rotation
    lock: PgLeaderLock
    catalog: Catalog
    audit: AuditWriter


async def _terminate(dsn: str, pid: int | None) -> None:
    assert pid is not None
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


async def _until(check: Any, what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not await check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        await asyncio.sleep(0.05)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_lost_lock_connection_is_lost_leadership(db: str) -> None:
    a = PgLeaderLock(db, 0x7465_7374_0001, name="a")
    b = PgLeaderLock(db, 0x7465_7374_0001, name="b")
    try:
        assert await a.try_acquire() and a.held
        assert not await b.try_acquire()
        await _terminate(db, a.backend_pid)

        async def lost() -> bool:
            return not a.held
        await _until(lost, "a notices its lock connection is gone")
        assert await b.try_acquire() and b.held
        assert not await a.try_acquire()
        await b.release()
        assert await a.try_acquire()  # re-acquired later
    finally:
        await a.release()
        await b.release()


async def _replica(pool: asyncpg.Pool, db: str, hsm: Pkcs11Hsm, clock: StepClock,
                   spill: Path, name: str, hook: Any = None) -> Replica:
    store = PgStore(pool)
    audit = AuditWriter(store, spill / name)
    await audit.start()
    catalog = Catalog(store, LocalKeyResolver(), default_tenant="", jwks_max_age=3,
                      timings=TIMINGS)
    lock = PgLeaderLock(db, ROTATION_LEADER_LOCK, name=f"rotation-{name}")
    rotation = Rotation(store=store, marks=store.keys, signer=hsm, audit=audit,
                        catalog=catalog, clock=clock, lock=lock, timings=TIMINGS, hook=hook)
    return Replica(rotation, lock, catalog, audit)


async def _tenant_labels(hsm: Pkcs11Hsm, tenant: str) -> set[str]:
    return {label for label in await hsm.key_labels()
            if label.startswith(f"{LABEL_PREFIX}{tenant}/")}


@pytest.mark.asyncio(loop_scope="session")
async def test_the_leader_killed_mid_rotation_the_other_finishes_it(
        pool: asyncpg.Pool, db: str, hsm: Pkcs11Hsm) -> None:
    clock = StepClock()
    store = PgStore(pool)
    tid = f"rot-{uuid.uuid4().hex[:8]}"
    await store.tenants.create(
        Tenant(id=tid, issuer=f"https://{tid}.example",
               policy=TenantPolicy(max_token_lifetime_seconds=T, default_token_lifetime_seconds=T,
                                   rotation_period_seconds=P)),
        now=utc(clock.now()))
    first = await hsm.generate(tid, 2048)
    await store.keys.insert(KeyRecord(
        kid=first.kid, tenant=tid, alg="RS256", key_size=2048, state=KeyState.PENDING,
        public_jwk=first.public_jwk, hsm_label=first.hsm_label, created_at=int(clock.now())))
    await store.keys.activate(tid, first.kid, now=utc(clock.now()))
    sched = TIMINGS.of(P, T)

    killed = asyncio.Event()
    replicas: list[Replica] = []

    async def die_after_recording(point: str, step: Step) -> None:
        if point == "recorded" and not killed.is_set():
            killed.set()
            # The leader dies: its session (and lock) goes, and it never
            # takes another step.
            await _terminate(db, replicas[0].lock.backend_pid)
            raise asyncio.CancelledError

    with tempfile.TemporaryDirectory() as spill:
        a = await _replica(pool, db, hsm, clock, Path(spill), "a", die_after_recording)
        b = await _replica(pool, db, hsm, clock, Path(spill), "b")
        replicas += [a, b]
        try:
            assert await a.rotation.round() == 0  # leads; nothing due yet
            assert not await b.rotation.round()  # not the leader
            clock.t += P - sched.prepublish
            with pytest.raises(asyncio.CancelledError):
                await a.rotation.round()
            assert killed.is_set()

            async def a_lost() -> bool:
                return not a.lock.held
            await _until(a_lost, "the dead leader's lock is gone")
            keys = await store.keys.list(tid)
            pending = [k for k in keys if k.state is KeyState.PENDING]
            assert len(pending) == 1  # generated and recorded, not active

            # b takes over; a full lead after publication it activates.
            clock.t += sched.prepublish
            assert await b.rotation.round() >= 1
            clock.t += DESTROY_SETTLE
            assert await b.rotation.round() >= 1
            keys = await store.keys.list(tid)
            states = sorted(k.state.value for k in keys)
            assert states == ["ACTIVE", "RETIRING"]
            assert next(k for k in keys if k.state is KeyState.ACTIVE).kid == pending[0].kid
            retiring = next(k for k in keys if k.state is KeyState.RETIRING)
            assert retiring.private_destroyed_at
            assert (await hsm.key_attributes(retiring.hsm_label)).present is False
            # No orphan: every tenant object in the HSM is a recorded key.
            assert await _tenant_labels(hsm, tid) <= {k.hsm_label for k in keys}
            # The retiring key's public half is still published.
            await b.catalog.reload()
            published = {k.kid for k in (await b.catalog.key_set(tid)).keys}
            assert {retiring.kid, pending[0].kid} <= published
            # A stale step (a's plan from before) is fenced off.
            stale = Step(kind=StepKind.ACTIVATE, at=0, kid=pending[0].kid,
                         previous=first.kid,
                         expects={pending[0].kid: KeyState.PENDING,
                                  first.kid: KeyState.ACTIVE})
            tenant = await store.tenants.get(tid)
            assert tenant is not None
            with pytest.raises(Fenced):
                await a.rotation.apply(tenant, stale)
            # After the grace: unpublished.
            clock.t += sched.grace
            assert await b.rotation.round() >= 1
            await b.catalog.reload()
            assert retiring.kid not in {k.kid for k in (await b.catalog.key_set(tid)).keys}
            assert (await store.keys.get(retiring.kid)).state is KeyState.RETIRED  # type: ignore[union-attr]
            events = await store.audit.list(tenant=tid, event_type="key.activated")
            assert [e.event.kid for e in events] == [pending[0].kid]
            assert all(e.event.details.get("scheduled") for e in events)
        finally:
            for r in replicas:
                await r.lock.release()
                await r.catalog.close()
                await r.audit.stop()


# --- two real app replicas ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_apps(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str,
             hsm_config: HsmConfig) -> Iterator[tuple[ServerThread, ServerThread]]:
    name = f"rotapps_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_dsn, name)
    fast: dict[str, Any] = {"min_rotation_period_seconds": 1, "rotation_check_seconds": 0.5,
                            "leeway_seconds": 1, "jwks_max_age_seconds": 3}
    a = ServerThread(make_settings(tmp_path_factory.mktemp("ra"), **fast), dsn, hsm_config)
    b = ServerThread(make_settings(tmp_path_factory.mktemp("rb"), **fast), dsn, hsm_config)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()
        drop_database(pg_dsn, name)


def test_two_replicas_rotate_once_per_period(two_apps: tuple[ServerThread, ServerThread],
                                             hsm_config: HsmConfig) -> None:
    a, b = two_apps
    tid = f"two-{uuid.uuid4().hex[:8]}"
    with a.client() as ca, b.client() as cb:
        created = ca.create_tenant(tid, rotation_period_seconds=P, max_token_lifetime_seconds=T)
        assert created.rotation_period_seconds == P and created.jwks_max_age_seconds >= 1
        assert created.next_rotation_step == "GENERATE"
        sched = TIMINGS.of(P, T)

        def activations() -> list[Any]:
            page = ca.list_audit(tenant=tid, event_type="key.activated", page_size=100)
            return [e for e in page.events if json.loads(e.details_json).get("scheduled")]

        end = time.monotonic() + 2 * P + 30
        while len(activations()) < 2:
            assert time.monotonic() < end, "two scheduled rotations did not happen"
            assert _one_active(cb.list_keys(tid))
            time.sleep(0.25)
        events = activations()
        kids = [e.kid for e in events]
        assert len(kids) == len(set(kids))  # no key activated twice
        keys = {k.kid: k for k in ca.list_keys(tid)}
        times = sorted(keys[kid].activated_at for kid in kids)
        first_active = min(k.activated_at for k in keys.values() if k.activated_at)
        # Once per period: never two activations within one period.
        starts = [first_active, *times]
        assert all(later - earlier >= P - 1 for earlier, later in itertools.pairwise(starts))
        # Retired keys' private halves are gone; their public keys still published.
        jwks = {k.kid for k in ca.get_keys(tid).keys}
        assert a.app is not None
        for key in keys.values():
            if key.retiring_at:
                attrs = a.run(a.app.signer.key_attributes(key.hsm_label))
                end = time.monotonic() + DEADLINE
                while attrs.present:  # destroyed DESTROY_SETTLE s after it stopped signing
                    assert time.monotonic() < end, key.kid
                    time.sleep(0.2)
                    attrs = a.run(a.app.signer.key_attributes(key.hsm_label))
                if time.time() < key.retiring_at + sched.grace:
                    assert key.kid in jwks
        # No orphan HSM object of this tenant.
        labels = {lab for lab in a.run(a.app.signer.key_labels())
                  if lab.startswith(f"{LABEL_PREFIX}{tid}/")}
        assert labels <= {k.hsm_label for k in ca.list_keys(tid)}
        ca.update_tenant(tid, rotation_period_seconds=30 * 86400)  # stop rotating


def _one_active(keys: Any) -> bool:
    return sum(k.state == common_pb2.KeyState.Value("ACTIVE") for k in keys) <= 1

