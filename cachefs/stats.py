"""Process-wide counters and latency histograms (read by `cachefs stats` and /metrics).

Plain integers mutated from the trio thread only; threads report back through
the async caller, so no locking is needed.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

# seconds; upper bounds of histogram buckets
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("counts", "total", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, v)] += 1
        self.total += v
        self.n += 1


class Stats:
    def __init__(self) -> None:
        self.c: defaultdict[str, int] = defaultdict(int)
        self.h: defaultdict[str, Histogram] = defaultdict(Histogram)

    def inc(self, name: str, n: int = 1) -> None:
        self.c[name] += n

    def observe(self, name: str, seconds: float) -> None:
        self.h[name].observe(seconds)

    def snapshot(self) -> dict:
        return dict(sorted(self.c.items()))
