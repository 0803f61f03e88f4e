"""The benchmark harness of celery_semaphore: ``python -m benchmarks --help``.

It starts its own private ``redis-server`` processes (one for the broker and the probe
records, one for the slots, so the slots' command counts exclude broker traffic) and its own
``celery worker`` subprocesses, runs the scenarios of issue 5 and prints one Markdown table.
Every figure is a median over repetitions with its min-max spread, and every comparison is a
ratio against plain Celery measured in the same run.
"""

from __future__ import annotations

__all__: list[str] = []
