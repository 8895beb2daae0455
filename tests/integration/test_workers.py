"""``fedtoken serve --workers 2``: two worker processes share one gRPC port
(SO_REUSEPORT), each serving calls on its own connections; Issue and Verify
work through any of them. Behaviour only, never timings."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedtoken_client import reason_name
from fedtoken_client._pb.fedtoken.v1 import token_service_pb2, token_service_pb2_grpc
from tests._pg_fixture import create_database, drop_database
from tests.support import ServeProcess

pytestmark = pytest.mark.integration

WORKERS = 2


class MultiWorkerServe(ServeProcess):
    """``fedtoken serve --workers 2``; ready once every worker listens."""

    def __init__(self, state: Path, dsn: str) -> None:
        super().__init__(state, dsn, workers=WORKERS)

    def ready(self) -> bool:
        return len(self.listening_workers()) >= WORKERS and super().ready()

    def listening_workers(self) -> dict[int, psutil.Process]:
        """Worker pid -> process, for workers holding a listening socket on our port."""
        found: dict[int, psutil.Process] = {}
        assert self.proc is not None
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                conns = child.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.grpc_port
                   for c in conns):
                found[child.pid] = child
        return found

    def serving_pids(self) -> set[int]:
        """Pids of worker processes holding an established connection on our port."""
        pids: set[int] = set()
        for pid, proc in self.listening_workers().items():
            conns = proc.net_connections(kind="tcp")
            if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.grpc_port
                   for c in conns):
                pids.add(pid)
        return pids


@pytest.fixture()
def serve(tmp_path: Path, pg_dsn: str) -> Iterator[MultiWorkerServe]:
    name = f"workers_{uuid.uuid4().hex[:10]}"
    sp = MultiWorkerServe(tmp_path, create_database(pg_dsn, name))
    yield sp
    sp.stop()
    drop_database(pg_dsn, name)


def test_two_workers_share_one_port_and_serve(serve: MultiWorkerServe) -> None:
    serve.start()
    listeners = serve.listening_workers()
    assert len(listeners) == WORKERS, serve.log.read_text()
    # The supervisor only supervises; the workers listen.
    assert serve.proc is not None and serve.proc.pid not in listeners

    with serve.client(caller="workers-test") as c:
        issued = c.issue("alice", "svc")
    # Independent channels: each its own TCP connection (no shared subchannel),
    # all kept open, so the kernel spreads them over the listening workers.
    channels = [serve.channel(options=[
        ("grpc.use_local_subchannel_pool", 1), ("fedtoken.test.channel", i)]) for i in range(24)]
    try:
        for ch in channels:
            stub = token_service_pb2_grpc.TokenServiceStub(ch)
            verdict = stub.Verify(token_service_pb2.VerifyRequest(
                token=issued.token, audience="svc"), timeout=30).verdict
            assert verdict.valid, reason_name(verdict.reason)
            batch = stub.VerifyBatch(token_service_pb2.VerifyBatchRequest(
                tokens=[issued.token] * 3, audience="svc"), timeout=30)
            assert [v.valid for v in batch.verdicts] == [True, True, True]
            fresh = stub.Issue(token_service_pb2.IssueRequest(
                subject="bob", audience=["svc"]), timeout=30)
            assert fresh.kid == issued.kid  # every worker signs with the tenant's active key
            assert stub.Verify(token_service_pb2.VerifyRequest(
                token=fresh.token, audience="svc"), timeout=30).verdict.valid
        # With 24 connections open, the chance that one worker got none is 2**-23.
        assert serve.serving_pids() == set(listeners)
    finally:
        for ch in channels:
            ch.close()


def test_revocation_reaches_every_worker(serve: MultiWorkerServe) -> None:
    serve.start()
    with serve.client() as c:
        token = c.issue("carol", "svc").token
        c.revoke(token=token)
    channels = [serve.channel(options=[
        ("grpc.use_local_subchannel_pool", 1), ("fedtoken.test.channel", i)]) for i in range(16)]
    try:
        # Each worker learns of the revocation from the Postgres feed; the
        # service promises it well within a second, 10 s only bounds the test.
        deadline = time.monotonic() + 10
        for ch in channels:
            stub = token_service_pb2_grpc.TokenServiceStub(ch)
            while True:
                verdict = stub.Verify(token_service_pb2.VerifyRequest(
                    token=token, audience="svc"), timeout=30).verdict
                if reason_name(verdict.reason) == "REVOKED":
                    break
                assert time.monotonic() < deadline, "a worker never saw the revocation"
                time.sleep(0.05)
        assert len(serve.serving_pids()) == WORKERS
    finally:
        for ch in channels:
            ch.close()


def test_workers_stop_with_the_supervisor(serve: MultiWorkerServe) -> None:
    serve.start()
    workers = list(serve.listening_workers().values())
    assert serve.proc is not None
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(30) == 0
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive and len(gone) == WORKERS


def test_a_worker_that_dies_is_replaced(serve: MultiWorkerServe) -> None:
    serve.start()
    before = serve.listening_workers()
    victim = next(iter(before.values()))
    victim.kill()
    victim.wait(10)
    deadline = time.monotonic() + 120
    while True:
        now = serve.listening_workers()
        if len(now) == WORKERS and victim.pid not in now:
            break
        assert time.monotonic() < deadline, serve.log.read_text()
        time.sleep(0.3)
    assert serve.proc is not None and serve.proc.poll() is None
    with serve.client() as c:
        token = c.issue("dave", "svc").token
        assert c.verify(token, "svc").valid
