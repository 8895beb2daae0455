"""TokenService and KeyAdmin servicers: proto in, Authority call, proto out."""

from __future__ import annotations

import json
from typing import Any

import grpc

from fedtoken.authority import Authority, Caller, IssueParams
from fedtoken.core.model import (
    Expectation,
    KeyRecord,
    KeyState,
    Reason,
    Tenant,
    TenantPolicy,
)
from fedtoken.rpc.convert import REASON_PB, verdict_pb, verify_batch_response
from fedtoken.rpc.errors import request_id_of, rpc_boundary
from fedtoken.core.audit import AuditRecord
from fedtoken_client._pb.fedtoken.v1 import (
    common_pb2,
    key_admin_pb2,
    key_admin_pb2_grpc,
    token_service_pb2,
    token_service_pb2_grpc,
)

CALLER_KEY = "x-fedtoken-caller"



_KEY_STATE: dict[KeyState, Any] = {s: common_pb2.KeyState.Value(s.value) for s in KeyState}


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """The caller's self-declared name (audit context) and its peer address."""
    declared = ""
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_KEY and isinstance(value, str):
            declared = value[:128]
    peer = context.peer() or ""
    actor = f"{declared}@{peer}" if declared else peer
    return Caller(actor=actor, request_id=request_id_of(context))


def key_pb(k: KeyRecord) -> common_pb2.Key:
    return common_pb2.Key(
        kid=k.kid,
        tenant=k.tenant,
        alg=k.alg,
        key_size=k.key_size,
        state=_KEY_STATE[k.state],
        public_jwk_json=json.dumps(k.public_jwk, separators=(",", ":"), sort_keys=True),
        created_at=k.created_at,
        activated_at=k.activated_at,
        retiring_at=k.retiring_at,
        retired_at=k.retired_at,
        compromised_at=k.compromised_at,
        hsm_label=k.hsm_label,
    )


def tenant_pb(t: Tenant) -> key_admin_pb2.Tenant:
    return key_admin_pb2.Tenant(
        id=t.id,
        issuer=t.issuer,
        max_token_lifetime_seconds=t.policy.max_token_lifetime_seconds,
        default_token_lifetime_seconds=t.policy.default_token_lifetime_seconds,
        allowed_algorithms=list(t.policy.allowed_algorithms),
        key_size=t.policy.key_size,
        created_at=t.created_at,
    )


def _expectation(request: token_service_pb2.VerifyRequest
                 | token_service_pb2.VerifyBatchRequest) -> Expectation:
    return Expectation(audience=request.audience, issuer=request.issuer, tenant=request.tenant)


