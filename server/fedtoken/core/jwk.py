"""base64url, RSA JWKs and RFC 7638 thumbprints."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

_B64URL_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    """Strict unpadded base64url: no padding, no whitespace, no standard
    alphabet, and canonical trailing bits (so one value has one encoding).

    Raises ValueError on anything else.
    """
    raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
    n = len(raw)
    if n % 4 == 1 or not _B64URL_ALPHABET.issuperset(raw):
        raise ValueError("not unpadded base64url")
    try:
        out = base64.urlsafe_b64decode(raw + b"=" * (-n % 4))
    except binascii.Error as exc:  # pragma: no cover - alphabet checked above
        raise ValueError("not unpadded base64url") from exc
    # Reject non-canonical encodings (unused low bits set in the last char).
    if n % 4 and base64.urlsafe_b64encode(out).rstrip(b"=") != raw:
        raise ValueError("non-canonical base64url")
    return out


def int_to_b64url(value: int) -> str:
    """Big-endian unsigned, minimal length (RFC 7518 section 2, Base64urlUInt)."""
    length = max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(length, "big"))


def b64url_to_int(text: str) -> int:
    return int.from_bytes(b64url_decode(text), "big")


def rsa_thumbprint(n: int, e: int) -> str:
    """RFC 7638 JWK thumbprint (SHA-256) of an RSA public key: the kid."""
    canonical = json.dumps(
        {"e": int_to_b64url(e), "kty": "RSA", "n": int_to_b64url(n)},
        separators=(",", ":"),
        sort_keys=True,
    ).encode("ascii")
    return b64url_encode(hashlib.sha256(canonical).digest())


def rsa_public_jwk(n: int, e: int, *, alg: str = "RS256") -> dict[str, Any]:
    """The public JWK fedtoken publishes for an RSA key; kid is its thumbprint."""
    return {
        "kty": "RSA",
        "use": "sig",
        "alg": alg,
        "kid": rsa_thumbprint(n, e),
        "n": int_to_b64url(n),
        "e": int_to_b64url(e),
    }
