"""The HTTP bridge of a real server under hostile input: terse error bodies
that echo nothing, malformed HTTP without tracebacks, an access log that never
holds a token or a secret, one client authentication method per request
(RFC 6749 section 2.3), absurd tenant names, and half-open connections closed
after the read timeout (real sockets)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from fedtoken.core.ports import CallContext
from fedtoken.service.types import Introspection, KeySet
from fedtoken_client import FedtokenClient
from tests.conftest import INTROSPECTION_SECRET
from tests.support import ServerThread

ACCESS = "fedtoken.http.access"
MARK = "zz-echo-marker-7f3a"


def _request(url: str, *, method: str = "GET", data: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _basic(client_id: str, secret: str) -> str:
    raw = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


def _introspect(server: ServerThread, form: dict[str, str],
                auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if auth is not None:
        headers["Authorization"] = _basic(*auth)
    return _request(f"{server.http_base}/introspect", method="POST", headers=headers,
                    data=urllib.parse.urlencode(form).encode())


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _split(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


GOOD = ("rs-test", INTROSPECTION_SECRET)


# --- terse error bodies --------------------------------------------------------


@pytest.mark.parametrize("method,path,status,error", [
    ("GET", f"/{MARK}?token={MARK}", 404, "not_found"),
    ("GET", f"/.well-known/{MARK}", 404, "not_found"),
    ("DELETE", "/introspect", 405, "method_not_allowed"),
    ("PUT", f"/.well-known/jwks.json?{MARK}=1", 405, "method_not_allowed"),
])
def test_error_bodies_are_terse_and_echo_nothing(server: ServerThread, method: str, path: str,
                                                 status: int, error: str) -> None:
    code, headers, body = _request(server.http_base + path, method=method,
                                   headers={"X-Probe": MARK})
    assert code == status
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"error": error}
    assert MARK.encode() not in body


def test_server_header_does_not_name_the_framework(server: ServerThread) -> None:
    for path in ("/.well-known/jwks.json", "/nope"):
        _, headers, _ = _request(server.http_base + path)
        assert "aiohttp" not in headers.get("Server", "").lower()
        assert "python" not in headers.get("Server", "").lower()


@pytest.mark.parametrize("raw", [
    b"GE\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",                          # bad method
    b"GET / HTTP/1.1\r\n" + MARK.encode() + b" no colon\r\n\r\n",     # bad header
    b"GET /" + MARK.encode() + b"\x00 HTTP/1.1\r\n\r\n",              # bad target
    b"GET /t/" + MARK.encode() * 600 + b" HTTP/1.1\r\n\r\n",          # line too long
    b"GET / HTTP/1.1\r\nX: " + MARK.encode() * 600 + b"\r\n\r\n",     # field too long
    b"POST /introspect HTTP/1.1\r\nContent-Length: x" + MARK.encode() + b"\r\n\r\n",
])
def test_malformed_http_gets_a_terse_400_and_no_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    assert server.app is not None
    status, body = _split(_raw(server.app.http_port, raw))
    assert status == 400
    assert json.loads(body) == {"error": "invalid_request"}
    assert MARK.encode() not in body
    for record in caplog.records:
        if not record.name.startswith(("aiohttp", "fedtoken.http", "asyncio")):
            continue
        assert record.exc_info is None, record.getMessage()
        assert "Traceback" not in record.getMessage()
        assert MARK not in record.getMessage()
    access = [r for r in caplog.records if r.name == ACCESS]
    assert len(access) == 1 and "malformed" in access[0].getMessage()


def test_oversized_introspection_body_is_a_terse_413(server: ServerThread) -> None:
    status, _, body = _introspect(server, {"token": MARK * 4000}, auth=GOOD)
    assert status == 413
    assert json.loads(body) == {"error": "invalid_request"}


# --- Fault 5 over HTTP: a 4,000-character tenant is simply unknown -------------------


@pytest.mark.parametrize("route", [".well-known/jwks.json", ".well-known/openid-configuration"])
def test_a_4000_character_tenant_is_404(server: ServerThread, route: str) -> None:
    status, _, body = _request(f"{server.http_base}/t/{'a' * 4000}/{route}")
    assert status == 404
    assert json.loads(body) == {"error": "tenant_not_found"}
    assert len(body) < 64
    # and the server is none the worse for it
    assert _request(f"{server.http_base}/.well-known/jwks.json")[0] == 200


# --- RFC 6749 section 2.3: one authentication method per request --------------------


@pytest.mark.parametrize("extra", [
    {"client_id": GOOD[0], "client_secret": GOOD[1]},
    {"client_secret": GOOD[1]},
    {"client_id": GOOD[0]},
])
def test_basic_and_post_credentials_together_are_refused(
    server: ServerThread, client: FedtokenClient, extra: dict[str, str]
) -> None:
    token = client.issue("uma", "svc").token
    status, headers, body = _introspect(server, {"token": token, **extra}, auth=GOOD)
    assert status == 400
    assert json.loads(body) == {"error": "invalid_request"}
    assert headers["Cache-Control"] == "no-store"


def test_repeated_parameters_are_refused(server: ServerThread, client: FedtokenClient) -> None:
    token = client.issue("uma", "svc").token
    body = urllib.parse.urlencode([("token", token), ("client_id", GOOD[0]),
                                   ("client_secret", "wrong"), ("client_secret", GOOD[1])])
    status, _, raw = _request(f"{server.http_base}/introspect", method="POST",
                              data=body.encode(),
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and json.loads(raw) == {"error": "invalid_request"}


# --- the access log ----------------------------------------------------------------


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ACCESS]


def test_access_log_records_introspection_without_tokens_or_secrets(
    server: ServerThread, client: FedtokenClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    token = client.issue("vera", "svc").token
    assert _introspect(server, {"token": token}, auth=GOOD)[0] == 200
    assert _introspect(server, {"token": token, "client_id": GOOD[0],
                                "client_secret": GOOD[1]})[0] == 200
    assert _introspect(server, {"token": token}, auth=("rs-test", "guessed-secret"))[0] == 401
    assert _introspect(server, {"token": token, "client_id": "rs-test",
                                "client_secret": "guessed-secret"})[0] == 401
    assert _request(f"{server.http_base}/.well-known/jwks.json?access_token={token}")[0] == 200
    lines = _access_lines(caplog)
    assert len(lines) == 5, lines
    ok, ok_post, bad_basic, bad_post, jwks = lines
    for line in (ok, ok_post):
        assert line.startswith("POST /introspect 200 ") and "client=rs-test" in line
    for line in (bad_basic, bad_post):
        assert line.startswith("POST /introspect 401 ")
        assert "auth=failed" in line and "client=-" in line
    assert jwks.startswith("GET /.well-known/jwks.json 200 ") and "?" not in jwks
    everything = "\n".join(lines) + "\n".join(
        r.getMessage() for r in caplog.records)
    basic = _basic(*GOOD).split()[1]
    for secret in (token, *token.split("."), INTROSPECTION_SECRET, "guessed-secret", basic,
                   "Authorization", "Basic"):
        assert secret not in everything


def test_access_log_names_the_route_not_the_path(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    _request(f"{server.http_base}/t/{MARK}/.well-known/jwks.json")
    _request(f"{server.http_base}/{MARK}")
    first, second = _access_lines(caplog)
    assert first.startswith("GET /t/{tenant}/.well-known/jwks.json 404 ")
    assert second.startswith("GET - 404 ")
    assert MARK not in first + second


# --- read timeout and connection limit, with real sockets ------------------------------


class _Services:
    """The running server's service layer, as the public app wants it."""

    def __init__(self, server: ServerThread) -> None:
        assert server.app is not None
        self._services = server.app.services

    async def key_set(self, tenant: str) -> KeySet:
        return await self._services.catalog.key_set(tenant)

    async def introspect(self, token: str, ctx: CallContext) -> Introspection:
        return await self._services.tokens.introspect(token, ctx, client_authenticated=True)


