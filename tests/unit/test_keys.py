"""Key lifecycle, rotation timing and the trust-store rules for public keys."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from fedtoken.core.errors import ErrorReason, FailedPrecondition, PolicyViolation
from fedtoken.core.jwk import int_to_b64url, rsa_public_jwk
from fedtoken.core.keys import (
    ALLOWED_TRANSITIONS,
    check_transition,
    load_rsa_public_key,
)
from fedtoken.core.model import KeyState
from tests.unit._world import rsa_key

S = KeyState
LEGAL = {
    (S.PENDING, S.ACTIVE),
    (S.PENDING, S.RETIRING),
    (S.ACTIVE, S.RETIRING),
    (S.RETIRING, S.RETIRED),
    (S.RETIRED, S.DESTROYED),
    (S.PENDING, S.COMPROMISED),
    (S.ACTIVE, S.COMPROMISED),
    (S.RETIRING, S.COMPROMISED),
    (S.RETIRED, S.COMPROMISED),
    (S.COMPROMISED, S.DESTROYED),
}


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", list(S))
def test_every_transition(current: KeyState, target: KeyState) -> None:
    if (current, target) in LEGAL:
        check_transition(current, target)
    else:
        with pytest.raises(FailedPrecondition) as exc:
            check_transition(current, target)
        assert exc.value.reason is ErrorReason.INVALID_KEY_TRANSITION


def test_table_matches() -> None:
    assert {(a, b) for a, targets in ALLOWED_TRANSITIONS.items() for b in targets} == LEGAL
    assert set(ALLOWED_TRANSITIONS) == set(S)


# --- rotation timing --------------------------------------------------------------------


# --- trust-store rules ------------------------------------------------------------------


def jwk(bits: int = 2048, **overrides: Any) -> dict[str, Any]:
    numbers = rsa_key("keys", bits).public_key().public_numbers()
    value = rsa_public_jwk(numbers.n, numbers.e)
    value.update(overrides)
    return {k: v for k, v in value.items() if v is not None}


def test_loads_good_keys() -> None:
    key_ = load_rsa_public_key(jwk())
    assert isinstance(key_, RSAPublicKey) and key_.key_size == 2048
    assert load_rsa_public_key(jwk(use=None, alg=None, kid=None)).key_size == 2048
    assert load_rsa_public_key(jwk(alg="PS512")).key_size == 2048
    assert load_rsa_public_key(jwk(4096)).key_size == 4096
    n = rsa_key("keys").public_key().public_numbers().n
    assert load_rsa_public_key(jwk(e=int_to_b64url(3), n=int_to_b64url(n)))


@pytest.mark.parametrize(
    "overrides",
    [
        {"kty": "EC"},
        {"kty": "oct"},
        {"kty": None},
        {"use": "enc"},
        {"use": ""},
        {"alg": "HS256"},
        {"alg": "none"},
        {"alg": "RSA-OAEP"},
        {"alg": "ES256"},
        {"d": "AQAB"},
        {"p": "AQAB"},
        {"q": "AQAB"},
        {"dp": "AQAB"},
        {"dq": "AQAB"},
        {"qi": "AQAB"},
        {"oth": []},
        {"n": None},
        {"e": None},
        {"n": 12345},
        {"e": 65537},
        {"e": "AQAB="},
        {"e": "AQ+B"},
        {"e": " AQAB"},
        {"e": int_to_b64url(1)},
        {"e": int_to_b64url(2)},
        {"e": int_to_b64url(65536)},
        {"e": int_to_b64url(2**256 + 1)},
        {"n": int_to_b64url(2**2047 + 2)},  # even modulus
        {"n": "ä"},
    ],
)
def test_refuses(overrides: dict[str, Any]) -> None:
    with pytest.raises(PolicyViolation):
        load_rsa_public_key(jwk(**overrides))


def test_refuses_small_and_huge_moduli() -> None:
    with pytest.raises(PolicyViolation):
        load_rsa_public_key(jwk(1024))
    small = rsa_key("keys").public_key().public_numbers().n >> 1  # 2047 bits
    with pytest.raises(PolicyViolation):
        load_rsa_public_key(jwk(n=int_to_b64url(small | 1)))
    with pytest.raises(PolicyViolation):
        load_rsa_public_key(jwk(n=int_to_b64url(2**8193 + 1)))


def test_refuses_non_objects() -> None:
    for value in (None, [], "x", 1):
        with pytest.raises(PolicyViolation):
            load_rsa_public_key(value)  # type: ignore[arg-type]


def test_error_names_the_kid() -> None:
    with pytest.raises(PolicyViolation) as exc:
        load_rsa_public_key(jwk(kid="k-1", use="enc"))
    assert exc.value.kid == "k-1"
