"""The audit writer against a real Postgres: durability, grouping, outages, the spill."""

# ruff: noqa: F811 - the fixtures are imported from tests.integration._audit_fixture

from __future__ import annotations

import asyncio
import collections
import json
import os
import stat
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fedtoken.audit import (
    SPILLED_AT_KEY,
    VERIFIED_EVENT,
    VERIFIED_FIELDS,
    AuditMode,
    SpillRecord,
    encode_record,
    spill_dir_for,
)
from fedtoken.core.errors import AuditUnavailable, ErrorReason
from fedtoken.core.model import Reason, Tenant, Verdict
from fedtoken.store import AuditEvent, AuditRecord, ChainProblem, PgStore
from fedtoken.store.embedded import EmbeddedPostgres
from tests.integration._audit_fixture import (  # noqa: F401 - fixtures, found by name
    all_rows,
    eventually,
    own_db,
    private_pg,
    private_store,
    store,
    tmp_path,
    writer_for,
)

pytestmark = pytest.mark.integration


# --- helpers --------------------------------------------------------------------


def verified_items(rows: list[AuditRecord]) -> list[dict[str, Any]]:
    """Every per-token entry of every token.verified row, with its row's context."""
    out = []
    for r in rows:
        if r.event.event_type != VERIFIED_EVENT:
            continue
        details = r.event.details or {}
        assert details["fields"] == list(VERIFIED_FIELDS)
        assert details["count"] == len(details["items"])
        assert details["valid"] + details["invalid"] == details["count"]
        for item in details["items"]:
            entry = dict(zip(VERIFIED_FIELDS, item, strict=True))
            entry.update(row_seq=r.seq, row_tenant=r.event.tenant, row_actor=r.event.actor)
            out.append(entry)
    return out


def verdict(tenant: str, jti: str, *, valid: bool = True, subject: str = "alice") -> Verdict:
    return Verdict(
        valid=valid,
        reason=Reason.OK if valid else Reason.EXPIRED,
        tenant=tenant,
        kid="kid-1",
        subject=subject,
        jti=jti,
    )


def completes_without_waiting(call: Coroutine[Any, Any, None]) -> bool:
    """Whether the call returns without suspending once (the request path's fast path)."""
    try:
        call.send(None)
    except StopIteration:
        return True
    call.close()
    return False


# --- durable records ----------------------------------------------------------------


async def test_record_commits_before_returning(
    store: PgStore, own_db: str, tmp_path: Path
) -> None:
    writer = writer_for(store, tmp_path / "spill")
    await writer.start()
    other = await asyncpg.connect(own_db)
    try:
        for i in range(5):
            await writer.record(AuditEvent(
                "token.issued", tenant="acme", actor="svc", subject="alice", jti=f"j{i}",
                kid="k1", outcome="ok", request_id=f"r{i}", details={"exp": 123},
            ))
            # Visible from another connection the moment the call returns.
            row = await other.fetchrow(
                "SELECT seq, tenant_id, actor, request_id FROM audit_events WHERE jti = $1",
                f"j{i}",
            )
            assert row is not None
            assert (row["tenant_id"], row["actor"], row["request_id"]) == ("acme", "svc", f"r{i}")
    finally:
        await other.close()
        await writer.stop()
    assert writer.mode is AuditMode.DIRECT
    assert (writer.written, writer.spilled, writer.failed) == (5, 0, 0)
    rows = await all_rows(store)
    assert [r.event.jti for r in rows] == [f"j{i}" for i in range(5)]
    assert (await store.audit.verify_chain()).ok
    assert not list((tmp_path / "spill").glob("seg-*"))


# --- verifications --------------------------------------------------------------------


