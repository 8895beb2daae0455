"""RFC 7662 introspection over HTTP: authenticated callers only."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

from fedtoken_client import FedtokenClient
from tests.conftest import INTROSPECTION_SECRET
from tests.support import ServerThread


def _post(url: str, form: dict[str, str], auth: tuple[str, str] | None = None,
          content_type: str = "application/x-www-form-urlencoded") -> tuple[int, dict, dict]:  # type: ignore[type-arg]
    headers = {"Content-Type": content_type}
    if auth:
        raw = f"{urllib.parse.quote_plus(auth[0])}:{urllib.parse.quote_plus(auth[1])}"
        headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


GOOD = ("rs-test", INTROSPECTION_SECRET)


def test_authenticated_caller_gets_rfc7662_fields(server: ServerThread,
                                                   client: FedtokenClient) -> None:
    issued = client.issue("quinn", "svc-a", scope="read", client_id="app-1")
    status, headers, body = _post(f"{server.http_base}/introspect",
                                  {"token": issued.token, "token_type_hint": "access_token"},
                                  auth=GOOD)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert body["active"] is True
    assert (body["sub"], body["aud"], body["scope"], body["client_id"]) == (
        "quinn", "svc-a", "read", "app-1")
    assert (body["jti"], body["exp"], body["iss"]) == (issued.jti, issued.expires_at,
                                                       issued.issuer)
    assert body["token_type"] == "Bearer" and body["kid"] == issued.kid


def test_client_secret_post_also_works(server: ServerThread, client: FedtokenClient) -> None:
    token = client.issue("rita", "svc").token
    status, _, body = _post(f"{server.http_base}/introspect",
                            {"token": token, "client_id": GOOD[0], "client_secret": GOOD[1]})
    assert status == 200 and body["active"] is True


def test_inactive_token_reveals_nothing(server: ServerThread, client: FedtokenClient) -> None:
    issued = client.issue("sam", "svc")
    client.revoke(token=issued.token)
    for token in (issued.token, "not-a-token"):
        status, _, body = _post(f"{server.http_base}/introspect", {"token": token}, auth=GOOD)
        assert status == 200 and body == {"active": False}


@pytest.mark.parametrize("auth", [None, ("rs-test", "wrong"), ("nobody", INTROSPECTION_SECRET),
                                  ("", "")])
def test_unauthenticated_callers_get_401_and_learn_nothing(
    server: ServerThread, client: FedtokenClient, auth: tuple[str, str] | None
) -> None:
    token = client.issue("tom", "svc").token
    status, headers, body = _post(f"{server.http_base}/introspect", {"token": token}, auth=auth)
    assert status == 401 and body == {"error": "invalid_client"}
    assert headers["WWW-Authenticate"].startswith("Basic")


def test_bad_requests(server: ServerThread) -> None:
    url = f"{server.http_base}/introspect"
    assert _post(url, {}, auth=GOOD)[0] == 400
    assert _post(url, {"token": "x"}, auth=GOOD, content_type="application/json")[0] == 400
    status, _, _ = _post(url, {"token": "x" * 40_000}, auth=GOOD)
    assert status == 413
