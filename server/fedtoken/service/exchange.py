"""Token exchange (RFC 8693 semantics): a valid token of a trusted foreign
issuer becomes a short-lived token of a local tenant that trusts it.

The subject token is verified by the same engine as every token, in the
context of the requested tenant and addressed (aud) to that tenant's issuer
URL; a foreign kid we do not know yet gets the bounded refetch Verify gets
(``Verification.check``).
The new token is normalised, never a copy:

- ``sub`` is ``"fed:" + namespace + foreign sub`` (``namespace``: the trusted
  issuer's, unique per issuer; local Issue refuses the ``fed:`` prefix), so a
  foreign subject can never collide with a local one or another issuer's;
- no foreign claim is copied (there is no claim mapping yet: a mapping would
  be the only way in);
- ``origin`` = ``{"iss", "sub", "jti"}`` of the subject token records where it
  came from, in the token and in the ``token.issued`` audit event;
- its lifetime never exceeds the subject token's remaining lifetime nor the
  tenant's policy, and the caller needs the issuer role for the tenant with
  the audiences and lifetime it asks for, as for Issue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from fedtoken.core.authz import Ask, Role
from fedtoken.core.errors import ErrorReason, InvalidRequest
from fedtoken.core.model import Expectation, Verdict
from fedtoken.core.ports import Authorizer, CallContext, Clock
from fedtoken.core.trust import TrustedIssuer
from fedtoken.service.catalog import Catalog
from fedtoken.service.tokens import FOREIGN_SUBJECT_PREFIX, Tokens, require_token
from fedtoken.service.types import Exchanged, ExchangeParams
from fedtoken.service.verification import Verification

JWT_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
_SUBJECT_TOKEN_TYPES: Final = frozenset({"", JWT_TOKEN_TYPE, ACCESS_TOKEN_TYPE})


class Exchange:
    def __init__(self, *, tokens: Tokens, verification: Verification,
                 trust_of: Callable[[str], TrustedIssuer | None], catalog: Catalog,
                 clock: Clock, authz: Authorizer) -> None:
        self._tokens = tokens
        self._authz = authz
        self._verification = verification
        self._trust_of = trust_of
        self._catalog = catalog
        self._clock = clock

    async def exchange(self, p: ExchangeParams, ctx: CallContext) -> Exchanged:
        require_token(p.subject_token)
        if p.subject_token_type not in _SUBJECT_TOKEN_TYPES:
            raise InvalidRequest(
                f"subject_token_type must be {JWT_TOKEN_TYPE} or {ACCESS_TOKEN_TYPE}",
                reason=ErrorReason.INVALID_FIELD, field="subject_token_type")
        tenant = await self._catalog.tenant(p.tenant)
        # Before anything about the subject token is looked at: a caller that
        # may not mint for this tenant learns nothing from the answer.
        await self._authz.require(ctx, Ask(Role.ISSUER, tenant.id))
        expect = Expectation(audience=tenant.issuer, tenant=tenant.id)
        verdict = await self._verification.check(p.subject_token, expect)
        _require_foreign_and_valid(verdict)
        trust = self._trust_of(verdict.issuer)
        if trust is None or tenant.id not in trust.tenants:  # removed meanwhile
            raise InvalidRequest("the subject token's issuer is not trusted by this tenant",
                                 reason=ErrorReason.SUBJECT_TOKEN_INVALID, field="subject_token")
        remaining = verdict.expires_at - int(self._clock.now())
        if remaining <= 0:
            raise InvalidRequest("the subject token has expired",
                                 reason=ErrorReason.SUBJECT_TOKEN_INVALID, field="subject_token")
        subject = f"{FOREIGN_SUBJECT_PREFIX}{trust.namespace}{verdict.subject}"
        origin = {"iss": verdict.issuer, "sub": verdict.subject, "jti": verdict.jti}
        issued = await self._tokens.mint(
            tenant, subject, p.audience, p.lifetime_seconds, ctx, extra={"origin": origin},
            scope=p.scope, max_lifetime=remaining,
            audit_details={"exchanged_from": origin})
        return Exchanged(issued, subject)


def _require_foreign_and_valid(verdict: Verdict) -> None:
    if not verdict.valid:
        raise InvalidRequest(
            f"the subject token does not verify: {verdict.reason.value}",
            reason=ErrorReason.SUBJECT_TOKEN_INVALID, field="subject_token")
    if not verdict.foreign:
        raise InvalidRequest(
            "the subject token is one of ours: exchange takes a trusted foreign issuer's token",
            reason=ErrorReason.SUBJECT_TOKEN_INVALID, field="subject_token")
    if not verdict.subject:
        raise InvalidRequest("the subject token has no sub",
                             reason=ErrorReason.SUBJECT_TOKEN_INVALID, field="subject_token")
