"""The catalog: this replica's one snapshot of tenants and keys.

It is the only place that reloads tenants and keys from the store and the
only writer of the key table the verifier reads (``KeyTable.replace``). A
reload is triggered by a change made here (the use case awaits it, so the
caller reads its own write), by a change notified from another replica
(``notice``), or by the periodic resync of the event feed.

One change causes one reload per replica: reloads are coalesced (callers
that ask while one is running share the next one), and a notification that
the snapshot already reflects (the replica that made the change reloaded
before the notification came back) causes none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtoken.core.errors import NoActiveKey, TenantNotFound
from fedtoken.core.jwks import etag as jwks_etag
from fedtoken.core.jwks import render_jwks
from fedtoken.core.model import KeyRecord, KeyState, Tenant
from fedtoken.core.policy import is_tenant_id
from fedtoken.core.ports import KeyTable, Store
from fedtoken.core.rotation import Timings
from fedtoken.service._reload import CoalescedReload
from fedtoken.service.types import KeySet


@dataclass(frozen=True, slots=True)
class _Snapshot:
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    keys: Mapping[str, tuple[KeyRecord, ...]] = field(default_factory=dict)
    states: Mapping[str, KeyState] = field(default_factory=dict)


class Catalog:
    def __init__(self, store: Store, table: KeyTable, *, default_tenant: str,
                 jwks_max_age: int, timings: Timings | None = None) -> None:
        self._store = store
        self._table = table
        self._default = default_tenant
        self._max_age = jwks_max_age
        # With timings, each tenant's JWKS max-age is derived from its
        # rotation schedule (never longer than jwks_max_age, and short enough
        # that a cache refetches before the next key signs).
        self._timings = timings
        self._snap = _Snapshot()
        self._key_sets: dict[str, KeySet] = {}
        self._reloader = CoalescedReload(self._load, name="catalog", what="tenants and keys")

    # -- reading ---------------------------------------------------------------

    @property
    def default_tenant(self) -> str:
        return self._default

    def tenants(self) -> list[Tenant]:
        return sorted(self._snap.tenants.values(), key=lambda t: t.id)

    def keys_of(self, tenant_id: str) -> tuple[KeyRecord, ...]:
        return self._snap.keys.get(tenant_id, ())

    def find(self, tenant_id: str) -> Tenant | None:
        """The tenant if this snapshot has it (no store access)."""
        return self._snap.tenants.get(tenant_id or self._default)

    async def tenant(self, tenant_id: str) -> Tenant:
        """The named (or default) tenant; TenantNotFound if it does not exist.

        Another replica may have created it a moment ago, before its
        notification arrived. Names reach here from unauthenticated HTTP
        routes, so a miss costs at most one primary-key lookup; only a tenant
        that really exists triggers a reload.
        """
        tid = tenant_id or self._default
        tenant = self._snap.tenants.get(tid)
        if tenant is None and is_tenant_id(tid) and await self._store.tenants.get(tid):
            await self.reload()
            tenant = self._snap.tenants.get(tid)
        if tenant is None:
            # The name is not echoed: it is unvalidated caller input.
            raise TenantNotFound("tenant does not exist", tenant=tid if is_tenant_id(tid) else "")
        return tenant

    def active_key(self, tenant: Tenant) -> KeyRecord:
        for key in self._snap.keys.get(tenant.id, ()):
            if key.state is KeyState.ACTIVE:
                return key
        raise NoActiveKey(
            f"tenant {tenant.id!r} has no active signing key; generate and activate one "
            "(fedtoken keys generate --activate)",
            tenant=tenant.id,
        )

    async def key_set(self, tenant_id: str) -> KeySet:
        """The tenant's published keys as a JWKS, rendered once per snapshot.

        The ETag is derived from the body alone, so it stays the same while
        the set of published keys does (a change of state among published
        keys, PENDING -> ACTIVE -> RETIRING, does not change the body)."""
        tenant = await self.tenant(tenant_id)
        cached = self._key_sets.get(tenant.id)
        if cached is not None:
            return cached
        records = tuple(k for k in self._snap.keys.get(tenant.id, ()) if k.state.published)
        body = render_jwks(list(records))
        key_set = KeySet(tenant, body, jwks_etag(body), self.max_age_of(tenant), records)
        self._key_sets[tenant.id] = key_set
        return key_set

    def max_age_of(self, tenant: Tenant) -> int:
        """The Cache-Control max-age of the tenant's JWKS (core.rotation)."""
        if self._timings is None:
            return self._max_age
        p = tenant.policy
        return self._timings.of(p.rotation_period_seconds,
                                p.max_token_lifetime_seconds).jwks_max_age

    # -- reloading -------------------------------------------------------------

    @property
    def reloads(self) -> int:
        """How many reloads ran (observability and tests)."""
        return self._reloader.loads

    async def reload(self) -> None:
        """Load tenants and keys; returns once a load that began after this
        call was made has been installed."""
        await self._reloader.run()

    async def _load(self) -> None:
        tenants = await self._store.tenants.list()
        keys = await self._store.keys.list(None)
        self._install(tenants, keys)

    def _install(self, tenants: list[Tenant], keys: list[KeyRecord]) -> None:
        by_tenant: dict[str, list[KeyRecord]] = {t.id: [] for t in tenants}
        for key in keys:
            by_tenant.setdefault(key.tenant, []).append(key)
        # The verifier first, so that nothing signs with a key it cannot check.
        self._table.replace(tenants, keys)
        self._snap = _Snapshot(
            tenants={t.id: t for t in tenants},
            keys={tid: tuple(ks) for tid, ks in by_tenant.items()},
            states={k.kid: k.state for k in keys},
        )
        self._key_sets = {}

    def reflects(self, event: Mapping[str, Any]) -> bool:
        """Whether the snapshot already shows what a notification says."""
        kind = event.get("type")
        if kind == "keys":
            kid = event.get("kid")
            return isinstance(kid, str) and self._snap.states.get(kid) is not None \
                and self._snap.states[kid].value == event.get("state")
        if kind == "tenant":
            # The payload carries the row, so an edit (even by psql) of a
            # known tenant's issuer or policy is told apart from its creation.
            tenant = self._snap.tenants.get(str(event.get("tenant")))
            if tenant is None:
                return False
            p = tenant.policy
            algs = event.get("allowed_algorithms")
            return (event.get("issuer"), event.get("max_token_lifetime_s"),
                    event.get("default_token_lifetime_s"), event.get("key_size"),
                    tuple(algs) if isinstance(algs, list) else algs,
                    event.get("rotation_period_s", p.rotation_period_seconds)) == (
                tenant.issuer, p.max_token_lifetime_seconds, p.default_token_lifetime_seconds,
                p.key_size, tuple(p.allowed_algorithms), p.rotation_period_seconds)
        return True  # not ours to reload for

    def notice(self, event: Mapping[str, Any]) -> None:
        """A tenant or key changed somewhere (feed callback; never blocks)."""
        if not self.reflects(event):
            self._reloader.soon()

    async def close(self) -> None:
        await self._reloader.close()
