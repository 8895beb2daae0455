"""Zero trust across replicas: two servers on ONE database share the grants.

A grant or revocation made through replica A is stored once; replica B must
apply it without a restart, a revocation within the propagation bound
(``PROPAGATION``): B learns it from the ``{"type": "callers"}`` notification
the callers trigger sends on the event channel, not from its periodic resync
(set far out here, so it cannot mask a missing notification path).

Both replicas are ServerThreads in this process, on the one SoftHSM token,
with state directories of their own (audit spill) but one dev PKI (B's
state directory gets a copy of A's before it starts), so one client
certificate is good on both.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fedtoken.hsm import HsmConfig
from fedtoken_client import FedtokenClient, FedtokenRpcError, Tls
from tests._pg_fixture import create_database, drop_database
from tests.support import ServerThread, make_settings

pytestmark = pytest.mark.integration

PROPAGATION = 5.0  # seconds: a grant revoked on A is refused on B within this
NO_RESYNC = 600.0  # the periodic full resync, far beyond any test's duration



@dataclass
class Pair:
    a: ServerThread
    b: ServerThread
    admin_a: FedtokenClient
    admin_b: FedtokenClient


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str,
         hsm_config: HsmConfig) -> Iterator[Pair]:
    name = f"zt_replicas_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_dsn, name)
    root: Path = tmp_path_factory.mktemp("zt-replicas")
    servers: list[ServerThread] = []
    try:
        a = ServerThread(make_settings(root / "a", revocation_resync_seconds=NO_RESYNC),
                         dsn, hsm_config).start()
        servers.append(a)
        shutil.copytree(root / "a" / "tls", root / "b" / "tls")
        b = ServerThread(make_settings(root / "b", revocation_resync_seconds=NO_RESYNC),
                         dsn, hsm_config).start()
        servers.append(b)
        assert (b.state / "tls" / "ca.pem").read_bytes() == (a.state / "tls" / "ca.pem") \
            .read_bytes()
        with a.client(caller="zt-replica-a") as admin_a, \
                b.client(caller="zt-replica-b") as admin_b:
            yield Pair(a, b, admin_a, admin_b)
    finally:
        for srv in reversed(servers):
            srv.stop()
        drop_database(pg_dsn, name)


def _outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except FedtokenRpcError as exc:
        return f"{exc.code.name} {exc.reason}"
    return "OK"


def _within(deadline: float, probe: Callable[[], str], want: str, what: str) -> float:
    """Poll ``probe`` until it returns ``want``; the seconds it took."""
    start = time.monotonic()
    while True:
        got = probe()
        if got == want:
            return time.monotonic() - start
        if time.monotonic() - start > deadline:
            pytest.fail(f"not within {deadline}s: {what} (still {got!r})")
        time.sleep(0.05)


def _identity(pair: Pair, name: str) -> tuple[str, Tls]:
    """A certificate both replicas accept; no grant yet."""
    spiffe_id = f"spiffe://fedtoken.test/zt-replicas/{name}-{uuid.uuid4().hex[:8]}"
    return spiffe_id, pair.a.identity(spiffe_id)


DENIED = "PERMISSION_DENIED ROLE_NOT_GRANTED"


def test_one_certificate_is_authenticated_by_both_replicas(pair: Pair) -> None:
    _, tls = _identity(pair, "anyone")
    with pair.a.client(tls=tls) as ca, pair.b.client(tls=tls) as cb:
        # Authenticated on both (a denial, not UNAVAILABLE/UNAUTHENTICATED).
        assert _outcome(ca.get_keys) == DENIED
        assert _outcome(cb.get_keys) == DENIED


def test_grants_are_stored_once_and_read_by_both(pair: Pair) -> None:
    """What B lists (a read-through reload) is what A granted, and B then
    enforces it: the grants live in the shared database."""
    spiffe_id, tls = _identity(pair, "stored")
    pair.admin_a.grant_caller(spiffe_id, "verifier")
    listed = [g for g in pair.admin_b.list_callers() if g.identity == spiffe_id]
    assert [(g.role, g.granted_by.partition("@")[0]) for g in listed] == [
        ("verifier", "spiffe://fedtoken.dev/operator")]
    with pair.b.client(tls=tls) as cb:
        assert _outcome(cb.get_keys) == "OK"
    assert pair.admin_b.revoke_caller(spiffe_id) == 1
    with pair.b.client(tls=tls) as cb, pair.a.client(tls=tls) as ca:
        assert _outcome(cb.get_keys) == DENIED  # the replica that revoked: at once
        # A is told by notification (or lists it: read through).
        pair.admin_a.list_callers()
        assert _outcome(ca.get_keys) == DENIED


def test_a_grant_made_on_a_works_on_b(pair: Pair) -> None:
    spiffe_id, tls = _identity(pair, "granted")
    with pair.a.client(tls=tls) as ca, pair.b.client(tls=tls) as cb:
        assert _outcome(cb.get_keys) == DENIED
        pair.admin_a.grant_caller(spiffe_id, "verifier")
        assert _outcome(ca.get_keys) == "OK"  # A: at once
        _within(PROPAGATION, lambda: _outcome(cb.get_keys), "OK", "the grant applies on B")
        assert _outcome(lambda: cb.issue("s", "svc", lifetime_seconds=60)) == DENIED


def test_a_grant_revoked_on_a_stops_working_on_b_within_the_bound(pair: Pair) -> None:
    spiffe_id, tls = _identity(pair, "revoked")
    pair.admin_a.grant_caller(spiffe_id, "verifier")
    pair.admin_a.grant_caller(spiffe_id, "issuer")
    pair.admin_b.list_callers()  # B reads the grants through, whatever the feed does
    with pair.a.client(tls=tls) as ca, pair.b.client(tls=tls) as cb:
        assert _outcome(cb.get_keys) == "OK"
        token = cb.issue("s", "svc", lifetime_seconds=60).token
        # The revocation is made on A and takes effect there at once...
        assert pair.admin_a.revoke_caller(spiffe_id, "issuer") == 1
        assert _outcome(lambda: ca.issue("s", "svc", lifetime_seconds=60)) == DENIED
        # ... and on B within the bound, on the connection B already serves.
        took = _within(PROPAGATION, lambda: _outcome(
            lambda: cb.issue("s", "svc", lifetime_seconds=60)), DENIED,
            "the revoked issuer grant refused on B")
        assert took < PROPAGATION
        assert _outcome(cb.get_keys) == "OK"  # the other role stays
        assert cb.verify(token, "svc").valid
        assert pair.admin_a.revoke_caller(spiffe_id) == 1
        _within(PROPAGATION, lambda: _outcome(cb.get_keys), DENIED,
                "every role revoked on B")


def test_the_denial_on_b_is_audited_with_the_identity(pair: Pair) -> None:
    spiffe_id, tls = _identity(pair, "denied")
    with pair.b.client(tls=tls, caller="declared-on-b") as cb:
        with pytest.raises(FedtokenRpcError) as info:
            cb.issue("s", "svc", lifetime_seconds=60)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    request_id = info.value.request_id
    deadline = time.monotonic() + 10
    while True:
        # Read through replica A: one audit trail.
        found = [e for e in pair.admin_a.list_audit(event_type="access.denied",
                                                    page_size=1000).events
                 if e.request_id == request_id]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (event,) = found
    assert event.actor.startswith(spiffe_id + "@") and "declared-on-b" not in event.actor
    assert event.reason == "NO_GRANT"
    assert json.loads(event.details_json) == {"declared_caller": "declared-on-b",
                                              "method": "Issue", "role": "issuer"}
