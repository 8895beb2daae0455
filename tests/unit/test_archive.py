"""Audit archives and checkpoints after retention (pure): an archive proves
itself with the pinned checkpoint key, archives link up, and an anchor no
checkpoint signs is refused."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fedtoken.core.archive import (
    ArchiveProblem,
    header_line,
    row_hash,
    row_line,
    verify_archive,
)
from fedtoken.core.audit import GENESIS_HASH, ArchivedRow
from fedtoken.core.checkpoint import (
    Checkpoint,
    CheckpointProblem,
    SignedCheckpoint,
    signing_input,
    verify_checkpoints,
)
from fedtoken.core.jwk import rsa_thumbprint

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUB = KEY.public_key()
KID = rsa_thumbprint(PUB.public_numbers().n, PUB.public_numbers().e)
KEYS = {KID: PUB}


def chain(n: int) -> list[ArchivedRow]:
    rows, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        canonical = json.dumps([1, seq, seq * 1000, "t", "a", "token.issued", f"user-{seq}"])
        h = row_hash(prev, canonical)
        rows.append(ArchivedRow(seq, prev, h, canonical))
        prev = h
    return rows


def checkpoint(row: ArchivedRow) -> SignedCheckpoint:
    cp = Checkpoint(seq=row.seq, hash=row.hash, time=0, kid=KID)
    return SignedCheckpoint(cp, KEY.sign(signing_input(cp), padding.PKCS1v15(), hashes.SHA256()))


def archive(rows: list[ArchivedRow], prev: bytes = GENESIS_HASH) -> list[str]:
    head = header_line(from_seq=rows[0].seq, to_seq=rows[-1].seq, prev_hash=prev,
                       checkpoint=checkpoint(rows[-1]).line(), created=0)
    return [head, *map(row_line, rows)]


ROWS = chain(10)


def test_an_archive_proves_itself_and_archives_link_up() -> None:
    first = verify_archive(archive(ROWS[:6]), KEYS)
    assert first.ok and (first.from_seq, first.to_seq, first.rows) == (1, 6, 6)
    assert first.detail == ""
    second = verify_archive(archive(ROWS[6:], ROWS[5].hash), KEYS,
                            expect_prev=(first.to_seq, first.last_hash))
    assert second.ok and second.last_hash == ROWS[-1].hash
    alone = verify_archive(archive(ROWS[6:], ROWS[5].hash), KEYS)
    assert alone.ok and "earlier archives" in alone.detail


@pytest.mark.parametrize("tamper, problem", [
    (lambda ls: ls[:1] + ls[2:], ArchiveProblem.BROKEN),  # a row removed
    (lambda ls: ls[:-1], ArchiveProblem.BROKEN),  # truncated
    (lambda ls: [ls[0], ls[1].replace("user-1", "user-X"), *ls[2:]], ArchiveProblem.BROKEN),
    (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], ArchiveProblem.BROKEN),  # reordered
    (lambda ls: ["{}", *ls[1:]], ArchiveProblem.MALFORMED),
    (lambda ls: [ls[0], "not json", *ls[2:]], ArchiveProblem.MALFORMED),
    (lambda ls: [ls[0].replace('"to_seq":6', '"to_seq":5'), *ls[1:]],
     ArchiveProblem.CHECKPOINT),
])
def test_a_tampered_archive_is_refused(tamper, problem) -> None:  # type: ignore[no-untyped-def]
    report = verify_archive(tamper(archive(ROWS[:6])), KEYS)
    assert not report.ok and report.problem is problem, report


def test_an_archive_signed_by_another_key_or_discontinuous_is_refused() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    n = other.public_numbers()
    assert verify_archive(archive(ROWS[:6]), {rsa_thumbprint(n.n, n.e): other}
                          ).problem is ArchiveProblem.CHECKPOINT
    gap = verify_archive(archive(ROWS[7:], ROWS[6].hash), KEYS, expect_prev=(6, ROWS[5].hash))
    assert gap.problem is ArchiveProblem.DISCONTINUOUS


def test_checkpoints_after_retention_need_a_signed_anchor() -> None:
    lines = [checkpoint(ROWS[i]).line() for i in (2, 5, 8)]  # seqs 3, 6, 9
    kept = {r.seq: r.hash for r in ROWS if r.seq > 6}

    def lookup(seq: int) -> bytes | None:
        return kept.get(seq)

    good = verify_checkpoints(lines, KEYS, lookup, chain_ok=True, anchor=(6, ROWS[5].hash))
    assert good.ok and (good.checked, good.archived) == (2, 1)
    # The anchor moved to a row no checkpoint signs.
    moved = verify_checkpoints(lines, KEYS, lookup, chain_ok=True, anchor=(7, ROWS[6].hash))
    assert moved.problem is CheckpointProblem.ANCHOR_UNSIGNED
    # The anchor kept its seq but not the signed hash.
    forged = verify_checkpoints(lines, KEYS, lookup, chain_ok=True, anchor=(6, b"\x01" * 32))
    assert forged.problem is CheckpointProblem.HASH_MISMATCH
    # Without an anchor the archived rows are simply missing.
    assert verify_checkpoints(lines, KEYS, lookup, chain_ok=True).problem \
        is CheckpointProblem.ROW_MISSING


def test_archive_names_parse_and_stale_archives_are_discarded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from fedtoken.audit.archive import FileAuditArchive
    from fedtoken.core.archive import archive_name, parse_archive_name

    assert parse_archive_name(archive_name(1, 8)) == (1, 8)
    for junk in ("audit-1.jsonl.gz", "x-1-2.jsonl.gz", "audit-a-2.jsonl.gz", "audit-1-2.txt"):
        assert parse_archive_name(junk) is None
    for first, last in ((1, 8), (9, 9), (10, 20)):
        (tmp_path / archive_name(first, last)).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("kept")
    removed = asyncio.run(FileAuditArchive(tmp_path).discard_after(8))
    # Only what starts after the anchor (never pruned) goes.
    assert removed == [archive_name(9, 9), archive_name(10, 20)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive_name(1, 8), "notes.txt"]
