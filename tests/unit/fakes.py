"""In-memory implementations of the ports in ``fedtoken.core.ports``.

No Postgres, no SoftHSM, no mock library: each fake mirrors the semantics of
the adapter it stands in for (``fedtoken.store``, ``fedtoken.hsm``,
``fedtoken.audit``) closely enough that the service layer can be tested
against it, and offers switches to make it fail:

- ``FakeClock``: a settable "now";
- ``MemorySigner``: real RSA keys (``cryptography``), RS256 signatures, kid =
  RFC 7638 thumbprint; ``fail`` makes every call raise HsmUnavailable;
- ``MemoryStore``: tenants, keys, revocations and a hash-chained audit log,
  with ``transaction()`` (snapshot and restore), ``advisory_lock()``,
  ``unavailable`` (every call raises StoreUnavailable), one-shot ``faults``
  per operation, call counters and a ``load_gate`` to hold catalog loads open;
- ``MemoryAudit``: an ``AuditSink`` in direct mode (events go into the store,
  atomically with the change for ``record_with``) or spill mode (the change
  is written first, the event recorded after it); ``fail`` makes durable
  records raise AuditUnavailable, ``queue_full`` the queued ones.

``build_services`` wires the service layer the way ``fedtoken.app`` does.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import enum
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fedtoken.core import ports
from fedtoken.core.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    ChainProblem,
    ChainReport,
)
from fedtoken.core.authz import Ask, Grant, Role
from fedtoken.core.errors import (
    AlreadyExists,
    AuditUnavailable,
    ErrorReason,
    FailedPrecondition,
    HsmUnavailable,
    InvalidKeyTransition,
    InvalidRequest,
    KeyNotFound,
    StoreUnavailable,
    TenantExists,
    TenantNotFound,
)
from fedtoken.core.jwk import rsa_public_jwk
from fedtoken.core.model import KeyRecord, KeyState, Tenant, TenantPolicy, Verdict
from fedtoken.core.policy import check_key_size
from fedtoken.core.ports import GeneratedKey
from fedtoken.core.rotation import Timings
from fedtoken.core.trust import IssuerStatus, StoredKeySet, TrustedIssuer
from fedtoken.revocation import InMemoryRevocationView
from fedtoken.service import Catalog, Jobs, KeyAdmin, TenantDefaults, Tokens, Verification
from fedtoken.service.callers import Callers
from fedtoken.service.trust import TrustAdmin, TrustCatalog
from fedtoken.verifier import LocalKeyResolver, VerificationEngine

T = TypeVar("T")

NOW = 1_800_000_000
LABEL_PREFIX = "fedtoken/"  # as fedtoken.hsm labels its key pairs
MAX_AUDIT_LIMIT = 10_000  # as fedtoken.store.audit_log
# The CHECK constraint of tenants.id (migrations/0001_init.sql).
_DB_TENANT_ID = re.compile(r"[a-z0-9-]{1,63}\Z")


@cache
def rsa_key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    """One real RSA key per name and size for the whole test run (generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _aware(ts: datetime, name: str) -> datetime:
    if ts.tzinfo is None:
        raise InvalidRequest(f"{name} must carry a time zone", field=name)
    return ts


# --- time -------------------------------------------------------------------------


class MemoryLeaderLock:
    """A ``LeaderLock`` shared by name: ``MemoryLeaderLock(registry)`` per
    replica; ``lose()`` drops it silently (as a lost connection does)."""

    def __init__(self, registry: dict[str, object], name: str = "leader") -> None:
        self._registry = registry
        self._name = name
        self.acquired = 0

    @property
    def held(self) -> bool:
        return self._registry.get(self._name) is self

    async def try_acquire(self) -> bool:
        await asyncio.sleep(0)
        if self._registry.get(self._name) is None:
            self._registry[self._name] = self
            self.acquired += 1
        return self.held

    def lose(self) -> None:
        if self.held:
            del self._registry[self._name]

    async def release(self) -> None:
        self.lose()


class FakeClock:
    """A ``Clock`` that says what it is told."""

    def __init__(self, now: float = NOW) -> None:
        self.t = float(now)

    def now(self) -> float:
        return self.t

    def set(self, now: float) -> None:
        self.t = float(now)

    def advance(self, seconds: float) -> None:
        self.t += seconds


# --- signing ----------------------------------------------------------------------


class MemorySigner:
    """A ``Signer`` holding real RSA private keys in a dict (the "HSM").

    Key pairs come from the test run's key cache (``rsa_key``), one new
    pair per ``generate`` of this instance: the keys of two instances repeat,
    so worlds that share a store must share the signer (as replicas share the
    HSM).
    """

    def __init__(self) -> None:
        self.fail = False
        self.keys: dict[str, rsa.RSAPrivateKey] = {}  # hsm_label -> private key
        self.kids: dict[str, str] = {}  # hsm_label -> kid
        self.generated: list[GeneratedKey] = []
        self.signed: list[tuple[str, bytes]] = []  # (kid, signing input) per signature
        self.destroyed: list[str] = []
        self.publics: set[str] = set()  # labels whose public half is still in the "HSM"
        self.private_destroyed: list[str] = []
        self._count = 0

    def _check(self, op: str) -> None:
        if self.fail:
            raise HsmUnavailable(f"{op}: the HSM is unavailable")

    async def generate(self, tenant: str, bits: int) -> GeneratedKey:
        await asyncio.sleep(0)
        self._check("generate")
        check_key_size(bits)
        if not tenant or "/" in tenant or not tenant.isprintable():
            raise InvalidRequest("tenant must be non-empty and printable, without '/'",
                                 field="tenant")
        private = rsa_key(f"memory-signer-{self._count}", bits)
        self._count += 1
        numbers = private.public_key().public_numbers()
        jwk = rsa_public_jwk(numbers.n, numbers.e)
        label = f"{LABEL_PREFIX}{tenant}/{jwk['kid']}"
        self.keys[label] = private
        self.kids[label] = jwk["kid"]
        self.publics.add(label)
        generated = GeneratedKey(kid=jwk["kid"], hsm_label=label, public_jwk=jwk,
                                 key_size=numbers.n.bit_length())
        self.generated.append(generated)
        return generated

    async def sign(self, hsm_label: str, kid: str, inputs: Sequence[bytes]) -> list[bytes]:
        await asyncio.sleep(0)
        self._check("sign")
        key = self.keys.get(hsm_label)
        if key is None or self.kids.get(hsm_label) != kid:
            # As the PKCS#11 adapter: no other key to fall back to.
            raise HsmUnavailable("sign: no key with this label and kid")
        signatures = []
        for data in inputs:
            signatures.append(key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
            self.signed.append((kid, bytes(data)))
        return signatures

    async def destroy(self, hsm_label: str) -> None:
        await asyncio.sleep(0)
        self._check("destroy")
        had_public = hsm_label in self.publics
        self.publics.discard(hsm_label)
        if self.keys.pop(hsm_label, None) is not None or had_public:
            self.kids.pop(hsm_label, None)
            self.destroyed.append(hsm_label)

    async def destroy_private(self, hsm_label: str) -> None:
        await asyncio.sleep(0)
        self._check("destroy_private")
        if self.keys.pop(hsm_label, None) is not None:
            self.private_destroyed.append(hsm_label)

    async def key_labels(self) -> list[str]:
        await asyncio.sleep(0)
        self._check("key_labels")
        return sorted(set(self.keys) | self.publics)

    async def key_attributes(self, hsm_label: str) -> ports.HsmKeyAttributes:
        await asyncio.sleep(0)
        self._check("key_attributes")
        if hsm_label not in self.keys:
            return ports.HsmKeyAttributes(present=False)
        return ports.HsmKeyAttributes(present=True, sensitive=True, sign=True,
                                      never_extractable=True, always_sensitive=True)


# --- persistence ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RevocationRow:
    tenant: str
    kind: str
    value: str
    expires_at: datetime
    created_at: datetime
    not_before: datetime | None = None
    reason: str = ""
    actor: str = ""


@dataclass
class StoreData:
    """Everything the store holds; copied whole by ``transaction()``."""

    tenants: dict[str, Tenant] = field(default_factory=dict)
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    revocations: dict[tuple[str, str, str], RevocationRow] = field(default_factory=dict)
    audit: list[AuditRecord] = field(default_factory=list)
    head_hash: bytes = GENESIS_HASH
    trusted: dict[str, TrustedIssuer] = field(default_factory=dict)
    key_sets: dict[str, StoredKeySet] = field(default_factory=dict)

    def copy(self) -> StoreData:
        # Rows are frozen dataclasses: copying the containers is a deep copy.
        return StoreData(dict(self.tenants), dict(self.keys), dict(self.revocations),
                         list(self.audit), self.head_hash, dict(self.trusted),
                         dict(self.key_sets))


def _chain_hash(prev: bytes, seq: int, ts: datetime, event: AuditEvent) -> bytes:
    body = json.dumps(
        [seq, ts.isoformat(), event.tenant, event.actor, event.event_type, event.subject,
         event.jti, event.kid, event.outcome, event.reason, event.request_id, event.details],
        sort_keys=True, separators=(",", ":"),
    ).encode()
    return hashlib.sha256(prev + body).digest()


class MemoryStore:
    """A ``Store`` in memory, with the Postgres store's semantics.

    ``calls`` counts every repository call by name (``"tenants.list"``,
    ``"keys.insert"``...). Every call yields to the event loop once, like a
    round trip, so concurrent callers interleave. ``faults[name]`` is raised
    by the next call of that name (then forgotten); ``unavailable`` makes
    every call raise StoreUnavailable. While ``load_gate`` is set to an
    unset event, ``tenants.list`` (the first read of a catalog reload) reads
    the tenants and then waits for it before answering, so a change made
    meanwhile is not in that answer.
    """

    def __init__(self, clock: ports.Clock | None = None) -> None:
        self.clock: ports.Clock = clock or FakeClock()
        self.data = StoreData()
        self.unavailable = False
        self.faults: dict[str, Exception] = {}
        self.calls: Counter[str] = Counter()
        self.load_gate: asyncio.Event | None = None
        self.locks_taken: Counter[int] = Counter()
        self._locks: dict[int, asyncio.Lock] = {}
        self._tenants = MemoryTenants(self)
        self._keys = MemoryKeys(self)
        self._revocations = MemoryRevocations(self)
        self._audit = MemoryAuditLog(self)
        self._trust = MemoryTrust(self)
        self._key_sets = MemoryKeySets(self)

    # -- the Store port ------------------------------------------------------------

    @property
    def tenants(self) -> MemoryTenants:
        return self._tenants

    @property
    def keys(self) -> MemoryKeys:
        return self._keys

    @property
    def revocations(self) -> MemoryRevocations:
        return self._revocations

    @property
    def audit(self) -> MemoryAuditLog:
        return self._audit

    @property
    def trust(self) -> MemoryTrust:
        """Trusted issuers (as ``PgStore.trust``; not part of the Store port)."""
        return self._trust

    @property
    def key_sets(self) -> MemoryKeySets:
        return self._key_sets

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryStore]:
        """Everything done inside commits or rolls back together (a nested
        transaction is a savepoint)."""
        await self.enter("transaction")
        saved = self.data.copy()
        try:
            yield self
        except BaseException:
            self.data = saved
            raise

    @asynccontextmanager
    async def advisory_lock(self, key: int) -> AsyncIterator[None]:
        await self.enter("advisory_lock")
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self.locks_taken[key] += 1
            yield

    # -- helpers for the repositories and the tests --------------------------------

    def check(self, op: str) -> None:
        """Count the call and raise the failure configured for it, if any."""
        self.calls[op] += 1
        if self.unavailable:
            raise StoreUnavailable(f"{op}: database unreachable")
        fault = self.faults.pop(op, None)
        if fault is not None:
            raise fault

    async def enter(self, op: str) -> None:
        await asyncio.sleep(0)
        self.check(op)

    @property
    def loads(self) -> int:
        """Full catalog loads so far (each begins with tenants.list)."""
        return self.calls["tenants.list"]

    def append_event(self, event: AuditEvent) -> AuditRecord:
        """Chain one event (within the caller's atomic step)."""
        self.check("audit.append")
        if not event.event_type:
            raise InvalidRequest("audit event without event_type", field="event_type")
        seq = len(self.data.audit) + 1
        ts = _ts(self.clock.now())
        digest = _chain_hash(self.data.head_hash, seq, ts, event)
        record = AuditRecord(seq=seq, ts=ts, event=event, prev_hash=self.data.head_hash,
                             hash=digest)
        self.data.audit.append(record)
        self.data.head_hash = digest
        return record

    async def append_audit(self, event: AuditEvent) -> AuditRecord:
        """What the audit writer does in direct mode: one committed append."""
        await asyncio.sleep(0)
        return self.append_event(event)

    def events(self, event_type: str | None = None) -> list[AuditEvent]:
        """The events in the audit chain, optionally of one type."""
        return [r.event for r in self.data.audit
                if event_type is None or r.event.event_type == event_type]

    def key_states(self, tenant: str | None = None) -> dict[str, KeyState]:
        return {k.kid: k.state for k in self.data.keys.values()
                if tenant is None or k.tenant == tenant}


class MemoryTenants:
    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    async def create(self, tenant: Tenant, *, now: datetime) -> Tenant:
        await self._s.enter("tenants.create")
        _aware(now, "now")
        if not _DB_TENANT_ID.match(tenant.id) or not tenant.issuer:
            raise InvalidRequest("create tenant: value rejected by the database")
        data = self._s.data
        if tenant.id in data.tenants:
            raise TenantExists("a tenant with this id exists", field="id", tenant=tenant.id)
        if any(t.issuer == tenant.issuer for t in data.tenants.values()):
            raise TenantExists("a tenant with this issuer exists", field="issuer",
                               tenant=tenant.id)
        if tenant.issuer in data.trusted:  # the trigger of migrations/0005_trust.sql
            raise InvalidRequest("create tenant: value rejected by the database")
        created = replace(tenant, created_at=int(now.timestamp()))
        data.tenants[tenant.id] = created
        return created

    async def get(self, tenant_id: str) -> Tenant | None:
        await self._s.enter("tenants.get")
        return self._s.data.tenants.get(tenant_id)

    async def update_policy(self, tenant_id: str, policy: TenantPolicy) -> Tenant:
        await self._s.enter("tenants.update_policy")
        current = self._s.data.tenants.get(tenant_id)
        if current is None:
            raise TenantNotFound("no such tenant", tenant=tenant_id)
        updated = replace(current, policy=policy)
        self._s.data.tenants[tenant_id] = updated
        return updated

    async def list(self) -> builtins.list[Tenant]:
        await self._s.enter("tenants.list")
        tenants = sorted(self._s.data.tenants.values(), key=lambda t: t.id)
        gate = self._s.load_gate
        if gate is not None:  # the rows are read; the answer is held back
            await gate.wait()
        return tenants


_STAMP: dict[KeyState, str] = {
    KeyState.ACTIVE: "activated_at",
    KeyState.RETIRING: "retiring_at",
    KeyState.RETIRED: "retired_at",
    KeyState.COMPROMISED: "compromised_at",
}


class MemoryKeys:
    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    def _second_active(self, tenant: str, kid: str) -> bool:
        return any(k.state is KeyState.ACTIVE and k.tenant == tenant and k.kid != kid
                   for k in self._s.data.keys.values())

    async def insert(self, key: KeyRecord) -> KeyRecord:
        await self._s.enter("keys.insert")
        data = self._s.data
        if key.tenant not in data.tenants:
            raise TenantNotFound("insert key: tenant does not exist")
        if key.kid in data.keys or any(k.hsm_label == key.hsm_label for k in data.keys.values()):
            raise AlreadyExists("a key with this kid or HSM label exists",
                                reason=ErrorReason.INVALID_FIELD, field="kid",
                                tenant=key.tenant, kid=key.kid)
        if key.state is KeyState.ACTIVE and self._second_active(key.tenant, key.kid):
            raise InvalidKeyTransition("the tenant already has an active key",
                                       tenant=key.tenant, kid=key.kid)
        if not key.created_at:
            key = replace(key, created_at=int(self._s.clock.now()))
        data.keys[key.kid] = key
        return key

    async def list(self, tenant_id: str | None = None) -> builtins.list[KeyRecord]:
        await self._s.enter("keys.list")
        keys = [k for k in self._s.data.keys.values()
                if tenant_id is None or k.tenant == tenant_id]
        keys.sort(key=lambda k: k.kid)
        keys.sort(key=lambda k: k.created_at, reverse=True)  # created_at DESC, kid
        return keys

    async def get(self, kid: str) -> KeyRecord | None:
        await self._s.enter("keys.get")
        return self._s.data.keys.get(kid)

    async def set_state(
        self, kid: str, state: KeyState, *, expected: Iterable[KeyState], now: datetime
    ) -> KeyRecord:
        """Compare-and-set, as the Postgres store: no transition rules here."""
        await self._s.enter("keys.set_state")
        _aware(now, "now")
        data = self._s.data
        current = data.keys.get(kid)
        if current is None:
            raise KeyNotFound("no such key", kid=kid)
        if current.state not in set(expected):
            raise InvalidKeyTransition(
                f"key is {current.state.value}, cannot become {state.value}", kid=kid)
        if state is KeyState.ACTIVE and self._second_active(current.tenant, kid):
            raise InvalidKeyTransition("the tenant already has an active key", kid=kid)
        changes: dict[str, Any] = {"state": state}
        if state in _STAMP:
            changes[_STAMP[state]] = int(now.timestamp())
        updated = replace(current, **changes)
        data.keys[kid] = updated
        return updated

    async def mark_private_destroyed(self, kid: str, *, now: datetime) -> KeyRecord:
        """As the Postgres store: the first stamp stays; refused while it may sign."""
        await self._s.enter("keys.mark_private_destroyed")
        current = self._s.data.keys.get(kid)
        if current is None:
            raise KeyNotFound("no such key", kid=kid)
        if current.state in (KeyState.PENDING, KeyState.ACTIVE):
            raise InvalidKeyTransition(
                f"key is {current.state.value}: its private half must exist", kid=kid)
        if not current.private_destroyed_at:
            current = replace(current, private_destroyed_at=int(now.timestamp()))
            self._s.data.keys[kid] = current
        return current

    async def activate(self, tenant_id: str, kid: str, *, now: datetime) -> KeyRecord:
        await self._s.enter("keys.activate")
        _aware(now, "now")
        data = self._s.data
        if tenant_id not in data.tenants:
            raise TenantNotFound("no such tenant", tenant=tenant_id)
        current = data.keys.get(kid)
        if current is None or current.tenant != tenant_id:
            raise KeyNotFound("no such key in this tenant", tenant=tenant_id, kid=kid)
        if current.state is not KeyState.PENDING:
            raise InvalidKeyTransition(
                f"key is {current.state.value}, only a PENDING key can be activated",
                tenant=tenant_id, kid=kid)
        stamp = int(now.timestamp())
        for other in list(data.keys.values()):
            if other.tenant == tenant_id and other.state is KeyState.ACTIVE:
                data.keys[other.kid] = replace(other, state=KeyState.RETIRING,
                                               retiring_at=stamp)
        activated = replace(current, state=KeyState.ACTIVE, activated_at=stamp)
        data.keys[kid] = activated
        return activated


REVOCATION_KINDS = frozenset({"jti", "subject", "key"})


class MemoryRevocations:
    def __init__(self, store: MemoryStore) -> None:
        self._s = store

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
    ) -> tuple[bool, datetime]:
        """Upsert; (changed, revoked_at). Widening expires_at or not_before is
        a change; ``audit`` is appended in the same step, changed or not."""
        await self._s.enter("revocations.revoke")
        if kind not in REVOCATION_KINDS:
            raise InvalidRequest(f"unknown revocation kind {kind!r}", field="kind")
        _aware(expires_at, "expires_at")
        _aware(now, "now")
        if not_before is not None:
            if kind != "subject":
                raise InvalidRequest("not_before applies to subjects only", field="not_before")
            _aware(not_before, "not_before")
        if not 1 <= len(value) <= 1024:
            raise InvalidRequest("revoke: value rejected by the database")
        if tenant_id not in self._s.data.tenants:
            raise TenantNotFound("revoke: tenant does not exist")
        saved = self._s.data.copy()
        try:
            changed, revoked_at = self._upsert(tenant_id, kind, value, expires_at, now,
                                               not_before, reason, actor)
            if audit is not None:
                self._s.append_event(audit)
        except BaseException:
            self._s.data = saved
            raise
        return changed, revoked_at

    def _upsert(self, tenant_id: str, kind: str, value: str, expires_at: datetime,
                now: datetime, not_before: datetime | None, reason: str,
                actor: str) -> tuple[bool, datetime]:
        rows = self._s.data.revocations
        key = (tenant_id, kind, value)
        nb = (not_before or now) if kind == "subject" else None
        existing = rows.get(key)
        if existing is None:
            rows[key] = RevocationRow(tenant_id, kind, value, expires_at, now, nb, reason, actor)
            return True, now
        wider_nb = nb is not None and existing.not_before is not None \
            and nb > existing.not_before
        if expires_at > existing.expires_at or wider_nb:
            kept_nb = existing.not_before
            if nb is not None:
                kept_nb = nb if kept_nb is None else max(nb, kept_nb)
            rows[key] = RevocationRow(tenant_id, kind, value,
                                      max(expires_at, existing.expires_at), now, kept_nb,
                                      reason, actor)
            return True, now
        return False, existing.created_at

    async def is_revoked(
        self, tenant_id: str, jti: str, subject: str, issued_at: int, kid: str, *, now: datetime
    ) -> bool:
        await self._s.enter("revocations.is_revoked")
        _aware(now, "now")
        issued = _ts(issued_at)
        for r in self._s.data.revocations.values():
            if r.tenant != tenant_id or r.expires_at <= now:
                continue
            if (r.kind == "jti" and r.value == jti) or (r.kind == "key" and r.value == kid) \
                    or (r.kind == "subject" and r.value == subject and r.not_before is not None
                        and r.not_before > issued):
                return True
        return False

    async def iter_active(
        self, now: datetime, *, chunk: int = 20_000
    ) -> AsyncIterator[builtins.list[tuple[str, str, str, int, int]]]:
        await self._s.enter("revocations.iter_active")
        _aware(now, "now")
        rows = [
            (r.tenant, r.kind, r.value, math.ceil(r.expires_at.timestamp()),
             math.ceil(r.not_before.timestamp()) if r.not_before is not None else 0)
            for r in self._s.data.revocations.values() if r.expires_at > now
        ]
        for i in range(0, len(rows), chunk):
            yield rows[i:i + chunk]

    async def purge_expired(self, now: datetime) -> int:
        await self._s.enter("revocations.purge_expired")
        _aware(now, "now")
        rows = self._s.data.revocations
        expired = [k for k, r in rows.items() if r.expires_at <= now]
        for k in expired:
            del rows[k]
        return len(expired)

    def rows(self) -> builtins.list[RevocationRow]:
        """For tests: every stored revocation."""
        return list(self._s.data.revocations.values())


