"""Composition root: the only place that builds adapters and injects them.

It wires settings, Postgres (pool, repositories, migrations), the HSM
signer, the audit writer, the key table and revocation view, the two
verification engines, the event feed, the service layer, the gRPC server
with its interceptors, health and reflection, the HTTP bridge and the
operations listener (/healthz, /metrics). ``serve``, the tests and the
benchmarks all start fedtoken through ``start_app``, so what is tested is
what runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedtoken.audit import AuditWriter
from fedtoken.audit.archive import FileAuditArchive
from fedtoken.audit.checkpoint_file import FileCheckpointJournal
from fedtoken.audit.spill import spill_dir_for
from fedtoken.config import Settings
from fedtoken.core.errors import FedtokenError, HsmUnavailable, InvalidRequest
from fedtoken.core.ports import CallContext, Clock, SystemClock, TrustedKeys
from fedtoken.core.rotation import Timings
from fedtoken.events import EventFeed, revocation_loader
from fedtoken.federation import CacheSettings, RemoteJwksCache
from fedtoken.hsm import HsmConfig, Pkcs11Hsm
from fedtoken.hsm.devtoken import ensure_dev_token, find_softhsm_module
from fedtoken.http import combine, create_ops_app, create_public_app, start_site
from fedtoken.ops import metrics
from fedtoken.revocation import InMemoryRevocationView
from fedtoken.rpc.health import HealthMonitor, enable_reflection, http_health
from fedtoken.rpc.interceptors import Boundary
from fedtoken.rpc.servicers import KeyAdminServicer, TokenServicer, add_token_service
from fedtoken.service import Catalog, Jobs, KeyAdmin, TenantDefaults, Tokens, Verification
from fedtoken.service.callers import Callers
from fedtoken.service.checkpoints import Checkpoints
from fedtoken.service.compliance import Compliance
from fedtoken.service.exchange import Exchange
from fedtoken.service.retention import Retention
from fedtoken.service.rotation import ROTATION_LEADER_LOCK, Rotation
from fedtoken.service.trust import FetchAudit, NullTrustedKeys, TrustAdmin, TrustCatalog
from fedtoken.service.types import Exchanged, ExchangeParams, Introspection, KeySet
from fedtoken.store import PgStore, apply_migrations, create_pool
from fedtoken.store.callers import PgCallers
from fedtoken.store.embedded import EmbeddedPostgres
from fedtoken.store.leader import PgLeaderLock
from fedtoken.store.migrate import service_role_problems
from fedtoken.store.pool import caller_deadline
from fedtoken.tls import ServerTls, ensure_dev_pki, server_credentials, spiffe_id_of
from fedtoken.tls.devca import OPERATOR_ID
from fedtoken.tls.identity import spiffe_id_of_der
from fedtoken.verifier import LocalKeyResolver, VerificationEngine
from fedtoken.verifier.federated import FederatedResolver
from fedtoken_client._pb.fedtoken.v1 import key_admin_pb2_grpc

log = logging.getLogger("fedtoken")

def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
    ]


# Releases one resource; may return an awaitable.
Closer = Callable[[], object]


@dataclass
class Services:
    """The service layer of one process, as the boundaries see it."""

    catalog: Catalog
    tokens: Tokens
    verification: Verification
    keys: KeyAdmin
    jobs: Jobs
    callers: Callers
    trust: TrustAdmin
    trust_catalog: TrustCatalog


@dataclass
class App:
    """A running fedtoken process and everything it owns."""

    settings: Settings
    services: Services
    server: grpc.aio.Server
    signer: Pkcs11Hsm
    store: PgStore
    audit: AuditWriter
    revocations: InMemoryRevocationView
    grpc_port: int
    http_port: int = 0
    # The operations listener's port (0: not listening).
    ops_port: int = 0
    dsn: str = ""
    # grpc.health.v1 statuses and the task that keeps them true.
    health: HealthMonitor | None = None
    # The remote JWKS cache of the trusted issuers (a KeyResolver half for
    # the verification engine).
    trusted_keys: TrustedKeys = field(default_factory=NullTrustedKeys)
    _closers: list[Closer] = field(default_factory=list)

    @property
    def grpc_target(self) -> str:
        return f"{self.settings.grpc_host}:{self.grpc_port}"

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: health NOT_SERVING first (load balancers and Watch
        streams see it), then refuse new calls, let running ones finish,
        release all."""
        if self.health is not None:
            await self.health.shutdown()
        await self.server.stop(grace)
        await _close_all(self._closers)


