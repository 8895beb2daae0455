"""Process supervision for ``fedtoken serve``.

Default: one worker per core (``--workers 0``; see Settings.workers). One
worker: everything runs in this process. N workers: this process
prepares the shared pieces (dev HSM token, embedded Postgres, migrations,
first tenant and key), then starts N worker processes that each open their
own HSM session and connection pool and listen on the same gRPC and HTTP
ports (SO_REUSEPORT, the kernel spreads connections; each worker's bridge
reads its own in-process catalog); this process supervises the workers
(started one after the other, each confirmed listening; one that dies is
restarted).
Metrics: this process points every worker at one Prometheus multiprocess
directory (``metrics.prepare``) before any starts, and marks a worker's
files dead when it exits; any worker's /metrics sums them all.
Several processes are how the Python part of verification scales: the GIL
allows one thread of Python per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import time

from fedtoken import logs
from fedtoken.app import App, prepare_database, prepare_hsm, start_app
from fedtoken.config import Settings, replace
from fedtoken.ops import metrics
from fedtoken.verifier.native import rsa_path

log = logging.getLogger("fedtoken")


def run(settings: Settings) -> int:
    logs.configure(settings.log_format, settings.log_level_number)
    metrics.prepare(str(settings.metrics_path))
    workers = settings.workers or os.cpu_count() or 1
    if settings.workers == 0 and settings.grpc_port == 0:
        # One per core was asked for implicitly, but workers can only share a
        # fixed port: an ephemeral port (tests, tools) gets one worker.
        workers = 1
    if workers == 1:
        asyncio.run(_serve_single(settings))
        return 0
    return _serve_many(settings, workers)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve_single(settings: Settings) -> None:
    app = await start_app(settings)
    _announce(app)
    try:
        await _wait_for_signal()
    finally:
        log.info("stopping (grace 5s)")
        await app.stop(5.0)


def _announce(app: App) -> None:
    s = app.settings
    log.info("fedtoken gRPC listening on %s:%d", s.grpc_host, app.grpc_port)
    log.info("RS256 verification: %s", rsa_path())
    if app.http_port:
        log.info("HTTP bridge on http://%s:%d (JWKS: %s/.well-known/jwks.json)",
                 s.http_host, app.http_port, s.http_public_url)
    if app.ops_port:
        log.info("operations listener on http://%s:%d (/healthz, /metrics)",
                 s.ops_host, app.ops_port)


def _worker_main(settings: Settings, dsn: str, index: int,
                 ready: multiprocessing.synchronize.Event) -> None:
    # A spawned process: nothing configured yet; PROMETHEUS_MULTIPROC_DIR
    # came with the environment the supervisor prepared.
    logs.configure(settings.log_format, settings.log_level_number, worker=f"w{index}")

    async def main() -> None:
        app = await start_app(settings, dsn=dsn, bootstrap=False, worker=index,
                              reuse_http_port=True)
        ready.set()
        try:
            await _wait_for_signal()
        finally:
            await app.stop(5.0)

    asyncio.run(main())


# A worker that fails to start is retried this many times, then serve exits.
START_ATTEMPTS = 3
# How long one worker may take from spawn to listening.
START_TIMEOUT = 120.0


class _Workers:
    """The worker processes: started one at a time (SoftHSM's token files are
    shared, and several processes logging in at once have been seen to miss
    the token), each confirmed listening before the next starts, and
    restarted if one dies while serving."""

    def __init__(self, settings: Settings, dsn: str, count: int) -> None:
        self._settings, self._dsn = settings, dsn
        self._ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.context.SpawnProcess | None] = [None] * count
        self.stopping = False

    def start(self, index: int) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            ready = self._ctx.Event()
            proc = self._ctx.Process(target=_worker_main, name=f"fedtoken-w{index}",
                                     args=(self._settings, self._dsn, index, ready))
            proc.start()
            self.procs[index] = proc
            deadline = time.monotonic() + START_TIMEOUT
            while proc.is_alive() and not ready.wait(0.2) and time.monotonic() < deadline:
                pass
            if ready.is_set():
                return
            _terminate(proc)
            _exited(proc)
            log.error("worker %d did not start (attempt %d of %d, exit code %s)",
                      index, attempt, START_ATTEMPTS, proc.exitcode)
        raise SystemExit(f"worker {index} could not start; see the log above")

    def start_all(self) -> None:
        for i in range(len(self.procs)):
            self.start(i)

    async def supervise(self) -> None:
        """Restart a worker that dies while serving (the others keep serving)."""
        while not self.stopping:
            await asyncio.sleep(0.5)
            for i, proc in enumerate(self.procs):
                if proc is not None and not proc.is_alive() and not self.stopping:
                    log.error("worker %d (pid %s) exited with code %s; restarting it",
                              i, proc.pid, proc.exitcode)
                    _exited(proc)
                    await asyncio.to_thread(self.start, i)

    def stop(self) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc is not None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            if proc is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
                _exited(proc)


def _exited(proc: multiprocessing.context.SpawnProcess) -> None:
    """Its live gauges leave /metrics (its counters still count)."""
    if proc.pid is not None and not proc.is_alive():
        metrics.mark_worker_dead(proc.pid)


def _terminate(proc: multiprocessing.context.SpawnProcess) -> None:
    if proc.is_alive():
        proc.terminate()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def _serve_many(settings: Settings, workers: int) -> int:
    if settings.grpc_port == 0 or settings.http_port == 0 or settings.ops_port == 0:
        raise SystemExit("several workers need a fixed --grpc-port, --http-port and ops_port "
                         "to share (or a negative http_port / ops_port to disable the HTTP "
                         "bridge / the operations listener)")
    dsn, pg = prepare_database(settings)
    prepare_hsm(settings)  # creates the dev token once, before workers race for it

    async def bootstrap() -> None:
        app = await start_app(replace(settings, grpc_port=0), dsn=dsn, http=False, ops=False)
        await app.stop(0)
        metrics.mark_worker_dead(os.getpid())  # its gauges are not a worker's

    asyncio.run(bootstrap())
    pool = _Workers(settings, dsn, workers)

    async def supervise() -> None:
        bridge = f", HTTP bridge on {settings.http_public_url}" if settings.http_port > 0 else ""
        if settings.ops_port > 0:
            bridge += f", operations on http://{settings.ops_host}:{settings.ops_port}"
        log.info("fedtoken: %d workers on gRPC %s:%d%s", workers, settings.grpc_host,
                 settings.grpc_port, bridge)
        supervisor = asyncio.create_task(pool.supervise())
        try:
            await _wait_for_signal()
        finally:
            pool.stopping = True
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    try:
        pool.start_all()
        asyncio.run(supervise())
    finally:
        pool.stop()
        if pg is not None:
            pg.stop()
    return 0
