"""fedtoken.ops.metrics on its own: the exposition parses, counts are what was
observed, labels stay bounded, the sampler reads an App and never raises."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedtoken.core.model import Reason, Verdict
from fedtoken.ops import metrics
from tests.unit._metrics_fixture import fresh, rendered_samples

__all__ = ["fresh"]  # the fixture, used by name

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape() -> Samples:
    return {(name, frozenset(labels.items())): v for name, labels, v in rendered_samples()}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def ours(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


def test_render_parses_and_carries_every_metric(fresh: None) -> None:
    metrics.observe_rpc("/fedtoken.v1.TokenService/Issue", "OK", 0.002)
    samples = scrape()
    # _created: single-process mode only (the multiprocess collector has none).
    names = {n for n, _ in samples if n.startswith("fedtoken_") and not n.endswith("_created")}
    assert names <= metrics.exported_names()
    assert value(samples, "fedtoken_rpc_duration_seconds_count",
                 method="/fedtoken.v1.TokenService/Issue", code="OK") == 1
    assert value(samples, "fedtoken_rpc_duration_seconds_bucket",
                 method="/fedtoken.v1.TokenService/Issue", code="OK", le="0.0025") == 1
    assert value(samples, "fedtoken_rpc_duration_seconds_bucket",
                 method="/fedtoken.v1.TokenService/Issue", code="OK", le="0.001") == 0


def test_verdicts_and_wire_entries_are_counted_by_reason_and_tenant(fresh: None) -> None:
    metrics.observe_verdicts([Verdict(True, Reason.OK, tenant="acme")])
    metrics.observe_verdicts([Verdict(True, Reason.OK, tenant="acme")] * 3
                             + [Verdict(False, Reason.MALFORMED)] * 2
                             + [Verdict(False, Reason.EXPIRED, tenant="beta")])
    metrics.observe_verdicts([])

    def entry(outcome: str, reason: str) -> list[Any]:
        return ["jti", "sub", "kid", outcome, reason, "rid", 1.0]

    metrics.observe_wire_audit([
        ("acme", [entry("valid", "OK")] * 5 + [entry("invalid", "BAD_SIGNATURE")] * 2),
        ("beta", [entry("invalid", "REVOKED")]),
        ("gamma", []),
    ])
    s = scrape()
    name = "fedtoken_verifications_total"
    assert value(s, name, reason="OK", tenant="acme") == 9
    assert value(s, name, reason="MALFORMED", tenant="") == 2
    assert value(s, name, reason="EXPIRED", tenant="beta") == 1
    assert value(s, name, reason="BAD_SIGNATURE", tenant="acme") == 2
    assert value(s, name, reason="REVOKED", tenant="beta") == 1
    assert {d["tenant"] for d in ours(s, name)} == {"acme", "beta", ""}


def test_issued_hsm_and_jwks_counters(fresh: None) -> None:
    metrics.observe_issued("acme")
    metrics.observe_issued("acme", 4)
    metrics.observe_hsm_sign(0.0015)
    metrics.observe_hsm_sign(0.0008)
    metrics.observe_hsm_error()
    metrics.observe_jwks_fetch("https://idp.example", "ok")
    metrics.observe_jwks_fetch("https://idp.example", "error")
    metrics.observe_jwks_fetch("https://idp.example", "stale")  # a state, not a fetch
    s = scrape()
    assert value(s, "fedtoken_tokens_issued_total", tenant="acme") == 5
    assert value(s, "fedtoken_hsm_sign_seconds_count") == 2
    assert value(s, "fedtoken_hsm_sign_seconds_bucket", le="0.001") == 1
    assert value(s, "fedtoken_hsm_sign_errors_total") == 1
    assert value(s, "fedtoken_jwks_fetches_total", issuer="https://idp.example",
                 outcome="ok") == 1
    assert {d["outcome"] for d in ours(s, "fedtoken_jwks_fetches_total")} == {"ok", "error"}


def test_labels_are_bounded(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(metrics.LABEL_LIMITS, "method", 5)
    monkeypatch.setitem(metrics.LABEL_LIMITS, "tenant", 3)
    for i in range(50):
        metrics.observe_rpc(f"/m{i}", "OK", 0.001)
        metrics.observe_issued(f"t{i}")
    metrics.observe_rpc("/m0", "NOT_A_STATUS", 0.001)
    metrics.observe_verdicts([Verdict(False, Reason.UNKNOWN_KEY, tenant=f"x{i}")
                              for i in range(10)])
    s = scrape()
    methods = {d["method"] for d in ours(s, "fedtoken_rpc_duration_seconds_count")}
    assert methods == {f"/m{i}" for i in range(5)} | {metrics.OTHER}
    assert value(s, "fedtoken_rpc_duration_seconds_count", method=metrics.OTHER,
                 code="OK") == 45
    codes = {d["code"] for d in ours(s, "fedtoken_rpc_duration_seconds_count")}
    assert codes == {"OK", "UNKNOWN"}
    tenants = {d["tenant"] for d in ours(s, "fedtoken_tokens_issued_total")}
    assert tenants == {"t0", "t1", "t2"} | {metrics.OTHER}
    # The cap is per label, shared by every metric carrying it.
    assert value(s, "fedtoken_verifications_total", reason="UNKNOWN_KEY",
                 tenant=metrics.OTHER) == 10
    assert value(s, "fedtoken_tokens_issued_total", tenant=metrics.OTHER) == 47
    assert len(metrics._get().children) < 30


def test_every_gauge_has_a_live_multiprocess_mode() -> None:
    assert metrics.GAUGE_MODES
    assert all(mode.startswith("live") for mode in metrics.GAUGE_MODES.values())
    assert all(name.startswith("fedtoken_") for name in metrics.METRICS)
    assert "fedtoken_verifications_total" in metrics.exported_names()
    assert "fedtoken_hsm_sign_seconds_bucket" in metrics.exported_names()


def test_prepare_switches_this_process_to_the_shared_directory(
        tmp_path: Path, fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "leftover.db").write_bytes(b"old worker")
    monkeypatch.setenv(metrics.ENV, "")  # restored by monkeypatch after prepare sets it
    metrics.prepare(str(directory))
    assert not (directory / "leftover.db").exists()
    metrics.observe_issued("acme", 3)
    metrics.observe_rpc("/fedtoken.v1.TokenService/Verify", "OK", 0.0003)
    assert any(directory.iterdir())
    s = scrape()
    assert value(s, "fedtoken_tokens_issued_total", tenant="acme") == 3
    assert value(s, "fedtoken_rpc_duration_seconds_count",
                 method="/fedtoken.v1.TokenService/Verify", code="OK") == 1
    metrics.mark_worker_dead(12345)  # no such worker: nothing to drop, no error


class _View:
    staleness = 30.0
    is_fresh = True
    size = 7

    def __init__(self, now: float) -> None:
        self._now = now
        self._fresh_until = now + 25.0  # confirmed 5 s ago

    def _monotonic(self) -> float:
        return self._now


class _Writer:
    def __init__(self, spill: Path) -> None:
        self.queued = 4
        self.spill_dir = spill
        self.spill_pending = True
        self.replayed, self.spilled, self.written, self.failed, self.group_commits = 2, 3, 10, 0, 5


def _app(tmp_path: Path) -> SimpleNamespace:
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "a.jsonl").write_bytes(b"x" * 100)
    (spill / "b.jsonl").write_bytes(b"y" * 23)
    tenant = SimpleNamespace(id="acme")
    idle = SimpleNamespace(id="idle")
    now = 1_000_000.0

    class Keys:
        def timing(self, t: Any) -> Any:
            return SimpleNamespace(next_step_at=int(now + 3600) if t.id == "acme" else 0,
                                   next_step="activate")

    trusted = SimpleNamespace(
        _clock=SimpleNamespace(now=lambda: now),
        status=lambda: [SimpleNamespace(issuer="https://idp.example", fetched_at=now - 40,
                                        serving_stale=True, usable=True)])
    return SimpleNamespace(
        revocations=_View(500.0), audit=_Writer(spill), trusted_keys=trusted,
        services=SimpleNamespace(catalog=SimpleNamespace(tenants=lambda: [tenant, idle]),
                                 keys=Keys()))


def test_sampler_sets_the_gauges_of_an_app(tmp_path: Path, fresh: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.time, "time", lambda: 1_000_000.0)
    monkeypatch.setattr(metrics, "_rsa_path", None)
    metrics.note_rsa_path("bogus")  # ignored
    metrics.note_rsa_path("openssl")
    app = _app(tmp_path)
    sampler = metrics._Sampler(app)
    sampler.run_once()
    s = scrape()
    assert value(s, "fedtoken_revocation_age_seconds") == pytest.approx(5.0)
    assert value(s, "fedtoken_revocation_staleness_bound_seconds") == 30
    assert value(s, "fedtoken_revocation_fresh") == 1
    assert value(s, "fedtoken_revocation_entries") == 7
    assert value(s, "fedtoken_audit_queue_depth") == 4
    assert value(s, "fedtoken_audit_spill_bytes") == 123
    assert value(s, "fedtoken_audit_spilling") == 1
    assert value(s, "fedtoken_audit_group_commits_total") == 5
    assert value(s, "fedtoken_audit_replayed_total") == 2
    assert value(s, "fedtoken_jwks_key_set_age_seconds", issuer="https://idp.example") == 40
    assert value(s, "fedtoken_jwks_serving_stale", issuer="https://idp.example") == 1
    assert value(s, "fedtoken_jwks_usable", issuer="https://idp.example") == 1
    assert value(s, "fedtoken_rotation_next_step_seconds", tenant="acme") == 3600
    assert math.isnan(value(s, "fedtoken_rotation_next_step_seconds", tenant="idle"))
    paths = {d["path"]: value(s, "fedtoken_rsa_verify_path", **d)
             for d in ours(s, "fedtoken_rsa_verify_path")}
    assert paths == {"multibuffer": 0, "openssl": 1}

    # The writer's own counters grow: the metric counters follow by the difference.
    app.audit.group_commits, app.audit.replayed = 9, 2
    app.revocations._fresh_until = -math.inf  # the feed broke
    sampler.run_once()
    s = scrape()
    assert value(s, "fedtoken_audit_group_commits_total") == 9
    assert value(s, "fedtoken_audit_replayed_total") == 2
    assert value(s, "fedtoken_revocation_age_seconds") == math.inf


def test_sampler_never_raises_and_logs_a_failing_part_once(
        tmp_path: Path, fresh: None, caplog: pytest.LogCaptureFixture) -> None:
    app = _app(tmp_path)

    def broken() -> list[Any]:
        raise RuntimeError("cache gone")

    app.trusted_keys.status = broken
    app.services = None
    sampler = metrics._Sampler(app)
    for _ in range(3):
        sampler.run_once()
    failures = [r for r in caplog.records if "sampling federation failed" in r.getMessage()]
    assert len(failures) == 1
    assert value(scrape(), "fedtoken_audit_queue_depth") == 4  # the other parts still ran
    metrics.sample(object())  # an object with none of the fields: nothing set, no error


async def test_start_sampler_runs_until_cancelled(tmp_path: Path, fresh: None) -> None:
    import asyncio

    task = metrics.start_sampler(_app(tmp_path))
    await asyncio.sleep(0.05)
    assert value(scrape(), "fedtoken_audit_queue_depth") == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_operations_doc_lists_every_metric() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = doc[doc.index("## Metrics"):]
    section = section[:section.index("\n## ", 1)]
    for name, spec in metrics.METRICS.items():
        sample = name + ("_total" if spec.kind == "counter" else "")
        assert f"| `{sample}` | {spec.kind}" in section, name
        if spec.kind == "gauge":
            assert f"{spec.kind}, `{spec.mode}`" in section.split(f"`{sample}`")[1][:40], name


def test_a_series_that_cannot_be_created_costs_the_sample_not_the_call(
        fresh: None, caplog: pytest.LogCaptureFixture) -> None:
    issued = metrics._get().by_name["fedtoken_tokens_issued"]

    def full_disk(*labels: str) -> Any:
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(issued, "labels", full_disk)
        metrics.observe_issued("acme")
        metrics.observe_issued("acme")
    assert len([r for r in caplog.records if "cannot add a series" in r.getMessage()]) == 1
    metrics.observe_issued("acme")  # the disk has room again: counted from now on
    assert value(scrape(), "fedtoken_tokens_issued_total", tenant="acme") == 1
