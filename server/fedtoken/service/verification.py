"""Verification use cases: Verify and VerifyBatch.

Neither touches the store or the HSM: the engine checks against the
in-memory key table and revocation view, and the outcomes are handed to the
audit sink, which queues them off the request path (it waits only when its
bounded queue is full, so a stalled audit trail slows callers down instead
of losing records).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtoken.core.errors import ErrorReason, InvalidRequest
from fedtoken.core.model import Expectation, Verdict
from fedtoken.core.policy import MAX_AUDIENCE, MAX_ISSUER_URL, check_text
from fedtoken.core.ports import AuditSink, CallContext, Verifier
from fedtoken.service.tokens import require_token


class Verification:
    def __init__(self, *, engine: Verifier, audit: AuditSink, max_batch: int) -> None:
        self._engine = engine
        self._audit = audit
        self._max_batch = max_batch

    async def verify(self, token: str, expect: Expectation, ctx: CallContext) -> Verdict:
        require_token(token)
        _require_audience(expect)
        verdict = self._engine.verify(token, expect)
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
        verdicts = await self._engine.verify_batch(tokens, expect)
        await self._audit.record_verifications(expect.tenant, ctx.actor, ctx.request_id,
                                               verdicts)
        return verdicts


def _require_audience(expect: Expectation) -> None:
    check_text(expect.audience, "audience", MAX_AUDIENCE, required=True)
    check_text(expect.issuer, "issuer", MAX_ISSUER_URL)
    check_text(expect.tenant, "tenant", 63)
