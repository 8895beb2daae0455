"""Health, reflection and the operations listener, seen from outside.

- gRPC reflection lists TokenService, KeyAdmin and Health (the shared
  server: on by default), and is UNIMPLEMENTED with grpc_reflection=false;
- Health answers a caller whose certificate holds no role (probes have
  none), over the same mTLS listener (no certificate: no answer);
- the operations listener serves /healthz and /metrics; the bridge keeps
  /healthz and never serves /metrics;
- a graceful stop turns an open Watch stream NOT_SERVING before the
  listener closes.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from fedtoken.hsm import HsmConfig
from tests._pg_fixture import create_database
from tests.support import ServerThread, free_port, make_settings

FEDTOKEN_SERVICES = {"fedtoken.v1.TokenService", "fedtoken.v1.KeyAdmin", "grpc.health.v1.Health"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(channel: grpc.Channel, service: str = "") -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10)
    status: int = reply.status
    return status


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str,
          hsm_config: HsmConfig) -> Iterator[ServerThread]:
    """A server of its own: reflection off, the operations listener on a free port."""
    db = create_database(pg_dsn, f"ops_{uuid.uuid4().hex[:8]}")
    settings = make_settings(tmp_path_factory.mktemp("ops-state"), ops_port=free_port(),
                             grpc_reflection=False)
    srv = ServerThread(settings, db, hsm_config).start()
    yield srv
    srv.stop()


def ops_base(srv: ServerThread) -> str:
    assert srv.app is not None and srv.app.ops_port
    return f"http://{srv.settings.ops_host}:{srv.app.ops_port}"


# -- reflection ------------------------------------------------------------------------


def test_reflection_lists_the_services(server: ServerThread) -> None:
    with server.channel() as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert services >= FEDTOKEN_SERVICES, services
        # And describes them: the file defining TokenService names its methods.
        proto = db.FindFileContainingSymbol("fedtoken.v1.TokenService")
        methods = {m.name for s in proto.service if s.name == "TokenService" for m in s.method}
        assert {"Issue", "Verify", "VerifyBatch"} <= methods


def test_reflection_is_unimplemented_when_turned_off(quiet: ServerThread) -> None:
    with quiet.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert check(channel) == SERVING  # health is there all the same


# -- health needs a certificate, not a role ---------------------------------------------


def test_health_answers_a_caller_without_any_role(server: ServerThread) -> None:
    nobody = server.identity(f"spiffe://fedtoken.test/probe-{uuid.uuid4().hex[:6]}")
    with server.channel(tls=nobody) as channel:
        for service in ("", "fedtoken.v1.TokenService", "fedtoken.v1.KeyAdmin"):
            assert check(channel, service) == SERVING, service


def test_health_is_on_the_mtls_listener(server: ServerThread) -> None:
    # TLS without a client certificate: the handshake is refused.
    ca = (server.state / "tls" / "ca.pem").read_bytes()
    with grpc.secure_channel(server.target, grpc.ssl_channel_credentials(ca)) as channel, \
            pytest.raises(grpc.RpcError) as info:
        check(channel)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


# -- the operations listener -----------------------------------------------------------


def test_ops_listener_serves_healthz_and_metrics(quiet: ServerThread) -> None:
    code, ctype, body = get(ops_base(quiet) + "/healthz")
    assert (code, ctype.split(";")[0]) == (200, "application/json"), body
    health = json.loads(body)
    assert health["status"] == "ok" and health["postgres"] and health["hsm"], health
    code, ctype, body = get(ops_base(quiet) + "/metrics")
    assert code == 200 and ctype.startswith("text/plain"), (code, ctype)


def test_bridge_keeps_healthz_but_not_metrics(quiet: ServerThread) -> None:
    assert get(quiet.http_base + "/healthz")[0] == 200
    assert get(quiet.http_base + "/metrics")[0] == 404


# -- graceful shutdown -----------------------------------------------------------------


def test_graceful_stop_turns_watch_not_serving_before_the_listener_closes(
        tmp_path: Path, pg_dsn: str, hsm_config: HsmConfig) -> None:
    db = create_database(pg_dsn, f"ops_stop_{uuid.uuid4().hex[:8]}")
    srv = ServerThread(make_settings(tmp_path, ops_port=-1), db, hsm_config).start()
    stopped = threading.Event()
    try:
        with srv.channel() as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="fedtoken.v1.TokenService"), timeout=30)
            first = next(watch)
            assert first.status == SERVING
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                stopping = pool.submit(lambda: (srv.stop(), stopped.set()))
                second = next(watch)
                # Seen while the stop was still under way (the grace period).
                assert second.status == NOT_SERVING
                assert not stopped.is_set()
                watch.cancel()
                stopping.result(30)
    finally:
        if not stopped.is_set():
            srv.stop()
