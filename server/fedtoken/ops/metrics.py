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

And for the instrumented code: ``observe_verdicts``, ``observe_wire_audit``,
``observe_issued``, ``observe_hsm_sign``, ``observe_hsm_error``,
``observe_jwks_fetch``.

Labels are bounded: methods, status codes, reasons, our tenants, configured
trusted issuers; never a value read from an unverified token. Each label
also has a hard cap on distinct values per process (``LABEL_LIMITS``):
past it, new values are counted under ``"other"``, so a bug upstream costs
accuracy, never the Prometheus server.

Multiprocess mode (prometheus-client): every worker writes its samples to
memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR``; ``render`` in any
worker reads all of them. Counters and histograms sum; each gauge says how
workers combine (``GAUGE_MODES``). The metric objects are built on first use,
after ``prepare`` has chosen the value class, so a process that imported this
module before ``prepare`` still writes to the shared files.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import operator
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

__all__ = [
    "GAUGE_MODES",
    "METRICS",
    "exported_names",
    "mark_worker_dead",
    "note_rsa_path",
    "observe_hsm_error",
    "observe_hsm_sign",
    "observe_issued",
    "observe_jwks_fetch",
    "observe_rpc",
    "observe_verdicts",
    "observe_wire_audit",
    "prepare",
    "render",
    "sample",
    "start_sampler",
]

log = logging.getLogger(__name__)

ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_EVERY: Final = 1.0
OTHER: Final = "other"

# Latencies of unary calls are tens of microseconds; a batch can take seconds.
RPC_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                      0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One C_Sign of RSA-2048 in SoftHSM is about a millisecond; a network HSM more.
HSM_BUCKETS: Final = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
                      0.5, 1.0, 2.5)

STATUS_CODES: Final = frozenset({
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
})
RSA_PATHS: Final = ("multibuffer", "openssl")
# JWKS fetch outcomes (fedtoken.core.trust.FetchOutcome values that are the
# result of a fetch; "stale"/"expired" are states, exported as gauges).
FETCH_OUTCOMES: Final = frozenset({"ok", "not_modified", "error", "rejected"})

# Distinct values one process accepts per label before it answers "other".
LABEL_LIMITS: Final = {"method": 128, "tenant": 4096, "issuer": 1024, "reason": 64}


GaugeMode = Literal["livesum", "livemax", "livemin"]


@dataclass(frozen=True)
class Spec:
    kind: str  # counter, gauge, histogram
    help: str
    labels: tuple[str, ...] = ()
    # gauges: how the workers' values combine ("live": a dead worker's value
    # leaves with it, see mark_worker_dead)
    mode: GaugeMode = "livesum"
    buckets: tuple[float, ...] = ()


