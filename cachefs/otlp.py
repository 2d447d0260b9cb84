"""Optional OTLP/HTTP JSON export of finished traces (off by default).

Configured with ``--otlp-endpoint URL`` (or ``CACHEFS_OTLP_ENDPOINT``): finished
traces are POSTed as ``ExportTraceServiceRequest`` JSON to ``URL/v1/traces``
(unless URL already ends with ``/v1/traces``) by one background task, with httpx.

The tracer hands each finished trace to ``offer()``, which never blocks: the
queue holds at most ``QUEUE`` traces and drops new ones when full (counted in
``dropped``).  The task sends batches of up to ``BATCH`` traces; a failed POST
is counted and the batch dropped (no retry storm against a collector that is
down).  Nothing in the daemon waits on the collector.

The URL may carry credentials (``https://user:pass@collector``): it is never
logged or reported with them (``redact``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio

from .control import dumps_in_pieces

log = logging.getLogger("cachefs.otlp")

QUEUE = 1024
BATCH = 64
TIMEOUT = 10.0


def redact(url: str) -> str:
    try:
        u = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if u.username or u.password:
        host = u.hostname or ""
        if u.port:
            host += f":{u.port}"
        u = u._replace(netloc=host)
    return urlunsplit(u._replace(query="", fragment=""))


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of an endpoint: ``/v1/traces`` joins its path, never its
    query (``https://collector:4318?api_key=...`` keeps its key)."""
    u = urlsplit(endpoint)
    path = u.path.rstrip("/")
    if not path.endswith("/v1/traces"):
        path += "/v1/traces"
    return urlunsplit(u._replace(path=path))


def _value(v: Any) -> dict:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v} if math.isfinite(v) else {"stringValue": str(v)}
    return {"stringValue": str(v)}


_SKIP = {"name", "start_ms", "duration_ms", "spans", "wall_time", "start_time", "trace_id"}


def _ns(ms: Any) -> int:
    """Milliseconds (from a span, maybe a peer's) as whole nanoseconds; 0 if not finite."""
    try:
        v = float(ms) * 1e6
    except (TypeError, ValueError):
        return 0
    return int(v) if math.isfinite(v) else 0


def trace_id(run_id: str, cachefs_trace: str) -> str:
    """The OTLP trace id of a cachefs trace of the process whose tracer's ``run_id`` it is."""
    return hashlib.sha256(f"{run_id}/{cachefs_trace}".encode()).hexdigest()[:32]


_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")


def _is_span_id(s: Any) -> bool:
    return isinstance(s, str) and _SPAN_ID.fullmatch(s) is not None


def is_parent(trace: Any, span: Any) -> bool:
    """Are these an OTLP trace id and span id (32 and 16 lowercase hex digits), as a peer
    request names the requester's trace and span?"""
    return isinstance(trace, str) and _TRACE_ID.fullmatch(trace) is not None \
        and _is_span_id(span)


def linked(run_id: str, attrs: Mapping[str, Any], cachefs_trace: Any
           ) -> tuple[str, str | None]:
    """The OTLP trace id a trace is exported under, and its root's parent span, from the
    root's attributes and the trace's cachefs id: a peer.serve goes under the requester's
    ``peer`` span, in the requester's trace; read-ahead that outlived its read, in the
    read's trace; any other trace is its own ("" without ``run_id``: a random one)."""
    pt, ps = attrs.get("parent_trace"), attrs.get("parent_span")
    if is_parent(pt, ps):
        return pt, ps
    of = attrs.get("continues") or cachefs_trace
    return (trace_id(run_id, str(of)) if run_id and of else ""), None


def to_otlp(traces: list[dict], node: str, run_id: str = "") -> dict:
    """Our trace dicts → an OTLP ExportTraceServiceRequest (JSON encoding).  ``run_id``: the
    tracer's (its trace ids name OTLP traces the same way the peer requests it sent did).

    Each node exports the spans it ran: a ``peer.serve`` a peer sent back inside its
    answer is left to that peer's export, which puts it under this node's ``peer`` span
    (the requester sends that span's id, kept as ``span_id``); exported by both, a peer's
    S3 GET was counted twice."""
    spans: list[dict] = []
    for t in traces:
        tid, root_parent = linked(run_id, t, t.get("trace_id"))
        tid = tid or secrets.token_hex(16)
        base_ns = _ns(t.get("start_time", t.get("wall_time", 0))) * 1000

        def walk(s: dict, parent: str | None, root: bool, tid=tid, base_ns=base_ns) -> None:
            sid = s.get("span_id")
            if not _is_span_id(sid):
                sid = secrets.token_hex(8)
            start = base_ns + _ns(s.get("start_ms", 0))
            end = start + _ns(s.get("duration_ms", 0))
            attrs = [{"key": f"cachefs.{k}", "value": _value(v)} for k, v in s.items()
                     if k not in _SKIP and isinstance(v, (str, int, float, bool))]
            if root and "trace_id" in s:
                attrs.append({"key": "cachefs.trace_id", "value": _value(s["trace_id"])})
            name = str(s.get("name", "?"))
            out = {"traceId": tid, "spanId": sid, "name": name,
                   "kind": 2 if root else 1,  # SERVER for the request, INTERNAL below
                   "startTimeUnixNano": str(start), "endTimeUnixNano": str(end),
                   "attributes": attrs,
                   "status": {"code": 2, "message": str(s["error"])} if s.get("error")
                   else {"code": 0}}
            if parent is not None:
                out["parentSpanId"] = parent
            spans.append(out)
            for c in s.get("spans", ()):
                if name in ("peer", "peer.handoff") and c.get("name") == "peer.serve":
                    continue  # the peer's own, exported by the peer
                walk(c, sid, False)

        walk(t, root_parent, True)
    return {"resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "cachefs"}},
            {"key": "service.instance.id", "value": {"stringValue": node}},
            {"key": "host.name", "value": {"stringValue": os.uname().nodename}},
        ]},
        "scopeSpans": [{"scope": {"name": "cachefs.trace"}, "spans": spans}],
    }]}


