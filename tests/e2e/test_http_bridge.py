"""The HTTP bridge: JWKS and OIDC discovery, with caching headers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

from fedtoken_client import FedtokenClient
from tests.support import ServerThread


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_default_jwks_has_caching_headers_and_answers_304(
    server: ServerThread, client: FedtokenClient
) -> None:
    status, headers, body = _get(f"{server.http_base}/.well-known/jwks.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/jwk-set+json")
    assert headers["Cache-Control"] == "public, max-age=300"
    keys = json.loads(body)["keys"]
    assert client.issue("x", "aud").kid in {k["kid"] for k in keys}
    assert all("d" not in k for k in keys)
    status, headers2, body2 = _get(f"{server.http_base}/.well-known/jwks.json",
                                   {"If-None-Match": headers["ETag"]})
    assert status == 304 and body2 == b"" and headers2["ETag"] == headers["ETag"]
    status, _, _ = _get(f"{server.http_base}/.well-known/jwks.json",
                        {"If-None-Match": '"something-else"'})
    assert status == 200


def test_tenant_jwks_and_discovery(server: ServerThread, client: FedtokenClient) -> None:
    tid = f"h{uuid.uuid4().hex[:8]}"
    tenant = client.create_tenant(tid)
    status, _, body = _get(f"{server.http_base}/t/{tid}/.well-known/jwks.json")
    assert status == 200
    kids = {k["kid"] for k in json.loads(body)["keys"]}
    assert kids == {k.kid for k in client.list_keys(tid)}
    status, headers, body = _get(f"{server.http_base}/t/{tid}/.well-known/openid-configuration")
    assert status == 200 and "max-age" in headers["Cache-Control"]
    meta = json.loads(body)
    assert meta["issuer"] == tenant.issuer
    assert meta["jwks_uri"] == f"{server.settings.http_public_url}/t/{tid}/.well-known/jwks.json"
    assert meta["id_token_signing_alg_values_supported"] == ["RS256"]


def test_default_discovery_points_at_the_default_jwks(server: ServerThread) -> None:
    status, _, body = _get(f"{server.http_base}/.well-known/openid-configuration")
    meta = json.loads(body)
    assert status == 200
    assert meta["issuer"] == server.settings.http_public_url
    assert meta["jwks_uri"] == f"{server.settings.http_public_url}/.well-known/jwks.json"


def test_unknown_tenant_is_404_with_a_machine_readable_error(server: ServerThread) -> None:
    url = f"{server.http_base}/t/nope-{uuid.uuid4().hex[:6]}/.well-known/jwks.json"
    status, _, body = _get(url)
    assert status == 404 and json.loads(body) == {"error": "tenant_not_found"}