# Every metric this module exports (the name without the _total a counter
# gets); docs/operations.md lists the same, the dashboard test checks against it.
METRICS: Final[dict[str, Spec]] = {
    "fedtoken_rpc_duration_seconds": Spec(
        "histogram", "Finished RPCs by method and gRPC status code: latency in seconds "
        "(_count is the number of calls)", ("method", "code"), buckets=RPC_BUCKETS),
    "fedtoken_verifications": Spec(
        "counter", "Tokens verified (Verify, VerifyBatch) by verdict reason and by the tenant "
        "our trust store attributed the token to (\"\" when none)", ("reason", "tenant")),
    "fedtoken_tokens_issued": Spec(
        "counter", "Tokens issued (Issue, IssueBatch, Exchange), by tenant, counted once "
        "their audit record is durable", ("tenant",)),
    "fedtoken_hsm_sign_seconds": Spec(
        "histogram", "Latency of one PKCS#11 C_Sign (one signature)", buckets=HSM_BUCKETS),
    "fedtoken_hsm_sign_errors": Spec(
        "counter", "Failed HSM signing calls (one sign_many batch: every caller in it fails)"),
    "fedtoken_revocation_age_seconds": Spec(
        "gauge", "Seconds since this worker's revocation view was last confirmed fresh "
        "(+Inf while its feed is broken); worst worker", mode="livemax"),
    "fedtoken_revocation_staleness_bound_seconds": Spec(
        "gauge", "The staleness bound: past this age verdicts are REVOCATION_UNAVAILABLE",
        mode="livemax"),
    "fedtoken_revocation_fresh": Spec(
        "gauge", "1 when every worker's revocation view is fresh, else 0", mode="livemin"),
    "fedtoken_revocation_entries": Spec(
        "gauge", "Entries in the revocation view (jtis, subjects, keys); largest worker",
        mode="livemax"),
    "fedtoken_audit_queue_depth": Spec(
        "gauge", "Audit events queued, not yet written; summed over workers", mode="livesum"),
    "fedtoken_audit_spill_bytes": Spec(
        "gauge", "Bytes of audit spill files on disk (events waiting for Postgres); summed "
        "over workers", mode="livesum"),
    "fedtoken_audit_spilling": Spec(
        "gauge", "Number of workers whose audit spill holds events not yet replayed",
        mode="livesum"),
    "fedtoken_audit_replayed": Spec(
        "counter", "Spilled audit events replayed into Postgres"),
    "fedtoken_audit_spilled": Spec(
        "counter", "Audit events written to the spill because Postgres was unavailable"),
    "fedtoken_audit_written": Spec(
        "counter", "Audit events written to Postgres"),
    "fedtoken_audit_failed": Spec(
        "counter", "Audit events that could be neither written nor spilled"),
    "fedtoken_audit_group_commits": Spec(
        "counter", "Transactions of the durable audit path (written / this = group size)"),
    "fedtoken_jwks_fetches": Spec(
        "counter", "JWKS fetches of configured trusted issuers by outcome (ok, not_modified, "
        "error, rejected)", ("issuer", "outcome")),
    "fedtoken_jwks_key_set_age_seconds": Spec(
        "gauge", "Seconds since the trusted issuer's key set was last fetched or revalidated; "
        "worst worker", ("issuer",), mode="livemax"),
    "fedtoken_jwks_serving_stale": Spec(
        "gauge", "1 when a worker serves the issuer's last good key set past its freshness",
        ("issuer",), mode="livemax"),
    "fedtoken_jwks_usable": Spec(
        "gauge", "1 when every worker accepts the issuer's tokens (a key set within its "
        "maximum staleness), else 0", ("issuer",), mode="livemin"),
    "fedtoken_rotation_next_step_seconds": Spec(
        "gauge", "Seconds until the tenant's next scheduled key rotation step (negative: "
        "overdue)", ("tenant",), mode="livemin"),
    "fedtoken_rsa_verify_path": Spec(
        "gauge", "1 for the RSA implementation verifying RS256 batches (multibuffer: "
        "crypto_mb AVX-512 IFMA; openssl: the fallback), 0 for the other", ("path",),
        mode="livemax"),
}

# Gauge name -> multiprocess mode, for the documentation and the tests.
GAUGE_MODES: Final = {name: s.mode for name, s in METRICS.items() if s.kind == "gauge"}

_SUFFIXES: Final = {"counter": ("_total",), "gauge": ("",),
                    "histogram": ("_bucket", "_count", "_sum")}


def exported_names() -> frozenset[str]:
    """Every sample name the exposition can carry (with _total, _bucket, ...)."""
    return frozenset(name + suffix for name, spec in METRICS.items()
                     for suffix in _SUFFIXES[spec.kind])


