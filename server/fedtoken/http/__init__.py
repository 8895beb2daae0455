"""HTTP: the public app (JWKS, discovery, introspection), the ops app
(health, metrics), and the small helpers the composition root uses to serve them."""

from __future__ import annotations

import ssl

from aiohttp import web

from fedtoken.http.guard import LIMITS_KEY, GuardedSite, HttpLimits, boundary
from fedtoken.http.ops import HealthCheck, MetricsRender, create_ops_app
from fedtoken.http.public import PublicApi, create_public_app

__all__ = ["HealthCheck", "HttpLimits", "MetricsRender", "PublicApi", "combine",
           "create_ops_app", "create_public_app", "start_site"]


async def start_site(app: web.Application, host: str, port: int, *,
                     reuse_port: bool = False,
                     limits: HttpLimits | None = None,
                     ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on host:port; returns the runner (``await runner.cleanup()``
    to stop) and the port actually bound (useful with port 0).

    Every connection is held to ``limits``: those given, else the ones
    ``create_public_app`` derived from the settings, else the defaults. The
    app gets the terse-error and access-log middleware if it lacks it.

    With port 0, give one address (not a name resolving to several): each
    would get a port of its own and only the first is returned.
    """
    if limits is None:
        limits = app.get(LIMITS_KEY) or HttpLimits()
    if not app.frozen:
        app[LIMITS_KEY] = limits  # the handlers' body-read timeout
        if boundary not in app.middlewares:
            app.middlewares.append(boundary)
    runner = web.AppRunner(app, **limits.handler_kwargs())
    await runner.setup()
    try:
        await GuardedSite(runner, host, port, limits=limits, reuse_port=reuse_port,
                          ssl_context=ssl_context).start()
        addresses = runner.addresses
        if not addresses:
            raise OSError(f"cannot listen on {host}:{port}")
        bound: int = addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound


def combine(public: web.Application, ops: web.Application) -> web.Application:
    """Add ``ops``'s routes to ``public`` and return it, for serving both on
    one listener. Only the routes move: ``ops`` must have no middlewares or
    lifecycle hooks, and its handlers see ``request.app`` as ``public``."""
    if ops.middlewares or _hooks(ops) != _hooks(web.Application()):
        raise ValueError("combine() moves routes only; ops has middlewares or hooks")
    for route in ops.router.routes():
        if route.resource is not None:
            public.router.add_route(route.method, route.resource.canonical, route.handler)
    return public


def _hooks(app: web.Application) -> tuple[int, ...]:
    # Compared with a fresh Application's: aiohttp registers some of its own.
    return (len(app.on_startup), len(app.on_shutdown), len(app.on_cleanup),
            len(app.cleanup_ctx))
