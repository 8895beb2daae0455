"""Durations on the command line: one parser for every option that takes one."""

from __future__ import annotations

import argparse
import time

import pytest

from fedtoken.cli.durations import duration, expires_in, parse_duration, since
from fedtoken.cli.main import build_parser


@pytest.mark.parametrize(("text", "seconds"), [
    ("0", 0), ("900", 900), ("90s", 90), ("15m", 900), ("12h", 43_200), ("30d", 2_592_000),
    ("1w", 604_800), ("1h30m", 5400), (" 2H ", 7200), ("1w2d", 9 * 86_400)])
def test_accepted_forms(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5", "1.5h", "h", "10x", "1h 30m", "30dd"])
def test_refused_with_the_accepted_forms_named(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a duration: .*90s, 15m, 12h, 30d, 1w"):
        parse_duration(text)
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        duration(text)


def test_points_in_time() -> None:
    now = int(time.time())
    assert since("1700000000") == 1_700_000_000  # Unix seconds as given
    assert abs(since("1h") - (now - 3600)) <= 2
    assert abs(expires_in("1d") - (now + 86_400)) <= 2
    with pytest.raises(argparse.ArgumentTypeError, match="not a time"):
        since("yesterday")


@pytest.mark.parametrize(("argv", "attr", "seconds"), [
    (["tenants", "create", "t", "--rotation-period", "30d"], "rotation_period", 2_592_000),
    (["tenants", "update", "t", "--max-lifetime", "1h"], "max_lifetime", 3600),
    (["tenants", "create", "t", "--default-lifetime", "15m"], "default_lifetime", 900),
    (["token", "issue", "--sub", "s", "--aud", "a", "--lifetime", "15m"], "lifetime", 900),
    (["token", "exchange", "x", "--tenant", "t", "--aud", "a", "--lifetime", "5m"],
     "lifetime", 300),
    (["callers", "grant", "spiffe://x/y", "--role", "issuer", "--max-lifetime", "1w"],
     "max_lifetime", 604_800),
    (["trust", "add", "https://b.example", "--max-stale", "12h"], "max_stale", 43_200),
])
def test_every_duration_option_takes_units(argv: list[str], attr: str, seconds: int) -> None:
    assert getattr(build_parser().parse_args(argv), attr) == seconds


def test_expiries_and_cuts_take_durations() -> None:
    now = int(time.time())
    ns = build_parser().parse_args(["token", "revoke", "--subject", "s", "--issued-before",
                                    "1h", "--expires-in", "30d"])
    assert abs(ns.issued_before - (now - 3600)) <= 2
    assert abs(ns.expires_at - (now + 30 * 86_400)) <= 2
    assert abs(build_parser().parse_args(["audit", "tail", "--since", "7d"]).since
               - (now - 7 * 86_400)) <= 2


def test_a_bad_duration_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["tenants", "create", "t", "--rotation-period", "soon"])
    assert exit_.value.code == 2
    assert "not a duration: 'soon'" in capsys.readouterr().err
