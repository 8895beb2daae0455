"""End to end through the client package against a real server
(real SoftHSM signing, real Postgres): issue, verify, revoke, introspect,
keys, tenants, and the error contract."""

from __future__ import annotations

import base64
import json
import time
import uuid

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from fedtoken.core import jose
from fedtoken.core.jwk import b64url_decode, b64url_to_int, rsa_thumbprint
from fedtoken_client import FedtokenClient, FedtokenRpcError, reason_name
from tests.support import ServerThread

AUD = "svc-orders"


def _parts(token: str) -> tuple[dict, dict]:  # type: ignore[type-arg]
    h, p, _ = token.split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(p))


def _tenant(client: FedtokenClient) -> str:
    tid = f"t{uuid.uuid4().hex[:10]}"
    client.create_tenant(tid, generate_key=True)
    return tid


def test_issue_then_verify_is_valid_with_service_set_claims(client: FedtokenClient) -> None:
    before = int(time.time())
    resp = client.issue("alice", AUD, lifetime_seconds=120, claims={"role": "admin"})
    header, payload = _parts(resp.token)
    assert header == {"alg": "RS256", "typ": "JWT", "kid": resp.kid}
    assert payload["sub"] == "alice" and payload["aud"] == AUD and payload["role"] == "admin"
    assert payload["iss"] == resp.issuer and payload["jti"] == resp.jti
    assert len(b64url_decode(payload["jti"])) == 16
    assert before <= payload["iat"] == payload["nbf"] <= int(time.time())
    assert payload["exp"] == payload["iat"] + 120

    verdict = client.verify(resp.token, AUD)
    assert verdict.valid, reason_name(verdict.reason)
    assert reason_name(verdict.reason) == "OK"
    assert verdict.kid == resp.kid and verdict.subject == "alice" and verdict.jti == resp.jti
    assert json.loads(verdict.claims_json) == payload


def test_kid_is_the_rfc7638_thumbprint_of_the_published_key(client: FedtokenClient) -> None:
    resp = client.issue("bob", AUD)
    jwks = json.loads(client.get_keys().jwks_json)
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == resp.kid]
    assert rsa_thumbprint(b64url_to_int(jwk["n"]), b64url_to_int(jwk["e"])) == resp.kid
    assert set(jwk) == {"kty", "use", "alg", "kid", "n", "e"}  # nothing private
    assert b64url_to_int(jwk["n"]).bit_length() >= 2048


def test_signature_verifies_with_the_published_key_outside_fedtoken(
    client: FedtokenClient,
) -> None:
    resp = client.issue("carol", AUD)
    jwk = next(k for k in json.loads(client.get_keys().jwks_json)["keys"] if k["kid"] == resp.kid)
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    pub = RSAPublicNumbers(b64url_to_int(jwk["e"]), b64url_to_int(jwk["n"])).public_key()
    h, p, s = resp.token.split(".")
    pub.verify(b64url_decode(s), f"{h}.{p}".encode(), padding.PKCS1v15(), hashes.SHA256())


def test_issue_verify_revoke_verify_introspect(client: FedtokenClient) -> None:
    resp = client.issue("dave", AUD, scope="read write", client_id="web")
    intro = client.introspect(resp.token)
    assert intro.active and intro.sub == "dave" and intro.scope == "read write"
    assert intro.client_id == "web" and list(intro.aud) == [AUD] and intro.jti == resp.jti
    assert intro.token_type == "Bearer" and intro.exp == resp.expires_at

    revoked = client.revoke(token=resp.token, reason="test")
    assert revoked.created and revoked.jti == resp.jti
    assert client.revoke(token=resp.token).created is False  # idempotent

    verdict = client.verify(resp.token, AUD)
    assert not verdict.valid and reason_name(verdict.reason) == "REVOKED"
    intro = client.introspect(resp.token)
    assert not intro.active and reason_name(intro.reason) == "REVOKED"
    assert intro.sub == "" and intro.jti == ""  # an inactive answer says nothing else


