"""Per-request tracing: spans across FUSE → chunk reader → peer → S3.

A trace starts at a FUSE request (``tracer.start(...)``).  Code below opens
child spans with ``span(name, **attrs)``; the current span travels in a
contextvar, so tasks started from a traced request (read-ahead, singleflight
leaders) attach their spans to the request that caused them.  Outside a trace
``span()`` costs one contextvar lookup and records nothing.

Finished traces go to two bounded rings: the most recent ones, and the slow
ones (total duration over the configured threshold).  Subscribers (``trace
--follow``) receive slow traces as they finish.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import deque
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import trio

_ids = itertools.count(1)
_current: ContextVar[Span | None] = ContextVar("cachefs_span", default=None)


class Span:
    __slots__ = ("name", "attrs", "start", "end", "children")

    def __init__(self, name: str, attrs: dict[str, Any]) -> None:
        self.name = name
        self.attrs = attrs
        self.start = time.perf_counter()
        self.end: float | None = None
        self.children: list[Span] = []

    def set(self, **attrs: Any) -> None:
        self.attrs.update(attrs)

    @property
    def duration(self) -> float:
        return (self.end if self.end is not None else time.perf_counter()) - self.start

    def to_dict(self, t0: float | None = None) -> dict:
        t0 = self.start if t0 is None else t0
        return {
            "name": self.name,
            "start_ms": round((self.start - t0) * 1000, 3),
            "duration_ms": round(self.duration * 1000, 3),
            **self.attrs,
            "spans": [c.to_dict(t0) for c in self.children],
        }


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
    s = Span(name, attrs)
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


def attach(spans: list[dict]) -> None:
    """Attach span dicts received from elsewhere (a peer's reply) to the current span."""
    parent = _current.get()
    if parent is None:
        return
    for d in spans:
        parent.children.append(_from_dict(d, parent.start))


def _from_dict(d: dict, base: float) -> Span:
    s = Span(str(d.get("name", "?")), {k: v for k, v in d.items()
                                       if k not in ("name", "start_ms", "duration_ms", "spans")})
    s.start = base + float(d.get("start_ms", 0)) / 1000
    s.end = s.start + float(d.get("duration_ms", 0)) / 1000
    s.children = [_from_dict(c, base) for c in d.get("spans", [])]
    return s


def current() -> Span | None:
    return _current.get()


class Tracer:
    def __init__(self, *, slow_threshold: float, recent: int = 256, slow: int = 1024,
                 node: str | None = None) -> None:
        self.slow_threshold = slow_threshold
        self.recent: deque[dict] = deque(maxlen=recent)
        self.slow: deque[dict] = deque(maxlen=slow)
        self.node = node or os.uname().nodename
        self._subscribers: list[trio.MemorySendChannel] = []
        self.started = 0

    @contextlib.contextmanager
    def start(self, op: str, **attrs: Any) -> Iterator[Span]:
        root = Span(op, attrs)
        tid = f"{os.getpid():x}-{next(_ids):x}"
        root.attrs["trace_id"] = tid
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
            self._finish(root)

    def _finish(self, root: Span) -> None:
        d = root.to_dict()
        d["node"] = self.node
        d["wall_time"] = time.time()
        self.recent.append(d)
        if root.duration >= self.slow_threshold:
            self.slow.append(d)
            for ch in list(self._subscribers):
                try:
                    ch.send_nowait(d)
                except trio.WouldBlock:
                    pass  # a slow follower loses traces rather than slowing reads
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers.remove(ch)

    def subscribe(self) -> trio.MemoryReceiveChannel:
        send, recv = trio.open_memory_channel(1024)
        self._subscribers.append(send)
        return recv

    def unsubscribe(self, recv: trio.MemoryReceiveChannel) -> None:
        recv.close()
