"""Signing-key lifecycle: the state machine, and the rules a public key must
meet before any verifier trusts it. Rotation timing (when keys move along the
state machine) is ``fedtoken.core.rotation``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

from fedtoken.core.errors import InvalidKeyTransition, PolicyViolation
from fedtoken.core.jose import b64url_decode_strict
from fedtoken.core.model import (
    ASYMMETRIC_ALGORITHMS,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    KeyState,
)

_S = KeyState
ALLOWED_TRANSITIONS: Final[Mapping[KeyState, frozenset[KeyState]]] = {
    _S.PENDING: frozenset({_S.ACTIVE, _S.RETIRING, _S.COMPROMISED}),
    _S.ACTIVE: frozenset({_S.RETIRING, _S.COMPROMISED}),
    _S.RETIRING: frozenset({_S.RETIRED, _S.COMPROMISED}),
    _S.RETIRED: frozenset({_S.DESTROYED, _S.COMPROMISED}),
    # A compromised key can still be destroyed in the HSM, but never trusted
    # again; a destroyed key has nothing left to change.
    _S.COMPROMISED: frozenset({_S.DESTROYED}),
    _S.DESTROYED: frozenset(),
}


def check_transition(current: KeyState, target: KeyState) -> None:
    """Raise FailedPrecondition unless ``current -> target`` is allowed."""
    if target not in ALLOWED_TRANSITIONS[current]:
        raise InvalidKeyTransition(
            f"a {current.value} key cannot become {target.value}; "
            "list the key's state and follow pending -> active -> retiring -> retired"
        )


# --- trust-store rules ----------------------------------------------------------

PRIVATE_RSA_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})
# Verification cost grows with the modulus and exponent; an attacker-chosen
# federated key of 64k bits or a 4096-bit exponent would turn each verify
# into milliseconds. FIPS 186-5 bounds e below 2**256; 8192-bit moduli cover
# every RSA key in real use.
MAX_RSA_EXPONENT_BITS: Final = 256


def load_rsa_public_key(jwk: Mapping[str, Any]) -> RSAPublicKey:
    """Load an RSA public JWK that passes the trust-store rules, or raise
    PolicyViolation saying which rule it breaks.

    Rules (docs/security.md, trust stores): kty RSA; n and e strict base64url;
    odd modulus of MIN_RSA_BITS..MAX_RSA_BITS; e odd, >= 3 and below 2**256;
    ``use`` absent or "sig"; ``alg`` absent or asymmetric; no private members.
    Leading zero octets in n or e are tolerated: they do not change the
    integer, so they cannot make one key verify as another.
    """
    if not isinstance(jwk, Mapping):
        raise PolicyViolation("a JWK must be a JSON object", field="jwk")
    kid = jwk.get("kid")
    kid_s = kid if isinstance(kid, str) else ""

    def refuse(message: str) -> PolicyViolation:
        return PolicyViolation(message, field="jwk", kid=kid_s)

    if not PRIVATE_RSA_MEMBERS.isdisjoint(jwk):
        raise refuse("the JWK carries private key members; publish the public key only")
    # Members from outside may be of any JSON type: compare strings only (a
    # list is unhashable, and must be a refusal, not an error).
    if jwk.get("kty") != "RSA":
        raise refuse("only RSA keys (kty RSA) are accepted")
    if jwk.get("use", "sig") != "sig":
        raise refuse("the key's use is not sig")
    if "alg" in jwk and (type(jwk["alg"]) is not str or jwk["alg"] not in ASYMMETRIC_ALGORITHMS):
        raise refuse(f"alg must be one of {sorted(ASYMMETRIC_ALGORITHMS)}")
    n_b64, e_b64 = jwk.get("n"), jwk.get("e")
    if type(n_b64) is not str or type(e_b64) is not str:
        raise refuse("n and e must be base64url strings")
    try:
        n = int.from_bytes(b64url_decode_strict(n_b64.encode("ascii")), "big")
        e = int.from_bytes(b64url_decode_strict(e_b64.encode("ascii")), "big")
    except ValueError as exc:  # UnicodeEncodeError included
        raise refuse("n or e is not strict unpadded base64url") from exc
    # An RSA modulus is a product of two odd primes; cryptography would load
    # an even one.
    if n % 2 == 0 or not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        raise refuse(f"modulus must be odd and have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
    if e < 3 or e % 2 == 0 or e.bit_length() > MAX_RSA_EXPONENT_BITS:
        raise refuse("public exponent must be odd, at least 3 and below 2**256")
    try:
        return RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:  # implied by the checks above today; guards a stricter library
        raise refuse("the RSA public numbers are invalid") from exc
