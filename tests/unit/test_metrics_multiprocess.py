"""Metrics summed across processes: two real worker processes (spawned, as
``fedtoken serve --workers`` starts them) count into one multiprocess
directory, and render() in a third process sums them exactly."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedtoken.ops import metrics

ISSUED = {0: 7, 1: 11}
VERIFIED_OK = {0: 1000, 1: 2345}
RPCS = {0: 3, 1: 5}


def _worker(index: int, directory: str) -> None:
    # A spawned child imports everything afresh with the inherited variable.
    assert os.environ[metrics.ENV] == directory
    from fedtoken.core.model import Reason, Verdict
    from fedtoken.ops import metrics as m

    m.observe_issued("acme", ISSUED[index])
    m.observe_wire_audit([("acme", [["j", "s", "k", "valid", "OK", "r", 1.0]]
                           * VERIFIED_OK[index])])
    m.observe_verdicts([Verdict(False, Reason.BAD_SIGNATURE, tenant="acme")] * (index + 1))
    for _ in range(RPCS[index]):
        m.observe_rpc("/fedtoken.v1.TokenService/VerifyBatch", "OK", 0.01)
    m._get().by_name["fedtoken_audit_queue_depth"].set(10 * (index + 1))
    m._get().by_name["fedtoken_revocation_entries"].set(100 + index)


RENDER = """
import sys
from fedtoken.ops import metrics
body, _ = metrics.render()
sys.stdout.write(body.decode())
"""


def test_two_workers_sum_exactly_in_a_third_process(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    saved = os.environ.get(metrics.ENV)
    try:
        os.environ[metrics.ENV] = str(directory)
        directory.mkdir()
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(i, str(directory))) for i in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        # Worker 1 exits for good: its live gauges go, its counters stay.
        metrics.mark_worker_dead(procs[1].pid or 0)
        out = subprocess.run([sys.executable, "-c", RENDER], check=True, capture_output=True,
                             text=True, env=dict(os.environ), timeout=60).stdout
    finally:
        if saved is None:
            os.environ.pop(metrics.ENV, None)
        else:
            os.environ[metrics.ENV] = saved
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(out) for s in f.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("fedtoken_tokens_issued_total", tenant="acme") == sum(ISSUED.values())
    assert value("fedtoken_verifications_total", reason="OK", tenant="acme") \
        == sum(VERIFIED_OK.values())
    assert value("fedtoken_verifications_total", reason="BAD_SIGNATURE", tenant="acme") == 3
    assert value("fedtoken_rpc_duration_seconds_count",
                 method="/fedtoken.v1.TokenService/VerifyBatch", code="OK") == sum(RPCS.values())
    assert value("fedtoken_rpc_duration_seconds_sum",
                 method="/fedtoken.v1.TokenService/VerifyBatch", code="OK") \
        == pytest.approx(sum(RPCS.values()) * 0.01)
    # livesum without the dead worker; livemax over the live one.
    assert value("fedtoken_audit_queue_depth") == 10
    assert value("fedtoken_revocation_entries") == 100
