"""`cachefs trace`: why was this read slow?

Three modes:

* ``cachefs trace PATH [--offset N] [--length N] [--cold] [--json]`` reads that range
  THROUGH THE MOUNT with O_DIRECT (the kernel page cache is bypassed; FUSE sends
  O_DIRECT reads to the daemon), while the daemon captures the traces of every FUSE
  read of that inode overlapping the range (control ops ``trace_capture_start`` /
  ``trace_capture_stop``).  It prints the total latency, one line per chunk (tier,
  node, time, the cost inside), then each trace as a tree with the dominant cost
  marked.  ``--cold`` first drops those chunks from the cache of every node
  (``trace_evict``), so the miss path is what gets traced.
* ``cachefs trace --follow [--slower-than 50ms] [--path-prefix P]`` streams traces
  as they finish (default threshold: the daemon's --slow-threshold).
* ``cachefs trace --recent N [--slow]`` prints the last N traces (or slow traces).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import signal
import sys
import time
from typing import Any

import click

from . import runtime
from .config import parse_duration, parse_size
from .errors import EXIT_FAILED, EXIT_NO_DAEMON, EXIT_USAGE, ConfigError, QuietError
from .report import human, printable

DOMINANT = "◀ dominant"
BLOCK = 1 << 20
# attributes shown in a tree line, in this order (others only in --json)
SHOWN = ("chunk", "tier", "node", "peer", "bytes", "queued_ms", "sign_ms", "ttfb_ms",
         "transfer_ms", "holder", "status", "attempts", "retries", "attempt", "reason",
         "result", "prefix", "chunks", "error", "source")
WAITS = ("singleflight.wait", "readahead.wait")


def _esc(v: Any) -> str:
    """Text from a trace, for the terminal: node names, peer error text, span names and
    attributes may come from another node (a peer's reply, an etcd key any writer can
    register), so their control characters are escaped.  --json keeps them as they are."""
    return printable(str(v))


def _offset(v: str | None, what: str, zero: bool = False) -> int | None:
    """A byte count from a flag (sizes like 8MiB); ``zero``: 0 is one (an offset: ``0``
    and ``0B`` alike, where a size must be positive)."""
    if v is None:
        return None
    v = v.strip()
    if v.isdigit() and (zero or int(v) > 0):  # (a size of 0: parse_size's error)
        return int(v)
    if zero and (m := re.fullmatch(r"0+(?:\.0*)?\s*([A-Za-z]*)", v)):
        try:
            parse_size("1" + m.group(1), what)  # (the unit must be one)
        except ConfigError:
            return parse_size(v, what)  # (its error, naming what was given)
        return 0
    return parse_size(v, what)


def _inside(path: str, mp: str) -> bool:
    return path == mp or path.startswith(mp.rstrip("/") + "/")


def _holding(path: str) -> str:
    """The cachefs mount holding ``path`` (the deepest), or ""."""
    best = ""
    for mp in runtime.cachefs_mounts():
        if _inside(path, mp) and len(mp) > len(best):
            best = mp
    return best


def _locate(path: str, mount: str | None) -> tuple[str, str]:
    """(the file to read, its mountpoint).  A relative PATH is taken from the current
    directory when that is inside the mount (--mount's, or any cachefs mount without
    --mount), as a shell would; otherwise from the mount's root (--mount, or the only
    mount), as file lists take it.  With --mount, PATH must be inside that mount."""
    mp = runtime.find_mount(mount) if mount is not None else ""
    if not os.path.isabs(path):
        try:
            cwd = os.path.realpath(os.getcwd())
        except OSError:  # the current directory was removed
            cwd = ""
        here = mp or (_holding(cwd) if cwd else "")
        if here and _inside(cwd, here):
            path = os.path.join(cwd, path)
        else:
            mp = mp or runtime.find_mount(None)
            path = os.path.join(mp, path)
    path = os.path.normpath(path)
    real = os.path.realpath(path)
    if not mp:
        mp = _holding(real)
        if not mp:
            raise QuietError(f"{printable(path)} is not inside a cachefs mount", EXIT_NO_DAEMON)
    elif not _inside(real, mp):
        raise QuietError(f"{printable(path)} is not inside the cachefs mount {printable(mp)}",
                         EXIT_USAGE)
    return path, mp


def _client(mp: str):
    from .control import ControlClient

    return ControlClient(runtime.socket_path(mp), mp)


# -- reading ---------------------------------------------------------------------------


def read_direct(path: str, offset: int, length: int
                ) -> tuple[int, float, bool, OSError | None]:
    """Read [offset, offset+length) with O_DIRECT; (bytes, seconds, direct, the error that
    ended the read early or None).  A failed read is returned, not raised: its trace is
    what the user most needs to see.  A failed open raises QuietError (nothing was read)."""
    direct = True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno != 22:  # EINVAL: no O_DIRECT support; fall back below
            raise QuietError(f"cannot open {printable(path)}: {e.strerror}") from None
        fd = os.open(path, os.O_RDONLY)
        direct = False
    err: OSError | None = None
    try:
        if not direct:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT may require
        got = 0
        t0 = time.perf_counter()
        try:
            while got < length:
                n = min(BLOCK, length - got)
                with memoryview(buf)[:n] as view:  # released on an error too: the buffer
                    r = os.preadv(fd, [view], offset + got)  # cannot close while viewed
                if r <= 0:
                    break
                got += r
        except OSError as e:
            err = e
        finally:
            elapsed = time.perf_counter() - t0
            buf.close()
    finally:
        try:
            os.close(fd)
        except OSError as e:  # ENOTCONN: the daemon died during the read
            err = err or e
    return got, elapsed, direct, err


# -- analysis --------------------------------------------------------------------------


def _walk(s: dict, depth: int = 0, parent: dict | None = None):
    yield s, depth, parent
    for c in s.get("spans", ()):
        yield from _walk(c, depth + 1, s)


def self_ms(s: dict) -> float:
    kids = sum(float(c.get("duration_ms", 0)) for c in s.get("spans", ()))
    return max(0.0, float(s.get("duration_ms", 0)) - kids)


_HOLDER_TRACE = re.compile(r"\(trace ([^)]+)\)$")


def dominant(traces: list[dict], in_range=None) -> tuple[int, dict] | None:
    """(trace index, span) with the largest self time; read-ahead of chunks outside the
    range (work for later reads) does not count, nor a wait for work one of ``traces``
    did (its time is that work's, split there over s3.connect, s3.get, ssd.write: a wait
    with no children was marked the dominant cost instead of the S3 GET it waited for)."""
    ids = {t.get("trace_id") for t in traces}
    ahead = {s.get("chunk") for t in traces for s, _, _ in _walk(t)
             if s.get("name") == "readahead"}

    def waits_for_shown_work(s: dict) -> bool:
        n = s.get("name")
        if n == "singleflight.wait":
            m = _HOLDER_TRACE.search(str(s.get("holder", "")))
            return m is not None and m.group(1) in ids
        return n == "readahead.wait" and s.get("source") != "prefetch" and \
            s.get("chunk") in ahead

    best: tuple[float, int, dict] | None = None
    for i, t in enumerate(traces):
        stack = [t]
        while stack:
            s = stack.pop()
            if (s.get("name") == "readahead" and in_range is not None
                    and not in_range(s.get("chunk"))):
                continue
            v = self_ms(s)
            if s is not t and not waits_for_shown_work(s) and (best is None or v > best[0]):
                best = (v, i, s)
            stack.extend(s.get("spans", ()))
    if best is None:
        return None
    return best[1], best[2]


def _kids_ms(s: dict, name: str) -> float:
    """The time of ``s``'s direct children named ``name``."""
    return round(sum(float(c.get("duration_ms") or 0) for c in s.get("spans", ())
                     if c.get("name") == name), 3)


