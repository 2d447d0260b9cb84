"""`cachefs preload / free / status --file-list LIST`: the CLI side of cache control.

The list is read and translated here (filelist.py); the daemon resolves,
walks, fetches and reports (datasets.py).  Exit codes: 0 all good; 1 a fetch
failed (or the daemon refused, e.g. pins over the cache limit); 2 the list had
entries that do not exist or cannot be translated (each reported as
``LIST:LINE: ENTRY: reason``); 3 no daemon; 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from . import filelist, runtime
from .errors import EXIT_FAILED, EXIT_USAGE, QuietError
from .filelist import HOLDER_MAX, holder_too_long
from .report import human, plural, printable

MAX_ERROR_LINES = 50  # failed entries printed; --json carries them all
PLAIN_EVERY = 2.0  # seconds between progress lines when stderr is not a terminal
MAX_ROWS = 30
REQUEST_TIMEOUT = 120.0  # between two lines from the daemon (it sends progress twice a second)


def _say(msg: str) -> None:
    """One line on stderr; entries, paths and daemon reasons in it are escaped (a list or
    an S3 key may hold control characters: never write them raw to a terminal)."""
    click.echo(f"cachefs: {printable(msg)}", err=True)


def _choose_mount(mount: str | None, text: str) -> str:
    if mount is not None:
        return runtime.find_mount(mount)
    mps = runtime.cachefs_mounts()
    if len(mps) > 1:
        mp = filelist.mount_for(filelist.absolute_entries(text), mps)
        if mp:
            return mp
    return runtime.find_mount(None)


def _holder(file_list: str, name: str | None) -> str:
    """The data set a list's pins belong to (docs/datasets.md, "Data sets that share
    files"): --name, else the list file's real path, else none (a list read from stdin,
    a pipe such as <(grep ...): its path is another one each time)."""
    if name is not None:
        if not name.strip():
            raise QuietError("--name: must not be empty", EXIT_USAGE)
        if holder_too_long(name):
            raise QuietError(f"--name: at most {HOLDER_MAX} bytes", EXIT_USAGE)
        return name
    if file_list == "-" or not os.path.isfile(file_list):
        return ""
    path = os.path.realpath(file_list)
    if holder_too_long(path):
        raise QuietError(f"file list {printable(path)}: a path of more than {HOLDER_MAX} "
                         "bytes cannot name its data set; give --name", EXIT_USAGE)
    return path


NAME_HELP = ("The data set these pins belong to, for `free` of another list that shares "
             "files with it (default: the list file's real path).")


class Prepared:
    def __init__(self, file_list: str, mount: str | None, name: str | None = None) -> None:
        from .control import ControlClient

        self.list_name = "<stdin>" if file_list == "-" else printable(file_list)
        self.holder = _holder(file_list, name)
        text = filelist.read_list(file_list)
        lines = filelist.split_lines(text)
        if not lines:  # (bad input, said before a missing daemon)
            raise QuietError(f"file list {self.list_name} has no entries", EXIT_USAGE)
        if len(lines) > filelist.MAX_FILES:  # (the daemon said so only once it had walked them all)
            raise QuietError(f"file list {self.list_name} has {len(lines)} entries; a "
                             f"command takes at most {filelist.MAX_FILES} files: split it", EXIT_USAGE)
        del lines
        self.mp = _choose_mount(mount, text)
        self.client = ControlClient(runtime.socket_path(self.mp), self.mp)
        info = self.client.request({"op": "info"})
        mounts, single_root = filelist.mounts_from_info(info)
        self.entries, self.errors = filelist.parse(text, mountpoint=self.mp, mounts=mounts,
                                                   single_root=single_root)
        if not self.entries and not self.errors:
            raise QuietError(f"file list {self.list_name} has no entries", EXIT_USAGE)

    def wire(self) -> list[list]:
        return [[e.line, e.rel, e.text] for e in self.entries]

    def report_errors(self, failed: list[dict]) -> int:
        """Print every failed entry as one line; the exit code they call for."""
        items = sorted(self.cli_failed() + failed, key=lambda x: x["line"])
        for it in items[:MAX_ERROR_LINES]:
            path = it.get("path")
            # a directory or prefix entry: name the file under it that failed
            inner = (f"{self.mp.rstrip('/')}{path}: " if path and not
                     ("/" + it["entry"].lstrip("/")).endswith(path) else "")
            _say(f"{self.list_name}:{it['line']}: {it['entry']}: {inner}{it['reason']}")
        if len(items) > MAX_ERROR_LINES:
            more = plural(len(items) - MAX_ERROR_LINES, "more failed entry",
                          "more failed entries")
            _say(f"{self.list_name}: {more} not shown (--json lists every one)")
        if any("path" in it or it.get("s3") for it in failed):
            return EXIT_FAILED  # a fetch or a listing failed
        return EXIT_USAGE if items else 0

    def cli_failed(self) -> list[dict]:
        return [{"line": e.line, "entry": e.text, "reason": e.reason} for e in self.errors]

    def request(self, req: dict, on_event=None) -> dict:
        if not self.entries:
            return {}
        return self.client.request({**req, "entries": self.wire()}, on_event=on_event,
                                   timeout=REQUEST_TIMEOUT)

    def result(self, req: dict, empty: dict) -> tuple[dict, int]:
        """free/status: the daemon's answer (``empty`` when no entry was valid) with every
        failed entry, daemon's and ours, in line order; and the exit code so far."""
        res = self.request(req)
        code = self.report_errors(res.get("failed", []))
        res = res or empty
        res.pop("ok", None)
        res["failed"] = sorted(self.cli_failed() + res.get("failed", []),
                               key=lambda x: x["line"])
        return res, _unreachable(res, code)


