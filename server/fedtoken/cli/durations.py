"""Durations on the command line: ``90``, ``90s``, ``15m``, ``12h``, ``30d``,
``1w``, or several units together (``1h30m``); plain numbers are seconds.

Every option that takes a duration uses ``duration`` as its argparse type,
so a bad value is refused the same way everywhere (exit 2, one line)."""

from __future__ import annotations

import argparse
import re
import time

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"(?:\d+[smhdw])+")
HINT = "seconds, or a number with a unit: 90s, 15m, 12h, 30d, 1w (or 1h30m)"


def parse_duration(text: str) -> int:
    """Seconds in ``text``; ValueError naming the accepted forms otherwise."""
    value = text.strip().lower()
    if value.isdigit():
        return int(value)
    if not _WHOLE.fullmatch(value):
        raise ValueError(f"not a duration: {text!r} ({HINT})")
    return sum(int(n) * UNITS[u] for n, u in _PART.findall(value))


def duration(text: str) -> int:
    """argparse type: seconds from a duration (see ``parse_duration``)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def since(text: str) -> int:
    """argparse type for a point in the past: Unix seconds (a plain number),
    or a duration ago (``1h``: an hour before now)."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    try:
        return int(time.time()) - parse_duration(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (Unix seconds, or a duration ago: 90s, 15m, 12h, 30d, "
            "1w)") from None


def expires_in(text: str) -> int:
    """argparse type for an expiry: a duration from now, as Unix seconds."""
    return int(time.time()) + duration(text)