async def test_verifications_are_grouped_and_each_token_recorded_once(
    store: PgStore, own_db: str, tmp_path: Path
) -> None:
    writer = writer_for(store, tmp_path / "spill", max_items_per_row=700)
    await writer.start()
    expected: dict[str, tuple[str, str, str, bool]] = {}
    try:
        for call in range(500):  # 500 calls x 20 tokens = 10,000 verdicts
            tenant = ("acme", "beta", "gamma")[call % 3]
            actor = ("orders", "billing")[call % 2]
            verdicts = []
            for k in range(20):
                jti = f"{tenant}-{call}-{k}"
                valid = k % 5 != 0
                expected[jti] = (tenant, actor, f"req-{call}", valid)
                verdicts.append(verdict(tenant, jti, valid=valid))
            assert completes_without_waiting(
                writer.record_verifications(tenant, actor, f"req-{call}", verdicts)
            )
            if call % 50 == 0:
                await asyncio.sleep(0)  # let flush windows pass now and then
        # A hostile token: NUL, a lone surrogate, a huge subject. Recorded, not refused.
        await writer.record_verifications(
            "acme", "orders", "req-x",
            [verdict("", "bad\x00jti\ud800", valid=False, subject="s" * 5000)],
        )
        await writer.record_soon(AuditEvent("token.introspected", tenant="acme", actor="rs",
                                            jti="acme-0-1", outcome="active", request_id="req-i"))
        await writer.flush()
    finally:
        await writer.stop()

    rows = await all_rows(store)
    items = verified_items(rows)
    counts = collections.Counter(i["jti"] for i in items)
    assert len(items) == 10_001
    assert all(counts[jti] == 1 for jti in expected)
    # Grouped: far fewer rows than tokens, one (tenant, actor) per row.
    verified_rows = [r for r in rows if r.event.event_type == VERIFIED_EVENT]
    assert len(verified_rows) < 200
    assert all(len(r.event.details["items"]) <= 700 for r in verified_rows)  # type: ignore[index]
    for item in items:
        if item["jti"] not in expected:
            continue
        tenant, actor, request_id, valid = expected[item["jti"]]
        assert (item["row_tenant"], item["row_actor"]) == (tenant, actor)
        assert item["request_id"] == request_id
        assert item["outcome"] == ("valid" if valid else "invalid")
        assert item["reason"] == ("OK" if valid else "EXPIRED")
        assert (item["sub"], item["kid"]) == ("alice", "kid-1")
        assert isinstance(item["time"], float | int) and item["time"] > 0
    [hostile] = [i for i in items if i["jti"] not in expected]
    assert hostile["jti"] == "bad\ufffdjti\ufffd"
    assert hostile["row_tenant"] == "acme" and hostile["outcome"] == "invalid"
    assert len(hostile["sub"]) < 1100
    [introspected] = [r for r in rows if r.event.event_type == "token.introspected"]
    assert (introspected.event.jti, introspected.event.request_id) == ("acme-0-1", "req-i")
    assert writer.queued == 0 and writer.failed == 0

    report = await store.audit.verify_chain()
    assert report.ok and report.rows_checked == len(rows)
    # One token's context inside a grouped row is covered by the chain.
    victim = verified_rows[len(verified_rows) // 2]
    tampered = json.loads(json.dumps(victim.event.details))
    tampered["items"][3][3] = "valid" if tampered["items"][3][3] == "invalid" else "invalid"
    conn = await asyncpg.connect(own_db)
    try:
        await conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        await conn.execute("UPDATE audit_events SET details = $1::text::jsonb WHERE seq = $2",
                           json.dumps(tampered), victim.seq)
    finally:
        await conn.close()
    report = await store.audit.verify_chain()
    assert (report.ok, report.first_bad_seq, report.problem) == (
        False, victim.seq, ChainProblem.ALTERED)


async def test_full_queue_applies_backpressure_then_refuses(
    store: PgStore, tmp_path: Path
) -> None:
    # No flush window passes during the test: only backpressure makes the writer write.
    writer = writer_for(store, tmp_path / "spill", max_queue=100, flush_interval=3600)
    await writer.start()
    batches = [[verdict("acme", f"q-{call}-{k}") for k in range(10)] for call in range(30)]
    try:
        # Thirty concurrent requests: each runs up to its first wait before the
        # writer task gets a turn.
        calls = [asyncio.create_task(writer.record_verifications("acme", "svc", f"r{n}", b))
                 for n, b in enumerate(batches)]
        await asyncio.sleep(0)
        states = ["waiting" if not c.done() else "refused" if c.exception() else "returned"
                  for c in calls]
        # Under the bound: returned; from the bound on: waiting for room; over twice: refused.
        assert states == ["returned"] * 9 + ["waiting"] * 11 + ["refused"] * 10
        for refused in calls[20:]:
            exc = refused.exception()
            assert isinstance(exc, AuditUnavailable)
            assert exc.reason is ErrorReason.AUDIT_UNAVAILABLE
        assert (writer.queued, writer.blocked, writer.refused) == (200, 11, 10)
        await asyncio.gather(*calls[9:20])  # they return once the writer drained the queue
        assert writer.queued < 100
        assert completes_without_waiting(
            writer.record_verifications("acme", "svc", "r-last", [verdict("acme", "last")])
        )
    finally:
        await writer.stop()
    accepted = [v.jti for b in batches[:20] for v in b] + ["last"]
    items = verified_items(await all_rows(store))
    assert sorted(i["jti"] for i in items) == sorted(accepted)  # nothing lost, nothing twice


async def test_graceful_stop_flushes_the_queue(store: PgStore, tmp_path: Path) -> None:
    writer = writer_for(store, tmp_path / "spill", flush_interval=3600)
    await writer.start()
    for call in range(100):
        await writer.record_verifications("acme", "svc", f"r{call}",
                                          [verdict("acme", f"g-{call}-{k}") for k in range(10)])
    await writer.record_soon(AuditEvent("token.introspected", tenant="acme", jti="g-0-0"))
    assert writer.queued == 1001
    await writer.stop()
    assert writer.queued == 0
    rows = await all_rows(store)
    assert len(verified_items(rows)) == 1000
    assert [r.event.jti for r in rows if r.event.event_type == "token.introspected"] == ["g-0-0"]
    with pytest.raises(AuditUnavailable):
        await writer.record_soon(AuditEvent("token.introspected"))
    with pytest.raises(AuditUnavailable):
        await writer.record_verifications("acme", "svc", "r", [verdict("acme", "late")])
    with pytest.raises(AuditUnavailable):
        await writer.record(AuditEvent("token.issued"))
    assert (await store.audit.verify_chain()).ok


# --- outages ---------------------------------------------------------------------------


async def test_postgres_outage_mid_load_loses_nothing(
    private_pg: EmbeddedPostgres, private_store: PgStore, tmp_path: Path
) -> None:
    spill_dir = spill_dir_for(tmp_path, 50051, 0)
    assert spill_dir == tmp_path / "audit-spill" / "50051-w0"
    writer = writer_for(private_store, spill_dir)
    await writer.start()
    produced: list[str] = []
    verified: list[str] = []
    stop_producing = asyncio.Event()

    async def producer() -> None:
        i = 0
        while not stop_producing.is_set():
            # Durable: must succeed throughout (Postgres or the spill).
            await writer.record(AuditEvent(
                "token.issued", tenant="acme", actor="svc", jti=f"d-{i:06d}", outcome="ok",
            ))
            produced.append(f"d-{i:06d}")
            batch = [verdict("acme", f"v-{i:06d}-{k}") for k in range(7)]
            await writer.record_verifications("acme", "svc", f"r{i}", batch)
            verified.extend(v.jti for v in batch)
            i += 1

    task = asyncio.create_task(producer())
    try:
        await eventually(lambda: len(produced) >= 150, "load before the outage")
        await asyncio.to_thread(private_pg.stop, "fast")  # while the producer runs
        await eventually(lambda: writer.mode is AuditMode.SPILL, "spill mode")
        mark = len(produced)
        await eventually(lambda: len(produced) >= mark + 150, "load during the outage")
        assert not task.done()
        segments = list(spill_dir.glob("seg-*.jsonl"))
        assert segments
        assert stat.S_IMODE(spill_dir.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(s.stat().st_mode) == 0o600 for s in segments)
        await asyncio.to_thread(private_pg.start)  # while the producer runs
        mark = len(produced)
        await eventually(lambda: len(produced) >= mark + 150, "load after the restart")
        await eventually(lambda: writer.replayed > 0, "replay under load")
        stop_producing.set()
        await task
        await writer.flush()
        await eventually(
            lambda: writer.mode is AuditMode.DIRECT and not writer.spill_pending,
            "spill replayed",
        )
    finally:
        stop_producing.set()
        if not task.done():
            task.cancel()
        await writer.stop()

    assert writer.spilled > 0 and writer.replayed == writer.spilled
    assert writer.failed == 0 and writer.rejected == 0
    rows = await all_rows(private_store)
    # Every durable event exactly once, and in the order it was produced.
    assert [r.event.jti for r in rows if r.event.event_type == "token.issued"] == produced
    spilled_rows = [r for r in rows if SPILLED_AT_KEY in (r.event.details or {})]
    assert spilled_rows
    # Every verdict exactly once.
    jtis = [i["jti"] for i in verified_items(rows)]
    assert len(jtis) == len(verified) and set(jtis) == set(verified)
    assert (await private_store.audit.verify_chain()).ok
    assert not list(spill_dir.glob("seg-*"))


async def test_durable_record_fails_closed_when_the_spill_is_unwritable(
    private_pg: EmbeddedPostgres, private_store: PgStore, tmp_path: Path
) -> None:
    spill_dir = tmp_path / "audit-spill"
    writer = writer_for(private_store, spill_dir)
    await writer.start()
    try:
        await writer.record(AuditEvent("token.issued", jti="before"))
        await asyncio.to_thread(private_pg.stop, "fast")
        # The spill directory is replaced by a file (root ignores read-only modes).
        spill_dir.rename(tmp_path / "moved-away")
        spill_dir.write_text("not a directory")
        with pytest.raises(AuditUnavailable) as refused:
            await writer.record(AuditEvent("token.issued", jti="refused"))
        assert refused.value.reason is ErrorReason.AUDIT_UNAVAILABLE
        assert writer.failed == 1

        # Both back: the writer recovers by itself.
        spill_dir.unlink()
        (tmp_path / "moved-away").rename(spill_dir)
        await asyncio.to_thread(private_pg.start)
        await eventually(lambda: writer.mode is AuditMode.DIRECT, "direct mode again")
        await writer.record(AuditEvent("token.issued", jti="after"))
    finally:
        await writer.stop()
    rows = await all_rows(private_store)
    assert [r.event.jti for r in rows] == ["before", "after"]
    assert (await private_store.audit.verify_chain()).ok


async def test_record_with_is_atomic_in_direct_mode_and_ordered_in_spill_mode(
    private_pg: EmbeddedPostgres, private_store: PgStore, tmp_path: Path
) -> None:
    store = private_store
    now = datetime.now(UTC)
    tenant = await store.tenants.create(Tenant(id="acme", issuer="https://acme.example"),
                                        now=now)
    expires = now + timedelta(days=1)
    given: list[AuditEvent | None] = []

    async def revoke(jti: str, event: AuditEvent | None) -> bool:
        given.append(event)
        changed, _ = await store.revocations.revoke(tenant.id, "jti", jti, expires_at=expires,
                                                    now=now, audit=event)
        return changed

    writer = writer_for(store, tmp_path / "audit-spill")
    await writer.start()
    try:
        # Direct: the caller appends the event in the change's own transaction.
        direct = AuditEvent("token.revoked", tenant=tenant.id, jti="w-direct")
        assert await writer.record_with(direct, lambda ev: revoke("w-direct", ev))
        assert given == [direct]

        # The change fails: neither it nor its event is in.
        async def failing(ev: AuditEvent | None) -> None:
            async with store.transaction() as tx:
                await tx.revocations.revoke(tenant.id, "jti", "w-failed", expires_at=expires,
                                            now=now, audit=ev)
                raise RuntimeError("the change fails after its audit append")

        with pytest.raises(RuntimeError):
            await writer.record_with(AuditEvent("token.revoked", jti="w-failed"), failing)

        # Spill mode: the change is made without the event, which follows
        # the events spilled before it.
        await asyncio.to_thread(private_pg.stop, "fast")
        await writer.record(AuditEvent("token.issued", jti="spilled"))
        assert writer.stats()["mode"] == AuditMode.SPILL.value

        async def no_database(ev: AuditEvent | None) -> str:
            given.append(ev)
            return "changed"

        assert await writer.record_with(AuditEvent("token.revoked", jti="w-spill"),
                                        no_database) == "changed"
        assert given[-1] is None
        assert writer.spilled == 2
        await asyncio.to_thread(private_pg.start)
        await eventually(lambda: writer.mode is AuditMode.DIRECT, "direct mode again")
    finally:
        await writer.stop()
    rows = await all_rows(store)
    assert [r.event.jti for r in rows] == ["w-direct", "spilled", "w-spill"]
    assert rows[0].event == direct
    assert not await store.revocations.is_revoked(tenant.id, "w-failed", "", 0, "", now=now)
    assert (await store.audit.verify_chain()).ok


# --- the spill on disk -----------------------------------------------------------------


def _write_segment(spill_dir: Path, number: int, records: list[SpillRecord],
                   tail: bytes = b"") -> Path:
    spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = spill_dir / f"seg-{number:012d}.jsonl"
    path.write_bytes(b"".join(encode_record(r) for r in records) + tail)
    os.chmod(path, 0o600)
    return path


async def test_torn_last_line_is_kept_aside_and_the_rest_replayed(
    store: PgStore, tmp_path: Path
) -> None:
    spill_dir = tmp_path / "audit-spill"
    good = [SpillRecord(AuditEvent("token.issued", tenant="acme", jti=f"t{i}",
                                   details={"exp": i}), 1_700_000_000.5 + i)
            for i in range(3)]
    torn = encode_record(SpillRecord(AuditEvent("token.issued", jti="t3"), 1.0))[:25]
    segment = _write_segment(spill_dir, 7, good, tail=torn)
    # And a line damaged in the middle (not a torn write): also kept, also skipped.
    lines = segment.read_bytes().split(b"\n")
    segment.write_bytes(b"\n".join([lines[0], b'{"v":1,"at":"garbage"', *lines[1:]]))

    writer = writer_for(store, spill_dir)
    await writer.start()
    try:
        assert writer.stats()["mode"] == AuditMode.SPILL.value  # leftovers first
        await writer.record(AuditEvent("token.issued", jti="new"))
        await eventually(lambda: writer.mode is AuditMode.DIRECT, "replay of the leftovers")
    finally:
        await writer.stop()

    rows = await all_rows(store)
    assert [r.event.jti for r in rows] == ["t0", "t1", "t2", "new"]
    assert rows[1].event.details == {"exp": 1, SPILLED_AT_KEY: 1_700_000_001.5}
    assert writer.corrupt_lines == 2 and writer.replayed == 4
    kept = sorted((spill_dir / "corrupt").iterdir())
    assert [k.read_bytes() for k in kept] == [b'{"v":1,"at":"garbage"', torn]
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in kept)
    assert not segment.exists() and not list(spill_dir.glob("seg-*"))
    assert (await store.audit.verify_chain()).ok


