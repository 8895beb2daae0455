"""Certificate rotation without a restart: the gRPC listener re-reads its
certificate, key and client CA files on new handshakes when they changed
(``fedtoken.tls.credentials.ServerTls``), and established connections keep
working.

The server is a real ServerThread whose settings point tls_cert, tls_key and
tls_client_ca at copies in a directory of the test's (an operator or a SPIRE
agent replacing them is the same thing); what it serves is read with a plain
``ssl`` handshake to its port.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from fedtoken.hsm import HsmConfig
from fedtoken.tls import ensure_dev_pki, issue_client_cert
from fedtoken.tls.devca import OPERATOR_ID, DevPki
from fedtoken_client import FedtokenClient, FedtokenRpcError, Tls
from tests._pg_fixture import create_database, drop_database
from tests.support import ServerThread, make_settings

pytestmark = pytest.mark.integration


@dataclass
class Rotating:
    server: ServerThread
    pki: DevPki  # the dev PKI under the state dir (the operator's client certificate)
    served: Path  # the files the server is configured with
    root: Path


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str,
             hsm_config: HsmConfig) -> Iterator[Rotating]:
    name = f"zt_rotation_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_dsn, name)
    root: Path = tmp_path_factory.mktemp("cert-rotation")
    state = root / "state"
    pki = ensure_dev_pki(state)
    served = root / "served"
    served.mkdir()
    for src, dst in ((pki.server.cert, "server.pem"), (pki.server.key, "server.key"),
                     (pki.ca, "ca.pem")):
        shutil.copy(src, served / dst)
    settings = make_settings(state, tls_cert=str(served / "server.pem"),
                             tls_key=str(served / "server.key"),
                             tls_client_ca=str(served / "ca.pem"),
                             bootstrap_admins=OPERATOR_ID)
    srv = ServerThread(settings, dsn, hsm_config)
    try:
        srv.start()
        yield Rotating(srv, pki, served, root)
    finally:
        srv.stop()
        drop_database(pg_dsn, name)


@pytest.fixture
def r(rotating: Rotating) -> Rotating:
    return rotating


def _replace(path: Path, data: bytes) -> None:
    """Atomically, as a careful operator (or an agent) would."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _serial(pem_or_der: bytes) -> int:
    if pem_or_der.startswith(b"-----"):
        return int(x509.load_pem_x509_certificate(pem_or_der).serial_number)
    return int(x509.load_der_x509_certificate(pem_or_der).serial_number)


def _served_serial(r: Rotating) -> int:
    """A NEW TLS connection to the gRPC port: the serial of the certificate served."""
    assert r.server.app is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(r.pki.ca)
    context.load_cert_chain(r.pki.operator.cert, r.pki.operator.key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", r.server.app.grpc_port), timeout=5) as sock, \
            context.wrap_socket(sock, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return _serial(der)


def _new_server_certificate(r: Rotating) -> tuple[bytes, bytes]:
    """A fresh server certificate and key from the same CA (a new serial)."""
    r.pki.server.cert.unlink()
    ensure_dev_pki(r.pki.directory.parent)
    return r.pki.server.cert.read_bytes(), r.pki.server.key.read_bytes()


def _reason(call: object) -> str:
    assert callable(call)
    try:
        call()
    except FedtokenRpcError as exc:
        return f"{exc.code.name} {exc.reason}"
    return "OK"


def test_a_replaced_server_certificate_is_served_to_new_connections(r: Rotating) -> None:
    first = _serial((r.served / "server.pem").read_bytes())
    assert _served_serial(r) == first
    with r.server.client() as held:
        assert held.get_keys().keys  # an established channel, before the rotation
        cert, key = _new_server_certificate(r)
        assert _serial(cert) != first
        _replace(r.served / "server.key", key)
        _replace(r.served / "server.pem", cert)
        # The very next handshake gets the new certificate: no restart, no wait.
        assert _served_serial(r) == _serial(cert)
        assert _served_serial(r) == _serial(cert)
        # The channel made before keeps working...
        assert held.get_keys().keys
        # ... and a new client, verifying the new certificate, is served too.
        with r.server.client() as fresh:
            assert fresh.get_keys().keys
        assert held.get_keys().keys


def test_a_half_written_certificate_does_not_break_new_handshakes(r: Rotating) -> None:
    current = _served_serial(r)
    good = (r.served / "server.pem").read_bytes()
    _replace(r.served / "server.pem", good[: len(good) // 2])
    try:
        # Still the current certificate, still served.
        assert _served_serial(r) == current
        with r.server.client() as c:
            assert c.get_keys().keys
    finally:
        _replace(r.served / "server.pem", good)
    cert, key = _new_server_certificate(r)
    _replace(r.served / "server.key", key)
    _replace(r.served / "server.pem", cert)
    assert _served_serial(r) == _serial(cert)


def test_a_replaced_client_ca_bundle_applies_to_new_connections(r: Rotating) -> None:
    """Trusting a second CA: its clients are authenticated from the next
    handshake on (here: a caller with no grant, so a denial, not UNAVAILABLE);
    dropping it again refuses them, while established channels keep going."""
    other = ensure_dev_pki(r.root / "other-ca")
    identity = f"spiffe://partner.test/ns/{uuid.uuid4().hex[:8]}"
    files = issue_client_cert(r.root / "other-ca", identity, r.root / "partner")
    partner = Tls(r.pki.ca, files.cert, files.key)  # trusts our server, signed by theirs
    original = (r.served / "ca.pem").read_bytes()

    def call() -> str:
        with FedtokenClient(r.server.target, tls=partner, timeout=5) as c:
            return _reason(c.get_keys)

    assert call().startswith("UNAVAILABLE")
    with r.server.client() as held:
        assert held.get_keys().keys
        _replace(r.served / "ca.pem", original + other.ca.read_bytes())
        assert call() == "PERMISSION_DENIED ROLE_NOT_GRANTED"
        with FedtokenClient(r.server.target, tls=partner, timeout=5) as kept:
            assert _reason(kept.get_keys) == "PERMISSION_DENIED ROLE_NOT_GRANTED"
            _replace(r.served / "ca.pem", original)
            assert call().startswith("UNAVAILABLE")
            # The partner's established channel is not cut by the change.
            assert _reason(kept.get_keys) == "PERMISSION_DENIED ROLE_NOT_GRANTED"
        assert held.get_keys().keys
