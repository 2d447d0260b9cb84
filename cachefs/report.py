"""Human-readable rendering of daemon figures for the terminal."""

from __future__ import annotations

import unicodedata


def plural(n: int, word: str, many: str | None = None) -> str:
    """A count and its noun: plural(1, "file") → "1 file", plural(2, "file") → "2 files",
    plural(3, "entry", "entries") → "3 entries"."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human(n: float) -> str:
    """1536 → "1.5 KiB"; binary units up to EiB."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(s: str) -> str:
    """``s`` safe to print on a terminal: control characters (``\\x1b``, ``\\n``...), bidi
    overrides and undecodable bytes (surrogate escapes, shown as the byte ``\\xNN``) are
    written as escapes, the way repr() does; everything else is left as it is."""
    if s.isprintable():
        return s
    out = []
    for ch in s:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cs"):
            out.append(repr(ch)[1:-1])
        else:
            out.append(ch)
    return "".join(out)


def format_stats(mp: str, s: dict) -> str:
    c = s["counters"]
    cache = s["cache"]
    lines = [
        f"cachefs at {mp}  (up {s['uptime_s']:.0f}s)",
        f"  cache      {human(cache['used_bytes'])} used of {human(cache['limit_bytes'])}"
        f"  ({100 * cache['used_bytes'] / max(1, cache['limit_bytes']):.1f}%),"
        f" {plural(cache['chunks'], 'chunk')}",
        f"  pinned     {human(cache['pinned_bytes'])} in {plural(cache['pinned_chunks'], 'chunk')}",
        f"  hits       local SSD {c.get('ssd_hits', 0)} ({human(c.get('ssd_bytes', 0))})"
        f"   peer {c.get('peer_hits', 0)} ({human(c.get('peer_bytes', 0))})",
        f"  misses     {plural(c.get('s3_misses', 0), 'chunk')} from S3"
        f" ({human(c.get('s3_bytes', 0))}) in {plural(c.get('s3_get_requests', 0), 'GET')},"
        f" {plural(c.get('s3_retries', 0), 'retry', 'retries')},"
        f" {plural(c.get('s3_errors', 0), 'error')}",
        f"  evictions  {plural(c.get('evictions', 0), 'chunk')}"
        f" ({human(c.get('evicted_bytes', 0))})",
        f"  corrupt    {c.get('chunks_corrupt', 0)} dropped, {c.get('chunks_missing', 0)} missing",
        *_not_cached(c, cache),
        f"  reads      {plural(c.get('fuse_read', 0), 'FUSE read')}"
        f" ({human(c.get('fuse_read_bytes', 0))}), {plural(s['open_files'], 'open file')},"
        f" {plural(s['in_flight_fetches'], 'fetch', 'fetches')} in flight",
    ]
    if "cluster" in s:
        cl = s["cluster"]
        lines.append(f"  cluster    node {printable(str(cl.get('node_id')))}, "
                     f"{plural(len(cl.get('members', [])), 'member')}"
                     + (f", ring of {plural(cl['ring_size'], 'node')}"
                        if "ring_size" in cl else ""))
        etcd = cl.get("etcd")
        if isinstance(etcd, dict):  # membership frozen while etcd does not answer: said so
            err = etcd.get("last_error")
            lines.append("    etcd       " + (
                f"not answering: {printable(str(err))} (the ring stays as it was)"
                if err and not etcd.get("answering", False)
                else f"answering ({plural(etcd.get('etcd_errors', 0), 'error')} so far)"
                + (f"; {printable(str(err))}" if err else "")))
        members = cl.get("members")
        for n, mem in sorted(members.items() if isinstance(members, dict) else ()):
            last = mem.get("last_failure") if isinstance(mem, dict) else None
            if last:  # a member that failed: when, why, and whether reads skip it now
                lines.append(f"    {printable(str(n)):<12} last failed "
                             f"{_ago(last.get('seconds_ago', 0))} ago "
                             f"({printable(str(last.get('reason')))})"
                             + ("; skipped by reads now" if not mem.get("healthy") else ""))
        # node names and errors may come from a peer (an unauthenticated error frame):
        # printed with control characters escaped
        for n, c in (cl.get("nodes_cache") or {}).items():
            lines.append(f"    {printable(str(n)):<12} "
                         + (f"error: {printable(str(c['error']))}" if "error" in c else
                         f"{human(c['used_bytes'])} used of {human(c['limit_bytes'])}, "
                         f"{human(c['pinned_bytes'])} pinned, {plural(c['chunks'], 'chunk')}"))
    return "\n".join(lines)


def _not_cached(c: dict, cache: dict) -> list[str]:
    """Chunks read but not kept on the SSD, and why: shown only when there are some (a
    cache that never warms is otherwise told apart from a cold one by nothing)."""
    errors, full = c.get("ssd_write_errors", 0), c.get("cache_full_uncached", 0)
    if not (errors or full):
        return []
    line = (f"  not kept   {plural(errors, 'chunk write')} failed, "
            f"{plural(full, 'chunk')} refused (the cache is full of pinned data)")
    last = cache.get("last_write_error")
    if isinstance(last, dict):
        line += (f"; last write error {_ago(last.get('seconds_ago', 0))} ago: "
                 f"{printable(str(last.get('error')))}")
    return [line]


def _ago(s: float) -> str:
    s = int(s)
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"
