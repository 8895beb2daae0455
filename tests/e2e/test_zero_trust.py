"""Zero trust end to end, over real mTLS handshakes against a real server
(real Postgres, real SoftHSM): who may connect, who may do what, what the
audit trail records about them, and the administration of grants through
the client and the CLI.

Every refusal is checked for what it must not have done as well: a refused
connection or an unauthenticated call leaves nothing in the audit trail, a
denied call leaves exactly an ``access.denied`` record.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import message_factory
from google.protobuf.message import Message

from fedtoken.tls import ensure_dev_pki, issue_client_cert
from fedtoken.tls.devca import OPERATOR_ID
from fedtoken_client import FedtokenClient, FedtokenRpcError, Tls, from_rpc_error, reason_name
from fedtoken_client._pb.fedtoken.v1 import (
    key_admin_pb2,
    key_admin_pb2_grpc,
    token_service_pb2,
    token_service_pb2_grpc,
)
from tests.support import ServerThread

TRUST_DOMAIN = "spiffe://fedtoken.test/zt"
AUDIT_DEADLINE = 10.0  # seconds: denials are audited asynchronously (record_soon)


def _spiffe(name: str) -> str:
    return f"{TRUST_DOMAIN}/{name}-{uuid.uuid4().hex[:8]}"


@contextmanager
def _refused(code: grpc.StatusCode,
             reason: str | None = None) -> Iterator[pytest.ExceptionInfo[FedtokenRpcError]]:
    """The call in the block fails with ``code`` (and the typed ``reason``)."""
    with pytest.raises(FedtokenRpcError) as info:
        yield info
    assert info.value.code == code, info.value
    if reason is not None:
        assert info.value.reason == reason, info.value


def _events(admin: FedtokenClient, *, after: int = 0, **filters: Any) -> list[Any]:
    out: list[Any] = []
    while True:
        page = admin.list_audit(after_seq=after, page_size=1000, **filters)
        out += list(page.events)
        if not page.next_after_seq:
            return out
        after = page.next_after_seq


def _head(admin: FedtokenClient) -> int:
    return int(admin.verify_audit_chain().head_seq)


def _wait_for(probe: Callable[[], list[Any]], what: str,
              deadline: float = AUDIT_DEADLINE) -> list[Any]:
    end = time.monotonic() + deadline
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline}s: {what}")
        time.sleep(0.05)


@dataclass
class World:
    server: ServerThread
    admin: FedtokenClient  # the dev operator (a bootstrap admin)
    a: str  # tenant A
    b: str  # tenant B
    token_a: str  # a valid token of A, audience "svc"
    token_b: str  # a valid token of B, audience "svc"
    barrier: Tls  # an identity with no grant at all: its denials flush the audit queue


@pytest.fixture(scope="module")
def world(server: ServerThread, client: FedtokenClient) -> World:
    suffix = uuid.uuid4().hex[:6]
    a, b = f"zt-a-{suffix}", f"zt-b-{suffix}"
    client.create_tenant(a)
    client.create_tenant(b)
    token_a = client.issue("alice", "svc", tenant=a).token
    token_b = client.issue("bob", "svc", tenant=b).token
    return World(server, client, a, b, token_a, token_b,
                 server.identity(_spiffe("barrier")))


def _flush_audit(w: World, after: int) -> None:
    """Wait until a denial made now is in the audit trail: the writer keeps
    order, so anything recorded before it is there too."""
    with w.server.client(tls=w.barrier) as c, \
            _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED") as info:
        c.get_keys()
    request_id = info.value.request_id
    assert request_id
    _wait_for(lambda: [e for e in _events(w.admin, after=after, event_type="access.denied")
                       if e.request_id == request_id], "the barrier's denial audited")


def _assert_nothing_recorded(w: World, after: int, declared: str,
                             identities: tuple[str, ...] = ()) -> None:
    _flush_audit(w, after)
    for event in _events(w.admin, after=after):
        assert event.event_type not in ("token.issued", "tenant.created", "key.generated"), event
        assert declared not in event.details_json, event
        assert not event.actor.startswith("unauthenticated"), event
        for identity in identities:
            assert not event.actor.startswith(identity + "@"), event


# -- certificates the dev CA would never issue ---------------------------------------


def _dev_ca(state: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    tls = state / "tls"
    cert = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _leaf(out: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *,
          uris: list[str] | None, not_before: dt.datetime,
          not_after: dt.datetime) -> tuple[Path, Path]:
    """A client certificate signed by ``ca`` (None: self-signed); ``uris``
    None: no SAN extension at all. Its certificate and key files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtoken operator")])
    issuer_name, signer = (ca[0].subject, ca[1]) if ca is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                       critical=False)
    )
    if uris is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    (out / "client.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "client.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return out / "client.pem", out / "client.key"


def _server_ca_tls(srv: ServerThread, files: tuple[Path, Path]) -> Tls:
    return Tls(srv.state / "tls" / "ca.pem", *files)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- refused before any RPC runs -------------------------------------------------------

# Each builds a client that must not get past the TLS handshake.
HandshakeCase = Callable[[ServerThread, Path, str], FedtokenClient]


def _plaintext(srv: ServerThread, _tmp: Path, caller: str) -> FedtokenClient:
    return FedtokenClient(srv.target, insecure=True, caller=caller, timeout=5)


def _no_client_certificate(srv: ServerThread, _tmp: Path, caller: str) -> FedtokenClient:
    creds = grpc.ssl_channel_credentials(root_certificates=(srv.state / "tls" / "ca.pem")
                                         .read_bytes())
    return FedtokenClient(srv.target, channel=grpc.secure_channel(srv.target, creds),
                          caller=caller, timeout=5)


def _another_ca(srv: ServerThread, tmp: Path, caller: str) -> FedtokenClient:
    # Another CA's operator certificate: the bootstrap admin's very SPIFFE ID.
    other = ensure_dev_pki(tmp / "other-ca")
    assert other.ca.read_bytes() != (srv.state / "tls" / "ca.pem").read_bytes()
    tls = Tls(srv.state / "tls" / "ca.pem", other.operator.cert, other.operator.key)
    return srv.client(tls=tls, caller=caller, timeout=5)


def _self_signed(srv: ServerThread, tmp: Path, caller: str) -> FedtokenClient:
    files = _leaf(tmp / "self-signed", None, uris=[OPERATOR_ID],
                  not_before=_now() - dt.timedelta(minutes=5),
                  not_after=_now() + dt.timedelta(days=1))
    return srv.client(tls=_server_ca_tls(srv, files), caller=caller, timeout=5)


def _expired(srv: ServerThread, tmp: Path, caller: str) -> FedtokenClient:
    # Signed by the server's own CA, for the operator's SPIFFE ID, but expired.
    files = _leaf(tmp / "expired", _dev_ca(srv.state), uris=[OPERATOR_ID],
                  not_before=_now() - dt.timedelta(days=10),
                  not_after=_now() - dt.timedelta(days=1))
    return srv.client(tls=_server_ca_tls(srv, files), caller=caller, timeout=5)


def _not_yet_valid(srv: ServerThread, tmp: Path, caller: str) -> FedtokenClient:
    files = _leaf(tmp / "future", _dev_ca(srv.state), uris=[OPERATOR_ID],
                  not_before=_now() + dt.timedelta(days=1),
                  not_after=_now() + dt.timedelta(days=10))
    return srv.client(tls=_server_ca_tls(srv, files), caller=caller, timeout=5)


HANDSHAKE_CASES: dict[str, HandshakeCase] = {
    "plaintext": _plaintext,
    "no-client-certificate": _no_client_certificate,
    "another-ca": _another_ca,
    "self-signed": _self_signed,
    "expired": _expired,
    "not-yet-valid": _not_yet_valid,
}


@pytest.mark.parametrize("case", sorted(HANDSHAKE_CASES))
def test_a_refused_handshake_is_unavailable_and_leaves_no_trace(
        world: World, tmp_path: Path, case: str) -> None:
    before = _head(world.admin)
    declared = f"refused-{case}-{uuid.uuid4().hex[:6]}"
    with HANDSHAKE_CASES[case](world.server, tmp_path, declared) as c:
        for call in (lambda: c.issue("mallory", "svc", lifetime_seconds=60),
                     lambda: c.issue_batch([{"subject": "mallory", "audience": "svc"}]),
                     lambda: c.create_tenant(f"zt-evil-{uuid.uuid4().hex[:6]}"),
                     lambda: c.grant_caller(_spiffe("evil"), "admin"),
                     lambda: c.verify(world.token_a, "svc")):
            with _refused(grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_UNSPECIFIED") as info:
                call()
            # No handler answered: there is no ErrorDetail, hence no request id.
            assert not info.value.detail.request_id, info.value
    _assert_nothing_recorded(world, before, declared)


SAN_CASES: dict[str, list[str] | None] = {
    "two-spiffe-ids": [OPERATOR_ID, f"{TRUST_DOMAIN}/other"],
    "spiffe-and-https": [OPERATOR_ID, "https://fedtoken.test/x"],
    "empty-san": [],
    "no-san-extension": None,
    "https-uri-only": ["https://fedtoken.test/operator"],
    "malformed-spiffe-id": ["spiffe://Fedtoken.DEV/operator"],
    "dot-dot-path": ["spiffe://fedtoken.dev/a/../operator"],
}


@pytest.mark.parametrize("case", sorted(SAN_CASES))
def test_a_certificate_without_exactly_one_spiffe_id_is_unauthenticated(
        world: World, tmp_path: Path, case: str) -> None:
    srv = world.server
    uris = SAN_CASES[case]
    if uris is None:
        # issue_client_cert always adds a SAN extension: build this one ourselves.
        tls = _server_ca_tls(srv, _leaf(tmp_path, _dev_ca(srv.state), uris=None,
                                        not_before=_now() - dt.timedelta(minutes=5),
                                        not_after=_now() + dt.timedelta(days=1)))
    else:
        files = issue_client_cert(srv.state, "", tmp_path, uris=uris)
        tls = _server_ca_tls(srv, (files.cert, files.key))
    before = _head(world.admin)
    declared = f"unauthenticated-{case}-{uuid.uuid4().hex[:6]}"
    with srv.client(tls=tls, caller=declared, timeout=5) as c:
        for call in (lambda: c.issue("mallory", "svc", lifetime_seconds=60),
                     lambda: c.revoke(token=world.token_a),
                     lambda: c.create_tenant(f"zt-evil-{uuid.uuid4().hex[:6]}"),
                     lambda: c.verify(world.token_a, "svc")):
            with _refused(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED") as info:
                call()
            assert info.value.detail.request_id
    # (The operator's own audited calls carry its ID: leave that one out.)
    _assert_nothing_recorded(world, before, declared,
                             tuple(u for u in uris or () if u and u != OPERATOR_ID))
    assert world.admin.verify(world.token_a, "svc").valid  # the revoke never ran


# -- deny by default --------------------------------------------------------------------


def _minimal_requests(w: World) -> dict[str, Message]:
    """A valid request for every RPC: a caller with the role would be served."""
    kid = w.admin.list_keys(w.a)[0].kid
    ts, ka = token_service_pb2, key_admin_pb2
    return {
        "TokenService/Issue": ts.IssueRequest(tenant=w.a, subject="s", audience=["svc"]),
        "TokenService/IssueBatch": ts.IssueBatchRequest(requests=[
            ts.IssueRequest(tenant=w.a, subject="s", audience=["svc"])]),
        "TokenService/Verify": ts.VerifyRequest(token=w.token_a, audience="svc"),
        "TokenService/VerifyBatch": ts.VerifyBatchRequest(tokens=[w.token_a], audience="svc"),
        "TokenService/Introspect": ts.IntrospectRequest(token=w.token_a),
        "TokenService/Revoke": ts.RevokeRequest(token=w.token_a, reason="no grant"),
        "TokenService/GetKeys": ts.GetKeysRequest(tenant=w.a),
        "KeyAdmin/CreateTenant": ka.CreateTenantRequest(id=f"zt-never-{uuid.uuid4().hex[:6]}"),
        "KeyAdmin/GetTenant": ka.GetTenantRequest(id=w.a),
        "KeyAdmin/ListTenants": ka.ListTenantsRequest(),
        "KeyAdmin/GenerateKey": ka.GenerateKeyRequest(tenant=w.a),
        "KeyAdmin/ListKeys": ka.ListKeysRequest(tenant=w.a),
        "KeyAdmin/ActivateKey": ka.KeyRef(tenant=w.a, kid=kid),
        "KeyAdmin/RetireKey": ka.KeyRef(tenant=w.a, kid=kid),
        "KeyAdmin/UpdateTenant": ka.UpdateTenantRequest(id=w.a),  # zeros: nothing changes
        "KeyAdmin/RotateKey": ka.RotateKeyRequest(tenant=w.a, reason="no grant"),
        "KeyAdmin/GetComplianceReport": ka.ComplianceReportRequest(tenant=w.a),
        "KeyAdmin/ReconcileKeys": ka.ReconcileKeysRequest(),  # a dry run
        "KeyAdmin/ListAuditEvents": ka.ListAuditEventsRequest(),
        "KeyAdmin/VerifyAuditChain": ka.VerifyAuditChainRequest(),
        "KeyAdmin/GrantCaller": ka.GrantCallerRequest(identity=_spiffe("escalate"),
                                                      role="admin"),
        "KeyAdmin/RevokeCaller": ka.RevokeCallerRequest(identity=OPERATOR_ID),
        "KeyAdmin/ListCallers": ka.ListCallersRequest(),
        "KeyAdmin/AddTrustedIssuer": ka.AddTrustedIssuerRequest(
            issuer=f"https://zt-never-{uuid.uuid4().hex[:6]}.example", tenants=[w.a]),
        "KeyAdmin/ListTrustedIssuers": ka.ListTrustedIssuersRequest(),
        "KeyAdmin/RemoveTrustedIssuer": ka.RemoveTrustedIssuerRequest(
            issuer="https://zt-never.example"),
        "KeyAdmin/RefreshTrustedIssuer": ka.RefreshTrustedIssuerRequest(
            issuer="https://zt-never.example"),
        "TokenService/Exchange": ts.ExchangeRequest(subject_token=w.token_a, tenant=w.a,
                                                    audience=["svc"]),
    }


def _every_rpc() -> list[tuple[str, Any]]:
    """(Service/Method, method descriptor) of every RPC the API defines."""
    out = []
    for module, name in ((token_service_pb2, "TokenService"), (key_admin_pb2, "KeyAdmin")):
        service = module.DESCRIPTOR.services_by_name[name]
        out += [(f"{name}/{m.name}", m) for m in service.methods]
    return out


def test_an_identity_with_no_grant_is_denied_every_rpc(world: World) -> None:
    srv = world.server
    identity = _spiffe("nobody")
    tls = srv.identity(identity)  # a valid certificate, no role at all
    requests = _minimal_requests(world)
    rpcs = _every_rpc()
    missing = sorted({name for name, _ in rpcs} - set(requests))
    assert not missing, f"add a minimal request for {missing} to _minimal_requests"
    tenants_before = {t.id for t in world.admin.list_tenants()}
    keys_before = [(k.kid, k.state) for k in world.admin.list_keys(world.a)]
    before = _head(world.admin)
    with srv.channel(tls=tls) as channel:
        for name, method in rpcs:
            request = requests[name]
            assert request.DESCRIPTOR.full_name == method.input_type.full_name, name
            response_class = message_factory.GetMessageClass(method.output_type)
            call = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=response_class.FromString)
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10, metadata=(("x-fedtoken-caller", "nobody"),))
            err = from_rpc_error(info.value)
            assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                              "ROLE_NOT_GRANTED"), (name, err)
    # Every denial is audited, with the method and the role it needed.
    methods = {m.name for _, m in rpcs}

    def denied() -> list[Any]:
        found = [e for e in _events(world.admin, after=before, event_type="access.denied")
                 if e.actor.startswith(identity + "@")]
        return found if {json.loads(e.details_json)["method"] for e in found} >= methods else []

    events = _wait_for(denied, "an access.denied record for every RPC")
    assert {e.reason for e in events} == {"NO_GRANT"}
    assert len(events) == len(methods)
    # And none of them did anything.
    after = _events(world.admin, after=before)
    assert not [e for e in after if e.event_type in ("token.issued", "token.revoked",
                                                     "tenant.created", "key.generated",
                                                     "key.activated", "key.retiring",
                                                     "caller.granted", "caller.revoked",
                                                     "trust.added", "trust.removed")]
    assert {t.id for t in world.admin.list_tenants()} == tenants_before
    assert [(k.kid, k.state) for k in world.admin.list_keys(world.a)] == keys_before
    assert world.admin.verify(world.token_a, "svc").valid


