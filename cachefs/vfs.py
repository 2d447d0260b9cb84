"""POSIX semantics over S3 listings and the chunk reader (no FUSE types here).

Namespace
  Directories come from ListObjectsV2 with delimiter "/", listed lazily (on the
  first lookup/readdir) and completely (every page), and cached for the
  metadata TTL.  A name that is both an object and a prefix is the directory.
  Names that cannot be POSIX names ("", ".", "..", over 255 bytes, NUL) are
  skipped with one warning each.  Inode numbers are stable across restarts
  (kept in the index).  A relisting that finds a new ETag updates the node and
  invalidates the kernel's cached pages for it; if handles of the old version are
  open, the name gets a new inode instead (the kernel keeps one size per inode), and
  the old one lives on, detached, until its handles close and the kernel forgets it.

Reads
  A handle pins the object version (ETag, size) it was opened with; every S3
  GET for it carries that ETag, so a read never mixes two versions.  Once a read met
  a change and an open moved the inode to the new version, handles of the old one
  read EIO (their bytes would go into the pages the new handles read).
  Read-ahead: a handle whose reads follow each other keeps a window of chunk
  fetches in flight that doubles on each new chunk up to ``readahead_chunks``;
  a seek resets it to zero, so random readers fetch only what they read.
  Prefetched chunks are held in memory under a global byte budget
  (``readahead_memory``); when it is spent, read-ahead pauses, reads do not.
  Across files: a reader opening a directory's files in name order gets the
  next files fetched ahead of it (prefetch.py).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import trio
import trio.lowlevel

from .chunks.ids import ObjectVersion
from .chunks.reader import ChunkReader
from .config import Config, MountSpec
from .errors import NoSuchObject, ObjectChanged, S3Error
from .index import Index, IndexWriter, path_key
from .objectstore import Listing, ObjectStore, ObjInfo
from .prefetch import FilePrefetcher
from .stats import Stats
from .trace import Tracer, current, leaf, span

log = logging.getLogger("cachefs.vfs")

ROOT_INO = 1
MISS_RELIST_MAX = 10_000  # entries: a larger directory is not listed again for a missing name
DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
APPLY_SLICE = 4096  # listing entries applied between two checkpoints
WALK_YIELD = 4096  # names walk_files looks at between two checkpoints
STALE_WAIT = 1.0  # seconds a lookup waits for a relisting before it uses the listing it has
STALE_RETRY = 30.0  # after a relisting failed, the old listing is used this long, then retried
UNREADABLE = object()  # a saved listing that does not parse
HEAD_WAIT = 10.0  # seconds an open of a changed object waits for S3 to say its new version


class FSError(Exception):
    def __init__(self, err: int, msg: str = "") -> None:
        super().__init__(msg or os.strerror(err))
        self.errno = err


@dataclass
class MountCtx:
    spec: MountSpec
    store: ObjectStore


class Node:
    __slots__ = ("ino", "parent", "name", "is_dir", "mount", "path", "size", "etag", "mtime",
                 "children", "listed_at", "lookups", "_sorted", "stale")

    def __init__(self, ino: int, parent: int, name: str, is_dir: bool, mount: MountCtx | None,
                 path: str) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.is_dir = is_dir
        self.mount = mount
        self.path = path  # relative to the mount's prefix; dirs end with "/" (root: "")
        self.size = 0
        self.etag = ""
        self.mtime = 0.0
        self.children: dict[str, int] | None = None
        self._sorted: tuple[dict[str, int], list[tuple[str, int]]] | None = None
        self.listed_at = 0.0
        self.stale = False  # S3 has a newer version than this node's ETag (a read saw it)
        self.lookups = 0

    def entries(self) -> list[tuple[str, int]]:
        """The directory's (name, inode) in name order: sorted once per listing (0.14 s
        of the trio thread for a million names in S3's order), shared by every opendir
        and the file prefetcher.  Not to be modified."""
        c = self.children or {}
        s = self._sorted
        if s is None or s[0] is not c:
            s = self._sorted = (c, sorted(c.items()))
        return s[1]

    @property
    def key(self) -> str:
        assert self.mount is not None
        return self.mount.spec.prefix + self.path


class _HeadCheck:
    """One HEAD of a stale node, shared by the opens that wait for it."""

    __slots__ = ("done", "answered", "gone", "slow")

    def __init__(self) -> None:
        self.done = trio.Event()
        # S3 answered and the node is being changed: opens wait for ``done`` (the kernel
        # forgetting the old version's pages), or one could read old pages, then new bytes
        self.answered = False
        self.gone = False  # S3 says the object was deleted
        self.slow = False  # an open waited HEAD_WAIT for it in vain: the next ones do not


_DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403", ""})


def _errno_of(e: S3Error) -> int:
    """What a FUSE request that S3 failed answers: EACCES where S3 denied it (a bucket
    policy that leaves out a prefix), else EIO: S3's other 403s (a skewed clock, an
    archived object's InvalidObjectState) are no permission a user could be given."""
    return errno.EACCES if e.status == 403 and e.code in _DENIED and not e.transient \
        else errno.EIO


def valid_name(name: str) -> bool:
    return (name not in ("", ".", "..") and "\0" not in name and "/" not in name
            and len(name.encode("utf-8", "surrogateescape")) <= 255)


class ReadaheadBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def try_take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.take(n)
        return True

    def take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        self.used -= n


MEMO_CHUNKS = 8  # the shared memo holds up to this many chunks (and ≤ 1/4 of the budget)
# a handle that has not read for this long gives its chunks back when the budget is spent
IDLE_HANDLE = 1.0
MEMO_AHEAD = 2  # chunks a herd's shared read-ahead fetches past a miss
# A handle's first read, at offset 0, that ends before this (and before the end of its
# chunk) may be a peek at the file's head (a header, magic bytes: the kernel turns a 4–16 KiB
# read into one of 16–64 KiB): it starts no read-ahead, and the handle's next read starts it
# if it follows on. A reader that goes on
# sends that next read at once (the kernel reads ahead of it), so it loses one chunk's fetch
# time at most; a peek no longer costs a second chunk.
HEAD_PEEK = 128 << 10


