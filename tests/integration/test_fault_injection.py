"""Fault injection on a real instance: ``fedtoken serve --workers 2`` under load.

One module-scoped instance: a ``fedtoken serve`` subprocess with two
workers, its OWN embedded Postgres (this module stops, freezes and kills
it), its own SoftHSM dev token under its state dir (this module takes the
token directory away), fast revocation settings, and its audit spill
directory on a small tmpfs that this module fills (when mounting is
permitted; otherwise the disk-full case runs on an in-process server with a
simulated ENOSPC at the spill's write call).

A bounded load keeps issuing tokens, revoking every third one and verifying
them, and records what each call was told. Each fault is its own test, in
order: Postgres stopped, frozen, restarted (crash); the HSM token removed;
a worker killed; the spill disk full while Postgres is down; the spill disk
still full when Postgres returns. After each fault and its repair:

- the service serves again without a restart (the same processes): Issue
  and Verify succeed on fresh connections that reach every worker;
- (a) every jti that Issue returned has exactly one ``token.issued`` audit
  record (the spill may still be replaying: polled with a deadline);
- (b) every token whose Revoke returned OK verifies as REVOKED on every
  worker (and, during the load, none verified as valid once the staleness
  bound had passed after its Revoke);
- (c) the audit chain verifies;
- the load saw only the errors that fault explains (each test names them).

Two server bugs found here are fixed and kept as regression tests:
test_a_revocation_refused_for_want_of_audit_has_no_effect_or_is_audited
(record_with made the change before its spilled record) and
test_revoke_while_postgres_shuts_down_is_unavailable_not_internal
(asyncpg's InternalClientError was not translated to STORE_UNAVAILABLE).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedtoken.store.embedded import EmbeddedPostgres
from fedtoken.store.migrate import APP_ROLE
from fedtoken_client import FedtokenClient, FedtokenRpcError, reason_name
from tests._pg_fixture import PgFreezer, create_database
from tests.integration._faults import (
    AUDIENCE,
    FaultServe,
    LateCloseProxy,
    Ledger,
    Load,
    PgControl,
    Target,
    Tmpfs,
    eventually,
    fill,
    fresh_client,
    via_port,
)

pytestmark = pytest.mark.integration

WORKERS = 2
STALENESS = 2.0  # revocation_staleness_seconds of the instance
HEARTBEAT = 0.3
RECOVERY = 30.0  # bound for "serves again" and for the audit replay
# Small, and yet far more than any outage here spills (a few hundred kB; the
# load's call bound caps it near 3 MiB), so that only the test fills it.
SPILL_TMPFS_SIZE = "16m"
# A revoked token may verify as valid on another worker only until the
# revocation has provably reached it: one staleness bound (plus slack for
# the test's own clock reading).
REVOCATION_GRACE = STALENESS + 0.5
KILL_WINDOW = 3.0  # client errors allowed this long after a worker is killed
FROZEN_FOR = 5.0  # Postgres frozen this long
OUTAGE = 4.0  # Postgres stopped this long: past the staleness bound

STORE_DOWN = ("revoke", "UNAVAILABLE", "STORE_UNAVAILABLE")
HSM_DOWN = ("issue", "UNAVAILABLE", "HSM_UNAVAILABLE")
AUDIT_DOWN_ISSUE = ("issue", "UNAVAILABLE", "AUDIT_UNAVAILABLE")
AUDIT_DOWN_REVOKE = ("revoke", "UNAVAILABLE", "AUDIT_UNAVAILABLE")


# --- the rig -------------------------------------------------------------------------


@dataclass
class Rig:
    """One server under test and what its clients were told."""

    target: Target
    workers: int
    listening: Callable[[], set[int]]
    serving: Callable[[], set[int]]
    ledger: Ledger = field(default_factory=Ledger)
    # What the audit trail holds, read incrementally: event type -> jti ->
    # number of records; the jtis whose record came through the spill
    # (details.spilled_at); the last seq read per event type.
    records: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    spilled: set[str] = field(default_factory=set)
    cursor: dict[str, int] = field(default_factory=dict)
    log_text: Callable[[], str] = lambda: ""  # the server's log, for failure messages

    def read_audit(self, client: FedtokenClient, event_type: str) -> collections.Counter[str]:
        """Records of ``event_type`` by jti, read on from where the last call stopped
        (seqs are gapless and in commit order, so nothing is skipped)."""
        seen = self.records[event_type]
        while True:
            page = client.list_audit(event_type=event_type, page_size=1000,
                                     after_seq=self.cursor.get(event_type, 0))
            for e in page.events:
                seen[e.jti] += 1
                if "spilled_at" in json.loads(e.details_json or "{}"):
                    self.spilled.add(e.jti)
            if page.events:
                self.cursor[event_type] = page.events[-1].seq
            if len(page.events) < 1000:
                return seen


@dataclass
class Instance:
    root: Path
    pg: PgControl
    serve: FaultServe
    spill: Tmpfs
    rig: Rig
    worker_pids: set[int] = field(default_factory=set)


@pytest.fixture(scope="module")
def inst() -> Iterator[Instance]:
    # A private directory, not pytest's basetemp (concurrent sessions rotate it).
    with tempfile.TemporaryDirectory(prefix="fedtoken-faults-") as name:
        root = Path(name)
        pg = PgControl(EmbeddedPostgres(root / "pg" / "data"))
        state = root / "state"
        spill = Tmpfs(state / "audit-spill", SPILL_TMPFS_SIZE)
        serve: FaultServe | None = None
        try:
            admin = pg.start()
            db = f"faults_{uuid.uuid4().hex[:8]}"
            migrations = create_database(admin, db)
            spill.mount()
            serve = FaultServe(state, pg.pg.dsn_for(db, APP_ROLE), workers=WORKERS, extra_env={
                # The service runs as the least-privileged role; migrations as the owner.
                "FEDTOKEN_DATABASE_MIGRATION_DSN": migrations,
                "FEDTOKEN_REVOCATION_STALENESS_SECONDS": str(STALENESS),
                "FEDTOKEN_REVOCATION_HEARTBEAT_SECONDS": str(HEARTBEAT),
            })
            serve.start(timeout=120)
            running = serve
            rig = Rig(running, WORKERS, lambda: set(running.listening_workers()),
                      running.serving_pids,
                      log_text=lambda: running.log.read_text(errors="replace"))
            yield Instance(root, pg, running, spill, rig, set(running.listening_workers()))
        finally:
            if serve is not None:
                serve.stop()
            spill.unmount()
            with contextlib.suppress(Exception):
                pg.stop()
            pg.close()


# --- recovery and the invariants ---------------------------------------------------------


def reaches_every_worker(rig: Rig, phase: str, works: Callable[[FedtokenClient], bool],
                         what: str, timeout: float = RECOVERY) -> list[FedtokenClient]:
    """Open fresh connections until every listening worker holds one on which
    ``works`` became true (polled); return those clients (caller closes them).

    No other client of the rig may be connected meanwhile: which worker a
    connection reached is read from the workers' sockets.
    """
    deadline = time.monotonic() + timeout
    clients: list[FedtokenClient] = []
    try:
        while True:
            for _ in range(4):
                c = fresh_client(rig.target, f"{phase}-probe-{len(clients)}", timeout=5)
                clients.append(c)
                eventually(functools.partial(works, c), f"{what} (connection {len(clients)})",
                           max(deadline - time.monotonic(), 0.5))
            listening = rig.listening()
            if len(listening) == rig.workers and listening <= rig.serving():
                return clients
            assert len(clients) < 40 and time.monotonic() < deadline, (
                f"{what}: {len(clients)} connections reached workers {rig.serving()} "
                f"of {listening}")
    except BaseException:
        for c in clients:
            c.close()
        raise


def issues_and_verifies(rig: Rig, phase: str) -> Callable[[FedtokenClient], bool]:
    def works(client: FedtokenClient) -> bool:
        try:
            issued = client.issue(f"fi-{phase}-probe", AUDIENCE)
        except FedtokenRpcError as exc:
            rig.ledger.failed(f"{phase}/recovery", "issue", exc)
            return False
        rig.ledger.issued_ok(f"{phase}/recovery", issued.jti, issued.token)
        verdict = client.verify(issued.token, AUDIENCE)
        return bool(verdict.valid)
    return works


def recover_and_check(rig: Rig, phase: str, *, same_workers: set[int] | None = None) -> None:
    """The service serves again on every worker; then invariants (a), (b), (c)."""
    probes = reaches_every_worker(rig, phase, issues_and_verifies(rig, phase),
                                  f"{phase}: Issue and Verify succeed again")
    try:
        if same_workers is not None:
            assert rig.listening() == same_workers, "a worker was restarted"
        # (b) on every worker: each token whose Revoke returned OK is REVOKED.
        revoked = rig.ledger.revoked_tokens()
        jtis, tokens = list(revoked), list(revoked.values())
        for probe in probes:
            for start in range(0, len(tokens), 1000):
                verdicts = probe.verify_batch(tokens[start:start + 1000], AUDIENCE)
                wrong = {jtis[start + k]: reason_name(v.reason)
                         for k, v in enumerate(verdicts)
                         if v.valid or reason_name(v.reason) != "REVOKED"}
                assert not wrong, f"{phase}: revoked tokens not REVOKED: {wrong}"
        assert not rig.ledger.violations, rig.ledger.violations
    finally:
        for probe in probes:
            probe.close()
    with fresh_client(rig.target, f"{phase}-audit", timeout=20) as admin:
        # (a) every issued jti exactly once in the trail (a replay may still run).
        def audited() -> bool:
            seen = rig.read_audit(admin, "token.issued")
            return not [j for j in rig.ledger.issued if seen[j] == 0]
        with contextlib.suppress(AssertionError):
            eventually(audited, "every issued token audited", RECOVERY, interval=0.3)
        seen = rig.read_audit(admin, "token.issued")
        missing = sorted(j for j in rig.ledger.issued if seen[j] == 0)
        assert not missing, (f"{phase}: {len(missing)} issued tokens without a token.issued "
                             f"record, e.g. {[(j, rig.ledger.issued_in[j]) for j in missing[:5]]}")
        twice = {j: n for j, n in seen.items() if n > 1}
        assert not twice, f"{phase}: token.issued recorded more than once: {twice}"
        # ... and every Revoke that returned OK has its token.revoked record.
        revoked_seen = rig.read_audit(admin, "token.revoked")
        unaudited = [j for j in rig.ledger.revoked if revoked_seen[j] == 0]
        assert not unaudited, f"{phase}: revocations without a record: {unaudited[:5]}"
        # (c) the chain.
        report = admin.verify_audit_chain()
        assert report.ok, f"{phase}: audit chain broken: {report}"


# A known server bug: when Postgres shuts down (pg_ctl stop -m fast or
# immediate), a pooled asyncpg connection may have read the server's FATAL
# (57P01) but not yet the end of the connection when the next statement is
# sent; asyncpg raises InternalClientError ("cannot switch to state 12;
# another operation (2) is in progress"), which fedtoken.store.pool.db_errors
# does not translate, so the RPC answers INTERNAL / INTERNAL_ERROR instead of
# UNAVAILABLE / STORE_UNAVAILABLE. Under the load it is intermittent, so here
# only those INTERNALs whose traceback in the server log names that exception
# are let through (with a warning), and only while Postgres goes down;
# test_revoke_while_postgres_shuts_down_is_unavailable_not_internal
# reproduces it every time (strict xfail).
ASYNCPG_INTERNAL = "asyncpg.exceptions._base.InternalClientError"
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def internal_client_error(rig: Rig, request_id: str) -> bool:
    """Whether the server logged ``request_id`` failing with asyncpg's InternalClientError."""
    lines = rig.log_text().splitlines()
    for i, line in enumerate(lines):
        if request_id and f"request_id={request_id}" in line:
            for later in lines[i + 1:i + 200]:
                if _LOG_RECORD.match(later):
                    break
                if ASYNCPG_INTERNAL in later:
                    return True
    return False


