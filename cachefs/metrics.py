"""Prometheus text endpoint (``--metrics-listen HOST:PORT``, off by default).

A tiny HTTP/1.0-style server on trio (no new dependency): ``GET /metrics``
answers the text exposition format 0.0.4 and closes the connection; anything
else is 404.  A listen address without a host (``:9100``) binds 127.0.0.1 only;
any other interface must be named explicitly (``0.0.0.0:9100``).

Everything is read from the daemon's in-memory figures at scrape time (Stats
counters and histograms, the chunk store, the reader, the cluster node, the
tracer): a scrape costs a few hundred microseconds on the trio thread and
reads no disk.  Label values are node ids, FUSE op names, tiers and reasons:
never paths, keys or credentials.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from typing import TYPE_CHECKING, Any

import trio

from .errors import ConfigError, QuietError
from .stats import BUCKETS
from .waiting import Waiting

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("cachefs.metrics")

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request
SEND_TIMEOUT = 10.0  # ... and to take the answer
MAX_CONNECTIONS = 16  # served at once
SLOT_WAIT = 0.5  # seconds a new client waits for one of them before it is closed
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Stats counter → (metric, labels) for the curated families; every counter is also
# exported under cachefs_events_total{name=...}.
TIER_HITS = {"local": ("ssd_hits", "ssd_bytes"), "peer": ("peer_hits", "peer_bytes"),
             "s3": ("s3_misses", "s3_bytes"), "readahead": ("readahead_hits", None),
             "memory": ("memory_hits", None)}
S3_REQUESTS = {"GET": "s3_get_requests", "LIST": "s3_list_requests",
               "HEAD": "s3_head_requests"}


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--metrics-listen: expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"  # loopback unless a host is given
    return host, int(port)


def bind_metrics(value: str) -> socket.socket:
    host, port = parse_listen(value)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(16)
    except OSError as e:
        s.close()
        raise QuietError(f"cannot listen for metrics on {value}: {e.strerror or e}") from None
    s.setblocking(False)
    return s


async def serve_metrics(d: Daemon, sock: socket.socket, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    tsock = trio.socket.from_stdlib_socket(sock)
    listener = trio.SocketListener(tsock)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    host, port = sock.getsockname()[:2]
    log.info("metrics: serving http://%s:%d/metrics", host, port)
    task_status.started((host, port))

    waiting = Waiting()

    async def handle(stream: trio.SocketStream) -> None:
        # MAX_CONNECTIONS clients at most, none queued for long: idle connections held
        # every file descriptor of the daemon (its chunk writes, S3 and peer connections
        # failed with EMFILE).  When all are taken, the one that has waited longest for its
        # request makes room; a new client that still finds none is closed.
        if not limiter.available_tokens and waiting.close_longest():
            d.stats.inc("metrics_idle_connections_closed")
        slot = False
        with trio.move_on_after(SLOT_WAIT):
            await limiter.acquire()
            slot = True
        if not slot:
            d.stats.inc("metrics_connections_refused")
            await trio.aclose_forcefully(stream)
            return
        try:
            with trio.move_on_after(REQUEST_TIMEOUT + SEND_TIMEOUT):
                await _handle(d, stream, waiting)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a scrape must never stop the daemon
            log.exception("metrics: request failed")
        finally:
            limiter.release()
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, [listener])


async def _handle(d: Daemon, stream: trio.SocketStream, waiting: Waiting) -> None:
    buf = b""
    with waiting.wait(REQUEST_TIMEOUT) as cs:
        while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
            data = await stream.receive_some(4096)
            if not data:
                break
            buf += data
            if len(buf) > MAX_REQUEST:
                await _reply(stream, 431, "request too large\n")
                return
    if cs.cancelled_caught or not buf:
        return
    line = buf.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = line.split()
    if len(parts) < 2:
        await _reply(stream, 400, "bad request\n")
        return
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        await _reply(stream, 405, "method not allowed\n")
        return
    if target == "/metrics":
        body = render(d)
        log.debug("metrics: scrape, %d bytes", len(body))
        await _reply(stream, 200, body, head=method == "HEAD", ctype=CONTENT_TYPE)
    elif target == "/":
        await _reply(stream, 200, "cachefs: metrics at /metrics\n", head=method == "HEAD")
    else:
        await _reply(stream, 404, "not found\n")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}


async def _reply(stream: trio.SocketStream, status: int, body: str, *, head: bool = False,
                 ctype: str = "text/plain; charset=utf-8") -> None:
    b = body.encode()
    hdr = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
           f"Content-Length: {len(b)}\r\nConnection: close\r\n\r\n").encode()
    await stream.send_all(hdr if head else hdr + b)


# -- rendering ---------------------------------------------------------------------------


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._seen: set[str] = set()

    def family(self, name: str, kind: str, help_: str) -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, Any] | None = None) -> None:
        if labels:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {_fmt(value)}")
        else:
            self.lines.append(f"{name} {_fmt(value)}")

    def one(self, name: str, kind: str, help_: str, value: float,
            labels: dict[str, Any] | None = None) -> None:
        self.family(name, kind, help_)
        self.sample(name, value, labels)

    def histogram(self, name: str, h, labels: dict[str, Any]) -> None:
        cum = 0
        for bound, n in zip(BUCKETS, h.counts, strict=False):
            cum += n
            self.sample(f"{name}_bucket", cum, {**labels, "le": _fmt(bound)})
        self.sample(f"{name}_bucket", h.n, {**labels, "le": "+Inf"})
        self.sample(f"{name}_sum", h.total, labels)
        self.sample(f"{name}_count", h.n, labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _fmt(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    return repr(float(v))


def render(d: Daemon) -> str:
    o = _Out()
    c = d.stats.c
    o.one("cachefs_uptime_seconds", "gauge", "Seconds since the daemon started.",
          round(time.time() - d.started_at, 3))

    # FUSE requests and latency per op
    ops = sorted({k[5:] for k in c if k.startswith("fuse_")
                  and k not in ("fuse_read_bytes", "fuse_internal_errors", "fuse_erofs")}
                 | {k[5:] for k in d.stats.h if k.startswith("fuse_")})
    o.family("cachefs_fuse_requests_total", "counter", "FUSE requests handled, per operation.")
    for op in ops:
        o.sample("cachefs_fuse_requests_total", c.get(f"fuse_{op}", 0), {"op": op})
    o.family("cachefs_fuse_request_duration_seconds", "histogram",
             "FUSE request latency, per operation.")
    for op in ops:
        h = d.stats.h.get(f"fuse_{op}")
        if h is not None:
            o.histogram("cachefs_fuse_request_duration_seconds", h, {"op": op})
    o.one("cachefs_fuse_read_bytes_total", "counter", "Bytes returned by FUSE reads.",
          c.get("fuse_read_bytes", 0))
    o.one("cachefs_fuse_internal_errors_total", "counter",
          "FUSE requests answered EIO after an unexpected error.", c.get("fuse_internal_errors", 0))
    o.one("cachefs_read_errors_total", "counter", "FUSE reads failed with EIO (S3 errors, "
          "object changed).", c.get("read_errors", 0))
    for name, h in sorted(d.stats.h.items()):
        if not name.startswith("fuse_"):
            metric = "cachefs_" + _NAME_RE.sub("_", name) + "_seconds"
            o.family(metric, "histogram", f"Latency histogram {name}.")
            o.histogram(metric, h, {})

    # chunk reads per tier
    o.family("cachefs_chunk_reads_total", "counter",
             "Chunks served per tier: local SSD, peer node, S3 (a miss), read-ahead buffer, "
             "memory (a chunk another handle of the file fetched).")
    for tier, (n, _) in TIER_HITS.items():
        o.sample("cachefs_chunk_reads_total", c.get(n, 0), {"tier": tier})
    o.family("cachefs_chunk_bytes_total", "counter", "Chunk bytes served per tier.")
    for tier, (_, b) in TIER_HITS.items():
        if b:
            o.sample("cachefs_chunk_bytes_total", c.get(b, 0), {"tier": tier})
    o.one("cachefs_cache_misses_total", "counter", "Chunks read from S3 (not on any SSD).",
          c.get("s3_misses", 0))
    o.one("cachefs_singleflight_joins_total", "counter",
          "Reads that waited on a fetch already in flight.", c.get("singleflight_joins", 0))

    # S3
    o.family("cachefs_s3_requests_total", "counter", "S3 requests that got an answer, per op.")
    for op, n in S3_REQUESTS.items():
        o.sample("cachefs_s3_requests_total", c.get(n, 0), {"op": op})
    o.one("cachefs_s3_bytes_total", "counter", "Bytes received from S3 GETs.",
          c.get("s3_bytes", 0))
    o.one("cachefs_s3_errors_total", "counter", "Failed S3 attempts (each retry counts).",
          c.get("s3_errors", 0))
    o.one("cachefs_s3_retries_total", "counter", "S3 attempts retried after a transient error.",
          c.get("s3_retries", 0))
    o.one("cachefs_s3_failures_total", "counter", "S3 requests that gave up after all attempts.",
          c.get("s3_failures", 0))

    # cache
    st = d.store.statistics() if d.store is not None else {}
    o.one("cachefs_cache_used_bytes", "gauge", "Bytes of chunks on the SSD.",
          st.get("used_bytes", 0))
    o.one("cachefs_cache_limit_bytes", "gauge", "Cache limit (--cache-size).",
          st.get("limit_bytes", 0))
    o.one("cachefs_cache_pinned_bytes", "gauge", "Bytes of pinned chunks.",
          st.get("pinned_bytes", 0))
    o.one("cachefs_cache_reserved_bytes", "gauge", "Bytes reserved for chunks being written.",
          st.get("reserved_bytes", 0))
    o.one("cachefs_cache_chunks", "gauge", "Chunks on the SSD.", st.get("chunks", 0))
    o.one("cachefs_evictions_total", "counter", "Chunks evicted (LRU).", c.get("evictions", 0))
    o.one("cachefs_evicted_bytes_total", "counter", "Bytes evicted (LRU).",
          c.get("evicted_bytes", 0))
    o.one("cachefs_in_flight_fetches", "gauge", "Chunk fetches in flight (singleflight).",
          d.reader.in_flight if d.reader is not None else 0)
    if d.vfs is not None:
        o.one("cachefs_readahead_bytes", "gauge", "Read-ahead memory in use.", d.vfs.budget.used)
        o.one("cachefs_readahead_limit_bytes", "gauge", "Read-ahead memory budget.",
              d.vfs.budget.limit)
        o.one("cachefs_open_files", "gauge", "Open file handles.", len(d.vfs.handles))

    # cluster
    cl = d.cluster
    if cl is not None:
        s = cl.statistics()
        o.one("cachefs_cluster_members", "gauge", "Nodes on the ring.", s.get("ring_size", 0),
              {"node": s.get("node_id", "")})
        o.family("cachefs_peer_healthy", "gauge", "1 if the peer is used, 0 while it is "
                 "skipped after an error.")
        for n, m in s.get("members", {}).items():
            o.sample("cachefs_peer_healthy", 1 if m.get("healthy") else 0, {"node": n})
        o.family("cachefs_peer_errors_total", "counter", "Failed peer requests, per peer and "
                 "reason.")
        for n, reasons in s.get("peer_errors", {}).items():
            for r, k in sorted(reasons.items()):
                o.sample("cachefs_peer_errors_total", k, {"node": n, "reason": r})
        o.one("cachefs_peer_fetched_total", "counter", "Chunks fetched from peers.",
              s.get("fetched_from_peers", 0))
        o.one("cachefs_peer_fetched_bytes_total", "counter", "Bytes fetched from peers.",
              s.get("bytes_from_peers", 0))
        o.one("cachefs_peer_served_total", "counter", "Chunks served to peers.",
              s.get("requests_served", 0))
        o.one("cachefs_peer_served_bytes_total", "counter", "Bytes served to peers.",
              s.get("bytes_served", 0))
        o.one("cachefs_peer_s3_fallbacks_total", "counter",
              "Chunks a peer should have served but were read from S3.", s.get("s3_fallbacks", 0))
        etcd = s.get("etcd")
        if isinstance(etcd, dict):
            o.one("cachefs_etcd_up", "gauge", "1 while etcd answers; 0 while it does not (the "
                  "ring stays as it was).", 1 if etcd.get("answering") else 0)
            o.one("cachefs_etcd_errors_total", "counter", "Failed etcd calls.",
                  etcd.get("etcd_errors", 0))

    # tracing
    ts = d.tracer.statistics()
    o.one("cachefs_traces_total", "counter", "Traces recorded.", ts["finished"])
    o.one("cachefs_slow_traces_total", "counter", "Traces over the slow threshold.", ts["slow"])
    o.one("cachefs_trace_dropped_spans_total", "counter",
          "Spans not kept (per-trace span cap).", ts["dropped_spans"])

    otlp = getattr(d, "otlp", None)
    if otlp is not None:
        st = otlp.statistics()
        o.one("cachefs_otlp_exported_total", "counter", "Traces exported over OTLP.",
              st["exported"])
        o.one("cachefs_otlp_dropped_total", "counter",
              "Traces not exported (queue full, a failed POST).", st["dropped"])
        o.one("cachefs_otlp_failed_posts_total", "counter", "OTLP POSTs that failed.",
              st["failed_posts"])

    # every counter, generically (names are fixed identifiers, never data)
    o.family("cachefs_events_total", "counter", "Every internal counter, by name.")
    for name, v in sorted(c.items()):
        o.sample("cachefs_events_total", v, {"name": name})
    return o.text()