async def _close_all(closers: list[Closer]) -> None:
    """Run closers newest first; one failing never keeps the others from running."""
    for closer in reversed(closers):
        with contextlib.suppress(Exception):
            result = closer()
            if inspect.isawaitable(result):
                await result


def _cancel_and_wait(task: asyncio.Task[Any]) -> Closer:
    """A closer that cancels ``task`` and waits for its cleanup (the
    scheduler gives its leader lock up before the pool and HSM close)."""

    async def close() -> None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 5)

    return close


def _http_tls(settings: Settings, client_ca: Path | None) -> ssl.SSLContext | None:
    """TLS for the bridge listener when configured. A client certificate is
    asked for but optional (JWKS and discovery are public, introspection has
    its own client auth); the token endpoint serves only callers whose
    certificate the client CA (the gRPC one) verified."""
    if not settings.http_tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.http_tls_cert, settings.http_tls_key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=str(client_ca))
    return context


def _fan_out(catalog: Catalog, callers: Callers,
             trust: TrustCatalog) -> Callable[[dict[str, Any]], None]:
    """The feed's change callback: tenants and keys to the catalog, grants to
    callers, trusted issuers to the trust catalog (each ignores the rest)."""

    def on_change(event: dict[str, Any]) -> None:
        catalog.notice(event)
        callers.notice(event)
        trust.notice(event)

    return on_change


async def _reload_all(catalog: Catalog, callers: Callers, trust: TrustCatalog) -> None:
    await catalog.reload()
    await callers.reload()
    # The feed runs this after each (re)connect and resync, and a failure
    # here fails the feed's session (revocations fail closed until the
    # next). Trusted issuers have nothing to do with revocation freshness:
    # a failed trust reload is only logged; the next resync retries it.
    try:
        await trust.reload()
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("reloading the trusted issuers failed (%s); the next resync retries",
                    type(exc).__name__)


def _trusted_keys(settings: Settings, store: PgStore, clock: Clock,
                  on_fetch: FetchAudit) -> RemoteJwksCache:
    """The remote JWKS cache of the trusted issuers (docs/federation.md)."""
    return RemoteJwksCache(
        store=store.key_sets, clock=clock, ca_file=settings.federation_ca_file or None,
        allow_loopback_http=settings.federation_allow_http_loopback, on_fetch=on_fetch,
        settings=CacheSettings(
            fetch_timeout=settings.federation_fetch_timeout_seconds,
            default_max_age=settings.federation_default_max_age_seconds,
            min_max_age=settings.federation_min_max_age_seconds,
            max_max_age=settings.federation_max_max_age_seconds,
            kid_miss_cooldown=settings.federation_kid_miss_cooldown_seconds,
            negative_ttl=settings.federation_negative_ttl_seconds,
            fetch_budget=settings.federation_fetch_budget,
            budget_window=settings.federation_budget_window_seconds,
            error_backoff_min=min(CacheSettings().error_backoff_min,
                                  settings.federation_error_backoff_max_seconds),
            error_backoff_max=settings.federation_error_backoff_max_seconds,
        ))


class _NoRevocations:
    """For the introspection engine: introspection asks Postgres itself."""

    def check(self, tenant: str, jti: str, subject: str, issued_at: int,
              kid: str) -> None:
        return None


