"""``fedtoken serve --workers 2`` under a known load: GET /metrics on the
operations port (any worker answers, with every worker's samples summed) is
parsed with prometheus-client's text parser, and the issued and
verified-by-reason counters equal what was sent."""

from __future__ import annotations

import collections
import itertools
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedtoken_client import reason_name
from fedtoken_client._pb.fedtoken.v1 import token_service_pb2, token_service_pb2_grpc
from tests._pg_fixture import create_database, drop_database
from tests.integration._faults import FaultServe
from tests.support import free_port

pytestmark = pytest.mark.integration

WORKERS = 2
ISSUES = 24  # unary Issue calls
ISSUE_BATCH = 16  # tokens of one IssueBatch
CHANNELS = 24  # own connections, so the kernel spreads them over both workers

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture()
def serve(tmp_path: Path, pg_dsn: str) -> Iterator[tuple[FaultServe, int]]:
    name = f"metrics_w_{uuid.uuid4().hex[:8]}"
    ops_port = free_port()
    sp = FaultServe(tmp_path, create_database(pg_dsn, name), workers=WORKERS,
                    extra_env={"FEDTOKEN_OPS_PORT": str(ops_port),
                               "FEDTOKEN_LOG_FORMAT": "text"})
    try:
        sp.start(timeout=120)
        yield sp, ops_port
    finally:
        sp.stop()
        drop_database(pg_dsn, name)


def scrape(ops_port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def by(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for (n, labels), value in samples.items():
        if n == name:
            out[dict(labels)[label]] += value
    return dict(out)


def tampered(token: str) -> str:
    """The same header and claims, one signature character changed (not the
    last: its low bits are padding)."""
    head, _, sig = token.rpartition(".")
    return f"{head}.{sig[:10]}{'B' if sig[10] == 'A' else 'A'}{sig[11:]}"


def test_counters_equal_the_load_sent_through_two_workers(
        serve: tuple[FaultServe, int]) -> None:
    sp, ops_port = serve
    workers = sp.listening_workers()
    assert len(workers) == WORKERS, sp.log_tail()
    channels = [sp.channel(options=[("grpc.use_local_subchannel_pool", 1),
                                    ("fedtoken.test.channel", i)]) for i in range(CHANNELS)]
    try:
        stubs = [token_service_pb2_grpc.TokenServiceStub(ch) for ch in channels]
        rr = itertools.cycle(stubs)
        issued = [next(rr).Issue(token_service_pb2.IssueRequest(
            subject=f"user-{i}", audience=["svc"]), timeout=30) for i in range(ISSUES)]
        batch = next(rr).IssueBatch(token_service_pb2.IssueBatchRequest(requests=[
            token_service_pb2.IssueRequest(subject=f"batch-{i}", audience=["svc"])
            for i in range(ISSUE_BATCH)]), timeout=60).responses
        tokens = [r.token for r in issued] + [r.token for r in batch]
        tenants = {r.tenant for r in issued} | {r.tenant for r in batch}
        assert len(tenants) == 1
        (tenant,) = tenants

        # The known mix, each VerifyBatch of the same shape on every connection.
        mix = (tokens[:20] + [tampered(t) for t in tokens[20:28]]
               + ["not-a-token", "a.b.c", "x" * 40] + tokens[28:])
        expected_batch = collections.Counter(
            {"OK": len(tokens) - 8, "BAD_SIGNATURE": 8, "MALFORMED": 3})
        sent: collections.Counter[str] = collections.Counter()
        for stub in stubs:
            verdicts = stub.VerifyBatch(token_service_pb2.VerifyBatchRequest(
                tokens=mix, audience="svc"), timeout=60).verdicts
            assert collections.Counter(reason_name(v.reason) for v in verdicts) \
                == expected_batch
            sent += expected_batch
        # A batch for another audience, and unary Verify calls.
        verdicts = next(rr).VerifyBatch(token_service_pb2.VerifyBatchRequest(
            tokens=tokens[:10], audience="elsewhere"), timeout=60).verdicts
        assert {reason_name(v.reason) for v in verdicts} == {"AUDIENCE_MISMATCH"}
        sent["AUDIENCE_MISMATCH"] += 10
        for token in tokens[:12]:
            verdict = next(rr).Verify(token_service_pb2.VerifyRequest(
                token=token, audience="svc"), timeout=30).verdict
            assert verdict.valid
        sent["OK"] += 12
        # Both workers served (with 24 connections, one worker getting none: 2**-23).
        serving = {pid for pid, proc in workers.items()
                   if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == sp.grpc_port
                          for c in proc.net_connections(kind="tcp"))}
        assert serving == set(workers)
    finally:
        for ch in channels:
            ch.close()

    samples = scrape(ops_port)
    assert by(samples, "fedtoken_tokens_issued_total", "tenant") == {
        tenant: ISSUES + ISSUE_BATCH}
    assert by(samples, "fedtoken_verifications_total", "reason") == dict(sent)
    per_tenant = by(samples, "fedtoken_verifications_total", "tenant")
    # Only our tenant or none: never a value taken from a token.
    assert set(per_tenant) <= {tenant, ""}
    ok_by_tenant = {dict(labels)["tenant"]: v for (n, labels), v in samples.items()
                    if n == "fedtoken_verifications_total" and dict(labels)["reason"] == "OK"}
    assert ok_by_tenant == {tenant: sent["OK"]}
    # The boundary counted every call: by method and status, summed over the workers.
    rpcs = {(dict(labels)["method"], dict(labels)["code"]): v for (n, labels), v in samples.items()
            if n == "fedtoken_rpc_duration_seconds_count"}
    service = "/fedtoken.v1.TokenService/"
    assert rpcs[(service + "Issue", "OK")] == ISSUES
    assert rpcs[(service + "IssueBatch", "OK")] == 1
    assert rpcs[(service + "VerifyBatch", "OK")] == CHANNELS + 1
    assert rpcs[(service + "Verify", "OK")] == 12
    # Every signature was one timed C_Sign in some worker.
    assert samples[("fedtoken_hsm_sign_seconds_count", frozenset())] >= ISSUES + ISSUE_BATCH
    # The sampler's gauges are there (set within a second of each worker's start).
    paths = by(samples, "fedtoken_rsa_verify_path", "path")
    assert set(paths) == {"multibuffer", "openssl"} and sum(paths.values()) == 1
    assert samples[("fedtoken_revocation_fresh", frozenset())] == 1
    assert 0 < samples[("fedtoken_rotation_next_step_seconds",
                        frozenset({("tenant", tenant)}))] < 400 * 86400
