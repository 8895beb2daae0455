"""Federation trust: which foreign issuers a tenant trusts, and what we know
about their key sets. Plain data; the rules live in ``validate_*`` functions
here (pure) and the fetching in ``fedtoken.federation`` (adapter)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

# Algorithms a trusted issuer may be allowed (RFC 8725: never HS* or none).
FEDERATION_ALGORITHMS: Final = frozenset({"RS256", "PS256"})
DEFAULT_ALGORITHMS: Final = frozenset({"RS256"})
DEFAULT_MAX_STALE_SECONDS: Final = 24 * 3600


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """One foreign issuer and the local tenants that trust it.

    ``issuer`` is matched exactly against a token's ``iss`` and against the
    ``issuer`` of its discovery document. ``jwks_uri`` empty means: discover
    it at ``issuer + "/.well-known/openid-configuration"``. ``audiences``
    empty means any audience the verifier asks for; otherwise a token must
    address one of them. ``namespace`` prefixes the foreign subject in token
    exchange so it never collides with a local subject.
    """

    issuer: str
    tenants: frozenset[str]
    jwks_uri: str = ""
    algorithms: frozenset[str] = DEFAULT_ALGORITHMS
    audiences: frozenset[str] = frozenset()
    namespace: str = ""
    max_stale_seconds: int = DEFAULT_MAX_STALE_SECONDS
    created_at: int = 0
    updated_at: int = 0
    added_by: str = ""


@dataclass(frozen=True, slots=True)
class StoredKeySet:
    """The last good key set of an issuer, as fetched (persisted so that a
    restart during the issuer's outage still verifies, within max staleness)."""

    issuer: str
    jwks_uri: str
    body: bytes
    etag: str = ""
    fetched_at: float = 0.0  # when this body was last confirmed (200 or 304)


class FetchOutcome(enum.Enum):
    """The result of one JWKS fetch, for the audit trail and the metrics."""

    OK = "ok"
    NOT_MODIFIED = "not_modified"
    ERROR = "error"  # unreachable, timeout, non-2xx, too slow, redirect refused
    REJECTED = "rejected"  # a document that fails validation: never installed
    STALE = "stale"  # serving the last good set past its freshness
    EXPIRED = "expired"  # past max staleness: the issuer's tokens fail closed


@dataclass(frozen=True, slots=True)
class IssuerStatus:
    """What ``fedtoken trust list`` shows about one issuer's key set."""

    issuer: str
    kids: tuple[str, ...] = ()
    fetched_at: float = 0.0  # 0: never fetched
    next_refresh_at: float = 0.0
    serving_stale: bool = False
    usable: bool = False  # False: its tokens are refused (never fetched, or too stale)
    last_outcome: str = ""
    last_error: str = ""
    fetches: int = 0
    extra: dict[str, str] = field(default_factory=dict)
