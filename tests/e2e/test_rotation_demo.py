"""The rotation demo, against a real ``fedtoken serve`` process: a tenant
whose keys rotate every 20 s with a JWKS max-age of 3 s; a token issued every
half second for a minute, and each verified by PyJWT's PyJWKClient (caching
the JWKS for exactly the advertised max-age, never refetching on a miss)
against the HTTP bridge, again and again until it expires. Every check
passes, and at least two rotations happen meanwhile.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from tests._pg_fixture import create_database, drop_database
from tests.support import ServeProcess, child_env

pytestmark = pytest.mark.integration

PERIOD, MAX_AGE, LIFETIME = 20, 3, 4
RUN = 60.0


class FastRotatingServe(ServeProcess):
    """``fedtoken serve`` with seconds-scale rotation settings."""

    def env(self) -> dict[str, str]:
        return {**child_env(), "FEDTOKEN_MIN_ROTATION_PERIOD_SECONDS": "1",
                "FEDTOKEN_ROTATION_CHECK_SECONDS": "0.5",
                "FEDTOKEN_JWKS_MAX_AGE_SECONDS": str(MAX_AGE), "FEDTOKEN_LEEWAY_SECONDS": "1"}


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Iterator[ServeProcess]:
    name = f"rotdemo_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_dsn, name)
    proc = FastRotatingServe(Path(tmp_path_factory.mktemp("rotdemo")), dsn, name="rotdemo")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        drop_database(pg_dsn, name)


class StrictJwkClient(jwt.PyJWKClient):
    """PyJWKClient whose lookups never refetch on an unknown kid: a miss is
    a failure of the schedule, not something a refetch may hide."""

    def signing_key(self, kid: str) -> jwt.PyJWK:
        for key in self.get_jwk_set().keys:
            if key.key_id == kid:
                return key
        raise AssertionError(f"kid {kid} not in the cached JWKS")


def test_tokens_verify_through_rotations_with_an_honest_cache(serve: ServeProcess) -> None:
    tid = f"demo-{uuid.uuid4().hex[:6]}"
    with serve.client() as c:
        tenant = c.create_tenant(tid, rotation_period_seconds=PERIOD,
                                 max_token_lifetime_seconds=60)
        url = f"{serve.http_base}/t/{tid}/.well-known/jwks.json"
        with urllib.request.urlopen(url, timeout=10) as resp:
            cache_control = resp.headers["Cache-Control"]
        assert cache_control == f"public, max-age={tenant.jwks_max_age_seconds}"
        assert tenant.jwks_max_age_seconds == MAX_AGE
        jwks = StrictJwkClient(url, cache_jwk_set=True, lifespan=tenant.jwks_max_age_seconds)

        live: list[tuple[str, str, int]] = []  # (token, kid, exp)
        signers: list[str] = []
        checks = 0
        end = time.monotonic() + RUN
        while time.monotonic() < end:
            issued = c.issue("alice", "svc", tenant=tid, lifetime_seconds=LIFETIME)
            kid = jwt.get_unverified_header(issued.token)["kid"]
            if not signers or signers[-1] != kid:
                signers.append(kid)
            live.append((issued.token, kid, int(issued.expires_at)))
            now = time.time()
            live = [t for t in live if t[2] > now + 0.2]  # not within a hair of exp
            for token, token_kid, _ in live:
                key = jwks.signing_key(token_kid)
                claims = jwt.decode(token, key, algorithms=["RS256"], audience="svc",
                                    issuer=tenant.issuer, leeway=0)
                assert claims["sub"] == "alice"
                checks += 1
            time.sleep(0.5)
    assert len(signers) >= 3, f"fewer than two rotations seen: {signers}"
    assert len(set(signers)) == len(signers)  # a key never signs again once retired
    assert checks > RUN * 2