# --- the metric objects ---------------------------------------------------------


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.by_name: dict[str, Any] = {}
        for name, s in METRICS.items():
            if s.kind == "counter":
                metric: Any = Counter(name, s.help, s.labels, registry=registry)
            elif s.kind == "histogram":
                metric = Histogram(name, s.help, s.labels, buckets=s.buckets, registry=registry)
            else:
                metric = Gauge(name, s.help, s.labels, registry=registry,
                               multiprocess_mode=s.mode)
            self.by_name[name] = metric
        m = self.by_name
        self.rpc = m["fedtoken_rpc_duration_seconds"]
        self.verifications = m["fedtoken_verifications"]
        self.issued = m["fedtoken_tokens_issued"]
        self.hsm_sign = m["fedtoken_hsm_sign_seconds"]
        self.hsm_errors = m["fedtoken_hsm_sign_errors"]
        self.jwks_fetches = m["fedtoken_jwks_fetches"]
        # Children by label values: .labels() costs microseconds, a dict
        # lookup does not (a batch looks up one child per distinct reason).
        self.children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self.seen: dict[str, set[str]] = {label: set() for label in LABEL_LIMITS}
        self.broken: set[str] = set()
        self.lock = threading.Lock()

    def bounded(self, label: str, value: str) -> str:
        seen = self.seen[label]
        if value in seen:
            return value
        with self.lock:
            if len(seen) >= LABEL_LIMITS[label]:
                return OTHER
            seen.add(value)
        return value

    def child(self, name: str, *label_values: str) -> Any:
        key = (name, label_values)
        found = self.children.get(key)
        if found is None:
            try:
                found = self.by_name[name].labels(*label_values)
            except Exception:
                # A new series grows its worker's file (multiprocess mode):
                # a full disk must cost the sample, never the call counted.
                if name not in self.broken:
                    self.broken.add(name)
                    log.exception("metrics: cannot add a series to %s; not counted", name)
                return _NOOP
            self.children[key] = found
        return found


class _NoOp:
    """Stands in for a series that could not be created."""

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_NOOP: Final = _NoOp()
_metrics: _Metrics | None = None
_build_lock = threading.Lock()


def _get() -> _Metrics:
    m = _metrics
    return m if m is not None else _build()


def _build() -> _Metrics:
    global _metrics
    with _build_lock:
        if _metrics is None:
            _metrics = _Metrics(REGISTRY)
        return _metrics


def _reset() -> None:
    """Forget the metric objects (unregistered), so the next use builds them
    with the value class now in force (prepare; tests)."""
    global _metrics
    with _build_lock:
        if _metrics is not None:
            for metric in _metrics.by_name.values():
                try:
                    REGISTRY.unregister(metric)
                except KeyError:
                    pass
        _metrics = None


# --- the API --------------------------------------------------------------------


def prepare(directory: str) -> None:
    """Wipe ``directory`` and make it this process tree's multiprocess
    directory: the workers (spawned later) inherit the variable; this
    process switches to the shared files too."""
    path = Path(directory)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)
    # prometheus_client picks its value class when it is imported: in a
    # process that imported it before this call, pick the shared files now.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _reset()