def judge_failures(rig: Rig, phase: str, allowed: set[tuple[str, str, str]], *,
                   postgres_went_down: bool = False) -> dict[str, int]:
    """Every failure of the load in ``phase`` is one the fault explains; the counts."""
    kinds = rig.ledger.kinds(phase)
    if postgres_went_down:
        internal = [f for f in rig.ledger.in_phase(phase)
                    if (f.code, f.reason) == ("INTERNAL", "INTERNAL_ERROR")]
        if internal and all(internal_client_error(rig, f.request_id) for f in internal):
            warnings.warn(f"{phase}: {len(internal)} call(s) answered INTERNAL instead of "
                          f"UNAVAILABLE: untranslated {ASYNCPG_INTERNAL} (a known server bug)",
                          stacklevel=2)
            allowed = allowed | {(f.op, f.code, f.reason) for f in internal}
    unexpected = {k: n for k, n in kinds.items() if k not in allowed}
    assert not unexpected, (f"{phase}: unexpected failures {unexpected} (allowed: {allowed})"
                            + server_log_about(rig, phase, allowed))
    counts = {"/".join(k): n for k, n in kinds.items()}
    ok = {op: rig.ledger.ok[(phase, op)] for op in ("issue", "revoke")}
    print(f"\n[{phase}] ok={ok} failures={counts} verdicts="
          f"{ {r: n for (p, r), n in rig.ledger.verdicts.items() if p == phase} }")
    return counts


