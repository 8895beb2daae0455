"""In-memory revocation state, with a freshness watermark (fail closed).

The verify path never asks Postgres: it asks this view. The view knows how
current it is: ``confirm_fresh(t)`` records that every revocation committed
before monotonic time ``t`` has been applied (the sync task proves it with a
heartbeat NOTIFY that travels behind all earlier notifications). Past
``staleness`` seconds without confirmation, every check answers
REVOCATION_UNAVAILABLE until the view is confirmed again.

Memory: a revoked jti is kept as a 63-bit digest of (tenant, jti) (``jti_digest``) in an
open-addressing hash table made of two flat arrays (8 bytes of digest and 4
bytes of expiry per slot, load factor at most 0.6), plus the digest once
more in a per-minute expiry bucket (an array of uint64) so that expired
entries are dropped without scanning the table. About 32 bytes per jti at
one million: no Python object per entry. A digest collision can only make a
token look revoked (fail closed), with probability about n / 2**63 per
check. Introspect never relies on this view: it asks Postgres exactly.
"""

from __future__ import annotations

import hashlib
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from typing import NamedTuple

from fedtoken.core.model import Reason
from fedtoken.core.ports import RevocationEntry

__all__ = [
    "DigestTable",
    "InMemoryRevocationView",
    "NativeRevocations",
    "RevocationEntry",
    "SnapshotBuilder",
    "jti_digest",
    "jti_digest_prefix",
]

_BUCKET_SECONDS = 60
_TOP = 1 << 63  # set in every stored digest, so a stored value is never EMPTY or TOMBSTONE
_EMPTY = 0
_TOMBSTONE = 1
_MAX_FILL = 0.6  # live + tombstones, as a fraction of the slots, before a rebuild
_TARGET_FILL = 0.4  # live entries after a rebuild
_MIN_SLOTS = 1024
_U32_MAX = 0xFFFF_FFFF


def jti_digest_prefix(tenant: str) -> bytes:
    """What the digest of a jti of ``tenant`` hashes first (length-prefixed,
    so no (tenant, jti) pair hashes like another)."""
    raw = tenant.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(4, "big") + raw


