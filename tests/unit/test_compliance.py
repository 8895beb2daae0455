"""The compliance report and HSM reconciliation: the pure rules
(``fedtoken.core.compliance``), the use cases with their authorization and
audit (``fedtoken.service.compliance``, over in-memory ports of this file and
the real ``Callers``), and the CLI, RPC and HTTP renderings.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fedtoken.cli import compliance as cli
from fedtoken.cli.main import build_parser
from fedtoken.core.audit import AuditEvent, ChainProblem, ChainReport
from fedtoken.core.authz import Grant, Role
from fedtoken.core.compliance import (
    DEFAULT_ROTATION_PERIOD_SECONDS,
    ComplianceReport,
    HsmFinding,
    ObjectProblem,
    ViolationCode,
    compliance_report,
    may_sign,
    reconcile,
    schedule_lifetime_check,
    schedule_next_step,
)
from fedtoken.core.errors import HsmUnavailable, PermissionDenied, TenantNotFound, Unauthenticated
from fedtoken.core.jwk import int_to_b64url
from fedtoken.core.model import KeyRecord, KeyState, Tenant, TenantPolicy
from fedtoken.core.ports import CallContext, GeneratedKey, HsmKeyAttributes, Principal
from fedtoken.core.rotation import Timings
from fedtoken.http.compliance import compliance_handler
from fedtoken.rpc.compliance import compliance_report_pb, reconcile_report_pb
from fedtoken.service.callers import Callers
from fedtoken.service.compliance import Compliance
from fedtoken_client._pb.fedtoken.v1 import key_admin_pb2

T = TypeVar("T")

NOW = 1_800_000_000
DAY = 86_400
PROTECTED = HsmKeyAttributes(present=True, sensitive=True, extractable=False, sign=True,
                             never_extractable=True, always_sensitive=True)
ABSENT = HsmKeyAttributes(present=False)
OK_CHAIN = ChainReport(ok=True, rows_checked=3, head_seq=3, head_hash=b"\x01" * 32)
BROKEN_CHAIN = ChainReport(ok=False, rows_checked=2, head_seq=3, head_hash=b"\x01" * 32,
                           first_bad_seq=2, problem=ChainProblem.ALTERED)

ADMIN = "spiffe://test/admin"
AUDITOR_A = "spiffe://test/auditor-a"
AUDITOR_ALL = "spiffe://test/auditor"
VERIFIER = "spiffe://test/verifier"
ADMIN_A = "spiffe://test/admin-a"


def tenant(tid: str, period: int = 0) -> Tenant:
    policy = TenantPolicy(rotation_period_seconds=period) if period else TenantPolicy()
    return Tenant(id=tid, issuer=f"https://issuer.test/{tid}", policy=policy)


def jwk(bits: int = 2048, e: int = 65537) -> dict[str, Any]:
    # The rules read only the sizes: an odd number of the right length will do.
    return {"kty": "RSA", "n": int_to_b64url((1 << (bits - 1)) | 1), "e": int_to_b64url(e)}


def key(kid: str, tid: str, state: KeyState, *, created: int = NOW - DAY,
        activated: int = 0, public: dict[str, Any] | None = None) -> KeyRecord:
    return KeyRecord(kid=kid, tenant=tid, alg="RS256", key_size=2048, state=state,
                     public_jwk=public or jwk(), hsm_label=f"fedtoken/{tid}/{kid}",
                     created_at=created,
                     activated_at=activated or (created if state is not KeyState.PENDING else 0))


def report(tenants: Sequence[Tenant], keys: Sequence[KeyRecord],
           hsm: dict[str, HsmKeyAttributes] | None = None, chain: ChainReport = OK_CHAIN,
           **kwargs: Any) -> ComplianceReport:
    if hsm is None:
        hsm = {k.kid: PROTECTED for k in keys if may_sign(k, keys)}
    return compliance_report(tenants, keys, hsm, chain, NOW, **kwargs)


def codes(r: ComplianceReport) -> list[tuple[str, str]]:
    return sorted((v.code.value, v.kid) for v in r.all_violations())


# --- the rules ----------------------------------------------------------------------


def test_a_clean_state_is_compliant() -> None:
    keys = [key("old", "a", KeyState.RETIRED, created=NOW - 40 * DAY),
            key("prev", "a", KeyState.RETIRING, created=NOW - 20 * DAY),
            key("cur", "a", KeyState.ACTIVE, created=NOW - 2 * DAY),
            key("next", "a", KeyState.PENDING, created=NOW - 60)]
    r = report([tenant("a")], keys)
    assert r.ok and r.audit_chain_ok and codes(r) == []
    facts = {f.kid: f for f in r.tenants[0].keys}
    assert (facts["cur"].modulus_bits, facts["cur"].public_exponent) == (2048, 65537)
    assert facts["cur"].age_seconds == 2 * DAY
    assert facts["old"].hsm == ABSENT and facts["cur"].hsm == PROTECTED
    assert [f.kid for f in r.tenants[0].keys] == ["old", "prev", "cur", "next"]


def test_a_key_kept_past_its_period_with_rotation_paused_is_too_old() -> None:
    period = 20 * DAY
    # Rotation paused: nothing generated a successor, the key kept signing.
    late = key("late", "a", KeyState.ACTIVE, created=NOW - period - 61,
               activated=NOW - period - 1)
    r = report([tenant("a", period)], [late])
    assert codes(r) == [("KEY_TOO_OLD", "late")] and not r.ok
    # One second within the period: fine; the default period applies without the field.
    assert report([tenant("a", period)], [replace(late, activated_at=NOW - period)]).ok
    assert report([tenant("a")], [late]).ok
    assert codes(report([tenant("a")], [replace(
        late, activated_at=NOW - DEFAULT_ROTATION_PERIOD_SECONDS - 1)])) == [
        ("KEY_TOO_OLD", "late")]


def test_age_against_the_period_counts_from_activation_not_pre_publication() -> None:
    k = key("k", "a", KeyState.ACTIVE, created=NOW - 10 * DAY, activated=NOW - 9 * DAY)
    assert report([tenant("a", 9 * DAY + 1)], [k]).ok


@pytest.mark.parametrize("state", [KeyState.RETIRING, KeyState.RETIRED, KeyState.DESTROYED,
                                   KeyState.COMPROMISED])
def test_a_private_half_left_after_retirement_is_flagged(state: KeyState) -> None:
    # "cur" is ACTIVE: a RETIRING key has a successor, so it can no longer sign.
    keys = [key("gone", "a", state), key("cur", "a", KeyState.ACTIVE)]
    hsm = {"gone": PROTECTED, "cur": PROTECTED}
    assert codes(report([tenant("a")], keys, hsm)) == [("PRIVATE_KEY_AFTER_RETIREMENT", "gone")]
    hsm["gone"] = ABSENT
    assert report([tenant("a")], keys, hsm).ok


def test_a_retiring_key_without_an_active_successor_may_still_sign() -> None:
    keys = [key("r", "a", KeyState.RETIRING), key("p", "a", KeyState.PENDING)]
    assert may_sign(keys[0], keys)
    # It keeps its private half (no violation for that) but the tenant has no active key.
    r = report([tenant("a")], keys, {"r": PROTECTED, "p": PROTECTED})
    assert codes(r) == [("NO_ACTIVE_KEY", "")]
    assert codes(report([tenant("a")], keys, {"r": ABSENT, "p": PROTECTED})) == [
        ("MISSING_KEY", "r"), ("NO_ACTIVE_KEY", "")]


@pytest.mark.parametrize("weakness", [
    {"sensitive": False}, {"always_sensitive": False}, {"extractable": True},
    {"never_extractable": False}, {"decrypt": True}, {"unwrap": True}, {"sign": False}])
def test_a_key_that_may_sign_with_weak_hsm_attributes_is_flagged(weakness: dict[str,
                                                                                bool]) -> None:
    keys = [key("cur", "a", KeyState.ACTIVE), key("next", "a", KeyState.PENDING)]
    hsm = {"cur": replace(PROTECTED, **weakness), "next": replace(PROTECTED, **weakness)}
    assert codes(report([tenant("a")], keys, hsm)) == [("HSM_ATTRIBUTES", "cur"),
                                                       ("HSM_ATTRIBUTES", "next")]


def test_a_key_that_may_sign_without_its_private_half_is_missing() -> None:
    keys = [key("cur", "a", KeyState.ACTIVE), key("next", "a", KeyState.PENDING)]
    assert codes(report([tenant("a")], keys, {"cur": ABSENT})) == [
        ("MISSING_KEY", "cur"), ("MISSING_KEY", "next")]


@pytest.mark.parametrize("bits,e", [(1024, 65537), (2047, 65537), (2048, 3), (2048, 65536),
                                    (2048, 1), (2048, 0), (0, 0)])
def test_weak_published_keys_are_flagged(bits: int, e: int) -> None:
    public = jwk(bits, e) if bits else {"kty": "RSA", "n": "not base64url!", "e": "AQAB"}
    keys = [key("weak", "a", KeyState.ACTIVE, public=public),
            key("old", "a", KeyState.RETIRED, public=public)]  # unpublished: not a risk
    r = report([tenant("a")], keys)
    assert codes(r) == [("WEAK_KEY", "weak")]


def test_a_tenant_without_an_active_key_is_flagged() -> None:
    r = report([tenant("a"), tenant("b")], [key("cur", "b", KeyState.ACTIVE),
                                             key("p", "a", KeyState.PENDING)])
    assert [(t.tenant.id, [v.code for v in t.violations]) for t in r.tenants] == [
        ("a", [ViolationCode.NO_ACTIVE_KEY]), ("b", [])]


def test_a_lifetime_the_grace_does_not_cover_is_flagged() -> None:
    def uncovered(t: Tenant) -> str:
        return "max token lifetime 2h exceeds the grace of 1h" if t.id == "a" else ""

    r = report([tenant("a"), tenant("b")], [key("x", "a", KeyState.ACTIVE),
                                             key("y", "b", KeyState.ACTIVE)],
               uncovered_lifetime=uncovered)
    assert [(v.code, v.tenant) for v in r.all_violations()] == [
        (ViolationCode.LIFETIME_NOT_COVERED, "a")]


def test_a_broken_audit_chain_is_a_global_violation() -> None:
    r = report([tenant("a")], [key("x", "a", KeyState.ACTIVE)], chain=BROKEN_CHAIN)
    assert not r.ok and not r.audit_chain_ok
    (v,) = r.violations
    assert v.code is ViolationCode.AUDIT_CHAIN_BROKEN and v.tenant == "" and "seq 2" in v.message
    hidden = report([tenant("a")], [key("x", "a", KeyState.ACTIVE)], chain=BROKEN_CHAIN,
                    chain_details=False)
    assert "seq" not in hidden.violations[0].message


def test_the_next_step_comes_from_the_schedule_callback() -> None:
    def schedule(t: Tenant, keys: Sequence[KeyRecord], k: KeyRecord,
                 now: int) -> tuple[str, int]:
        return ("rotate", k.activated_at + 30 * DAY) if k.state is KeyState.ACTIVE else ("", 0)

    r = report([tenant("a")], [key("x", "a", KeyState.ACTIVE, created=NOW - DAY)],
               next_step=schedule)
    assert (r.tenants[0].keys[0].next_step, r.tenants[0].keys[0].next_step_at) == (
        "rotate", NOW + 29 * DAY)


def test_the_rotation_schedule_gives_next_steps_and_the_lifetime_check() -> None:
    timings = Timings(configured_max_age=300, leeway=30, min_period=3600)
    t = tenant("a", 30 * DAY)
    keys = [key("cur", "a", KeyState.ACTIVE, created=NOW - DAY),
            replace(key("prev", "a", KeyState.RETIRING, created=NOW - 31 * DAY),
                    retiring_at=NOW - DAY, private_destroyed_at=NOW - DAY)]
    r = report([t], keys, next_step=schedule_next_step(timings),
               uncovered_lifetime=schedule_lifetime_check(timings))
    assert r.ok
    steps = {f.kid: (f.next_step, f.next_step_at) for f in r.tenants[0].keys}
    assert steps["prev"] == ("UNPUBLISH", NOW - DAY + 3600 + 300 + 30)
    # prev's unpublication is due already; cur's successor is generated one lead
    # (a quarter period) before cur's period ends.
    assert steps["cur"] == ("GENERATE", NOW - DAY + 30 * DAY - 30 * DAY // 4)
    # A stored policy whose lifetime the grace no longer covers (4 periods at most).
    bad = Tenant(id="b", issuer="https://issuer.test/b",
                 policy=TenantPolicy(rotation_period_seconds=3600,
                                     max_token_lifetime_seconds=5 * 3600))
    flagged = report([bad], [key("x", "b", KeyState.ACTIVE, created=NOW - 60)],
                     uncovered_lifetime=schedule_lifetime_check(timings))
    assert codes(flagged) == [("LIFETIME_NOT_COVERED", "")]


# --- reconciliation analysis ----------------------------------------------------------------


def test_reconcile_finds_orphans_not_signing_and_missing_objects() -> None:
    records = [key("cur", "a", KeyState.ACTIVE), key("prev", "a", KeyState.RETIRING),
               key("gone", "a", KeyState.RETIRED), key("pub", "a", KeyState.RETIRED),
               key("lost", "b", KeyState.ACTIVE), key("done", "b", KeyState.DESTROYED)]
    labels = ["fedtoken/a/cur", "fedtoken/a/prev", "fedtoken/a/gone", "fedtoken/a/pub",
              "fedtoken/x/orphan"]
    present = {"fedtoken/a/cur": True, "fedtoken/a/prev": True, "fedtoken/a/gone": True,
               "fedtoken/a/pub": False}  # pub: only its public half is left: fine
    found = reconcile(labels, records, present)
    assert [(f.hsm_label, f.problem, f.destroyable) for f in found] == [
        ("fedtoken/a/gone", ObjectProblem.NOT_SIGNING, True),
        ("fedtoken/a/prev", ObjectProblem.NOT_SIGNING, True),
        ("fedtoken/b/lost", ObjectProblem.MISSING, False),
        ("fedtoken/x/orphan", ObjectProblem.NO_RECORD, True),
    ]
    assert found[-1].tenant == "x" and found[-1].kid == "orphan"


def test_an_orphan_label_naming_a_kid_that_may_sign_is_never_destroyable() -> None:
    records = [key("cur", "a", KeyState.ACTIVE)]
    found = reconcile(["fedtoken/a/cur", "fedtoken/elsewhere/cur"], records,
                      {"fedtoken/a/cur": True})
    assert found == [HsmFinding("fedtoken/elsewhere/cur", "cur", "elsewhere",
                                ObjectProblem.NO_RECORD, destroyable=False)]


def test_reconcile_never_marks_a_key_that_may_sign_as_destroyable() -> None:
    """Every combination of three keys' states in one tenant, with each
    private half present or not: no finding that fix would act on names a
    key that may sign."""
    states = list(KeyState)
    checked = 0
    for combo in itertools.product(states, repeat=3):
        records = [key(f"k{i}", "a", s) for i, s in enumerate(combo)]
        labels = [r.hsm_label for r in records]
        for bits in itertools.product([True, False], repeat=3):
            present = dict(zip(labels, bits, strict=True))
            # The rule written out again here, not taken from the code under test.
            any_active = KeyState.ACTIVE in combo
            signing = {r.hsm_label for r in records
                       if r.state in (KeyState.PENDING, KeyState.ACTIVE)
                       or (r.state is KeyState.RETIRING and not any_active)}
            for f in reconcile(labels, records, present):
                checked += 1
                if f.destroyable:
                    assert f.hsm_label not in signing, (combo, bits, f)
                if f.problem is ObjectProblem.MISSING:
                    assert f.hsm_label in signing and not present[f.hsm_label]
    assert checked > 0


# --- in-memory ports -----------------------------------------------------------------------


class MemoryHsm:
    """A Signer over a dict of objects: label -> private attributes (None:
    only the public half is left)."""

    def __init__(self) -> None:
        self.objects: dict[str, HsmKeyAttributes | None] = {}
        self.destroyed: list[str] = []
        self.private_destroyed: list[str] = []
        self.fail_on: set[str] = set()

    def put(self, label: str, attrs: HsmKeyAttributes | None = PROTECTED) -> None:
        self.objects[label] = attrs

    async def sign(self, hsm_label: str, kid: str, inputs: Sequence[bytes]) -> list[bytes]:
        raise HsmUnavailable("not used")

    async def generate(self, tenant: str, bits: int) -> GeneratedKey:
        raise HsmUnavailable("not used")

    async def destroy(self, hsm_label: str) -> None:
        if hsm_label in self.fail_on:
            raise HsmUnavailable("the HSM is unavailable")
        self.objects.pop(hsm_label, None)
        self.destroyed.append(hsm_label)

    async def destroy_private(self, hsm_label: str) -> None:
        if hsm_label in self.fail_on:
            raise HsmUnavailable("the HSM is unavailable")
        if hsm_label in self.objects:
            self.objects[hsm_label] = None
        self.private_destroyed.append(hsm_label)

    async def key_labels(self) -> list[str]:
        return sorted(self.objects)

    async def key_attributes(self, hsm_label: str) -> HsmKeyAttributes:
        return self.objects.get(hsm_label) or ABSENT


class MemoryTenantRepo:
    def __init__(self, tenants: list[Tenant]) -> None:
        self.tenants = tenants

    async def list(self) -> list[Tenant]:
        return list(self.tenants)

    async def get(self, tenant_id: str) -> Tenant | None:
        return next((t for t in self.tenants if t.id == tenant_id), None)


class MemoryKeyRepo:
    """``stale``: kids the listing does not show yet (a record written after
    the comparison read the list), which ``get`` already sees."""

    def __init__(self, keys: list[KeyRecord]) -> None:
        self.keys = keys
        self.stale: set[str] = set()
        self.marked: list[str] = []

    async def list(self, tenant_id: str | None = None) -> list[KeyRecord]:
        return [k for k in self.keys if (tenant_id is None or k.tenant == tenant_id)
                and k.kid not in self.stale]

    async def get(self, kid: str) -> KeyRecord | None:
        return next((k for k in self.keys if k.kid == kid), None)

    async def mark_private_destroyed(self, kid: str, *, now: datetime) -> KeyRecord:
        self.marked.append(kid)
        found = await self.get(kid)
        assert found is not None and not found.state.signs
        return found


class MemoryChain:
    def __init__(self) -> None:
        self.report = OK_CHAIN

    async def verify_chain(self) -> ChainReport:
        return self.report


class MemoryStore:
    def __init__(self, tenants: list[Tenant], keys: list[KeyRecord]) -> None:
        self.tenants = MemoryTenantRepo(tenants)
        self.keys = MemoryKeyRepo(keys)
        self.audit = MemoryChain()


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def record(self, event: AuditEvent) -> None:
        self.events.append(event)

    async def record_soon(self, event: AuditEvent) -> None:
        self.events.append(event)

    async def record_with(self, event: AuditEvent,
                          write: Callable[[AuditEvent | None], Awaitable[T]]) -> T:
        result = await write(None)
        self.events.append(event)
        return result

    def of_type(self, event_type: str) -> list[AuditEvent]:
        return [e for e in self.events if e.event_type == event_type]


class MemoryGrants:
    def __init__(self) -> None:
        self.grants: list[Grant] = []

    async def put(self, grant: Grant, *, now: datetime) -> Grant:
        self.grants = [g for g in self.grants
                       if (g.identity, g.role) != (grant.identity, grant.role)] + [grant]
        return grant

    async def remove(self, identity: str, role: Role | None) -> int:
        before = len(self.grants)
        self.grants = [g for g in self.grants
                       if g.identity != identity or (role is not None and g.role is not role)]
        return before - len(self.grants)

    async def list(self) -> list[Grant]:
        return list(self.grants)


class Clock:
    def now(self) -> float:
        return float(NOW)


def ctx(identity: str) -> CallContext:
    return CallContext(principal=Principal(identity=identity, peer="127.0.0.1:1"),
                       request_id="req-1", method="test")


@dataclass
class World:
    store: MemoryStore
    hsm: MemoryHsm
    sink: RecordingSink
    callers: Callers
    compliance: Compliance


async def make_world(*, probe: bool = True) -> World:
    keys = [
        key("a-cur", "a", KeyState.ACTIVE), key("a-prev", "a", KeyState.RETIRING),
        key("a-old", "a", KeyState.RETIRED),
        key("b-cur", "b", KeyState.ACTIVE),
    ]
    store = MemoryStore([tenant("a"), tenant("b")], keys)
    hsm = MemoryHsm()
    for k in keys:
        hsm.put(k.hsm_label)  # a-prev and a-old still have their private half
    sink = RecordingSink()
    callers = Callers(repo=MemoryGrants(), audit=sink, clock=Clock(), bootstrap=[ADMIN])
    for identity, role, tenants in ((AUDITOR_A, "auditor", ["a"]), (AUDITOR_ALL, "auditor", []),
                                    (VERIFIER, "verifier", []), (ADMIN_A, "admin", ["a"])):
        await callers.grant(identity, role, tenants, [], 0, ctx(ADMIN))
    compliance = Compliance(
        store=store, signer=hsm, audit=sink, clock=Clock(), authz=callers,  # type: ignore[arg-type]
        tenants_for=(lambda i, r: callers.policy.tenants_for(i, r)) if probe else None)
    sink.events.clear()
    return World(store, hsm, sink, callers, compliance)


# --- the service: the report ----------------------------------------------------------------


@pytest.mark.parametrize("probe", [True, False])
async def test_a_verifier_is_denied_the_report_and_the_denial_is_audited(probe: bool) -> None:
    w = await make_world(probe=probe)
    with pytest.raises(PermissionDenied):
        await w.compliance.report("", ctx(VERIFIER))
    denials = w.sink.of_type("access.denied")
    assert denials and all(e.actor.startswith(VERIFIER) for e in denials)


@pytest.mark.parametrize("probe", [True, False])
async def test_an_auditor_sees_only_its_tenants(probe: bool) -> None:
    w = await make_world(probe=probe)
    r = await w.compliance.report("", ctx(AUDITOR_A))
    assert [t.tenant.id for t in r.tenants] == ["a"]
    assert {k.tenant for t in r.tenants for k in t.keys} == {"a"}
    assert [t.tenant.id for t in (await w.compliance.report("a", ctx(AUDITOR_A))).tenants] == ["a"]
    with pytest.raises(PermissionDenied):
        await w.compliance.report("b", ctx(AUDITOR_A))
    if probe:  # recognised as an auditor without being denied as an admin first
        assert [e.tenant for e in w.sink.of_type("access.denied")] == ["b"]


async def test_the_report_reads_the_hsm_now_and_flags_leftover_private_halves() -> None:
    w = await make_world()
    r = await w.compliance.report("", ctx(AUDITOR_ALL))
    assert [t.tenant.id for t in r.tenants] == ["a", "b"]
    assert codes(r) == [("PRIVATE_KEY_AFTER_RETIREMENT", "a-old"),
                        ("PRIVATE_KEY_AFTER_RETIREMENT", "a-prev")]
    w.hsm.objects["fedtoken/a/a-old"] = None
    w.hsm.objects["fedtoken/a/a-prev"] = None
    assert (await w.compliance.report("", ctx(ADMIN))).ok  # an admin may read it too
    w.store.audit.report = BROKEN_CHAIN
    broken = await w.compliance.report("", ctx(ADMIN))
    assert codes(broken) == [("AUDIT_CHAIN_BROKEN", "")] and "seq 2" in broken.violations[0].message
    scoped = await w.compliance.report("", ctx(AUDITOR_A))
    assert not scoped.audit_chain_ok and "seq" not in scoped.violations[0].message


async def test_a_tenant_admin_reads_its_tenants_and_an_unknown_tenant_is_not_found() -> None:
    w = await make_world()
    r = await w.compliance.report("", ctx(ADMIN_A))
    assert [t.tenant.id for t in r.tenants] == ["a"]
    with pytest.raises(TenantNotFound):
        await w.compliance.report("nope", ctx(ADMIN))


# --- the service: reconciliation ------------------------------------------------------------


async def test_reconcile_needs_an_admin_of_every_tenant() -> None:
    w = await make_world()
    for who in (AUDITOR_ALL, VERIFIER, ADMIN_A):
        with pytest.raises(PermissionDenied):
            await w.compliance.reconcile(True, ctx(who))
    assert w.hsm.destroyed == w.hsm.private_destroyed == []
    assert not w.sink.of_type("key.reconcile_run")
    # A tenant's admin may reconcile that tenant only.
    done = await w.compliance.reconcile(False, ctx(ADMIN_A), tenant="a")
    assert {f.tenant for f in done.objects} == {"a"}
    with pytest.raises(PermissionDenied):
        await w.compliance.reconcile(False, ctx(ADMIN_A), tenant="b")


async def test_reconcile_reports_without_fix_and_destroys_with_it_audited() -> None:
    w = await make_world()
    w.hsm.put("fedtoken/a/orphan")
    w.hsm.put("fedtoken/b/public-only", None)  # no record, public half only
    w.hsm.objects.pop("fedtoken/b/b-cur")  # a key that may sign, gone from the HSM
    dry = await w.compliance.reconcile(False, ctx(ADMIN))
    assert [(f.hsm_label, f.problem.value, f.destroyed) for f in dry.objects] == [
        ("fedtoken/a/a-old", "NOT_SIGNING", False), ("fedtoken/a/a-prev", "NOT_SIGNING", False),
        ("fedtoken/a/orphan", "NO_RECORD", False), ("fedtoken/b/b-cur", "MISSING", False),
        ("fedtoken/b/public-only", "NO_RECORD", False)]
    assert (dry.hsm_objects, dry.records) == (5, 4)
    assert w.hsm.destroyed == w.hsm.private_destroyed == []
    (run,) = w.sink.of_type("key.reconcile_run")
    assert run.details and run.details["fix"] is False and run.details["reconcile"] is True

    fixed = await w.compliance.reconcile(True, ctx(ADMIN))
    assert [(f.hsm_label, f.destroyed) for f in fixed.objects] == [
        ("fedtoken/a/a-old", True), ("fedtoken/a/a-prev", True), ("fedtoken/a/orphan", True),
        ("fedtoken/b/b-cur", False), ("fedtoken/b/public-only", True)]
    assert w.hsm.destroyed == ["fedtoken/a/orphan", "fedtoken/b/public-only"]
    assert w.hsm.private_destroyed == ["fedtoken/a/a-old", "fedtoken/a/a-prev"]
    assert w.store.keys.marked == ["a-old", "a-prev"]  # and the store knows it
    # The active key of "a" was never touched.
    assert w.hsm.objects["fedtoken/a/a-cur"] == PROTECTED
    assert sorted((e.event_type, e.hsm_label) for e in _with_label(
        w.sink.of_type("key.reconciled") + w.sink.of_type("key.private_destroyed"))) == [
        ("key.private_destroyed", "fedtoken/a/a-old"),
        ("key.private_destroyed", "fedtoken/a/a-prev"),
        ("key.reconciled", "fedtoken/a/orphan"), ("key.reconciled", "fedtoken/b/public-only")]
    for e in w.sink.of_type("key.reconciled") + w.sink.of_type("key.private_destroyed"):
        assert e.details and e.details["reconcile"] is True and e.outcome == "ok"
        assert e.actor.startswith(ADMIN) and e.request_id == "req-1"
    assert [e.details["destroyed"] for e in w.sink.of_type("key.reconcile_run")
            if e.details] == [0, 4]
    # Nothing is left to do but the missing key.
    again = await w.compliance.reconcile(True, ctx(ADMIN))
    assert [(f.problem.value, f.destroyed) for f in again.objects] == [("MISSING", False)]


@dataclass
class _Labelled:
    event_type: str
    hsm_label: str


def _with_label(events: list[AuditEvent]) -> list[_Labelled]:
    return [_Labelled(e.event_type, (e.details or {})["hsm_label"]) for e in events]


async def test_reconcile_rechecks_postgres_before_destroying() -> None:
    w = await make_world()
    # A key generated and recorded while reconcile was comparing: the HSM
    # label was seen, the list did not show its record yet.
    fresh = key("fresh", "a", KeyState.PENDING)
    w.store.keys.keys.append(fresh)
    w.store.keys.stale.add("fresh")
    w.hsm.put(fresh.hsm_label)
    done = await w.compliance.reconcile(True, ctx(ADMIN))
    (finding,) = [f for f in done.objects if f.kid == "fresh"]
    assert finding.problem is ObjectProblem.NO_RECORD and not finding.destroyed
    assert fresh.hsm_label not in w.hsm.destroyed and w.hsm.objects[fresh.hsm_label]


async def test_a_failed_destruction_is_audited_and_the_run_goes_on() -> None:
    w = await make_world()
    w.hsm.fail_on.add("fedtoken/a/a-old")
    done = await w.compliance.reconcile(True, ctx(ADMIN))
    assert {f.hsm_label: f.destroyed for f in done.objects} == {
        "fedtoken/a/a-old": False, "fedtoken/a/a-prev": True}
    (failed,) = [e for e in w.sink.of_type("key.private_destroyed") if e.outcome == "error"]
    assert failed.kid == "a-old" and failed.reason == "HSM_UNAVAILABLE"


# --- renderings: RPC, CLI, HTTP -------------------------------------------------------------


async def test_the_rpc_messages_carry_the_report() -> None:
    w = await make_world()
    msg = compliance_report_pb(await w.compliance.report("", ctx(ADMIN)))
    assert not msg.ok and msg.audit_chain_ok and [t.tenant.id for t in msg.tenants] == ["a", "b"]
    k = msg.tenants[0].keys[0]
    assert (k.modulus_bits, k.public_exponent, k.hsm.present, k.hsm.sensitive) == (
        2048, 65537, True, True)
    assert {v.code for t in msg.tenants for v in t.violations} == {
        "PRIVATE_KEY_AFTER_RETIREMENT"}
    rec = reconcile_report_pb(await w.compliance.reconcile(False, ctx(ADMIN)))
    assert (rec.hsm_objects, rec.records, [o.problem for o in rec.objects]) == (
        4, 4, ["NOT_SIGNING", "NOT_SIGNING"])


class FakeClient:
    """What the CLI uses of FedtokenClient: its compliance methods, which
    record the request the real ones would send."""

    def __init__(self, responses: dict[str, Any]) -> None:
        self.responses = responses
        self.requests: list[Any] = []

    def compliance_report(self, tenant: str = "") -> Any:
        return self._call("GetComplianceReport",
                          key_admin_pb2.ComplianceReportRequest(tenant=tenant))

    def reconcile_keys(self, *, fix: bool = False) -> Any:
        return self._call("ReconcileKeys", key_admin_pb2.ReconcileKeysRequest(fix=fix))

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def _call(self, method: str, request: Any) -> Any:
        self.requests.append(request)
        return self.responses[method]


def _cli(client: FakeClient, argv: list[str]) -> tuple[int, list[str], list[Any]]:
    # The commands as cli.main registers them, on a parser of the test's own
    # (cli.main's would connect to a real server).
    parser = argparse.ArgumentParser(prog="fedtoken")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys").add_subparsers(dest="action", required=True)
    lines: list[str] = []
    emitted: list[Any] = []
    cli.register(sub, connect=lambda ns: client, emit=emitted.append, keys=keys)  # type: ignore[arg-type,return-value]
    ns = parser.parse_args(argv)
    code: int = ns.func(ns, write=lines.append)
    return code, lines, emitted


async def test_the_cli_prints_a_table_and_exits_1_on_a_violation() -> None:
    w = await make_world()
    msg = compliance_report_pb(await w.compliance.report("", ctx(ADMIN)))
    client = FakeClient({"GetComplianceReport": msg})
    code, lines, _ = _cli(client, ["compliance", "--tenant", "a"])
    assert code == 1 and client.requests[0].tenant == "a"
    assert lines[0].split() == ["TENANT", "KID", "ALG", "BITS", "EXP", "STATE", "AGE", "NEXT",
                                "HSM"]
    row = next(line for line in lines if "a-cur" in line).split()
    assert row == ["a", "a-cur", "RS256", "2048", "65537", "ACTIVE", "1d00h", "-", "protected"]
    assert any(line.startswith("PRIVATE_KEY_AFTER_RETIREMENT") for line in lines)
    assert next(line for line in lines if "a-old" in line).split()[-1] == "leftover:protected"
    assert lines[-1].startswith("NOT COMPLIANT: 2 violation(s)")

    w.hsm.objects["fedtoken/a/a-old"] = w.hsm.objects["fedtoken/a/a-prev"] = None
    clean = compliance_report_pb(await w.compliance.report("", ctx(ADMIN)))
    code, lines, _ = _cli(FakeClient({"GetComplianceReport": clean}), ["compliance"])
    assert code == 0 and lines[-1] == "compliant"
    code, lines, emitted = _cli(FakeClient({"GetComplianceReport": clean}),
                                ["compliance", "--json"])
    assert code == 0 and lines == [] and emitted[0]["ok"] is True
    assert emitted[0]["tenants"][0]["keys"][0]["hsm"]["extractable"] is False


async def test_the_cli_reconciles_and_exits_1_while_something_is_left() -> None:
    w = await make_world()
    dry = reconcile_report_pb(await w.compliance.reconcile(False, ctx(ADMIN)))
    client = FakeClient({"ReconcileKeys": dry})
    code, lines, _ = _cli(client, ["keys", "reconcile"])
    assert code == 1 and client.requests[0].fix is False
    assert any(line.split()[:2] == ["NOT_SIGNING", "fedtoken/a/a-old"] for line in lines)
    fixed = reconcile_report_pb(await w.compliance.reconcile(True, ctx(ADMIN)))
    client = FakeClient({"ReconcileKeys": fixed})
    code, lines, _ = _cli(client, ["keys", "reconcile", "--fix"])
    assert code == 0 and client.requests[0].fix is True
    assert lines[-1].split()[-1] == "yes"
    empty = key_admin_pb2.ReconcileKeysReport(hsm_objects=3, records=3)
    code, lines, emitted = _cli(FakeClient({"ReconcileKeys": empty}),
                                ["keys", "reconcile", "--json"])
    assert code == 0 and emitted == [{"objects": [], "hsm_objects": 3, "records": 3}]
    # cli.main registers them beside its own keys commands.
    assert build_parser().parse_args(["keys", "list"]).action == "list"
    assert build_parser().parse_args(["keys", "reconcile", "--fix"]).fix is True
    assert build_parser().parse_args(["compliance", "--tenant", "a"]).tenant == "a"


def test_cli_durations_are_compact() -> None:
    assert [cli.duration(s) for s in (0, 59, 60, 3599, 3600, 86_399, 86_400, 31 * DAY + 3600)] \
        == ["0s", "59s", "1m", "59m", "1h00m", "23h59m", "1d00h", "31d01h"]


@pytest.fixture
async def http_world() -> AsyncIterator[tuple[TestClient[Any, Any], World]]:
    w = await make_world()

    def identity_of(der: bytes | None) -> str:
        raise Unauthenticated("no client certificate")

    # The test server has no TLS: the identity comes from a header the test sets.
    async def with_header(request: web.Request) -> web.StreamResponse:
        who = request.headers.get("X-Test-Identity", "")

        def of(der: bytes | None) -> str:
            if not who:
                return identity_of(der)
            return who

        return await compliance_handler(w.compliance.report, of)(request)

    app = web.Application()
    app.router.add_get("/compliance", with_header)
    async with TestClient(TestServer(app)) as client:
        yield client, w


async def test_the_bridge_serves_the_report_to_authenticated_auditors(
        http_world: tuple[TestClient[Any, Any], World]) -> None:
    client, w = http_world
    resp = await client.get("/compliance")
    assert resp.status == 401 and (await resp.json()) == {"error": "invalid_client"}
    resp = await client.get("/compliance", headers={"X-Test-Identity": VERIFIER})
    assert resp.status == 403
    resp = await client.get("/compliance", headers={"X-Test-Identity": AUDITOR_A})
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert [t["tenant"]["id"] for t in body["tenants"]] == ["a"] and body["ok"] is False
    assert body["tenants"][0]["keys"][0]["state"] in {s.name for s in KeyState}
    resp = await client.get("/compliance?tenant=b", headers={"X-Test-Identity": AUDITOR_A})
    assert resp.status == 403
    resp = await client.get("/compliance?tenant=nope", headers={"X-Test-Identity": ADMIN})
    assert resp.status == 404
    resp = await client.get("/compliance?tenant=a&tenant=b",
                            headers={"X-Test-Identity": ADMIN})
    assert resp.status == 400
    # Same content as the RPC.
    resp = await client.get("/compliance", headers={"X-Test-Identity": ADMIN})
    rpc = compliance_report_pb(await w.compliance.report("", ctx(ADMIN)))
    body = await resp.json()
    assert [v["code"] for t in body["tenants"] for v in t["violations"]] == [
        v.code for t in rpc.tenants for v in t.violations]
    assert json.dumps(body)  # plain JSON