def test_verify_batch_answers_in_order_and_one_bad_token_fails_nothing(
    client: FedtokenClient,
) -> None:
    good = [client.issue(f"u{i}", AUD).token for i in range(5)]
    tampered = good[1][:-4] + ("AAAA" if not good[1].endswith("AAAA") else "BBBB")
    tokens = [good[0], "garbage", tampered, good[2], "", good[3], good[4]]
    verdicts = client.verify_batch(tokens, AUD)
    reasons = [reason_name(v.reason) for v in verdicts]
    assert reasons == ["OK", "MALFORMED", "BAD_SIGNATURE", "OK", "MALFORMED", "OK", "OK"]
    assert [v.subject for v in verdicts if v.valid] == ["u0", "u2", "u3", "u4"]


def test_wrong_audience_and_issuer_are_rejected(client: FedtokenClient) -> None:
    token = client.issue("erin", [AUD, "svc-billing"]).token
    assert client.verify(token, "svc-billing").valid
    v = client.verify(token, "svc-other")
    assert reason_name(v.reason) == "AUDIENCE_MISMATCH" and not v.valid
    v = client.verify(token, AUD, issuer="https://evil.example")
    assert reason_name(v.reason) == "ISSUER_MISMATCH"


def test_a_tenants_token_never_verifies_as_another_tenants(
    client: FedtokenClient, server: ServerThread
) -> None:
    a, b = _tenant(client), _tenant(client)
    token_a = client.issue("frank", AUD, tenant=a).token
    assert client.verify(token_a, AUD, tenant=a).valid
    v = client.verify(token_a, AUD, tenant=b)
    assert not v.valid and reason_name(v.reason) == "TENANT_MISMATCH"
    # Keys are scoped to their issuer: A's genuine signature over a payload
    # naming B's issuer is refused, whatever the kid says.
    b_issuer = next(t.issuer for t in client.list_tenants() if t.id == b)
    header, payload = _parts(token_a)
    payload["iss"] = b_issuer
    forged = _resign_with_hsm(server, client, a, header, payload)
    v = client.verify(forged, AUD)
    assert not v.valid and reason_name(v.reason) == "TENANT_MISMATCH"


def _resign_with_hsm(srv: ServerThread, client: FedtokenClient, tenant: str,
                     header: dict, payload: dict) -> str:  # type: ignore[type-arg]
    """Sign arbitrary content with a tenant's real HSM key (an insider's forgery)."""
    assert srv.app is not None
    key = next(k for k in client.list_keys(tenant) if k.state == 2)  # ACTIVE
    signing_input = jose.encode_signing_input(header, payload)
    (sig,) = srv.app.signer.sign_many(key.hsm_label, key.kid, [signing_input])
    return jose.assemble(signing_input, sig)


def test_private_keys_in_the_hsm_are_sensitive_and_not_extractable(
    client: FedtokenClient, server: ServerThread
) -> None:
    assert server.app is not None
    for key in client.list_keys():
        attrs = server.app.signer.private_key_attributes(key.hsm_label)
        assert attrs["SENSITIVE"] is True and attrs["EXTRACTABLE"] is False
        assert attrs["NEVER_EXTRACTABLE"] is True and attrs["ALWAYS_SENSITIVE"] is True


def test_rotation_publishes_first_then_old_tokens_survive_until_retired(
    client: FedtokenClient,
) -> None:
    tid = _tenant(client)
    old = client.issue("gina", AUD, tenant=tid)
    pending = client.generate_key(tid)
    kids = {k["kid"] for k in json.loads(client.get_keys(tid).jwks_json)["keys"]}
    assert {old.kid, pending.kid} <= kids  # pre-published before it signs
    assert client.issue("gina", AUD, tenant=tid).kid == old.kid

    client.activate_key(pending.kid, tid)
    new = client.issue("gina", AUD, tenant=tid)
    assert new.kid == pending.kid
    assert client.verify(old.token, AUD).valid  # old key is RETIRING: still verifies

    client.retire_key(old.kid, tid, emergency=True)  # RETIRING -> RETIRED before its grace
    v = client.verify(old.token, AUD)
    assert not v.valid and reason_name(v.reason) == "KEY_INACTIVE"
    kids = {k["kid"] for k in json.loads(client.get_keys(tid).jwks_json)["keys"]}
    assert old.kid not in kids and new.kid in kids
    assert client.verify(new.token, AUD).valid


