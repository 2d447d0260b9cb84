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

Estimates (throughput.py)
  Every chunk a preload fetches is timed with the number of fetches in flight
  beside it; the estimate for a plan comes from fetches measured at about the
  plan's number of streams, or says that it is interpolated or a range.  A dry
  run with no measurement near its --parallel first fetches missing chunks of
  the list at that parallelism for PROBE_SECONDS, at most a quarter of what is
  missing (they stay cached), and says so.
  The state lives in the daemon's memory only.

In a cluster (``daemon.cluster`` set; docs/datasets.md, "In a cluster")
  preload groups the chunks by owner, asks each owner what it holds (peer op
  ``ds_probe``, chunk ids only) and checks pins against each owner's cache; this
  node's chunks are fetched by local workers, every other owner gets its chunks
  in ``ds_fetch`` batches and fetches them itself (each owner: up to ``parallel``
  streams); a dry run measures the same way, every owner at once.  An owner that
  does not answer is replaced by its successor on the ring, the node readers use
  while it is down.  free sends the chunk ids to
  every member (``ds_drop``); status asks every member (``ds_probe``) and adds
  per-node figures.  An unreachable node is reported (exit code 1 for free and
  status).
"""

from __future__ import annotations

import base64
import errno
import itertools
import json
import logging
import os
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .chunks.ids import ChunkRef, ObjectVersion, chunk_id
from .control import ControlError
from .errors import NoSuchObject, ObjectChanged, S3Error
from .filelist import HOLDER_MAX, MAX_FILES, holder_too_long
from .index import Index, IndexCommitError, path_key
from .report import human, plural
from .store.chunkstore import file_size
from .throughput import MIN_SAMPLES, ThroughputModel
from .vfs import ROOT_INO, FSError, Node

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("cachefs.datasets")

PROGRESS_EVERY = 0.5  # seconds between progress events
PROBE_SECONDS = 2.0  # a dry run's measurement: new fetches start for this long
PROBE_SHARE = 4  # ... and fetch at most 1/PROBE_SHARE of the missing chunks (MIN_SAMPLES at least)
YIELD_CHUNKS = 4096  # chunk ids hashed between two checkpoints (about 11 ms)
YIELD_EVERY = 256  # files or chunks handled between two checkpoints (reads go on meanwhile)
MAX_PARALLEL = 256

# cluster-wide preload / free / status (see "In a cluster" above)
# bytes of JSON items per peer request (a ds_fetch call's chunk descriptions, pin records,
# record keys): a request is at most 64 KiB
PAYLOAD_BUDGET = 48 * 1024
SYNC_FROM = 2  # members whose pin records a starting node merges into its own
SYNC_TRIES, SYNC_PAUSE = 20, 3.0  # while no member answers (the first node up, say)
DUMP_BUDGET = 512 * 1024  # bytes of pin records per ds_pins_dump reply (at most 1 MiB)
ID_BATCH = 2500  # chunk ids per ds_probe / ds_drop call: ~53 KB of base64, under 64 KiB
MAX_FETCH_CHUNKS = 1024  # chunks per ds_fetch call, at most
# seconds an owner works on one ds_fetch call before it answers (env: tests only)
FETCH_WAIT = float(os.environ.get("CACHEFS_TEST_FETCH_WAIT") or 10.0)
FREE_WAIT = 4.0  # seconds a free waits for fetches of its chunks under way (a ds_drop's
# requester gives up after Cluster.no_s3_bound: 10 s by default; see _free_wait)
CALLS_PER_NODE = 2  # ds_fetch calls in flight from one preload to one owner
MAX_FETCH_CALLS = 8  # ds_fetch calls one owner serves at once; more get "busy"
BUSY_BACKOFF = 0.2  # seconds before resending a batch an owner was too busy for
JOB_IDLE = 300.0  # an owner forgets a preload's concurrency limiter after this


# -- resolving entries ------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class FileItem:
    line: int
    entry: str
    node: Node
    path: str  # display path, relative to the mountpoint, starting with "/"
    refs: list[ChunkRef] = field(default_factory=list)
    size: int = 0
    left: int = 0  # chunks not yet done (preload)
    error: str = ""
    # (preload) by chunk index, 1 where the plan found the chunk cached; None: it found
    # none cached. A chunk missing then and cached when a worker reaches it (a reader,
    # another run) is not left to fetch: the live ETA subtracts it.
    cached_at_plan: bytearray | None = None


@dataclass
class _FreePlan:
    """What a free of one data set's list drops and keeps, by the pin records (read under
    _pins_lock): ``old``, the versions pinned under the listed names (or under the listed
    directories) that S3 does not list now and no other data set pins (and the chunks a
    store without ETags may have under no version); ``superseded``, how many of those
    versions have chunks (the summary names them: the chunks of no version are not one);
    ``keys``, the records it reached (this data set lets go of them once the free is done);
    ``failed``, the failures left (an entry S3 no longer has is no "no such file" when
    something was pinned under it); ``kept_ids``, the listed files (``id()``) whose
    version S3 lists another data set pins; ``kept_versions``, older versions kept so;
    ``kept_by``, per other data set, the files, bytes and older versions it keeps;
    ``names`` and ``prefixes``, where the records of the list lie (the other members let go
    of their copies there: a member may hold a record this node lacks)."""
    old: list[FileItem]
    superseded: int
    keys: list[bytes]
    failed: list[dict]
    kept_ids: set[int]
    kept_versions: int
    kept_by: dict[str, dict[str, int]]
    names: list[bytes]  # the record keys of every listed name and file (found or not)
    prefixes: list[bytes]  # the record ranges of the listed directories


# what a name that cannot be used answers (bad input); any other error is S3's
BAD_ENTRY = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL})


async def _chunks(obj: ObjectVersion) -> list[ChunkRef]:
    """An object version's chunks. Hashing chunk ids takes 2.7 µs each: a large object's
    are hashed in a worker thread, and a checkpoint follows every YIELD_CHUNKS ids (256
    files of 1 GiB held the trio thread 88 ms, a 1 TB object 350 ms)."""
    if obj.nchunks < YIELD_CHUNKS:
        return obj.chunks()
    return await trio.to_thread.run_sync(obj.chunks)


SLICE = 16384  # chunk ids looked up between two checkpoints (a few ms of the trio thread)


async def _sliced(items: Sequence, fn: Callable[[Sequence], Iterable]) -> list:
    """``fn`` over ``items`` a slice at a time, a checkpoint between slices, the results
    joined: a pass over a million chunk ids held the trio thread (every FUSE request)
    for about 0.1 s, and a free made several."""
    out: list = []
    for i in range(0, len(items), SLICE):
        if i:
            await trio.lowlevel.checkpoint()
        out += fn(items[i:i + SLICE])
    return out


def _entry_failed(line: int, text: str, e: FSError | S3Error) -> dict:
    """The report of a list entry that could not be resolved or listed."""
    item: dict = {"line": line, "entry": text, "reason": _reason(e)}
    if not (isinstance(e, FSError) and e.errno in BAD_ENTRY):
        item["s3"] = True  # S3 failed the listing: no bad entry (exit 1)
    return item


def _reason(e: BaseException) -> str:
    if isinstance(e, FSError):
        if e.errno == errno.ENOENT:
            return "no such file or directory"
        if e.errno == errno.ENOTDIR:
            return "not a directory (a file name is used as a directory)"
        if e.errno == errno.EIO:
            return "listing from S3 failed (see the daemon log)"
        if e.errno == errno.EACCES:
            return "S3 denied the listing (permission denied)"
        return os.strerror(e.errno)
    if isinstance(e, ObjectChanged):
        return ("the object changed in S3 since it was listed (the next run takes its new "
                "version)")
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


def _holder(req: dict) -> str:
    """The data set a request is made for: ``holder`` of the request (the CLI sends the
    list file's real path, or --name), or "" (none: a list read from stdin, an older
    CLI)."""
    h = req.get("holder", "")
    if not isinstance(h, str) or holder_too_long(h):
        raise ControlError(f"malformed request: holder must be text of at most {HOLDER_MAX} "
                           "bytes")
    return h


def _rows_wanted(req: dict) -> int | None:
    """How many per-file rows a status reply carries: ``rows`` of the request (the CLI's
    table shows 30), or all of them (``--json``). A million rows are 150 MB of JSON."""
    n = req.get("rows")
    if n is None:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ControlError("rows must be a whole number")
    return n


async def _tally(files: list[FileItem], is_cached, is_pinned, rows: int | None,
                 held: dict[int, list[str]]) -> dict:
    """status's figures: per file (the first ``rows`` files; all when None) and in total,
    with ``is_cached(cid)`` and ``is_pinned(cid)`` saying where each chunk stands, and
    ``held`` (``id()`` of a file → the data sets that pin the version S3 lists) who pins
    it."""
    out = []
    tot = tc = tp = 0
    by: dict[str, dict[str, int]] = {}
    for i, f in enumerate(files):
        if i % YIELD_EVERY == 0:
            await trio.lowlevel.checkpoint()
        c = p = cc = 0
        for r in f.refs:
            if is_cached(r.cid):
                c += r.length
                cc += 1
                if is_pinned(r.cid):
                    p += r.length
        hs = held.get(id(f), [])
        for h in hs:
            b = by.setdefault(h, {"files": 0, "bytes": 0})
            b["files"] += 1
            b["bytes"] += f.size
            if p < f.size:  # claimed, not (all) pinned: its preload --pin did not finish
                b["unpinned"] = b.get("unpinned", 0) + 1
        if rows is None or len(out) < rows:
            out.append({"path": f.path, "line": f.line, "size": f.size, "cached_bytes": c,
                        "pinned_bytes": p, "chunks": len(f.refs), "cached_chunks": cc,
                        "pinned_by": hs})
        tot += f.size
        tc += c
        tp += p
    return {"files": out, "file_count": len(files), "total_bytes": tot, "cached_bytes": tc,
            "pinned_bytes": tp, "pinned_by": by}


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
        # owner side of cluster-wide preloads
        self._jobs: dict[str, _FetchJob] = {}  # ds_fetch calls' job id -> its state
        self._fetch_calls = 0
        # the ds_fetch calls running → their chunk ids (a free of one of them cancels it)
        self._fetch_scopes: dict[trio.CancelScope, set[bytes]] = {}
        # chunks that preload --pin runs under way have yet to pin → their disk bytes: the
        # limit check of a preload started meanwhile counts them as pinned already (once,
        # however many runs pin them)
        self._reserved: dict[bytes, int] = {}
        self._obj_sizes: dict = {}
        self._pins_lock = trio.Lock()  # pin records are read, merged and written whole

    def statistics(self) -> dict:
        return {"preloads": self.runs, "throughput": self.model.statistics()}

    # -- helpers --------------------------------------------------------------------

    @property
    def s3_concurrency(self) -> int:
        return self.d.cfg.s3.max_concurrency

    @staticmethod
    async def _handle(emit, fn, req: dict):
        """``fn(req, job)`` with one progress ticker for the whole request: the client
        hears from the daemon twice a second from the list's resolution to the reply, as
        long as a free of a million chunks or a status of a million files takes (its
        timeout is the silence between two lines)."""
        job = Job(emit)
        return await job.run(fn, req, job)

    async def resolve(self, entries: list[tuple[int, str, str]],
                      job: Job) -> tuple[list[FileItem], list[dict]]:
        vfs = self.d.vfs
        assert vfs is not None
        files: list[FileItem] = []
        failed: list[dict] = []
        seen: set = set()  # the objects taken: endpoint, bucket, key
        refreshed: set[int] = set()  # directories listed anew for a name they lacked
        job.entries_total = len(entries)
        hashed = 0  # chunk ids made since the last checkpoint
        for line, rel, text in entries:
            try:
                node = await vfs.resolve(rel, refreshed)
                nodes = await vfs.walk_files(node, fresh=True)
            except (FSError, S3Error) as e:
                failed.append(_entry_failed(line, text, e))
                job.entries_done += 1
                continue
            for n in nodes:
                # one object once, through whichever mount names it: two [[mount]] tables
                # that overlap (s3://b and s3://b/train) showed it twice, and counted its
                # bytes, its fetch and its estimate twice (an ETA that never reached 0)
                spec = n.mount.spec if n.mount is not None else None
                ident = (spec.endpoint_url, spec.bucket, n.key) if spec else n.ino
                if ident in seen:
                    continue
                seen.add(ident)
                if n.stale:  # a fetch found its object replaced: ask S3 for the new version
                    try:
                        await vfs.refresh(n)
                    except FSError as e:
                        failed.append(_entry_failed(line, text, e))
                        continue
                refs = await _chunks(vfs.version(n))
                files.append(FileItem(line, text, n, vfs.display_path(n), refs, n.size,
                                      len(refs)))
                if len(files) > MAX_FILES:
                    raise ControlError(f"the file list names more than {MAX_FILES} files; "
                                       "split it")
                hashed += 1 + len(refs)
                if hashed >= YIELD_CHUNKS:
                    hashed = 0
                    await trio.lowlevel.checkpoint()  # let reads run meanwhile
            job.entries_done += 1
            if job.entries_done % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
        return files, failed

    # -- status ---------------------------------------------------------------------

    async def status(self, req: dict, emit) -> dict:
        return await self._handle(emit, self._status, req)

    async def _status(self, req: dict, job: Job) -> dict:
        store = self.d.store
        assert store is not None
        rows = _rows_wanted(req)
        files, failed = await self.resolve(_entries(req), job)
        held = await self._held(files)
        if self.d.cluster is not None:
            return await self._status_cluster(files, failed, rows, held)
        out = await _tally(files, store.contains, store.is_pinned, rows, held)
        return {**out, "failed": failed, "cache": store.statistics()}

    async def _held(self, files: list[FileItem]) -> dict[int, list[str]]:
        """``id()`` of each file whose version S3 lists a data set pins → those data sets
        ("" for pins nobody named; in a cluster, as this node's copy of the records
        says)."""
        vfs, index = self.d.vfs, self.d.index
        assert vfs is not None and index is not None
        keys: dict[bytes, list[tuple[FileItem, tuple]]] = {}
        for i, f in enumerate(files):
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            k, v = _pin_of(vfs.version(f.node))
            keys.setdefault(k, []).append((f, v))
        recs = await trio.to_thread.run_sync(index.get_pin_records, list(keys))
        out: dict[int, list[str]] = {}
        for n, (k, blob) in enumerate(recs.items()):
            if n % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            _, versions, holders = _record_of(blob)
            for f, v in keys[k]:
                hs = next((h for (e, sz, c), h in zip(versions, holders, strict=True)
                           if (e, sz, c) == v), None)
                if hs:
                    out[id(f)] = sorted(hs)
        return out

    # -- free -----------------------------------------------------------------------

    async def free(self, req: dict, emit) -> dict:
        return await self._handle(emit, self._free, req)

    async def _free(self, req: dict, job: Job) -> dict:
        store = self.d.store
        assert store is not None
        holder = _holder(req)
        files, failed = await self.resolve(_entries(req), job)
        # The records are read, the chunks dropped and this data set's claims given up with
        # no pinning preload's records merged in between: one whose records came first
        # keeps what it shares with this list; one that comes after pins (and fetches)
        # what this free dropped.
        async with self._pins_lock:
            fp = await self._pinned_before(req, files, failed, holder)
            drop = [f for f in files if id(f) not in fp.kept_ids] + fp.old
            if self.d.cluster is not None:
                out = await self._free_cluster(files, fp.failed, drop)
            else:
                got = await self._drop_local(list(await self._unique(drop)))
                log.info("free: %d files, %d chunks, %d bytes (%d pins removed)", len(files),
                         got["freed_chunks"], got["freed_bytes"], got["pins_removed"])
                out = {"files": len(files), "total_bytes": sum(f.size for f in files),
                       **got, "failed": fp.failed, "cache": store.statistics()}
            # (with a node unreachable, the claims stay: a free again reaches what it holds)
            release = not out.get("unreachable")
            if release:
                await self._release_pins(fp.keys, holder)
        if release:  # (not under the lock: two frees on two nodes would wait on each other)
            out["warnings"] = await self._release_pins_elsewhere(fp.names, fp.prefixes,
                                                                 holder)
        kept = [f for f in files if id(f) in fp.kept_ids]
        out.update(superseded_versions=fp.superseded, kept_files=len(kept),
                   kept_bytes=sum(f.size for f in kept), kept_versions=fp.kept_versions,
                   kept_by=fp.kept_by)
        if kept or fp.kept_versions:
            log.info("free: kept %d files and %d older versions that other data sets pin",
                     len(kept), fp.kept_versions)
        return out

    # -- pin records: which versions of a name a `preload --pin` pinned ---------------
    # A chunk id names one version of an object, and `free` and `status` find the chunks of
    # the version S3 lists now.  When a pinned object was overwritten (or deleted), its old
    # version's chunks stayed pinned for good: no command reached them, and each re-pin of
    # an updated data set took more of the cache until pinning was refused.  So a pinning
    # preload records, per name, the versions it pinned; `free` drops those too, for the
    # names it lists and every name under the directories it lists.

    def _writer(self):
        w = self.d.writer
        assert w is not None
        return w

    async def _record_pins(self, files: list[FileItem], holder: str) -> list[str]:
        """Before a pinning run: each file's current version joins its name's record, here
        and, in a cluster, on every other member (a free may be run on any node, and the
        node that ran the preload may be gone by then). The warnings: members that did
        not take the copy."""
        adds: dict[bytes, tuple[str, list]] = {}
        for i, f in enumerate(files):
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            if f.refs:
                o = f.refs[0].obj
                k, v = _pin_of(o)
                adds[k] = (o.key, list(v))
        await self._add_pin_versions(adds, holder)
        cl = self.d.cluster
        if cl is None or not adds:
            return []
        res = await self._to_other_members("ds_pins_add", "records", lambda: (
            [base64.b64encode(k).decode("ascii"), key, *v] for k, (key, v) in adds.items()),
            {"holder": holder})
        return [f"pin records not copied ({r.reason}): a free run on node {n} will not "
                "reach the versions S3 replaces later, nor keep the files this data set "
                "shares with the list it frees" for n, r in sorted(res.items())
                if isinstance(r, _Down)]

    async def _add_pin_versions(self, adds: dict[bytes, tuple[str, list]],
                                holder: str) -> None:
        """Each record key's version joins its record (made if none), held by ``holder``:
        key → (S3 key, [etag, size, chunk size])."""
        await self._merge_pin_records({k: (key, [v], [[holder]])
                                       for k, (key, v) in adds.items()})

    async def sync_pin_records(self) -> None:
        """At start, in a cluster: the pin records of up to SYNC_FROM other members merged
        into this node's copy. A node that was down while a data set was pinned, joined
        later or lost its index lacked them, and a `free` run on it dropped the files that
        data set shares with the list freed. Merged as a union: a claim a free released
        while this node was down stays here (it keeps, never drops, what another data set
        may still pin) until a free of that data set runs again. Tried again every
        SYNC_PAUSE seconds while no member answers, SYNC_TRIES times."""
        from .cluster.protocol import PeerError

        cl = self.d.cluster
        for _ in range(SYNC_TRIES):
            done, total = [], 0
            for node in [n for n in sorted(cl.nodes()) if n != cl.node_id]:
                try:
                    total += await self._pull_pin_records(node)
                except (PeerError, ControlError, KeyError, TypeError, ValueError) as e:
                    log.debug("pin records not read from node %s: %s", node, e)
                    continue
                done.append(node)
                if len(done) >= SYNC_FROM:
                    break
            if done:
                log.info("pin records: %d merged from node%s %s", total,
                         "s" if len(done) > 1 else "", ", ".join(done))
                return
            await trio.sleep(SYNC_PAUSE)
        log.warning("pin records: no other member answered; a free run here does not know "
                    "of data sets pinned while this node was away")

    async def _pull_pin_records(self, node: str) -> int:
        """``node``'s pin records, a page at a time, merged into ours; how many."""
        cl, after, n = self.d.cluster, "", 0
        while True:
            res = await cl.forward(node, "ds_pins_dump", {"after": after}, no_s3=True)
            recs, more = res["records"], res["more"]
            page = {}
            for k, blob in recs:
                page[base64.b64decode(k, validate=True)] = _record_of(blob.encode())
            await self._merge_pin_records(page)
            n += len(page)
            if not more or not recs:
                return n
            after = recs[-1][0]

    async def _merge_pin_records(self, page: dict[bytes, tuple[str, list, list]]) -> None:
        """Records joined with ours, record key → (S3 key, versions, their holders): every
        version, every holder (a preload's versions, a peer's copy of them, another
        member's records at start). Returns once they are committed (a record already
        holding them all is not written again). One at a time: two merges of one record
        at once (a preload here, a peer's copy) kept one version."""
        index = self.d.index
        assert index is not None
        async with self._pins_lock:
            mine = await trio.to_thread.run_sync(index.get_pin_records, list(page))
            ops = []
            for i, (k, (key, versions, holders)) in enumerate(page.items()):
                if i % YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()
                if not key:
                    continue
                have_key, have_vs, have_hs = (_record_of(mine[k]) if k in mine
                                              else (key, [], []))
                # (copies: a record of before holders were named has one list for all)
                vs, hs = list(have_vs), [list(h) for h in have_hs]
                for v, h in zip(versions, holders, strict=True):
                    if v not in vs:
                        vs.append(v)
                        hs.append(list(h))
                    else:
                        mine_h = hs[vs.index(v)]
                        mine_h.extend(x for x in h if x not in mine_h)
                if (vs, hs) != (have_vs, [list(h) for h in have_hs]) or k not in mine:
                    ops.append(Index.op_put_pin_record(k, _record(have_key or key, vs, hs)))
            done = 0
            try:
                for i in range(0, len(ops), 4096):
                    await self._writer().commit(*ops[i:i + 4096])
                    done += len(ops[i:i + 4096])
            except IndexCommitError as e:
                # (in batches, so that reads' commits go on meanwhile: those committed stay)
                part = (f"; {done} of its {len(ops)} records were written (a free of this "
                        "list clears them)" if done else "")
                raise ControlError(
                    f"cannot pin: the cache index could not record what this data set pins "
                    f"({e}); nothing was pinned (is the cache disk full?){part}") from None

    async def op_pins_dump(self, payload: dict) -> dict:
        """This node's pin records, a page (about DUMP_BUDGET bytes) after ``after``."""
        from .cluster.protocol import PeerError

        try:
            after = base64.b64decode(payload.get("after") or "", validate=True)
        except (TypeError, ValueError):
            raise PeerError("ds_pins_dump: after must be a base64 record key",
                            "protocol") from None
        index = self.d.index
        assert index is not None
        recs, more = await trio.to_thread.run_sync(index.pin_records_after, after,
                                                   DUMP_BUDGET)
        return {"records": [[base64.b64encode(k).decode("ascii"),
                             v.decode("utf-8", "replace")] for k, v in recs], "more": more}

    async def _to_other_members(self, op: str, field: str, items,
                                extra: dict | None = None) -> dict[str, Any]:
        """``items()``'s JSON items to every other member, ``op`` calls of at most
        PAYLOAD_BUDGET under ``field`` (beside ``extra``); per node, None or a _Down. The
        calls are cut once, in a worker thread (a million pin records: 1.2 s, and 1.6 s
        more per member, of the thread that serves every read)."""
        cl = self.d.cluster
        parts = await trio.to_thread.run_sync(lambda: list(_batches(items())))

        async def send(node: str) -> None:
            for part in parts:
                await cl.forward(node, op, {**(extra or {}), field: part}, no_s3=True)

        return await self._on_nodes([n for n in sorted(cl.nodes()) if n != cl.node_id], send)

    async def _release_pins(self, keys: list[bytes], holder: str | None,
                            prefixes: list[bytes] = ()) -> None:
        """After a free (the caller holds _pins_lock): ``holder`` and the holder nobody
        named ("") let go of every version of the records ``keys`` (and of those in the
        ranges ``prefixes``); a version nobody holds any more goes, and a record with no
        version left. ``holder`` None: the records go whole (a peer of an older cachefs
        asks so)."""
        index = self.d.index
        assert index is not None
        recs = await trio.to_thread.run_sync(index.get_pin_records, keys, prefixes)
        ops = []
        for i, (k, blob) in enumerate(recs.items()):
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            key, versions, holders = _record_of(blob)
            left = [] if holder is None else [
                (v, [h for h in hs if h not in (holder, "")])
                for v, hs in zip(versions, holders, strict=True)]
            left = [(v, hs) for v, hs in left if hs]
            if not left:
                ops.append(Index.op_delete_pin_record(k))
            elif left != list(zip(versions, holders, strict=True)):
                ops.append(Index.op_put_pin_record(k, _record(key, [v for v, _ in left],
                                                              [hs for _, hs in left])))
        for i in range(0, len(ops), 4096):
            await self._writer().commit(*ops[i:i + 4096])

    async def _release_pins_elsewhere(self, names: list[bytes], prefixes: list[bytes],
                                      holder: str) -> list[str]:
        """The same on every other member's copy of the records, where the list's records
        lie (``names``, the ranges ``prefixes``), found there or not: a member may hold a
        record this node lacks (it joined later, or a release failed). One that does not
        answer keeps its copy: a free run there then keeps what this data set shared with
        its list, until this free is run again. The warnings: one per such member."""
        cl = self.d.cluster
        if cl is None:
            return []
        failed: dict[str, str] = {}
        for name, ks, extra in (("keys", names, {}), ("prefixes", prefixes, {"keys": []})):
            if not ks:
                continue
            res = await self._to_other_members("ds_pins_forget", name, lambda ks=ks: (
                base64.b64encode(k).decode("ascii") for k in ks), {"holder": holder, **extra})
            for node, r in res.items():
                if isinstance(r, _Down):
                    log.warning("free: pin records not updated (%s)", r.reason)
                    failed.setdefault(node, r.reason)
        return [f"pin records not updated ({reason}): a free run on node {node} keeps what "
                "this data set shares with its list, until this free is run again"
                for node, reason in sorted(failed.items())]

    async def _pinned_before(self, req: dict, files: list[FileItem], failed: list[dict],
                             holder: str) -> _FreePlan:
        """For `free` of ``holder``'s list: what the pin records of the listed names (and
        of the names under the listed directories) say (_FreePlan)."""
        vfs, index = self.d.vfs, self.d.index
        assert vfs is not None and index is not None
        current: dict[bytes, tuple] = {}
        current_files: dict[bytes, list[FileItem]] = {}
        old: list[FileItem] = []
        legacy: list[FileItem] = []
        kept_ids: set[int] = set()
        kept_by: defaultdict[str, Counter] = defaultdict(
            lambda: Counter(files=0, bytes=0, versions=0))
        kept_versions = 0
        file_line: dict[int, str | None] = {}  # line → the one key it named, or None
        for i, f in enumerate(files):
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            o = vfs.version(f.node)
            k, v = _pin_of(o)
            current[k] = v
            current_files.setdefault(k, []).append(f)
            file_line[f.line] = o.key if f.line not in file_line else None
            if o.etag.startswith("~"):  # cached by a version that gave no ETag a version
                v = ObjectVersion(o.mount, o.bucket, o.key, "", o.size, o.chunk_size, o.store)
                legacy.append(FileItem(f.line, f.entry, f.node, f.path, await _chunks(v),
                                       o.size))
        by_name: dict[bytes, tuple[int, Any]] = {}
        by_dir: dict[tuple[bytes, str], tuple[int, Any]] = {}
        prefixes = []
        for n, (line, rel, _) in enumerate(_entries(req)):
            if n % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            got = vfs.object_key(rel)
            if got is None:
                continue
            m, key = got
            k = _pin_key(m.spec.endpoint_url, m.spec.bucket, key)
            by_name.setdefault(k, (line, m))
            if file_line.get(line) != key:  # a directory, or a name S3 no longer has
                under = key if key == "" or key.endswith("/") else key + "/"
                if (k[:16], under) not in by_dir:
                    by_dir[(k[:16], under)] = (line, m)
                    prefixes.append(_pin_key(m.spec.endpoint_url, m.spec.bucket, under,
                                             prefix=True))
        # each file's own record too: a directory's range does not reach a long name (its
        # record key is a hash), and the root of several mounts names no range at all
        for n, (k, fs) in enumerate(current_files.items()):
            if n % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            if k not in by_name and (got := vfs.object_key(fs[0].path)) is not None:
                by_name[k] = (fs[0].line, got[0])
        recs = await trio.to_thread.run_sync(index.get_pin_records, list(by_name), prefixes)
        lines_with_pins: set[int] = set()
        matched = []
        root = vfs.nodes[ROOT_INO]
        for n, (k, blob) in enumerate(recs.items()):
            if n % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            key, versions, holders = _record_of(blob)
            # the entry it came from (its line, its mount): by the name in the record, not
            # the record's key, which a long name cuts short
            hit = by_name.get(k)
            if hit is None:
                hit = next((by_dir[(k[:16], d)] for d in _dirs_above(key)
                            if (k[:16], d) in by_dir), None)
            if hit is None:
                continue
            line, m = hit
            lines_with_pins.add(line)
            matched.append(k)
            path = vfs.display(m, key[len(m.spec.prefix):])
            for (etag, size, chunk), hs in zip(versions, holders, strict=True):
                others = sorted(set(hs) - {holder, ""})
                if (etag, size, chunk) == current.get(k):
                    if others:  # another data set pins the version S3 lists: it stays
                        for f in current_files[k]:
                            if id(f) not in kept_ids:
                                kept_ids.add(id(f))
                                for h in others:
                                    kept_by[h]["files"] += 1
                                    kept_by[h]["bytes"] += f.size
                    continue
                if others:
                    kept_versions += 1
                    for h in others:
                        kept_by[h]["versions"] += 1
                    continue
                v = ObjectVersion(m.spec.name, m.spec.bucket, key, etag, size, chunk, m.store)
                old.append(FileItem(line, key, root, path, await _chunks(v), size))
        left = [fl for fl in failed if fl["line"] not in lines_with_pins
                or fl["reason"] != _reason(FSError(errno.ENOENT))]
        return _FreePlan(old + legacy, sum(1 for f in old if f.refs), matched, left, kept_ids,
                         kept_versions, {h: dict(c) for h, c in kept_by.items()},
                         list(by_name), prefixes)

    def _free_wait(self) -> float:
        """FREE_WAIT, or less in a cluster whose peers give up on a ds_drop sooner (it
        waits once per batch of ids)."""
        cl = self.d.cluster
        if cl is None:
            return FREE_WAIT
        return min(FREE_WAIT, cl.no_s3_bound / 3)

    async def _drop_local(self, cids: list[bytes]) -> dict:
        """Drop the cached ones of ``cids``, pins included, and the ones that fetches
        still under way put back within FREE_WAIT. A preload stopped moments before (Ctrl-C,
        then free) leaves its fetches running, and they cache their chunks pinned: the free
        makes them cache unpinned, and stops this node's ds_fetch calls from starting more
        (each answers early; a requester still running asks again)."""
        store, reader = self.d.store, self.d.reader
        assert store is not None and reader is not None
        for sc, theirs in self._fetch_scopes.items():
            if not theirs.isdisjoint(cids):
                sc.cancel()

        def unpin(part: Sequence[bytes]) -> list[bytes]:
            store.forget_repin(part)
            return reader.unpin(part) + [c for c in part if c in store.writing]

        out = {"freed_bytes": 0, "freed_chunks": 0, "pins_removed": 0}

        def cached(part: Sequence[bytes]) -> list[bytes]:
            have = [c for c in part if store.contains(c)]
            out["pins_removed"] += sum(1 for c in have if store.is_pinned(c))
            return have

        with trio.CancelScope(shield=True):  # index and files stay consistent
            # (a free cancelled between the slices of this pass dropped nothing of what
            # it had told the fetches under way to cache unpinned)
            busy = await _sliced(cids, unpin)
            for last in (not busy, True):
                have = await _sliced(cids, cached)
                out["freed_chunks"] += len(have)
                for i in range(0, len(have), 4096):
                    out["freed_bytes"] += await store.drop(have[i:i + 4096])
                if last:
                    break
                with trio.move_on_after(self._free_wait()):
                    await reader.wait_for(busy)
                    await store.wait_written(busy)
        return out

    # -- preload --------------------------------------------------------------------

    async def _plan(self, files: list[FileItem], pin: bool, parallel: int,
                    reserve: bool = False) -> dict:
        """What a preload of ``files`` would do. ``reserve``: a --pin run follows, and
        what it will pin is counted against the limit of the runs that start meanwhile
        (``plan["pin_reserved"]``: the caller hands it to the run, which gives it back)."""
        store = self.d.store
        assert store is not None
        total = cached = to_pin = missing = nmissing = nchunks = 0
        disk_unpinned = 0  # what its unpinned chunk files take on disk (the limit counts disk)
        unpinned: dict[bytes, int] = {}  # chunks to pin → their disk bytes
        for i, f in enumerate(files):
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            f.cached_at_plan = None
            for r in f.refs:
                nchunks += 1
                if not store.is_pinned(r.cid):  # (pinned ones are already in the room's limit)
                    disk_unpinned += file_size(r.length)
                if store.contains(r.cid):
                    cached += r.length
                    if f.cached_at_plan is None:
                        f.cached_at_plan = bytearray(len(f.refs))
                    f.cached_at_plan[r.index] = 1
                else:
                    missing += r.length
                    nmissing += 1
                if pin and not store.is_pinned(r.cid):
                    to_pin += r.length
                    unpinned[r.cid] = file_size(r.length)
            total += f.size
        warnings = []
        limit = store.limit
        reserved: dict[bytes, int] = {}
        room = limit - store.pinned_bytes
        if pin:  # (no await from here to the reservation)
            # what other runs will pin is counted once: in theirs, not in mine
            mine = {c: n for c, n in unpinned.items()
                    if c not in self._reserved and not store.is_pinned(c)}
            pin_disk = sum(mine.values())
            theirs = sum(self._reserved.values())
            after = store.pinned_bytes + theirs + pin_disk
            if after > limit:
                others = (f" + {_h(theirs)} being pinned by other preloads"
                          if theirs else "")
                raise ControlError(
                    f"cannot pin: {_h(store.pinned_bytes)} already pinned{others} + "
                    f"{_h(pin_disk)} to pin (on disk) = {_h(after)}, more than the cache limit "
                    f"of {_h(limit)}; nothing was fetched (free pinned data with `cachefs "
                    "free`, or raise --cache-size)")
            if reserve:
                reserved = mine
                self._reserved.update(mine)
            if after > store.high:
                warnings.append(
                    f"pinned data will fill {100 * after / limit:.0f}% of the cache "
                    f"({_h(after)} of {_h(limit)}); other reads keep only {_h(limit - after)}")
        elif disk_unpinned > room:
            warnings.append(
                f"the data set ({_h(disk_unpinned)} on disk, not pinned) is larger than the "
                "cache room for unpinned data "
                f"({_h(room)} of {_h(limit)}): LRU eviction will drop the earliest-fetched "
                "files while later ones arrive; the end of the list is what stays cached")
        return {"files": len(files), "total_bytes": total, "chunks": nchunks,
                "cached_before_bytes": cached, "missing_bytes": missing,
                "missing_chunks": nmissing, "to_pin_bytes": to_pin, "warnings": warnings,
                "estimate": self.model.estimate(missing, nmissing, parallel,
                                                self.s3_concurrency),
                "pin_reserved": reserved}

    async def _probe(self, files: list[FileItem], streams: int,
                     nmissing: int) -> tuple[int, int]:
        """Fetch missing chunks of the list, ``streams`` at a time, starting new fetches
        for PROBE_SECONDS but no more than a quarter of the ``nmissing`` chunks (a dry run
        of a small list would otherwise fetch all of it), and time them; the chunks and
        bytes fetched.  They stay cached (in a cluster on their owner: a read on a
        non-owner keeps no copy)."""
        reader, store = self.d.reader, self.d.store
        assert reader is not None and store is not None
        todo = itertools.islice(
            (r for f in files for r in f.refs if not store.contains(r.cid)),
            max(MIN_SAMPLES, nmissing // PROBE_SHARE))
        deadline = trio.current_time() + PROBE_SECONDS
        n, nbytes, failed = 0, 0, False

        async def worker() -> None:
            nonlocal n, nbytes, failed
            while not failed and trio.current_time() < deadline:
                r = next(todo, None)
                if r is None:
                    return
                try:
                    with self.model.timed(r.length, reader.flight(r.cid) is None):
                        await reader.get(r, by="preload --dry-run")
                except Exception as e:  # noqa: BLE001 - a probe that fails measures no more
                    log.info("throughput probe failed: %s", e)
                    failed = True
                    return
                n += 1
                nbytes += r.length

        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(worker)
        return n, nbytes

    async def _probe_cluster(self, cp: _ClusterPlan, streams: int) -> tuple[int, int]:
        """A dry run's measurement in a cluster is a small preload: every owner fetches
        missing chunks of its share with ``streams`` in flight, all at once, as in the run
        (``streams`` fetches from this node alone timed an S3 that the run, with every
        owner fetching, makes busier: an estimate up to one per owner times too short).
        New fetches start for PROBE_SECONDS, then those under way are waited for; a
        quarter of the missing chunks at most, shared among the owners."""
        sample = _ClusterPlan(cp.ring, cp.me, cp.files, False, streams)
        sample.down, sample.missing = dict(cp.down), cp.missing
        # a quarter of the missing chunks at most (MIN_SAMPLES at least), as on one node,
        # shared among the owners by their shares (one each at least)
        quota = max(MIN_SAMPLES, len(cp.missing) // PROBE_SHARE)
        for node, items in cp.lanes.items():
            miss = [it for it in items if it[1].cid in cp.missing]
            if miss:
                share = -(-quota * len(miss) // max(1, len(cp.missing)))
                sample.lanes[node] = miss[:max(1, share)]
        run = _ClusterRun(self, sample, until=trio.current_time() + PROBE_SECONDS)
        run.by = "preload --dry-run"
        await run.go()
        return run.fetched_chunks, run.fetched_bytes

    async def preload(self, req: dict, emit) -> dict:
        return await self._handle(emit, self._preload_request, req)

    async def _preload_request(self, req: dict, job: Job) -> dict:
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
        files, failed = await self.resolve(_entries(req), job)
        cp: _ClusterPlan | None = None
        if self.d.cluster is not None:
            cp = await self._plan_cluster(files, pin, parallel)
            plan = cp.plan
        else:
            plan = await self._plan(files, pin, parallel, reserve=pin and not dry_run)
        reservation = _PinReservation(self, plan.pop("pin_reserved", {}))
        try:
            if pin and not dry_run:
                plan["warnings"] = plan["warnings"] + await self._record_pins(files,
                                                                              _holder(req))
            return await self._preload(job, files, failed, plan, cp, pin, parallel,
                                       reservation, dry_run, t_start)
        finally:
            reservation.release_all()  # what the run did not pin

    async def _preload(self, job: Job, files: list[FileItem], failed: list[dict], plan: dict,
                       cp: _ClusterPlan | None, pin: bool, parallel: int,
                       reservation: _PinReservation, dry_run: bool, t_start: float) -> dict:
        store = self.d.store
        assert store is not None
        if dry_run:
            probed = probed_bytes = 0
            streams = plan["estimate"]["streams"]
            if plan["missing_chunks"] and not self.model.near(streams):
                probed, probed_bytes = await (
                    self._probe(files, streams, plan["missing_chunks"]) if cp is None
                    else self._probe_cluster(cp, streams))
                if probed:  # the plan stays what was missing when we looked
                    plan["estimate"] = cp.estimate(self) if cp else self.model.estimate(
                        plan["missing_bytes"], plan["missing_chunks"], parallel,
                        self.s3_concurrency)
            plan["estimate"]["probed_chunks"] = probed
            # what the measurement fetched stays cached: a preload now has that much less
            return {"dry_run": True, "pin": pin, "parallel": parallel, **plan,
                    "failed": failed, "fetched_bytes": probed_bytes,
                    "fetched_chunks": probed,
                    "seconds": round(time.monotonic() - t_start, 3),
                    "throughput": self.model.statistics()}
        await job.emit({"kind": "plan", "pin": pin, "parallel": parallel, **plan})
        run = (_Run(self, files, pin, parallel, plan, reservation) if cp is None
               else _ClusterRun(self, cp))
        job.progress = run.progress
        t0 = time.monotonic()
        await run.go()
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
               "found_bytes": run.found_bytes, "found_chunks": run.found_chunks,
               "fetched_files": sum(1 for f in files if not f.error and f in run.touched),
               "uncached_bytes": run.uncached_bytes, "failed": failed,
               "failed_files": sum(1 for f in files if f.error),
               "failed_bytes": run.failed_bytes,
               "seconds": round(total_secs, 3), "fetch_seconds": round(secs, 3),
               "throughput_bps": round(fetched / secs) if secs > 0 else 0,
               "estimate": plan["estimate"], "warnings": plan["warnings"],
               "cache": store.statistics()}
        if cp is not None:
            out["nodes"] = run.by_node
            out["unreachable"] = [{"node": n, "reason": r} for n, r in sorted(cp.down.items())]
        if run.uncached_bytes:
            out["warnings"] = out["warnings"] + [
                f"{_h(run.uncached_bytes)} could not be kept in the cache (it is full of "
                "pinned data, or the disk is full)"]
        return out

    # -- cluster: requester side ---------------------------------------------------

    async def _on_nodes(self, nodes, fn) -> dict[str, Any]:
        """``await fn(node)`` for every node at once; a failure becomes a _Down."""
        from .cluster.protocol import PeerError

        cl = self.d.cluster
        out: dict[str, Any] = {}

        async def one(node: str) -> None:
            try:
                out[node] = await fn(node)
            except PeerError as e:
                down = _is_down(e.reason)
                if down:
                    cl.mark_unreachable(node, e.reason)
                out[node] = _Down(f"node {node} unreachable: {e}" if down
                                  else f"node {node}: {e}", down)
            except (ValueError, KeyError, TypeError) as e:
                out[node] = _Down(f"node {node}: bad request or reply: {e}", False)

        async with trio.open_nursery() as n:
            for node in nodes:
                n.start_soon(one, node)
        return out

    async def _probe_node(self, node: str, cids: list[bytes]) -> tuple[str, dict]:
        """Which of ``cids`` ``node`` holds: one char each (0 no, 1 cached, 2 pinned)."""
        parts, store = [], {}
        for i in range(0, len(cids), ID_BATCH):
            part = cids[i:i + ID_BATCH]
            res = await self.d.cluster.forward(node, "ds_probe", {"ids": _pack_ids(part)},
                                               no_s3=True)
            states, store = res["states"], res["store"]
            if not isinstance(states, str) or len(states) != len(part):
                raise ValueError("ds_probe: wrong number of states")
            parts.append(states)
        return "".join(parts), store

    async def _drop_node(self, node: str, cids: list[bytes]) -> dict:
        tot = {"freed_bytes": 0, "freed_chunks": 0, "pins_removed": 0}
        for i in range(0, len(cids), ID_BATCH):
            res = await self.d.cluster.forward(node, "ds_drop",
                                               {"ids": _pack_ids(cids[i:i + ID_BATCH])},
                                               no_s3=True)
            for k in tot:
                tot[k] += int(res[k])
        return tot

    async def _unique(self, files: list[FileItem]) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for i, f in enumerate(files):
            if i % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            for r in f.refs:
                out.setdefault(r.cid, r.length)
        return out

    async def _status_cluster(self, files: list[FileItem], failed: list[dict],
                              rows: int | None, held: dict[int, list[str]]) -> dict:
        cl, store = self.d.cluster, self.d.store
        ring, members = cl.ring, sorted(cl.nodes())
        sizes = await self._unique(files)
        cids = list(sizes)
        owned: Counter = Counter()
        for i, c in enumerate(cids):
            if i % (4 * YIELD_EVERY) == 0:
                await trio.lowlevel.checkpoint()
            owned[ring.owner(c)] += sizes[c]
        res = await self._on_nodes(members, lambda n: self._probe_node(n, cids))
        cached: set[bytes] = set()
        pinned: set[bytes] = set()
        nodes: dict[str, dict] = {}
        unreachable = []
        for n in members:
            r = res[n]
            if isinstance(r, _Down):
                nodes[n] = {"error": r.reason, "owned_bytes": owned[n]}
                unreachable.append({"node": n, "reason": r.reason})
                continue
            c = p = cc = 0
            for i, (cid, st) in enumerate(zip(cids, r[0], strict=True)):
                if i % (4 * YIELD_EVERY) == 0:
                    await trio.lowlevel.checkpoint()
                if st != "0":
                    c += sizes[cid]
                    cc += 1
                    cached.add(cid)
                    if st == "2":
                        p += sizes[cid]
                        pinned.add(cid)
            nodes[n] = {"cached_bytes": c, "pinned_bytes": p, "cached_chunks": cc,
                        "owned_bytes": owned[n]}
        out = await _tally(files, cached.__contains__, pinned.__contains__, rows, held)
        return {**out, "failed": failed, "nodes": nodes, "unreachable": unreachable,
                "cache": store.statistics()}

    async def _free_cluster(self, files: list[FileItem], failed: list[dict],
                            drop: list[FileItem]) -> dict:
        cl, store = self.d.cluster, self.d.store
        members = sorted(cl.nodes())
        cids = list(await self._unique(drop))
        res = await self._on_nodes(members, lambda n: self._drop_node(n, cids))
        nodes: dict[str, dict] = {}
        unreachable = []
        tot = {"freed_bytes": 0, "freed_chunks": 0, "pins_removed": 0}
        for n in members:
            r = res[n]
            if isinstance(r, _Down):
                nodes[n] = {"error": r.reason}
                unreachable.append({"node": n, "reason": r.reason})
                continue
            nodes[n] = r
            for k in tot:
                tot[k] += r[k]
        log.info("free (cluster): %d files, %d chunks, %d bytes on %d nodes (%d unreachable)",
                 len(files), tot["freed_chunks"], tot["freed_bytes"], len(members),
                 len(unreachable))
        return {"files": len(files), "total_bytes": sum(f.size for f in files), **tot,
                "failed": failed, "nodes": nodes, "unreachable": unreachable,
                "cache": store.statistics()}

    async def _plan_cluster(self, files: list[FileItem], pin: bool,
                            parallel: int) -> _ClusterPlan:
        """Group the chunks by owner, ask each owner what it holds, and check pins
        against each owner's cache.  An owner that does not answer is replaced by
        the next node of the ring for its chunks (where readers look meanwhile)."""
        cl = self.d.cluster
        ring, me = cl.ring, cl.node_id
        groups: dict[str, list[tuple[FileItem, ChunkRef]]] = {}
        k = 0
        for f in files:
            for r in f.refs:
                groups.setdefault(ring.owner(r.cid), []).append((f, r))
                k += 1
                if k % (4 * YIELD_EVERY) == 0:
                    await trio.lowlevel.checkpoint()
        cp = _ClusterPlan(ring, me, files, pin, parallel)
        rnd = groups
        while rnd:
            res = await self._on_nodes(
                list(rnd), lambda n, g=rnd: self._probe_node(n, [r.cid for _, r in g[n]]))
            for n, out in res.items():
                if isinstance(out, _Down) and out.down:
                    cp.down[n] = out.reason
            nxt: dict[str, list] = {}
            for n, items in rnd.items():
                out = res[n]
                if not isinstance(out, _Down):
                    cp.add(n, items, out[0], out[1], pin)
                    continue
                for f, r in items:
                    prefs = ring.preference(r.cid, 2)
                    # an unreachable owner: its successor, unless that failed too
                    if (out.down and prefs[0] == n and len(prefs) > 1
                            and prefs[1] not in cp.down
                            and not isinstance(res.get(prefs[1]), _Down)):
                        nxt.setdefault(prefs[1], []).append((f, r))
                        cp.fallback[(prefs[1], n)] += 1
                    else:
                        cp.fail(f, r, n, out.reason)
            rnd = nxt
        cp.finish(self, pin)
        return cp

    def _obj_size(self, obj) -> int:
        n = self._obj_sizes.get(obj)
        if n is None:
            if len(self._obj_sizes) > 100_000:
                self._obj_sizes.clear()
            try:
                n = len(json.dumps(_obj_desc(obj), ensure_ascii=False).encode("utf-8")) + 8
            except ValueError:  # a key that is not UTF-8: sent (and refused) alone
                n = PAYLOAD_BUDGET
            self._obj_sizes[obj] = n
        return n

    # -- cluster: owner side (peer ops) -----------------------------------------------

    def _refs(self, payload: dict) -> list[ChunkRef | str]:
        from .cluster.protocol import PeerError

        objs = payload.get("objs")
        if not isinstance(objs, list):
            raise PeerError("ds_fetch: objs must be a list", "protocol")
        out: list[ChunkRef | str] = []
        for o in objs:
            idx = o.get("idx") if isinstance(o, dict) else None
            if not isinstance(idx, list) or not all(type(i) is int for i in idx):
                raise PeerError("ds_fetch: each object needs a list of indexes", "protocol")
            base = {k: v for k, v in o.items() if k != "idx"}
            for i in idx:
                try:
                    out.append(self.d.cluster.resolve_chunk({**base, "index": i}))
                except PeerError as e:
                    out.append(str(e))
            if len(out) > MAX_FETCH_CHUNKS:
                raise PeerError(f"ds_fetch: more than {MAX_FETCH_CHUNKS} chunks", "protocol")
        return out

    async def op_fetch(self, payload: dict) -> dict:
        """Fetch (and pin) chunks this node owns, for a preload started elsewhere.

        Answers within ``wait`` seconds: one code per chunk, ``c`` was cached,
        ``f`` fetched, ``u`` fetched but not kept (cache full), ``e`` failed
        (reason in ``errors``), ``p`` still pending (the fetch, if started, goes
        on in the reader's service nursery; the requester sends it again and
        hears how it ended: fetched, with its whole time, not "cached")."""
        if self._fetch_calls >= MAX_FETCH_CALLS:
            return {"busy": True}
        store, reader, cl = self.d.store, self.d.reader, self.d.cluster
        assert store is not None and reader is not None
        refs = self._refs(payload)
        pin = bool(payload.get("pin"))
        try:
            # (no more at once than S3 takes from this node, as on one node: the others
            # only queued inside the retry budget, and the node's own reads behind them)
            parallel = min(MAX_PARALLEL, self.s3_concurrency,
                           max(1, int(payload.get("parallel") or 8)))
            wait = min(FETCH_WAIT, max(0.1, float(payload.get("wait") or FETCH_WAIT)))
        except (TypeError, ValueError):
            parallel, wait = min(8, self.s3_concurrency), FETCH_WAIT
        now = time.monotonic()
        for jid in [j for j, v in self._jobs.items() if now - v.at > JOB_IDLE]:
            del self._jobs[jid]
        jid = str(payload.get("job") or "")[:64]
        job = self._jobs.get(jid)
        if job is None:
            job = self._jobs[jid] = _FetchJob(parallel)
        job.at = now
        limiter = job.limiter
        codes = ["p"] * len(refs)
        errors: dict[str, str] = {}
        times: list[list] = []
        ring, me = cl.ring, cl.node_id
        by = f"preload from node {str(payload.get('node') or '?')[:64]}"

        async def pinned(k: int, ref: ChunkRef) -> None:
            if pin and not store.is_pinned(ref.cid):
                with trio.CancelScope(shield=True):
                    await store.set_pinned([ref.cid], True)
                if not store.is_pinned(ref.cid) and store.contains(ref.cid):
                    codes[k] = "e"
                    errors[str(k)] = NOT_PINNED

        async def cached(k: int, ref: ChunkRef) -> bool:
            if not store.contains(ref.cid):
                return False
            codes[k] = "c"
            await pinned(k, ref)
            return True

        async def one(k: int, ref: ChunkRef) -> None:
            late = job.late.get(ref.cid)
            if late is not None:  # a fetch of an earlier call of this job, still followed
                await late.done.wait()
                job.late.pop(ref.cid, None)
                if late.code == "u" and store.contains(ref.cid):
                    late.code = "f"  # (not kept then, cached since by another read)
                if late.code != "f" or store.contains(ref.cid):  # (not dropped since)
                    codes[k] = late.code
                    if late.error:
                        errors[str(k)] = late.error
                    if late.time:
                        times.append(late.time)
                    if late.code == "f":
                        await pinned(k, ref)
                    return
            if await cached(k, ref):
                return
            async with limiter:
                if await cached(k, ref):
                    return
                t = self.model.timed(ref.length, reader.flight(ref.cid) is None)
                try:
                    # our own chunk: the SSD, a hand-off copy from the successor, or S3;
                    # a chunk we stand in for (its owner is down): the SSD or S3 only
                    with t:
                        await reader.get(ref, pin=pin, local_only=ring.owner(ref.cid) != me,
                                         by=by)
                except trio.Cancelled:
                    # the call's time is up: the fetch goes on, and its end is what the
                    # requester hears when it sends the chunk again (it was timed from the
                    # second call on, or, ended by then, taken for cached before)
                    self._follow(job, ref, t)
                    raise
                except Exception as e:  # noqa: BLE001 - this chunk fails, the others go on
                    codes[k] = "e"
                    errors[str(k)] = _reason(e)
                    return
                if t.observed:  # (not a wait for a reader's fetch)
                    times.append([ref.length, round(t.seconds, 6), round(t.streams, 2)])
                kept = store.contains(ref.cid)
                codes[k] = "f" if kept else "u"
                if kept:
                    await pinned(k, ref)

        self._fetch_calls += 1
        try:
            with trio.move_on_after(wait) as scope:
                self._fetch_scopes[scope] = {r.cid for r in refs if not isinstance(r, str)}
                async with trio.open_nursery() as n:
                    for k, ref in enumerate(refs):
                        if isinstance(ref, str):
                            codes[k] = "e"
                            errors[str(k)] = ref
                        else:
                            n.start_soon(one, k, ref)
        finally:
            self._fetch_calls -= 1
            self._fetch_scopes.pop(scope, None)
        return {"codes": "".join(codes), "errors": errors, "times": times}

    def _follow(self, job: _FetchJob, ref: ChunkRef, t) -> None:
        """Follow a fetch that a ds_fetch call's time cut to its end, for the call of the
        same job that names the chunk again: fetched (and its whole time), not kept,
        or failed."""
        reader, store = self.d.reader, self.d.store
        assert reader is not None and store is not None
        flight = reader.flight(ref.cid)
        if flight is None:  # (a read of the SSD, no fetch: a resend finds it cached)
            return
        late = job.late[ref.cid] = _Late()
        t0 = time.monotonic() - t.seconds

        async def follow() -> None:
            await flight.done.wait()
            error = flight.error
            if error is not None:
                late.code, late.error = "e", _reason(error)
            else:
                secs = time.monotonic() - t0
                late.code = "f" if store.contains(ref.cid) else "u"
                if t.observed:  # (not a wait for a reader's fetch)
                    self.model.observe(ref.length, secs, t.streams)
                    late.time = [ref.length, round(secs, 6), round(t.streams, 2)]
            late.done.set()

        try:
            reader.nursery.start_soon(follow)
        except RuntimeError:  # (the daemon is stopping: its service nursery is closed)
            del job.late[ref.cid]

    async def op_probe(self, payload: dict) -> dict:
        store = self.d.store
        cids = _unpack_ids(payload.get("ids"))
        states = "".join("2" if store.is_pinned(c) else "1" if store.contains(c) else "0"
                         for c in cids)
        return {"states": states, "store": {"limit": store.limit, "high": store.high,
                                            "pinned_bytes": store.pinned_bytes,
                                            "used_bytes": store.used}}

    async def op_pins_add(self, payload: dict) -> dict:
        """A copy of the pin records a preload --pin made on another node."""
        from .cluster.protocol import PeerError

        adds: dict[bytes, tuple[str, list]] = {}
        try:
            for k, key, etag, size, chunk in payload["records"]:
                if not (isinstance(key, str) and isinstance(etag, str)
                        and type(size) is int and type(chunk) is int):
                    raise ValueError
                adds[base64.b64decode(k, validate=True)] = (key, [etag, size, chunk])
            holder = _holder(payload)
        except (KeyError, TypeError, ValueError, ControlError):
            raise PeerError("ds_pins_add: records must be [key, name, etag, size, chunk] lists",
                            "protocol") from None
        await self._add_pin_versions(adds, holder)
        return {"records": len(adds)}

    async def op_pins_forget(self, payload: dict) -> dict:
        from .cluster.protocol import PeerError

        try:
            keys = [base64.b64decode(k, validate=True) for k in payload["keys"]]
            prefixes = [base64.b64decode(k, validate=True) for k in payload.get("prefixes", [])]
            # (a requester of an older cachefs names no data set: the records go whole)
            holder = _holder(payload) if "holder" in payload else None
        except (KeyError, TypeError, ValueError, ControlError):
            raise PeerError("ds_pins_forget: keys must be base64 record keys", "protocol") from None
        if holder is None:
            prefixes = []  # (never sent without a holder; no range goes whole)
        async with self._pins_lock:
            await self._release_pins(keys, holder, prefixes)
        return {"records": len(keys)}

    async def op_drop(self, payload: dict) -> dict:
        got = await self._drop_local(_unpack_ids(payload.get("ids")))
        if got["freed_chunks"]:
            log.info("free from a peer: %d chunks, %d bytes (%d pins removed)",
                     got["freed_chunks"], got["freed_bytes"], got["pins_removed"])
        return got


class _FetchJob:
    """An owner's part of one preload started elsewhere: its concurrency limiter, when a
    call of it last came, and the fetches a call's time cut, followed to their end."""

    __slots__ = ("limiter", "at", "late")

    def __init__(self, parallel: int) -> None:
        self.limiter = trio.CapacityLimiter(parallel)
        self.at = time.monotonic()
        self.late: dict[bytes, _Late] = {}


class _Late:
    __slots__ = ("done", "code", "error", "time")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.code = "e"
        self.error = ""
        self.time: list | None = None


class _PinReservation:
    """The chunks a preload --pin run has yet to pin (those no other run had reserved),
    counted in ``Datasets._reserved`` until it pins them, gives up on them, or ends."""

    __slots__ = ("ds", "cids")

    def __init__(self, ds: Datasets, cids: dict[bytes, int]) -> None:
        self.ds, self.cids = ds, cids

    def release(self, cid: bytes) -> None:
        if self.cids.pop(cid, None) is not None:
            del self.ds._reserved[cid]

    def release_all(self) -> None:
        for cid in list(self.cids):
            self.release(cid)


class _Run:
    """One preload: workers take chunks in list order."""

    def __init__(self, ds: Datasets, files: list[FileItem], pin: bool, parallel: int,
                 plan: dict, reservation: _PinReservation | None = None) -> None:
        self.ds = ds
        self.reservation = reservation or _PinReservation(ds, {})
        self.files = files
        self.pin = pin
        self.parallel = parallel
        self.plan = plan
        self.fetched_bytes = 0
        self.fetched_chunks = 0
        self.done_bytes = 0  # of chunks cached: before, or fetched now
        self.failed_bytes = 0  # of chunks of failed files that are not cached
        self.failed_chunks = 0
        # of those, fetched first (not kept, not pinned): in fetched_* too
        self.fetched_failed_bytes = 0
        self.fetched_failed_chunks = 0
        # missing at the plan, cached when a worker came to them (not fetched by this run)
        self.found_bytes = 0
        self.found_chunks = 0
        self.files_done = 0  # files whose every chunk is cached (a failed file is not done)
        self.uncached_bytes = 0
        self.failed_files = 0
        self.touched: set = set()
        self.t0 = time.monotonic()
        self.by_node: dict[str, dict] | None = None  # cluster runs: figures per node
        self.me = ""  # this node's id in a cluster run

    # every chunk a worker fetched is kept here unless the cache cannot (full of pinned
    # data, disk full); in a cluster, a chunk another node came to own meanwhile is kept
    # there, not here
    keeps_all = True
    until: float | None = None  # (a dry run's measurement) no new fetch from this trio time
    by = "preload"  # who fetches, in the traces of readers that wait for it

    def may_start(self) -> bool:
        """May a new fetch start?"""
        return self.until is None or trio.current_time() < self.until

    def local_only(self, r: ChunkRef) -> bool:
        return False

    def _count(self, node: str, key: str, n: int) -> None:
        if self.by_node is not None:
            row = self.by_node.setdefault(node, {})
            row[key] = row.get(key, 0) + n

    def _fetched(self, node: str, f: FileItem, length: int, kept: bool,
                 fails: bool = True) -> None:
        self.touched.add(f)
        self.fetched_bytes += length
        self.fetched_chunks += 1
        self._count(node, "fetched_bytes", length)
        self._count(node, "fetched_chunks", 1)
        if not kept:  # fetched for nothing: the file is not preloaded, it failed
            self.uncached_bytes += length
            self._count(node, "uncached_bytes", length)
            if fails:
                self._file_failed(node, f, NOT_KEPT)

    def _file_failed(self, node: str, f: FileItem, reason: str) -> None:
        self._count(node, "failed_chunks", 1)
        if not f.error:
            f.error = reason
            self.failed_files += 1
            log.warning("preload of %s failed: %s", f.path, f.error)

    def progress(self) -> dict:
        p = self.plan
        out = {"files_done": self.files_done, "files_total": p["files"],
               "bytes_done": self.done_bytes, "bytes_total": p["total_bytes"],
               "fetched_bytes": self.fetched_bytes, "missing_bytes": p["missing_bytes"],
               "failed_files": self.failed_files, "failed_bytes": self.failed_bytes,
               "fetched_failed_bytes": self.fetched_failed_bytes,
               "found_bytes": self.found_bytes,
               "elapsed": round(time.monotonic() - self.t0, 3)}
        eta = self.eta()
        if eta is not None:
            out["eta"] = eta
        return out

    def eta(self) -> float | None:
        """Seconds left, from the throughput model and the chunks and bytes left to fetch
        (the upper end of its range): the bytes left alone at the bytes' rate so far said
        "91%, ETA 4.8s" with 100k small files still to fetch, each a round trip.  In a
        cluster, each owner fetches its share at once: the slowest share decides.  None
        before any fetch was timed."""
        out = 0.0
        for left_b, left_c in self._left():
            if not left_c:
                continue
            est = self.ds.model.estimate(left_b, left_c, self.parallel,
                                         self.ds.s3_concurrency)
            secs = est.get("seconds_high", est.get("seconds"))
            if secs is None:
                return None
            out = max(out, secs)
        return round(out, 1)

    def _left(self) -> Iterable[Sequence[int]]:
        """The bytes and chunks left to fetch, by those who fetch them at once."""
        p = self.plan
        settled_b = (self.fetched_bytes + self.failed_bytes - self.fetched_failed_bytes
                     + self.found_bytes)
        settled_c = (self.fetched_chunks + self.failed_chunks - self.fetched_failed_chunks
                     + self.found_chunks)
        return [(max(0, p["missing_bytes"] - settled_b),
                 max(0, p.get("missing_chunks", 0) - settled_c))]

    def _work(self):
        for f in self.files:
            if not f.refs:
                self.files_done += 1
                continue
            for r in f.refs:
                yield f, r

    def _chunk_done(self, f: FileItem, r: ChunkRef, ok: bool = True,
                    fetched: bool = False) -> None:
        """Chunk ``r`` of ``f`` is settled: cached (``ok``), or failed or not fetched
        because its file failed; only cached bytes are progress."""
        length = r.length
        if ok:
            self.done_bytes += length
        else:
            self.failed_bytes += length
            self.failed_chunks += 1
            if fetched:  # (in fetched_* and failed_* both)
                self.fetched_failed_bytes += length
                self.fetched_failed_chunks += 1
        f.left -= 1
        if f.left == 0 and not f.error:
            self.files_done += 1

    def _found(self, f: FileItem, r: ChunkRef) -> None:
        """A worker found chunk ``r`` cached: if the plan counted it missing, it is no
        longer left to fetch (a cluster run keeps its own count: ``_aim``)."""
        c = f.cached_at_plan
        if c is None or not c[r.index]:
            self.found_bytes += r.length
            self.found_chunks += 1

    async def _pin_cached(self, refs) -> None:
        """Pin the chunks of ``refs`` already cached in place, without reading them back."""
        store = self.ds.d.store
        assert store is not None
        todo = await _sliced(list(refs), lambda part: [
            r for r in part if store.contains(r.cid) and not store.is_pinned(r.cid)])
        for i in range(0, len(todo), 4096):
            part = todo[i:i + 4096]
            await store.set_pinned([r.cid for r in part], True)
            for r in part:
                self.reservation.release(r.cid)

    async def go(self) -> None:
        if self.pin:
            await self._pin_cached(r for f in self.files for r in f.refs)
        work = self._work()
        async with trio.open_nursery() as n:
            # no more workers than S3 requests at once: the others would only queue, and
            # the throughput model would learn a concurrency no estimate ever asks about
            for _ in range(min(self.parallel, self.ds.s3_concurrency)):
                n.start_soon(self._worker, work)

    async def _worker(self, work) -> None:
        d = self.ds.d
        store, reader = d.store, d.reader
        assert store is not None and reader is not None
        skipped = 0
        for f, r in work:
            if self.pin and not f.error and store.contains(r.cid) and not store.is_pinned(
                    r.cid):
                # cached since the run pinned what was cached (a reader): pinned in place,
                # not read back from the SSD and counted as fetched
                await store.set_pinned([r.cid], True)
                if store.is_pinned(r.cid):
                    self.reservation.release(r.cid)
            if f.error or (store.contains(r.cid) and (not self.pin or store.is_pinned(r.cid))):
                # already cached, or not fetched: its file failed
                if store.contains(r.cid):
                    self._found(f, r)
                self._chunk_done(f, r, store.contains(r.cid))
                skipped += 1
                if skipped % YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()
                continue
            try:
                # (joining a reader's fetch under way: a wait, not a fetch to learn from)
                with self.ds.model.timed(r.length, reader.flight(r.cid) is None):
                    await reader.get(r, pin=self.pin, local_only=self.local_only(r),
                                     by=self.by)
            except Exception as e:  # noqa: BLE001 - the file fails, the run goes on
                if isinstance(e, ObjectChanged | NoSuchObject) and f.node.etag == r.obj.etag:
                    # the listing is behind S3: the next run (or open) asks S3 for the
                    # object; every run failed the same way until the listing expired
                    f.node.stale = True
                self.reservation.release(r.cid)
                self._file_failed(self.me, f, _reason(e))
                self._chunk_done(f, r, False)
                continue
            cached = store.contains(r.cid)
            # (written, then evicted for the next chunks of a data set larger than the room,
            # as its warning said, is kept: only a chunk the store refused is not; a pinned
            # one is never evicted)
            kept = cached or (not self.pin and not store.was_refused(r.cid))
            self._fetched(self.me, f, r.length, kept, fails=self.keeps_all)
            if cached and self.pin and not store.is_pinned(r.cid):
                await store.set_pinned([r.cid], True)
            self.reservation.release(r.cid)  # pinned, or it could not be
            if self.pin and store.contains(r.cid) and not store.is_pinned(r.cid):
                self._file_failed(self.me, f, NOT_PINNED)
                kept = False
            self._chunk_done(f, r, kept or not self.keeps_all, fetched=True)


# -- cluster-wide preload ------------------------------------------------------------------

_NOT_DOWN = ("remote", "busy", "queued", "protocol", "too_large")  # the node answered: no fallback


def _is_down(reason: str) -> bool:
    return reason not in _NOT_DOWN


@dataclass
class _Down:
    reason: str
    down: bool  # unreachable (True), or it answered with an error (False)


def _pack_ids(cids: list[bytes]) -> str:
    return base64.b64encode(b"".join(cids)).decode("ascii")


def _batches(items: Iterable) -> Iterator[list]:
    """``items`` in runs whose JSON stays under PAYLOAD_BUDGET (a peer request is at most
    64 KiB, and one S3 key, escaped, may take several KiB of it)."""
    part: list = []
    size = 0
    for it in items:
        n = len(json.dumps(it)) + 2
        if part and size + n > PAYLOAD_BUDGET:
            yield part
            part, size = [], 0
        part.append(it)
        size += n
    if part:
        yield part


def _unpack_ids(s) -> list[bytes]:
    from .cluster.protocol import PeerError

    try:
        raw = base64.b64decode(s, validate=True) if isinstance(s, str) else b"?"
    except ValueError:
        raw = b"?"
    if len(raw) % 16:
        raise PeerError("ids must be base64 of 16-byte chunk ids", "protocol")
    return [raw[i:i + 16] for i in range(0, len(raw), 16)]


def _obj_desc(o) -> dict:
    return {"mount": o.mount, "bucket": o.bucket, "key": o.key, "etag": o.etag,
            "size": o.size, "chunk_size": o.chunk_size}


def _row() -> dict:
    return {"chunks": 0, "bytes": 0, "cached_before_bytes": 0, "missing_bytes": 0,
            "missing_chunks": 0, "to_pin_bytes": 0, "fetched_bytes": 0, "fetched_chunks": 0,
            "failed_chunks": 0, "uncached_bytes": 0,
            # what the chunk files take on the node's disk, as its cache limit counts them
            "disk_bytes": 0, "to_pin_disk_bytes": 0}


class _ClusterPlan:
    """Where each chunk of a preload goes (its owner, or the owner's successor when
    the owner does not answer), what each target already holds, and the figures."""

    def __init__(self, ring, me: str, files: list[FileItem], pin: bool, parallel: int) -> None:
        self.ring, self.me = ring, me
        self.files, self.pin, self.parallel = files, pin, parallel
        self.down: dict[str, str] = {}  # node -> reason
        self.fallback: Counter = Counter()  # (target, owner) -> chunks
        self.lanes: dict[str, list[tuple[FileItem, ChunkRef]]] = {}  # target -> work
        self.pre_done: list[tuple[FileItem, ChunkRef]] = []  # cached already
        self.pre_failed: list[tuple[FileItem, ChunkRef]] = []  # no target answered
        self.missing: set[bytes] = set()
        self.nodes: dict[str, dict] = {}
        self.stores: dict[str, dict] = {}
        self.plan: dict = {}

    def row(self, node: str) -> dict:
        r = self.nodes.get(node)
        if r is None:
            r = self.nodes[node] = _row()
        return r

    def fail(self, f: FileItem, r: ChunkRef, node: str, reason: str) -> None:
        if not f.error:
            f.error = reason
        self.pre_failed.append((f, r))
        self.row(node)["failed_chunks"] += 1

    def add(self, node: str, items: list, states: str, store: dict, pin: bool) -> None:
        self.stores[node] = store
        row = self.row(node)
        lane = self.lanes.setdefault(node, [])
        for (f, r), st in zip(items, states, strict=True):
            row["chunks"] += 1
            row["bytes"] += r.length
            if st == "0":
                row["missing_bytes"] += r.length
                row["missing_chunks"] += 1
                self.missing.add(r.cid)
            else:
                row["cached_before_bytes"] += r.length
            if pin and st != "2":
                row["to_pin_bytes"] += r.length
                row["to_pin_disk_bytes"] += file_size(r.length)
            row["disk_bytes"] += file_size(r.length)
            if st == "0" or (pin and st != "2"):
                lane.append((f, r))
            else:
                self.pre_done.append((f, r))

    def estimate(self, ds: Datasets) -> dict:
        """Owners fetch at once, each with --parallel streams: the slowest decides."""
        best: dict | None = None
        for row in self.nodes.values():
            if not row.get("missing_chunks"):
                continue
            e = ds.model.estimate(row["missing_bytes"], row["missing_chunks"], self.parallel,
                                  ds.s3_concurrency)
            if best is None or e["seconds"] is None or (
                    best["seconds"] is not None and e["seconds"] > best["seconds"]):
                best = e
            if best["seconds"] is None:
                break
        if best is None:
            best = ds.model.estimate(0, 0, self.parallel, ds.s3_concurrency)
        best["nodes"] = sum(1 for r in self.nodes.values() if r.get("missing_chunks"))
        return best

    def finish(self, ds: Datasets, pin: bool) -> None:
        warnings = []
        for n in sorted(self.stores):
            st, row = self.stores[n], self.nodes[n]
            limit, pinned = int(st["limit"]), int(st["pinned_bytes"])
            if pin:
                after = pinned + row["to_pin_disk_bytes"]
                if after > limit:
                    raise ControlError(
                        f"cannot pin on node {n}: {_h(pinned)} already pinned + "
                        f"{_h(row['to_pin_disk_bytes'])} to pin (on disk) = {_h(after)}, more "
                        f"than its cache limit of {_h(limit)}; nothing was fetched (free pinned "
                        "data with "
                        "`cachefs free`, or raise --cache-size)")
                if after > int(st["high"]):
                    warnings.append(
                        f"node {n}: pinned data will fill {100 * after / limit:.0f}% of its cache "
                        f"({_h(after)} of {_h(limit)}); other reads keep only "
                        f"{_h(limit - after)}")
            elif row["disk_bytes"] > limit - pinned:
                warnings.append(
                    f"node {n}: its share of the data set ({_h(row['disk_bytes'])} on disk) is "
                    "larger than "
                    f"its cache room for unpinned data ({_h(limit - pinned)} of {_h(limit)}): "
                    "LRU eviction will drop the earliest-fetched files while later ones "
                    "arrive; the end of the list is what stays cached")
        by_owner: dict[str, dict[str, int]] = {}
        for (target, owner), k in sorted(self.fallback.items()):
            by_owner.setdefault(owner, {})[target] = k
            self.row(target).setdefault("fallback_for", {})[owner] = k
        for owner, targets in by_owner.items():
            self.row(owner)["error"] = self.down[owner]
            warnings.append(
                f"{self.down[owner]}; its {plural(sum(targets.values()), 'chunk')} go to the "
                f"next node of the ring ({', '.join(f'{t}: {k}' for t, k in targets.items())}), where "
                "reads look for them while it is down")
        for owner in self.down:
            self.row(owner)["error"] = self.down[owner]
        rows = list(self.nodes.values())
        nmissing = sum(r["missing_chunks"] for r in rows)
        self.plan = {
            "files": len(self.files), "total_bytes": sum(f.size for f in self.files),
            "chunks": sum(len(f.refs) for f in self.files),
            "cached_before_bytes": sum(r["cached_before_bytes"] for r in rows),
            "missing_bytes": sum(r["missing_bytes"] for r in rows), "missing_chunks": nmissing,
            "to_pin_bytes": sum(r["to_pin_bytes"] for r in rows), "warnings": warnings,
            "estimate": self.estimate(ds), "nodes": self.nodes,
            "unreachable": [{"node": n, "reason": r} for n, r in sorted(self.down.items())]}


def _drain(dq: deque, go_on: Callable[[], bool]):
    while dq and go_on():
        yield dq.popleft()


class _ClusterRun(_Run):
    """A preload in a cluster: this node's chunks by local workers, every other
    owner's chunks in ds_fetch batches to that owner (CALLS_PER_NODE in flight)."""

    def __init__(self, ds: Datasets, cp: _ClusterPlan, until: float | None = None) -> None:
        super().__init__(ds, cp.files, cp.pin, cp.parallel, cp.plan)
        self.cp = cp
        self.until = until
        self.ring, self.me = cp.ring, cp.me
        self.by_node = cp.nodes
        self.job = uuid.uuid4().hex
        self.failed_files = sum(1 for f in cp.files if f.error)
        self.reassigned: dict[str, list] = {}
        # the missing chunks not yet settled: by target, bytes and chunks (the live ETA)
        self.target: dict[bytes, str] = {}
        self.left: dict[str, list[int]] = {}
        self.sent: set[bytes] = set()  # (a dry run's) chunks asked of their owner once

    async def _aim_all(self) -> None:
        k = 0
        for node, items in self.cp.lanes.items():
            for _, r in items:
                if r.cid in self.cp.missing and r.cid not in self.target:
                    self._aim(r, node)
                k += 1
                if k % (4 * YIELD_EVERY) == 0:
                    await trio.lowlevel.checkpoint()

    def _aim(self, r: ChunkRef, node: str | None) -> None:
        """Chunk ``r`` is left to ``node`` now (None: settled)."""
        old = self.target.pop(r.cid, None)
        if old is not None:
            row = self.left[old]
            row[0] -= r.length
            row[1] -= 1
        if node is not None:
            self.target[r.cid] = node
            row = self.left.setdefault(node, [0, 0])
            row[0] += r.length
            row[1] += 1

    def _left(self) -> Iterable[Sequence[int]]:
        return self.left.values()

    def _found(self, f: FileItem, r: ChunkRef) -> None:
        pass  # (_chunk_done settles it in self.left)

    def _chunk_done(self, f: FileItem, r: ChunkRef, ok: bool = True,
                    fetched: bool = False) -> None:
        super()._chunk_done(f, r, ok, fetched)
        if r.cid in self.target:
            self._aim(r, None)

    keeps_all = False

    def local_only(self, r: ChunkRef) -> bool:
        # ours: hand-off probe, then S3; a chunk we stand in for: S3, never a peer
        return self.ring.owner(r.cid) != self.me

    async def go(self) -> None:
        await self._aim_all()
        for f in self.files:
            if not f.refs:
                self.files_done += 1
        for f, r in self.cp.pre_done:
            self._chunk_done(f, r)
        for f, r in self.cp.pre_failed:
            self._chunk_done(f, r, False)
        lanes = self.cp.lanes
        while lanes:
            self.reassigned = {}
            async with trio.open_nursery() as n:
                for node, items in lanes.items():
                    if not items:
                        continue
                    dq = deque(items)
                    if node == self.me:
                        if self.pin:
                            await self._pin_cached(r for _, r in items)
                        work = _drain(dq, self.may_start)
                        for _ in range(min(self.parallel, self.ds.s3_concurrency, len(dq))):
                            n.start_soon(self._worker, work)
                    else:
                        for _ in range(min(CALLS_PER_NODE, len(dq))):
                            n.start_soon(self._sender, node, dq)
            lanes = self.reassigned

    def _give_up(self, node: str, items, reason: str, down: bool) -> None:
        """``node`` failed: its chunks go to their successor (if it is down and
        the successor is usable), or fail."""
        if down and node not in self.cp.down:
            self.cp.down[node] = reason
            self.row(node)["error"] = reason
        for f, r in items:
            if f.error:
                self._chunk_done(f, r, False)
                continue
            prefs = self.ring.preference(r.cid, 2)
            if down and prefs[0] == node and len(prefs) > 1 and prefs[1] not in self.cp.down:
                succ = prefs[1]
                self.reassigned.setdefault(succ, []).append((f, r))
                if r.cid in self.target:
                    self._aim(r, succ)
                fb = self.row(succ).setdefault("fallback_for", {})
                fb[node] = fb.get(node, 0) + 1
                continue
            self._file_failed(node, f, reason)
            self._chunk_done(f, r, False)

    def row(self, node: str) -> dict:
        r = self.by_node.get(node)
        if r is None:
            r = self.by_node[node] = _row()
        return r

    async def _sender(self, node: str, dq: deque) -> None:
        from .cluster.protocol import PeerError

        ds = self.ds
        cl = ds.d.cluster
        limit = max(1, min(self.parallel, MAX_FETCH_CHUNKS))
        # the longest a call queues at the owner for a serving slot (its chunk requests
        # may hold them all): then it answers busy, and the batch is sent again
        slot = cl.opts.peer_timeout
        busy_since: float | None = None  # the owner answered busy since then, and only that
        while dq:
            if not self.may_start():  # (a dry run's time is up) only what is under way
                going = [it for it in dq if it[1].cid in self.sent]
                if not going:
                    return
                dq.clear()
                dq.extend(going)
            objs: dict = {}
            nb = size = 0
            fresh: list[bytes] = []  # sent for the first time in this batch
            while dq and nb < limit:
                f, r = dq[0]
                if f.error:
                    dq.popleft()
                    self._chunk_done(f, r, False)
                    continue
                add = 10 + (0 if r.obj in objs else ds._obj_size(r.obj))
                if nb and size + add > PAYLOAD_BUDGET:
                    break
                dq.popleft()
                objs.setdefault(r.obj, []).append((f, r))
                if self.until is not None and r.cid not in self.sent:
                    self.sent.add(r.cid)
                    fresh.append(r.cid)
                nb += 1
                size += add
            if not nb:
                continue
            order = [it for items in objs.values() for it in items]
            payload = {"job": self.job, "node": cl.node_id, "pin": self.pin,
                       "parallel": self.parallel,
                       # (within half of what the call's timeout leaves after its wait
                       # for a slot there: with `[s3] request_timeout` of 5 s the call
                       # gave up after 7 s, and a busy owner that answered after 10 s
                       # was taken for unreachable)
                       "wait": min(FETCH_WAIT, (cl.client.request_timeout - slot) / 2),
                       "objs": [{**_obj_desc(o), "idx": [r.index for _, r in items]}
                                for o, items in objs.items()]}
            try:
                res = await cl.forward(node, "ds_fetch", payload, wait=slot)
            except PeerError as e:
                if e.reason != "busy":
                    down = _is_down(e.reason)
                    if down:
                        cl.mark_unreachable(node, e.reason)
                    reason = f"node {node} unreachable: {e}" if down else f"node {node}: {e}"
                    rest = list(dq)
                    dq.clear()
                    self._give_up(node, order + rest, reason, down)
                    return
                res = {"busy": True}  # its serving slots stayed taken for `slot` s
            except ValueError as e:  # the request cannot be encoded (a key not in UTF-8)
                self._give_up(node, order, f"cannot send to node {node}: {e}", False)
                continue
            if res.get("busy"):
                # not under way there: a dry run whose time is up does not wait for it
                self.sent.difference_update(fresh)
                now = trio.current_time()
                busy_since = now if busy_since is None else busy_since
                if now - busy_since > cl.client.request_timeout:
                    # as long as a call that went unanswered: its successor fetches them
                    # (it looped for as long as the owner stayed busy)
                    rest = list(dq)
                    dq.clear()
                    self._give_up(node, order + rest, f"node {node} too busy to answer for "
                                  f"{now - busy_since:.0f}s", True)
                    return
                dq.extendleft(reversed(order))
                await trio.sleep(BUSY_BACKOFF)
                continue
            busy_since = None
            codes, errors = res.get("codes"), res.get("errors") or {}
            times = res.get("times") or []
            if not isinstance(codes, str) or len(codes) != len(order) or \
                    not isinstance(errors, dict) or not isinstance(times, list):
                self._give_up(node, order, f"node {node}: malformed ds_fetch reply", False)
                continue
            for t in times:
                try:  # on the owner (int(Infinity) is an OverflowError)
                    ds.model.observe(int(t[0]), float(t[1]), float(t[2]))
                except (TypeError, ValueError, IndexError, OverflowError):
                    pass
            pending = []
            for k, ((f, r), c) in enumerate(zip(order, codes, strict=True)):
                if c == "p":
                    pending.append((f, r))
                    continue
                if c == "e":
                    self._file_failed(node, f, str(errors.get(str(k), f"failed on node {node}")))
                elif c in "fu":
                    self._fetched(node, f, r.length, c == "f")
                self._chunk_done(f, r, c not in "eu", fetched=c in "fu")
            dq.extendleft(reversed(pending))


_PIN_KEY_MAX = 400  # longer S3 keys (up to 1,024 bytes) are hashed: LMDB keys end at 511


def _pin_key(endpoint: str | None, bucket: str, key: str, prefix: bool = False) -> bytes:
    """The key of a name's pin record (Datasets._record_pins): the store, then the S3 key
    as it is, so the records under a directory are one range of keys (``prefix``: the
    start of that range).  A key too long for that is hashed, after a byte no UTF-8 text
    holds: a directory's range does not reach it."""
    k = key.encode("utf-8", "surrogateescape")
    if len(k) > _PIN_KEY_MAX and not prefix:
        k = b"\xff" + path_key("pin", key)
    return path_key("pin", f"{endpoint or ''}\0{bucket}") + k[:_PIN_KEY_MAX]


def _dirs_above(key: str) -> Iterator[str]:
    """"a/b/c" → "a/b/", "a/", "" (the directories a key lies under, nearest first)."""
    i = len(key.rstrip("/"))
    while (i := key.rfind("/", 0, i)) >= 0:
        yield key[:i + 1]
    yield ""


def _endpoint(o: ObjectVersion) -> str | None:
    return o.store.spec.endpoint_url if o.store is not None else None


def pinned_among(index: Index, specs, cids: set[bytes], chunk_size: int,
                 progress: Callable[[str], None] | None = None) -> list[bytes]:
    """Blocking, at start-up: those of ``cids`` (chunk files adopted after a crash) that a
    pin record of the buckets ``specs`` mounts names: a version some data set pins, of
    this ``chunk_size`` (a chunk of another size can never be read or freed: pinned, it
    would stay for good). Every chunk of every such version is hashed: about 1.4 µs each,
    18 s per 100 TB pinned in 8 MiB chunks; ``progress`` hears every 10 s."""
    out: list[bytes] = []
    if not cids:
        return out
    said, seen = time.monotonic(), 0
    for spec in specs:
        pfx = _pin_key(spec.endpoint_url, spec.bucket, "", prefix=True)
        for blob in index.get_pin_records([], [pfx]).values():
            key, versions, _ = _record_of(blob)
            for v in versions:
                try:
                    etag, size, chunk = str(v[0]), int(v[1]), int(v[2])
                except (TypeError, ValueError, IndexError):
                    continue
                if chunk != chunk_size:
                    continue
                for i in range(-(-size // chunk)):
                    if (cid := chunk_id(spec.bucket, key, etag, chunk, i)) in cids:
                        out.append(cid)
                seen += 1
                if progress is not None and time.monotonic() - said >= 10:
                    said = time.monotonic()
                    progress(f"pinning again the chunk files a crash left unpinned: "
                             f"{seen} pinned versions looked at")
    return out


def _pin_of(o: ObjectVersion) -> tuple[bytes, tuple[str, int, int]]:
    """An object version's pin record key, and the version as the record holds it."""
    return _pin_key(_endpoint(o), o.bucket, o.key), (o.etag, o.size, o.chunk_size)


def _record(key: str, versions: list[list], holders: list[list[str]]) -> bytes:
    return json.dumps({"key": key, "versions": versions, "holders": holders}).encode()


def _record_of(blob: bytes) -> tuple[str, list[list], list[list[str]]]:
    """A pin record: its S3 key, its versions ([etag, size, chunk size] each; what is not
    is left out) and, beside each, the data sets that pin it ("": one nobody named; a
    record written before data sets were named has no holders: nobody named pins all)."""
    try:
        doc = json.loads(blob)
    except ValueError:
        return "", [], []
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
        return "", [], []
    vs, hs = doc.get("versions"), doc.get("holders")
    if not isinstance(vs, list):
        return doc["key"], [], []
    if not isinstance(hs, list) or len(hs) != len(vs):
        hs = [[""]] * len(vs)
    versions, holders = [], []
    for v, h in zip(vs, hs, strict=True):
        if (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and type(v[1]) is int
                and v[1] >= 0 and type(v[2]) is int and v[2] > 0):
            versions.append(v)
            ok = isinstance(h, list) and h and all(isinstance(x, str) for x in h)
            holders.append(list(h) if ok else [""])
    return doc["key"], versions, holders


NOT_KEPT = "fetched, but not kept: the cache is full of pinned data, or the disk is full"
NOT_PINNED = "cached, but not pinned: the cache index could not record the pin (see the log)"


def _h(n: float) -> str:
    return human(n)


def register(d: Daemon) -> None:
    srv = d.control
    assert srv is not None
    ds = Datasets(d)
    d.datasets = ds  # type: ignore[attr-defined]

    async def throughput(req, emit):
        return ds.statistics()

    srv.register("preload", ds.preload)
    srv.register("free", ds.free)
    srv.register("status", ds.status)
    srv.register("throughput", throughput)
    if d.cluster is not None:  # the owner side of cluster-wide preload / free / status
        d.cluster.register_op("ds_fetch", ds.op_fetch)
        d.cluster.register_op("ds_probe", ds.op_probe)
        d.cluster.register_op("ds_drop", ds.op_drop)
        d.cluster.register_op("ds_pins_add", ds.op_pins_add)
        d.cluster.register_op("ds_pins_forget", ds.op_pins_forget)
        d.cluster.register_op("ds_pins_dump", ds.op_pins_dump)
        assert d.nursery is not None
        d.nursery.start_soon(ds.sync_pin_records)
