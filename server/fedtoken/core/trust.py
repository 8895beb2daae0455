"""Federation trust: which foreign issuers a tenant trusts, and what we know
about their key sets. Plain data; the rules live in ``validate_*`` functions
here (pure) and the fetching in ``fedtoken.federation`` (adapter)."""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Final
from urllib.parse import urlsplit

from fedtoken.core.errors import InvalidRequest, PolicyViolation
from fedtoken.core.policy import MAX_AUDIENCE, MAX_AUDIENCES, check_tenant_id, check_text

# Algorithms a trusted issuer may be allowed (RFC 8725: never HS* or none).
FEDERATION_ALGORITHMS: Final = frozenset({"RS256", "PS256"})
DEFAULT_ALGORITHMS: Final = frozenset({"RS256"})
DEFAULT_MAX_STALE_SECONDS: Final = 24 * 3600


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """One foreign issuer and the local tenants that trust it.

    ``issuer`` is matched exactly against a token's ``iss`` and against the
    ``issuer`` of its discovery document. ``jwks_uri`` empty means: discover
    it at ``issuer + "/.well-known/openid-configuration"``. ``audiences``
    empty means any audience the verifier asks for; otherwise a token must
    address one of them. ``namespace`` prefixes the foreign subject in token
    exchange so it never collides with a local subject.
    """

    issuer: str
    tenants: frozenset[str]
    jwks_uri: str = ""
    algorithms: frozenset[str] = DEFAULT_ALGORITHMS
    audiences: frozenset[str] = frozenset()
    namespace: str = ""
    max_stale_seconds: int = DEFAULT_MAX_STALE_SECONDS
    created_at: int = 0
    updated_at: int = 0
    added_by: str = ""


@dataclass(frozen=True, slots=True)
class StoredKeySet:
    """The last good key set of an issuer, as fetched (persisted so that a
    restart during the issuer's outage still verifies, within max staleness)."""

    issuer: str
    jwks_uri: str
    body: bytes
    etag: str = ""
    fetched_at: float = 0.0  # when this body was last confirmed (200 or 304)


class FetchOutcome(enum.Enum):
    """The result of one JWKS fetch, for the audit trail and the metrics."""

    OK = "ok"
    NOT_MODIFIED = "not_modified"
    ERROR = "error"  # unreachable, timeout, non-2xx, too slow, redirect refused
    REJECTED = "rejected"  # a document that fails validation: never installed
    STALE = "stale"  # serving the last good set past its freshness
    EXPIRED = "expired"  # past max staleness: the issuer's tokens fail closed


@dataclass(frozen=True, slots=True)
class IssuerStatus:
    """What ``fedtoken trust list`` shows about one issuer's key set."""

    issuer: str
    kids: tuple[str, ...] = ()
    fetched_at: float = 0.0  # 0: never fetched
    next_refresh_at: float = 0.0
    serving_stale: bool = False
    usable: bool = False  # False: its tokens are refused (never fetched, or too stale)
    last_outcome: str = ""
    last_error: str = ""
    fetches: int = 0
    extra: dict[str, str] = field(default_factory=dict)


# --- the rules of a trust definition (pure) ----------------------------------------

MAX_TRUST_URL: Final = 512  # issuer and jwks_uri (the tenants' issuer bound, core.policy)
MAX_TRUST_TENANTS: Final = 256
MAX_TRUST_ALGORITHMS: Final = 8  # more entries than names exist is a malformed request
MIN_MAX_STALE_SECONDS: Final = 60
MAX_MAX_STALE_SECONDS: Final = 30 * 86400
MAX_NAMESPACE: Final = 128
# One label and exactly one ':' at its end. With no ':' inside, the namespace
# of a namespaced subject is always everything up to its first ':', so no two
# (namespace, foreign subject) pairs can give the same local subject, as long
# as namespaces are unique across trusted issuers (the store enforces it).
NAMESPACE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~/-]{0,126}:\Z")
_HOST: Final = re.compile(r"[a-z0-9.-]+\Z")
_DEFAULT_PORTS: Final = {"https": 443, "http": 80}
# Never allowed, whatever an operator asks: a shared secret (HS*) or no
# signature at all (none) is not federation (RFC 8725 section 3.1).
_NEVER_HINT: Final = ("is never accepted from a foreign issuer: HS* needs a shared secret "
                      "and none is no signature")
