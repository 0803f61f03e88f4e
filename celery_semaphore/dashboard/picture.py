"""A gate's picture for the dashboard: its Graphviz SVG, rendered at most once per gate every
few seconds, one at a time, however often pages ask."""

from __future__ import annotations

import threading
import time

from ..graph import gate_dot, to_svg
from ..group import Group

__all__ = ["FRESH_S", "Pictures"]

#: Seconds a gate's rendered picture is served before it is drawn again.
FRESH_S = 5.0
#: The most pictures kept (each a few kB to a few hundred kB).
KEPT = 64


class Pictures:
    """Rendered SVG per gate, kept for :data:`FRESH_S`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[float, str]] = {}

    def svg(self, group: Group, gate: str) -> str:
        """The picture of ``gate`` (see :func:`~celery_semaphore.graph.gate_dot`).

        Raises:
            GraphvizMissing: ``dot`` is not installed here.
        """
        with self._lock:  # one render at a time: a burst of pages costs Redis one read
            now = time.monotonic()
            kept = self._kept.get(gate)
            if kept is not None and now - kept[0] < FRESH_S:
                return kept[1]
            svg = to_svg(gate_dot(group, gate))
            if len(self._kept) >= KEPT:
                self._kept.pop(min(self._kept, key=lambda g: self._kept[g][0]))
            self._kept[gate] = (now, svg)
            return svg
