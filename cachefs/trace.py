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
    256 + 1024 traces and 8,192 + 32,768 spans (each about 0.5 KiB),
    i.e. about 20 MiB in the worst case.  The reads of a QuickRun are counted when
    the run ends (or when the totals are asked for), so the recent ring may hold
    up to RUN_MAX - 1 more reads per file being read.

Cost: a read its handle serves from the chunk it holds, starting nothing (a warm
sequential reader's usual request), is recorded without a task switch in its handle's
QuickRun, two floats appended to an array (``Tracer.quick_read``, while no follower
or sink takes every trace); any other request records a RootSpan, and a read-ahead hit's
leaf() tuple; recording it is one call (``_record``) and a deque append, and a
recorded trace holds no reference cycle (children point at the root while the
trace is built and at a _Done once it is recorded).  A trace becomes a dict when somebody asks for
it (``trace --recent``, a follower, a capture, the OTLP exporter).  Measured
by bench/bench_tracing.py (see docs/tracing.md).

``CACHEFS_TRACING=0`` in the daemon's environment turns tracing off (for
benchmarks): ``start`` then records nothing and ``span`` finds no trace.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import trio

_current: ContextVar[Span | None] = ContextVar("cachefs_span", default=None)
_get = _current.get
_now = time.perf_counter

log = logging.getLogger("cachefs.trace")

MAX_SPANS = 256
MAX_ATTR = 512
MAX_PEER_ATTRS = 32  # attributes kept of a span a peer sends (ours have a dozen at most)
PENDING_MAX = 1024
PENDING_MAX_AGE = 60.0
RUN_MAX = 64  # quick reads one QuickRun holds (a chunk of 8 MiB in 128 KiB requests)
RUN_TIMES = 2 * RUN_MAX


