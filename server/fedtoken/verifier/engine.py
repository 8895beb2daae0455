"""The verification engine: one token or a batch, to verdicts.

Every check that can be made without a signature is made first (they cost
microseconds, the RSA verification tens of them), but nothing read from the
token is reported as a fact until the signature holds: before that point a
verdict carries only what our own trust store vouches for (tenant, issuer,
and the kid that matched).

Batches use threads because ``cryptography`` releases the GIL while it
verifies an RSA signature, so the RSA work of a batch spreads over the cores
(see ``verify_batch`` for why the work is split by phase).

The optional native fast path (``fedtoken.verifier.native``) takes the tokens
whose exact header segment the Python path has already seen verify under a
known key; every other token, and every token it does not fully understand,
takes the Python path here. Verdicts are the same either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Final

from fedtoken.core.claims import check_claims
from fedtoken.core.errors import TokenError
from fedtoken.core.jose import (
    DEFAULT_MAX_TOKEN_SIZE,
    check_header,
    loads_strict,
    parse_compact,
    verify_signature,
)
from fedtoken.core.jwk import b64url_decode
from fedtoken.core.model import (
    ASYMMETRIC_ALGORITHMS,
    Expectation,
    KeyState,
    Reason,
    Verdict,
    foreign_ref,
)
from fedtoken.core.ports import Clock, IssuerKeys, KeyResolver, RevocationView, VerificationKey
from fedtoken.ops import metrics
from fedtoken.verifier import multibuffer
from fedtoken.verifier._shared import MALFORMED, PARSE_ERRORS, log_unexpected
from fedtoken.verifier.native import (
    INVALID,
    NATIVE,
    NATIVE_AVAILABLE,
    PIPELINE_REASONS,
    NativePath,
    WireBatch,
)
from fedtoken.verifier.tokencache import DEFAULT_SIZE, CachedToken, TokenCache, digest

__all__ = [
    "HEADER_CACHE_SIZE",
    "INLINE_BATCH",
    "MIN_CHUNK",
    "NATIVE_AVAILABLE",
    "VerificationEngine",
]

# Below this many tokens a batch is verified on the calling thread: handing
# it to a worker would cost more than the work (under a millisecond).
INLINE_BATCH: Final = 32
# The smallest slice of RSA work worth a thread hop; the signatures of a
# batch are split into at most one slice per worker thread.
MIN_CHUNK: Final = 64

# Distinct header segments remembered with their (alg, kid). Tokens signed by
# one key share one header segment, so in practice this holds a handful of
# entries; the bound only stops a caller from growing it without limit.
HEADER_CACHE_SIZE: Final = 256


@dataclass(slots=True)
class _Pending:
    """A token that passed every check possible before its signature."""

    signing_input: bytes
    signature: bytes
    payload: dict[str, Any]
    payload_bytes: bytes
    key: VerificationKey
    tenant: str
    issuer: str
    alg: str = ""
    raw: bytes = b""


def _merge_parts(parts: Sequence[Any], plan: Sequence[Any]) -> WireBatch:
    """One WireBatch from the pipeline's answers for consecutive slices;
    audit entries grouped by the tenant of their slot's plan."""
    outs: list[bytes] = []
    rest: list[int] = []
    cuts: list[int] = []
    by_tenant: dict[str, list[list[Any]]] = {}
    offset = 0
    for out, part_rest, part_cuts, audit in parts:
        rest.extend(part_rest)
        cuts.extend([c + offset for c in part_cuts] if offset else part_cuts)
        outs.append(out)
        offset += len(out)
        for slot_plan, entries in zip(plan, audit, strict=True):
            if entries:
                by_tenant.setdefault(slot_plan[3], []).extend(entries)
    out = outs[0] if len(outs) == 1 else b"".join(outs)
    return WireBatch(out, rest, cuts, [], list(by_tenant.items()))


