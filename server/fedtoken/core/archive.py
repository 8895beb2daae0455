"""Audit archives: the rows retention removed from Postgres, kept verifiable.

An archive holds a contiguous run of chained rows, ``from_seq .. to_seq``,
and ends exactly at a signed checkpoint, so it proves itself with nothing but
the pinned checkpoint key: every row's hash is recomputed from the previous
hash and the row's canonical text (the very bytes the chain trigger hashed),
and the last hash is the one the checkpoint signs. A run of archives,
oldest first, links up (each one's ``prev_hash`` is the last hash of the
one before; the first starts from the genesis hash), and the newest one ends
at the anchor where the retained chain in Postgres continues.

Format version 1: UTF-8 JSON lines (the adapter gzips them). The first line
is the header ``{"format": "fedtoken-audit-archive", "v": 1, "from_seq": N,
"to_seq": M, "prev_hash": hex, "checkpoint": LINE, "created": unix}``, each
further line one row ``{"seq": N, "prev_hash": hex, "hash": hex,
"canonical": TEXT}``. The row's fields are the JSON array in ``canonical``
(0001_init.sql, ``audit_canonical``).

Pure: building and checking lines; files are the adapter's
(``fedtoken.audit.archive``).
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from fedtoken.core.audit import GENESIS_HASH, ArchivedRow
from fedtoken.core.checkpoint import CheckpointFormatError, parse_line, verify

ARCHIVE_FORMAT: Final = "fedtoken-audit-archive"
ARCHIVE_VERSION: Final = 1


def archive_name(from_seq: int, to_seq: int) -> str:
    """The file name of an archive: sorts in chain order."""
    return f"audit-{from_seq:015d}-{to_seq:015d}.jsonl.gz"


def parse_archive_name(name: str) -> tuple[int, int] | None:
    """(from_seq, to_seq) of an archive file name, or None if it is not one."""
    parts = name.removesuffix(".jsonl.gz").split("-")
    if len(parts) != 3 or parts[0] != "audit" or not name.endswith(".jsonl.gz"):
        return None
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return None


def header_line(*, from_seq: int, to_seq: int, prev_hash: bytes, checkpoint: str,
                created: int) -> str:
    return json.dumps({"format": ARCHIVE_FORMAT, "v": ARCHIVE_VERSION, "from_seq": from_seq,
                       "to_seq": to_seq, "prev_hash": prev_hash.hex(), "checkpoint": checkpoint,
                       "created": created}, sort_keys=True, separators=(",", ":"))


def row_line(row: ArchivedRow) -> str:
    return json.dumps({"seq": row.seq, "prev_hash": row.prev_hash.hex(), "hash": row.hash.hex(),
                       "canonical": row.canonical}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)


def row_hash(prev_hash: bytes, canonical: str) -> bytes:
    """What the chain trigger computes: sha256(prev_hash || canonical)."""
    return hashlib.sha256(prev_hash + canonical.encode("utf-8")).digest()


class LinkError(ValueError):
    """A row that does not continue the chain (for the exporter and the checker)."""


def check_link(prev_seq: int, prev_hash: bytes, row: ArchivedRow) -> None:
    """Raise LinkError unless ``row`` is the row after ``(prev_seq, prev_hash)``."""
    if row.seq != prev_seq + 1:
        raise LinkError(f"row {prev_seq + 1} is missing (found {row.seq})")
    if row.prev_hash != prev_hash:
        raise LinkError(f"row {row.seq} does not link to row {prev_seq}")
    if row_hash(prev_hash, row.canonical) != row.hash:
        raise LinkError(f"row {row.seq} does not match its hash (altered)")


class ArchiveProblem(enum.Enum):
    MALFORMED = "MALFORMED"
    """Not an archive of this format (header or a row unreadable)."""
    CHECKPOINT = "CHECKPOINT"
    """Its checkpoint is unreadable, not signed by a pinned key, or not its last row."""
    BROKEN = "BROKEN"
    """A row is missing, altered or does not link (see detail)."""
    DISCONTINUOUS = "DISCONTINUOUS"
    """It does not start where the previous archive ended."""


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    ok: bool
    from_seq: int = 0
    to_seq: int = 0
    rows: int = 0
    last_hash: bytes = b""
    problem: ArchiveProblem | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "from_seq": self.from_seq, "to_seq": self.to_seq,
                "rows": self.rows, "last_hash": self.last_hash.hex(),
                "problem": self.problem.value if self.problem else None, "detail": self.detail}


def verify_archive(lines: Iterable[str], keys: Mapping[str, RSAPublicKey], *,
                   expect_prev: tuple[int, bytes] | None = None) -> ArchiveReport:
    """Check one archive completely (see the module docstring).

    ``expect_prev``: the (seq, hash) the archive must continue from, i.e. the
    end of the previous archive; None means this must be the first archive
    (seq 1, genesis hash) unless it says otherwise, in which case only its
    own consistency is proven and the report says so in ``detail``.
    """
    it = iter(lines)
    try:
        header = json.loads(next(it))
    except (StopIteration, ValueError):
        return ArchiveReport(False, problem=ArchiveProblem.MALFORMED, detail="no header line")
    if (not isinstance(header, dict) or header.get("format") != ARCHIVE_FORMAT
            or header.get("v") != ARCHIVE_VERSION):
        return ArchiveReport(False, problem=ArchiveProblem.MALFORMED,
                             detail=f"not a {ARCHIVE_FORMAT} v{ARCHIVE_VERSION} header")
    try:
        from_seq, to_seq = int(header["from_seq"]), int(header["to_seq"])
        prev_hash = bytes.fromhex(header["prev_hash"])
        signed = parse_line(str(header["checkpoint"]))
    except (KeyError, TypeError, ValueError, CheckpointFormatError) as exc:
        return ArchiveReport(False, problem=ArchiveProblem.MALFORMED,
                             detail=f"unreadable header ({exc})")

    def fail(problem: ArchiveProblem, detail: str, rows: int = 0) -> ArchiveReport:
        return ArchiveReport(False, from_seq, to_seq, rows, problem=problem, detail=detail)

    cp = signed.checkpoint
    key = keys.get(cp.kid)
    if key is None or not verify(signed, key):
        return fail(ArchiveProblem.CHECKPOINT,
                    f"the checkpoint is not signed by a pinned key (kid {cp.kid!r})")
    if cp.seq != to_seq:
        return fail(ArchiveProblem.CHECKPOINT,
                    f"the checkpoint signs row {cp.seq}, the archive ends at {to_seq}")
    note = ""
    if expect_prev is not None:
        if (from_seq - 1, prev_hash) != expect_prev:
            return fail(ArchiveProblem.DISCONTINUOUS,
                        f"starts after row {from_seq - 1} ({prev_hash.hex()[:16]}...), the "
                        f"previous archive ends at row {expect_prev[0]}")
    elif from_seq != 1 or prev_hash != GENESIS_HASH:
        note = f"starts after row {from_seq - 1}: give the earlier archives to check its link"

    seq, last, rows = from_seq - 1, prev_hash, 0
    for number, text in enumerate(it, start=2):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
            row = ArchivedRow(seq=int(data["seq"]), prev_hash=bytes.fromhex(data["prev_hash"]),
                              hash=bytes.fromhex(data["hash"]), canonical=str(data["canonical"]))
        except (KeyError, TypeError, ValueError) as exc:
            return fail(ArchiveProblem.MALFORMED, f"line {number} is not a row ({exc})", rows)
        try:
            check_link(seq, last, row)
        except LinkError as exc:
            return fail(ArchiveProblem.BROKEN, str(exc), rows)
        seq, last, rows = row.seq, row.hash, rows + 1
    if seq != to_seq:
        return fail(ArchiveProblem.BROKEN, f"ends at row {seq}, the header says {to_seq}", rows)
    if last != cp.hash:
        return fail(ArchiveProblem.CHECKPOINT,
                    f"row {seq} has hash {last.hex()}, the checkpoint signs {cp.hash.hex()}",
                    rows)
    return ArchiveReport(True, from_seq, to_seq, rows, last, detail=note)