def _error(et: type[BaseException], e: BaseException | None) -> str:
    """A span's ``error``: the errno name of an error that carries one (a FUSE reply's
    ``EIO``: the daemon's own exception class would say nothing to a user), else the
    exception's type name (``S3Error``, ``ObjectChanged``)."""
    code = getattr(e, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return et.__name__


def _cut(v: Any) -> Any:
    if isinstance(v, str) and len(v) > MAX_ATTR:
        return v[:MAX_ATTR] + "…"
    return v


class Span:
    """A timed operation; also its own context manager (``with span(...) as s``).

    ``root`` is the RootSpan of the trace the span belongs to while that trace is
    being built, a _Done once it is recorded, None outside any trace."""

    __slots__ = ("name", "attrs", "start", "end", "children", "root", "_token")

    def __init__(self, name: str, attrs: dict[str, Any], root: Any = None) -> None:
        self.name = name
        self.attrs = attrs
        self.start = _now()
        self.end: float | None = None
        # created on the first child; a leaf() child is kept in its frozen (tuple) form
        self.children: list[Span | tuple] | None = None
        self.root = root

    def set(self, **attrs: Any) -> None:
        self.attrs.update(attrs)

    @property
    def duration(self) -> float:
        return (self.end if self.end is not None else _now()) - self.start

    def __enter__(self) -> Span:
        self._token = _current.set(self)
        return self

    def __exit__(self, et, e, tb) -> bool:
        self.end = _now()
        if et is not None:
            self.attrs.setdefault("error", _error(et, e))
        _current.reset(self._token)
        # the token holds the parent span, which holds this span among its children: drop
        # it, or every traced request leaves a reference cycle for the garbage collector
        self._token = None
        r = self.root
        if r is None:
            if type(self) is RootSpan:  # the root of a trace: recorded now or once its
                self.ended = True  # background spans (read-ahead) have ended
                if not self.done:
                    if self.open == 0:
                        self.owner._record(self)
                    else:
                        self.owner._defer(self)
        elif not r.done:
            r.open -= 1
            if r.open == 0 and r.ended:
                r.owner._record(r)
        return False

    def to_dict(self, t0: float | None = None) -> dict:
        return _span_dict(self.name, self.start, self.end, self.attrs, self.children,
                          self.start if t0 is None else t0)

    def add(self, child: Span) -> None:
        if self.children is None:
            self.children = [child]
        else:
            self.children.append(child)


class RootSpan(Span):
    """The root span of a recorded trace, and the trace's book-keeping.

    Child spans point at their RootSpan while the trace is built; once it is recorded
    (``_seal``) they point at a _Done instead, so a recorded trace holds no reference
    cycle and is freed by reference counting when the rings let it go.  The rings keep
    RootSpans; the JSON form is built on first use (``dict()``)."""

    __slots__ = ("owner", "seq", "open", "nspans", "dropped", "ended", "done", "background",
                 "incomplete", "nested", "recorded", "_dict")
    ntraces = 1

    def __init__(self, owner: Tracer, name: str, attrs: dict[str, Any], seq: int,
                 background: bool = False) -> None:
        self.name = name
        self.attrs = attrs
        self.start = _now()
        self.end = None
        self.children = None
        self.root = None
        self.owner = owner
        self.seq = seq
        self.open = 0  # spans opened under the root that have not ended
        self.nspans = 1
        self.dropped = 0
        self.ended = False  # the root has ended
        self.done = False  # recorded
        self.background = background  # a continuation: not a request, never "slow"
        self.incomplete = False
        self.nested = False  # holds Span objects (not only leaf() tuples): _seal walks them
        self.recorded = 0.0  # when it was recorded (the order of the recent ring)
        self._dict: dict | None = None

    @property
    def trace_id(self) -> str:
        return f"{self.owner.pid_hex}-{self.seq:x}"

    def to_dict(self, t0: float | None = None) -> dict:
        d = super().to_dict(t0)
        d["trace_id"] = self.trace_id
        return d

    def dict(self) -> dict:
        """The recorded trace as JSON-ready data (built once, then cached)."""
        d = self._dict
        if d is None:
            self._dict = d = _recorded_dict(self, self.to_dict())
        return d


def _recorded_dict(root: RootSpan | QuickRead, d: dict) -> dict:
    """A recorded trace's JSON form: its spans' ``d`` and what names the trace."""
    d["node"] = root.owner.node
    end = root.end if root.end is not None else _now()
    wall_end = end + (time.time() - _now())
    d["wall_time"] = wall_end
    d["start_time"] = wall_end - (end - root.start)
    if root.dropped:
        d["dropped_spans"] = root.dropped
    if root.incomplete:
        d["incomplete"] = True
    if root.background:
        d["background"] = True
    return d


class QuickRead:
    """A recorded read that its handle served from the chunk it holds, starting nothing (a
    warm sequential reader's usual request): the trace a RootSpan with one ``leaf("chunk",
    tier="readahead")`` child records, as one object of plain fields.  Such reads are kept
    in QuickRuns and made QuickReads when somebody asks for them (or for the slow ring)."""

    __slots__ = ("owner", "seq", "start", "end", "ino", "path", "offset", "size", "pid",
                 "chunk", "nbytes", "_dict")
    name = "read"
    nspans = 2
    ntraces = 1
    dropped = 0
    done = True
    incomplete = False
    background = False

    def __init__(self, owner: Tracer, seq: int, start: float, ino: int, path: str,
                 offset: int, size: int, pid: int, chunk: int, nbytes: int,
                 end: float) -> None:
        self.owner, self.seq, self.start, self.end = owner, seq, start, end
        self.ino, self.path, self.offset, self.size, self.pid = ino, path, offset, size, pid
        self.chunk, self.nbytes = chunk, nbytes
        self._dict: dict | None = None

    @property
    def attrs(self) -> dict[str, Any]:
        return {"ino": self.ino, "path": self.path, "offset": self.offset, "size": self.size,
                "pid": self.pid}

    @property
    def recorded(self) -> float:
        return self.end

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def trace_id(self) -> str:
        return f"{self.owner.pid_hex}-{self.seq:x}"

    def dict(self) -> dict:
        d = self._dict
        if d is None:
            kid = ("chunk", self.start, self.start,
                   {"chunk": self.chunk, "tier": "readahead", "bytes": self.nbytes}, ())
            d = _span_dict("read", self.start, self.end, self.attrs, [kid], self.start)
            d["trace_id"] = self.trace_id
            self._dict = d = _recorded_dict(self, d)
        return d


class QuickRun:
    """The quick reads (QuickRead) of one handle in a row: requests of one size at
    contiguous offsets, from one chunk.  A warm sequential reader's requests cost the
    daemon 50-100 us each, and each object or counter a request touches shows in that
    (bench/README.md): a read adds its start and end to one array and moves ``next_off``,
    nothing else.  The run goes into the recent ring with its first read (the ring's order,
    and what leaves it first, is that of first reads); its reads are counted, in the ring
    and in the tracer's totals, when the run ends (its handle's next other read, its
    release, RUN_MAX reads) or when somebody asks for the totals (``Tracer._settle``).
    ``kept``: still in the ring (the ring let go of it when it was the oldest);
    ``counted``: its reads counted so far; ``nbytes``: the chunk's length."""

    __slots__ = ("owner", "ino", "path", "pid", "chunk", "offset", "next_off", "size",
                 "nbytes", "seq0", "times", "counted", "kept")

    def __init__(self, owner: Tracer, ino: int, path: str, pid: int, chunk: int,
                 offset: int, size: int, nbytes: int, seq0: int) -> None:
        self.owner, self.ino, self.path, self.pid, self.chunk = owner, ino, path, pid, chunk
        self.offset = self.next_off = offset
        self.size, self.nbytes = size, nbytes
        self.seq0 = seq0  # its reads' trace ids: seq0, seq0 + 1, ... (RUN_MAX reserved)
        self.times = array("d")  # start, end of each read
        self.counted = 0
        self.kept = True

    @property
    def ntraces(self) -> int:  # (what the ring has counted of it)
        return self.counted

    @property
    def nspans(self) -> int:
        return 2 * self.counted

    def reads(self) -> list[QuickRead]:
        t = self.times
        n = len(t) >> 1
        out = []
        off, size = self.offset, self.size
        for i in range(n):
            out.append(QuickRead(self.owner, self.seq0 + i, t[2 * i], self.ino, self.path,
                                 off, size, self.pid, self.chunk, self.nbytes, t[2 * i + 1]))
            off += size
        return out


class _Done:
    """What the spans of a recorded trace point at: enough to name the trace that a late
    task continues (``continues``), and nothing that leads back to the spans."""

    __slots__ = ("owner", "attrs", "trace_id")
    done = True

    def __init__(self, root: RootSpan) -> None:
        self.owner = root.owner
        self.attrs = root.attrs
        self.trace_id = root.trace_id


def _seal(s: Span, done: _Done) -> None:
    for c in s.children or ():
        if type(c) is not tuple:
            c.root = done
            _seal(c, done)


def _span_dict(name: str, start: float, end: float | None, attrs: dict[str, Any],
               kids: list | tuple | None, t0: float) -> dict:
    """The JSON form of a span, or of a leaf() tuple (name, start, end, attrs, ())."""
    d = {"name": name, "start_ms": round((start - t0) * 1000, 3),
         "duration_ms": round(((end if end is not None else _now()) - start) * 1000, 3)}
    for k, v in attrs.items():
        d[k] = _cut(v)
    if end is None:
        d["open"] = True
    d["spans"] = [_span_dict(*c, t0) if type(c) is tuple else c.to_dict(t0)
                  for c in kids or ()]
    return d


class _NullSpan:
    """What ``span()`` gives outside a trace: a no-op span and context manager."""

    __slots__ = ()

    def set(self, **attrs: Any) -> None:
        pass

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(self, et, e, tb) -> bool:
        return False


NULL_SPAN = _NullSpan()


class _Detached:
    """Tracer.start with tracing off: a root span nobody records or inherits."""

    __slots__ = ("span",)

    def __init__(self, s: Span) -> None:
        self.span = s

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, et, e, tb) -> bool:
        self.span.end = _now()
        if et is not None:
            self.span.attrs.setdefault("error", _error(et, e))
        return False


