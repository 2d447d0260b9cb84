"""How long will a preload take?  A model of chunk fetch times, by concurrency.

Every chunk a preload fetches is timed (``ThroughputModel.timed``), together with
how many preload fetches were in flight on average while it ran (the time-weighted
mean of the in-flight count over its life).  Samples go to the bucket of that
concurrency (1, 2, 4, 8, ... streams, on a log2 scale); each bucket fits
``t = latency + bytes / stream_bps`` by least squares, with exponential forgetting
(DECAY per sample of that bucket); a bucket not fed for STALE_AFTER (an hour) counts as
not measured for a dry run, and its next sample starts it anew.

A bucket at mean concurrency ``c`` predicts a plan of ``n`` chunks and ``b`` bytes
in ``(n * latency + b / stream_bps) / c`` seconds.  When its chunk sizes hardly vary,
latency and bandwidth cannot be told apart: the plan then lies between "time per
byte as measured" and "time per chunk as measured", which differ only when the
plan's chunks are of another size than the measured ones.

Why buckets: a chunk's time includes the contention of the streams beside it.
Rates measured at 8 streams and multiplied by 32 promised 4 times the throughput
of a server that was saturated at 8, and rates measured at 8 and divided among 1
stream took 4 times too long (docs/datasets.md).  So the estimate for ``s`` streams
comes from the bucket nearest ``s`` (within a factor of sqrt 2; a bucket of fewer
than MIN_SAMPLES fetches, such as the tail of a run, counts only when no other
bucket exists), else it is
interpolated between the measured concurrencies around ``s`` (log-log), else it is a
range: above the highest measured concurrency, from "no further gain" to "linear
gain"; below the lowest, from "the same aggregate rate" to "the same per-stream
rate".  The answer says which it is, and a dry run measures at the asked
concurrency first when no bucket is near it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

DECAY = 0.98  # weight kept by older samples of a bucket at each new one
NEAR = 0.5  # log2 distance within which a bucket counts as measured at that concurrency
RANGE = 1.25  # high/low ratio above which the estimate is given as a range
MIN_SAMPLES = 4  # a bucket with fewer (the tail of a run) is used only when no other is
STALE_AFTER = 3600.0  # seconds: a dry run measures again a concurrency measured longer ago


def _distance(measured: float, streams: float) -> float:
    """How far a measured concurrency is from a plan's streams (log2)."""
    return abs(math.log2(measured / streams))


@dataclass
class _Fit:
    """Least squares of t = latency + bytes / bps at one concurrency, with forgetting."""

    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    sc: float = 0.0  # concurrency, summed with the same weights
    samples: int = 0
    at: float = 0.0  # time.monotonic() of the last sample

    def add(self, x: float, y: float, c: float) -> None:
        now = time.monotonic()
        if self.samples and now - self.at > STALE_AFTER:  # measured long ago: start anew
            self.w = self.sx = self.sy = self.sxx = self.sxy = self.sc = 0.0
            self.samples = 0
        self.w = self.w * DECAY + 1
        self.sx = self.sx * DECAY + x
        self.sy = self.sy * DECAY + y
        self.sxx = self.sxx * DECAY + x * x
        self.sxy = self.sxy * DECAY + x * y
        self.sc = self.sc * DECAY + c
        self.samples += 1
        self.at = now

    @property
    def streams(self) -> float:
        return self.sc / self.w

    @property
    def chunk_bytes(self) -> float:
        return self.sx / self.w

    def params(self) -> tuple[float, float] | None:
        """(latency s, per-stream bytes/s) when chunk sizes vary enough to separate them."""
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var > (0.05 * mx) ** 2 and self.samples >= 4:
            slope = (self.sxy / self.w - mx * my) / var
            lat = my - slope * mx
            if slope > 0 and lat >= 0:
                return lat, 1.0 / slope
        return None

    def seconds(self, nbytes: int, chunks: int) -> tuple[float, float]:
        """(low, high) seconds for the plan at this bucket's concurrency."""
        c = self.streams
        p = self.params()
        if p is not None:
            t = (chunks * p[0] + nbytes / p[1]) / c
            return t, t
        mx, my = self.sx / self.w, self.sy / self.w
        per_byte, per_chunk = nbytes * my / mx / c, chunks * my / c
        return min(per_byte, per_chunk), max(per_byte, per_chunk)

    def summary(self) -> dict:
        out = {"streams": round(self.streams, 2), "samples": self.samples,
               "weight": round(self.w, 1), "chunk_bytes": round(self.chunk_bytes),
               "chunk_seconds": round(self.sy / self.w, 6)}
        p = self.params()
        if p is not None:
            out.update(latency_s=round(p[0], 6), stream_bps=round(p[1]))
        return out