class TokenServicer(token_service_pb2_grpc.TokenServiceServicer):
    def __init__(self, authority: Authority) -> None:
        self._a = authority

    @rpc_boundary
    async def Issue(self, request: token_service_pb2.IssueRequest,
                    context: grpc.aio.ServicerContext) -> token_service_pb2.IssueResponse:
        issued = await self._a.issue(
            IssueParams(
                tenant=request.tenant,
                subject=request.subject,
                audience=list(request.audience),
                lifetime_seconds=request.lifetime_seconds,
                extra_claims_json=request.extra_claims_json,
                scope=request.scope,
                client_id=request.client_id,
            ),
            caller_of(context),
        )
        return token_service_pb2.IssueResponse(
            token=issued.token, jti=issued.jti, kid=issued.kid, tenant=issued.tenant,
            issuer=issued.issuer, issued_at=issued.issued_at, expires_at=issued.expires_at,
        )

    @rpc_boundary
    async def Verify(self, request: token_service_pb2.VerifyRequest,
                     context: grpc.aio.ServicerContext) -> token_service_pb2.VerifyResponse:
        verdict = await self._a.verify(request.token, _expectation(request), caller_of(context))
        return token_service_pb2.VerifyResponse(verdict=verdict_pb(verdict))

    @rpc_boundary
    async def VerifyBatch(
        self, request: token_service_pb2.VerifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> token_service_pb2.VerifyBatchResponse:
        verdicts = await self._a.verify_batch(request.tokens, _expectation(request),
                                              caller_of(context))
        return verify_batch_response(verdicts)

    @rpc_boundary
    async def Introspect(
        self, request: token_service_pb2.IntrospectRequest, context: grpc.aio.ServicerContext
    ) -> token_service_pb2.IntrospectResponse:
        result = await self._a.introspect(request.token, caller_of(context))
        if not result.active:
            return token_service_pb2.IntrospectResponse(
                active=False, reason=REASON_PB[result.reason]
            )
        c = result.claims
        aud = c.get("aud")
        return token_service_pb2.IntrospectResponse(
            active=True,
            scope=_str(c.get("scope")),
            client_id=_str(c.get("client_id")),
            token_type="Bearer",  # noqa: S106 - RFC 7662 token_type, not a secret
            exp=_int(c.get("exp")),
            iat=_int(c.get("iat")),
            nbf=_int(c.get("nbf")),
            sub=_str(c.get("sub")),
            aud=[aud] if isinstance(aud, str) else [a for a in aud or [] if isinstance(a, str)],
            iss=_str(c.get("iss")),
            jti=_str(c.get("jti")),
            tenant=result.tenant,
            kid=result.kid,
            reason=REASON_PB[Reason.OK],
        )

    @rpc_boundary
    async def Revoke(self, request: token_service_pb2.RevokeRequest,
                     context: grpc.aio.ServicerContext) -> token_service_pb2.RevokeResponse:
        target = request.WhichOneof("target")
        revoked = await self._a.revoke(
            tenant_id=request.tenant,
            token=request.token,
            jti=request.jti,
            subject=request.subject.subject if target == "subject" else "",
            issued_before=request.subject.issued_before if target == "subject" else 0,
            kid=request.kid,
            expires_at=request.expires_at,
            reason=request.reason,
            caller=caller_of(context),
        )
        return token_service_pb2.RevokeResponse(
            tenant=revoked.tenant, jti=revoked.jti, revoked_at=revoked.revoked_at,
            created=revoked.created, kind=revoked.kind, value=revoked.value,
        )

    @rpc_boundary
    async def GetKeys(self, request: token_service_pb2.GetKeysRequest,
                      context: grpc.aio.ServicerContext) -> token_service_pb2.GetKeysResponse:
        ks = await self._a.get_keys(request.tenant)
        return token_service_pb2.GetKeysResponse(
            tenant=ks.tenant.id, issuer=ks.tenant.issuer, jwks_json=ks.jwks_json,
            max_age_seconds=ks.max_age, etag=ks.etag, keys=[key_pb(k) for k in ks.keys],
        )


class KeyAdminServicer(key_admin_pb2_grpc.KeyAdminServicer):
    def __init__(self, authority: Authority) -> None:
        self._a = authority

    @rpc_boundary
    async def CreateTenant(self, request: key_admin_pb2.CreateTenantRequest,
                           context: grpc.aio.ServicerContext) -> key_admin_pb2.Tenant:
        d = TenantPolicy()
        settings = self._a.settings
        tenant = Tenant(
            id=request.id,
            issuer=request.issuer or (settings.issuer_for(request.id) if request.id else ""),
            policy=TenantPolicy(
                max_token_lifetime_seconds=request.max_token_lifetime_seconds
                or d.max_token_lifetime_seconds,
                default_token_lifetime_seconds=request.default_token_lifetime_seconds
                or min(d.default_token_lifetime_seconds,
                       request.max_token_lifetime_seconds or d.max_token_lifetime_seconds),
                allowed_algorithms=tuple(request.allowed_algorithms) or d.allowed_algorithms,
                key_size=request.key_size or settings.key_size,
            ),
        )
        created = await self._a.create_tenant(tenant, caller_of(context), request.generate_key)
        return tenant_pb(created)

    @rpc_boundary
    async def GetTenant(self, request: key_admin_pb2.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> key_admin_pb2.Tenant:
        return tenant_pb(await self._a.get_tenant(request.id))

    @rpc_boundary
    async def ListTenants(self, request: key_admin_pb2.ListTenantsRequest,
                          context: grpc.aio.ServicerContext) -> key_admin_pb2.ListTenantsResponse:
        tenants = await self._a.list_tenants()
        return key_admin_pb2.ListTenantsResponse(tenants=[tenant_pb(t) for t in tenants])

    @rpc_boundary
    async def GenerateKey(self, request: key_admin_pb2.GenerateKeyRequest,
                          context: grpc.aio.ServicerContext) -> common_pb2.Key:
        key = await self._a.generate_key(request.tenant, request.key_size, request.activate,
                                         caller_of(context))
        return key_pb(key)

    @rpc_boundary
    async def ListKeys(self, request: key_admin_pb2.ListKeysRequest,
                       context: grpc.aio.ServicerContext) -> key_admin_pb2.ListKeysResponse:
        keys = await self._a.list_keys(request.tenant)
        return key_admin_pb2.ListKeysResponse(keys=[key_pb(k) for k in keys])

    @rpc_boundary
    async def ActivateKey(self, request: key_admin_pb2.KeyRef,
                          context: grpc.aio.ServicerContext) -> common_pb2.Key:
        return key_pb(await self._a.activate_key(request.tenant, request.kid, caller_of(context)))

    @rpc_boundary
    async def RetireKey(self, request: key_admin_pb2.KeyRef,
                        context: grpc.aio.ServicerContext) -> common_pb2.Key:
        return key_pb(await self._a.retire_key(request.tenant, request.kid, caller_of(context)))

    @rpc_boundary
    async def ListAuditEvents(
        self, request: key_admin_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> key_admin_pb2.ListAuditEventsResponse:
        size = request.page_size or 100
        records = await self._a.list_audit(
            tenant=request.tenant, event_type=request.event_type, subject=request.subject,
            since=request.since, until=request.until, after_seq=request.after_seq,
            page_size=size,
        )
        return key_admin_pb2.ListAuditEventsResponse(
            events=[audit_pb(r) for r in records],
            next_after_seq=records[-1].seq if len(records) == size else 0,
        )

    @rpc_boundary
    async def VerifyAuditChain(
        self, request: key_admin_pb2.VerifyAuditChainRequest, context: grpc.aio.ServicerContext
    ) -> key_admin_pb2.AuditChainReport:
        report = await self._a.verify_audit_chain()
        return key_admin_pb2.AuditChainReport(
            ok=report.ok,
            rows_checked=report.rows_checked,
            head_seq=report.head_seq,
            head_hash=report.head_hash.hex(),
            first_bad_seq=report.first_bad_seq or 0,
            problem=report.problem.name if report.problem else "",
        )


def audit_pb(r: AuditRecord) -> key_admin_pb2.AuditEvent:
    e = r.event
    return key_admin_pb2.AuditEvent(
        seq=r.seq,
        time_us=int(r.ts.timestamp() * 1_000_000),
        tenant=e.tenant,
        actor=e.actor,
        event_type=e.event_type,
        subject=e.subject,
        jti=e.jti,
        kid=e.kid,
        outcome=e.outcome,
        reason=e.reason,
        request_id=e.request_id,
        details_json=json.dumps(e.details, separators=(",", ":"), sort_keys=True)
        if e.details else "",
        hash=r.hash.hex(),
    )


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _int(value: object) -> int:
    return value if type(value) is int else 0
