"""The dashboard's one reader of Redis: a background thread that reads every gate at most once
per interval into a snapshot that every open page is served from.

However many pages are open, Redis sees one read pass per interval (longer when a pass is
slow: the pause after a pass is at least as long as the pass). A page's gate details (its
holders, a page of its parked calls) are read in that pass too, while a page wants them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import redis
from celery import Celery
from celery.utils.log import get_logger

from ..admin import known_gates, metrics, status
from ..extension import install
from ..listing import holders, parked
from ..runtime import Runtime
from .history import History

__all__ = ["HOLDERS_SHOWN", "PAGE", "Board", "Detail", "Snapshot"]

logger = get_logger(__name__)

#: Parked calls per page, and the most holders sent for one gate.
PAGE = 50
HOLDERS_SHOWN = 200
#: Seconds a page's interest in a gate's details lasts without being renewed, and the most
#: details read in one pass (the most recently wanted).
INTEREST_S = 10.0
MAX_WANTED = 32


@dataclasses.dataclass(frozen=True)
class Detail:
    """What one pass read of one gate beyond its status: holders and a page of parked calls."""

    holders: list[dict[str, Any]]
    holders_total: int
    parked_offset: int
    parked: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What one pass read (replaced whole, so a page never sees half of two passes)."""

    #: Passes so far (0: none yet), and the wall-clock time (s) of the last good one.
    version: int = 0
    read_at: float = 0.0
    #: Why the last pass failed (Redis unreachable, ...), or None.
    error: str | None = None
    #: gate -> its status (admin.GateStatus.as_dict()), gate -> its group.
    gates: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    groups: dict[str, str] = dataclasses.field(default_factory=dict)
    #: (gate, parked offset) -> its details, for the gates pages want.
    details: dict[tuple[str, int], Detail] = dataclasses.field(default_factory=dict)


class Board:
    """A snapshot of every gate, refreshed by one thread (:meth:`start`, :meth:`stop`)."""

    def __init__(self, app: Celery, interval_s: float = 1.0) -> None:
        self.app = app
        self.runtime: Runtime = install(app)
        self.interval_s = interval_s
        self.history = History()
        self.snapshot = Snapshot()
        self._wanted: dict[tuple[str, int], float] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="semaphore-dashboard", daemon=True)

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    def start(self) -> None:
        """Start reading, in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop reading and wake every page waiting for a pass."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)

    def want(self, gate: str, offset: int) -> None:
        """Read the details of ``gate`` (parked calls from ``offset``) in the coming passes."""
        with self._changed:
            self._wanted[(gate, max(0, offset))] = time.monotonic()

    def wait(self, seen: int, timeout: float) -> int:
        """Block until a pass newer than ``seen`` is in (or ``timeout``, or :meth:`stop`);
        return the current pass count."""
        with self._changed:
            self._changed.wait_for(lambda: self.snapshot.version > seen or self.stopped, timeout)
            return self.snapshot.version

    def _run(self) -> None:
        while not self.stopped:
            began = time.monotonic()
            try:
                self.refresh()
            except (redis.RedisError, OSError) as exc:
                self._fail(f"cannot read the gates at {self.runtime.url}: {type(exc).__name__}")
            except Exception as exc:  # keep serving the last snapshot; say why it is old
                logger.exception("dashboard: a read pass failed")
                self._fail(f"a read pass failed: {type(exc).__name__}")
            spent = time.monotonic() - began
            self._stop.wait(max(self.interval_s - spent, spent))

    def _fail(self, error: str) -> None:
        self._publish(dataclasses.replace(self.snapshot, error=error))

    def _publish(self, snapshot: Snapshot) -> None:
        with self._changed:
            self.snapshot = dataclasses.replace(snapshot, version=self.snapshot.version + 1)
            self._changed.notify_all()

    def refresh(self) -> None:
        """One read pass: every gate's status, wanted details; when a sample is due, the list
        of gates and their wait histograms too."""
        rt, now = self.runtime, time.monotonic()
        sample = self.history.due(now)
        # The list of gates costs a read per group: once per sample is soon enough to see a
        # new one, and spares a pass over many gates a third of its round trips.
        found = known_gates(rt) if sample or not self.snapshot.groups else self.snapshot.groups
        gates = {gate: status(rt.group(name), gate).as_dict() for gate, name in found.items()}
        if sample:
            samples = {}
            for gate, name in found.items():
                wait = metrics(rt.group(name), gate).wait
                samples[gate] = (gates[gate]["held"], gates[gate]["parked"], wait)
            self.history.record(now, samples)
        with self._changed:
            recent = sorted(self._wanted.items(), key=lambda kv: -kv[1])[:MAX_WANTED]
            self._wanted = {key: at for key, at in recent if now - at < INTEREST_S}
            wanted = list(self._wanted)
        details = {}
        for gate, offset in wanted:
            if gate in found:
                group = rt.group(found[gate])
                held = [dataclasses.asdict(h) for h in holders(group, gate)]
                calls = [dataclasses.asdict(p) for p in parked(group, gate, offset, PAGE)]
                details[(gate, offset)] = Detail(held[:HOLDERS_SHOWN], len(held), offset, calls)
        self._publish(Snapshot(0, time.time(), None, gates, found, details))
