"""Process supervision for ``fedtoken serve``.

One worker: everything runs in this process. N workers: this process
prepares the shared pieces (dev HSM token, embedded Postgres, migrations,
first tenant and key), then starts N worker processes that each open their
own HSM session and connection pool and listen on the same gRPC port
(SO_REUSEPORT, the kernel spreads connections); this process serves the
HTTP bridge as a client of that port and supervises the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal

from fedtoken.app import App, prepare_database, prepare_hsm, start_app
from fedtoken.config import Settings, replace

log = logging.getLogger("fedtoken")


def run(settings: Settings) -> int:
    workers = settings.workers or os.cpu_count() or 1
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
    if app.http_port:
        log.info("HTTP bridge on http://%s:%d (JWKS: %s/.well-known/jwks.json)",
                 s.http_host, app.http_port, s.http_public_url)


def _worker_main(settings: Settings, dsn: str, index: int) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[w{index}:%(process)d]: %(message)s",
    )

    async def main() -> None:
        app = await start_app(settings, dsn=dsn, http=False, bootstrap=False)
        try:
            await _wait_for_signal()
        finally:
            await app.stop(5.0)

    asyncio.run(main())


def _serve_many(settings: Settings, workers: int) -> int:
    if settings.grpc_port == 0:
        raise SystemExit("several workers need a fixed --grpc-port to share")
    dsn, pg = prepare_database(settings)
    prepare_hsm(settings)  # creates the dev token once, before workers race for it

    async def bootstrap() -> None:
        app = await start_app(replace(settings, grpc_port=0), dsn=dsn, http=False)
        await app.stop(0)

    asyncio.run(bootstrap())
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.context.SpawnProcess] = []
    for i in range(workers):
        proc = ctx.Process(target=_worker_main, args=(settings, dsn, i),
                           name=f"fedtoken-w{i}")
        proc.start()
        procs.append(proc)

    async def bridge() -> None:
        from aiohttp import web

        from fedtoken.http.bridge import GrpcKeySource, create_http_app

        source = GrpcKeySource(settings.bridge_grpc_target
                               or f"{settings.grpc_host}:{settings.grpc_port}")
        runner = web.AppRunner(create_http_app(source, settings), access_log=None)
        await runner.setup()
        if settings.http_port:
            await web.TCPSite(runner, settings.http_host, settings.http_port).start()
        log.info("fedtoken: %d workers on gRPC %s:%d, HTTP bridge on %s", workers,
                 settings.grpc_host, settings.grpc_port, settings.http_public_url)
        try:
            await _wait_for_signal()
        finally:
            await runner.cleanup()
            await source.close()

    try:
        asyncio.run(bridge())
    finally:
        for proc in procs:
            if proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.join(10)
        if pg is not None:
            pg.stop()
    return 0