def server_log_about(rig: Rig, phase: str, allowed: set[tuple[str, str, str]]) -> str:
    """The server log lines (and tracebacks) of the unexpected failures' requests."""
    ids = {f.request_id for f in rig.ledger.in_phase(phase)
           if (f.op, f.code, f.reason) not in allowed and f.request_id}
    lines, out, keep = rig.log_text().splitlines(), [], 0
    for line in lines:
        if any(i in line for i in ids):
            keep = 70
        if keep:
            out.append(line)
            keep -= 1
    return ("\nrequest ids " + ", ".join(sorted(ids)) + " in the server log:\n"
            + "\n".join(out[:200])) if ids else ""


def run_load(rig: Rig, phase: str, **kwargs: Any) -> Load:
    return Load(rig.target, rig.ledger, phase, grace=REVOCATION_GRACE, **kwargs)


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> None:
    eventually(condition, what, timeout, interval=0.05)


def load_made_progress(rig: Rig, phase: str, op: str, at_least: int) -> Callable[[], bool]:
    start = rig.ledger.ok[(phase, op)]
    return lambda: rig.ledger.ok[(phase, op)] >= start + at_least


def failures_seen(rig: Rig, phase: str, kind: tuple[str, str, str],
                  at_least: int = 1) -> Callable[[], bool]:
    start = rig.ledger.kinds(phase)[kind]
    return lambda: rig.ledger.kinds(phase)[kind] >= start + at_least


