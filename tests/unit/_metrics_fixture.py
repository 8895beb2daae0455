"""Shared by the metrics unit tests: single-process metrics built anew for a
test, and the samples of what ``metrics.render()`` serves."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from fedtoken.ops import metrics

__all__ = ["fresh", "rendered_samples"]


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Single-process metrics, built anew for this test."""
    monkeypatch.delenv(metrics.ENV, raising=False)
    saved = values.ValueClass
    values.ValueClass = values.MutexValue
    metrics._reset()
    yield
    metrics._reset()
    values.ValueClass = saved


def rendered_samples() -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample /metrics would serve now."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            yield s.name, s.labels, s.value