def describe(s: dict) -> str:
    """The cost inside a chunk fetch, in one phrase: this node's own waits (a connection
    slot, a new connection) named apart from the peer's or S3's time (a wait for a slot
    here read as "peer n2 round trip 300 ms", a new connection as S3's ttfb)."""
    n = s.get("name")
    if n == "s3.get" and s.get("error"):
        tries = s.get("attempts")
        return (f"S3 GET failed: {_esc(s['error'])}"
                + (f" after {tries} attempt{'' if tries == 1 else 's'}" if tries else ""))
    if n == "s3.get":
        parts = []
        if s.get("sign_ms"):
            parts.append(f"signing {_esc(s['sign_ms'])} ms")
        if wait := _kids_ms(s, "s3.slot_wait"):
            parts.append(f"queued here {_esc(wait)} ms for an S3 connection")
        if conn := _kids_ms(s, "s3.connect"):
            parts.append(f"connect {_esc(conn)} ms")
        parts += [f"ttfb {_esc(s.get('ttfb_ms', '?'))} ms",
                  f"transfer {_esc(s.get('transfer_ms', '?'))} ms"]
        if s.get("retries"):
            parts.append(f"{_esc(s['retries'])} retr{'y' if s['retries'] == 1 else 'ies'}")
            if backoff := _kids_ms(s, "s3.backoff"):
                parts.append(f"backoff {_esc(backoff)} ms")
        return "S3 GET " + ", ".join(parts)
    if n == "ssd.read":
        return f"SSD read {_esc(s.get('duration_ms'))} ms"
    if n in ("peer", "peer.handoff"):
        wait = _kids_ms(s, "peer.slot_wait")
        rt = round(float(s.get("duration_ms") or 0) - wait, 3)
        return (f"peer {_esc(s.get('node'))} round trip {_esc(rt)} ms"
                + (f" (queued here {_esc(wait)} ms for a connection slot first)"
                   if wait else ""))
    return f"{_esc(n)} {_esc(s.get('duration_ms'))} ms"