# --- the faults ------------------------------------------------------------------------------


def test_baseline_under_load(inst: Instance) -> None:
    rig = inst.rig
    with run_load(rig, "baseline").running():
        wait_for("load", load_made_progress(rig, "baseline", "revoke", 10), 30)
    judge_failures(rig, "baseline", set())
    recover_and_check(rig, "baseline", same_workers=inst.worker_pids)


def test_postgres_stopped(inst: Instance) -> None:
    rig, phase = inst.rig, "pg-stopped"
    with run_load(rig, phase).running():
        wait_for("load before", load_made_progress(rig, phase, "issue", 10), 30)
        inst.pg.stop("fast")
        stopped_at = time.monotonic()
        try:
            # Issue goes on through the spill; Revoke is refused, never faked.
            wait_for("issuance during the outage", load_made_progress(rig, phase, "issue", 20),
                     20)
            wait_for("revoke refused", failures_seen(rig, phase, STORE_DOWN), 20)
            time.sleep(max(0.0, stopped_at + OUTAGE - time.monotonic()))
            with rig.ledger.lock:
                during = {j for j, p in rig.ledger.issued_in.items() if p == phase}
        finally:
            inst.pg.start()
        wait_for("load after", load_made_progress(rig, phase, "revoke", 5), RECOVERY)
    judge_failures(rig, phase, {STORE_DOWN}, postgres_went_down=True)
    recover_and_check(rig, phase, same_workers=inst.worker_pids)
    assert rig.spilled & during, "no token issued during the outage went through the spill"


