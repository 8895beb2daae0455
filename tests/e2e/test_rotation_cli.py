"""The rotation commands of the operator CLI against the shared server:
``tenants create/update --rotation-period --max-token-lifetime`` (durations;
the derived timings shown) and ``keys rotate --now`` (emergency, audited)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from fedtoken_client._pb.fedtoken.v1 import common_pb2
from tests.support import ServerThread

pytestmark = pytest.mark.integration
ACTIVE = common_pb2.KeyState.Value("ACTIVE")
RETIRING = common_pb2.KeyState.Value("RETIRING")


def test_tenant_rotation_policy_and_emergency_rotation(server: ServerThread) -> None:
    tid = f"cli-rot-{uuid.uuid4().hex[:6]}"
    made = server.cli("tenants", "create", tid, "--rotation-period", "2h",
                      "--max-token-lifetime", "1h")
    assert made.returncode == 0, made.stderr
    tenant: dict[str, Any] = json.loads(made.stdout)
    assert int(tenant["rotation_period_seconds"]) == 7200
    assert int(tenant["max_token_lifetime_seconds"]) == 3600
    assert int(tenant["prepublish_seconds"]) >= int(tenant["jwks_max_age_seconds"])
    assert int(tenant["grace_seconds"]) > 3600
    assert tenant["next_rotation_step"] == "GENERATE"
    assert "# rotation:" in made.stderr  # the derived timings, spelled out

    # A lifetime the grace does not cover (4 periods) is refused, naming why.
    refused = server.cli("tenants", "update", tid, "--max-token-lifetime", "7d")
    assert refused.returncode != 0
    assert "POLICY_VIOLATION" in refused.stderr or "grace" in refused.stderr
    # Below min_rotation_period_seconds (one hour by default): refused too.
    assert server.cli("tenants", "update", tid, "--rotation-period", "20s").returncode != 0
    ok = server.cli("tenants", "update", tid, "--rotation-period", "30d")
    assert ok.returncode == 0, ok.stderr
    assert int(json.loads(ok.stdout)["rotation_period_seconds"]) == 30 * 86400

    with server.client() as c:
        before = next(k for k in c.list_keys(tid) if k.state == ACTIVE)
        assert server.cli("keys", "rotate", "--tenant", tid).returncode != 0  # needs --now
        rotated = server.cli("keys", "rotate", "--tenant", tid, "--now", "--reason", "drill")
        assert rotated.returncode == 0, rotated.stderr
        new_kid = json.loads(rotated.stdout)["kid"]
        assert new_kid != before.kid
        states = {k.kid: k.state for k in c.list_keys(tid)}
        assert states[new_kid] == ACTIVE and states[before.kid] == RETIRING
        events = c.list_audit(tenant=tid, event_type="key.activated").events
        assert any(json.loads(e.details_json).get("emergency") for e in events)
        assert server.app is not None
        attrs = server.run(server.app.signer.key_attributes(before.hsm_label))
        assert attrs.present is False  # the old private half is gone at once