def span(name: str, **attrs: Any) -> Span | _NullSpan:
    """A child span of the current span; use as ``with span("s3.get", key=k) as sp:``."""
    parent = _get()
    if parent is None:
        return NULL_SPAN
    tr = parent.root or parent  # a current span is a RootSpan or has a root
    if tr.done:
        # The trace was recorded already: a task it started (read-ahead) opened its
        # first span only after the request returned.  Record it as a trace of its
        # own that names the request it continues.
        return tr.owner._continuation(tr, name, attrs)
    if tr.nspans >= MAX_SPANS:
        tr.dropped += 1
        return NULL_SPAN
    tr.nspans += 1
    tr.open += 1
    tr.nested = True
    s = Span(name, attrs, tr)
    parent.add(s)
    return s


def leaf(name: str, **attrs: Any) -> None:
    """Record an instant child span of the current span that has no children of its own
    (a chunk served from memory): no context manager, no Span object, about a third of
    what ``with span(...): pass`` costs on the hottest path (a read-ahead hit)."""
    parent = _get()
    if parent is None:
        return
    tr = parent.root or parent
    if tr.done:
        with tr.owner._continuation(tr, name, attrs):
            return
    if tr.nspans >= MAX_SPANS:
        tr.dropped += 1
        return
    tr.nspans += 1
    t = _now()
    kid = (name, t, t, attrs, ())  # the form _span_dict reads
    kids = parent.children  # Span.add inlined: this is the read-ahead hit's hot path
    if kids is None:
        parent.children = [kid]  # type: ignore[list-item]
    else:
        kids.append(kid)  # type: ignore[arg-type]