_NOT_YET: Final = frozenset({"ES256"})


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: the only hosts a test may reach over http."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_trust_url(url: str, field: str, *, allow_http_loopback: bool = False) -> str:
    """An absolute https URL we may fetch from or match a token's ``iss``
    against, as given (never normalised: ``iss`` is matched exactly).

    Refused: another scheme (http only for a loopback host, and only when the
    ``federation_allow_http_loopback`` setting is on), user info (it may be a
    password: never echoed), a query or fragment (even an empty ``?``/``#``),
    percent-encoding or a backslash in the authority, ``.``/``..`` path
    segments (HTTP clients would rewrite them), whitespace, control
    characters, and more than ``MAX_TRUST_URL`` characters.
    """
    check_text(url, field, MAX_TRUST_URL, required=True)
    scheme = "https" if url.startswith("https://") else "http" if url.startswith("http://") \
        else ""
    if not scheme:
        raise InvalidRequest(f"{field} must be an https URL", field=field)
    if "@" in url.partition("//")[2].partition("/")[0]:
        raise InvalidRequest(f"{field} must not contain a user name or password", field=field)
    if any(c in url for c in " ?#\\"):
        raise InvalidRequest(f"{field} must not contain a query, a fragment, a space or a "
                             "backslash", field=field)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # a port that is no number or out of range raises here
    except ValueError:
        raise InvalidRequest(f"{field} must be a well-formed https URL", field=field) from None
    bracketed = parts.netloc.startswith("[")
    if not host or "%" in parts.netloc or (bracketed and "]" not in parts.netloc) or (
            not bracketed and not _HOST.match(host)):
        raise InvalidRequest(f"{field} must name a host (a DNS name or an IP address)",
                             field=field)
    if bracketed and not _is_ipv6(host):
        raise InvalidRequest(f"{field} must name a host (a DNS name or an IP address)",
                             field=field)
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        raise InvalidRequest(f"{field} must not contain '.' or '..' path segments",
                             field=field)
    if scheme == "http" and not (allow_http_loopback and is_loopback_host(host)):
        raise InvalidRequest(
            f"{field} must be an https URL (http only for a loopback host, and only when "
            "federation_allow_http_loopback is set: tests)", field=field)
    return url


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def default_namespace(issuer: str) -> str | None:
    """The namespace of an issuer that was given none: its host (lowercase),
    ``_PORT`` for a port that is not the scheme's default, then its path
    without a trailing '/', then ':' (``https://b.example`` -> ``b.example:``,
    ``https://b.example:8443/t/pay/`` -> ``b.example_8443/t/pay:``). The path
    is part of it so that several issuers of one host (a fedtoken instance has
    one per tenant) get distinct namespaces. None when that is no valid
    namespace (an IPv6 host, characters outside ``NAMESPACE``, too long): the
    operator then names one."""
    parts = urlsplit(issuer)
    host = parts.hostname or ""
    if not host or ":" in host:
        return None
    port = parts.port
    base = host if port in (None, _DEFAULT_PORTS.get(parts.scheme)) else f"{host}_{port}"
    candidate = f"{base}{parts.path.rstrip('/')}:"
    return candidate if NAMESPACE.match(candidate) else None


def check_namespace(namespace: str, field: str = "namespace") -> str:
    if not NAMESPACE.match(namespace):
        raise InvalidRequest(
            f"{field}: 1 to {MAX_NAMESPACE - 1} letters, digits or . _ ~ / - (starting with a "
            "letter or digit), then one ':' (e.g. 'b.example:')", field=field)
    return namespace


