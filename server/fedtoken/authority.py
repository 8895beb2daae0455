"""The token authority's use cases, independent of gRPC and HTTP.

The gRPC servicers and the HTTP bridge translate requests into calls on
``Authority`` and its results back; errors are ``fedtoken.core.errors`` types and
are mapped to statuses at the RPC boundary.

Promises kept here:
- issuance signs only in the HSM and returns a token only after its audit
  record is committed;
- a revocation is durable in Postgres (with its audit record, in the same
  transaction) before Revoke returns;
- Verify touches neither Postgres nor the HSM: keys and revocations are in
  memory, kept current by notifications (see fedtoken.revocation.sync).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from fedtoken.audit import AuditMode, AuditWriter
from fedtoken.config import Settings
from fedtoken.core import claims as claims_mod
from fedtoken.core import jose
from fedtoken.core.jwks import etag as jwks_etag
from fedtoken.core.jwks import render_jwks
from fedtoken.core.keys import check_transition
from fedtoken.core.model import (
    SIGNING_ALGORITHMS,
    Expectation,
    KeyRecord,
    KeyState,
    Reason,
    Tenant,
    TenantPolicy,
    Verdict,
)
from fedtoken.core.ports import Clock, SystemClock
from fedtoken.core.errors import (
    AlreadyExists,
    ErrorReason,
    FailedPrecondition,
    FedtokenError,
    InvalidRequest,
    NotFound,
    PolicyViolation,
    StoreUnavailable,
)
from fedtoken.hsm import Pkcs11Hsm
from fedtoken.revocation import InMemoryRevocationView, RevocationEntry
from fedtoken.store import Store
from fedtoken.core.audit import AuditEvent, AuditRecord, ChainReport
from fedtoken.verifier import LocalKeyResolver, VerificationEngine

log = logging.getLogger(__name__)

_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MAX_SUBJECT = 255
_MAX_AUDIENCES = 16
_MAX_JTI = 256
_MAX_LIFETIME_CEILING = 7 * 86400
# Verdicts the engine gives only after the signature verified and the claims
# are well-typed: a token with one of these reasons can be revoked by value.
_REVOCABLE = frozenset(
    {Reason.OK, Reason.EXPIRED, Reason.NOT_YET_VALID, Reason.ISSUED_IN_FUTURE}
)
_BOOTSTRAP_LOCK = 0x6665_6474_6F6B  # "fedtok": advisory lock id for first start


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking, as far as the transport can tell (for the audit trail)."""

    actor: str = ""
    request_id: str = ""


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
    tenant: Tenant
    jwks_json: bytes
    etag: str
    max_age: int
    keys: list[KeyRecord]


class _NoRevocations:
    """Introspection checks Postgres itself, after the engine's checks."""

    def check(self, tenant: str, jti: str, subject: str, issued_at: int, kid: str) -> None:
        return None


