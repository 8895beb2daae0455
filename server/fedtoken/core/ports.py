"""Seams between the service layer and the adapters, as Protocols.

The service layer (``fedtoken.service``) and the verification engine depend
on these only. Adapters implement them: the PKCS#11 signer (``hsm``), the
Postgres repositories (``store``), the audit writer (``audit``), the local key
resolver and the in-memory revocation view (``verifier``, ``revocation``).
Unit tests implement them in memory (``tests/unit/fakes.py``).
"""

from __future__ import annotations

import builtins
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from fedtoken.core.audit import ArchivedRow, AuditAnchor, AuditEvent, AuditRecord, ChainReport
from fedtoken.core.authz import Ask, Grant, Role
from fedtoken.core.model import KeyRecord, KeyState, Reason, Tenant, Verdict
from fedtoken.core.trust import IssuerStatus, StoredKeySet, TrustedIssuer

T = TypeVar("T")


# --- time -------------------------------------------------------------------------


class Clock(Protocol):
    """The one source of "now" for every rule (never the database's now())."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


def utc(seconds: float) -> datetime:
    """Unix seconds as the aware datetime the repositories take."""
    return datetime.fromtimestamp(seconds, UTC)


# --- who is calling ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the transport established it.

    ``identity`` is set only by an authenticating boundary (the mTLS
    interceptor fills it with a SPIFFE ID); until then it is empty and the
    caller is only known by its peer address. ``declared`` is whatever name
    the caller typed into metadata: recorded, never trusted.
    """

    identity: str = ""
    peer: str = ""
    declared: str = ""

    @property
    def actor(self) -> str:
        """The audit actor: the verified identity (when there is one) and the
        peer address, as ``identity@peer``. The self-declared name is never
        part of it (see ``CallContext.untrusted``)."""
        if self.identity:
            return f"{self.identity}@{self.peer}" if self.peer else self.identity
        return f"unauthenticated@{self.peer}" if self.peer else "unauthenticated"


SYSTEM = Principal(identity="fedtoken:system")


@dataclass(frozen=True, slots=True)
class CallContext:
    """One service call: who asks, and the request id to correlate logs and audit."""

    principal: Principal = SYSTEM
    request_id: str = ""
    method: str = ""  # the RPC name, for the audit record of a denial

    @property
    def actor(self) -> str:
        return self.principal.actor

    @property
    def untrusted(self) -> dict[str, str]:
        """Audit details for what the caller claimed about itself (recorded,
        never trusted): its self-declared name."""
        return {"declared_caller": self.principal.declared} if self.principal.declared else {}


# --- signing ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    """A key pair just created in the HSM; only public material leaves it."""

    kid: str
    hsm_label: str
    public_jwk: dict[str, Any]
    key_size: int
    alg: str = "RS256"


class Signer(Protocol):
    """Signs with private keys that never leave the HSM."""

    async def sign(self, hsm_label: str, kid: str, inputs: Sequence[bytes]) -> list[bytes]:
        """RS256 (RSASSA-PKCS1-v1_5 with SHA-256) signatures, one per input."""
        ...

    async def generate(self, tenant: str, bits: int) -> GeneratedKey:
        """A new sign-only, non-extractable RSA key pair for ``tenant``."""
        ...

    async def destroy(self, hsm_label: str) -> None:
        """Destroy the key pair (C_DestroyObject); idempotent."""
        ...

    async def destroy_private(self, hsm_label: str) -> None:
        """Destroy only the private half (the key stops signing for good; its
        public key stays in Postgres and the JWKS for the grace); idempotent."""
        ...

    async def key_labels(self) -> list[str]:
        """The labels of every tenant key pair object in the HSM (private or
        public half), for reconciliation."""
        ...

    async def key_attributes(self, hsm_label: str) -> HsmKeyAttributes:
        """The private key's attributes read back from the token now."""
        ...


@dataclass(frozen=True, slots=True)
class HsmKeyAttributes:
    """What the HSM says about a private key object (present=False: none)."""

    present: bool
    sensitive: bool = False
    extractable: bool = False
    sign: bool = False
    decrypt: bool = False
    unwrap: bool = False
    never_extractable: bool = False
    always_sensitive: bool = False