def jti_digest(tenant: str, jti: str) -> int:
    """The 63-bit digest a revoked jti is kept as: the first 8 bytes of
    SHA-256(prefix || jti), shifted right once. The native pipeline
    (fedtoken._native, pipeline.h) computes the very same."""
    digest = hashlib.sha256(
        jti_digest_prefix(tenant) + jti.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class _Slots:
    """One generation of the table: replaced whole when it is rebuilt, so a
    reader that took a reference probes a consistent pair of arrays."""

    __slots__ = ("digests", "expiry", "mask")

    def __init__(self, size: int) -> None:
        self.digests = array("Q", bytes(8 * size))
        self.expiry = array("I", bytes(4 * size))
        self.mask = size - 1


def _slots_for(live: int) -> int:
    size = _MIN_SLOTS
    while size * _TARGET_FILL < live:
        size *= 2
    return size


class DigestTable:
    """A set of 63-bit digests, each with an expiry (unix seconds).

    Linear probing over ``array('Q')``; deletions leave tombstones, cleared
    by the next rebuild. One writer at a time (the view's lock); readers may
    probe concurrently without a lock: every slot update is a single
    GIL-atomic store, and a rebuild swaps in a new ``_Slots`` object.
    """

    def __init__(self, expected: int = 0) -> None:
        self._slots = _Slots(_slots_for(expected))
        self._live = 0
        self._filled = 0  # live + tombstones
        self._buckets: dict[int, array[int]] = {}

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        """Bytes held in the arrays (the table and the expiry buckets)."""
        s = self._slots
        total = s.digests.buffer_info()[1] * 8 + s.expiry.buffer_info()[1] * 4
        return total + sum(b.buffer_info()[1] * 8 for b in self._buckets.values())

    def probe_array(self) -> array[int] | None:
        """The current generation's digest array (a power of two long; see
        ``__contains__`` for the probe), or None while the table is empty:
        what the native pipeline probes without the GIL. A rebuild swaps in
        another array; one taken before keeps a consistent older generation."""
        return self._slots.digests if self._live else None

    def __contains__(self, digest: int) -> bool:
        s = self._slots
        digests, mask = s.digests, s.mask
        key = digest | _TOP
        i = digest & mask
        while True:
            v = digests[i]
            if v == key:
                return True
            if v == _EMPTY:
                return False
            i = (i + 1) & mask

    def add(self, digest: int, expires_at: int) -> None:
        exp = min(max(expires_at, 0), _U32_MAX)
        s = self._slots
        digests, mask = s.digests, s.mask
        key = digest | _TOP
        i = digest & mask
        free = -1
        while True:
            v = digests[i]
            if v == key:
                if exp > s.expiry[i]:
                    s.expiry[i] = exp
                    self._bucket(exp).append(key)
                return
            if v == _EMPTY:
                break
            if v == _TOMBSTONE and free < 0:
                free = i
            i = (i + 1) & mask
        if free >= 0:
            i = free
        else:
            self._filled += 1
        s.expiry[i] = exp
        digests[i] = key  # last: makes the slot visible to readers
        self._live += 1
        self._bucket(exp).append(key)
        if self._filled > _MAX_FILL * (mask + 1):
            self._rebuild()

    def purge(self, now: float) -> int:
        """Drop digests whose expiry is before ``now``; return how many."""
        limit = int(now) // _BUCKET_SECONDS
        removed = 0
        for minute in [m for m in self._buckets if m < limit]:
            for key in self._buckets.pop(minute):
                s = self._slots
                digests, mask = s.digests, s.mask
                i = (key ^ _TOP) & mask
                while True:
                    v = digests[i]
                    if v == key:
                        # A later re-revocation may have extended it.
                        if s.expiry[i] < now:
                            digests[i] = _TOMBSTONE
                            self._live -= 1
                            removed += 1
                        break
                    if v == _EMPTY:
                        break
                    i = (i + 1) & mask
        if self._filled - self._live > self._live and self._filled > _MIN_SLOTS * _TARGET_FILL:
            self._rebuild()
        return removed

    def _bucket(self, exp: int) -> array[int]:
        # The minute after expiry: an entry is only dropped once its token
        # can no longer be valid.
        minute = exp // _BUCKET_SECONDS + 1
        bucket = self._buckets.get(minute)
        if bucket is None:
            bucket = self._buckets[minute] = array("Q")
        return bucket

    def _rebuild(self) -> None:
        old = self._slots
        new = _Slots(_slots_for(self._live))
        digests, expiry, mask = new.digests, new.expiry, new.mask
        for j, key in enumerate(old.digests):
            if key > _TOMBSTONE:
                i = (key ^ _TOP) & mask
                while digests[i] != _EMPTY:
                    i = (i + 1) & mask
                digests[i] = key
                expiry[i] = old.expiry[j]
        self._slots = new
        self._filled = self._live


class NativeRevocations(NamedTuple):
    """What the native pipeline reads of a fresh view, taken once per batch."""

    jtis: array[int] | None
    subjects: dict[tuple[str, str], tuple[int, int]] | None
    keys: dict[str, int]
    digest_prefix: Callable[[str], bytes]


class _State:
    """The three kinds of revocation, swapped as one object so a reader that
    took it sees one generation of all three."""

    __slots__ = ("jtis", "keys", "subjects")

    def __init__(
        self,
        jtis: DigestTable,
        subjects: dict[tuple[str, str], tuple[int, int]],
        keys: dict[str, int],
    ) -> None:
        self.jtis = jtis
        self.subjects = subjects
        self.keys = keys


class InMemoryRevocationView:
    """Implements ``fedtoken.core.ports.RevocationView`` and ``LocalRevocations``.

    Writers (the sync task and Revoke, on the event loop) and readers (verify
    threads) may run concurrently: readers never take the lock (membership
    tests on the digest table and on dicts are safe under the GIL, see
    ``DigestTable``), and writers serialise on ``_lock``. ``add`` changes the
    current state in place, one atomic store at a time; ``install`` and
    ``purge_expired`` swap in a new ``_State`` with one assignment.
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
        self._state = _State(DigestTable(), {}, {})
        # Never fresh until the first full load is confirmed.
        self._fresh_until = float("-inf")

    # -- reads (hot path) --------------------------------------------------

    def check(self, tenant: str, jti: str, subject: str, issued_at: int, kid: str) -> Reason | None:
        if self._monotonic() > self._fresh_until:
            return Reason.REVOCATION_UNAVAILABLE
        state = self._state
        if kid in state.keys:
            return Reason.KEY_REVOKED
        jtis = state.jtis
        if len(jtis) and jti_digest(tenant, jti) in jtis:
            return Reason.REVOKED
        subjects = state.subjects
        if subjects:
            cut = subjects.get((tenant, subject))
            if cut is not None and issued_at < cut[0]:
                return Reason.REVOKED
        return None

    def native_state(self) -> NativeRevocations | None:
        """The state a batch checks natively, or None while the view is stale
        (then every check answers REVOCATION_UNAVAILABLE: the Python path)."""
        if self._monotonic() > self._fresh_until:
            return None
        state = self._state
        return NativeRevocations(state.jtis.probe_array(), state.subjects or None, state.keys,
                                 jti_digest_prefix)

    @property
    def staleness(self) -> float:
        """Seconds a confirmation of freshness lasts."""
        return self._staleness

    @property
    def is_fresh(self) -> bool:
        return self._monotonic() <= self._fresh_until

    @property
    def size(self) -> int:
        state = self._state
        return len(state.jtis) + len(state.subjects) + len(state.keys)

    @property
    def jti_table_bytes(self) -> int:
        """Bytes held by the jti table's arrays (for the benchmark)."""
        return self._state.jtis.nbytes

    # -- writes (sync task) ------------------------------------------------

    def confirm_fresh(self, as_of_monotonic: float) -> None:
        """Everything committed before ``as_of_monotonic`` has been applied."""
        self._fresh_until = max(self._fresh_until, as_of_monotonic + self._staleness)

    def mark_stale(self) -> None:
        """The feed broke: refuse to vouch for anything until resynced."""
        self._fresh_until = float("-inf")

    def add(self, entry: RevocationEntry) -> None:
        with self._lock:
            state = self._state
            _apply(entry, state.jtis, state.subjects, state.keys)

    def replace_all(self, entries: Iterable[RevocationEntry]) -> None:
        """Swap in a full snapshot (after a reconnect or a periodic resync).

        Anything not in ``entries`` is forgotten. The new state is built
        aside and swapped in, so readers see either the old or the new one.
        """
        expected = len(entries) if isinstance(entries, list | tuple) else 0
        builder = SnapshotBuilder(expected)
        for entry in entries:
            builder.add(entry)
        self.install(builder)

    def install(self, builder: SnapshotBuilder) -> None:
        """Swap in a snapshot built aside (streamed loads build one chunk by chunk)."""
        with self._lock:
            self._state = _State(builder.jtis, builder.subjects, builder.keys)

    def purge_expired(self, now: float | None = None) -> int:
        """Forget revocations whose tokens have expired anyway."""
        now = self._wall() if now is None else now
        with self._lock:
            state = self._state
            removed = state.jtis.purge(now)
            subjects = {k: v for k, v in state.subjects.items() if v[1] >= now}
            keys = {k: v for k, v in state.keys.items() if v >= now}
            removed += len(state.subjects) - len(subjects) + len(state.keys) - len(keys)
            # New dicts rather than deletions: readers never see one mid-change.
            self._state = _State(state.jtis, subjects, keys)
        return removed


class SnapshotBuilder:
    """A full revocation state under construction, invisible to readers
    until ``InMemoryRevocationView.install``."""

    def __init__(self, expected: int = 0) -> None:
        self.jtis = DigestTable(expected)
        self.subjects: dict[tuple[str, str], tuple[int, int]] = {}
        self.keys: dict[str, int] = {}

    def add(self, entry: RevocationEntry) -> None:
        _apply(entry, self.jtis, self.subjects, self.keys)


def _apply(
    entry: RevocationEntry,
    jtis: DigestTable,
    subjects: dict[tuple[str, str], tuple[int, int]],
    keys: dict[str, int],
) -> None:
    """Merge one revocation; a repeat can only widen what is revoked."""
    if entry.kind == "jti":
        jtis.add(jti_digest(entry.tenant, entry.value), entry.expires_at)
    elif entry.kind == "subject":
        key = (entry.tenant, entry.value)
        old = subjects.get(key)
        if old is None:
            subjects[key] = (entry.not_before, entry.expires_at)
        else:
            subjects[key] = (max(old[0], entry.not_before), max(old[1], entry.expires_at))
    elif entry.kind == "key":
        keys[entry.value] = max(entry.expires_at, keys.get(entry.value, 0))
    else:
        raise ValueError(f"unknown revocation kind {entry.kind!r}")
