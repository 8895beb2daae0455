"""A small typed client over the generated stubs (sync and asyncio)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedtoken_client._pb.fedtoken.v1 import (
    common_pb2,
    key_admin_pb2,
    key_admin_pb2_grpc,
    token_service_pb2,
    token_service_pb2_grpc,
)
from fedtoken_client.errors import from_rpc_error

Verdict = token_service_pb2.Verdict

# Receive limit of the channels this package opens: the largest response a
# fedtoken server may send (its grpc_max_message_bytes is capped at this).
MAX_RESPONSE_BYTES = 128 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
)


@dataclass(frozen=True)
class Tls:
    """mTLS settings: fedtoken authenticates every caller by the SPIFFE ID in
    its client certificate (exactly one ``spiffe://`` URI SAN).

    ``ca`` is the bundle the server's certificate chains to; ``cert`` and
    ``key`` are the caller's own certificate chain and private key (PEM
    files). ``server_name`` overrides the name checked against the server's
    certificate (e.g. when dialing an IP the certificate does not list).
    """

    ca: str | Path
    cert: str | Path
    key: str | Path
    server_name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tls | None:
        """FEDTOKEN_TLS_CA, FEDTOKEN_TLS_CERT, FEDTOKEN_TLS_KEY (all or none)."""
        env = os.environ if env is None else env
        values = [env.get(f"FEDTOKEN_TLS_{n}", "") for n in ("CA", "CERT", "KEY")]
        if not any(values):
            return None
        if not all(values):
            raise ValueError("set all of FEDTOKEN_TLS_CA, FEDTOKEN_TLS_CERT, FEDTOKEN_TLS_KEY")
        ca, cert, key = values
        return cls(ca, cert, key, server_name=env.get("FEDTOKEN_TLS_SERVER_NAME", ""))

    @classmethod
    def from_dir(cls, directory: str | Path, name: str = "client") -> Tls:
        """``ca.pem`` plus ``<name>.pem`` / ``<name>.key`` in one directory
        (the layout of ``fedtoken dev-cert`` and of the dev PKI)."""
        d = Path(directory)
        ca = d / "ca.pem"
        if not ca.exists() and (d.parent / "ca.pem").exists():
            ca = d.parent / "ca.pem"
        return cls(ca, d / f"{name}.pem", d / f"{name}.key")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes(),
            private_key=Path(self.key).read_bytes(),
            certificate_chain=Path(self.cert).read_bytes(),
        )

    def options(self) -> tuple[tuple[str, Any], ...]:
        if self.server_name:
            return (*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", self.server_name))
        return CHANNEL_OPTIONS


def _channel(target: str, tls: Tls | None, insecure: bool, aio: bool) -> Any:
    tls = tls or (None if insecure else Tls.from_env())
    if tls is None:
        if not insecure:
            raise ValueError("fedtoken requires mTLS: pass tls=Tls(ca, cert, key), set "
                             "FEDTOKEN_TLS_CA/CERT/KEY, or insecure=True for a test server")
        return (grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) if aio
                else grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
    factory = grpc.aio.secure_channel if aio else grpc.secure_channel
    return factory(target, tls.credentials(), options=tls.options())


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc


def reason_name(value: int) -> str:
    """The stable name of a verdict Reason value (e.g. "REVOKED")."""
    return common_pb2.Reason.Name(value)


def _issue_request(subject: str, audience: str | Sequence[str], tenant: str,
                   lifetime_seconds: int, claims: dict[str, Any] | None, scope: str,
                   client_id: str) -> token_service_pb2.IssueRequest:
    return token_service_pb2.IssueRequest(
        tenant=tenant, subject=subject,
        audience=[audience] if isinstance(audience, str) else list(audience),
        lifetime_seconds=lifetime_seconds, extra_claims_json=json.dumps(claims) if claims else "",
        scope=scope, client_id=client_id,
    )


def _issue_batch_request(
        items: Sequence[Mapping[str, Any]]) -> token_service_pb2.IssueBatchRequest:
    """Each item holds issue()'s arguments by name (subject and audience required)."""
    return token_service_pb2.IssueBatchRequest(requests=[
        _issue_request(item["subject"], item["audience"], item.get("tenant", ""),
                       item.get("lifetime_seconds", 0), item.get("claims"),
                       item.get("scope", ""), item.get("client_id", ""))
        for item in items
    ])


def _revoke_request(token: str, jti: str, subject: str, issued_before: int, kid: str,
                    tenant: str, expires_at: int, reason: str,
                    issuer: str = "") -> token_service_pb2.RevokeRequest:
    req = token_service_pb2.RevokeRequest(tenant=tenant, expires_at=expires_at, reason=reason,
                                          issuer=issuer)
    if token:
        req.token = token
    elif jti:
        req.jti = jti
    elif subject:
        req.subject.subject = subject
        req.subject.issued_before = issued_before
    elif kid:
        req.kid = kid
    return req


