"""The pytest plugin (celery_semaphore.testing): its helper on a real gate, and its documented
example (examples/testing) run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from celery import Celery

from celery_semaphore.testing import gate

from .conftest import ROOT


def test_the_plugin_is_loaded_in_every_run_through_its_entry_point(
    request: pytest.FixtureRequest,
) -> None:
    assert request.config.pluginmanager.hasplugin("celery_semaphore")


def test_the_gate_helper_reads_what_a_gate_holds_parks_and_held_at_most(
    make_app: Callable[..., Celery],
) -> None:
    app = make_app(limit=2)
    work = gate(app, "work")
    assert (work.held(), work.parked(), work.peak()) == (0, 0, 0)
    work.wait_idle(timeout=1)

    for _ in range(3):
        app.tasks["proj.work"].delay(ms=10)  # no worker: two hold, one parks

    assert (work.held(), work.parked(), work.peak()) == (2, 1, 2)
    with pytest.raises(TimeoutError, match="2 units held by 2 calls, 1 parked"):
        work.wait_idle(timeout=0.1)
    work.reset_peak()
    assert work.peak() == 0


def test_the_documented_example_passes_with_a_real_worker() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "examples/testing", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout, out.stdout
