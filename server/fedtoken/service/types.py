"""What the use cases take and return: plain frozen dataclasses, no proto."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedtoken.core.model import KeyRecord, Reason, Tenant


@dataclass(frozen=True, slots=True)
class IssueParams:
    tenant: str
    subject: str
    audience: Sequence[str]
    lifetime_seconds: int = 0
    extra_claims_json: str = ""
    scope: str = ""
    client_id: str = ""


@dataclass(frozen=True, slots=True)
class Issued:
    token: str
    jti: str
    kid: str
    tenant: str
    issuer: str
    issued_at: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class RevokeParams:
    """Exactly one of token, jti, subject or kid names what to revoke."""

    tenant: str = ""
    token: str = ""
    jti: str = ""
    subject: str = ""
    issued_before: int = 0
    kid: str = ""
    expires_at: int = 0
    reason: str = ""
    # Federation: jti or subject is this trusted foreign issuer's.
    issuer: str = ""


@dataclass(frozen=True, slots=True)
class ExchangeParams:
    subject_token: str
    tenant: str
    audience: Sequence[str]
    subject_token_type: str = ""
    lifetime_seconds: int = 0
    scope: str = ""


@dataclass(frozen=True, slots=True)
class Exchanged:
    issued: Issued
    subject: str


@dataclass(frozen=True, slots=True)
class Revoked:
    tenant: str
    jti: str
    revoked_at: int
    created: bool
    kind: str = "jti"
    value: str = ""


@dataclass(frozen=True, slots=True)
class Introspection:
    active: bool
    reason: Reason
    claims: dict[str, Any] = field(default_factory=dict)
    tenant: str = ""
    kid: str = ""


@dataclass(frozen=True, slots=True)
class KeySet:
    """A tenant's published keys, rendered once per catalog snapshot."""

    tenant: Tenant
    jwks_json: bytes
    etag: str
    max_age: int
    keys: tuple[KeyRecord, ...]

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(sorted({k.alg for k in self.keys} or {"RS256"}))


@dataclass(frozen=True, slots=True)
class NewTenant:
    """CreateTenant's request; zero values take the documented defaults."""

    id: str
    issuer: str = ""
    max_token_lifetime_seconds: int = 0
    default_token_lifetime_seconds: int = 0
    allowed_algorithms: tuple[str, ...] = ()
    key_size: int = 0
    generate_key: bool = False
    rotation_period_seconds: int = 0


@dataclass(frozen=True, slots=True)
class TenantUpdate:
    """UpdateTenant's request; 0 leaves a field unchanged."""

    id: str
    rotation_period_seconds: int = 0
    max_token_lifetime_seconds: int = 0
    default_token_lifetime_seconds: int = 0


@dataclass(frozen=True, slots=True)
class AuditQuery:
    tenant: str = ""
    event_type: str = ""
    subject: str = ""
    since: int = 0
    until: int = 0
    after_seq: int = 0
    page_size: int = 100
