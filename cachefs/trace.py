"""Per-request tracing: spans across FUSE → chunk reader → peer → S3.

A trace starts at a FUSE request (``tracer.start(...)``).  Code below opens
child spans with ``span(name, **attrs)``; the current span travels in a
contextvar, so tasks started from a traced request (read-ahead, singleflight
leaders) attach their spans to the request that caused them.  Outside a trace
``span()`` costs one contextvar lookup and records nothing.

A trace is *recorded* when its root has ended and every span opened inside
it has ended too: a read that started a read-ahead returns at once, but its
trace keeps the read-ahead's chunk, peer and S3 spans once they complete.
The trace's ``duration_ms`` is still the root's (the latency the caller saw).
A task that opens its first span only after its request's trace was recorded
(a read-ahead scheduled by a read that returned at once from memory) starts a
*continuation* trace: named after that span, with the request's ino/path/
offset/size, ``continues: <trace id>`` and ``background: true``; it is kept
with the recent traces (and `cachefs trace PATH` captures it) but is never
"slow": it is not a request anyone waited for.
A trace whose background spans are still open after ``PENDING_MAX_AGE``
seconds (or when more than ``PENDING_MAX`` traces wait) is recorded as it is,
with ``incomplete: true`` and the open spans marked ``open: true``.

Bounds (memory):
  * a trace holds at most ``MAX_SPANS`` spans; more are counted in the root's
    ``dropped_spans`` and not kept;
  * string attributes are cut to ``MAX_ATTR`` characters;
  * the two rings (recent traces, slow traces) are bounded both in traces
    (``recent``/``slow``) and in spans (``recent_spans``/``slow_spans``): the
    oldest traces leave first.  With the defaults the rings hold at most
    256 + 1024 traces and 8,192 + 32,768 spans (each about 0.5 KiB as a dict),
    i.e. about 20 MiB in the worst case.

``CACHEFS_TRACING=0`` in the daemon's environment turns tracing off (for
benchmarks): ``start`` then records nothing and ``span`` finds no trace.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import trio

_ids = itertools.count(1)
_current: ContextVar[Span | None] = ContextVar("cachefs_span", default=None)

MAX_SPANS = 256
MAX_ATTR = 512
PENDING_MAX = 1024
PENDING_MAX_AGE = 60.0


def _cut(v: Any) -> Any:
    if isinstance(v, str) and len(v) > MAX_ATTR:
        return v[:MAX_ATTR] + "…"
    return v


class _Trace:
    """Book-keeping shared by every span of one trace."""

    __slots__ = ("tracer", "owner", "root", "open", "nspans", "dropped", "ended", "done",
                 "background")

    def __init__(self, tracer: Tracer | None, root: Span, background: bool = False) -> None:
        self.tracer = tracer  # None once recorded
        self.owner = tracer
        self.root = root
        self.background = background  # a continuation: not a request, never "slow"
        self.done = False
        self.open = 0  # spans opened under the root that have not ended
        self.nspans = 1
        self.dropped = 0
        self.ended = False  # the root has ended

    def span_done(self) -> None:
        self.open -= 1
        if self.open == 0 and self.ended and self.tracer is not None:
            self.tracer._complete(self)


class Span:
    __slots__ = ("name", "attrs", "start", "end", "children", "trace")

    def __init__(self, name: str, attrs: dict[str, Any], trace: _Trace | None = None) -> None:
        self.name = name
        self.attrs = attrs
        self.start = time.perf_counter()
        self.end: float | None = None
        self.children: list[Span] = []
        self.trace = trace

    def set(self, **attrs: Any) -> None:
        self.attrs.update(attrs)

    @property
    def duration(self) -> float:
        return (self.end if self.end is not None else time.perf_counter()) - self.start

    def to_dict(self, t0: float | None = None) -> dict:
        t0 = self.start if t0 is None else t0
        d = {
            "name": self.name,
            "start_ms": round((self.start - t0) * 1000, 3),
            "duration_ms": round(self.duration * 1000, 3),
        }
        for k, v in self.attrs.items():
            d[k] = _cut(v)
        if self.end is None:
            d["open"] = True
        d["spans"] = [c.to_dict(t0) for c in self.children]
        return d


class _NullSpan:
    __slots__ = ()

    def set(self, **attrs: Any) -> None:
        pass


NULL_SPAN = _NullSpan()


@contextlib.contextmanager
def span(name: str, **attrs: Any) -> Iterator[Span | _NullSpan]:
    parent = _current.get()
    if parent is None:
        yield NULL_SPAN
        return
    tr = parent.trace
    if tr is not None:
        if tr.done:
            # The trace was recorded already: a task it started (read-ahead) opened its
            # first span only after the request returned.  Record it as a trace of its
            # own that names the request it continues.
            assert tr.owner is not None
            with tr.owner._continuation(tr, name, attrs) as s:
                yield s
            return
        if tr.nspans >= MAX_SPANS:
            tr.dropped += 1
            yield NULL_SPAN
            return
        tr.nspans += 1
        tr.open += 1
    s = Span(name, attrs, tr)
    parent.children.append(s)
    token = _current.set(s)
    try:
        yield s
    except BaseException as e:
        s.attrs.setdefault("error", type(e).__name__)
        raise
    finally:
        s.end = time.perf_counter()
        _current.reset(token)
        if tr is not None:
            tr.span_done()


def attach(spans: list[dict]) -> None:
    """Attach span dicts received from elsewhere (a peer's reply) to the current span."""
    parent = _current.get()
    if parent is None:
        return
    tr = parent.trace
    for d in spans:
        if not isinstance(d, dict):
            continue
        s = _from_dict(d, parent.start, tr)
        if s is not None:
            parent.children.append(s)


def _from_dict(d: dict, base: float, tr: _Trace | None) -> Span | None:
    if tr is not None:
        if tr.nspans >= MAX_SPANS:
            tr.dropped += 1
            return None
        tr.nspans += 1
    s = Span(str(d.get("name", "?")), {k: _cut(v) for k, v in d.items()
                                       if k not in ("name", "start_ms", "duration_ms", "spans")
                                       and isinstance(v, (str, int, float, bool))})
    try:
        s.start = base + float(d.get("start_ms", 0)) / 1000
        s.end = s.start + float(d.get("duration_ms", 0)) / 1000
    except (TypeError, ValueError):
        s.end = s.start
    kids = d.get("spans", [])
    if isinstance(kids, list):
        for c in kids:
            if isinstance(c, dict):
                k = _from_dict(c, base, tr)
                if k is not None:
                    s.children.append(k)
    return s


def current() -> Span | None:
    return _current.get()


def count_spans(d: dict) -> int:
    return 1 + sum(count_spans(c) for c in d.get("spans", ()))


class _Ring:
    """Finished traces, oldest first, bounded in traces and in spans."""

    def __init__(self, max_traces: int, max_spans: int) -> None:
        self.max_spans = max_spans
        self.items: deque[tuple[dict, int]] = deque(maxlen=max_traces)
        self.spans = 0

    def append(self, d: dict, n: int) -> None:
        if len(self.items) == self.items.maxlen:
            self.spans -= self.items[0][1]
        self.items.append((d, n))
        self.spans += n
        while self.spans > self.max_spans and len(self.items) > 1:
            self.spans -= self.items.popleft()[1]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[dict]:
        return (d for d, _ in self.items)

    def last(self, n: int) -> list[dict]:
        if n <= 0:
            return []
        return [d for d, _ in list(self.items)[-n:]]


class _Subscriber:
    __slots__ = ("send", "min_duration", "match", "dropped")

    def __init__(self, send: trio.MemorySendChannel, min_duration: float | None,
                 match: Callable[[dict], bool] | None) -> None:
        self.send = send
        self.min_duration = min_duration
        self.match = match
        self.dropped = 0


def tracing_enabled_from_env() -> bool:
    return os.environ.get("CACHEFS_TRACING", "1").strip().lower() not in ("0", "off", "false",
                                                                          "no")


class Tracer:
    def __init__(self, *, slow_threshold: float, recent: int = 256, slow: int = 1024,
                 node: str | None = None, recent_spans: int = 8192, slow_spans: int = 32768,
                 enabled: bool | None = None) -> None:
        self.slow_threshold = slow_threshold
        self.recent = _Ring(recent, recent_spans)
        self.slow = _Ring(slow, slow_spans)
        self.node = node or os.uname().nodename
        self.enabled = tracing_enabled_from_env() if enabled is None else enabled
        self._subscribers: list[_Subscriber] = []
        self._sinks: list[Callable[[dict], None]] = []
        self._pending: dict[int, tuple[_Trace, float]] = {}
        self.started = 0
        self.finished = 0
        self.slow_count = 0
        self.incomplete = 0
        self.dropped_spans = 0
        self.follower_drops = 0

    @contextlib.contextmanager
    def start(self, op: str, **attrs: Any) -> Iterator[Span]:
        if not self.enabled:
            # callers may still set attributes or read to_dict() of the root
            yield Span(op, attrs)
            return
        with self._root(op, attrs, False) as root:
            yield root

    def _continuation(self, prev: _Trace, op: str, attrs: dict) -> contextlib.AbstractContextManager:
        pa = prev.root.attrs
        attrs = {**{k: pa[k] for k in ("ino", "path", "offset", "size") if k in pa}, **attrs,
                 "continues": pa.get("trace_id")}
        return self._root(op, attrs, True)

    @contextlib.contextmanager
    def _root(self, op: str, attrs: dict, background: bool) -> Iterator[Span]:
        root = Span(op, attrs)
        tr = _Trace(self, root, background)
        root.trace = tr
        root.attrs["trace_id"] = f"{os.getpid():x}-{next(_ids):x}"
        token = _current.set(root)
        self.started += 1
        try:
            yield root
        except BaseException as e:
            root.attrs.setdefault("error", type(e).__name__)
            raise
        finally:
            root.end = time.perf_counter()
            _current.reset(token)
            tr.ended = True
            if tr.open == 0:
                self._complete(tr)
            else:
                self._defer(tr)

    # -- completion -------------------------------------------------------------------

    def _defer(self, tr: _Trace) -> None:
        now = time.monotonic()
        self._pending[id(tr)] = (tr, now)
        if len(self._pending) > PENDING_MAX or next(iter(self._pending.values()))[1] < \
                now - PENDING_MAX_AGE:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        for _key, (tr, t) in list(self._pending.items()):
            if len(self._pending) > PENDING_MAX or t < now - PENDING_MAX_AGE:
                self._complete(tr, incomplete=True)
            else:
                break

    def pending_for(self, pred: Callable[[dict], bool]) -> int:
        """Traces whose root has ended but whose background spans still run."""
        return sum(1 for tr, _ in self._pending.values() if pred(tr.root.attrs))

    def _complete(self, tr: _Trace, incomplete: bool = False) -> None:
        if tr.done:
            return
        tr.done = True
        tr.tracer = None
        self._pending.pop(id(tr), None)
        root = tr.root
        d = root.to_dict()
        d["node"] = self.node
        d["wall_time"] = time.time()
        d["start_time"] = d["wall_time"] - (time.perf_counter() - root.start)
        if tr.dropped:
            d["dropped_spans"] = tr.dropped
            self.dropped_spans += tr.dropped
        if incomplete:
            d["incomplete"] = True
            self.incomplete += 1
        self.finished += 1
        n = tr.nspans
        self.recent.append(d, n)
        if tr.background:
            d["background"] = True
        dur = root.duration
        slow = dur >= self.slow_threshold and not tr.background
        if slow:
            self.slow_count += 1
            self.slow.append(d, n)
        for sub in list(self._subscribers) if not tr.background else ():
            md = self.slow_threshold if sub.min_duration is None else sub.min_duration
            if dur < md or (sub.match is not None and not sub.match(d)):
                continue
            try:
                sub.send.send_nowait(d)
            except trio.WouldBlock:
                sub.dropped += 1
                self.follower_drops += 1  # a slow follower loses traces, never slows reads
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(sub)
        for sink in self._sinks:
            sink(d)

    # -- consumers --------------------------------------------------------------------

    def subscribe(self, min_duration: float | None = None,
                  match: Callable[[dict], bool] | None = None,
                  buffer: int = 1024) -> trio.MemoryReceiveChannel:
        """Finished traces at least ``min_duration`` long (default: the slow threshold)
        that ``match`` accepts, as they finish."""
        send, recv = trio.open_memory_channel(buffer)
        self._subscribers.append(_Subscriber(send, min_duration, match))
        return recv

    def unsubscribe(self, recv: trio.MemoryReceiveChannel) -> None:
        recv.close()
        # the matching send side is removed at its next delivery (BrokenResourceError)
        self._subscribers = [s for s in self._subscribers
                             if not _recv_closed(s.send)]

    def add_sink(self, fn: Callable[[dict], None]) -> None:
        """``fn(trace_dict)`` for every finished trace; must not block (e.g. OTLP queue)."""
        self._sinks.append(fn)

    def statistics(self) -> dict:
        return {"enabled": self.enabled, "started": self.started, "finished": self.finished,
                "slow": self.slow_count, "incomplete": self.incomplete,
                "pending": len(self._pending), "dropped_spans": self.dropped_spans,
                "follower_drops": self.follower_drops, "recent_kept": len(self.recent),
                "slow_kept": len(self.slow), "recent_spans_kept": self.recent.spans,
                "slow_spans_kept": self.slow.spans,
                "slow_threshold_ms": round(self.slow_threshold * 1000, 3)}


def _recv_closed(send: trio.MemorySendChannel) -> bool:
    try:
        st = send.statistics()
    except Exception:  # noqa: BLE001
        return False
    return st.open_receive_channels == 0
