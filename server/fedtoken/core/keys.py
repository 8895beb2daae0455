"""Signing-key lifecycle: the state machine, rotation timing, and the rules a
public key must meet before any verifier trusts it.

Rotation timing follows one principle (Vault, Dex): an honest cache of the
JWKS always holds every key a valid token may name. So a new key is published
at least one JWKS max-age before it signs, and an old key stays published for
the longest token lifetime plus one max-age after it stops signing.

The rotation part (``RotationPolicy``, ``next_actions``, ``jwks_max_age``) is
not wired yet: nothing calls ``next_actions``, and the JWKS is served with the
``jwks_max_age_seconds`` setting, not with a max-age derived from a rotation
schedule. They are what automatic rotation will use.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

from fedtoken.core.errors import InvalidKeyTransition, PolicyViolation
from fedtoken.core.jose import b64url_decode_strict
from fedtoken.core.model import (
    ASYMMETRIC_ALGORITHMS,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    KeyRecord,
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


# --- rotation timing ------------------------------------------------------------

MIN_JWKS_MAX_AGE: Final = 60
MAX_JWKS_MAX_AGE: Final = 86_400


def jwks_max_age(
    rotation_period_s: int,
    *,
    floor_s: int = MIN_JWKS_MAX_AGE,
    ceiling_s: int = MAX_JWKS_MAX_AGE,
) -> int:
    """Cache-Control max-age for a JWKS whose signing key rotates every
    ``rotation_period_s`` seconds (for automatic rotation; not used to serve
    the JWKS today, see the module docstring).

    next_actions publishes a new key one max-age before it signs, so the
    max-age is a tenth of the period: caches refetch a few times per period,
    and keys sit pending for a small part of it. The floor keeps caches useful
    under very fast rotation; the ceiling bounds how long a remote verifier
    may miss an emergency rotation after a compromise.
    """
    if rotation_period_s <= 0:
        raise PolicyViolation("rotation period must be positive", field="rotation_period")
    return max(floor_s, min(ceiling_s, rotation_period_s // 10))


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """When a tenant's keys rotate; derived values are computed, not stored."""

    rotation_period_s: int
    max_token_lifetime_s: int

    @property
    def jwks_max_age_s(self) -> int:
        return jwks_max_age(self.rotation_period_s)


class ActionKind(enum.Enum):
    """What the rotation job should do next, and the state it leads to."""

    GENERATE = KeyState.PENDING  # create a new key, published but not signing
    ACTIVATE = KeyState.ACTIVE
    START_RETIRING = KeyState.RETIRING  # stops signing, still published
    RETIRE = KeyState.RETIRED  # unpublished

    @property
    def target(self) -> KeyState:
        state: KeyState = self.value
        return state


@dataclass(frozen=True, slots=True)
class RotationAction:
    kind: ActionKind
    kid: str = ""  # empty for GENERATE


def next_actions(
    keys: Iterable[KeyRecord], now: int, policy: RotationPolicy
) -> list[RotationAction]:
    """The transitions one tenant's keys are due for at ``now``.

    Pure: the caller (one replica, under an advisory lock) applies them in
    order and calls again later. Applying an ACTIVATE and the START_RETIRING
    that accompanies it in one transaction keeps exactly one signing key.
    """
    max_age = policy.jwks_max_age_s
    records = list(keys)
    active = [k for k in records if k.state is KeyState.ACTIVE]
    pending = sorted(
        (k for k in records if k.state is KeyState.PENDING), key=lambda k: (k.created_at, k.kid)
    )
    current = max(active, key=lambda k: (k.activated_at, k.kid), default=None)
    actions: list[RotationAction] = []

    if current is None:
        # With no signing key there is nothing to keep using, so a pending key
        # signs at once: refusing to issue is worse than a remote cache missing
        # the key until it refetches on the unknown kid.
        actions.append(
            RotationAction(ActionKind.ACTIVATE, pending[0].kid)
            if pending
            else RotationAction(ActionKind.GENERATE)
        )
    else:
        due = current.activated_at + policy.rotation_period_s
        if not pending:
            if now >= due - max_age:
                actions.append(RotationAction(ActionKind.GENERATE))
        elif now >= due and now >= pending[0].created_at + max_age:
            actions.append(RotationAction(ActionKind.ACTIVATE, pending[0].kid))
            actions.extend(RotationAction(ActionKind.START_RETIRING, k.kid) for k in active)

    grace = policy.max_token_lifetime_s + max_age
    actions.extend(
        RotationAction(ActionKind.RETIRE, k.kid)
        for k in records
        if k.state is KeyState.RETIRING and now >= k.retiring_at + grace
    )
    return actions


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
