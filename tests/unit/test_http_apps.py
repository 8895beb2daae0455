"""The public and ops HTTP apps over real loopback HTTP, against an in-memory PublicApi."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fedtoken.config import Settings
from fedtoken.core.errors import InvalidRequest, StoreUnavailable, TenantNotFound
from fedtoken.core.model import KeyRecord, KeyState, Reason, Tenant
from fedtoken.core.ports import CallContext
from fedtoken.http import combine, create_ops_app, create_public_app, start_site
from fedtoken.service.types import Introspection, KeySet

BASE = "https://tokens.example"
SECRET = "s3cret:with%odd chars"
SETTINGS = Settings(
    public_url=BASE + "/",
    introspection_clients=f"rs-test:{hashlib.sha256(SECRET.encode()).hexdigest()}",
)
FORM = "application/x-www-form-urlencoded"


def _key_set(tenant: Tenant, kid: str, etag: str, max_age: int = 123) -> KeySet:
    jwk = {"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": "AQAB", "e": "AQAB"}
    record = KeyRecord(kid, tenant.id, "RS256", 2048, KeyState.ACTIVE, jwk, f"label-{kid}")
    body = json.dumps({"keys": [jwk]}, separators=(",", ":")).encode()
    return KeySet(tenant, body, etag, max_age, (record,))


DEFAULT = _key_set(Tenant("default", BASE), "k-default", '"etag-default"')
ACME = _key_set(Tenant("acme", f"{BASE}/t/acme"), "k-acme", '"etag-acme"', max_age=60)

CLAIMS: dict[str, Any] = {
    "iss": BASE, "sub": "quinn", "aud": "svc-a", "exp": 2000, "iat": 1000, "nbf": 1000,
    "jti": "jti-1", "scope": "read", "client_id": "app-1", "custom": "not reported",
}


class FakeApi:
    """In-memory PublicApi: key sets by tenant, one introspection answer."""

    def __init__(self) -> None:
        self.key_sets = {"": DEFAULT, "acme": ACME}
        self.key_error: Exception | None = None
        self.answer = Introspection(True, Reason.OK, dict(CLAIMS), "default", "k-default")
        self.introspect_error: Exception | None = None
        self.calls: list[tuple[str, CallContext]] = []

    async def key_set(self, tenant: str) -> KeySet:
        if self.key_error is not None:
            raise self.key_error
        if tenant == "not a valid id!":
            raise InvalidRequest("bad tenant id", field="tenant")
        try:
            return self.key_sets[tenant]
        except KeyError:
            raise TenantNotFound("no such tenant", tenant=tenant) from None

    async def introspect(self, token: str, ctx: CallContext) -> Introspection:
        self.calls.append((token, ctx))
        if self.introspect_error is not None:
            raise self.introspect_error
        return self.answer


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
async def http(api: FakeApi) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(create_public_app(api, SETTINGS))) as client:
        yield client


def _basic(client_id: str, secret: str) -> dict[str, str]:
    from urllib.parse import quote_plus

    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


GOOD = _basic("rs-test", SECRET)


# --- JWKS ---------------------------------------------------------------------


async def test_jwks_has_caching_headers_and_answers_304(http: TestClient[Any, Any]) -> None:
    resp = await http.get("/.well-known/jwks.json")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/jwk-set+json")
    assert resp.headers["Cache-Control"] == "public, max-age=123"
    assert resp.headers["ETag"] == '"etag-default"'
    assert await resp.read() == DEFAULT.jwks_json
    for inm in ('"etag-default"', 'W/"etag-default"', '"x", "etag-default"', "*"):
        resp = await http.get("/.well-known/jwks.json", headers={"If-None-Match": inm})
        assert resp.status == 304, inm
        assert await resp.read() == b""
        assert resp.headers["ETag"] == '"etag-default"'
        assert resp.headers["Cache-Control"] == "public, max-age=123"
    resp = await http.get("/.well-known/jwks.json", headers={"If-None-Match": '"other"'})
    assert resp.status == 200


async def test_tenant_jwks(http: TestClient[Any, Any]) -> None:
    resp = await http.get("/t/acme/.well-known/jwks.json")
    assert resp.status == 200
    assert await resp.read() == ACME.jwks_json
    assert resp.headers["ETag"] == '"etag-acme"'
    assert resp.headers["Cache-Control"] == "public, max-age=60"


@pytest.mark.parametrize("path", ["/t/nope/.well-known/jwks.json",
                                  "/t/nope/.well-known/openid-configuration",
                                  "/t/not a valid id!/.well-known/jwks.json"])
async def test_unknown_tenant_is_404(http: TestClient[Any, Any], path: str) -> None:
    resp = await http.get(path)
    assert resp.status == 404
    assert await resp.json() == {"error": "tenant_not_found"}


@pytest.mark.parametrize("path", ["/.well-known/jwks.json",
                                  "/t/acme/.well-known/openid-configuration"])
async def test_keys_unavailable_is_503(http: TestClient[Any, Any], api: FakeApi,
                                       path: str) -> None:
    api.key_error = StoreUnavailable("postgres is down")
    resp = await http.get(path)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert await resp.json() == {"error": "keys_unavailable"}


# --- discovery ----------------------------------------------------------------


async def test_default_discovery(http: TestClient[Any, Any]) -> None:
    resp = await http.get("/.well-known/openid-configuration")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["Cache-Control"] == "public, max-age=123"
    meta = await resp.json()
    assert meta["issuer"] == BASE
    assert meta["jwks_uri"] == f"{BASE}/.well-known/jwks.json"
    assert meta["introspection_endpoint"] == f"{BASE}/introspect"
    assert meta["introspection_endpoint_auth_methods_supported"] == [
        "client_secret_basic", "client_secret_post"]
    assert meta["id_token_signing_alg_values_supported"] == ["RS256"]
    assert meta["subject_types_supported"] == ["public"]
    assert meta["response_types_supported"] == ["token"]
    assert "scope" in meta["claims_supported"]
    etag = resp.headers["ETag"]
    assert etag != DEFAULT.etag  # not the JWKS's: a different representation
    resp = await http.get("/.well-known/openid-configuration", headers={"If-None-Match": etag})
    assert resp.status == 304


async def test_tenant_discovery(http: TestClient[Any, Any]) -> None:
    resp = await http.get("/t/acme/.well-known/openid-configuration")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "public, max-age=60"
    meta = await resp.json()
    assert meta["issuer"] == f"{BASE}/t/acme"
    assert meta["jwks_uri"] == f"{BASE}/t/acme/.well-known/jwks.json"
    assert meta["introspection_endpoint"] == f"{BASE}/introspect"


# --- introspection ------------------------------------------------------------


@pytest.mark.parametrize("headers,form", [
    ({}, {"token": "t"}),
    (_basic("rs-test", "wrong"), {"token": "t"}),
    (_basic("nobody", SECRET), {"token": "t"}),
    (_basic("", ""), {"token": "t"}),
    ({"Authorization": "Basic !!!not-base64"}, {"token": "t"}),
    ({}, {"token": "t", "client_id": "rs-test", "client_secret": "wrong"}),
    ({}, {"token": "t", "client_id": "rs-test"}),
])
async def test_unauthenticated_callers_get_401_and_learn_nothing(
    http: TestClient[Any, Any], api: FakeApi, headers: dict[str, str], form: dict[str, str]
) -> None:
    resp = await http.post("/introspect", data=form, headers=headers)
    assert resp.status == 401
    assert await resp.json() == {"error": "invalid_client"}
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert resp.headers["Cache-Control"] == "no-store"
    assert api.calls == []


async def test_basic_auth_gets_the_rfc7662_fields(http: TestClient[Any, Any],
                                                  api: FakeApi) -> None:
    resp = await http.post("/introspect", headers=GOOD,
                           data={"token": "tok-1", "token_type_hint": "access_token"})
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert await resp.json() == {
        "active": True, "token_type": "Bearer", "scope": "read", "client_id": "app-1",
        "sub": "quinn", "iss": BASE, "jti": "jti-1", "exp": 2000, "iat": 1000, "nbf": 1000,
        "aud": "svc-a", "tenant": "default", "kid": "k-default",
    }
    [(token, ctx)] = api.calls
    assert token == "tok-1"
    assert ctx.principal.identity == ""
    assert ctx.principal.declared == "introspection:rs-test"
    assert ctx.principal.peer == "127.0.0.1"
    assert len(ctx.request_id) == 32 and int(ctx.request_id, 16) >= 0


async def test_client_secret_post_also_works(http: TestClient[Any, Any], api: FakeApi) -> None:
    resp = await http.post("/introspect", data={"token": "tok-2", "client_id": "rs-test",
                                                "client_secret": SECRET})
    assert resp.status == 200
    assert (await resp.json())["active"] is True
    assert [t for t, _ in api.calls] == ["tok-2"]
    assert api.calls[0][1].principal.declared == "introspection:rs-test"


async def test_every_call_gets_its_own_request_id(http: TestClient[Any, Any],
                                                  api: FakeApi) -> None:
    for _ in range(2):
        assert (await http.post("/introspect", headers=GOOD, data={"token": "t"})).status == 200
    assert api.calls[0][1].request_id != api.calls[1][1].request_id


async def test_inactive_token_reveals_nothing(http: TestClient[Any, Any], api: FakeApi) -> None:
    api.answer = Introspection(False, Reason.REVOKED, dict(CLAIMS), "default", "k-default")
    resp = await http.post("/introspect", headers=GOOD, data={"token": "t"})
    assert resp.status == 200
    assert await resp.json() == {"active": False}


async def test_an_invalid_token_request_is_inactive(http: TestClient[Any, Any],
                                                    api: FakeApi) -> None:
    api.introspect_error = InvalidRequest("token too long", field="token")
    resp = await http.post("/introspect", headers=GOOD, data={"token": "t"})
    assert resp.status == 200
    assert await resp.json() == {"active": False}


async def test_several_audiences_and_odd_claims(http: TestClient[Any, Any],
                                                api: FakeApi) -> None:
    claims = {"sub": "s", "aud": ["a", 7, "b"], "exp": True, "iat": "1000", "scope": ""}
    api.answer = Introspection(True, Reason.OK, claims, "acme", "k-acme")
    body = await (await http.post("/introspect", headers=GOOD, data={"token": "t"})).json()
    assert body == {"active": True, "token_type": "Bearer", "sub": "s", "aud": ["a", "b"],
                    "tenant": "acme", "kid": "k-acme"}


async def test_introspection_unavailable_is_503(http: TestClient[Any, Any],
                                                api: FakeApi) -> None:
    api.introspect_error = StoreUnavailable("postgres is down")
    resp = await http.post("/introspect", headers=GOOD, data={"token": "t"})
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert resp.headers["Cache-Control"] == "no-store"
    assert await resp.json() == {"error": "temporarily_unavailable"}


async def test_bad_introspection_requests(http: TestClient[Any, Any], api: FakeApi) -> None:
    assert (await http.post("/introspect", headers=GOOD, data={})).status == 400
    resp = await http.post("/introspect", headers={**GOOD, "Content-Type": FORM},
                           data="token=a&token=b")
    assert resp.status == 400
    resp = await http.post("/introspect", headers=GOOD, json={"token": "x"})
    assert resp.status == 400
    resp = await http.post("/introspect", headers=GOOD, data={"token": "x" * 40_000})
    assert resp.status == 413
    assert api.calls == []


# --- ops ----------------------------------------------------------------------


async def test_healthz_reports_ok_and_unavailable() -> None:
    state: dict[str, Any] = {"healthy": True}

    async def health() -> tuple[bool, dict[str, object]]:
        if state.get("raise"):
            raise RuntimeError("probe broke")
        return state["healthy"], {"revocation": "fresh", "status": "ignored"}

    async with TestClient(TestServer(create_ops_app(health))) as client:
        resp = await client.get("/healthz")
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "revocation": "fresh"}
        state["healthy"] = False
        resp = await client.get("/healthz")
        assert resp.status == 503
        assert await resp.json() == {"status": "unavailable", "revocation": "fresh"}
        state["raise"] = True
        resp = await client.get("/healthz")
        assert resp.status == 503
        assert await resp.json() == {"status": "unavailable"}


async def _healthy() -> tuple[bool, dict[str, object]]:
    return True, {}


async def test_combine_serves_healthz_next_to_the_public_routes(api: FakeApi) -> None:
    app = combine(create_public_app(api, SETTINGS), create_ops_app(_healthy))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200
        assert (await client.head("/healthz")).status == 200
        assert (await client.get("/.well-known/jwks.json")).status == 200


async def test_start_site_reports_the_bound_port(api: FakeApi) -> None:
    app = combine(create_public_app(api, SETTINGS), create_ops_app(_healthy))
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        assert port > 0
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}
    finally:
        await runner.cleanup()


async def test_combine_refuses_what_it_cannot_carry(api: FakeApi) -> None:
    ops = create_ops_app(_healthy)

    async def on_startup(_app: web.Application) -> None:
        return None

    ops.on_startup.append(on_startup)
    with pytest.raises(ValueError, match="routes only"):
        combine(create_public_app(api, SETTINGS), ops)