def check_federation_algorithms(algorithms: Collection[str],
                                field: str = "algorithms") -> frozenset[str]:
    """A non-empty subset of FEDERATION_ALGORITHMS (empty: RS256 alone)."""
    if len(algorithms) > MAX_TRUST_ALGORITHMS:
        raise PolicyViolation(f"{field}: at most {MAX_TRUST_ALGORITHMS} entries", field=field)
    chosen = frozenset(algorithms) or DEFAULT_ALGORITHMS
    for alg in sorted(chosen):
        if alg.upper().startswith("HS") or alg.lower() == "none":
            shown = alg if alg.isalnum() and len(alg) <= 8 else "HS*/none"
            raise PolicyViolation(f"{field}: {shown} {_NEVER_HINT}", field=field)
        if alg in _NOT_YET:
            raise PolicyViolation(
                f"{field}: {alg} is not supported for trusted issuers yet; allow "
                f"{' or '.join(sorted(FEDERATION_ALGORITHMS))}", field=field)
        if alg not in FEDERATION_ALGORITHMS:
            raise PolicyViolation(
                f"{field} must be a subset of {sorted(FEDERATION_ALGORITHMS)} (exact names)",
                field=field)
    return chosen


def check_max_stale(seconds: int, field: str = "max_stale_seconds", *,
                    minimum: int = MIN_MAX_STALE_SECONDS) -> int:
    """0 takes the default (a day); otherwise ``minimum`` (60 s unless the
    service's test setting lowers it) to 30 days."""
    if seconds == 0:
        return DEFAULT_MAX_STALE_SECONDS
    if not minimum <= seconds <= MAX_MAX_STALE_SECONDS:
        raise PolicyViolation(
            f"{field} must be {minimum} s to {MAX_MAX_STALE_SECONDS} s "
            "(30 days), or 0 for the default (1 day)", field=field)
    return seconds


def _comparable(url: str) -> str:
    """For "is this one of ours": scheme and authority case-insensitive, no
    trailing '/'."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{authority.lower()}{slash}{path}".rstrip("/")


def names_local_issuer(issuer: str, local_issuers: Iterable[str]) -> bool:
    """Whether ``issuer`` is (up to case of scheme and host, and a trailing
    '/') the issuer of one of our own tenants."""
    mine = _comparable(issuer)
    return any(_comparable(local) == mine for local in local_issuers)


def validate_trusted_issuer(trust: TrustedIssuer, *, local_issuers: Iterable[str] = (),
                            allow_http_loopback: bool = False,
                            min_max_stale: int = MIN_MAX_STALE_SECONDS) -> TrustedIssuer:
    """``trust`` checked, with its defaults applied (algorithms RS256, the
    default namespace, max staleness one day).

    Whether its tenants exist, and whether its namespace is free, depends on
    the store: the service checks those. ``local_issuers`` are our tenants'
    issuers: trusting one of them is refused (a token of ours must only ever
    verify as ours, under our own keys).
    """
    # Ours first: a local issuer may be http://localhost, which the URL rule
    # would refuse with a less useful answer.
    check_text(trust.issuer, "issuer", MAX_TRUST_URL, required=True)
    if names_local_issuer(trust.issuer, local_issuers):
        raise PolicyViolation("issuer is the issuer of one of this instance's own tenants; "
                              "its tokens verify as local tokens already", field="issuer")
    check_trust_url(trust.issuer, "issuer", allow_http_loopback=allow_http_loopback)
    if trust.jwks_uri:
        check_trust_url(trust.jwks_uri, "jwks_uri", allow_http_loopback=allow_http_loopback)
    algorithms = check_federation_algorithms(trust.algorithms)
    if len(trust.audiences) > MAX_AUDIENCES:
        raise InvalidRequest(f"at most {MAX_AUDIENCES} audiences", field="audiences")
    for audience in trust.audiences:
        check_text(audience, "audiences", MAX_AUDIENCE, required=True)
    if not trust.tenants:
        raise InvalidRequest("name the local tenant(s) that trust this issuer: a foreign "
                             "token verifies only in a tenant that trusts its issuer",
                             field="tenants")
    if len(trust.tenants) > MAX_TRUST_TENANTS:
        raise InvalidRequest(f"at most {MAX_TRUST_TENANTS} tenants", field="tenants")
    for tenant in trust.tenants:
        check_tenant_id(tenant, "tenants")
    namespace = trust.namespace or default_namespace(trust.issuer)
    if namespace is None:
        raise InvalidRequest("no namespace can be derived from this issuer URL; give one "
                             "(e.g. 'partner-b:')", field="namespace")
    check_namespace(namespace)
    return replace(trust, algorithms=algorithms, namespace=namespace,
                   max_stale_seconds=check_max_stale(trust.max_stale_seconds,
                                                     minimum=min_max_stale))
