"""Interop: PyJWT verifies fedtoken's tokens using only the HTTP bridge."""

from __future__ import annotations

import uuid

import jwt
import pytest

from fedtoken_client import FedtokenClient
from tests.support import ServerThread


def test_pyjwk_client_verifies_a_token_issued_by_fedtoken(
    server: ServerThread, client: FedtokenClient
) -> None:
    issued = client.issue("interop-user", "svc-interop", claims={"role": "reader"})
    jwks = jwt.PyJWKClient(f"{server.http_base}/.well-known/jwks.json", cache_keys=False)
    key = jwks.get_signing_key_from_jwt(issued.token)
    claims = jwt.decode(issued.token, key.key, algorithms=["RS256"], audience="svc-interop",
                        issuer=issued.issuer)
    assert claims["sub"] == "interop-user" and claims["role"] == "reader"
    assert claims["jti"] == issued.jti


def test_pyjwt_follows_discovery_for_a_tenant(server: ServerThread, client: FedtokenClient) -> None:
    import json
    import urllib.request

    tid = f"i{uuid.uuid4().hex[:8]}"
    tenant = client.create_tenant(tid)
    issued = client.issue("u", "svc", tenant=tid)
    url = f"{server.http_base}/t/{tid}/.well-known/openid-configuration"
    with urllib.request.urlopen(url, timeout=10) as resp:
        meta = json.loads(resp.read())
    assert meta["issuer"] == tenant.issuer
    key = jwt.PyJWKClient(meta["jwks_uri"]).get_signing_key_from_jwt(issued.token)
    assert jwt.decode(issued.token, key.key, algorithms=["RS256"], audience="svc",
                      issuer=tenant.issuer)["sub"] == "u"
    # The other tenant's JWKS cannot verify it.
    other = jwt.PyJWKClient(f"{server.http_base}/.well-known/jwks.json")
    with pytest.raises(jwt.PyJWKClientError):
        other.get_signing_key_from_jwt(issued.token)
