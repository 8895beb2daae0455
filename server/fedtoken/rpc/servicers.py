"""TokenService and KeyAdmin servicers: proto in, one service call, proto out.

The call context (principal, request id) and error mapping come from the
interceptors (``fedtoken.rpc.interceptors``); conversions from
``fedtoken.rpc.convert``.
"""

from __future__ import annotations

from typing import TypeAlias

import grpc

from fedtoken.core.errors import FailedPrecondition
from fedtoken.rpc import convert
from fedtoken.rpc.compliance import ComplianceServicerMixin
from fedtoken.rpc.interceptors import call_context
from fedtoken.service import KeyAdmin, Tokens, Verification
from fedtoken.service.callers import Callers
from fedtoken.service.compliance import Compliance
from fedtoken.service.exchange import Exchange
from fedtoken.service.trust import TrustAdmin
from fedtoken_client._pb.fedtoken.v1 import (
    common_pb2,
    key_admin_pb2,
    key_admin_pb2_grpc,
    token_service_pb2,
    token_service_pb2_grpc,
)

Ctx: TypeAlias = grpc.aio.ServicerContext


class _Captured:
    """Stands in for a server to capture the method handlers a generated
    ``add_*_to_server`` function registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_token_service(servicer: TokenServicer, server: grpc.aio.Server) -> None:
    """Register TokenService as the generated code does, except that
    VerifyBatch's response serializer passes bytes through unchanged."""
    captured = _Captured()
    token_service_pb2_grpc.add_TokenServiceServicer_to_server(servicer, captured)
    handlers = captured.handlers
    batch = handlers["VerifyBatch"]
    handlers["VerifyBatch"] = grpc.unary_unary_rpc_method_handler(
        servicer.VerifyBatch, request_deserializer=batch.request_deserializer,
        response_serializer=convert.serialize_verify_batch)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(captured.service, handlers),))
    server.add_registered_method_handlers(captured.service, handlers)


class TokenServicer(token_service_pb2_grpc.TokenServiceServicer):
    def __init__(self, tokens: Tokens, verification: Verification,
                 exchange: Exchange | None = None) -> None:
        self._tokens = tokens
        self._verification = verification
        self._exchange = exchange

    async def Exchange(self, request: token_service_pb2.ExchangeRequest,
                       context: Ctx) -> token_service_pb2.ExchangeResponse:
        if self._exchange is None:
            raise FailedPrecondition("this server does not exchange tokens")
        done = await self._exchange.exchange(convert.exchange_params(request), call_context())
        return convert.exchange_response(done)

    async def Issue(self, request: token_service_pb2.IssueRequest,
                    context: Ctx) -> token_service_pb2.IssueResponse:
        issued = await self._tokens.issue(convert.issue_params(request), call_context())
        return convert.issue_response(issued)

    async def IssueBatch(self, request: token_service_pb2.IssueBatchRequest,
                         context: Ctx) -> token_service_pb2.IssueBatchResponse:
        issued = await self._tokens.issue_batch(
            [convert.issue_params(r) for r in request.requests], call_context())
        return convert.issue_batch_response(issued)

    async def Verify(self, request: token_service_pb2.VerifyRequest,
                     context: Ctx) -> token_service_pb2.VerifyResponse:
        verdict = await self._verification.verify(request.token, convert.expectation(request),
                                                  call_context())
        return convert.verify_response(verdict)

    async def VerifyBatch(self, request: token_service_pb2.VerifyBatchRequest,
                          context: Ctx) -> bytes:
        # The serialized VerifyBatchResponse: registered with an identity
        # serializer (add_token_service), so the native pipeline's bytes go
        # out as they are.
        wire = await self._verification.verify_batch_wire(
            request.tokens, convert.expectation(request), call_context(), convert.REASON_PB)
        return convert.verify_batch_bytes(wire)

    async def Introspect(self, request: token_service_pb2.IntrospectRequest,
                         context: Ctx) -> token_service_pb2.IntrospectResponse:
        result = await self._tokens.introspect(request.token, call_context())
        return convert.introspect_response(result)

    async def Revoke(self, request: token_service_pb2.RevokeRequest,
                     context: Ctx) -> token_service_pb2.RevokeResponse:
        revoked = await self._tokens.revoke(convert.revoke_params(request), call_context())
        return convert.revoke_response(revoked)

    async def GetKeys(self, request: token_service_pb2.GetKeysRequest,
                      context: Ctx) -> token_service_pb2.GetKeysResponse:
        return convert.keys_response(await self._verification.key_set(request.tenant,
                                                                      call_context()))


