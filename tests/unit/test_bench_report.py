"""The bench's report: verdicts parsed from target strings, row ids, the JSON
file and the markdown table. No servers, no timing (bench/report.py only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.report import (
    ROW_FIELDS,
    Row,
    Target,
    check_ids,
    cpuinfo,
    header,
    parse_target,
    table,
    to_json,
    write_json,
)

# The ids of issue 12 (docs/benchmarks.md, ../shared/guide/performance.md):
# compared across runs, so never renamed.
ISSUE_IDS = ("verify_batch_cpu_ratio", "verify_batch_wall_ratio",
             "verify_batch_fallback_wall_ratio", "verify_cached_cpu_ratio", "unary_ratio",
             "issue_ratio", "issue_batch_ratio", "limit_crypto_mb_inprocess",
             "limit_openssl_raw_inprocess")


@pytest.mark.parametrize(("text", "expected"), [
    (">= 2.5x", Target(">=", 2.5, True)),
    (">= 2.5x (stretch 3x)", Target(">=", 2.5, True)),
    (">= 0.75x (stretch 0.85x)", Target(">=", 0.75, True)),
    (">= 0.9x (within noise of local)", Target(">=", 0.9, True)),
    (">=10x", Target(">=", 10.0, True)),
    ("> 1 x", Target(">", 1.0, True)),
    ("p99 < 100 ms", Target("<", 100.0, False)),
    ("<= 1,500 ms", Target("<=", 1500.0, False)),
    ("well under 150 MB", Target("<", 150.0, False)),
    ("at least 0.8x", Target(">=", 0.8, True)),
    ("at most .5 MB", Target("<=", 0.5, False)),
])
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["", "n/a", "fast", "x >= y"])
def test_parse_target_without_comparison(text: str) -> None:
    assert parse_target(text) is None


def _row(value: float | None, base: float, target: str, unit: str = "tokens/s") -> Row:
    return Row("some_row", "a figure", value, unit=unit, baseline="b", baseline_value=base,
               target=target)


@pytest.mark.parametrize(("value", "base", "target", "verdict"), [
    (250.0, 100.0, ">= 2.5x", "met"),  # exactly on the bound
    (249.0, 100.0, ">= 2.5x", "MISSED"),
    (90.0, 100.0, ">= 0.85x (stretch 0.95x)", "met"),
    (84.0, 100.0, ">= 0.85x (stretch 0.95x)", "MISSED"),
    (100.0, 100.0, "> 1x", "MISSED"),
    (17.2, 2.4, "p99 < 100 ms", "met"),  # on the value, not the 7.2x ratio
    (100.0, 2.4, "p99 < 100 ms", "MISSED"),
    (38.4, 85.9, "well under 150 MB", "met"),
    (None, 100.0, ">= 0.9x", "not available"),
    (50.0, 0.0, ">= 0.9x", "not available"),  # a ratio target without a baseline
    (50.0, 100.0, "", ""),
    (50.0, 100.0, "soon", "unparsed"),
])
def test_verdict(value: float | None, base: float, target: str, verdict: str) -> None:
    assert _row(value, base, target).verdict() == verdict


def test_ratio() -> None:
    assert _row(150.0, 100.0, "").ratio == pytest.approx(1.5)
    assert _row(150.0, 0.0, "").ratio is None
    assert _row(None, 100.0, "").ratio is None


@pytest.mark.parametrize("bad", ["", "Verify", "verify-batch", "1row", "a__b", "a_", "a b"])
def test_row_id_schema(bad: str) -> None:
    with pytest.raises(ValueError, match="row id"):
        Row(bad, "f", 1.0)


def test_issue_ids_are_valid_row_ids() -> None:
    for rid in ISSUE_IDS:
        Row(rid, "f", 1.0)


def test_duplicate_ids_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        check_ids([Row("a", "f", 1.0), Row("a", "g", 2.0)])


def _rows() -> list[Row]:
    return [
        Row("verify_batch_cpu_ratio", "VerifyBatch per CPU-s", 150_000.0, unit="tokens/CPU-s",
            baseline="openssl speed 1 process", baseline_value=50_000.0, target=">= 2.5x",
            command="fedtoken serve --workers 2", extra={"server_cpu_s": 3.9}),
        Row("issue_batch_ratio", "IssueBatch", None, baseline="raw C_Sign x 2",
            baseline_value=1600.0, target=">= 0.9x", notes="the generated stubs have no "
            "IssueBatch"),
        Row("openssl_verify_1proc", "openssl speed", 50_000.0, unit="verify/s",
            command="openssl speed rsa2048"),
        Row("nan_row", "not a number", float("nan"), baseline="x", baseline_value=2.0,
            target=">= 1x"),
    ]


def test_json_schema(tmp_path: Path) -> None:
    h = {"date": "2026-12-02T12:00:00Z", "cpu_model": "Some CPU", "avx512ifma": True,
         "cores": 2, "openssl": "OpenSSL 3.0.19", "multibuffer": "crypto_mb AVX-512 IFMA",
         "native_fast_path": "on"}
    out = tmp_path / "bench.json"
    write_json(out, h, _rows())
    data = json.loads(out.read_text())  # strict JSON: no NaN
    assert data["header"] == h
    assert data["order"] == ["verify_batch_cpu_ratio", "issue_batch_ratio",
                             "openssl_verify_1proc", "nan_row"]
    assert set(data["rows"]) == set(data["order"])
    for rid, row in data["rows"].items():
        assert row["id"] == rid
        assert set(ROW_FIELDS) <= set(row)
    cpu = data["rows"]["verify_batch_cpu_ratio"]
    assert cpu["value"] == 150_000.0
    assert cpu["baseline_value"] == 50_000.0
    assert cpu["ratio"] == pytest.approx(3.0)
    assert cpu["target"] == ">= 2.5x"
    assert cpu["verdict"] == "met"
    assert cpu["command"] == "fedtoken serve --workers 2"
    assert cpu["extra"] == {"server_cpu_s": 3.9}
    na = data["rows"]["issue_batch_ratio"]
    assert na["value"] is None and na["ratio"] is None
    assert na["verdict"] == "not available"
    assert "IssueBatch" in na["notes"]
    plain = data["rows"]["openssl_verify_1proc"]
    assert plain["baseline_value"] is None and plain["ratio"] is None
    assert plain["verdict"] == ""
    assert data["rows"]["nan_row"]["value"] is None
    assert data["rows"]["nan_row"]["verdict"] == "not available"


def test_json_refuses_duplicate_ids() -> None:
    rows = _rows()
    with pytest.raises(ValueError, match="duplicate"):
        to_json({}, [*rows, rows[0]])


def test_table_has_an_id_column() -> None:
    lines = table(_rows()).splitlines()
    assert lines[0].startswith("| id | figure | value |")
    assert len(lines) == 2 + len(_rows())
    assert lines[2].startswith("| verify_batch_cpu_ratio | ")
    assert "3.00x" in lines[2] and ">= 2.5x met" in lines[2]
    assert "not available (the generated stubs have no IssueBatch)" in lines[3]
    assert ">= 0.9x not available" in lines[3]


def test_cpuinfo_reads_model_and_flags() -> None:
    text = ("processor\t: 0\nmodel name\t: Example CPU @ 2GHz\n"
            "flags\t\t: fpu sse2 avx512f avx512ifma\n\n"
            "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    model, flags = cpuinfo(text)
    assert model == "Example CPU @ 2GHz"
    assert "avx512ifma" in flags and "fpu" in flags


def test_header_fields() -> None:
    h = header(tokens=10)
    for key in ("date", "cpu_model", "avx512ifma", "cores", "openssl", "multibuffer"):
        assert key in h
    assert isinstance(h["avx512ifma"], bool)
    assert h["tokens"] == 10
    json.dumps(h)
