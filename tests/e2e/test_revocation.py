"""Revocation by subject and by key (emergency), through the API."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import grpc
import pytest

from fedtoken_client import FedtokenClient, FedtokenRpcError, reason_name
from tests.support import ServerThread

AUD = "svc-rev"


def _tenant(client: FedtokenClient) -> str:
    tid = f"r{uuid.uuid4().hex[:10]}"
    client.create_tenant(tid, generate_key=True)
    return tid


def test_subject_revocation_hits_tokens_issued_before_the_cut_only(
    client: FedtokenClient,
) -> None:
    tid = _tenant(client)
    old = client.issue("mallory", AUD, tenant=tid)
    other = client.issue("trent", AUD, tenant=tid)
    resp = client.revoke(subject="mallory", issued_before=old.issued_at + 1, tenant=tid)
    assert (resp.kind, resp.value, resp.created) == ("subject", "mallory", True)
    v = client.verify(old.token, AUD)
    assert not v.valid and reason_name(v.reason) == "REVOKED"
    assert client.verify(other.token, AUD).valid  # another subject is untouched
    # Tokens issued at or after the cut are valid again (e.g. after a reset).
    time.sleep(max(0.0, old.issued_at + 1 - time.time()) + 0.05)
    fresh = client.issue("mallory", AUD, tenant=tid)
    assert fresh.issued_at >= old.issued_at + 1
    assert client.verify(fresh.token, AUD).valid
    intro = client.introspect(old.token)
    assert not intro.active and reason_name(intro.reason) == "REVOKED"
    assert client.introspect(fresh.token).active


def test_subject_revocation_refuses_a_cut_in_the_future(client: FedtokenClient) -> None:
    with pytest.raises(FedtokenRpcError) as info:
        client.revoke(subject="x", issued_before=int(time.time()) + 3600)
    assert (info.value.code, info.value.field) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                   "issued_before")


def test_compromised_key_rejects_its_tokens_and_leaves_the_jwks(client: FedtokenClient) -> None:
    tid = _tenant(client)
    victim = client.issue("u1", AUD, tenant=tid)
    resp = client.revoke(kid=victim.kid, tenant=tid, reason="key leaked")
    assert (resp.kind, resp.value) == ("key", victim.kid)
    v = client.verify(victim.token, AUD)
    assert not v.valid and reason_name(v.reason) == "KEY_REVOKED"
    intro = client.introspect(victim.token)
    assert not intro.active and reason_name(intro.reason) == "KEY_REVOKED"
    kids = {k["kid"] for k in json.loads(client.get_keys(tid).jwks_json)["keys"]}
    assert victim.kid not in kids
    states = {k.kid: k.state for k in client.list_keys(tid)}
    assert states[victim.kid] == 6  # COMPROMISED
    # The signing key was compromised: a replacement signs at once.
    replacement = client.issue("u2", AUD, tenant=tid)
    assert replacement.kid != victim.kid and replacement.kid in {
        k["kid"] for k in json.loads(client.get_keys(tid).jwks_json)["keys"]}
    assert client.verify(replacement.token, AUD).valid
    # A compromised key can never come back.
    with pytest.raises(FedtokenRpcError) as info:
        client.activate_key(victim.kid, tid)
    assert info.value.reason == "INVALID_KEY_TRANSITION"


def test_revoke_needs_exactly_one_target(client: FedtokenClient) -> None:
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2

    with pytest.raises(grpc.RpcError) as info:
        client.tokens.Revoke(token_service_pb2.RevokeRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(FedtokenRpcError) as err:
        client.revoke(kid="no-such-kid")
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")


def test_expired_revocations_are_purged(client: FedtokenClient, server: ServerThread) -> None:
    assert server.app is not None
    jobs, store = server.app.services.jobs, server.app.store
    tid = _tenant(client)
    # The API cannot make a revocation that ends before its token could
    # expire, so the expired row is written through the store.
    now = datetime.now(UTC)
    server.run(store.revocations.revoke(tid, "jti", "long-gone",
                                        expires_at=datetime.fromtimestamp(time.time() - 3600, UTC),
                                        now=now))
    client.revoke(jti="still-live", tenant=tid)
    assert server.run(jobs.purge_expired()) >= 1  # the expired row was there
    assert server.run(jobs.purge_expired()) == 0  # and is gone
    assert server.run(store.revocations.is_revoked(tid, "still-live", "", 0, "",
                                                   now=datetime.now(UTC)))