@pytest.fixture
def strict_site(server: ServerThread) -> Iterator[int]:
    """A second listener of the running server's services, with a 1 s read
    timeout and room for 40 connections."""
    from fedtoken.http import HttpLimits, create_public_app, start_site

    app = create_public_app(_Services(server), server.settings)
    limits = HttpLimits(read_timeout=1.0, keepalive_timeout=30.0, max_connections=40)
    runner, port = server.run(start_site(app, "127.0.0.1", 0, limits=limits))
    yield port
    server.run(runner.cleanup())


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def test_half_open_requests_are_closed_after_the_read_timeout(strict_site: int) -> None:
    partials = [b"GET /.well-known/jwks.json HT", b"", b"GET / HTTP/1.1\r\nHost: x\r\n",
                b"POST /introspect HTTP/1.1\r\nContent-Type: application/x-www-"]
    started = time.monotonic()
    socks = []
    try:
        for i in range(30):
            s = socket.create_connection(("127.0.0.1", strict_site), timeout=5)
            socks.append(s)
            if partials[i % len(partials)]:
                s.sendall(partials[i % len(partials)])
        # A normal request is served meanwhile.
        status, _, body = _request(f"http://127.0.0.1:{strict_site}/.well-known/jwks.json")
        assert status == 200 and json.loads(body)["keys"]
        for s in socks:
            assert _closed_within(s, 5.0), "a half-open request was held past 5 s"
        elapsed = time.monotonic() - started
        assert 0.8 <= elapsed < 5.0, elapsed
    finally:
        for s in socks:
            s.close()