class Authority:
    """Issue, verify, introspect, revoke, publish keys; administer tenants."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        hsm: Pkcs11Hsm,
        *,
        audit: AuditWriter,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hsm = hsm
        self.audit = audit
        self.clock: Clock = clock or SystemClock()
        self.resolver = LocalKeyResolver()
        self.revocations = InMemoryRevocationView(
            staleness=settings.revocation_staleness_seconds
        )
        common: dict[str, Any] = {
            "clock": self.clock,
            "leeway": settings.leeway_seconds,
            "max_token_size": settings.max_token_bytes,
            "threads": settings.verify_threads,
        }
        self.engine = VerificationEngine(self.resolver, self.revocations, **common)
        self._introspector = VerificationEngine(self.resolver, _NoRevocations(), **common)
        self._tenants: dict[str, Tenant] = {}
        self._keys: dict[str, list[KeyRecord]] = {}
        self._reload_lock = asyncio.Lock()

    def close(self) -> None:
        """Stop the verification engines' worker threads."""
        self.engine.close()
        self._introspector.close()

    # -- state kept in memory ------------------------------------------------

    async def reload_keys(self, _event: object = None) -> None:
        """Reload tenants and key metadata (after a change here or elsewhere)."""
        async with self._reload_lock:
            tenants = await self.store.list_tenants()
            keys = await self.store.list_keys(None)
            by_tenant: dict[str, list[KeyRecord]] = {t.id: [] for t in tenants}
            for key in keys:
                by_tenant.setdefault(key.tenant, []).append(key)
            self.resolver.replace(tenants, keys)
            self._tenants = {t.id: t for t in tenants}
            self._keys = by_tenant

    async def load_revocations(self) -> AsyncIterator[RevocationEntry]:
        """Unexpired revocations for the in-memory view, streamed in chunks."""
        async for chunk in self.store.iter_revocations(datetime.now(UTC)):
            for tenant, kind, value, expires_at, not_before in chunk:
                yield RevocationEntry(tenant, kind, value, expires_at, not_before)

    async def purge_expired(self) -> int:
        """Forget revocations whose tokens have expired anyway (Postgres and here)."""
        removed = await self.store.purge_expired(datetime.now(UTC))
        self.revocations.purge_expired()
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

    async def _tenant(self, tenant_id: str) -> Tenant:
        tid = tenant_id or self.settings.default_tenant
        tenant = self._tenants.get(tid)
        # Another replica may have created it a moment ago (tenant inserts are
        # not notified). Names reach here from unauthenticated HTTP paths, so a
        # miss costs at most one key lookup; only a real new tenant reloads.
        if tenant is None and _TENANT_ID.match(tid) and await self.store.get_tenant(tid):
            await self.reload_keys()
            tenant = self._tenants.get(tid)
        if tenant is None:
            raise NotFound(f"tenant {tid!r} does not exist", tenant=tid)
        return tenant

    def _active_key(self, tenant: Tenant) -> KeyRecord:
        for key in self._keys.get(tenant.id, []):
            if key.state is KeyState.ACTIVE:
                return key
        raise FailedPrecondition(
            f"tenant {tenant.id!r} has no active signing key; generate and activate one "
            "(fedtoken keys generate --activate)",
            reason=ErrorReason.NO_ACTIVE_KEY,
            tenant=tenant.id,
        )

    # -- first start -----------------------------------------------------------

    async def bootstrap(self) -> None:
        """Create the default tenant and its first active key if missing.

        Runs under a Postgres advisory lock so replicas starting together
        create exactly one tenant and one key.
        """
        await self.reload_keys()
        if not self.settings.create_default_tenant:
            return
        async with self.store.advisory_lock(_BOOTSTRAP_LOCK):
            await self.reload_keys()
            tid = self.settings.default_tenant
            if tid not in self._tenants:
                await self.create_tenant(
                    Tenant(id=tid, issuer=self.settings.issuer_for(tid),
                           policy=TenantPolicy(key_size=self.settings.key_size)),
                    Caller(actor="fedtoken:bootstrap"),
                )
            tenant = self._tenants[tid]
            if not any(k.state is KeyState.ACTIVE for k in self._keys.get(tid, [])):
                await self.generate_key(tenant.id, 0, True, Caller(actor="fedtoken:bootstrap"))

    # -- TokenService ------------------------------------------------------------

    async def issue(self, params: IssueParams, caller: Caller) -> Issued:
        tenant = await self._tenant(params.tenant)
        subject = params.subject
        if not subject or len(subject) > _MAX_SUBJECT:
            raise InvalidRequest("subject is required (1 to 255 characters)", field="subject")
        audience = list(params.audience)
        if not audience or len(audience) > _MAX_AUDIENCES:
            raise InvalidRequest("audience: give 1 to 16 audiences", field="audience")
        if any(not a or len(a) > 255 for a in audience):
            raise InvalidRequest("audience entries must be 1 to 255 characters", field="audience")
        lifetime = params.lifetime_seconds or tenant.policy.default_token_lifetime_seconds
        if lifetime < 0:
            raise InvalidRequest("lifetime_seconds must not be negative", field="lifetime_seconds")
        if lifetime > tenant.policy.max_token_lifetime_seconds:
            raise PolicyViolation(
                f"lifetime {lifetime}s exceeds tenant {tenant.id!r} maximum of "
                f"{tenant.policy.max_token_lifetime_seconds}s",
                reason=ErrorReason.LIFETIME_EXCEEDS_POLICY,
                field="lifetime_seconds",
                tenant=tenant.id,
            )
        if len(params.scope) > 1024 or len(params.client_id) > 255:
            raise InvalidRequest("scope or client_id too long", field="scope")
        extra = claims_mod.validate_extra_claims(params.extra_claims_json)
        key = self._active_key(tenant)
        now = int(self.clock.now())
        jti = secrets.token_urlsafe(16)  # 128 random bits
        payload = claims_mod.build_claims(
            issuer=tenant.issuer,
            subject=subject,
            audience=audience,
            issued_at=now,
            lifetime=lifetime,
            jti=jti,
            extra=extra,
            scope=params.scope,
            client_id=params.client_id,
        )
        header = {"alg": key.alg, "typ": "JWT", "kid": key.kid}
        signing_input = jose.encode_signing_input(header, payload)
        (signature,) = await self.hsm.asign_many(key.hsm_label, key.kid, [signing_input])
        token = jose.assemble(signing_input, signature)
        await self._audit(
            AuditEvent(
                event_type="token.issued",
                tenant=tenant.id,
                actor=caller.actor,
                subject=subject,
                jti=jti,
                kid=key.kid,
                outcome="ok",
                reason="",
                request_id=caller.request_id,
                details={"aud": audience, "exp": now + lifetime},
            ),
        )
        return Issued(token, jti, key.kid, tenant.id, tenant.issuer, now, now + lifetime)

    async def verify(self, token: str, expect: Expectation, caller: Caller) -> Verdict:
        _require_token(token)
        if not expect.audience:
            raise InvalidRequest("audience is required", field="audience")
        verdict = self.engine.verify(token, expect)
        if not self.audit.record_verifications(expect.tenant, caller.actor, caller.request_id,
                                               (verdict,)):
            await self.audit.wait_for_room()
        return verdict

    async def verify_batch(self, tokens: Sequence[str], expect: Expectation,
                           caller: Caller) -> list[Verdict]:
        if len(tokens) > self.settings.max_batch:
            raise InvalidRequest(
                f"batch of {len(tokens)} exceeds the limit of {self.settings.max_batch}",
                reason=ErrorReason.BATCH_TOO_LARGE,
                field="tokens",
            )
        if not expect.audience:
            raise InvalidRequest("audience is required", field="audience")
        verdicts = await self.engine.verify_batch(tokens, expect)
        # Off the request path: one deque append; the writer batches and COPYs.
        if not self.audit.record_verifications(expect.tenant, caller.actor, caller.request_id,
                                               verdicts):
            await self.audit.wait_for_room()
        return verdicts

    async def introspect(self, token: str, caller: Caller) -> Introspection:
        """Real-time check: engine verdict, then revocation straight from Postgres."""
        _require_token(token)
        verdict = self._introspector.verify(token, Expectation(audience="", check_audience=False))
        result: Introspection
        if not verdict.valid or verdict.claims is None:
            result = Introspection(False, verdict.reason, tenant=verdict.tenant, kid=verdict.kid)
        else:
            iat = verdict.claims.get("iat")
            try:
                revoked = await self.store.is_revoked(
                    verdict.tenant, verdict.jti, verdict.subject,
                    iat if isinstance(iat, int) else 0, verdict.kid,
                )
            except StoreUnavailable:
                result = Introspection(False, Reason.REVOCATION_UNAVAILABLE,
                                       tenant=verdict.tenant, kid=verdict.kid)
            else:
                if revoked:
                    result = Introspection(False, Reason.REVOKED,
                                           tenant=verdict.tenant, kid=verdict.kid)
                else:
                    result = Introspection(True, Reason.OK, verdict.claims,
                                           verdict.tenant, verdict.kid)
        event = AuditEvent(
            event_type="token.introspected", tenant=verdict.tenant, actor=caller.actor,
            subject=verdict.subject, jti=verdict.jti, kid=verdict.kid,
            outcome="active" if result.active else "inactive", reason=result.reason.value,
            request_id=caller.request_id,
        )
        if not self.audit.record_event(event):
            await self.audit.wait_for_room()
        return result

    async def revoke(
        self,
        *,
        tenant_id: str,
        token: str = "",
        jti: str = "",
        subject: str = "",
        issued_before: int = 0,
        kid: str = "",
        expires_at: int = 0,
        reason: str = "",
        caller: Caller,
    ) -> Revoked:
        """Revoke one token (by token or jti), a subject's tokens issued before
        a time, or every token of a compromised key. Durable and audited in
        one transaction before it returns."""
        if len(reason) > 200:
            raise InvalidRequest("reason is limited to 200 characters", field="reason")
        if sum(bool(x) for x in (token, jti, subject, kid)) != 1:
            raise InvalidRequest("give exactly one of token, jti, subject or kid", field="target")
        if kid:
            return await self._compromise_key(tenant_id, kid, reason, caller)
        now = int(self.clock.now())
        leeway = self.settings.leeway_seconds
        not_before: int | None = None
        if token:
            tenant, jti, token_exp = self._authenticate_for_revocation(token)
            if token_exp <= now - leeway:
                # An expired token is already rejected everywhere: nothing to store.
                return Revoked(tenant.id, jti, now, False, "jti", jti)
            kind, value, expires_at = "jti", jti, token_exp
        elif jti:
            tenant = await self._tenant(tenant_id)
            if len(jti) > _MAX_JTI:
                raise InvalidRequest("jti is limited to 256 characters", field="jti")
            kind, value = "jti", jti
            if expires_at <= 0:
                expires_at = now + tenant.policy.max_token_lifetime_seconds
        else:
            tenant = await self._tenant(tenant_id)
            if len(subject) > _MAX_SUBJECT:
                raise InvalidRequest("subject is limited to 255 characters", field="subject")
            not_before = issued_before or now
            if not_before > now + leeway or not_before < 0:
                raise InvalidRequest("issued_before must not be in the future",
                                     field="issued_before")
            kind, value = "subject", subject
            # Every token issued before the cut has expired by then.
            expires_at = not_before + tenant.policy.max_token_lifetime_seconds
        expires_at += leeway
        event = AuditEvent(
            event_type="token.revoked",
            tenant=tenant.id,
            actor=caller.actor,
            subject=subject,
            jti=jti,
            kid="",
            outcome="ok",
            reason=reason,
            request_id=caller.request_id,
            details={"kind": kind, "expires_at": expires_at,
                     **({"issued_before": not_before} if not_before is not None else {})},
        )
        # In the same transaction when the audit trail is writing directly;
        # while it drains a spill, through the spill so its order holds.
        atomic = self.audit.mode is AuditMode.DIRECT
        created, revoked_at = await self.store.revoke(
            tenant.id, kind, value,
            expires_at=datetime.fromtimestamp(expires_at, UTC),
            not_before=datetime.fromtimestamp(not_before, UTC) if not_before is not None
            else None,
            reason=reason, actor=caller.actor, audit=event if atomic else None,
        )
        if not atomic:
            await self.audit.record_durable(event)
        # Visible here at once; other replicas learn it by notification.
        self.revocations.add(RevocationEntry(tenant.id, kind, value, expires_at,
                                             not_before or 0))
        return Revoked(tenant.id, jti, int(revoked_at.timestamp()), created, kind, value)

    async def _compromise_key(self, tenant_id: str, kid: str, reason: str,
                              caller: Caller) -> Revoked:
        """Emergency revocation: the key leaves the JWKS and every token it
        signed is rejected. If it was the signing key, a replacement is
        generated and activated at once so issuance continues."""
        key = await self._own_key(tenant_id, kid)
        tenant = await self._tenant(key.tenant)
        check_transition(key.state, KeyState.COMPROMISED)
        now = int(self.clock.now())
        # Its tokens are all expired after one maximum lifetime; the key
        # itself stays COMPROMISED for good.
        expires_at = now + tenant.policy.max_token_lifetime_seconds + self.settings.leeway_seconds
        event = AuditEvent(
            event_type="key.compromised", tenant=tenant.id, actor=caller.actor,
            subject="", jti="", kid=kid, outcome="ok", reason=reason,
            request_id=caller.request_id,
            details={"previous_state": key.state.value, "expires_at": expires_at},
        )
        atomic = self.audit.mode is AuditMode.DIRECT
        async with self.store.transaction() as tx:
            await tx.set_key_state(kid, KeyState.COMPROMISED, expected=[key.state])
            created, revoked_at = await tx.revoke(
                tenant.id, "key", kid, expires_at=datetime.fromtimestamp(expires_at, UTC),
                reason=reason, actor=caller.actor, audit=event if atomic else None,
            )
        if not atomic:
            await self.audit.record_durable(event)
        self.revocations.add(RevocationEntry(tenant.id, "key", kid, expires_at))
        await self.reload_keys()
        if key.state is KeyState.ACTIVE:
            log.warning("active key %s of tenant %s compromised; activating a replacement",
                        kid, tenant.id)
            await self.generate_key(tenant.id, 0, True, caller)
        return Revoked(tenant.id, "", int(revoked_at.timestamp()), created, "key", kid)

    def _authenticate_for_revocation(self, token: str) -> tuple[Tenant, str, int]:
        """The token must be ours and genuinely signed; its exp and jti are read.

        The introspection engine does the checking (one verification pipeline,
        not a second copy): a verdict whose reason is only reached after the
        signature verified proves the token authentic, even if it is expired
        or not yet valid.
        """
        _require_token(token)
        verdict = self._introspector.verify(token, Expectation(audience="", check_audience=False))
        tenant = self._tenants.get(verdict.tenant)
        if verdict.reason not in _REVOCABLE or tenant is None or not verdict.jti:
            raise InvalidRequest("token is not a well-formed, genuinely signed token of ours",
                                 reason=ErrorReason.INVALID_TOKEN, field="token")
        return tenant, verdict.jti, verdict.expires_at

    async def get_keys(self, tenant_id: str) -> KeySet:
        tenant = await self._tenant(tenant_id)
        records = [k for k in self._keys.get(tenant.id, []) if k.state.published]
        body = render_jwks(records)
        return KeySet(tenant, body, jwks_etag(body), self.settings.jwks_max_age_seconds, records)

    # -- KeyAdmin ------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant, caller: Caller,
                            generate_key: bool = False) -> Tenant:
        _validate_tenant(tenant)
        try:
            created = await self.store.create_tenant(tenant)
        except AlreadyExists as exc:
            exc.tenant = tenant.id
            raise
        await self._audit(AuditEvent(
            event_type="tenant.created", tenant=created.id, actor=caller.actor, subject="",
            jti="", kid="", outcome="ok", reason="", request_id=caller.request_id,
            details={"issuer": created.issuer},
        ))
        await self.reload_keys()
        if generate_key:
            await self.generate_key(created.id, 0, True, caller)
        return created

    async def list_tenants(self) -> list[Tenant]:
        await self.reload_keys()
        return sorted(self._tenants.values(), key=lambda t: t.id)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        return await self._tenant(tenant_id)

    async def generate_key(self, tenant_id: str, key_size: int, activate: bool,
                           caller: Caller) -> KeyRecord:
        tenant = await self._tenant(tenant_id)
        bits = key_size or tenant.policy.key_size
        if bits < 2048 or bits > 8192 or bits % 8:
            raise PolicyViolation("key_size must be a multiple of 8 between 2048 and 8192",
                                  field="key_size", tenant=tenant.id)
        generated = await self.hsm.agenerate_rsa_keypair(tenant.id, bits)
        record = KeyRecord(
            kid=generated.kid, tenant=tenant.id, alg=generated.alg, key_size=bits,
            state=KeyState.PENDING, public_jwk=generated.public_jwk,
            hsm_label=generated.hsm_label, created_at=int(self.clock.now()),
        )
        await self.store.insert_key(record)
        await self._audit(AuditEvent(
            event_type="key.generated", tenant=tenant.id, actor=caller.actor, subject="",
            jti="", kid=record.kid, outcome="ok", reason="", request_id=caller.request_id,
            details={"key_size": bits, "hsm_label": record.hsm_label},
        ))
        if activate:
            record = await self.store.activate_key(tenant.id, record.kid)
            await self._audit(_key_event("key.activated", record, caller))
        await self.reload_keys()
        return record

    async def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        tenant = await self._tenant(tenant_id)
        return await self.store.list_keys(tenant.id)

    async def _own_key(self, tenant_id: str, kid: str) -> KeyRecord:
        tenant = await self._tenant(tenant_id)
        key = await self.store.get_key(kid) if kid else None
        if key is None or key.tenant != tenant.id:
            raise NotFound(f"key {kid!r} not found for tenant {tenant.id!r}",
                           reason=ErrorReason.KEY_NOT_FOUND, tenant=tenant.id, kid=kid)
        return key

    async def activate_key(self, tenant_id: str, kid: str, caller: Caller) -> KeyRecord:
        key = await self._own_key(tenant_id, kid)
        check_transition(key.state, KeyState.ACTIVE)
        record = await self.store.activate_key(key.tenant, kid)
        await self._audit(_key_event("key.activated", record, caller))
        await self.reload_keys()
        return record

    async def retire_key(self, tenant_id: str, kid: str, caller: Caller) -> KeyRecord:
        key = await self._own_key(tenant_id, kid)
        if key.state is KeyState.ACTIVE:
            raise FailedPrecondition(
                "the active key cannot be retired directly: generate a key and activate it "
                "(the current one then becomes RETIRING)",
                reason=ErrorReason.INVALID_KEY_TRANSITION, tenant=key.tenant, kid=kid,
            )
        target = KeyState.RETIRING if key.state is KeyState.PENDING else KeyState.RETIRED
        check_transition(key.state, target)
        record = await self.store.set_key_state(kid, target, expected=[key.state])
        await self._audit(_key_event("key.retired" if target is KeyState.RETIRED
                                     else "key.retiring", record, caller))
        await self.reload_keys()
        return record

    # -- audit ---------------------------------------------------------------------

    async def list_audit(self, *, tenant: str, event_type: str, subject: str, since: int,
                         until: int, after_seq: int, page_size: int) -> list[AuditRecord]:
        if page_size < 0 or page_size > 1000 or after_seq < 0 or since < 0 or until < 0:
            raise InvalidRequest("page_size 0..1000; after_seq, since, until not negative",
                                 field="page_size")
        return await self.store.list_audit(
            tenant=tenant or None,
            event_type=event_type or None,
            subject=subject or None,
            since=datetime.fromtimestamp(since, UTC) if since else None,
            until=datetime.fromtimestamp(until, UTC) if until else None,
            after_seq=after_seq,
            limit=page_size or 100,
        )

    async def verify_audit_chain(self) -> ChainReport:
        return await self.store.verify_audit_chain()

    async def _audit(self, event: AuditEvent) -> None:
        """Durable before returning: committed in Postgres, or fsync'ed to the
        spill while Postgres is away; AuditUnavailable if neither (fail closed)."""
        await self.audit.record_durable(event)


