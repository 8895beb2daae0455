"""The public and ops HTTP apps over real loopback HTTP, against an in-memory PublicApi."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
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
from fedtoken.http import HttpLimits, combine, create_ops_app, create_public_app, start_site
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


# --- hardening: terse errors, one auth method, absurd tenants, access log ----------

MARK = "zz-echo-marker-7f3a"
ACCESS = "fedtoken.http.access"


class StrictApi(FakeApi):
    """Like the real service once it chokes on a name it could never hold
    (the probe's 4,000-character tenant answered 503)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    async def key_set(self, tenant: str) -> KeySet:
        self.asked.append(tenant)
        if len(tenant) > 63:
            raise StoreUnavailable("value too long for type character varying(63)")
        return await super().key_set(tenant)


@pytest.mark.parametrize("route", [".well-known/jwks.json", ".well-known/openid-configuration"])
async def test_a_tenant_that_cannot_exist_is_404_without_asking_the_service(route: str) -> None:
    api = StrictApi()
    async with TestClient(TestServer(create_public_app(api, SETTINGS))) as client:
        for name in ("a" * 4000, "a" * 64, "UPPER", "-leading"):
            resp = await client.get(f"/t/{name}/{route}")
            assert resp.status == 404, name
            assert await resp.json() == {"error": "tenant_not_found"}
        assert api.asked == []
        assert (await client.get(f"/t/acme/{route}")).status == 200


@pytest.mark.parametrize("method,path,status,error", [
    ("GET", f"/{MARK}?token={MARK}", 404, "not_found"),
    ("GET", f"/t/acme/.well-known/{MARK}", 404, "not_found"),
    ("DELETE", "/introspect", 405, "method_not_allowed"),
    ("POST", f"/.well-known/jwks.json?{MARK}", 405, "method_not_allowed"),
])
async def test_framework_errors_get_terse_json(http: TestClient[Any, Any], method: str,
                                               path: str, status: int, error: str) -> None:
    resp = await http.request(method, path, headers={"X-Probe": MARK})
    assert resp.status == status
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.read()
    assert json.loads(body) == {"error": error}
    assert MARK.encode() not in body
    if status == 405:
        assert resp.headers["Allow"]


async def test_a_handler_crash_is_a_terse_500(api: FakeApi,
                                              caplog: pytest.LogCaptureFixture) -> None:
    api.key_error = RuntimeError(f"bug with {MARK}")
    async with TestClient(TestServer(create_public_app(api, SETTINGS))) as client:
        resp = await client.get("/.well-known/jwks.json")
        assert resp.status == 500
        body = await resp.read()
        assert json.loads(body) == {"error": "server_error"}
        assert MARK.encode() not in body


@pytest.mark.parametrize("form", [
    {"token": "t", "client_id": "rs-test", "client_secret": SECRET},
    {"token": "t", "client_secret": SECRET},
    {"token": "t", "client_id": "rs-test"},
])
async def test_basic_and_post_credentials_together_are_refused(
    http: TestClient[Any, Any], api: FakeApi, form: dict[str, str]
) -> None:
    resp = await http.post("/introspect", headers=GOOD, data=form)
    assert resp.status == 400
    assert await resp.json() == {"error": "invalid_request"}
    assert resp.headers["Cache-Control"] == "no-store"
    assert api.calls == []


@pytest.mark.parametrize("body", [
    f"token=t&client_id=rs-test&client_secret=x&client_secret={SECRET}",
    "token=t&client_id=nobody&client_id=rs-test&client_secret=" + SECRET,
    "token=t&token_type_hint=a&token_type_hint=b&client_id=rs-test&client_secret=" + SECRET,
])
async def test_repeated_parameters_are_refused(http: TestClient[Any, Any], api: FakeApi,
                                               body: str) -> None:
    from urllib.parse import quote

    body = body.replace(SECRET, quote(SECRET, safe=""))
    resp = await http.post("/introspect", data=body, headers={"Content-Type": FORM})
    assert resp.status == 400
    assert await resp.json() == {"error": "invalid_request"}
    assert api.calls == []


async def test_two_authorization_headers_are_refused(http: TestClient[Any, Any],
                                                     api: FakeApi) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict([("Authorization", GOOD["Authorization"]),
                           ("Authorization", _basic("rs-test", "wrong")["Authorization"])])
    resp = await http.post("/introspect", data={"token": "t"}, headers=headers)
    assert resp.status == 400
    assert api.calls == []


def _access(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ACCESS]


async def test_access_log_has_one_line_per_request_and_no_secrets(
    http: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJxdWlubiJ9.c2lnbmF0dXJlLWJ5dGVz"
    assert (await http.post("/introspect", headers=GOOD, data={"token": token})).status == 200
    assert (await http.post("/introspect", data={"token": token, "client_id": "rs-test",
                                                 "client_secret": SECRET})).status == 200
    wrong = _basic("rs-test", "guessed-secret")
    assert (await http.post("/introspect", headers=wrong, data={"token": token})).status == 401
    assert (await http.post("/introspect", data={"token": token})).status == 401
    both = {"token": token, "client_secret": SECRET}
    assert (await http.post("/introspect", headers=GOOD, data=both)).status == 400
    assert (await http.get(f"/t/acme/.well-known/jwks.json?token={token}")).status == 200
    assert (await http.get(f"/{MARK}")).status == 404
    lines = _access(caplog)
    assert len(lines) == 7, lines
    ok, ok_post, bad, anonymous, conflict, jwks, unknown = lines
    assert ok.startswith("POST /introspect 200 ") and "client=rs-test" in ok
    assert ok_post.startswith("POST /introspect 200 ") and "client=rs-test" in ok_post
    assert bad.startswith("POST /introspect 401 ") and "auth=failed" in bad
    assert "client=-" in bad
    assert anonymous.startswith("POST /introspect 401 ") and "auth=failed" in anonymous
    assert conflict.startswith("POST /introspect 400 ") and "auth=conflict" in conflict
    assert jwks.startswith("GET /t/{tenant}/.well-known/jwks.json 200 ")
    assert unknown.startswith("GET - 404 ")
    for line in lines:
        assert "ms " in line and "127.0.0.1" in line
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (token, *token.split("."), SECRET, "guessed-secret", MARK, "Basic",
                   GOOD["Authorization"].split()[1], wrong["Authorization"].split()[1]):
        assert secret not in text


# --- hardening over real sockets: start_site's limits ------------------------------


async def _exchange(port: int, data: bytes, *, pause: float = 0.0,
                    more: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if more:
            await writer.drain()
            await asyncio.sleep(pause)
            writer.write(more)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def _status_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
async def site(api: FakeApi) -> AsyncIterator[int]:
    app = combine(create_public_app(api, SETTINGS), create_ops_app(_healthy))
    limits = HttpLimits(read_timeout=0.5, keepalive_timeout=5.0, max_connections=8)
    runner, port = await start_site(app, "127.0.0.1", 0, limits=limits)
    yield port
    await runner.cleanup()


@pytest.mark.parametrize("raw", [
    b"GE\x01T / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + MARK.encode() + b" no colon\r\n\r\n",
    b"GET /t/" + MARK.encode() * 600 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + MARK.encode() * 600 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(200)) + b"\r\n",
])
async def test_malformed_http_is_a_terse_400_logged_in_one_line(
    site: int, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    status, body = _status_body(await _exchange(site, raw))
    assert status == 400
    assert json.loads(body) == {"error": "invalid_request"}
    records = [r for r in caplog.records if r.name.startswith(("aiohttp", "fedtoken"))]
    assert all(r.exc_info is None for r in records), [r.getMessage() for r in records]
    assert all(MARK not in r.getMessage() for r in records)
    [line] = _access(caplog)
    assert line.startswith("- - 400 ") and "malformed=" in line


async def test_a_body_in_two_segments_is_read_whole(site: int, api: FakeApi) -> None:
    form = b"token=" + b"t" * 5000
    head = (b"POST /introspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Authorization: " + GOOD["Authorization"].encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(form))
    status, _ = _status_body(await _exchange(site, head + form[:100], pause=0.1,
                                             more=form[100:]))
    assert status == 200
    assert [t for t, _ in api.calls] == ["t" * 5000]


async def test_an_unfinished_body_is_a_408_at_the_read_timeout(site: int,
                                                               api: FakeApi) -> None:
    head = (b"POST /introspect HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Authorization: " + GOOD["Authorization"].encode() + b"\r\n"
            b"Content-Length: 100\r\n\r\ntoken=abc")
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = _status_body(await _exchange(site, head))
    assert status == 408 and json.loads(body) == {"error": "invalid_request"}
    assert loop.time() - started < 3
    assert api.calls == []


async def test_half_open_connections_are_closed_and_others_served(site: int) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    conns = [await asyncio.open_connection("127.0.0.1", site) for _ in range(6)]
    try:
        for i, (_, writer) in enumerate(conns):
            writer.write(b"GET /healthz HT"[: i * 3])
            await writer.drain()
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{site}/healthz") as resp:
            assert resp.status == 200
        for reader, _ in conns:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.4 <= loop.time() - started < 5
    finally:
        for _, writer in conns:
            writer.close()


async def test_a_keepalive_connection_gets_a_fresh_read_timeout(site: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", site)
    try:
        for _ in range(3):  # three requests 0.3 s apart: each within its own timeout
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            await asyncio.sleep(0.3)
            writer.write(b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.write(b"GET /healthz HT")  # and a fourth that never ends
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_connections_over_the_limit_get_503_at_once(
    site: int, caplog: pytest.LogCaptureFixture
) -> None:
    conns = [await asyncio.open_connection("127.0.0.1", site) for _ in range(8)]
    try:
        await asyncio.sleep(0.05)
        status, body = _status_body(await _exchange(site, b"GET /healthz HTTP/1.1\r\n\r\n"))
        assert status == 503 and json.loads(body) == {"error": "temporarily_unavailable"}
        assert any("limit" in r.getMessage() for r in caplog.records
                   if r.name.startswith("fedtoken.http"))
    finally:
        for _, writer in conns:
            writer.close()
    await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{site}/healthz") as resp:
        assert resp.status == 200


async def test_start_site_takes_its_limits_from_the_settings(api: FakeApi) -> None:
    settings = dataclasses.replace(SETTINGS, http_read_timeout_seconds=0.3)
    app = create_public_app(api, settings)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - started < 2
        writer.close()
    finally:
        await runner.cleanup()
