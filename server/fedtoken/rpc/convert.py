"""Core results to protobuf messages (the hot half of Verify and VerifyBatch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedtoken.core.model import Reason, Verdict
from fedtoken_client._pb.fedtoken.v1 import common_pb2, token_service_pb2

# Enum values are plain ints at run time; the stubs type them as NewTypes.
REASON_PB: dict[Reason, Any] = {r: common_pb2.Reason.Value(r.value) for r in Reason}


def verdict_pb(v: Verdict) -> token_service_pb2.Verdict:
    return token_service_pb2.Verdict(
        valid=v.valid,
        reason=REASON_PB[v.reason],
        tenant=v.tenant,
        issuer=v.issuer,
        kid=v.kid,
        subject=v.subject,
        jti=v.jti,
        expires_at=_epoch(v.expires_at),
        claims_json=v.claims_json,
    )


def verify_batch_response(verdicts: Sequence[Verdict]) -> token_service_pb2.VerifyBatchResponse:
    """The VerifyBatchResponse of ``verdicts``, built in place.

    ``VerifyBatchResponse(verdicts=[verdict_pb(v) ...])`` builds every Verdict
    message twice (once standalone, once copied into the repeated field);
    ``verdicts.add`` builds each one directly inside the response.
    """
    response = token_service_pb2.VerifyBatchResponse()
    add = response.verdicts.add
    reason_pb = REASON_PB
    for v in verdicts:
        add(
            valid=v.valid,
            reason=reason_pb[v.reason],
            tenant=v.tenant,
            issuer=v.issuer,
            kid=v.kid,
            subject=v.subject,
            jti=v.jti,
            expires_at=_epoch(v.expires_at),
            claims_json=v.claims_json,
        )
    return response


def _epoch(value: object) -> int:
    """A verdict's exp as the wire's int64: an invalid token's own claim can be
    anything (10**30, a float), and reporting it must never fail the call."""
    if type(value) is int and 0 <= value <= _MAX_EPOCH:
        return value
    return 0


_MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the bound claims accept