def test_an_issuer_is_held_to_its_tenants_audiences_and_lifetime(world: World) -> None:
    srv = world.server
    tls = srv.identity(_spiffe("issuer-a"), "issuer", tenants=(world.a,),
                       audiences=("svc-a", "svc-a2"), max_lifetime_seconds=300)
    with srv.client(tls=tls) as c:
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_GRANTED") as info:
            c.issue("s", "svc-a", tenant=world.b, lifetime_seconds=60)
        assert info.value.detail.tenant == world.b
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_GRANTED"):
            c.issue("s", "svc-a", lifetime_seconds=60)  # the default tenant
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "AUDIENCE_NOT_GRANTED"):
            c.issue("s", "svc-b", tenant=world.a, lifetime_seconds=60)
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "AUDIENCE_NOT_GRANTED"):
            c.issue("s", ["svc-a", "svc-b"], tenant=world.a, lifetime_seconds=60)
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "LIFETIME_NOT_GRANTED"):
            c.issue("s", "svc-a", tenant=world.a, lifetime_seconds=301)
        # Lifetime 0 is the tenant's default (900 s): over this grant's maximum.
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "LIFETIME_NOT_GRANTED"):
            c.issue("s", "svc-a", tenant=world.a)
        issued = c.issue("s", ["svc-a", "svc-a2"], tenant=world.a, lifetime_seconds=300)
        assert issued.tenant == world.a and issued.expires_at - issued.issued_at == 300
        # An issuer is not a verifier, revoker or admin.
        for call in (lambda: c.verify(issued.token, "svc-a"),
                     lambda: c.revoke(token=issued.token),
                     lambda: c.generate_key(world.a)):
            with _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED"):
                call()
    assert world.admin.verify(issued.token, "svc-a", tenant=world.a).valid