def test_postgres_frozen(inst: Instance) -> None:
    rig, phase = inst.rig, "pg-frozen"
    with run_load(rig, phase).running():
        wait_for("load before", load_made_progress(rig, phase, "issue", 10), 30)
        frozen_at = time.monotonic()
        with PgFreezer(inst.pg.pg).frozen() as stopped:
            assert stopped >= 2
            # A frozen Postgres answers nothing and reports nothing: only the
            # service's own bounds end the waits. Issue must keep answering.
            wait_for("issuance while frozen", load_made_progress(rig, phase, "issue", 5), 15)
            time.sleep(max(0.0, frozen_at + FROZEN_FOR - time.monotonic()))
        wait_for("load after", load_made_progress(rig, phase, "revoke", 5), RECOVERY)
    judge_failures(rig, phase, {STORE_DOWN})
    recover_and_check(rig, phase, same_workers=inst.worker_pids)


def test_postgres_restarted(inst: Instance) -> None:
    """A crash and restart: ``pg_ctl stop -m immediate`` (no shutdown
    checkpoint, crash recovery on start), then start at once."""
    rig, phase = inst.rig, "pg-restarted"
    with run_load(rig, phase).running():
        wait_for("load before", load_made_progress(rig, phase, "revoke", 5), 30)
        inst.pg.stop("immediate")
        inst.pg.start()
        wait_for("load after", load_made_progress(rig, phase, "revoke", 10), RECOVERY)
    judge_failures(rig, phase, {STORE_DOWN}, postgres_went_down=True)
    recover_and_check(rig, phase, same_workers=inst.worker_pids)


def test_hsm_token_removed_and_restored(inst: Instance) -> None:
    rig, phase = inst.rig, "hsm-away"
    tokens = inst.serve.state / "softhsm" / "tokens"
    away = tokens.with_name("tokens.away")
    assert tokens.is_dir() and any(tokens.iterdir()), "the dev token is not where expected"
    moved = False
    try:
        with run_load(rig, phase).running():
            wait_for("load before", load_made_progress(rig, phase, "issue", 10), 30)
            tokens.rename(away)
            moved = True
            wait_for("Issue refused", failures_seen(rig, phase, HSM_DOWN, 5), 15)
            # Verify and Revoke need no HSM: they go on.
            wait_for("revoke during the outage", load_made_progress(rig, phase, "revoke", 3), 15)

        # Load stopped: the probes below are the only clients. Every worker
        # refuses Issue, precisely, and signs nothing.
        def refused(client: FedtokenClient) -> bool:
            try:
                client.issue("fi-hsm-probe", AUDIENCE)
            except FedtokenRpcError as exc:
                return (exc.code.name, exc.reason) == ("UNAVAILABLE", "HSM_UNAVAILABLE")
            raise AssertionError("Issue succeeded while the HSM token was away")
        for probe in reaches_every_worker(rig, phase, refused,
                                          "every worker refuses Issue: HSM_UNAVAILABLE", 15):
            probe.close()
    finally:
        if moved:
            away.rename(tokens)
    judge_failures(rig, phase, {HSM_DOWN})
    recover_and_check(rig, phase, same_workers=inst.worker_pids)


def test_worker_killed(inst: Instance) -> None:
    rig, phase = inst.rig, "worker-killed"
    victim = next(iter(inst.worker_pids))
    with run_load(rig, phase, threads=3).running():
        wait_for("load before", load_made_progress(rig, phase, "revoke", 5), 30)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
            psutil.Process(victim).wait(10)  # gone once the supervisor has reaped it
        # The supervisor replaces it; the other worker serves meanwhile.
        wait_for("a replacement worker", lambda: len(
            (now := rig.listening()) - {victim}) == WORKERS and victim not in now, 90)
        replaced_at = time.monotonic()
        wait_for("load after", load_made_progress(rig, phase, "revoke", 10), RECOVERY)
    assert inst.serve.proc is not None and inst.serve.proc.poll() is None
    late = [f for f in rig.ledger.in_phase(phase) if f.at > killed_at + KILL_WINDOW]
    assert not late, f"client errors after the kill window: {late[:5]}"
    early = [f for f in rig.ledger.in_phase(phase) if f.at < killed_at]
    assert not early, f"client errors before the kill: {early[:5]}"
    counts = judge_failures(rig, phase, {
        (op, "UNAVAILABLE", "ERROR_REASON_UNSPECIFIED") for op in ("issue", "revoke", "verify")})
    print(f"[{phase}] replaced after {replaced_at - killed_at:.1f}s; errors {counts}")
    inst.worker_pids = rig.listening()
    assert victim not in inst.worker_pids and len(inst.worker_pids) == WORKERS
    recover_and_check(rig, phase, same_workers=inst.worker_pids)


