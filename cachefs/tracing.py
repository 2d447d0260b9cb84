"""Daemon side of `cachefs trace`: control ops over the Tracer (trace.py).

Ops (JSON lines on the control socket, see control.py):

  trace_recent   {n, slow, slower_than, path_prefix}   → {"traces": [...]} (oldest first)
  trace_follow   {slower_than, path_prefix}            → one ``{"trace": {...}}`` event per
                 finished trace at least ``slower_than`` seconds long (default: the daemon's
                 slow threshold), and ``{"lost_traces": n}`` before the next one when n
                 were dropped (the client read too slowly); runs until the client hangs up
  trace_capture_start {ino, offset, length}            → {"capture": id}: from now on, every
                 finished trace of a FUSE read of inode ``ino`` overlapping the byte range is
                 kept for this capture (at most MAX_CAPTURED; it expires CAPTURE_TTL seconds
                 after its start or its last trace, once another capture starts)
  trace_capture_stop  {capture, wait}                  → {"traces": [...]} once the traces of
                 the capture have finished their background spans (read-ahead), or after
                 ``wait`` seconds
  trace_evict    {ino, offset, length}                 → drops the chunks of that range from
                 this node's SSD cache and, in a cluster, from every node's
  trace_stats    {}                                    → tracer statistics
  trace_enable   {on}                                  → {"enabled": bool}: switches tracing
                 on or off in the running daemon (traces under way finish as they started);
                 bench/bench_tracing.py uses it to compare both modes in one process

`cachefs trace PATH` correlates its own read with the daemon's traces by inode and
byte range, not by pid: pyfuse3 gives ``read()`` no request context, so a read trace
carries the pid of the process that opened the file, which is not always the reader
(a forked data-loader worker reads through its parent's descriptor).  A read of the
same range by another process during the capture is captured too.

register() also starts the Prometheus endpoint (``--metrics-listen``, metrics.py)
and the OTLP exporter (``--otlp-endpoint`` / ``CACHEFS_OTLP_ENDPOINT``, otlp.py)
when they are configured.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from .control import ControlError
from .trace import LOST

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("cachefs.tracing")

MAX_CAPTURED = 4096
CAPTURE_TTL = 300.0
# a capture whose client never stopped it (killed: kill -9, the OOM killer) goes after this
# long even while reads of its range go on: it kept the reads' fast path off for good
CAPTURE_MAX_AGE = 3600.0
MAX_CAPTURES = 64
# a follower whose socket takes nothing this long (suspended with ^Z, its pipe stalled) is
# dropped: while it is subscribed, every read's fast path is off
FOLLOW_STUCK = 60.0
DROP_BATCH = 1000  # chunk ids per cluster call (the request stays well under 64 KiB)
DROP_OP = "trace.drop"
DICT_BATCH = 64  # recorded traces made into dicts between two checkpoints of the trio thread


def _num(req: dict, key: str, default: Any = None, kind: type = int) -> Any:
    v = req.get(key)
    if v is None:  # absent, or null
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ControlError(f"{key} must be a number")
    if v < 0:
        raise ControlError(f"{key} must not be negative")
    return kind(v)


def _prefix(req: dict) -> str | None:
    v = req.get("path_prefix") or None
    if v is not None and not isinstance(v, str):  # (a list made every traced read EIO)
        raise ControlError("path_prefix must be a string")
    return v


def under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or lies below it, by whole components (/t.bin is under /t.bin
    and under /, /t.bin2 is not under /t.bin)."""
    top = prefix.rstrip("/")
    return not top or path == top or path.startswith(top + "/")


def matcher(slower_than: float | None = None, path_prefix: str | None = None):
    def match(d: dict) -> bool:
        if slower_than is not None and d.get("duration_ms", 0) < slower_than * 1000:
            return False
        if path_prefix and not under(str(d.get("path", "")), path_prefix):
            return False
        return True
    return match


def overlaps(d: dict, ino: int, lo: int, hi: int) -> bool:
    """A FUSE read trace of inode ``ino`` touching bytes [lo, hi)."""
    if d.get("ino") != ino:
        return False
    off = d.get("offset")
    size = d.get("size")
    if not isinstance(off, int) or not isinstance(size, int):
        return False
    return off < hi and off + max(size, 1) > lo


