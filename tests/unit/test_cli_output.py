"""The CLI's one output path: tables for people (snapshots of a fixed-width
rich console), JSON for scripts (exactly the structure commands always
printed), one-line errors, and the exit codes of usage and connection
errors."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedtoken.cli import doctor, errors
from fedtoken.cli.main import KEY_COLUMNS, main
from fedtoken.cli.output import Output
from fedtoken.config import load_settings
from fedtoken_client import FedtokenRpcError
from fedtoken_client._pb.fedtoken.v1 import common_pb2

KEYS = [{"tenant": "acme", "kid": "k1", "state": "ACTIVE", "alg": "RS256", "key_size": 2048,
         "created_at": "1700000000", "activated_at": "1700000100",
         "hsm_label": "fedtoken/acme/k1"},
        {"tenant": "acme", "kid": "k0", "state": "RETIRING", "alg": "RS256", "key_size": 2048,
         "created_at": "1690000000", "hsm_label": "fedtoken/acme/k0"}]


def render(data: Any, columns: Any = None, *, title: str = "", width: int = 100) -> str:
    buf = io.StringIO()
    Output(json=False, stdout=buf, width=width).emit(data, columns, title=title)
    # rich pads cells to the column width; the snapshot ignores trailing blanks.
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def test_a_list_is_a_table_with_the_chosen_columns() -> None:
    assert render(KEYS, KEY_COLUMNS) == """\
TENANT   KID   STATE      ALG     BITS   CREATED      ACTIVATED    HSM LABEL
───────────────────────────────────────────────────────────────────────────────────
acme     k1    ACTIVE     RS256   2048   1700000000   1700000100   fedtoken/acme/k1
acme     k0    RETIRING   RS256   2048   1690000000   -            fedtoken/acme/k0"""


def test_an_object_is_field_value_rows_under_its_verdict() -> None:
    verdict = {"valid": False, "reason": "REVOKED", "kid": "k1", "aud": ["a", "b"],
               "claims": {"sub": "alice", "n": 1}}
    assert render(verdict, title="INVALID: REVOKED") == """\
INVALID: REVOKED
FIELD    VALUE
──────────────────────────────
valid    no
reason   REVOKED
kid      k1
aud      a, b
claims   {"n":1,"sub":"alice"}"""


def test_the_doctor_table_wraps_within_the_width() -> None:
    checks = [{"name": "config", "status": "pass", "detail": "settings load", "fix": ""},
              {"name": "hsm login", "status": "fail",
               "detail": "the token refused the user login (PinIncorrect)",
               "fix": "check hsm_pin"}]
    assert render(checks, doctor.COLUMNS, title="FAILED: hsm login", width=80) == """\
