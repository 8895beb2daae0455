"""A bounded cache of what a token's signature check proved.

Keyed by the SHA-256 of the exact token bytes (header, payload and signature
all covered), so another signature, header or payload never hits. An entry
holds the decoded payload, its bytes, the alg and kid, and the very
``VerificationKey`` object the signature verified under. A hit lets the
engine skip only the decoding and the signature check: the key is resolved
again for the call's expectation and the entry counts only if the resolver
returns that same object (a retired, compromised, removed or replaced key,
or a foreign issuer's changed JWKS, gives another object or a verdict);
claims and revocation are checked on every call.

Threads: the cache is one dict used with single get / set / pop calls
(atomic in CPython). An entry is immutable and a pure function of its key's
token, so a race can only lose an entry (a re-verification) or evict one
more than needed. Eviction is FIFO (insertion order of the dict, O(1)).
"""

from __future__ import annotations

from hashlib import sha256
from typing import Any, Final, NamedTuple

from fedtoken.core.ports import VerificationKey

__all__ = ["DEFAULT_SIZE", "MAX_PAYLOAD", "CachedToken", "TokenCache", "digest"]

DEFAULT_SIZE: Final = 8192
# Payloads larger than this are never cached (bounds the bytes per entry).
MAX_PAYLOAD: Final = 1024


class CachedToken(NamedTuple):
    """What a verified signature proved about one exact token."""

    payload: dict[str, Any]
    payload_bytes: bytes
    alg: str
    kid: str
    key: VerificationKey


def digest(token: str | bytes) -> bytes | None:
    """The cache key of ``token``; None for what can never be cached."""
    if type(token) is str:
        if not token.isascii():
            return None
        return sha256(token.encode("ascii")).digest()
    if type(token) is bytes:
        return sha256(token).digest()
    return None


class TokenCache:
    """At most ``size`` entries (size >= 1)."""

    def __init__(self, size: int = DEFAULT_SIZE, max_payload: int = MAX_PAYLOAD) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._size = size
        self._max_payload = max_payload
        self._entries: dict[bytes, CachedToken] = {}
        self.get = self._entries.get

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: bytes, entry: CachedToken) -> None:
        if len(entry.payload_bytes) > self._max_payload:
            return
        entries = self._entries
        while len(entries) >= self._size:
            try:
                oldest = next(iter(entries))
            except (StopIteration, RuntimeError):  # emptied or changed meanwhile
                break
            entries.pop(oldest, None)
        entries[key] = entry

    def clear(self) -> None:
        self._entries.clear()
