"""The bench's rows, their verdicts, the markdown table and the JSON file.

No servers and no timing here (tests/unit/test_bench_report.py covers it):
``Row`` is one figure with its same-run baseline; ``parse_target`` reads a
target string such as ">= 2.5x (stretch 3x)", "p99 < 100 ms" or "well under
150 MB"; ``verdict`` says "met", "MISSED", "not available" or "" (no
target); ``table`` prints the markdown table with an id column and
``write_json`` writes every row by id with a header object (``header``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bumped when a field of the JSON file changes meaning or goes away.
SCHEMA_VERSION = 1

# Stable row ids: lower-case words joined by underscores (compared across runs).
ID_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")

ROW_FIELDS = ("id", "figure", "value", "unit", "baseline", "baseline_value", "ratio",
              "target", "verdict", "command", "notes")


@dataclass(frozen=True)
class Target:
    """A parsed target: ``op`` in (">=", ">", "<=", "<"), the bound, and
    whether the bound applies to the ratio (a number followed by "x") or to
    the value itself (in the row's unit)."""

    op: str
    bound: float
    on_ratio: bool

    def holds(self, x: float) -> bool:
        return {">=": x >= self.bound, ">": x > self.bound,
                "<=": x <= self.bound, "<": x < self.bound}[self.op]


_WORD_OPS = {"at least": ">=", "under": "<", "below": "<", "at most": "<=", "over": ">",
             "above": ">"}
_TARGET_RE = re.compile(
    r"(?P<op>>=|<=|>|<|\bat least\b|\bat most\b|\bunder\b|\bbelow\b|\bover\b|\babove\b)"
    r"\s*(?P<num>\d[\d,_]*(?:\.\d+)?|\.\d+)\s*(?P<x>x\b)?",
    re.IGNORECASE)


def parse_target(target: str) -> Target | None:
    """The first comparison in ``target`` (later ones, such as a stretch goal
    in parentheses, are notes), or None when there is none."""
    m = _TARGET_RE.search(target or "")
    if m is None:
        return None
    op = m.group("op").lower()
    op = _WORD_OPS.get(op, op)
    bound = float(m.group("num").replace(",", "").replace("_", ""))
    return Target(op, bound, on_ratio=m.group("x") is not None)


@dataclass
class Row:
    """One figure. ``value`` None: not measured in this run (``notes`` says why)."""

    id: str
    figure: str
    value: float | None
    unit: str = "tokens/s"
    baseline: str = ""
    baseline_value: float = 0.0
    target: str = ""
    command: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # more numbers for the JSON

    def __post_init__(self) -> None:
        if not ID_RE.match(self.id):
            raise ValueError(f"bad row id {self.id!r}")

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value

    def verdict(self) -> str:
        """"met", "MISSED", "not available" (a target but no figure), "" (no
        target) or "unparsed" (a target this parser cannot read)."""
        if not self.target:
            return ""
        if self.value is None:
            return "not available"
        t = parse_target(self.target)
        if t is None:
            return "unparsed"
        x = self.ratio if t.on_ratio else self.value
        if x is None or math.isnan(x):
            return "not available"
        return "met" if t.holds(x) else "MISSED"

    def as_dict(self) -> dict[str, Any]:
        value = self.value if self.value is not None and math.isfinite(self.value) else None
        d: dict[str, Any] = {
            "id": self.id, "figure": self.figure, "value": value, "unit": self.unit,
            "baseline": self.baseline, "baseline_value": self.baseline_value or None,
            "ratio": self.ratio if value is not None else None, "target": self.target,
            "verdict": self.verdict(),
            "command": self.command, "notes": self.notes,
        }
        if self.extra:
            d["extra"] = self.extra
        return d


def check_ids(rows: Sequence[Row]) -> None:
    seen: set[str] = set()
    for r in rows:
        if r.id in seen:
            raise ValueError(f"duplicate row id {r.id!r}")
        seen.add(r.id)


def fmt(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:,.1f}"
    return f"{x:,.2f}"


def table(rows: Sequence[Row]) -> str:
    out = ["| id | figure | value | baseline (same run) | ratio | target | command |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{fmt(r.value)} {r.unit}" if r.value is not None else f"not available ({r.notes})"
        base = f"{r.baseline}: {fmt(r.baseline_value)}" if r.baseline and r.baseline_value else (
            r.baseline)
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        target = f"{r.target} {r.verdict()}" if r.target else ""
        command = f"`{r.command}`" if r.command else ""
        out.append(f"| {r.id} | {r.figure} | {value} | {base} | {ratio} | {target} | {command} |")
    return "\n".join(out)


# -- the header ---------------------------------------------------------------------


def cpuinfo(text: str | None = None) -> tuple[str, set[str]]:
    """The CPU model and the flags of the first processor in /proc/cpuinfo."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model or platform.processor() or "unknown CPU", flags


def openssl_version() -> str:
    try:
        return subprocess.run(["openssl", "version"], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return "openssl CLI not found"


def multibuffer_status() -> str:
    try:
        from fedtoken.verifier import multibuffer
    except Exception as exc:  # the header must not fail the run
        return f"unknown ({exc.__class__.__name__})"
    return multibuffer.status()


def header(**fields: Any) -> dict[str, Any]:
    """Where and when the run happened; ``fields`` are added (settings of the run)."""
    model, flags = cpuinfo()
    return {
        "schema": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": model,
        "avx512ifma": "avx512ifma" in flags,
        "cores": os.cpu_count(),
        "openssl": openssl_version(),
        "python_ssl": ssl.OPENSSL_VERSION,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "multibuffer": multibuffer_status(),
        **fields,
    }


def header_line(h: dict[str, Any]) -> str:
    skip = {"schema", "date", "cpu_model", "cores", "python", "openssl", "python_ssl",
            "platform", "avx512ifma", "multibuffer"}
    rest = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in h.items() if k not in skip)
    return (f"{h['date']}; nproc {h['cores']}, {h['cpu_model']} "
            f"(avx512ifma: {'yes' if h['avx512ifma'] else 'no'}), Python {h['python']}, "
            f"{h['openssl']} (Python ssl: {h['python_ssl']}), {h['platform']}; "
            f"multi-buffer: {h['multibuffer']}" + (f"; {rest}" if rest else ""))


def to_json(h: dict[str, Any], rows: Sequence[Row]) -> dict[str, Any]:
    check_ids(rows)
    return {"header": h, "rows": {r.id: r.as_dict() for r in rows},
            "order": [r.id for r in rows]}


def write_json(path: Path, h: dict[str, Any], rows: Sequence[Row]) -> None:
    data = to_json(h, rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
