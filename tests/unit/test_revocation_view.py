"""The in-memory revocation view: freshness watermark, the three kinds of
revocation, expiry, snapshots. Pure: fake clocks, no I/O."""

from __future__ import annotations

import random
import threading

import pytest

from fedtoken.core.model import Reason
from fedtoken.revocation.view import (
    DigestTable,
    InMemoryRevocationView,
    RevocationEntry,
    jti_digest,
)

NOW = 1_700_000_000


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = float(NOW)

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall


def make_view(clock: Clock, staleness: float = 5.0) -> InMemoryRevocationView:
    return InMemoryRevocationView(staleness=staleness, monotonic=clock.monotonic, wall=clock.time)


def fresh_view(clock: Clock, staleness: float = 5.0) -> InMemoryRevocationView:
    view = make_view(clock, staleness)
    view.confirm_fresh(clock.mono)
    return view


def jti(tenant: str, value: str, exp: int = NOW + 600) -> RevocationEntry:
    return RevocationEntry(tenant, "jti", value, exp)


def check(view: InMemoryRevocationView, *, tenant: str = "t", jti: str = "j", sub: str = "s",
          iat: int = NOW, kid: str = "k") -> Reason | None:
    return view.check(tenant, jti, sub, iat, kid)


# -- freshness ------------------------------------------------------------------


def test_fail_closed_before_the_first_confirmation() -> None:
    clock = Clock()
    view = make_view(clock)
    assert not view.is_fresh
    assert check(view) is Reason.REVOCATION_UNAVAILABLE
    view.replace_all([])  # a snapshot alone does not vouch for freshness
    assert check(view) is Reason.REVOCATION_UNAVAILABLE
    view.confirm_fresh(clock.mono)
    assert view.is_fresh
    assert check(view) is None


def test_stale_past_the_bound_and_fresh_again_after_a_confirmation() -> None:
    clock = Clock()
    view = fresh_view(clock, staleness=2.0)
    clock.mono += 2.0
    assert check(view) is None  # exactly at the bound: still fresh
    clock.mono += 0.01
    assert not view.is_fresh
    assert check(view) is Reason.REVOCATION_UNAVAILABLE
    view.confirm_fresh(clock.mono - 0.5)  # a heartbeat sent half a second ago came back
    assert view.is_fresh
    assert check(view) is None


def test_staleness_wins_over_every_other_verdict() -> None:
    clock = Clock()
    view = fresh_view(clock)
    view.add(jti("t", "j"))
    view.add(RevocationEntry("t", "key", "k", NOW + 600))
    clock.mono += 10
    assert check(view) is Reason.REVOCATION_UNAVAILABLE


def test_an_old_confirmation_never_moves_the_watermark_back() -> None:
    clock = Clock()
    view = fresh_view(clock, staleness=2.0)
    view.confirm_fresh(clock.mono - 100)
    assert view.is_fresh


def test_mark_stale_is_immediate_and_needs_a_new_confirmation() -> None:
    clock = Clock()
    view = fresh_view(clock)
    view.mark_stale()
    assert check(view) is Reason.REVOCATION_UNAVAILABLE
    view.confirm_fresh(clock.mono)
    assert check(view) is None


# -- the three kinds --------------------------------------------------------------


def test_jti_revocation_is_per_tenant() -> None:
    view = fresh_view(Clock())
    view.add(jti("t", "j"))
    assert check(view, jti="j") is Reason.REVOKED
    assert check(view, jti="other") is None
    assert check(view, tenant="u", jti="j") is None


def test_subject_cut_off_revokes_tokens_issued_strictly_before() -> None:
    view = fresh_view(Clock())
    view.add(RevocationEntry("t", "subject", "alice", NOW + 600, not_before=NOW))
    assert check(view, sub="alice", iat=NOW - 1) is Reason.REVOKED
    assert check(view, sub="alice", iat=NOW) is None  # issued_at < not_before only
    assert check(view, sub="alice", iat=NOW + 1) is None
    assert check(view, sub="bob", iat=NOW - 1) is None
    assert check(view, tenant="u", sub="alice", iat=NOW - 1) is None


def test_a_later_subject_revocation_widens_and_an_earlier_one_never_narrows() -> None:
    view = fresh_view(Clock())
    view.add(RevocationEntry("t", "subject", "alice", NOW + 600, not_before=NOW))
    view.add(RevocationEntry("t", "subject", "alice", NOW + 900, not_before=NOW + 100))
    assert check(view, sub="alice", iat=NOW + 50) is Reason.REVOKED
    view.add(RevocationEntry("t", "subject", "alice", NOW + 300, not_before=NOW - 100))
    assert check(view, sub="alice", iat=NOW + 50) is Reason.REVOKED
    # The expiry is the latest one seen too: purging at NOW + 700 keeps it.
    assert view.purge_expired(NOW + 700) == 0
    assert check(view, sub="alice", iat=NOW + 50) is Reason.REVOKED


def test_key_revocation_rejects_every_token_of_the_kid() -> None:
    view = fresh_view(Clock())
    view.add(RevocationEntry("t", "key", "kid-1", NOW + 600))
    assert check(view, kid="kid-1", jti="any", sub="any") is Reason.KEY_REVOKED
    assert check(view, kid="kid-1", iat=NOW + 10_000) is Reason.KEY_REVOKED
    assert check(view, kid="kid-2") is None