async def test_replay_is_exactly_once_after_a_crash(store: PgStore, tmp_path: Path) -> None:
    """Crash states are built on disk as a crashed process leaves them."""
    spill_dir = tmp_path / "audit-spill"

    def records(prefix: str, n: int) -> list[SpillRecord]:
        return [SpillRecord(AuditEvent("token.revoked", tenant="acme", jti=f"{prefix}{i}"),
                            1_700_000_000.0 + i) for i in range(n)]

    # Segment 1: crashed after committing lines 0..2, before writing "done".
    seg1 = records("a", 5)
    last = await store.audit.append_chunk([r.replay_event() for r in seg1[:3]])
    path1 = _write_segment(spill_dir, 1, seg1)
    path1.with_suffix(".ack").write_text(json.dumps({"pending": [0, 3, last, 2]}) + "\n")
    # Segment 2: crashed before that transaction committed (the seq went to someone else),
    # and a torn progress line from a later attempt.
    seg2 = records("b", 4)
    other = await store.audit.append_chunk([AuditEvent("tenant.created", tenant="zeta")])
    path2 = _write_segment(spill_dir, 2, seg2)
    path2.with_suffix(".ack").write_text(
        json.dumps({"done": 1}) + "\n" + json.dumps({"pending": [1, 4, other, 3]}) + "\n"
        + '{"pend'
    )
    await store.audit.append_chunk([seg2[0].replay_event()])  # line 0 is done
    # Segment 3: direct appends whose commit outcome was unknown; one did commit.
    c0 = AuditEvent("token.issued", jti="c0")
    seq_c0 = await store.audit.append_chunk([c0])
    _write_segment(spill_dir, 3, [
        SpillRecord(c0, 1.0, maybe_seq=seq_c0),
        SpillRecord(AuditEvent("token.issued", jti="c1"), 1.0, maybe_seq=seq_c0 + 1000),
    ])

    writer = writer_for(store, spill_dir, max_rows_per_copy=2)
    await writer.start()
    try:
        await eventually(lambda: writer.mode is AuditMode.DIRECT, "replay")
    finally:
        await writer.stop()

    rows = await all_rows(store)
    jtis = collections.Counter(r.event.jti for r in rows if r.event.jti)
    expected = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(4)] + ["c0", "c1"]
    assert sorted(jtis) == sorted(expected)
    assert all(jtis[j] == 1 for j in expected)
    # Order within each segment is kept.
    order = [r.event.jti for r in rows if r.event.jti]
    assert [j for j in order if j.startswith("a")] == [f"a{i}" for i in range(5)]
    assert [j for j in order if j.startswith("b")] == [f"b{i}" for i in range(4)]
    assert writer.replayed == 2 + 3 + 1
    assert not list(spill_dir.glob("seg-*"))
    assert (await store.audit.verify_chain()).ok


async def test_spill_directory_is_owned_by_one_writer(store: PgStore, tmp_path: Path) -> None:
    first = writer_for(store, tmp_path / "spill")
    await first.start()
    try:
        second = writer_for(store, tmp_path / "spill")
        with pytest.raises(OSError, match="used by another process"):
            await second.start()
    finally:
        await first.stop()