class ChunkMemo:
    """The chunks handles fetched themselves most recently, shared by every handle.

    When many readers open one file at once (a herd: the ranks of a job reading the
    same shard), the kernel's page cache serves each reader part of the file, so
    their offsets jump, their read-ahead stays off, and every reader fetches the
    chunks it misses: without the memo, once per reader from the SSD.  With it, a
    chunk one handle fetched is served from memory to the others.  At most ``limit``
    bytes; a handle served from the memo holds no copy of its own.  Chunk ids name
    immutable bytes, so an entry is never stale; entries leave with their chunk when it
    is dropped from the SSD (ChunkStore.on_drop: `cachefs free`, eviction, `trace
    --cold`) and with the last handle of their file.

    Budget: every byte in memory is charged to the read-ahead budget once.  A chunk the
    fetching handle also keeps in its buffer is *borrowed*: the handle's charge covers
    it, and when the handle lets go of it (``adopt``) the memo takes the charge over.
    Other entries (the herd's shared read-ahead) are charged by the memo itself."""

    def __init__(self, budget: ReadaheadBudget, limit: int) -> None:
        self.budget = budget
        self.limit = limit
        # chunk id -> [bytes, inode, the handle that fetched it, charged by the memo]
        self.items: OrderedDict[bytes, list] = OrderedDict()
        self.used = 0

    def get(self, cid: bytes) -> bytes | None:
        e = self.items.get(cid)
        if e is None:
            return None
        self.items.move_to_end(cid)
        return e[0]

    def fetched_by_other(self, cid: bytes, h: object) -> bool:
        e = self.items.get(cid)
        return e is not None and e[2] is not h

    def put(self, cid: bytes, data: bytes, ino: int, owner: object,
            borrowed: bool = False) -> None:
        """Keep chunk cid; ``borrowed``: ``owner`` keeps it too and its charge covers it."""
        n = len(data)
        if cid in self.items or n > self.limit:
            return
        while self.items and self.used + n > self.limit:
            self._pop()
        if not borrowed and not self.budget.try_take(n):
            return  # read-ahead holds the budget: it comes first
        self.items[cid] = [data, ino, owner, not borrowed]
        self.used += n

    def adopt(self, cid: bytes, owner: object) -> bool:
        """``owner`` lets go of chunk cid: True if the memo keeps it and takes over the
        charge (the owner must not give it back), False if the owner gives it back."""
        e = self.items.get(cid)
        if e is None or e[2] is not owner or e[3]:
            return False
        e[3] = True
        return True

    def ahead(self, vfs: VFS, obj: ObjectVersion, ino: int, start: int, n: int) -> None:
        """Fetch chunks start..start+n-1 of obj into the memo in the background, unless
        they are held or in flight already: the herd's shared read-ahead."""
        flights = vfs.reader.flights
        for j in range(start, min(start + n, obj.nchunks)):
            ref = obj.chunk(j)
            if ref.cid in self.items or ref.cid in flights:
                continue
            vfs.stats.inc("memory_readahead_started")
            vfs.nursery.start_soon(self._fetch, vfs, ref, ino)

    async def _fetch(self, vfs: VFS, ref, ino: int) -> None:
        try:
            with span("readahead", chunk=ref.index, shared=True):
                data = await vfs.reader.get(ref, speculative=True)
        except Exception:  # noqa: BLE001 - a reader that wants the chunk fetches it itself
            return
        if vfs.open_count.get(ino):
            self.put(ref.cid, data, ino, self)

    def discard(self, cids: list[bytes]) -> None:
        items = self.items
        if not items:
            return
        for cid in cids:
            e = items.pop(cid, None)
            if e is not None:
                self._gone(e)

    def closed(self, ino: int) -> None:
        """The last handle of inode ino closed: its chunks leave the memo."""
        for cid in [c for c, e in self.items.items() if e[1] == ino]:
            self._gone(self.items.pop(cid))

    def _pop(self) -> None:
        self._gone(self.items.popitem(last=False)[1])

    def _gone(self, e: list) -> None:
        self.used -= len(e[0])
        if e[3]:
            self.budget.give(len(e[0]))


class FileHandle:
    def __init__(self, vfs: VFS, node: Node, obj: ObjectVersion, pid: int = 0) -> None:
        self.vfs = vfs
        self.pid = pid  # of the process that opened the file
        self.node = node
        self.obj = obj
        self.buf: dict[int, bytes] = {}
        self.pending: dict[int, trio.Event] = {}
        self.next_off = 0
        self.window = 0
        self.cur_chunk = -1  # stays -1 until a read reaches the daemon
        self.closed = False
        self.last_read = 0.0  # trio time of its last read (see VFS._trim_idle)
        self.prefetched: int | None = None  # the chunk the file prefetcher is bringing

    def keep(self, i: int, data: bytes, charged: bool) -> None:
        """Chunk i arrived (from this handle's fetches or the file prefetcher);
        ``charged``: its budget charge comes with it."""
        if self.closed or i in self.buf:
            if charged:
                self.vfs.budget.give(len(data))
            return
        if not charged:
            self.vfs.budget.take(len(data))
        self.buf[i] = data
        reading = self.vfs._reading
        if self not in reading:
            # a handle the file prefetcher handed bytes at its open, which has not read
            # (opened and held, or read from the page cache): idle trimming may take them
            # back from now on; it never saw such a handle, which kept its bytes to close
            self.last_read = trio.current_time()
            reading[self] = None

    def expect(self, i: int) -> trio.Event:
        """Chunk i is on its way from elsewhere (the file prefetcher): reads of it wait
        for the event, then look in the buffer, then fetch it themselves."""
        ev = self.pending[i] = trio.Event()
        self.prefetched = i
        return ev

    def arrived(self, i: int, ev: trio.Event) -> None:
        """What ``expect(i)`` (or this handle's own read-ahead) waited for is settled
        (kept, or failed)."""
        if self.pending.get(i) is ev:
            del self.pending[i]
        ev.set()

    def _let_go(self, i: int) -> None:
        data = self.buf.pop(i)
        if not self.vfs.memo.adopt(self.obj.chunk(i).cid, self):
            self.vfs.budget.give(len(data))

    def _drop_outside(self, lo: int, hi: float = math.inf) -> None:
        """Let go of the buffered chunks before lo or after hi."""
        for j in [j for j in self.buf if j < lo or j > hi]:
            self._let_go(j)

    async def _fetch(self, i: int) -> bytes:
        """Chunk i through the chunk reader, into the buffer.  The caller took its
        budget charge; the buffer keeps it, or a failed fetch gives it back."""
        ref = self.obj.chunk(i)
        try:
            data = await self.vfs.reader.get(ref)
        except BaseException:
            self.vfs.budget.give(ref.length)
            raise
        self.keep(i, data, charged=True)
        return data

    async def _prefetch(self, i: int, ev: trio.Event) -> None:
        try:
            with span("readahead", chunk=i):
                await self._fetch(i)
        except Exception:  # noqa: BLE001, S110 - a failed prefetch is retried by the read
            pass
        finally:
            self.arrived(i, ev)

    async def _chunk(self, i: int) -> bytes:
        d = self.buf.get(i)
        if d is not None:
            self.vfs.stats.inc("readahead_hits")
            leaf("chunk", chunk=i, tier="readahead", bytes=len(d))
            return d
        ev = self.pending.get(i)
        if ev is not None:
            self.vfs.stats.inc("readahead_waits")
            # (the file prefetcher's fetch is none of this read's trace: say whose it is)
            with span("readahead.wait", chunk=i, **({"source": "prefetch"}
                                                    if i == self.prefetched else {})):
                await ev.wait()
            d = self.buf.get(i)
            if d is not None:
                return d
        ref = self.obj.chunk(i)
        memo = self.vfs.memo
        d = memo.get(ref.cid)
        if d is not None:  # another handle of this file fetched it (see ChunkMemo)
            self.vfs.stats.inc("memory_hits")
            leaf("chunk", chunk=i, tier="memory", bytes=len(d))
            return d
        if i > 0 and memo.fetched_by_other(self.obj.chunk(i - 1).cid, self):
            # another handle fetched the chunk before this one: the file is read forward
            # by several readers whose own read-ahead is off (their offsets jump)
            memo.ahead(self.vfs, self.obj, self.node.ino, i + 1, MEMO_AHEAD)
        # charged while in flight, like read-ahead: with many readers fetching their own
        # chunks at once, read-ahead then waits instead of adding its chunks on top
        self.vfs.budget.take(ref.length)
        data = await self._fetch(i)
        # shared with the other handles; the buffer's charge covers it while both hold it
        memo.put(ref.cid, data, self.node.ino, self, borrowed=self.buf.get(i) is data)
        return data

    def take_buffered(self, off: int, size: int) -> tuple[bytes | memoryview, int, int] | None:
        """A read that ``read`` would serve from the chunk this handle holds, with nothing
        to start (all its read-ahead in hand or on its way): (the bytes, the chunk index,
        the chunk's length), served now, without a task switch.  None: ``read`` it.  The
        usual request of a warm sequential reader; the handle's state moves as in read."""
        obj = self.obj
        end = min(off + size, obj.size)
        i = self.cur_chunk
        if off >= end or off != self.next_off or self.window == 0 or i < 0:
            return None
        cs = obj.chunk_size
        if off // cs != i or (end - 1) // cs != i:
            return None
        d = self.buf.get(i)
        if d is None:
            return None
        buf, pending = self.buf, self.pending
        for j in range(i + 1, min(i + 1 + self.window, obj.nchunks)):
            if j not in buf and j not in pending:
                return None  # read-ahead to start (read's _schedule)
        self.next_off = end
        self._drop_outside(i)
        self.vfs.stats.inc("readahead_hits")
        lo, hi = off - i * cs, end - i * cs
        return (d if lo == 0 and hi == len(d) else memoryview(d)[lo:hi]), i, len(d)

    async def read(self, off: int, size: int) -> bytes | memoryview:
        obj = self.obj
        if off >= obj.size or size <= 0:
            return b""
        end = min(off + size, obj.size)
        cs = obj.chunk_size
        first, last = off // cs, (end - 1) // cs
        sequential = off == self.next_off and (self.cur_chunk >= 0
                                               or end >= min(HEAD_PEEK, obj.chunk_size))
        self.next_off = end
        if sequential:
            self._drop_outside(first)
            if first != self.cur_chunk or self.window == 0:
                self.window = min(self.vfs.cfg.readahead_chunks, max(1, self.window * 2))
            self._schedule(last + 1, self.window)
        else:
            self.window = 0
            self._drop_outside(first, last)
        self.cur_chunk = last
        if first == last:
            data = await self._chunk(first)
            lo, hi = off - first * cs, end - first * cs
            if lo == 0 and hi == len(data):
                return data
            # a view, not a copy: pyfuse3 replies from the buffer (one 128 KiB copy and
            # allocation less per request); the chunk outlives the reply by that long
            return memoryview(data)[lo:hi]
        # a read spanning several chunks: fetch them all at once, then assemble in order
        for i in range(first + 1, last + 1):
            if i not in self.buf and i not in self.pending:
                self._start(i)
        parts = []
        for i in range(first, last + 1):
            data = await self._chunk(i)
            lo = max(off, i * cs) - i * cs
            hi = min(end, (i + 1) * cs) - i * cs
            parts.append(memoryview(data)[lo:hi])
        return b"".join(parts)

    def _schedule(self, start: int, n: int) -> None:
        nch = self.obj.nchunks
        for i in range(start, min(start + n, nch)):
            if i in self.buf or i in self.pending:
                continue
            if not self.vfs.budget.try_take(self.obj.chunk_len(i)):
                self.vfs.stats.inc("readahead_budget_full")
                return
            self.vfs.stats.inc("readahead_started")
            self._start(i, charged=True)

    def _start(self, i: int, charged: bool = False) -> None:
        """Fetch chunk i in the background into this handle's buffer."""
        if not charged:
            self.vfs.budget.take(self.obj.chunk_len(i))
        ev = trio.Event()
        self.pending[i] = ev
        self.vfs.nursery.start_soon(self._prefetch, i, ev)

    def close(self) -> None:
        self.closed = True
        self.let_go_all()

    def let_go_all(self) -> None:
        for i in list(self.buf):
            self._let_go(i)