class MemoryAuditLog:
    def __init__(self, store: MemoryStore) -> None:
        self._s = store

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
    ) -> builtins.list[AuditRecord]:
        await self._s.enter("audit.list")
        if not 1 <= limit <= MAX_AUDIT_LIMIT:
            raise InvalidRequest(f"limit must be 1..{MAX_AUDIT_LIMIT}", field="limit")
        out = [
            r for r in self._s.data.audit
            if r.seq > after_seq
            and (tenant is None or r.event.tenant == tenant)
            and (since is None or r.ts >= since)
            and (until is None or r.ts < until)
            and (event_type is None or r.event.event_type == event_type)
            and (subject is None or r.event.subject == subject)
        ]
        return out[:limit]

    async def newest(self) -> AuditRecord | None:
        await self._s.enter("audit.newest")
        return self._s.data.audit[-1] if self._s.data.audit else None

    async def anchor(self) -> None:
        """The memory store never removes rows (retention is tested on Postgres)."""
        await self._s.enter("audit.anchor")

    async def verify_chain(self) -> ChainReport:
        await self._s.enter("audit.verify_chain")
        data = self._s.data
        head_seq = len(data.audit)
        prev = GENESIS_HASH
        for i, r in enumerate(data.audit):
            bad: ChainProblem | None = None
            if r.seq != i + 1:
                bad = ChainProblem.GAP
            elif r.hash != _chain_hash(r.prev_hash, r.seq, r.ts, r.event):
                bad = ChainProblem.ALTERED
            elif r.prev_hash != prev:
                bad = ChainProblem.BROKEN_LINK
            if bad is not None:
                return ChainReport(False, i, head_seq, data.head_hash, i + 1, bad)
            prev = r.hash
        if prev != data.head_hash:
            return ChainReport(False, head_seq, head_seq, data.head_hash, head_seq,
                               ChainProblem.HEAD_MISMATCH)
        return ChainReport(True, head_seq, head_seq, data.head_hash)


