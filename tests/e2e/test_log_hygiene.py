"""The logs of a real ``fedtoken serve`` (log_format json, DEBUG) after a
workload of every token RPC and a few failures: every line is one JSON
object with the required fields, every RPC left an access record with the
request-scoped fields, and no token, signature segment or HSM PIN appears
anywhere in them."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedtoken import logs
from fedtoken.tls.devca import OPERATOR_ID
from fedtoken_client import FedtokenRpcError
from tests._pg_fixture import create_database, drop_database
from tests.support import ServeProcess, child_env

pytestmark = pytest.mark.integration

AUD = "svc-logs"
ALWAYS = {"ts", "level", "logger", "message", "pid"}
ACCESS = {"request_id", "method", "principal", "outcome", "duration_ms"}
NOBODY = "spiffe://fedtoken.dev/nobody"


class JsonDebugServe(ServeProcess):
    def env(self) -> dict[str, str]:
        return {**child_env(), "FEDTOKEN_LOG_FORMAT": "json", "FEDTOKEN_LOG_LEVEL": "DEBUG"}


class Workload:
    """What the workload handed out, to look for in the logs."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.errors: list[str] = []


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           pg_dsn: str) -> Iterator[tuple[JsonDebugServe, Workload, str]]:
    name = f"loghyg_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_dsn, name)
    proc = JsonDebugServe(Path(tmp_path_factory.mktemp("loghyg")), dsn, name="loghyg")
    work = Workload()
    try:
        proc.start()
        _workload(proc, work)
        proc.stop()
        yield proc, work, proc.log.read_text(encoding="utf-8")
    finally:
        proc.stop()
        drop_database(pg_dsn, name)


def _refused(work: Workload, call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except FedtokenRpcError as exc:
        work.errors.append(str(exc.reason))
    else:  # pragma: no cover - the workload expects a refusal
        raise AssertionError(f"{call} was not refused")


def _workload(serve: JsonDebugServe, work: Workload) -> None:
    tid = f"logs-{uuid.uuid4().hex[:6]}"
    nobody = serve.identity(NOBODY)  # a certificate, no role
    with serve.client() as c:
        c.create_tenant(tid, generate_key=True)
        one = c.issue("alice", AUD, tenant=tid, scope="read")
        batch = c.issue_batch([{"subject": f"u{i}", "audience": AUD, "tenant": tid}
                               for i in range(3)])
        work.tokens += [one.token, *(r.token for r in batch)]
        assert c.verify(one.token, AUD).valid
        assert all(v.valid for v in c.verify_batch(work.tokens, AUD))
        assert c.introspect(one.token).active
        head, payload, sig = one.token.split(".")
        tampered = f"{head}.{payload}.{sig[:-4]}AAAA"
        assert not c.verify(tampered, AUD).valid           # a bad signature: a verdict
        assert not c.verify("not-a.jws.at-all", AUD).valid  # malformed: a verdict
        assert not c.verify(one.token, "someone-else").valid
        c.revoke(token=batch[0].token, reason="test")
        assert not c.verify(batch[0].token, AUD).valid
        assert not c.introspect(batch[0].token).active
        # Exchange of a local token (no trusted foreign issuer): refused, and
        # the refusal is logged without the subject token.
        _refused(work, c.exchange, one.token, AUD, tenant=tid)
        _refused(work, c.issue, "bob", AUD, tenant="no-such-tenant-here")
        _refused(work, c.issue, "bob", AUD, tenant=tid, lifetime_seconds=-5)
        _refused(work, c.revoke)
    with serve.client(tls=nobody) as stranger:
        _refused(work, stranger.issue, "mallory", AUD, tenant=tid)
        _refused(work, stranger.verify, one.token, AUD)


def _records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_every_line_is_one_json_object_with_the_required_fields(
        served: tuple[JsonDebugServe, Workload, str]) -> None:
    _, _, text = served
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(record, dict) and ALWAYS <= set(record), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]), line


def test_every_rpc_left_an_access_record(served: tuple[JsonDebugServe, Workload, str]) -> None:
    _, work, text = served
    access = [r for r in _records(text) if r["logger"] == "fedtoken.rpc.access"]
    for r in access:
        assert ACCESS <= set(r), r
        assert r["level"] == ("DEBUG" if r["outcome"] == "OK" else "INFO"), r
        assert r["method"].startswith("/fedtoken.v1.") or r["method"].startswith("/grpc."), r
        assert isinstance(r["duration_ms"], (int, float)) and r["duration_ms"] >= 0
        assert len(r.get("tenant", "")) <= 63
    by_method: dict[str, set[str]] = {}
    for r in access:
        by_method.setdefault(r["method"].rpartition("/")[2], set()).add(r["outcome"])
    for method in ("Issue", "IssueBatch", "Verify", "VerifyBatch", "Introspect", "Revoke",
                   "CreateTenant"):
        assert "OK" in by_method.get(method, set()), (method, by_method)
    assert "Exchange" in by_method and "OK" not in by_method["Exchange"]
    denied = [r for r in access if r["outcome"] == "PERMISSION_DENIED"]
    assert {r["method"].rpartition("/")[2] for r in denied} >= {"Issue", "Verify"}
    assert all(r["principal"] == NOBODY and r["code"] == "ROLE_NOT_GRANTED" for r in denied)
    ok = [r for r in access if r["outcome"] == "OK" and r["method"].endswith("/Issue")]
    assert ok and all(r["principal"] == OPERATOR_ID and r["tenant"].startswith("logs-")
                      for r in ok)
    failures = [r for r in access if r["outcome"] != "OK"]
    assert len(failures) >= len(work.errors)


def test_no_token_signature_or_pin_appears_in_the_logs(
        served: tuple[JsonDebugServe, Workload, str]) -> None:
    serve, work, text = served
    pin = (serve.state / "softhsm" / "pin").read_text(encoding="ascii").strip()
    so_pin = (serve.state / "softhsm" / "so-pin").read_text(encoding="ascii").strip()
    assert len(pin) >= 6 and len(so_pin) >= 6 and work.tokens
    assert pin not in text and so_pin not in text
    for token in work.tokens:
        _header, payload, signature = token.split(".")
        assert token not in text
        assert signature not in text
        assert payload not in text
    assert "PRIVATE KEY" not in text
    # The code itself logged none of them: the formatter's redaction (a
    # backstop) never had a token or a key to hide.
    assert logs.REDACTED_JWS not in text and logs.REDACTED_PEM not in text