class KeyAdminServicer(ComplianceServicerMixin, key_admin_pb2_grpc.KeyAdminServicer):
    def __init__(self, keys: KeyAdmin, callers: Callers, trust: TrustAdmin | None = None,
                 compliance: Compliance | None = None) -> None:
        self._keys = keys
        self._callers = callers
        self._trust_admin = trust
        self._compliance = compliance

    @property
    def _trust(self) -> TrustAdmin:
        """``fedtoken.app`` always gives one; a servicer built without (a test
        of the other RPCs) answers the trust RPCs FAILED_PRECONDITION."""
        if self._trust_admin is None:
            raise FailedPrecondition("this server does not administer trusted issuers")
        return self._trust_admin

    async def CreateTenant(self, request: key_admin_pb2.CreateTenantRequest,
                           context: Ctx) -> key_admin_pb2.Tenant:
        created = await self._keys.create_tenant(convert.new_tenant(request), call_context())
        return convert.tenant_pb(created, self._keys.timing(created))

    async def GetTenant(self, request: key_admin_pb2.GetTenantRequest,
                        context: Ctx) -> key_admin_pb2.Tenant:
        tenant = await self._keys.get_tenant(request.id, call_context())
        return convert.tenant_pb(tenant, self._keys.timing(tenant))

    async def UpdateTenant(self, request: key_admin_pb2.UpdateTenantRequest,
                           context: Ctx) -> key_admin_pb2.Tenant:
        updated = await self._keys.update_tenant(convert.tenant_update(request), call_context())
        return convert.tenant_pb(updated, self._keys.timing(updated))

    async def RotateKey(self, request: key_admin_pb2.RotateKeyRequest,
                        context: Ctx) -> common_pb2.Key:
        return convert.key_pb(await self._keys.rotate_now(request.tenant, request.reason,
                                                          call_context()))

    async def ListTenants(self, request: key_admin_pb2.ListTenantsRequest,
                          context: Ctx) -> key_admin_pb2.ListTenantsResponse:
        tenants = await self._keys.list_tenants(call_context())
        return key_admin_pb2.ListTenantsResponse(
            tenants=[convert.tenant_pb(t, self._keys.timing(t)) for t in tenants])

    async def GenerateKey(self, request: key_admin_pb2.GenerateKeyRequest,
                          context: Ctx) -> common_pb2.Key:
        key = await self._keys.generate_key(request.tenant, request.key_size, request.activate,
                                            call_context())
        return convert.key_pb(key)

    async def ListKeys(self, request: key_admin_pb2.ListKeysRequest,
                       context: Ctx) -> key_admin_pb2.ListKeysResponse:
        keys = await self._keys.list_keys(request.tenant, call_context())
        return key_admin_pb2.ListKeysResponse(keys=[convert.key_pb(k) for k in keys])

    async def ActivateKey(self, request: key_admin_pb2.KeyRef,
                          context: Ctx) -> common_pb2.Key:
        return convert.key_pb(await self._keys.activate_key(request.tenant, request.kid,
                                                            call_context()))

    async def RetireKey(self, request: key_admin_pb2.KeyRef, context: Ctx) -> common_pb2.Key:
        return convert.key_pb(await self._keys.retire_key(request.tenant, request.kid,
                                                          call_context(),
                                                          emergency=request.emergency))

    async def ListAuditEvents(self, request: key_admin_pb2.ListAuditEventsRequest,
                              context: Ctx) -> key_admin_pb2.ListAuditEventsResponse:
        query = convert.audit_query(request)
        return convert.audit_page(await self._keys.list_audit(query, call_context()),
                                  query.page_size)

    async def VerifyAuditChain(self, request: key_admin_pb2.VerifyAuditChainRequest,
                               context: Ctx) -> key_admin_pb2.AuditChainReport:
        return convert.chain_report_pb(await self._keys.verify_audit_chain(call_context()))

    async def GrantCaller(self, request: key_admin_pb2.GrantCallerRequest,
                          context: Ctx) -> key_admin_pb2.CallerGrant:
        grant = await self._callers.grant(
            request.identity, request.role, list(request.tenants), list(request.audiences),
            request.max_lifetime_seconds, call_context())
        return convert.grant_pb(grant)

    async def RevokeCaller(self, request: key_admin_pb2.RevokeCallerRequest,
                           context: Ctx) -> key_admin_pb2.RevokeCallerResponse:
        removed = await self._callers.revoke(request.identity, request.role, call_context())
        return key_admin_pb2.RevokeCallerResponse(removed=removed)

    async def ListCallers(self, request: key_admin_pb2.ListCallersRequest,
                          context: Ctx) -> key_admin_pb2.ListCallersResponse:
        grants = await self._callers.list(call_context())
        return key_admin_pb2.ListCallersResponse(grants=[convert.grant_pb(g) for g in grants])

    async def AddTrustedIssuer(self, request: key_admin_pb2.AddTrustedIssuerRequest,
                               context: Ctx) -> key_admin_pb2.TrustedIssuer:
        return convert.trust_view_pb(await self._trust.add(convert.new_trust(request),
                                                           call_context()))

    async def ListTrustedIssuers(self, request: key_admin_pb2.ListTrustedIssuersRequest,
                                 context: Ctx) -> key_admin_pb2.ListTrustedIssuersResponse:
        views = await self._trust.list(call_context(), tenant=request.tenant)
        return key_admin_pb2.ListTrustedIssuersResponse(
            issuers=[convert.trust_view_pb(v) for v in views])

    async def RemoveTrustedIssuer(self, request: key_admin_pb2.RemoveTrustedIssuerRequest,
                                  context: Ctx) -> key_admin_pb2.RemoveTrustedIssuerResponse:
        removed = await self._trust.remove(request.issuer, call_context())
        return key_admin_pb2.RemoveTrustedIssuerResponse(
            removed=convert.trusted_issuer_pb(removed))

    async def RefreshTrustedIssuer(self, request: key_admin_pb2.RefreshTrustedIssuerRequest,
                                   context: Ctx) -> key_admin_pb2.TrustedIssuer:
        return convert.trust_view_pb(await self._trust.refresh(request.issuer,
                                                               call_context()))
