"""The real `fedtoken serve` process: restart keeps keys and revocations; the
CLI drives it. Each server here owns a fresh state dir (its own SoftHSM
token) and a fresh database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtoken_client import reason_name
from tests._pg_fixture import create_database, drop_database
from tests.support import ServeProcess

pytestmark = pytest.mark.integration


@pytest.fixture()
def serve(tmp_path: Path, pg_dsn: str) -> Iterator[ServeProcess]:
    # A database of its own: its key rows describe this state dir's HSM token.
    name = f"serve_{uuid.uuid4().hex[:10]}"
    sp = ServeProcess(tmp_path, create_database(pg_dsn, name))
    yield sp
    sp.stop()
    drop_database(pg_dsn, name)


def test_restart_keeps_keys_and_revocations(serve: ServeProcess) -> None:
    serve.start()
    with serve.client() as c:
        revoked = c.issue("r1", "svc")
        kept = c.issue("r2", "svc")
        c.revoke(token=revoked.token)
        keys_before = {k.kid: k.state for k in c.list_keys()}
    assert serve.stop() == 0  # graceful

    serve.start()
    with serve.client() as c:
        assert {k.kid: k.state for k in c.list_keys()} == keys_before
        assert c.verify(kept.token, "svc").valid
        v = c.verify(revoked.token, "svc")
        assert reason_name(v.reason) == "REVOKED"
        assert c.issue("r3", "svc").kid == kept.kid  # same HSM key signs after restart
    assert serve.stop() == 0


def test_cli_issue_verify_revoke(serve: ServeProcess) -> None:
    serve.start()
    issued = serve.cli("token", "issue", "--sub", "cli-user", "--aud", "svc")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    assert token.count(".") == 2
    ok = serve.cli("token", "verify", token, "--aud", "svc")
    assert ok.returncode == 0 and '"valid": true' in ok.stdout
    assert serve.cli("token", "revoke", "--token", token).returncode == 0
    bad = serve.cli("token", "verify", token, "--aud", "svc")
    assert bad.returncode == 1 and '"REVOKED"' in bad.stdout
    err = serve.cli("token", "issue", "--sub", "x", "--aud", "svc", "--tenant", "missing")
    assert err.returncode == 2 and "TENANT_NOT_FOUND" in err.stderr
    assert "Traceback" not in err.stderr