# --- audit ------------------------------------------------------------------------


class SinkMode(enum.Enum):
    DIRECT = "direct"  # events are committed in the store (in the change's transaction)
    SPILL = "spill"  # events go to a local spill; a change is written first


@dataclass(frozen=True, slots=True)
class VerificationEntry:
    tenant: str
    actor: str
    request_id: str
    verdicts: tuple[Verdict, ...]


class MemoryAudit:
    """An ``AuditSink``.

    ``events`` lists every event made durable, in order, whichever way;
    ``spilled`` those that went to the "spill"; ``queued`` those of
    ``record_soon``; ``verifications`` the verdict batches; ``handed`` what
    each ``record_with`` passed to its write (the event, or None).
    ``on_durable(event)`` runs when the sink records an event itself (not
    inside the caller's write), e.g. to look at the store at that moment.

    In direct mode with a store, ``record`` appends to the store's chain (a
    store failure switches to spill mode, as the real writer does).
    """

    def __init__(self, store: MemoryStore | None = None, *,
                 mode: SinkMode = SinkMode.DIRECT) -> None:
        self.store = store
        self.mode = mode
        self.fail = False
        self.queue_full = False
        self.events: list[AuditEvent] = []
        self.spilled: list[AuditEvent] = []
        self.queued: list[AuditEvent] = []
        self.verifications: list[VerificationEntry] = []
        self.entries: list[tuple[str, str, list[list[Any]]]] = []
        self.handed: list[AuditEvent | None] = []
        self.on_durable: Callable[[AuditEvent], None] | None = None

    def _refuse(self, event: AuditEvent) -> None:
        if self.fail:
            raise AuditUnavailable("the audit record could not be made durable",
                                   tenant=event.tenant)

    async def record(self, event: AuditEvent) -> None:
        await asyncio.sleep(0)
        self._refuse(event)
        if self.on_durable is not None:
            self.on_durable(event)
        if self.mode is SinkMode.DIRECT and self.store is not None:
            try:
                await self.store.append_audit(event)
            except StoreUnavailable:
                self.mode = SinkMode.SPILL
        if self.mode is SinkMode.SPILL:
            self.spilled.append(event)
        self.events.append(event)

    async def record_with(
        self, event: AuditEvent, write: Callable[[AuditEvent | None], Awaitable[T]]
    ) -> T:
        self._refuse(event)
        if self.mode is SinkMode.DIRECT and self.store is not None:
            self.handed.append(event)
            result = await write(event)  # the store appends it in the write's transaction
            self.events.append(event)
            return result
        self.handed.append(None)
        result = await write(None)
        await self.record(event)
        return result

    async def record_soon(self, event: AuditEvent) -> None:
        await asyncio.sleep(0)
        if self.queue_full:
            raise AuditUnavailable("the audit queue is full")
        self.queued.append(event)

    async def record_verifications(
        self, tenant: str, actor: str, request_id: str, verdicts: Sequence[Verdict]
    ) -> None:
        await asyncio.sleep(0)
        if self.queue_full:
            raise AuditUnavailable("the audit queue is full")
        self.verifications.append(VerificationEntry(tenant, actor, request_id,
                                                    tuple(verdicts)))

    async def record_entries(self, actor: str, groups: Sequence[tuple[str, list[list[Any]]]]
                             ) -> None:
        await asyncio.sleep(0)
        if self.queue_full:
            raise AuditUnavailable("the audit queue is full")
        self.entries.extend((tenant, actor, items) for tenant, items in groups)

    def of_type(self, event_type: str) -> list[AuditEvent]:
        """Durable and queued events of one type, in order."""
        return [e for e in (*self.events, *self.queued) if e.event_type == event_type]


