"""What the dashboard remembers of each gate: held and parked over the last 15 minutes, and
the percentiles of the time calls waited, taken from the gate's metrics.

Kept in this process's memory only: sampling writes nothing to Redis, and a call pays nothing
for it. A restart of the dashboard starts the charts afresh.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections import deque
from typing import Any

from ..admin import Histogram

__all__ = ["PERCENTILES", "SAMPLE_S", "WINDOW_S", "History", "quantile"]

#: Seconds between two samples of a gate, and how far back the charts go.
SAMPLE_S = 5.0
WINDOW_S = 900.0
#: The wait-time percentiles charted, each over the calls granted in the RECENT_S before.
PERCENTILES = (0.5, 0.9, 0.99)
RECENT_S = 60.0
#: Numbers kept per sample: when, held, parked and one per percentile.
FIELDS = 3 + len(PERCENTILES)


def quantile(q: float, buckets: list[tuple[float, int]]) -> float | None:
    """The ``q`` quantile of cumulative ``(upper bound, count)`` buckets, interpolated linearly
    within a bucket as Prometheus' ``histogram_quantile`` does; ``None`` without calls."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):  # beyond the last finite bound: that bound is all we know
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _since(now: Histogram, then: tuple[int, ...]) -> list[tuple[float, int]]:
    counts = [count for _, count in now.buckets]
    if all(a >= b for a, b in zip(counts, then, strict=True)):
        counts = [a - b for a, b in zip(counts, then, strict=True)]
    # else: the counters went back (the group was deleted and made again): all are recent
    return [(upper, n) for (upper, _), n in zip(now.buckets, counts, strict=True)]


class History:
    """Samples per gate, at most one per :data:`SAMPLE_S`, for :data:`WINDOW_S`."""

    def __init__(self, sample_s: float = SAMPLE_S, window_s: float = WINDOW_S) -> None:
        self.sample_s = sample_s
        self._size = int(window_s / sample_s) + 1
        #: gate -> its samples, oldest first, flat: (at, held, parked, p50, p90, p99) each,
        #: NaN for "no call granted": 8.7 kB a gate for 15 minutes, however many gates.
        self._points: dict[str, array[float]] = {}
        #: gate -> (at, cumulative wait bucket counts) of the last RECENT_S.
        self._waits: dict[str, deque[tuple[float, tuple[int, ...]]]] = {}
        self._lock = threading.Lock()
        self.last_at = -math.inf

    def due(self, now: float) -> bool:
        """Whether a new sample is due at ``now`` (monotonic seconds)."""
        return now - self.last_at >= self.sample_s

    def record(self, now: float, samples: dict[str, tuple[int, int, Histogram]]) -> None:
        """Add a sample per gate: ``gate -> (held, parked, wait histogram)``; forget the gates
        that are gone."""
        with self._lock:
            self.last_at = now
            for gate in set(self._points) - set(samples):
                del self._points[gate]
                del self._waits[gate]
            for gate, (held, parked, wait) in samples.items():
                # The baseline: the newest sample at least RECENT_S old, else the oldest one;
                # none on a gate's first sample (its whole past is not "the minute before").
                waits = self._waits.setdefault(gate, deque())
                while len(waits) > 1 and now - waits[1][0] >= RECENT_S:
                    waits.popleft()
                recent = _since(wait, waits[0][1]) if waits else []
                waits.append((now, tuple(count for _, count in wait.buckets)))
                marks = (quantile(q, recent) for q in PERCENTILES)
                points = self._points.setdefault(gate, array("d"))
                points.extend((now, held, parked, *(math.nan if m is None else m for m in marks)))
                if len(points) > self._size * FIELDS:
                    del points[:FIELDS]

    def series(self, gate: str, now: float) -> dict[str, Any]:
        """The samples of ``gate`` as JSON-ready columns; ``ago_s`` counts back from ``now``;
        ``None`` where no call was granted in the minute before."""
        with self._lock:
            points = self._points.get(gate, array("d")).tolist()
        names = ("held", "parked", *(f"p{round(q * 100)}" for q in PERCENTILES))
        out: dict[str, Any] = {"ago_s": [round(now - at, 1) for at in points[::FIELDS]]}
        for i, name in enumerate(names, start=1):
            column = points[i::FIELDS]
            out[name] = [None if math.isnan(v) else round(v, 4) for v in column]
        return out
