"""File prefetch: fetch a directory's next files ahead of a reader that opens them in order.

A data loader reading camera frames opens f00000.jpg, f00001.jpg, ... one after another.
Chunk read-ahead (vfs.FileHandle) cannot help it: each file is a single chunk, read whole,
so every file would pay a full SSD (or S3) round trip while the reader waits.

Detection, per directory and per process (a run per reader: data loader workers are
processes reading contiguous batches side by side, and one run for all of them saw only
jumps): the position, in name order (the order of ``readdir``), of the files opened there.
An open at most ``SLACK`` positions past the furthest one seen extends the run (several
reader threads draining one ordered queue open files slightly out of order); an open up to
``SLACK`` positions behind it changes nothing; anything else ends the run and drops what it
fetched ahead.  A directory follows ``MAX_CURSORS`` processes, the least recent let go.  A file fetched ahead that the run
goes more than ``SLACK`` positions past unopened (a reader that skips files) is dropped
then, not held for ``HOLD_TTL``.  From the ``MIN_RUN``-th open of a
run on, the next files are fetched: the window starts at ``START_WINDOW`` files and doubles
on every open, up to ``prefetch_files``.

Only small files are prefetched (0 < size <= chunk size / 8, 1 MiB by default: there the
per-request latency, not the bandwidth, bounds a reader), and never more than one chunk's
worth of bytes ahead of the reader: a reader that stops has cost at most that many extra
bytes.  Larger files have chunk read-ahead once read.  Chunks on this node's SSD are read
``LOCAL_BATCH`` at a time in one worker-thread call (a thread hop costs more than reading a
100 KiB file), and a full window is refilled only once ``LOCAL_BATCH`` files are missing
from it, so a steady reader costs one call per ``LOCAL_BATCH`` files; the others go through
the chunk reader like any read (singleflight, the owning peer, S3 with write-through).
Their bytes are held in memory charged to the read-ahead budget, at most a quarter of it;
when that share is spent, prefetch waits and reads go on.  The open of a prefetched file
hands its bytes to the new handle (the read is then served from memory, tier "readahead");
an open while the fetch is still running claims it, and the bytes go to the handle when they
arrive.  Bytes nobody opened within ``HOLD_TTL`` seconds are dropped.

A run whose files come from the kernel's page cache (a second epoch over a data set that
fits in RAM) opens files whose reads never reach the daemon: what was fetched ahead for
them is read from the SSD for nothing.  Each directory therefore keeps ``reach``, a moving
share of its recent opens whose reads reached the daemon (each outcome weighs
``REACH_WEIGHT``; a file closed with no read reaching the daemon counts 0, and closes
reach the daemon late: the kernel sends them after the process's close returns).  Once a
file closes unread the window stops growing; when ``reach`` falls below ``PAUSE_BELOW``
the directory's prefetch pauses (its held bytes are dropped), and it resumes, from a
window of ``START_WINDOW``, once ``reach`` is back above ``RESUME_ABOVE``: after a few
reads in a row that reached the daemon (the page cache let the files go).  The gap
between the two keeps a page cache that holds most but not all files (the kernel
reclaimed some) from pausing and resuming on every file.  A relisting of the directory
keeps ``reach`` and the pause.  Nothing here is
persistent: a restart forgets runs and held bytes, and a failed prefetch is only logged at
debug level (the read itself fetches anew: the chunk reader does not remember a failure
only a speculative fetch met; one an open claimed, its read waiting for it, is the read's
failure); one that meets a file replaced or deleted in S3 marks its node stale, so its open
asks S3 for it.
"""

from __future__ import annotations

import logging
import os
import time
from bisect import bisect_left
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import trio

from .errors import NoSuchObject, ObjectChanged

if TYPE_CHECKING:
    from .vfs import VFS, FileHandle, Node

log = logging.getLogger("cachefs.prefetch")

