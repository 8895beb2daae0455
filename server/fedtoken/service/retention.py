"""Audit retention: old rows leave Postgres for an archive file, and the
chain stays verifiable (docs/security.md, "Audit retention").

One round (``Retention.prune_once``), run after a checkpoint round by the
replica that signs checkpoints:

1. the cut: the newest signed checkpoint of our journal whose row is older
   than the retention period (and is not the newest row): rows are removed
   only up to a row a signed checkpoint pins, so the retained chain starts
   at a hash the HSM key vouches for;
2. the rows from the current anchor up to the cut are read and checked while
   they are exported (each must link to the one before and match its hash:
   a broken chain is never archived as if it were whole, nor removed), and
   written as one archive, durable before anything is removed;
3. ``AuditLog.prune`` removes them in one transaction that moves the anchor
   and appends an ``audit.pruned`` event (the database refuses a cut that is
   not the checkpointed row, the newest row, or younger than its floor).

A crash between 2 and 3 leaves an archive and the rows: the next round
writes the same archive again (same name, same content) and prunes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from fedtoken.core.archive import LinkError, archive_name, check_link, header_line
from fedtoken.core.audit import GENESIS_HASH, ArchivedRow
from fedtoken.core.checkpoint import CheckpointFormatError, SignedCheckpoint, parse_line
from fedtoken.core.errors import InvalidRequest
from fedtoken.core.ports import AuditArchive, AuditLog, CheckpointJournal, Clock, utc
from fedtoken.service.checkpoints import ChainRewritten

log = logging.getLogger(__name__)

RETENTION_ACTOR = "fedtoken:retention"


@dataclass(frozen=True, slots=True)
class Pruned:
    from_seq: int
    to_seq: int
    rows: int
    archive: str


class Retention:
    def __init__(self, *, audit: AuditLog, journal: CheckpointJournal, archive: AuditArchive,
                 clock: Clock, keep_seconds: float) -> None:
        if keep_seconds <= 0:
            raise ValueError("keep_seconds must be positive")
        self._audit = audit
        self._journal = journal
        self._archive = archive
        self._clock = clock
        self._keep = keep_seconds

    async def prune_once(self) -> Pruned | None:
        """Archive and remove what is older than the retention period, up to
        the newest checkpoint that allows it; None when there is nothing to do."""
        # Never older than the database would let go of: an archive of rows
        # audit_prune then refuses to remove would only be discarded again.
        keep = max(self._keep, await self._audit.retention_floor())
        cutoff = utc(self._clock.now()) - timedelta(seconds=keep)
        oldest_kept = await self._audit.newest_before(cutoff)
        newest = await self._audit.newest()
        if oldest_kept is None or newest is None:
            return None
        anchor = await self._audit.anchor()
        after, prev_hash = (anchor.seq, anchor.hash) if anchor else (0, GENESIS_HASH)
        # An archive past the anchor is from a round whose prune did not
        # happen (refused, or it failed): its rows are still here.
        stale = await self._archive.discard_after(after)
        if stale:
            log.warning("audit retention: discarded %s (their rows were never removed from "
                        "Postgres; they are archived again)", ", ".join(stale))
        limit = min(oldest_kept.seq, newest.seq - 1)
        cut = await self._cut(after, limit)
        if cut is None:
            return None
        cp = cut.checkpoint
        row = await self._audit.at(cp.seq)
        if row is None or row.hash != cp.hash:
            raise ChainRewritten(
                f"row {cp.seq} of the audit chain does not have the hash our checkpoint "
                "signed; nothing is archived or removed. Run `fedtoken audit verify "
                "--checkpoints`")
        name = archive_name(after + 1, cp.seq)
        header = header_line(from_seq=after + 1, to_seq=cp.seq, prev_hash=prev_hash,
                             checkpoint=cut.line(), created=int(self._clock.now()))
        where = await self._archive.write(
            name, header, self._checked(self._audit.export(after, cp.seq), after, prev_hash,
                                        cp.seq))
        try:
            removed = await self._audit.prune(cp.seq, cp.hash, checkpoint=cut.line(),
                                              archive=name, actor=RETENTION_ACTOR)
        except InvalidRequest:
            # Refused by Postgres: nothing was removed, so the archive must
            # not stay to overlap the next one. (An uncertain outcome keeps it:
            # the prune may have happened, and then it is the only copy.)
            await self._archive.discard_after(after)
            raise
        log.info("audit retention: rows %d..%d (%d) archived to %s and removed from Postgres",
                 after + 1, cp.seq, removed, where)
        return Pruned(after + 1, cp.seq, removed, where)

    async def _cut(self, after: int, limit: int) -> SignedCheckpoint | None:
        """The newest checkpoint of the journal with after < seq <= limit."""
        best: SignedCheckpoint | None = None
        for line in await self._journal.lines():
            try:
                signed = parse_line(line.strip())
            except CheckpointFormatError:
                continue
            seq = signed.checkpoint.seq
            if after < seq <= limit and (best is None or seq > best.checkpoint.seq):
                best = signed
        return best

    @staticmethod
    async def _checked(pages: AsyncIterator[list[ArchivedRow]], after: int, prev_hash: bytes,
                       upto: int) -> AsyncIterator[list[ArchivedRow]]:
        seq, last = after, prev_hash
        async for page in pages:
            for row in page:
                try:
                    check_link(seq, last, row)
                except LinkError as exc:
                    raise ChainRewritten(
                        f"the audit chain is broken ({exc}); nothing is archived or "
                        "removed. Run `fedtoken audit verify --checkpoints`") from exc
                seq, last = row.seq, row.hash
            yield page
        if seq != upto:
            raise ChainRewritten(f"the audit chain ends at row {seq} while exporting up to "
                                 f"{upto}; nothing is removed")
