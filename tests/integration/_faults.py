"""Fault injection helpers for tests/integration/test_fault_injection.py.

- ``FaultServe``: ``fedtoken serve --workers N`` with extra environment
  (fast revocation settings, the migration DSN), which workers listen and
  which hold client connections;
- ``PgControl``: start / stop a private Postgres from a helper process;
- ``LateCloseProxy``: a TCP proxy that delivers a server's last words at
  once and the end of the connection late;
- ``Tmpfs`` and ``fill``: a small tmpfs mounted over a directory, filled to
  the last byte (a real ENOSPC);
- ``Ledger`` and ``Load``: a bounded load of Issue / Revoke / Verify calls
  in background threads that records every token Issue returned, every
  Revoke that returned OK, every error (with its code, reason and time) and
  every revoked token that verified as valid.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import os
import random
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import grpc
import psutil

from fedtoken.store.embedded import EmbeddedPostgres
from fedtoken_client import FedtokenClient, FedtokenRpcError, reason_name
from tests.support import ROOT, ServeProcess

AUDIENCE = "svc"


class Target(Protocol):
    """What the load needs of a server (ServeProcess and ServerThread both are)."""

    def channel(self, *, tls: Any = None,
                options: list[tuple[str, Any]] | None = None) -> grpc.Channel: ...


def fresh_client(target: Target, tag: str, timeout: float = 10.0) -> FedtokenClient:
    """A client on a channel of its own (its own TCP connection, never a shared
    subchannel), so that SO_REUSEPORT may put it on any worker."""
    channel = target.channel(options=[("grpc.use_local_subchannel_pool", 1),
                                      ("fedtoken.test.channel", tag)])
    return FedtokenClient("", channel=channel, timeout=timeout)


# --- the server under test ---------------------------------------------------------


class FaultServe(ServeProcess):
    """``fedtoken serve`` with ``workers`` workers and extra FEDTOKEN_* settings;
    ready once every worker listens."""

    def __init__(self, state: Path, dsn: str, *, workers: int, extra_env: dict[str, str]) -> None:
        super().__init__(state, dsn, name="fault-serve", workers=workers)
        self.extra_env = extra_env

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra_env}

    def ready(self) -> bool:
        return len(self.listening_workers()) >= self.workers and super().ready()

    def listening_workers(self) -> dict[int, psutil.Process]:
        """Worker pid -> process, for processes listening on our gRPC port."""
        found: dict[int, psutil.Process] = {}
        if self.proc is None or self.proc.poll() is not None:
            return found
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return found
        for proc in procs:
            try:
                conns = proc.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.grpc_port
                   for c in conns):
                found[proc.pid] = proc
        return found

    def serving_pids(self) -> set[int]:
        """Listening workers that hold an established client connection."""
        pids: set[int] = set()
        for pid, proc in self.listening_workers().items():
            try:
                conns = proc.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.grpc_port
                   for c in conns):
                pids.add(pid)
        return pids

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- Postgres ----------------------------------------------------------------------


_CONTROLLER = r"""
import json, sys
from pathlib import Path
from fedtoken.store.embedded import EmbeddedPostgres

pg = EmbeddedPostgres(Path(sys.argv[1]))
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "start":
            result = pg.start()
        elif cmd["op"] == "stop":
            result = pg.stop(cmd["mode"])
        else:
            result = pg.is_running()
        reply = {"ok": True, "result": result}
    except Exception as exc:
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print("PGCTL " + json.dumps(reply), flush=True)
"""


class PgControl:
    """Starts and stops an EmbeddedPostgres from a helper process of its own.

    As root, EmbeddedPostgres runs pg_ctl as another user, so subprocess
    must fork() (no vfork with a user change), and a fork() while other
    threads are inside gRPC calls (the load) has crashed the child in
    gRPC's fork handlers (so pg_ctl never ran). The helper has no gRPC:
    its forks are plain ones.
    """

    def __init__(self, pg: EmbeddedPostgres) -> None:
        self.pg = pg
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "server"), str(ROOT / "clients/python")])}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CONTROLLER, str(pg.data_dir)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, text=True)

    def _ask(self, timeout: float = 120, **cmd: Any) -> Any:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._proc.stdout], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"postgres {cmd} did not answer in {timeout}s")
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError("the postgres control process exited")
            if line.startswith("PGCTL "):
                reply = json.loads(line.removeprefix("PGCTL "))
                if not reply["ok"]:
                    raise RuntimeError(f"postgres {cmd}: {reply['error']}")
                return reply["result"]

    def start(self) -> str:
        dsn: str = self._ask(op="start")
        return dsn

    def stop(self, mode: str = "fast") -> None:
        self._ask(op="stop", mode=mode)

    def is_running(self) -> bool:
        return bool(self._ask(op="is_running"))

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class LateCloseProxy:
    """A TCP proxy to a local port that passes bytes both ways at once; once
    ``hold_closes`` is set, it closes a client's connection only ``delay``
    seconds after the upstream closed it: what Postgres says last before it
    goes (a FATAL at shutdown) arrives, the end of the connection comes late
    (as behind a slow network path or a draining proxy). Runs on its own
    event loop thread."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self._upstream, self._delay = upstream_port, delay
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="late-close-proxy")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.hold_closes = False

    def start(self) -> LateCloseProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Close the listener and every connection at once (idempotent)."""
        if not self._loop.is_running():
            return

        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)

        async def upstream() -> None:
            await self._pump(reader, up_writer)
            up_writer.close()

        async def downstream() -> None:
            await self._pump(up_reader, writer)
            if self.hold_closes:
                await asyncio.sleep(self._delay)
            writer.close()

        await asyncio.gather(upstream(), downstream())

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass


def via_port(dsn: str, port: int) -> str:
    """The same DSN (credentials, database, options) on another local port."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


