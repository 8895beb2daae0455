"""JWK Sets: rendering ours (RFC 7517 section 5) and admitting a federated
issuer's into the trust store."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from fedtoken.core.errors import PolicyViolation
from fedtoken.core.jose import is_valid_kid, loads_strict
from fedtoken.core.jwk import b64url_encode
from fedtoken.core.keys import PRIVATE_RSA_MEMBERS, load_rsa_public_key
from fedtoken.core.model import ASYMMETRIC_ALGORITHMS, KeyRecord

MAX_JWKS_BYTES: Final = 65536
# Secret material of any key type: RSA private members, the EC/OKP private
# scalar "d" (already among them) and the symmetric key "k". A document that
# publishes any of it comes from a broken issuer and is trusted in no part.
_SECRET_MEMBERS: Final = PRIVATE_RSA_MEMBERS | {"k"}


def render_jwks(records: Iterable[KeyRecord]) -> bytes:
    """The JWKS document of the published keys among ``records``.

    Only public members are copied (an allowlist, so nothing private can leak
    even from a corrupted record), in compact JSON with sorted members and
    keys sorted by (tenant, kid): the same keys always give the same bytes,
    hence the same ETag on every replica.
    """
    keys = [
        {
            "kty": "RSA",
            "use": "sig",
            "alg": r.alg,
            "kid": r.kid,
            "n": r.public_jwk["n"],
            "e": r.public_jwk["e"],
        }
        for r in sorted(records, key=lambda r: (r.tenant, r.kid))
        if r.state.published
    ]
    return json.dumps({"keys": keys}, separators=(",", ":"), sort_keys=True).encode("ascii")


def etag(body: bytes) -> str:
    """A strong ETag (RFC 9110 section 8.8.3) for ``body``: its SHA-256."""
    return '"' + b64url_encode(hashlib.sha256(body).digest()) + '"'


def parse_trusted_jwks(body: bytes, *, max_bytes: int = MAX_JWKS_BYTES) -> dict[str, RSAPublicKey]:
    """The usable RSA signing keys of a federated issuer's JWKS, by kid.

    The whole document is refused (PolicyViolation) when it is oversized, not
    strict JSON, not ``{"keys": [objects...]}``, publishes secret key
    material, or repeats a kid: each is a sign of a broken or hostile issuer,
    and a partial trust would hide it. Keys we cannot use (other kty, use
    "enc", another alg, no usable kid, or failing the trust-store rules such
    as a short modulus) are skipped, since JWKS legitimately mix key types.
    """
    if len(body) > max_bytes:
        raise PolicyViolation(
            f"JWKS exceeds {max_bytes} bytes; check the issuer's jwks_uri", field="jwks"
        )
    try:
        document = loads_strict(body)
    except ValueError as exc:
        raise PolicyViolation(
            "JWKS is not strict JSON (duplicate names, invalid UTF-8, NaN or deep nesting)",
            field="jwks",
        ) from exc
    entries = document.get("keys") if type(document) is dict else None
    if type(entries) is not list or not all(type(e) is dict for e in entries):
        raise PolicyViolation('JWKS must be an object with a "keys" array of objects', field="jwks")

    seen: set[str] = set()
    for entry in entries:
        if not _SECRET_MEMBERS.isdisjoint(entry):
            raise PolicyViolation(
                "JWKS publishes private key material; refusing the whole set", field="jwks"
            )
        kid = entry.get("kid")
        if isinstance(kid, str):
            if kid in seen:
                raise PolicyViolation(f"JWKS repeats kid {kid!r}", field="jwks", kid=kid)
            seen.add(kid)

    trusted: dict[str, RSAPublicKey] = {}
    for entry in entries:
        if not _usable(entry):
            continue
        try:
            trusted[entry["kid"]] = load_rsa_public_key(entry)
        except PolicyViolation:
            continue
    return trusted


def _usable(entry: dict[str, Any]) -> bool:
    if entry.get("kty") != "RSA" or entry.get("use", "sig") != "sig":
        return False
    alg = entry.get("alg", "RS256")
    if type(alg) is not str or alg not in ASYMMETRIC_ALGORITHMS:
        return False
    # A kid that check_header would refuse in a token can never be looked up.
    return is_valid_kid(entry.get("kid"))
