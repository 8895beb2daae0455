"""The rotation scheduler: keeps every tenant's keys on its schedule
(``fedtoken.core.rotation``).

Every replica runs it (worker 0 of each ``fedtoken serve``); only the holder
of the leader lock (``core.ports.LeaderLock``) acts, and it re-checks the lock
before every step. Leadership alone is not trusted: a leader may have lost
its lock without knowing yet, so every step is fenced. It runs under the
rotation step lock (one step at a time across replicas) in one transaction
that re-reads the key states the step was planned on, and changes nothing
when they differ. A stale leader therefore cannot rotate twice.

Order of a rotation, so that a crash anywhere leaves a state the plan
resumes from (``core.rotation.plan``):

1. GENERATE: the key pair is made in the HSM first, then recorded PENDING
   (published). A crash between the two leaves an HSM object no record
   names: an orphan that ``fedtoken keys reconcile`` finds and destroys.
2. ACTIVATE (a full lead later): in one transaction the pending key becomes
   ACTIVE and the previous one RETIRING; exactly one key signs at any time.
3. DESTROY_PRIVATE: the previous key's private half is destroyed in the HSM
   (C_DestroyObject), then the destruction is recorded. The public key stays
   in Postgres and in the JWKS. A crash between the two repeats the
   idempotent destroy.
4. UNPUBLISH: after the grace, RETIRING -> RETIRED.

Every step is an audit event with ``"scheduled": true``; an emergency
rotation (``KeyAdmin.rotate_now``) is audited with ``"emergency": true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from fedtoken.core.audit import AuditEvent
from fedtoken.core.errors import FedtokenError, InvalidKeyTransition, KeyNotFound
from fedtoken.core.model import KeyRecord, KeyState, Tenant
from fedtoken.core.ports import (
    AuditSink,
    CallContext,
    Clock,
    LeaderLock,
    Principal,
    Signer,
    Store,
    utc,
)
from fedtoken.core.rotation import Plan, Step, StepKind, Timings, plan
from fedtoken.service.catalog import Catalog

log = logging.getLogger(__name__)

ROTATION_LEADER_LOCK = 0x6665_6474_726F  # "fedtro": the scheduler's leader lock
ROTATION_STEP_LOCK = 0x6665_6474_7273  # "fedtrs": one rotation step at a time
SCHEDULER = CallContext(Principal(identity="fedtoken:rotation"))
# Steps applied per tenant per round at most: a round catches up a tenant
# left far behind (GENERATE, then later rounds ACTIVATE...), never spins.
MAX_STEPS_PER_ROUND = 8

Hook = Callable[[str, Step], Awaitable[None]]


class PrivateMarks(Protocol):
    """Where the destruction of a private half is recorded (the keys table;
    ``store.keys.mark_private_destroyed``). Refuses a key that may sign."""

    async def mark_private_destroyed(self, kid: str, *, now: datetime) -> KeyRecord: ...


class Fenced(Exception):
    """The state a step was planned on changed underneath: nothing done."""


class Rotation:
    """The scheduler of one replica."""

    def __init__(self, *, store: Store, marks: PrivateMarks, signer: Signer, audit: AuditSink,
                 catalog: Catalog, clock: Clock, lock: LeaderLock, timings: Timings,
                 hook: Hook | None = None) -> None:
        self._store = store
        self._marks = marks
        self._signer = signer
        self._audit = audit
        self._catalog = catalog
        self._clock = clock
        self._lock = lock
        self._timings = timings
        # Tests inject crashes here: called with "generated" (in the HSM, not
        # recorded), "recorded" (PENDING), "activated" and "destroyed" (in
        # the HSM, not recorded).
        self._hook = hook
        self.applied = 0  # steps applied by this replica (observability, tests)
        self.fenced = 0  # steps refused by the fencing check

    @property
    def lock(self) -> LeaderLock:
        return self._lock

    def plan_for(self, tenant: Tenant, keys: list[KeyRecord]) -> Plan:
        p = tenant.policy
        return plan(self._timings.for_policy(p), keys, int(self._clock.now()))

    async def run(self, every: float) -> None:
        """Check every ``every`` seconds, forever; a failed round is logged
        and tried again. Gives the lock up when cancelled."""
        try:
            while True:
                try:
                    await self.round()
                except FedtokenError as exc:
                    log.warning("rotation round failed (%s): %s", exc.reason.value, exc.message)
                except Exception:  # a bug must not end the scheduler
                    log.exception("rotation round failed; trying again in %.1f s", every)
                await asyncio.sleep(every)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._lock.release())

    async def round(self) -> int:
        """One check of every tenant, if we lead; the number of steps applied."""
        if not await self._lock.try_acquire():
            return 0
        applied = 0
        for tenant in await self._store.tenants.list():
            if not self._lock.held:
                break
            applied += await self.tenant_round(tenant)
        return applied

    async def tenant_round(self, tenant: Tenant) -> int:
        applied = 0
        for _ in range(MAX_STEPS_PER_ROUND):
            keys = await self._store.keys.list(tenant.id)
            p = self.plan_for(tenant, keys)
            if not p.due:
                break
            for note in p.notes:
                log.info("rotation of %s: %s", tenant.id, note)
            step = p.due[0]
            if not self._lock.held:  # noticed before the next action
                log.warning("rotation leadership lost; %s of %s not applied", step.kind.value,
                            tenant.id)
                break
            try:
                await self.apply(tenant, step)
            except Fenced as exc:
                self.fenced += 1
                log.info("rotation step %s of %s fenced off: %s", step.kind.value, tenant.id,
                         exc)
                break
            applied += 1
            self.applied += 1
        if applied:
            await self._catalog.reload()
        return applied

    # -- the steps -------------------------------------------------------------

    async def apply(self, tenant: Tenant, step: Step) -> None:
        """Apply one planned step, fenced; Fenced when its premises changed."""
        if step.kind is StepKind.GENERATE:
            await self._generate(tenant, step)
        elif step.kind is StepKind.ACTIVATE:
            await self._activate(tenant, step)
        elif step.kind is StepKind.DESTROY_PRIVATE:
            await self._destroy_private(tenant, step)
        else:
            await self._unpublish(tenant, step)

    async def _check(self, tx: Store, step: Step) -> None:
        for kid, state in step.expects.items():
            key = await tx.keys.get(kid)
            if key is None or key.state is not state:
                raise Fenced(f"key {kid} is {key.state.value if key else 'gone'}, "
                             f"planned as {state.value}")

    async def _point(self, name: str, step: Step) -> None:
        if self._hook is not None:
            await self._hook(name, step)

    async def _generate(self, tenant: Tenant, step: Step) -> None:
        generated = await self._signer.generate(tenant.id, tenant.policy.key_size)
        record = KeyRecord(
            kid=generated.kid, tenant=tenant.id, alg=generated.alg,
            key_size=generated.key_size, state=KeyState.PENDING,
            public_jwk=generated.public_jwk, hsm_label=generated.hsm_label,
            created_at=int(self._clock.now()))
        try:
            await self._point("generated", step)
            async with self._store.advisory_lock(ROTATION_STEP_LOCK), \
                    self._store.transaction() as tx:
                await self._check(tx, step)
                if any(k.state is KeyState.PENDING for k in await tx.keys.list(tenant.id)):
                    raise Fenced("a pending key exists already")
                await tx.keys.insert(record)
        except BaseException:
            # Nothing records it: do not leave it in the HSM (if this fails
            # too, it is an orphan for reconcile).
            with contextlib.suppress(Exception):
                await self._signer.destroy(generated.hsm_label)
            raise
        await self._event("key.generated", record, key_size=record.key_size,
                          hsm_label=record.hsm_label)
        await self._point("recorded", step)

    async def _activate(self, tenant: Tenant, step: Step) -> None:
        now = utc(self._clock.now())
        try:
            async with self._store.advisory_lock(ROTATION_STEP_LOCK), \
                    self._store.transaction() as tx:
                await self._check(tx, step)
                old = (await tx.keys.set_state(step.previous, KeyState.RETIRING,
                                               expected=[KeyState.ACTIVE], now=now)
                       if step.previous else None)
                new = await tx.keys.set_state(step.kid, KeyState.ACTIVE,
                                              expected=[KeyState.PENDING], now=now)
        except (InvalidKeyTransition, KeyNotFound) as exc:
            raise Fenced(exc.message) from exc
        await self._event("key.activated", new, previous=step.previous)
        if old is not None:
            await self._event("key.retiring", old, successor=new.kid)
        # This replica signs with the new key from now on.
        await self._catalog.reload()
        await self._point("activated", step)

    async def _destroy_private(self, tenant: Tenant, step: Step) -> None:
        # A RETIRING, RETIRED or COMPROMISED key never signs again (no
        # transition leads back to ACTIVE), so once it is in one of those
        # states, destroying its private half is always safe; the record
        # below refuses a key that could sign.
        key = await self._store.keys.get(step.kid)
        if key is None or key.state is not step.expects.get(step.kid):
            raise Fenced(f"key {step.kid} changed before its private half was destroyed")
        await self._signer.destroy_private(key.hsm_label)
        await self._point("destroyed", step)
        try:
            record = await self._marks.mark_private_destroyed(key.kid,
                                                              now=utc(self._clock.now()))
        except (InvalidKeyTransition, KeyNotFound) as exc:
            raise Fenced(exc.message) from exc
        await self._event("key.private_destroyed", record, hsm_label=record.hsm_label)

    async def _unpublish(self, tenant: Tenant, step: Step) -> None:
        try:
            async with self._store.advisory_lock(ROTATION_STEP_LOCK), \
                    self._store.transaction() as tx:
                await self._check(tx, step)
                record = await tx.keys.set_state(step.kid, KeyState.RETIRED,
                                                 expected=[KeyState.RETIRING],
                                                 now=utc(self._clock.now()))
        except (InvalidKeyTransition, KeyNotFound) as exc:
            raise Fenced(exc.message) from exc
        await self._event("key.retired", record)

    async def _event(self, event_type: str, key: KeyRecord, **details: Any) -> None:
        await self._audit.record(AuditEvent(
            event_type=event_type, tenant=key.tenant, actor=SCHEDULER.actor, kid=key.kid,
            outcome="ok", details={"state": key.state.value, "scheduled": True, **details}))
