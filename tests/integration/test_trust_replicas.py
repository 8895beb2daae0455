"""Trusted issuers across replicas: two real servers on ONE database. A trust
added, changed or removed through replica A must be configured on replica B
without a restart, by the ``{"type": "trust"}`` notification alone (B's
periodic resync is set far out, so it cannot mask a missing notification
path), and B's own listing shows what A did.

Both replicas are ServerThreads in this process on the one SoftHSM token,
with one dev PKI (B's state directory gets a copy of A's before it starts).
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtoken.hsm import HsmConfig
from fedtoken_client import FedtokenClient
from tests._pg_fixture import create_database, drop_database
from tests.support import ServerThread, make_settings

pytestmark = pytest.mark.integration

PROPAGATION = 5.0  # seconds
NO_RESYNC = 600.0


@dataclass
class Pair:
    a: ServerThread
    b: ServerThread
    admin_a: FedtokenClient
    admin_b: FedtokenClient
    tenant: str


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str,
         hsm_config: HsmConfig) -> Iterator[Pair]:
    name = f"trust_replicas_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_dsn, name)
    root: Path = tmp_path_factory.mktemp("trust-replicas")
    servers: list[ServerThread] = []
    try:
        a = ServerThread(make_settings(root / "a", revocation_resync_seconds=NO_RESYNC),
                         dsn, hsm_config).start()
        servers.append(a)
        shutil.copytree(root / "a" / "tls", root / "b" / "tls")
        b = ServerThread(make_settings(root / "b", revocation_resync_seconds=NO_RESYNC),
                         dsn, hsm_config).start()
        servers.append(b)
        with a.client(caller="trust-a") as admin_a, b.client(caller="trust-b") as admin_b:
            tenant = f"tr-{uuid.uuid4().hex[:6]}"
            admin_a.create_tenant(tenant, generate_key=False)
            yield Pair(a, b, admin_a, admin_b, tenant)
    finally:
        for srv in reversed(servers):
            srv.stop()
        drop_database(pg_dsn, name)


def _within(bound: float, probe: Callable[[], bool], what: str) -> None:
    start = time.monotonic()
    while not probe():
        if time.monotonic() - start > bound:
            pytest.fail(f"not within {bound}s: {what}")
        time.sleep(0.05)


def _configured(srv: ServerThread, issuer: str) -> frozenset[str] | None:
    """The tenants replica ``srv`` has configured for ``issuer`` (None: not trusted)."""
    assert srv.app is not None
    trust = srv.app.services.trust_catalog.get(issuer)
    return trust.tenants if trust is not None else None


def test_a_trust_change_on_a_is_configured_on_b(pair: Pair) -> None:
    issuer = f"https://{uuid.uuid4().hex[:8]}.partner.example/t/x"
    assert _configured(pair.b, issuer) is None
    pair.admin_a.add_trusted_issuer(issuer, tenants=[pair.tenant])
    assert _configured(pair.a, issuer) == {pair.tenant}  # A: at once
    _within(PROPAGATION, lambda: _configured(pair.b, issuer) == {pair.tenant},
            "the trust added on A configured on B")

    other = f"tr-{uuid.uuid4().hex[:6]}"
    pair.admin_b.create_tenant(other, generate_key=False)
    pair.admin_b.add_trusted_issuer(issuer, tenants=[pair.tenant, other])
    _within(PROPAGATION, lambda: _configured(pair.a, issuer) == {pair.tenant, other},
            "the trust changed on B configured on A")
    listed = {i.issuer: sorted(i.tenants) for i in pair.admin_a.list_trusted_issuers()}
    assert listed[issuer] == sorted([pair.tenant, other])

    pair.admin_a.remove_trusted_issuer(issuer)
    _within(PROPAGATION, lambda: _configured(pair.b, issuer) is None,
            "the trust removed on A forgotten on B")
    assert issuer not in {i.issuer for i in pair.admin_b.list_trusted_issuers()}
