"""Compact JWS (RFC 7515) for RSA signatures: strict parsing, header policy,
encoding and signature verification.

This module is the first thing an attacker's bytes touch, so it is written to
refuse rather than to interpret: one token has exactly one reading, and every
refusal is a ``TokenError`` carrying a verdict ``Reason``. It is also the hot
path of verification, so the happy path avoids Python-level loops over token
bytes (see the measurements quoted in the comments).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from fedtoken.core.errors import TokenError
from fedtoken.core.jwk import b64url_decode, b64url_encode
from fedtoken.core.model import ASYMMETRIC_ALGORITHMS, Reason

DEFAULT_MAX_TOKEN_SIZE: Final = 16384
MAX_KID_LENGTH: Final = 256
# Deeper JSON than this in a token is refused: real claims nest a few levels,
# and consumers of the claims (protobuf, logs) often recurse.
MAX_JSON_DEPTH: Final = 32

# Header members that would let the token choose its own key, encoding or
# processing rules. The verifier's key comes from its trust store only
# (RFC 8725 section 3.1); "crit" names extensions we do not implement, so
# RFC 7515 section 4.1.11 obliges us to refuse it; "b64" (RFC 7797) changes
# what the signature covers; zip/enc/epk/p2s belong to JWE.
FORBIDDEN_HEADER_MEMBERS: Final = frozenset(
    {"jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64", "zip", "enc", "epk", "p2s"}
)
# Media types of a JWT (RFC 7519 section 5.1) and of a JWT access token
# (RFC 9068 section 2.1); compared case-insensitively as RFC 7515 asks.
ACCEPTED_TYPES: Final = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})


@dataclass(frozen=True, slots=True)
class ParsedJws:
    """A compact JWS split and decoded, signature not yet checked."""

    header: dict[str, Any]
    payload: dict[str, Any]
    payload_bytes: bytes  # the payload JSON exactly as signed
    signing_input: bytes  # ASCII(BASE64URL(header) || '.' || BASE64URL(payload))
    signature: bytes


# --- strict building blocks ---------------------------------------------------


# The one strict base64url decoder lives in core.jwk; this name is kept for
# the callers that import it from here.
b64url_decode_strict: Final = b64url_decode


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate member names are an ambiguity attack (RFC 7515 section 5.2,
    # RFC 8725 section 3.1): another parser may keep the first value where
    # Python keeps the last. Measured: this hook on a module-level decoder
    # costs no more than plain json.loads on a typical payload, so it is used
    # instead of cleverer post-hoc counting that would be harder to prove.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


# Built once: json.loads with hooks would construct a decoder per call.
_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
)


def loads_strict(data: bytes) -> Any:
    """Parse UTF-8 JSON strictly: no duplicate member names, no NaN or
    Infinity, no byte-order mark, no lone surrogates, nesting at most
    MAX_JSON_DEPTH.

    Raises ValueError for every refusal (RecursionError is turned into
    ValueError here, so callers handle one exception type).
    """
    try:
        # Decode ourselves: json.loads on bytes would also guess UTF-16/32.
        text = data.decode("utf-8")
        value = _DECODER.decode(text)
        # "\ud800" escapes can smuggle lone surrogates that strict UTF-8
        # decoding refuses in raw form; they break protobuf, Postgres and logs
        # downstream. Only text with an escape can hold one, and encoding the
        # value back is the C-speed way to find it.
        if "\\u" in text:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError as exc:
        # The C scanner gives up at the interpreter's recursion limit, so a
        # 100,000-deep document costs about a thousand steps, not 100,000.
        raise ValueError("JSON nested too deeply") from exc
    # Fewer brackets than the bound cannot nest deeper than it, which spares
    # the walk on every ordinary token.
    if text.count("{") + text.count("[") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError("JSON nested too deeply")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    # Iterative, so the walk itself cannot hit the recursion limit.
    stack: list[tuple[Any, int]] = [(value, 1)] if type(value) in (dict, list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) in (dict, list):
                stack.append((child, depth + 1))
    return False


# --- parsing ------------------------------------------------------------------


def parse_compact(token: str | bytes, *, max_size: int = DEFAULT_MAX_TOKEN_SIZE) -> ParsedJws:
    """Split and decode a compact JWS, refusing anything ambiguous.

    Raises ``TokenError(Reason.MALFORMED, ...)`` and nothing else, whatever
    the input: callers turn the reason into a verdict.
    """
    try:
        return _parse_compact(token, max_size)
    except TokenError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:
        # UnicodeError and JSONDecodeError are ValueErrors; TypeError covers a
        # caller passing neither str nor bytes.
        raise TokenError(Reason.MALFORMED, "token is not a valid compact JWS") from exc


def _malformed(message: str) -> TokenError:
    return TokenError(Reason.MALFORMED, message)


def _parse_compact(token: str | bytes, max_size: int) -> ParsedJws:
    # Size first: a 2 MB token is refused by one len() call.
    if len(token) > max_size:
        raise _malformed("token exceeds the size limit")
    if isinstance(token, str):
        if not token.isascii():
            raise _malformed("token is not ASCII")
        raw = token.encode("ascii")
    elif isinstance(token, bytes):
        if not token.isascii():
            raise _malformed("token is not ASCII")
        raw = token
    else:
        raise _malformed("token must be str or bytes")
    parts = raw.split(b".")
    if len(parts) != 3:
        # 5 parts is JWE, 2 or 4 are truncated or extended JWS: none is ours.
        raise _malformed("a compact JWS has exactly three segments")
    header_b64, payload_b64, signature_b64 = parts
    if not header_b64 or not payload_b64:
        raise _malformed("empty header or payload segment")
    if not signature_b64:
        # There is no unsecured JWS for fedtoken (RFC 8725 section 3.2).
        raise _malformed("empty signature segment")
    header = loads_strict(b64url_decode_strict(header_b64))
    payload_bytes = b64url_decode_strict(payload_b64)
    payload = loads_strict(payload_bytes)
    if type(header) is not dict or type(payload) is not dict:
        raise _malformed("header and payload must be JSON objects")
    return ParsedJws(
        header=header,
        payload=payload,
        payload_bytes=payload_bytes,
        signing_input=raw[: len(header_b64) + 1 + len(payload_b64)],
        signature=b64url_decode_strict(signature_b64),
    )


# --- header policy ------------------------------------------------------------


def check_header(header: dict[str, Any], allowed: frozenset[str]) -> tuple[str, str]:
    """Apply the header policy and return ``(alg, kid)``.

    The algorithm must be in ``allowed`` and asymmetric: the verifier's policy
    chooses the algorithm, never the token (RFC 8725 section 2.1), and the
    intersection with ASYMMETRIC_ALGORITHMS means no configuration can ever
    admit "none" or an HMAC (which is how key confusion happens).
    """
    alg = header.get("alg")
    if type(alg) is not str or alg not in allowed or alg not in ASYMMETRIC_ALGORITHMS:
        raise TokenError(Reason.UNSUPPORTED_ALGORITHM, "algorithm not allowed")
    if not FORBIDDEN_HEADER_MEMBERS.isdisjoint(header):
        raise TokenError(Reason.UNSUPPORTED_HEADER, "header carries a forbidden member")
    if "typ" in header:
        typ = header["typ"]
        if type(typ) is not str or typ.lower() not in ACCEPTED_TYPES:
            raise TokenError(Reason.UNSUPPORTED_HEADER, "typ is not a JWT media type")
    kid = header.get("kid")
    if not is_valid_kid(kid):
        raise TokenError(Reason.UNKNOWN_KEY, "kid missing or not a short printable string")
    return alg, kid


def is_valid_kid(kid: object) -> TypeGuard[str]:
    """Whether ``kid`` is 1 to MAX_KID_LENGTH printable ASCII characters
    (0x21-0x7e).

    kid is an opaque exact-match key into our own maps, never a path, query
    or file name; restricting it to short printable ASCII also keeps it safe
    to put in logs and audit records.
    """
    return (
        type(kid) is str
        and 0 < len(kid) <= MAX_KID_LENGTH
        and kid.isascii()
        and kid.isprintable()
        and " " not in kid
    )


# --- encoding -----------------------------------------------------------------


def _json_segment(value: dict[str, Any]) -> bytes:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return b64url_encode(text.encode("utf-8")).encode("ascii")


def encode_signing_input(header: dict[str, Any], payload: dict[str, Any]) -> bytes:
    """The JWS signing input for compact JSON encodings of header and payload."""
    return _json_segment(header) + b"." + _json_segment(payload)


def assemble(signing_input: bytes, signature: bytes) -> str:
    """The compact JWS of a signing input and its signature."""
    return signing_input.decode("ascii") + "." + b64url_encode(signature)


# --- signatures ---------------------------------------------------------------

_SHA256: Final = hashes.SHA256()
_SHA384: Final = hashes.SHA384()
_SHA512: Final = hashes.SHA512()
_PKCS1V15: Final = padding.PKCS1v15()


def _pss(digest: hashes.HashAlgorithm) -> padding.PSS:
    # RFC 7518 section 3.5: MGF1 with the same hash, salt as long as the digest.
    return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)


# Padding objects are immutable parameter holders, so they are built once.
_SCHEMES: Final[dict[str, tuple[padding.AsymmetricPadding, hashes.HashAlgorithm]]] = {
    "RS256": (_PKCS1V15, _SHA256),
    "RS384": (_PKCS1V15, _SHA384),
    "RS512": (_PKCS1V15, _SHA512),
    "PS256": (_pss(_SHA256), _SHA256),
    "PS384": (_pss(_SHA384), _SHA384),
    "PS512": (_pss(_SHA512), _SHA512),
}


def verify_signature(alg: str, public_key: object, signing_input: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid ``alg`` signature of ``signing_input``.

    Never raises: a verifier that can throw invites callers to fail open, so
    every problem (wrong key type, unknown algorithm, odd lengths, library
    errors) is simply "not valid".
    """
    scheme = _SCHEMES.get(alg)
    if scheme is None or not isinstance(public_key, RSAPublicKey):
        return False
    # RFC 8017 section 8.2.2 step 1: the signature is exactly k octets. Checked
    # here so that no library leniency about padded or truncated signatures
    # can ever matter.
    if len(signature) != (public_key.key_size + 7) // 8:
        return False
    try:
        public_key.verify(signature, signing_input, scheme[0], scheme[1])
    except InvalidSignature:
        return False
    except Exception:  # noqa: BLE001 - fail closed on anything the library throws
        return False
    return True
