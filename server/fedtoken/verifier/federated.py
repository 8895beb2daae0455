"""Key resolution across our tenants and the trusted foreign issuers: a
token's ``iss`` is looked up among the local tenants first, then among the
issuers a tenant trusts (``fedtoken.federation``). An issuer is never both:
trusting one of our own issuers is refused when trust is added."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtoken.core.ports import IssuerKeys, KeyResolver, TrustedKeys

if TYPE_CHECKING:
    pass

__all__ = ["FederatedResolver"]


class FederatedResolver:
    """Implements ``KeyResolver`` over the local resolver and the remote
    JWKS cache (both read lock-free snapshots, so this may run on any
    verify thread)."""

    def __init__(self, local: KeyResolver, trusted: TrustedKeys) -> None:
        self._local = local
        self._trusted = trusted

    def issuer_keys(self, issuer: str) -> IssuerKeys | None:
        keys = self._local.issuer_keys(issuer)
        if keys is not None:
            return keys
        return self._trusted.issuer_keys(issuer)

    def tenant_of_kid(self, kid: str) -> str | None:
        return self._local.tenant_of_kid(kid)


if TYPE_CHECKING:

    def _implements(resolver: FederatedResolver) -> KeyResolver:
        return resolver