def test_a_verifier_sees_only_its_tenants_and_can_do_nothing_else(world: World) -> None:
    srv = world.server
    tls = srv.identity(_spiffe("verifier-a"), "verifier", tenants=(world.a,))
    with srv.client(tls=tls) as c:
        assert c.verify(world.token_a, "svc").valid
        assert c.verify(world.token_a, "svc", tenant=world.a).valid
        # B's token is valid, but not for this caller: a verdict, not an error.
        other = c.verify(world.token_b, "svc")
        assert not other.valid and reason_name(other.reason) == "TENANT_MISMATCH"
        assert not other.claims_json and not other.subject and not other.jti
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_GRANTED"):
            c.verify(world.token_b, "svc", tenant=world.b)
        batch = c.verify_batch([world.token_a, world.token_b], "svc")
        assert [v.valid for v in batch] == [True, False]
        assert reason_name(batch[1].reason) == "TENANT_MISMATCH"
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_GRANTED"):
            c.verify_batch([world.token_b], "svc", tenant=world.b)
        assert c.introspect(world.token_a).active
        foreign = c.introspect(world.token_b)
        assert not foreign.active and not foreign.sub and not foreign.jti
        assert c.get_keys(world.a).keys
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_GRANTED"):
            c.get_keys(world.b)
        for call in (lambda: c.issue("s", "svc", tenant=world.a, lifetime_seconds=60),
                     lambda: c.revoke(token=world.token_a),
                     lambda: c.revoke(jti="some-jti", tenant=world.a),
                     lambda: c.create_tenant(f"zt-evil-{uuid.uuid4().hex[:6]}"),
                     lambda: c.generate_key(world.a),
                     lambda: c.list_keys(world.a),
                     lambda: c.grant_caller(_spiffe("evil"), "admin"),
                     lambda: c.list_callers(),
                     lambda: c.list_audit()):
            with _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED"):
                call()
    assert world.admin.verify(world.token_a, "svc").valid  # never revoked