def _dur(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 10:
        return f"{s:.1f}s"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _pct(a: int, b: int) -> float:
    return 100.0 * a / b if b else 100.0


def _share(a: int, b: int) -> str:
    """``a`` as a share of ``b`` for status: "—" when ``b`` is 0 (an empty file has
    nothing to cache or pin, and 0 of 0 bytes must not read as 100% pinned)."""
    return f"{100.0 * a / b:.1f}%" if b else "—"


class Progress:
    """A bar on a terminal, a line every ~2 s otherwise; nothing with --json off a tty."""

    def __init__(self, enabled: bool) -> None:
        self.tty = sys.stderr.isatty()
        self.enabled = enabled or self.tty
        self.last = 0.0
        self.drawn = False
        self.latest: dict = {}

    def __call__(self, ev: dict) -> None:
        kind = ev.get("kind")
        if kind == "plan":
            for w in ev.get("warnings", []):
                self._clear()
                _say(f"warning: {w}")
            if self.enabled:
                self._clear()
                _say(f"preload: {plural(ev['files'], 'file')}, {human(ev['total_bytes'])}; "
                     f"{human(ev['cached_before_bytes'])} already cached, "
                     f"{human(ev['missing_bytes'])} to fetch"
                     + (f", estimated {_span(ev['estimate'])}"
                        if ev["estimate"].get("seconds") is not None else ""))
            return
        if kind == "progress":
            self.latest = ev
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self.last >= 0.2:
                self.last = now
                self._draw(ev)
        elif now - self.last >= _plain_every(ev.get("elapsed", 0.0)):
            self.last = now
            _say(self._line(ev))

    def _line(self, ev: dict) -> str:
        if ev.get("kind") == "resolving":
            return (f"resolving the file list: {ev['entries_done']}/"
                    f"{_entries_n(ev['entries_total'])}")
        el = max(ev["elapsed"], 1e-6)
        rate = ev["fetched_bytes"] / el
        # failed bytes are not progress, and no longer left to fetch (those fetched first,
        # then not kept, are in fetched_bytes already)
        left = max(0, ev["missing_bytes"] - ev["fetched_bytes"] - ev.get("failed_bytes", 0)
                   + ev.get("fetched_failed_bytes", 0) - ev.get("found_bytes", 0))
        # the daemon's, from the chunks and bytes left (many small files are round trips
        # more than bytes); else the bytes left at the bytes' rate so far
        eta = ev.get("eta")
        if eta is None:
            eta = (left / rate if rate > 0 else None) if left else 0.0
        return (f"{ev['files_done']}/{plural(ev['files_total'], 'file')}, "
                f"{human(ev['bytes_done'])} of "
                f"{human(ev['bytes_total'])} ({_pct(ev['bytes_done'], ev['bytes_total']):.0f}%), "
                f"{human(rate)}/s, ETA {_dur(eta) if eta != 0 else '0s'}"
                + (f", {_failed_files(ev)} failed" if ev.get("failed_files") else ""))

    def _draw(self, ev: dict) -> None:
        if ev.get("kind") == "progress":
            frac = ev["bytes_done"] / ev["bytes_total"] if ev["bytes_total"] else 1.0
            n = int(frac * 24)
            bar = "[" + "#" * n + "." * (24 - n) + "] "
        else:
            bar = ""
        sys.stderr.write("\r\x1b[K" + _fit(bar + self._line(ev), _columns()))
        sys.stderr.flush()
        self.drawn = True

    def _clear(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.drawn = False

    def done(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False


def _plain_every(elapsed: float) -> float:
    """Seconds between two progress lines off a terminal (a job's log): every 2 s for the
    first minute, then a thirtieth of the time so far, at most a minute apart (every 2 s,
    a ten-hour preload wrote 18,000 lines)."""
    return PLAIN_EVERY if elapsed < 60 else min(60.0, max(PLAIN_EVERY, elapsed / 30))


def _columns() -> int:
    try:
        cols = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        cols = 0
    return cols if cols > 0 else 80  # (a pty with no size set says 0)


def _fit(line: str, columns: int) -> str:
    """The bar's line cut to the terminal's width: a line that wrapped left its first
    part behind at every redraw (\\r and ESC[K reach only the last row), and the screen
    scrolled."""
    return line if len(line) < columns else line[:max(1, columns - 2)] + "…"


def _streams(counts: list[float]) -> str:
    """Measured concurrencies as whole stream counts: [2.4, 4] → "about 2 and 4 streams".
    Each is the time-weighted mean of the fetches in flight, hence "about"."""
    whole = sorted({max(1, round(c)) for c in counts})
    about = "about " if any(abs(c - round(c)) >= 0.05 for c in counts) else ""
    names = [str(n) for n in whole]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{about}{listed} stream" + ("" if whole == [1] else "s")


def _estimate_text(est: dict) -> str:
    if est.get("seconds") is None:
        return "no measurement yet (no chunk has been fetched by a preload on this node)"
    if "basis" not in est:
        return "0s (nothing to fetch)"
    n = est["streams"]
    streams = f"{n} stream" + ("" if n == 1 else "s")
    basis = est["basis"]
    if basis == "measured":
        how = f"measured at {streams}"
    elif basis == "interpolated":
        how = ("interpolated between fetches measured at "
               + _streams(est.get("between_streams") or est["measured_streams"]))
    else:
        how = f"fetches were measured only at {_streams(est['measured_streams'])}"
        if " to " in _span(est):
            how += ", hence the range"
        if not est.get("probed_chunks"):  # this was not a dry run that measured already
            how += f"; a dry run with this --parallel would measure fetches at {streams}"
        else:  # it fetched at most a quarter of the missing chunks: fewer streams
            how += " (a dry run fetches at most a quarter of the missing chunks)"
    if "seconds_low" in est and basis != "extrapolated":
        plan = est.get("plan_chunk_bytes")
        theirs = f"average {human(plan)}" if plan else "are of another size"
        how += (f"; the fetches were timed on {human(est['measured_chunk_bytes'])} chunks and "
                f"this data set's {theirs}, hence the range")
    src = (f"{plural(est['probed_chunks'], 'chunk fetch', 'chunk fetches')} just now"
           if est.get("probed_chunks")
           else f"{plural(est['samples'], 'chunk fetch', 'chunk fetches')} since the daemon "
                "started")
    return f"{_span(est)} with {streams} ({how}; from {src})"


def _span(est: dict) -> str:
    """The estimated duration, or its range."""
    if "seconds_low" in est:
        lo, hi = _dur(est["seconds_low"]), _dur(est["seconds_high"])
        return lo if lo == hi else f"{lo} to {hi}"
    return _dur(est["seconds"])


def _failed_files(res: dict) -> str:
    """'1 file (293.0 KiB)': the files that failed and their bytes not in the cache."""
    return f"{plural(res['failed_files'], 'file')} ({human(res.get('failed_bytes', 0))})"


def _entries_n(n: int) -> str:
    return plural(n, "entry", "entries")


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)


def _unreachable(res: dict, code: int) -> int:
    """Report the cluster nodes that did not answer; exit code 1 if any (and none worse)."""
    for u in res.get("unreachable") or []:
        _say(str(u["reason"]))
    return code or (EXIT_FAILED if res.get("unreachable") else 0)


def _on_nodes(nodes: dict) -> str:
    """The end of free's summary: 'on 3 nodes', or 'on 2 of 3 nodes, not on n2' when n2
    did not answer (its reason is on stderr and in its node line)."""
    if not nodes:
        return ""
    bad = sorted(n for n, row in nodes.items() if row.get("error"))
    if not bad:
        return f" on {plural(len(nodes), 'node')}"
    return (f" on {len(nodes) - len(bad)} of {plural(len(nodes), 'node')}, "
            f"not on {', '.join(printable(str(n)) for n in bad)}")


def _node_lines(nodes: dict, fmt) -> None:
    """One line per node; its name and error text may come from a peer (an error frame
    needs no authentication), so their control characters are escaped."""
    for n, row in sorted(nodes.items()):
        text = (printable(str(row["error"]).removeprefix(f"node {n} ")) if row.get("error")
                else fmt(row))
        click.echo(f"  node {printable(str(n)):<12} {text}")


# -- preload -----------------------------------------------------------------------------


@click.command()
@click.option("--file-list", "file_list", required=True, metavar="LIST",
              help="File with one entry a line: /mnt/path, path relative to --mount, or "
                   "s3://bucket/key (a directory or prefix means everything under it); - is stdin.")
@click.option("--mount", help="The cachefs mountpoint (default: the only one).")
@click.option("--parallel", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Chunk fetches in flight.")
@click.option("--pin", is_flag=True, help="Keep these chunks out of LRU eviction.")
@click.option("--name", help=NAME_HELP)
@click.option("--dry-run", is_flag=True, help="Show what would be fetched and how long it takes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
def preload(file_list, mount, parallel, pin, name, dry_run, as_json) -> None:
    """Fetch every chunk of the listed files into the cache (idempotent, resumable).

    \b
    cachefs preload --file-list train.txt --mount /mnt/train --parallel 16 --pin
    cachefs preload --file-list train.txt --dry-run
    """
    if name is not None and not pin:
        raise QuietError("--name names the data set of --pin: give --pin too", EXIT_USAGE)
    prep = Prepared(file_list, mount, name)
    if pin and not dry_run and not prep.holder:
        _say("warning: a list read from stdin or a pipe pins for no data set: a free of "
             "any list naming these files drops them (--name names the data set)")
    progress = Progress(enabled=not as_json)
    try:
        res = prep.request({"op": "preload", "parallel": parallel, "pin": pin,
                            "dry_run": dry_run, "holder": prep.holder}, on_event=progress)
    except KeyboardInterrupt:
        progress.done()
        ev = progress.latest
        done = (f" after fetching {human(ev.get('fetched_bytes', 0))} "
                f"({ev.get('files_done', 0)}/{plural(ev.get('files_total', 0), 'file')} done)"
                if ev else "")
        _say(f"preload interrupted{done}; fetches in flight finish in the daemon and are "
             "kept; run it again to fetch the rest")
        raise SystemExit(130) from None
    finally:
        progress.done()
    failed = prep.cli_failed() + res.get("failed", [])
    code = prep.report_errors(res.get("failed", []))
    if not res:
        res = {"files": 0, "total_bytes": 0, "cached_before_bytes": 0, "missing_bytes": 0,
               "fetched_bytes": 0, "seconds": 0.0, "dry_run": dry_run, "warnings": []}
    res["failed"] = sorted(failed, key=lambda x: x["line"])
    res["mountpoint"] = prep.mp
    res.pop("ok", None)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        _exit(code)
        return
    if dry_run:
        for w in res.get("warnings", []):
            _say(f"warning: {w}")
        click.echo(f"dry run for {printable(prep.mp)}: {plural(res['files'], 'file')}, "
                   f"{human(res['total_bytes'])} listed")
        click.echo(f"  already cached  {human(res['cached_before_bytes'])}")
        click.echo(f"  to fetch        {human(res['missing_bytes'])} "
                   f"({plural(res.get('missing_chunks', 0), 'chunk')})")
        if pin:
            click.echo(f"  to pin          {human(res.get('to_pin_bytes', 0))}")
        if "estimate" in res:
            click.echo(f"  estimate        {_estimate_text(res['estimate'])}")
        if res.get("fetched_bytes"):
            left = max(0, res["missing_bytes"] - res["fetched_bytes"])
            click.echo(f"  measured with   {plural(res.get('fetched_chunks', 0), 'chunk')} "
                       f"({human(res['fetched_bytes'])}) fetched just now and kept in the "
                       f"cache: {human(left)} left to fetch")
        if res["failed"]:
            click.echo(f"  failed          {_entries_n(len(res['failed']))} (listed on stderr)")
        _exit(code)
        return
    secs = res["seconds"]
    fs = res.get("fetch_seconds", secs)
    click.echo(f"preload into {printable(prep.mp)}: {plural(res['files'], 'file')}, "
               f"{human(res['total_bytes'])} listed" + (", pinned" if pin else ""))
    click.echo(f"  already cached  {human(res['cached_before_bytes'])}")
    click.echo(f"  fetched         {human(res['fetched_bytes'])} "
               f"({plural(res.get('fetched_chunks', 0), 'chunk')}) in {_dur(fs)}"
               + (f", {human(res['throughput_bps'])}/s" if res.get("fetched_bytes") else ""))
    if res.get("found_bytes"):
        click.echo(f"  found cached    {human(res['found_bytes'])} "
                   f"({plural(res.get('found_chunks', 0), 'chunk')} other readers cached "
                   "during the preload)")
    est = res.get("estimate") or {}
    if res.get("fetched_bytes"):
        click.echo(f"  estimate        {_estimate_text(est)}; actual {_dur(fs)}")
    if res.get("uncached_bytes"):
        click.echo(f"  not kept        {human(res['uncached_bytes'])} (cache full)")
    click.echo("  failed          "
               + (f"{_entries_n(len(res['failed']))} (listed on stderr)" if res["failed"] else "0")
               + (f"; {_failed_files(res)} not fetched" if res.get("failed_files") else ""))
    click.echo(f"  duration        {_dur(secs)}")
    if res.get("nodes"):
        def fmt(row: dict) -> str:
            fb = row.get("fallback_for") or {}
            return (f"{human(row.get('bytes', 0))} placed here, "
                    f"{human(row.get('cached_before_bytes', 0))} already cached, fetched "
                    f"{human(row.get('fetched_bytes', 0))} "
                    f"({plural(row.get('fetched_chunks', 0), 'chunk')})"
                    + (f", {plural(row['failed_chunks'], 'chunk')} failed"
                       if row.get("failed_chunks") else "")
                    + (f", standing in for {', '.join(sorted(fb))}" if fb else ""))
        _node_lines(res["nodes"], fmt)
    for w in res.get("warnings", []):
        if "could not be kept" in w:  # the others were shown before the fetch
            _say(f"warning: {w}")
    _exit(code)


# -- free ------------------------------------------------------------------------------


@click.command()
@click.option("--file-list", "file_list", required=True, metavar="LIST",
              help="File with one entry a line (see `cachefs preload --help`).")
@click.option("--mount", help="The cachefs mountpoint (default: the only one).")
@click.option("--name", help="The data set whose pins go (default: the list file's real "
                             "path); files another data set pins stay.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def free(file_list, mount, name, as_json) -> None:
    """Remove the listed files' chunks (and their pins) from the cache, except those
    another data set's `preload --pin` still pins; nothing else.

    \b
    cachefs free --file-list train.txt --mount /mnt/train
    """
    prep = Prepared(file_list, mount, name)
    res, code = prep.result({"op": "free", "holder": prep.holder},
                            {"files": 0, "total_bytes": 0, "freed_bytes": 0, "freed_chunks": 0,
                             "pins_removed": 0})
    # (no entry was valid, or a daemon of an older cachefs answered: nothing kept)
    for k, v in (("kept_files", 0), ("kept_bytes", 0), ("kept_versions", 0), ("kept_by", {}),
                 ("warnings", [])):
        res.setdefault(k, v)
    for w in res["warnings"]:
        _say(f"warning: {w}")
    code = code or (EXIT_FAILED if res["warnings"] else 0)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(f"freed {human(res['freed_bytes'])} ({plural(res['freed_chunks'], 'chunk')}, "
                   f"{res['pins_removed']} pinned) of {plural(res['files'], 'file')} listed "
                   f"({human(res['total_bytes'])}) in {printable(prep.mp)}"
                   + _on_nodes(res.get("nodes") or {}))
        if res.get("nodes"):
            _node_lines(res["nodes"], lambda r: f"freed {human(r['freed_bytes'])} "
                        f"({plural(r['freed_chunks'], 'chunk')}, {r['pins_removed']} pinned)")
        if res.get("superseded_versions"):
            click.echo(f"  with {plural(res['superseded_versions'], 'older version')} of "
                       "listed files, pinned before S3 replaced them")
        if res.get("kept_files") or res.get("kept_versions"):
            click.echo(_kept_text(res))
    _exit(code)


def _data_sets(by: dict[str, dict]) -> str:
    """``{data set: {files, versions}}`` as "a.txt (2 files), val (1 older version) and 2
    more": the three with most files first."""
    top = sorted(by.items(), key=lambda kv: (-kv[1].get("files", 0),
                                             -kv[1].get("versions", 0), kv[0]))

    def counts(v: dict) -> str:
        out = " and ".join(plural(v[k], w) for k, w in (("files", "file"),
                                                         ("versions", "older version"))
                           if v.get(k))
        if v.get("unpinned"):  # (its preload --pin was stopped: run it again)
            out += f"; {v['unpinned']} not pinned yet"
        return out

    who = ", ".join(f"{printable(h) if h else '(no data set)'} ({counts(v)})"
                    for h, v in top[:3])
    return who + (f" and {len(top) - 3} more" if len(top) > 3 else "")


def _kept_text(res: dict) -> str:
    """`free`'s line for what other data sets' pins kept."""
    who = _data_sets(res.get("kept_by") or {})
    parts = []
    if res.get("kept_files"):
        parts.append(f"{human(res['kept_bytes'])} of {plural(res['kept_files'], 'file')}")
    if res.get("kept_versions"):
        parts.append(plural(res["kept_versions"], "older version"))
    return (f"  kept {' and '.join(parts)} that other data sets pin"
            + (f": {who}" if who else "")
            + " (a free of those lists, or with --name, drops them)")


# -- status ----------------------------------------------------------------------------


@click.command()
@click.option("--file-list", "file_list", required=True, metavar="LIST",
              help="File with one entry a line (see `cachefs preload --help`).")
@click.option("--mount", help="The cachefs mountpoint (default: the only one).")
@click.option("--json", "as_json", is_flag=True, help="Per-file and total figures as JSON.")
def status(file_list, mount, as_json) -> None:
    """How much of the listed files is cached and pinned.

    \b
    cachefs status --file-list train.txt --mount /mnt/train
    """
    prep = Prepared(file_list, mount)
    # the table shows the first MAX_ROWS files: the daemon sends no more (a million rows
    # would be 150 MB of JSON, and twice that in memory at each end)
    res, code = prep.result({"op": "status", **({} if as_json else {"rows": MAX_ROWS})},
                            {"files": [], "file_count": 0, "total_bytes": 0,
                             "cached_bytes": 0, "pinned_bytes": 0, "pinned_by": {}})
    mp = prep.mp.rstrip("/")
    for f in res["files"]:
        f["path"] = mp + f["path"]
    if as_json:
        click.echo(json.dumps(res, indent=2))
        _exit(code)
        return
    rows, count = res["files"], res["file_count"]
    click.echo(f"{'cached':>7} {'pinned':>7} {'size':>10}  path")
    for f in rows[:MAX_ROWS]:
        click.echo(f"{_share(f['cached_bytes'], f['size']):>7} "
                   f"{_share(f['pinned_bytes'], f['size']):>7} {human(f['size']):>10}  "
                   f"{printable(f['path'])}")
    if count > MAX_ROWS:
        click.echo(f"  ... {plural(count - MAX_ROWS, 'more file')} (--json lists them all)")
    tot = res["total_bytes"]
    if not count:  # every entry failed (each named on stderr): no share to report
        click.echo("total: 0 files")
    else:
        click.echo(f"total: {plural(count, 'file')}, {human(tot)}; cached "
                   f"{human(res['cached_bytes'])} ({_share(res['cached_bytes'], tot)}), "
                   f"pinned {human(res['pinned_bytes'])} ({_share(res['pinned_bytes'], tot)})")
    if res.get("pinned_by"):
        click.echo(f"pinned by: {_data_sets(res['pinned_by'])}")
    if res.get("nodes"):
        _node_lines(res["nodes"], lambda r: f"cached {human(r['cached_bytes'])}, pinned "
                    f"{human(r['pinned_bytes'])} (owns {human(r['owned_bytes'])})")
    _exit(code)


COMMANDS = [preload, free, status]