# --- a small disk ------------------------------------------------------------------


class Tmpfs:
    """A tmpfs of ``size`` mounted over ``path`` (root with CAP_SYS_ADMIN only)."""

    def __init__(self, path: Path, size: str) -> None:
        self.path, self.size = path, size
        self.mounted = False
        self.why_not = ""

    def mount(self) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.why_not = "not root"
            return False
        try:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs",
                 str(self.path)], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as exc:
            self.why_not = f"mount failed: {exc}"
            return False
        if result.returncode != 0:
            self.why_not = f"mount -t tmpfs refused: {result.stderr.strip()}"
            return False
        self.mounted = True
        return True

    def unmount(self) -> None:
        if not self.mounted:
            return
        result = subprocess.run(["umount", str(self.path)], capture_output=True, timeout=20,
                                check=False)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=20,
                           check=False)
        self.mounted = False


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last block; the filler file."""
    filler = directory / "filler.bin"
    chunk = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        for size in (4096, 512, 1):  # the last partial chunk, down to a byte
            while True:
                try:
                    os.write(fd, chunk[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


# --- the load ----------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    at: float  # time.monotonic() when the call ended
    phase: str
    op: str
    code: str
    reason: str
    request_id: str = ""


@dataclass
class Ledger:
    """What the tests' calls were told, across the whole module."""

    issued: dict[str, str] = field(default_factory=dict)  # jti -> token
    issued_in: dict[str, str] = field(default_factory=dict)  # jti -> phase
    revoked: dict[str, float] = field(default_factory=dict)  # jti -> when Revoke returned OK
    failed_revokes: dict[str, tuple[str, str]] = field(default_factory=dict)  # jti -> code
    failures: list[Failure] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # revoked tokens that verified
    verdicts: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter)  # (phase, reason) of fresh tokens
    ok: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issued_ok(self, phase: str, jti: str, token: str) -> None:
        with self.lock:
            self.issued[jti] = token
            self.issued_in[jti] = phase
            self.ok[(phase, "issue")] += 1

    def revoked_ok(self, phase: str, jti: str) -> None:
        with self.lock:
            self.revoked[jti] = time.monotonic()
            self.failed_revokes.pop(jti, None)
            self.ok[(phase, "revoke")] += 1

    def failed(self, phase: str, op: str, exc: BaseException, jti: str = "") -> Failure:
        request_id = ""
        if isinstance(exc, FedtokenRpcError):
            code, reason, request_id = exc.code.name, exc.reason, exc.request_id
        else:
            code, reason = type(exc).__name__, str(exc)[:200]
        f = Failure(time.monotonic(), phase, op, code, reason, request_id)
        with self.lock:
            self.failures.append(f)
            if op == "revoke" and jti and jti not in self.revoked:
                self.failed_revokes[jti] = (code, reason)
        return f

    def in_phase(self, phase: str) -> list[Failure]:
        with self.lock:
            return [f for f in self.failures if f.phase == phase]

    def kinds(self, phase: str) -> collections.Counter[tuple[str, str, str]]:
        return collections.Counter((f.op, f.code, f.reason) for f in self.in_phase(phase))

    def revoked_tokens(self) -> dict[str, str]:
        with self.lock:
            return {jti: self.issued[jti] for jti in self.revoked}

    def pick_unrevoked(self, rng: random.Random) -> tuple[str, str] | None:
        with self.lock:
            candidates = [j for j in list(self.issued)[-200:]
                          if j not in self.revoked and j not in self.failed_revokes]
            if not candidates:
                return None
            jti = rng.choice(candidates)
            return jti, self.issued[jti]

    def pick_revoked(self, rng: random.Random) -> tuple[str, str, float] | None:
        with self.lock:
            if not self.revoked:
                return None
            jti = rng.choice(list(self.revoked))
            return jti, self.issued[jti], self.revoked[jti]