class Timed:
    """One fetch being timed: ``with model.timed(nbytes) as t: await fetch()``.  Only a
    fetch that returns is observed; ``t.seconds`` and ``t.streams`` are set on exit.
    ``observe=False``: a wait for a fetch someone else started (a reader's; it joined its
    flight), neither observed nor counted as a stream: such waits, shorter than a fetch,
    were learned as fast fetches (an estimate of 35 s for 50 with 30% of them)."""

    __slots__ = ("model", "nbytes", "t0", "a0", "seconds", "streams", "observed")

    def __init__(self, model: ThroughputModel, nbytes: int, observe: bool = True) -> None:
        self.model, self.nbytes = model, nbytes
        self.seconds = self.streams = 0.0
        self.observed = observe

    def __enter__(self) -> Timed:
        m = self.model
        m._tick()
        if self.observed:
            m.inflight += 1
        self.t0, self.a0 = m._t, m._area
        return self

    def __exit__(self, et, e, tb) -> bool:
        m = self.model
        m._tick()
        self.seconds = m._t - self.t0
        if not self.observed:
            return False
        self.streams = (m._area - self.a0) / self.seconds if self.seconds > 0 else m.inflight
        m.inflight -= 1
        if et is None:
            m.observe(self.nbytes, self.seconds, self.streams)
        return False


class ThroughputModel:
    def __init__(self) -> None:
        self.buckets: dict[int, _Fit] = {}
        self.samples = 0
        self.updated_at = 0.0
        self.inflight = 0
        self._t = time.perf_counter()
        self._area = 0.0  # integral of the in-flight count over time

    def _tick(self) -> None:
        now = time.perf_counter()
        self._area += self.inflight * (now - self._t)
        self._t = now

    def timed(self, nbytes: int, observe: bool = True) -> Timed:
        return Timed(self, nbytes, observe)

    def observe(self, nbytes: int, seconds: float, streams: float = 1.0) -> None:
        if nbytes <= 0 or seconds <= 0 or not math.isfinite(seconds):
            return
        streams = max(1.0, float(streams)) if math.isfinite(streams) else 1.0
        b = round(math.log2(streams))
        self.buckets.setdefault(b, _Fit()).add(float(nbytes), float(seconds), streams)
        self.samples += 1
        self.updated_at = time.time()

    @property
    def measured(self) -> bool:
        return self.samples > 0

    def _fits(self) -> list[_Fit]:
        return ([f for f in self.buckets.values() if f.samples >= MIN_SAMPLES]
                or list(self.buckets.values()))

    def near(self, streams: int) -> bool:
        """Is there a measurement at about this many streams, of the last STALE_AFTER
        seconds?  (S3 an hour ago, another load on the link: a dry run measured nothing
        when a week-old daemon had measured that concurrency once.)"""
        now = time.monotonic()
        return any(_distance(f.streams, streams) <= NEAR and now - f.at <= STALE_AFTER
                   for f in self._fits())

    def estimate(self, missing_bytes: int, missing_chunks: int, parallel: int,
                 s3_concurrency: int) -> dict:
        streams = max(1, min(parallel, s3_concurrency, max(1, missing_chunks)))
        out: dict = {"streams": streams, "samples": self.samples}
        if missing_chunks == 0:
            out.update(seconds=0.0, measured=self.measured)
            return out
        if not self.measured:
            out.update(seconds=None, measured=False)
            return out
        pts = sorted(((f.streams, *f.seconds(missing_bytes, missing_chunks), f)
                      for f in self._fits()), key=lambda p: p[0])
        s = float(streams)
        nearest = min(pts, key=lambda p: _distance(p[0], s))
        below = [p for p in pts if p[0] < s]
        above = [p for p in pts if p[0] > s]
        if _distance(nearest[0], s) <= NEAR:
            basis, (_, lo, hi, _) = "measured", nearest
        elif below and above:
            basis = "interpolated"
            (c0, lo0, hi0, _), (c1, lo1, hi1, _) = below[-1], above[0]
            out["between_streams"] = [round(c0, 1), round(c1, 1)]
            k = math.log(s / c0) / math.log(c1 / c0)
            lo, hi = lo0 * (lo1 / lo0) ** k, hi0 * (hi1 / hi0) ** k
        elif below:  # more streams than ever measured: from no gain to a linear one
            basis = "extrapolated"
            c0, lo0, hi0, _ = below[-1]
            lo, hi = lo0 * c0 / s, hi0
        else:  # fewer: from the same aggregate rate to the same per-stream rate
            basis = "extrapolated"
            c1, lo1, hi1, _ = above[0]
            lo, hi = lo1, hi1 * c1 / s
        secs = math.sqrt(lo * hi)
        out.update(seconds=round(secs, 3), measured=True, basis=basis,
                   measured_streams=[round(p[0], 1) for p in pts],
                   measured_chunk_bytes=round(nearest[3].chunk_bytes),
                   plan_chunk_bytes=round(missing_bytes / missing_chunks))
        if hi > lo * RANGE:
            out.update(seconds_low=round(lo, 3), seconds_high=round(hi, 3))
        return out

    def statistics(self) -> dict:
        return {"samples": self.samples, "updated_at": self.updated_at,
                "by_streams": [f.summary() for _, f in sorted(self.buckets.items())]}
