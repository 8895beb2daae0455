"""Core results to protobuf messages (the hot half of Verify and VerifyBatch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedtoken.core.claims import is_numeric_date
from fedtoken.core.model import Reason, Verdict
from fedtoken_client._pb.fedtoken.v1 import common_pb2, token_service_pb2

# Enum values are plain ints at run time; the stubs type them as NewTypes.
REASON_PB: dict[Reason, Any] = {r: common_pb2.Reason.Value(r.value) for r in Reason}


def verdict_pb(v: Verdict) -> token_service_pb2.Verdict:
    return token_service_pb2.Verdict(**_verdict_fields(v))


def verify_batch_response(verdicts: Sequence[Verdict]) -> token_service_pb2.VerifyBatchResponse:
    """The VerifyBatchResponse of ``verdicts``, built in place.

    ``VerifyBatchResponse(verdicts=[verdict_pb(v) ...])`` builds every Verdict
    message twice (once standalone, once copied into the repeated field);
    ``verdicts.add`` builds each one directly inside the response.
    """
    response = token_service_pb2.VerifyBatchResponse()
    add = response.verdicts.add
    for v in verdicts:
        add(**_verdict_fields(v))
    return response


def _verdict_fields(v: Verdict) -> dict[str, Any]:
    return {
        "valid": v.valid,
        "reason": REASON_PB[v.reason],
        "tenant": v.tenant,
        "issuer": v.issuer,
        "kid": v.kid,
        "subject": v.subject,
        "jti": v.jti,
        # An invalid token's own exp can be anything (10**30): reporting it
        # must never fail the call, so out-of-range values go out as 0.
        "expires_at": v.expires_at if is_numeric_date(v.expires_at) else 0,
        "claims_json": v.claims_json,
    }