class Capture:
    """The traces of reads of one inode's byte range that start while it runs: a read
    begun before it (whose read-ahead ended only now) belongs to an earlier command."""

    __slots__ = ("ino", "lo", "hi", "traces", "active", "since", "dropped", "started")

    def __init__(self, ino: int, lo: int, hi: int) -> None:
        self.ino, self.lo, self.hi = ino, lo, hi
        self.traces: list[dict] = []
        self.started = time.monotonic()
        self.active = self.started  # its start, then its last trace
        self.since = time.perf_counter()  # the clock of the traces' ``start``
        self.dropped = 0

    def match(self, tr) -> bool:
        return tr.start >= self.since and overlaps(tr.attrs, self.ino, self.lo, self.hi)


class Tracing:
    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.captures: dict[int, Capture] = {}
        self._ids = itertools.count(1)

    def _captures_changed(self) -> None:
        """The capture sink is registered only while a capture runs: a recorded trace
        then costs no call at all."""
        tracer = self.d.tracer
        tracer.remove_sink(self._sink)
        if self.captures:
            tracer.add_sink(self._sink)

    def _sink(self, tr) -> None:
        for c in self.captures.values():
            if c.match(tr):
                c.active = time.monotonic()  # in use: a long read's capture does not expire
                if len(c.traces) < MAX_CAPTURED:
                    c.traces.append(tr.dict())
                else:
                    c.dropped += 1

    def _expire(self) -> None:
        """Drop the captures no client will stop: idle for CAPTURE_TTL, or older than
        CAPTURE_MAX_AGE. Runs at each capture's start and every 10 s (only at a start,
        a capture of a file read without end was never dropped)."""
        now = time.monotonic()
        for k, c in list(self.captures.items()):
            if now - c.active > CAPTURE_TTL or now - c.started > CAPTURE_MAX_AGE:
                del self.captures[k]
                log.info("trace capture %d expired (its client did not stop it)", k)
        self._captures_changed()

    # -- ops --------------------------------------------------------------------------

    async def recent(self, req: dict, emit) -> dict:
        n = _num(req, "n", 20)
        tr = self.d.tracer
        ring = tr.slow if req.get("slow") else tr.recent
        slower = _num(req, "slower_than", None, float)
        prefix = _prefix(req)
        # filtered on the roots and only the last n made into dicts, a batch at a time:
        # all 1,024 traces of the slow ring as dicts held the trio thread (every FUSE
        # request) for about 115 ms
        # (--slower-than picks requests, as --slow does: read-ahead that outlived its read
        # is no request, and showed as a read of that file that took as long)
        picked = [t for t in ring.roots()
                  if (slower is None or (t.duration >= slower and not t.background))
                  and (not prefix or under(str(t.attrs.get("path", "")), prefix))]
        picked = picked[-n:] if n else []
        out = []
        for i in range(0, len(picked), DICT_BATCH):
            if i:
                await trio.lowlevel.checkpoint()
            out += [t.dict() for t in picked[i:i + DICT_BATCH]]
        return {"traces": out, "node": tr.node,
                "slow_threshold_ms": round(tr.slow_threshold * 1000, 3),
                "enabled": tr.enabled}

    async def follow(self, req: dict, emit) -> dict:
        tr = self.d.tracer
        slower = _num(req, "slower_than", None, float)
        match = matcher(None, _prefix(req))
        recv = tr.subscribe(min_duration=slower, match=match)
        await emit({"following": True, "node": tr.node, "enabled": tr.enabled,
                    "slower_than_ms": round((tr.slow_threshold if slower is None else slower)
                                            * 1000, 3)})
        try:
            async for t in recv:
                with trio.move_on_after(FOLLOW_STUCK) as stuck:
                    # (LOST: traces this follower could not take were dropped)
                    await emit(t if LOST in t else {"trace": t})
                if stuck.cancelled_caught:
                    log.info("a trace follower took nothing for %.0fs: dropped", FOLLOW_STUCK)
                    # (its connection is closed, nothing more sent to it)
                    raise trio.ClosedResourceError("trace follower stuck")
        finally:
            tr.unsubscribe(recv)
        return {}

    def _node(self, req: dict):
        vfs = self.d.vfs
        assert vfs is not None
        ino = _num(req, "ino")
        if ino is None:
            raise ControlError("ino is required")
        node = vfs.nodes.get(ino)
        if node is None:
            raise ControlError(f"inode {ino} is not known to the daemon (look the path up first)")
        if node.is_dir:
            raise ControlError("that is a directory, not a file")
        return vfs, node

    def _range(self, req: dict, size: int) -> tuple[int, int]:
        off = _num(req, "offset", 0)
        length = _num(req, "length", None)
        end = size if length is None else min(size, off + length)
        return off, max(off, end)

    async def capture_start(self, req: dict, emit) -> dict:
        ino = _num(req, "ino")
        if ino is None:
            raise ControlError("ino is required")
        off = _num(req, "offset", 0)
        length = _num(req, "length", None)
        hi = off + length if length is not None else 1 << 62
        self._expire()
        if len(self.captures) >= MAX_CAPTURES:
            raise ControlError(f"too many trace captures running ({MAX_CAPTURES})")
        cid = next(self._ids)
        self.captures[cid] = Capture(ino, off, hi)
        self._captures_changed()
        return {"capture": cid, "node": self.d.tracer.node, "enabled": self.d.tracer.enabled}

    async def capture_stop(self, req: dict, emit) -> dict:
        cid = _num(req, "capture")
        c = self.captures.get(cid)
        if c is None:
            raise ControlError(f"no trace capture {cid} (expired: {CAPTURE_TTL:.0f}s without a "
                               f"read of its range, or {CAPTURE_MAX_AGE / 3600:g} h after "
                               "its start)")
        wait = min(_num(req, "wait", 5.0, float), 60.0)
        deadline = trio.current_time() + wait
        tr = self.d.tracer
        try:
            # traces whose read returned but whose read-ahead is still running: wait for them
            while tr.pending_for(c.match) and trio.current_time() < deadline:  # noqa: ASYNC110
                await trio.sleep(0.01)
        finally:  # also when the client goes away meanwhile (^C): a capture left running
            # keeps collecting, and turns off the reads' fast path (Tracer.quick)
            self.captures.pop(cid, None)
            self._captures_changed()
        out: dict[str, Any] = {"traces": c.traces, "node": tr.node, "enabled": tr.enabled,
                               "pending": tr.pending_for(c.match)}
        if c.dropped:
            out["dropped_traces"] = c.dropped
        return out

    async def evict(self, req: dict, emit) -> dict:
        vfs, node = self._node(req)
        obj = vfs.version(node)
        lo, hi = self._range(req, obj.size)
        if hi <= lo:
            return {"chunks": 0, "dropped_bytes": 0, "nodes": {}}
        cs = obj.chunk_size
        cids = [obj.chunk(i).cid for i in range(lo // cs, (hi - 1) // cs + 1)]
        nodes: dict[str, Any] = {self.d.tracer.node: await self._drop_unpinned(cids)}
        cl = self.d.cluster
        if cl is not None:
            async def one(nid: str) -> None:
                total = kept = 0
                try:
                    for i in range(0, len(cids), DROP_BATCH):
                        # (an unlink never waits on S3: a frozen node is given up after
                        # 5 peer timeouts, not the peer timeout plus S3's)
                        r = await cl.forward(nid, DROP_OP,
                                             {"cids": [c.hex() for c in cids[i:i + DROP_BATCH]]},
                                             no_s3=True)
                        total += int(r.get("dropped_bytes", 0))
                        kept += int(r.get("kept_pinned", 0))
                except Exception as e:  # noqa: BLE001 - reported per node
                    nodes[nid] = {"error": f"{type(e).__name__}: {e}"}
                    return
                nodes[nid] = {"dropped_bytes": total, "kept_pinned": kept}

            async with trio.open_nursery() as n:
                for nid in sorted(cl.nodes()):
                    if nid != cl.node_id:
                        n.start_soon(one, nid)
        return {"chunks": len(cids), "dropped_bytes": sum(v.get("dropped_bytes", 0)
                                                         for v in nodes.values()),
                "kept_pinned": sum(v.get("kept_pinned", 0) for v in nodes.values()),
                "nodes": nodes, "chunk_size": cs, "size": obj.size}

    async def _drop_unpinned(self, cids: list[bytes]) -> dict:
        """Drop chunks for a cold trace, except pinned ones: a diagnostic must not take
        a chunk out of a data set that was pinned (its refetch would come back unpinned)."""
        store = self.d.store
        assert store is not None
        drop = [c for c in cids if not store.is_pinned(c)]
        with trio.CancelScope(shield=True):
            freed = await store.drop(drop)
        return {"dropped_bytes": freed, "kept_pinned": len(cids) - len(drop)}

    async def _drop_op(self, payload: dict) -> dict:
        raw = payload.get("cids")
        if not isinstance(raw, list) or len(raw) > DROP_BATCH:
            raise ValueError(f"cids must be a list of at most {DROP_BATCH} ids")
        cids = []
        for h in raw:
            if not isinstance(h, str) or len(h) != 32:
                raise ValueError("bad chunk id")
            cids.append(bytes.fromhex(h))
        return await self._drop_unpinned(cids)

    async def stats(self, req: dict, emit) -> dict:
        otlp = getattr(self.d, "otlp", None)
        return {"tracer": self.d.tracer.statistics(), "node": self.d.tracer.node,
                "otlp": otlp.statistics() if otlp is not None else None}

    async def enable(self, req: dict, emit) -> dict:
        on = req.get("on")
        if not isinstance(on, bool):
            raise ControlError("on must be true or false")
        self.d.tracer.enabled = on
        return {"enabled": on}


def register(d: Daemon) -> None:
    srv = d.control
    assert srv is not None
    t = Tracing(d)
    d.tracing = t  # type: ignore[attr-defined]
    srv.register("trace_recent", t.recent)
    srv.register("trace_follow", t.follow)
    srv.register("trace_capture_start", t.capture_start)
    srv.register("trace_capture_stop", t.capture_stop)
    srv.register("trace_evict", t.evict)
    srv.register("trace_stats", t.stats)
    srv.register("trace_enable", t.enable)
    if d.cluster is not None:
        d.cluster.register_op(DROP_OP, t._drop_op)
    _start_services(d)
    log.debug("tracing: %s, slow threshold %.1f ms, metrics %s, OTLP %s",
              "on" if d.tracer.enabled else "off (CACHEFS_TRACING=0)",
              d.tracer.slow_threshold * 1000, d.cfg.metrics_listen or "off",
              "on" if getattr(d, "otlp", None) else "off")


def _start_services(d: Daemon) -> None:
    """Metrics endpoint and OTLP exporter, when configured (both off by default)."""
    nursery = d.nursery
    if nursery is None:
        return
    if getattr(d.cfg, "metrics_listen", None) and not getattr(d, "metrics_started", False):
        from .metrics import bind_metrics, serve_metrics

        sock = bind_metrics(d.cfg.metrics_listen)  # QuietError: the mount fails, clearly
        d.metrics_started = True  # type: ignore[attr-defined]
        nursery.start_soon(serve_metrics, d, sock)
    nursery.start_soon(_sweep_pending, d.tracer, getattr(d, "tracing", None))
    endpoint = getattr(d.cfg, "otlp_endpoint", None)  # the flag, the config or the env
    if endpoint and not getattr(d, "otlp", None):
        from .otlp import OTLPExporter

        exp = OTLPExporter(endpoint, service_node=d.tracer.node, run_id=d.tracer.run_id)
        d.otlp = exp  # type: ignore[attr-defined]
        d.tracer.add_sink(exp.offer)
        exp.on_off = lambda: d.tracer.remove_sink(exp.offer)
        nursery.start_soon(exp.run)


async def _sweep_pending(tracer, tracing: Tracing | None = None) -> None:
    """Record the traces whose read-ahead has run past PENDING_MAX_AGE, as incomplete,
    even when no other trace comes along to do it; drop abandoned captures."""
    from .trace import PENDING_MAX_AGE

    while True:
        await trio.sleep(PENDING_MAX_AGE / 6)
        tracer.sweep()
        if tracing is not None and tracing.captures:
            tracing._expire()
