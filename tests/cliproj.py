"""The app of ``celery -A tests.cliproj semaphore ...`` in tests/test_cli.py.

The command runs in a subprocess, so the module-level ``app`` is built from ``CS_*``
environment variables (the test builds the same app in process from the same variables):
tests/proj.py's app (gate ``work``, probe counters) plus ``cli.hold``, a call of gate ``work``
that runs until the test sets its flag. ``CS_BLOCK_IMPORTS`` (comma-separated module names)
makes those modules unimportable, as if an optional extra were not installed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery

from celery_semaphore import gated

from . import proj


def create_app(env: Mapping[str, str]) -> Celery:
    """tests/proj.py's app under ``CS_PREFIX`` (gate ``work`` of ``CS_LIMIT``), with history."""
    prefix = env["CS_PREFIX"]
    app = proj.create_app(
        f"cliproj-{prefix}",
        broker=env["CS_BROKER"],
        backend=env["CS_BACKEND"],
        slots_url=env["CS_SLOTS"],
        probe_url=env["CS_PROBE"],
        prefix=prefix,
        queue=prefix,
        limit=int(env.get("CS_LIMIT", "1")),
        semaphore_history_ttl=120.0,  # explain tells how an ended call ended
        semaphore_redis_timeout=2.0,
    )
    probe: proj.Probe = app.probe  # type: ignore[attr-defined]

    @gated("work")
    @app.task(name="cli.hold", bind=True, shared=False)
    def hold(self: Any, flag: str, max_s: float = 30.0) -> str:
        """Hold gate ``work`` until ``flag`` (or ``all``) is set in the probe database."""
        probe.enter(self.request.id)
        try:
            deadline = time.monotonic() + max_s
            keys = probe.key(f"flag:{flag}"), probe.key("flag:all")
            while not probe.client.exists(*keys) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            probe.leave(self.request.id)
        return flag

    return app


for _name in filter(None, os.environ.get("CS_BLOCK_IMPORTS", "").split(",")):
    sys.modules[_name] = None  # type: ignore[assignment]

app = create_app(os.environ) if "CS_BROKER" in os.environ else Celery("cliproj-unconfigured")
