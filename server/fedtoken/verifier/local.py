"""Key resolution for the local tenants.

Readers run on verify threads while the event loop reloads keys, so the
resolver's whole state is one immutable snapshot replaced by a single
attribute assignment (atomic in CPython): a reader sees the old state or the
new one, never a mix.

A reload keeps the ``VerificationKey`` object of every key whose record did
not change, so the engine's native table (which remembers keys by identity)
stays valid across reloads; only a changed key is learned again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedtoken.core.errors import PolicyViolation
from fedtoken.core.keys import load_rsa_public_key
from fedtoken.core.model import ASYMMETRIC_ALGORITHMS, KeyRecord, KeyState, Tenant
from fedtoken.core.ports import IssuerKeys, VerificationKey

if TYPE_CHECKING:
    from fedtoken.core.ports import KeyResolver, KeyTable

__all__ = ["LocalKeyResolver"]

log = logging.getLogger(__name__)

# A loaded key is reused while its record names the same kid, n and e.
_KeyIdentity = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    by_issuer: Mapping[str, IssuerKeys] = field(default_factory=dict)
    owner_of_kid: Mapping[str, str] = field(default_factory=dict)
    loaded: Mapping[_KeyIdentity, VerificationKey] = field(default_factory=dict)


class LocalKeyResolver:
    """Implements ``KeyResolver`` for the tenants this service signs for, and
    ``KeyTable``: the catalog installs each new snapshot with ``replace``."""

    def __init__(self) -> None:
        self._snapshot = _Snapshot()

    def issuer_keys(self, issuer: str) -> IssuerKeys | None:
        return self._snapshot.by_issuer.get(issuer)

    def tenant_of_kid(self, kid: str) -> str | None:
        return self._snapshot.owner_of_kid.get(kid)

    def replace(self, tenants: Iterable[Tenant], keys: Iterable[KeyRecord]) -> None:
        """Swap in the complete set of tenants and key records.

        Keys already loaded by an earlier call are reused (loading costs far
        more than a lookup, and replace runs on every key change): the same
        RSA key object while the record names the same kid, n and e, and the
        same VerificationKey object while its tenant, issuer, alg and state
        are unchanged too.

        Raises PolicyViolation, keeping the previous state, when two tenants
        share an issuer or two records share a kid: either would let one
        tenant's key speak for another, so it must stop the reload rather
        than be guessed around. A single key whose JWK breaks the trust-store
        rules is left out (its tokens get UNKNOWN_KEY) and logged, so one bad
        record does not freeze every tenant's keys.
        """
        previous = self._snapshot.loaded
        tenant_by_id: dict[str, Tenant] = {}
        issuers: set[str] = set()
        for t in tenants:
            if t.issuer in issuers:
                raise PolicyViolation(
                    f"issuer {t.issuer!r} is configured for two tenants; "
                    "give each tenant its own issuer",
                    tenant=t.id,
                )
            issuers.add(t.issuer)
            tenant_by_id[t.id] = t

        published: dict[str, dict[str, VerificationKey]] = {t: {} for t in tenant_by_id}
        withdrawn: dict[str, dict[str, KeyState]] = {t: {} for t in tenant_by_id}
        owner_of_kid: dict[str, str] = {}
        loaded: dict[_KeyIdentity, VerificationKey] = {}
        for record in keys:
            tenant = tenant_by_id.get(record.tenant)
            if tenant is None:
                log.warning("key %s names unknown tenant %r; ignored", record.kid, record.tenant)
                continue
            if record.kid in owner_of_kid:
                raise PolicyViolation(
                    f"kid {record.kid!r} appears twice; key ids must be unique",
                    tenant=record.tenant,
                    kid=record.kid,
                )
            owner_of_kid[record.kid] = record.tenant
            if not record.state.published:
                # A compromised key that was then destroyed still revokes the
                # tokens it signed, so the verdict keeps saying KEY_REVOKED.
                state = KeyState.COMPROMISED if record.compromised_at else record.state
                withdrawn[record.tenant][record.kid] = state
                continue
            key = _load(record, tenant.issuer, previous, loaded)
            if key is not None:
                published[record.tenant][record.kid] = key

        by_issuer = {
            t.issuer: IssuerKeys(
                tenant=t.id,
                issuer=t.issuer,
                allowed_algorithms=frozenset(t.policy.allowed_algorithms) & ASYMMETRIC_ALGORITHMS,
                keys=published[t.id],
                withdrawn=withdrawn[t.id],
                local=True,
            )
            for t in tenant_by_id.values()
        }
        self._snapshot = _Snapshot(by_issuer=by_issuer, owner_of_kid=owner_of_kid, loaded=loaded)


def _load(
    record: KeyRecord,
    issuer: str,
    previous: Mapping[_KeyIdentity, VerificationKey],
    loaded: dict[_KeyIdentity, VerificationKey],
) -> VerificationKey | None:
    n, e = record.public_jwk.get("n"), record.public_jwk.get("e")
    identity = (record.kid, n, e) if type(n) is str and type(e) is str else None
    old = previous.get(identity) if identity is not None else None
    if (
        old is not None
        and old.tenant == record.tenant
        and old.issuer == issuer
        and old.alg == record.alg
        and old.state is record.state
    ):
        key = old
    else:
        if old is not None:
            public_key = old.public_key
        else:
            try:
                public_key = load_rsa_public_key(record.public_jwk)
            except PolicyViolation as exc:
                log.error("key %s of tenant %r is not usable: %s", record.kid, record.tenant, exc)
                return None
        key = VerificationKey(
            kid=record.kid,
            tenant=record.tenant,
            issuer=issuer,
            alg=record.alg,
            public_key=public_key,
            state=record.state,
        )
    if identity is not None:
        loaded[identity] = key
    return key


if TYPE_CHECKING:

    def _implements(resolver: LocalKeyResolver) -> tuple[KeyResolver, KeyTable]:
        return resolver, resolver  # mypy checks both ports