class OTLPExporter:
    def __init__(self, endpoint: str, *, service_node: str, run_id: str = "",
                 queue: int = QUEUE) -> None:
        self.url = traces_url(endpoint)
        self.node = service_node
        self.run_id = run_id  # the tracer's (trace ids the same as its peer requests gave)
        self._send, self._recv = trio.open_memory_channel(queue)
        self.exported = 0
        self.dropped = 0
        self.off = False  # no HTTP client could be made: every trace is dropped
        self.failed_posts = 0
        self.posts = 0
        self.encode_errors = 0
        self._limiter = trio.CapacityLimiter(1)
        self.on_off: Callable[[], None] | None = None  # called when export turns off

    def offer(self, trace) -> None:
        """Called by the tracer for every recorded trace (a trace.``RootSpan``)."""
        if self.off:
            self.dropped += 1
            return
        if getattr(trace, "incomplete", False):
            # its open spans may still change: a snapshot now, not in the encoding thread
            # (which then failed, and the whole batch of 64 was dropped)
            trace = trace.dict()
        try:
            self._send.send_nowait(trace)
        except trio.WouldBlock:
            self.dropped += 1

    async def run(self) -> None:
        import httpx

        try:
            client = httpx.AsyncClient(timeout=TIMEOUT)
        except Exception as e:  # noqa: BLE001 - a proxy setting it cannot use, say: the
            # mount serves on, without export (counted as dropped traces from here on)
            log.error("OTLP: export to %s is off: %s: %s", redact(self.url),
                      type(e).__name__, e)
            self.off = True
            if self.on_off is not None:  # no longer a sink: reads take the fast path again
                self.on_off()
            while True:
                try:
                    self._recv.receive_nowait()
                except trio.WouldBlock:
                    return
                self.dropped += 1
        log.info("OTLP: exporting traces to %s", redact(self.url))
        async with client:
            async for first in self._recv:
                batch = [first]
                while len(batch) < BATCH:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                try:  # off the trio thread: tens of ms for a batch of cold traces
                    body = await trio.to_thread.run_sync(self._encode, batch,
                                                         limiter=self._limiter)
                except Exception:  # a bug, or a value JSON cannot carry: this batch only
                    self.encode_errors += 1
                    self.dropped += len(batch)
                    if self.encode_errors in (1, 10, 100) or self.encode_errors % 1000 == 0:
                        log.exception("OTLP: a batch of traces could not be encoded")
                    continue
                self.posts += 1
                try:
                    r = await client.post(self.url, content=body,
                                          headers={"Content-Type": "application/json"})
                    if r.status_code >= 300:
                        raise httpx.HTTPStatusError(f"status {r.status_code}", request=r.request,
                                                    response=r)
                except Exception as e:  # noqa: BLE001 - export is best effort
                    self.failed_posts += 1
                    self.dropped += len(batch)
                    # the exception text may quote the URL: name the type only
                    if self.failed_posts in (1, 10, 100) or self.failed_posts % 1000 == 0:
                        log.warning("OTLP: export to %s failed (%s); %d batch(es) dropped so "
                                    "far", redact(self.url), type(e).__name__, self.failed_posts)
                    continue
                self.exported += len(batch)
                log.debug("OTLP: exported %d trace(s) to %s", len(batch), redact(self.url))

    def _encode(self, batch: list) -> bytes:
        """A batch of recorded traces as the POST's body (in a worker thread).  A trace
        recorded incomplete (its read-ahead still running after 60 s) may still change
        meanwhile: the encoding then fails and the batch is dropped, counted."""
        return dumps_in_pieces(to_otlp([t if isinstance(t, dict) else t.dict() for t in batch],
                                       self.node, self.run_id), allow_nan=False).encode()

    def statistics(self) -> dict:
        return {"url": redact(self.url), "off": self.off, "exported": self.exported,
                "dropped": self.dropped,
                "posts": self.posts, "failed_posts": self.failed_posts,
                "encode_errors": self.encode_errors}
