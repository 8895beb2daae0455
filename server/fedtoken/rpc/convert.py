"""Every conversion between protobuf messages and the service's types.

The hot half (verdicts, VerifyBatchResponse) is written for speed; the rest
is plain field mapping. Servicers do nothing but call these around one
service call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fedtoken.core.audit import AuditRecord, ChainReport
from fedtoken.core.authz import Grant
from fedtoken.core.claims import is_numeric_date
from fedtoken.core.model import (
    Expectation,
    KeyRecord,
    KeyState,
    Reason,
    Tenant,
    Verdict,
    WireBatch,
)
from fedtoken.core.trust import TrustedIssuer
from fedtoken.service.exchange import JWT_TOKEN_TYPE
from fedtoken.service.keyadmin import TenantTiming
from fedtoken.service.trust import NewTrust, TrustView
from fedtoken.service.types import (
    AuditQuery,
    Exchanged,
    ExchangeParams,
    Introspection,
    Issued,
    IssueParams,
    KeySet,
    NewTenant,
    Revoked,
    RevokeParams,
    TenantUpdate,
)
from fedtoken_client._pb.fedtoken.v1 import common_pb2, key_admin_pb2, token_service_pb2

# Enum values are plain ints at run time; the stubs type them as NewTypes.
REASON_PB: dict[Reason, Any] = {r: common_pb2.Reason.Value(r.value) for r in Reason}
_KEY_STATE: dict[KeyState, Any] = {s: common_pb2.KeyState.Value(s.value) for s in KeyState}
DEFAULT_AUDIT_PAGE = 100


# --- verification (hot) -------------------------------------------------------------


def expectation(request: token_service_pb2.VerifyRequest
                | token_service_pb2.VerifyBatchRequest) -> Expectation:
    return Expectation(audience=request.audience, issuer=request.issuer, tenant=request.tenant)


def verify_response(v: Verdict) -> token_service_pb2.VerifyResponse:
    # A dict builds the Verdict inside the response (a message would be
    # built, then copied in).
    return token_service_pb2.VerifyResponse(verdict=_verdict_fields(v))


def verdict_pb(v: Verdict) -> token_service_pb2.Verdict:
    return token_service_pb2.Verdict(**_verdict_fields(v))


def verify_batch_response(verdicts: Sequence[Verdict]) -> token_service_pb2.VerifyBatchResponse:
    """The VerifyBatchResponse of ``verdicts``, built in place.

    ``VerifyBatchResponse(verdicts=[verdict_pb(v) ...])`` builds every Verdict
    message twice (once standalone, once copied into the repeated field);
    ``verdicts.add`` builds each one directly inside the response.
    """
    response = token_service_pb2.VerifyBatchResponse()
    add = response.verdicts.add
    for v in verdicts:
        add(**_verdict_fields(v))
    return response


def verify_batch_bytes(wire: WireBatch) -> bytes:
    """The serialized VerifyBatchResponse of a WireBatch: the pipeline's
    elements with the verdicts of the other tokens serialized into their
    places (a run of them at one place as one message: the encoding of a
    repeated field is the concatenation of its elements)."""
    if not wire.out:
        return verify_batch_response(wire.verdicts).SerializeToString()
    if not wire.rest:
        return wire.out
    out, cuts, verdicts = wire.out, wire.cuts, wire.verdicts
    pieces: list[bytes] = []
    prev = 0
    i, count = 0, len(cuts)
    while i < count:
        cut = cuts[i]
        j = i + 1
        while j < count and cuts[j] == cut:
            j += 1
        pieces.append(out[prev:cut])
        pieces.append(verify_batch_response(verdicts[i:j]).SerializeToString())
        prev, i = cut, j
    pieces.append(out[prev:])
    return b"".join(pieces)


def serialize_verify_batch(response: bytes | token_service_pb2.VerifyBatchResponse) -> bytes:
    """VerifyBatch's response serializer: the servicer answers bytes it
    serialized itself (``verify_batch_bytes``), or a message."""
    if type(response) is bytes:
        return response
    return response.SerializeToString()  # type: ignore[union-attr]


def _verdict_fields(v: Verdict) -> dict[str, Any]:
    return {
        "valid": v.valid,
        "reason": REASON_PB[v.reason],
        "tenant": v.tenant,
        "issuer": v.issuer,
        "kid": v.kid,
        "subject": v.subject,
        "jti": v.jti,
        # An invalid token's own exp can be anything (10**30): reporting it
        # must never fail the call, so out-of-range values go out as 0.
        "expires_at": v.expires_at if is_numeric_date(v.expires_at) else 0,
        "claims_json": v.claims_json,
        "foreign": v.foreign,
    }


# --- tokens -------------------------------------------------------------------------


def issue_params(r: token_service_pb2.IssueRequest) -> IssueParams:
    return IssueParams(
        tenant=r.tenant, subject=r.subject, audience=list(r.audience),
        lifetime_seconds=r.lifetime_seconds, extra_claims_json=r.extra_claims_json,
        scope=r.scope, client_id=r.client_id,
    )


def issue_response(i: Issued) -> token_service_pb2.IssueResponse:
    return token_service_pb2.IssueResponse(
        token=i.token, jti=i.jti, kid=i.kid, tenant=i.tenant, issuer=i.issuer,
        issued_at=i.issued_at, expires_at=i.expires_at,
    )


def issue_batch_response(issued: Sequence[Issued]) -> token_service_pb2.IssueBatchResponse:
    return token_service_pb2.IssueBatchResponse(responses=[issue_response(i) for i in issued])


def revoke_params(r: token_service_pb2.RevokeRequest) -> RevokeParams:
    by_subject = r.WhichOneof("target") == "subject"
    return RevokeParams(
        tenant=r.tenant, token=r.token, jti=r.jti,
        subject=r.subject.subject if by_subject else "",
        issued_before=r.subject.issued_before if by_subject else 0,
        kid=r.kid, expires_at=r.expires_at, reason=r.reason, issuer=r.issuer,
    )


def exchange_params(r: token_service_pb2.ExchangeRequest) -> ExchangeParams:
    return ExchangeParams(
        subject_token=r.subject_token, tenant=r.tenant, audience=list(r.audience),
        subject_token_type=r.subject_token_type, lifetime_seconds=r.lifetime_seconds,
        scope=r.scope,
    )


def exchange_response(e: Exchanged) -> token_service_pb2.ExchangeResponse:
    i = e.issued
    return token_service_pb2.ExchangeResponse(
        access_token=i.token, issued_token_type=JWT_TOKEN_TYPE,
        jti=i.jti, kid=i.kid, tenant=i.tenant, issuer=i.issuer, subject=e.subject,
        expires_at=i.expires_at,
    )


def revoke_response(r: Revoked) -> token_service_pb2.RevokeResponse:
    return token_service_pb2.RevokeResponse(
        tenant=r.tenant, jti=r.jti, revoked_at=r.revoked_at, created=r.created, kind=r.kind,
        value=r.value,
    )


def introspect_response(result: Introspection) -> token_service_pb2.IntrospectResponse:
    if not result.active:
        return token_service_pb2.IntrospectResponse(active=False,
                                                    reason=REASON_PB[result.reason])
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


def keys_response(ks: KeySet) -> token_service_pb2.GetKeysResponse:
    return token_service_pb2.GetKeysResponse(
        tenant=ks.tenant.id, issuer=ks.tenant.issuer, jwks_json=ks.jwks_json,
        max_age_seconds=ks.max_age, etag=ks.etag, keys=[key_pb(k) for k in ks.keys],
    )


# --- administration -----------------------------------------------------------------


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


def tenant_pb(t: Tenant, timing: TenantTiming | None = None) -> key_admin_pb2.Tenant:
    """A tenant with, when ``timing`` is given, its derived rotation timings
    and next scheduled step."""
    pb = key_admin_pb2.Tenant(
        id=t.id,
        issuer=t.issuer,
        max_token_lifetime_seconds=t.policy.max_token_lifetime_seconds,
        default_token_lifetime_seconds=t.policy.default_token_lifetime_seconds,
        allowed_algorithms=list(t.policy.allowed_algorithms),
        key_size=t.policy.key_size,
        created_at=t.created_at,
        rotation_period_seconds=t.policy.rotation_period_seconds,
    )
    if timing is not None:
        pb.prepublish_seconds = timing.schedule.prepublish
        pb.grace_seconds = timing.schedule.grace
        pb.jwks_max_age_seconds = timing.schedule.jwks_max_age
        pb.next_rotation_step_at = timing.next_step_at
        pb.next_rotation_step = timing.next_step
    return pb


def tenant_update(r: key_admin_pb2.UpdateTenantRequest) -> TenantUpdate:
    return TenantUpdate(
        id=r.id, rotation_period_seconds=r.rotation_period_seconds,
        max_token_lifetime_seconds=r.max_token_lifetime_seconds,
        default_token_lifetime_seconds=r.default_token_lifetime_seconds)


def new_tenant(r: key_admin_pb2.CreateTenantRequest) -> NewTenant:
    return NewTenant(
        id=r.id, issuer=r.issuer, max_token_lifetime_seconds=r.max_token_lifetime_seconds,
        default_token_lifetime_seconds=r.default_token_lifetime_seconds,
        allowed_algorithms=tuple(r.allowed_algorithms), key_size=r.key_size,
        generate_key=r.generate_key, rotation_period_seconds=r.rotation_period_seconds,
    )


def audit_query(r: key_admin_pb2.ListAuditEventsRequest) -> AuditQuery:
    return AuditQuery(
        tenant=r.tenant, event_type=r.event_type, subject=r.subject, since=r.since,
        until=r.until, after_seq=r.after_seq, page_size=r.page_size or DEFAULT_AUDIT_PAGE,
    )


def audit_page(records: Sequence[AuditRecord],
               page_size: int) -> key_admin_pb2.ListAuditEventsResponse:
    return key_admin_pb2.ListAuditEventsResponse(
        events=[audit_pb(r) for r in records],
        next_after_seq=records[-1].seq if len(records) == page_size else 0,
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


def chain_report_pb(report: ChainReport) -> key_admin_pb2.AuditChainReport:
    return key_admin_pb2.AuditChainReport(
        ok=report.ok,
        rows_checked=report.rows_checked,
        head_seq=report.head_seq,
        head_hash=report.head_hash.hex(),
        first_bad_seq=report.first_bad_seq or 0,
        problem=report.problem.name if report.problem else "",
        anchor_seq=report.anchor_seq,
        anchor_hash=report.anchor_hash.hex(),
    )


def grant_pb(g: Grant) -> key_admin_pb2.CallerGrant:
    return key_admin_pb2.CallerGrant(
        identity=g.identity, role=g.role.value, tenants=sorted(g.tenants),
        audiences=sorted(g.audiences), max_lifetime_seconds=g.max_lifetime_seconds,
        created_at=g.created_at, granted_by=g.granted_by,
    )


def new_trust(r: key_admin_pb2.AddTrustedIssuerRequest) -> NewTrust:
    return NewTrust(
        issuer=r.issuer, tenants=list(r.tenants), jwks_uri=r.jwks_uri,
        algorithms=list(r.algorithms), audiences=list(r.audiences), namespace=r.namespace,
        max_stale_seconds=r.max_stale_seconds,
    )


def trusted_issuer_pb(t: TrustedIssuer) -> key_admin_pb2.TrustedIssuer:
    """The definition alone (RemoveTrustedIssuer: there is no key set any more)."""
    return key_admin_pb2.TrustedIssuer(
        issuer=t.issuer, jwks_uri=t.jwks_uri, algorithms=sorted(t.algorithms),
        audiences=sorted(t.audiences), tenants=sorted(t.tenants), namespace=t.namespace,
        max_stale_seconds=t.max_stale_seconds, created_at=t.created_at,
        updated_at=t.updated_at, added_by=t.added_by,
    )


def trust_view_pb(v: TrustView) -> key_admin_pb2.TrustedIssuer:
    s = v.status
    msg = trusted_issuer_pb(v.trust)
    msg.created = v.created
    msg.key_set.CopyFrom(key_admin_pb2.TrustedKeySetStatus(
        kids=list(s.kids), fetched_at=int(s.fetched_at), age_seconds=v.age_seconds,
        next_refresh_at=int(s.next_refresh_at), serving_stale=s.serving_stale,
        usable=s.usable, last_outcome=s.last_outcome, last_error=s.last_error,
        fetches=s.fetches,
    ))
    return msg


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _int(value: object) -> int:
    return value if type(value) is int else 0
