"""Key administration: tenants, the key lifecycle, and reading the audit trail.

Called by the KeyAdmin RPCs, by first-start bootstrap and by the emergency
path of Revoke (a compromised signing key gets a replacement); a future
rotation scheduler calls the same methods. Every change is audited durably
before the call returns, and the catalog is reloaded so the caller reads its
own write.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from fedtoken.core.audit import AuditEvent, AuditRecord, ChainReport
from fedtoken.core.authz import Ask, Role
from fedtoken.core.errors import (
    ErrorReason,
    FailedPrecondition,
    InvalidKeyTransition,
    InvalidRequest,
    KeyNotFound,
    TenantExists,
)
from fedtoken.core.keys import check_transition
from fedtoken.core.model import KeyRecord, KeyState, Tenant, TenantPolicy
from fedtoken.core.policy import (
    MAX_EVENT_TYPE,
    MAX_SUBJECT,
    check_issuer_url,
    check_key_size,
    check_kid,
    check_tenant_id,
    check_tenant_policy,
    check_text,
    check_timestamp,
)
from fedtoken.core.ports import AuditSink, Authorizer, CallContext, Clock, Signer, Store, utc
from fedtoken.core.rotation import DEFAULT_ROTATION_PERIOD, Schedule, Timings, plan
from fedtoken.service.catalog import Catalog
from fedtoken.service.types import AuditQuery, NewTenant, TenantUpdate

MAX_AUDIT_PAGE = 1000


@dataclass(frozen=True, slots=True)
class TenantDefaults:
    """What a CreateTenant request leaves out."""

    issuer_for: Callable[[str], str]
    key_size: int = 2048
    # A RETIRING key stays published this long past the tenant's maximum
    # token lifetime (JWKS max-age plus leeway), so caches keep it while any
    # token it signed can still be valid.
    grace_margin_seconds: int = 0
    # What each tenant's rotation schedule is derived with (core.rotation).
    timings: Timings = field(default_factory=Timings)


class PolicyWriter(Protocol):
    """Where a tenant's policy changes (``store.tenants.update_policy``)."""

    async def update_policy(self, tenant_id: str, policy: TenantPolicy) -> Tenant: ...


class PrivateDestroyer(Protocol):
    """Records a private half destroyed (``store.keys.mark_private_destroyed``)."""

    async def mark_private_destroyed(self, kid: str, *, now: datetime) -> KeyRecord: ...


@dataclass(frozen=True, slots=True)
class TenantTiming:
    """A tenant's derived rotation timings and its next scheduled step."""

    schedule: Schedule
    next_step_at: int = 0
    next_step: str = ""


