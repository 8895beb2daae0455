"""Composition root: wires settings, Postgres, the HSM, the authority, the
revocation feed, the gRPC server and the HTTP bridge.

``serve``, the tests and the benchmarks all start fedtoken through
``start_app``, so what is tested is what runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web

from fedtoken.audit import AuditWriter
from fedtoken.authority import Authority
from fedtoken.config import Settings
from fedtoken.core.errors import HsmUnavailable
from fedtoken.hsm import HsmConfig, Pkcs11Hsm
from fedtoken.hsm.devtoken import ensure_dev_token, find_softhsm_module
from fedtoken.http.bridge import GrpcKeySource, create_http_app
from fedtoken.revocation.sync import RevocationSync
from fedtoken.rpc.servicers import KeyAdminServicer, TokenServicer
from fedtoken.store import Store, apply_migrations, create_pool
from fedtoken.store.embedded import EmbeddedPostgres
from fedtoken_client._pb.fedtoken.v1 import key_admin_pb2_grpc, token_service_pb2_grpc

log = logging.getLogger("fedtoken")

GRPC_OPTIONS = [
    ("grpc.so_reuseport", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


# Releases one resource; may return an awaitable.
Closer = Callable[[], object]


@dataclass
class App:
    """A running fedtoken process and everything it owns."""

    settings: Settings
    authority: Authority
    server: grpc.aio.Server
    grpc_port: int
    http_port: int = 0
    dsn: str = ""
    _closers: list[Closer] = field(default_factory=list)

    @property
    def grpc_target(self) -> str:
        return f"{self.settings.grpc_host}:{self.grpc_port}"

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: refuse new calls, let running ones finish."""
        await self.server.stop(grace)
        await _close_all(self._closers)


async def _close_all(closers: list[Closer]) -> None:
    """Run closers newest first; one failing never keeps the others from running."""
    for closer in reversed(closers):
        with contextlib.suppress(Exception):
            result = closer()
            if inspect.isawaitable(result):
                await result


def prepare_hsm(settings: Settings) -> HsmConfig:
    """Locate the PKCS#11 module and token; create the dev token if allowed.

    SoftHSM reads SOFTHSM2_CONF when the module initialises, so it is set
    here, before the first PKCS#11 call of this process.
    """
    module = settings.hsm_module or find_softhsm_module()
    if not module:
        raise HsmUnavailable(
            "no PKCS#11 module configured and SoftHSM2 not found; install it "
            "(apt-get install softhsm2) or set FEDTOKEN_HSM_MODULE"
        )
    if settings.hsm_init_dev_token and not settings.hsm_pin and not settings.hsm_pin_file \
            and "softhsm" in module:
        dev = ensure_dev_token(settings.state_dir.resolve(), settings.hsm_token_label)
        current = os.environ.get("SOFTHSM2_CONF")
        if current and Path(current).resolve() != Path(dev.conf_path).resolve():
            log.warning("SOFTHSM2_CONF=%s differs from the dev token's %s; keeping %s",
                        current, dev.conf_path, current)
        else:
            os.environ["SOFTHSM2_CONF"] = str(dev.conf_path)
        pin = dev.read_pin()
    else:
        pin = settings.resolve_pin()
    return HsmConfig(module=module, token_label=settings.hsm_token_label, pin=pin,
                     key_size=settings.key_size)


def prepare_database(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The DSN to use: the configured one, or an embedded Postgres's."""
    if settings.database_dsn:
        return settings.database_dsn, None
    pg = EmbeddedPostgres(settings.state_dir.resolve() / "pg")
    return pg.start(), pg


async def start_app(
    settings: Settings,
    *,
    dsn: str | None = None,
    hsm_config: HsmConfig | None = None,
    http: bool = True,
    bootstrap: bool = True,
    worker: int = 0,
) -> App:
    """Start one fedtoken process: gRPC server (and HTTP bridge) ready to serve."""
    closers: list[Closer] = []
    try:
        if dsn is None:
            dsn, pg = await asyncio.to_thread(prepare_database, settings)
            if pg is not None:
                closers.append(lambda: asyncio.to_thread(pg.stop))
        assert dsn is not None
        if hsm_config is None:
            hsm_config = await asyncio.to_thread(prepare_hsm, settings)
        pool = await create_pool(dsn, min_size=settings.db_pool_min,
                                 max_size=settings.db_pool_max)
        closers.append(pool.close)
        await apply_migrations(pool)
        store = Store(pool)
        # One spill directory per process identity (port and worker index), so
        # a restarted process replays what its predecessor could not write.
        spill = settings.state_dir.resolve() / "audit-spill" / f"{settings.grpc_port}-w{worker}"
        audit = AuditWriter(store, spill)
        await audit.start()
        closers.append(audit.stop)
        hsm = Pkcs11Hsm(hsm_config)
        await asyncio.to_thread(hsm.open)
        closers.append(hsm.aclose)
        authority = Authority(settings, store, hsm, audit=audit)
        if bootstrap:
            await authority.bootstrap()
        else:
            await authority.reload_keys()
        sync = RevocationSync(
            dsn, authority.revocations, authority.load_revocations,
            heartbeat=settings.revocation_heartbeat_seconds,
            resync=settings.revocation_resync_seconds,
            on_keys_changed=authority.reload_keys,
        )
        await sync.start()
        closers.append(sync.stop)
        maintenance = asyncio.create_task(
            authority.maintain(settings.revocation_resync_seconds), name="maintenance")
        closers.append(maintenance.cancel)
        if not await sync.wait_ready(10):
            log.warning("revocation view not confirmed fresh yet; verdicts fail closed")

        server = grpc.aio.server(options=GRPC_OPTIONS)
        token_service_pb2_grpc.add_TokenServiceServicer_to_server(
            TokenServicer(authority), server)
        key_admin_pb2_grpc.add_KeyAdminServicer_to_server(
            KeyAdminServicer(authority), server)
        port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
        if port == 0:
            raise OSError(f"cannot listen on {settings.grpc_host}:{settings.grpc_port}")
        await server.start()
        app = App(settings, authority, server, port, dsn=dsn, _closers=closers)
        closers.append(authority.close)
        if http and settings.http_port >= 0:
            target = settings.bridge_grpc_target or f"{settings.grpc_host}:{port}"
            source = GrpcKeySource(target)
            runner = web.AppRunner(create_http_app(source, settings), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, settings.http_host, settings.http_port)
            await site.start()
            closers.append(runner.cleanup)
            closers.append(source.close)
            sockets = getattr(site._server, "sockets", None) or []
            app.http_port = sockets[0].getsockname()[1] if sockets else settings.http_port
        return app
    except BaseException:
        await _close_all(closers)
        raise
