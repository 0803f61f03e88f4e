"""Medians, spreads and percentiles, and how the table prints them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

__all__ = ["Spread", "peak_overlap", "percentile", "ratio_of", "spread"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def peak_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals ``(start, end)`` open at one instant (an end before a start)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = current = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


class Spread:
    """A figure measured once per repetition: its median and its min-max range."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = [v for v in values if not math.isnan(v)]

    @property
    def median(self) -> float:
        """The median over repetitions (NaN when nothing was measured)."""
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        """The smallest repetition."""
        return min(self.values) if self.values else math.nan

    @property
    def high(self) -> float:
        """The largest repetition."""
        return max(self.values) if self.values else math.nan

    def format(self, fmt: str = "{:.2f}", unit: str = "") -> str:
        """``"median unit (low-high)"``; no range when there is one repetition."""
        if not self.values:
            return "n/a"
        text = fmt.format(self.median) + unit
        if len(self.values) > 1:
            text += f" ({fmt.format(self.low)}-{fmt.format(self.high)})"
        return text

    def __repr__(self) -> str:
        return f"Spread({self.format()})"


def spread(values: Sequence[float]) -> Spread:
    """Shorthand for :class:`Spread`."""
    return Spread(values)


def ratio_of(
    numerators: Sequence[float],
    denominators: Sequence[float],
    op: Callable[..., float] | None = None,
) -> Spread:
    """Per-repetition ratios ``n_i / d_i`` (paired: the same repetition of both variants)."""
    combine = op or (lambda n, d: n / d if d else math.nan)
    return Spread([combine(n, d) for n, d in zip(numerators, denominators, strict=False)])
