"""The services count what they do: Issue/IssueBatch by tenant, Verify,
VerifyBatch and the native wire path of VerifyBatch by reason and tenant,
each token exactly once (over the in-memory ports of tests/unit/fakes.py)."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator

import pytest

from fedtoken.core.model import Expectation, Reason
from fedtoken.core.ports import CallContext, Principal
from fedtoken.service.types import IssueParams
from fedtoken_client._pb.fedtoken.v1 import common_pb2
from tests.unit._metrics_fixture import fresh, rendered_samples
from tests.unit.fakes import Services, build_services

__all__ = ["fresh"]  # the fixture, used by name

AUD = "api://orders"
CTX = CallContext(Principal(identity="spiffe://example.org/ns/shop/sa/orders"),
                  request_id="req-1")
REASON_NUMBERS = {r: common_pb2.Reason.Value(r.value) for r in Reason}  # as rpc.convert


@pytest.fixture
async def acme(fresh: None) -> AsyncIterator[Services]:
    s = build_services(leeway=30, max_batch=1000)
    await s.jobs.bootstrap("acme")
    yield s
    await s.aclose()


def counts(name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for sample, labels, v in rendered_samples():
        if sample == name:
            out[labels[label]] += v
    return dict(out)


def tampered(token: str) -> str:
    head, _, sig = token.rpartition(".")
    return f"{head}.{sig[:10]}{'B' if sig[10] == 'A' else 'A'}{sig[11:]}"


async def test_issue_and_every_verification_path_count_each_token_once(acme: Services) -> None:
    params = IssueParams(tenant="acme", subject="alice", audience=[AUD])
    tokens = [(await acme.tokens.issue(params, CTX)).token for _ in range(3)]
    tokens += [i.token for i in await acme.tokens.issue_batch([params] * 5, CTX)]
    assert counts("fedtoken_tokens_issued_total", "tenant") == {"acme": 8}

    expect = Expectation(audience=AUD)
    assert (await acme.verification.verify(tokens[0], expect, CTX)).valid
    await acme.verification.verify_batch([tokens[1], "garbage"], expect, CTX)
    mix = tokens * 10 + [tampered(t) for t in tokens] + ["x.y.z"] * 4
    wire = await acme.verification.verify_batch_wire(mix, expect, CTX, REASON_NUMBERS)
    decided = sum(len(entries) for _, entries in wire.audit)
    assert decided + len(wire.verdicts) == len(mix)

    by_reason = counts("fedtoken_verifications_total", "reason")
    assert by_reason == {"OK": 1 + 1 + 80, "MALFORMED": 1 + 4, "BAD_SIGNATURE": 8}
    by_tenant = counts("fedtoken_verifications_total", "tenant")
    assert set(by_tenant) <= {"acme", ""}
    assert by_tenant["acme"] >= 82


async def test_the_native_pipeline_is_counted_from_its_audit_entries(acme: Services) -> None:
    if not acme.verification._engine.native:  # type: ignore[attr-defined]
        pytest.skip("fedtoken._native is not built")
    params = IssueParams(tenant="acme", subject="bob", audience=[AUD])
    token = (await acme.tokens.issue(params, CTX)).token
    expect = Expectation(audience=AUD)
    # The first batch teaches the native table the key; the second takes the pipeline.
    await acme.verification.verify_batch_wire([token] * 10, expect, CTX, REASON_NUMBERS)
    wire = await acme.verification.verify_batch_wire([token] * 50, expect, CTX, REASON_NUMBERS)
    assert sum(len(entries) for _, entries in wire.audit) > 0, "the pipeline decided none"
    assert counts("fedtoken_verifications_total", "reason") == {"OK": 60}
    assert counts("fedtoken_verifications_total", "tenant") == {"acme": 60}
