"""Multi-buffer RS256 signature verification (Intel crypto_mb, AVX-512 IFMA).

A thin wrapper over the optional extension ``fedtoken._mbrsa``: eight RSA
public operations per call on CPUs with AVX-512 IFMA, for keys with e = 65537
and 2048, 3072 or 4096-bit moduli. Whatever it cannot take (another key
shape, a CPU without IFMA, an extension built without crypto_mb or not built
at all) is answered ``None``: the caller verifies that item with OpenSSL
(cryptography) as it would anyway. There is deliberately no pure Python
fallback here.

Whether the path runs is decided once, when the extension is imported, and
``status()`` says which way and why ("crypto_mb AVX-512 IFMA" or
"unavailable: <reason>") for logs, the bench header and metrics. Setting
FEDTOKEN_MULTIBUFFER=off in the environment before import turns it off.

The extension builds, for each item, the one canonical EMSA-PKCS1-v1_5
encoding of the SHA-256 DigestInfo and compares all of it with s^e mod n; it
refuses signatures whose length is not the modulus length and values s >= n
before computing anything.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

__all__ = ["KeyHandle", "available", "key_handle", "status", "verify_many"]

VALID: Final = 1
INVALID: Final = 0
FALLBACK: Final = 2


class KeyHandle(Protocol):
    """An RSA public key prepared once by the extension (``fedtoken._mbrsa.KeyHandle``)."""

    @property
    def bits(self) -> int: ...
    @property
    def e(self) -> int: ...
    @property
    def n(self) -> bytes: ...
    @property
    def supported(self) -> bool: ...


def _load() -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module("fedtoken._mbrsa")
    except ImportError as exc:
        return None, f"unavailable: extension not built ({exc.__class__.__name__})"
    status_text = getattr(mod, "MULTIBUFFER", None)
    if not isinstance(status_text, str):
        return None, "unavailable: extension reports no status"
    return mod, status_text


_MOD, _STATUS = _load()


def available() -> bool:
    """True when crypto_mb runs on this CPU in this build (decided at import)."""
    return _MOD is not None and not _STATUS.startswith("unavailable")


def status() -> str:
    """"crypto_mb AVX-512 IFMA" or "unavailable: <reason>"."""
    return _STATUS


def key_handle(key: RSAPublicKey) -> KeyHandle | None:
    """The extension's handle for ``key`` (convert once, reuse per batch), or
    None when the extension is absent."""
    if _MOD is None:
        return None
    numbers = key.public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    handle: KeyHandle = _MOD.KeyHandle(n, numbers.e)
    return handle


def verify_many(
    keys: Sequence[KeyHandle | RSAPublicKey],
    signatures: Sequence[bytes],
    digests: Sequence[bytes],
) -> list[bool | None]:
    """RS256 verdicts for the items ``zip(keys, signatures, digests)``.

    Each digest is the SHA-256 of the signing input (32 bytes). Per item:
    True valid, False invalid, None not handled here (verify it with
    OpenSSL). Keys may be handles from ``key_handle`` (preferred: converted
    once) or cryptography RSA public keys (converted on every call).
    """
    count = len(keys)
    if len(signatures) != count or len(digests) != count:
        raise ValueError("keys, signatures and digests differ in length")
    if _MOD is None or not available():
        return [None] * count
    handle_type: Any = _MOD.KeyHandle
    items: list[tuple[Any, bytes, bytes]] = []
    for key, sig, digest in zip(keys, signatures, digests, strict=True):
        if isinstance(key, RSAPublicKey):
            converted = key_handle(key)
            assert converted is not None
            key = converted
        elif not isinstance(key, handle_type):
            raise TypeError(f"key must be a KeyHandle or an RSA public key, not {type(key)}")
        items.append((key, bytes(sig), bytes(digest)))
    answers: bytes = _MOD.verify_pkcs1_sha256_mb(items)
    return [True if a == VALID else False if a == INVALID else None for a in answers]
