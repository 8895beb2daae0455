"""Caller authorization: roles, grants and the one decision function.

Deny by default. A caller is a verified workload identity (a SPIFFE ID); an
operator grants it roles, each optionally limited to tenants (and, for
issuers, to audiences and a maximum token lifetime). ``decide`` is pure: the
service layer asks it before every use case, with what the request wants.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

SPIFFE_PREFIX: Final = "spiffe://"
MAX_SPIFFE_ID: Final = 2048


class Role(enum.Enum):
    ADMIN = "admin"  # KeyAdmin: tenants, keys, callers, trust
    ISSUER = "issuer"  # Issue for named tenants
    VERIFIER = "verifier"  # Verify, VerifyBatch, Introspect, GetKeys for named tenants
    REVOKER = "revoker"  # Revoke for named tenants
    AUDITOR = "auditor"  # audit listing, chain verification, compliance reports


@dataclass(frozen=True, slots=True)
class Grant:
    """One role for one identity. Empty ``tenants`` means every tenant;
    empty ``audiences`` every audience; ``max_lifetime_seconds`` 0 the
    tenant's own maximum."""

    identity: str
    role: Role
    tenants: frozenset[str] = frozenset()
    audiences: frozenset[str] = frozenset()
    max_lifetime_seconds: int = 0
    created_at: int = 0
    granted_by: str = ""


class Denial(enum.Enum):
    """Why a call was refused (the audit records it; the caller gets the reason)."""

    NO_IDENTITY = "NO_IDENTITY"
    NO_GRANT = "NO_GRANT"
    TENANT_NOT_GRANTED = "TENANT_NOT_GRANTED"
    AUDIENCE_NOT_GRANTED = "AUDIENCE_NOT_GRANTED"
    LIFETIME_NOT_GRANTED = "LIFETIME_NOT_GRANTED"


@dataclass(frozen=True, slots=True)
class Ask:
    """What a call wants: a role, for a tenant (resolved id; "" = any/none),
    with the audiences and lifetime an Issue would give its token."""

    role: Role
    tenant: str = ""
    audiences: Sequence[str] = ()
    lifetime_seconds: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    """Every grant, by identity; ``admins`` are bootstrap admins from the
    configuration (always admin, never stored)."""

    grants: Mapping[str, tuple[Grant, ...]] = field(default_factory=dict)
    admins: frozenset[str] = frozenset()

    @classmethod
    def of(cls, grants: Iterable[Grant], admins: Iterable[str] = ()) -> Policy:
        by_id: dict[str, list[Grant]] = {}
        for g in grants:
            by_id.setdefault(g.identity, []).append(g)
        return cls({k: tuple(v) for k, v in by_id.items()}, frozenset(admins))

    def roles_of(self, identity: str) -> tuple[Grant, ...]:
        return self.grants.get(identity, ())

    def tenants_for(self, identity: str, role: Role) -> frozenset[str] | None:
        """The tenants ``identity`` holds ``role`` for; None means all."""
        if role is Role.ADMIN and identity in self.admins:
            return None
        found: set[str] = set()
        for g in self.grants.get(identity, ()):
            if g.role is role:
                if not g.tenants:
                    return None
                found |= g.tenants
        return frozenset(found)


def decide(policy: Policy, identity: str, ask: Ask) -> Denial | None:
    """None when ``identity`` may do ``ask``; else the first reason it may not."""
    if not identity:
        return Denial.NO_IDENTITY
    if ask.role is Role.ADMIN and identity in policy.admins:
        return None
    grants = [g for g in policy.grants.get(identity, ()) if g.role is ask.role]
    if not grants:
        return Denial.NO_GRANT
    in_tenant = [g for g in grants if not g.tenants or ask.tenant in g.tenants]
    if not in_tenant:
        return Denial.TENANT_NOT_GRANTED
    if ask.role is not Role.ISSUER:
        return None
    # Issue: one grant must cover every audience and the lifetime at once.
    denial = Denial.AUDIENCE_NOT_GRANTED
    for g in in_tenant:
        if g.audiences and not set(ask.audiences) <= g.audiences:
            continue
        if g.max_lifetime_seconds and ask.lifetime_seconds > g.max_lifetime_seconds:
            denial = Denial.LIFETIME_NOT_GRANTED
            continue
        return None
    return denial


_DOMAIN_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def is_spiffe_id(value: str) -> bool:
    """A SPIFFE ID as the SPIFFE standard defines it: ``spiffe://`` + a
    lowercase trust domain + an optional path of non-empty segments of
    letters, digits, ``.``, ``-``, ``_`` (no ``.`` or ``..`` segment, no
    query, fragment, port, user info or percent-encoding)."""
    if not value.startswith(SPIFFE_PREFIX) or len(value) > MAX_SPIFFE_ID:
        return False
    domain, slash, path = value[len(SPIFFE_PREFIX):].partition("/")
    if not domain or not set(domain) <= _DOMAIN_CHARS:
        return False
    if not slash:
        return True
    segments = path.split("/")
    return all(s and s not in (".", "..") and set(s) <= _PATH_CHARS for s in segments)