def chunk_rows(traces: list[dict], default_node: str, chunk_size: int | None,
               lo: int, hi: int) -> list[dict]:
    """One row per chunk of the range: the span that fetched it (or waited for it)."""
    rows: dict[Any, dict] = {}
    prio = {"chunk": 3, "ssd.read": 2, "readahead.hit": 1, "readahead.wait": 1,
            "singleflight.wait": 1}
    for t in traces:
        node = t.get("node", default_node)
        guess = _guess_fast_path(t, chunk_size)
        for s, _, parent in _walk(t):
            name = s.get("name")
            if name not in prio:
                continue
            if name == "ssd.read" and parent is not None and parent.get("name") != t.get("name"):
                continue  # part of a chunk fetch, a read-ahead or the owner's serve
            idx = s.get("chunk")
            if idx is None and name == "ssd.read":
                idx = guess.get(id(s))
            if chunk_size and isinstance(idx, int) and not (
                    idx * chunk_size < hi and (idx + 1) * chunk_size > lo):
                continue  # read-ahead beyond the range
            row = {"chunk": idx, "span": name, "duration_ms": s.get("duration_ms"),
                   "trace_id": t.get("trace_id")}
            if name == "chunk":
                row["tier"] = s.get("tier", "?")
            elif name == "ssd.read":
                row["tier"] = "local"
            elif name == "readahead.hit":
                row["tier"] = "readahead"
            elif s.get("source") == "prefetch":
                row["tier"] = "prefetch"
            else:
                row["tier"] = "wait"
            row["node"] = node
            detail = []
            for c, _, _p in _walk(s):
                cn = c.get("name")
                if cn in ("peer", "peer.handoff") and c.get("result") == "miss":
                    detail.append(f"hand-off probe to {_esc(c.get('node'))}: not cached "
                                  f"({_esc(c.get('duration_ms'))} ms)")
                elif cn in ("peer", "peer.handoff") and not c.get("error"):
                    if row["tier"] == "peer":
                        row["node"] = c.get("node", node)
                    detail.append(describe(c))
                    owner = [x for x in c.get("spans", ()) if x.get("name") == "peer.serve"]
                    for o in owner:
                        inner = [x for x, _, _ in _walk(o) if x.get("name") in
                                 ("s3.get", "ssd.read")]
                        detail.extend(f"on {_esc(c.get('node'))}: {describe(x)}" for x in inner)
                elif cn in ("peer", "peer.handoff"):
                    detail.append(f"peer {_esc(c.get('node'))} failed ({_esc(c.get('error'))}) "
                                  f"after {_esc(c.get('duration_ms'))} ms")
                elif cn in ("s3.get", "ssd.read") and c is not s and not _under_peer(s, c):
                    detail.append(describe(c))
                elif c is s and cn == "ssd.read":
                    detail.append(describe(c))
            if name == "singleflight.wait" and s.get("holder"):
                detail.append(f"waited {_esc(s.get('duration_ms'))} ms for the fetch of "
                              f"{_esc(s['holder'])}")
            if row["tier"] == "prefetch" and not detail:
                detail.append(f"waited {_esc(s.get('duration_ms'))} ms for the file "
                              "prefetcher, which was fetching this file ahead of its open")
            row["detail"] = "; ".join(detail)
            key = idx if idx is not None else f"?{len(rows)}"
            old = rows.get(key)
            if old is None or _rank(row, prio) > _rank(old, prio):
                rows[key] = row
    return sorted(rows.values(), key=lambda r: (not isinstance(r["chunk"], int),
                                                r["chunk"] if isinstance(r["chunk"], int) else 0))


