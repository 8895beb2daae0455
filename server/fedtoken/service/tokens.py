"""Token use cases: issue, revoke (by token, jti, subject or key), introspect.

Promises kept here:
- a token is signed only through the ``Signer`` (the HSM) and returned only
  after its audit record is durable;
- a revocation is durable in the store, with its audit record, before
  Revoke returns, and is enforced by this replica at once;
- introspection is the real-time path: the revocation check asks the store
  and fails closed when it cannot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fedtoken.core import claims as claims_mod
from fedtoken.core import jose
from fedtoken.core.audit import AuditEvent
from fedtoken.core.authz import Ask, Role
from fedtoken.core.errors import (
    ErrorReason,
    FedtokenError,
    InvalidRequest,
    PolicyViolation,
    StatusClass,
    StoreUnavailable,
)
from fedtoken.core.keys import check_transition
from fedtoken.core.model import Expectation, KeyState, Reason, Tenant, foreign_ref
from fedtoken.core.policy import (
    MAX_CLIENT_ID,
    MAX_JTI,
    MAX_REASON,
    MAX_SCOPE,
    check_audiences,
    check_kid,
    check_subject,
    check_text,
    check_timestamp,
)
from fedtoken.core.ports import (
    AuditSink,
    Authorizer,
    CallContext,
    Clock,
    LocalRevocations,
    RevocationEntry,
    Signer,
    Store,
    TrustedKeys,
    Verifier,
    utc,
)
from fedtoken.ops import metrics
from fedtoken.service.catalog import Catalog
from fedtoken.service.keyadmin import KeyAdmin
from fedtoken.service.types import Introspection, Issued, IssueParams, Revoked, RevokeParams

log = logging.getLogger(__name__)

# Verdicts the engine gives only after the signature verified and the claims
# are well-typed: a token with one of these reasons can be revoked by value.
_REVOCABLE = frozenset({Reason.OK, Reason.EXPIRED, Reason.NOT_YET_VALID,
                        Reason.ISSUED_IN_FUTURE})
# Introspection reports the audience instead of checking it (RFC 7662).
_ANY_AUDIENCE = Expectation(audience="", check_audience=False)


# Subjects of exchanged tokens: "fed:" + the trusted issuer's namespace + the
# foreign sub. Local Issue refuses the prefix, so no local subject can ever
# equal a foreign one.
FOREIGN_SUBJECT_PREFIX = "fed:"
# A revocation of a foreign token cannot know how long the foreign issuer
# lets its tokens live: it lasts at least this long.
FOREIGN_REVOCATION_SECONDS = 366 * 86400


def require_token(token: str) -> None:
    if not token:
        raise InvalidRequest("token is required", field="token")




# The most tokens one IssueBatch may ask for (BATCH_TOO_LARGE above it).
MAX_ISSUE_BATCH = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class _Minting:
    """A token checked and ready to sign (``token`` is set once it is signed)."""

    tenant: Tenant
    subject: str
    audience: list[str]
    now: int
    lifetime: int
    jti: str
    hsm_label: str
    kid: str
    signing_input: bytes
    audit_details: dict[str, Any]
    token: str = ""


class Tokens:
    def __init__(
        self,
        *,
        catalog: Catalog,
        store: Store,
        signer: Signer,
        audit: AuditSink,
        introspector: Verifier,
        revocations: LocalRevocations,
        keys: KeyAdmin,
        clock: Clock,
        leeway: int,
        authz: Authorizer,
        max_token_bytes: int = 8192,
        trusted: TrustedKeys | None = None,
    ) -> None:
        """``introspector`` is a verification engine that checks everything
        but revocation (introspection asks the store for that itself)."""
        self._catalog = catalog
        self._store = store
        self._signer = signer
        self._audit = audit
        self._introspector = introspector
        self._revocations = revocations
        self._keys = keys
        self._clock = clock
        self._leeway = leeway
        self._authz = authz
        self._max_token_bytes = max_token_bytes
        self._trusted = trusted

    # -- issue -------------------------------------------------------------------

    async def issue(self, params: IssueParams, ctx: CallContext) -> Issued:
        (minting,) = await self._sign([await self._prepare_issue(params, ctx)])
        return await self._recorded(minting, ctx)

    async def issue_batch(self, items: Sequence[IssueParams], ctx: CallContext) -> list[Issued]:
        """IssueBatch: every item is validated and authorised before anything is
        signed; an invalid item fails the whole call, its field named
        ``requests[i].<field>``. The tokens are signed in one HSM call per key
        and their audit records (one ``token.issued`` each) go through one
        group commit; all are durable before the tokens are returned, in
        request order."""
        if not items:
            raise InvalidRequest("an IssueBatch needs at least one request", field="requests")
        if len(items) > MAX_ISSUE_BATCH:
            raise InvalidRequest(
                f"batch of {len(items)} exceeds the limit of {MAX_ISSUE_BATCH}; split it",
                reason=ErrorReason.BATCH_TOO_LARGE, field="requests")
        prepared: list[_Minting] = []
        for index, params in enumerate(items):
            try:
                prepared.append(await self._prepare_issue(params, ctx))
            except FedtokenError as exc:
                # Name the item in what the caller sent wrong; any other refusal
                # (authentication, grants, a missing tenant) stays as Issue's.
                if exc.status is StatusClass.INVALID_ARGUMENT:
                    exc.field = (f"requests[{index}].{exc.field}" if exc.field
                                 else f"requests[{index}]")
                raise
        signed = await self._sign(prepared)
        # One group commit: every record is queued before the first commit starts.
        return list(await asyncio.gather(*(self._recorded(m, ctx) for m in signed)))

    async def _prepare_issue(self, params: IssueParams, ctx: CallContext) -> _Minting:
        tenant = await self._catalog.tenant(params.tenant)
        subject = check_subject(params.subject)
        if subject.startswith(FOREIGN_SUBJECT_PREFIX):
            raise InvalidRequest(
                f"subjects starting with {FOREIGN_SUBJECT_PREFIX!r} are reserved for exchanged "
                "tokens of trusted issuers", reason=ErrorReason.RESERVED_CLAIM, field="subject")
        extra = claims_mod.validate_extra_claims(params.extra_claims_json)
        return await self._prepare(tenant, subject, params.audience, params.lifetime_seconds,
                                   ctx, extra=extra, scope=params.scope,
                                   client_id=params.client_id,
                                   extra_field="extra_claims_json" if params.extra_claims_json
                                   else "")

    async def mint(self, tenant: Tenant, subject: str, audience_in: Sequence[str],
                   lifetime_seconds: int, ctx: CallContext, *, extra: dict[str, Any] | None = None,
                   scope: str = "", client_id: str = "", max_lifetime: int | None = None,
                   audit_details: dict[str, Any] | None = None, extra_field: str = "") -> Issued:
        """Sign a token for ``tenant`` after the policy and grant checks
        (Issue and Exchange); durable in the audit trail before it returns.
        ``max_lifetime`` caps the lifetime below the tenant's (Exchange: the
        subject token's remaining lifetime)."""
        prepared = await self._prepare(
            tenant, subject, audience_in, lifetime_seconds, ctx, extra=extra, scope=scope,
            client_id=client_id, max_lifetime=max_lifetime, audit_details=audit_details,
            extra_field=extra_field)
        (minting,) = await self._sign([prepared])
        return await self._recorded(minting, ctx)

    async def _prepare(self, tenant: Tenant, subject: str, audience_in: Sequence[str],
                       lifetime_seconds: int, ctx: CallContext, *,
                       extra: dict[str, Any] | None = None, scope: str = "",
                       client_id: str = "", max_lifetime: int | None = None,
                       audit_details: dict[str, Any] | None = None,
                       extra_field: str = "") -> _Minting:
        """The policy and grant checks and the signing input of one token."""
        audience = check_audiences(audience_in)
        lifetime = lifetime_seconds or tenant.policy.default_token_lifetime_seconds
        if lifetime < 0:
            raise InvalidRequest("lifetime_seconds must not be negative", field="lifetime_seconds")
        if lifetime > tenant.policy.max_token_lifetime_seconds:
            raise PolicyViolation(
                f"lifetime {lifetime}s exceeds tenant {tenant.id!r} maximum of "
                f"{tenant.policy.max_token_lifetime_seconds}s",
                reason=ErrorReason.LIFETIME_EXCEEDS_POLICY,
                field="lifetime_seconds",
                tenant=tenant.id,
            )
        if max_lifetime is not None:
            lifetime = min(lifetime, max_lifetime)
        check_text(scope, "scope", MAX_SCOPE)
        check_text(client_id, "client_id", MAX_CLIENT_ID)
        await self._authz.require(ctx, Ask(Role.ISSUER, tenant.id, audience, lifetime))
        key = self._catalog.active_key(tenant)
        now = int(self._clock.now())
        jti = secrets.token_urlsafe(16)  # 128 random bits
        payload = claims_mod.build_claims(
            issuer=tenant.issuer, subject=subject, audience=audience, issued_at=now,
            lifetime=lifetime, jti=jti, extra=extra or {}, scope=scope,
            client_id=client_id,
        )
        header = {"alg": key.alg, "typ": "JWT", "kid": key.kid}
        signing_input = jose.encode_signing_input(header, payload)
        # Never hand out a token the verifiers refuse unparsed (MALFORMED).
        signature_chars = -(-4 * ((key.key_size + 7) // 8) // 3)
        if len(signing_input) + 1 + signature_chars > self._max_token_bytes:
            raise InvalidRequest(
                f"the token would exceed max_token_bytes ({self._max_token_bytes}); send "
                "fewer or shorter claims, audiences or scope", reason=ErrorReason.INVALID_CLAIMS,
                field=extra_field)
        return _Minting(tenant, subject, audience, now, lifetime, jti, key.hsm_label, key.kid,
                        signing_input, dict(audit_details or {}))

    async def _sign(self, prepared: Sequence[_Minting]) -> list[_Minting]:
        """Sign every prepared token, one signer call per key (the signer also
        batches concurrent calls for a key into one HSM call)."""
        by_key: dict[tuple[str, str], list[int]] = {}
        for index, m in enumerate(prepared):
            by_key.setdefault((m.hsm_label, m.kid), []).append(index)
        out = list(prepared)
        for (label, kid), indices in by_key.items():
            signatures = await self._signer.sign(
                label, kid, [prepared[i].signing_input for i in indices])
            for i, signature in zip(indices, signatures, strict=True):
                out[i] = dataclasses.replace(
                    prepared[i], token=jose.assemble(prepared[i].signing_input, signature))
        return out

    async def _recorded(self, m: _Minting, ctx: CallContext) -> Issued:
        """Make the token's audit record durable, then hand the token out."""
        await self._audit.record(AuditEvent(
            event_type="token.issued", tenant=m.tenant.id, actor=ctx.actor, subject=m.subject,
            jti=m.jti, kid=m.kid, outcome="ok", request_id=ctx.request_id,
            details={"aud": m.audience, "exp": m.now + m.lifetime, **m.audit_details,
                     **ctx.untrusted},
        ))
        metrics.observe_issued(m.tenant.id)
        return Issued(m.token, m.jti, m.kid, m.tenant.id, m.tenant.issuer, m.now,
                      m.now + m.lifetime)

    # -- introspect ----------------------------------------------------------------

    async def introspect(self, token: str, ctx: CallContext, *,
                         client_authenticated: bool = False) -> Introspection:
        """Real-time check: engine verdict, then revocation straight from the store.

        A gRPC caller needs the verifier role, and learns only about tokens of
        the tenants it holds it for (others are inactive). The HTTP bridge has
        authenticated its RFC 7662 client itself (``client_authenticated``).
        """
        require_token(token)
        allowed = None if client_authenticated else await self._authz.scope(ctx, Role.VERIFIER)
        verdict = self._introspector.verify(token, _ANY_AUDIENCE)
        result: Introspection
        if allowed is not None and verdict.tenant not in allowed:
            result = Introspection(False, Reason.TENANT_MISMATCH)
        elif not verdict.valid or verdict.claims is None:
            result = Introspection(False, verdict.reason, tenant=verdict.tenant, kid=verdict.kid)
        else:
            iat = verdict.claims.get("iat")
            try:
                revoked = await self._store.revocations.is_revoked(
                    verdict.tenant, verdict.jti, verdict.subject,
                    iat if isinstance(iat, int) else 0, verdict.kid,
                    now=utc(self._clock.now()),
                )
            except StoreUnavailable:
                result = Introspection(False, Reason.REVOCATION_UNAVAILABLE,
                                       tenant=verdict.tenant, kid=verdict.kid)
            else:
                result = (Introspection(False, Reason.REVOKED, tenant=verdict.tenant,
                                        kid=verdict.kid) if revoked
                          else Introspection(True, Reason.OK, verdict.claims,
                                             tenant=verdict.tenant, kid=verdict.kid))
        await self._audit.record_soon(AuditEvent(
            event_type="token.introspected", tenant=verdict.tenant, actor=ctx.actor,
            subject=verdict.subject, jti=verdict.jti, kid=verdict.kid,
            outcome="active" if result.active else "inactive", reason=result.reason.value,
            request_id=ctx.request_id,
        ))
        return result

    # -- revoke --------------------------------------------------------------------

    async def revoke(self, p: RevokeParams, ctx: CallContext) -> Revoked:
        """Revoke one token (by token or jti), a subject's tokens issued before
        a time, or every token of a compromised key. Durable and audited in
        one transaction before it returns."""
        check_text(p.reason, "reason", MAX_REASON)
        check_timestamp(p.expires_at, "expires_at")
        check_timestamp(p.issued_before, "issued_before")
        if sum(bool(x) for x in (p.token, p.jti, p.subject, p.kid)) != 1:
            raise InvalidRequest("give exactly one of token, jti, subject or kid", field="target")
        if p.issuer:
            return await self._revoke_foreign(p, ctx)
        if p.kid:
            check_kid(p.kid)
            tenant = await self._catalog.tenant(p.tenant)
            await self._authz.require(ctx, Ask(Role.REVOKER, tenant.id))
            return await self.compromise(tenant.id, p.kid, p.reason, ctx)
        now = int(self._clock.now())
        leeway = self._leeway
        not_before: int | None = None
        jti, subject = p.jti, p.subject
        if p.token:
            tenant, jti, token_exp = self._authenticate_for_revocation(p.token)
            await self._authz.require(ctx, Ask(Role.REVOKER, tenant.id))
            if token_exp <= now - leeway:
                # An expired token is already rejected everywhere: nothing to store.
                return Revoked(tenant.id, jti, now, False, "jti", jti)
            kind, value, expires_at = "jti", jti, token_exp
        elif jti:
            check_text(jti, "jti", MAX_JTI)
            tenant = await self._catalog.tenant(p.tenant)
            kind, value = "jti", jti
            # The token itself is not at hand, so its exp is unknown: the
            # revocation lasts as long as any token the tenant can issue now
            # may live. A caller's expires_at can never shorten that (a
            # revocation that ended before its token could expire would
            # silently un-revoke it), and a later one is pointless.
            expires_at = now + tenant.policy.max_token_lifetime_seconds
            await self._authz.require(ctx, Ask(Role.REVOKER, tenant.id))
        else:
            check_subject(subject, required=False)
            tenant = await self._catalog.tenant(p.tenant)
            # Tokens carry whole-second iat: the default cut is the next
            # second, so a token issued in this very second is caught too.
            not_before = p.issued_before or now + 1
            if not_before > now + max(leeway, 1) or not_before < 0:
                raise InvalidRequest("issued_before must not be in the future",
                                     field="issued_before")
            kind, value = "subject", subject
            # Every token issued before the cut has expired by then.
            expires_at = not_before + tenant.policy.max_token_lifetime_seconds
            await self._authz.require(ctx, Ask(Role.REVOKER, tenant.id))
        return await self._record_revocation(
            tenant, kind, value, jti=jti, subject=subject, expires_at=expires_at + leeway,
            not_before=not_before, now=now, reason=p.reason, ctx=ctx)

    async def _record_revocation(self, tenant: Tenant, kind: str, value: str, *, jti: str,
                                 subject: str, expires_at: int, not_before: int | None,
                                 now: int, reason: str, ctx: CallContext,
                                 details: dict[str, Any] | None = None) -> Revoked:
        """Store the revocation and its audit record in one transaction, then
        enforce it here at once (other replicas learn it by notification)."""
        event = AuditEvent(
            event_type="token.revoked", tenant=tenant.id, actor=ctx.actor, subject=subject,
            jti=jti, outcome="ok", reason=reason, request_id=ctx.request_id,
            details={"kind": kind, "expires_at": expires_at, **(details or {}),
                     **ctx.untrusted,
                     **({"issued_before": not_before} if not_before is not None else {})},
        )

        async def write(audit: AuditEvent | None) -> tuple[bool, datetime]:
            return await self._store.revocations.revoke(
                tenant.id, kind, value, expires_at=utc(expires_at), now=utc(now),
                not_before=utc(not_before) if not_before is not None else None,
                reason=reason, actor=ctx.actor, audit=audit,
            )

        created, revoked_at = await self._audit.record_with(event, write)
        self._revocations.add(RevocationEntry(tenant.id, kind, value, expires_at,
                                              not_before or 0))
        return Revoked(tenant.id, jti, int(revoked_at.timestamp()), created, kind, value)

    async def compromise(self, tenant_id: str, kid: str, reason: str,
                         ctx: CallContext) -> Revoked:
        """Emergency revocation: the key leaves the JWKS and every token it
        signed is rejected. If it was the signing key, a replacement is
        generated and activated at once so issuance continues."""
        key = await self._keys.own_key(tenant_id, kid)
        tenant = await self._catalog.tenant(key.tenant)
        check_transition(key.state, KeyState.COMPROMISED)
        now = int(self._clock.now())
        # Its tokens are all expired after one maximum lifetime; the key
        # itself stays COMPROMISED for good.
        expires_at = now + tenant.policy.max_token_lifetime_seconds + self._leeway
        event = AuditEvent(
            event_type="key.compromised", tenant=tenant.id, actor=ctx.actor, kid=kid,
            outcome="ok", reason=reason, request_id=ctx.request_id,
            details={"previous_state": key.state.value, "expires_at": expires_at,
                     **ctx.untrusted},
        )

        async def write(audit: AuditEvent | None) -> tuple[bool, datetime]:
            async with self._store.transaction() as tx:
                await tx.keys.set_state(kid, KeyState.COMPROMISED, expected=[key.state],
                                        now=utc(now))
                return await tx.revocations.revoke(
                    tenant.id, "key", kid, expires_at=utc(expires_at), now=utc(now),
                    reason=reason, actor=ctx.actor, audit=audit,
                )

        created, revoked_at = await self._audit.record_with(event, write)
        self._revocations.add(RevocationEntry(tenant.id, "key", kid, expires_at))
        await self._catalog.reload()
        if key.state is KeyState.ACTIVE:
            log.warning("active key %s of tenant %s compromised; activating a replacement",
                        kid, tenant.id)
            await self._keys.replace_key(tenant.id, ctx)
        return Revoked(tenant.id, "", int(revoked_at.timestamp()), created, "key", kid)

    async def _revoke_foreign(self, p: RevokeParams, ctx: CallContext) -> Revoked:
        """Revoke a trusted foreign issuer's jti or subject in a tenant that
        trusts it (stored under foreign_ref values, so it never touches a
        local token)."""
        check_text(p.issuer, "issuer", 2048, required=True)
        if not (p.jti or p.subject):
            raise InvalidRequest("with issuer, give jti or subject", field="target")
        tenant = await self._catalog.tenant(p.tenant)
        await self._authz.require(ctx, Ask(Role.REVOKER, tenant.id))
        keys = self._trusted.issuer_keys(p.issuer) if self._trusted is not None else None
        if keys is None or tenant.id not in keys.trusted_by:
            raise InvalidRequest(
                f"tenant {tenant.id!r} does not trust issuer {p.issuer[:200]!r}",
                reason=ErrorReason.ISSUER_NOT_TRUSTED, field="issuer")
        now = int(self._clock.now())
        not_before: int | None = None
        lasts = max(tenant.policy.max_token_lifetime_seconds, FOREIGN_REVOCATION_SECONDS)
        if p.jti:
            check_text(p.jti, "jti", MAX_JTI)
            kind, value, expires_at = "jti", foreign_ref(p.issuer, p.jti), now + lasts
        else:
            check_subject(p.subject)
            not_before = p.issued_before or now + 1
            if not_before > now + max(self._leeway, 1) or not_before < 0:
                raise InvalidRequest("issued_before must not be in the future",
                                     field="issued_before")
            kind, value = "subject", foreign_ref(p.issuer, p.subject)
            expires_at = not_before + lasts
        return await self._record_revocation(
            tenant, kind, value, jti=p.jti, subject=p.subject,
            expires_at=expires_at + self._leeway, not_before=not_before, now=now,
            reason=p.reason, ctx=ctx, details={"foreign_issuer": p.issuer})

    def _authenticate_for_revocation(self, token: str) -> tuple[Tenant, str, int]:
        """The token must be ours and genuinely signed; its exp and jti are read.

        The introspection engine does the checking (one verification pipeline,
        not a second copy): a verdict whose reason is only reached after the
        signature verified proves the token authentic, even if it is expired
        or not yet valid.
        """
        require_token(token)
        verdict = self._introspector.verify(token, _ANY_AUDIENCE)
        tenant = self._catalog.find(verdict.tenant) if verdict.tenant else None
        if verdict.reason not in _REVOCABLE or tenant is None or not verdict.jti:
            raise InvalidRequest("token is not a well-formed, genuinely signed token of ours",
                                 reason=ErrorReason.INVALID_TOKEN, field="token")
        return tenant, verdict.jti, verdict.expires_at