def _rpc_error(fn, *args, **kwargs) -> FedtokenRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(FedtokenRpcError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("kwargs", "code", "reason", "field"),
    [
        ({"claims": {"iss": "x"}}, "INVALID_ARGUMENT", "RESERVED_CLAIM", "iss"),
        ({"claims": {"exp": 1}}, "INVALID_ARGUMENT", "RESERVED_CLAIM", "exp"),
        ({"claims": {"jti": "x"}}, "INVALID_ARGUMENT", "RESERVED_CLAIM", "jti"),
        ({"lifetime_seconds": 10**6}, "INVALID_ARGUMENT", "LIFETIME_EXCEEDS_POLICY",
         "lifetime_seconds"),
        ({"lifetime_seconds": -5}, "INVALID_ARGUMENT", "INVALID_FIELD", "lifetime_seconds"),
        ({"tenant": "no-such-tenant"}, "NOT_FOUND", "TENANT_NOT_FOUND", ""),
    ],
)
def test_issue_refuses_bad_requests_with_a_precise_status(
    client: FedtokenClient, kwargs: dict, code: str, reason: str, field: str  # type: ignore[type-arg]
) -> None:
    err = _rpc_error(client.issue, "henry", AUD, **kwargs)
    assert err.code.name == code and err.reason == reason
    if field:
        assert err.field == field
    assert err.request_id  # correlates with the server log
    assert "Traceback" not in err.message


def test_issue_refuses_missing_subject_and_audience(client: FedtokenClient) -> None:
    assert _rpc_error(client.issue, "", AUD).field == "subject"
    assert _rpc_error(client.issue, "ivan", []).field == "audience"


def test_malformed_verify_requests_are_invalid_argument(client: FedtokenClient) -> None:
    token = client.issue("judy", AUD).token
    err = _rpc_error(client.verify, "", AUD)
    assert (err.code, err.reason, err.field) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "token")
    err = _rpc_error(client.verify, token, "")
    assert (err.reason, err.field) == ("INVALID_FIELD", "audience")
    err = _rpc_error(client.verify_batch, [token] * 10_001, AUD)
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")


def test_revoke_refuses_tokens_it_cannot_authenticate(client: FedtokenClient) -> None:
    token = client.issue("kim", AUD).token
    h, _, s = token.split(".")
    other = base64.urlsafe_b64encode(b'{"jti":"x","exp":9999999999}').rstrip(b"=").decode()
    err = _rpc_error(client.revoke, token=f"{h}.{other}.{s}")
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOKEN")
    err = _rpc_error(client.revoke, jti="")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


def test_key_admin_errors(client: FedtokenClient) -> None:
    tid = _tenant(client)
    err = _rpc_error(client.create_tenant, tid)
    assert (err.code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, "TENANT_EXISTS")
    err = _rpc_error(client.create_tenant, "Bad_Id!")
    assert (err.code, err.reason, err.field) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "id")
    err = _rpc_error(client.generate_key, tid, key_size=1024)
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "POLICY_VIOLATION")
    err = _rpc_error(client.activate_key, "no-such-kid", tid)
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")
    active = next(k for k in client.list_keys(tid) if k.state == 2)
    err = _rpc_error(client.retire_key, active.kid, tid)
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                      "INVALID_KEY_TRANSITION")
    err = _rpc_error(client.activate_key, active.kid, tid)
    assert err.reason == "INVALID_KEY_TRANSITION"
    # A key of another tenant is not found under this one.
    err = _rpc_error(client.activate_key, active.kid, "default")
    assert err.reason == "KEY_NOT_FOUND"