class Load:
    """Issue / Revoke / Verify in ``threads`` threads until stopped, at most
    ``max_seconds`` and ``max_calls`` Issue calls (whichever comes first).

    Every third token issued is revoked (by token; when Issue is refused, an
    earlier token); each round verifies the fresh token and one revoked
    token. A revoked token that verifies as valid later than ``grace``
    seconds after its Revoke returned OK is a violation: the view must hold
    it by then (the revocation was committed before a heartbeat that every
    fresh verdict depends on).
    """

    def __init__(self, target: Target, ledger: Ledger, phase: str, *, grace: float,
                 threads: int = 2, max_seconds: float = 60.0, max_calls: int = 4000,
                 pause: float = 0.01) -> None:
        self.target, self.ledger, self.phase = target, ledger, phase
        self.grace, self.pause = grace, pause
        self.max_seconds, self.max_calls = max_seconds, max_calls
        self._stop = threading.Event()
        self._calls = 0
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"load-{phase}-{i}") for i in range(threads)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not any(t.is_alive() for t in self._threads), "load thread did not stop"

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _run(self, index: int) -> None:
        rng = random.Random(f"{self.phase}-{index}")
        clients = [fresh_client(self.target, f"load-{self.phase}-{index}-{k}", timeout=10)
                   for k in range(2)]
        deadline = time.monotonic() + self.max_seconds
        n = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self.ledger.lock:
                    if self._calls >= self.max_calls:
                        break
                    self._calls += 1
                n += 1
                self._round(clients[n % len(clients)], rng, n)
                self._stop.wait(self.pause)
        finally:
            for c in clients:
                c.close()

    def _round(self, client: FedtokenClient, rng: random.Random, n: int) -> None:
        ledger, phase = self.ledger, self.phase
        token = jti = ""
        try:
            issued = client.issue(f"fi-{phase}", AUDIENCE)
            token, jti = issued.token, issued.jti
            ledger.issued_ok(phase, jti, token)
        except Exception as exc:  # every failure is recorded and judged
            ledger.failed(phase, "issue", exc)
        if not token and n % 3 == 0:
            # Issue refused: revoke an earlier token instead (Revoke may not need
            # what Issue lacks).
            earlier = ledger.pick_unrevoked(rng)
            if earlier is not None:
                jti, token = earlier
        if token and n % 3 == 0:
            try:
                client.revoke(token=token, reason=f"fault test {phase}")
                ledger.revoked_ok(phase, jti)
            except Exception as exc:
                ledger.failed(phase, "revoke", exc, jti)
        elif token:
            self._verify(client, token, None)
        picked = ledger.pick_revoked(rng)
        if picked is not None:
            self._verify(client, picked[1], picked)

    def _verify(self, client: FedtokenClient, token: str,
                revoked: tuple[str, str, float] | None) -> None:
        ledger, phase = self.ledger, self.phase
        try:
            verdict = client.verify(token, AUDIENCE)
        except Exception as exc:
            ledger.failed(phase, "verify", exc)
            return
        reason = reason_name(verdict.reason)
        if revoked is None:
            with ledger.lock:
                ledger.verdicts[(phase, reason)] += 1
            return
        jti, _, when = revoked
        if verdict.valid and time.monotonic() > when + self.grace:
            with ledger.lock:
                ledger.violations.append(
                    f"{phase}: revoked jti {jti} verified as valid "
                    f"{time.monotonic() - when:.1f}s after its Revoke returned OK")


def eventually(probe: Callable[[], Any], what: str, timeout: float,
               interval: float = 0.1) -> Any:
    """Poll ``probe`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except AssertionError:
            raise  # a probe that found something wrong, not "not yet"
        except Exception as exc:  # a failing probe is "not yet"
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {last!r})")
        time.sleep(interval)