def _check_signatures(items: Sequence[Verdict | _Pending]) -> list[bool]:
    # The only work here is RSA inside cryptography, which releases the GIL:
    # this loop is what runs on several cores at once.
    return [
        type(item) is _Pending
        and verify_signature(item.key.alg, item.key.public_key, item.signing_input, item.signature)
        for item in items
    ]


class VerificationEngine:
    """Verifies compact JWS tokens against a KeyResolver and a RevocationView.

    Thread-safe: ``verify`` may be called from any thread and ``verify_batch``
    from any event loop, concurrently. The engine's own mutable state is three
    caches:

    * ``_headers``, header segment -> checked (alg, kid): a bounded dict read
      and written by every verify thread with single get / set / clear calls
      (atomic in CPython). An entry is a pure function of its key, so a race
      can only lose an entry, which costs a reparse.
    * the native fast path (``NativePath``, when on): its learned entries and
      current table change only under its lock, taken to learn an entry or
      rebuild the table, never to verify; a call or batch reads one
      immutable snapshot throughout.
    * ``_cache`` (``TokenCache``, when on): token digest -> what its
      signature check proved, one dict used with single get / set / pop
      calls. Entries are immutable; a hit counts only if the resolver still
      selects the entry's key object, so an entry made stale by a reload at
      any moment gives the resolver's verdict or a full re-verification.

    The resolver and the revocation view are read-mostly structures swapped
    or guarded by their owners; a verdict reads the resolver's current state.
    """

    def __init__(
        self,
        resolver: KeyResolver,
        revocations: RevocationView,
        *,
        clock: Clock,
        leeway: int = 30,
        max_token_size: int = DEFAULT_MAX_TOKEN_SIZE,
        threads: int = 2,
        native: bool | None = None,
        token_cache: int = DEFAULT_SIZE,
    ) -> None:
        """``native``: use the native fast path (None: when it is built;
        True: required, ImportError if it is not built; False: never).
        ``token_cache``: entries of the verified-token cache (0: off; see
        ``fedtoken.verifier.tokencache``)."""
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if native and not NATIVE_AVAILABLE:
            raise ImportError("fedtoken._native is not built")
        self._resolver = resolver
        self._revocations = revocations
        self._clock = clock
        self._leeway = leeway
        self._max_token_size = max_token_size
        self._threads = threads
        # header segment -> (alg, kid), for headers that parsed and passed
        # check_header; filled by _precheck (see the class docstring). Never
        # rebound: the native path reads it through ``header_of``.
        self._headers: dict[bytes, tuple[str, str]] = {}
        self._executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="fedtoken-verify"
        )
        self._cache = TokenCache(token_cache) if token_cache > 0 else None
        self._native: NativePath | None = None
        # The native pipeline's own verified-token cache (token digest and
        # key fingerprint only; fedtoken/_native/sigcache.h), sized as the
        # Python one.
        self._sigcache: Any = None
        if NATIVE_AVAILABLE and native is not False:
            if token_cache > 0:
                self._sigcache = NATIVE.SignatureCache(token_cache)
            self._native = NativePath(
                max_token_size=max_token_size,
                leeway=leeway,
                header_of=self._headers.get,
                resolve=self._resolve,
                conclude=self._conclude_checked,
            )
        # For the fedtoken_rsa_verify_path gauge: the native path verifies
        # batches with crypto_mb when this CPU and build allow it.
        metrics.note_rsa_path("multibuffer" if self._native is not None
                              and multibuffer.available() else "openssl")

    @property
    def native(self) -> bool:
        """Whether this engine uses the native fast path."""
        return self._native is not None

    def signature_cache_stats(self) -> dict[str, int] | None:
        """The native pipeline cache's {capacity, hits, misses, stores}, or
        None when there is none."""
        return None if self._sigcache is None else dict(self._sigcache.stats())

    def close(self) -> None:
        """Stop the worker threads (after the batches in flight finish)."""
        self._executor.shutdown(wait=True)

    def verify(self, token: str, expect: Expectation) -> Verdict:
        """The verdict on one token. Never raises."""
        now = self._clock.now()
        if self._cache is not None:
            verdict = self._from_cache(token, expect, now)
            if verdict is not None:
                return verdict
        return self._verify_inline([token], expect, now)[0]

    def _from_cache(self, token: str, expect: Expectation, now: float) -> Verdict | None:
        """The verdict from a cached signature check, or None (a miss, or
        an entry whose key is no longer the one the resolver selects)."""
        cache = self._cache
        assert cache is not None
        try:
            key = digest(token)
            entry = cache.get(key) if key is not None else None
            if entry is None:
                return None
            resolved = self._resolve(entry.payload, entry.alg, entry.kid, expect)
            if type(resolved) is Verdict:
                # What the uncached path answers too: it resolves the same
                # (alg, kid, payload) before the signature.
                return resolved
            vkey, tenant, iss = resolved  # type: ignore[misc]
            if vkey is not entry.key:
                return None
            audience = expect.audience if expect.check_audience else None
            payload = dict(entry.payload)  # callers get their own top-level dict
            reason = check_claims(payload, now=now, leeway=self._leeway, audience=audience)
            return self._conclude_checked(reason, payload, entry.payload_bytes, tenant, iss,
                                          vkey.kid, vkey.foreign)
        except Exception as exc:  # noqa: BLE001 - fall back to the full path
            log_unexpected(exc)
            return None

    def _cached_split(
        self, tokens: Sequence[str], expect: Expectation, now: float
    ) -> tuple[list[Verdict | None], list[int]]:
        verdicts: list[Verdict | None] = []
        rest: list[int] = []
        from_cache = self._from_cache
        for i, token in enumerate(tokens):
            verdict = from_cache(token, expect, now)
            if verdict is None:
                rest.append(i)
            verdicts.append(verdict)
        return verdicts, rest

    def _fill_native(
        self, tokens: Sequence[str], parts: Sequence[Any], slots: Sequence[Any],
        verdicts: Sequence[Verdict | None],
    ) -> None:
        """Cache the tokens the native code verified and concluded valid:
        a verdict there means the resolver's key IS the slot's key."""
        cache = self._cache
        if cache is None:
            return
        index = 0
        for statuses, _, _ in parts:
            for status in statuses:
                verdict = verdicts[index]
                if (status and not status & INVALID and verdict is not None and verdict.valid
                        and verdict.claims is not None):
                    key = digest(tokens[index])
                    alg, kid, slot_key = slots[(status & 0x7F) - 1]
                    if key is not None and slot_key.kid == verdict.kid:
                        cache.put(key, CachedToken(dict(verdict.claims), verdict.claims_json,
                                                   alg, kid, slot_key))
                index += 1

    async def verify_batch(self, tokens: Sequence[str], expect: Expectation) -> list[Verdict]:
        """Verdicts in the order of ``tokens``; never raises for a token.

        The clock is read once, so every token of a batch is judged at the
        same instant.

        A large batch runs in three phases on the worker threads: the Python
        checks of every token, then the RSA verifications split across the
        threads, then claims and revocation. Splitting by phase rather than
        by token matters: a thread coming back from RSA work must retake the
        GIL, and if another thread is busy in Python it waits for the 5 ms
        switch interval. Measured on 2 cores, two threads each running the
        whole pipeline were slower than one thread; by phase, two threads
        verify about 1.3 times as many tokens per second as one.

        With the native fast path the first two phases are one C call per
        worker thread (GIL released for the whole share), then one Python
        pass finishes the tokens it answered; the tokens it handed back take
        the three phases above.
        """
        return await self._batch_at(tokens, expect, self._clock.now())

    async def _batch_at(self, tokens: Sequence[str], expect: Expectation, now: float
                        ) -> list[Verdict]:
        """verify_batch judged at ``now``: the verified-token cache first,
        then the uncached path for its misses."""
        if self._cache is None:
            return await self._batch_uncached(tokens, expect, now)
        cached, misses = self._cached_split(tokens, expect, now)
        if misses:
            done = await self._batch_uncached([tokens[i] for i in misses], expect, now)
            for i, verdict in zip(misses, done, strict=True):
                cached[i] = verdict
        return cached  # type: ignore[return-value] # every None was replaced

    async def verify_batch_wire(
        self,
        tokens: Sequence[str],
        expect: Expectation,
        *,
        allowed: frozenset[str] | None,
        reason_numbers: Mapping[Reason, int],
        request_id: str,
        at: float,
    ) -> WireBatch | None:
        """A batch through the native pipeline (``KeyTable.pipeline``): the
        response elements and audit entries of the tokens it decides, the
        verdicts of the others from the Python path. None when the pipeline
        cannot take this call (not built, nothing learned yet, no slot
        planned, or a revocation view that is stale or not in memory): then
        ``verify_batch`` answers it.

        ``allowed``: the tenants whose valid verdicts the caller may see
        (None: any); a slot of another tenant is left to the Python path and
        the caller's scoping. ``reason_numbers``: the wire value of each
        reason. ``request_id`` and ``at`` go into the audit entries as they
        are (clean them first).
        """
        native = self._native
        native_state = getattr(self._revocations, "native_state", None)
        if native is None or native_state is None or not tokens:
            return None
        snapshot = native.snapshot()
        revocations = native_state()
        if snapshot is None or revocations is None:
            return None
        plan = native.plan(snapshot.slots, expect, allowed, revocations.keys,
                           revocations.digest_prefix)
        if plan is None:
            return None
        now = self._clock.now()
        if type(tokens) is not list:
            tokens = list(tokens)
        audience = (expect.audience.encode("utf-8", "surrogatepass")
                    if expect.check_audience else None)
        reasons = tuple((reason_numbers[r], r.value) for r in PIPELINE_REASONS)
        args = (plan, audience, now, self._leeway, revocations.jtis, revocations.subjects,
                reasons, request_id, at, self._sigcache)
        table, count = snapshot.table, len(tokens)
        if count < INLINE_BATCH:
            parts = [table.pipeline(tokens, 0, count, *args)]
        else:
            loop = asyncio.get_running_loop()
            slices = max(1, min(self._threads, count // MIN_CHUNK))
            size = -(-count // slices)
            parts = await asyncio.gather(*(
                loop.run_in_executor(self._executor, table.pipeline, tokens, i, i + size, *args)
                for i in range(0, count, size)))
        wire = _merge_parts(parts, plan)
        if wire.rest:
            wire.verdicts = await self._batch_at([tokens[i] for i in wire.rest], expect, now)
        return wire

    async def _batch_uncached(
        self, tokens: Sequence[str], expect: Expectation, now: float
    ) -> list[Verdict]:
        count = len(tokens)
        if count < INLINE_BATCH:
            return self._verify_inline(tokens, expect, now)
        native = self._native
        snapshot = native.snapshot() if native is not None else None
        if native is None or snapshot is None:
            return await self._python_batch(tokens, expect, now)
        # The native phase: each worker thread runs one C call on its share
        # of the batch, GIL released for the whole share. The whole batch
        # uses this one snapshot, whatever is learned meanwhile.
        table, slots = snapshot.table, snapshot.slots
        if type(tokens) is not list:
            tokens = list(tokens)
        loop = asyncio.get_running_loop()
        executor = self._executor
        slices = max(1, min(self._threads, count // MIN_CHUNK))
        size = -(-count // slices)
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(executor, table.verify, tokens, i, i + size)
                for i in range(0, count, size)
            )
        )
        verdicts, rest = await loop.run_in_executor(
            executor, native.finish_all, tokens, parts, slots, expect, now
        )
        if self._cache is not None:
            self._fill_native(tokens, parts, slots, verdicts)
        if rest:
            others = [tokens[i] for i in rest]
            if len(others) < INLINE_BATCH:
                done = self._python_inline(others, expect, now)
            else:
                done = await self._python_batch(others, expect, now)
            for i, verdict in zip(rest, done, strict=True):
                verdicts[i] = verdict
        return verdicts  # type: ignore[return-value] # every None was replaced

    async def _python_batch(
        self, tokens: Sequence[str], expect: Expectation, now: float
    ) -> list[Verdict]:
        count = len(tokens)
        loop = asyncio.get_running_loop()
        executor = self._executor
        items = await loop.run_in_executor(executor, self._precheck_all, tokens, expect)
        slices = max(1, min(self._threads, count // MIN_CHUNK))
        size = -(-count // slices)
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(executor, _check_signatures, items[i : i + size])
                for i in range(0, count, size)
            )
        )
        signed = [ok for part in parts for ok in part]
        return await loop.run_in_executor(executor, self._finish_all, items, signed, expect, now)

    def _verify_inline(
        self, tokens: Sequence[str], expect: Expectation, now: float
    ) -> list[Verdict]:
        native = self._native
        snapshot = native.snapshot() if native is not None else None
        if native is None or snapshot is None:
            return self._python_inline(tokens, expect, now)
        parts = [snapshot.table.verify(tokens)]
        verdicts, rest = native.finish_all(tokens, parts, snapshot.slots, expect, now)
        if self._cache is not None:
            self._fill_native(tokens, parts, snapshot.slots, verdicts)
        if rest:
            done = self._python_inline([tokens[i] for i in rest], expect, now)
            for i, verdict in zip(rest, done, strict=True):
                verdicts[i] = verdict
        return verdicts  # type: ignore[return-value] # every None was replaced

    def _python_inline(
        self, tokens: Sequence[str], expect: Expectation, now: float
    ) -> list[Verdict]:
        items = self._precheck_all(tokens, expect)
        return self._finish_all(items, _check_signatures(items), expect, now)

    def _precheck_all(self, tokens: Sequence[str], expect: Expectation) -> list[Verdict | _Pending]:
        items: list[Verdict | _Pending] = []
        append = items.append
        precheck = self._precheck
        for token in tokens:
            try:
                append(precheck(token, expect))
            except Exception as exc:  # noqa: BLE001 - one token must never fail the batch
                log_unexpected(exc)
                append(MALFORMED)
        return items

    def _finish_all(
        self,
        items: Sequence[Verdict | _Pending],
        signed: Sequence[bool],
        expect: Expectation,
        now: float,
    ) -> list[Verdict]:
        verdicts: list[Verdict] = []
        append = verdicts.append
        finish = self._finish
        audience = expect.audience if expect.check_audience else None
        learn = self._native.learn if self._native is not None else None
        cache = self._cache
        for item, ok in zip(items, signed, strict=True):
            if isinstance(item, Verdict):
                append(item)
                continue
            try:
                if ok and learn is not None:
                    learn(item.signing_input, item.key)
                if ok and cache is not None and item.raw:
                    # Signed under the key the resolver selected for it.
                    cache.put(sha256(item.raw).digest(), CachedToken(
                        dict(item.payload), item.payload_bytes, item.alg, item.key.kid,
                        item.key))
                append(finish(item, ok, audience, now))
            except Exception as exc:  # noqa: BLE001 - one token must never fail the batch
                log_unexpected(exc)
                append(MALFORMED)
        return verdicts

    def _precheck(self, token: str | bytes, expect: Expectation) -> Verdict | _Pending:
        """Everything before the signature: the verdict, or the key to use.

        The header of a token is almost always one already seen (every token
        of a key shares it), so the decoded and checked (alg, kid) of an exact
        header segment is remembered and its base64, JSON and policy work is
        skipped. Anything else takes the full path of parse_compact and
        check_header, so both paths give the same verdict on every input: a
        remembered header is one that passed check_header, and the payload
        and signature are decoded exactly as parse_compact decodes them.
        """
        parsed = None
        if (
            isinstance(token, (str, bytes))
            and len(token) <= self._max_token_size
            and token.isascii()
        ):
            raw = token.encode("ascii") if isinstance(token, str) else token
            parts = raw.split(b".")
            if len(parts) == 3:
                header_b64, payload_b64, signature_b64 = parts
                parsed = self._headers.get(header_b64)
                if parsed is not None:
                    if not payload_b64 or not signature_b64:
                        return MALFORMED
                    try:
                        payload_bytes = b64url_decode(payload_b64)
                        payload = loads_strict(payload_bytes)
                        signature = b64url_decode(signature_b64)
                    except PARSE_ERRORS:
                        return MALFORMED
                    if type(payload) is not dict:
                        return MALFORMED
                    signing_input = raw[: len(header_b64) + 1 + len(payload_b64)]
        if parsed is None:
            try:
                jws = parse_compact(token, max_size=self._max_token_size)
                # The issuer's own allowlist is applied below, once it is known.
                parsed = check_header(jws.header, ASYMMETRIC_ALGORITHMS)
            except TokenError as exc:
                return Verdict(False, exc.verdict_reason)
            headers = self._headers
            if len(headers) >= HEADER_CACHE_SIZE:
                headers.clear()
            headers[jws.signing_input.partition(b".")[0]] = parsed
            payload, payload_bytes = jws.payload, jws.payload_bytes
            signing_input, signature = jws.signing_input, jws.signature
            raw = token.encode("ascii") if isinstance(token, str) else token
        alg, kid = parsed
        resolved = self._resolve(payload, alg, kid, expect)
        if type(resolved) is Verdict:
            return resolved
        key, tenant, iss = resolved  # type: ignore[misc]
        return _Pending(signing_input, signature, payload, payload_bytes, key, tenant, iss,
                        alg, raw)

    def _resolve(
        self, payload: dict[str, Any], alg: str, kid: str, expect: Expectation
    ) -> Verdict | tuple[VerificationKey, str, str]:
        """The key of this token's issuer for (alg, kid), or the verdict."""
        # From here on everything is per token: the kid is looked up among
        # the keys of the issuer that THIS token's payload names.
        iss = payload.get("iss")
        if type(iss) is not str or not iss:
            missing = "iss" not in payload
            return Verdict(
                False, Reason.MISSING_CLAIM if missing else Reason.INVALID_CLAIM, kid=kid
            )
        issuer_keys = self._resolver.issuer_keys(iss)
        if issuer_keys is None:
            return Verdict(False, Reason.UNTRUSTED_ISSUER, kid=kid)
        if not issuer_keys.local:
            return self._resolve_foreign(issuer_keys, iss, alg, kid, expect)
        tenant = issuer_keys.tenant
        if expect.issuer and expect.issuer != iss:
            return Verdict(False, Reason.ISSUER_MISMATCH, tenant, iss, kid)
        if expect.tenant and expect.tenant != tenant:
            return Verdict(False, Reason.TENANT_MISMATCH, tenant, iss, kid)
        if alg not in issuer_keys.allowed_algorithms:
            return Verdict(False, Reason.UNSUPPORTED_ALGORITHM, tenant, iss, kid)

        key = issuer_keys.keys.get(kid)
        if key is None:
            reason = self._missing_key_reason(kid, tenant, issuer_keys.withdrawn.get(kid))
            return Verdict(False, reason, tenant, iss, kid)
        # The key fixes the algorithm: an RS256 key never verifies PS256 and
        # the reverse, whatever the header says (RFC 8725 section 3.1).
        if key.alg != alg:
            return Verdict(False, Reason.UNSUPPORTED_ALGORITHM, tenant, iss, kid)
        return key, tenant, iss

    @staticmethod
    def _resolve_foreign(
        issuer_keys: IssuerKeys, iss: str, alg: str, kid: str, expect: Expectation
    ) -> Verdict | tuple[VerificationKey, str, str]:
        """A trusted foreign issuer's key, in the context of the tenant the
        caller names: isolation extends to trust, so a foreign token verifies
        only for a tenant that trusts its issuer, and never without one."""
        tenant = expect.tenant
        if expect.issuer and expect.issuer != iss:
            return Verdict(False, Reason.ISSUER_MISMATCH, tenant, iss, kid, foreign=True)
        if not tenant or tenant not in issuer_keys.trusted_by:
            return Verdict(False, Reason.UNTRUSTED_ISSUER, tenant, iss, kid, foreign=True)
        if (issuer_keys.audiences and expect.check_audience
                and expect.audience not in issuer_keys.audiences):
            return Verdict(False, Reason.AUDIENCE_MISMATCH, tenant, iss, kid, foreign=True)
        if alg not in issuer_keys.allowed_algorithms:
            return Verdict(False, Reason.UNSUPPORTED_ALGORITHM, tenant, iss, kid, foreign=True)
        key = issuer_keys.keys.get(kid)
        if key is None:
            return Verdict(False, Reason.UNKNOWN_KEY, tenant, iss, kid, foreign=True)
        if key.alg != alg:
            return Verdict(False, Reason.UNSUPPORTED_ALGORITHM, tenant, iss, kid, foreign=True)
        return key, tenant, iss

    def _finish(self, item: _Pending, signed: bool, audience: str | None, now: float) -> Verdict:
        """Everything after the signature check."""
        tenant, iss, kid = item.tenant, item.issuer, item.key.kid
        if not signed:
            return Verdict(False, Reason.BAD_SIGNATURE, tenant, iss, kid, foreign=item.key.foreign)
        # The payload is authentic from here on, so its claims may be reported.
        payload = item.payload
        reason = check_claims(payload, now=now, leeway=self._leeway, audience=audience)
        return self._conclude_checked(reason, payload, item.payload_bytes, tenant, iss, kid,
                                      item.key.foreign)

    def _conclude_checked(
        self,
        reason: Reason | None,
        payload: dict[str, Any],
        payload_bytes: bytes,
        tenant: str,
        iss: str,
        kid: str,
        foreign: bool = False,
    ) -> Verdict:
        """The verdict on an authentic payload; ``reason`` is check_claims'."""
        sub, jti, exp = payload.get("sub"), payload.get("jti"), payload.get("exp")
        subject = sub if type(sub) is str else ""
        jti_s = jti if type(jti) is str else ""
        expires_at = exp if type(exp) is int else 0
        if reason is None:
            # check_claims has proven iat a bounded int (it is required).
            if foreign:
                reason = self._revocations.check(
                    tenant, foreign_ref(iss, jti_s), foreign_ref(iss, subject), payload["iat"],
                    foreign_ref(iss, kid))
            else:
                reason = self._revocations.check(tenant, jti_s, subject, payload["iat"], kid)
        if reason is not None:
            return Verdict(False, reason, tenant, iss, kid, subject, jti_s, expires_at,
                           foreign=foreign)
        return Verdict(
            True, Reason.OK, tenant, iss, kid, subject, jti_s, expires_at, payload_bytes, payload,
            foreign,
        )

    def _missing_key_reason(self, kid: str, tenant: str, withdrawn: KeyState | None) -> Reason:
        if withdrawn is KeyState.COMPROMISED:
            return Reason.KEY_REVOKED
        if withdrawn is not None:
            return Reason.KEY_INACTIVE
        owner = self._resolver.tenant_of_kid(kid)
        # keys are scoped to their issuer (hydra #3428): a kid of tenant A
        # under tenant B's iss is a cross-tenant attempt, not an unknown key.
        if owner is not None and owner != tenant:
            return Reason.TENANT_MISMATCH
        return Reason.UNKNOWN_KEY
