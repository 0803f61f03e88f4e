"""The tasks of a project, with one gated task: at most two reports are built at once.

As in most projects, the tasks are ``@shared_task`` and the app lives in another module, so
a test's app (the ``celery_app`` fixture) gets them too. ``@gated`` goes below
``@shared_task``: the gate then travels with the function to every app.
"""

from __future__ import annotations

import time

from celery import shared_task

from celery_semaphore import gated


@shared_task(name="proj.build_report")
@gated("reports", limit=2)
def build_report(report_id: int, seconds: float = 0.1) -> int:
    time.sleep(seconds)
    return report_id