def _needs_tmpfs(inst: Instance) -> None:
    if not inst.spill.mounted:
        pytest.skip(f"no tmpfs for the spill ({inst.spill.why_not}): "
                    "test_spill_write_enospc_simulated covers the case")


def test_spill_disk_full_while_postgres_is_down(inst: Instance) -> None:
    """Postgres down: issuance goes through the spill; the spill's disk full
    too: Issue is refused (AUDIT_UNAVAILABLE), never answered unaudited.
    Space freed and Postgres back: everything recovers, the spill replays."""
    _needs_tmpfs(inst)
    rig, phase = inst.rig, "spill-full"
    filler: Path | None = None
    with run_load(rig, phase).running():
        wait_for("load before", load_made_progress(rig, phase, "issue", 10), 30)
        inst.pg.stop("fast")
        try:
            wait_for("spilled issuance", load_made_progress(rig, phase, "issue", 10), 20)
            filler = fill(inst.spill.path)
            wait_for("Issue refused", failures_seen(rig, phase, AUDIT_DOWN_ISSUE, 10), 20)
            # And it stays refused while the disk is full. (A token whose line
            # still fitted in the open segment's last page is spilled, so
            # audited: (a) below checks every token that Issue returned.)
            wait_for("Issue still refused", failures_seen(rig, phase, AUDIT_DOWN_ISSUE, 10), 20)
        finally:
            if filler is not None:
                filler.unlink()
            inst.pg.start()
        wait_for("load after", load_made_progress(rig, phase, "revoke", 5), RECOVERY)
    # A Revoke is refused too: by its audit record first (the spill is full)
    # or by Postgres; either way nothing is changed.
    judge_failures(rig, phase, {STORE_DOWN, AUDIT_DOWN_ISSUE, ("revoke", "UNAVAILABLE",
                                                              "AUDIT_UNAVAILABLE")},
                   postgres_went_down=True)
    recover_and_check(rig, phase, same_workers=inst.worker_pids)


@dataclass
class SpillStuck:
    """What test_spill_disk_still_full_when_postgres_returns saw (for the next test)."""

    rig: Rig
    refused_revokes: dict[str, str] = field(default_factory=dict)  # jti -> token
    states: list[str] = field(default_factory=list)  # audit mode each probe found


_stuck: list[SpillStuck] = []