SLACK = 8
MIN_RUN = 3
START_WINDOW = 4
HOLD_TTL = float(os.environ.get("CACHEFS_TEST_PREFETCH_HOLD", "30"))  # env: tests only
MAX_DIRS = 1024
MAX_CURSORS = 16  # readers (processes) followed per directory
SMALL_DIVISOR = 8  # files up to chunk size / 8 (1 MiB by default) are prefetched
LOCAL_BATCH = 8  # chunks read from the SSD per worker-thread call
BUDGET_SHARE = 4  # prefetch holds at most 1/BUDGET_SHARE of the read-ahead budget
REACH_WEIGHT = 1 / 6  # weight of an open's outcome (read by the daemon or not) in ``reach``
PAUSE_BELOW = 0.3  # pause a directory's prefetch when fewer of its opens reach the daemon
RESUME_ABOVE = 0.6  # and resume it when more do


class _Cursor:
    """One reader's run in a directory (the opens of one process)."""

    __slots__ = ("top", "length", "ahead", "window", "fetched")

    def __init__(self) -> None:
        self.top = -SLACK - 2  # furthest position opened in the current run
        self.length = 0  # opens in the current run
        self.ahead = -1  # furthest position fetched ahead
        self.window = 0
        self.fetched: deque[tuple[int, bytes]] = deque()  # (position, chunk id) fetched ahead


class _Run:
    """A directory's name order, what its opens say of the page cache, and its readers'
    runs, one per process (data loader workers read contiguous batches side by side: one
    run for all of them saw only jumps)."""

    __slots__ = ("children", "entries", "unread", "reach", "paused", "cursors")

    def __init__(self, d: Node) -> None:
        # the listing the order was built from (identity); None once it is gone
        self.children: dict[str, int] | None = d.children
        # the directory's (name, inode) in name order, shared with opendir: a list and a
        # dict of every name built here cost the open 0.34 s for a million names
        self.entries = d.entries()
        self.unread = 0  # files closed in a row with no read reaching the daemon
        self.reach = 1.0  # moving share of opens whose reads reached the daemon
        self.paused = False  # the page cache serves this directory: fetch nothing ahead
        self.cursors: OrderedDict[int, _Cursor] = OrderedDict()  # pid → run, last used last


    def position(self, name: str) -> int | None:
        """Where ``name`` is in the directory's name order (a binary search)."""
        i = bisect_left(self.entries, (name,))
        return i if i < len(self.entries) and self.entries[i][0] == name else None


class _Held:
    __slots__ = ("data", "dir_ino", "at")

    def __init__(self, data: bytes, dir_ino: int) -> None:
        self.data = data
        self.dir_ino = dir_ino
        self.at = time.monotonic()