class KeyAdmin:
    def __init__(self, *, catalog: Catalog, store: Store, signer: Signer, audit: AuditSink,
                 clock: Clock, defaults: TenantDefaults, authz: Authorizer,
                 policies: PolicyWriter | None = None,
                 marks: PrivateDestroyer | None = None) -> None:
        self._catalog = catalog
        self._store = store
        self._signer = signer
        self._audit = audit
        self._clock = clock
        self._defaults = defaults
        self._authz = authz
        # Not part of the Store port (which nothing else needs them through):
        # the adapters are injected by fedtoken.app. Without them, UpdateTenant
        # is refused and an emergency rotation leaves the old private half to
        # the scheduler.
        self._policies = policies
        self._marks = marks

    # -- tenants -----------------------------------------------------------------

    def tenant_from_request(self, req: NewTenant) -> Tenant:
        """Apply the documented defaults to a CreateTenant request."""
        d = TenantPolicy()
        max_lifetime = req.max_token_lifetime_seconds or d.max_token_lifetime_seconds
        return Tenant(
            id=req.id,
            issuer=req.issuer or (self._defaults.issuer_for(req.id) if req.id else ""),
            policy=TenantPolicy(
                max_token_lifetime_seconds=max_lifetime,
                default_token_lifetime_seconds=req.default_token_lifetime_seconds
                or min(d.default_token_lifetime_seconds, max_lifetime),
                allowed_algorithms=tuple(req.allowed_algorithms) or d.allowed_algorithms,
                key_size=req.key_size or self._defaults.key_size,
                rotation_period_seconds=req.rotation_period_seconds or DEFAULT_ROTATION_PERIOD,
            ),
        )

    async def create_tenant(self, req: NewTenant, ctx: CallContext) -> Tenant:
        await self._authz.require(ctx, Ask(Role.ADMIN))
        return await self.add_tenant(self.tenant_from_request(req), ctx,
                                     generate_key=req.generate_key)

    async def add_tenant(self, tenant: Tenant, ctx: CallContext, *,
                         generate_key: bool = False) -> Tenant:
        """Create ``tenant`` (already authorized: bootstrap and create_tenant)."""
        check_tenant_id(tenant.id)
        check_issuer_url(tenant.issuer)
        check_tenant_policy(tenant.policy)
        self.check_schedule(tenant.policy)
        try:
            created = await self._store.tenants.create(tenant, now=utc(self._clock.now()))
        except TenantExists as exc:
            exc.tenant = tenant.id
            raise
        await self._audit.record(AuditEvent(
            event_type="tenant.created", tenant=created.id, actor=ctx.actor, outcome="ok",
            request_id=ctx.request_id, details={"issuer": created.issuer, **ctx.untrusted},
        ))
        await self._catalog.reload()
        if generate_key:
            await self._generate(created.id, 0, True, ctx)
        return created

    async def get_tenant(self, tenant_id: str, ctx: CallContext) -> Tenant:
        return await self._admin_of(tenant_id, ctx)

    def check_schedule(self, policy: TenantPolicy) -> Schedule:
        """The policy's rotation schedule; PolicyViolation (naming the
        numbers) when a cache could miss a key or a token outlive its key's
        publication."""
        return self._defaults.timings.check(policy.rotation_period_seconds,
                                            policy.max_token_lifetime_seconds)

    def timing(self, tenant: Tenant) -> TenantTiming:
        """The derived timings and the next step, from this replica's
        snapshot (for GetTenant, ListTenants and the CLI)."""
        p = tenant.policy
        sched = self._defaults.timings.of(p.rotation_period_seconds,
                                          p.max_token_lifetime_seconds)
        upcoming = plan(sched, self._catalog.keys_of(tenant.id), int(self._clock.now())).upcoming
        if upcoming is None:
            return TenantTiming(sched)
        return TenantTiming(sched, upcoming.at, upcoming.kind.value)

    async def update_tenant(self, req: TenantUpdate, ctx: CallContext) -> Tenant:
        """Change a tenant's rotation period and token lifetimes (0: keep).

        The new schedule applies from the next plan on: a shorter period
        rotates sooner; a longer token lifetime is refused unless the grace
        of the (new) schedule covers it."""
        tenant = await self._admin_of(req.id, ctx)
        if self._policies is None:
            raise FailedPrecondition("tenant updates are not available in this process",
                                     tenant=tenant.id)
        for name in ("rotation_period_seconds", "max_token_lifetime_seconds",
                     "default_token_lifetime_seconds"):
            if getattr(req, name) < 0:
                raise InvalidRequest(f"{name} must not be negative", field=name,
                                     tenant=tenant.id)
        old = tenant.policy
        max_lifetime = req.max_token_lifetime_seconds or old.max_token_lifetime_seconds
        # Lowering the lifetime: tokens already issued under the old one live
        # on, and so must the keys that signed them (in the JWKS).
        expire_by = old.earlier_tokens_expire_by
        if max_lifetime < old.max_token_lifetime_seconds:
            expire_by = max(expire_by, int(self._clock.now()) + old.max_token_lifetime_seconds
                            + self._defaults.timings.leeway)
        policy = dataclasses.replace(
            old, earlier_tokens_expire_by=expire_by,
            rotation_period_seconds=req.rotation_period_seconds or old.rotation_period_seconds,
            max_token_lifetime_seconds=max_lifetime,
            default_token_lifetime_seconds=req.default_token_lifetime_seconds
            or min(old.default_token_lifetime_seconds, max_lifetime),
        )
        try:
            check_tenant_policy(policy)
            sched = self.check_schedule(policy)
        except InvalidRequest as exc:
            exc.tenant = tenant.id
            raise
        updated = await self._policies.update_policy(tenant.id, policy)
        await self._audit.record(AuditEvent(
            event_type="tenant.updated", tenant=tenant.id, actor=ctx.actor, outcome="ok",
            request_id=ctx.request_id, details={
                "rotation_period_s": policy.rotation_period_seconds,
                "max_token_lifetime_s": policy.max_token_lifetime_seconds,
                "default_token_lifetime_s": policy.default_token_lifetime_seconds,
                "prepublish_s": sched.prepublish, "grace_s": sched.grace,
                "jwks_max_age_s": sched.jwks_max_age, **ctx.untrusted}))
        await self._catalog.reload()
        return updated

    async def rotate_now(self, tenant_id: str, reason: str, ctx: CallContext) -> KeyRecord:
        """Emergency rotation: a new key generated and activated at once, the
        old one RETIRING (still published for its grace) with its private
        half destroyed. Caches that have not seen the new key yet refetch on
        its unknown kid; every step is audited with ``"emergency": true``."""
        tenant = await self._admin_of(tenant_id, ctx)
        check_text(reason, "reason", 1024)
        previous = [k for k in self._catalog.keys_of(tenant.id) if k.state is KeyState.ACTIVE]
        extra = {"emergency": True, **({"reason": reason} if reason else {})}
        record = await self._generate(tenant.id, 0, True, ctx, extra=extra)
        if self._marks is not None:
            for old in previous:
                current = await self._store.keys.get(old.kid)
                if current is None or current.state is not KeyState.RETIRING:
                    continue
                await self._signer.destroy_private(old.hsm_label)
                marked = await self._marks.mark_private_destroyed(
                    old.kid, now=utc(self._clock.now()))
                await self._audit.record(_key_event("key.private_destroyed", marked, ctx,
                                                    extra))
        return record

    async def list_tenants(self, ctx: CallContext) -> list[Tenant]:
        await self._authz.require(ctx, Ask(Role.ADMIN))
        # Read through: an operator listing tenants expects every replica's.
        await self._catalog.reload()
        return self._catalog.tenants()

    # -- keys --------------------------------------------------------------------

    async def generate_key(self, tenant_id: str, key_size: int, activate: bool,
                           ctx: CallContext) -> KeyRecord:
        tenant = await self._admin_of(tenant_id, ctx)
        return await self._generate(tenant.id, key_size, activate, ctx)

    async def replace_key(self, tenant_id: str, ctx: CallContext) -> KeyRecord:
        """A new active key at once (after a compromise, or on first start);
        the caller was authorized for what led here."""
        return await self._generate(tenant_id, 0, True, ctx)

    async def _generate(self, tenant_id: str, key_size: int, activate: bool,
                        ctx: CallContext, *, extra: dict[str, object] | None = None
                        ) -> KeyRecord:
        tenant = await self._catalog.tenant(tenant_id)
        try:
            bits = check_key_size(key_size or tenant.policy.key_size)
        except InvalidRequest as exc:
            exc.tenant = tenant.id
            raise
        generated = await self._signer.generate(tenant.id, bits)
        now = self._clock.now()
        record = KeyRecord(
            kid=generated.kid, tenant=tenant.id, alg=generated.alg, key_size=bits,
            state=KeyState.PENDING, public_jwk=generated.public_jwk,
            hsm_label=generated.hsm_label, created_at=int(now),
        )
        try:
            await self._store.keys.insert(record)
        except BaseException:
            # Never leave a private key in the HSM that no record accounts for.
            with contextlib.suppress(Exception):
                await self._signer.destroy(generated.hsm_label)
            raise
        await self._audit.record(AuditEvent(
            event_type="key.generated", tenant=tenant.id, actor=ctx.actor, kid=record.kid,
            outcome="ok", request_id=ctx.request_id,
            details={"key_size": bits, "hsm_label": record.hsm_label, **(extra or {}),
                     **ctx.untrusted},
        ))
        if activate:
            before = {k.kid for k in await self._store.keys.list(tenant.id)
                      if k.state is KeyState.ACTIVE}
            record = await self._store.keys.activate(tenant.id, record.kid, now=utc(now))
            await self._audit.record(_key_event("key.activated", record, ctx, extra))
            for kid in before:
                retiring = await self._store.keys.get(kid)
                if retiring is not None:
                    await self._audit.record(_key_event("key.retiring", retiring, ctx, extra))
        await self._catalog.reload()
        return record

    async def list_keys(self, tenant_id: str, ctx: CallContext) -> list[KeyRecord]:
        tenant = await self._admin_of(tenant_id, ctx)
        return await self._store.keys.list(tenant.id)

    async def own_key(self, tenant_id: str, kid: str) -> KeyRecord:
        """The key ``kid`` of the tenant; KeyNotFound for anyone else's."""
        check_kid(kid)
        tenant = await self._catalog.tenant(tenant_id)
        key = await self._store.keys.get(kid) if kid else None
        if key is None or key.tenant != tenant.id:
            raise KeyNotFound(f"key not found for tenant {tenant.id!r}", tenant=tenant.id,
                              kid=kid if len(kid) <= 128 else "")
        return key

    async def activate_key(self, tenant_id: str, kid: str, ctx: CallContext) -> KeyRecord:
        await self._admin_of(tenant_id, ctx)
        key = await self.own_key(tenant_id, kid)
        check_transition(key.state, KeyState.ACTIVE)
        record = await self._store.keys.activate(key.tenant, kid, now=utc(self._clock.now()))
        await self._audit.record(_key_event("key.activated", record, ctx))
        await self._catalog.reload()
        return record

    async def retire_key(self, tenant_id: str, kid: str, ctx: CallContext, *,
                         emergency: bool = False) -> KeyRecord:
        """PENDING → RETIRING; RETIRING → RETIRED once its grace is over (the
        tenant's maximum token lifetime plus the margin since it stopped
        signing), or before that only with ``emergency``, audited as such."""
        await self._admin_of(tenant_id, ctx)
        key = await self.own_key(tenant_id, kid)
        if key.state is KeyState.ACTIVE:
            raise InvalidKeyTransition(
                "the active key cannot be retired directly: generate a key and activate it "
                "(the current one then becomes RETIRING)", tenant=key.tenant, kid=kid,
            )
        target = KeyState.RETIRING if key.state is KeyState.PENDING else KeyState.RETIRED
        check_transition(key.state, target)
        now = self._clock.now()
        early = False
        if target is KeyState.RETIRED:
            tenant = await self._catalog.tenant(key.tenant)
            p = tenant.policy
            sched = self._defaults.timings.for_policy(p)
            # The longer of the schedule's grace and the configured margin:
            # never unpublish sooner than either promised.
            grace_end = max(sched.unpublish_at(key.retiring_at), key.retiring_at
                            + p.max_token_lifetime_seconds + self._defaults.grace_margin_seconds)
            early = now < grace_end
            if early and not emergency:
                raise FailedPrecondition(
                    f"key is within its grace until {int(grace_end)} (Unix seconds): tokens it "
                    "signed may still be valid; retire it then, or pass emergency to invalidate "
                    "them now", reason=ErrorReason.GRACE_NOT_OVER, tenant=key.tenant, kid=kid)
        record = await self._store.keys.set_state(kid, target, expected=[key.state],
                                                  now=utc(now))
        event = _key_event("key.retired" if target is KeyState.RETIRED else "key.retiring",
                           record, ctx)
        if early:
            event = dataclasses.replace(event, details={**(event.details or {}),
                                                        "emergency": True})
        await self._audit.record(event)
        await self._catalog.reload()
        return record

    # -- audit trail -----------------------------------------------------------------

    async def _admin_of(self, tenant_id: str, ctx: CallContext) -> Tenant:
        """The named tenant, once the caller is shown to administer it."""
        tenant = await self._catalog.tenant(tenant_id)
        await self._authz.require(ctx, Ask(Role.ADMIN, tenant.id))
        return tenant

    async def list_audit(self, q: AuditQuery, ctx: CallContext) -> list[AuditRecord]:
        if not 0 <= q.page_size <= MAX_AUDIT_PAGE:
            raise InvalidRequest(f"page_size must be 0..{MAX_AUDIT_PAGE}", field="page_size")
        if q.after_seq < 0:
            raise InvalidRequest("after_seq must not be negative", field="after_seq")
        check_timestamp(q.since, "since")
        check_timestamp(q.until, "until")
        check_text(q.tenant, "tenant", 63)
        check_text(q.event_type, "event_type", MAX_EVENT_TYPE)
        check_text(q.subject, "subject", MAX_SUBJECT)
        # An auditor of some tenants reads only their events (name one).
        await self._authz.require(ctx, Ask(Role.AUDITOR, q.tenant))
        return await self._store.audit.list(
            tenant=q.tenant or None,
            event_type=q.event_type or None,
            subject=q.subject or None,
            since=utc(q.since) if q.since else None,
            until=utc(q.until) if q.until else None,
            after_seq=q.after_seq,
            limit=q.page_size or 100,
        )

    async def verify_audit_chain(self, ctx: CallContext) -> ChainReport:
        await self._authz.require(ctx, Ask(Role.AUDITOR))
        return await self._store.audit.verify_chain()


def _key_event(event_type: str, key: KeyRecord, ctx: CallContext,
               extra: dict[str, object] | None = None) -> AuditEvent:
    return AuditEvent(
        event_type=event_type, tenant=key.tenant, actor=ctx.actor, kid=key.kid, outcome="ok",
        request_id=ctx.request_id,
        details={"state": key.state.value, **(extra or {}), **ctx.untrusted},
    )