def _rank(row: dict, prio: dict) -> float:
    """Which span tells best how a chunk was served: a fetch, then a wait or a hit."""
    if row["span"] == "chunk" and row["tier"] in ("miss", "readahead", "memory"):
        return 1.5
    return prio[row["span"]]


def _guess_fast_path(t: dict, chunk_size: int | None) -> dict[int, int]:
    """Chunk indexes of the bare ``ssd.read`` spans of a read (the reader's fast path
    records no chunk span): the read's chunks that no other span names, in order,
    when their count matches."""
    if not chunk_size or not isinstance(t.get("offset"), int) or not t.get("size"):
        return {}
    first = t["offset"] // chunk_size
    last = (t["offset"] + t["size"] - 1) // chunk_size
    named = {s.get("chunk") for s, _, _ in _walk(t) if s.get("name") in
             ("chunk", "readahead.wait", "singleflight.wait", "readahead.hit")
             and s is not t}
    bare = [s for s in t.get("spans", ()) if s.get("name") == "ssd.read" and "chunk" not in s]
    free = [i for i in range(first, last + 1) if i not in named]
    if len(bare) != len(free):
        return {}
    return {id(s): i for s, i in zip(bare, free, strict=True)}


def _under_peer(root: dict, target: dict) -> bool:
    for s, _, _ in _walk(root):
        if s.get("name") in ("peer", "peer.handoff"):
            for x, _, _ in _walk(s):
                if x is target:
                    return True
    return False


# -- rendering -------------------------------------------------------------------------


def _attrs(s: dict) -> str:
    out = []
    for k in SHOWN:
        if k in s and s[k] not in (None, ""):
            v = s[k]
            if k in ("attempts",) and v == 1:
                continue
            if k == "retries" and not v:
                continue
            if k == "chunk":
                out.append(f"#{_esc(v)}")
            elif k == "bytes" and isinstance(v, int):
                out.append(human(v) if v >= 1024 else f"{v} B")
            elif k.endswith("_ms"):
                out.append(f"{k[:-3]} {_esc(v)} ms")
            else:
                out.append(f"{k}={_esc(v)}")
    if s.get("open"):
        out.append("(still running)")
    return " ".join(out)


def render_tree(t: dict, mark: dict | None = None) -> list[str]:
    head = (f"{_esc(t.get('name'))} {_esc(t.get('path', ''))}".rstrip()
            + (f" offset {_esc(t['offset'])} size {_esc(t.get('size'))}" if "offset" in t else "")
            + f"  {_esc(t.get('duration_ms'))} ms  [node {_esc(t.get('node', '?'))}, trace "
            f"{_esc(t.get('trace_id', '?'))}]")
    # the root's own attributes (a peer.serve: its chunk, peer, result), but for the node
    # (named below) and what the head shows already
    extra = _attrs({k: v for k, v in t.items() if k not in ("node", "error")})
    if extra:
        head += f"  {extra}"
    if t.get("error"):
        head += f"  error={_esc(t['error'])}"
    if t.get("background"):
        head += (f"  (read-ahead that outlived read trace {_esc(t.get('continues', '?'))}: "
                 "not a request)")
    if t.get("incomplete"):
        head += "  (incomplete)"
    lines = [head]

    def rec(s: dict, prefix: str) -> None:
        kids = s.get("spans", ())
        for i, c in enumerate(kids):
            last = i == len(kids) - 1
            label = f"{_esc(c.get('name'))} {_attrs(c)}".rstrip()
            line = f"{prefix}{'└─ ' if last else '├─ '}{label}"
            dur = f"{_esc(c.get('duration_ms')):>9} ms"
            pad = max(1, 72 - len(line))
            line = line + " " * pad + dur
            if c is mark:
                line += f"  {DOMINANT}"
            lines.append(line)
            rec(c, prefix + ("   " if last else "│  "))

    rec(t, "")
    if t.get("dropped_spans"):
        lines.append(f"   ({_esc(t['dropped_spans'])} more spans not kept)")
    return lines


