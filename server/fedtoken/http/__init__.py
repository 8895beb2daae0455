"""HTTP: the public app (JWKS, discovery, introspection), the ops app
(health), and the small helpers the composition root uses to serve them."""

from __future__ import annotations

from aiohttp import web

from fedtoken.http.ops import HealthCheck, create_ops_app
from fedtoken.http.public import PublicApi, create_public_app

__all__ = ["HealthCheck", "PublicApi", "combine", "create_ops_app", "create_public_app",
           "start_site"]


async def start_site(app: web.Application, host: str, port: int, *,
                     reuse_port: bool = False) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on host:port; returns the runner (``await runner.cleanup()``
    to stop) and the port actually bound (useful with port 0).

    With port 0, give one address (not a name resolving to several): each
    would get a port of its own and only the first is returned.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
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
