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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc

if TYPE_CHECKING:
    from fedtoken_client import FedtokenClient

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


def sync_channel(target: str, tls: tuple[str, str, str] | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target)
    ca, cert, key = (Path(p).read_bytes() for p in tls)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert))


def wait_ready(target: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120,
               tls: Callable[[], tuple[str, str, str] | None] = lambda: None) -> None:
    """GetKeys answers (over mTLS once the dev PKI exists, when ``tls`` names it)."""
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2, token_service_pb2_grpc

    deadline = time.monotonic() + timeout
    while True:
        files = tls()
        if files is None or all(Path(p).exists() for p in files):
            with sync_channel(target, files) as channel:
                stub = token_service_pb2_grpc.TokenServiceStub(channel)
                try:
                    stub.GetKeys(token_service_pb2.GetKeysRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start; log:\n{log.read_text()}")
        time.sleep(0.3)


class Service:
    """``fedtoken serve --workers N`` on a fixed port; restartable with
    another N over the same state dir (HSM token) and database."""

    def __init__(self, state: Path, dsn: str, *, name: str = "serve") -> None:
        self.state, self.dsn = state, dsn
        self.insecure = False
        self.grpc_port, self.http_port = free_port(), free_port()
        self.log = state / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.workers = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def tls(self) -> tuple[str, str, str] | None:
        """The dev operator's mTLS files (None while serving insecure)."""
        if self.insecure:
            return None
        d = self.state / "tls"
        return (str(d / "ca.pem"), str(d / "operator.pem"), str(d / "operator.key"))

    def client(self) -> FedtokenClient:
        """A blocking client authenticated as the dev operator."""
        from fedtoken_client import FedtokenClient, Tls

        files = self.tls
        return FedtokenClient(self.target, tls=Tls(*files) if files else None,
                              insecure=files is None)

    @property
    def issuer(self) -> str:
        """The default tenant's issuer (its public URL)."""
        return f"http://127.0.0.1:{self.http_port}"

    def command(self, workers: int) -> list[str]:
        return [sys.executable, "-m", "fedtoken.cli.main", "serve",
                "--state-dir", str(self.state), "--dsn", self.dsn,
                "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                "--workers", str(workers), "--log-level", "warning"]

    def start(self, workers: int, *, insecure: bool = False,
              env_extra: dict[str, str] | None = None) -> Service:
        """``insecure``: plaintext with every caller taken to be the dev
        operator, to measure what mTLS costs in the same run. ``env_extra``:
        more FEDTOKEN_* settings."""
        self.insecure = insecure
        env = {**child_env(), **(env_extra or {})}
        if insecure:
            operator = "spiffe://fedtoken.dev/operator"
            env.update(FEDTOKEN_INSECURE="1", FEDTOKEN_INSECURE_IDENTITY=operator,
                       FEDTOKEN_BOOTSTRAP_ADMINS=operator)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command(workers), stdout=out,
                                         stderr=subprocess.STDOUT, env=env)
        wait_ready(self.target, self.proc, self.log, tls=lambda: self.tls)
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
    if len(sys.argv) > 2:  # mTLS: server cert, key, client CA (the same as fedtoken's)
        cert, key, ca = (open(p, "rb").read() for p in sys.argv[2:5])
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                            require_client_auth=True)
        server.add_secure_port(f"127.0.0.1:{port}", creds)
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()

asyncio.run(main(int(sys.argv[1])))
"""


class EmptyServer:
    """A grpc.aio server, one process, whose Verify handler does nothing."""

    def __init__(self, state: Path, pki: Path | None = None) -> None:
        """``pki``: a dev PKI directory (ca.pem, server.pem/key, operator.pem/key)
        whose certificates it serves mTLS with, exactly as fedtoken does."""
        self.port = free_port()
        self.log = state / "empty.log"
        self.pki = pki
        self.insecure = False
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls(self) -> tuple[str, str, str] | None:
        if self.pki is None or self.insecure:
            return None
        d = self.pki
        return (str(d / "ca.pem"), str(d / "operator.pem"), str(d / "operator.key"))

    def start(self, *, insecure: bool = False) -> EmptyServer:
        self.insecure = insecure
        args = [sys.executable, "-c", EMPTY_SERVER, str(self.port)]
        if self.pki is not None and not insecure:
            args += [str(self.pki / "server.pem"), str(self.pki / "server.key"),
                     str(self.pki / "ca.pem")]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         env=child_env())
        wait_ready(self.target, self.proc, self.log, tls=lambda: self.tls)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
