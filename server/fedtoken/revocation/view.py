"""In-memory revocation state, with a freshness watermark (fail closed).

The verify path never asks Postgres: it asks this view. The view knows how
current it is: ``confirm_fresh(t)`` records that every revocation committed
before monotonic time ``t`` has been applied (the sync task proves it with a
heartbeat NOTIFY that travels behind all earlier notifications). Past
``staleness`` seconds without confirmation, every check answers
REVOCATION_UNAVAILABLE until the view is confirmed again.

Memory: a revoked jti is kept as a 63-bit keyed digest of (tenant, jti) in
one set, and in a per-minute expiry bucket that lets expired entries be
dropped without a per-entry timestamp. A digest collision can only make a
token look revoked (fail closed), with probability about n / 2**63 per check.
Introspect never relies on this view: it asks Postgres exactly.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fedtoken.core.model import Reason

_BUCKET_SECONDS = 60


@dataclass(frozen=True, slots=True)
class RevocationEntry:
    """One revocation as the store lists it and notifications carry it."""

    tenant: str
    kind: str  # "jti", "subject" or "key"
    value: str
    expires_at: int  # unix seconds; the entry may be forgotten after it
    not_before: int = 0  # subject: tokens issued before this are revoked


def jti_digest(tenant: str, jti: str) -> int:
    digest = hashlib.blake2b(
        jti.encode("utf-8", "surrogatepass"), digest_size=8, key=tenant.encode()[:64]
    ).digest()
    return int.from_bytes(digest, "big") >> 1


class InMemoryRevocationView:
    """Implements ``fedtoken.core.ports.RevocationView``.

    Writers (the sync task on the event loop) and readers (verify threads)
    may run concurrently: membership tests on sets and dicts are atomic under
    the GIL, and structural changes happen under ``_lock``.
    """

    def __init__(
        self,
        *,
        staleness: float,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._staleness = staleness
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._jtis: set[int] = set()
        self._buckets: dict[int, list[int]] = {}
        self._subjects: dict[tuple[str, str], tuple[int, int]] = {}
        self._keys: dict[str, int] = {}
        # Never fresh until the first full load is confirmed.
        self._fresh_until = float("-inf")

    # -- reads (hot path) --------------------------------------------------

    def check(self, tenant: str, jti: str, subject: str, issued_at: int, kid: str) -> Reason | None:
        if self._monotonic() > self._fresh_until:
            return Reason.REVOCATION_UNAVAILABLE
        if kid in self._keys:
            return Reason.KEY_REVOKED
        if self._jtis and jti_digest(tenant, jti) in self._jtis:
            return Reason.REVOKED
        if self._subjects:
            cut = self._subjects.get((tenant, subject))
            if cut is not None and issued_at < cut[0]:
                return Reason.REVOKED
        return None

    @property
    def is_fresh(self) -> bool:
        return self._monotonic() <= self._fresh_until

    @property
    def size(self) -> int:
        return len(self._jtis) + len(self._subjects) + len(self._keys)

    # -- writes (sync task) ------------------------------------------------

    def confirm_fresh(self, as_of_monotonic: float) -> None:
        """Everything committed before ``as_of_monotonic`` has been applied."""
        self._fresh_until = max(self._fresh_until, as_of_monotonic + self._staleness)

    def mark_stale(self) -> None:
        """The feed broke: refuse to vouch for anything until resynced."""
        self._fresh_until = float("-inf")

    def add(self, entry: RevocationEntry) -> None:
        with self._lock:
            self._add_locked(entry)

    def replace_all(self, entries: Iterable[RevocationEntry]) -> None:
        """Swap in a full snapshot (after a reconnect or a periodic resync)."""
        new = InMemoryRevocationView(staleness=self._staleness)
        for entry in entries:
            new._add_locked(entry)
        with self._lock:
            self._jtis = new._jtis
            self._buckets = new._buckets
            self._subjects = new._subjects
            self._keys = new._keys

    def purge_expired(self, now: float | None = None) -> int:
        """Forget revocations whose tokens have expired anyway."""
        now = self._wall() if now is None else now
        limit = int(now) // _BUCKET_SECONDS
        removed = 0
        with self._lock:
            for bucket in [b for b in self._buckets if b < limit]:
                for digest in self._buckets.pop(bucket):
                    self._jtis.discard(digest)
                    removed += 1
            for key, (_, exp) in list(self._subjects.items()):
                if exp < now:
                    del self._subjects[key]
                    removed += 1
            for kid, exp in list(self._keys.items()):
                if exp < now:
                    del self._keys[kid]
                    removed += 1
        return removed

    def _add_locked(self, entry: RevocationEntry) -> None:
        if entry.kind == "jti":
            digest = jti_digest(entry.tenant, entry.value)
            if digest not in self._jtis:
                self._jtis.add(digest)
                # Bucket by the minute after expiry, so an entry is only
                # dropped once its token can no longer be valid.
                bucket = entry.expires_at // _BUCKET_SECONDS + 1
                self._buckets.setdefault(bucket, []).append(digest)
        elif entry.kind == "subject":
            key = (entry.tenant, entry.value)
            old = self._subjects.get(key)
            if old is None or entry.not_before > old[0]:
                self._subjects[key] = (entry.not_before, entry.expires_at)
        elif entry.kind == "key":
            self._keys[entry.value] = max(entry.expires_at, self._keys.get(entry.value, 0))
        else:
            raise ValueError(f"unknown revocation kind {entry.kind!r}")
