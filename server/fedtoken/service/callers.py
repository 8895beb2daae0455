"""Zero-trust callers: the policy snapshot, the authorization decision and
the administration of grants.

Every use case asks ``Callers.require`` first. The policy (every grant, plus
the bootstrap identities from the configuration) is held in memory, loaded
from the store and reloaded when the event feed reports a change (a grant or
revocation reaches every replica like a token revocation does). A denial is
PERMISSION_DENIED with a specific reason, and is itself audited.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedtoken.core.audit import AuditEvent
from fedtoken.core.authz import (
    MAX_SPIFFE_ID,
    Ask,
    Denial,
    Grant,
    Policy,
    Role,
    decide,
    is_spiffe_id,
)
from fedtoken.core.errors import ErrorReason, InvalidRequest, NotFound, PermissionDenied
from fedtoken.core.policy import MAX_AUDIENCE, MAX_AUDIENCES, check_tenant_id, check_text
from fedtoken.core.ports import AuditSink, CallContext, CallerRepository, Clock, utc
from fedtoken.service._reload import CoalescedReload

_REASON = {
    Denial.NO_IDENTITY: ErrorReason.PERMISSION_DENIED,
    Denial.NO_GRANT: ErrorReason.ROLE_NOT_GRANTED,
    Denial.TENANT_NOT_GRANTED: ErrorReason.TENANT_NOT_GRANTED,
    Denial.AUDIENCE_NOT_GRANTED: ErrorReason.AUDIENCE_NOT_GRANTED,
    Denial.LIFETIME_NOT_GRANTED: ErrorReason.LIFETIME_NOT_GRANTED,
}
MAX_GRANT_TENANTS = 256
# Memoized decisions per policy snapshot (see ``Callers._memo``); emptied at this size.
MAX_MEMO = 4096


class Callers:
    def __init__(self, *, repo: CallerRepository, audit: AuditSink, clock: Clock,
                 bootstrap: Iterable[str] = ()) -> None:
        self._repo = repo
        self._audit = audit
        self._clock = clock
        self._bootstrap = frozenset(bootstrap)
        # Bootstrap identities are the operators: every role, every tenant.
        self._policy = Policy.of(self._operator_grants(), self._bootstrap)
        # Decisions of the current snapshot only: both maps belong to
        # ``_memo_policy`` and are dropped the moment ``_policy`` is another
        # object (a reload replaces it whole; a Policy is immutable), so a
        # memoized answer is always the one ``decide`` would give now.
        self._memo_policy: Policy | None = None
        self._denials: dict[tuple[str, Role, str], Denial | None] = {}
        self._scopes: dict[tuple[str, Role], frozenset[str] | None] = {}
        self._reloader = CoalescedReload(self._load, name="callers", what="caller grants")

    def _operator_grants(self) -> list[Grant]:
        return [Grant(identity=i, role=r, granted_by="configuration")
                for i in self._bootstrap for r in Role]

    # -- the decision ------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._policy

    def _memo(self) -> Policy:
        policy = self._policy
        if policy is not self._memo_policy:
            self._denials = {}
            self._scopes = {}
            self._memo_policy = policy
        return policy

    def _decide(self, identity: str, ask: Ask) -> Denial | None:
        policy = self._memo()
        if ask.role is Role.ISSUER:  # audiences and lifetime vary per call
            return decide(policy, identity, ask)
        key = (identity, ask.role, ask.tenant)
        try:
            return self._denials[key]
        except KeyError:
            pass
        denial = decide(policy, identity, ask)
        if len(self._denials) >= MAX_MEMO:
            self._denials.clear()
        self._denials[key] = denial
        return denial

    async def require(self, ctx: CallContext, ask: Ask) -> None:
        identity = ctx.principal.identity
        denial = self._decide(identity, ask)
        if denial is None:
            return
        await self._audit.record_soon(AuditEvent(
            event_type="access.denied", tenant=ask.tenant, actor=ctx.actor, outcome="denied",
            reason=denial.value, request_id=ctx.request_id,
            details={"method": ctx.method, "role": ask.role.value, **ctx.untrusted},
        ))
        what = f"role {ask.role.value}" + (f" for tenant {ask.tenant!r}" if ask.tenant else "")
        who = identity or "an unauthenticated caller"
        raise PermissionDenied(
            f"{who} is not granted {what} ({denial.value}); an admin can grant it with "
            f"`fedtoken callers grant {identity or 'SPIFFE_ID'} --role {ask.role.value}`",
            reason=_REASON[denial], tenant=ask.tenant)

    async def scope(self, ctx: CallContext, role: Role) -> frozenset[str] | None:
        policy = self._memo()
        key = (ctx.principal.identity, role)
        try:
            allowed = self._scopes[key]
        except KeyError:
            allowed = policy.tenants_for(*key)
            if len(self._scopes) >= MAX_MEMO:
                self._scopes.clear()
            self._scopes[key] = allowed
        if allowed is not None and not allowed:
            await self.require(ctx, Ask(role))  # raises, audited
        return allowed

    # -- administration ----------------------------------------------------------

    async def grant(self, identity: str, role: str, tenants: Sequence[str],
                    audiences: Sequence[str], max_lifetime_seconds: int,
                    ctx: CallContext) -> Grant:
        await self.require(ctx, Ask(Role.ADMIN))
        _check_identity(identity)
        try:
            parsed = Role(role)
        except ValueError:
            raise InvalidRequest(f"role must be one of {[r.value for r in Role]}",
                                 field="role") from None
        if len(tenants) > MAX_GRANT_TENANTS:
            raise InvalidRequest(f"at most {MAX_GRANT_TENANTS} tenants", field="tenants")
        for t in tenants:
            check_tenant_id(t, "tenants")
        if len(audiences) > MAX_AUDIENCES:
            raise InvalidRequest(f"at most {MAX_AUDIENCES} audiences", field="audiences")
        for a in audiences:
            check_text(a, "audiences", MAX_AUDIENCE, required=True)
        if (audiences or max_lifetime_seconds) and parsed is not Role.ISSUER:
            raise InvalidRequest("audiences and max_lifetime apply to the issuer role only",
                                 field="audiences" if audiences else "max_lifetime_seconds")
        if not 0 <= max_lifetime_seconds <= 7 * 86400:
            raise InvalidRequest("max_lifetime_seconds must be 0 (the tenant's) to 604800",
                                 field="max_lifetime_seconds")
        now = self._clock.now()
        grant = await self._repo.put(Grant(
            identity=identity, role=parsed, tenants=frozenset(tenants),
            audiences=frozenset(audiences), max_lifetime_seconds=max_lifetime_seconds,
            granted_by=ctx.actor), now=utc(now))
        await self._audit.record(AuditEvent(
            event_type="caller.granted", actor=ctx.actor, subject=identity, outcome="ok",
            request_id=ctx.request_id,
            details={"role": parsed.value, "tenants": sorted(tenants),
                     "audiences": sorted(audiences), "max_lifetime_s": max_lifetime_seconds,
                     **ctx.untrusted}))
        await self.reload()
        return grant

    async def revoke(self, identity: str, role: str, ctx: CallContext) -> int:
        await self.require(ctx, Ask(Role.ADMIN))
        _check_identity(identity)
        try:
            parsed = Role(role) if role else None
        except ValueError:
            raise InvalidRequest(f"role must be one of {[r.value for r in Role]}",
                                 field="role") from None
        removed = await self._repo.remove(identity, parsed)
        if not removed:
            raise NotFound("no such grant", reason=ErrorReason.GRANT_NOT_FOUND)
        await self._audit.record(AuditEvent(
            event_type="caller.revoked", actor=ctx.actor, subject=identity, outcome="ok",
            request_id=ctx.request_id, details={"role": parsed.value if parsed else "*",
                                                "removed": removed}))
        await self.reload()
        return removed

    async def list(self, ctx: CallContext) -> list[Grant]:
        await self.require(ctx, Ask(Role.ADMIN))
        await self.reload()
        return [g for grants in self._policy.grants.values() for g in grants]

    # -- keeping the snapshot current ---------------------------------------------

    @property
    def reloads(self) -> int:
        return self._reloader.loads

    async def reload(self) -> None:
        """Coalesced like the catalog's: one load serves every request made
        before it began."""
        await self._reloader.run()

    async def _load(self) -> None:
        stored = await self._repo.list()
        self._policy = Policy.of([*self._operator_grants(), *stored], self._bootstrap)

    def notice(self, event: Mapping[str, Any]) -> None:
        """A grant changed somewhere (feed callback; never blocks)."""
        if event.get("type") == "callers":
            self._reloader.soon()

    async def close(self) -> None:
        await self._reloader.close()


def _check_identity(identity: str) -> None:
    if len(identity) > MAX_SPIFFE_ID or not is_spiffe_id(identity):
        raise InvalidRequest("identity must be a SPIFFE ID (spiffe://trust-domain/path)",
                             field="identity")
