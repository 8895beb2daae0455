"""The CLI against the shared server, as a person and as a script sees it:
tables on a terminal (a real pseudo-terminal, and in-process with a
fixed-width console), the JSON structure scripts parse, and exit codes
0 / 1 / 2 (ok / negative verdict / usage, connection or permission)."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fedtoken.cli import main as cli_main
from fedtoken.cli import output
from tests.support import ServerThread, child_env, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tenant(server: ServerThread) -> str:
    tid = f"cli-tab-{uuid.uuid4().hex[:6]}"
    with server.client() as c:
        c.create_tenant(tid, "", generate_key=True)
    return tid


def _run(server: ServerThread, monkeypatch: pytest.MonkeyPatch, *argv: str,
         tty: bool = True) -> tuple[int, str]:
    buf = io.StringIO()
    monkeypatch.setattr(output.Output, "detect", classmethod(
        lambda cls, json_flag: cls(json=json_flag or not tty, stdout=buf, width=250)))
    code = cli_main.main(["--target", server.target, "--state-dir", str(server.state), *argv])
    return code, buf.getvalue()


def test_keys_list_is_a_table_on_a_terminal_and_json_otherwise(
        server: ServerThread, tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    code, text = _run(server, monkeypatch, "keys", "list", "--tenant", tenant)
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split() == ["TENANT", "KID", "STATE", "ALG", "BITS", "CREATED",
                                "ACTIVATED", "HSM", "LABEL"]
    assert set(lines[1]) == {"─"}
    row = lines[2].split()
    assert row[0] == tenant and row[2] == "ACTIVE" and row[3:5] == ["RS256", "2048"]
    assert row[-1] == f"fedtoken/{tenant}/{row[1]}"

    code, text = _run(server, monkeypatch, "keys", "list", "--tenant", tenant, tty=False)
    keys = json.loads(text)
    assert code == 0 and len(keys) == 1
    assert set(keys[0]) >= {"kid", "tenant", "alg", "key_size", "state", "public_jwk_json",
                            "created_at", "activated_at", "hsm_label"}
    assert keys[0]["state"] == "ACTIVE" and keys[0]["kid"] == row[1]
    # --json on a terminal: the same JSON.
    code, again = _run(server, monkeypatch, "--json", "keys", "list", "--tenant", tenant)
    assert json.loads(again) == keys


def test_verify_exit_codes_and_json(server: ServerThread, tenant: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with server.client() as c:
        token = c.issue("carol", "svc-tab", tenant=tenant).token
    code, text = _run(server, monkeypatch, "token", "verify", token, "--aud", "svc-tab",
                      tty=False)
    verdict = json.loads(text)
    assert code == 0 and verdict["valid"] is True and verdict["claims"]["sub"] == "carol"
    assert "claims_json" not in verdict
    code, text = _run(server, monkeypatch, "token", "verify", token, "--aud", "svc-tab")
    assert code == 0 and text.splitlines()[0] == "VALID"
    assert _run(server, monkeypatch, "token", "revoke", "--token", token, tty=False)[0] == 0
    code, text = _run(server, monkeypatch, "token", "verify", token, "--aud", "svc-tab")
    assert code == 1 and text.splitlines()[0] == "INVALID: REVOKED"
    code, text = _run(server, monkeypatch, "token", "verify", token, "--aud", "svc-tab",
                      tty=False)
    assert code == 1 and json.loads(text)["reason"] == "REVOKED"


def test_audit_verify_is_0_with_a_verdict_line(server: ServerThread,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    code, text = _run(server, monkeypatch, "audit", "verify")
    assert code == 0 and text.splitlines()[0] == "audit chain intact"
    code, text = _run(server, monkeypatch, "audit", "verify", tty=False)
    assert code == 0 and json.loads(text)["ok"] is True


def _cli(server: ServerThread, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedtoken.cli.main", *argv],
                          capture_output=True, text=True, env={**child_env(), **env},
                          timeout=60)


def test_errors_exit_2_with_one_line_saying_what_to_check(server: ServerThread) -> None:
    tls = server.identity(f"spiffe://fedtoken.dev/test/nobody-{uuid.uuid4().hex[:6]}")
    denied = _cli(server, "--target", server.target, "--tls-ca", str(tls.ca), "--tls-cert",
                  str(tls.cert), "--tls-key", str(tls.key), "tenants", "list")
    assert denied.returncode == 2 and denied.stdout == ""
    assert denied.stderr.startswith("error: PERMISSION_DENIED ROLE_NOT_GRANTED: missing role ")
    assert denied.stderr.count("\n") == 1 and "fedtoken callers grant" in denied.stderr

    target = f"127.0.0.1:{free_port()}"
    down = _cli(server, "--target", target, "--state-dir", str(server.state), "tenants", "list")
    assert down.returncode == 2 and target in down.stderr and "--target" in down.stderr
    assert "Traceback" not in down.stderr

    # The right server, a CA that did not issue its certificate.
    other = server.state / "identities" / "other-ca.pem"
    other.write_bytes(Path(tls.cert).read_bytes())  # a leaf, not the server's CA
    wrong_ca = _cli(server, "--target", server.target, "--tls-ca", str(other), "--tls-cert",
                    str(tls.cert), "--tls-key", str(tls.key), "tenants", "list")
    assert wrong_ca.returncode == 2 and "TLS" in wrong_ca.stderr and "--tls-ca" in wrong_ca.stderr

    missing = _cli(server, "--target", server.target, "tenants", "show", "no-such-tenant-x",
                   FEDTOKEN_STATE_DIR=str(server.state))
    assert missing.returncode == 2 and "NOT_FOUND TENANT_NOT_FOUND" in missing.stderr


def test_a_real_terminal_gets_a_table(server: ServerThread, tenant: str) -> None:
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fedtoken.cli.main", "--target", server.target,
             "--state-dir", str(server.state), "tenants", "list"],
            stdout=secondary, stderr=subprocess.PIPE, env={**child_env(), "COLUMNS": "200",
                                                           "TERM": "dumb"},
            timeout=60)
        os.close(secondary)
        chunks: list[bytes] = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0, proc.stderr
    assert "ID" in text.splitlines()[0] and "ISSUER" in text.splitlines()[0]
    assert any(line.split()[:1] == [tenant] for line in text.splitlines())
    assert not text.lstrip().startswith("[")  # not JSON
