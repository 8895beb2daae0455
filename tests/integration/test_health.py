"""grpc.health.v1 follows Postgres: a real health client over mTLS sees
SERVING, NOT_SERVING while Postgres is stopped, SERVING once it is back;
the operations listener's /healthz says the same. An unusable HSM (a
token that is not there) takes the overall status and KeyAdmin down, not
TokenService (fedtoken.rpc.health explains why).

Runs on a PRIVATE embedded Postgres (this module stops it), never on the
session one, with a short revocation staleness bound so the view turns
stale within seconds of the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtoken.app import postgres_ping
from fedtoken.hsm import HsmConfig, Pkcs11Hsm
from fedtoken.rpc.health import KEY_ADMIN, OVERALL, TOKEN_SERVICE, Conditions, HealthMonitor
from fedtoken.store import create_pool
from fedtoken.store.embedded import EmbeddedPostgres
from tests._pg_fixture import create_database
from tests.integration._faults import FaultServe, PgControl
from tests.support import ServerThread, free_port, make_settings, poll_until

pytestmark = pytest.mark.integration

DEADLINE = 30.0
SERVICES = (OVERALL, TOKEN_SERVICE, KEY_ADMIN)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
T = TypeVar("T")


@dataclass
class Env:
    ctl: PgControl
    srv: ServerThread
    ops_base: str
    dsn: str
    hsm_config: HsmConfig


@pytest.fixture(scope="module")
def env(hsm_config: HsmConfig) -> Iterator[Env]:
    # A private directory, not pytest's basetemp (concurrent sessions rotate it).
    with tempfile.TemporaryDirectory(prefix="fedtoken-health-") as name:
        root = Path(name)
        pg = EmbeddedPostgres(root / "pg")
        admin = pg.start()
        # Stops and starts pg from a helper process: forking pg_ctl from this
        # one while gRPC threads run can crash the child (see _faults.py).
        ctl = PgControl(pg)
        srv: ServerThread | None = None
        try:
            dsn = create_database(admin, f"health_{uuid.uuid4().hex[:8]}")
            settings = make_settings(root / "state", ops_port=free_port(),
                                     revocation_staleness_seconds=1.5,
                                     revocation_heartbeat_seconds=0.3)
            srv = ServerThread(settings, dsn, hsm_config).start()
            assert srv.app is not None
            yield Env(ctl, srv, f"http://127.0.0.1:{srv.app.ops_port}", dsn, hsm_config)
        finally:
            with contextlib.suppress(Exception):
                ctl.start()
            if srv is not None:
                srv.stop()
            ctl.stop()
            ctl.close()


def eventually(probe: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    return poll_until(probe, done, what, deadline=DEADLINE, interval=0.1)


def statuses(channel: grpc.Channel) -> dict[str, str]:
    stub = health_pb2_grpc.HealthStub(channel)
    out = {}
    for service in SERVICES:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        out[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return out


def healthz(base: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def all_are(status: str) -> Callable[[dict[str, str]], bool]:
    return lambda found: set(found.values()) == {status}


def test_health_follows_postgres(env: Env) -> None:
    with env.srv.channel() as channel:
        eventually(lambda: statuses(channel), all_are("SERVING"), "SERVING at start")
        code, body = healthz(env.ops_base)
        assert (code, body["status"], body["postgres"], body["hsm"]) == (200, "ok", True, True)

        env.ctl.stop()
        eventually(lambda: statuses(channel), all_are("NOT_SERVING"),
                   "NOT_SERVING while Postgres is stopped")
        code, body = healthz(env.ops_base)
        assert (code, body["status"], body["postgres"]) == (503, "unavailable", False), body
        # Unknown services stay unknown (the servicer's own answer).
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND

        env.ctl.start()
        eventually(lambda: statuses(channel), all_are("SERVING"),
                   "SERVING again once Postgres is back")
        assert healthz(env.ops_base)[0] == 200


def test_an_unusable_hsm_is_not_serving_for_the_overall_status_and_key_admin(env: Env) -> None:
    missing = dataclasses.replace(env.hsm_config, token_label=f"absent-{uuid.uuid4().hex[:6]}")
    assert env.srv.app is not None
    revocations = env.srv.app.revocations

    async def probe() -> tuple[Conditions, dict[str, int]]:
        pool = await create_pool(env.dsn, min_size=1, max_size=1)
        hsm = Pkcs11Hsm(missing)
        try:
            monitor = HealthMonitor(hsm=hsm, ping_db=postgres_ping(pool),
                                    revocations=revocations)
            found = await monitor.check()
            servicer = monitor.servicer
            seen = {s: (await servicer.Check(health_pb2.HealthCheckRequest(service=s),
                                             None)).status for s in SERVICES}
            return found, seen
        finally:
            await asyncio.wait_for(pool.close(), 10)
            await hsm.aclose()

    eventually(lambda: revocations.is_fresh, bool, "the view fresh")
    found, seen = env.srv.run(probe())
    assert found == Conditions(hsm=False, postgres=True, revocations_fresh=True)
    assert seen == {OVERALL: NOT_SERVING, TOKEN_SERVICE: SERVING, KEY_ADMIN: NOT_SERVING}


# -- `fedtoken serve --workers 2`: every worker on the operations port ---------------------


def test_serve_workers_share_the_operations_port(tmp_path: Path, pg_dsn: str) -> None:
    ops_port = free_port()
    serve = FaultServe(tmp_path, create_database(pg_dsn, f"health_w_{uuid.uuid4().hex[:8]}"),
                       workers=2, extra_env={"FEDTOKEN_OPS_PORT": str(ops_port),
                                             "FEDTOKEN_LOG_FORMAT": "text"})
    try:
        serve.start(timeout=120)
        workers = serve.listening_workers()
        assert len(workers) == 2, serve.log_tail()
        on_ops = {pid for pid, proc in workers.items()
                  if any(c.status == psutil.CONN_LISTEN and c.laddr.port == ops_port
                         for c in proc.net_connections(kind="tcp"))}
        assert on_ops == set(workers), serve.log_tail()
        base = f"http://127.0.0.1:{ops_port}"
        eventually(lambda: healthz(base)[0], lambda code: code == 200, "/healthz 200")
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
        with serve.channel() as channel:
            eventually(lambda: statuses(channel), all_are("SERVING"), "SERVING")
    except BaseException:
        serve.stop()
        raise
    assert serve.stop() == 0, serve.log_tail()  # SIGTERM: a clean exit
