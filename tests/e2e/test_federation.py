"""Federation between independent instances: A (in process) trusts the
issuer of B (a real `fedtoken serve` with its own SoftHSM token, PKI and
Postgres server) for tenant t. C is a third instance A does not trust.

Everything goes over the real transports: B's JWKS and discovery over HTTP,
tokens and admin calls over mTLS gRPC. A's federation bounds are shrunk to
seconds (the settings exist for tests and demos) so outages can be waited
out; nothing asserts a duration, only outcomes polled within a bound.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest

from fedtoken.core.jwk import b64url_decode
from fedtoken.hsm import HsmConfig
from fedtoken_client import FedtokenRpcError, reason_name
from fedtoken_client._pb.fedtoken.v1 import common_pb2
from tests._pg_fixture import create_database, drop_database, private_postgres
from tests.support import ServeProcess, ServerThread, child_env, make_settings

T = TypeVar("T")
AUD = "orders"
MAX_STALE = 12  # seconds A may serve B's last good key set while B is down


class Instance(ServeProcess):
    """`fedtoken serve` whose JWKS max-age is short, so caches refresh often."""

    def env(self) -> dict[str, str]:
        return {**child_env(), "FEDTOKEN_JWKS_MAX_AGE_SECONDS": "2",
                "FEDTOKEN_LEEWAY_SECONDS": "1"}

    @property
    def issuer(self) -> str:
        return self.http_base


def a_settings(state: Path) -> Any:
    return make_settings(
        state, federation_allow_http_loopback=True, federation_min_max_stale_seconds=1,
        federation_min_max_age_seconds=1, federation_default_max_age_seconds=2,
        federation_max_max_age_seconds=3, federation_kid_miss_cooldown_seconds=0.5,
        federation_negative_ttl_seconds=1, federation_error_backoff_max_seconds=1,
        federation_fetch_timeout_seconds=2, federation_kid_wait_seconds=3,
        leeway_seconds=1)


@dataclass
class World:
    a: ServerThread
    a_dsn: str
    a_settings: Any
    hsm: HsmConfig
    b: Instance
    c: Instance

    def restart_a(self) -> None:
        self.a.stop()
        self.a = ServerThread(self.a_settings, self.a_dsn, self.hsm).start()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str,
          hsm_config: HsmConfig) -> Iterator[World]:
    with private_postgres("fedtoken-federation-") as partner_pg:
        b_dsn = partner_pg.create_database("partner_b")
        c_dsn = partner_pg.create_database("partner_c")
        b = Instance(tmp_path_factory.mktemp("instance-b"), b_dsn, name="b").start()
        c = Instance(tmp_path_factory.mktemp("instance-c"), c_dsn, name="c").start()
        name = f"federation_{uuid.uuid4().hex[:8]}"
        a_dsn = create_database(pg_dsn, name)
        settings = a_settings(tmp_path_factory.mktemp("instance-a"))
        a = ServerThread(settings, a_dsn, hsm_config).start()
        w = World(a, a_dsn, settings, hsm_config, b, c)
        try:
            with a.client() as admin:
                admin.create_tenant("t")
                admin.create_tenant("u")
                admin.add_trusted_issuer(b.issuer, tenants=["t"], max_stale_seconds=MAX_STALE)
            wait_for("A holds B's key set", lambda: usable(w))
            yield w
        finally:
            w.a.stop()
            b.stop()
            c.stop()
            drop_database(pg_dsn, name)


def tenant_issuer(client: Any, tenant: str) -> str:
    return str(next(t.issuer for t in client.list_tenants() if t.id == tenant))


def usable(w: World) -> bool:
    with w.a.client() as c:
        (issuer,) = [i for i in c.list_trusted_issuers() if i.issuer == w.b.issuer]
    return bool(issuer.key_set.usable)


def b_token(w: World, subject: str = "bob", audience: str = AUD, **kw: Any) -> str:
    with w.b.client() as c:
        return str(c.issue(subject, audience, **kw).token)


def verify_on_a(w: World, token: str, tenant: str = "t", audience: str = AUD) -> Any:
    with w.a.client() as c:
        return c.verify(token, audience, tenant=tenant)


def test_b_tokens_verify_on_a_only_in_the_tenant_that_trusts_b(world: World) -> None:
    token = b_token(world)
    v = verify_on_a(world, token)
    assert v.valid and v.foreign and v.issuer == world.b.issuer and v.tenant == "t"
    assert v.subject == "bob"
    for tenant in ("u", "default", ""):
        other = verify_on_a(world, token, tenant=tenant)
        assert not other.valid and reason_name(other.reason) == "UNTRUSTED_ISSUER", tenant
    with world.a.client() as c:
        batch = c.verify_batch([token, token], AUD, tenant="t")
    assert all(x.valid and x.foreign for x in batch)
    # C is an instance nobody trusts.
    with world.c.client() as c:
        stranger = str(c.issue("mallory", AUD).token)
    assert reason_name(verify_on_a(world, stranger).reason) == "UNTRUSTED_ISSUER"
    # A's own tokens are still local.
    with world.a.client() as c:
        local = c.verify(str(c.issue("alice", AUD, tenant="t").token), AUD, tenant="t")
    assert local.valid and not local.foreign


def test_a_revokes_b_tokens_in_its_own_tenant(world: World) -> None:
    token = b_token(world, subject="carol")
    jti = json.loads(b64url_decode(token.split(".")[1]))["jti"]
    with world.a.client() as c:
        c.revoke(jti=jti, issuer=world.b.issuer, tenant="t", reason="partner token leaked")
        assert reason_name(c.verify(token, AUD, tenant="t").reason) == "REVOKED"
        # The same jti of another (local) issuer is untouched.
        mine = c.issue("carol", AUD, tenant="t")
        assert c.verify(str(mine.token), AUD, tenant="t").valid
        other = b_token(world, subject="carol")
        c.revoke(subject="carol", issuer=world.b.issuer, tenant="t")
        assert reason_name(c.verify(other, AUD, tenant="t").reason) == "REVOKED"
        assert c.verify(str(mine.token), AUD, tenant="t").valid
        # Only a tenant that trusts the issuer may revoke its tokens.
        with pytest.raises(FedtokenRpcError) as info:
            c.revoke(jti="x", issuer=world.b.issuer, tenant="u")
        assert info.value.reason == "ISSUER_NOT_TRUSTED"


def test_b_rotates_and_a_follows_at_once(world: World) -> None:
    old_token = b_token(world)
    with world.b.client() as c:
        old_kid = next(k.kid for k in c.list_keys()
                       if common_pb2.KeyState.Name(k.state) == "ACTIVE")
        new = c.generate_key(activate=True)
        new_token = str(c.issue("bob", AUD).token)
    assert json.loads(b64url_decode(new_token.split(".")[0]))["kid"] == new.kid
    # The new kid is unknown to A's cache: the kid-miss refetch finds it.
    v = verify_on_a(world, new_token)
    assert v.valid and v.kid == new.kid
    # The old key is still published (RETIRING): its tokens still verify.
    assert verify_on_a(world, old_token).valid
    # B withdraws it: once A's cache has refreshed, its tokens stop verifying.
    with world.b.client() as c:
        c.retire_key(old_kid, emergency=True)
    wait_for("A stops accepting the withdrawn kid",
             lambda: reason_name(verify_on_a(world, old_token).reason) == "UNKNOWN_KEY")
    assert verify_on_a(world, new_token).valid


def test_a_survives_b_outage_within_max_stale_and_then_fails_closed(world: World) -> None:
    token = b_token(world, lifetime_seconds=600)
    assert verify_on_a(world, token).valid
    world.b.stop()
    try:
        stopped = time.monotonic()
        # B is down: A serves its last good set...
        assert verify_on_a(world, token).valid
        # ...also after a restart of A, from the set persisted in its Postgres.
        world.restart_a()
        if time.monotonic() - stopped < MAX_STALE - 4:
            assert verify_on_a(world, token).valid
        with world.a.client() as c:
            (issuer,) = [i for i in c.list_trusted_issuers() if i.issuer == world.b.issuer]
        assert issuer.key_set.kids
        # Past the maximum staleness its tokens fail closed, never accepted.
        refused = wait_for("B's tokens refused past max staleness",
                           lambda: (v := verify_on_a(world, token)) and
                           reason_name(v.reason) == "UNKNOWN_KEY" and v,
                           timeout=MAX_STALE + 20)
        assert not refused.valid
        with world.a.client() as c:
            (issuer,) = [i for i in c.list_trusted_issuers() if i.issuer == world.b.issuer]
        assert not issuer.key_set.usable
    finally:
        world.b.start()
    # B is back: A recovers with no operator action.
    wait_for("A verifies B's tokens again", lambda: verify_on_a(world, token).valid,
             timeout=30)


def test_exchange_mints_a_namespaced_short_lived_local_token(world: World) -> None:
    with world.a.client() as c:
        t_issuer = tenant_issuer(c, "t")
        (trust,) = [i for i in c.list_trusted_issuers() if i.issuer == world.b.issuer]
    foreign = b_token(world, subject="dave", audience=t_issuer, lifetime_seconds=120)
    foreign_claims = json.loads(b64url_decode(foreign.split(".")[1]))
    with world.a.client() as c:
        out = c.exchange(foreign, ["api://local"], tenant="t", lifetime_seconds=3600)
        assert out.subject == f"fed:{trust.namespace}dave" and out.tenant == "t"
        assert out.expires_at <= foreign_claims["exp"]  # never outlives the subject token
        claims = json.loads(b64url_decode(out.access_token.split(".")[1]))
        assert claims["sub"] == out.subject and claims["iss"] == t_issuer
        assert claims["origin"] == {"iss": world.b.issuer, "sub": "dave",
                                    "jti": foreign_claims["jti"]}
        assert not set(foreign_claims) - {"iss", "sub", "aud", "exp", "iat", "nbf", "jti"} \
            or "tenant" not in claims  # no foreign claim is copied
        local = c.verify(out.access_token, "api://local", tenant="t")
        assert local.valid and not local.foreign
        issued = [e for e in c.list_audit(event_type="token.issued", subject=out.subject).events]
        assert json.loads(issued[-1].details_json)["exchanged_from"] == claims["origin"]

        # Refused: addressed elsewhere, untrusted, one of ours, expired.
        for bad in (b_token(world, audience="someone-else"),
                    str(world.c.client().issue("x", t_issuer).token),
                    str(c.issue("alice", t_issuer, tenant="t").token)):
            with pytest.raises(FedtokenRpcError) as info:
                c.exchange(bad, ["api://local"], tenant="t")
            assert info.value.reason == "SUBJECT_TOKEN_INVALID", info.value
        with pytest.raises(FedtokenRpcError) as info:
            c.exchange(foreign, ["api://local"], tenant="u")
        assert info.value.reason == "SUBJECT_TOKEN_INVALID"
        short = b_token(world, subject="erin", audience=t_issuer, lifetime_seconds=1)
        time.sleep(2.5)  # past exp and A's 1 s leeway
        with pytest.raises(FedtokenRpcError) as info:
            c.exchange(short, ["api://local"], tenant="t")
        assert info.value.reason == "SUBJECT_TOKEN_INVALID"


def test_an_exchanged_token_verifies_with_pyjwt_against_a_jwks(world: World) -> None:
    with world.a.client() as c:
        t_issuer = tenant_issuer(c, "t")
        out = c.exchange(b_token(world, audience=t_issuer), ["api://local"], tenant="t")
    client = jwt.PyJWKClient(f"{world.a.http_base}/t/t/.well-known/jwks.json")
    key = client.get_signing_key_from_jwt(out.access_token)
    claims = jwt.decode(out.access_token, key.key, algorithms=["RS256"],
                        audience="api://local", issuer=t_issuer)
    assert claims["sub"].startswith("fed:") and claims["origin"]["iss"] == world.b.issuer


def test_the_http_token_endpoint_needs_a_client_certificate(world: World) -> None:
    import urllib.error
    import urllib.parse
    import urllib.request

    with world.a.client() as c:
        t_issuer = tenant_issuer(c, "t")
    discovery = json.loads(urllib.request.urlopen(
        f"{world.a.http_base}/t/t/.well-known/openid-configuration", timeout=10).read())
    assert discovery["token_endpoint"] == f"{world.a.http_base}/t/t/token"
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in discovery[
        "grant_types_supported"]
    body = urllib.parse.urlencode({
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": b_token(world, audience=t_issuer),
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "audience": "api://local"}).encode()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(
            discovery["token_endpoint"], data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"}), timeout=10)
    assert info.value.code == 401
    assert json.loads(info.value.read()) == {"error": "invalid_client"}


NODE_DIR = Path(__file__).resolve().parents[1] / "interop" / "node"


def test_an_exchanged_token_verifies_with_node_jose_against_a_jwks(world: World) -> None:
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "jose").is_dir():
        pytest.skip("node or its jose package is missing (scripts/dev test installs jose "
                    "with npm ci when npm exists)")
    with world.a.client() as c:
        t_issuer = tenant_issuer(c, "t")
        out = c.exchange(b_token(world, audience=t_issuer), ["api://local"], tenant="t")
    jwks = f"{world.a.http_base}/t/t/.well-known/jwks.json"

    def run(token: str, audience: str) -> tuple[int, dict[str, Any]]:
        done = subprocess.run([node, "verify.mjs", jwks, t_issuer, audience], input=token,
                              capture_output=True, text=True, cwd=NODE_DIR, timeout=60)
        return done.returncode, json.loads(done.stdout or "{}")

    code, result = run(out.access_token, "api://local")
    assert code == 0, result
    assert result["payload"]["sub"] == out.subject
    assert result["payload"]["origin"]["iss"] == world.b.issuer
    # And it is a real check: another audience, or a foreign token, fails.
    assert run(out.access_token, "api://other")[0] == 1
    assert run(b_token(world, audience=t_issuer), "api://local")[0] == 1
