"""A development certificate authority, so that mTLS works out of the box.

``ensure_dev_pki`` creates, under ``<state_dir>/tls/`` and only when missing
or about to expire, a CA, a server certificate for the listener's names and
an operator client certificate whose SPIFFE ID is a bootstrap admin. The CLI
finds them there by default. Private keys are written with mode 0600 and
never leave the state directory. For production, use certificates from
SPIRE or any private CA instead (docs/security.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

OPERATOR_ID: Final = "spiffe://fedtoken.dev/operator"
_CA_DAYS: Final = 3650
_LEAF_DAYS: Final = 90
_RENEW_BEFORE: Final = dt.timedelta(days=14)


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class DevPki:
    directory: Path
    ca: Path
    server: CertFiles
    operator: CertFiles
    operator_id: str = OPERATOR_ID


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _valid(path: Path, names: list[x509.GeneralName] | None = None) -> bool:
    """The certificate exists, is not near expiry and (if given) has these SANs."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc - _now() < _RENEW_BEFORE:
        return False
    if names is not None:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        if set(san) != set(names):
            return False
    return True


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _make_ca(directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtoken development CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / "ca.key", _key_pem(key))
    _write_public(directory / "ca.pem", _cert_pem(cert))


def _issue(directory: Path, out: CertFiles, common_name: str, names: list[x509.GeneralName],
           *, server: bool, days: int = _LEAF_DAYS,
           not_after: dt.datetime | None = None) -> None:
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(out.key, _key_pem(key))
    _write_public(out.cert, _cert_pem(cert))


def _server_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]):
        if not host or host in ("0.0.0.0", "::"):  # noqa: S104 - names, not binds
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def pki_dir(state_dir: Path) -> Path:
    return state_dir / "tls"


def ensure_dev_pki(state_dir: Path, hosts: list[str] | None = None) -> DevPki:
    """The development CA, server and operator certificates (made when missing)."""
    directory = pki_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (directory / "ca.key").exists() or not _valid(directory / "ca.pem"):
        _make_ca(directory)
        for stale in ("server.pem", "operator.pem"):
            (directory / stale).unlink(missing_ok=True)
    pki = DevPki(directory, directory / "ca.pem",
                 CertFiles(directory / "server.pem", directory / "server.key"),
                 CertFiles(directory / "operator.pem", directory / "operator.key"))
    names = _server_names(hosts or [])
    if not _valid(pki.server.cert, names):
        _issue(directory, pki.server, "fedtoken server", names, server=True)
    operator: list[x509.GeneralName] = [x509.UniformResourceIdentifier(OPERATOR_ID)]
    if not _valid(pki.operator.cert, operator):
        _issue(directory, pki.operator, "fedtoken operator", operator, server=False)
    return pki


def issue_client_cert(state_dir: Path, spiffe_id: str, out_dir: Path, *,
                      days: int = _LEAF_DAYS, uris: list[str] | None = None,
                      not_after: dt.datetime | None = None) -> CertFiles:
    """A client certificate from the dev CA naming ``spiffe_id`` (or ``uris``,
    for tests that need zero or two URI SANs)."""
    pki = ensure_dev_pki(state_dir)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u)
                                     for u in (uris if uris is not None else [spiffe_id])]
    out = CertFiles(out_dir / "client.pem", out_dir / "client.key")
    _issue(pki.directory, out, spiffe_id or "fedtoken client", names, server=False, days=days,
           not_after=not_after)
    return out
