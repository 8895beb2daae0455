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
MAX_TOKEN_LIFETIME_CEILING: Final = 7 * 86400
MIN_TOKEN_LIFETIME_CEILING: Final = 60
_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1"})


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
    if (required and not value) or len(value) > MAX_SUBJECT:
        raise InvalidRequest(
            f"{field} is required (1 to {MAX_SUBJECT} characters)" if required
            else f"{field} is limited to {MAX_SUBJECT} characters",
            field=field,
        )
    return value


def check_audiences(values: Sequence[str], field: str = "audience") -> list[str]:
    audience = list(values)
    if not audience or len(audience) > MAX_AUDIENCES:
        raise InvalidRequest(f"{field}: give 1 to {MAX_AUDIENCES} audiences", field=field)
    if any(not a or len(a) > MAX_AUDIENCE for a in audience):
        raise InvalidRequest(f"{field} entries must be 1 to {MAX_AUDIENCE} characters",
                             field=field)
    return audience


def check_length(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidRequest(f"{field} is limited to {limit} characters", field=field)
    return value


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
    parts = urlsplit(url)
    local = parts.hostname in _LOOPBACK
    if not (parts.scheme == "https" or (parts.scheme == "http" and local)) or not parts.netloc \
            or parts.query or parts.fragment or len(url) > MAX_ISSUER_URL:
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