def test_spill_disk_still_full_when_postgres_returns(inst: Instance) -> None:
    """The spill holds a backlog and its disk is full when Postgres returns:
    the replay cannot record its progress, so the writer stays in spill
    mode until space is freed. Issue must be refused meanwhile (never
    unaudited); once space is freed everything recovers."""
    _needs_tmpfs(inst)
    rig, phase = inst.rig, "spill-full-pg-back"
    filler: Path | None = None
    stuck = SpillStuck(rig)
    # Tokens for the probes below to revoke, issued before the fault.
    reserve: list[tuple[str, str]] = []
    with fresh_client(rig.target, f"{phase}-reserve") as c:
        for _ in range(40):  # reaches_every_worker opens at most 40 connections
            issued = c.issue(f"fi-{phase}-reserve", AUDIENCE)
            rig.ledger.issued_ok(f"{phase}/reserve", issued.jti, issued.token)
            reserve.append((issued.jti, issued.token))
    try:
        with run_load(rig, phase).running():
            wait_for("load before", load_made_progress(rig, phase, "issue", 10), 30)
            inst.pg.stop("fast")
            try:
                wait_for("spilled issuance", load_made_progress(rig, phase, "issue", 10), 20)
                filler = fill(inst.spill.path)
                wait_for("Issue refused", failures_seen(rig, phase, AUDIT_DOWN_ISSUE, 10), 20)
            finally:
                inst.pg.start()
            # Postgres is back, the spill disk still full: a few seconds of load.
            time.sleep(3.0)
        # Deterministic probes in that state, one per worker at least: Issue
        # (refused by a worker whose spill holds a backlog, which is stuck in
        # spill mode; answered, and audited directly, by one that had none),
        # then a Revoke of an earlier token.
        def probe(client: FedtokenClient) -> bool:
            try:
                issued = client.issue("fi-stuck-probe", AUDIENCE)
            except FedtokenRpcError as exc:
                if (exc.code.name, exc.reason) != ("UNAVAILABLE", "AUDIT_UNAVAILABLE"):
                    rig.ledger.failed(f"{phase}/probe", "issue", exc)
                    return False
                stuck.states.append("spill-stuck")
            else:
                rig.ledger.issued_ok(f"{phase}/probe", issued.jti, issued.token)
                stuck.states.append("direct")
            jti, token = reserve.pop()
            try:
                client.revoke(token=token, reason="fault test: spill full")
            except FedtokenRpcError as exc:
                rig.ledger.failed(phase, "revoke", exc, jti)
                if exc.reason == "AUDIT_UNAVAILABLE":
                    stuck.refused_revokes[jti] = token
                return True
            rig.ledger.revoked_ok(phase, jti)
            return True

        for c in reaches_every_worker(rig, phase, probe, "probes with Postgres back", 15):
            c.close()
        assert "spill-stuck" in stuck.states, (
            f"no worker refused Issue with Postgres back and its spill full: {stuck.states}")
    finally:
        if filler is not None:
            filler.unlink()
    _stuck.append(stuck)
    judge_failures(rig, phase, {STORE_DOWN, AUDIT_DOWN_ISSUE, AUDIT_DOWN_REVOKE},
                   postgres_went_down=True)
    recover_and_check(rig, phase, same_workers=inst.worker_pids)


def test_a_revocation_refused_for_want_of_audit_has_no_effect_or_is_audited(
        inst: Instance) -> None:
    """A Revoke refused with AUDIT_UNAVAILABLE must not leave behind an
    enforced revocation that the audit trail does not know about."""
    if not _stuck:
        pytest.skip("test_spill_disk_still_full_when_postgres_returns did not run")
    stuck = _stuck[-1]
    ledger = stuck.rig.ledger
    with ledger.lock:  # the probes' and the load's
        refused = {j: ledger.issued[j] for j, (_, reason) in ledger.failed_revokes.items()
                   if reason == "AUDIT_UNAVAILABLE"}
    with fresh_client(inst.rig.target, "stuck-check", timeout=20) as c:
        verdicts = c.verify_batch(list(refused.values()), AUDIENCE)
        enforced = [j for j, v in zip(refused, verdicts, strict=True)
                    if reason_name(v.reason) == "REVOKED"]
        records = stuck.rig.read_audit(c, "token.revoked")
    silent = [j for j in enforced if records[j] == 0]
    assert not silent, (f"{len(silent)} of {len(refused)} revocations refused with "
                        f"AUDIT_UNAVAILABLE are enforced without a token.revoked record")


# --- in-process servers (ServerThread) -----------------------------------------------------


