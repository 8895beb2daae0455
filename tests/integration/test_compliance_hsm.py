"""The Compliance service over a real PgStore and the real PKCS#11 adapter
on SoftHSM: reconciliation finds and destroys orphans and leftover private
halves, never a key that may sign, and the report reads the token now.

The SoftHSM token is shared by the whole test process (other modules keep
keys of their own in it), so every run here is limited to this module's
tenants with ``reconcile(tenant=...)``; the unscoped run is only ever a
dry run.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio

from fedtoken.core.audit import AuditEvent
from fedtoken.core.compliance import ObjectProblem, ViolationCode
from fedtoken.core.model import KeyRecord, KeyState, Tenant
from fedtoken.core.ports import CallContext, GeneratedKey, Principal, utc
from fedtoken.hsm import Pkcs11Hsm
from fedtoken.hsm.devtoken import DevToken
from fedtoken.service.callers import Callers
from fedtoken.service.compliance import Compliance
from fedtoken.store import PgStore, apply_migrations, create_pool
from fedtoken.store.callers import PgCallers
from tests._hsm_fixture import hsm_devtoken  # noqa: F401

pytestmark = pytest.mark.integration

ADMIN = "spiffe://test/compliance-admin"
NOW = 1_800_000_000


class Clock:
    def now(self) -> float:
        return float(NOW)


class ChainSink:
    """An AuditSink appending each event to the real Postgres chain at once."""

    def __init__(self, store: PgStore) -> None:
        self._store = store

    async def record(self, event: AuditEvent) -> None:
        await self._store.audit.append_chunk([event])

    async def record_soon(self, event: AuditEvent) -> None:
        await self._store.audit.append_chunk([event])

    async def record_with(self, event, write):  # type: ignore[no-untyped-def]
        result = await write(None)
        await self.record(event)
        return result

    async def record_verifications(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hsm(hsm_devtoken: DevToken) -> Iterator[Pkcs11Hsm]:  # noqa: F811
    with Pkcs11Hsm(hsm_devtoken.hsm_config()) as instance:
        yield instance


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(fresh_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(fresh_dsn, min_size=1, max_size=5)
    await apply_migrations(pool)
    yield pool
    await pool.close()


@dataclass
class World:
    store: PgStore
    hsm: Pkcs11Hsm
    compliance: Compliance
    tenant: str
    generated: list[GeneratedKey]


@pytest_asyncio.fixture(loop_scope="session")
async def world(pool: asyncpg.Pool, hsm: Pkcs11Hsm) -> AsyncIterator[World]:
    store = PgStore(pool)
    sink = ChainSink(store)
    callers = Callers(repo=PgCallers.over_pool(pool), audit=sink, clock=Clock(),
                      bootstrap=[ADMIN])
    compliance = Compliance(store=store, signer=hsm, audit=sink, clock=Clock(), authz=callers,
                            tenants_for=lambda i, r: callers.policy.tenants_for(i, r))
    tid = f"comp-{uuid.uuid4().hex[:10]}"
    await store.tenants.create(Tenant(id=tid, issuer=f"https://issuer.test/{tid}"),
                               now=utc(NOW - 10 * 86_400))
    w = World(store, hsm, compliance, tid, [])
    yield w
    for g in w.generated:
        await hsm.destroy(g.hsm_label)


async def _key(w: World, state: KeyState) -> KeyRecord:
    """A key generated in the HSM and recorded, driven to ``state`` through
    the store's own transitions."""
    g = await w.hsm.generate(w.tenant, 2048)
    w.generated.append(g)
    record = await w.store.keys.insert(KeyRecord(
        kid=g.kid, tenant=w.tenant, alg=g.alg, key_size=g.key_size, state=KeyState.PENDING,
        public_jwk=g.public_jwk, hsm_label=g.hsm_label, created_at=NOW - 86_400))
    if state is KeyState.PENDING:
        return record
    record = await w.store.keys.activate(w.tenant, g.kid, now=utc(NOW - 3600))
    if state is KeyState.ACTIVE:
        return record
    path = [KeyState.RETIRING] + ([KeyState.RETIRED] if state is KeyState.RETIRED else [])
    for step in path:
        record = await w.store.keys.set_state(g.kid, step, expected=[record.state],
                                              now=utc(NOW - 600))
    assert record.state is state
    return record


def ctx() -> CallContext:
    return CallContext(principal=Principal(identity=ADMIN, peer="127.0.0.1:1"),
                       request_id=uuid.uuid4().hex, method="test")


