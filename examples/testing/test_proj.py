"""The gate holds with a real worker: more calls than the limit, never more than two at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proj import build_report


def test_reports_are_built_at_most_two_at_a_time(
    celery_app: Any, celery_worker: Any, semaphore_gate: Callable[..., Any]
) -> None:
    reports = semaphore_gate(celery_app, "reports")

    results = [build_report.delay(n) for n in range(6)]

    assert [r.get(timeout=10) for r in results] == list(range(6))
    reports.wait_idle(timeout=10)  # results are stored just before the room is given back
    assert reports.peak() == 2
    assert reports.held() == 0
    assert reports.parked() == 0
