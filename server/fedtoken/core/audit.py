"""Audit trail records as the store writes and reads them.

The hash chain itself lives in the database (see migrations/0001_init.sql);
these classes only carry an event in, a chained row out, and the verdict of
a chain walk.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

GENESIS_HASH = bytes(32)
"""prev_hash of the first row: the seed of audit_head."""


@dataclass(frozen=True)
class AuditEvent:
    """One thing that happened, as the caller describes it.

    seq, ts and the hashes are assigned by the database when the event joins
    the chain, never by the caller. Empty strings are stored as NULL.
    """

    event_type: str
    tenant: str = ""
    actor: str = ""
    subject: str = ""
    jti: str = ""
    kid: str = ""
    outcome: str = ""
    reason: str = ""
    request_id: str = ""
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class AuditRecord:
    """A chained audit row."""

    seq: int
    ts: datetime
    event: AuditEvent
    prev_hash: bytes
    hash: bytes


class ChainProblem(enum.Enum):
    """How the chain is broken at ``ChainReport.first_bad_seq``."""

    ALTERED = "altered"
    """The row's content no longer matches its hash."""
    GAP = "deleted/gap"
    """A seq is missing (a row was deleted), or the head points past the last row."""
    BROKEN_LINK = "reordered/broken link"
    """The row's prev_hash is not the previous row's hash."""
    HEAD_MISMATCH = "head mismatch"
    """audit_head's hash is not the hash of the last row."""


@dataclass(frozen=True)
class ChainReport:
    """Outcome of ``PgAuditLog.verify_chain`` (``PgStore.audit.verify_chain``)."""

    ok: bool
    rows_checked: int
    head_seq: int
    head_hash: bytes
    first_bad_seq: int | None = None
    problem: ChainProblem | None = None
    # Retention: rows up to anchor_seq were archived and removed; the walk
    # started after it, from anchor_hash (0 and b"": nothing was removed).
    anchor_seq: int = 0
    anchor_hash: bytes = b""


@dataclass(frozen=True, slots=True)
class AuditAnchor:
    """Where the retained chain starts: the last removed row's seq and hash,
    the signed checkpoint that pins them and the archive holding the rows."""

    seq: int
    hash: bytes
    checkpoint: str
    archive: str


@dataclass(frozen=True, slots=True)
class ArchivedRow:
    """One chained row as an archive keeps it: the hash input exactly as the
    chain trigger computed it (``audit_canonical``), so an offline check is a
    SHA-256, with no need to re-encode anything."""

    seq: int
    prev_hash: bytes
    hash: bytes
    canonical: str