def render() -> tuple[bytes, str]:
    """The exposition of all workers' metrics (this process's alone when no
    multiprocess directory is set)."""
    if os.environ.get(ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    _get()
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def observe_rpc(method: str, code: str, seconds: float) -> None:
    m = _get()
    key = ("fedtoken_rpc_duration_seconds", (method, code))
    child = m.children.get(key)
    if child is None:
        label = m.bounded("method", method)
        known = code in STATUS_CODES
        child = m.child("fedtoken_rpc_duration_seconds", label, code if known else "UNKNOWN")
        if label == method and known and child is not _NOOP:
            m.children[key] = child
    child.observe(seconds)


_reason_and_tenant = operator.attrgetter("reason", "tenant")
_reason_column = operator.itemgetter(4)  # fedtoken.audit.rows.VERIFIED_FIELDS


def observe_verdicts(verdicts: Sequence[Any]) -> None:
    """Count verdicts (fedtoken.core.model.Verdict) by reason and tenant.
    The tenant is the one the verification attributed the token to (our
    tenants only), never a claim of an unverified token."""
    if not verdicts:
        return
    m = _get()
    if len(verdicts) == 1:
        v = verdicts[0]
        _verdict_child(m, v.reason.value, v.tenant).inc()
        return
    for (reason, tenant), count in collections.Counter(
            map(_reason_and_tenant, verdicts)).items():
        _verdict_child(m, reason.value, tenant).inc(count)


def observe_wire_audit(groups: Iterable[tuple[str, Sequence[Sequence[Any]]]]) -> None:
    """Count the tokens the native pipeline decided, from their audit entries
    (``WireBatch.audit``: (tenant of the slot's plan, entries)): one C-level
    Counter over each group's reason column, no Python call per token."""
    m = _get()
    for tenant, entries in groups:
        if not entries:
            continue
        for reason, count in collections.Counter(map(_reason_column, entries)).items():
            _verdict_child(m, reason, tenant).inc(count)


def _verdict_child(m: _Metrics, reason: str, tenant: str) -> Any:
    key = ("fedtoken_verifications", (reason, tenant))
    child = m.children.get(key)
    if child is None:
        labels = (m.bounded("reason", reason), m.bounded("tenant", tenant))
        child = m.child("fedtoken_verifications", *labels)
        if labels == (reason, tenant) and child is not _NOOP:
            m.children[key] = child
    return child


def observe_issued(tenant: str, count: int = 1) -> None:
    """``count`` tokens of ``tenant`` (our tenant id) issued."""
    m = _get()
    key = ("fedtoken_tokens_issued", (tenant,))
    child = m.children.get(key)
    if child is None:
        label = m.bounded("tenant", tenant)
        child = m.child("fedtoken_tokens_issued", label)
        if label == tenant and child is not _NOOP:
            m.children[key] = child
    child.inc(count)


def observe_hsm_sign(seconds: float) -> None:
    """One PKCS#11 signing call (from the HSM worker thread)."""
    _get().hsm_sign.observe(seconds)


def observe_hsm_error() -> None:
    _get().hsm_errors.inc()


def observe_jwks_fetch(issuer: str, outcome: str) -> None:
    """One JWKS fetch of a configured trusted issuer (the cache's own
    configuration names it, never a token)."""
    if outcome not in FETCH_OUTCOMES:
        return
    m = _get()
    m.child("fedtoken_jwks_fetches", m.bounded("issuer", issuer), outcome).inc()


_rsa_path: str | None = None


def note_rsa_path(path: str) -> None:
    """The RSA implementation this process's verification engine uses
    ("multibuffer" or "openssl"), set by the engine when it is built; the
    sampler exports it (the metrics module imports no adapter)."""
    global _rsa_path
    if path in RSA_PATHS:
        _rsa_path = path


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (livesum/liveall/...); its counters
    stay in the sums, so totals never go backwards."""
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# --- the sampler ---------------------------------------------------------------


class _Sampler:
    """This worker's gauges, set from the App's objects; counters the objects
    keep themselves (the audit writer's) are turned into increments."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last: dict[str, int] = {}
        self.failing: set[str] = set()
        self.issuers: set[str] = set()
        self.tenants: set[str] = set()

    def run_once(self) -> None:
        for part in (self.revocations, self.audit, self.federation, self.rotation,
                     self.rsa):
            name = part.__name__
            try:
                part()
            except Exception:  # a gauge must never take the worker down
                if name not in self.failing:
                    self.failing.add(name)
                    log.exception("metrics: sampling %s failed (logged once until it recovers)",
                                  name)
            else:
                self.failing.discard(name)

    def _gauge(self, name: str, *labels: str) -> Any:
        return _get().child(name, *labels) if labels else _get().by_name[name]

    def revocations(self) -> None:
        view = getattr(self.app, "revocations", None)
        if view is None:
            return
        bound = float(view.staleness)
        # InMemoryRevocationView keeps its watermark as a monotonic instant;
        # age = now - (fresh_until - bound).
        fresh_until = getattr(view, "_fresh_until", None)
        clock = getattr(view, "_monotonic", time.monotonic)
        if isinstance(fresh_until, float | int):
            age = math.inf if fresh_until == -math.inf else max(
                0.0, clock() - (fresh_until - bound))
            self._gauge("fedtoken_revocation_age_seconds").set(age)
        self._gauge("fedtoken_revocation_staleness_bound_seconds").set(bound)
        self._gauge("fedtoken_revocation_fresh").set(1 if view.is_fresh else 0)
        self._gauge("fedtoken_revocation_entries").set(view.size)

    def audit(self) -> None:
        writer = getattr(self.app, "audit", None)
        if writer is None:
            return
        self._gauge("fedtoken_audit_queue_depth").set(writer.queued)
        self._gauge("fedtoken_audit_spill_bytes").set(_dir_bytes(Path(writer.spill_dir)))
        self._gauge("fedtoken_audit_spilling").set(1 if writer.spill_pending else 0)
        for attr, name in (("replayed", "fedtoken_audit_replayed"),
                           ("spilled", "fedtoken_audit_spilled"),
                           ("written", "fedtoken_audit_written"),
                           ("failed", "fedtoken_audit_failed"),
                           ("group_commits", "fedtoken_audit_group_commits")):
            self._advance(name, int(getattr(writer, attr)))

    def _advance(self, name: str, total: int) -> None:
        """Raise the counter by what the object's own counter grew since the
        last sample (a smaller value: the object was replaced; start over)."""
        before = self.last.get(name, 0)
        if total > before:
            self._gauge(name).inc(total - before)
        self.last[name] = total

    def federation(self) -> None:
        trusted = getattr(self.app, "trusted_keys", None)
        status = getattr(trusted, "status", None)
        if status is None:
            return
        now = time.time()
        clock = getattr(trusted, "_clock", None)
        if clock is not None:
            now = clock.now()
        current: set[str] = set()
        m = _get()
        for s in status():
            issuer = m.bounded("issuer", s.issuer)
            current.add(issuer)
            age = now - s.fetched_at if s.fetched_at else math.inf
            self._gauge("fedtoken_jwks_key_set_age_seconds", issuer).set(max(0.0, age))
            self._gauge("fedtoken_jwks_serving_stale", issuer).set(1 if s.serving_stale else 0)
            self._gauge("fedtoken_jwks_usable", issuer).set(1 if s.usable else 0)
        for gone in self.issuers - current:
            # Trust withdrawn: its series say so instead of freezing.
            self._gauge("fedtoken_jwks_key_set_age_seconds", gone).set(math.nan)
            self._gauge("fedtoken_jwks_serving_stale", gone).set(0)
            self._gauge("fedtoken_jwks_usable", gone).set(0)
        self.issuers = current

    def rotation(self) -> None:
        services = getattr(self.app, "services", None)
        if services is None:
            return
        catalog, keys = services.catalog, services.keys
        now = time.time()
        current: set[str] = set()
        m = _get()
        for tenant in catalog.tenants():
            timing = keys.timing(tenant)
            label = m.bounded("tenant", tenant.id)
            current.add(label)
            left = timing.next_step_at - now if timing.next_step_at else math.nan
            self._gauge("fedtoken_rotation_next_step_seconds", label).set(left)
        for gone in self.tenants - current:
            self._gauge("fedtoken_rotation_next_step_seconds", gone).set(math.nan)
        self.tenants = current

    def rsa(self) -> None:
        path = _rsa_path
        if path is None:
            return  # no verification engine built in this process yet
        for name in RSA_PATHS:
            self._gauge("fedtoken_rsa_verify_path", name).set(1 if name == path else 0)


def _dir_bytes(directory: Path) -> int:
    total = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:  # replayed and removed meanwhile
            continue
    return total


def sample(app: Any) -> None:
    """One sampling of ``app``'s gauges (the sampler task's step; tests)."""
    _Sampler(app).run_once()


def start_sampler(app: Any) -> asyncio.Task[None]:
    """Set this worker's gauges from ``app`` now and every second; never raises
    out (a failing part is logged once and tried again)."""
    sampler = _Sampler(app)

    async def loop() -> None:
        while True:
            try:
                sampler.run_once()
            except Exception:  # run_once guards each part; belt and braces
                log.exception("metrics: sampling failed")
            await asyncio.sleep(SAMPLE_EVERY)

    return asyncio.get_running_loop().create_task(loop(), name="metrics-sampler")