@contextlib.contextmanager
def in_process_server(inst: Instance, request: pytest.FixtureRequest, name: str,
                      dsn: Callable[[str], str] = lambda d: d) -> Iterator[Rig]:
    """A ServerThread (one process, the session's SoftHSM token) on a new
    database of the module's Postgres, reached through ``dsn(direct DSN)``."""
    from tests.support import ServerThread, make_settings

    hsm_config = request.getfixturevalue("hsm_config")
    if not inst.pg.is_running():
        inst.pg.start()
    db = create_database(inst.pg.pg.dsn, f"faults_{name}_{uuid.uuid4().hex[:8]}")
    state = inst.root / name
    # The in-process server's log, formatted as serve formats it (for judge_failures).
    records: list[str] = []
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.emit = lambda record: records.append(handler.format(record))  # type: ignore[method-assign]
    logging.getLogger("fedtoken").addHandler(handler)
    srv: ServerThread | None = None
    try:
        srv = ServerThread(make_settings(state, revocation_staleness_seconds=STALENESS,
                                         revocation_heartbeat_seconds=HEARTBEAT),
                           dsn(db), hsm_config).start()
        yield Rig(srv, 1, lambda: {0}, lambda: {0}, log_text=lambda: "\n".join(records))
    finally:
        logging.getLogger("fedtoken").removeHandler(handler)
        if not inst.pg.is_running():
            inst.pg.start()
        if srv is not None:
            srv.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_revoke_while_postgres_shuts_down_is_unavailable_not_internal(
        inst: Instance, request: pytest.FixtureRequest) -> None:
    """``pg_ctl stop -m fast`` sends every backend's client a FATAL (57P01)
    and then closes. The load above sometimes issues a statement on a
    pooled connection between the two; here the proxy holds the close back
    a few seconds, so that every Revoke in the window meets that state. It
    must be refused as the database being unavailable, like any outage."""
    proxy = LateCloseProxy(inst.pg.pg.port, delay=8.0).start()
    answers: list[str] = []
    try:
        with in_process_server(inst, request, "shutdown",
                               lambda d: via_port(d, proxy.port)) as rig, \
                fresh_client(rig.target, "shutdown", timeout=10) as c:
            tokens = [c.issue("fi-shutdown", AUDIENCE).token for _ in range(4)]
            c.revoke(token=tokens[0])  # the pool holds idle connections now
            proxy.hold_closes = True
            inst.pg.stop("fast")
            try:
                for token in tokens[1:]:
                    try:
                        c.revoke(token=token)
                        answers.append("OK")
                    except FedtokenRpcError as exc:
                        answers.append(f"{exc.code.name}/{exc.reason}")
            finally:
                proxy.stop()  # every proxied connection ends now: the server stops at once
                inst.pg.start()
            print(f"\n[shutdown] Revoke answers while Postgres shut down: {answers}")
    finally:
        proxy.stop()
    assert answers and all(a == "UNAVAILABLE/STORE_UNAVAILABLE" for a in answers), answers


# --- without a tmpfs: a simulated ENOSPC at the spill's write call ------------------------


@pytest.fixture
def simulated(inst: Instance, request: pytest.FixtureRequest) -> Iterator[tuple[Rig, list[bool]]]:
    if inst.spill.mounted and not os.environ.get("FEDTOKEN_TEST_SIMULATE_ENOSPC"):
        pytest.skip("the spill's disk was really filled (tmpfs) above")
    from fedtoken.audit import spill as spill_mod

    full = [False]
    real_append = spill_mod.SpillLog.append

    def append(self: Any, lines: Any) -> None:
        if full[0]:  # what a full disk does at the write: nothing durable
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_append(self, lines)

    mp = pytest.MonkeyPatch()
    mp.setattr(spill_mod.SpillLog, "append", append)
    try:
        with in_process_server(inst, request, "simulated") as rig:
            yield rig, full
    finally:
        full[0] = False
        mp.undo()


def test_spill_write_enospc_simulated(inst: Instance,
                                      simulated: tuple[Rig, list[bool]]) -> None:
    rig, full = simulated
    phase = "spill-enospc-simulated"
    with run_load(rig, phase).running():
        wait_for("load before", load_made_progress(rig, phase, "issue", 10), 30)
        inst.pg.stop("fast")
        try:
            wait_for("spilled issuance", load_made_progress(rig, phase, "issue", 10), 20)
            full[0] = True
            wait_for("Issue refused", failures_seen(rig, phase, AUDIT_DOWN_ISSUE, 10), 20)
            wait_for("Issue still refused", failures_seen(rig, phase, AUDIT_DOWN_ISSUE, 10), 20)
        finally:
            full[0] = False
            inst.pg.start()
        wait_for("load after", load_made_progress(rig, phase, "revoke", 5), RECOVERY)
    # A Revoke is refused too: by its audit record first (the spill is full)
    # or by Postgres; either way nothing is changed.
    judge_failures(rig, phase, {STORE_DOWN, AUDIT_DOWN_ISSUE, ("revoke", "UNAVAILABLE",
                                                              "AUDIT_UNAVAILABLE")},
                   postgres_went_down=True)
    recover_and_check(rig, phase)
