"""Shared unit-test world: two tenants with keys in every lifecycle state, an
in-memory revocation view, and helpers that sign tokens the way an issuer (or
an attacker) would. Used by test_engine, test_attacks, test_properties,
test_jose, test_keys and test_jwks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fedtoken.core.jwk import b64url_encode, rsa_public_jwk
from fedtoken.core.model import (
    Expectation,
    KeyRecord,
    KeyState,
    Reason,
    Tenant,
    TenantPolicy,
    Verdict,
)
from fedtoken.verifier import LocalKeyResolver, VerificationEngine

NOW = 1_800_000_000
ISS_A = "https://auth.example/t/acme"
ISS_B = "https://auth.example/t/beta"
AUDIENCE = "api://orders"

_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def rsa_key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    """One key per name and size for the whole test run (generation is slow)."""
    return _rsa_key(name, bits)  # positional, so the cache sees one key per pair


@cache
def _rsa_key(name: str, bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def sign(private_key: rsa.RSAPrivateKey, alg: str, data: bytes) -> bytes:
    digest = _HASHES[alg[2:]]()
    if alg.startswith("PS"):
        pad: padding.AsymmetricPadding = padding.PSS(
            mgf=padding.MGF1(digest), salt_length=digest.digest_size
        )
    else:
        pad = padding.PKCS1v15()
    return private_key.sign(data, pad, digest)


def segment(value: Any) -> str:
    """base64url of compact JSON (or of raw text/bytes, for malformed tokens)."""
    if isinstance(value, str):
        value = value.encode()
    elif not isinstance(value, bytes):
        value = json.dumps(value, separators=(",", ":")).encode()
    return b64url_encode(value)


class FixedClock:
    def __init__(self, now: float = NOW) -> None:
        self.t = now

    def now(self) -> float:
        return self.t


@dataclass
class FakeRevocations:
    """A RevocationView with explicit contents."""

    jtis: set[tuple[str, str]] = field(default_factory=set)
    subjects: set[tuple[str, str]] = field(default_factory=set)
    kids: set[str] = field(default_factory=set)
    stale: bool = False

    def check(self, tenant: str, jti: str, subject: str, issued_at: int, kid: str) -> Reason | None:
        if self.stale:
            return Reason.REVOCATION_UNAVAILABLE
        if kid in self.kids:
            return Reason.KEY_REVOKED
        if (tenant, jti) in self.jtis or (tenant, subject) in self.subjects:
            return Reason.REVOKED
        return None


def record(name: str, tenant: str, state: KeyState, alg: str = "RS256", **extra: int) -> KeyRecord:
    numbers = rsa_key(name).public_key().public_numbers()
    jwk = rsa_public_jwk(numbers.n, numbers.e, alg=alg)
    return KeyRecord(
        kid=jwk["kid"],
        tenant=tenant,
        alg=alg,
        key_size=2048,
        state=state,
        public_jwk=jwk,
        hsm_label=name,
        **extra,
    )


@dataclass
class World:
    """Two tenants and their keys, an engine, and token factories."""

    resolver: LocalKeyResolver
    revocations: FakeRevocations
    clock: FixedClock
    engine: VerificationEngine
    kids: dict[str, str]  # key name -> kid
    expect: Expectation = field(default_factory=lambda: Expectation(audience=AUDIENCE))

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Good claims for tenant A; an override of None removes the claim."""
        claims: dict[str, Any] = {
            "iss": ISS_A,
            "sub": "alice",
            "aud": AUDIENCE,
            "iat": NOW - 60,
            "nbf": NOW - 60,
            "exp": NOW + 600,
            "jti": "jti-1",
            "tenant": "acme",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def header(self, key: str = "a_active", **overrides: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": "RS256", "typ": "JWT", "kid": self.kids[key]}
        header.update(overrides)
        return {k: v for k, v in header.items() if v is not None}

    def token(
        self,
        key: str = "a_active",
        *,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        sign_with: str | None = None,
        sign_alg: str | None = None,
    ) -> str:
        """A token signed with ``sign_with`` (default: the key named in the
        header), using ``sign_alg`` (default: the header's alg)."""
        header = self.header(key) if header is None else header
        claims = self.claims() if claims is None else claims
        signing_input = f"{segment(header)}.{segment(claims)}".encode()
        signature = sign(rsa_key(sign_with or key), sign_alg or header["alg"], signing_input)
        return f"{signing_input.decode()}.{b64url_encode(signature)}"

    def verify(self, token: str | bytes, expect: Expectation | None = None) -> Verdict:
        return self.engine.verify(token, expect or self.expect)  # type: ignore[arg-type]


# name -> (tenant, state, alg, extra record fields)
KEYS: dict[str, tuple[str, KeyState, str, dict[str, int]]] = {
    "a_active": ("acme", KeyState.ACTIVE, "RS256", {}),
    "a_pending": ("acme", KeyState.PENDING, "RS256", {}),
    "a_retiring": ("acme", KeyState.RETIRING, "RS256", {}),
    "a_ps256": ("acme", KeyState.ACTIVE, "PS256", {}),
    "a_retired": ("acme", KeyState.RETIRED, "RS256", {}),
    "a_destroyed": ("acme", KeyState.DESTROYED, "RS256", {}),
    "a_compromised": ("acme", KeyState.COMPROMISED, "RS256", {"compromised_at": NOW - 10}),
    "a_burnt": ("acme", KeyState.DESTROYED, "RS256", {"compromised_at": NOW - 10}),
    "b_active": ("beta", KeyState.ACTIVE, "RS256", {}),
}
TENANTS = [
    Tenant(id="acme", issuer=ISS_A, policy=TenantPolicy(allowed_algorithms=("RS256", "PS256"))),
    Tenant(id="beta", issuer=ISS_B),
]


def make_world(**engine_options: Any) -> World:
    records = [record(name, *spec[:3], **spec[3]) for name, spec in KEYS.items()]
    resolver = LocalKeyResolver()
    resolver.replace(TENANTS, records)
    revocations = FakeRevocations(
        jtis={("acme", "revoked-jti")},
        subjects={("acme", "revoked-subject")},
    )
    clock = FixedClock()
    engine = VerificationEngine(resolver, revocations, clock=clock, **engine_options)
    kids = {name: r.kid for name, r in zip(KEYS, records, strict=True)}
    return World(resolver, revocations, clock, engine, kids)
