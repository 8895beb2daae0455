"""Background and once-only work: first-start bootstrap, the purge of
expired revocations and the signed audit checkpoints. Scheduled key rotation
has a module of its own (``service.rotation``: leader-elected, fenced), which
``fedtoken.app`` starts next to these in worker 0."""

from __future__ import annotations

import asyncio
import logging

from fedtoken.core.errors import FedtokenError
from fedtoken.core.model import KeyState, Tenant, TenantPolicy
from fedtoken.core.ports import CallContext, Clock, LocalRevocations, Principal, Store, utc
from fedtoken.service.catalog import Catalog
from fedtoken.service.checkpoints import ChainRewritten, Checkpoints
from fedtoken.service.keyadmin import KeyAdmin, TenantDefaults
from fedtoken.service.retention import Retention

log = logging.getLogger(__name__)

BOOTSTRAP_LOCK = 0x6665_6474_6F6B  # "fedtok": advisory lock id for first start
BOOTSTRAP = CallContext(Principal(identity="fedtoken:bootstrap"))


class Jobs:
    def __init__(self, *, catalog: Catalog, store: Store, keys: KeyAdmin,
                 revocations: LocalRevocations, clock: Clock, defaults: TenantDefaults) -> None:
        self._catalog = catalog
        self._store = store
        self._keys = keys
        self._revocations = revocations
        self._clock = clock
        self._defaults = defaults

    async def bootstrap(self, default_tenant: str | None) -> None:
        """Load the catalog; with ``default_tenant``, create that tenant and its
        first active key if missing.

        Runs under a Postgres advisory lock so replicas starting together
        create exactly one tenant and one key.
        """
        await self._catalog.reload()
        if not default_tenant:
            return
        async with self._store.advisory_lock(BOOTSTRAP_LOCK):
            await self._catalog.reload()
            tenant = self._catalog.find(default_tenant)
            if tenant is None or tenant.id != default_tenant:
                await self._keys.add_tenant(
                    Tenant(id=default_tenant, issuer=self._defaults.issuer_for(default_tenant),
                           policy=TenantPolicy(key_size=self._defaults.key_size)),
                    BOOTSTRAP,
                )
            if not any(k.state is KeyState.ACTIVE for k in self._catalog.keys_of(default_tenant)):
                await self._keys.replace_key(default_tenant, BOOTSTRAP)

    async def purge_expired(self) -> int:
        """Forget revocations whose tokens have expired anyway (store and memory)."""
        removed = await self._store.revocations.purge_expired(
            utc(self._clock.now()))
        self._revocations.purge_expired()
        return removed

    async def maintain(self, every: float) -> None:
        """Periodic housekeeping; idempotent, so every replica may run it."""
        while True:
            await asyncio.sleep(every)
            try:
                removed = await self.purge_expired()
            except FedtokenError as exc:
                log.warning("revocation purge skipped: %s", exc.reason.value)
                continue
            if removed:
                log.info("purged %d expired revocations", removed)

    async def checkpoint_audit(self, checkpoints: Checkpoints, every: float,
                               retention: Retention | None = None,
                               retention_every: float = 3600.0) -> None:
        """Sign the audit chain's head every ``every`` seconds
        (``service.checkpoints``) and, every ``retention_every`` seconds,
        archive and remove what retention allows (``service.retention``).
        A failed round is logged and tried again the next period; the loop
        never ends on its own."""
        next_retention = self._clock.now() + min(every, retention_every)
        while True:
            await asyncio.sleep(every)
            if retention is not None and self._clock.now() >= next_retention:
                next_retention = self._clock.now() + retention_every
                await self._prune(retention)
            try:
                await checkpoints.checkpoint()
            except FedtokenError as exc:
                # A rewritten chain is an alarm; an unavailable store or HSM is not.
                level = logging.ERROR if isinstance(exc, ChainRewritten) else logging.WARNING
                log.log(level, "audit checkpoint not signed (%s): %s", exc.reason.value,
                        exc.message)
            except Exception:  # a bug must not end the job either
                log.exception("audit checkpoint failed; trying again in %.0f s", every)

    @staticmethod
    async def _prune(retention: Retention) -> None:
        try:
            await retention.prune_once()
        except FedtokenError as exc:
            level = logging.ERROR if isinstance(exc, ChainRewritten) else logging.WARNING
            log.log(level, "audit retention skipped (%s): %s", exc.reason.value, exc.message)
        except OSError as exc:
            log.error("audit retention could not write its archive (%s); nothing was removed",
                      exc)
        except Exception:
            log.exception("audit retention failed; nothing more is removed this round")