def _require_token(token: str) -> None:
    if not token:
        raise InvalidRequest("token is required", field="token")


def _key_event(event_type: str, key: KeyRecord, caller: Caller) -> AuditEvent:
    return AuditEvent(
        event_type=event_type, tenant=key.tenant, actor=caller.actor, subject="", jti="",
        kid=key.kid, outcome="ok", reason="", request_id=caller.request_id,
        details={"state": key.state.value},
    )


def _validate_tenant(t: Tenant) -> None:
    if not _TENANT_ID.match(t.id):
        raise InvalidRequest(
            "tenant id: 1 to 63 lowercase letters, digits or '-', starting with a letter or digit",
            field="id",
        )
    url = urlsplit(t.issuer)
    local = url.hostname in ("localhost", "127.0.0.1", "::1")
    if not (url.scheme == "https" or (url.scheme == "http" and local)) or not url.netloc \
            or url.query or url.fragment or len(t.issuer) > 512:
        raise InvalidRequest(
            "issuer must be an https URL without query or fragment (http only for localhost)",
            field="issuer",
        )
    p = t.policy
    if not 60 <= p.max_token_lifetime_seconds <= _MAX_LIFETIME_CEILING:
        raise PolicyViolation("max_token_lifetime_seconds must be between 60 and 604800",
                              field="max_token_lifetime_seconds")
    if not 1 <= p.default_token_lifetime_seconds <= p.max_token_lifetime_seconds:
        raise PolicyViolation("default_token_lifetime_seconds must be between 1 and the maximum",
                              field="default_token_lifetime_seconds")
    if not p.allowed_algorithms or not set(p.allowed_algorithms) <= SIGNING_ALGORITHMS:
        raise PolicyViolation(
            f"allowed_algorithms must be a subset of {sorted(SIGNING_ALGORITHMS)}",
            field="allowed_algorithms",
        )
    if p.key_size < 2048 or p.key_size > 8192 or p.key_size % 8:
        raise PolicyViolation("key_size must be a multiple of 8 between 2048 and 8192",
                              field="key_size")