def postgres_ping(pool: Any) -> Callable[[float], Awaitable[object]]:
    """The health monitor's Postgres probe: ``SELECT 1`` on a pool connection,
    acquiring and answering each within ``timeout``."""

    async def ping(timeout: float) -> object:
        async with pool.acquire(timeout=timeout) as conn:
            return await conn.fetchval("SELECT 1", timeout=timeout)

    return ping


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


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Transport:
    """How the gRPC port is secured, and who administers a fresh deployment."""

    tls: ServerTls | None  # None: insecure (loopback only, every role denied)
    bootstrap: tuple[str, ...]


def prepare_tls(settings: Settings) -> Transport:
    """mTLS material for the gRPC port: configured files, or the dev PKI.

    Plaintext only when explicitly configured (``insecure``) and only on a
    loopback listener; it is logged loudly.
    """
    admins = tuple(settings.bootstrap_identities)
    if settings.insecure:
        if settings.grpc_host not in _LOOPBACK:
            raise InvalidRequest(
                f"insecure gRPC refused on {settings.grpc_host}: plaintext is allowed only on "
                "a loopback listener; configure tls_cert, tls_key and tls_client_ca")
        log.warning("INSECURE: gRPC on %s:%s is plaintext and unauthenticated; %s. Never run "
                    "this outside a test.", settings.grpc_host, settings.grpc_port,
                    f"every caller is taken to be {settings.insecure_identity}"
                    if settings.insecure_identity else "every call that needs a role is denied")
        return Transport(None, admins)
    if settings.tls_cert:
        return Transport(ServerTls(Path(settings.tls_cert), Path(settings.tls_key),
                                   Path(settings.tls_client_ca)), admins)
    if not settings.dev_pki:
        raise InvalidRequest("no TLS certificate: set tls_cert, tls_key and tls_client_ca "
                             "(or dev_pki for development)")
    pki = ensure_dev_pki(settings.state_dir.resolve(), [settings.grpc_host])
    return Transport(ServerTls(pki.server.cert, pki.server.key, pki.ca),
                     (*admins, OPERATOR_ID) if OPERATOR_ID not in admins else admins)


def _authenticate(context: grpc.aio.ServicerContext) -> str:
    return spiffe_id_of(context.auth_context())


def _assumed(identity: str) -> Callable[[grpc.aio.ServicerContext], str] | None:
    """Insecure mode: every caller is ``identity`` (tests and benchmarks only)."""
    if not identity:
        return None
    return lambda _context: identity