def attach(spans: list[dict]) -> None:
    """Attach span dicts received from elsewhere (a peer's reply) to the current span."""
    parent = _get()
    if parent is None:
        return
    tr = parent.root or parent
    if tr.done:
        return  # the trace was recorded (given up on) while the reply was on its way
    tr.nested = True
    for d in spans:
        if not isinstance(d, dict):
            continue
        s = _from_dict(d, parent.start, tr)
        if s is not None:
            parent.add(s)


def _from_dict(d: dict, base: float, tr: RootSpan) -> Span | None:
    if tr.nspans >= MAX_SPANS:
        tr.dropped += 1
        return None
    tr.nspans += 1
    attrs = {}
    for k, v in d.items():  # a peer's: bounded like our own, and JSON that any parser reads
        if len(attrs) >= MAX_PEER_ATTRS:
            break
        if (isinstance(k, str) and k not in ("name", "start_ms", "duration_ms", "spans")
                and isinstance(v, (str, int, float, bool))
                and not (isinstance(v, float) and not math.isfinite(v))):
            attrs[_cut(k)] = _cut(v)
    s = Span(_cut(str(d.get("name", "?"))), attrs, tr)
    s.start = base + _finite_ms(d.get("start_ms")) / 1000
    s.end = s.start + max(0.0, _finite_ms(d.get("duration_ms"))) / 1000
    kids = d.get("spans", [])
    if isinstance(kids, list):
        for c in kids:
            if isinstance(c, dict):
                k = _from_dict(c, base, tr)
                if k is not None:
                    s.add(k)
    return s