FAILED: hsm login
CHECK       STATUS   DETAIL                                        FIX
────────────────────────────────────────────────────────────────────────────────
config      pass     settings load                                 -
hsm login   fail     the token refused the user login              check hsm_pin
                     (PinIncorrect)"""


def test_an_empty_list_says_so() -> None:
    assert render([]) == "(none)"


def test_json_mode_prints_exactly_the_data_sorted_and_indented() -> None:
    buf = io.StringIO()
    Output(json=True, stdout=buf).emit(KEYS, KEY_COLUMNS, title="ignored in JSON")
    assert buf.getvalue() == json.dumps(KEYS, indent=2, sort_keys=True) + "\n"
    assert json.loads(buf.getvalue()) == KEYS


def test_not_a_terminal_means_json_and_no_progress() -> None:
    # Under pytest stdout and stderr are captured, i.e. not terminals.
    out = Output.detect(json_flag=False)
    assert out.json is True and out.progress_enabled is False
    with out.progress("nothing shows"):
        pass


def test_token_decode_json_structure(capsys: pytest.CaptureFixture[str]) -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"
    assert main(["token", "decode", token]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "UNVERIFIED": True, "header": {"alg": "RS256"}, "payload": {"sub": "alice"}}


def test_usage_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "decode", "not-a-jws"]) == 2
    err = capsys.readouterr().err
    assert err == "error: not a compact JWS (need three dot-separated parts)\n"
    with pytest.raises(SystemExit) as exit_:
        main(["keys", "frobnicate"])
    assert exit_.value.code == 2


def test_an_unreachable_server_exits_2_naming_the_target(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support import free_port

    target = f"127.0.0.1:{free_port()}"
    assert main(["--target", target, "--insecure", "tenants", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert target in err and "fedtoken serve" in err and "--target" in err


def _rpc(code: grpc.StatusCode, reason: str, message: str) -> FedtokenRpcError:
    detail = (common_pb2.ErrorDetail(reason=common_pb2.ErrorReason.Value(reason))
              if reason != "ERROR_REASON_UNSPECIFIED" else None)
    return FedtokenRpcError(code, reason, message, detail)


def test_error_lines_say_what_to_check() -> None:
    denied = errors.rpc_error(_rpc(
        grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_GRANTED",
        "spiffe://x/y is not granted role admin (no-grant); an admin can grant it"), "h:1")
    assert denied.startswith("PERMISSION_DENIED ROLE_NOT_GRANTED: missing role admin: ")
    refused = errors.rpc_error(_rpc(grpc.StatusCode.NOT_FOUND, "ISSUER_NOT_TRUSTED", "no"),
                               "h:1")
    assert refused == "NOT_FOUND ISSUER_NOT_TRUSTED: no"  # the service's own, greppable
    tls = errors.rpc_error(_rpc(
        grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_UNSPECIFIED",
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:5: "
        "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED"), "h:1")
    assert tls.startswith("UNAVAILABLE: TLS handshake with h:1 failed") and "--tls-ca" in tls
    down = errors.rpc_error(_rpc(grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_UNSPECIFIED",
                                 "Connection refused"), "h:1")
    assert "h:1" in down and "fedtoken serve" in down


def _cert(path: Path, *, not_after: dt.datetime, uri: str = "spiffe://t.example/op") -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(days=400))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path


def test_an_expired_client_certificate_is_named_before_connecting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    cert = _cert(tmp_path / "op.pem", not_after=now - dt.timedelta(days=1))
    ca = _cert(tmp_path / "ca.pem", not_after=now + dt.timedelta(days=300))
    assert main(["--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key",
                 str(cert.with_suffix(".key")), "tenants", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --tls-cert {cert}: certificate expired on ")
    missing = errors.check_client_files(tmp_path / "nope.pem", cert, cert)
    assert missing is not None and missing.startswith("--tls-ca ")


def test_doctor_certificate_checks(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    settings = load_settings({
        "state_dir": tmp_path,
        "tls_cert": str(_cert(tmp_path / "server.pem", not_after=now - dt.timedelta(hours=1))),
        "tls_key": str(tmp_path / "server.key"),
        "tls_client_ca": str(_cert(tmp_path / "ca.pem", not_after=now + dt.timedelta(days=5)))},
        env={})
    operator = _cert(tmp_path / "op.pem", not_after=now + dt.timedelta(days=60))
    checks = {c.name: c for c in doctor.check_certificates(settings, client_cert=str(operator))}
    assert checks["server certificate"].status == "fail"
    assert "expired" in checks["server certificate"].detail
    assert checks["server certificate"].fix
    assert checks["client CA"].status == "warn"  # 5 days left
    assert checks["operator certificate"].status == "pass"
    assert "spiffe://t.example/op" in checks["operator certificate"].detail
    assert checks["operator chain"].status == "fail"  # self-signed, not the CA's
    report = doctor.report(list(checks.values()))
    assert report["ok"] is False
    assert set(report["checks"][0]) == {"name", "status", "detail", "fix"}


def test_json_is_accepted_before_and_after_any_command() -> None:
    from fedtoken.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["--json", "keys", "list"]).global_json is True
    assert parser.parse_args(["keys", "list", "--json"]).json is True
    assert parser.parse_args(["doctor", "--json"]).json is True
    assert parser.parse_args(["compliance", "--json"]).json is True  # its own, kept