class LeaderLock(Protocol):
    """One leader at a time among replicas (a Postgres advisory lock held on a
    dedicated connection, ``fedtoken.store``). Losing the connection loses
    the lock: ``held`` turns False, and every action re-checks it."""

    async def try_acquire(self) -> bool:
        """Take the lock if free (never waits); True if we hold it now."""
        ...

    @property
    def held(self) -> bool: ...

    async def release(self) -> None: ...


class CheckpointSigner(Protocol):
    """Signs audit checkpoints (``core.checkpoint``) with the HSM's one
    dedicated checkpoint key, never with a tenant key."""

    async def checkpoint_key(self, *, create: bool = True) -> GeneratedKey | None:
        """The checkpoint key (labelled ``CHECKPOINT_LABEL_PREFIX + kid``);
        generated (RSA-2048, sign-only, non-extractable) when there is none and
        ``create``, else None."""
        ...

    async def sign_checkpoint(self, hsm_label: str, kid: str, data: bytes) -> bytes:
        """The RS256 signature of ``data`` by the checkpoint key."""
        ...


class CheckpointJournal(Protocol):
    """Where signed audit checkpoints are kept outside Postgres."""

    @property
    def where(self) -> str:
        """For log messages: the journal's location."""
        ...

    async def last(self) -> str | None:
        """The newest checkpoint line written, if any."""
        ...

    async def append(self, line: str) -> None:
        """Append one checkpoint line, durable before returning."""
        ...

    async def lines(self) -> list[str]:
        """Every checkpoint line written, oldest first."""
        ...

    async def publish_key(self, jwk: dict[str, Any]) -> str:
        """Keep the checkpoint key's public JWK next to the checkpoints; where
        it is (for the log)."""
        ...


# --- verification -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key a verifier may use, scoped to one issuer."""

    kid: str
    tenant: str
    issuer: str
    alg: str
    public_key: RSAPublicKey
    state: KeyState
    # A key of a trusted foreign issuer (fedtoken.federation), not ours.
    foreign: bool = False


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
    # For a foreign issuer (local=False): the local tenants that trust it. A
    # foreign token verifies only in the context of one of them.
    trusted_by: frozenset[str] = frozenset()
    # For a foreign issuer: the audiences its tokens may address (empty: any
    # audience the verifier asks for).
    audiences: frozenset[str] = frozenset()


class KeyResolver(Protocol):
    """Resolves an issuer to its keys. Local tenants and trusted foreign
    issuers plug in here; the engine never looks anywhere else."""

    def issuer_keys(self, issuer: str) -> IssuerKeys | None:
        """The keys of this exact issuer, or None when it is not trusted."""
        ...

    def tenant_of_kid(self, kid: str) -> str | None:
        """The local tenant owning kid, if any (for TENANT_MISMATCH)."""
        ...


class TrustedKeys(Protocol):
    """The remote JWKS cache of the trusted foreign issuers
    (``fedtoken.federation``). ``issuer_keys`` is the KeyResolver half, on
    the hot path, never waiting on the network."""

    def configure(self, issuers: Iterable[TrustedIssuer]) -> None:
        """Replace the set of trusted issuers (new ones start fetching,
        removed ones are forgotten at once)."""
        ...

    def issuer_keys(self, issuer: str) -> IssuerKeys | None:
        """The usable keys of a trusted issuer (local=False); None only when
        it is not trusted. With no key set yet, or past its max staleness,
        ``keys`` is empty (its tokens are UNKNOWN_KEY: fail closed)."""
        ...

    async def await_kid(self, issuer: str, kid: str, timeout: float) -> bool:
        """On an unknown kid: wait (bounded) for the single refetch that the
        cooldown, budget and negative cache allow; True if kid is now known."""
        ...

    async def refresh(self, issuer: str) -> IssuerStatus:
        """Fetch now (operator request), within the issuer's budget."""
        ...

    def status(self) -> list[IssuerStatus]: ...


