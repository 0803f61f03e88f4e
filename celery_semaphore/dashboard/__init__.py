"""A web dashboard of the gates: ``celery -A proj semaphore dashboard``.

One page (its script and style ship in ``static/``, nothing comes from the network) fed by one
thread that reads every gate at most once a second, whatever the number of open pages; the
actions (resize, pause, resume, cancel, purge) are on only with a token, and each POST needs it.
"""

from __future__ import annotations

from .server import DashboardServer, make_server, serve

__all__ = ["DashboardServer", "make_server", "serve"]