# -- the audit trail names the authenticated identity ----------------------------------


def _details(event: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(event.details_json or "{}")
    return parsed


def _assert_actor(event: Any, identity: str, declared: str) -> None:
    assert event.actor.startswith(identity + "@"), event
    assert declared not in event.actor, event
    assert _details(event).get("declared_caller") == declared, event


def test_the_audit_trail_shows_the_authenticated_identity(world: World) -> None:
    srv, admin = world.server, world.admin
    issuer, revoker, keyadmin = _spiffe("issuer"), _spiffe("revoker"), _spiffe("keyadmin")
    issuer_tls = srv.identity(issuer, "issuer", tenants=(world.a,))
    revoker_tls = srv.identity(revoker, "revoker", tenants=(world.a,))
    admin_tls = srv.identity(keyadmin, "admin", tenants=(world.a,))
    before = _head(admin)
    with srv.client(tls=issuer_tls, caller="i-am-the-operator") as c:
        issued = c.issue("carol", "svc", tenant=world.a, lifetime_seconds=120)
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_GRANTED") as denial:
            c.issue("carol", "svc", tenant=world.b, lifetime_seconds=120)
    with srv.client(tls=revoker_tls, caller="declared-revoker") as c:
        c.revoke(token=issued.token, reason="zt audit")
    with srv.client(tls=admin_tls, caller="declared-admin") as c:
        key = c.generate_key(world.a)
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_GRANTED"):
            c.generate_key(world.b)

    (ev,) = [e for e in _events(admin, after=before, event_type="token.issued")
             if e.jti == issued.jti]
    _assert_actor(ev, issuer, "i-am-the-operator")
    assert ev.tenant == world.a
    (ev,) = [e for e in _events(admin, after=before, event_type="token.revoked")
             if e.jti == issued.jti]
    _assert_actor(ev, revoker, "declared-revoker")
    (ev,) = [e for e in _events(admin, after=before, event_type="key.generated")
             if e.kid == key.kid]
    _assert_actor(ev, keyadmin, "declared-admin")

    def denied(identity: str) -> Callable[[], list[Any]]:
        return lambda: [e for e in _events(admin, after=before, event_type="access.denied")
                        if e.actor.startswith(identity + "@")]

    (ev,) = _wait_for(denied(issuer), "the issuer's denial audited")
    _assert_actor(ev, issuer, "i-am-the-operator")
    assert (ev.outcome, ev.reason, ev.tenant) == ("denied", "TENANT_NOT_GRANTED", world.b)
    assert ev.request_id == denial.value.request_id
    assert _details(ev)["method"] == "Issue" and _details(ev)["role"] == "issuer"
    (ev,) = _wait_for(denied(keyadmin), "the key admin's denial audited")
    assert (ev.reason, ev.tenant) == ("TENANT_NOT_GRANTED", world.b)
    assert _details(ev)["method"] == "GenerateKey" and _details(ev)["role"] == "admin"
    # A declared name never stands in for an identity anywhere.
    for e in _events(admin, after=before):
        for declared in ("i-am-the-operator", "declared-revoker", "declared-admin"):
            assert declared not in e.actor, e


# -- administering callers -------------------------------------------------------------


def _grants_of(admin: FedtokenClient, identity: str) -> list[key_admin_pb2.CallerGrant]:
    return [g for g in admin.list_callers() if g.identity == identity]


def test_callers_grant_list_revoke_through_the_client(world: World) -> None:
    srv, admin = world.server, world.admin
    identity = _spiffe("managed")
    files = issue_client_cert(srv.state, identity, srv.state / "zt-managed")
    tls = Tls(srv.state / "tls" / "ca.pem", files.cert, files.key)
    with srv.client(tls=tls) as c:
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED"):
            c.get_keys(world.a)
        grant = admin.grant_caller(identity, "verifier", tenants=[world.a])
        assert (grant.identity, grant.role, list(grant.tenants)) == (identity, "verifier",
                                                                     [world.a])
        assert grant.granted_by.startswith(OPERATOR_ID + "@") and grant.created_at > 0
        admin.grant_caller(identity, "revoker", tenants=[world.a, world.b])
        listed = {g.role: g for g in _grants_of(admin, identity)}
        assert set(listed) == {"verifier", "revoker"}
        assert sorted(listed["revoker"].tenants) == sorted([world.a, world.b])
        # Effective at once, on the same connection.
        assert c.get_keys(world.a).keys
        # Revoking one role leaves the other.
        assert admin.revoke_caller(identity, "revoker") == 1
        assert [g.role for g in _grants_of(admin, identity)] == ["verifier"]
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED"):
            c.revoke(jti="x", tenant=world.a)
        assert c.verify(world.token_a, "svc").valid
        # Revoking every role: the very next call is denied.
        assert admin.revoke_caller(identity) == 1
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED"):
            c.get_keys(world.a)
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED"):
            c.verify(world.token_a, "svc")
    assert _grants_of(admin, identity) == []
    with _refused(grpc.StatusCode.NOT_FOUND, "GRANT_NOT_FOUND"):
        admin.revoke_caller(identity)
    with _refused(grpc.StatusCode.NOT_FOUND, "GRANT_NOT_FOUND"):
        admin.revoke_caller(_spiffe("never-granted"), "issuer")
    # Bootstrap admins come from the configuration: listed, never revocable.
    operator = _grants_of(admin, OPERATOR_ID)
    assert {g.role for g in operator} == {"admin", "issuer", "verifier", "revoker", "auditor"}
    assert {g.granted_by for g in operator} == {"configuration"}
    with _refused(grpc.StatusCode.NOT_FOUND, "GRANT_NOT_FOUND"):
        admin.revoke_caller(OPERATOR_ID)
    assert admin.list_tenants()


BAD_IDENTITIES = [
    "", "not-a-spiffe-id", "https://fedtoken.test/x", "spiffe://", "spiffe:///path",
    "spiffe://Upper.Case/x", "spiffe://td/a/../b", "spiffe://td/a/./b", "spiffe://td//b",
    "spiffe://td/a?x=1", "spiffe://td/a#f", "spiffe://td:8080/a", "spiffe://u@td/a",
    "spiffe://td/a%2Fb", "spiffe://td/" + "a" * 2048,
]


def test_invalid_identities_and_roles_are_invalid_argument(world: World) -> None:
    admin = world.admin
    before = len(admin.list_callers())
    for identity in BAD_IDENTITIES:
        with _refused(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD") as info:
            admin.grant_caller(identity, "verifier")
        assert info.value.field == "identity", identity
        with _refused(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD") as info:
            admin.revoke_caller(identity)
        assert info.value.field == "identity", identity
    good = _spiffe("roles")
    for role in ("superuser", "Admin", "root", " issuer", ""):
        with _refused(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD") as info:
            admin.grant_caller(good, role)
        assert info.value.field == "role", role
    with _refused(grpc.StatusCode.INVALID_ARGUMENT) as info:
        admin.revoke_caller(good, "superuser")
    assert info.value.field == "role"
    # Audiences and lifetimes limit issuers only.
    with _refused(grpc.StatusCode.INVALID_ARGUMENT):
        admin.grant_caller(good, "verifier", audiences=["svc"])
    with _refused(grpc.StatusCode.INVALID_ARGUMENT):
        admin.grant_caller(good, "revoker", max_lifetime_seconds=60)
    with _refused(grpc.StatusCode.INVALID_ARGUMENT) as info:
        admin.grant_caller(good, "issuer", tenants=["Not A Tenant"])
    assert info.value.field == "tenants"
    assert len(admin.list_callers()) == before


def _ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_callers_and_dev_cert_through_the_cli(world: World, tmp_path: Path) -> None:
    srv = world.server
    identity = _spiffe("cli-issuer")
    out = tmp_path / "cert"
    made = _ok(srv.cli("dev-cert", identity, "--out", str(out)))
    assert made["identity"] == identity
    for name in ("client.pem", "client.key", "ca.pem"):
        assert (out / name).is_file(), name
    assert stat.S_IMODE((out / "client.key").stat().st_mode) == 0o600
    assert (out / "ca.pem").read_bytes() == (srv.state / "tls" / "ca.pem").read_bytes()
    cert = x509.load_pem_x509_certificate((out / "client.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [identity]

    granted = _ok(srv.cli("callers", "grant", identity, "--role", "issuer",
                       "--tenant", world.a, "--audience", "svc-cli", "--max-lifetime", "15m"))
    assert (granted["identity"], granted["role"], granted["tenants"]) == (
        identity, "issuer", [world.a])
    assert granted["audiences"] == ["svc-cli"] and int(granted["max_lifetime_seconds"]) == 900
    listed = [g for g in _ok(srv.cli("callers", "list")) if g["identity"] == identity]
    assert len(listed) == 1 and int(listed[0]["max_lifetime_seconds"]) == 900

    with FedtokenClient(srv.target, tls=Tls.from_dir(out), caller="cli-made") as c:
        issued = c.issue("dave", "svc-cli", tenant=world.a, lifetime_seconds=900)
        assert world.admin.verify(issued.token, "svc-cli").valid
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "LIFETIME_NOT_GRANTED"):
            c.issue("dave", "svc-cli", tenant=world.a, lifetime_seconds=901)
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "AUDIENCE_NOT_GRANTED"):
            c.issue("dave", "svc", tenant=world.a, lifetime_seconds=60)
        assert _ok(srv.cli("callers", "revoke", identity)) == {"removed": 1}
        with _refused(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED"):
            c.issue("dave", "svc-cli", tenant=world.a, lifetime_seconds=60)
    assert not [g for g in _ok(srv.cli("callers", "list")) if g["identity"] == identity]

    again = srv.cli("callers", "revoke", identity)
    assert again.returncode != 0 and "NOT_FOUND GRANT_NOT_FOUND" in again.stderr, again
    bad = srv.cli("callers", "grant", "not-a-spiffe-id", "--role", "verifier")
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr, bad
    role = srv.cli("callers", "grant", identity, "--role", "superuser")
    assert role.returncode != 0 and "superuser" in role.stderr, role
    assert not [g for g in world.admin.list_callers() if g.identity == identity]


# -- keep the stubs honest: every RPC of the services is reachable by the client ---------


@pytest.fixture
def stubs(world: World) -> Iterator[tuple[Any, Any]]:
    with world.server.channel() as channel:
        yield (token_service_pb2_grpc.TokenServiceStub(channel),
               key_admin_pb2_grpc.KeyAdminStub(channel))


def test_the_operator_is_served_every_rpc_it_was_denied(
        world: World, stubs: tuple[Any, Any]) -> None:
    """The deny-by-default test is only meaningful when the same requests are
    served to a caller with the roles: the bootstrap admin gets no
    PERMISSION_DENIED on any of them (other refusals are the request's)."""
    requests = _minimal_requests(world)
    # Not these: they would change the shared world for the other tests.
    skip = {"TokenService/Revoke", "KeyAdmin/ActivateKey", "KeyAdmin/RetireKey",
            "KeyAdmin/RevokeCaller", "KeyAdmin/GenerateKey", "KeyAdmin/CreateTenant",
            "KeyAdmin/AddTrustedIssuer", "KeyAdmin/RotateKey"}
    granted = requests["KeyAdmin/GrantCaller"]
    assert isinstance(granted, key_admin_pb2.GrantCallerRequest)
    for name, method in _every_rpc():
        if name in skip:
            continue
        stub = stubs[0] if name.startswith("TokenService/") else stubs[1]
        try:
            getattr(stub, method.name)(requests[name], timeout=10)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            assert err.code != grpc.StatusCode.PERMISSION_DENIED, (name, err)
    assert world.admin.revoke_caller(granted.identity) == 1
