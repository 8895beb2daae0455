"""Structured logs (fedtoken.logs) and the boundary's per-call observation:
JSON lines with the request-scoped fields, the human format unchanged,
redaction of tokens and secrets, one access record and one metrics
observation per RPC.

``python -m tests.unit.test_logs`` prints the per-call cost of the
observation on the success path (``bench_boundary``)."""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fedtoken import logs
from fedtoken.core.errors import PermissionDenied
from fedtoken.rpc import interceptors as ic

ALICE = "spiffe://fedtoken.dev/alice"
METHOD = "/fedtoken.v1.TokenService/Verify"
TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>[\w.]+)"
    r"\[(?P<tag>(?:w\d+:)?\d+)\]: (?P<message>.*)")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def real_token() -> str:
    """A real RS256 compact JWS (signed with a fresh key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signing_input = (_b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
                     + "." + _b64(json.dumps({"sub": "alice", "aud": "orders"}).encode()))
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(sig)}"


@pytest.fixture(autouse=True)
def _restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logs._Handler)]


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line]


# -- the formats -----------------------------------------------------------------


def test_json_lines_carry_the_required_and_request_fields(
        capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", logging.DEBUG, worker="w3")
    log = logging.getLogger("fedtoken.test")
    log.debug("plain %s", "message")
    log.info("access", extra={"request_id": "r1", "method": METHOD, "principal": ALICE,
                              "tenant": "acme", "outcome": "OK", "code": "",
                              "duration_ms": 0.42, "batch": 3})
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        log.exception("it failed")
    lines = _lines(capsys)
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    for r in records:
        assert {"ts", "level", "logger", "message", "worker", "pid"} <= set(r)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"])
        assert r["logger"] == "fedtoken.test" and r["worker"] == "w3"
        assert isinstance(r["pid"], int)
    plain, access, failed = records
    assert plain["level"] == "DEBUG" and plain["message"] == "plain message"
    assert "request_id" not in plain and "exception" not in plain
    assert {k: access[k] for k in logs.REQUEST_FIELDS} == {
        "request_id": "r1", "method": METHOD, "principal": ALICE, "tenant": "acme",
        "outcome": "OK", "code": "", "duration_ms": 0.42}
    assert access["batch"] == 3
    assert failed["level"] == "ERROR"
    assert "Traceback" in failed["exception"] and "line one\nline two" in failed["exception"]


def test_json_without_a_worker_has_no_worker_field(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json")
    logging.getLogger("fedtoken").info("hi")
    (line,) = _lines(capsys)
    assert "worker" not in json.loads(line)


@pytest.mark.parametrize(("worker", "tag"), [("", r"\d+"), ("w0", r"w0:\d+")])
def test_text_is_the_human_format_of_serve_and_the_cli(
        capsys: pytest.CaptureFixture[str], worker: str, tag: str) -> None:
    logs.configure("text", logging.INFO, worker=worker)
    logging.getLogger("fedtoken.app").info("listening on %d", 50051)
    logging.getLogger("fedtoken.app").debug("not shown")
    (line,) = _lines(capsys)
    m = TEXT_LINE.fullmatch(line)
    assert m, line
    assert m["level"] == "INFO" and m["logger"] == "fedtoken.app"
    assert re.fullmatch(tag, m["tag"]) and m["message"] == "listening on 50051"


def test_auto_is_text_on_a_terminal_and_json_otherwise(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    logs.configure("auto")
    logging.getLogger("x").info("piped")
    assert json.loads(_lines(capsys)[0])["message"] == "piped"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    logs.configure("auto")
    logging.getLogger("x").info("tty")
    assert TEXT_LINE.fullmatch(_lines(capsys)[0])


def test_configure_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json")
    logs.configure("json", logging.DEBUG)
    logs.configure("text")
    logs.configure("json", logging.DEBUG)
    assert len(_ours()) == 1
    assert logging.getLogger().level == logging.DEBUG
    logging.getLogger("x").info("once")
    assert len(_lines(capsys)) == 1


def test_configure_replaces_a_basicconfig_handler_and_keeps_others(
        capsys: pytest.CaptureFixture[str]) -> None:
    import io

    root = logging.getLogger()
    before = list(root.handlers)
    for h in before:
        root.removeHandler(h)
    try:
        logging.basicConfig(format="%(levelname)s %(message)s")
        kept = logging.StreamHandler(io.StringIO())
        root.addHandler(kept)
        logs.configure("json")
        logging.getLogger("x").warning("once")
        (line,) = _lines(capsys)
        assert json.loads(line)["message"] == "once"
        assert kept in root.handlers and kept.stream.getvalue() == "once\n"
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in before:
            root.addHandler(h)


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, text or json"):
        logs.configure("xml")


# -- redaction --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_real_token_is_redacted_from_message_extras_and_exceptions(
        capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    token = real_token()
    signature = token.rsplit(".", 1)[1]
    logs.configure(fmt, logging.DEBUG)
    log = logging.getLogger("fedtoken.test")
    log.info("verify %s failed.", token)
    log.info("header Authorization: Bearer %s", token)
    log.info("glued x%s and key_%s", token, token)
    log.info("extra", extra={"detail": f"got {token}", "access_token": token})
    try:
        raise RuntimeError(f"bad token {token}")
    except RuntimeError:
        log.exception("boom")
    out = capsys.readouterr().err
    assert token not in out and signature not in out
    assert token.split(".")[1] not in out  # nor the claims
    assert logs.REDACTED_JWS in out


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_pin_like_values_and_private_keys_are_redacted(
        capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    pin = "4930175528"
    pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
    logs.configure(fmt, logging.DEBUG)
    log = logging.getLogger("fedtoken.test")
    log.info("login", extra={"hsm_pin": pin, "password": pin, "client_secret": pin,
                             "private_key": "abc", "ping": "kept"})
    log.info("login with pin=%s, so_pin: '%s' {\"password\": \"%s\"}", pin, pin, pin)
    log.info("key %s done", pem)
    out = capsys.readouterr().err
    assert pin not in out and "MIIEvQ" not in out
    assert "done" in out and logs.REDACTED_PEM in out
    if fmt == "json":
        first = json.loads(out.splitlines()[0])
        assert first["hsm_pin"] == first["password"] == first["private_key"] == logs.REDACTED
        assert first["ping"] == "kept"


TOKEN = real_token()


@pytest.mark.parametrize("before", ["", " ", "(", "'", '"', "=", ":", "Bearer ", "x", "_",
                                    "-", "\n", ",", "ey", "eyJ."])
@pytest.mark.parametrize("after", ["", " ", ")", "'", '"', ".", ",", "\n", ";", "&x=1"])
def test_a_token_is_redacted_whatever_surrounds_it(before: str, after: str) -> None:
    out = logs.redact(f"got {before}{TOKEN}{after} here")
    assert TOKEN.rsplit(".", 1)[1] not in out and TOKEN.split(".")[1] not in out


@pytest.mark.parametrize("text", [
    "not.a.token", "version 1.2.3", "fedtoken.rpc.interceptors", "reason=TOKEN_EXPIRED",
    "kid=abc jti=def", "/fedtoken.v1.TokenService/Verify OK - 0.120ms",
])
def test_redaction_leaves_ordinary_text_alone(text: str) -> None:
    assert logs.redact(text) == text


def test_only_a_header_with_alg_makes_a_jws() -> None:
    no_alg = _b64(b'{"typ":"JWT"}') + "." + _b64(b"{}") + ".sig"
    unsigned = _b64(b'{"alg":"none"}') + "." + _b64(b"{}") + "."
    assert logs.redact(no_alg) == no_alg
    assert logs.redact(f"({unsigned})") == f"({logs.REDACTED_JWS})"


# -- the boundary's access log and metrics ------------------------------------------


class _Context:
    def __init__(self, metadata: Any = (("x-request-id", "req-1"),)) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, status: Any, message: str, trailing_metadata: Any) -> None:
        raise grpc.aio.AbortError(status, message)


class _Request:
    def __init__(self, tenant: Any = "") -> None:
        self.tenant = tenant


@pytest.fixture
def observed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, float]]:
    calls: list[tuple[str, str, float]] = []
    monkeypatch.setattr(ic.metrics, "observe_rpc", lambda *a: calls.append(a))
    return calls


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fedtoken.rpc.access"]


async def test_a_success_is_observed_once_and_logged_at_debug_only(
        caplog: pytest.LogCaptureFixture, observed: list[tuple[str, str, float]]) -> None:
    async def ok(request: Any, context: Any) -> str:
        return "ok"

    handler = ic.wrap_unary("Verify", ok, lambda _c: ALICE, method=METHOD)
    caplog.set_level(logging.INFO, "fedtoken.rpc.access")
    assert await handler(_Request("acme"), _Context()) == "ok"
    assert not _access(caplog)
    caplog.set_level(logging.DEBUG, "fedtoken.rpc.access")
    assert await handler(_Request("acme"), _Context()) == "ok"
    (record,) = _access(caplog)
    assert record.levelno == logging.DEBUG
    fields = record.__dict__
    assert (fields["request_id"], fields["method"], fields["principal"], fields["tenant"],
            fields["outcome"]) == ("req-1", METHOD, ALICE, "acme", "OK")
    assert "code" not in fields and fields["duration_ms"] >= 0
    assert [(m, c) for m, c, _ in observed] == [(METHOD, "OK"), (METHOD, "OK")]
    assert all(0 <= s < 5 for _, _, s in observed)


async def test_a_failure_is_logged_at_info_with_its_status_and_reason(
        caplog: pytest.LogCaptureFixture, observed: list[tuple[str, str, float]]) -> None:
    async def deny(request: Any, context: Any) -> str:
        raise PermissionDenied("caller lacks the role verifier")

    caplog.set_level(logging.INFO, "fedtoken.rpc.access")
    handler = ic.wrap_unary("Verify", deny, None, method=METHOD)
    with pytest.raises(grpc.aio.AbortError):
        await handler(_Request(), _Context(metadata=()))
    (record,) = _access(caplog)
    assert record.levelno == logging.INFO
    fields = record.__dict__
    assert fields["outcome"] == "PERMISSION_DENIED" and fields["code"] == "PERMISSION_DENIED"
    assert fields["principal"] == ic.ANONYMOUS and "tenant" not in fields
    assert re.fullmatch(r"[0-9a-f]{32}", fields["request_id"])
    assert [(m, c) for m, c, _ in observed] == [(METHOD, "PERMISSION_DENIED")]


async def test_an_unexpected_error_is_internal_in_metrics_and_log(
        caplog: pytest.LogCaptureFixture, observed: list[tuple[str, str, float]]) -> None:
    async def crash(request: Any, context: Any) -> str:
        raise KeyError("x")

    caplog.set_level(logging.INFO)
    handler = ic.wrap_unary("Issue", crash, lambda _c: ALICE)
    with pytest.raises(grpc.aio.AbortError):
        await handler(object(), _Context())
    (record,) = _access(caplog)
    assert record.__dict__["outcome"] == "INTERNAL"
    assert record.__dict__["method"] == "Issue"  # the short name stands in
    assert observed[0][:2] == ("Issue", "INTERNAL")


async def test_a_servicers_own_abort_is_observed_with_its_status(
        caplog: pytest.LogCaptureFixture, observed: list[tuple[str, str, float]]) -> None:
    class Ctx(_Context):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.NOT_FOUND

    async def abort(request: Any, context: Any) -> str:
        raise grpc.aio.AbortError(grpc.StatusCode.NOT_FOUND, "gone")

    caplog.set_level(logging.INFO, "fedtoken.rpc.access")
    handler = ic.wrap_unary("Get", abort, None, method="/s/Get")
    with pytest.raises(grpc.aio.AbortError):
        await handler(object(), Ctx())
    assert _access(caplog)[0].__dict__["outcome"] == "NOT_FOUND"
    assert observed[0][:2] == ("/s/Get", "NOT_FOUND")


@pytest.mark.parametrize(("tenant", "logged"), [
    ("acme-1.prod_x", "acme-1.prod_x"),
    ("t" * 100, "t" * 63),
    ("evil\n{\"level\":\"ERROR\"}", "evil???level???ERROR??"),
    ("", None),
    (42, None),
])
async def test_the_logged_tenant_is_the_requests_own_bounded_and_sanitised(
        caplog: pytest.LogCaptureFixture, observed: list[Any], tenant: Any,
        logged: str | None) -> None:
    async def deny(request: Any, context: Any) -> str:
        raise PermissionDenied("no")

    caplog.set_level(logging.INFO, "fedtoken.rpc.access")
    handler = ic.wrap_unary("Verify", deny, None, method=METHOD)
    with pytest.raises(grpc.aio.AbortError):
        await handler(_Request(tenant), _Context())
    assert _access(caplog)[0].__dict__.get("tenant") == logged


async def test_a_request_without_a_tenant_field_logs_none(
        caplog: pytest.LogCaptureFixture, observed: list[Any]) -> None:
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2

    async def deny(request: Any, context: Any) -> str:
        raise PermissionDenied("no")

    caplog.set_level(logging.INFO, "fedtoken.rpc.access")
    handler = ic.wrap_unary("GetKeys", deny, None)
    with pytest.raises(grpc.aio.AbortError):
        await handler(token_service_pb2.GetKeysRequest(), _Context())
    with pytest.raises(grpc.aio.AbortError):
        await handler(token_service_pb2.VerifyRequest(token="a.b.c", tenant="acme"), _Context())
    first, second = _access(caplog)
    assert "tenant" not in first.__dict__ and second.__dict__["tenant"] == "acme"


# -- the cost of the observation -------------------------------------------------------


def bench_boundary(n: int = 200_000) -> dict[str, float]:
    """µs per call of a wrapped trivial handler on the success path (DEBUG
    off): with the observation as shipped, with metrics stubbed out."""
    import tempfile
    import timeit

    from fedtoken.ops import metrics

    metrics.prepare(tempfile.mkdtemp())  # multiprocess values, as serve runs

    class Ctx:
        def invocation_metadata(self) -> Any:
            return (("x-request-id", "abc123"),)

        def peer(self) -> str:
            return "ipv4:127.0.0.1:5000"

        def time_remaining(self) -> None:
            return None

    async def behavior(request: Any, context: Any) -> str:
        return "ok"

    def driver(h: Any) -> Any:
        ctx, req = Ctx(), _Request("acme")

        def call() -> None:
            c = h(req, ctx)
            try:
                c.send(None)
            except StopIteration:
                pass
        return call

    logging.getLogger("fedtoken.rpc.access").setLevel(logging.INFO)
    shipped = ic.wrap_unary("Verify", behavior, lambda _c: ALICE, method=METHOD)
    real = metrics.observe_rpc
    metrics.observe_rpc = lambda *a: None  # type: ignore[assignment]
    stubbed = ic.wrap_unary("Verify", behavior, lambda _c: ALICE, method=METHOD)
    metrics.observe_rpc = real  # type: ignore[assignment]
    out: dict[str, float] = {}
    for name, h in (("shipped", shipped), ("metrics stubbed", stubbed)):
        out[name] = min(timeit.repeat(driver(h), number=n, repeat=5)) / n * 1e6
    return out


if __name__ == "__main__":  # pragma: no cover
    for name, us in bench_boundary().items():
        print(f"{name:16s} {us:.3f} us/call")


def test_secret_names_only_at_the_start_of_a_word() -> None:
    from fedtoken.logs import REDACTED, redact

    # The service's own startup line: "fedtoken" ends in "token".
    line = "fedtoken: 2 workers on gRPC 127.0.0.1:50051, HTTP bridge on http://127.0.0.1:8080"
    assert redact(line) == line
    assert redact("spin: 3, Fedtoken=ok") == "spin: 3, Fedtoken=ok"
    assert redact("hsm_pin: 1234 access_token=abc PIN=9") == (
        f"hsm_pin: {REDACTED} access_token={REDACTED} PIN={REDACTED}")
