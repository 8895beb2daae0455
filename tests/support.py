"""Helpers shared by integration, e2e and interop tests (no fixtures here)."""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fedtoken.app import App, start_app
from fedtoken.config import Settings, load_settings
from fedtoken.hsm import HsmConfig

ROOT = Path(__file__).resolve().parent.parent


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
        "hsm_init_dev_token": False,
    }
    base.update(overrides)
    return load_settings(base, env={})


class ServerThread:
    """A real fedtoken App on its own event loop in a background thread, so
    tests can use the blocking client (and so tests never share the server's
    loop, as real callers do not)."""

    def __init__(self, settings: Settings, dsn: str, hsm: HsmConfig) -> None:
        self.settings = settings
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
