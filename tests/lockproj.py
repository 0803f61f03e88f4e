"""Plain processes (no worker) that hold the semaphore ``work`` of ``tests.faultproj``'s app.

``python -m tests.lockproj MODE ...`` with the ``CS_*`` variables of the fault tests; every
hold is recorded in the fault probe as a ``start`` / ``end`` pair (id ``lock-<pid>-<n>``), so
``Cluster.runs()`` sees it beside the runs of the gated tasks.

Modes:
    with N MS        hold N times for MS milliseconds with ``with semaphore:``
    decorated N MS   call N times a function decorated with ``@semaphore``
    hold             hold once, then sleep until killed
"""

from __future__ import annotations

import os
import sys
import time

from celery_semaphore import Semaphore

from . import faultproj


def main(argv: list[str]) -> int:
    app = faultproj.app  # built from the CS_* variables at import
    probe = app.probe  # type: ignore[attr-defined]
    semaphore = Semaphore("work", app=app)
    pid = os.getpid()
    mode = argv[0]
    if mode == "hold":
        hold = semaphore.acquire()
        assert hold is not None
        probe.record("start", f"lock-{pid}-0", fence=hold.fence)
        time.sleep(600)
        return 1
    count, ms = int(argv[1]), float(argv[2])

    def body(n: int, fence: int) -> None:
        probe.record("start", f"lock-{pid}-{n}", fence=fence)
        try:
            time.sleep(ms / 1000.0)
        finally:
            probe.record("end", f"lock-{pid}-{n}")

    if mode == "with":
        for n in range(count):
            with semaphore as hold:
                body(n, hold.fence)
    elif mode == "decorated":
        held = semaphore(body)
        for n in range(count):
            held(n, 0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
