"""Helpers shared by integration, e2e and interop tests (no fixtures here)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from fedtoken.app import App, start_app
from fedtoken.config import Settings, load_settings
from fedtoken.hsm import HsmConfig
from fedtoken_client import FedtokenClient, Tls

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def child_env() -> dict[str, str]:
    """The environment of a fedtoken child process: none of the test process's
    FEDTOKEN_* settings or SOFTHSM2_CONF, and this checkout on the path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FEDTOKEN_") and k != "SOFTHSM2_CONF"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "server"), str(ROOT / "clients/python")])
    return env


class _Tls:
    """mTLS helpers for a server whose dev PKI lives under ``state``/tls:
    clients authenticate as the dev operator (a bootstrap admin) unless told
    otherwise."""

    state: Path

    @property
    def target(self) -> str:
        raise NotImplementedError

    @property
    def tls(self) -> Tls:
        return Tls.from_dir(self.state / "tls", "operator")

    def client(self, *, tls: Tls | None = None, **kwargs: Any) -> FedtokenClient:
        return FedtokenClient(self.target, tls=tls or self.tls, **kwargs)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``fedtoken --target ... --state-dir ... ARGS`` as the dev operator."""
        return subprocess.run([sys.executable, "-m", "fedtoken.cli.main", "--target", self.target,
                               "--state-dir", str(self.state), *args],
                              capture_output=True, text=True, env=child_env(), timeout=60)

    def channel(self, *, tls: Tls | None = None,
                options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        t = tls or self.tls
        return grpc.secure_channel(self.target, t.credentials(), options=options or [])

    def identity(self, spiffe_id: str, *roles: str, tenants: tuple[str, ...] = (),
                 audiences: tuple[str, ...] = (), max_lifetime_seconds: int = 0) -> Tls:
        """A client certificate from the dev CA for ``spiffe_id``, granted
        ``roles`` by the operator; its Tls settings."""
        from fedtoken.tls import issue_client_cert

        out = self.state / "identities" / spiffe_id.rpartition("/")[2]
        files = issue_client_cert(self.state, spiffe_id, out)
        with self.client() as admin:
            for role in roles:
                admin.grant_caller(spiffe_id, role, tenants=tenants,
                                   audiences=audiences if role == "issuer" else (),
                                   max_lifetime_seconds=max_lifetime_seconds
                                   if role == "issuer" else 0)
        return Tls(self.state / "tls" / "ca.pem", files.cert, files.key)

    def aio_channel(self, *, tls: Tls | None = None,
                    options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        t = tls or self.tls
        return grpc.aio.secure_channel(self.target, t.credentials(), options=options or [])


def poll_until(probe: Callable[[], T], done: Callable[[T], bool], what: str, *,
               deadline: float, interval: float) -> T:
    """Poll ``probe`` until ``done`` holds for its value; fail the test after
    ``deadline`` seconds, naming ``what`` and the last value."""
    end = time.monotonic() + deadline
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline}s: {what} (last: {value!r})")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_settings(state_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "state_dir": state_dir,
        "grpc_port": 0,
        "http_port": free_port(),
        # Never the shared default 9464: SO_REUSEPORT would let one test
        # server's ops listener answer for another's.
        "ops_port": free_port(),
        "hsm_init_dev_token": False,
    }
    base.update(overrides)
    return load_settings(base, env={})


class ServerThread(_Tls):
    """A real fedtoken App on its own event loop in a background thread, so
    tests can use the blocking client (and so tests never share the server's
    loop, as real callers do not)."""

    def __init__(self, settings: Settings, dsn: str, hsm: HsmConfig) -> None:
        self.settings = settings
        self.state = Path(settings.state_dir).resolve()
        self._dsn = dsn
        self._hsm = hsm
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fedtoken-test-server")
        self.app: App | None = None

    def start(self) -> ServerThread:
        self._thread.start()
        fut: Future[App] = asyncio.run_coroutine_threadsafe(
            start_app(self.settings, dsn=self._dsn, hsm_config=self._hsm), self._loop)
        self.app = fut.result(timeout=60)
        return self

    @property
    def target(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.grpc_port}"

    @property
    def http_base(self) -> str:
        assert self.app is not None
        return f"http://127.0.0.1:{self.app.http_port}"

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (to reach into the app)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self.app is not None:
            self.run(self.app.stop(1.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class ServeProcess(_Tls):
    """A real ``fedtoken serve`` subprocess on free ports.

    It sees none of the test process's FEDTOKEN_* settings or SOFTHSM2_CONF:
    its state dir (dev SoftHSM token included) and DSN are its own.
    """

    def __init__(self, state: Path, dsn: str, *, name: str = "serve", workers: int = 1) -> None:
        self.name, self.state, self.dsn, self.workers = name, state, dsn, workers
        self.grpc_port, self.http_port = free_port(), free_port()
        self.ops_port = free_port()
        self.log = state / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ops_base(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    def env(self) -> dict[str, str]:
        return child_env()

    def start(self, timeout: float = 120) -> ServeProcess:
        cmd = [sys.executable, "-m", "fedtoken.cli.main", "serve", "--state-dir", str(self.state),
               "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
               "--dsn", self.dsn, "--workers", str(self.workers)]
        env = self.env()
        env.setdefault("FEDTOKEN_OPS_PORT", str(self.ops_port))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()}")
            time.sleep(0.3)
        return self

    def ready(self) -> bool:
        """The service answers GetKeys (subclasses may ask for more)."""
        from fedtoken_client import FedtokenRpcError

        if not (self.state / "tls" / "operator.pem").exists():
            return False
        with self.client() as c:
            try:
                c.get_keys()
            except FedtokenRpcError:
                return False
        return True

    def stop(self) -> int | None:
        """SIGTERM and wait for a graceful exit (kill after 30 s); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def http_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.http_base + path, timeout=10) as resp:
            return json.loads(resp.read())
