"""Revocation benchmarks: propagation between replicas, and memory.

``run_revocation_bench(quick)`` returns rows as plain dicts
``{id, figure, value, unit, baseline, baseline_label, baseline_value, ratio,
target, command}`` (``id`` stable across runs, as in ``python -m bench
--json``); run this module
(``python -m bench.revocation [--quick]``) to print them as a markdown table.
Self-contained: it starts its own embedded Postgres (or uses
``FEDTOKEN_BENCH_DSN``, a superuser DSN) and its own two ``fedtoken serve``
processes.

Propagation: replicas A and B are two ``fedtoken serve`` processes over one
Postgres, sharing a state dir (one SoftHSM token). For each of N tokens, the
client sends Revoke to A and then polls Verify on B back to back until B
answers REVOKED. The delay is measured from the moment Revoke is *sent* to A
until B's first REVOKED verdict, so it includes A's whole Revoke (commit and
audit record) and up to one Verify round trip of polling: it is what a
caller observes, an upper bound of the notify-to-applied time inside B.
Timestamping inside B when the notification is applied would need
instrumentation in the server; the client view needs none and is the figure
the issue's target is about.

Memory: in a fresh interpreter (so nothing else is on the heap), RSS before
and after adding 1,000,000 jti revocations to an ``InMemoryRevocationView``;
also the peak while the same million is swapped in again by ``replace_all``
(what a periodic resync costs on top), and, as the baseline, the same
million digests held the way the view used to hold them (a Python ``set``
of ints plus per-minute lists).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.service import Service, child_env, create_database

ROOT = Path(__file__).resolve().parent.parent
AUDIENCE = "bench"
Row = dict[str, Any]


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# -- memory ------------------------------------------------------------------------


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_child(n: int, mode: str) -> dict[str, float]:
    """Runs in a fresh interpreter; prints nothing, returns the figures."""
    import gc

    from fedtoken.revocation.view import InMemoryRevocationView, RevocationEntry, jti_digest

    exp = int(time.time()) + 3600

    def entries() -> Iterator[RevocationEntry]:
        for i in range(n):
            yield RevocationEntry("default", "jti", f"jti-{i:022d}", exp + i % 3600)

    gc.collect()
    before = _rss_mb()
    out: dict[str, float] = {"before_mb": before}
    if mode == "view":
        view = InMemoryRevocationView(staleness=5)
        for entry in entries():
            view.add(entry)
        gc.collect()
        out["after_mb"] = _rss_mb()
        out["table_mb"] = view.jti_table_bytes / 2**20
        view.confirm_fresh(time.monotonic())
        t0 = time.perf_counter()
        probes = 100_000
        for i in range(probes):
            view.check("default", f"absent-{i}", "sub", 0, "kid")
        out["check_us"] = (time.perf_counter() - t0) / probes * 1e6
        view.replace_all(entries())
        gc.collect()
        out["after_resync_mb"] = _rss_mb()
        out["peak_mb"] = _rss_mb("VmHWM")
        assert view.size == n
    else:  # the previous representation: set of ints + per-minute lists
        digests: set[int] = set()
        buckets: dict[int, list[int]] = {}
        for entry in entries():
            d = jti_digest(entry.tenant, entry.value)
            digests.add(d)
            buckets.setdefault(entry.expires_at // 60 + 1, []).append(d)
        gc.collect()
        out["after_mb"] = _rss_mb()
        out["peak_mb"] = _rss_mb("VmHWM")
    return out


def measure_memory(n: int, mode: str) -> dict[str, float]:
    code = ("import json, sys; from bench.revocation import _memory_child; "
            f"print(json.dumps(_memory_child({n}, {mode!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=child_env(), cwd=ROOT, timeout=600, check=True)
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- propagation -------------------------------------------------------------------


def _admin_dsn(workdir: Path) -> tuple[str, Any]:
    configured = os.environ.get("FEDTOKEN_BENCH_DSN")
    if configured:
        return configured, None
    from fedtoken.store.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(workdir / "pg")
    return pg.start(), pg


def measure_propagation(n: int) -> dict[str, float]:
    """Revoke through A, poll Verify on B; seconds per revocation."""
    from fedtoken_client import reason_name

    with tempfile.TemporaryDirectory(prefix="fedtoken-bench-rev-") as tmp:
        workdir = Path(tmp)
        admin, pg = _admin_dsn(workdir)
        replicas: list[Service] = []
        try:
            dsn = create_database(admin)
            state = workdir / "state"
            state.mkdir()
            a = Service(state, dsn, name="serve-a").start(1)  # creates the HSM token and the schema
            replicas.append(a)
            b = Service(state, dsn, name="serve-b").start(1)
            replicas.append(b)
            with a.client() as ca, b.client() as cb:
                tokens = [ca.issue(f"bench-{i}", AUDIENCE).token for i in range(n + 10)]
                for t in tokens[:10]:  # warm up both channels and the revoke path
                    cb.verify(t, AUDIENCE)
                    ca.revoke(token=t)
                delays: list[float] = []
                revoke_rtt: list[float] = []
                verify_rtt: list[float] = []
                polls = 0
                for token in tokens[10:]:
                    if not cb.verify(token, AUDIENCE).valid:
                        raise RuntimeError("B does not accept a fresh token")
                    t0 = time.perf_counter()
                    ca.revoke(token=token)
                    t1 = time.perf_counter()
                    revoke_rtt.append(t1 - t0)
                    deadline = t1 + 10
                    while True:
                        s = time.perf_counter()
                        v = cb.verify(token, AUDIENCE)
                        e = time.perf_counter()
                        polls += 1
                        verify_rtt.append(e - s)
                        if reason_name(v.reason) == "REVOKED":
                            delays.append(e - t0)
                            break
                        if e > deadline:
                            raise RuntimeError(
                                f"B never saw the revocation ({reason_name(v.reason)})")
        finally:
            for r in reversed(replicas):
                r.stop()
            if pg is not None:
                pg.stop()
    return {
        "p50": _percentile(delays, 0.50),
        "p99": _percentile(delays, 0.99),
        "max": max(delays),
        "revoke_p50": statistics.median(revoke_rtt),
        "verify_p50": statistics.median(verify_rtt),
        "polls_per_revocation": polls / len(delays),
        "n": float(len(delays)),
    }


# -- the rows -------------------------------------------------------------------------


def run_revocation_bench(quick: bool = False) -> list[Row]:
    n_prop = 50 if quick else 200
    n_mem = 100_000 if quick else 1_000_000
    cmd = "python -m bench.revocation" + (" --quick" if quick else "")
    rows: list[Row] = []

    prop = measure_propagation(n_prop)
    base = f"Verify RTT p50 {prop['verify_p50'] * 1e3:.2f} ms"
    for p in ("p50", "p99"):
        ms = prop[p] * 1e3
        rows.append({
            "id": f"revocation_propagation_{p}",
            "baseline_label": "Verify RTT p50 (ms)",
            "baseline_value": round(prop["verify_p50"] * 1e3, 3),
            "figure": f"revocation propagation A->B {p} (Revoke sent on A until B says REVOKED,"
                      f" n={int(prop['n'])})",
            "value": round(ms, 2), "unit": "ms",
            "baseline": base, "ratio": round(prop[p] / prop["verify_p50"], 1),
            "target": "p99 < 100 ms" if p == "p99" else "",
            "command": cmd,
        })
    rows.append({
        "id": "revocation_revoke_rtt_p50",
        "figure": "  of which: Revoke RTT on A p50 (commit + audit)",
        "value": round(prop["revoke_p50"] * 1e3, 2), "unit": "ms", "baseline": "",
        "ratio": None, "target": "", "command": cmd,
    })

    view = measure_memory(n_mem, "view")
    old = measure_memory(n_mem, "set")
    label = f"{n_mem:,}"
    cost = view["after_mb"] - view["before_mb"]
    old_cost = old["after_mb"] - old["before_mb"]
    rows.append({
        "id": "memory_revocations_rss",
        "baseline_label": "set of ints + lists (MB)", "baseline_value": round(old_cost, 1),
        "figure": f"RSS of {label} active jti revocations (InMemoryRevocationView)",
        "value": round(cost, 1), "unit": "MB",
        "baseline": f"set of ints + lists: {old_cost:.1f} MB", "ratio": round(cost / old_cost, 2),
        "target": "well under 150 MB" if not quick else "", "command": cmd,
    })
    rows.append({
        "id": "memory_resync_peak",
        "figure": f"peak RSS over baseline during a full resync of {label}",
        "value": round(view["peak_mb"] - view["before_mb"], 1), "unit": "MB",
        "baseline": f"set of ints + lists: {old['peak_mb'] - old['before_mb']:.1f} MB (no resync)",
        "ratio": None, "target": "", "command": cmd,
    })
    rows.append({
        "id": "revocation_view_check_miss",
        "figure": "view.check on a miss (digest + probe), one thread",
        "value": round(view["check_us"], 2), "unit": "us", "baseline": "", "ratio": None,
        "target": "", "command": cmd,
    })
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| figure | value | unit | baseline | ratio | target |",
             "|---|---:|---|---|---:|---|"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']}x"
        lines.append(f"| {r['figure']} | {r['value']} | {r['unit']} | {r['baseline']} | "
                     f"{ratio} | {r['target']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rows = run_revocation_bench(quick="--quick" in args)
    print(markdown(rows))
    print(f"\ncommand: {rows[0]['command']}")
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "server"), str(ROOT / "clients/python")]
    raise SystemExit(main())