def _busy_ms(traces: list[dict]) -> float | None:
    """How long the daemon was serving these reads: the union of their intervals.  Reads
    served at the same time (the kernel splits a large O_DIRECT read into several at once,
    other readers of the range) were added up, past the read's own time."""
    spans = sorted((t["start_time"], t["start_time"] + t.get("duration_ms", 0) / 1000)
                   for t in traces if isinstance(t.get("start_time"), (int, float)))
    if len(spans) != len(traces):  # (a trace without its start: the caller's plain sum)
        return None
    total, cur = 0.0, None
    for a, b in spans:
        if cur is None or a > cur[1]:
            if cur is not None:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    if cur is not None:
        total += cur[1] - cur[0]
    return round(total * 1000, 3)


def render_capture(res: dict) -> str:
    lines = []
    cold = res.get("cold")
    if res.get("error"):  # the range asked for, and how the read of it ended
        head = (f"{printable(res['path'])}  bytes {res['offset']}–"
                f"{res['offset'] + res['length'] - 1} ({human(res['length'])}): read failed "
                f"after {res['elapsed_ms']} ms: {printable(str(res['error']))} "
                f"({res['bytes_read']} bytes read)")
    else:
        head = (f"{printable(res['path'])}  bytes {res['offset']}–"
                f"{res['offset'] + res['bytes_read'] - 1} ({human(res['bytes_read'])}) read in "
                f"{res['elapsed_ms']} ms")
    head += "" if res.get("direct") else "  (no O_DIRECT: page cache dropped instead)"
    if cold:
        ok = [n for n, v in cold["nodes"].items() if "error" not in v]
        of = f" of {len(cold['nodes'])}" if len(ok) < len(cold["nodes"]) else ""
        head += (f"\n  --cold: dropped {human(cold['dropped_bytes'])} of {cold['chunks']} "
                 f"chunk(s) on {len(ok)}{of} node(s)")
        if cold.get("kept_pinned"):
            head += (f"; kept {cold['kept_pinned']} pinned chunk(s) (a data set's: `cachefs "
                     "free` it to trace them cold)")
        for n, v in cold["nodes"].items():
            if "error" in v:
                head += f"\n  --cold: node {_esc(n)}: {_esc(v['error'])}"
    lines.append(head)
    traces = res["traces"]
    if not res.get("enabled", True):
        lines.append("  tracing is off in the daemon (CACHEFS_TRACING=0): no spans")
    # read-ahead that outlived its read is a trace of its own ("continues"): not a read
    reads = [t for t in traces if "continues" not in t]
    more = len(traces) - len(reads)
    summed = round(sum(t.get("duration_ms", 0) for t in reads), 3)
    busy = _busy_ms(reads)
    busy = summed if busy is None else busy
    lines.append(f"  {len(reads)} FUSE read(s) traced, daemon time {busy} ms"
                 + (f" ({summed} ms added up: reads served at the same time)"
                    if summed - busy >= 0.001 else "")
                 + (f" (+ {more} read-ahead trace(s) that outlived their read)" if more else ""))
    if res.get("dropped_traces"):
        lines.append(f"  {res['dropped_traces']} more read(s) traced but not kept (a capture "
                     f"keeps {len(traces)}): trace a shorter --length")
    if res.get("pending"):
        lines.append(f"  {res['pending']} read(s) not shown: their read-ahead was still "
                     "running when the command stopped waiting (10 s); `cachefs trace "
                     "--recent` shows them once it ends")
    dom = res.get("dominant")
    if dom:
        lines.append(f"  dominant cost: {_esc(dom['name'])} {_attrs(dom)} — self "
                     f"{dom['self_ms']} ms of {_esc(dom['duration_ms'])} ms")
    if res["chunks"]:
        lines.append("")
        lines.append("chunks")
        for r in res["chunks"]:
            idx = f"#{_esc(r['chunk'])}" if r["chunk"] is not None else "#?"
            lines.append(f"  {idx:<6} {_esc(r['tier']):<9} node {_esc(r['node']):<12} "
                         f"{_esc(r['duration_ms']):>9} ms   {_esc(r['detail'])}")
    for t in traces:
        lines.append("")
        mark = dom.get("_span") if dom else None
        lines.extend(render_tree(t, mark))
    return "\n".join(lines)


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