def _exchange_request(subject_token: str, tenant: str, audience: str | Sequence[str],
                      lifetime_seconds: int, scope: str) -> token_service_pb2.ExchangeRequest:
    return token_service_pb2.ExchangeRequest(
        subject_token=subject_token, tenant=tenant,
        audience=[audience] if isinstance(audience, str) else list(audience),
        lifetime_seconds=lifetime_seconds, scope=scope)


class FedtokenClient:
    """Blocking client for TokenService and KeyAdmin.

    ``caller`` is sent as ``x-fedtoken-caller`` and lands in the audit trail.
    """

    def __init__(self, target: str, *, tls: Tls | None = None, insecure: bool = False,
                 caller: str = "", timeout: float = 10.0,
                 channel: grpc.Channel | None = None) -> None:
        self._channel = channel or _channel(target, tls, insecure, aio=False)
        self.tokens = token_service_pb2_grpc.TokenServiceStub(self._channel)
        self.admin = key_admin_pb2_grpc.KeyAdminStub(self._channel)
        self._metadata = (("x-fedtoken-caller", caller),) if caller else ()
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FedtokenClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        with _translated():
            return method(request, timeout=self._timeout, metadata=self._metadata)

    # -- tokens ----------------------------------------------------------------

    def issue(self, subject: str, audience: str | Sequence[str], *, tenant: str = "",
              lifetime_seconds: int = 0, claims: dict[str, Any] | None = None,
              scope: str = "", client_id: str = "") -> token_service_pb2.IssueResponse:
        return self._call(self.tokens.Issue, _issue_request(
            subject, audience, tenant, lifetime_seconds, claims, scope, client_id))

    def issue_batch(self, items: Sequence[Mapping[str, Any]]
                    ) -> list[token_service_pb2.IssueResponse]:
        """Issue many tokens in one call; each item holds issue()'s arguments by
        name, e.g. ``{"subject": "alice", "audience": "api", "tenant": "acme"}``.
        Responses come back in item order; one invalid item fails the call."""
        resp = self._call(self.tokens.IssueBatch, _issue_batch_request(items))
        return list(resp.responses)

    def verify(self, token: str, audience: str, *, issuer: str = "",
               tenant: str = "") -> Verdict:
        resp = self._call(self.tokens.Verify, token_service_pb2.VerifyRequest(
            token=token, audience=audience, issuer=issuer, tenant=tenant))
        return resp.verdict

    def verify_batch(self, tokens: Sequence[str], audience: str, *, issuer: str = "",
                     tenant: str = "") -> list[Verdict]:
        resp = self._call(self.tokens.VerifyBatch, token_service_pb2.VerifyBatchRequest(
            tokens=list(tokens), audience=audience, issuer=issuer, tenant=tenant))
        return list(resp.verdicts)

    def introspect(self, token: str) -> token_service_pb2.IntrospectResponse:
        return self._call(self.tokens.Introspect,
                          token_service_pb2.IntrospectRequest(token=token))

    def revoke(self, *, token: str = "", jti: str = "", subject: str = "",
               issued_before: int = 0, kid: str = "", tenant: str = "",
               expires_at: int = 0, reason: str = "",
               issuer: str = "") -> token_service_pb2.RevokeResponse:
        """Revoke exactly one target: a token, a jti, a subject's tokens issued
        before ``issued_before`` (0: now), or every token of key ``kid``.
        With ``issuer`` (a trusted foreign issuer), jti or subject is that
        issuer's, revoked in ``tenant``."""
        return self._call(self.tokens.Revoke, _revoke_request(
            token, jti, subject, issued_before, kid, tenant, expires_at, reason, issuer))

    def exchange(self, subject_token: str, audience: str | Sequence[str], *, tenant: str = "",
                 lifetime_seconds: int = 0,
                 scope: str = "") -> token_service_pb2.ExchangeResponse:
        """RFC 8693 token exchange: a trusted foreign issuer's token for a
        short-lived token of ``tenant``."""
        return self._call(self.tokens.Exchange, _exchange_request(
            subject_token, tenant, audience, lifetime_seconds, scope))

    def get_keys(self, tenant: str = "") -> token_service_pb2.GetKeysResponse:
        return self._call(self.tokens.GetKeys, token_service_pb2.GetKeysRequest(tenant=tenant))

    # -- admin -----------------------------------------------------------------

    def create_tenant(self, tenant_id: str, issuer: str = "", *, generate_key: bool = True,
                      **policy: Any) -> key_admin_pb2.Tenant:
        return self._call(self.admin.CreateTenant, key_admin_pb2.CreateTenantRequest(
            id=tenant_id, issuer=issuer, generate_key=generate_key, **policy))

    def update_tenant(self, tenant_id: str, *, rotation_period_seconds: int = 0,
                      max_token_lifetime_seconds: int = 0,
                      default_token_lifetime_seconds: int = 0) -> key_admin_pb2.Tenant:
        """Change a tenant's rotation period and token lifetimes (0: keep);
        a lifetime the keys' grace would not cover is refused (POLICY_VIOLATION)."""
        return self._call(self.admin.UpdateTenant, key_admin_pb2.UpdateTenantRequest(
            id=tenant_id, rotation_period_seconds=rotation_period_seconds,
            max_token_lifetime_seconds=max_token_lifetime_seconds,
            default_token_lifetime_seconds=default_token_lifetime_seconds))

    def rotate_key(self, tenant: str = "", *, reason: str = "") -> common_pb2.Key:
        """Emergency rotation: a new key signs at once, the old one retires
        (audited as an emergency)."""
        return self._call(self.admin.RotateKey, key_admin_pb2.RotateKeyRequest(
            tenant=tenant, reason=reason))

    def list_tenants(self) -> list[key_admin_pb2.Tenant]:
        return list(self._call(self.admin.ListTenants,
                               key_admin_pb2.ListTenantsRequest()).tenants)

    def generate_key(self, tenant: str = "", *, key_size: int = 0,
                     activate: bool = False) -> common_pb2.Key:
        return self._call(self.admin.GenerateKey, key_admin_pb2.GenerateKeyRequest(
            tenant=tenant, key_size=key_size, activate=activate))

    def list_keys(self, tenant: str = "") -> list[common_pb2.Key]:
        return list(self._call(self.admin.ListKeys,
                               key_admin_pb2.ListKeysRequest(tenant=tenant)).keys)

    def activate_key(self, kid: str, tenant: str = "") -> common_pb2.Key:
        return self._call(self.admin.ActivateKey, key_admin_pb2.KeyRef(tenant=tenant, kid=kid))

    def retire_key(self, kid: str, tenant: str = "", *,
                   emergency: bool = False) -> common_pb2.Key:
        """PENDING → RETIRING; RETIRING → RETIRED after its grace, or at once
        with ``emergency`` (every unexpired token it signed then fails)."""
        return self._call(self.admin.RetireKey, key_admin_pb2.KeyRef(tenant=tenant, kid=kid,
                                                                      emergency=emergency))

    def list_audit(self, *, tenant: str = "", event_type: str = "", subject: str = "",
                   since: int = 0, until: int = 0, after_seq: int = 0,
                   page_size: int = 100) -> key_admin_pb2.ListAuditEventsResponse:
        return self._call(self.admin.ListAuditEvents, key_admin_pb2.ListAuditEventsRequest(
            tenant=tenant, event_type=event_type, subject=subject, since=since, until=until,
            after_seq=after_seq, page_size=page_size))

    def verify_audit_chain(self) -> key_admin_pb2.AuditChainReport:
        return self._call(self.admin.VerifyAuditChain, key_admin_pb2.VerifyAuditChainRequest())

    # -- callers -------------------------------------------------------------------

    def grant_caller(self, identity: str, role: str, *, tenants: Sequence[str] = (),
                     audiences: Sequence[str] = (),
                     max_lifetime_seconds: int = 0) -> key_admin_pb2.CallerGrant:
        return self._call(self.admin.GrantCaller, key_admin_pb2.GrantCallerRequest(
            identity=identity, role=role, tenants=list(tenants), audiences=list(audiences),
            max_lifetime_seconds=max_lifetime_seconds))

    def revoke_caller(self, identity: str, role: str = "") -> int:
        resp = self._call(self.admin.RevokeCaller,
                          key_admin_pb2.RevokeCallerRequest(identity=identity, role=role))
        return int(resp.removed)

    def list_callers(self) -> list[key_admin_pb2.CallerGrant]:
        return list(self._call(self.admin.ListCallers, key_admin_pb2.ListCallersRequest()).grants)

    # -- compliance ------------------------------------------------------------------

    def compliance_report(self, tenant: str = "") -> key_admin_pb2.ComplianceReport:
        """Every key's facts and every policy violation (auditor or admin)."""
        return self._call(self.admin.GetComplianceReport,
                          key_admin_pb2.ComplianceReportRequest(tenant=tenant))

    def reconcile_keys(self, *, fix: bool = False) -> key_admin_pb2.ReconcileKeysReport:
        """HSM objects vs Postgres records; with ``fix``, destroy the orphans."""
        return self._call(self.admin.ReconcileKeys, key_admin_pb2.ReconcileKeysRequest(fix=fix))

    # -- trusted issuers (federation) ---------------------------------------------------

    def add_trusted_issuer(self, issuer: str, *, tenants: Sequence[str], jwks_uri: str = "",
                           algorithms: Sequence[str] = (), audiences: Sequence[str] = (),
                           namespace: str = "",
                           max_stale_seconds: int = 0) -> key_admin_pb2.TrustedIssuer:
        """Trust ``issuer`` for ``tenants``, or replace its whole definition
        (``created`` in the answer says which). Empty values take the server's
        defaults: OIDC discovery, RS256, a namespace from the issuer URL, one
        day of maximum staleness."""
        return self._call(self.admin.AddTrustedIssuer, key_admin_pb2.AddTrustedIssuerRequest(
            issuer=issuer, jwks_uri=jwks_uri, algorithms=list(algorithms),
            audiences=list(audiences), tenants=list(tenants), namespace=namespace,
            max_stale_seconds=max_stale_seconds))

    def list_trusted_issuers(self, tenant: str = "") -> list[key_admin_pb2.TrustedIssuer]:
        """Every trusted issuer the caller may see (``tenant``: those it trusts),
        with the state of each one's cached key set."""
        return list(self._call(self.admin.ListTrustedIssuers,
                               key_admin_pb2.ListTrustedIssuersRequest(tenant=tenant)).issuers)

    def remove_trusted_issuer(self, issuer: str) -> key_admin_pb2.TrustedIssuer:
        """Stop trusting ``issuer``; the definition that was removed."""
        return self._call(self.admin.RemoveTrustedIssuer,
                          key_admin_pb2.RemoveTrustedIssuerRequest(issuer=issuer)).removed

    def refresh_trusted_issuer(self, issuer: str) -> key_admin_pb2.TrustedIssuer:
        """Fetch the issuer's key set now; the issuer with its state after."""
        return self._call(self.admin.RefreshTrustedIssuer,
                          key_admin_pb2.RefreshTrustedIssuerRequest(issuer=issuer))


