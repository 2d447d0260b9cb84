"""Cache control by file list: the daemon side of `cachefs preload/free/status`.

The CLI parses the list (filelist.py) and sends ``entries``: a list of
``[line, path relative to the mount root, entry as written]``.  Here each
entry is resolved (VFS.resolve) and walked (VFS.walk_files); an entry that
does not exist, or whose listing fails, is reported with its line and skipped.
A file named by several entries counts once (its first line).

preload
  Every chunk of every listed file goes through ChunkReader.get, the
  singleflight read path, so a preload and a reader of the same cold chunk
  cause one GET.  Chunks are taken in list order by ``parallel`` workers;
  chunks already in the store are skipped without reading them.  The fetch
  itself runs in the daemon's service nursery: when the client hangs up (Ctrl-C)
  this handler is cancelled, the fetches in flight finish and are kept, and a
  rerun fetches only what is missing.
  With ``pin``, chunks are pinned (already cached ones by ChunkStore.set_pinned,
  missing ones by get(pin=True)).  Before any fetch: if already-pinned bytes plus
  the bytes to pin exceed the cache limit, the request is refused; if an
  unpinned data set is larger than the room left beside pinned data, a warning
  says that LRU will evict the earliest-fetched files.

Throughput model (for --dry-run and the estimate shown next to the actual time)
  Each chunk fetched by a preload is timed (seconds from get() to its return).
  Per-chunk time is modelled as t = latency + bytes / stream_bps, fitted by
  least squares over recent fetches with exponential forgetting (weight 0.98
  per sample).  When the chunk sizes do not vary enough to separate the two
  terms, latency is taken as 0 and stream_bps as mean bytes / mean time (which
  still predicts chunks of the measured size exactly).  The estimate for a plan:
      streams = min(parallel, S3 max concurrency, missing chunks)
      seconds = missing_bytes / (stream_bps * streams)
                + ceil(missing_chunks / streams) * latency
  With no measurement yet, a dry run times up to PROBE_CHUNKS real fetches of
  missing chunks of the listed files (they stay cached) and says so; when
  nothing is missing, or the probe fails, it says "no measurement yet".
  The state lives in the daemon's memory only.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .chunks.ids import ChunkRef
from .control import ControlError
from .errors import ObjectChanged, S3Error
from .vfs import FSError, Node

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("cachefs.datasets")

PROGRESS_EVERY = 0.5  # seconds between progress events
PROBE_CHUNKS = 2
YIELD_EVERY = 256  # files or chunks handled between two checkpoints (reads go on meanwhile)
MAX_PARALLEL = 256
MAX_ROWS = 1_000_000


# -- throughput model -------------------------------------------------------------------


class ThroughputModel:
    """t = latency + bytes / stream_bps, fitted with exponential forgetting."""

    DECAY = 0.98

    def __init__(self) -> None:
        self.w = 0.0
        self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.samples = 0
        self.updated_at = 0.0

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        d = self.DECAY
        x, y = float(nbytes), float(seconds)
        self.w = self.w * d + 1
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y
        self.samples += 1
        self.updated_at = time.time()

    @property
    def measured(self) -> bool:
        return self.samples > 0

    def params(self) -> tuple[float, float]:
        """(latency seconds, per-stream bytes/s)."""
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var > (0.05 * mx) ** 2 and self.samples >= 4:
            slope = (self.sxy / self.w - mx * my) / var
            lat = my - slope * mx
            if slope > 0 and lat >= 0:
                return lat, 1.0 / slope
        return 0.0, mx / my

    def estimate(self, missing_bytes: int, missing_chunks: int, parallel: int,
                 s3_concurrency: int) -> dict:
        streams = max(1, min(parallel, s3_concurrency, max(1, missing_chunks)))
        out: dict = {"streams": streams, "samples": self.samples}
        if missing_chunks == 0:
            out.update(seconds=0.0, measured=self.measured)
            return out
        if not self.measured:
            out.update(seconds=None, measured=False)
            return out
        lat, bps = self.params()
        secs = missing_bytes / (bps * streams) + math.ceil(missing_chunks / streams) * lat
        out.update(seconds=round(secs, 3), measured=True, stream_bps=round(bps),
                   latency_s=round(lat, 6))
        return out

    def statistics(self) -> dict:
        if not self.measured:
            return {"samples": 0}
        lat, bps = self.params()
        return {"samples": self.samples, "stream_bps": round(bps), "latency_s": round(lat, 6),
                "updated_at": self.updated_at}


# -- resolving entries ------------------------------------------------------------------


@dataclass(eq=False)
class FileItem:
    line: int
    entry: str
    node: Node
    path: str  # display path, relative to the mountpoint, starting with "/"
    refs: list[ChunkRef] = field(default_factory=list)
    size: int = 0
    left: int = 0  # chunks not yet done (preload)
    error: str = ""


def _reason(e: BaseException) -> str:
    if isinstance(e, FSError):
        if e.errno == errno.ENOENT:
            return "no such file or directory"
        if e.errno == errno.ENOTDIR:
            return "not a directory (a file name is used as a directory)"
        if e.errno == errno.EIO:
            return "listing from S3 failed (see the daemon log)"
        return os.strerror(e.errno)
    if isinstance(e, ObjectChanged):
        return "the object changed in S3 during the operation"
    if isinstance(e, S3Error):
        return f"S3: {e}"
    return f"{type(e).__name__}: {e}"


def _entries(req: dict) -> list[tuple[int, str, str]]:
    raw = req.get("entries")
    if not isinstance(raw, list):
        raise ControlError("malformed request: entries must be a list")
    out = []
    for item in raw:
        try:
            line, rel = int(item[0]), str(item[1])
            text = str(item[2]) if len(item) > 2 else rel
        except (TypeError, ValueError, IndexError):
            raise ControlError("malformed request: each entry is [line, path, text]") from None
        out.append((line, rel, text))
    return out


class Job:
    """One request: serialized event emission and a periodic progress ticker."""

    def __init__(self, emit) -> None:
        self._emit = emit
        self._lock = trio.Lock()
        self.entries_total = 0
        self.entries_done = 0
        self.progress: Callable[[], dict] | None = None  # set once fetching

    async def emit(self, ev: dict) -> None:
        async with self._lock:
            await self._emit(ev)

    def snapshot(self) -> dict:
        if self.progress is None:
            return {"kind": "resolving", "entries_done": self.entries_done,
                    "entries_total": self.entries_total}
        return {"kind": "progress", **self.progress()}

    async def ticker(self) -> None:
        while True:
            await trio.sleep(PROGRESS_EVERY)
            await self.emit(self.snapshot())

    async def run(self, fn, *args):
        """``await fn(*args)`` with the ticker running; its errors come out bare
        (not wrapped in an exception group), so a ControlError reaches the client."""
        err: Exception | None = None
        result = None
        async with trio.open_nursery() as n:
            n.start_soon(self.ticker)
            try:
                result = await fn(*args)
            except Exception as e:  # noqa: BLE001 - re-raised below, outside the nursery
                err = e
            await self.stop(n.cancel_scope)
        if err is not None:
            raise err
        return result

    async def stop(self, scope: trio.CancelScope) -> None:
        """Cancel the ticker between two events, never in the middle of a line."""
        async with self._lock:
            scope.cancel()


class Datasets:
    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.model = ThroughputModel()
        self.runs = 0

    def statistics(self) -> dict:
        return {"preloads": self.runs, "throughput": self.model.statistics()}

    # -- helpers --------------------------------------------------------------------

    @property
    def s3_concurrency(self) -> int:
        return self.d.cfg.s3.max_concurrency

    async def _resolve_request(self, req: dict,
                               emit) -> tuple[Job, list[FileItem], list[dict]]:
        job = Job(emit)
        files, failed = await job.run(self.resolve, _entries(req), job)
        return job, files, failed

    async def resolve(self, entries: list[tuple[int, str, str]],
                      job: Job) -> tuple[list[FileItem], list[dict]]:
        vfs = self.d.vfs
        assert vfs is not None
        files: list[FileItem] = []
        failed: list[dict] = []
        seen: set[int] = set()
        job.entries_total = len(entries)
        for line, rel, text in entries:
            try:
                node = await vfs.resolve(rel)
                nodes = await vfs.walk_files(node)
            except (FSError, S3Error) as e:
                failed.append({"line": line, "entry": text, "reason": _reason(e)})
                job.entries_done += 1
                continue
            for n in nodes:
                if n.ino in seen:
                    continue
                seen.add(n.ino)
                obj = vfs.version(n)
                refs = obj.chunks()
                files.append(FileItem(line, text, n, vfs.display_path(n), refs, n.size,
                                      len(refs)))
                if len(files) > MAX_ROWS:
                    raise ControlError(f"the file list names more than {MAX_ROWS} files; "
                                       "split it")
                if len(files) % YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()  # hashing chunk ids: let reads run meanwhile
            job.entries_done += 1
            if job.entries_done % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
        return files, failed

    # -- status ---------------------------------------------------------------------

    async def status(self, req: dict, emit) -> dict:
        store = self.d.store
        assert store is not None
        job, files, failed = await self._resolve_request(req, emit)
        rows = []
        tot = cached = pinned = 0
        for i, f in enumerate(files):
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            c = p = cc = 0
            for r in f.refs:
                if store.contains(r.cid):
                    c += r.length
                    cc += 1
                    if store.is_pinned(r.cid):
                        p += r.length
            rows.append({"path": f.path, "line": f.line, "size": f.size, "cached_bytes": c,
                         "pinned_bytes": p, "chunks": len(f.refs), "cached_chunks": cc})
            tot += f.size
            cached += c
            pinned += p
        return {"files": rows, "total_bytes": tot, "cached_bytes": cached,
                "pinned_bytes": pinned, "failed": failed, "cache": store.statistics()}

    # -- free -----------------------------------------------------------------------

    async def free(self, req: dict, emit) -> dict:
        store = self.d.store
        assert store is not None
        job, files, failed = await self._resolve_request(req, emit)
        cids = [r.cid for f in files for r in f.refs if store.contains(r.cid)]
        pins = sum(1 for c in cids if store.is_pinned(c))  # removed with their chunks
        freed = 0
        with trio.CancelScope(shield=True):  # index and files stay consistent
            for i in range(0, len(cids), 4096):
                freed += await store.drop(cids[i:i + 4096])
        log.info("free: %d files, %d chunks, %d bytes (%d pins removed)", len(files), len(cids),
                 freed, pins)
        return {"files": len(files), "total_bytes": sum(f.size for f in files),
                "freed_bytes": freed, "freed_chunks": len(cids), "pins_removed": pins,
                "failed": failed, "cache": store.statistics()}

    # -- preload --------------------------------------------------------------------

    async def _plan(self, files: list[FileItem], pin: bool, parallel: int) -> dict:
        store = self.d.store
        assert store is not None
        total = cached = to_pin = missing = nmissing = nchunks = 0
        for i, f in enumerate(files):
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            for r in f.refs:
                nchunks += 1
                if store.contains(r.cid):
                    cached += r.length
                else:
                    missing += r.length
                    nmissing += 1
                if pin and not store.is_pinned(r.cid):
                    to_pin += r.length
            total += f.size
        warnings = []
        limit = store.limit
        if pin:
            after = store.pinned_bytes + to_pin
            if after > limit:
                raise ControlError(
                    f"cannot pin: {_h(store.pinned_bytes)} already pinned + {_h(to_pin)} to pin "
                    f"= {_h(after)}, more than the cache limit of {_h(limit)}; nothing was "
                    "fetched (free pinned data with `cachefs free`, or raise --cache-size)")
            if after > store.high:
                warnings.append(
                    f"pinned data will fill {100 * after / limit:.0f}% of the cache "
                    f"({_h(after)} of {_h(limit)}); other reads keep only {_h(limit - after)}")
        else:
            room = limit - store.pinned_bytes
            if total > room:
                warnings.append(
                    f"the data set ({_h(total)}) is larger than the cache room for unpinned data "
                    f"({_h(room)} of {_h(limit)}): LRU eviction will drop the earliest-fetched "
                    "files while later ones arrive; the end of the list is what stays cached")
        return {"files": len(files), "total_bytes": total, "chunks": nchunks,
                "cached_before_bytes": cached, "missing_bytes": missing,
                "missing_chunks": nmissing, "to_pin_bytes": to_pin, "warnings": warnings,
                "estimate": self.model.estimate(missing, nmissing, parallel,
                                                self.s3_concurrency)}

    async def _probe(self, files: list[FileItem]) -> int:
        """Time a few real fetches of missing chunks (they stay cached)."""
        reader, store = self.d.reader, self.d.store
        assert reader is not None and store is not None
        n = 0
        for f in files:
            for r in f.refs:
                if n >= PROBE_CHUNKS:
                    return n
                if store.contains(r.cid):
                    continue
                t0 = time.perf_counter()
                try:
                    await reader.get(r)
                except Exception as e:  # noqa: BLE001 - a probe that fails measures nothing
                    log.info("throughput probe failed: %s", e)
                    return n
                self.model.observe(r.length, time.perf_counter() - t0)
                n += 1
        return n

    async def preload(self, req: dict, emit) -> dict:
        d = self.d
        store, reader = d.store, d.reader
        assert store is not None and reader is not None
        pin = bool(req.get("pin"))
        dry_run = bool(req.get("dry_run"))
        try:
            parallel = int(req.get("parallel") or 8)
        except (TypeError, ValueError):
            raise ControlError("parallel must be a number") from None
        if not 1 <= parallel <= MAX_PARALLEL:
            raise ControlError(f"--parallel must be between 1 and {MAX_PARALLEL}")
        t_start = time.monotonic()
        job, files, failed = await self._resolve_request(req, emit)
        plan = await self._plan(files, pin, parallel)
        if dry_run:
            probed = 0
            if plan["missing_chunks"] and not self.model.measured:
                probed = await job.run(self._probe, files)
                if probed:  # the plan stays what was missing when we looked
                    plan["estimate"] = self.model.estimate(
                        plan["missing_bytes"], plan["missing_chunks"], parallel,
                        self.s3_concurrency)
            plan["estimate"]["probed_chunks"] = probed
            return {"dry_run": True, "pin": pin, "parallel": parallel, **plan,
                    "failed": failed, "fetched_bytes": 0,
                    "seconds": round(time.monotonic() - t_start, 3),
                    "throughput": self.model.statistics()}
        await job.emit({"kind": "plan", "pin": pin, "parallel": parallel, **plan})
        run = _Run(self, files, pin, parallel, plan)
        job.progress = run.progress
        t0 = time.monotonic()
        await job.run(run.go)
        secs = time.monotonic() - t0
        self.runs += 1
        for f in files:
            if f.error:
                failed.append({"line": f.line, "entry": f.entry, "path": f.path,
                               "reason": f.error})
        failed.sort(key=lambda x: x["line"])
        total_secs = time.monotonic() - t_start
        fetched = run.fetched_bytes
        out = {"pin": pin, "parallel": parallel, "files": plan["files"],
               "total_bytes": plan["total_bytes"], "chunks": plan["chunks"],
               "cached_before_bytes": plan["cached_before_bytes"],
               "missing_bytes": plan["missing_bytes"], "fetched_bytes": fetched,
               "fetched_chunks": run.fetched_chunks,
               "fetched_files": sum(1 for f in files if not f.error and f in run.touched),
               "uncached_bytes": run.uncached_bytes, "failed": failed,
               "failed_files": sum(1 for f in files if f.error),
               "seconds": round(total_secs, 3), "fetch_seconds": round(secs, 3),
               "throughput_bps": round(fetched / secs) if secs > 0 else 0,
               "estimate": plan["estimate"], "warnings": plan["warnings"],
               "cache": store.statistics()}
        if run.uncached_bytes:
            out["warnings"] = out["warnings"] + [
                f"{_h(run.uncached_bytes)} could not be kept in the cache (it is full of "
                "pinned data, or the disk is full)"]
        return out


class _Run:
    """One preload: workers take chunks in list order."""

    def __init__(self, ds: Datasets, files: list[FileItem], pin: bool, parallel: int,
                 plan: dict) -> None:
        self.ds = ds
        self.files = files
        self.pin = pin
        self.parallel = parallel
        self.plan = plan
        self.fetched_bytes = 0
        self.fetched_chunks = 0
        self.done_bytes = 0
        self.files_done = 0
        self.uncached_bytes = 0
        self.failed_files = 0
        self.touched: set = set()
        self.t0 = time.monotonic()

    def progress(self) -> dict:
        p = self.plan
        return {"files_done": self.files_done, "files_total": p["files"],
                "bytes_done": self.done_bytes, "bytes_total": p["total_bytes"],
                "fetched_bytes": self.fetched_bytes, "missing_bytes": p["missing_bytes"],
                "failed_files": self.failed_files,
                "elapsed": round(time.monotonic() - self.t0, 3)}

    def _work(self):
        for f in self.files:
            if not f.refs:
                self.files_done += 1
                continue
            for r in f.refs:
                yield f, r

    def _chunk_done(self, f: FileItem, length: int) -> None:
        self.done_bytes += length
        f.left -= 1
        if f.left == 0:
            self.files_done += 1

    async def go(self) -> None:
        store = self.ds.d.store
        assert store is not None
        if self.pin:
            # already cached chunks are pinned in place, without reading them back
            cids = [r.cid for f in self.files for r in f.refs
                    if store.contains(r.cid) and not store.is_pinned(r.cid)]
            for i in range(0, len(cids), 4096):
                await store.set_pinned(cids[i:i + 4096], True)
        work = self._work()
        async with trio.open_nursery() as n:
            for _ in range(self.parallel):
                n.start_soon(self._worker, work)

    async def _worker(self, work) -> None:
        d = self.ds.d
        store, reader = d.store, d.reader
        assert store is not None and reader is not None
        skipped = 0
        for f, r in work:
            if f.error or (store.contains(r.cid) and (not self.pin or store.is_pinned(r.cid))):
                self._chunk_done(f, r.length)  # failed file, or already cached
                skipped += 1
                if skipped % YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()
                continue
            t0 = time.perf_counter()
            try:
                await reader.get(r, pin=self.pin)
            except Exception as e:  # noqa: BLE001 - the file fails, the run goes on
                if not f.error:
                    f.error = _reason(e)
                    self.failed_files += 1
                    log.warning("preload of %s failed: %s", f.path, f.error)
                self._chunk_done(f, r.length)
                continue
            dt = time.perf_counter() - t0
            self.ds.model.observe(r.length, dt)
            self.touched.add(f)
            self.fetched_bytes += r.length
            self.fetched_chunks += 1
            if not store.contains(r.cid):
                self.uncached_bytes += r.length
            elif self.pin and not store.is_pinned(r.cid):
                await store.set_pinned([r.cid], True)
            self._chunk_done(f, r.length)


def _h(n: float) -> str:
    from .report import human

    return human(n)


def _refusing(handler):
    """A ControlError becomes ``{"refused": msg}`` in an ok answer.

    ControlServer calls handlers inside a nursery, so with trio's strict
    exception groups its ``except ControlError`` never matches and the client
    would see "internal error: Exceptions from Trio nursery".  Until control.py
    unwraps the group, refusals travel this way (the CLI turns them into one line).
    """
    async def wrapped(req: dict, emit) -> dict:
        try:
            return await handler(req, emit)
        except ControlError as e:
            return {"refused": str(e)}
    return wrapped


def register(d: Daemon) -> None:
    srv = d.control
    assert srv is not None
    ds = Datasets(d)
    d.datasets = ds  # type: ignore[attr-defined]

    async def throughput(req, emit):
        return ds.statistics()

    srv.register("preload", _refusing(ds.preload))
    srv.register("free", _refusing(ds.free))
    srv.register("status", _refusing(ds.status))
    srv.register("throughput", throughput)