# -- the command -----------------------------------------------------------------------


@click.command("trace")
@click.argument("path", required=False)
@click.option("--offset", help="First byte of the range to read (default 0; sizes like 8MiB).")
@click.option("--length", help="Bytes to read (default: one chunk).")
@click.option("--cold", is_flag=True, help="Drop the range's chunks from every node's cache "
              "first, so the miss path is traced (pinned chunks are kept).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per trace with "
              "--follow).")
@click.option("--follow", is_flag=True, help="Stream traces as they finish.")
@click.option("--slower-than", help="With --follow/--recent: only traces at least this long "
              "(default for --follow: the daemon's --slow-threshold).")
@click.option("--path-prefix", help="With --follow/--recent: only reads of paths under this "
              "(a path in the mount, or relative to the mount root).")
@click.option("--recent", type=click.IntRange(min=1), help="Print the last N traces.")
@click.option("--slow", is_flag=True, help="With --recent: from the slow-trace ring.")
@click.option("--mount", help="The cachefs mountpoint (default: the one holding PATH, or the "
              "only one).")
def trace_cmd(path, offset, length, cold, as_json, follow, slower_than, path_prefix, recent,
              slow, mount) -> None:
    """Show where the time of a read goes: FUSE, chunks, local SSD, peers, S3.

    \b
    cachefs trace /mnt/train/shard-0001.tar --offset 64MiB --length 8MiB
    cachefs trace /mnt/train/shard-0001.tar --cold --json
    cachefs trace --follow --slower-than 50ms --path-prefix /mnt/train/images
    cachefs trace --recent 20
    """
    modes = sum(bool(x) for x in (path, follow, recent is not None))
    if modes != 1:
        raise QuietError("give exactly one of PATH, --follow or --recent N", EXIT_USAGE)
    slower = parse_duration(slower_than, "--slower-than") if slower_than else None
    if path:
        if slower_than or path_prefix or slow:
            raise QuietError("--slower-than/--path-prefix/--slow go with --follow or --recent",
                             EXIT_USAGE)
        _trace_path(path, _offset(offset, "--offset", zero=True) or 0, _offset(length, "--length"), cold,
                    as_json, mount)
        return
    if offset or length or cold:
        raise QuietError("--offset/--length/--cold go with PATH", EXIT_USAGE)
    if follow and slow:  # (a followed trace is shown as it ends: --slower-than says how slow)
        raise QuietError("--slow goes with --recent; with --follow, give --slower-than",
                         EXIT_USAGE)
    mp = runtime.find_mount(mount)
    prefix = _display_prefix(path_prefix, mp, bool(follow)) if path_prefix else None
    client = _client(mp)
    if follow:
        _follow(client, slower, prefix, as_json)
    else:
        r = client.request({"op": "trace_recent", "n": recent, "slow": slow,
                            "slower_than": slower, "path_prefix": prefix})
        if as_json:
            click.echo(json.dumps(r["traces"], indent=2))
            return
        if not r.get("enabled", True):
            click.echo("cachefs: tracing is off in the daemon (CACHEFS_TRACING=0)", err=True)
        if not r["traces"]:
            click.echo(_none_found(client, r, slow, slower_than, path_prefix))
        chunk_size = _chunk_size(client)
        for t in r["traces"]:
            click.echo("\n".join(render_tree(t, _own_dominant(t, chunk_size))))
            click.echo("")


def _none_found(client, r: dict, slow: bool, slower_than: str | None,
                path_prefix: str | None) -> str:
    """Why --recent printed nothing: no trace kept yet, or none passed the filters (which
    is not the same: traces exist, only not under that prefix or that slow)."""
    none_yet = ("no traces yet" if not slow else
                f"no traces slower than {r['slow_threshold_ms']} ms yet")
    if not slower_than and not path_prefix:
        return none_yet
    st = client.request({"op": "trace_stats"})["tracer"]
    kept = int(st.get("slow_kept" if slow else "recent_kept", 0))
    if not kept:
        return none_yet
    what = []
    if path_prefix:
        what.append(f"under {printable(path_prefix)}")
    if slower_than:
        what.append(f"at least {printable(slower_than)} long")
    kind = "slow trace" if slow else "recent trace"
    return (f"none of the {kept} {kind}{'' if kept == 1 else 's'} kept is "
            + " and ".join(what))


