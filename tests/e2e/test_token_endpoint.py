"""The bridge's RFC 8693 token endpoint over real TLS: A's HTTP bridge on the
dev PKI asks for a client certificate, and a workload with the issuer role
for tenant t exchanges a token of B (a real `fedtoken serve`) for one of t.
Without a certificate the answer is invalid_client; without the role,
unauthorized_client; malformed requests get their OAuth error codes."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fedtoken.core.jwk import b64url_decode
from fedtoken.hsm import HsmConfig
from fedtoken.tls.devca import ensure_dev_pki
from fedtoken_client import Tls
from tests._pg_fixture import create_database, drop_database
from tests.e2e.test_federation import Instance, a_settings, tenant_issuer, wait_for
from tests.support import ServerThread

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT = "urn:ietf:params:oauth:token-type:jwt"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str,
         hsm_config: HsmConfig) -> Iterator[tuple[ServerThread, Instance]]:
    names = [f"endpoint_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    a_dsn, b_dsn = (create_database(pg_dsn, n) for n in names)
    b = Instance(tmp_path_factory.mktemp("endpoint-b"), b_dsn, name="b").start()
    state = tmp_path_factory.mktemp("endpoint-a")
    pki = ensure_dev_pki(state)
    settings = a_settings(state)
    settings = type(settings)(**{**settings.__dict__, "http_tls_cert": str(pki.server.cert),
                                 "http_tls_key": str(pki.server.key)})
    a = ServerThread(settings, a_dsn, hsm_config).start()
    try:
        with a.client() as admin:
            admin.create_tenant("t")
            admin.add_trusted_issuer(b.issuer, tenants=["t"], max_stale_seconds=3600)

        def usable() -> bool:
            with a.client() as c:
                return all(i.key_set.usable for i in c.list_trusted_issuers())

        wait_for("A holds B's key set", usable)
        yield a, b
    finally:
        a.stop()
        b.stop()
        for n in names:
            drop_database(pg_dsn, n)


def post(a: ServerThread, form: dict[str, str] | list[tuple[str, str]],
         tls: Tls | None) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cafile=str(a.state / "tls" / "ca.pem"))
    if tls is not None:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    url = f"https://127.0.0.1:{a.settings.http_port}/t/t/token"
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def b_token(b: Instance, audience: str, subject: str = "frank") -> str:
    with b.client() as c:
        return str(c.issue(subject, audience, lifetime_seconds=300).token)


def test_a_workload_with_the_issuer_role_exchanges_over_mtls(
        pair: tuple[ServerThread, Instance]) -> None:
    a, b = pair
    with a.client() as c:
        t_issuer = tenant_issuer(c, "t")
    exchanger = a.identity("spiffe://fedtoken.dev/ns/shop/sa/exchanger", "issuer",
                           tenants=("t",), audiences=("api://local",))
    status, body = post(a, [("grant_type", GRANT), ("subject_token", b_token(b, t_issuer)),
                            ("subject_token_type", JWT), ("audience", "api://local")],
                        exchanger)
    assert status == 200, body
    assert body["issued_token_type"] == JWT and body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 300
    claims = json.loads(b64url_decode(body["access_token"].split(".")[1]))
    assert claims["iss"] == t_issuer and claims["aud"] == "api://local"
    assert claims["sub"].startswith("fed:") and claims["origin"]["sub"] == "frank"
    # The grant's audiences bound what the workload may ask for.
    status, body = post(a, {"grant_type": GRANT, "subject_token": b_token(b, t_issuer),
                            "audience": "api://elsewhere"}, exchanger)
    assert (status, body) == (403, {"error": "unauthorized_client"})


def test_the_token_endpoint_refuses_what_it_must(pair: tuple[ServerThread, Instance]) -> None:
    a, b = pair
    with a.client() as c:
        t_issuer = tenant_issuer(c, "t")
    good = {"grant_type": GRANT, "subject_token": b_token(b, t_issuer),
            "audience": "api://local"}
    assert post(a, good, None) == (401, {"error": "invalid_client"})
    nobody = a.identity("spiffe://fedtoken.dev/ns/shop/sa/nobody")
    assert post(a, good, nobody) == (403, {"error": "unauthorized_client"})
    exchanger = a.identity("spiffe://fedtoken.dev/ns/shop/sa/exchanger2", "issuer",
                           tenants=("t",), audiences=("api://local",))
    assert post(a, {**good, "grant_type": "client_credentials"}, exchanger) == (
        400, {"error": "unsupported_grant_type"})
    assert post(a, {**good, "subject_token": "not-a-token"}, exchanger) == (
        400, {"error": "invalid_request"})
    assert post(a, [*good.items(), ("subject_token", "twice")], exchanger) == (
        400, {"error": "invalid_request"})
    # A token addressed to someone else is not exchanged.
    assert post(a, {**good, "subject_token": b_token(b, "api://someone-else")}, exchanger) == (
        400, {"error": "invalid_request"})
