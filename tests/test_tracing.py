"""Tracing, `cachefs trace`, /metrics and OTLP export, on real mounts over moto.

Assertions are about spans, tiers, counts and bytes, never about timings
(except the injected 0.5 s S3 delay, which is far above the 200 ms filter).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio
from cachefs_env import CREDS, cli, wait_for
from etcd_env import free_port

from cachefs import trace as tracemod
from cachefs.chunks.ids import chunk_id
from cachefs.cluster.ring import HashRing
from cachefs.errors import QuietError
from cachefs.store.chunkstore import file_size
from cachefs.trace import Tracer, span

CHUNK = 64 * 1024
SECRET = "tracing-test-secret"
CANARY_KEY = "AKIACANARY7Q3XZ2TRACE"
CANARY_SECRET = "canarysecretT7d9w0QmZ4uVbN1cachefsTRACE"


def put(s3, bucket: str, key: str, size: int, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return data


def put_owned(s3, bucket: str, key: str, nodes: list[str], node: str,
              chunks: int = 8) -> tuple[bytes, list[int]]:
    """An object of ``chunks`` chunks of which ``node`` owns some on the ring of ``nodes``
    (the bucket name is random: the placement is chosen, not left to chance), and the
    indexes of those chunks."""
    ring = HashRing(nodes)
    for seed in range(1000):
        data = random.Random(seed).randbytes(chunks * CHUNK)
        etag = f'"{hashlib.md5(data).hexdigest()}"'  # a single-part upload's ETag
        owned = [i for i in range(chunks)
                 if ring.owner(chunk_id(bucket, key, etag, CHUNK, i)) == node]
        if owned:
            s3.put_object(Bucket=bucket, Key=key, Body=data)
            assert s3.head_object(Bucket=bucket, Key=key)["ETag"] == etag
            return data, owned
    raise AssertionError("no placement found")


def all_spans(t: dict):
    yield t
    for c in t.get("spans", ()):
        yield from all_spans(c)


def trace_json(*args: str, env: dict | None = None) -> dict:
    r = cli("trace", *args, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def scrape(port: int) -> tuple[dict[str, float], str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            out[name] = float(v)
    return out, text


class Receiver:
    """A tiny OTLP/HTTP receiver: keeps every POST body."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                outer.bodies.append((self.path, self.rfile.read(n)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


# -- the Tracer alone (no FUSE) ------------------------------------------------------------


async def test_tracer_bounds_and_background_spans():
    t = Tracer(slow_threshold=0.0, recent=4, slow=3, recent_spans=20, slow_spans=1000,
               enabled=True)
    # a span cap per trace
    with t.start("read", ino=1):
        for _ in range(tracemod.MAX_SPANS + 10):
            with span("x"):
                pass
    d = t.recent.last(1)[0]
    assert len(list(all_spans(d))) == tracemod.MAX_SPANS
    assert d["dropped_spans"] == 11
    # ring bounds: traces and spans
    for i in range(10):
        with t.start("read", ino=i):
            with span("a"), span("b"):
                pass
    assert len(t.recent) <= 4 and t.recent.spans <= 20
    assert len(t.slow) == 3
    # a background span (read-ahead) keeps the trace open until it ends
    ev, opened = trio.Event(), trio.Event()

    async def background(name):
        with span(name, chunk=1):
            opened.set()
            await ev.wait()

    async with trio.open_nursery() as n:
        with t.start("read", ino=99, offset=0, size=10):
            n.start_soon(background, "readahead")
            await opened.wait()
        assert t.pending_for(lambda r: r.attrs.get("ino") == 99) == 1
        assert t.recent.last(1)[0].get("ino") != 99
        ev.set()
    d = t.recent.last(1)[0]
    assert d["ino"] == 99 and d["spans"][0]["name"] == "readahead" and "open" not in d["spans"][0]
    # a task whose first span opens after its request was recorded: a continuation trace
    ev = trio.Event()
    async with trio.open_nursery() as n:
        with t.start("read", ino=7, offset=0, size=10) as root:
            n.start_soon(background, "late")
        ev.set()
    d = t.recent.last(1)[0]
    assert d["name"] == "late" and d["continues"] == root.to_dict()["trace_id"]
    assert d["ino"] == 7 and d["background"] is True and d not in list(t.slow)[-1:]
    # leaf(): an instant child in the trace; after the trace is recorded, a continuation
    with t.start("read", ino=8) as root:
        tracemod.leaf("chunk", chunk=0, tier="readahead")
    d = t.recent.last(1)[0]
    assert [(c["name"], c["tier"], c["duration_ms"]) for c in d["spans"]] == \
        [("chunk", "readahead", 0.0)]

    async def late_leaf():
        tracemod.leaf("chunk", chunk=1, tier="readahead")

    async with trio.open_nursery() as n:
        with t.start("read", ino=9) as root:
            n.start_soon(late_leaf)
    d = t.recent.last(1)[0]
    assert d["name"] == "chunk" and d["continues"] == root.to_dict()["trace_id"]
    assert d["ino"] == 9 and d["tier"] == "readahead"
    # off: nothing recorded
    off = Tracer(slow_threshold=0.0, enabled=False)
    with off.start("read"):
        with span("x") as s:
            assert s is tracemod.NULL_SPAN
    assert len(off.recent) == 0