class KeyTable(Protocol):
    """Where the catalog installs each new snapshot of tenants and keys
    (the local key resolver)."""

    def replace(self, tenants: Iterable[Tenant], keys: Iterable[KeyRecord]) -> None: ...


class RevocationView(Protocol):
    """In-memory revocation state with a freshness watermark."""

    def check(
        self, tenant: str, jti: str, subject: str, issued_at: int, kid: str
    ) -> Reason | None:
        """None when not revoked; REVOKED, KEY_REVOKED, or
        REVOCATION_UNAVAILABLE when the view is too stale to decide."""
        ...


@dataclass(frozen=True, slots=True)
class RevocationEntry:
    """One revocation as the in-memory view holds it (times in Unix seconds)."""

    tenant: str
    kind: str  # "jti" | "subject" | "key"
    value: str
    expires_at: int
    not_before: int = 0  # subjects: tokens issued before this are revoked


class LocalRevocations(Protocol):
    """The part of the in-memory view the service writes: a revocation made
    here is enforced here at once, before any notification comes back."""

    def add(self, entry: RevocationEntry) -> None: ...

    def purge_expired(self) -> int: ...


class Verifier(Protocol):
    """The verification engine as the service uses it."""

    def verify(self, token: str, expect: Any) -> Verdict: ...

    async def verify_batch(self, tokens: Sequence[str], expect: Any) -> list[Verdict]: ...


# --- audit ------------------------------------------------------------------------


class AuditSink(Protocol):
    """Where audit events go. Durable means committed in Postgres or fsync'ed
    to the spill before the call returns; AuditUnavailable otherwise."""

    async def record(self, event: AuditEvent) -> None:
        """Make ``event`` durable before returning."""
        ...

    async def record_with(
        self, event: AuditEvent, write: Callable[[AuditEvent | None], Awaitable[T]]
    ) -> T:
        """Run ``write`` and make ``event`` durable with it: ``write`` receives
        the event when it should append it in its own transaction (atomic with
        the change), or None when the sink records it itself afterwards."""
        ...

    async def record_soon(self, event: AuditEvent) -> None:
        """Queue ``event`` off the request path (waits only for queue room)."""
        ...

    async def record_verifications(
        self, tenant: str, actor: str, request_id: str, verdicts: Sequence[Verdict]
    ) -> None:
        """Queue compact verification entries (waits only for queue room)."""
        ...

    async def record_entries(self, actor: str, groups: Sequence[tuple[str, list[list[Any]]]]
                             ) -> None:
        """Queue verification entries already in the audit row format
        (``fedtoken.audit.rows.VERIFIED_FIELDS``), as (tenant, entries) pairs."""
        ...


# --- persistence ------------------------------------------------------------------


class TenantRepository(Protocol):
    async def create(self, tenant: Tenant, *, now: datetime) -> Tenant: ...

    async def get(self, tenant_id: str) -> Tenant | None: ...

    async def list(self) -> list[Tenant]: ...


class KeyRepository(Protocol):
    async def insert(self, key: KeyRecord) -> KeyRecord: ...

    async def list(self, tenant_id: str | None = None) -> list[KeyRecord]: ...

    async def get(self, kid: str) -> KeyRecord | None: ...

    async def set_state(
        self, kid: str, state: KeyState, *, expected: Iterable[KeyState], now: datetime
    ) -> KeyRecord: ...

    async def activate(self, tenant_id: str, kid: str, *, now: datetime) -> KeyRecord: ...

    async def mark_private_destroyed(self, kid: str, *, now: datetime) -> KeyRecord:
        """Record that the key's private half is gone from the HSM (refused
        for a key that may still sign)."""
        ...


class RevocationRepository(Protocol):
    async def revoke(
        self,
        tenant_id: str,
        kind: str,
        value: str,
        *,
        expires_at: datetime,
        now: datetime,
        not_before: datetime | None = None,
        reason: str = "",
        actor: str = "",
        audit: AuditEvent | None = None,
    ) -> tuple[bool, datetime]: ...

    async def is_revoked(
        self, tenant_id: str, jti: str, subject: str, issued_at: int, kid: str, *, now: datetime
    ) -> bool: ...

    def iter_active(
        self, now: datetime, *, chunk: int = 20_000
    ) -> AsyncIterator[list[tuple[str, str, str, int, int]]]: ...

    async def purge_expired(self, now: datetime) -> int: ...


