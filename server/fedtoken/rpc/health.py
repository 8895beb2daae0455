"""gRPC health (``grpc.health.v1``) wired to the conditions that fail closed.

One ``HealthMonitor`` per process. Every ``interval`` seconds it probes
(each probe bounded):

- the HSM: one object search on this process's logged-in session
  (``Pkcs11Hsm.key_attributes`` of a label no key carries), through the
  HSM's own serialising worker thread, so python-pkcs11 is never entered
  from two threads at once. While the session module has marked the token
  down, the call fails at once. The probe waits in that thread's queue
  behind signing batches, so a slow answer keeps the last verdict; one
  pending for ``hsm_stuck_after`` seconds (a hung HSM) is a failure, and no
  second probe is queued behind it.
- Postgres: ``ping_db(db_timeout)``, which the composition root makes a
  ``SELECT 1`` on a connection of the process's pool; ``db_timeout`` is the
  bound of a request-path operation (when the probe cannot get an answer in
  it, requests cannot either).
- the revocation view: ``is_fresh`` (confirmed current within its
  staleness bound; past it every verdict is REVOCATION_UNAVAILABLE).

and sets the statuses (SERVING again as soon as a round passes):

============================  ==========================================
service                       SERVING when
============================  ==========================================
``""`` (the whole server)     HSM, Postgres and a fresh revocation view
``fedtoken.v1.TokenService``  Postgres and a fresh revocation view
``fedtoken.v1.KeyAdmin``      Postgres and the HSM
============================  ==========================================

Why they differ: TokenService's hot path, Verify, needs neither Postgres
nor the HSM, only a fresh view (which a Postgres outage soon makes stale),
and Introspect, Revoke and Issue's audit record need Postgres. The HSM is
left out on purpose: it is usually one cluster shared by every replica, so
a load balancer that drained replicas for it would stop verification
everywhere at once; Issue answers UNAVAILABLE with its reason meanwhile,
and the overall status (and KeyAdmin, which generates keys) reports it.
KeyAdmin does not need the view: an operator can still administer while
the feed catches up.

``shutdown()`` (App.stop, before the listener stops) turns every status
NOT_SERVING for good; open ``Watch`` streams see it during the grace
period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import (  # type: ignore[import-untyped]
    health,
    health_pb2,
    health_pb2_grpc,
)
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]

from fedtoken_client._pb.fedtoken.v1 import key_admin_pb2, token_service_pb2

__all__ = ["HEALTH_SERVICE", "KEY_ADMIN", "OVERALL", "TOKEN_SERVICE", "Conditions",
           "HealthMonitor", "enable_reflection", "http_health"]

log = logging.getLogger(__name__)

OVERALL = ""
TOKEN_SERVICE: str = token_service_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name
KEY_ADMIN: str = key_admin_pb2.DESCRIPTOR.services_by_name["KeyAdmin"].full_name
HEALTH_SERVICE: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The label the HSM probe searches for: under the tenant-key prefix (the only
# one the HSM adapter accepts) but never a real key's (those are
# fedtoken/<tenant>/<kid>, and no tenant is named ".health").
_PROBE_LABEL = "fedtoken/.health/probe"


class _Hsm(Protocol):
    def key_attributes(self, hsm_label: str) -> Awaitable[Any]: ...


class _Fresh(Protocol):
    @property
    def is_fresh(self) -> bool: ...


@dataclass(frozen=True)
class Conditions:
    """The outcome of one probe round."""

    hsm: bool
    postgres: bool
    revocations_fresh: bool

    def serving(self, service: str) -> bool:
        if service == TOKEN_SERVICE:
            return self.postgres and self.revocations_fresh
        if service == KEY_ADMIN:
            return self.postgres and self.hsm
        return self.hsm and self.postgres and self.revocations_fresh


class HealthMonitor:
    """The Health servicer of one process and the task that keeps it true."""

    services = (OVERALL, TOKEN_SERVICE, KEY_ADMIN)

    def __init__(self, *, hsm: _Hsm, ping_db: Callable[[float], Awaitable[object]],
                 revocations: _Fresh,
                 interval: float = 1.0, timeout: float = 1.0, db_timeout: float = 2.0,
                 hsm_stuck_after: float = 5.0) -> None:
        self.servicer = health.aio.HealthServicer()
        self._hsm, self._ping_db, self._revocations = hsm, ping_db, revocations
        self._interval, self._timeout, self._db_timeout = interval, timeout, db_timeout
        self._hsm_stuck_after = hsm_stuck_after
        self._hsm_probe: asyncio.Future[Any] | None = None
        self._hsm_probe_since = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.conditions = Conditions(hsm=False, postgres=False, revocations_fresh=False)

    def register(self, server: grpc.aio.Server) -> None:
        """Add grpc.health.v1.Health to ``server`` (directly: probes hold no role)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    @property
    def serving(self) -> bool:
        """The overall status (NOT_SERVING once shutdown began)."""
        return not self._stopping and self.conditions.serving(OVERALL)

    def details(self) -> dict[str, object]:
        c = self.conditions
        return {"hsm": c.hsm, "postgres": c.postgres, "revocations_fresh": c.revocations_fresh,
                "shutting_down": self._stopping}

    async def check(self) -> Conditions:
        """One probe round; sets the statuses and returns what it found."""
        hsm, postgres = await asyncio.gather(self._probe_hsm(), self._probe_postgres())
        found = Conditions(hsm=hsm, postgres=postgres,
                           revocations_fresh=self._revocations.is_fresh)
        if found != self.conditions:
            level = logging.INFO if found.serving(OVERALL) else logging.WARNING
            log.log(level, "health: hsm %s, postgres %s, revocation view %s",
                    "ok" if hsm else "UNUSABLE", "ok" if postgres else "UNREACHABLE",
                    "fresh" if found.revocations_fresh else "STALE")
        self.conditions = found
        for service in self.services:
            await self.servicer.set(service, SERVING if found.serving(service) else NOT_SERVING)
        return found

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:  # the monitor must outlive any one round
                log.exception("health check round failed")

    async def shutdown(self) -> None:
        """Every status NOT_SERVING, for good (graceful shutdown begins)."""
        self._stopping = True
        await self.servicer.enter_graceful_shutdown()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 5)
        if self._hsm_probe is not None:
            # Its outcome is nobody's now (and no "exception never retrieved").
            self._hsm_probe.add_done_callback(_passed)

    # --- probes -----------------------------------------------------------------

    async def _probe_hsm(self) -> bool:
        probe = self._hsm_probe
        if probe is None or probe.done():
            # A future of its own: a timed-out probe is not cancelled (the
            # worker thread would run it anyway), it is waited for next round.
            probe = self._hsm_probe = asyncio.ensure_future(
                self._hsm.key_attributes(_PROBE_LABEL))
            self._hsm_probe_since = time.monotonic()
        done, _ = await asyncio.wait({probe}, timeout=self._timeout)
        if not done:
            pending = time.monotonic() - self._hsm_probe_since
            return self.conditions.hsm and pending < self._hsm_stuck_after
        return _passed(probe)

    async def _probe_postgres(self) -> bool:
        try:
            return await asyncio.wait_for(self._ping_db(self._db_timeout), self._db_timeout) == 1
        except Exception:  # noqa: BLE001 - any failure means unreachable
            return False


def _passed(probe: asyncio.Future[Any]) -> bool:
    if probe.cancelled():
        return False
    return probe.exception() is None


def enable_reflection(server: grpc.aio.Server) -> None:
    """gRPC server reflection listing fedtoken's services, Health and itself."""
    reflection.enable_server_reflection(
        (TOKEN_SERVICE, KEY_ADMIN, HEALTH_SERVICE, reflection.SERVICE_NAME), server)


# The probe of /healthz (fedtoken.http.ops.HealthCheck) for a monitor.
def http_health(monitor: HealthMonitor,
                extra: Callable[[], dict[str, object]] | None = None
                ) -> Callable[[], Awaitable[tuple[bool, dict[str, object]]]]:
    async def check() -> tuple[bool, dict[str, object]]:
        return monitor.serving, {**monitor.details(), **(extra() if extra else {})}

    return check