def test_a_trickled_request_line_is_cut_off_at_the_read_timeout(strict_site: int) -> None:
    with socket.create_connection(("127.0.0.1", strict_site), timeout=5) as s:
        started = time.monotonic()
        closed = False
        for byte in b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n":
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > 4:
                break
        assert closed or _closed_within(s, 1.0)
        assert time.monotonic() - started < 4


def test_connections_over_the_limit_are_refused_at_once(strict_site: int) -> None:
    socks = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", strict_site), timeout=5)
            s.sendall(b"GET / HT")
            socks.append(s)
        time.sleep(0.2)  # let the server accept them all
        started = time.monotonic()
        answer = _raw(strict_site, b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert time.monotonic() - started < 0.9  # refused, not timed out
        status, body = _split(answer)
        assert status == 503 and json.loads(body) == {"error": "temporarily_unavailable"}
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert _request(f"http://127.0.0.1:{strict_site}/.well-known/jwks.json")[0] == 200


def test_an_unfinished_body_is_cut_off_at_the_read_timeout(strict_site: int) -> None:
    head = (b"POST /introspect HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Authorization: " + _basic(*GOOD).encode() + b"\r\n"
            b"Content-Length: 100\r\n\r\ntoken=abc")
    started = time.monotonic()
    answer = _raw(strict_site, head, timeout=5)
    assert time.monotonic() - started < 4
    status, body = _split(answer)
    assert status == 408 and json.loads(body) == {"error": "invalid_request"}


def test_a_body_in_several_segments_is_read_whole(
    strict_site: int, client: FedtokenClient
) -> None:
    token = client.issue("wes", "svc").token
    form = urllib.parse.urlencode({"token": token}).encode()
    head = (b"POST /introspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Authorization: " + _basic(*GOOD).encode() + b"\r\n"
            b"Content-Length: " + str(len(form)).encode() + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", strict_site), timeout=5) as s:
        s.sendall(head + form[:40])
        time.sleep(0.2)
        s.sendall(form[40:])
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    status, body = _split(b"".join(chunks))
    answer: dict[str, Any] = json.loads(body)
    assert status == 200 and answer["active"] is True and answer["sub"] == "wes"
