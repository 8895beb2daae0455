"""Verification use cases: Verify and VerifyBatch.

Neither touches the store or the HSM: the engine checks against the
in-memory key table and revocation view, and the outcomes are handed to the
audit sink, which queues them off the request path (it waits only when its
bounded queue is full, so a stalled audit trail slows callers down instead
of losing records).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtoken.core.authz import Ask, Role
from fedtoken.core.errors import ErrorReason, InvalidRequest
from fedtoken.core.model import Expectation, Reason, Verdict
from fedtoken.core.policy import MAX_AUDIENCE, MAX_ISSUER_URL, check_text
from fedtoken.core.ports import AuditSink, Authorizer, CallContext, Verifier
from fedtoken.service.catalog import Catalog
from fedtoken.service.tokens import require_token
from fedtoken.service.types import KeySet


class Verification:
    def __init__(self, *, engine: Verifier, audit: AuditSink, max_batch: int,
                 authz: Authorizer, catalog: Catalog) -> None:
        self._engine = engine
        self._audit = audit
        self._max_batch = max_batch
        self._authz = authz
        self._catalog = catalog

    async def _scope(self, expect: Expectation, ctx: CallContext) -> frozenset[str] | None:
        """The tenants whose tokens this caller may have verified (None: any).
        A verifier of some tenants that names none has its verdicts scoped:
        a valid token of another tenant is TENANT_MISMATCH."""
        if expect.tenant:
            tenant = await self._catalog.tenant(expect.tenant)
            await self._authz.require(ctx, Ask(Role.VERIFIER, tenant.id))
            return None
        return await self._authz.scope(ctx, Role.VERIFIER)

    async def key_set(self, tenant_id: str, ctx: CallContext) -> KeySet:
        """GetKeys over gRPC (the HTTP bridge serves the same set publicly)."""
        tenant = await self._catalog.tenant(tenant_id)
        await self._authz.require(ctx, Ask(Role.VERIFIER, tenant.id))
        return await self._catalog.key_set(tenant.id)

    async def verify(self, token: str, expect: Expectation, ctx: CallContext) -> Verdict:
        require_token(token)
        _require_audience(expect)
        allowed = await self._scope(expect, ctx)
        verdict = self._engine.verify(token, expect)
        if allowed is not None:
            verdict = _scoped(verdict, allowed)
        await self._audit.record_verifications(expect.tenant, ctx.actor, ctx.request_id,
                                               (verdict,))
        return verdict

    async def verify_batch(self, tokens: Sequence[str], expect: Expectation,
                           ctx: CallContext) -> list[Verdict]:
        if len(tokens) > self._max_batch:
            raise InvalidRequest(
                f"batch of {len(tokens)} exceeds the limit of {self._max_batch}",
                reason=ErrorReason.BATCH_TOO_LARGE,
                field="tokens",
            )
        _require_audience(expect)
        allowed = await self._scope(expect, ctx)
        verdicts = await self._engine.verify_batch(tokens, expect)
        if allowed is not None:
            verdicts = [_scoped(v, allowed) for v in verdicts]
        await self._audit.record_verifications(expect.tenant, ctx.actor, ctx.request_id,
                                               verdicts)
        return verdicts


def _scoped(verdict: Verdict, allowed: frozenset[str]) -> Verdict:
    if verdict.tenant in allowed or not verdict.valid:
        return verdict
    return Verdict(False, Reason.TENANT_MISMATCH, tenant=verdict.tenant, issuer=verdict.issuer,
                   kid=verdict.kid)


def _require_audience(expect: Expectation) -> None:
    check_text(expect.audience, "audience", MAX_AUDIENCE, required=True)
    check_text(expect.issuer, "issuer", MAX_ISSUER_URL)
    check_text(expect.tenant, "tenant", 63)
