"""The verification engine: one token or a batch, to verdicts.

Every check that can be made without a signature is made first (they cost
microseconds, the RSA verification tens of them), but nothing read from the
token is reported as a fact until the signature holds: before that point a
verdict carries only what our own trust store vouches for (tenant, issuer,
and the kid that matched).

Batches use threads because ``cryptography`` releases the GIL while it
verifies an RSA signature, so two threads keep two cores busy while the
Python part of each token (about a third of its cost) takes turns.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from fedtoken.core.claims import check_claims
from fedtoken.core.jose import DEFAULT_MAX_TOKEN_SIZE, check_header, parse_compact, verify_signature
from fedtoken.core.model import ASYMMETRIC_ALGORITHMS, Expectation, KeyState, Reason, Verdict
from fedtoken.core.ports import Clock, KeyResolver, RevocationView
from fedtoken.errors import TokenError

log = logging.getLogger(__name__)

# Below this many tokens a batch is verified on the calling thread: handing
# it to a worker would cost more than the work (under a millisecond).
INLINE_BATCH: Final = 32
# The smallest chunk worth a thread hop; a batch is split into at most one
# chunk per worker thread.
MIN_CHUNK: Final = 64


def _reason_of(exc: TokenError) -> Reason:
    reason = exc.verdict_reason
    return reason if isinstance(reason, Reason) else Reason.MALFORMED


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
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._resolver = resolver
        self._revocations = revocations
        self._clock = clock
        self._leeway = leeway
        self._max_token_size = max_token_size
        self._threads = threads
        self._executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="fedtoken-verify"
        )

    def close(self) -> None:
        """Stop the worker threads (after the batches in flight finish)."""
        self._executor.shutdown(wait=True)

    def verify(self, token: str, expect: Expectation) -> Verdict:
        """The verdict on one token. Never raises."""
        return self._verify_many([token], expect, self._clock.now())[0]

    async def verify_batch(self, tokens: Sequence[str], expect: Expectation) -> list[Verdict]:
        """Verdicts in the order of ``tokens``; never raises for a token.

        The clock is read once, so every token of a batch is judged at the
        same instant.
        """
        now = self._clock.now()
        count = len(tokens)
        if count < INLINE_BATCH:
            return self._verify_many(tokens, expect, now)
        chunks = max(1, min(self._threads, count // MIN_CHUNK))
        size = -(-count // chunks)
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._executor, self._verify_many, tokens[i : i + size], expect, now
                )
                for i in range(0, count, size)
            )
        )
        return [verdict for part in parts for verdict in part]

    def _verify_many(self, tokens: Sequence[str], expect: Expectation, now: float) -> list[Verdict]:
        verdicts: list[Verdict] = []
        append = verdicts.append
        verify_one = self._verify_one
        for token in tokens:
            try:
                append(verify_one(token, expect, now))
            except Exception as exc:  # noqa: BLE001 - one token must never fail the batch
                # The exception's message may quote the token, so only its type
                # and the stack are logged.
                log.error(
                    "unexpected %s while verifying a token; answered MALFORMED\n%s",
                    type(exc).__name__,
                    "".join(traceback.format_tb(exc.__traceback__)),
                )
                append(Verdict(False, Reason.MALFORMED))
        return verdicts

    def _verify_one(self, token: str, expect: Expectation, now: float) -> Verdict:
        try:
            jws = parse_compact(token, max_size=self._max_token_size)
            # The issuer's own allowlist is applied below, once it is known.
            alg, kid = check_header(jws.header, ASYMMETRIC_ALGORITHMS)
        except TokenError as exc:
            return Verdict(False, _reason_of(exc))
        payload = jws.payload

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
            return Verdict(
                False,
                self._missing_key_reason(kid, tenant, issuer_keys.withdrawn.get(kid)),
                tenant,
                iss,
                kid,
            )
        # The key fixes the algorithm: an RS256 key never verifies PS256 and
        # the reverse, whatever the header says (RFC 8725 section 3.1).
        if key.alg != alg:
            return Verdict(False, Reason.UNSUPPORTED_ALGORITHM, tenant, iss, kid)
        if not verify_signature(alg, key.public_key, jws.signing_input, jws.signature):
            return Verdict(False, Reason.BAD_SIGNATURE, tenant, iss, kid)

        # The payload is authentic from here on, so its claims may be reported.
        sub, jti, exp = payload.get("sub"), payload.get("jti"), payload.get("exp")
        subject = sub if type(sub) is str else ""
        jti_s = jti if type(jti) is str else ""
        expires_at = exp if type(exp) is int else 0
        reason: Reason | None = check_claims(
            payload,
            now=now,
            leeway=self._leeway,
            audience=expect.audience if expect.check_audience else None,
        )
        if reason is None:
            # check_claims has proven iat a bounded int (it is required).
            reason = self._revocations.check(tenant, jti_s, subject, payload["iat"], kid)
        if reason is not None:
            return Verdict(False, reason, tenant, iss, kid, subject, jti_s, expires_at)
        return Verdict(
            True,
            Reason.OK,
            tenant,
            iss,
            kid,
            subject,
            jti_s,
            expires_at,
            claims_json=jws.payload_bytes,
            claims=payload,
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