def test_quick_reads_kept_in_runs_read_back_as_single_traces_in_order():
    """Reads served from a handle's buffer are kept as runs of arrays (QuickRun), not one
    object each; what --recent, the slow ring and the bounds see is still one trace per
    read, in the order they were recorded, other traces among them."""
    t = Tracer(slow_threshold=1.0, recent=100, recent_spans=10_000, enabled=True)
    K = 128 << 10

    def quick(fh, i, start=None, chunk=0, ino=None):
        e = tracemod._now()
        s = e if start is None else start
        if not t.quick_read(fh, s, e, i * K, K, chunk):
            t.quick_read_new(fh, s, e, i * K, K, chunk, K, ino or fh, f"/f{fh}", 40 + fh)

    quick(1, 0)
    quick(2, 0)  # two handles interleaved: two runs
    quick(1, 1)
    with t.start("read", ino=9, offset=0, size=1):  # another kind of trace between them
        pass
    quick(2, 1)
    quick(1, 3)  # not contiguous: a new run of handle 1
    quick(1, 4, start=tracemod._now() - 2)  # slower than the threshold
    quick(2, 2, chunk=1)  # another chunk: a new run
    t.end_quick(2)  # (its release)
    got = [(d.get("ino"), d["offset"] // K) for d in t.recent.last(100)]
    assert got == [(1, 0), (2, 0), (1, 1), (9, 0), (2, 1), (1, 3), (1, 4), (2, 2)]
    d = t.recent.last(100)[0]
    assert (d["path"], d["pid"], d["size"], d["trace_id"]) == ("/f1", 41, K, t.pid_hex + "-1")
    assert [(c["name"], c["tier"], c["chunk"], c["bytes"]) for c in d["spans"]] == \
        [("chunk", "readahead", 0, K)]
    assert len({d["trace_id"] for d in t.recent.last(100)}) == 8
    slow = t.slow.last(10)
    assert [(d["ino"], d["offset"] // K) for d in slow] == [(1, 4)] and slow[0]["duration_ms"] >= 2000
    assert t.statistics()["started"] == t.statistics()["finished"] == 8
    assert len(t.recent) == 8 and t.recent.spans == 2 * 7 + 1
    # the ring's bounds count reads, and let a run go as a whole
    for i in range(300):
        quick(3, i)
    t.statistics()  # (counts the reads of the runs still open)
    assert 100 - tracemod.RUN_MAX < len(t.recent) <= 100
    assert len(t.recent.last(1000)) == len(t.recent)
    assert t.recent.last(1)[0]["offset"] == 299 * K
    # runs of handles still reading are in the ring from their first read: a trace recorded
    # after them stays the newest, and is not pushed out by them (nor by asking for stats)
    for i in range(40):
        for fh in range(10, 18):
            quick(fh, i)
    with t.start("read", ino=99, offset=0, size=1):
        pass
    t.statistics()
    assert t.recent.last(1)[0]["ino"] == 99 and len(t.recent) <= 100
    # a run holds requests of one size (the chunk's length is the run's, as the chunk is)
    t = Tracer(slow_threshold=1.0, enabled=True)
    H = K // 2

    def q(off, size):
        e = tracemod._now()
        if not t.quick_read(1, e, e, off, size, 0):
            t.quick_read_new(1, e, e, off, size, 0, 8 * K, 1, "/f1", 41)

    for off, size in ((0, K), (K, H), (K + H, H), (2 * K, K)):
        q(off, size)
    got = [(d["offset"], d["size"], d["spans"][0]["bytes"]) for d in t.recent.last(10)]
    assert got == [(0, K, 8 * K), (K, H, 8 * K), (K + H, H, 8 * K), (2 * K, K, 8 * K)]
    assert len(t.recent.items) == 3  # runs: K; H twice; K
    assert t.statistics()["started"] == 4 and len({d["trace_id"] for d in t.recent.last(10)}) == 4
    off = Tracer(slow_threshold=0.0, enabled=False)
    assert off.quick_read(1, 0.0, 0.0, 0, K, 0) is True and len(off.recent) == 0


async def test_a_trace_whose_read_ahead_never_ends_is_recorded_by_the_clock(monkeypatch):
    """A trace waiting on its read-ahead was recorded as incomplete after PENDING_MAX_AGE
    only when another trace came to wait too: alone, it stayed out of --recent, --follow,
    the slow ring and the metrics for as long as its read-ahead ran."""
    from cachefs import tracing

    monkeypatch.setattr(tracemod, "PENDING_MAX_AGE", 0.3)
    t = Tracer(slow_threshold=0.0, enabled=True)
    ev, opened = trio.Event(), trio.Event()

    async def background():
        with span("readahead", chunk=1):
            opened.set()
            await ev.wait()

    async with trio.open_nursery() as n:
        n.start_soon(tracing._sweep_pending, t)
        with t.start("read", ino=5, offset=0, size=10):
            n.start_soon(background)
            await opened.wait()
        await trio.sleep(1.0)  # (swept once it is 0.3 s old: a sweep every 0.05 s)
        st = t.statistics()
        assert st["pending"] == 0 and st["incomplete"] == 1, st
        d = t.recent.last(1)[0]
        assert d["ino"] == 5 and d["incomplete"] and d["spans"][0]["open"]
        ev.set()
        n.cancel_scope.cancel()


def test_a_peers_spans_are_bounded_and_strict_json():
    """A peer's spans kept NaN and infinite figures (invalid JSON for strict parsers, in
    `--json` and `--recent`), uncut attribute names and any number of attributes: one
    span of 418 KB where ours are about half a KiB."""
    t = Tracer(slow_threshold=0.0, enabled=True)
    wild = {"name": "n" * 10_000, "start_ms": float("inf"), "duration_ms": float("nan"),
            "ttfb_ms": float("inf"), "k" * 100_000: 1,
            **{f"a{i}": "v" * 600 for i in range(20_000)}}
    with t.start("read", ino=1, offset=0, size=10):
        with span("peer"):
            tracemod.attach([wild, {"name": "ok", "start_ms": 1.0, "duration_ms": 2.0,
                                    "tier": "local"}])
    d = t.recent.last(1)[0]
    text = json.dumps(d, allow_nan=False)  # raises on a NaN
    assert len(text) < 40_000, len(text)
    got, ok = d["spans"][0]["spans"]
    assert got["duration_ms"] == 0.0 and "ttfb_ms" not in got and len(got["name"]) <= 513
    assert len(got) <= tracemod.MAX_PEER_ATTRS + 4
    assert ok["duration_ms"] == 2.0 and ok["tier"] == "local"


async def test_a_capture_still_collecting_is_not_expired(monkeypatch):
    """A capture expired CAPTURE_TTL after it began, once another `cachefs trace` started:
    a read of a large range from a slow S3, still going, then lost its whole trace ("no
    trace capture 1")."""
    from types import SimpleNamespace

    from cachefs import tracing

    monkeypatch.setattr(tracing, "CAPTURE_TTL", 0.3)
    t = Tracer(slow_threshold=10.0, enabled=True)
    caps = tracing.Tracing(SimpleNamespace(tracer=t))
    noop = None
    first = (await caps.capture_start({"ino": 1, "offset": 0, "length": 100}, noop))["capture"]
    idle = (await caps.capture_start({"ino": 2, "offset": 0, "length": 100}, noop))["capture"]
    for _ in range(4):  # the first one's read goes on, a request every 0.1 s
        await trio.sleep(0.1)
        with t.start("read", ino=1, offset=0, size=10):
            pass
    await caps.capture_start({"ino": 3}, noop)  # expires what has been idle 0.3 s
    assert len((await caps.capture_stop({"capture": first, "wait": 0}, noop))["traces"]) == 4
    with pytest.raises(tracing.ControlError, match=f"no trace capture {idle}"):
        await caps.capture_stop({"capture": idle, "wait": 0}, noop)


async def test_an_abandoned_capture_of_a_file_still_read_goes(monkeypatch):
    """A `cachefs trace` killed outright never stops its capture: it expired only at the
    next capture's start, and never while the file was read (each read renewed it). It
    kept every read's fast path off for good. The tracer's sweep drops it once it is
    older than CAPTURE_MAX_AGE."""
    from types import SimpleNamespace

    from cachefs import tracing

    monkeypatch.setattr(tracing, "CAPTURE_MAX_AGE", 0.3)
    t = Tracer(slow_threshold=10.0, enabled=True)
    caps = tracing.Tracing(SimpleNamespace(tracer=t))
    await caps.capture_start({"ino": 1, "offset": 0, "length": 100}, None)
    assert caps._sink in t._sinks
    for _ in range(4):  # a training job reads the file on
        await trio.sleep(0.1)
        with t.start("read", ino=1, offset=0, size=10):
            pass
    caps._expire()  # (what the tracer's sweep calls every 10 s)
    assert caps.captures == {} and caps._sink not in t._sinks


async def test_a_bad_follower_or_sink_does_not_fail_the_traced_read():
    """A follow request whose path_prefix was a list made every traced read raise (EIO),
    and any exception of a sink or a follower's filter escaped from the traced operation."""
    from types import SimpleNamespace

    from cachefs import tracing

    t = Tracer(slow_threshold=0.0, enabled=True)
    caps = tracing.Tracing(SimpleNamespace(tracer=t))
    for op in (caps.follow, caps.recent):
        with pytest.raises(tracing.ControlError, match="path_prefix must be a string"):
            await op({"path_prefix": ["/x"]}, None)

    def bad(_):
        raise AttributeError("a bug")

    t.subscribe(min_duration=0.0, match=bad)
    t.add_sink(bad)
    with t.start("read", ino=1, offset=0, size=10, path="/a"):
        pass  # (raised AttributeError here)
    assert t._subscribers == [] and bad not in t._sinks
    assert t.statistics()["finished"] == 1


async def test_a_follower_that_takes_nothing_is_dropped(monkeypatch):
    """A `trace --follow` suspended with ^Z (or piped into a stalled reader) stayed
    subscribed for ever: every read's fast path off, a dict made for each trace."""
    from types import SimpleNamespace

    from cachefs import tracing

    monkeypatch.setattr(tracing, "FOLLOW_STUCK", 0.2)
    t = Tracer(slow_threshold=0.0, enabled=True)
    caps = tracing.Tracing(SimpleNamespace(tracer=t))
    sent = []

    async def emit(ev):
        sent.append(ev)
        if len(sent) > 1:  # the header goes out, then the socket's buffer is full
            await trio.sleep_forever()

    async def read_on():
        while True:
            with t.start("read", ino=1, offset=0, size=10, path="/a"):
                pass
            await trio.sleep(0.05)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(read_on)
            with pytest.raises(trio.ClosedResourceError):
                await caps.follow({}, emit)
            n.cancel_scope.cancel()
    assert t._subscribers == [] and len(sent) == 2


def test_long_lists_are_encoded_in_pieces_to_the_same_json():
    """A large reply or OTLP batch encoded in one json.dumps call held the GIL, and so the
    trio thread, to its end, from a worker thread too. In pieces, it is the same JSON."""
    import json

    from cachefs.control import dumps_in_pieces

    doc = {"traces": [{"name": "read", "n": i, "spans": [{"x": [1, 2.5, None, "é"]}] * 3}
                      for i in range(100)], "node": "n1", 3: (1, 2), "empty": {},
           True: None, None: 1.5, "deep": [{"spans": list(range(40))}]}
    assert dumps_in_pieces(doc, default=str) == json.dumps(doc, default=str)
    with pytest.raises(ValueError):
        dumps_in_pieces({"x": [float("nan")] * 20}, allow_nan=False)


def test_the_chunk_table_names_this_nodes_own_waits_apart_from_the_peers_and_s3s():
    """The row of a chunk read from a peer gave the peer span's whole time as its round
    trip, this node's wait for a connection slot included ("peer n2 round trip 300 ms"
    for a 10 ms answer); a failed peer said no time; an S3 GET's row did not name the
    wait for an S3 connection, nor the new connection's setup."""
    from cachefs.cli_trace import chunk_rows

    peer = {"name": "peer", "node": "n2", "duration_ms": 300.0, "spans": [
        {"name": "peer.slot_wait", "duration_ms": 290.0}]}
    dead = {"name": "peer", "node": "n3", "duration_ms": 5000.0, "error": "timeout",
            "spans": []}
    get = {"name": "s3.get", "duration_ms": 80.0, "ttfb_ms": 20.0, "transfer_ms": 5.0,
           "spans": [{"name": "s3.slot_wait", "duration_ms": 40.0},
                     {"name": "s3.connect", "duration_ms": 15.0}]}
    t = {"name": "read", "node": "n1", "trace_id": "1-1", "duration_ms": 5400.0, "spans": [
        {"name": "chunk", "chunk": 0, "tier": "peer", "duration_ms": 300.0, "spans": [peer]},
        {"name": "chunk", "chunk": 1, "tier": "s3", "duration_ms": 5080.0,
         "spans": [dead, get]}]}
    rows = chunk_rows([t], "n1", 1 << 20, 0, 2 << 20)
    assert rows[0]["detail"] == ("peer n2 round trip 10.0 ms (queued here 290.0 ms for a "
                                 "connection slot first)"), rows[0]
    assert rows[1]["detail"] == ("peer n3 failed (timeout) after 5000.0 ms; S3 GET queued "
                                 "here 40.0 ms for an S3 connection, connect 15.0 ms, ttfb "
                                 "20.0 ms, transfer 5.0 ms"), rows[1]


def test_a_wait_for_work_another_captured_read_did_is_not_the_dominant_cost():
    """`trace PATH --cold`: of the 1 MiB reads that reach the daemon at once, one fetches
    the chunk and the others wait for it. The wait (no children) had the largest self
    time and was marked the dominant cost; the GET it waited for is."""
    from cachefs.cli_trace import dominant

    fetch = {"name": "read", "trace_id": "a-1", "duration_ms": 330.0, "spans": [
        {"name": "chunk", "chunk": 0, "duration_ms": 330.0, "spans": [
            {"name": "s3.get", "duration_ms": 300.0, "spans": [
                {"name": "s3.connect", "duration_ms": 20.0}]},
            {"name": "ssd.write", "duration_ms": 30.0}]}]}
    wait = {"name": "singleflight.wait", "chunk": 0, "duration_ms": 320.0,
            "holder": "read /f.bin (trace a-1)"}
    ahead = {"name": "readahead.wait", "chunk": 1, "duration_ms": 310.0}
    waiter = {"name": "read", "trace_id": "a-2", "duration_ms": 330.0,
              "spans": [wait, ahead]}
    fetcher2 = {"name": "read", "trace_id": "a-3", "duration_ms": 1.0, "spans": [
        {"name": "readahead", "chunk": 1, "duration_ms": 1.0}]}
    i, s = dominant([fetch, waiter, fetcher2])
    assert s["name"] == "s3.get", s
    # a wait for work no captured read did (a preload's) is this read's cost
    i, s = dominant([waiter])
    assert s is wait, s


def test_a_capture_says_what_it_did_not_keep():
    """Reads past a capture's cap (4,096) were dropped without a word: the count of FUSE
    reads and the chunk rows covered the first ones only."""
    from cachefs.cli_trace import render_capture

    t = {"name": "read", "path": "/a", "offset": 0, "size": 10, "duration_ms": 1.0,
         "node": "n", "trace_id": "1-1", "spans": []}
    res = {"path": "/mnt/a", "offset": 0, "length": 10, "bytes_read": 10, "elapsed_ms": 1.2,
           "direct": True, "traces": [t] * 3, "chunks": [], "dropped_traces": 5}
    out = render_capture(res).splitlines()
    assert out[1:3] == ["  3 FUSE read(s) traced, daemon time 3.0 ms",
                        "  5 more read(s) traced but not kept (a capture keeps 3): trace a "
                        "shorter --length"], out


def test_the_daemon_time_of_reads_served_at_once_is_not_added_up():
    """Reads served at the same time (the kernel's split of one large O_DIRECT read) had
    their times added up: a daemon time longer than the read itself."""
    from cachefs.cli_trace import render_capture

    def read(start: float, ms: float) -> dict:
        return {"name": "read", "path": "/a", "offset": 0, "size": 10, "duration_ms": ms,
                "node": "n", "trace_id": "1-1", "spans": [], "start_time": start}

    res = {"path": "/mnt/a", "offset": 0, "length": 10, "bytes_read": 10, "elapsed_ms": 31.0,
           "direct": True, "chunks": [],
           "traces": [read(100.0, 10.0), read(100.005, 10.0), read(100.02, 10.0)]}
    assert render_capture(res).splitlines()[1] == (
        "  3 FUSE read(s) traced, daemon time 25.0 ms (30.0 ms added up: reads served at "
        "the same time)")


def test_otlp_endpoint_urls_keep_their_query(monkeypatch):
    """`/v1/traces` was appended to the whole URL: https://c:4318?api_key=K posted to path
    "" with the key "K/v1/traces". A client the exporter cannot make (a proxy setting it
    cannot use) ended the daemon, mount and all; it now turns exporting off."""
    from cachefs.otlp import OTLPExporter, traces_url

    assert traces_url("https://c:4318?api_key=K") == "https://c:4318/v1/traces?api_key=K"
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    assert traces_url("http://c/otel/v1/traces/?x=1") == "http://c/otel/v1/traces?x=1"
    exp = OTLPExporter("http://127.0.0.1:9", service_node="n")
    t = Tracer(slow_threshold=0.0, enabled=True)
    t.add_sink(exp.offer)
    with t.start("read", ino=1):
        pass

    async def main():
        with trio.fail_after(10):
            await exp.run()  # returns: no client

    try:
        import socksio  # noqa: F401 - with it, httpx can make this client
        pytest.skip("socksio is installed: httpx makes a SOCKS client")
    except ImportError:
        pass
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:9")  # httpx needs socksio for that
    trio.run(main)
    with t.start("read", ino=2):
        pass
    st = exp.statistics()
    assert st["off"] and st["dropped"] == 2 and st["exported"] == 0, st


def test_a_traced_request_leaves_no_reference_cycle():
    """A recorded trace must be freed by reference counting alone: cyclic garbage from
    every request made each traced read pay for garbage collections (+10% of daemon CPU
    in the tracing benchmark)."""
    import gc

    t = Tracer(slow_threshold=0.0, recent=4, slow=4, enabled=True)
    gc.collect()
    gc.disable()
    try:
        for i in range(200):
            with t.start("read", ino=1, offset=i, size=10):
                with span("chunk", chunk=i) as sp:
                    sp.set(tier="local")
                    with span("ssd.read", bytes=10):
                        pass
        assert len(t.recent) == 4
        assert gc.collect() == 0
    finally:
        gc.enable()


# -- one daemon: trace PATH, cold and warm; /metrics; OTLP; no credential anywhere ---------


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_trace_command_killed_mid_read_ends_its_capture(mounts, s3, bucket, proxy, sig):
    """`timeout 5 cachefs trace ...` or a closed ssh session: the command ended without its
    clean-up, and the daemon kept collecting every trace of that range (21 kept after 20
    reads) until some later `cachefs trace` expired it."""
    import signal

    put(s3, bucket, "k.bin", 4 * CHUNK)
    m = mounts(f"s3://{bucket}")
    os.stat(m.path("k.bin"))
    proxy.reset()  # (the proxy serves the whole session: counts of earlier tests)
    # every GET waits: the read's, not only the read-ahead's that may reach S3 first (the
    # command had then read, restored its handlers and was waiting for the read-ahead's spans)
    proxy.faults(delay=2.0, count=-1)
    p = subprocess.Popen([sys.executable, "-m", "cachefs", "trace", str(m.path("k.bin"))],
                         env={**os.environ, **CREDS}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    signum = getattr(signal, sig)

    def catches() -> bool:  # the command's handler is in place (the read is under way)
        with open(f"/proc/{p.pid}/status") as f:
            mask = next(ln for ln in f if ln.startswith("SigCgt:")).split()[1]
        return bool(int(mask, 16) >> (signum - 1) & 1)

    try:
        deadline = time.monotonic() + 10
        while not (proxy.stats(settle=0)["ops"].get("GetObject") and catches()):
            assert time.monotonic() < deadline, "the trace's read reaching S3"
            time.sleep(0.05)
        p.send_signal(signum)
        assert p.wait(30) == 128 + signum
    finally:
        proxy.clear_faults()
    with pytest.raises(QuietError, match="no trace capture 1"):
        m.request({"op": "trace_capture_stop", "capture": 1, "wait": 0})


def test_a_read_whose_read_ahead_runs_on_is_neither_lost_nor_lent_to_the_next_trace(
        mounts, s3, bucket, proxy):
    """A read whose read-ahead outlasts the command's 10 s wait: the command said "0 FUSE
    read(s) traced" and nothing more, and the read's trace, recorded later, was shown by
    the next `cachefs trace` of the range as one of its own reads (its S3 GET the
    "dominant cost" of a read served from the SSD). A ^C during that wait left the
    daemon's capture running, collecting, with the reads' fast path off."""
    import signal

    # two chunks each, the first cached: a read's only GET is its read-ahead's
    put(s3, bucket, "k.bin", 2 * CHUNK)
    put(s3, bucket, "b.bin", 2 * CHUNK, seed=2)
    m = mounts(f"s3://{bucket}")
    for name in ("k.bin", "b.bin"):
        m.path(name).read_bytes()
        m.request({"op": "trace_evict", "ino": os.stat(m.path(name)).st_ino, "offset": CHUNK,
                   "length": CHUNK})
    # ^C while the command waits for its read's read-ahead: the capture goes with it
    proxy.reset()
    proxy.faults(delay=12.0, count=1)
    p = subprocess.Popen([sys.executable, "-m", "cachefs", "trace", str(m.path("b.bin"))],
                         env={**os.environ, **CREDS}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not proxy.stats(settle=0)["ops"].get("GetObject", 0):
        assert time.monotonic() < deadline, "the read-ahead reaching S3"
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    with pytest.raises(QuietError, match="no trace capture 1"):
        m.request({"op": "trace_capture_stop", "capture": 1, "wait": 0})
    # the command waits 10 s, then says the read is not shown, and why
    proxy.faults(delay=12.0, count=1)
    r = cli("trace", str(m.path("k.bin")))
    assert r.returncode == 0, r.stderr
    assert "  0 FUSE read(s) traced" in r.stdout, r.stdout
    assert "  1 read(s) not shown: their read-ahead was still running when the command " \
           "stopped waiting (10 s)" in r.stdout, r.stdout
    # at once again: this read is served from the SSD, and the earlier read is not in it
    res = trace_json(str(m.path("k.bin")))
    reads = [t for t in res["traces"] if "continues" not in t]
    assert len(reads) == 1 and res["chunks"][0]["tier"] == "local", res["chunks"]


def test_read_ahead_that_outlived_its_read_is_no_slow_request(mounts, s3, bucket, proxy):
    """A read served at once whose read-ahead then waited on S3: `trace --recent
    --slower-than` listed the read-ahead's trace as a read of that file, offset and size
    that took as long (`--slow` left it out), nothing in its line said it was background
    work, and a peer.serve's line showed no chunk, peer or result."""
    data = put(s3, bucket, "k.bin", 16 * CHUNK)
    m = mounts(f"s3://{bucket}", extra=("--no-page-cache",))
    proxy.reset()
    proxy.faults(delay=0.6, count=-1, skip=2)  # chunks 0 and 1 at once, the rest late
    fd = os.open(m.path("k.bin"), os.O_RDONLY)
    try:
        assert os.pread(fd, CHUNK, 0) == data[:CHUNK]  # chunk 1 read ahead
        time.sleep(0.3)
        # served from the read-ahead buffer at once; its read-ahead (chunks 2 and 3)
        # starts after it returned: a trace of its own
        assert os.pread(fd, CHUNK, CHUNK) == data[CHUNK:2 * CHUNK]
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while True:  # the read-ahead's trace is recorded once its GETs are in
        res = json.loads(cli("trace", "--recent", "50", "--json", "--mount",
                             str(m.mp)).stdout)
        late = [t for t in res if t.get("background")]
        if late and not any(t.get("incomplete") for t in late):
            break
        assert time.monotonic() < deadline, json.dumps(res)[:3000]
        time.sleep(0.2)
    assert max(t["duration_ms"] for t in late) >= 500, late
    r = cli("trace", "--recent", "50", "--slower-than", "400ms", "--json", "--mount", str(m.mp))
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout
    r = cli("trace", "--recent", "50", "--mount", str(m.mp))
    assert r.returncode == 0
    heads = [ln for ln in r.stdout.splitlines() if "(read-ahead that outlived read trace" in ln]
    assert heads and all(ln.endswith(": not a request)") for ln in heads), r.stdout
    proxy.clear_faults()


def test_a_follower_that_falls_behind_is_told_how_many_traces_it_lost(mounts, s3, bucket):
    """A `trace --follow` whose output is read slowly (a pager, a slow terminal): the
    daemon drops what it cannot take (reads never wait for it), and nothing told the
    user that the stream had gaps."""
    import signal

    put(s3, bucket, "k.bin", CHUNK)
    m = mounts(f"s3://{bucket}")
    read_direct(m.path("k.bin"), CHUNK)  # cached
    p = subprocess.Popen([sys.executable, "-m", "cachefs", "trace", "--follow", "--slower-than",
                          "0", "--json", "--mount", str(m.mp)], env={**os.environ, **CREDS},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shown: list[str] = []

    def take() -> None:
        for line in p.stdout:
            shown.append(line)

    def last_ones() -> int:  # the traces of the 3 reads at 4096, shown once it caught up
        return sum(1 for ln in list(shown) if json.loads(ln).get("offset") == 4096)

    reader = threading.Thread(target=take, daemon=True)
    try:
        deadline = time.monotonic() + 10
        while not m.request({"op": "trace_stats"})["tracer"]["followers"]:
            assert time.monotonic() < deadline, "the follower"
            time.sleep(0.05)
        fd = os.open(m.path("k.bin"), os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            for _ in range(6000):  # nobody reads the command's output meanwhile
                os.preadv(fd, [buf], 0)
            reader.start()
            # it catches up: no new line for half a second (the last reads' traces, had
            # they been dropped, would not be shown, and their count not told)
            before = -1
            while before != len(shown):
                before = len(shown)
                time.sleep(0.5)
            for _ in range(3):  # the next trace it gets comes after the count of those lost
                os.preadv(fd, [buf], 4096)
        finally:
            os.close(fd)
        wait_for(lambda: last_ones() == 3, 30, "the last 3 traces")
    finally:
        p.send_signal(signal.SIGINT)
        err = p.stderr.read()
        p.wait(timeout=30)
        reader.join(timeout=30)
        p.stdout.close()
        p.stderr.close()
    got = re.search(r"cachefs: (\d+) trace\(s\) not shown: this command did not keep up", err)
    assert got, err
    assert len(shown) + int(got.group(1)) == 6003, (len(shown), got.group(1))


def test_a_trace_command_whose_daemon_dies_mid_read_says_so_in_one_line(mounts, s3, bucket,
                                                                       proxy):
    """Closing the file of a mount whose daemon had died raised ENOTCONN outside the
    command's error handling: "internal error: OSError: [Errno 107] ..." An empty file had
    "--offset 0 is at or past the end" for an --offset nobody gave."""
    put(s3, bucket, "k.bin", 4 * CHUNK)
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    m = mounts(f"s3://{bucket}")
    r = cli("trace", str(m.path("empty")))
    assert r.returncode == 2 and r.stderr == (
        f"cachefs: error: {m.path('empty')} is empty: there is no read to trace\n"), r.stderr
    os.stat(m.path("k.bin"))
    proxy.reset()
    proxy.faults(delay=5.0, count=-1)
    try:
        p = subprocess.Popen([sys.executable, "-m", "cachefs", "trace", str(m.path("k.bin"))],
                             env={**os.environ, **CREDS}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not proxy.stats(settle=0)["ops"].get("GetObject"):
            assert time.monotonic() < deadline, "the read reaching S3"
            time.sleep(0.05)
        m.kill()
        _, err = p.communicate(timeout=30)
    finally:
        proxy.clear_faults()
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"cachefs: error: reading {m.path('k.bin')} failed: "), err
    assert "internal error" not in err


def test_failed_reads_are_in_the_read_latency_histogram(mounts, s3, bucket, proxy):
    """During an S3 outage the slowest reads are the ones that fail after their retry
    budget; they were left out of cachefs_fuse_request_duration_seconds{op="read"}, so a
    latency alert missed the outage (count 0, requests 1)."""
    put(s3, bucket, "f.bin", CHUNK)
    port = free_port()
    m = mounts(f"s3://{bucket}", extra=("--metrics-listen", f"127.0.0.1:{port}",
                                        "--s3-max-attempts", "1"))
    os.stat(m.path("f.bin"))
    proxy.faults(persistent_status=503)
    with pytest.raises(OSError):
        read_direct(m.path("f.bin"), CHUNK)
    proxy.clear_faults()
    met, _ = scrape(port)
    assert met['cachefs_fuse_requests_total{op="read"}'] >= 1
    assert met['cachefs_fuse_request_duration_seconds_count{op="read"}'] == \
        met['cachefs_fuse_requests_total{op="read"}']


def test_trace_counts_fuse_reads_not_the_read_ahead_that_outlived_them(mounts, s3, bucket):
    """Read-ahead that outlives its read is recorded as a trace of its own, with the read's
    inode and range: `cachefs trace` counted those as FUSE reads and added their time to the
    daemon's ("8 FUSE read(s) traced" for 6 reads)."""
    put(s3, bucket, "big.bin", 16 << 20)
    m = mounts(f"s3://{bucket}", chunk_size="2MiB")
    m.path("big.bin").read_bytes()  # warm
    res = trace_json(str(m.path("big.bin")), "--length", "6MiB")
    reads = [t for t in res["traces"] if "continues" not in t]
    assert len(reads) == 6  # 1 MiB O_DIRECT reads
    r = cli("trace", str(m.path("big.bin")), "--length", "6MiB")
    assert r.returncode == 0, r.stderr
    assert "  6 FUSE read(s) traced, daemon time " in r.stdout, r.stdout


def test_trace_cold_of_a_file_fetched_ahead_shows_the_miss(mounts, s3, bucket, proxy):
    """A reader opening a directory's small files in order gets the next ones fetched
    ahead into memory; `trace --cold` of one of those dropped its chunk from the SSD but
    not from that memory, and showed tier readahead 0.0 ms instead of the miss."""
    for i in range(30):
        put(s3, bucket, f"d/f{i:02d}", 4096, seed=i)
    m = mounts(f"s3://{bucket}")
    os.listdir(m.path("d"))
    for i in range(5):
        m.path(f"d/f{i:02d}").read_bytes()
    deadline = time.monotonic() + 10
    while m.counters().get("prefetch_started", 0) < 3:
        assert time.monotonic() < deadline, "prefetch started"
        time.sleep(0.05)
    gets = -1  # what prefetch fetched has arrived: S3 has served every GET, and no more
    while (n := proxy.stats()["ops"].get("GetObject", 0)) != gets:  # (none in flight)
        assert time.monotonic() < deadline, "what prefetch fetched has arrived"
        gets = n
        time.sleep(0.3)
    res = trace_json(str(m.path("d/f07")), "--cold")
    assert res["cold"]["dropped_bytes"] == 4096
    assert [c["tier"] for c in res["chunks"]] == ["s3"]


def test_a_read_that_waits_for_the_file_prefetcher_says_so(mounts, s3, bucket, proxy):
    """A read of a small file the prefetcher was fetching ahead waited for that fetch: its
    chunk row said tier "wait" and nothing more, which names no one to blame."""
    for i in range(12):
        put(s3, bucket, f"p/f{i:02d}", 4096, seed=40 + i)
    m = mounts(f"s3://{bucket}")
    os.listdir(m.path("p"))
    proxy.reset()
    proxy.faults(delay=3.0, count=-1, key_filter="p/f06")  # slow to fetch, ahead or not
    try:
        for i in range(4):  # in name order: the prefetcher fetches the next files
            m.path(f"p/f{i:02d}").read_bytes()
        deadline = time.monotonic() + 10
        while not proxy.gets("p/f06"):
            assert time.monotonic() < deadline, "the prefetcher's GET of p/f06"
            time.sleep(0.05)
        res = trace_json(str(m.path("p/f06")))
    finally:
        proxy.clear_faults()
    row = res["chunks"][0]
    assert row["tier"] == "prefetch", res["chunks"]
    assert row["detail"].startswith("waited ") and "for the file prefetcher" in row["detail"]


def test_otlp_encodes_a_peers_non_finite_figures_without_failing():
    """A NaN or infinite duration in a peer's spans (a buggy or damaged member) raised
    ValueError in the exporter, outside its error handling: it ended the daemon."""
    from cachefs.otlp import to_otlp

    body = to_otlp([{"name": "read", "start_time": 1e9, "duration_ms": 3.0,
                     "spans": [{"name": "peer", "start_ms": float("nan"),
                                "duration_ms": float("inf"), "ttfb_ms": float("nan")}]}], "n")
    spans = json.loads(json.dumps(body, allow_nan=False))["resourceSpans"][0][
        "scopeSpans"][0]["spans"]
    peer = next(s for s in spans if s["name"] == "peer")
    assert peer["startTimeUnixNano"] == peer["endTimeUnixNano"] == str(10**18)
    assert {"key": "cachefs.ttfb_ms", "value": {"stringValue": "nan"}} in peer["attributes"]


def test_idle_metrics_clients_hold_no_more_than_a_few_descriptors(mounts, s3, bucket):
    """Clients that connect to /metrics and say nothing were queued without a time limit,
    each holding a file descriptor: enough of them, from any local user or the network,
    and the daemon's chunk writes, S3 and peer connections failed with EMFILE. Now at most
    16 are served at once, the one that has waited longest for its request makes room for
    a new client, and scrapes answer while the idle clients stay connected."""
    import socket

    data = put(s3, bucket, "f.bin", 4 * CHUNK)
    port = free_port()
    m = mounts(f"s3://{bucket}", extra=("--metrics-listen", f"127.0.0.1:{port}"))
    os.stat(m.path("f.bin"))
    fds = lambda: len(os.listdir(f"/proc/{m.proc.pid}/fd"))  # noqa: E731
    before = fds()
    idle = []
    try:
        for _ in range(120):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        wait_for(lambda: fds() <= before + 16 + 4, 10, "the idle connections closed")
        assert m.path("f.bin").read_bytes() == data
        assert scrape(port)[0]["cachefs_s3_bytes_total"] == len(data)  # idle ones still there
        assert m.counters()["metrics_idle_connections_closed"] >= 100
        # a burst of clients, each slow to send its request, while idle ones hold every
        # slot: each closes another idle one (they all closed the same one, and all but one
        # were refused after 0.5 s)
        burst = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
        idle.extend(burst)
        time.sleep(1)  # longer than a newcomer waits for a slot
        for c in burst:
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: cachefs\r\n\r\n")
        answers = [_receive_all(c) for c in burst]
        assert [a[:12] for a in answers] == [b"HTTP/1.1 200"] * len(burst)
    finally:
        for c in idle:
            c.close()
    assert "Too many open files" not in m.log_text()


def _receive_all(sock) -> bytes:
    """What a server sends until it closes (b"" if it resets the connection)."""
    sock.settimeout(10)
    out = b""
    try:
        while data := sock.recv(65536):
            out += data
    except ConnectionResetError:
        return b""
    return out


def test_trace_cold_warm_metrics_otlp_no_credentials(mounts, s3, bucket, proxy):
    size = 3 * CHUNK + 1000
    put(s3, bucket, "dir/a.bin", size, seed=1)
    put(s3, bucket, "dir/b.bin", 2 * CHUNK, seed=2)
    port = free_port()
    rx = Receiver()
    canary = {"AWS_ACCESS_KEY_ID": CANARY_KEY, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
              "CACHEFS_OTLP_ENDPOINT": rx.url}
    try:
        m = mounts(f"s3://{bucket}", env=canary,
                   extra=("--log-level", "DEBUG", "--metrics-listen", f"127.0.0.1:{port}"))
        env = {**canary}

        # metrics match known work: a cold read of one whole object
        with open(m.path("dir/a.bin"), "rb") as f:
            assert len(f.read()) == size
        met, text = scrape(port)
        assert met["cachefs_s3_bytes_total"] == size
        assert met['cachefs_chunk_reads_total{tier="s3"}'] == 4
        assert met['cachefs_s3_requests_total{op="GET"}'] == proxy.gets() == 4
        assert met['cachefs_fuse_requests_total{op="read"}'] >= 1
        assert met['cachefs_fuse_request_duration_seconds_count{op="read"}'] >= 1
        # the cache counts what its chunk files take on disk (header, whole 4 KiB blocks)
        assert met["cachefs_cache_used_bytes"] == 3 * file_size(CHUNK) + file_size(1000)
        assert met["cachefs_cache_limit_bytes"] > 0
        assert "cachefs_in_flight_fetches" in met and "cachefs_evictions_total" in met

        # cold: the chunk comes from S3, with TTFB, transfer time and bytes
        cold = trace_json(str(m.path("dir/b.bin")), "--length", "64KiB", "--cold", env=env)
        assert cold["bytes_read"] == CHUNK and cold["traces"]
        assert cold["cold"]["chunks"] == 1
        assert cold["chunks"][0]["chunk"] == 0 and cold["chunks"][0]["tier"] == "s3"
        gets = [s for t in cold["traces"] for s in all_spans(t) if s["name"] == "s3.get"]
        g0 = [g for g in gets if g["offset"] == 0]
        assert len(g0) == 1, gets
        assert g0[0]["bytes"] == CHUNK and g0[0]["ttfb_ms"] > 0 and g0[0]["status"] == 206
        assert g0[0]["tier"] == "s3" and "transfer_ms" in g0[0] and g0[0]["retries"] == 0
        assert cold["dominant"]["name"]
        # warm: a local SSD read, no S3 span at all
        warm = trace_json(str(m.path("dir/b.bin")), "--length", "64KiB", env=env)
        spans = [s for t in warm["traces"] for s in all_spans(t)]
        assert warm["chunks"][0]["tier"] == "local"
        assert any(s["name"] == "ssd.read" and s.get("tier") == "local" for s in spans)
        assert not [s for s in spans if s["name"].startswith("s3.")]
        # a --cold re-read shows the miss path again
        again = trace_json(str(m.path("dir/b.bin")), "--length", "64KiB", "--cold", env=env)
        assert again["chunks"][0]["tier"] == "s3"
        # the human tree names tiers and marks the dominant cost
        r = cli("trace", str(m.path("dir/b.bin")), "--length", "64KiB", "--cold", env=env)
        assert r.returncode == 0, r.stderr
        assert "tier=s3" in r.stdout and "◀ dominant" in r.stdout and "ttfb" in r.stdout
        # a pinned chunk is kept: a diagnostic does not take it out of its data set
        lst = m.tmp / "pin.txt"
        lst.write_text(str(m.path("dir/b.bin")) + "\n")
        assert cli("preload", "--file-list", str(lst), "--pin", env=env).returncode == 0
        r = cli("trace", str(m.path("dir/b.bin")), "--length", "64KiB", "--cold", env=env)
        assert r.returncode == 0 and "kept 1 pinned chunk(s)" in r.stdout, r.stdout
        st = cli("status", "--file-list", str(lst), "--json", env=env)
        assert json.loads(st.stdout)["pinned_bytes"] == m.path("dir/b.bin").stat().st_size

        recent = cli("trace", "--recent", "50", "--json", "--mount", str(m.mp), env=env)
        assert recent.returncode == 0, recent.stderr
        mine = [t for t in json.loads(recent.stdout) if t.get("path") == "/dir/a.bin"]
        assert mine and {t.get("pid") for t in mine} == {os.getpid()}  # the opener's

        # OTLP: finished traces arrive as OTLP/HTTP JSON
        deadline = time.monotonic() + 10
        while not rx.bodies and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rx.bodies and rx.bodies[0][0] == "/v1/traces"
        names = {s["name"] for _, b in rx.bodies
                 for rs in json.loads(b)["resourceSpans"] for ss in rs["scopeSpans"]
                 for s in ss["spans"]}
        assert {"read", "chunk", "s3.get"} <= names
        wait_until = time.monotonic() + 10
        while scrape(port)[0].get("cachefs_otlp_exported_total", 0) < 1:
            assert time.monotonic() < wait_until, "cachefs_otlp_exported_total"
            time.sleep(0.05)

        # no credential in the log, traces, metrics, OTLP payloads or argv
        _, text = scrape(port)
        otlp = b"".join(b for _, b in rx.bodies).decode()
        with open(f"/proc/{m.proc.pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        log = m.log.read_text(errors="replace")
        assert "DEBUG" in log
        for name, blob in (("log", log), ("recent traces", recent.stdout), ("metrics", text),
                           ("otlp", otlp), ("cmdline", cmdline),
                           ("trace output", r.stdout + json.dumps(cold))):
            assert CANARY_KEY not in blob, name
            assert CANARY_SECRET not in blob, name
            assert "canarysecret" not in blob.lower(), name
    finally:
        rx.close()


def read_direct(path, size: int, offset: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)
        assert os.preadv(fd, [buf], offset) == size
    finally:
        os.close(fd)


def read_at_once(paths) -> None:
    """One O_DIRECT read of a chunk of each path, all at the same time."""
    ts = [threading.Thread(target=read_direct, args=(p, CHUNK)) for p in paths]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def recent_spans(m, name: str) -> list[dict]:
    """The spans called ``name`` in the mount's last 10 traces."""
    recent = json.loads(cli("trace", "--recent", "10", "--json", "--mount", str(m.mp)).stdout)
    return [s for t in recent for s in all_spans(t) if s["name"] == name]


def test_a_wait_for_another_fetch_names_whose_it_is(mounts, s3, bucket, proxy, tmp_path):
    """A read that waited for a fetch another request had started showed a bare
    `singleflight.wait 500 ms`: nothing said whose fetch it was (another reader's, a
    preload's)."""
    put(s3, bucket, "w.bin", CHUNK, seed=3)
    put(s3, bucket, "p.bin", CHUNK, seed=4)
    m = mounts(f"s3://{bucket}", extra=("--prefetch-files", "0"))
    for name in ("w.bin", "p.bin"):
        m.path(name).stat()
    proxy.faults(delay=2.0, count=-1)  # (the second read comes while the first fetches)
    read_at_once([m.path("w.bin")] * 2)  # one cold chunk, two readers: one fetches it
    recent = json.loads(cli("trace", "--recent", "10", "--json", "--mount", str(m.mp)).stdout)
    waits = [s for t in recent for s in all_spans(t) if s["name"] == "singleflight.wait"]
    fetched = [t for t in recent if any(s["name"] == "s3.get" for s in all_spans(t))]
    assert len(waits) == 1 and len(fetched) == 1, recent
    assert waits[0]["holder"] == f"read /w.bin (trace {fetched[0]['trace_id']})", waits
    # a read of a chunk a preload is fetching (its GET slow enough for the read to come
    # while it is under way on a loaded machine: with 0.5 s the read sometimes came after)
    proxy.clear_faults()
    proxy.faults(delay=3.0, count=-1)
    lst = tmp_path / "p.txt"
    lst.write_text("p.bin\n")
    p = subprocess.Popen([sys.executable, "-m", "cachefs", "preload", "--file-list", str(lst),
                          "--mount", str(m.mp)], env={**os.environ, **CREDS},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # (its GET of p.bin, delayed: any request in flight, a listing, was taken for it)
        wait_for(lambda: proxy.gets("p.bin", settle=0) >= 1, 20, "the preload's GET")
        read_direct(m.path("p.bin"), CHUNK)
    finally:
        assert p.wait(timeout=60) == 0
    proxy.clear_faults()
    holders = [s.get("holder") for s in recent_spans(m, "singleflight.wait")]
    assert "preload" in holders, holders
    r = cli("trace", "--recent", "10", "--mount", str(m.mp))
    assert "singleflight.wait #0 holder=preload" in r.stdout, r.stdout


def test_a_wait_for_an_s3_connection_slot_is_its_own_span(mounts, s3, bucket, proxy,
                                                            tmp_path):
    """With every S3 connection slot taken, a GET's wait for one was counted as the GET's
    own time (s3.get 1012 ms = ttfb 506 + transfer 0.3, and 507 ms of nothing): the trace
    blamed S3 for the daemon's own queue."""
    put(s3, bucket, "a.bin", CHUNK, seed=1)
    put(s3, bucket, "b.bin", CHUNK, seed=2)
    (tmp_path / "c.toml").write_text("[s3]\nmax_concurrency = 1\n")
    m = mounts(f"s3://{bucket}", config=str(tmp_path / "c.toml"))
    os.stat(m.path("a.bin"))
    os.stat(m.path("b.bin"))
    proxy.faults(delay=2.0, count=2)  # (room for the two reads to arrive apart)
    read_at_once([m.path(n) for n in ("a.bin", "b.bin")])
    gets = recent_spans(m, "s3.get")
    assert len(gets) == 2
    waited = max(gets, key=lambda s: s["duration_ms"])
    waits = [c for c in waited.get("spans", ()) if c["name"] == "s3.slot_wait"]
    assert len(waits) == 1 and waits[0]["slots"] == 1
    assert waits[0]["duration_ms"] >= 1000  # the other GET's injected 2 s
    unexplained = (waited["duration_ms"] - waited["ttfb_ms"] - waited["transfer_ms"]
                   - waits[0]["duration_ms"])
    assert unexplained < 500, waited  # (the whole wait before)


def test_a_new_connection_to_s3_is_its_own_span(mounts, s3, bucket):
    """GETs at once need more connections than the one the start opened: each TCP (and
    TLS) connect was its GET's time to first byte, blamed on S3."""
    for i in range(4):
        put(s3, bucket, f"c{i}.bin", CHUNK, seed=i)
    m = mounts(f"s3://{bucket}", extra=("--prefetch-files", "0"))
    read_at_once([m.path(f"c{i}.bin") for i in range(4)])
    gets = recent_spans(m, "s3.get")
    connects = [c for g in gets for c in g.get("spans", ()) if c["name"] == "s3.connect"]
    assert connects and connects[0]["tls"] is False, gets


def test_signing_that_fetches_credentials_is_not_s3s_time(mounts, s3, bucket, tmp_path):
    """Credentials that expire within botocore's refresh window (an instance role's, a
    credential_process's) are fetched again when a request is signed: the 0.4 s that took
    was the GET's time to first byte, blamed on S3."""
    from test_security import _no_static_credentials

    helper = tmp_path / "creds.sh"
    helper.write_text("""#!/bin/sh
sleep 0.4
exp=$(date -u -d '+5 min' +%Y-%m-%dT%H:%M:%SZ)
printf '{"Version": 1, "AccessKeyId": "procKey", "SecretAccessKey": "procSecret",
  "SessionToken": "procToken", "Expiration": "%s"}' "$exp"
""")
    helper.chmod(0o700)
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\ncredential_process = {helper}\n")
    data = put(s3, bucket, "signed.bin", 2 * CHUNK)
    env = _no_static_credentials(tmp_path, AWS_CONFIG_FILE=str(config),
                                 AWS_EC2_METADATA_DISABLED="true")
    m = mounts(f"s3://{bucket}", env=env)
    with open(m.path("signed.bin"), "rb") as f:
        assert f.read(CHUNK) == data[:CHUNK]  # (botocore's GET: how cachefs's are built)
        assert f.read() == data[CHUNK:]
    gets = recent_spans(m, "s3.get")
    assert len(gets) == 2 and m.counters()["s3_get_direct"] == 1, gets
    direct = [g for g in gets if g["offset"] == CHUNK][0]
    assert direct.get("sign_ms", 0) >= 350 and direct["ttfb_ms"] < 350, gets
    r = cli("trace", "--recent", "10", "--mount", str(m.mp))
    assert re.search(r"s3\.get tier=s3 64\.0 KiB sign \d+(\.\d+)? ms ttfb", r.stdout), r.stdout


def test_a_wait_for_a_disk_thread_is_shown_as_queued_not_as_the_ssds(mounts, s3, bucket):
    """Reads of cached chunks queued for the daemon's 8 disk threads (busy with other
    reads, writes, unlinks): the wait was the ssd.read's own time, blamed on the SSD."""
    for i in range(10):
        put(s3, bucket, f"f{i}", CHUNK, seed=i)
    # (no file prefetcher: a file it read ahead would be served from memory, no ssd.read)
    m = mounts(f"s3://{bucket}", env={"CACHEFS_TEST_DISK_DELAY": "0.3"},
               extra=("--prefetch-files", "0"))
    for i in range(10):
        read_direct(m.path(f"f{i}"), CHUNK)  # cached
    read_at_once([m.path(f"f{i}") for i in range(10)])
    reads = recent_spans(m, "ssd.read")
    assert len(reads) == 10, reads
    queued = sorted(s.get("queued_ms", 0) for s in reads)
    assert queued[-1] >= 150 and queued[0] < 100, queued  # 2 of 10 waited for a thread
    r = cli("trace", "--recent", "10", "--mount", str(m.mp))
    assert re.search(r"ssd\.read tier=local 64\.0 KiB queued \d+(\.\d+)? ms", r.stdout), \
        r.stdout


# -- trace PATH: a relative PATH ------------------------------------------------------------


def trace_in(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachefs", "trace", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **CREDS},
                          timeout=60)


def test_trace_a_relative_path(mounts, s3, bucket, tmp_path):
    """`trace top.txt --mount MP` from outside the mount read ./top.txt and failed; a
    relative PATH is now taken from the mount's root when the current directory is not
    inside the mount (as file lists take it), and from the current directory when it is."""
    put(s3, bucket, "top.txt", 1000, seed=7)
    put(s3, bucket, "dir/sub.bin", 3000, seed=8)
    m = mounts(f"s3://{bucket}")
    (tmp_path / "top.txt").write_text("a local file of that name is not the mount's\n")
    r = trace_in(tmp_path, "top.txt", "--json", "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["path"] == f"{m.mp}/top.txt" and res["bytes_read"] == 1000, res
    assert res["traces"] and res["mountpoint"] == str(m.mp)
    for args in (("--mount", str(m.mp)), ()):  # inside the mount: from the current directory
        r = trace_in(m.path("dir"), "sub.bin", "--json", *args)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["path"] == f"{m.mp}/dir/sub.bin" and res["bytes_read"] == 3000, res
    r = trace_in(tmp_path, "nothing.txt", "--mount", str(m.mp))
    assert r.returncode == 2 and r.stderr == \
        f"cachefs: error: {m.mp}/nothing.txt: No such file or directory\n", r.stderr
    # a file outside the mount named with --mount is not traced as if it were in it
    r = trace_in(tmp_path, str(tmp_path / "top.txt"), "--mount", str(m.mp))
    assert r.returncode == 2 and r.stderr == (f"cachefs: error: {tmp_path}/top.txt is not "
                                              f"inside the cachefs mount {m.mp}\n"), r.stderr


def test_recent_says_when_filters_leave_nothing(mounts, s3, bucket):
    """`--recent 2 --path-prefix /nonexistent` said "no traces yet" although traces were
    kept and only filtered out."""
    put(s3, bucket, "t.bin", CHUNK, seed=9)
    m = mounts(f"s3://{bucket}")
    mp = str(m.mp)
    kept = m.request({"op": "trace_stats"})["tracer"]["recent_kept"]
    if not kept:  # nothing traced yet: that is what it says, filter or not
        r = cli("trace", "--recent", "2", "--path-prefix", "/nonexistent", "--mount", mp)
        assert r.returncode == 0 and r.stdout == "no traces yet\n", r.stdout
    read_direct(m.path("t.bin"), CHUNK)
    kept = m.request({"op": "trace_stats"})["tracer"]["recent_kept"]
    assert kept >= 1
    kept_s = f"{kept} recent trace{'' if kept == 1 else 's'} kept"
    r = cli("trace", "--recent", "2", "--path-prefix", "/nonexistent", "--mount", mp)
    assert r.returncode == 0 and r.stdout == f"none of the {kept_s} is under /nonexistent\n", \
        r.stdout
    r = cli("trace", "--recent", "2", "--slower-than", "1h", "--path-prefix", f"{mp}/nope",
            "--mount", mp)
    assert r.returncode == 0 and r.stdout == (
        f"none of the {kept_s} is under {mp}/nope and at least 1h long\n"), r.stdout
    r = cli("trace", "--recent", "2", "--path-prefix", "/t.bin", "--mount", mp)
    assert r.returncode == 0 and r.stdout.startswith("read /t.bin offset 0"), r.stdout
    # whole components: /t.bi is not a directory /t.bin lies under
    r = cli("trace", "--recent", "2", "--path-prefix", "/t.bi", "--mount", mp)
    assert r.returncode == 0 and r.stdout == f"none of the {kept_s} is under /t.bi\n", r.stdout
    r = cli("trace", "--recent", "2", "--path-prefix", f"{mp}/", "--mount", mp)
    assert r.returncode == 0 and "\nread /t.bin offset 0" in r.stdout, r.stdout  # all of it
    # the mount reached through a symlink (it matched nothing)
    (m.tmp / "link").symlink_to(m.mp)
    r = cli("trace", "--recent", "2", "--path-prefix", str(m.tmp / "link" / "t.bin"),
            "--mount", mp)
    assert r.returncode == 0 and r.stdout.startswith("read /t.bin offset 0"), r.stdout
    # a path not normalised (it matched nothing); a typo given to --follow, which waited
    # for ever showing nothing, and a relative path typed outside the mount: refused
    r = cli("trace", "--recent", "2", "--path-prefix", "/x/../t.bin", "--mount", mp)
    assert r.returncode == 0 and r.stdout.startswith("read /t.bin offset 0"), r.stdout
    for bad, says in ((f"{mp}-typo/t.bin", "neither a path inside the mount"),
                      ("./t.bin", "is not inside the mount")):
        r = cli("trace", "--follow", "--path-prefix", bad, "--mount", mp, cwd=m.tmp,
                timeout=30)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.splitlines()) == 1, \
            (r.returncode, r.stderr)
    # more than one batch of traces (64), the last n in order, filtered before the n
    fd = os.open(m.path("t.bin"), os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 512)
        for k in range(100):
            assert os.preadv(fd, [buf], 512 * k) == 512
    finally:
        os.close(fd)
    got = m.request({"op": "trace_recent", "n": 90, "path_prefix": "/t.bin"})["traces"]
    assert [t["offset"] for t in got if t["name"] == "read"][-80:] == \
        [512 * k for k in range(20, 100)]
    assert len(got) == 90 and all(t["path"] == "/t.bin" for t in got)
    assert m.request({"op": "trace_recent", "n": 90, "slower_than": 3600})["traces"] == []
    every = m.request({"op": "trace_recent", "n": 1000})["traces"]
    assert len(every) == m.request({"op": "trace_stats"})["tracer"]["recent_kept"] > 100


def test_reads_served_from_the_handles_chunk_keep_their_trace(mounts, s3, bucket):
    """A sequential reader's requests that its handle serves from the chunk it holds are
    recorded as one compact object each (what tracing cost at 128 KiB requests): they show
    in `trace --recent` as any read does, with their chunk span, and in the counters and
    the latency histogram; a follower still gets them whole."""
    data = put(s3, bucket, "q.bin", 2 * CHUNK, seed=4)
    m = mounts(f"s3://{bucket}")
    before = m.counters()
    fd = os.open(m.path("q.bin"), os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        for k in range(8):
            assert os.preadv(fd, [buf], 4096 * k) == 4096 and buf[:] == data[4096 * k:][:4096]
    finally:
        os.close(fd)
    # the first read's trace is recorded once the read-ahead it started has ended
    deadline = time.monotonic() + 10
    while (st := m.request({"op": "trace_stats"})["tracer"])["started"] != st["finished"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    got = m.request({"op": "trace_recent", "n": 20, "path_prefix": "/q.bin"})["traces"]
    reads = sorted((t for t in got if t["name"] == "read"), key=lambda t: t["offset"])
    assert [t["offset"] for t in reads] == [4096 * k for k in range(8)], got
    first, served = reads[0], reads[1:]
    assert {s.get("tier") for s in first["spans"]} != {"readahead"}  # not from the buffer
    for t in served:
        assert [(s["name"], s["tier"], s["chunk"], s["bytes"], s["spans"]) for s in t["spans"]] \
            == [("chunk", "readahead", 0, CHUNK, [])], t
        assert set(t) == set(first) and t["size"] == 4096 and t["path"] == "/q.bin", t
        assert t["ino"] == first["ino"] and t["pid"] == first["pid"] == os.getpid()
        assert 0 <= t["start_time"] <= t["wall_time"] and t["duration_ms"] >= 0
    assert len({t["trace_id"] for t in reads}) == 8
    c = m.counters()
    assert c["readahead_hits"] - before.get("readahead_hits", 0) == 7
    assert c["fuse_read_bytes"] - before.get("fuse_read_bytes", 0) == 8 * 4096


def test_trace_of_a_read_that_fails_is_one_line(mounts, s3, bucket, proxy):
    """A read that failed in the middle of `trace PATH` (S3 refusing the GET: EACCES) ended in
    "internal error: BufferError" (the buffer was closed with a view of it still held)."""
    put(s3, bucket, "f.bin", 2 * CHUNK, seed=10)
    m = mounts(f"s3://{bucket}")
    path = str(m.path("f.bin"))
    os.stat(path)
    proxy.faults(persistent_status=403)
    try:
        r = cli("trace", path, "--cold")
    finally:
        proxy.clear_faults()
    assert r.returncode == 1 and r.stderr == (
        f"cachefs: error: reading {path} failed: Permission denied\n"), r.stderr


def test_trace_of_a_failing_read_still_prints_its_trace(mounts, s3, bucket, proxy):
    """A read that failed (S3 answering 500, or the object changed in S3) under `trace
    PATH` printed one error line and threw away the trace it had captured: the trace of
    a failing read, the one most wanted, was never shown.  It is printed now (text and
    --json), with the error in it, before the error line and exit code 1."""
    for key, seed in (("f.bin", 10), ("g.bin", 12), ("h.bin", 14), ("k.bin", 15)):
        put(s3, bucket, key, 2 * CHUNK, seed=seed)
    m = mounts(f"s3://{bucket}", extra=("--s3-max-attempts", "2"))
    path, other, changed = (str(m.path(k)) for k in ("f.bin", "h.bin", "g.bin"))
    for p in (path, other, changed):
        os.stat(p)
    failed = "Input/output error"
    proxy.faults(status=500, count=-1)
    try:
        r = cli("trace", path, "--cold")
        j = cli("trace", other, "--cold", "--json")
    finally:
        proxy.clear_faults()
    for x, p in ((r, path), (j, other)):
        assert x.returncode == 1 and x.stderr == (
            f"cachefs: error: reading {p} failed: {failed}\n"), x.stderr
    assert r.stdout.startswith(f"{path}  bytes 0–65535 (64.0 KiB): read failed after "), r.stdout
    assert f" ms: {failed} (0 bytes read)\n" in r.stdout, r.stdout
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("read /f.bin ")][0].endswith(
        "error=EIO"), r.stdout  # what the FUSE read answered
    assert "S3 GET failed: S3Error after 2 attempts" in r.stdout, r.stdout  # the chunk row
    assert "s3.get tier=s3 attempts=2 retries=1 error=S3Error" in r.stdout, r.stdout
    assert "s3.backoff attempt=1 reason=500 InternalError" in r.stdout, r.stdout
    assert "◀ dominant" in r.stdout, r.stdout
    res = json.loads(j.stdout)
    assert res["error"] == failed and res["bytes_read"] == 0 and res["traces"], res
    gets = [s for t in res["traces"] for s in all_spans(t) if s["name"] == "s3.get"
            and s["offset"] == 0]
    assert gets and all(g["error"] == "S3Error" and g["attempts"] == 2 for g in gets), res
    assert res["chunks"][0]["chunk"] == 0 and res["chunks"][0]["tier"] == "s3", res["chunks"]
    assert [t["error"] for t in res["traces"] if t["name"] == "read"] == ["EIO"], res

    # the object was overwritten in S3 after it was listed: its GET (If-Match) fails
    put(s3, bucket, "g.bin", 2 * CHUNK, seed=13)
    r = cli("trace", changed, "--cold")
    assert r.returncode == 1 and r.stderr == (
        f"cachefs: error: reading {changed} failed: {failed}\n"), r.stderr
    assert f" ms: {failed} (0 bytes read)\n" in r.stdout, r.stdout
    assert "s3.get tier=s3 error=ObjectChanged" in r.stdout, r.stdout

    # a range of two chunks, the first cached, the second failing: the failed chunk is
    # in the chunk table (it was cut off at the bytes read, and only the tree had it)
    fd = os.open(m.path("k.bin"), os.O_RDONLY | os.O_DIRECT)
    try:  # not at offset 0: no read-ahead of chunk 1
        buf = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [buf], 4096) == 4096
    finally:
        os.close(fd)
    proxy.faults(status=500, count=-1)
    try:
        j = cli("trace", str(m.path("k.bin")), "--length", str(2 * CHUNK), "--json")
    finally:
        proxy.clear_faults()
    assert j.returncode == 1, j.stderr
    res = json.loads(j.stdout)
    assert res["bytes_read"] < 2 * CHUNK and res["error"] == failed, res
    assert [(c["chunk"], c["tier"]) for c in res["chunks"]] == [(0, "local"), (1, "s3")], \
        res["chunks"]


def test_control_characters_in_a_path_are_printed_escaped(mounts, s3, bucket, tmp_path):
    """A key is a legal file name with an ESC in it (docs/reliability.md); `trace` and
    `status` wrote it raw, so the terminal ran its escape sequence."""
    key = "ctl/esc\x1b[2Jred"
    put(s3, bucket, key, CHUNK, seed=11)
    m = mounts(f"s3://{bucket}")
    shown = "ctl/esc\\x1b[2Jred"
    r = cli("trace", str(m.path(key)))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and r.stdout.startswith(f"{m.mp}/{shown}  bytes 0–"), r.stdout
    r = cli("trace", "--recent", "5", "--mount", str(m.mp))
    assert r.returncode == 0 and "\x1b" not in r.stdout and f"read /{shown} offset" in r.stdout
    lst = tmp_path / "l.txt"
    lst.write_text(key + "\n")
    r = cli("status", "--file-list", str(lst), "--mount", str(m.mp))
    assert r.returncode == 0 and "\x1b" not in r.stdout and f"{m.mp}/{shown}\n" in r.stdout
    res = json.loads(cli("status", "--file-list", str(lst), "--mount", str(m.mp),
                         "--json").stdout)
    assert res["files"][0]["path"] == f"{m.mp}/{key}"  # --json keeps the name as it is


def test_a_peers_names_and_error_text_in_a_trace_are_printed_escaped(mounts, s3, bucket):
    """`trace PATH` wrote node names (in etcd mode, keys any etcd writer registers) and a
    peer's error text (an unauthenticated error frame) raw: in the chunk rows, the --cold
    lines and the error line, so any host could make the terminal run escape sequences."""
    import socket

    from test_cluster_datasets import EVIL, SHOWN, EvilPeer

    evil_name = f"n1{EVIL}"
    data, owned = put_owned(s3, bucket, "e.bin", ["n0", evil_name], evil_name)
    off = str(owned[0] * CHUNK)
    evil = EvilPeer(EVIL)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        m = mounts(f"s3://{bucket}", name="n0", env={"CACHEFS_PEER_SECRET": SECRET},
                   extra=("--node-id", "n0", "--peer-listen", f"127.0.0.1:{port}", "--peers",
                          f"n0=127.0.0.1:{port},{evil_name}=127.0.0.1:{evil.port}"))
        path = str(m.path("e.bin"))
        # the read asks the owner, which answers with an error frame: S3 serves the chunk
        r = cli("trace", path, "--offset", off, "--length", "64KiB")
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout + r.stderr, r.stdout
        assert f"peer n1{SHOWN} failed (" in r.stdout, r.stdout  # the chunk row
        # --cold asks every node to drop the range: the evil node's answer is its error text
        r = cli("trace", path, "--offset", off, "--length", "64KiB", "--cold")
        assert r.returncode == 1, r.stderr
        assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout + r.stderr, r.stdout
        why = f"peer 127.0.0.1:{evil.port}: {SHOWN}"
        assert f"  --cold: node n1{SHOWN}: " in r.stdout and why in r.stdout, r.stdout
        err = r.stderr.splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"cachefs: error: --cold could not drop the range's chunks on node n1{SHOWN} ("), err
        assert why in err[0], err
        with open(path, "rb") as f:
            assert f.read() == data
    finally:
        evil.close()


def test_text_of_a_peers_spans_is_printed_escaped():
    """The spans a peer sends back (its `peer.serve` trace) are its text: span names,
    node names and attribute values of any type.  The tree (`trace PATH`, `--recent`,
    `--follow`) and the chunk rows wrote them raw."""
    from cachefs.cli_trace import chunk_rows, render_capture

    e, shown = "\x1b]0;owned\x07", "\\x1b]0;owned\\x07"
    get = {"name": "s3.get", "duration_ms": 1.5, "ttfb_ms": f"1{e}", "transfer_ms": 0.1,
           "status": f"206{e}", "bytes": f"9{e}", "chunk": f"3{e}"}
    odd = {"name": f"ssd.write{e}", "duration_ms": 0.2}
    serve = {"name": "peer.serve", "duration_ms": 2.0, "node": f"n0{e}", "spans": [get, odd]}
    peer = {"name": "peer", "node": f"n0{e}", "tier": "peer", "duration_ms": 2.5,
            "spans": [serve]}
    t = {"name": "read", "path": "/a", "offset": 0, "size": 10, "duration_ms": 3.0,
         "node": "n1", "trace_id": "1-1", "spans": [
             {"name": "chunk", "chunk": 0, "tier": "peer", "duration_ms": 2.9,
              "spans": [peer]}]}
    res = {"path": "/mnt/a", "offset": 0, "length": 10, "bytes_read": 10, "elapsed_ms": 3.1,
           "direct": True, "traces": [t], "chunks": chunk_rows([t], "n1", CHUNK, 0, 10),
           "dominant": {"name": f"ssd.write{e}", "self_ms": 0.2, "duration_ms": f"0.2{e}",
                        "node": f"n0{e}"}}
    out = render_capture(res)
    assert "\x1b" not in out and "\x07" not in out, out
    assert f"node n0{shown}" in out and f"on n0{shown}: S3 GET ttfb 1{shown} ms" in out, out
    assert f"peer.serve node=n0{shown}" in out and f"─ ssd.write{shown} " in out, out
    assert f"s3.get #3{shown} bytes=9{shown} ttfb 1{shown} ms" in out, out
    assert f"dominant cost: ssd.write{shown} node=n0{shown} — self 0.2 ms of 0.2{shown}" in out, \
        out


# -- --follow shows slow reads only ---------------------------------------------------------


def follow(m, slower_than: str) -> subprocess.Popen:
    """`cachefs trace --follow --slower-than ...` running, its output piped."""
    return subprocess.Popen([sys.executable, "-m", "cachefs", "trace", "--follow",
                             "--slower-than", slower_than, "--mount", str(m.mp)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **CREDS})


def test_follow_shows_slow_reads_only(mounts, s3, bucket, proxy):
    put(s3, bucket, "fast.bin", CHUNK, seed=3)
    put(s3, bucket, "slow.bin", CHUNK, seed=4)
    m = mounts(f"s3://{bucket}")
    with open(m.path("fast.bin"), "rb") as f:
        f.read()  # cached now; the read below is warm (O_DIRECT: reaches the daemon)
    os.stat(m.path("slow.bin"))
    p = follow(m, "200ms")
    lines: list[str] = []

    def take() -> None:
        for line in p.stdout:
            lines.append(line)

    reader = threading.Thread(target=take, daemon=True)
    try:
        assert "following traces over 200.0 ms" in p.stderr.readline()
        reader.start()
        proxy.faults(delay=0.5, count=1)
        for name in ("fast.bin", "slow.bin"):
            read_direct(m.path(name), CHUNK)
        wait_for(lambda: any("/slow.bin" in ln for ln in list(lines)), 10, "the slow read")
    finally:
        p.terminate()
        p.wait(timeout=10)
        reader.join(timeout=10)
        p.stdout.close()
        p.stderr.close()
    out = "".join(lines)
    assert "/slow.bin" in out and "s3.get" in out
    assert "/fast.bin" not in out


def test_recent_and_follow_do_not_blame_a_read_for_its_read_ahead(mounts, s3, bucket, proxy):
    """--recent and --follow marked the S3 GET of a later chunk's read-ahead as the
    "dominant" cost of a read served from the SSD, which never waited for it. And
    `--follow | head -1` ended with "the cachefs daemon closed the connection"."""
    put(s3, bucket, "k.bin", 4 * CHUNK, seed=7)
    m = mounts(f"s3://{bucket}")
    m.path("k.bin").read_bytes()  # every chunk cached ...
    st = os.stat(m.path("k.bin"))
    m.request({"op": "trace_evict", "ino": st.st_ino, "offset": CHUNK,
               "length": 3 * CHUNK})  # ... but the first
    proxy.reset()
    p = follow(m, "0ms")
    try:
        assert "following traces" in p.stderr.readline()
        proxy.faults(delay=1.0, count=1)
        read_direct(m.path("k.bin"), CHUNK)  # from the SSD; the read-ahead from S3, slowly
        tree = [p.stdout.readline()]
        while tree[-1].strip():
            tree.append(p.stdout.readline())
        p.stdout.close()  # `| head`: the next trace finds no reader
        read_direct(m.path("k.bin"), CHUNK)
        err = p.stderr.read()
        assert p.wait(10) == 1 and err == "", err
    finally:
        p.kill()
        p.wait()
        p.stderr.close()
    assert "read /k.bin offset 0 size 65536" in tree[0] and any("s3.get" in ln for ln in tree)
    marked = [ln for ln in tree if "◀ dominant" in ln]
    assert len(marked) == 1 and "s3.get" not in marked[0] and "readahead" not in marked[0], \
        "".join(tree)
    r = cli("trace", "--recent", "1", "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    marked = [ln for ln in r.stdout.splitlines() if "◀ dominant" in ln]
    assert len(marked) == 1 and "s3.get" not in marked[0], r.stdout


def test_tracing_switches_off_and_on_in_a_running_daemon(mounts, s3, bucket):
    put(s3, bucket, "t.bin", CHUNK, seed=6)
    m = mounts(f"s3://{bucket}")
    read_direct(m.path("t.bin"), CHUNK)
    started = m.request({"op": "trace_stats"})["tracer"]["started"]
    assert started >= 1
    assert m.request({"op": "trace_enable", "on": False}) == {"ok": True, "enabled": False}
    for _ in range(3):
        read_direct(m.path("t.bin"), CHUNK)
    st = m.request({"op": "trace_stats"})["tracer"]
    assert st["started"] == started and st["enabled"] is False
    assert m.request({"op": "trace_enable", "on": True})["enabled"] is True
    read_direct(m.path("t.bin"), CHUNK)
    assert m.request({"op": "trace_stats"})["tracer"]["started"] == started + 1
    with pytest.raises(QuietError, match="^on must be true or false$"):
        m.request({"op": "trace_enable", "on": "yes"})


# -- a 2-node cluster: a peer span holds the owner's spans ----------------------------------


def test_peer_span_carries_owner_spans(mounts, s3, bucket):
    from test_cluster import start_cluster

    data, owned_by_a = put_owned(s3, bucket, "p.bin", ["n0", "n1"], "n0")
    a, b = start_cluster(mounts, bucket, n=2)
    i = owned_by_a[0]
    res = trace_json(str(b.path("p.bin")), "--offset", str(i * CHUNK), "--length", "64KiB",
                     "--cold")
    assert res["cold"]["nodes"].keys() == {"n0", "n1"}
    row = [r for r in res["chunks"] if r["chunk"] == i][0]
    assert row["tier"] == "peer" and row["node"] == "n0"
    peers = [s for t in res["traces"] for s in all_spans(t)
             if s["name"] == "peer" and s.get("node") == "n0"]
    assert peers, res["traces"]
    owner = [s for s in all_spans(peers[0]) if s["name"] == "peer.serve"]
    assert owner and owner[0]["node"] == "n0"
    inner = {s["name"] for s in all_spans(owner[0])}
    assert {"chunk", "s3.get"} <= inner  # cold on the owner too: it read S3
    # warm on the owner: the peer span now holds A's SSD read
    res2 = trace_json(str(b.path("p.bin")), "--offset", str(i * CHUNK), "--length", "64KiB")
    peers2 = [s for t in res2["traces"] for s in all_spans(t) if s["name"] == "peer"]
    assert peers2 and any(s["name"] == "ssd.read" for s in all_spans(peers2[0]))
    assert not any(s["name"] == "s3.get" for s in all_spans(peers2[0]))


def test_otlp_puts_an_owners_spans_under_the_requesters_peer_span(mounts, s3, bucket):
    """A read served by a peer was two unrelated OTLP traces with random ids, and the
    owner's spans were in both: the requester exported the owner's peer.serve inside its
    own read, the owner exported it again as a trace of its own (its S3 GET counted
    twice).  Each node now exports the spans it ran, in one trace: the owner's peer.serve
    under the requester's peer span."""
    from test_cluster import start_cluster

    data, owned = put_owned(s3, bucket, "o.bin", ["n0", "n1"], "n0")
    rx = Receiver()
    try:
        a, b = start_cluster(mounts, bucket, n=2, env_for={
            n: {"CACHEFS_OTLP_ENDPOINT": rx.url} for n in ("n0", "n1")})
        i = owned[0]
        read_direct(b.path("o.bin"), CHUNK, i * CHUNK)  # n1 reads a chunk n0 owns: cold

        def spans() -> list[dict]:
            out = []
            for _, body in list(rx.bodies):
                for rs in json.loads(body)["resourceSpans"]:
                    node = rs["resource"]["attributes"][1]["value"]["stringValue"]
                    out += [{**sp, "node": node} for ss in rs["scopeSpans"]
                            for sp in ss["spans"]]
            return out

        def attr(sp: dict, key: str):
            return next((a["value"] for a in sp["attributes"] if a["key"] == key), {})

        def complete() -> bool:  # (the two nodes export when they do, each on its own)
            got = spans()
            ids = {sp["spanId"] for sp in got}
            return (any(sp["name"] == "peer.serve"
                        and attr(sp, "cachefs.chunk") == {"intValue": str(i)} for sp in got)
                    and all(sp["parentSpanId"] in ids for sp in got if "parentSpanId" in sp))

        # (n1's peer span, a serve's parent, came in the POST of n1's whole read trace: a
        # copy of n0's spans in it would have come with it)
        wait_for(complete, 20, "both nodes' spans")
        got = spans()

        # each span once, exported by the node that ran it (the read ahead of chunk i may
        # have asked for more chunks, and n0 its successor n1 for hand-off copies: each
        # such request is checked alike)
        serves = [sp for sp in got if sp["name"] == "peer.serve"]
        mine = [sp for sp in serves if attr(sp, "cachefs.node") == {"stringValue": "n0"}
                and attr(sp, "cachefs.chunk") == {"intValue": str(i)}]
        assert len(mine) == 1 and mine[0]["node"] == "n0", mine  # (2 before: in n1's too)
        gets = [sp for sp in got if sp["name"] == "s3.get"
                and attr(sp, "cachefs.offset") == {"intValue": str(i * CHUNK)}]
        assert len(gets) == 1 and gets[0]["node"] == "n0", gets
        assert gets[0]["traceId"] == mine[0]["traceId"]
        waiting = {sp["spanId"]: sp for sp in got if sp["name"] in ("peer", "peer.handoff")}
        for serve in serves:  # under the span that waited for it, in that request's trace
            w = waiting[serve["parentSpanId"]]
            assert serve["traceId"] == w["traceId"] and serve["node"] != w["node"], (serve, w)
        roots = [sp for sp in got if sp["traceId"] == mine[0]["traceId"]
                 and "parentSpanId" not in sp]
        assert "read" in [r["name"] for r in roots], roots  # n1's read
        assert {r["node"] for r in roots} == {"n1"}, roots
    finally:
        rx.close()


@pytest.mark.parametrize("value", ["nonsense", "1.2.3.4:99999"])
def test_metrics_listen_rejects_bad_address(value):
    from cachefs.errors import QuietError
    from cachefs.metrics import bind_metrics, parse_listen

    assert parse_listen(":9100") == ("127.0.0.1", 9100)
    with pytest.raises(QuietError):
        bind_metrics(value)
