"""HTTP bridge: serves JWKS and OIDC discovery metadata over HTTP.

It is a client of TokenService.GetKeys, so it can run next to the gRPC server
or alone in front of a remote one. Responses are served from memory, with a
strong ETag (304 on If-None-Match) and a Cache-Control max-age that the
server derives from its rotation schedule.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import grpc
from aiohttp import web

from fedtoken.config import Settings
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
    """Fetches and caches GetKeys answers per tenant; one call in flight each."""

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


def create_http_app(source: GrpcKeySource, settings: Settings) -> web.Application:
    base = settings.http_public_url

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
        }
        body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
        # The document changes exactly when the key set does.
        return cached(request, body, doc.etag[:-1] + '-d"', doc.max_age, "application/json")

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/t/{tenant}/.well-known/jwks.json", jwks)
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/t/{tenant}/.well-known/openid-configuration", discovery)
    app.router.add_get("/healthz", health)
    return app