class VFS:
    def __init__(self, cfg: Config, mounts: list[MountCtx], reader: ChunkReader, index: Index,
                 writer: IndexWriter, stats: Stats, tracer: Tracer, nursery: trio.Nursery,
                 invalidate: Callable[[int], Awaitable[None]] | None = None,
                 invalidate_entry: Callable[[int, str], None] | None = None) -> None:
        self.cfg = cfg
        self.reader = reader
        self.index = index
        self.writer = writer
        self.stats = stats
        self.tracer = tracer
        self.nursery = nursery
        self.invalidate = invalidate  # drop the kernel's pages and attributes of an inode
        self.invalidate_entry = invalidate_entry  # drop the kernel's (directory, name) entry
        self.budget = ReadaheadBudget(cfg.readahead_memory)
        self.memo = ChunkMemo(self.budget,
                              min(cfg.readahead_memory // 4, MEMO_CHUNKS * cfg.chunk_size))
        reader.store.on_drop.append(self.memo.discard)
        self.prefetch = FilePrefetcher(self, cfg.prefetch_files)
        reader.store.on_drop.append(self.prefetch.discard)
        self.nodes: dict[int, Node] = {}
        self.handles: dict[int, FileHandle] = {}
        self.open_count: dict[int, int] = {}  # inode -> open handles
        # handles that have read, the one that read last at the end (see _trim_idle)
        self._reading: OrderedDict[FileHandle, None] = OrderedDict()
        # an open directory: the node and its entries as they were at opendir
        self.dir_handles: dict[int, tuple[Node, list[tuple[str, int]]]] = {}
        self._fh = itertools.count(1)
        self._next_ino = max(index.next_ino(), ROOT_INO + 1)
        self._listing: dict[int, trio.Event] = {}
        self._slow: set[int] = set()  # directories whose relisting outlasted STALE_WAIT
        self._first_failed: dict[int, int] = {}  # directory -> errno of its failed 1st listing
        self._relist_failed: dict[int, int] = {}  # directory -> errno of its last relisting
        self._missed_at: dict[int, float] = {}  # directory -> its last listing for a missing name
        self._refreshing: dict[int, _HeadCheck] = {}  # stale node → its HEAD
        # a node a relisting moved to a new version in place → the kernel's invalidation of
        # the old one's pages, which opens wait for
        self._invalidating: dict[int, trio.Event] = {}
        # node → when its last HEAD answered (monotonic) and what (None: deleted): a
        # listing started before that must not undo it
        self._headed: dict[int, tuple[float, ObjInfo | None]] = {}
        self._head_retry_at: dict[int, float] = {}  # node → S3 failed its HEAD: not before
        self._warned: set[str] = set()
        self.started_ns = time.time_ns()  # the time directories show
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.mounts = {m.spec.name: m for m in mounts}
        if cfg.single_root:
            root = Node(ROOT_INO, ROOT_INO, "", True, mounts[0], "")
        else:
            root = Node(ROOT_INO, ROOT_INO, "", True, None, "")
            root.children = {}
            for m in mounts:
                top = self._new_node(root, m.spec.name, True, m, "")
                root.children[m.spec.name] = top.ino
            root.listed_at = float("inf")
        self.nodes[ROOT_INO] = root

    # -- inodes -----------------------------------------------------------------------

    def _ino_key(self, mount: MountCtx | None, name: str, path: str) -> bytes:
        return path_key(mount.spec.name if mount else "", path if path else "/" + name)

    def _new_node(self, parent: Node, name: str, is_dir: bool, mount: MountCtx | None,
                  path: str, known: dict[str, tuple[bytes, int | None]] | None = None) -> Node:
        if known is not None and path in known:
            key, ino = known[path]
        else:
            key = self._ino_key(mount, name, path)
            ino = self.index.get_ino(key)
        if ino is None or ino in self.nodes:
            ino = self._next_ino
            self._next_ino += 1
            self.writer.submit(Index.op_put_ino(key, ino, self._next_ino))
        node = Node(ino, parent.ino, name, is_dir, mount, path)
        self.nodes[ino] = node
        return node

    def get(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FSError(errno.ENOENT) from None

    def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, n in items:
            node = self.nodes.get(ino)
            if node is None or ino == ROOT_INO:
                continue
            node.lookups -= n
            if node.lookups <= 0 and not self._attached(node):
                self._drop_unused(ino)

    def kernel_timeout(self, node: Node) -> float:
        """How long the kernel may keep node's entry and attributes: what is left of the
        metadata TTL of the listing they came from (its directory's), at most the attribute
        timeout. The whole timeout on every answer kept an overwritten or deleted object
        visible for up to twice the TTL (an answer from a listing about to expire was
        trusted for another TTL); a directory whose relisting is late gives 0."""
        t = self.cfg.attr_timeout
        parent = self.nodes.get(node.parent)
        if parent is None or parent.mount is None or parent.children is None:
            return t  # the root, or the root of several mounts (which never changes)
        if node.ino != ROOT_INO and parent.children.get(node.name) != node.ino:
            return 0.0  # no longer its name's entry (gone, or an old version kept open)
        return max(0.0, min(t, self.cfg.metadata_ttl - (time.monotonic() - parent.listed_at)))

    def _gone(self, node: Node) -> bool:
        """A relisting of node's directory found no object or directory of its name."""
        parent = self.nodes.get(node.parent)
        return (parent is None or parent.children is not None
                and node.name not in parent.children)

    def _attached(self, node: Node) -> bool:
        """node is still its directory's entry for its name."""
        parent = self.nodes.get(node.parent)
        return (parent is not None and parent.children is not None
                and parent.children.get(node.name) == node.ino)

    def _drop_unused(self, ino: int) -> None:
        """Forget a node no longer in its directory (and its subtree) once nothing uses
        it: the kernel holds no lookup and no handle is open.  A node still in use is
        dropped when the kernel forgets it (forget above)."""
        stack = [ino]
        while stack:
            node = self.nodes.get(stack.pop())
            if (node is None or node.ino == ROOT_INO or node.lookups > 0
                    or node.ino in self.open_count):
                continue
            del self.nodes[node.ino]
            if node.children is not None:
                self.prefetch.relisted(node.ino)
            self._headed.pop(node.ino, None)
            self._head_retry_at.pop(node.ino, None)
            self._missed_at.pop(node.ino, None)
            self._first_failed.pop(node.ino, None)
            self._relist_failed.pop(node.ino, None)
            if node.children:
                stack.extend(node.children.values())

    # -- directories ------------------------------------------------------------------

    def _warn(self, key: str, why: str, under: bool = False) -> None:
        """Say once why a key (``under``: the keys under a prefix) is not shown."""
        if key not in self._warned:
            if len(self._warned) < 100_000:
                self._warned.add(key)
            self.stats.inc("skipped_keys")
            log.warning("skipping %s %r: %s", "the S3 keys under" if under else "S3 key", key,
                        why)

    async def _ensure_listed(self, d: Node, op: str = "list") -> None:
        """List d if it has no listing or its listing is older than the metadata TTL.

        A first listing is waited for; if S3 fails it, a listing kept in the index, however
        old, is used rather than EIO.  A relisting runs in the background: the caller waits
        for it at most STALE_WAIT seconds and otherwise goes on with the listing it has, and
        a failed relisting keeps the old listing for STALE_RETRY seconds, so files already
        listed (and cached) stay readable while S3 is down or slow."""
        if d.children is not None and time.monotonic() - d.listed_at < self.cfg.metadata_ttl:
            return
        ev = self._listing.get(d.ino)
        if ev is None and d.children is None:
            ev = self._listing[d.ino] = trio.Event()
            self._first_failed.pop(d.ino, None)
            try:
                await self._first_listing(d, op)
                if d.children is None:  # dropped meanwhile (gone from its parent's listing)
                    raise FSError(errno.ENOENT)
            except FSError as e:
                self._first_failed[d.ino] = e.errno  # (what its waiters answer too)
                raise
            finally:
                if self._listing.get(d.ino) is ev:
                    del self._listing[d.ino]
                ev.set()
            return
        if ev is None:
            ev = self._relisting(d, op)
        if d.children is None:  # share the first listing under way
            await ev.wait()
            if d.children is not None:
                return
            failed = self._first_failed.get(d.ino)
            if failed is None:  # its caller was cancelled (a Ctrl-C of a preload): list
                return await self._ensure_listed(d, op)  # it here (it was EIO)
            # it failed (its caller logged why): so do its waiters, with its error, rather
            # than each of them asking the failing S3 again in turn
            raise FSError(failed)
        if d.ino in self._slow:
            return  # an earlier caller already waited for this relisting
        with trio.move_on_after(STALE_WAIT) as cs:
            await ev.wait()
        if cs.cancelled_caught and not ev.is_set():
            self._slow.add(d.ino)
            log.info("listing %s takes longer than %.0f s: using the one from %.0f s ago "
                        "meanwhile", self.display_path(d), STALE_WAIT,
                        time.monotonic() - d.listed_at)

    async def _first_listing(self, d: Node, op: str) -> None:
        if await self._load_listing(d):
            return
        try:
            await self._traced_list(d, op)
        except FSError:
            if await self._load_listing(d, any_age=True):
                log.warning("using the listing of %s kept from %.0f s ago until S3 answers",
                            self.display_path(d), time.monotonic() - d.listed_at)
                self._retry_later(d)
                return
            raise

    def _relisting(self, d: Node, op: str = "list") -> trio.Event:
        """The relisting of d under way, or one started now: its end."""
        ev = self._listing.get(d.ino)
        if ev is None:
            ev = self._listing[d.ino] = trio.Event()
            self.nursery.start_soon(self._relist, d, ev, op)
        return ev

    async def _relist(self, d: Node, ev: trio.Event, op: str) -> None:
        try:
            await self._traced_list(d, op, own=True)
            self._relist_failed.pop(d.ino, None)
        except FSError as e:  # _list logged why
            self._relist_failed[d.ino] = e.errno
            log.warning("using the listing of %s from %.0f s ago until S3 answers",
                        self.display_path(d), time.monotonic() - d.listed_at)
            self._retry_later(d)
        except Exception:  # a bug: never the end of the daemon for a background relisting
            log.exception("relisting %s failed", self.display_path(d))
            self._retry_later(d)
        finally:
            if self._listing.get(d.ino) is ev:
                del self._listing[d.ino]
            self._slow.discard(d.ino)
            ev.set()

    def _retry_later(self, d: Node) -> None:
        self.stats.inc("dir_listings_stale")
        # (a listing still within its TTL, relisted early for a missing name, keeps its age)
        d.listed_at = max(d.listed_at, time.monotonic() - self.cfg.metadata_ttl
                          + min(STALE_RETRY, self.cfg.metadata_ttl))

    async def _traced_list(self, d: Node, op: str, own: bool = False) -> None:
        """own: a trace of its own even inside a traced request (a background relisting
        outlives the request that started it)."""
        if own or current() is None:  # a FUSE lookup/opendir that reaches S3: its own trace
            with self.tracer.start(op, ino=d.ino, path=self.display_path(d)):
                await self._list(d)
        else:
            await self._list(d)

    async def _list(self, d: Node) -> None:
        m = d.mount
        assert m is not None
        prefix = m.spec.prefix + d.path
        asked, asked_at = time.monotonic(), time.time()
        try:
            listing = await m.store.list_dir(prefix)
        except S3Error as e:
            log.warning("listing s3://%s/%s failed: %s", m.spec.bucket, prefix, e)
            raise FSError(_errno_of(e)) from None
        if listing.asked is not None:  # it went on from the pages of an earlier attempt
            asked, asked_at = listing.asked, listing.asked_at or asked_at
        self.stats.inc("dir_listings")
        known = await self._known_inos(d, prefix, listing)
        if self.nodes.get(d.ino) is not d:
            return  # dropped meanwhile (gone from its parent's listing, and forgotten)
        save = await self._apply_listing(d, prefix, listing, known, asked)
        if listing.asked is not None and d.children is not None:
            # its first pages are as old as an earlier attempt: so is the listing (its
            # entries were trusted for a whole TTL from its end)
            d.listed_at = min(d.listed_at, asked)
        if not save:
            return  # a HEAD answered meanwhile: this listing is older than what we show

        def encode() -> bytes:  # a large directory's JSON takes long: not on the trio thread
            # (as old as its request: a LIST that took longer than the TTL was fresh after a
            # restart when stamped at its end)
            return json.dumps({"t": asked_at, "p": listing.prefixes,
                               "o": [[o.key, o.size, o.etag, o.mtime] for o in listing.objects]},
                              separators=(",", ":")).encode()

        blob = await trio.to_thread.run_sync(encode)
        if self._headed_since(d, asked):
            return  # a HEAD answered while it was encoded: not S3's latest any more
        self.writer.submit(Index.op_put_listing(self._listing_key(d), blob))

    def _headed_since(self, d: Node, asked: float) -> list[tuple[Node, ObjInfo | None]]:
        """The files of d whose HEAD S3 answered after ``asked`` (monotonic), and what it
        said (None: deleted)."""
        out = []
        for ino, (t, info) in self._headed.items():
            node = self.nodes.get(ino)
            if t > asked and node is not None and node.parent == d.ino:
                out.append((node, info))
        return out

    def _listing_key(self, d: Node) -> bytes:
        """The listing's key names what was listed (endpoint, bucket, prefix), not only
        where it shows: a cache dir mounted again with another source under the same
        name (a single-bucket mount's is always "") must not be shown the old tree."""
        assert d.mount is not None
        spec = d.mount.spec
        return path_key(spec.name, f"listing:{spec.endpoint_url or ''}\0{spec.bucket}/"
                                   f"{spec.prefix}{d.path}")

    async def _load_listing(self, d: Node, any_age: bool = False) -> bool:
        """Use the listing kept in the index if it is younger than the metadata TTL (or of
        any age: S3 cannot list it now)."""
        key = self._listing_key(d)

        def load() -> tuple[Listing, float] | object | None:
            blob = self.index.get_listing(key)
            if blob is None:
                return None
            try:
                doc = json.loads(blob)
                age = time.time() - float(doc["t"])
                if not any_age and not 0 <= age < self.cfg.metadata_ttl:
                    return None
                return Listing([str(p) for p in doc["p"]],
                               [ObjInfo(str(k), int(size), str(etag), float(mtime))
                                for k, size, etag, mtime in doc["o"]]), age
            except (ValueError, KeyError, TypeError, AttributeError):
                return UNREADABLE

        got = await trio.to_thread.run_sync(load)
        if got is UNREADABLE:
            # (a record of another form): every lookup in the directory was EIO, for good,
            # as S3 was never asked instead
            log.warning("the listing of %s kept in the index is unreadable: listing it "
                        "from S3", self.display_path(d))
            self.writer.submit(Index.op_delete_listing(key))
            return False
        if got is None or self.nodes.get(d.ino) is not d:
            return False
        listing, age = got
        assert d.mount is not None
        prefix = d.mount.spec.prefix + d.path
        await self._apply_listing(d, prefix, listing, await self._known_inos(d, prefix, listing),
                                  time.monotonic() - age)
        d.listed_at = time.monotonic() - age
        self.stats.inc("dir_listings_from_index")
        return True

    async def _known_inos(self, d: Node, prefix: str,
                          listing: Listing) -> dict[str, tuple[bytes, int | None]]:
        """path → (inode key, persisted inode number or None) for the entries new to us,
        all in one worker thread: hashing the names of a million-entry directory took
        2 s of the trio thread, every other request waiting."""
        old = d.children or {}  # replaced whole by a listing, never while this one runs
        mount, n = d.mount, len(prefix)

        def work() -> dict[str, tuple[bytes, int | None]]:
            paths = [d.path + p[n:-1] + "/" for p in listing.prefixes if p[n:-1] not in old]
            paths += [d.path + o.key[n:] for o in listing.objects if o.key[n:] not in old]
            if not paths:
                return {}
            keys = [self._ino_key(mount, "", p) for p in paths]
            inos = self.index.get_inos(keys)
            return {p: (k, inos.get(k)) for p, k in zip(paths, keys, strict=True)}

        return await trio.to_thread.run_sync(work)

    async def _apply_listing(self, d: Node, prefix: str, listing: Listing,
                             known: dict[str, tuple[bytes, int | None]], asked: float) -> bool:
        """Make ``listing`` (asked of S3 at monotonic time ``asked``) the directory's
        entries.  The old entries stay the directory's until the end (lookups in it see
        either listing, never half of one); a large listing yields to other requests every
        ``APPLY_SLICE`` entries (a million names took 1.6 s to apply again, 4 s the first
        time, all other reads waiting).  An object whose HEAD answered after ``asked``
        keeps what the HEAD said (its new version, or gone): False then, the listing is
        not S3's latest and is not to be saved."""
        old = d.children or {}
        new: dict[str, int] = {}
        try:
            if not await self._apply_entries(d, prefix, listing, known, asked, old, new):
                self._drop_made(d, old, new)
                return False
        except BaseException:  # cancelled (the control request of a preload, Ctrl-C):
            self._drop_made(d, old, new)  # the nodes made so far belonged to no directory
            raise
        answered = self._headed_since(d, asked)  # (some answered during the slices above)
        for node, info in answered:
            if info is None:
                if new.get(node.name) == node.ino:
                    del new[node.name]
            elif node.name not in new:  # not yet in this listing: S3 said it is there
                new[node.name] = node.ino
        # the same names and inodes: the same dict, so what was built from it (its sorted
        # entries, the file prefetcher's order of it) stays; rebuilding took 0.36 s of the
        # trio thread for a million names, once per metadata TTL
        d.children = old if new == old else new
        d.listed_at = time.monotonic()  # (with what HEADs said since: as new as the LIST)
        if d.children is old:  # the same names and inodes: nothing is gone
            return not answered
        self.prefetch.relisted(d.ino)  # (its run's order of the old listing goes now)
        # what is gone, in slices (about 0.15 s of the trio thread for a million names),
        # to its end even when cancelled: a node left out was never dropped
        with trio.CancelScope(shield=True):
            await trio.lowlevel.checkpoint()
            kept = set(new.values())
            # (a listing's dict is never changed once made, only replaced whole: iterating
            # it across checkpoints is safe)
            for n, (name, ino) in enumerate(old.items(), 1):
                if n % APPLY_SLICE == 0:
                    await trio.lowlevel.checkpoint()
                if ino not in kept:  # gone from S3 (or now a directory instead of a file)
                    gone = self.nodes.get(ino)
                    if (gone is not None and gone.lookups > 0
                            and self.invalidate_entry is not None):
                        # the kernel's entry would show it (stat) for its own timeout, and
                        # an open of it would fail with EIO (S3's 404), not ENOENT
                        self.invalidate_entry(d.ino, name)
                    if gone is not None and gone.is_dir:
                        self._forget_saved_listings(gone)
                    self._drop_unused(ino)
        return not answered

    def _forget_saved_listings(self, d: Node) -> None:
        """d is gone from S3: the listings kept in the index of it and of the directories
        under it that are known go too. A prefix that came back within the TTL was shown
        with its old names (and a file put back under one of them with its old ETag), and
        the index kept every gone directory's listing for good (date-named prefixes)."""
        stack = [d]
        while stack:
            node = stack.pop()
            self._forget_saved_listing(node)
            for ino in (node.children or {}).values():
                if (n := self.nodes.get(ino)) is not None and n.is_dir:
                    stack.append(n)

    def _drop_made(self, d: Node, old: dict[str, int], new: dict[str, int]) -> None:
        """An apply given up: the nodes it made (in ``new``, not in ``old``) go."""
        had = set(old.values())
        for ino in new.values():
            if ino not in had and (n := self.nodes.get(ino)) is not None and n.parent == d.ino:
                self._drop_unused(ino)

    async def _apply_entries(self, d: Node, prefix: str, listing: Listing,
                             known: dict[str, tuple[bytes, int | None]], asked: float,
                             old: dict[str, int], new: dict[str, int]) -> bool:
        """The listing's entries into ``new``, nodes made for new names; False when the
        directory was dropped meanwhile (its nodes would belong to nobody, for good)."""
        m = d.mount
        assert m is not None
        if self.nodes.get(d.ino) is not d:
            return False
        for n, p in enumerate(listing.prefixes, 1):
            if n % APPLY_SLICE == 0:
                await trio.lowlevel.checkpoint()
                if self.nodes.get(d.ino) is not d:
                    return False
            name = p[len(prefix):-1]
            if name in new:
                continue  # listed twice (a store that repeats a page's last entry)
            if not valid_name(name):
                self._warn(p, "an empty path segment (a key starting with '/', or '//' in "
                           "it) is not a directory name" if not name
                           else "not a valid directory name", under=True)
                continue
            ino = old.get(name)
            node = self.nodes.get(ino) if ino else None
            if node is None or not node.is_dir:
                node = self._new_node(d, name, True, m, d.path + name + "/", known)
            new[name] = node.ino
        for n, o in enumerate(listing.objects, 1):
            if n % APPLY_SLICE == 0:
                await trio.lowlevel.checkpoint()
                if self.nodes.get(d.ino) is not d:
                    return False
            name = o.key[len(prefix):]
            if name == "":
                continue  # a "directory marker" object: the directory itself
            if name in new:
                if not self.nodes[new[name]].is_dir:
                    continue  # listed twice: a second node leaked the first for good
                # both an object and a prefix: the directory wins
                self._warn(o.key, f"hidden by the directory {name!r} (keys start with "
                                  f"{o.key + '/'!r})")
                continue
            if not valid_name(name):
                self._warn(o.key, "not a valid file name")
                continue
            ino = old.get(name)
            node = self.nodes.get(ino) if ino else None
            if (self._headed and node is not None
                    and (headed := self._headed.get(node.ino)) is not None):
                if headed[0] > asked:  # its HEAD answered after this LIST was asked: the
                    continue  # node stays as the HEAD left it, and is placed below
                del self._headed[node.ino]  # this listing is newer than that answer
            if node is None or node.is_dir:
                node = self._new_node(d, name, False, m, d.path + name, known)
            elif node.etag and node.etag != o.etag:
                log.info("s3://%s/%s changed (ETag %s → %s)", m.spec.bucket, o.key, node.etag,
                         o.etag)
                self.stats.inc("objects_changed")
                if (node.ino in self.open_count and not node.stale
                        and self.invalidate_entry is not None):
                    # open handles read the old version: they keep its inode (and the
                    # kernel's size of it, or their reads past a shorter new version would
                    # end early without an error); the name gets a new inode.  (Once a
                    # read met the change, the next open of this inode updates it in place
                    # and reads the new version: see open.)  The kernel's entry for the
                    # name is dropped below, with every name whose inode this listing
                    # changed, once the directory answers with the new one.
                    node = self._new_node(d, name, False, m, d.path + name, known)
                elif self.invalidate is not None and node.ino not in self._invalidating:
                    # an open before the kernel has let go of the old version's pages
                    # would read them among the new version's bytes: opens wait for it
                    ev = self._invalidating[node.ino] = trio.Event()
                    self.nursery.start_soon(self._invalidate_old, node.ino, ev)
            node.size, node.etag, node.mtime = o.size, o.etag, o.mtime
            new[name] = node.ino
        # a version a read found replaced (put back since: a rollback) reads again
        self.reader.listed(m.spec.bucket, prefix, asked,
                           lambda name: (n := self.nodes.get(new.get(name, 0))) and n.etag)
        return True

    async def lookup(self, parent_ino: int, name: str, *, count: bool = True) -> Node:
        parent = self.get(parent_ino)
        if not parent.is_dir:
            raise FSError(errno.ENOTDIR)
        if name == ".":
            node = parent
        elif name == "..":
            node = self.get(parent.parent)
        else:
            if parent.mount is not None:
                await self._ensure_listed(parent, "lookup")
            assert parent.children is not None
            ino = parent.children.get(name)
            if ino is None and parent.mount is not None and await self._relisted_for(parent):
                ino = parent.children.get(name)
            if ino is None:
                raise FSError(errno.ENOENT)
            node = self.get(ino)
        if count:
            node.lookups += 1
        return node

    async def opendir(self, ino: int) -> int:
        d = self.get(ino)
        if not d.is_dir:
            raise FSError(errno.ENOTDIR)
        if d.mount is not None:
            await self._ensure_listed(d, "opendir")
        assert d.children is not None
        fh = next(self._fh)
        self.dir_handles[fh] = (d, d.entries())
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[str, Node, int]]:
        """The handle's entries from offset ``start`` on, one at a time: "." (offset 1),
        ".." (2), then the names (3 on).  The kernel takes what fits in its buffer (a few
        hundred) and asks again from there, so building the whole rest on every call made
        listing a directory quadratic (200k names: 7.7 s of the trio thread, a million:
        minutes, every other request waiting)."""
        h = self.dir_handles.get(fh)
        if h is None:
            raise FSError(errno.EBADF)
        return self._entries_from(*h, start)

    def _entries_from(self, d: Node, entries: list[tuple[str, int]],
                      start: int) -> Iterator[tuple[str, Node, int]]:
        nodes = self.nodes
        if start < 1:
            yield ".", d, 1
        if start < 2:
            yield "..", nodes.get(d.parent, d), 2
        for i in range(max(start - 2, 0), len(entries)):
            name, ino = entries[i]
            # the names as they were at opendir, each as the directory has it now: a
            # relisting during a long readdir took a deleted name back into the kernel
            # (stat showed it for the TTL) and a changed one back to its old version
            children = d.children
            if children is not None:
                ino = children.get(name)
                if ino is None:
                    continue
            node = nodes.get(ino)
            if node is not None:
                yield name, node, i + 3

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    def object_key(self, path: str) -> tuple[MountCtx, str] | None:
        """The mount and S3 key that a path relative to the mount root names, whether S3
        has that object or not (None: the root of several mounts, or no such mount)."""
        parts = [p for p in path.split("/") if p and p != "."]
        if self.cfg.single_root:
            m = self.nodes[ROOT_INO].mount
        else:
            if not parts:
                return None
            m = self.mounts.get(parts.pop(0))
        if m is None:
            return None
        return m, m.spec.prefix + "/".join(parts)

    async def resolve(self, path: str, refreshed: set[int] | None = None) -> Node:
        """Walk a path relative to the mount root (for the control API).  ``refreshed``:
        a name the listing of its directory lacks is looked up again in a new listing of
        that directory, once per directory in that set (a data set uploaded moments ago
        is not "no such file" for the metadata TTL)."""
        node = self.nodes[ROOT_INO]
        for part in [p for p in path.split("/") if p]:
            t0 = time.monotonic()
            try:
                node = await self.lookup(node.ino, part, count=False)
            except FSError as e:
                if (refreshed is None or e.errno != errno.ENOENT or node.ino in refreshed
                        or node.mount is None or node.children is None):
                    raise
                if (self._missed_at.get(node.ino, -math.inf) >= t0
                        and node.ino not in self._listing):
                    # the lookup had it listed anew, asked after t0, and that has ended
                    refreshed.add(node.ino)
                    raise
                refreshed.add(node.ino)
                await self._relist_now(node)
                node = await self.lookup(node.ino, part, count=False)
        return node

    async def _relisted_for(self, d: Node) -> bool:
        """A lookup of a name d's listing lacks: d is listed again if its listing is older
        than ``[metadata] negative_ttl`` (10 s) and holds at most MISS_RELIST_MAX entries,
        and the lookup waits for that at most STALE_WAIT. True when a new listing came in
        time. A file uploaded after its directory was listed was "no such file" for the
        metadata TTL (5 minutes) to every program that opened it by name; at most one
        listing per directory per negative_ttl (a relisting that fails counts) bounds what
        programs probing for names that do not exist cost."""
        assert d.children is not None
        now = time.monotonic()
        if (now - max(d.listed_at, self._missed_at.get(d.ino, -math.inf))
                < self.cfg.negative_ttl or len(d.children) > MISS_RELIST_MAX
                or d.ino in self._slow):  # (a relisting known to be slow: not waited again)
            return False
        ev = self._listing.get(d.ino)
        if ev is None:
            ev = self._listing[d.ino] = trio.Event()
            self._missed_at[d.ino] = now  # (a relisting that fails counts too)
            self.stats.inc("dir_listings_for_missing_names")
            self.nursery.start_soon(self._relist, d, ev, "lookup")
        with trio.move_on_after(STALE_WAIT):
            await ev.wait()
        if not ev.is_set():
            self._slow.add(d.ino)
        return ev.is_set()

    async def _relist_now(self, d: Node) -> None:
        """List ``d`` anew and wait for it (however long it takes; a failure keeps the
        listing it has). A listing under way may have been asked before what the caller
        looks for was written: it is waited for, then another one is asked."""
        while (ev := self._listing.get(d.ino)) is not None:
            await ev.wait()
        await self._relisting(d).wait()

    async def _listed_fresh(self, d: Node) -> None:
        """d listed within the metadata TTL, however long its relisting takes (a lookup
        waits STALE_WAIT, then goes on with the listing it has); FSError when S3 fails it.
        For the data-set commands: a `preload` of a directory walked its old listing and
        left out the files uploaded since, with success."""
        while d.children is None or time.monotonic() - d.listed_at >= self.cfg.metadata_ttl:
            if self.nodes.get(d.ino) is not d:  # dropped (gone from its parent's listing)
                raise FSError(errno.ENOENT)
            if d.children is None:
                await self._ensure_listed(d)
                continue
            await self._relisting(d).wait()
            if (failed := self._relist_failed.get(d.ino)) is not None:
                raise FSError(failed)

    async def walk_files(self, node: Node, fresh: bool = False) -> list[Node]:
        """Every file at or below node, in the order of a sorted ``find`` (each directory's
        names in order, a subdirectory's files in its place), listed as needed (``fresh``:
        each listing younger than the metadata TTL, see _listed_fresh)."""
        if not node.is_dir:
            return [node]
        out: list[Node] = []

        async def entries(d: Node) -> Iterator[tuple[str, int]]:
            if d.mount is not None:
                await (self._listed_fresh(d) if fresh else self._ensure_listed(d))
            # (the listing's sorted entries, shared with opendir and the prefetcher: each
            # directory was sorted again here, 0.18 s for a tree of a million files)
            return iter(d.entries())

        stack = [await entries(node)]
        seen = 0
        while stack:
            for _, ino in stack[-1]:
                seen += 1
                if seen % WALK_YIELD == 0:  # (a listed tree is walked with no other await)
                    await trio.lowlevel.checkpoint()
                n = self.nodes.get(ino)
                if n is None:
                    continue
                if n.is_dir:
                    stack.append(await entries(n))  # its files before the next name here
                    break
                out.append(n)
            else:
                stack.pop()
        return out

    def version(self, node: Node) -> ObjectVersion:
        m = node.mount
        assert m is not None and not node.is_dir
        return ObjectVersion(m.spec.name, m.spec.bucket, node.key, node.etag, node.size,
                             self.cfg.chunk_size, m.store)

    # -- files ------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, pid: int = 0) -> int:
        """A handle on the node's current version; ``pid``: the opener's, which the traces
        of the handle's reads carry (pyfuse3 gives read() no request context)."""
        node = self.get(ino)
        if node.is_dir:
            raise FSError(errno.EISDIR)
        # O_APPEND only moves writes: a read-only open with it reads, as on any read-only
        # file system (O_TRUNC would write; the kernel refuses it on a ro mount already)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FSError(errno.EROFS)
        if node.mount is not None and self._gone(node):
            raise FSError(errno.ENOENT)  # (through an entry the kernel had before a relisting)
        if node.stale:  # a read found the object changed: see its new version, not EIO
            await self.refresh(node)
        if (ev := self._invalidating.get(ino)) is not None:
            await ev.wait()  # the old version's pages are gone from the kernel then
        fh = next(self._fh)
        h = self.handles[fh] = FileHandle(self, node, self.version(node), pid)
        self.open_count[node.ino] = self.open_count.get(node.ino, 0) + 1
        self.prefetch.opened(node, h)
        return fh

    async def _invalidate_old(self, ino: int, ev: trio.Event) -> None:
        try:
            assert self.invalidate is not None
            await self.invalidate(ino)
        finally:
            del self._invalidating[ino]
            ev.set()

    async def refresh(self, node: Node) -> None:
        """A read met a newer version of the node's object than its listing has. Ask S3
        for that object alone (one HEAD, however large its directory: a relisting that
        outlasted STALE_WAIT left the open on the old version, and each open failed again
        until it ended) and take its size, ETag and mtime. One HEAD per node at a time,
        which every open of it shares; an open waits for it at most HEAD_WAIT, not for
        its whole retry budget (minutes, S3 being down), then goes on with the listed
        version; the HEAD goes on in the background and a later open gets its answer."""
        retry_at = self._head_retry_at.get(node.ino)
        if retry_at is not None:
            if time.monotonic() < retry_at:
                return  # S3 failed its last HEAD: the listed version until STALE_RETRY
            del self._head_retry_at[node.ino]
        check = self._refreshing.get(node.ino)
        if check is None:
            check = self._refreshing[node.ino] = _HeadCheck()
            self.nursery.start_soon(self._head, node, check)
        # an open before us waited HEAD_WAIT in vain: no wait, unless S3 has answered since
        for _ in range(2):
            if check.slow and not check.answered:
                break
            with trio.move_on_after(HEAD_WAIT) as cs:
                await check.done.wait()
            if not cs.cancelled_caught:
                break
            check.slow = True
        if check.gone:
            raise FSError(errno.ENOENT)

    async def _head(self, node: Node, check: _HeadCheck) -> None:
        m = node.mount
        assert m is not None
        try:
            info = await m.store.head(node.key)
        except NoSuchObject:
            log.info("%s was deleted from S3", self.display_path(node))
            check.answered = check.gone = True  # (the node stays stale: opens ask again
            if self.nodes.get(node.ino) is node:  # until relisted)
                self._headed[node.ino] = (time.monotonic(), None)
            parent = self.nodes.get(node.parent)
            if parent is not None:
                parent.listed_at = 0.0  # its next lookup lists it again
                self._forget_saved_listing(parent)
                if self.invalidate_entry is not None:
                    self.invalidate_entry(parent.ino, node.name)
        except S3Error as e:  # S3 down: what is cached of the listed version stays readable
            log.warning("open of %s: cannot ask S3 for its new version (%s); asking again "
                        "in %.0f s", self.display_path(node), e, STALE_RETRY)
            if self.nodes.get(node.ino) is node:
                self._head_retry_at[node.ino] = time.monotonic() + STALE_RETRY
        except Exception:  # a bug: never the end of the daemon for a background HEAD
            log.exception("asking S3 for the version of %s failed", self.display_path(node))
        else:
            if info.etag != node.etag:
                log.info("s3://%s/%s changed (ETag %s → %s)", m.spec.bucket, node.key,
                         node.etag, info.etag)
                self.stats.inc("objects_changed")
                check.answered = True
                node.size, node.etag, node.mtime = info.size, info.etag, info.mtime
                if self.nodes.get(node.ino) is node:
                    self._headed[node.ino] = (time.monotonic(), info)
                parent = self.nodes.get(node.parent)
                if parent is not None:
                    self._forget_saved_listing(parent)
                if self.invalidate is not None:
                    # before the opens waiting for this go on: the kernel must not read on
                    # with the old version's size and pages
                    await self.invalidate(node.ino)
            # the version S3 has now (the listed one put back, or one put back since a
            # read found it replaced) is read again
            self.reader.version_current(m.spec.bucket, node.key, info.etag)
            node.stale = False
        finally:
            if self._refreshing.get(node.ino) is check:
                del self._refreshing[node.ino]
            check.done.set()

    def _forget_saved_listing(self, d: Node) -> None:
        """The listing of d kept in the index names a version S3 no longer has: a restart
        within the TTL would take it up again (and fail the reads of that object once
        more), so it lists d from S3 instead."""
        if d.mount is not None:
            self.writer.submit(Index.op_delete_listing(self._listing_key(d)))

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        h = self.handles.get(fh)
        if h is None:
            raise FSError(errno.EBADF)
        if h.obj.etag != h.node.etag:
            # A read met a change, then an open moved the node to the new version in place
            # (the kernel opens the inode it has). This handle's version is gone from S3,
            # and what it read of it would go into the pages the new handles read.
            self.stats.inc("read_errors")
            self.stats.observe("fuse_read", 0.0)  # (every read is in the histogram)
            raise FSError(errno.EIO)
        if h.cur_chunk < 0:  # its first read: the page cache did not serve it
            self.prefetch.reached(h)
        t0 = time.perf_counter()
        h.last_read = trio.current_time()
        self._reading.pop(h, None)
        self._reading[h] = None  # (the most recent last)
        tr = self.tracer
        if tr.quick and (got := h.take_buffered(off, size)) is not None:
            data, i, n = got
            t1 = time.perf_counter()
            if not tr.quick_read(fh, t0, t1, off, size, i):
                tr.quick_read_new(fh, t0, t1, off, size, i, n, h.node.ino,
                                  self.display_path(h.node), h.pid)
            self.stats.observe("fuse_read", t1 - t0)
        else:
            tr.end_quick(fh)
            data = await self._read_traced(h, off, size, t0)
        self.stats.inc("fuse_read_bytes", len(data))
        if self.budget.used > self.budget.limit:
            self._trim_idle()
        return data

    async def _read_traced(self, h: FileHandle, off: int, size: int,
                           t0: float) -> bytes | memoryview:
        """A read that needs more than the chunk its handle holds, in a trace of its own."""
        with self.tracer.start("read", ino=h.node.ino, path=self.display_path(h.node),
                               offset=off, size=size, pid=h.pid):
            try:
                return await h.read(off, size)
            except (ObjectChanged, NoSuchObject) as e:
                self.stats.inc("read_errors")
                log.warning("read of %s failed: the object %s in S3 while open",
                            self.display_path(h.node),
                            "was deleted" if isinstance(e, NoSuchObject) else "changed")
                if h.obj.etag == h.node.etag:  # our listing is behind: the next open relists
                    h.node.stale = True
                raise FSError(errno.EIO) from None
            except S3Error as e:
                self.stats.inc("read_errors")
                log.warning("read of %s failed: %s", self.display_path(h.node), e)
                raise FSError(_errno_of(e)) from None
            finally:  # failed reads too: in an outage they are the slowest ones
                self.stats.observe("fuse_read", time.perf_counter() - t0)

    def _trim_idle(self) -> None:
        """The read-ahead budget is spent: handles that have not read for IDLE_HANDLE give
        back the chunks they keep, oldest first.  A handle keeps the chunk it reads in (and
        its read-ahead) between reads, and files held open and left (a loader's open
        shards, HDF5 files) kept one chunk each, 8 MiB per open file, without a bound."""
        idle_since = trio.current_time() - IDLE_HANDLE
        for h in list(self._reading):
            if h.last_read > idle_since or self.budget.used <= self.budget.limit:
                return
            if h.pending:  # its read-ahead is still on its way: the next trim
                continue
            del self._reading[h]
            if h.buf:
                self.stats.inc("idle_handle_chunks_released", len(h.buf))
                h.let_go_all()

    def release(self, fh: int) -> None:
        self.tracer.end_quick(fh)
        h = self.handles.pop(fh, None)
        if h is not None:
            self._reading.pop(h, None)
            h.close()
            ino = h.node.ino
            left = self.open_count.pop(ino, 1) - 1
            if left:
                self.open_count[ino] = left
            else:
                self.memo.closed(ino)
                if h.node.lookups <= 0 and not self._attached(h.node):
                    self._drop_unused(ino)  # the kernel forgot it while it was open
            self.prefetch.closed(h)

    def display_path(self, node: Node) -> str:
        if node.mount is None:
            return "/"
        return self.display(node.mount, node.path)

    def display(self, m: MountCtx, path: str) -> str:
        """How the mount shows ``path`` (relative to the mount's prefix) of mount m."""
        if self.cfg.single_root:
            return "/" + path
        return "/" + m.spec.name + "/" + path