# --- verification -----------------------------------------------------------------


class NoRevocations:
    """A RevocationView that revokes nothing (the introspection engine's)."""

    def check(self, tenant: str, jti: str, subject: str, issued_at: int, kid: str) -> None:
        return None


class RecordingTable:
    """A ``KeyTable`` that keeps what it was given; ``fail`` makes it refuse."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[list[Tenant], list[KeyRecord]]] = []
        self.fail: Exception | None = None

    def replace(self, tenants: Iterable[Tenant], keys: Iterable[KeyRecord]) -> None:
        if self.fail is not None:
            raise self.fail
        self.snapshots.append((list(tenants), list(keys)))


# --- the service layer, wired as fedtoken.app wires it ---------------------------


def issuer_for(tenant: str) -> str:
    return f"https://auth.example/t/{tenant}"


class AllowAll:
    """An ``Authorizer`` that lets every call through (for use-case tests that
    are not about authorization; those build ``Callers`` with MemoryCallers)."""

    async def require(self, ctx: ports.CallContext, ask: Ask) -> None:
        return None

    async def scope(self, ctx: ports.CallContext, role: Role) -> frozenset[str] | None:
        return None


class MemoryCallers:
    """``CallerRepository`` in memory."""

    def __init__(self) -> None:
        self.grants: dict[tuple[str, Role], Grant] = {}
        self.loads = 0

    async def put(self, grant: Grant, *, now: datetime) -> Grant:
        stored = dataclasses.replace(grant, created_at=int(now.timestamp()))
        self.grants[(grant.identity, grant.role)] = stored
        return stored

    async def remove(self, identity: str, role: Role | None) -> int:
        gone = [k for k in self.grants if k[0] == identity and (role is None or k[1] is role)]
        for k in gone:
            del self.grants[k]
        return len(gone)

    async def list(self) -> list[Grant]:
        self.loads += 1
        return sorted(self.grants.values(), key=lambda g: (g.identity, g.role.value))


# --- federation trust ---------------------------------------------------------------


class MemoryTrust:
    """``TrustRepository`` over the store's data, with the checks of
    migrations/0005_trust.sql: the tenants exist (FailedPrecondition
    TENANT_NOT_FOUND), the issuer is no tenant's (InvalidRequest), the
    namespace is unique (AlreadyExists); removing an issuer removes its key set."""

    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    async def put(self, trust: TrustedIssuer, *, now: datetime) -> TrustedIssuer:
        await self._s.enter("trust.put")
        _aware(now, "now")
        data = self._s.data
        if not trust.tenants or not set(trust.tenants) <= set(data.tenants):
            raise FailedPrecondition("trust issuer: a tenant it names does not exist",
                                     reason=ErrorReason.TENANT_NOT_FOUND, field="tenants")
        if any(t.issuer == trust.issuer for t in data.tenants.values()):
            raise InvalidRequest("trust issuer: value rejected by the database")
        if any(t.namespace == trust.namespace and t.issuer != trust.issuer
               for t in data.trusted.values()):
            raise AlreadyExists("trust issuer: another trusted issuer has this namespace",
                                field="namespace")
        previous = data.trusted.get(trust.issuer)
        stamp = int(now.timestamp())
        stored = replace(trust, created_at=previous.created_at if previous else stamp,
                         updated_at=stamp)
        data.trusted[trust.issuer] = stored
        return stored

    async def get(self, issuer: str) -> TrustedIssuer | None:
        await self._s.enter("trust.get")
        return self._s.data.trusted.get(issuer)

    async def list(self) -> builtins.list[TrustedIssuer]:
        await self._s.enter("trust.list")
        return sorted(self._s.data.trusted.values(), key=lambda t: t.issuer)

    async def remove(self, issuer: str) -> bool:
        await self._s.enter("trust.remove")
        self._s.data.key_sets.pop(issuer, None)
        return self._s.data.trusted.pop(issuer, None) is not None


class MemoryKeySets:
    """``KeySetStore`` over the store's data: the later confirmation wins; a
    key set of an issuer no longer trusted is not kept."""

    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    async def load_key_sets(self) -> builtins.list[StoredKeySet]:
        await self._s.enter("key_sets.load")
        return sorted(self._s.data.key_sets.values(), key=lambda k: k.issuer)

    async def save_key_set(self, key_set: StoredKeySet) -> None:
        await self._s.enter("key_sets.save")
        data = self._s.data
        stored = data.key_sets.get(key_set.issuer)
        if key_set.issuer in data.trusted and (
                stored is None or stored.fetched_at <= key_set.fetched_at):
            data.key_sets[key_set.issuer] = key_set


class RecordingTrustedKeys:
    """A ``TrustedKeys`` that fetches nothing and remembers what it was told:
    ``configured`` is every ``configure`` call (issuers by name), ``statuses``
    what ``status``/``refresh`` report per issuer (set by the test),
    ``refreshed`` the issuers refreshed; ``fail`` makes ``refresh`` raise."""

    def __init__(self) -> None:
        self.configured: list[dict[str, TrustedIssuer]] = []
        self.statuses: dict[str, IssuerStatus] = {}
        self.refreshed: list[str] = []
        self.fail: Exception | None = None

    @property
    def issuers(self) -> dict[str, TrustedIssuer]:
        """The issuers of the last ``configure``."""
        return self.configured[-1] if self.configured else {}

    def configure(self, issuers: Iterable[TrustedIssuer]) -> None:
        self.configured.append({t.issuer: t for t in issuers})

    def issuer_keys(self, issuer: str) -> ports.IssuerKeys | None:
        return None

    async def await_kid(self, issuer: str, kid: str, timeout: float) -> bool:
        return False

    async def refresh(self, issuer: str) -> IssuerStatus:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        self.refreshed.append(issuer)
        return self.statuses.get(issuer, IssuerStatus(issuer=issuer))

    def status(self) -> builtins.list[IssuerStatus]:
        return [self.statuses[i] for i in sorted(self.statuses) if i in self.issuers]


@dataclass
class Trust:
    """The trust use cases over the fakes, wired as ``fedtoken.app`` wires them."""

    admin: TrustAdmin
    catalog: TrustCatalog
    keys: RecordingTrustedKeys


def build_trust(svc: Services, *, authz: ports.Authorizer | None = None,
                allow_http_loopback: bool = False, probe: bool = True) -> Trust:
    """``TrustAdmin`` and ``TrustCatalog`` over ``svc``'s store, audit and clock;
    authorized by ``authz`` (default: ``svc.callers``), with the caller
    policy's role probe unless ``probe`` is False."""
    keys = RecordingTrustedKeys()
    catalog = TrustCatalog(repo=svc.store.trust, keys=keys)
    callers = svc.callers
    admin = TrustAdmin(
        repo=svc.store.trust, tenants=svc.store.tenants, catalog=catalog, keys=keys,
        audit=svc.audit, clock=svc.clock, authz=authz or callers,
        allow_http_loopback=allow_http_loopback,
        tenants_for=(lambda identity, role: callers.policy.tenants_for(identity, role))
        if probe else None)
    return Trust(admin, catalog, keys)