async def test_orphans_and_leftover_private_halves_are_fixed_and_signing_keys_kept(
        world: World) -> None:
    w = world
    retired = await _key(w, KeyState.RETIRED)  # its private half is still in the HSM
    active = await _key(w, KeyState.ACTIVE)  # the signing key
    pending = await _key(w, KeyState.PENDING)  # the next one: may sign soon
    orphan = await w.hsm.generate(w.tenant, 2048)  # in the HSM, never recorded
    w.generated.append(orphan)

    # The report flags the retired key's private half; the others are protected.
    report = await w.compliance.report(w.tenant, ctx())
    (tc,) = report.tenants
    assert [(v.code, v.kid) for v in tc.violations] == [
        (ViolationCode.PRIVATE_KEY_AFTER_RETIREMENT, retired.kid)]
    facts = {f.kid: f for f in tc.keys}
    for kid in (active.kid, pending.kid):
        hsm = facts[kid].hsm
        assert hsm.present and hsm.sensitive and hsm.never_extractable and not hsm.extractable
        assert hsm.sign and not hsm.decrypt and not hsm.unwrap
        assert (facts[kid].modulus_bits, facts[kid].public_exponent) == (2048, 65537)
    assert report.audit_chain_ok

    dry = await w.compliance.reconcile(False, ctx(), tenant=w.tenant)
    assert {(f.hsm_label, f.problem) for f in dry.objects} == {
        (orphan.hsm_label, ObjectProblem.NO_RECORD),
        (retired.hsm_label, ObjectProblem.NOT_SIGNING)}
    assert (dry.hsm_objects, dry.records) == (4, 3)
    assert orphan.hsm_label in w.hsm.all_key_labels()  # a dry run destroys nothing

    fixed = await w.compliance.reconcile(True, ctx(), tenant=w.tenant)
    assert all(f.destroyed for f in fixed.objects) and len(fixed.objects) == 2
    labels = w.hsm.all_key_labels()
    # The orphan is gone whole; the retired key keeps its public half only.
    assert orphan.hsm_label not in labels
    assert retired.hsm_label in labels
    assert w.hsm.read_key_attributes(retired.hsm_label).present is False
    assert w.hsm.public_jwk(retired.hsm_label) == retired.public_jwk
    # The keys that may sign still sign.
    for k in (active, pending):
        assert w.hsm.read_key_attributes(k.hsm_label).present
        (signature,) = await w.hsm.sign(k.hsm_label, k.kid, [b"still signing"])
        assert len(signature) == 256

    assert (await w.compliance.report(w.tenant, ctx())).ok
    again = await w.compliance.reconcile(True, ctx(), tenant=w.tenant)
    assert again.objects == ()

    # Every destruction and every run is in the real audit chain.
    events = await w.store.audit.list(tenant=w.tenant, limit=100)
    by_type: dict[str, list[AuditEvent]] = {}
    for r in events:
        by_type.setdefault(r.event.event_type, []).append(r.event)
    assert [e.details and e.details["hsm_label"] for e in by_type["key.reconciled"]] == [
        orphan.hsm_label]
    assert [e.kid for e in by_type["key.private_destroyed"]] == [retired.kid]
    assert all(e.details and e.details["reconcile"] is True
               for e in by_type["key.reconciled"] + by_type["key.private_destroyed"])
    assert [e.details and e.details["fix"] for e in by_type["key.reconcile_run"]] == [
        False, True, True]
    assert (await w.store.audit.verify_chain()).ok


async def test_a_key_that_may_sign_is_never_destroyed_and_missing_is_only_reported(
        world: World) -> None:
    w = world
    retiring = await _key(w, KeyState.ACTIVE)
    # A RETIRING key whose successor was compromised: no ACTIVE key beside it.
    successor = await _key(w, KeyState.PENDING)
    await w.store.keys.activate(w.tenant, successor.kid, now=utc(NOW - 60))
    await w.store.keys.set_state(successor.kid, KeyState.COMPROMISED,
                                 expected=[KeyState.ACTIVE], now=utc(NOW - 30))
    assert (await w.store.keys.get(retiring.kid)).state is KeyState.RETIRING  # type: ignore[union-attr]
    # A PENDING key whose private half was lost.
    lost = await _key(w, KeyState.PENDING)
    w.hsm.destroy_private_key(lost.hsm_label)

    fixed = await w.compliance.reconcile(True, ctx(), tenant=w.tenant)
    found = {f.hsm_label: (f.problem, f.destroyed) for f in fixed.objects}
    assert found == {
        successor.hsm_label: (ObjectProblem.NOT_SIGNING, True),  # compromised: destroyed
        lost.hsm_label: (ObjectProblem.MISSING, False),
    }
    assert w.hsm.read_key_attributes(retiring.hsm_label).present  # kept: it may sign
    report = await w.compliance.report(w.tenant, ctx())
    assert sorted((v.code.value, v.kid) for t in report.tenants for v in t.violations) == [
        ("MISSING_KEY", lost.kid), ("NO_ACTIVE_KEY", "")]


async def test_the_unscoped_dry_run_sees_this_tenants_objects_and_destroys_nothing(
        world: World) -> None:
    w = world
    orphan = await w.hsm.generate(w.tenant, 2048)
    w.generated.append(orphan)
    before = w.hsm.all_key_labels()
    dry = await w.compliance.reconcile(False, ctx())
    assert (orphan.hsm_label, ObjectProblem.NO_RECORD) in {
        (f.hsm_label, f.problem) for f in dry.objects}
    assert dry.hsm_objects >= len([b for b in before if b.startswith(f"fedtoken/{w.tenant}/")])
    assert not any(f.destroyed for f in dry.objects)
    assert w.hsm.all_key_labels() == before