class AuditLog(Protocol):
    async def list(
        self,
        *,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        event_type: str | None = None,
        subject: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]: ...

    async def newest(self) -> AuditRecord | None:
        """The row with the highest seq (None: the chain is empty)."""
        ...

    async def verify_chain(self) -> ChainReport: ...

    async def anchor(self) -> AuditAnchor | None:
        """Where the retained chain starts (None: nothing was ever removed)."""
        ...

    async def retention_floor(self) -> int:
        """The database's least age (seconds) of a row retention may remove."""
        ...

    async def at(self, seq: int) -> AuditRecord | None:
        """The row with exactly this seq, if still there."""
        ...

    async def newest_before(self, until: datetime) -> AuditRecord | None:
        """The newest row older than ``until``."""
        ...

    def export(self, after: int, upto: int) -> AsyncIterator[builtins.list[ArchivedRow]]:
        """Rows ``after < seq <= upto`` in order, in pages, with their hash input."""
        ...

    async def prune(self, upto: int, upto_hash: bytes, *, checkpoint: str, archive: str,
                    actor: str) -> int:
        """Remove the archived rows up to ``upto`` (pinned by ``checkpoint``)."""
        ...


class AuditArchive(Protocol):
    """Where retention writes the rows it removes (files an operator archives)."""

    @property
    def where(self) -> str: ...

    async def write(self, name: str, header: str,
                    rows: AsyncIterator[list[ArchivedRow]]) -> str:
        """Write header and rows as one archive, durable (and complete, or not
        there at all) before returning its location."""
        ...

    async def discard_after(self, seq: int) -> list[str]:
        """Remove the archives that start after row ``seq``: written by a round
        whose prune did not happen (the rows are still in Postgres and will be
        archived again), they would overlap the next archive. Their names."""
        ...


class TrustRepository(Protocol):
    """Trusted foreign issuers (Postgres ``trusted_issuers``)."""

    async def put(self, trust: TrustedIssuer, *, now: datetime) -> TrustedIssuer: ...

    async def get(self, issuer: str) -> TrustedIssuer | None: ...

    async def list(self) -> list[TrustedIssuer]: ...

    async def remove(self, issuer: str) -> bool: ...


class KeySetStore(Protocol):
    """The last good key set of each trusted issuer (Postgres
    ``trusted_key_sets``)."""

    async def load_key_sets(self) -> list[StoredKeySet]: ...

    async def save_key_set(self, key_set: StoredKeySet) -> None: ...


class CallerRepository(Protocol):
    """Grants of roles to workload identities."""

    async def put(self, grant: Grant, *, now: datetime) -> Grant: ...

    async def remove(self, identity: str, role: Role | None) -> int: ...

    async def list(self) -> list[Grant]: ...


class Authorizer(Protocol):
    """Deny by default: may this call's principal do what it asks?"""

    async def require(self, ctx: CallContext, ask: Ask) -> None:
        """Return, or raise PermissionDenied (and audit the denial)."""
        ...

    async def scope(self, ctx: CallContext, role: Role) -> frozenset[str] | None:
        """The tenants the principal holds ``role`` for (None: all);
        PermissionDenied (audited) when it holds it for none."""
        ...


class Store(Protocol):
    """The repositories, over a pool or (inside ``transaction()``) one connection."""

    @property
    def tenants(self) -> TenantRepository: ...

    @property
    def keys(self) -> KeyRepository: ...

    @property
    def revocations(self) -> RevocationRepository: ...

    @property
    def audit(self) -> AuditLog: ...

    def transaction(self) -> AbstractAsyncContextManager[Store]: ...

    def advisory_lock(self, key: int) -> AbstractAsyncContextManager[None]: ...
