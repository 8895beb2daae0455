"""The verification engine: one token or a batch, to verdicts.

Every check that can be made without a signature is made first (they cost
microseconds, the RSA verification tens of them), but nothing read from the
token is reported as a fact until the signature holds: before that point a
verdict carries only what our own trust store vouches for (tenant, issuer,
and the kid that matched).

Batches use threads because ``cryptography`` releases the GIL while it
verifies an RSA signature, so the RSA work of a batch spreads over the cores
(see ``verify_batch`` for why the work is split by phase).

The optional native fast path (``fedtoken._native``, built by setup.py when a
compiler and the OpenSSL headers are present) does the split, the strict
base64url decoding and the RS256 verification of a run of tokens in C with
the GIL released, for tokens whose exact header segment the Python path has
already seen verify under a known key. Everything else stays here: header
policy (the native table holds only header segments this module vetted),
the payload JSON, issuer and key selection (a native result counts only if
the key Python selects for the token IS the key the native code used;
otherwise the token takes the Python path), claims and revocation. Any
token the native code does not fully understand is handed back to Python.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedtoken.core.claims import check_claims
from fedtoken.core.jose import (
    DEFAULT_MAX_TOKEN_SIZE,
    check_header,
    loads_strict,
    parse_compact,
    verify_signature,
)
from fedtoken.core.jwk import b64url_decode
from fedtoken.core.model import ASYMMETRIC_ALGORITHMS, Expectation, KeyState, Reason, Verdict
from fedtoken.core.ports import Clock, KeyResolver, RevocationView, VerificationKey
from fedtoken.core.errors import TokenError

log = logging.getLogger(__name__)

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

# Header segments (with their key) the native path may take; a power of
# headers far beyond what real issuers use, and under the native limit of 127.
NATIVE_SLOTS: Final = 64
# Status bytes of fedtoken._native.KeyTable.verify.
_NATIVE_FALLBACK: Final = 0
_NATIVE_INVALID: Final = 0x80
_NATIVE_ALG: Final = "RS256"
# Results of fedtoken._native.check_claims, by index (-1: undecided).
_CLAIM_REASONS: Final = (
    None,
    Reason.MISSING_CLAIM,
    Reason.INVALID_CLAIM,
    Reason.EXPIRED,
    Reason.NOT_YET_VALID,
    Reason.ISSUED_IN_FUTURE,
    Reason.AUDIENCE_MISMATCH,
)
_NATIVE_MAX_BITS: Final = 8192


def _load_native() -> Any:
    try:
        module = importlib.import_module("fedtoken._native")
    except ImportError:
        return None
    # Without the built extension, the directory of its C sources imports
    # as an empty namespace package.
    return module if hasattr(module, "KeyTable") else None


# The compiled fast path, or None when it was not built (verdicts are the
# same either way; only the speed differs).
_NATIVE: Final[Any] = _load_native()
NATIVE_AVAILABLE: Final = _NATIVE is not None

_MALFORMED: Final = Verdict(False, Reason.MALFORMED)
_PARSE_ERRORS: Final = (ValueError, TypeError, RecursionError)


def _log_unexpected(exc: Exception) -> None:
    # The exception's message may quote the token, so only its type and the
    # stack are logged.
    log.error(
        "unexpected %s while verifying a token; answered MALFORMED\n%s",
        type(exc).__name__,
        "".join(traceback.format_tb(exc.__traceback__)),
    )


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

    Thread-safe: it holds no mutable state of its own; the resolver and the
    revocation view are read-mostly structures swapped or guarded by their
    owners.
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
    ) -> None:
        """``native``: use the native fast path (None: when it is built;
        True: required, ImportError if it is not built; False: never)."""
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if native and _NATIVE is None:
            raise ImportError("fedtoken._native is not built")
        self._resolver = resolver
        self._revocations = revocations
        self._clock = clock
        self._leeway = leeway
        self._max_token_size = max_token_size
        self._threads = threads
        # header segment -> (alg, kid), for headers that parsed and passed
        # check_header; filled by _precheck, read without a lock (dict get
        # and set are atomic in CPython; a lost insert only costs a reparse).
        self._headers: dict[bytes, tuple[str, str]] = {}
        self._executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="fedtoken-verify"
        )
        self._native_on: bool = _NATIVE is not None and native is not False
        # header segment -> (alg, kid, key): headers the Python path saw
        # verify under that key (learned in _finish_all); the native table
        # and its slots are rebuilt from it when it changed.
        self._native_entries: dict[bytes, tuple[str, str, VerificationKey]] = {}
        self._native_dirty = False
        self._native_state: tuple[Any, tuple[tuple[str, str, VerificationKey], ...]] | None = None

    @property
    def native(self) -> bool:
        """Whether this engine uses the native fast path."""
        return self._native_on

    def close(self) -> None:
        """Stop the worker threads (after the batches in flight finish)."""
        self._executor.shutdown(wait=True)

    def verify(self, token: str, expect: Expectation) -> Verdict:
        """The verdict on one token. Never raises."""
        return self._verify_inline([token], expect, self._clock.now())[0]

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
        now = self._clock.now()
        count = len(tokens)
        if count < INLINE_BATCH:
            return self._verify_inline(tokens, expect, now)
        native = self._native_snapshot()
        if native is None:
            return await self._python_batch(tokens, expect, now)
        # The native phase: each worker thread runs one C call on its share
        # of the batch, GIL released for the whole share.
        table, slots = native
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
            executor, self._native_finish_all, tokens, parts, slots, expect, now
        )
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
        native = self._native_snapshot()
        if native is None:
            return self._python_inline(tokens, expect, now)
        table, slots = native
        verdicts, rest = self._native_finish_all(tokens, [table.verify(tokens)], slots, expect, now)
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

    # --- native fast path ---------------------------------------------------

    def _native_snapshot(
        self,
    ) -> tuple[Any, tuple[tuple[str, str, VerificationKey], ...]] | None:
        if not self._native_on:
            return None
        if self._native_dirty:
            self._native_dirty = False
            entries = list(self._native_entries.items())
            rows, slots = [], []
            for header, slot in entries:
                der = slot[2].public_key.public_bytes(
                    Encoding.DER, PublicFormat.SubjectPublicKeyInfo
                )
                rows.append((header, der))
                slots.append(slot)
            try:
                table = _NATIVE.KeyTable(rows, self._max_token_size)
            except ValueError:  # pragma: no cover - keys are vetted in _learn
                log.exception("native key table refused; using the Python path")
                self._native_entries.clear()
                self._native_state = None
                return None
            self._native_state = (table, tuple(slots))
        return self._native_state

    def _learn(self, item: _Pending) -> None:
        """Table the header segment of a token that verified under item.key."""
        key = item.key
        if (
            key.alg != _NATIVE_ALG
            or not isinstance(key.public_key, RSAPublicKey)
            or key.public_key.key_size > _NATIVE_MAX_BITS
        ):
            return
        signing_input = item.signing_input
        header = signing_input[: signing_input.index(b".")]
        entries = self._native_entries
        known = entries.get(header)
        if known is not None and known[2] is key:
            return
        parsed = self._headers.get(header)
        if parsed is None or parsed[0] != key.alg:
            return
        if len(entries) >= NATIVE_SLOTS and known is None:
            entries.clear()
        entries[header] = (parsed[0], parsed[1], key)
        self._native_dirty = True

    def _native_finish_all(
        self,
        tokens: Sequence[str],
        parts: Sequence[tuple[bytes, list[bytes | None], list[dict[str, Any] | None]]],
        slots: tuple[tuple[str, str, VerificationKey], ...],
        expect: Expectation,
        now: float,
    ) -> tuple[list[Verdict | None], list[int]]:
        """Verdicts of the tokens the native code checked; None, and the
        index in the second list, for every token the Python path must take."""
        verdicts: list[Verdict | None] = []
        append = verdicts.append
        rest: list[int] = []
        audience = expect.audience if expect.check_audience else None
        native_verdict = self._native_verdict
        # (iss, slot) -> what _resolve answered: it depends on nothing else,
        # and a batch is judged against one state of the resolver.
        memo: dict[tuple[str, int], Verdict | tuple[VerificationKey, str, str]] = {}
        index = 0
        for statuses, payloads, claims in parts:
            for status, payload_bytes, payload in zip(statuses, payloads, claims, strict=True):
                verdict = None
                if status != _NATIVE_FALLBACK:
                    try:
                        verdict = native_verdict(
                            status, payload_bytes, payload, slots, expect, audience, now, memo  # type: ignore[arg-type]
                        )
                    except Exception as exc:  # noqa: BLE001 - one token must never fail the batch
                        _log_unexpected(exc)
                        verdict = _MALFORMED
                if verdict is None:
                    rest.append(index)
                append(verdict)
                index += 1
        if index != len(tokens):  # pragma: no cover - the C code answers every token
            raise RuntimeError("native verify answered a different number of tokens")
        return verdicts, rest

    def _native_verdict(
        self,
        status: int,
        payload_bytes: bytes,
        payload: dict[str, Any] | None,
        slots: tuple[tuple[str, str, VerificationKey], ...],
        expect: Expectation,
        audience: str | None,
        now: float,
        memo: dict[tuple[str, int], Verdict | tuple[VerificationKey, str, str]],
    ) -> Verdict | None:
        """The verdict on a token whose header, base64url and signature the
        native code checked against ``slots[status & 0x7F - 1]``; None when
        the key this token must be checked with is another one.

        ``payload`` is the native scanner's parse of a flat payload (what
        loads_strict returns for it), or None: then loads_strict decides.
        """
        slot = status & 0x7F
        alg, kid, slot_key = slots[slot - 1]
        # As the cached-header branch of _precheck, from the decoded payload.
        scanned = payload is not None
        if payload is None:
            try:
                payload = loads_strict(payload_bytes)
            except _PARSE_ERRORS:
                return _MALFORMED
            if type(payload) is not dict:
                return _MALFORMED
        iss = payload.get("iss")
        if type(iss) is str:
            memo_key = (iss, slot)
            resolved = memo.get(memo_key)
            if resolved is None:
                resolved = memo[memo_key] = self._resolve(payload, alg, kid, expect)
        else:
            resolved = self._resolve(payload, alg, kid, expect)
        if type(resolved) is Verdict:
            return resolved
        key, tenant, iss = resolved  # type: ignore[misc]
        if key is not slot_key:
            return None
        if status & _NATIVE_INVALID:
            return Verdict(False, Reason.BAD_SIGNATURE, tenant, iss, key.kid)
        code = _NATIVE.check_claims(payload, now, self._leeway, audience) if scanned else -1
        if code < 0:
            reason = check_claims(payload, now=now, leeway=self._leeway, audience=audience)
        else:
            reason = _CLAIM_REASONS[code]
        return self._conclude_checked(reason, payload, payload_bytes, tenant, iss, key.kid)

    def _precheck_all(self, tokens: Sequence[str], expect: Expectation) -> list[Verdict | _Pending]:
        items: list[Verdict | _Pending] = []
        append = items.append
        precheck = self._precheck
        for token in tokens:
            try:
                append(precheck(token, expect))
            except Exception as exc:  # noqa: BLE001 - one token must never fail the batch
                _log_unexpected(exc)
                append(_MALFORMED)
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
        learn = self._learn if self._native_on else None
        for item, ok in zip(items, signed, strict=True):
            if isinstance(item, Verdict):
                append(item)
                continue
            try:
                if ok and learn is not None:
                    learn(item)
                append(finish(item, ok, audience, now))
            except Exception as exc:  # noqa: BLE001 - one token must never fail the batch
                _log_unexpected(exc)
                append(_MALFORMED)
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
                        return _MALFORMED
                    try:
                        payload_bytes = b64url_decode(payload_b64)
                        payload = loads_strict(payload_bytes)
                        signature = b64url_decode(signature_b64)
                    except _PARSE_ERRORS:
                        return _MALFORMED
                    if type(payload) is not dict:
                        return _MALFORMED
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
        alg, kid = parsed
        resolved = self._resolve(payload, alg, kid, expect)
        if type(resolved) is Verdict:
            return resolved
        key, tenant, iss = resolved  # type: ignore[misc]
        return _Pending(signing_input, signature, payload, payload_bytes, key, tenant, iss)

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

    def _finish(self, item: _Pending, signed: bool, audience: str | None, now: float) -> Verdict:
        """Everything after the signature check."""
        tenant, iss, kid = item.tenant, item.issuer, item.key.kid
        if not signed:
            return Verdict(False, Reason.BAD_SIGNATURE, tenant, iss, kid)
        # The payload is authentic from here on, so its claims may be reported.
        payload = item.payload
        reason = check_claims(payload, now=now, leeway=self._leeway, audience=audience)
        return self._conclude_checked(reason, payload, item.payload_bytes, tenant, iss, kid)

    def _conclude_checked(
        self,
        reason: Reason | None,
        payload: dict[str, Any],
        payload_bytes: bytes,
        tenant: str,
        iss: str,
        kid: str,
    ) -> Verdict:
        """The verdict on an authentic payload; ``reason`` is check_claims'."""
        sub, jti, exp = payload.get("sub"), payload.get("jti"), payload.get("exp")
        subject = sub if type(sub) is str else ""
        jti_s = jti if type(jti) is str else ""
        expires_at = exp if type(exp) is int else 0
        if reason is None:
            # check_claims has proven iat a bounded int (it is required).
            reason = self._revocations.check(tenant, jti_s, subject, payload["iat"], kid)
        if reason is not None:
            return Verdict(False, reason, tenant, iss, kid, subject, jti_s, expires_at)
        return Verdict(
            True, Reason.OK, tenant, iss, kid, subject, jti_s, expires_at, payload_bytes, payload
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