class AsyncFedtokenClient:
    """asyncio flavour of the token calls, for services built on grpc.aio."""

    def __init__(self, target: str, *, tls: Tls | None = None, insecure: bool = False,
                 caller: str = "", timeout: float = 10.0) -> None:
        self._channel = _channel(target, tls, insecure, aio=True)
        self.tokens = token_service_pb2_grpc.TokenServiceStub(self._channel)
        self.admin = key_admin_pb2_grpc.KeyAdminStub(self._channel)
        self._metadata = (("x-fedtoken-caller", caller),) if caller else ()
        self._timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    async def issue(self, subject: str, audience: str | Sequence[str], *, tenant: str = "",
                    lifetime_seconds: int = 0, claims: dict[str, Any] | None = None,
                    scope: str = "", client_id: str = "") -> token_service_pb2.IssueResponse:
        return await self._call(self.tokens.Issue, _issue_request(
            subject, audience, tenant, lifetime_seconds, claims, scope, client_id))

    async def issue_batch(self, items: Sequence[Mapping[str, Any]]
                          ) -> list[token_service_pb2.IssueResponse]:
        """Issue many tokens in one call (see FedtokenClient.issue_batch)."""
        resp = await self._call(self.tokens.IssueBatch, _issue_batch_request(items))
        return list(resp.responses)

    async def verify(self, token: str, audience: str, *, issuer: str = "",
                     tenant: str = "") -> Verdict:
        resp = await self._call(self.tokens.Verify, token_service_pb2.VerifyRequest(
            token=token, audience=audience, issuer=issuer, tenant=tenant))
        return resp.verdict

    async def verify_batch(self, tokens: Sequence[str], audience: str, *, issuer: str = "",
                           tenant: str = "") -> list[Verdict]:
        resp = await self._call(self.tokens.VerifyBatch, token_service_pb2.VerifyBatchRequest(
            tokens=list(tokens), audience=audience, issuer=issuer, tenant=tenant))
        return list(resp.verdicts)

    async def revoke(self, *, token: str = "", jti: str = "", subject: str = "",
                     issued_before: int = 0, kid: str = "", tenant: str = "",
                     reason: str = "", issuer: str = "") -> token_service_pb2.RevokeResponse:
        return await self._call(self.tokens.Revoke, _revoke_request(
            token, jti, subject, issued_before, kid, tenant, 0, reason, issuer))

    async def exchange(self, subject_token: str, audience: str | Sequence[str], *,
                       tenant: str = "", lifetime_seconds: int = 0,
                       scope: str = "") -> token_service_pb2.ExchangeResponse:
        return await self._call(self.tokens.Exchange, _exchange_request(
            subject_token, tenant, audience, lifetime_seconds, scope))

    async def introspect(self, token: str) -> token_service_pb2.IntrospectResponse:
        return await self._call(self.tokens.Introspect,
                                token_service_pb2.IntrospectRequest(token=token))
