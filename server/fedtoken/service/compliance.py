"""Compliance: the auditors' report over every key, and HSM reconciliation.

Both read the truth where it is now, never a cache: key records from the
store, each private key's attributes read back from the HSM token, and the
audit chain walked in Postgres. The rules are ``fedtoken.core.compliance``.

``report`` is for auditors and admins, scoped to the tenants they hold the
role for. ``reconcile`` is for admins: it lists HSM objects that Postgres
does not account for (NO_RECORD), private halves of keys that can no longer
sign (NOT_SIGNING) and keys that may sign but whose private half is gone
(MISSING); with ``fix`` it destroys the first two, never a key that may
sign, and re-reads the record just before each destruction. Every run and
every destruction is an audit event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from fedtoken.core.audit import AuditEvent
from fedtoken.core.authz import Ask, Role
from fedtoken.core.compliance import (
    ComplianceReport,
    HsmFinding,
    NextStep,
    ObjectProblem,
    ReconcileReport,
    UncoveredLifetime,
    compliance_report,
    label_parts,
    lifetime_always_covered,
    may_sign,
    no_next_step,
    reconcile,
    schedule_lifetime_check,
    schedule_next_step,
)
from fedtoken.core.errors import FedtokenError, PermissionDenied, TenantNotFound
from fedtoken.core.model import KeyRecord
from fedtoken.core.policy import check_tenant_id
from fedtoken.core.ports import (
    AuditSink,
    Authorizer,
    CallContext,
    Clock,
    HsmKeyAttributes,
    Signer,
    Store,
    utc,
)
from fedtoken.core.rotation import Timings

RoleProbe = Callable[[str, Role], frozenset[str] | None]
# The run event lists at most this many findings (the rest are counted).
MAX_LISTED_FINDINGS = 200


class Compliance:
    def __init__(self, *, store: Store, signer: Signer, audit: AuditSink, clock: Clock,
                 authz: Authorizer, tenants_for: RoleProbe | None = None,
                 timings: Timings | None = None, next_step: NextStep | None = None,
                 uncovered_lifetime: UncoveredLifetime | None = None) -> None:
        """``tenants_for`` (``callers.policy.tenants_for``, late-bound) lets
        an auditor be recognised without first being denied as admin (a
        denial is an audit event). ``timings`` (the rotation settings) gives
        each key's next step and the lifetime check from the rotation
        schedule; ``next_step`` and ``uncovered_lifetime`` override them
        (without either: no step shown, no lifetime check)."""
        self._store = store
        self._signer = signer
        self._audit = audit
        self._clock = clock
        self._authz = authz
        self._tenants_for = tenants_for
        self._next_step = next_step or (
            schedule_next_step(timings) if timings is not None else no_next_step)
        self._uncovered_lifetime = uncovered_lifetime or (
            schedule_lifetime_check(timings) if timings is not None else lifetime_always_covered)

    # -- the report ----------------------------------------------------------------

    async def report(self, tenant: str, ctx: CallContext) -> ComplianceReport:
        """Every key of the tenants the caller may read (``tenant``: that one
        only), judged now. PermissionDenied (audited) without the auditor or
        admin role, or for a tenant outside the caller's scope."""
        if tenant:
            check_tenant_id(tenant, "tenant")
        scope = await self._readable(ctx, tenant)
        tenants = [t for t in await self._store.tenants.list()
                   if (not tenant or t.id == tenant) and (scope is None or t.id in scope)]
        if tenant and not tenants:
            # Known to be readable (checked above) but absent: the store's
            # own not-found, same as every other tenant-naming call.
            raise _tenant_not_found(tenant)
        wanted = {t.id for t in tenants}
        keys = [k for k in await self._store.keys.list(tenant or None) if k.tenant in wanted]
        hsm: dict[str, HsmKeyAttributes] = {}
        for key in keys:
            hsm[key.kid] = await self._signer.key_attributes(key.hsm_label)
        chain = await self._store.audit.verify_chain()
        return compliance_report(
            tenants, keys, hsm, chain, int(self._clock.now()), next_step=self._next_step,
            uncovered_lifetime=self._uncovered_lifetime, chain_details=scope is None)

    async def _readable(self, ctx: CallContext, tenant: str) -> frozenset[str] | None:
        """The tenants the caller may read as admin or auditor (None: all);
        PermissionDenied (audited) with neither role, or for a ``tenant``
        outside them. With the role probe, the scopes of both roles add up
        and nobody is denied on the way; without it, admin is asked first
        (TrustAdmin does the same)."""
        scopes: list[tuple[Role, frozenset[str] | None]]
        if self._tenants_for is not None:
            identity = ctx.principal.identity
            held = [r for r in (Role.ADMIN, Role.AUDITOR)
                    if self._tenants_for(identity, r) != frozenset()]
            # With neither, asking for auditor is the one audited denial.
            scopes = [(r, await self._authz.scope(ctx, r)) for r in held or [Role.AUDITOR]]
        else:
            try:
                scopes = [(Role.ADMIN, await self._authz.scope(ctx, Role.ADMIN))]
            except PermissionDenied:
                scopes = [(Role.AUDITOR, await self._authz.scope(ctx, Role.AUDITOR))]
        if any(scope is None for _, scope in scopes):
            return None
        readable = frozenset[str]().union(*(scope or () for _, scope in scopes))
        if tenant and tenant not in readable:
            await self._authz.require(ctx, Ask(scopes[-1][0], tenant))  # raises, audited
        return readable

    # -- reconciliation ----------------------------------------------------------------

    async def reconcile(self, fix: bool, ctx: CallContext, *,
                        tenant: str = "") -> ReconcileReport:
        """Compare the HSM with Postgres (with ``fix``: repair). The whole HSM
        needs an admin of every tenant; ``tenant`` limits the run (objects
        whose label names it, and its records) to one tenant's admin."""
        if tenant:
            check_tenant_id(tenant, "tenant")
        await self._authz.require(ctx, Ask(Role.ADMIN, tenant))
        # Labels first, records second: a key generated in between has a
        # label we did not see rather than a label without its record.
        labels = [label for label in await self._signer.key_labels()
                  if not tenant or label_parts(label)[0] == tenant]
        records = await self._store.keys.list(tenant or None)
        in_hsm = set(labels)
        present = {r.hsm_label: (await self._signer.key_attributes(r.hsm_label)).present
                   for r in records if r.hsm_label in in_hsm}
        findings = reconcile(labels, records, present)
        if fix:
            findings = [await self._fix(f, ctx) if f.destroyable else f for f in findings]
        counts = {p.value: sum(1 for f in findings if f.problem is p) for p in ObjectProblem}
        await self._audit.record(AuditEvent(
            event_type="key.reconcile_run", tenant=tenant, actor=ctx.actor, outcome="ok",
            request_id=ctx.request_id, details={
                "reconcile": True, "fix": fix, "hsm_objects": len(labels),
                "records": len(records), "found": counts,
                "destroyed": sum(1 for f in findings if f.destroyed),
                "objects": [{"hsm_label": f.hsm_label, "problem": f.problem.value,
                             "destroyed": f.destroyed}
                            for f in findings[:MAX_LISTED_FINDINGS]],
                **ctx.untrusted}))
        return ReconcileReport(tuple(findings), len(labels), len(records))

    async def _fix(self, finding: HsmFinding, ctx: CallContext) -> HsmFinding:
        """Destroy what ``finding`` names, after re-reading Postgres (the
        state may have moved since the comparison); audited either way."""
        if not await self._still_destroyable(finding):
            return replace(finding, destroyable=False)
        orphan = finding.problem is ObjectProblem.NO_RECORD
        event = AuditEvent(
            event_type="key.reconciled" if orphan else "key.private_destroyed",
            tenant=finding.tenant, actor=ctx.actor, kid=finding.kid, outcome="ok",
            request_id=ctx.request_id,
            details={"reconcile": True, "problem": finding.problem.value,
                     "hsm_label": finding.hsm_label,
                     "action": "destroyed" if orphan else "private_destroyed",
                     **ctx.untrusted})
        try:
            if orphan:
                await self._signer.destroy(finding.hsm_label)
            else:
                await self._signer.destroy_private(finding.hsm_label)
                if finding.kid:
                    # So the schedule and the next report know it is gone.
                    await self._store.keys.mark_private_destroyed(
                        finding.kid, now=utc(self._clock.now()))
        except FedtokenError as exc:
            await self._audit.record(replace(event, outcome="error", reason=exc.reason.value))
            return finding
        await self._audit.record(event)
        return replace(finding, destroyed=True)

    async def _still_destroyable(self, finding: HsmFinding) -> bool:
        """Re-check against the store now: an orphan must still have no
        record, and a NOT_SIGNING key must still be unable to sign."""
        record = await self._store.keys.get(finding.kid) if finding.kid else None
        if finding.problem is ObjectProblem.NO_RECORD:
            return record is None or (record.hsm_label != finding.hsm_label
                                      and not await self._may_sign(record))
        return record is not None and not await self._may_sign(record)

    async def _may_sign(self, record: KeyRecord) -> bool:
        return may_sign(record, await self._store.keys.list(record.tenant))


def _tenant_not_found(tenant: str) -> TenantNotFound:
    return TenantNotFound(f"tenant {tenant!r} not found; list them with "
                          "`fedtoken tenants list`", tenant=tenant)
