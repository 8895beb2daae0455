"""The operations HTTP app: GET /healthz (metrics will join it here).

Meant for a listener of its own, away from the public one; until that
exists the composition root mounts it on the public app (``combine``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

__all__ = ["HealthCheck", "create_ops_app"]

log = logging.getLogger(__name__)

# Returns (healthy, details); the details are merged into the response body.
HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]


def create_ops_app(health: HealthCheck) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        try:
            healthy, details = await health()
        except Exception:  # a failing probe means an unhealthy process
            log.exception("health check failed")
            healthy, details = False, {}
        body = {"status": "ok" if healthy else "unavailable",
                **{k: v for k, v in details.items() if k != "status"}}
        return web.json_response(body, status=200 if healthy else 503,
                                 headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    # Metrics: app.router.add_get("/metrics", ...) goes here.
    return app