def _display_prefix(p: str, mp: str, must_exist: bool) -> str:
    """A --path-prefix as the daemon writes paths ("/dir/file" from the mount root). A
    relative path outside the mount is refused, and with ``must_exist`` (--follow) one
    that names nothing there: `--follow` with a typo in it (/mnt/trian/x, or ./x typed
    outside the mount) waited for ever, showing nothing."""
    if p.startswith((".", "/")):
        # as given, then through its links (a mount reached by a symlink, /data -> /mnt:
        # such a prefix matched nothing)
        for ap in (os.path.abspath(p), os.path.realpath(p)):
            if ap == mp or ap.startswith(mp.rstrip("/") + "/"):
                return "/" + ap[len(mp):].lstrip("/")
        if p.startswith("."):
            raise QuietError(f"--path-prefix {printable(p)} is not inside the mount at "
                             f"{printable(mp)}", EXIT_USAGE)
    rel = os.path.normpath("/" + p.lstrip("/"))
    if rel.startswith("//"):
        rel = rel[1:]
    if must_exist and rel != "/" and not os.path.lexists(mp.rstrip("/") + rel):
        raise QuietError(f"--path-prefix {printable(p)}: neither a path inside the mount at "
                         f"{printable(mp)} nor one from its root "
                         f"({printable(mp.rstrip('/') + rel)} does not exist)", EXIT_USAGE)
    return rel


def _chunk_size(client) -> int | None:
    return int(client.request({"op": "info"}).get("chunk_size") or 0) or None


def _own_dominant(t: dict, chunk_size: int | None) -> dict | None:
    """The span to mark as the dominant cost of one read: read-ahead of chunks past the
    read's bytes (work for later reads, which this one never waited for) does not count."""
    off, size = t.get("offset"), t.get("size")
    if not chunk_size or not isinstance(off, int) or not isinstance(size, int):
        d = dominant([t], lambda idx: False)  # no range known: no read-ahead counts
    else:
        end = off + max(size, 1)
        d = dominant([t], lambda idx: not isinstance(idx, int) or
                     (idx * chunk_size < end and (idx + 1) * chunk_size > off))
    return d[1] if d else None


def _follow(client, slower: float | None, prefix: str | None, as_json: bool) -> None:
    chunk_size = None if as_json else _chunk_size(client)

    def on_event(ev: dict) -> None:
        if "following" in ev:
            if not as_json:
                click.echo(f"cachefs: following traces over {_esc(ev['slower_than_ms'])} ms on "
                           f"node {_esc(ev['node'])} (Ctrl-C to stop)", err=True)
                if not ev.get("enabled", True):
                    click.echo("cachefs: tracing is off in the daemon (CACHEFS_TRACING=0)",
                               err=True)
            return
        if ev.get("lost_traces"):  # (trace.LOST; on stderr: --json stays one trace a line)
            click.echo(f"cachefs: {_esc(ev['lost_traces'])} trace(s) not shown: this command did not "
                       "keep up with them, and the daemon does not wait for it", err=True)
            return
        t = ev.get("trace")
        if t is None:
            return
        if as_json:
            click.echo(json.dumps(t))
        else:
            click.echo("\n".join(render_tree(t, _own_dominant(t, chunk_size))) + "\n")
        sys.stdout.flush()

    client.request({"op": "trace_follow", "slower_than": slower, "path_prefix": prefix},
                   on_event=on_event, timeout=None)


@contextlib.contextmanager
def _signals_end_us():
    """SIGTERM and SIGHUP (`timeout`, a closed ssh session) end the command the way ^C
    does, through its clean-up, instead of at once: the daemon's capture was left running,
    collecting every trace of that range, until the next `cachefs trace` expired it."""
    def end(signum, frame):
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, end) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _stop_capture(client, cap: dict) -> dict:
    return client.request({"op": "trace_capture_stop", "capture": cap["capture"],
                           "wait": 10.0}, timeout=60)


