"""The compliance report over the HTTP bridge, for authenticated auditors.

``GET .../compliance[?tenant=T]`` answers the same report as KeyAdmin's
GetComplianceReport, as JSON whose member names are the proto's field names
(``key_state`` values by name). The caller is authenticated by its verified
mTLS client certificate exactly like the token endpoint (``identity_of`` of
the peer certificate); who may read what is decided by the service (auditor
or admin, scoped to its tenants), never here. Errors are the bridge's fixed
``{"error": code}`` bodies. The report is never cached (``no-store``): it is
what the HSM and Postgres say now.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from fedtoken.core.compliance import ComplianceReport, KeyFacts, TenantCompliance, Violation
from fedtoken.core.errors import (
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from fedtoken.core.ports import CallContext, Principal
from fedtoken.http.guard import NOTE_KEY, peer_certificate, terse

__all__ = ["ReportCall", "compliance_handler", "report_json"]

ReportCall = Callable[[str, CallContext], Awaitable[ComplianceReport]]
"""``Compliance.report``: (tenant or "", context) -> the report."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_NO_STORE = {"Cache-Control": "no-store"}


def _violation(v: Violation) -> dict[str, Any]:
    return {"code": v.code.value, "tenant": v.tenant, "kid": v.kid, "message": v.message}


def _key(k: KeyFacts) -> dict[str, Any]:
    a = k.hsm
    return {
        "kid": k.kid, "tenant": k.tenant, "alg": k.alg, "modulus_bits": k.modulus_bits,
        "public_exponent": k.public_exponent, "state": k.state.name,
        "age_seconds": k.age_seconds, "next_step": k.next_step,
        "next_step_at": k.next_step_at,
        "hsm": {"present": a.present, "sensitive": a.sensitive, "extractable": a.extractable,
                "sign": a.sign, "decrypt": a.decrypt, "unwrap": a.unwrap,
                "never_extractable": a.never_extractable,
                "always_sensitive": a.always_sensitive},
    }


def _tenant(t: TenantCompliance) -> dict[str, Any]:
    p = t.tenant.policy
    return {
        "tenant": {
            "id": t.tenant.id, "issuer": t.tenant.issuer,
            "max_token_lifetime_seconds": p.max_token_lifetime_seconds,
            "default_token_lifetime_seconds": p.default_token_lifetime_seconds,
            "allowed_algorithms": list(p.allowed_algorithms), "key_size": p.key_size,
            "created_at": t.tenant.created_at,
        },
        "keys": [_key(k) for k in t.keys],
        "violations": [_violation(v) for v in t.violations],
    }


def report_json(r: ComplianceReport) -> dict[str, Any]:
    """The report as the gRPC API's JSON mapping would render it."""
    return {"ok": r.ok, "generated_at": r.generated_at,
            "tenants": [_tenant(t) for t in r.tenants],
            "violations": [_violation(v) for v in r.violations],
            "audit_chain_ok": r.audit_chain_ok}


def compliance_handler(report: ReportCall,
                       identity_of: Callable[[bytes | None], str]) -> Handler:
    """A GET handler serving the report to the caller its client
    certificate names: 401 without one the bridge verified, 403 when the
    service refuses the caller, 404 for an unknown tenant, 400 for a bad
    ``tenant``, 503 when the HSM or Postgres cannot be read. ``identity_of``
    is the bridge's (``create_public_app``'s): it raises Unauthenticated."""

    async def handle(request: web.Request) -> web.StreamResponse:
        note = request.get(NOTE_KEY)
        try:
            identity = identity_of(peer_certificate(request))
        except Unauthenticated:
            if note is not None:
                note.marks.append("auth=no-client-cert")
            return terse(401, "invalid_client", _NO_STORE)
        if note is not None:
            note.client = identity
        tenants = request.query.getall("tenant", [])
        if len(tenants) > 1:
            return terse(400, "invalid_request", _NO_STORE)
        ctx = CallContext(principal=Principal(identity=identity, peer=request.remote or ""),
                          request_id=uuid.uuid4().hex, method="http:compliance")
        try:
            done = await report(tenants[0] if tenants else "", ctx)
        except PermissionDenied:
            return terse(403, "access_denied", _NO_STORE)
        except NotFound:
            return terse(404, "not_found", _NO_STORE)
        except Unavailable:
            return terse(503, "temporarily_unavailable", {**_NO_STORE, "Retry-After": "1"})
        except InvalidRequest:
            return terse(400, "invalid_request", _NO_STORE)
        # Anything else is the boundary's 500 (logged, never echoed).
        return web.json_response(report_json(done), headers=_NO_STORE)

    return handle
