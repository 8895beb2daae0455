"""The servers a benchmark talks to, each in processes of its own.

``Service`` runs the real ``fedtoken serve --workers N`` (whose workers are
``fedtoken.app.start_app`` with the default configuration: revocation view on,
audit on) against a benchmark database; ``EmptyServer`` is a grpc.aio server
whose TokenService/Verify handler returns an empty response, the ceiling a
Python gRPC unary handler can reach.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FEDTOKEN_") and k != "SOFTHSM2_CONF"}
    path = [str(ROOT / "server"), str(ROOT / "clients/python"), str(ROOT)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def create_database(admin_dsn: str) -> str:
    import asyncpg  # the server's dependency

    name = f"bench_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    # Keep the query (the embedded server's passfile=...): only the path changes.
    return urlsplit(admin_dsn)._replace(path=f"/{name}").geturl()


def wait_ready(target: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2, token_service_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = token_service_pb2_grpc.TokenServiceStub(channel)
        while True:
            try:
                stub.GetKeys(token_service_pb2.GetKeysRequest(), timeout=2)
                return
            except grpc.RpcError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start; log:\n{log.read_text()}") from None
                time.sleep(0.3)


class Service:
    """``fedtoken serve --workers N`` on a fixed port; restartable with
    another N over the same state dir (HSM token) and database."""

    def __init__(self, state: Path, dsn: str, *, name: str = "serve") -> None:
        self.state, self.dsn = state, dsn
        self.grpc_port, self.http_port = free_port(), free_port()
        self.log = state / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.workers = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, workers: int) -> list[str]:
        return [sys.executable, "-m", "fedtoken.cli.main", "serve",
                "--state-dir", str(self.state), "--dsn", self.dsn,
                "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                "--workers", str(workers), "--log-level", "warning"]

    def start(self, workers: int) -> Service:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command(workers), stdout=out,
                                         stderr=subprocess.STDOUT, env=child_env())
        wait_ready(self.target, self.proc, self.log)
        if workers > 1:
            # Every worker must be listening before the load starts, or the
            # kernel spreads the first connections over fewer of them.
            _wait_listeners(self.proc.pid, self.grpc_port, workers)
        self.workers = workers
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _wait_listeners(pid: int, port: int, count: int, timeout: float = 60) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = 0
        for child in psutil.Process(pid).children(recursive=True):
            try:
                conns = child.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
                listening += 1
        if listening >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"only {listening} of {count} workers listen on port {port}")


EMPTY_SERVER = """
import asyncio, sys
import grpc
from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb

async def verify(request, context):
    return pb.VerifyResponse()

async def get_keys(request, context):
    return pb.GetKeysResponse()

async def main(port):
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("fedtoken.v1.TokenService", {
        "Verify": grpc.unary_unary_rpc_method_handler(
            verify, request_deserializer=pb.VerifyRequest.FromString,
            response_serializer=pb.VerifyResponse.SerializeToString),
        "GetKeys": grpc.unary_unary_rpc_method_handler(
            get_keys,
            request_deserializer=pb.GetKeysRequest.FromString,
            response_serializer=pb.GetKeysResponse.SerializeToString),
    })
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()

asyncio.run(main(int(sys.argv[1])))
"""


class EmptyServer:
    """A grpc.aio server, one process, whose Verify handler does nothing."""

    def __init__(self, state: Path) -> None:
        self.port = free_port()
        self.log = state / "empty.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmptyServer:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", EMPTY_SERVER, str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, env=child_env())
        wait_ready(self.target, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
