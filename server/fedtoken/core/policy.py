"""Input rules, each written once: identifiers, subjects, audiences, issuer
URLs, key sizes and tenant policies.

The service layer applies them to every request; the store, the HSM adapter
and the configuration reuse the same functions, so a bound lives in exactly
one place.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

from fedtoken.core.claims import MAX_NUMERIC_DATE
from fedtoken.core.errors import InvalidRequest, PolicyViolation
from fedtoken.core.model import MAX_RSA_BITS, MIN_RSA_BITS, SIGNING_ALGORITHMS, TenantPolicy

# \Z, not $: "$" also matches before a trailing newline.
TENANT_ID: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
MAX_SUBJECT: Final = 255
MAX_AUDIENCES: Final = 16
MAX_AUDIENCE: Final = 255
MAX_JTI: Final = 256
MAX_SCOPE: Final = 1024
MAX_CLIENT_ID: Final = 255
MAX_REASON: Final = 200
MAX_ISSUER_URL: Final = 512
MAX_KID: Final = 128
MAX_EVENT_TYPE: Final = 64
# The latest instant any timestamp field may name: 9999-12-31T23:59:59Z, the
# same bound as a token's NumericDate claims.
MAX_TIMESTAMP: Final = MAX_NUMERIC_DATE
MAX_TOKEN_LIFETIME_CEILING: Final = 7 * 86400
MIN_TOKEN_LIFETIME_CEILING: Final = 60
_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def is_text(value: str) -> bool:
    """Printable Unicode only: no NUL, no C0/C1 controls, no format characters
    (bidi overrides, zero-width joiners), no lone surrogates, no line breaks."""
    return value.isprintable()


def check_text(value: str, field: str, limit: int, *, required: bool = False) -> str:
    """The one rule for every string a request carries into a token, the
    store or the audit trail. Messages never echo the value."""
    if required and not value:
        raise InvalidRequest(f"{field} is required", field=field)
    if len(value) > limit:
        raise InvalidRequest(f"{field} is limited to {limit} characters", field=field)
    if not is_text(value):
        raise InvalidRequest(f"{field} must be printable text (no control or format characters)",
                             field=field)
    return value


def check_timestamp(value: int, field: str, *, allow_zero: bool = True) -> int:
    """Unix seconds between 1970 and the end of year 9999 (0: unset)."""
    if not (0 if allow_zero else 1) <= value <= MAX_TIMESTAMP:
        raise InvalidRequest(f"{field} must be Unix seconds between 1 and {MAX_TIMESTAMP}",
                             field=field)
    return value


def is_tenant_id(value: str) -> bool:
    return TENANT_ID.match(value) is not None


def check_tenant_id(value: str, field: str = "id") -> str:
    if not is_tenant_id(value):
        raise InvalidRequest(
            "tenant id: 1 to 63 lowercase letters, digits or '-', starting with a letter or digit",
            field=field,
        )
    return value


def check_subject(value: str, field: str = "subject", *, required: bool = True) -> str:
    return check_text(value, field, MAX_SUBJECT, required=required)


def check_audiences(values: Sequence[str], field: str = "audience") -> list[str]:
    audience = list(values)
    if not audience or len(audience) > MAX_AUDIENCES:
        raise InvalidRequest(f"{field}: give 1 to {MAX_AUDIENCES} audiences", field=field)
    for a in audience:
        check_text(a, field, MAX_AUDIENCE, required=True)
    return audience


def check_kid(value: str, field: str = "kid") -> str:
    return check_text(value, field, MAX_KID)


def check_key_size(bits: int, field: str = "key_size") -> int:
    """RSA modulus sizes fedtoken generates and accepts."""
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS or bits % 8:
        raise PolicyViolation(
            f"key_size must be a multiple of 8 between {MIN_RSA_BITS} and {MAX_RSA_BITS}",
            field=field,
        )
    return bits


def check_issuer_url(url: str, field: str = "issuer") -> str:
    """https, no query or fragment (http only for loopback development)."""
    check_text(url, field, MAX_ISSUER_URL, required=True)
    try:
        parts = urlsplit(url)
        local = parts.hostname in _LOOPBACK
        _ = parts.port  # a port that is no number or out of range raises here
    except ValueError:
        raise InvalidRequest("issuer must be a well-formed https URL", field=field) from None
    if "@" in parts.netloc:
        # Never echoed: the userinfo may be a password.
        raise InvalidRequest("issuer must not contain a user name or password", field=field)
    if parts.hostname is None or (parts.netloc.startswith("[") and "]" not in parts.netloc):
        raise InvalidRequest("issuer must be a well-formed https URL", field=field)
    if not (parts.scheme == "https" or (parts.scheme == "http" and local)) or not parts.netloc \
            or parts.query or parts.fragment or " " in url:
        raise InvalidRequest(
            "issuer must be an https URL without query or fragment (http only for localhost)",
            field=field,
        )
    return url


def check_tenant_policy(p: TenantPolicy) -> TenantPolicy:
    if not MIN_TOKEN_LIFETIME_CEILING <= p.max_token_lifetime_seconds \
            <= MAX_TOKEN_LIFETIME_CEILING:
        raise PolicyViolation(
            f"max_token_lifetime_seconds must be between {MIN_TOKEN_LIFETIME_CEILING} and "
            f"{MAX_TOKEN_LIFETIME_CEILING}",
            field="max_token_lifetime_seconds",
        )
    if not 1 <= p.default_token_lifetime_seconds <= p.max_token_lifetime_seconds:
        raise PolicyViolation("default_token_lifetime_seconds must be between 1 and the maximum",
                              field="default_token_lifetime_seconds")
    if not p.allowed_algorithms or not set(p.allowed_algorithms) <= SIGNING_ALGORITHMS:
        raise PolicyViolation(
            f"allowed_algorithms must be a subset of {sorted(SIGNING_ALGORITHMS)}",
            field="allowed_algorithms",
        )
    check_key_size(p.key_size)
    return p
