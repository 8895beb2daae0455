"""Prometheus metrics of a fedtoken process, summed across workers.

API (stable; the composition root, the boundary and the services call it):

- ``prepare(directory)``: in the supervising process, before any worker
  starts: wipe ``directory``, point ``PROMETHEUS_MULTIPROC_DIR`` at it (the
  workers inherit it). Single-process servers call it too.
- ``render() -> (body: bytes, content_type: str)``: the text exposition of
  every worker's metrics (multiprocess collector), for GET /metrics.
- ``observe_rpc(method, code, seconds)``: one finished RPC (``code`` is the
  grpc.StatusCode name, e.g. "OK", "PERMISSION_DENIED").
- ``start_sampler(app) -> asyncio.Task``: a task that sets this worker's
  gauges (revocation staleness and size, audit queue/spill, trusted issuer
  key set ages, rotation countdowns, the RSA path) every second; cancelled
  at shutdown.
- ``mark_worker_dead(pid)``: for the supervisor when a worker exits.

Labels are bounded: methods, status codes, reasons, our tenants, configured
trusted issuers; never a value read from an unverified token.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["mark_worker_dead", "observe_rpc", "prepare", "render", "start_sampler"]


def prepare(directory: str) -> None:  # pragma: no cover - filled in by the metrics work
    pass


def render() -> tuple[bytes, str]:  # pragma: no cover - filled in by the metrics work
    return b"", "text/plain; version=0.0.4; charset=utf-8"


def observe_rpc(method: str, code: str, seconds: float) -> None:  # pragma: no cover
    pass


def start_sampler(app: Any) -> asyncio.Task[None]:  # pragma: no cover
    async def idle() -> None:
        await asyncio.Event().wait()

    return asyncio.get_running_loop().create_task(idle(), name="metrics-sampler")


def mark_worker_dead(pid: int) -> None:  # pragma: no cover
    pass
