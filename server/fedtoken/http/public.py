"""The public HTTP app: JWKS, OIDC discovery and RFC 7662 introspection.

It calls the service in process through ``PublicApi``; the key sets come
from the catalog's in-memory snapshot, so nothing is cached here. Key sets
and discovery documents carry a strong ETag (304 on If-None-Match) and a
Cache-Control max-age taken from the ``KeySet`` (today the
``jwks_max_age_seconds`` setting).

Every error body is a fixed {"error": code}; the access log, the read
timeout and the connection limits are ``fedtoken.http.guard``'s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from fedtoken.config import Settings, parse_introspection_clients
from fedtoken.core.errors import (
    FedtokenError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from fedtoken.core.policy import is_tenant_id
from fedtoken.core.ports import CallContext, Principal
from fedtoken.http.compliance import ReportCall, compliance_handler
from fedtoken.http.guard import (
    LIMITS_KEY,
    NOTE_KEY,
    HttpLimits,
    Note,
    boundary,
    peer_certificate,
    terse,
)
from fedtoken.service.types import Exchanged, ExchangeParams, Introspection, KeySet

__all__ = ["PublicApi", "create_public_app"]


class PublicApi(Protocol):
    """What the public app needs from the service."""

    async def key_set(self, tenant: str) -> KeySet:
        """The tenant's published keys; "" is the default tenant.

        Raises NotFound (or InvalidRequest, for a malformed id) for an
        unknown tenant and Unavailable when the keys cannot be read.
        """
        ...

    async def introspect(self, token: str, ctx: CallContext) -> Introspection:
        """The real-time state of ``token``; raises Unavailable when it
        cannot be decided."""
        ...

    async def exchange(self, params: ExchangeParams, ctx: CallContext) -> Exchanged:
        """Token exchange (``fedtoken.service.exchange``) for an authenticated caller."""
        ...


_MAX_FORM_BYTES = 32 * 1024
_DUMMY_DIGEST = hashlib.sha256(b"fedtoken: no such client").digest()
_CLAIMS_SUPPORTED = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "client_id"]
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
_JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
# Form parameters of the token endpoint that may repeat (RFC 8693 section 2.1).
_REPEATABLE = frozenset({"audience"})


def _no_identity(der: bytes | None) -> str:
    raise Unauthenticated("this bridge authenticates no workloads")


def _etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    # Weak comparison for If-None-Match (RFC 9110 section 13.1.2).
    return any(c.strip().removeprefix("W/") == etag for c in header.split(","))


class _ClientAuth:
    """RFC 6749 section 2.3.1 client authentication for the introspection
    endpoint: client_secret_basic or client_secret_post, checked in constant
    time against configured SHA-256 digests."""

    def __init__(self, clients: dict[str, bytes]) -> None:
        self._clients = clients

    @staticmethod
    def conflicting(request: web.Request, form: dict[str, str]) -> bool:
        """More than one authentication method (RFC 6749 section 2.3: "MUST
        NOT"), or more than one Authorization header."""
        headers = request.headers.getall("Authorization", [])
        return len(headers) > 1 or (bool(headers) and ("client_id" in form
                                                       or "client_secret" in form))

    def authenticate(self, request: web.Request, form: dict[str, str]) -> str | None:
        client_id = secret = None
        header = request.headers.get("Authorization", "")
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                return None
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        elif "client_id" in form and "client_secret" in form:
            client_id, secret = form["client_id"], form["client_secret"]
        if not client_id or secret is None:
            return None
        expected = self._clients.get(client_id, _DUMMY_DIGEST)
        given = hashlib.sha256(secret.encode("utf-8")).digest()
        if hmac.compare_digest(given, expected) and client_id in self._clients:
            return client_id
        return None


def _introspection_body(result: Introspection) -> dict[str, Any]:
    """The RFC 7662 response: only well-typed, non-empty claims are reported."""
    if not result.active:
        # RFC 7662 section 2.2: an inactive token reveals nothing else.
        return {"active": False}
    claims = result.claims
    body: dict[str, Any] = {"active": True, "token_type": "Bearer"}
    for name in ("scope", "client_id", "sub", "iss", "jti"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            body[name] = value
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name)
        if type(value) is int and value:
            body[name] = value
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else [a for a in aud or [] if isinstance(a, str)]
    if auds:
        body["aud"] = auds[0] if len(auds) == 1 else auds
    body["tenant"], body["kid"] = result.tenant, result.kid
    return body


def _json_error(exc: type[web.HTTPException], error: str,
                headers: dict[str, str] | None = None) -> web.HTTPException:
    return exc(text=json.dumps({"error": error}), content_type="application/json",
               headers=headers)


def create_public_app(api: PublicApi, settings: Settings,
                      identity_of: Callable[[bytes | None], str] = _no_identity,
                      compliance_report: ReportCall | None = None) -> web.Application:
    """``identity_of``: the caller's SPIFFE ID from its verified client
    certificate (DER; raises Unauthenticated), for the token endpoint and the
    compliance report (``GET /compliance``, auditors and admins only)."""
    base = settings.http_public_url
    auth = _ClientAuth(parse_introspection_clients(settings.introspection_clients))

    def tenant_of(request: web.Request) -> str:
        return request.match_info.get("tenant", "")

    async def load(request: web.Request) -> KeySet:
        tenant = tenant_of(request)
        if tenant and not is_tenant_id(tenant):
            # A name no tenant can have is unknown; the service is not asked.
            raise _json_error(web.HTTPNotFound, "tenant_not_found")
        try:
            return await api.key_set(tenant)
        except (NotFound, InvalidRequest):
            raise _json_error(web.HTTPNotFound, "tenant_not_found") from None
        except Unavailable:
            raise _json_error(web.HTTPServiceUnavailable, "keys_unavailable",
                              {"Retry-After": "1"}) from None

    def not_modified(request: web.Request, headers: dict[str, str]) -> bool:
        inm = request.headers.get("If-None-Match")
        return inm is not None and _etag_matches(inm, headers["ETag"])

    def cache_headers(etag: str, max_age: int) -> dict[str, str]:
        return {"ETag": etag, "Cache-Control": f"public, max-age={max_age}"}

    async def jwks(request: web.Request) -> web.Response:
        ks = await load(request)
        headers = cache_headers(ks.etag, ks.max_age)
        if not_modified(request, headers):
            return web.Response(status=304, headers=headers)
        return web.Response(body=ks.jwks_json, headers=headers,
                            content_type="application/jwk-set+json")

    async def discovery(request: web.Request) -> web.Response:
        ks = await load(request)
        # The document changes exactly when the key set does (per URL).
        headers = cache_headers(ks.etag[:-1] + '-d"', ks.max_age)
        if not_modified(request, headers):
            return web.Response(status=304, headers=headers)
        prefix = f"{base}/t/{ks.tenant.id}" if tenant_of(request) else base
        meta = {
            "issuer": ks.tenant.issuer,
            "jwks_uri": f"{prefix}/.well-known/jwks.json",
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": list(ks.algorithms),
            "token_endpoint": f"{prefix}/token",
            "token_endpoint_auth_methods_supported": ["tls_client_auth"],
            "response_types_supported": ["token"],
            "grant_types_supported": [TOKEN_EXCHANGE_GRANT],
            "claims_supported": _CLAIMS_SUPPORTED,
            "introspection_endpoint": f"{base}/introspect",
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic",
                                                              "client_secret_post"],
        }
        body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
        return web.Response(body=body, headers=headers, content_type="application/json")

    def note_of(request: web.Request) -> Note:
        note = request.get(NOTE_KEY)
        return note if note is not None else Note()

    async def read_form(request: web.Request) -> bytes | web.Response:
        """The whole body, within the read timeout and the size limit."""
        limits = request.app.get(LIMITS_KEY) or HttpLimits()
        try:
            async with asyncio.timeout(limits.read_timeout):
                return await request.read()
        except TimeoutError:
            note_of(request).marks.append("timeout=body")
            resp = terse(408, "invalid_request", {"Cache-Control": "no-store"})
            resp.force_close()
            return resp
        except web.HTTPRequestEntityTooLarge:
            return terse(413, "invalid_request", {"Cache-Control": "no-store"})

    async def form_pairs(request: web.Request, headers: dict[str, str]
                         ) -> list[tuple[str, str]] | web.Response:
        """The urlencoded form of a POST (RFC 6749 endpoints), within the size
        limit and the read timeout; [] when it is not ASCII (nothing in it can
        be used). A Response when the request must be refused as it is."""
        if request.content_length is not None and request.content_length > _MAX_FORM_BYTES:
            return web.json_response({"error": "invalid_request"}, status=413, headers=headers)
        if request.content_type != "application/x-www-form-urlencoded":
            return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
        raw = await read_form(request)
        if isinstance(raw, web.Response):
            return raw
        try:
            return parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            return []

    async def introspect(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-store"}
        note = note_of(request)
        pairs = await form_pairs(request, headers)
        if isinstance(pairs, web.Response):
            return pairs
        form = dict(pairs)
        if len(form) != len(pairs):
            # RFC 6749 section 3.2 / RFC 7662: no parameter more than once.
            return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
        if auth.conflicting(request, form):
            note.marks.append("auth=conflict")
            return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
        client = auth.authenticate(request, form)
        if client is None:
            # Unauthenticated callers learn nothing about the token.
            note.marks.append("auth=failed")
            return web.json_response(
                {"error": "invalid_client"}, status=401,
                headers={**headers, "WWW-Authenticate": 'Basic realm="fedtoken"'},
            )
        note.client = client
        token = form.get("token", "")
        if not token:
            return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
        # token_type_hint is optional and ignored: there is one kind of token.
        ctx = CallContext(
            principal=Principal(identity="", peer=request.remote or "",
                                declared=f"introspection:{client}"),
            request_id=uuid.uuid4().hex,
        )
        try:
            result = await api.introspect(token, ctx)
        except InvalidRequest:
            # A token this server could never have issued (e.g. too long).
            return web.json_response({"active": False}, headers=headers)
        except Unavailable:
            return web.json_response({"error": "temporarily_unavailable"}, status=503,
                                     headers={**headers, "Retry-After": "1"})
        return web.json_response(_introspection_body(result), headers=headers)

    async def token(request: web.Request) -> web.Response:
        """RFC 8693 token exchange. The caller is the workload of its client
        certificate (mTLS, RFC 8705 tls_client_auth), authorized as for the
        gRPC Exchange; without one the answer is invalid_client."""
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        note = note_of(request)

        def error(status: int, code: str) -> web.Response:
            return web.json_response({"error": code}, status=status, headers=headers)

        pairs = await form_pairs(request, headers)
        if isinstance(pairs, web.Response):
            return pairs
        if not pairs:
            return error(400, "invalid_request")
        form: dict[str, str] = {}
        audiences: list[str] = []
        for name, value in pairs:
            if name in _REPEATABLE:
                audiences.append(value)
            elif name in form:
                return error(400, "invalid_request")
            else:
                form[name] = value
        if form.get("grant_type") != TOKEN_EXCHANGE_GRANT:
            return error(400, "unsupported_grant_type")
        try:
            identity = identity_of(peer_certificate(request))
        except Unauthenticated:
            note.marks.append("auth=no-client-cert")
            return error(401, "invalid_client")
        note.client = identity
        requested = form.get("requested_token_type", "")
        if requested not in ("", _JWT_TOKEN_TYPE, "urn:ietf:params:oauth:token-type:access_token"):
            return error(400, "invalid_request")
        try:
            lifetime = int(form.get("lifetime_seconds", "0") or 0)
        except ValueError:
            return error(400, "invalid_request")
        params = ExchangeParams(
            subject_token=form.get("subject_token", ""), tenant=tenant_of(request),
            audience=audiences, subject_token_type=form.get("subject_token_type", ""),
            lifetime_seconds=lifetime, scope=form.get("scope", ""))
        ctx = CallContext(principal=Principal(identity=identity, peer=request.remote or ""),
                          request_id=uuid.uuid4().hex)
        try:
            done = await api.exchange(params, ctx)
        except PermissionDenied:
            return error(403, "unauthorized_client")
        except NotFound:
            return error(404, "invalid_target")
        except Unavailable:
            return web.json_response({"error": "temporarily_unavailable"}, status=503,
                                     headers={**headers, "Retry-After": "1"})
        except (InvalidRequest, FedtokenError):
            return error(400, "invalid_request")
        issued = done.issued
        body: dict[str, Any] = {
            "access_token": issued.token, "issued_token_type": _JWT_TOKEN_TYPE,
            "token_type": "Bearer", "expires_in": issued.expires_at - issued.issued_at,
        }
        if params.scope:
            body["scope"] = params.scope
        return web.json_response(body, headers=headers)

    app = web.Application(client_max_size=_MAX_FORM_BYTES, middlewares=[boundary])
    app[LIMITS_KEY] = HttpLimits.from_settings(settings)
    app.router.add_post("/introspect", introspect)
    app.router.add_post("/token", token)
    app.router.add_post("/t/{tenant}/token", token)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/t/{tenant}/.well-known/jwks.json", jwks)
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/t/{tenant}/.well-known/openid-configuration", discovery)
    if compliance_report is not None:
        app.router.add_get("/compliance", compliance_handler(compliance_report, identity_of))
    return app
