"""JWT claims: validation of a verified payload, and construction at issuance.

Time claims (exp, nbf, iat) are accepted as JSON integers only. RFC 7519
allows any NumericDate, fractions included, but fedtoken's issuers emit
integers, and RFC 8725 section 3 asks verifiers to be strict about what they
accept: refusing floats, numeric strings and booleans removes a whole family
of comparison and rounding differences between verifiers (a "1e10" string,
``true`` compared as 1, a NaN never being expired).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from fedtoken.core.errors import ErrorReason, InvalidRequest
from fedtoken.core.jose import loads_strict
from fedtoken.core.model import Reason

DEFAULT_REQUIRED: Final = ("iss", "sub", "exp", "iat", "jti")
# 9999-12-31T23:59:59Z: the largest instant most platforms can represent;
# anything later is an attempt to overflow someone's date arithmetic.
MAX_NUMERIC_DATE: Final = 253402300799
MAX_EXTRA_CLAIMS_BYTES: Final = 8192

# Claims the service sets itself and a caller of Issue may never supply:
# the registered claims (RFC 7519 section 4.1), the tenant, the RFC 9068
# client_id and scope (build_claims takes them from the request so extra
# claims cannot forge them), names of JOSE header members (kid, alg, typ,
# cty, crit, jku, jwk, x5u, x5c: a verifier that merges header and payload
# must not be misled), and the RFC 7800 confirmation and RFC 8693 actor
# claims, which bind a token to a key or a delegation only the service may
# assert.
RESERVED_CLAIMS: Final = frozenset(
    {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "tenant", "client_id", "scope",
     "kid", "alg", "typ", "cty", "crit", "jku", "jwk", "x5u", "x5c", "cnf", "act"}
)

_TIME_CLAIMS: Final = ("exp", "nbf", "iat")
_STRING_CLAIMS: Final = ("iss", "sub", "jti")


def is_numeric_date(value: object) -> bool:
    # type() rather than isinstance(): bool is a subclass of int.
    return type(value) is int and 0 <= value <= MAX_NUMERIC_DATE


def _valid_string(value: object) -> bool:
    return type(value) is str and value != ""


def check_claims(
    payload: Mapping[str, Any],
    *,
    now: float,
    leeway: int,
    audience: str | None,
    required: tuple[str, ...] = DEFAULT_REQUIRED,
) -> Reason | None:
    """Check the claims of a token whose signature has been verified.

    Returns None when the claims are acceptable, else the reason to refuse.
    Structure and types are checked before time, and time before audience,
    so a token broken in several ways always gets the same reason.

    ``audience`` is what the caller expects; "" means the caller expects a
    token without any audience (a token naming one is not meant for it), and
    None skips the comparison for introspection, which reports aud to its
    caller instead (RFC 7662 section 2.2); aud is still type-checked.
    """
    for name in required:
        if name not in payload:
            return Reason.MISSING_CLAIM
    for name in _TIME_CLAIMS:
        if name in payload and not is_numeric_date(payload[name]):
            return Reason.INVALID_CLAIM
    for name in _STRING_CLAIMS:
        if name in payload and not _valid_string(payload[name]):
            return Reason.INVALID_CLAIM
    if "aud" in payload:
        aud = payload["aud"]
        # RFC 7519 section 4.1.3: a string or an array of strings. An empty
        # array or empty strings can only be mistakes, so they are refused.
        if not _valid_string(aud) and (
            type(aud) is not list or not aud or not all(_valid_string(a) for a in aud)
        ):
            return Reason.INVALID_CLAIM

    exp = payload.get("exp")
    if exp is not None and exp <= now - leeway:
        return Reason.EXPIRED
    nbf = payload.get("nbf")
    if nbf is not None and nbf > now + leeway:
        return Reason.NOT_YET_VALID
    iat = payload.get("iat")
    if iat is not None and iat > now + leeway:
        return Reason.ISSUED_IN_FUTURE

    if audience is None:
        return None
    if not audience:
        return Reason.AUDIENCE_MISMATCH if "aud" in payload else None
    aud = payload.get("aud")
    if aud == audience or (type(aud) is list and audience in aud):
        return None
    return Reason.AUDIENCE_MISMATCH


def _refuse_reserved(extra: Mapping[str, Any]) -> None:
    clash = RESERVED_CLAIMS.intersection(extra)
    if clash:
        name = min(clash)  # deterministic, whatever the dict order
        raise InvalidRequest(
            f"claim {name!r} is set by the service and cannot be supplied",
            reason=ErrorReason.RESERVED_CLAIM,
            field=name,
        )


def validate_extra_claims(
    extra_json: str, max_bytes: int = MAX_EXTRA_CLAIMS_BYTES
) -> dict[str, Any]:
    """Parse the caller-supplied extra claims of an Issue request.

    "" means no extra claims. The JSON must be an object of at most
    ``max_bytes`` UTF-8 bytes, parsed as strictly as a token payload (no
    duplicate names, no NaN, bounded depth), and name no reserved claim.
    """
    if not extra_json:
        return {}
    # surrogatepass: a lone surrogate becomes invalid UTF-8 that loads_strict
    # refuses, instead of a UnicodeEncodeError escaping from here.
    data = extra_json.encode("utf-8", errors="surrogatepass")
    if len(data) > max_bytes:
        raise InvalidRequest(
            f"extra claims exceed {max_bytes} bytes", reason=ErrorReason.INVALID_CLAIMS
        )
    try:
        extra = loads_strict(data)
    except ValueError as exc:
        raise InvalidRequest(
            "extra claims are not strict JSON (check for duplicate names, NaN, "
            "invalid UTF-8 or deep nesting)",
            reason=ErrorReason.INVALID_CLAIMS,
        ) from exc
    if type(extra) is not dict:
        raise InvalidRequest(
            "extra claims must be a JSON object", reason=ErrorReason.INVALID_CLAIMS
        )
    _refuse_reserved(extra)
    return extra


def build_claims(
    *,
    issuer: str,
    subject: str,
    audience: list[str],
    issued_at: int,
    lifetime: int,
    jti: str,
    extra: Mapping[str, Any],
    scope: str = "",
    client_id: str = "",
) -> dict[str, Any]:
    """The claims of a new token.

    ``lifetime`` must already be bounded by the tenant's policy (the caller
    knows the policy; this function only refuses what no policy allows).
    A single audience is emitted as a string, several as an array (RFC 7519
    section 4.1.3), which is what most verifiers handle best.
    """
    if not audience or not all(_valid_string(a) for a in audience):
        raise InvalidRequest("audience must name at least one non-empty value", field="audience")
    if not _valid_string(subject):
        raise InvalidRequest("subject must be a non-empty string", field="subject")
    if type(lifetime) is not int or lifetime <= 0:
        raise InvalidRequest("lifetime must be a positive number of seconds", field="lifetime")
    if not is_numeric_date(issued_at) or not is_numeric_date(issued_at + lifetime):
        raise InvalidRequest("issued_at or expiry out of range", field="issued_at")
    _refuse_reserved(extra)
    claims: dict[str, Any] = dict(extra)
    claims.update(
        iss=issuer,
        sub=subject,
        aud=audience[0] if len(audience) == 1 else list(audience),
        iat=issued_at,
        nbf=issued_at,
        exp=issued_at + lifetime,
        jti=jti,
    )
    if scope:
        claims["scope"] = scope
    if client_id:
        claims["client_id"] = client_id
    return claims
