"""Faults an adversarial probe found through the gRPC API (issue 8), each
reproduced against the running server: revocations that end before their
token, control characters, unbounded timestamps, errors that echo input or
leak a Python class name, and the smaller policy gaps."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest

from fedtoken_client import FedtokenClient, FedtokenRpcError, reason_name
from fedtoken_client._pb.fedtoken.v1 import key_admin_pb2, token_service_pb2
from tests.support import ServerThread

AUD = "svc-hard"
YEAR_10000 = 253402300800


def _tenant(client: FedtokenClient, **kw: object) -> str:
    tid = f"h{uuid.uuid4().hex[:10]}"
    client.create_tenant(tid, generate_key=True, **kw)  # type: ignore[arg-type]
    return tid


def _refused(call: object, *args: object, **kwargs: object) -> FedtokenRpcError:
    with pytest.raises(FedtokenRpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


# -- fault 2: a revocation never ends before its token can expire -------------------


@pytest.mark.parametrize("expires_at", [1, int(time.time()) - 3600])
def test_revoke_by_jti_with_past_expiry_still_covers_the_token(
    client: FedtokenClient, server: ServerThread, expires_at: int,
) -> None:
    tid = _tenant(client)
    issued = client.issue("victim", AUD, tenant=tid)
    resp = client.revoke(jti=issued.jti, tenant=tid, expires_at=expires_at)
    assert resp.created
    # Verify and Introspect agree, now and after a purge.
    assert reason_name(client.verify(issued.token, AUD).reason) == "REVOKED"
    assert not client.introspect(issued.token).active
    assert server.app is not None
    server.run(server.app.services.jobs.purge_expired())
    assert reason_name(client.verify(issued.token, AUD).reason) == "REVOKED"
    intro = client.introspect(issued.token)
    assert not intro.active and reason_name(intro.reason) == "REVOKED"


# -- fault 3: control characters -------------------------------------------------------


@pytest.mark.parametrize("bad", ["mallory\x00", "a\nb", "tab\there", "\u202eevil", "x\x7f"])
def test_issue_refuses_control_characters_in_every_string_field(
    client: FedtokenClient, bad: str,
) -> None:
    for kwargs in ({"subject": bad, "audience": AUD}, {"subject": "ok", "audience": bad},
                   {"subject": "ok", "audience": AUD, "scope": bad},
                   {"subject": "ok", "audience": AUD, "client_id": bad}):
        err = _refused(client.issue, kwargs.pop("subject"), kwargs.pop("audience"), **kwargs)
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")


@pytest.mark.parametrize("bad", ["mallory\x00", "a\nb"])
def test_revoke_refuses_control_characters(client: FedtokenClient, bad: str) -> None:
    for kwargs in ({"subject": bad}, {"jti": bad}, {"jti": "j", "reason": bad}):
        err = _refused(client.revoke, **kwargs)
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")


def test_tenant_ids_are_anchored(client: FedtokenClient) -> None:
    for bad in ("abc\n", "abc\x00", "ABC"):
        err = _refused(client.create_tenant, bad)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        err = _refused(client.issue, "s", AUD, tenant=bad)
        assert err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


# -- fault 4: every timestamp is bounded -------------------------------------------------


@pytest.mark.parametrize("expires_at", [2**63 - 1, YEAR_10000, -5])
def test_revoke_refuses_an_expiry_out_of_range(client: FedtokenClient, expires_at: int) -> None:
    err = _refused(client.revoke, jti="j-range", expires_at=expires_at)
    assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "expires_at")


def test_revoke_refuses_a_cut_out_of_range(client: FedtokenClient) -> None:
    err = _refused(client.revoke, subject="s", issued_before=-(2**62))
    assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "issued_before")


@pytest.mark.parametrize("field", ["since", "until"])
def test_list_audit_refuses_times_out_of_range(client: FedtokenClient, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.admin.ListAuditEvents(key_admin_pb2.ListAuditEventsRequest(**{field: 2**62}),
                                     timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- fault 5: errors never echo unbounded input; decode failures are typed ----------------


def test_a_huge_tenant_name_gets_a_small_typed_error(client: FedtokenClient) -> None:
    for call in (lambda: client.issue("s", AUD, tenant="t" * 10_000_000),
                 lambda: client.revoke(kid="k" * 10_000_000)):
        err = _refused(call)
        assert err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert err.detail.reason != 0
        assert len(err.message) < 1024 and len(err.detail.SerializeToString()) < 2048


@pytest.mark.parametrize("payload", [b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab",
                                     b"\x0a\x02\xc3\x28"])
def test_undecodable_requests_are_invalid_argument(server: ServerThread, payload: bytes) -> None:
    with server.channel() as channel:
        raw = channel.unary_unary("/fedtoken.v1.TokenService/Verify")
        with pytest.raises(grpc.RpcError) as info:
            raw(payload, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Error" not in (info.value.details() or "")  # no Python class name
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing.get("fedtoken-reason") == "MALFORMED_REQUEST"


def test_settings_refuse_batches_the_message_limit_cannot_carry() -> None:
    from fedtoken.config import load_settings
    from fedtoken.core.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        load_settings(overrides={"max_batch": 100_000, "max_token_bytes": 65536}, env={})


def test_the_client_can_receive_the_largest_batch_response(server: ServerThread) -> None:
    from fedtoken.config import MAX_CLIENT_MESSAGE_BYTES, batch_item_bound
    from fedtoken_client.client import MAX_RESPONSE_BYTES

    assert server.app is not None
    s = server.app.settings
    assert MAX_RESPONSE_BYTES == MAX_CLIENT_MESSAGE_BYTES >= s.grpc_max_message_bytes
    assert s.grpc_max_message_bytes >= s.max_batch * batch_item_bound(s.max_token_bytes)


# -- fault 12: the smaller ones ------------------------------------------------------------


@pytest.mark.parametrize("claim", ["kid", "alg", "typ", "cnf", "act"])
def test_issue_refuses_reserved_header_and_confirmation_claims(
    client: FedtokenClient, claim: str,
) -> None:
    err = _refused(client.issue, "s", AUD, claims={claim: "x"})
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "RESERVED_CLAIM")


def test_create_tenant_refuses_credentials_in_the_issuer(client: FedtokenClient) -> None:
    err = _refused(client.create_tenant, f"u{uuid.uuid4().hex[:8]}",
                   "https://user:secret@issuer.example")
    assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "issuer")
    assert "secret" not in err.message


def test_retiring_before_the_grace_needs_the_emergency_flag(client: FedtokenClient) -> None:
    tid = _tenant(client)
    first = client.list_keys(tid)[0]
    client.generate_key(tid, activate=True)  # the first key is RETIRING now
    err = _refused(client.retire_key, first.kid, tid)
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "GRACE_NOT_OVER")
    retired = client.admin.RetireKey(key_admin_pb2.KeyRef(tenant=tid, kid=first.kid,
                                                          emergency=True), timeout=10)
    assert retired.state == 4  # RETIRED
    events = client.list_audit(tenant=tid, event_type="key.retired")
    assert events.events and json.loads(events.events[-1].details_json).get("emergency") is True


def test_verify_without_tenant_or_issuer_is_documented() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    assert "neither tenant nor issuer" in text


def test_expired_request_token_bytes(client: FedtokenClient) -> None:
    # A token one byte over the limit is MALFORMED, never an error of the call.
    verdict = client.tokens.Verify(token_service_pb2.VerifyRequest(
        token="a" * 20000, audience=AUD), timeout=10).verdict
    assert not verdict.valid and reason_name(verdict.reason) == "MALFORMED"
