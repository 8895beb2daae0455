"""Federation trust: which foreign issuers our tenants trust.

- ``TrustAdmin``: the KeyAdmin use cases (add or update, list with each
  issuer's key-set status, remove, refresh now), authorized and audited like
  every other administration.
- ``TrustCatalog``: the replica's snapshot of trusted issuers, loaded at
  start and on every ``trust`` notification of the event feed, and installed
  into the remote JWKS cache (``TrustedKeys.configure``).
- ``FetchAudit``: turns the cache's fetch outcomes into ``trust.jwks_fetch``
  audit events, without an audit row per routine refresh.
- ``NullTrustedKeys``: a ``TrustedKeys`` that trusts nothing, for a build
  without the remote JWKS cache.

Authorization. Trust is granted by tenants, so changing it needs the admin
role for every tenant concerned: the ones it names and, for an update or a
removal, the ones it named before (a tenant's admin cannot withdraw another
tenant's trust). Refreshing needs it for one of them. Listing needs admin or
auditor; a caller scoped to some tenants sees only the issuers they trust,
with only those tenants named.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from fedtoken.core.audit import AuditEvent
from fedtoken.core.authz import Ask, Role
from fedtoken.core.errors import (
    AlreadyExists,
    ErrorReason,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from fedtoken.core.policy import check_tenant_id, check_text
from fedtoken.core.ports import (
    AuditSink,
    Authorizer,
    CallContext,
    Clock,
    IssuerKeys,
    TenantRepository,
    TrustedKeys,
    TrustRepository,
    utc,
)
from fedtoken.core.trust import (
    MAX_TRUST_TENANTS,
    MAX_TRUST_URL,
    MIN_MAX_STALE_SECONDS,
    FetchOutcome,
    IssuerStatus,
    TrustedIssuer,
    validate_trusted_issuer,
)
from fedtoken.service._reload import CoalescedReload

log = logging.getLogger(__name__)

# A request may name each at most this often (the core bounds the distinct values).
_MAX_LISTED: Final = {"tenants": MAX_TRUST_TENANTS, "audiences": 64, "algorithms": 16}
# Who the policy says holds a role for which tenants (None: all), without
# deciding anything: ``Policy.tenants_for`` of the caller policy.
RoleProbe = Callable[[str, Role], frozenset[str] | None]


@dataclass(frozen=True, slots=True)
class NewTrust:
    """An AddTrustedIssuer request: zero values take the documented defaults
    (algorithms RS256, namespace from the issuer URL, max staleness a day)."""

    issuer: str
    tenants: Sequence[str]
    jwks_uri: str = ""
    algorithms: Sequence[str] = ()
    audiences: Sequence[str] = ()
    namespace: str = ""
    max_stale_seconds: int = 0


@dataclass(frozen=True, slots=True)
class TrustView:
    """One trusted issuer with what the cache knows of its key set now."""

    trust: TrustedIssuer
    status: IssuerStatus
    age_seconds: int = 0  # since the key set was last confirmed (0: never fetched)
    created: bool = False  # add: True when the issuer was not trusted before


class TrustCatalog:
    """The trusted issuers of this replica, as last loaded, and the one
    writer of ``TrustedKeys.configure``.

    Reloads are coalesced (``CoalescedReload``) like the catalog's: the
    replica that made a change reloads before answering, a notification
    (``notice``) reloads in the background, and the feed's periodic resync
    reloads in full.
    """

    def __init__(self, *, repo: TrustRepository, keys: TrustedKeys) -> None:
        self._repo = repo
        self._keys = keys
        self._issuers: dict[str, TrustedIssuer] = {}
        self._reloader = CoalescedReload(self._load, name="trust", what="trusted issuers")

    def issuers(self) -> list[TrustedIssuer]:
        return sorted(self._issuers.values(), key=lambda t: t.issuer)

    def get(self, issuer: str) -> TrustedIssuer | None:
        return self._issuers.get(issuer)

    @property
    def reloads(self) -> int:
        return self._reloader.loads

    async def reload(self) -> None:
        await self._reloader.run()

    async def _load(self) -> None:
        issuers = await self._repo.list()
        self._keys.configure(issuers)
        self._issuers = {t.issuer: t for t in issuers}

    def notice(self, event: Mapping[str, Any]) -> None:
        """A trusted issuer changed somewhere (feed callback; never blocks)."""
        if event.get("type") == "trust":
            self._reloader.soon()

    async def close(self) -> None:
        await self._reloader.close()


class TrustAdmin:
    """Trusted issuers: add or update, list, remove, refresh.

    ``tenants_for`` (the caller policy's ``tenants_for``) lets ``list`` ask
    the authorizer for the one role the caller holds, admin or auditor, so a
    caller with neither is denied (and audited) once, and an auditor is never
    recorded as a denied admin. Without it, ``list`` asks for admin, then
    auditor.
    """

    def __init__(self, *, repo: TrustRepository, tenants: TenantRepository,
                 catalog: TrustCatalog, keys: TrustedKeys, audit: AuditSink, clock: Clock,
                 authz: Authorizer, allow_http_loopback: bool = False,
                 tenants_for: RoleProbe | None = None,
                 min_max_stale_seconds: int = MIN_MAX_STALE_SECONDS) -> None:
        self._repo = repo
        self._tenants = tenants
        self._catalog = catalog
        self._keys = keys
        self._audit = audit
        self._clock = clock
        self._authz = authz
        self._allow_http_loopback = allow_http_loopback
        self._tenants_for = tenants_for
        self._min_max_stale = min_max_stale_seconds

    # -- changes ----------------------------------------------------------------------

    async def add(self, req: NewTrust, ctx: CallContext) -> TrustView:
        """Trust ``req.issuer`` for ``req.tenants``, or replace its definition.

        INVALID_ARGUMENT for a bad field (``core.trust.validate_trusted_issuer``);
        FAILED_PRECONDITION TENANT_NOT_FOUND for a tenant that does not exist;
        ALREADY_EXISTS for a namespace another issuer has.
        """
        scope = await self._authz.scope(ctx, Role.ADMIN)
        for name, values in (("tenants", req.tenants), ("audiences", req.audiences),
                             ("algorithms", req.algorithms)):
            if len(values) > _MAX_LISTED[name]:
                raise InvalidRequest(f"{name}: too many entries", field=name)
        tenants = await self._tenants.list()
        trust = validate_trusted_issuer(
            TrustedIssuer(issuer=req.issuer, tenants=frozenset(req.tenants),
                          jwks_uri=req.jwks_uri, algorithms=frozenset(req.algorithms),
                          audiences=frozenset(req.audiences), namespace=req.namespace,
                          max_stale_seconds=req.max_stale_seconds, added_by=ctx.actor),
            local_issuers=[t.issuer for t in tenants],
            allow_http_loopback=self._allow_http_loopback, min_max_stale=self._min_max_stale)
        # The caller's own tenants first: a tenant outside its scope is denied
        # before anything tells whether it exists.
        await self._admin_of_all(ctx, scope, trust.tenants)
        missing = sorted(trust.tenants - {t.id for t in tenants})
        if missing:
            raise FailedPrecondition(
                f"tenant {missing[0]!r} does not exist; create it first "
                "(`fedtoken tenants create`)", reason=ErrorReason.TENANT_NOT_FOUND,
                field="tenants", tenant=missing[0])
        previous = await self._repo.get(trust.issuer)
        if previous is not None:  # replacing it withdraws the trust of its tenants
            await self._admin_of_all(ctx, scope, previous.tenants)
        taken = [t for t in await self._repo.list()
                 if t.namespace == trust.namespace and t.issuer != trust.issuer]
        if taken:
            raise AlreadyExists("another trusted issuer has this namespace; give another one "
                                "(--namespace)", field="namespace")
        stored = await self._repo.put(trust, now=utc(self._clock.now()))
        details: dict[str, Any] = _describe(stored)
        if previous is not None:
            details["previous"] = {k: v for k, v in _describe(previous).items()
                                   if details.get(k) != v}
        await self._record("trust.updated" if previous else "trust.added", stored,
                           previous, ctx, details)
        await self._catalog.reload()
        return self._view(stored, created=previous is None)

    async def remove(self, issuer: str, ctx: CallContext) -> TrustedIssuer:
        """Stop trusting ``issuer`` (for every tenant); what it was. NOT_FOUND
        when it was not trusted."""
        scope = await self._authz.scope(ctx, Role.ADMIN)
        existing = await self._existing(issuer)
        await self._admin_of_all(ctx, scope, existing.tenants)
        if not await self._repo.remove(issuer):
            raise _not_trusted()
        await self._record("trust.removed", existing, None, ctx, _describe(existing))
        await self._catalog.reload()
        return existing

    async def refresh(self, issuer: str, ctx: CallContext) -> TrustView:
        """Fetch the issuer's key set now (within its fetch budget); its status after."""
        scope = await self._authz.scope(ctx, Role.ADMIN)
        existing = await self._existing(issuer)
        if scope is not None and not existing.tenants & scope:
            await self._authz.require(ctx, Ask(Role.ADMIN, min(existing.tenants)))
        if self._catalog.get(issuer) is None:
            await self._catalog.reload()  # added on another replica a moment ago
        status = await self._keys.refresh(issuer)
        await self._record("trust.refreshed", existing, None, ctx, {
            "kids": list(status.kids), "usable": status.usable,
            "serving_stale": status.serving_stale, "last_error": status.last_error[:500],
        }, outcome=status.last_outcome or "unknown")
        return self._view(existing, status=status)

    # -- reading ----------------------------------------------------------------------

    async def list(self, ctx: CallContext, tenant: str = "") -> builtins.list[TrustView]:
        """Every trusted issuer the caller may see (``tenant``: only those that
        tenant trusts), read through to the store."""
        if tenant:
            check_tenant_id(tenant, "tenant")
        scope = await self._readable(ctx, tenant)
        await self._catalog.reload()
        statuses = {s.issuer: s for s in self._keys.status()}
        views = []
        for trust in self._catalog.issuers():
            visible = trust.tenants if scope is None else trust.tenants & scope
            if not visible or (tenant and tenant not in visible):
                continue
            views.append(self._view(replace(trust, tenants=visible),
                                    status=statuses.get(trust.issuer)))
        return views

    # -- helpers ------------------------------------------------------------------------

    async def _readable(self, ctx: CallContext, tenant: str) -> frozenset[str] | None:
        """The tenants whose trust the caller may read (None: all), as admin
        or auditor; PermissionDenied (audited) with neither, or when it names
        a ``tenant`` outside them."""
        scopes = await self._read_scopes(ctx)
        if any(scope is None for _, scope in scopes):
            return None
        readable = frozenset[str]().union(*(scope or () for _, scope in scopes))
        if tenant and tenant not in readable:
            await self._authz.require(ctx, Ask(scopes[0][0], tenant))
        return readable

    async def _read_scopes(self, ctx: CallContext) -> builtins.list[
            tuple[Role, frozenset[str] | None]]:
        if self._tenants_for is not None:
            identity = ctx.principal.identity
            held = [r for r in (Role.ADMIN, Role.AUDITOR)
                    if self._tenants_for(identity, r) != frozenset()]
            # With neither, asking for admin is the one audited denial.
            return [(r, await self._authz.scope(ctx, r)) for r in held or [Role.ADMIN]]
        try:
            return [(Role.ADMIN, await self._authz.scope(ctx, Role.ADMIN))]
        except PermissionDenied:
            return [(Role.AUDITOR, await self._authz.scope(ctx, Role.AUDITOR))]

    async def _admin_of_all(self, ctx: CallContext, scope: frozenset[str] | None,
                            tenants: Iterable[str]) -> None:
        """Return when the caller administers every one of ``tenants``, else
        raise the (audited) denial for the first it does not."""
        if scope is None:
            return
        for tenant in sorted(set(tenants) - scope):
            await self._authz.require(ctx, Ask(Role.ADMIN, tenant))

    async def _existing(self, issuer: str) -> TrustedIssuer:
        check_text(issuer, "issuer", MAX_TRUST_URL, required=True)
        existing = await self._repo.get(issuer)
        if existing is None:
            raise _not_trusted()
        return existing

    async def _record(self, event_type: str, trust: TrustedIssuer,
                      previous: TrustedIssuer | None, ctx: CallContext,
                      details: dict[str, Any], *, outcome: str = "ok") -> None:
        """One durable event per tenant concerned (so that a tenant's auditor
        finds every change of its trust under its tenant), sharing the
        request id."""
        concerned = trust.tenants | (previous.tenants if previous else frozenset())
        for tenant in sorted(concerned):
            await self._audit.record(AuditEvent(
                event_type=event_type, tenant=tenant, actor=ctx.actor, subject=trust.issuer,
                outcome=outcome, request_id=ctx.request_id,
                details={**details, **ctx.untrusted}))

    def _view(self, trust: TrustedIssuer, *, status: IssuerStatus | None = None,
              created: bool = False) -> TrustView:
        if status is None:
            status = next((s for s in self._keys.status() if s.issuer == trust.issuer),
                          None) or IssuerStatus(issuer=trust.issuer)
        age = int(max(0.0, self._clock.now() - status.fetched_at)) if status.fetched_at else 0
        return TrustView(trust=trust, status=status, age_seconds=age, created=created)


def _describe(trust: TrustedIssuer) -> dict[str, Any]:
    """A trust definition as audit details (JSON; sorted lists)."""
    return {
        "tenants": sorted(trust.tenants), "jwks_uri": trust.jwks_uri,
        "algorithms": sorted(trust.algorithms), "audiences": sorted(trust.audiences),
        "namespace": trust.namespace, "max_stale_s": trust.max_stale_seconds,
    }


def _not_trusted() -> NotFound:
    return NotFound("no such trusted issuer (see `fedtoken trust list`)",
                    reason=ErrorReason.ISSUER_NOT_TRUSTED, field="issuer")


# --- fetch outcomes into the audit trail -------------------------------------------------

_HEALTHY: Final = frozenset({FetchOutcome.OK, FetchOutcome.NOT_MODIFIED})
REPEAT_EVERY: Final = 300.0
"""While an issuer keeps failing the same way, one audit row per this many seconds."""


class FetchAudit:
    """The ``on_fetch(issuer, outcome, detail)`` callback of the remote JWKS
    cache: every outcome is counted (``counts``, for metrics); audit rows
    (``trust.jwks_fetch``, queued with ``record_soon``) are kept for what an
    investigation needs, not one per routine refresh:

    - a change of an issuer's outcome (the first fetch, healthy -> error,
      error -> stale -> expired, back to healthy, ...); OK and NOT_MODIFIED
      count as the same healthy state;
    - an OK whose ``detail`` differs from the issuer's previous OK (the cache
      describes the installed key set there, e.g. how many keys: a new set);
    - while an issuer stays unhealthy with the same outcome, one row per
      ``repeat_every`` seconds, carrying how many were not recorded.

    The routine refresh (NOT_MODIFIED, or OK with the same key set) of
    healthy issuers, every max-age, is therefore only counted.

    A call never blocks and never raises into the cache: the row is queued
    from a task of its own (``drain`` waits for them), and a full audit
    queue is logged and counted (``dropped``).
    """

    def __init__(self, audit: AuditSink, clock: Clock, *,
                 repeat_every: float = REPEAT_EVERY) -> None:
        self._audit = audit
        self._clock = clock
        self._repeat_every = repeat_every
        self.counts: Counter[tuple[str, str]] = Counter()  # (issuer, outcome) -> fetches
        self.dropped = 0  # rows the audit queue had no room for
        self._last: dict[str, tuple[FetchOutcome, float, int]] = {}  # outcome, at, suppressed
        self._last_ok: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, issuer: str, outcome: FetchOutcome | str, detail: str = "") -> None:
        try:
            outcome = FetchOutcome(outcome)
        except ValueError:
            outcome = FetchOutcome.ERROR  # an outcome this build does not know
        self.counts[(issuer, outcome.value)] += 1
        now = self._clock.now()
        if not self._worth_a_row(issuer, outcome, detail, now):
            return
        _, _, suppressed = self._last.get(issuer, (outcome, now, 0))
        self._last[issuer] = (outcome, now, 0)
        if outcome is FetchOutcome.OK:
            self._last_ok[issuer] = detail
        event = AuditEvent(
            event_type="trust.jwks_fetch", actor="fedtoken:federation", subject=issuer,
            outcome=outcome.value,
            details={"detail": detail[:500], **({"not_recorded": suppressed}
                                                 if suppressed else {})})
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): counted only
        task = loop.create_task(self._queue(event), name="trust-fetch-audit")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _worth_a_row(self, issuer: str, outcome: FetchOutcome, detail: str,
                     now: float) -> bool:
        last = self._last.get(issuer)
        if last is None:
            return True
        previous, at, suppressed = last
        if (previous in _HEALTHY) != (outcome in _HEALTHY) or (
                outcome not in _HEALTHY and outcome is not previous):
            return True
        if outcome is FetchOutcome.OK and self._last_ok.get(issuer) != detail:
            return True
        if outcome not in _HEALTHY and now - at >= self._repeat_every:
            return True
        self._last[issuer] = (previous, at, suppressed + 1)
        return False

    async def _queue(self, event: AuditEvent) -> None:
        try:
            await self._audit.record_soon(event)
        except Exception as exc:  # noqa: BLE001 - the cache must never fail for its audit
            self.dropped += 1
            log.warning("trust.jwks_fetch for %s not audited (%s)", event.subject,
                        type(exc).__name__)

    async def drain(self) -> None:
        """Wait until every row asked for so far is queued."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# --- no remote JWKS cache -----------------------------------------------------------------


class NullTrustedKeys:
    """A ``TrustedKeys`` that fetches nothing: trusted issuers are stored,
    listed and propagated, but their tokens stay unverifiable (``issuer_keys``
    is None, so the engine answers UNTRUSTED_ISSUER or UNKNOWN_KEY). For a
    build without ``fedtoken.federation``."""

    def __init__(self) -> None:
        self.issuers: tuple[TrustedIssuer, ...] = ()

    def configure(self, issuers: Iterable[TrustedIssuer]) -> None:
        self.issuers = tuple(issuers)

    def issuer_keys(self, issuer: str) -> IssuerKeys | None:
        return None

    async def await_kid(self, issuer: str, kid: str, timeout: float) -> bool:
        return False

    async def refresh(self, issuer: str) -> IssuerStatus:
        return IssuerStatus(issuer=issuer, last_outcome=FetchOutcome.ERROR.value,
                            last_error="this build has no remote JWKS cache")

    def status(self) -> builtins.list[IssuerStatus]:
        return []