def _finite_ms(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return f if math.isfinite(f) and abs(f) < 1e9 else 0.0


def current() -> Span | None:
    return _get()


def root() -> RootSpan | None:
    """The root span of the trace being built here, if any."""
    sp = _get()
    if sp is None:
        return None
    r = sp if sp.root is None else sp.root
    return r if isinstance(r, RootSpan) else None


class _Ring:
    """Recorded traces, oldest first, bounded in traces and in spans (a QuickRun counts as
    its reads, and is let go of as a whole)."""

    def __init__(self, max_traces: int, max_spans: int) -> None:
        self.max_traces = max_traces
        self.max_spans = max_spans
        self.items: deque[RootSpan | QuickRead | QuickRun] = deque()
        self.spans = 0
        self.traces = 0

    def append(self, tr: RootSpan | QuickRead | QuickRun) -> None:
        self.items.append(tr)
        self.count(tr.ntraces, tr.nspans)

    def count(self, traces: int, spans: int) -> None:
        """Traces and spans of its items added (a QuickRun's reads, as it counts them)."""
        self.traces += traces
        self.spans += spans
        if self.traces > self.max_traces or self.spans > self.max_spans:
            self.trim()

    def trim(self) -> None:
        items = self.items
        while (self.traces > self.max_traces or self.spans > self.max_spans) and \
                len(items) > 1:
            t = items.popleft()
            self.spans -= t.nspans
            self.traces -= t.ntraces
            if type(t) is QuickRun:
                t.kept = False  # (its handle's next quick read starts a new run)

    def __len__(self) -> int:
        return self.traces

    def __iter__(self) -> Iterator[dict]:
        return (t.dict() for t in self.roots())

    def roots(self) -> list[RootSpan | QuickRead]:
        """The traces, in the order they were recorded (a run's reads among the others)."""
        out: list[RootSpan | QuickRead] = []
        runs = False
        for t in list(self.items):
            if type(t) is QuickRun:
                out += t.reads()
                runs = True
            else:
                out.append(t)  # type: ignore[arg-type]
        if runs:
            out.sort(key=_recorded_at)
        return out

    def last(self, n: int) -> list[dict]:
        if n <= 0:
            return []
        return [t.dict() for t in self.roots()[-n:]]


def _recorded_at(t: RootSpan | QuickRead) -> float:
    return t.recorded


# what a follower hears in place of the traces it lost (a slow reader): {LOST: n}
LOST = "lost_traces"


class _Subscriber:
    __slots__ = ("send", "min_duration", "match", "dropped", "told", "buffer")

    def __init__(self, send: trio.MemorySendChannel, min_duration: float | None,
                 match: Callable[[dict], bool] | None, buffer: int) -> None:
        self.send = send
        self.buffer = buffer
        self.min_duration = min_duration
        self.match = match
        self.dropped = 0
        self.told = 0  # of the dropped, those the follower was told of


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
        self.pid_hex = f"{os.getpid():x}"
        # this process's: trace ids repeat across restarts (a daemon that is PID 1 of its
        # container counts from 1 each time), the OTLP ids made from them must not
        self.run_id = secrets.token_hex(8)
        self.enabled = tracing_enabled_from_env() if enabled is None else enabled
        self._subscribers: list[_Subscriber] = []
        self._sinks: list[Callable[[RootSpan], None]] = []
        self._pending: dict[int, tuple[RootSpan, float]] = {}
        self._runs: dict[int, QuickRun] = {}  # file handle -> its open QuickRun
        self._seq = 0  # the last trace id given (a QuickRun takes RUN_MAX at once)
        self.started = 0
        self.finished = 0
        self.slow_count = 0
        self.incomplete = 0
        self.dropped_spans = 0
        self.follower_drops = 0

    def start(self, op: str, **attrs: Any) -> RootSpan | _Detached:
        """The root span of a new trace: ``with tracer.start("read", ino=...) as root:``."""
        if not self.enabled:
            # callers may still set attributes or read to_dict() of the root
            return _Detached(Span(op, attrs))
        self.started += 1
        self._seq = n = self._seq + 1
        return RootSpan(self, op, attrs, n)

    @property
    def quick(self) -> bool:
        """May a read served from its handle's buffer be recorded as a QuickRead?  Not
        while a follower or a sink (a capture, the OTLP exporter) takes every trace."""
        return not (self._subscribers or self._sinks)

    def quick_read(self, fh: int, start: float, end: float, offset: int, size: int,
                   chunk: int) -> bool:
        """Record such a read of handle fh (``start``, ``end``: its perf_counter times) in
        the handle's open QuickRun.  False when it has none that this read continues: then
        ``quick_read_new`` records it (the caller names the file only then)."""
        if not self.enabled:
            return True
        r = self._runs.get(fh)
        if (r is None or r.next_off != offset or r.size != size or r.chunk != chunk
                or not r.kept or len(r.times) >= RUN_TIMES):
            return False
        t = r.times
        t.append(start)
        t.append(end)
        r.next_off = offset + size
        if end - start >= self.slow_threshold:
            self._slow_quick(r, start, end, offset)
        return True

    def quick_read_new(self, fh: int, start: float, end: float, offset: int, size: int,
                       chunk: int, nbytes: int, ino: int, path: str, pid: int) -> None:
        """``quick_read`` of a read that opens a new run of handle fh (``nbytes``: the
        length of the chunk it reads from)."""
        old = self._runs.get(fh)
        if old is not None:
            self._settle(old)
        seq0 = self._seq + 1
        self._seq += RUN_MAX
        r = self._runs[fh] = QuickRun(self, ino, path, pid, chunk, offset, size, nbytes, seq0)
        self.recent.append(r)  # (no reads counted yet)
        self.quick_read(fh, start, end, offset, size, chunk)

    def _slow_quick(self, r: QuickRun, start: float, end: float, offset: int) -> None:
        self.slow_count += 1
        seq = r.seq0 + (len(r.times) >> 1) - 1
        self.slow.append(QuickRead(self, seq, start, r.ino, r.path, offset, r.size, r.pid,
                                   r.chunk, r.nbytes, end))

    def _settle(self, r: QuickRun) -> None:
        """Count the reads of run r not counted yet: in the totals, and in the recent ring
        while it holds r (which may then let go of its oldest traces)."""
        d = (len(r.times) >> 1) - r.counted
        if not d:
            return
        r.counted += d
        self.started += d
        self.finished += d
        if r.kept:
            self.recent.count(d, 2 * d)

    def end_quick(self, fh: int) -> None:
        """Handle fh's run of quick reads ends (another kind of read, its release)."""
        if self._runs:
            r = self._runs.pop(fh, None)
            if r is not None:
                self._settle(r)

    def _continuation(self, prev: RootSpan | _Done, op: str, attrs: dict) -> RootSpan:
        pa = prev.attrs
        attrs = {**{k: pa[k] for k in ("ino", "path", "offset", "size", "parent_trace",
                                       "parent_span") if k in pa}, **attrs,
                 "continues": prev.trace_id}
        self.started += 1
        self._seq = n = self._seq + 1
        return RootSpan(self, op, attrs, n, background=True)

    # -- completion -------------------------------------------------------------------

    def _defer(self, root: RootSpan) -> None:
        now = time.monotonic()
        self._pending[id(root)] = (root, now)
        if len(self._pending) > PENDING_MAX or next(iter(self._pending.values()))[1] < \
                now - PENDING_MAX_AGE:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        for root, t in list(self._pending.values()):
            if len(self._pending) > PENDING_MAX or t < now - PENDING_MAX_AGE:
                self._record(root, incomplete=True)
            else:
                break

    def sweep(self) -> None:
        if self._pending:
            self._sweep(time.monotonic())

    def pending_for(self, pred: Callable[[RootSpan], bool]) -> int:
        """Traces whose root has ended but whose background spans still run."""
        return sum(1 for root, _ in self._pending.values() if pred(root))

    def _record(self, root: RootSpan, incomplete: bool = False) -> None:
        """Keep a finished trace: the recent ring, the slow ring if slow, followers,
        sinks.  The hot path (a warm read: a root and leaf() children) runs no loop and
        calls nothing but the ring."""
        if root.done:
            return
        root.done = True
        if self._pending:
            self._pending.pop(id(root), None)
        if root.nested:
            _seal(root, _Done(root))
        if root.dropped:
            self.dropped_spans += root.dropped
        if incomplete:
            root.incomplete = True
            self.incomplete += 1
        self.finished += 1
        root.recorded = _now()
        self.recent.append(root)
        if not root.background:
            dur = root.end - root.start  # type: ignore[operator]
            if dur >= self.slow_threshold:
                self.slow_count += 1
                self.slow.append(root)
            if self._subscribers:
                self._deliver(root, dur)
        if self._sinks:
            for sink in list(self._sinks):
                try:
                    sink(root)
                except Exception:  # a bug there must not fail the read this trace was
                    log.exception("trace sink %r failed: removed", sink)
                    self.remove_sink(sink)

    def _deliver(self, tr: RootSpan, dur: float) -> None:
        for sub in list(self._subscribers):
            md = self.slow_threshold if sub.min_duration is None else sub.min_duration
            if dur < md:
                continue
            full = sub.send.statistics().current_buffer_used >= sub.buffer
            if full and sub.match is None:
                sub.dropped += 1  # (a follower that reads nothing: no dict made for it)
                self.follower_drops += 1
                continue
            d = tr.dict()
            try:
                if sub.match is not None and not sub.match(d):
                    continue  # (not one it asked for: not counted as lost either)
            except Exception:  # a bug there must not fail the read this trace was
                log.exception("trace follower's filter failed: the follower is dropped")
                sub.send.close()
                self._subscribers.remove(sub)
                continue
            try:
                if sub.dropped > sub.told:  # first, that traces went missing (LOST)
                    sub.send.send_nowait({LOST: sub.dropped - sub.told})
                    sub.told = sub.dropped
                sub.send.send_nowait(d)
            except trio.WouldBlock:
                sub.dropped += 1
                self.follower_drops += 1  # a slow follower loses traces, never slows reads
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(sub)

    # -- consumers --------------------------------------------------------------------

    def subscribe(self, min_duration: float | None = None,
                  match: Callable[[dict], bool] | None = None,
                  buffer: int = 1024) -> trio.MemoryReceiveChannel:
        """Recorded traces at least ``min_duration`` long (default: the slow threshold)
        that ``match`` accepts, as dicts, as they are recorded (continuations excluded)."""
        send, recv = trio.open_memory_channel(buffer)
        self._subscribers.append(_Subscriber(send, min_duration, match, buffer))
        return recv

    def unsubscribe(self, recv: trio.MemoryReceiveChannel) -> None:
        recv.close()
        self._subscribers = [s for s in self._subscribers if not _recv_closed(s.send)]

    def add_sink(self, fn: Callable[[RootSpan], None]) -> None:
        """``fn(trace)`` for every recorded trace (``trace.attrs`` is the root's attributes,
        ``trace.dict()`` the whole trace); must be quick and never block."""
        self._sinks.append(fn)

    def remove_sink(self, fn: Callable[[RootSpan], None]) -> None:
        if fn in self._sinks:
            self._sinks.remove(fn)

    def statistics(self) -> dict:
        for r in self._runs.values():  # (the reads of runs still open)
            self._settle(r)
        return {"enabled": self.enabled, "started": self.started, "finished": self.finished,
                "slow": self.slow_count, "incomplete": self.incomplete,
                "pending": len(self._pending), "dropped_spans": self.dropped_spans,
                "follower_drops": self.follower_drops, "followers": len(self._subscribers),
                "recent_kept": len(self.recent),
                "slow_kept": len(self.slow), "recent_spans_kept": self.recent.spans,
                "slow_spans_kept": self.slow.spans,
                "slow_threshold_ms": round(self.slow_threshold * 1000, 3)}


def _recv_closed(send: trio.MemorySendChannel) -> bool:
    try:
        st = send.statistics()
    except Exception:  # noqa: BLE001
        return False
    return st.open_receive_channels == 0
