"""The operations HTTP app: GET /healthz and GET /metrics.

Served on a listener of its own (settings ``ops_host``, ``ops_port``; plain
HTTP, keep it private), every worker binding the same port. The public
bridge keeps ``/healthz`` as an alias (``combine`` with an ops app made
without ``metrics``), never ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

__all__ = ["HealthCheck", "MetricsRender", "create_ops_app"]

log = logging.getLogger(__name__)

# Returns (healthy, details); the details are merged into the response body.
HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]
# Returns (body, content type) of the Prometheus text exposition.
MetricsRender = Callable[[], tuple[bytes, str]]


def create_ops_app(health: HealthCheck, metrics: MetricsRender | None = None) -> web.Application:
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
    if metrics is not None:
        render = metrics

        async def scrape(_request: web.Request) -> web.Response:
            # Off the loop: the multiprocess collector reads every worker's files.
            body, content_type = await asyncio.to_thread(render)
            # aiohttp's content_type argument refuses parameters (charset):
            # the header is given whole.
            return web.Response(body=body, headers={"Content-Type": content_type,
                                                    "Cache-Control": "no-store"})

        app.router.add_get("/metrics", scrape)
    return app