def test_unknown_kind_is_refused() -> None:
    view = fresh_view(Clock())
    with pytest.raises(ValueError):
        view.add(RevocationEntry("t", "bogus", "x", NOW + 600))


# -- expiry -----------------------------------------------------------------------


def test_purge_forgets_only_entries_whose_expiry_has_passed() -> None:
    clock = Clock()
    view = fresh_view(clock)
    view.add(jti("t", "early", NOW + 60))
    view.add(jti("t", "late", NOW + 3600))
    view.add(RevocationEntry("t", "subject", "s-early", NOW + 60, not_before=NOW))
    view.add(RevocationEntry("t", "subject", "s-late", NOW + 3600, not_before=NOW))
    view.add(RevocationEntry("t", "key", "k-early", NOW + 60))
    view.add(RevocationEntry("t", "key", "k-late", NOW + 3600))
    assert view.size == 6
    assert view.purge_expired(NOW + 59) == 0  # nothing expired yet
    assert view.size == 6
    removed = view.purge_expired(NOW + 600)
    assert removed == 3
    assert view.size == 3
    assert check(view, jti="early") is None
    assert check(view, jti="late") is Reason.REVOKED
    assert check(view, sub="s-early", iat=NOW - 1) is None
    assert check(view, sub="s-late", iat=NOW - 1) is Reason.REVOKED
    assert check(view, kid="k-early") is None
    assert check(view, kid="k-late") is Reason.KEY_REVOKED


def test_purge_uses_the_wall_clock_by_default() -> None:
    clock = Clock()
    view = fresh_view(clock)
    view.add(jti("t", "j", NOW + 60))
    assert view.purge_expired() == 0
    clock.wall = NOW + 600
    assert view.purge_expired() == 1


def test_a_re_revocation_with_a_later_expiry_survives_the_first_expiry() -> None:
    view = fresh_view(Clock())
    view.add(jti("t", "j", NOW + 60))
    view.add(jti("t", "j", NOW + 7200))
    assert view.size == 1
    view.purge_expired(NOW + 600)
    assert check(view, jti="j") is Reason.REVOKED
    view.purge_expired(NOW + 8000)
    assert check(view, jti="j") is None


# -- snapshots --------------------------------------------------------------------


def test_replace_all_keeps_nothing_that_is_not_in_the_snapshot() -> None:
    view = fresh_view(Clock())
    view.add(jti("t", "old"))
    view.add(RevocationEntry("t", "subject", "old-sub", NOW + 600, not_before=NOW))
    view.add(RevocationEntry("t", "key", "old-kid", NOW + 600))
    view.replace_all([
        jti("t", "new"),
        RevocationEntry("t", "subject", "new-sub", NOW + 600, not_before=NOW),
        RevocationEntry("t", "key", "new-kid", NOW + 600),
    ])
    assert view.size == 3
    assert check(view, jti="old") is None
    assert check(view, sub="old-sub", iat=NOW - 1) is None
    assert check(view, kid="old-kid") is None
    assert check(view, jti="new") is Reason.REVOKED
    assert check(view, sub="new-sub", iat=NOW - 1) is Reason.REVOKED
    assert check(view, kid="new-kid") is Reason.KEY_REVOKED


def test_replace_all_accepts_any_iterable_and_does_not_change_freshness() -> None:
    clock = Clock()
    view = fresh_view(clock)
    view.replace_all(jti("t", f"j{i}") for i in range(100))
    assert view.size == 100 and view.is_fresh
    stale = make_view(clock)
    stale.replace_all([jti("t", "j")])
    assert not stale.is_fresh


# -- the digest table ---------------------------------------------------------------


def test_digest_table_grows_tombstones_and_rebuilds_without_losing_entries() -> None:
    rng = random.Random(7)
    table = DigestTable()
    digests = [rng.getrandbits(63) for _ in range(20_000)]
    for i, d in enumerate(digests):
        table.add(d, NOW + (60 if i % 2 else 7200))
    assert len(table) == 20_000
    assert all(d in table for d in digests)
    assert sum(rng.getrandbits(63) in table for _ in range(10_000)) == 0
    removed = table.purge(NOW + 600)
    assert removed == 10_000 and len(table) == 10_000
    assert all((d in table) == (i % 2 == 0) for i, d in enumerate(digests))
    for d in digests[1::2]:  # re-add into tombstoned slots
        table.add(d, NOW + 7200)
    assert len(table) == 20_000 and all(d in table for d in digests)


def test_digest_values_at_the_edges() -> None:
    table = DigestTable()
    for d in (0, 1, 2, (1 << 63) - 1):
        table.add(d, NOW)
        assert d in table
    assert len(table) == 4
    assert jti_digest("t", "j") < (1 << 63)
    assert jti_digest("t", "j") != jti_digest("u", "j")


def test_readers_run_concurrently_with_a_writer() -> None:
    view = fresh_view(Clock())
    for i in range(1000):
        view.add(jti("t", f"pre{i}"))
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for i in range(0, 1000, 37):
                if check(view, jti=f"pre{i}") is not Reason.REVOKED:
                    errors.append(f"pre{i}")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(20_000):  # forces several rebuilds while readers probe
        view.add(jti("t", f"new{i}"))
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert view.size == 21_000
