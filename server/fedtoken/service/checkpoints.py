"""Signed checkpoints of the audit chain, kept outside Postgres
(``fedtoken.core.checkpoint``: what is signed and how it is checked).

Every period, ``Checkpoints.checkpoint`` reads the newest row of the chain
and, when the chain moved, signs ``(seq, hash)`` with the HSM's checkpoint
key and appends it to the journal (``<state_dir>/audit/checkpoints.jsonl``)
and to the log. ``fedtoken audit verify --checkpoints`` later proves the
chain still extends every checkpoint, which a database superuser who rewrote
the chain cannot fake: the key is in the HSM, the checkpoints are not in the
database.

Before signing, the previous checkpoint must still hold (the row at its seq
has its hash); if it does not, the chain was rewritten or truncated since,
nothing more is signed and an error is logged every period. The first
checkpoint of a journal is signed only after a full walk of the chain
verified it.

``FileCheckpointJournal`` is the journal: one JSON line per checkpoint,
appended with one write and fsync'ed (file and directory), and the public
JWK of the key next to it so an operator can pin it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final

from fedtoken.core.audit import AuditRecord
from fedtoken.core.checkpoint import (
    Checkpoint,
    CheckpointFormatError,
    SignedCheckpoint,
    parse_line,
    signing_input,
)
from fedtoken.core.errors import FailedPrecondition, HsmUnavailable
from fedtoken.core.jwk import b64url_encode
from fedtoken.core.ports import (
    AuditLog,
    CheckpointJournal,
    CheckpointSigner,
    Clock,
    GeneratedKey,
    Store,
)

log = logging.getLogger(__name__)

CHECKPOINT_KEY_LOCK: Final = 0x6665_6474_6F6C  # advisory lock: one key generation at a time


@dataclass(frozen=True, slots=True)
class _Anchor:
    """The newest checkpoint: the chain must still have ``hash`` at ``seq``."""

    seq: int
    hash: bytes


class ChainRewritten(FailedPrecondition):
    """The chain no longer extends the newest checkpoint."""


class Checkpoints:
    """Signs the audit chain's head now and then (see the module docstring)."""

    def __init__(self, *, store: Store, signer: CheckpointSigner, journal: CheckpointJournal,
                 clock: Clock) -> None:
        self._store = store
        self._log: AuditLog = store.audit
        self._signer = signer
        self._journal = journal
        self._clock = clock
        self._key: GeneratedKey | None = None
        self._anchor: _Anchor | None = None
        self._lock = asyncio.Lock()

    @property
    def key(self) -> GeneratedKey | None:
        return self._key

    async def prepare(self) -> GeneratedKey:
        """Find (or, once per HSM, generate) the checkpoint key, publish its
        public JWK, and take the newest journal entry as the anchor."""
        async with self._lock:
            if self._key is None:
                key = await self._signer.checkpoint_key(create=False)
                if key is None:
                    # Replicas sharing the database (and so, usually, the HSM)
                    # generate one key between them.
                    async with self._store.advisory_lock(CHECKPOINT_KEY_LOCK):
                        key = await self._signer.checkpoint_key(create=True)
                if key is None:  # pragma: no cover - a signer that ignores create=True
                    raise HsmUnavailable("no audit checkpoint key, and none was created")
                published = await self._journal.publish_key(key.public_jwk)
                log.info("audit checkpoint key: thumbprint (kid) %s, HSM label %s, public JWK "
                         "in %s; pin it to verify checkpoints", key.kid, key.hsm_label,
                         published)
                self._anchor = await self._read_anchor()
                self._key = key
            return self._key

    async def _read_anchor(self) -> _Anchor | None:
        line = await self._journal.last()
        if line is None:
            return None
        try:
            cp = parse_line(line).checkpoint
        except CheckpointFormatError as exc:
            log.warning("the last line of %s is not a checkpoint (%s); the next checkpoint "
                        "is signed after a full chain walk", self._journal.where, exc)
            return None
        return _Anchor(cp.seq, cp.hash)

    async def checkpoint(self) -> SignedCheckpoint | None:
        """Sign the newest row of the chain if it moved since the last
        checkpoint; None when it did not. Raises ChainRewritten when the
        previous checkpoint no longer holds, FedtokenError when the store or
        the HSM fails (nothing is written then)."""
        key = await self.prepare()
        async with self._lock:
            anchor = self._anchor
            if anchor is None:
                report = await self._log.verify_chain()
                if not report.ok:
                    raise ChainRewritten(
                        f"the audit chain does not verify (row {report.first_bad_seq}: "
                        f"{report.problem.value if report.problem else '?'}); no checkpoint "
                        "is signed over a broken chain")
                if report.head_seq == 0:
                    return None
                head = _Anchor(report.head_seq, report.head_hash)
            else:
                await self._still_holds(anchor)
                newest = await self._newest_after(anchor.seq)
                if newest is None:
                    return None
                head = _Anchor(newest.seq, newest.hash)
            checkpoint = Checkpoint(seq=head.seq, hash=head.hash, time=int(self._clock.now()),
                                    kid=key.kid)
            sig = await self._signer.sign_checkpoint(key.hsm_label, key.kid,
                                                     signing_input(checkpoint))
            signed = SignedCheckpoint(checkpoint, sig)
            line = signed.line()
            await self._journal.append(line)
            self._anchor = head
        # The whole line too: the log is the second copy outside Postgres.
        log.info("audit checkpoint seq=%d hash=%s sig=%s...: %s", head.seq, head.hash.hex(),
                 b64url_encode(sig)[:16], line)
        return signed

    async def _still_holds(self, anchor: _Anchor) -> None:
        row = await self._row_from(anchor.seq)
        if row is None or row.seq != anchor.seq:
            # Retention may have archived it: then the retained chain's anchor
            # is at or after it (and is itself a signed checkpoint).
            kept = await self._log.anchor()
            if kept is not None and (kept.seq > anchor.seq or
                                     (kept.seq == anchor.seq and kept.hash == anchor.hash)):
                return
            raise ChainRewritten(
                f"the audit chain has no row {anchor.seq}, which the last checkpoint in "
                f"{self._journal.where} signed: rows were deleted or the chain replaced; "
                "run `fedtoken audit verify --checkpoints`")
        if row.hash != anchor.hash:
            raise ChainRewritten(
                f"row {anchor.seq} of the audit chain has hash {row.hash.hex()}, the last "
                f"checkpoint in {self._journal.where} signed {anchor.hash.hex()}: the chain "
                "was rewritten; run `fedtoken audit verify --checkpoints`")

    async def _row_from(self, seq: int) -> AuditRecord | None:
        """The first row with a seq of at least ``seq``."""
        rows = await self._log.list(after_seq=seq - 1, limit=1)
        return rows[0] if rows else None

    async def _newest_after(self, known: int) -> AuditRecord | None:
        """The newest row, if it is after seq ``known``."""
        newest = await self._log.newest()
        return newest if newest is not None and newest.seq > known else None