def _trace_path(path: str, offset: int, length: int | None, cold: bool, as_json: bool,
                mount: str | None) -> None:
    path, mp = _locate(path, mount)
    shown = printable(path)
    client = _client(mp)
    info = client.request({"op": "info"})
    chunk_size = int(info.get("chunk_size") or 0) or None
    try:
        st = os.stat(path)
    except OSError as e:
        # a path that is not there is the user's to fix; EIO or EACCES is a failure
        raise QuietError(f"{shown}: {e.strerror}", EXIT_USAGE if e.errno in (
            errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG) else EXIT_FAILED) from None
    if not os.path.isfile(path):
        raise QuietError(f"{shown} is not a regular file", EXIT_USAGE)
    if st.st_size == 0:
        raise QuietError(f"{shown} is empty: there is no read to trace", EXIT_USAGE)
    if offset >= st.st_size:
        raise QuietError(f"--offset {offset} is at or past the end of {shown} ({st.st_size} "
                         "bytes)", EXIT_USAGE)
    if length is None:
        length = chunk_size or BLOCK
    length = min(length, st.st_size - offset)
    ino = st.st_ino
    res: dict[str, Any] = {"path": path, "mountpoint": mp, "ino": ino, "offset": offset,
                           "length": length, "chunk_size": chunk_size}
    if cold:
        res["cold"] = client.request({"op": "trace_evict", "ino": ino, "offset": offset,
                                      "length": length}, timeout=120)
    cap = client.request({"op": "trace_capture_start", "ino": ino, "offset": offset,
                          "length": length})
    try:
        with _signals_end_us():
            got, elapsed, direct, err = read_direct(path, offset, length)
    except BaseException:
        with contextlib.suppress(QuietError):  # the error to report is this one
            _stop_capture(client, cap)  # a failed open, ^C, kill: free the daemon's capture
        raise
    why = (err.strerror or str(err)) if err is not None else None
    failure = f"reading {shown} failed: {why}" if why is not None else None
    try:
        stop = _stop_capture(client, cap)
    except QuietError as e:
        if failure is None:
            raise
        # the daemon's failure may be why the read failed: say both
        raise QuietError(f"{failure} (and its trace could not be collected: "
                         f"{_esc(e.msg)})") from None
    traces = sorted(stop["traces"], key=lambda t: (t.get("start_time", 0), t.get("offset", 0)))
    res.update(bytes_read=got, elapsed_ms=round(elapsed * 1000, 3), direct=direct,
               node=stop.get("node"), enabled=stop.get("enabled", True), traces=traces,
               pending=int(stop.get("pending") or 0),
               dropped_traces=int(stop.get("dropped_traces") or 0))
    if why is not None:
        res["error"] = why
    # the chunks of the bytes read; of a failed read, those of the whole range (the chunk
    # that failed is past the bytes read)
    lo, hi = offset, offset + (length if why is not None else max(got, 1))

    def in_range(idx: Any) -> bool:
        if not chunk_size or not isinstance(idx, int):
            return True
        return idx * chunk_size < hi and (idx + 1) * chunk_size > lo

    res["chunks"] = chunk_rows(traces, stop.get("node", "?"), chunk_size, lo, hi)
    d = dominant(traces, in_range)
    if d is not None:
        i, s = d
        res["dominant"] = {"name": s.get("name"), "trace_id": traces[i].get("trace_id"),
                           "self_ms": round(self_ms(s), 3), "duration_ms": s.get("duration_ms"),
                           **{k: s[k] for k in SHOWN if k in s}, "_span": s}
    if as_json:
        out = dict(res)
        if "dominant" in out:
            out["dominant"] = _strip(out["dominant"])
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(render_capture(res))
    if failure is not None:
        # the trace of the failed read is printed above: this is the one error line
        raise QuietError(failure)
    if got < length:
        raise QuietError(f"short read: {got} of {length} bytes")
    failed = {n: v["error"] for n, v in (res.get("cold") or {}).get("nodes", {}).items()
              if "error" in v}
    if failed:
        # the trace is printed, but it may not be cold: a node that did not answer may still
        # hold (and serve) chunks of the range
        raise QuietError("--cold could not drop the range's chunks on "
                         + ", ".join(f"node {_esc(n)} ({_esc(e)})" for n, e in sorted(failed.items()))
                         + ": the trace may show cached reads")


COMMANDS = [trace_cmd]