class FilePrefetcher:
    def __init__(self, vfs: VFS, max_files: int) -> None:
        self.vfs = vfs
        self.max_files = max_files
        self.runs: OrderedDict[int, _Run] = OrderedDict()
        self.held: OrderedDict[bytes, _Held] = OrderedDict()  # chunk id → bytes, oldest first
        # chunk id → (handle, event) of the opens that claimed it while it was fetched
        self.inflight: dict[bytes, list[tuple[FileHandle, trio.Event]]] = {}
        self.bytes = 0  # held + in flight, charged to the budget
        self._passed: set[bytes] = set()  # in flight, and the reader went past them
        self._tgids: dict[int, int] = {}  # thread id → its process (a run per process)
        self._sweeping = False  # a task drops held bytes as they expire

    def _small(self, size: int) -> bool:
        return 0 < size <= self.vfs.cfg.chunk_size // SMALL_DIVISOR

    # -- the open path ----------------------------------------------------------------

    def opened(self, node: Node, h: FileHandle) -> None:
        """A file was opened: hand over its prefetched bytes, then extend the run."""
        if self.held or self.inflight:
            self._hand_over(h)  # (expired bytes are dropped by _sweep, not on this path)
        if self.max_files:
            self._observe(node, self._process_of(h.pid))

    def _hand_over(self, h: FileHandle) -> None:
        if not self._small(h.obj.size):
            return
        cid = h.obj.chunk(0).cid
        e = self.held.pop(cid, None)
        if e is not None:
            self.bytes -= len(e.data)
            self.vfs.stats.inc("prefetch_hits")
            h.keep(0, e.data, charged=True)  # the handle owns the budget charge now
            return
        waiting = self.inflight.get(cid)
        if waiting is not None:
            self.vfs.stats.inc("prefetch_claims")
            f = self.vfs.reader.flight(cid)
            if f is not None:
                # a read waits for it now: its failure is the read's, remembered (the
                # read's own fetch after it would wait a second S3 budget, ~6 min in all)
                f.remember = True
            # the handle's first read waits for the fetch (readahead.wait)
            waiting.append((h, h.expect(0)))

    def _process_of(self, tid: int) -> int:
        """The process of the thread that opened a file: FUSE names the thread, and the
        threads of one reader draining one ordered queue are one run (a run per thread
        saw each thread's opens 8 apart, and 8 readers' warm small files went 30% slower).
        From /proc, once per thread (a thread id of another pid namespace is 0)."""
        p = self._tgids.get(tid)
        if p is None:
            p = tid
            try:
                with open(f"/proc/{tid}/status", "rb") as f:  # (procfs: no disk)
                    for line in f:
                        if line.startswith(b"Tgid:"):
                            p = int(line.split()[1])
                            break
            except (OSError, ValueError):
                pass
            if len(self._tgids) >= 4096:
                self._tgids.clear()
            self._tgids[tid] = p
        return p

    def _observe(self, node: Node, pid: int) -> None:
        d = self.vfs.nodes.get(node.parent)
        if d is None or d.children is None:
            return
        r = self.runs.get(d.ino)
        if r is None or r.children is not d.children:
            old, r = r, _Run(d)
            if old is not None:  # relisted: the page cache still holds what it held
                r.paused, r.unread, r.reach = old.paused, old.unread, old.reach
            self.runs[d.ino] = r
            while len(self.runs) > MAX_DIRS:
                self.runs.popitem(last=False)
        self.runs.move_to_end(d.ino)
        p = r.position(node.name)
        if p is None:
            return
        c = r.cursors.get(pid)
        if c is None:
            c = r.cursors[pid] = _Cursor()
            while len(r.cursors) > MAX_CURSORS:
                self._end(r.cursors.popitem(last=False)[1])
        else:
            r.cursors.move_to_end(pid)
        if c.top < p <= c.top + SLACK:
            c.length += 1
            c.top = p
            if c.fetched:
                self._went_past(c)
        elif c.top - SLACK <= p <= c.top:
            return
        else:
            if c.length >= MIN_RUN:
                self._end(c)
            c.top, c.length, c.ahead, c.window = p, 1, p, 0
            return
        if c.length < MIN_RUN or r.paused:
            return
        # the window grows while the files fetched ahead are read, not while they close
        # unread (on the way to a pause); it was cut back to START_WINDOW then
        c.window = min(self.max_files, START_WINDOW if c.window == 0
                       else c.window if r.unread else c.window * 2)
        self._schedule(d, r, c, p)

    def relisted(self, dir_ino: int) -> None:
        """Directory ``dir_ino`` has a new listing, or is gone: its run lets go of the
        order it built of the old one (a million names: about 100 MiB, kept until the next
        open there, or until 1,024 other directories had runs). What the run learned
        (its pause, the page cache's reach) stays for the next open."""
        r = self.runs.get(dir_ino)
        if r is not None:
            r.children = None
            r.entries = []

    def _went_past(self, c: _Cursor) -> None:
        """Files fetched ahead that the reader went SLACK positions past without opening
        (it skips them: every 2nd frame, the .jpg of .jpg/.json pairs) are let go now: held
        until HOLD_TTL, they filled prefetch's share of the budget, and prefetch stopped
        in every directory."""
        limit = c.top - SLACK
        f = c.fetched
        while f and f[0][0] < limit:
            self._let_go(f.popleft()[1])

    def reached(self, h: FileHandle) -> None:
        """The first read of a handle reached the daemon: the page cache does not hold
        this file."""
        self._outcome(h, True)

    def closed(self, h: FileHandle) -> None:
        """A handle closed; if none of its reads reached the daemon, the page cache served
        it (or nothing read it)."""
        if h.cur_chunk < 0:
            self._outcome(h, False)

    def _outcome(self, h: FileHandle, reached: bool) -> None:
        r = self.runs.get(h.node.parent) if self.runs else None
        if r is None or h.obj.size == 0:  # an empty file's reads never reach the daemon
            return
        r.unread = 0 if reached else r.unread + 1
        r.reach += REACH_WEIGHT * (reached - r.reach)
        if r.paused and r.reach > RESUME_ABOVE:
            r.paused = False
            for c in r.cursors.values():
                c.window = 0
            self.vfs.stats.inc("prefetch_resumed")
        elif not r.paused and r.reach < PAUSE_BELOW:
            r.paused = True
            self.vfs.stats.inc("prefetch_paused")
            self._drop_dir(h.node.parent, r)

    # -- fetching ahead ---------------------------------------------------------------

    def _schedule(self, d: Node, r: _Run, c: _Cursor, p: int) -> None:
        end = min(p + c.window, len(r.entries) - 1)
        if end - c.ahead < LOCAL_BATCH and c.ahead - p >= LOCAL_BATCH:
            # the reader has files in hand and fewer than a batch could be added: the
            # check below would say so after walking the whole window, on every open
            # (32 positions: a third of the daemon's time per file with 8 readers)
            return
        vfs = self.vfs
        store = vfs.reader.store
        cap = vfs.budget.limit // BUDGET_SHARE
        todo = []  # positions past r.ahead: (position, node, or None for one not fetched)
        small = 0
        ahead_bytes = 0
        for i in range(p + 1, end + 1):
            ino = r.children.get(r.entries[i][0])
            node = vfs.nodes.get(ino) if ino is not None else None
            if node is None or node.is_dir or not self._small(node.size):
                node = None
            else:
                ahead_bytes += node.size
                if ahead_bytes > vfs.cfg.chunk_size:
                    break  # at most one chunk's worth of bytes ahead of the reader
            if i > c.ahead:
                todo.append((i, node))
                small += node is not None
        if small < LOCAL_BATCH and c.ahead - p >= LOCAL_BATCH:
            return  # the reader has files in hand: refill LOCAL_BATCH at a time
        local, remote = [], []
        for i, node in todo:
            if node is not None:
                ref = vfs.version(node).chunk(0)
                if ref.cid not in self.held and ref.cid not in self.inflight:
                    if self.bytes + ref.length > cap or not vfs.budget.try_take(ref.length):
                        vfs.stats.inc("prefetch_budget_full")
                        break
                    self.bytes += ref.length
                    self.inflight[ref.cid] = []
                    c.fetched.append((i, ref.cid))
                    if store.contains(ref.cid):
                        local.append(ref)
                    else:
                        remote.append((ref, node))
            c.ahead = i
        vfs.stats.inc("prefetch_started", len(local) + len(remote))
        for i in range(0, len(local), LOCAL_BATCH):
            vfs.nursery.start_soon(self._fetch_local, local[i:i + LOCAL_BATCH], d.ino)
        for ref, node in remote:
            vfs.nursery.start_soon(self._fetch, ref, node, d.ino)

    async def _fetch_local(self, refs: list, dir_ino: int) -> None:
        """Chunks on this node's SSD: read in one worker-thread call."""
        self.vfs.stats.inc("prefetch_ssd_calls")
        try:
            got = await self.vfs.reader.store.get_many([(r.cid, r.length) for r in refs])
        except Exception as e:  # noqa: BLE001 - the reads themselves will retry and report
            log.debug("prefetch from the SSD failed: %s", e)
            got = {}
        for ref in refs:
            self._deliver(ref, got.get(ref.cid), dir_ino)

    async def _fetch(self, ref, node: Node, dir_ino: int) -> None:
        """A chunk from its owner or S3, through the chunk reader (singleflight); not
        remembered as failed if it fails (the open's read asks again), unless an open
        claimed it (its read waits for this fetch: its failure is the read's)."""
        data = None
        try:
            # (an open may have claimed it before this task ran: `_hand_over` then found
            # no flight to mark)
            data = await self.vfs.reader.get(ref, by="the file prefetcher",
                                             speculative=not self.inflight.get(ref.cid))
        except Exception as e:  # noqa: BLE001 - the read itself will retry and report
            log.debug("prefetch of %s failed: %s", ref.obj.key, e)
            if isinstance(e, ObjectChanged | NoSuchObject) and ref.obj.etag == node.etag:
                node.stale = True  # the listing is behind S3: its open asks S3 (a HEAD)
        self._deliver(ref, data, dir_ino)

    def _deliver(self, ref, data: bytes | None, dir_ino: int) -> None:
        waiting = self.inflight.pop(ref.cid, [])
        self.bytes -= ref.length
        if self._passed and ref.cid in self._passed:
            self._passed.discard(ref.cid)
            if data is not None and not waiting:  # the reader went past it meanwhile
                self.vfs.stats.inc("prefetch_unused")
                data = None
        live = [h for h, _ in waiting if not h.closed] if data is not None else []
        for i, h in enumerate(live):
            h.keep(0, data, charged=i == 0)  # the first handle takes over the budget charge
        for h, ev in waiting:
            h.arrived(0, ev)  # after a failed fetch, the read goes to the chunk reader
        if data is not None and not waiting:
            self.held[ref.cid] = _Held(data, dir_ino)
            self.bytes += len(data)
            if not self._sweeping:
                self._sweeping = True
                self.vfs.nursery.start_soon(self._sweep)
        elif not live:
            self.vfs.budget.give(ref.length)

    def _drop(self, cid: bytes) -> None:
        e = self.held.pop(cid)
        self.bytes -= len(e.data)
        self.vfs.budget.give(len(e.data))
        self.vfs.stats.inc("prefetch_unused")

    def discard(self, cids: list[bytes]) -> None:
        """These chunks left the SSD (`cachefs free`, eviction, `trace --cold`): what is
        held of them goes too, as from the chunk memo (a `trace --cold` of a file fetched
        ahead showed it served from memory)."""
        if self.held or self.inflight:
            for cid in cids:
                self._let_go(cid)

    def _let_go(self, cid: bytes) -> None:
        """A chunk fetched ahead goes: now if it is held, on arrival if it is still on its
        way and nobody claimed it (it was held for HOLD_TTL)."""
        if cid in self.held:
            self._drop(cid)
        elif cid in self.inflight and not self.inflight[cid]:
            self._passed.add(cid)

    def _end(self, c: _Cursor) -> None:
        """A reader's run ended (a jump) or was let go: what it fetched ahead goes, held or
        still on its way."""
        for _, cid in c.fetched:
            self._let_go(cid)
        c.fetched.clear()

    def _drop_dir(self, dir_ino: int, r: _Run) -> None:
        """Directory ``dir_ino``'s prefetch paused: what it fetched ahead goes, held or
        still on its way."""
        for c in r.cursors.values():
            self._end(c)
        for cid in [c for c, e in self.held.items() if e.dir_ino == dir_ino]:
            self._drop(cid)

    async def _sweep(self) -> None:
        """Drop held bytes HOLD_TTL seconds after they arrived, also when no file is opened
        again (a reader that stopped): they were held, and charged to the read-ahead budget,
        until the next open."""
        try:
            while self.held:
                oldest = next(iter(self.held.values())).at
                await trio.sleep(max(0.0, oldest + HOLD_TTL - time.monotonic()) + 0.05)
                self._expire()
        finally:
            self._sweeping = False

    def _expire(self) -> None:
        limit = time.monotonic() - HOLD_TTL
        while self.held:
            cid, e = next(iter(self.held.items()))
            if e.at > limit:
                break
            self._drop(cid)
