"""``fedtoken doctor`` as an operator runs it (a subprocess with the same
settings as ``serve``), beside the shared e2e server: a healthy setup passes;
a wrong PIN, an unreachable Postgres and an expired certificate each fail
the right check, with a fix, and exit 1."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedtoken.hsm.devtoken import DevToken, ensure_dev_token
from tests.support import ServerThread, child_env, free_port

pytestmark = pytest.mark.integration


def _doctor(state: Path, env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run(
        [sys.executable, "-m", "fedtoken.cli.main", "doctor", "--state-dir", str(state)],
        capture_output=True, text=True, env={**child_env(), **env}, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout), result.stderr


def _env(token: DevToken, dsn: str, **extra: str) -> dict[str, str]:
    return {"SOFTHSM2_CONF": str(token.conf_path), "FEDTOKEN_HSM_MODULE": token.module,
            "FEDTOKEN_HSM_TOKEN_LABEL": token.token_label,
            "FEDTOKEN_HSM_PIN_FILE": str(token.pin_file), "FEDTOKEN_DATABASE_DSN": dsn,
            **extra}


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in report["checks"]}


def test_a_healthy_setup_passes(server: ServerThread, server_db: str,
                                hsm_devtoken: DevToken) -> None:
    code, report, _ = _doctor(server.state, _env(hsm_devtoken, server_db))
    checks = _by_name(report)
    assert code == 0 and report["ok"] is True, report
    assert set(checks) == {"config", "hsm module", "hsm login", "hsm keys", "postgres",
                           "migrations", "clock", "server certificate", "client CA",
                           "operator certificate"}
    assert all(c["status"] == "pass" for c in checks.values()), report
    assert "spiffe://fedtoken.dev/operator" in checks["operator certificate"]["detail"]
    assert checks["hsm keys"]["detail"].split()[0] != "0"  # the server's keys were read
    # The server is undisturbed: it still signs.
    with server.client() as c:
        assert c.verify(c.issue("doctor", "svc").token, "svc").valid


def test_a_wrong_pin_fails_the_login(server: ServerThread, server_db: str,
                                     tmp_path: Path) -> None:
    # A token of its own: failed logins must not count against the shared one.
    token = ensure_dev_token(tmp_path / "hsm", "doctor-pin")
    code, report, _ = _doctor(server.state, _env(token, server_db, FEDTOKEN_HSM_PIN="0000",
                                                 FEDTOKEN_HSM_PIN_FILE=""))
    login = _by_name(report)["hsm login"]
    assert code == 1 and report["ok"] is False
    assert login["status"] == "fail" and "PIN" in login["detail"] and "PIN" in login["fix"]
    assert "0000" not in json.dumps(report)  # never the PIN itself
    assert _by_name(report)["postgres"]["status"] == "pass"  # only that check fails


def test_an_unreachable_postgres_fails_and_skips_what_needs_it(
        server: ServerThread, hsm_devtoken: DevToken) -> None:
    closed = f"postgresql://fedtoken_app@127.0.0.1:{free_port()}/postgres"
    code, report, _ = _doctor(server.state, _env(hsm_devtoken, closed))
    checks = _by_name(report)
    assert code == 1
    assert checks["postgres"]["status"] == "fail" and "not reachable" in checks["postgres"][
        "detail"]
    assert "database_dsn" in checks["postgres"]["fix"]
    assert checks["migrations"]["status"] == checks["clock"]["status"] == "skip"
    assert checks["hsm login"]["status"] == "pass"


def test_an_expired_server_certificate_fails(server: ServerThread, server_db: str,
                                             hsm_devtoken: DevToken, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired server")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=100))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    code, report, _ = _doctor(server.state, _env(
        hsm_devtoken, server_db, FEDTOKEN_TLS_CERT=str(cert_file),
        FEDTOKEN_TLS_KEY=str(key_file), FEDTOKEN_TLS_CLIENT_CA=str(server.state / "tls" /
                                                                   "ca.pem")))
    checks = _by_name(report)
    assert code == 1
    assert checks["server certificate"]["status"] == "fail"
    assert "expired" in checks["server certificate"]["detail"]
    assert str(cert_file) in checks["server certificate"]["detail"]
    assert checks["server certificate"]["fix"]
    assert checks["client CA"]["status"] == "pass"
