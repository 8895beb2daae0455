"""Seams between the core and the adapters, as Protocols.

The verification engine depends on these only; adapters implement them
(local tenants from Postgres, later federated issuers; the in-memory
revocation view; the audit writer; the PKCS#11 signer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from fedtoken.core.model import KeyState, Reason


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        import time

        return time.time()


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key a verifier may use, scoped to one issuer."""

    kid: str
    tenant: str
    issuer: str
    alg: str
    public_key: RSAPublicKey
    state: KeyState


@dataclass(frozen=True, slots=True)
class IssuerKeys:
    """Everything a verifier knows about one issuer's keys.

    ``keys`` holds the published keys (pending, active, retiring) by exact
    kid. ``withdrawn`` maps kids that were published once and no longer
    verify (retired, destroyed, compromised) to their state, so a verdict can
    say KEY_REVOKED or KEY_INACTIVE instead of UNKNOWN_KEY.
    """

    tenant: str
    issuer: str
    allowed_algorithms: frozenset[str]
    keys: dict[str, VerificationKey]
    withdrawn: dict[str, KeyState]
    local: bool = True


class KeyResolver(Protocol):
    """Resolves an issuer to its keys. Local tenants and trusted foreign
    issuers plug in here; the engine never looks anywhere else."""

    def issuer_keys(self, issuer: str) -> IssuerKeys | None:
        """The keys of this exact issuer, or None when it is not trusted."""
        ...

    def tenant_of_kid(self, kid: str) -> str | None:
        """The local tenant owning kid, if any (for TENANT_MISMATCH)."""
        ...


class RevocationView(Protocol):
    """In-memory revocation state with a freshness watermark."""

    def check(
        self, tenant: str, jti: str, subject: str, issued_at: int, kid: str
    ) -> Reason | None:
        """None when not revoked; REVOKED, KEY_REVOKED, or
        REVOCATION_UNAVAILABLE when the view is too stale to decide."""
        ...


class Signer(Protocol):
    """Signs JWS signing inputs with a private key that never leaves the HSM."""

    def sign_many(self, hsm_label: str, kid: str, inputs: Sequence[bytes]) -> list[bytes]:
        """RS256 (RSASSA-PKCS1-v1_5 with SHA-256) signatures, one per input."""
        ...
