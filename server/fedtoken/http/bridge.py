"""HTTP bridge: serves JWKS and OIDC discovery metadata over HTTP.

It is a client of TokenService.GetKeys, so it can run next to the gRPC server
or alone in front of a remote one. Responses are served from memory, with a
strong ETag (304 on If-None-Match) and a Cache-Control max-age that the
server derives from its rotation schedule.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import grpc
from aiohttp import web

from fedtoken.config import Settings, parse_introspection_clients
from fedtoken_client._pb.fedtoken.v1 import token_service_pb2, token_service_pb2_grpc

# How long the bridge reuses a GetKeys answer before asking again. Short, so
# a key change is visible within a second; the HTTP max-age is separate.
_REFRESH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class KeysDoc:
    tenant: str
    issuer: str
    body: bytes
    etag: str
    max_age: int
    algorithms: tuple[str, ...]
    fetched: float


class TenantUnknown(Exception):
    """GetKeys said NOT_FOUND."""


class KeysUnavailable(Exception):
    """GetKeys could not be answered (server down or failing)."""


class GrpcKeySource:
    """The bridge's gRPC side: cached GetKeys answers per tenant (one call in
    flight each), and Introspect on behalf of authenticated HTTP callers."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = token_service_pb2_grpc.TokenServiceStub(self._channel)
        self._cache: dict[str, KeysDoc] = {}
        self._inflight: dict[str, asyncio.Future[KeysDoc]] = {}

    async def close(self) -> None:
        await self._channel.close()

    async def get(self, tenant: str) -> KeysDoc:
        doc = self._cache.get(tenant)
        if doc is not None and time.monotonic() - doc.fetched < _REFRESH_SECONDS:
            return doc
        pending = self._inflight.get(tenant)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(tenant))
            self._inflight[tenant] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(tenant, None))
        return await asyncio.shield(pending)

    async def introspect(self, token: str, hint: str,
                         caller: str) -> token_service_pb2.IntrospectResponse:
        try:
            resp: token_service_pb2.IntrospectResponse = await self._stub.Introspect(
                token_service_pb2.IntrospectRequest(token=token, token_type_hint=hint),
                timeout=5, metadata=(("x-fedtoken-caller", caller),),
            )
        except grpc.aio.AioRpcError as exc:
            raise KeysUnavailable(exc.code().name) from exc
        return resp

    async def _fetch(self, tenant: str) -> KeysDoc:
        try:
            resp = await self._stub.GetKeys(token_service_pb2.GetKeysRequest(tenant=tenant),
                                            timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                self._cache.pop(tenant, None)
                raise TenantUnknown(tenant) from exc
            raise KeysUnavailable(exc.code().name) from exc
        algs = tuple(sorted({k.alg for k in resp.keys} or {"RS256"}))
        doc = KeysDoc(resp.tenant, resp.issuer, resp.jwks_json, resp.etag,
                      resp.max_age_seconds, algs, time.monotonic())
        self._cache[tenant] = doc
        return doc


def _etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    candidates = [c.strip() for c in header.split(",")]
    # Weak comparison for If-None-Match (RFC 9110 section 13.1.2).
    return any(c.removeprefix("W/") == etag for c in candidates)


_DUMMY_DIGEST = hashlib.sha256(b"fedtoken: no such client").digest()
_MAX_FORM_BYTES = 32 * 1024


class _ClientAuth:
    """RFC 6749 section 2.3.1 client authentication for the introspection
    endpoint: client_secret_basic or client_secret_post, checked in constant
    time against configured SHA-256 digests."""

    def __init__(self, clients: dict[str, bytes]) -> None:
        self._clients = clients

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


def _introspection_body(resp: token_service_pb2.IntrospectResponse) -> dict[str, Any]:
    if not resp.active:
        # RFC 7662 section 2.2: an inactive token reveals nothing else.
        return {"active": False}
    body: dict[str, Any] = {"active": True, "token_type": resp.token_type}
    for name in ("scope", "client_id", "sub", "iss", "jti"):
        value = getattr(resp, name)
        if value:
            body[name] = value
    for name in ("exp", "iat", "nbf"):
        value = getattr(resp, name)
        if value:
            body[name] = value
    if resp.aud:
        body["aud"] = resp.aud[0] if len(resp.aud) == 1 else list(resp.aud)
    body["tenant"], body["kid"] = resp.tenant, resp.kid
    return body


def create_http_app(source: GrpcKeySource, settings: Settings) -> web.Application:
    base = settings.http_public_url
    auth = _ClientAuth(parse_introspection_clients(settings.introspection_clients))

    def tenant_of(request: web.Request) -> str:
        return request.match_info.get("tenant", "")

    async def load(request: web.Request) -> KeysDoc:
        try:
            return await source.get(tenant_of(request))
        except TenantUnknown:
            raise web.HTTPNotFound(
                text=json.dumps({"error": "tenant_not_found"}), content_type="application/json"
            ) from None
        except KeysUnavailable:
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": "keys_unavailable"}), content_type="application/json",
                headers={"Retry-After": "1"},
            ) from None

    def cached(request: web.Request, body: bytes, etag: str, max_age: int,
               content_type: str) -> web.Response:
        headers = {"ETag": etag, "Cache-Control": f"public, max-age={max_age}"}
        inm = request.headers.get("If-None-Match")
        if inm is not None and _etag_matches(inm, etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers=headers, content_type=content_type)

    async def jwks(request: web.Request) -> web.Response:
        doc = await load(request)
        return cached(request, doc.body, doc.etag, doc.max_age, "application/jwk-set+json")

    async def discovery(request: web.Request) -> web.Response:
        doc = await load(request)
        prefix = f"{base}/t/{doc.tenant}" if tenant_of(request) else base
        meta = {
            "issuer": doc.issuer,
            "jwks_uri": f"{prefix}/.well-known/jwks.json",
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": list(doc.algorithms),
            "token_endpoint_auth_methods_supported": ["none"],
            "response_types_supported": ["token"],
            "grant_types_supported": [],
            "claims_supported": ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope",
                                 "client_id"],
            "introspection_endpoint": f"{base}/introspect",
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic",
                                                              "client_secret_post"],
        }
        body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
        # The document changes exactly when the key set does.
        return cached(request, body, doc.etag[:-1] + '-d"', doc.max_age, "application/json")

    async def introspect(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-store"}
        if request.content_length is not None and request.content_length > _MAX_FORM_BYTES:
            return web.json_response({"error": "invalid_request"}, status=413, headers=headers)
        if request.content_type != "application/x-www-form-urlencoded":
            return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
        raw = await request.content.read(_MAX_FORM_BYTES + 1)
        if len(raw) > _MAX_FORM_BYTES:
            return web.json_response({"error": "invalid_request"}, status=413, headers=headers)
        try:
            pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            pairs = []
        form = dict(pairs)
        client = auth.authenticate(request, form)
        if client is None:
            # Unauthenticated callers learn nothing about the token.
            return web.json_response(
                {"error": "invalid_client"}, status=401,
                headers={**headers, "WWW-Authenticate": 'Basic realm="fedtoken"'},
            )
        token = form.get("token", "")
        if not token or len([k for k, _ in pairs if k == "token"]) != 1:
            return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
        try:
            resp = await source.introspect(token, form.get("token_type_hint", "")[:64],
                                           f"introspection:{client}")
        except KeysUnavailable:
            return web.json_response({"error": "temporarily_unavailable"}, status=503,
                                     headers={**headers, "Retry-After": "1"})
        return web.json_response(_introspection_body(resp), headers=headers)

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=_MAX_FORM_BYTES)
    app.router.add_post("/introspect", introspect)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/t/{tenant}/.well-known/jwks.json", jwks)
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/t/{tenant}/.well-known/openid-configuration", discovery)
    app.router.add_get("/healthz", health)
    return app