@dataclass
class Services:
    clock: FakeClock
    store: MemoryStore
    signer: MemorySigner
    audit: MemoryAudit
    resolver: LocalKeyResolver
    revocations: InMemoryRevocationView
    engine: VerificationEngine
    introspector: VerificationEngine
    catalog: Catalog
    keys: KeyAdmin
    tokens: Tokens
    verification: Verification
    jobs: Jobs
    callers: Callers

    async def aclose(self) -> None:
        await self.catalog.close()
        self.engine.close()
        self.introspector.close()


def build_services(
    *,
    clock: FakeClock | None = None,
    store: MemoryStore | None = None,
    signer: MemorySigner | None = None,
    audit: MemoryAudit | None = None,
    default_tenant: str = "acme",
    leeway: int = 30,
    max_batch: int = 8,
    max_token_size: int = 16 * 1024,
    jwks_max_age: int = 300,
    key_size: int = 2048,
    authz: ports.Authorizer | None = None,
    bootstrap: tuple[str, ...] | None = None,
    min_rotation_period: int = 3600,
) -> Services:
    """The service layer over fakes, built as ``fedtoken.app.start_app`` builds it.

    The revocation view is confirmed fresh for good (its monotonic clock
    stands still) and expires entries on the fake clock.
    """
    clock = clock or FakeClock()
    store = store or MemoryStore(clock)
    signer = signer or MemorySigner()
    audit = audit or MemoryAudit(store)
    resolver = LocalKeyResolver()
    revocations = InMemoryRevocationView(staleness=60, monotonic=lambda: 0.0, wall=clock.now)
    revocations.confirm_fresh(0.0)
    options: dict[str, Any] = {"clock": clock, "leeway": leeway,
                               "max_token_size": max_token_size, "threads": 1}
    engine = VerificationEngine(resolver, revocations, **options)
    introspector = VerificationEngine(resolver, NoRevocations(), **options)
    timings = Timings(configured_max_age=jwks_max_age, leeway=leeway,
                      min_period=min_rotation_period)
    defaults = TenantDefaults(issuer_for=issuer_for, key_size=key_size,
                              grace_margin_seconds=jwks_max_age + leeway, timings=timings)
    catalog = Catalog(store, resolver, default_tenant=default_tenant, jwks_max_age=jwks_max_age,
                      timings=timings)
    callers = Callers(repo=MemoryCallers(), audit=audit, clock=clock, bootstrap=bootstrap or ())
    # The real authorizer only when asked for (bootstrap identities given).
    authz = authz or (callers if bootstrap is not None else AllowAll())
    keys = KeyAdmin(catalog=catalog, store=store, signer=signer, audit=audit, clock=clock,
                    defaults=defaults, authz=authz, policies=store.tenants, marks=store.keys)
    tokens = Tokens(catalog=catalog, store=store, signer=signer, audit=audit,
                    introspector=introspector, revocations=revocations, keys=keys,
                    clock=clock, leeway=leeway, authz=authz, max_token_bytes=max_token_size)
    verification = Verification(engine=engine, audit=audit, max_batch=max_batch, authz=authz,
                                catalog=catalog)
    jobs = Jobs(catalog=catalog, store=store, keys=keys, revocations=revocations, clock=clock,
                defaults=defaults)
    return Services(clock, store, signer, audit, resolver, revocations, engine, introspector,
                    catalog, keys, tokens, verification, jobs, callers)


if TYPE_CHECKING:  # mypy checks that the fakes implement the ports exactly

    def _ports(
        clock: FakeClock, signer: MemorySigner, store: MemoryStore, audit: MemoryAudit,
        table: RecordingTable, view: NoRevocations,
    ) -> tuple[ports.Clock, ports.Signer, ports.Store, ports.AuditSink, ports.KeyTable,
               ports.RevocationView]:
        return clock, signer, store, audit, table, view

    def _repositories(
        store: MemoryStore,
    ) -> tuple[ports.TenantRepository, ports.KeyRepository, ports.RevocationRepository,
               ports.AuditLog]:
        return store.tenants, store.keys, store.revocations, store.audit

    def _trust_ports(
        store: MemoryStore, keys: RecordingTrustedKeys,
    ) -> tuple[ports.TrustRepository, ports.KeySetStore, ports.TrustedKeys]:
        return store.trust, store.key_sets, keys