def prepare_database(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The service's DSN: the configured one, or an embedded Postgres's (started
    here) for its least-privileged role ``fedtoken_app``. Migrations use
    another DSN: see ``migrate_database``."""
    if settings.database_dsn:
        return settings.database_dsn, None
    pg = EmbeddedPostgres(settings.state_dir.resolve() / "pg")
    pg.start()
    return pg.app_dsn, pg


def migration_dsn(settings: Settings, dsn: str) -> str:
    """The DSN migrations run with, for a service that runs with ``dsn``:
    ``database_migration_dsn`` when set; the embedded server's superuser when
    ``dsn`` is that server's app DSN; else ``dsn`` itself (one DSN for both)."""
    configured = settings.database_migration_dsn
    if configured:
        return configured
    if not settings.database_dsn:
        admin = EmbeddedPostgres(settings.state_dir.resolve() / "pg").admin_dsn_for(dsn)
        if admin is not None:
            return admin
    return dsn


async def migrate_database(settings: Settings, dsn: str) -> list[int]:
    """Apply the migrations as the schema's owner, before the service's pool
    exists; warn when the service's own role (``dsn``) could switch the audit
    protections off (docs/security.md, "Database roles")."""
    applied = await apply_migrations(migration_dsn(settings, dsn))
    problems = await service_role_problems(dsn)
    if problems:
        log.warning("the service's database role is not least-privileged: %s; see "
                    "docs/security.md, Database roles", "; ".join(problems))
    return applied


@dataclass(frozen=True)
class _PublicApi:
    """What the public HTTP app reads, served in-process."""

    catalog: Catalog
    tokens: Tokens
    exchanger: Exchange

    async def key_set(self, tenant: str) -> KeySet:
        return await self.catalog.key_set(tenant)

    async def exchange(self, params: ExchangeParams, ctx: CallContext) -> Exchanged:
        return await self.exchanger.exchange(params, ctx)

    async def introspect(self, token: str, ctx: CallContext) -> Introspection:
        # The bridge authenticated its RFC 7662 client (client secret) itself.
        return await self.tokens.introspect(token, ctx, client_authenticated=True)


async def start_app(
    settings: Settings,
    *,
    dsn: str | None = None,
    hsm_config: HsmConfig | None = None,
    http: bool = True,
    bootstrap: bool = True,
    worker: int = 0,
    reuse_http_port: bool = False,
    ops: bool = True,
) -> App:
    """Start one fedtoken process: gRPC server (and HTTP bridge, and the
    operations listener unless ``ops`` is false) ready to serve."""
    closers: list[Closer] = []
    try:
        if dsn is None:
            dsn, pg = await asyncio.to_thread(prepare_database, settings)
            if pg is not None:
                closers.append(lambda: asyncio.to_thread(pg.stop))
        assert dsn is not None
        if hsm_config is None:
            hsm_config = await asyncio.to_thread(prepare_hsm, settings)
        clock = SystemClock()
        transport = await asyncio.to_thread(prepare_tls, settings)

        # -- adapters ---------------------------------------------------------
        await migrate_database(settings, dsn)
        pool = await create_pool(dsn, min_size=settings.db_pool_min,
                                 max_size=settings.db_pool_max)
        closers.append(pool.close)
        store = PgStore(pool, request_timeout=settings.db_request_timeout_seconds,
                        long_timeout=settings.db_long_timeout_seconds)
        # One spill directory per process identity (port and worker index), so
        # a restarted process replays what its predecessor could not write.
        audit = AuditWriter(store, spill_dir_for(settings.state_dir.resolve(),
                                                 settings.grpc_port, worker))
        await audit.start()
        closers.append(audit.stop)
        hsm = Pkcs11Hsm(hsm_config)
        await asyncio.to_thread(hsm.open)
        closers.append(hsm.aclose)
        resolver = LocalKeyResolver()
        fetch_audit = FetchAudit(audit, clock)
        closers.append(fetch_audit.drain)
        trusted_keys = _trusted_keys(settings, store, clock, fetch_audit)
        closers.append(trusted_keys.close)
        revocations = InMemoryRevocationView(staleness=settings.revocation_staleness_seconds)
        engine_options: dict[str, Any] = {
            "clock": clock,
            "leeway": settings.leeway_seconds,
            "max_token_size": settings.max_token_bytes,
            "threads": settings.verify_threads,
            "token_cache": max(0, settings.verified_token_cache_size),
        }
        engine = VerificationEngine(FederatedResolver(resolver, trusted_keys), revocations,
                                    **engine_options)
        closers.append(engine.close)
        # Introspection checks revocation in Postgres itself, after the engine.
        introspector = VerificationEngine(resolver, _NoRevocations(), **engine_options)
        closers.append(introspector.close)

        # -- service layer ----------------------------------------------------
        timings = Timings(configured_max_age=settings.jwks_max_age_seconds,
                          leeway=settings.leeway_seconds,
                          min_period=settings.min_rotation_period_seconds)
        defaults = TenantDefaults(
            issuer_for=settings.issuer_for, key_size=settings.key_size,
            grace_margin_seconds=settings.jwks_max_age_seconds + settings.leeway_seconds,
            timings=timings)
        catalog = Catalog(store, resolver, default_tenant=settings.default_tenant,
                          jwks_max_age=settings.jwks_max_age_seconds, timings=timings)
        closers.append(catalog.close)
        callers = Callers(repo=PgCallers.over_pool(pool), audit=audit, clock=clock,
                          bootstrap=transport.bootstrap)
        closers.append(callers.close)
        await callers.reload()
        keys = KeyAdmin(catalog=catalog, store=store, signer=hsm, audit=audit, clock=clock,
                        defaults=defaults, authz=callers, policies=store.tenants,
                        marks=store.keys)
        tokens = Tokens(catalog=catalog, store=store, signer=hsm, audit=audit,
                        introspector=introspector, revocations=revocations, keys=keys,
                        clock=clock, leeway=settings.leeway_seconds, authz=callers,
                        max_token_bytes=settings.max_token_bytes, trusted=trusted_keys)
        verification = Verification(engine=engine, audit=audit, max_batch=settings.max_batch,
                                    authz=callers, catalog=catalog, trusted=trusted_keys,
                                    kid_wait_seconds=settings.federation_kid_wait_seconds)
        jobs = Jobs(catalog=catalog, store=store, keys=keys, revocations=revocations,
                    clock=clock, defaults=defaults)
        trust_catalog = TrustCatalog(repo=store.trust, keys=trusted_keys)
        closers.append(trust_catalog.close)
        await trust_catalog.reload()
        await trusted_keys.start()  # the persisted last good sets serve at once
        compliance = Compliance(
            store=store, signer=hsm, audit=audit, clock=clock, authz=callers,
            # Late-bound: each reload replaces the policy.
            tenants_for=lambda identity, role: callers.policy.tenants_for(identity, role),
            timings=timings)
        exchange = Exchange(tokens=tokens, verification=verification,
                            trust_of=trust_catalog.get, catalog=catalog, clock=clock,
                            authz=callers)
        trust = TrustAdmin(repo=store.trust, tenants=store.tenants, catalog=trust_catalog,
                           keys=trusted_keys, audit=audit, clock=clock, authz=callers,
                           allow_http_loopback=settings.federation_allow_http_loopback,
                           min_max_stale_seconds=settings.federation_min_max_stale_seconds,
                           # Late-bound: each reload replaces the policy.
                           tenants_for=lambda identity, role: callers.policy.tenants_for(
                               identity, role))
        services = Services(catalog, tokens, verification, keys, jobs, callers, trust,
                            trust_catalog)
        await jobs.bootstrap(settings.default_tenant
                             if bootstrap and settings.create_default_tenant else None)

        # -- the one event feed -----------------------------------------------
        feed = EventFeed(
            dsn, revocations, revocation_loader(store.revocations, clock.now),
            heartbeat=settings.revocation_heartbeat_seconds,
            resync=settings.revocation_resync_seconds,
            on_change=_fan_out(catalog, callers, trust_catalog),
            on_resync=lambda: _reload_all(catalog, callers, trust_catalog),
        )
        await feed.start()
        closers.append(feed.stop)
        maintenance = asyncio.create_task(jobs.maintain(settings.revocation_resync_seconds),
                                          name="maintenance")
        closers.append(maintenance.cancel)
        if worker == 0 and settings.audit_checkpoint_seconds > 0:
            checkpoints = Checkpoints(store=store, signer=hsm, clock=clock, journal=(
                FileCheckpointJournal(settings.state_dir.resolve() / "audit")))
            try:
                await checkpoints.prepare()
            except (FedtokenError, OSError) as exc:
                log.warning("audit checkpoint key not ready (%s); trying again every %.0f s",
                            exc, settings.audit_checkpoint_seconds)
            retention = None
            if settings.audit_retention_seconds > 0:
                audit_dir = settings.state_dir.resolve() / "audit"
                retention = Retention(
                    audit=store.audit, journal=FileCheckpointJournal(audit_dir),
                    archive=FileAuditArchive(audit_dir / "archive"), clock=clock,
                    keep_seconds=settings.audit_retention_seconds)
            checkpointing = asyncio.create_task(
                jobs.checkpoint_audit(checkpoints, settings.audit_checkpoint_seconds, retention,
                                      settings.audit_retention_check_seconds),
                name="audit-checkpoints")
            closers.append(checkpointing.cancel)
        if worker == 0:
            # Every replica runs the scheduler; the leader lock picks the one
            # that acts (service.rotation).
            rotation = Rotation(store=store, marks=store.keys, signer=hsm, audit=audit,
                                catalog=catalog, clock=clock, timings=timings,
                                lock=PgLeaderLock(dsn, ROTATION_LEADER_LOCK, name="rotation"))
            rotating = asyncio.create_task(rotation.run(settings.rotation_check_seconds),
                                           name="key-rotation")
            closers.append(_cancel_and_wait(rotating))
        if not await feed.wait_ready(10):
            log.warning("revocation view not confirmed fresh yet; verdicts fail closed")

        # -- boundaries -------------------------------------------------------
        boundary = Boundary(_authenticate if transport.tls is not None
                            else _assumed(settings.insecure_identity),
                            deadline_scope=caller_deadline)
        # The boundary wraps each method's handler once, at registration: as
        # a server interceptor grpc would run its chain on every call.
        server = grpc.aio.server(options=grpc_options(settings))
        boundary.register(add_token_service, TokenServicer(tokens, verification, exchange),
                          server)
        boundary.register(key_admin_pb2_grpc.add_KeyAdminServicer_to_server,
                          KeyAdminServicer(keys, callers, trust, compliance), server)
        # Health and reflection: on the same (mTLS) listener, but not through
        # the boundary, since probes and grpcurl hold no caller role.
        monitor = HealthMonitor(hsm=hsm, ping_db=postgres_ping(pool), revocations=revocations,
                                db_timeout=settings.db_request_timeout_seconds)
        monitor.register(server)
        if settings.grpc_reflection:
            enable_reflection(server)
        await monitor.check()  # true statuses from the first call on
        address = f"{settings.grpc_host}:{settings.grpc_port}"
        port = (server.add_insecure_port(address) if transport.tls is None
                else server.add_secure_port(address, server_credentials(transport.tls)))
        if port == 0:
            raise OSError(f"cannot listen on {settings.grpc_host}:{settings.grpc_port}")
        await server.start()
        closers.append(lambda: server.stop(0))  # a failed start; App.stop is graceful
        monitor.start()
        closers.append(monitor.close)
        app = App(settings, services, server, hsm, store, audit, revocations, port, dsn=dsn,
                  trusted_keys=trusted_keys, health=monitor, _closers=closers)
        closers.append(_cancel_and_wait(metrics.start_sampler(app)))
        health = http_health(monitor, lambda: {"audit": audit.mode.value})
        if ops and settings.ops_port >= 0:
            # Every worker binds the same port (SO_REUSEPORT); /metrics sums
            # them all, so any one of them may answer a scrape.
            ops_runner, app.ops_port = await start_site(
                create_ops_app(health, metrics.render), settings.ops_host, settings.ops_port,
                reuse_port=settings.ops_port != 0)
            closers.append(ops_runner.cleanup)
        if http and settings.http_port >= 0:
            # /healthz stays on the bridge as an alias; /metrics does not.
            web_app = combine(create_public_app(_PublicApi(catalog, tokens, exchange), settings,
                                                identity_of=spiffe_id_of_der,
                                                compliance_report=compliance.report),
                              create_ops_app(health))
            runner, app.http_port = await start_site(web_app, settings.http_host,
                                                     settings.http_port,
                                                     reuse_port=reuse_http_port,
                                                     ssl_context=_http_tls(
                                                         settings, transport.tls.client_ca
                                                         if transport.tls else None))
            closers.append(runner.cleanup)
        return app
    except BaseException:
        await _close_all(closers)
        raise
