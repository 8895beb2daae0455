"""Verification use cases: Verify and VerifyBatch.

Neither touches the store or the HSM: the engine checks against the
in-memory key table and revocation view, and the outcomes are handed to the
audit sink, which queues them off the request path (it waits only when its
bounded queue is full, so a stalled audit trail slows callers down instead
of losing records).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Final

from fedtoken.core.authz import Ask, Role
from fedtoken.core.errors import ErrorReason, InvalidRequest
from fedtoken.core.model import Expectation, Reason, Verdict, WireBatch
from fedtoken.core.policy import MAX_AUDIENCE, MAX_ISSUER_URL, check_text
from fedtoken.core.ports import AuditSink, Authorizer, CallContext, TrustedKeys, Verifier
from fedtoken.ops import metrics
from fedtoken.service.catalog import Catalog
from fedtoken.service.tokens import require_token
from fedtoken.service.types import KeySet

# At most this many distinct unknown (issuer, kid) pairs of one call wait for
# a refetch; the others answer UNKNOWN_KEY at once (a batch of random kids
# must not turn into thousands of waits; the cache bounds the fetches anyway).
MAX_KID_WAITS_PER_CALL: Final = 16
# Longest request id or actor the pipeline's audit entries carry unchanged
# (fedtoken.audit.rows.MAX_ITEM_CHARS).
MAX_AUDIT_TEXT: Final = 1024


class Verification:
    def __init__(self, *, engine: Verifier, audit: AuditSink, max_batch: int,
                 authz: Authorizer, catalog: Catalog, trusted: TrustedKeys | None = None,
                 kid_wait_seconds: float = 1.0) -> None:
        self._engine = engine
        self._audit = audit
        self._max_batch = max_batch
        self._authz = authz
        self._catalog = catalog
        self._trusted = trusted
        self._kid_wait = kid_wait_seconds

    async def _refetched(self, tokens: Sequence[str], verdicts: list[Verdict],
                         expect: Expectation) -> list[Verdict]:
        """A foreign token whose kid the cache does not know yet: wait (bounded,
        one fetch per issuer, as the cache allows) for the issuer's key set to
        be fetched again, then verify those tokens again. The issuer may have
        just rotated; a kid it does not publish still answers UNKNOWN_KEY."""
        if self._trusted is None:
            return verdicts
        missing = [i for i, v in enumerate(verdicts)
                   if v.foreign and v.reason is Reason.UNKNOWN_KEY and v.issuer and v.kid]
        if not missing:
            return verdicts
        pairs = list(dict.fromkeys((verdicts[i].issuer, verdicts[i].kid) for i in missing))
        waits = pairs[:MAX_KID_WAITS_PER_CALL]
        found = await asyncio.gather(
            *(self._trusted.await_kid(iss, kid, self._kid_wait) for iss, kid in waits))
        known = {pair for pair, ok in zip(waits, found, strict=True) if ok}
        again = [i for i in missing if (verdicts[i].issuer, verdicts[i].kid) in known]
        if not again:
            return verdicts
        redone = await self._engine.verify_batch([tokens[i] for i in again], expect)
        out = list(verdicts)
        for i, verdict in zip(again, redone, strict=True):
            out[i] = verdict
        return out

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

    async def check(self, token: str, expect: Expectation) -> Verdict:
        """The engine's verdict on one token, after the bounded refetch an
        unknown foreign kid gets; no authorization and no audit (Verify and
        Exchange do their own)."""
        verdict = self._engine.verify(token, expect)
        if verdict.foreign and verdict.reason is Reason.UNKNOWN_KEY:
            (verdict,) = await self._refetched((token,), [verdict], expect)
        return verdict

    async def verify(self, token: str, expect: Expectation, ctx: CallContext) -> Verdict:
        require_token(token)
        _require_audience(expect)
        allowed = await self._scope(expect, ctx)
        verdict = await self.check(token, expect)
        if allowed is not None:
            verdict = _scoped(verdict, allowed)
        await self._audit.record_verifications(expect.tenant, ctx.actor, ctx.request_id,
                                               (verdict,))
        metrics.observe_verdicts((verdict,))
        return verdict

    async def verify_batch(self, tokens: Sequence[str], expect: Expectation,
                           ctx: CallContext) -> list[Verdict]:
        self._require_batch(tokens, expect)
        allowed = await self._scope(expect, ctx)
        return await self._verify_batch(tokens, expect, ctx, allowed)

    def _require_batch(self, tokens: Sequence[str], expect: Expectation) -> None:
        if len(tokens) > self._max_batch:
            raise InvalidRequest(
                f"batch of {len(tokens)} exceeds the limit of {self._max_batch}",
                reason=ErrorReason.BATCH_TOO_LARGE,
                field="tokens",
            )
        _require_audience(expect)

    async def verify_batch_wire(self, tokens: Sequence[str], expect: Expectation,
                                ctx: CallContext, reason_numbers: Mapping[Reason, int]
                                ) -> WireBatch:
        """VerifyBatch for the wire: what ``verify_batch`` decides, with the
        tokens the engine's native pipeline decided already serialized (and
        their audit entries already written) and the others as verdicts;
        every token is in exactly one of the two. The same authorization,
        scoping and audit as ``verify_batch``."""
        self._require_batch(tokens, expect)
        allowed = await self._scope(expect, ctx)
        pipeline = getattr(self._engine, "verify_batch_wire", None)
        request_id = ctx.request_id
        wire: WireBatch | None = None
        if pipeline is not None and _plain(request_id) and _plain(ctx.actor):
            wire = await pipeline(tokens, expect, allowed=allowed, reason_numbers=reason_numbers,
                                  request_id=request_id, at=round(time.time(), 3))
        if wire is None:
            verdicts = await self._verify_batch(tokens, expect, ctx, allowed)
            return WireBatch(b"", list(range(len(tokens))), [0] * len(tokens), verdicts, [])
        if wire.rest:
            verdicts = await self._refetched([tokens[i] for i in wire.rest], wire.verdicts,
                                             expect)
            if allowed is not None:
                verdicts = [_scoped(v, allowed) for v in verdicts]
            wire.verdicts = verdicts
        # Entries first: they are the larger part, and each call below
        # waits only for queue room.
        await self._audit.record_entries(ctx.actor, wire.audit)
        await self._audit.record_verifications(expect.tenant, ctx.actor, request_id,
                                               wire.verdicts)
        # Per batch: one Counter over each tenant group's reason column.
        metrics.observe_wire_audit(wire.audit)
        metrics.observe_verdicts(wire.verdicts)
        return wire

    async def _verify_batch(self, tokens: Sequence[str], expect: Expectation,
                            ctx: CallContext, allowed: frozenset[str] | None) -> list[Verdict]:
        verdicts = await self._refetched(
            tokens, await self._engine.verify_batch(tokens, expect), expect)
        if allowed is not None:
            verdicts = [_scoped(v, allowed) for v in verdicts]
        await self._audit.record_verifications(expect.tenant, ctx.actor, ctx.request_id,
                                               verdicts)
        metrics.observe_verdicts(verdicts)
        return verdicts


def _scoped(verdict: Verdict, allowed: frozenset[str]) -> Verdict:
    if verdict.tenant in allowed or not verdict.valid:
        return verdict
    return Verdict(False, Reason.TENANT_MISMATCH, tenant=verdict.tenant, issuer=verdict.issuer,
                   kid=verdict.kid, foreign=verdict.foreign)


def _plain(text: str) -> bool:
    """Whether an audit entry may carry ``text`` as it is (what
    audit.rows cleans never changes it)."""
    return len(text) <= MAX_AUDIT_TEXT and text.isascii() and "\x00" not in text


def _require_audience(expect: Expectation) -> None:
    check_text(expect.audience, "audience", MAX_AUDIENCE, required=True)
    check_text(expect.issuer, "issuer", MAX_ISSUER_URL)
    check_text(expect.tenant, "tenant", 63)
