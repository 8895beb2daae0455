"""Plain data of the core: verdict reasons, key states, tenants, keys, verdicts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Reason(enum.Enum):
    """Why a token is valid or not; names equal ``fedtoken.v1.Reason``."""

    OK = "OK"
    MALFORMED = "MALFORMED"
    UNSUPPORTED_ALGORITHM = "UNSUPPORTED_ALGORITHM"
    UNSUPPORTED_HEADER = "UNSUPPORTED_HEADER"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    ISSUED_IN_FUTURE = "ISSUED_IN_FUTURE"
    MISSING_CLAIM = "MISSING_CLAIM"
    INVALID_CLAIM = "INVALID_CLAIM"
    ISSUER_MISMATCH = "ISSUER_MISMATCH"
    AUDIENCE_MISMATCH = "AUDIENCE_MISMATCH"
    TENANT_MISMATCH = "TENANT_MISMATCH"
    REVOKED = "REVOKED"
    KEY_REVOKED = "KEY_REVOKED"
    KEY_INACTIVE = "KEY_INACTIVE"
    UNTRUSTED_ISSUER = "UNTRUSTED_ISSUER"
    REVOCATION_UNAVAILABLE = "REVOCATION_UNAVAILABLE"


class KeyState(enum.Enum):
    """Lifecycle of a signing key; names equal ``fedtoken.v1.KeyState``.

    pending -> active -> retiring -> retired -> destroyed; any -> compromised.
    """

    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    RETIRING = "RETIRING"
    RETIRED = "RETIRED"
    DESTROYED = "DESTROYED"
    COMPROMISED = "COMPROMISED"

    @property
    def published(self) -> bool:
        """Whether the key appears in the JWKS and verifies tokens."""
        return self in (KeyState.PENDING, KeyState.ACTIVE, KeyState.RETIRING)

    @property
    def signs(self) -> bool:
        return self is KeyState.ACTIVE


# Algorithms fedtoken can ever verify. Symmetric algorithms and "none" are not
# here and can never be added by configuration (RFC 8725 section 3.1).
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
# Algorithms the HSM adapter signs with.
SIGNING_ALGORITHMS: frozenset[str] = frozenset({"RS256"})
# RSA modulus bounds, for keys we generate and keys we trust (one copy).
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """Limits a tenant's tokens live by."""

    max_token_lifetime_seconds: int = 3600
    default_token_lifetime_seconds: int = 900
    allowed_algorithms: tuple[str, ...] = ("RS256",)
    key_size: int = 2048
    # A new signing key every this many seconds (fedtoken.core.rotation;
    # 30 days). The other timings of the schedule are derived from it.
    rotation_period_seconds: int = 30 * 86_400
    # Unix seconds by which every token issued under an earlier, longer
    # max_token_lifetime has expired (0: none): lowering the lifetime must not
    # shorten the publication of keys that signed such tokens.
    earlier_tokens_expire_by: int = 0


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    issuer: str
    policy: TenantPolicy = field(default_factory=TenantPolicy)
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """Metadata of one key pair as the store keeps it (no private material)."""

    kid: str
    tenant: str
    alg: str
    key_size: int
    state: KeyState
    public_jwk: dict[str, Any]
    hsm_label: str
    created_at: int = 0
    activated_at: int = 0
    retiring_at: int = 0
    retired_at: int = 0
    compromised_at: int = 0
    # When the private half was destroyed in the HSM (0: it may still exist).
    private_destroyed_at: int = 0


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the caller of Verify expects of a token."""

    audience: str
    issuer: str = ""
    tenant: str = ""
    # Introspection (RFC 7662) reports aud to the caller instead of checking it.
    check_audience: bool = True


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking one token. Data, not an exception."""

    valid: bool
    reason: Reason
    tenant: str = ""
    issuer: str = ""
    kid: str = ""
    subject: str = ""
    jti: str = ""
    expires_at: int = 0
    claims_json: bytes = b""
    # Parsed claims of a valid token (not sent over the wire; claims_json is).
    claims: dict[str, Any] | None = None
    # Issued by a trusted foreign issuer (federation), verified for ``tenant``.
    foreign: bool = False


# Revocations of a foreign issuer's tokens are kept in the trusting tenant
# under "issuer<US>value", so they can never collide with a local jti,
# subject or kid (local strings never hold a control character).
FOREIGN_SEPARATOR = "\x1f"


def foreign_ref(issuer: str, value: str) -> str:
    """The revocation value of a foreign issuer's jti, subject or kid."""
    return f"{issuer}{FOREIGN_SEPARATOR}{value}" if value else ""


@dataclass(slots=True)
class WireBatch:
    """What the native pipeline made of a batch.

    ``out`` holds the serialized ``VerifyBatchResponse.verdicts`` elements of
    the tokens it decided, in order; ``rest`` the indexes of the others, and
    ``cuts`` where the element of each belongs in ``out``; ``verdicts`` are
    their verdicts (from the Python path), in the order of ``rest``.
    ``audit`` holds the decided tokens' audit entries as (tenant, entries).
    """

    out: bytes
    rest: list[int]
    cuts: list[int]
    verdicts: list[Verdict]
    audit: list[tuple[str, list[list[Any]]]]
