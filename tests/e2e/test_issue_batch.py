"""IssueBatch end to end through the client package against a real server
(real SoftHSM signing, real Postgres audit trail)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from fedtoken.service.tokens import MAX_ISSUE_BATCH
from fedtoken_client import FedtokenClient, FedtokenRpcError, reason_name

AUD = "svc-batch"


def _tenant(client: FedtokenClient) -> str:
    tid = f"b{uuid.uuid4().hex[:10]}"
    client.create_tenant(tid, generate_key=True)
    return tid


def _rpc_error(call: Callable[..., Any], *args: Any) -> FedtokenRpcError:
    with pytest.raises(FedtokenRpcError) as info:
        call(*args)
    return info.value


def _issued_events(client: FedtokenClient, tenant: str) -> list[Any]:
    page = client.list_audit(tenant=tenant, event_type="token.issued", page_size=1000)
    return list(page.events)


def test_issue_batch_tokens_verify_in_order_each_audited_once(client: FedtokenClient) -> None:
    a, b = _tenant(client), _tenant(client)
    items = [{"subject": f"user{i}", "audience": AUD, "tenant": a if i % 2 else b,
              "lifetime_seconds": 60 + i, "claims": {"n": i}} for i in range(25)]
    responses = client.issue_batch(items)
    assert [r.tenant for r in responses] == [item["tenant"] for item in items]
    assert len({r.jti for r in responses}) == len(items)
    for item, resp in zip(items, responses, strict=True):
        assert resp.expires_at - resp.issued_at == item["lifetime_seconds"]
        verdict = client.verify(resp.token, AUD, tenant=str(item["tenant"]))
        assert verdict.valid, reason_name(verdict.reason)
        assert verdict.subject == item["subject"] and verdict.jti == resp.jti
    for tenant in (a, b):
        events = _issued_events(client, tenant)
        expected = {r.jti for r in responses if r.tenant == tenant}
        assert sorted(e.jti for e in events) == sorted(expected)  # one event per token
    assert client.verify_audit_chain().ok


def test_an_invalid_item_fails_the_whole_batch_naming_it(client: FedtokenClient) -> None:
    tenant = _tenant(client)
    good = {"subject": "alice", "audience": AUD, "tenant": tenant}
    cases = [
        ({"subject": "bob", "audience": [], "tenant": tenant}, "requests[3].audience",
         "INVALID_FIELD"),
        ({"subject": "", "audience": AUD, "tenant": tenant}, "requests[3].subject",
         "INVALID_FIELD"),
        ({"subject": "bob", "audience": AUD, "tenant": tenant, "lifetime_seconds": 10**9},
         "requests[3].lifetime_seconds", "LIFETIME_EXCEEDS_POLICY"),
        ({"subject": "bob", "audience": AUD, "tenant": tenant, "claims": {"iss": "x"}},
         "requests[3].iss", "RESERVED_CLAIM"),
    ]
    for bad, field, reason in cases:
        err = _rpc_error(client.issue_batch, [good, good, good, bad, good])
        assert (err.code, err.reason, err.field) == (
            grpc.StatusCode.INVALID_ARGUMENT, reason, field), (bad, err)
    # Nothing was signed, so nothing was recorded.
    assert _issued_events(client, tenant) == []


def test_oversize_and_empty_batches_are_refused(client: FedtokenClient) -> None:
    tenant = _tenant(client)
    item = {"subject": "alice", "audience": AUD, "tenant": tenant}
    err = _rpc_error(client.issue_batch, [item] * (MAX_ISSUE_BATCH + 1))
    assert (err.code, err.reason, err.field) == (
        grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE", "requests")
    err = _rpc_error(client.issue_batch, [])
    assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "requests")
    assert _issued_events(client, tenant) == []
