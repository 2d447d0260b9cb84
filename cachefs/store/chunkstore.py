"""Local SSD chunk store: checksummed chunk files, space accounting, LRU eviction.

Layout under <cache-dir>:
  chunks/<2 hex>/<32 hex>   one file per chunk; the name is the chunk id (a hash):
                            no S3 key ever becomes part of a path
  tmp/                      files being written; emptied at start

A chunk file is a 64-byte header then the data:
  magic "CFSCHK1\\0" | chunk id (16) | length (u64) | xxh3-128(chunk id + data) (16) | 16 zero
The checksum covers the chunk id, so a file swapped with another chunk's file
fails verification just like a bit flip, a truncation or a zero fill.

Write protocol (invariant: a chunk is in the index only once its file is complete):
  reserve space → write tmp file → rename into chunks/ → index commit → account
The file is written with O_DIRECT from a ChunkBuf, memory laid out like the file
(header then data, 4 KiB aligned and padded; the padding is cut off by ftruncate):
a chunk file does not pass through the page cache, so writing it costs no copy and
no writeback later (on a cold read of 4 GiB: daemon system CPU 17–18 s → 6.5–7 s).
Chunk files are read back the same way, with O_DIRECT into a ChunkBuf.
Where the file system refuses O_DIRECT (ramfs; tmpfs before Linux 6.6), reads and
writes fall back to buffered ones.
A crash before the rename leaves a tmp file (deleted at start); after the rename
but before the commit, an orphan file that start-up verifies and adopts (or
deletes if it fails verification).

Space: ``used`` counts indexed chunks, ``reserved`` counts writes in flight, both as
the disk holds them: header and data rounded up to whole 4 KiB blocks (``file_size``),
so a cache of small objects stays within its limit on disk too.
``reserve`` evicts synchronously until used + reserved + size <= limit, so use
never exceeds the limit, however many readers write at once.  A background
evictor keeps use between the low and high watermarks.  Pinned chunks are never
evicted; when only pinned data is left, the new chunk is served without caching.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import math
import mmap
import os
import shutil
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import lmdb
import trio
import xxhash

from ..errors import QuietError
from ..faults import DISK_DELAY, crash_point
from ..index import ChunkRec, Index, IndexCommitError, IndexWriter
from ..index_check import DAMAGE_ERRORS
from ..stats import Stats
from ..trace import span

log = logging.getLogger("cachefs.store")

MAGIC = b"CFSCHK1\0"
HEADER = struct.Struct("<8s16sQ16s16x")
HEADER_SIZE = HEADER.size  # 64


ALIGN = 4096  # O_DIRECT alignment of memory, file offsets and lengths


def file_size(length: int) -> int:
    """Bytes of memory (and of O_DIRECT I/O) for a chunk of ``length`` bytes; also what
    its file takes on disk (whole 4 KiB blocks), which is what the cache limit counts."""
    return -(-(HEADER_SIZE + length) // ALIGN) * ALIGN


class BufferPool:
    """Memory for full-size chunks, used again once nothing refers to it.

    A new 8 MiB bytearray is zeroed by Python and faulted in page by page by the kernel
    before the read or GET overwrites it: on warm sequential reads that was a fifth of
    the worker threads' time.  The pool keeps up to ``keep`` page-aligned anonymous
    mappings of ``size`` bytes and hands out one that no view refers to any more: every
    view of it (the chunk's buffer, the read-only views readers hold, pyfuse3's reply
    while it is written) keeps a reference to the mapping, so its reference count says
    whether it is free.  At most ``idle`` free mappings are kept; more are let go, so
    a burst of readers leaves at most ``idle`` × ``size`` bytes behind.  Thread-safe:
    chunks are read in worker threads and fetched from S3 on the trio thread."""

    def __init__(self, size: int, keep: int = 32, idle: int = 4) -> None:
        self.size = size
        self.keep = keep
        self.idle = idle
        self._maps: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.reused = 0
        self.created = 0

    def take(self) -> memoryview:
        with self._lock:
            maps = self._maps
            found = None
            free = []
            for i in range(len(maps)):  # (enumerate's tuple would hold one more reference)
                m = maps[i]
                # references: the list, this variable and the argument
                if sys.getrefcount(m) == 3:
                    if found is None:
                        found = m
                    else:
                        free.append(i)
            for i in reversed(free[self.idle:]):
                del maps[i]
            m = None
            if found is not None:
                self.reused += 1
                return memoryview(found)  # referenced before the lock is let go
            m = mmap.mmap(-1, self.size)
            self.created += 1
            if len(maps) < self.keep:
                maps.append(m)
            return memoryview(m)

    def statistics(self) -> dict:
        return {"size": self.size, "held": len(self._maps), "idle_max": self.idle,
                "reused": self.reused, "created": self.created}


class ChunkBuf:
    """Memory for one chunk, laid out like its file: ``file`` is the header's 64 bytes
    then the data, at a 4 KiB-aligned address and padded to 4 KiB, so the whole file
    goes to disk in one O_DIRECT write straight from it.  ``data`` is the chunk's part;
    an S3 GET streams its body into it, and readers are handed a read-only view of it
    (the memory lives as long as any view does).  A full-size chunk's memory comes from
    the store's BufferPool (``ChunkStore.new_buf``)."""

    __slots__ = ("file", "data", "length")

    def __init__(self, length: int, pool: BufferPool | None = None) -> None:
        size = file_size(length)
        if pool is not None and pool.size == size:
            self.file = pool.take()
        else:
            raw = bytearray(size + ALIGN)
            off = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % ALIGN
            self.file = memoryview(raw)[off:off + size]  # pins raw: it can no longer move
        self.data = self.file[HEADER_SIZE:HEADER_SIZE + length]
        self.length = length

    @classmethod
    def of(cls, data: bytes | memoryview) -> ChunkBuf:
        buf = cls(len(data))
        buf.data[:] = data
        return buf


# errors reading a chunk file that are the process's own (out of descriptors or memory,
# interrupted) and say nothing about the file, which is kept; any other error makes the
# file bad (dropped, fetched again and written anew)
_TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN,
                               errno.EINTR})


def _read_error(cid: bytes, e: OSError) -> str:
    log.warning("chunk %s: read error %s", cid.hex(), e)
    return "error" if e.errno in _TRANSIENT_ERRNOS else "corrupt"


def checksum(cid: bytes, data: bytes | memoryview) -> bytes:
    h = xxhash.xxh3_128()
    h.update(cid)
    h.update(data)
    return h.digest()


def _write_loop(fd: int, mv: memoryview) -> None:
    while mv:
        mv = mv[os.write(fd, mv):]


DISK_FULL_SHARE = 0.95  # on ENOSPC, the limit becomes this share of the chunks held
# a limit lowered by a full disk is raised again, at most once per this many seconds, when
# the disk has room for at least RAISE_CHUNKS more chunks (another program freed space)
DISK_RECHECK = 1.0
TOUCH_EVERY = 1.0  # seconds between two writes of access times to the index
RAISE_CHUNKS = 4


REFUSED_KEPT = 4096  # chunk ids whose last store failed, remembered (see was_refused)

def _discard(p: Path) -> None:
    """Remove what start-up does not know in tmp/ or chunks/: a file, a link (not what it
    points at), or a directory and all in it (one made there by hand failed every start
    with IsADirectoryError)."""
    if p.is_dir() and not p.is_symlink():
        log.warning("removing the directory %s: cachefs made no such thing in its cache "
                    "dir", p)
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


_SUBDIRS = frozenset(f"{i:02x}" for i in range(256))  # chunks/00 … chunks/ff
ADOPT_BATCH = 4096  # chunk files verified and adopted at start-up, per index commit
REPIN = b"repin_adopted"  # index meta key: adopted chunk files not yet looked at for pins
START_ROOM = 64 << 20  # free space start-up makes for the index (at most 5% of the disk)


def _mtime(f: Path, now: float) -> float:
    try:
        return min(now, f.stat().st_mtime)
    except OSError:
        return now


def make_room(cache_dir: Path) -> tuple[int, int]:
    """Blocking, once the index is checked (open_index's ``before_open``): on a disk too
    full for the index to grow (a new index's lock file, mapped, is a SIGBUS there; a
    commit, an I/O error), remove files until START_ROOM (at most 5% of the disk) is free:
    tmp/ first, then chunk files the index does not know and unpinned ones, the least
    recently used first (their records are dropped by reconcile). Pinned chunks are never
    removed; only regular files, never through a link. Files removed, bytes on disk."""
    try:
        st = os.statvfs(cache_dir)
    except OSError:
        return 0, 0
    want = min(START_ROOM, st.f_blocks * st.f_frsize // 20)
    free = st.f_bavail * st.f_frsize
    if free >= want:
        return 0, 0
    known = _records(cache_dir / "index")
    files: list[tuple[int, float, str]] = []  # (0 tmp / 1 chunk, last use, path)
    # (an index that cannot be read: tmp/ only, no chunk could be told pinned or not)
    chunk_dirs = [] if known is None else sorted((cache_dir / "chunks").glob("[0-9a-f]" * 2))
    for sub in (cache_dir / "tmp", *chunk_dirs):
        if sub.is_symlink():
            continue
        try:
            entries = list(os.scandir(sub))
        except OSError:
            continue
        for e in entries:
            try:
                if not e.is_file(follow_symlinks=False):
                    continue
                if sub.name == "tmp":
                    files.append((0, 0.0, e.path))
                    continue
                rec = (known or {}).get(bytes.fromhex(e.name))
                if rec is None:  # an orphan: as recent as its file
                    files.append((1, e.stat(follow_symlinks=False).st_mtime, e.path))
                elif not rec[1]:
                    files.append((1, rec[0], e.path))
            except (OSError, ValueError):
                continue
    n = nbytes = 0
    for _, _, path in sorted(files):
        if free >= want:
            break
        try:
            size = os.lstat(path).st_blocks * 512
            os.unlink(path)
        except OSError:
            continue
        free, n, nbytes = free + size, n + 1, nbytes + size
    return n, nbytes


def _records(index_dir: Path) -> dict[bytes, tuple[float, bool]] | None:
    """Chunk id → (last use, pinned) from the index (checked in a child process before:
    a damaged page could kill the reader), read without its lock file (nothing else uses
    it before the daemon opens it); {} where there is none (a damaged one was moved aside:
    every chunk file is an orphan then), None where it cannot be read."""
    if not (index_dir / "data.mdb").is_file():
        return {}
    try:
        env = lmdb.open(str(index_dir), readonly=True, lock=False, subdir=True, max_dbs=8)
    except lmdb.Error:
        return None
    try:
        db = env.open_db(b"chunks", create=False)
        with env.begin(db=db) as txn:
            out = {}
            for k, v in txn.cursor():
                rec = ChunkRec.unpack(v)
                out[bytes(k)] = (rec.last_access, rec.pinned)
            return out
    except (lmdb.Error, ValueError, struct.error):
        return None
    finally:
        env.close()


class ChunkStore:
    def __init__(self, cache_dir: Path, index: Index, writer: IndexWriter, stats: Stats, *,
                 limit: int, high: float = 0.9, low: float = 0.8,
                 chunk_size: int | None = None, idle_buffers: int = 4) -> None:
        self.dir = cache_dir
        self.chunk_dir = cache_dir / "chunks"
        self._chunk_root = str(self.chunk_dir)  # for file names built per read
        self.tmp_dir = cache_dir / "tmp"
        self.index = index
        self.writer = writer
        self.stats = stats
        self._marks = (high, low)
        self._set_limit(limit)
        self.configured_limit = limit
        self._disk_limited = False  # the limit was lowered by a full disk (_disk_full)
        self._limit_checked = -math.inf
        self.used = 0
        self.reserved = 0
        self.pinned_bytes = 0
        # unpinned chunks in LRU order (oldest first) → size
        self.lru: OrderedDict[bytes, int] = OrderedDict()
        self.adopted: set[bytes] = set()  # chunk files reconcile adopted (pin_adopted)
        self.repin_pending = False  # a start before adopted some and did not get that far
        # pinned chunks → size
        self.pinned: dict[bytes, int] = {}
        self._disk_limiter = trio.CapacityLimiter(8)
        self._evict_wakeup = trio.Event()
        self._space_lock = trio.Lock()
        self._put_ended = trio.Event()  # set (and renewed) as each write ends
        self._refused: dict[bytes, None] = {}  # the last chunks that could not be stored
        self.last_write_error: tuple[float, str] | None = None  # (time, error) of a chunk write
        # chunks being dropped (out of the accounting, file not yet unlinked) → set once
        # the file is gone: a put of one waits, or the drop would unlink its new file
        self._dropping: dict[bytes, trio.Event] = {}
        # chunks being written (file written, record committed, then accounted) → set once
        # the put is over: a second put of one waits and finds it cached, or its file
        # would replace the first's unaccounted, and a drop between the two would leave
        # the index saying cached over no file
        self._writing: dict[bytes, trio.Event] = {}
        self.writing = self._writing.keys()  # chunk ids being written (read-only view)
        # pinned chunks dropped because their file was bad: cached pinned again when they
        # are fetched again (a free of them forgets them)
        self._repin: set[bytes] = set()
        self._touched: dict[bytes, float] = {}  # access times not yet queued for the index
        self._touches_sent = 0.0
        self._tmp_seq = itertools.count()
        self._odirect = hasattr(os, "O_DIRECT")  # cleared when the file system refuses it
        # called with the ids of chunks about to be dropped (free, eviction, trace --cold):
        # copies held in memory elsewhere (the VFS's shared chunk memo) go with them
        self.on_drop: list[Callable[[list[bytes]], None]] = []
        # memory of full-size chunks, reused (partial ones: the last of an object)
        self.buffers = (BufferPool(file_size(chunk_size), idle=idle_buffers)
                        if chunk_size else None)
        self.chunk_size = chunk_size

    # -- start-up ---------------------------------------------------------------------

    def path(self, cid: bytes) -> Path:
        return Path(self._file(cid))

    def _file(self, cid: bytes) -> str:
        """The chunk file's name as a str (a Path costs more than the read of a small
        chunk's file on the warm path)."""
        h = cid.hex()
        return f"{self._chunk_root}/{h[:2]}/{h}"

    def reconcile(self, progress: Callable[[str], None] | None = None) -> dict:
        """Blocking (run in a thread before serving): make the index and files agree.
        ``progress(msg)`` hears every 10 s how far it got (verifying the files of a lost
        index reads them all)."""
        for d in (self.chunk_dir, self.tmp_dir):
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                # (a link was followed: start-up removed what its target held, as root)
                raise QuietError(
                    f"{d} is {'a link' if d.is_symlink() else 'not a directory'}: cachefs "
                    "keeps its files in the cache dir itself (give --cache-dir the place "
                    "you meant, and remove it)")
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        report = {"tmp_removed": 0, "orphans_adopted": 0, "orphans_removed": 0,
                  "records_dropped": 0}
        for f in self.tmp_dir.iterdir():
            _discard(f)
            report["tmp_removed"] += 1
        indexed = dict(self.index.iter_chunks())
        # chunk files adopted by a start that did not get as far as pinning those a data
        # set pins (pin_adopted): every unpinned chunk is a candidate then
        self.repin_pending = self.index.get_meta(REPIN) is not None
        on_disk: set[bytes] = set()
        ops: list = []
        adopt: list[tuple[bytes, Path, Callable]] = []
        no_room = False  # an adoption commit failed: the other orphans are removed
        now = time.time()
        said, seen = time.monotonic(), 0
        for sub in self.chunk_dir.iterdir():
            if sub.is_symlink() or not sub.is_dir() or sub.name not in _SUBDIRS:
                _discard(sub)  # (a link is not followed: removed)
                continue
            for f in sub.iterdir():
                seen += 1
                if progress is not None and time.monotonic() - said >= 10:
                    said = time.monotonic()
                    progress(f"checking the cache's chunk files: {seen} so far, "
                             f"{report['orphans_adopted']} not in the index adopted")
                try:
                    cid = bytes.fromhex(f.name)
                    if len(cid) != 16 or f.name[:2] != sub.name:  # (never read there)
                        raise ValueError
                except ValueError:
                    _discard(f)
                    report["orphans_removed"] += 1
                    continue
                rec = indexed.get(cid)
                if rec is not None:
                    try:
                        if f.stat().st_size == HEADER_SIZE + rec.size:
                            on_disk.add(cid)
                            continue
                    except FileNotFoundError:
                        continue
                    # wrong size: drop file and record
                    _discard(f)
                    continue
                # orphan: adopt if it verifies completely (and the index has room)
                hdr_data = None if no_room else self._read_verify(f, cid)
                if hdr_data is None:
                    _discard(f)
                    report["orphans_removed"] += 1
                else:
                    ck, size = hdr_data
                    # as recent as its file: a chunk an eviction had chosen as the
                    # coldest (a crash between its record's removal and its file's) was
                    # adopted as the newest, and hot chunks were evicted in its place
                    rec = ChunkRec(size, ck, _mtime(f, now), False)
                    adopt.append((cid, f, Index.op_put_chunk(cid, rec)))
                    self.adopted.add(cid)
                    indexed[cid] = rec
                    on_disk.add(cid)
                    report["orphans_adopted"] += 1
                    if len(adopt) >= ADOPT_BATCH:
                        # committed as it goes: verifying a lost index's files reads them
                        # all (45 min for 8 TB at 3 GB/s), and a start killed meanwhile (a
                        # probe's time-out, a reboot) began again from nothing
                        no_room = not self._adopt(adopt, indexed, on_disk, report)
                        adopt = []
        if adopt:
            self._adopt(adopt, indexed, on_disk, report)
        for name in _SUBDIRS:  # every chunk's directory, made once here, not per write
            (self.chunk_dir / name).mkdir(mode=0o700, exist_ok=True)
        for cid in list(indexed):
            if cid not in on_disk:
                ops.append(Index.op_delete_chunk(cid))
                del indexed[cid]
                report["records_dropped"] += 1
        if ops:
            self.index.apply(ops)
        for cid, rec in sorted(indexed.items(), key=lambda kv: kv[1].last_access):
            self.used += file_size(rec.size)
            if rec.pinned:
                self.pinned[cid] = rec.size
                self.pinned_bytes += file_size(rec.size)
            else:
                self.lru[cid] = rec.size
        return report

    def repin_candidates(self) -> set[bytes]:
        """The chunks pin_adopted must look at: those reconcile adopted, and every unpinned
        one when a start that adopted some ended before it pinned them."""
        return set(self.lru) if self.repin_pending else self.adopted & set(self.lru)

    def pin_adopted(self, cids: list[bytes]) -> int:
        """Blocking, at start-up before the index writer runs: pin ``cids`` (adopted chunk
        files that a data set pins: a crash between a pinning put's rename and its record
        left each unpinned, and evictable), in the commit that clears the mark reconcile
        set with the adoptions. How many."""
        cids = [c for c in dict.fromkeys(cids) if c in self.lru]
        e = self._apply_at_start([Index.op_meta(REPIN, None),
                                  *(Index.op_pin(c, True) for c in cids)])
        if e is not None:
            log.warning("could not pin %d adopted chunks again: %s", len(cids), e)
            return 0  # (the mark stays: the next start looks again)
        self.adopted, self.repin_pending = set(), False
        for c in cids:
            size = self.lru.pop(c)
            self.pinned[c] = size
            self.pinned_bytes += file_size(size)
        return len(cids)

    def _apply_at_start(self, ops: list) -> lmdb.Error | None:
        """Commit ``ops`` before the writer runs; the LMDB error that is no damage (a disk
        too full for the index's new pages), or None. Damage is raised: the caller's
        caller rebuilds the index."""
        try:
            self.index.apply(ops)
        except DAMAGE_ERRORS:
            raise
        except lmdb.Error as e:
            return e
        return None

    def _adopt(self, batch: list[tuple[bytes, Path, Callable]], indexed: dict,
               on_disk: set[bytes], report: dict) -> bool:
        """Commit the records of orphans that verified; False when the index could not
        (a disk too full for its new pages): their files go, as orphans that did not
        verify do, rather than the start failing for good (under systemd's Restart=, a
        loop)."""
        # (with the mark that pin_adopted must look at them, even after a crash)
        e = self._apply_at_start([Index.op_meta(REPIN, b"1"), *(op for _, _, op in batch)])
        if e is None:
            return True
        log.warning("could not adopt %d chunk files the index did not know (%s): "
                    "removed, with the others still to adopt", len(batch), e)
        for cid, f, _ in batch:
            _discard(f)
            self.adopted.discard(cid)
            del indexed[cid]
            on_disk.discard(cid)
            report["orphans_adopted"] -= 1
            report["orphans_removed"] += 1
        return False

    def _read_verify(self, f: Path, cid: bytes):
        """Blocking: (checksum, size) if file f holds a valid chunk cid, else None.  The
        header's length is believed only when the file has that many bytes after it: a
        flipped bit there asked for exabytes (OverflowError, MemoryError), and every start
        of the daemon failed on that one file."""
        try:
            with open(f, "rb") as fh:
                hdr = fh.read(HEADER_SIZE)
                if len(hdr) != HEADER_SIZE:
                    return None
                magic, hcid, length, ck = HEADER.unpack(hdr)
                if magic != MAGIC or hcid != cid:
                    return None
                if os.fstat(fh.fileno()).st_size != HEADER_SIZE + length or \
                        (self.chunk_size is not None and length > self.chunk_size):
                    return None
                data = fh.read(length + 1)
        except OSError:
            return None
        if len(data) != length or checksum(cid, data) != ck:
            return None
        return ck, length

    # -- reads ------------------------------------------------------------------------

    def new_buf(self, length: int) -> ChunkBuf:
        """Memory for a chunk of ``length`` bytes to be read or fetched into."""
        return ChunkBuf(length, self.buffers)

    def contains(self, cid: bytes) -> bool:
        return cid in self.lru or cid in self.pinned

    def _holds(self, cid: bytes, length: int) -> bool:
        """Chunk cid is cached with ``length`` bytes. A request of another length (a peer
        that names a wrong object size: the chunk id does not hold the size) misses; its
        file is good, and reading it with that length took it for damaged and dropped
        it, pinned or not."""
        n = self.lru.get(cid)
        if n is None:
            n = self.pinned.get(cid)
        if n is None:
            return False
        if n != length:
            self.stats.inc("ssd_length_mismatches")
            return False
        return True

    def is_pinned(self, cid: bytes) -> bool:
        return cid in self.pinned

    def forget_repin(self, cids: list[bytes]) -> None:
        """A free of these chunks: those dropped for a bad file are not pinned again."""
        if self._repin:
            self._repin.difference_update(cids)

    async def wait_written(self, cids: list[bytes]) -> None:
        """Until the puts of these chunks under way have ended."""
        for cid in cids:
            while (written := self._writing.get(cid)) is not None:
                await written.wait()

    def _read_file(self, cid: bytes, length: int) -> tuple[str, memoryview | None]:
        """Blocking. ('ok', data) | ('missing', None) | ('corrupt', None) | ('error', None).
        The file is read with O_DIRECT into a ChunkBuf: no copy through the page cache, and
        the chunk's pages are not cached twice (the mount's own page cache holds what
        readers read).  'error' is a failure that says nothing about the file (out of
        descriptors or memory): the read misses, and the file is kept."""
        size = HEADER_SIZE + length
        p = self._file(cid)
        try:
            fd = self._open_direct(p, os.O_RDONLY)
            if fd is None:
                fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            return "missing", None
        except OSError as e:
            return _read_error(cid, e), None
        try:
            if os.fstat(fd).st_size != size:
                return "corrupt", None
            buf = self.new_buf(length)
            got = 0
            while got < size:
                n = os.preadv(fd, [buf.file[got:]], got)
                if n == 0:
                    break
                got += n
        except OSError as e:
            return _read_error(cid, e), None
        finally:
            os.close(fd)
        if got != size:
            return "corrupt", None
        magic, hcid, hlen, ck = HEADER.unpack(buf.file[:HEADER_SIZE])
        if magic != MAGIC or hcid != cid or hlen != length or checksum(cid, buf.data) != ck:
            return "corrupt", None
        return "ok", buf.data.toreadonly()

    async def _on_disk(self, sp, fn, *args):
        """fn(*args) in a disk worker thread (8 of them, shared by reads, writes and
        unlinks); the wait for one, when it took a millisecond or more, goes on span
        sp as ``queued_ms``: queueing behind other disk work was shown as the SSD's own
        time."""
        t0 = time.perf_counter()
        began = t0

        def run():
            nonlocal began
            began = time.perf_counter()
            if DISK_DELAY:
                time.sleep(DISK_DELAY)
            return fn(*args)

        try:
            return await trio.to_thread.run_sync(run, limiter=self._disk_limiter)
        finally:
            if began - t0 >= 0.001:
                sp.set(queued_ms=round((began - t0) * 1000, 3))

    async def get(self, cid: bytes, length: int) -> memoryview | None:
        """The verified bytes of chunk cid, or None (miss; a bad file is dropped)."""
        if not self._holds(cid, length):
            return None
        with span("ssd.read", tier="local", bytes=length) as sp:
            status, data = await self._on_disk(sp, self._read_file, cid, length)
            sp.set(status=status)
        return await self._settle(cid, length, status, data)

    async def get_many(self, items: list[tuple[bytes, int]]) -> dict[bytes, memoryview]:
        """``get`` of several chunks in one worker-thread call (a thread hop costs more
        than reading a small chunk): chunk id → verified bytes, for those that hit."""
        items = [(cid, n) for cid, n in items if self._holds(cid, n)]
        if not items:
            return {}

        def read_all() -> list[tuple[str, memoryview | None]]:
            return [self._read_file(cid, n) for cid, n in items]

        with span("ssd.read", tier="local", chunks=len(items)) as sp:
            got = await self._on_disk(sp, read_all)
        out = {}
        for (cid, n), (status, data) in zip(items, got, strict=True):
            data = await self._settle(cid, n, status, data)
            if data is not None:
                out[cid] = data
        return out

    async def _settle(self, cid: bytes, length: int, status: str,
                      data: memoryview | None) -> memoryview | None:
        if status == "ok":
            self.stats.inc("ssd_hits")
            self.stats.inc("ssd_bytes", length)
            self.touch(cid)
            return data
        if status == "error":  # nothing wrong with the file: this read misses, it stays
            self.stats.inc("ssd_read_errors")
            return None
        if self._holds(cid, length):  # cached still
            # or again: dropped and put back while the read ran, it found the old file
            # gone, and the new one is good. Only a second read tells a bad file.
            status, data = await trio.to_thread.run_sync(self._read_file, cid, length,
                                                         limiter=self._disk_limiter)
            if status in ("ok", "error"):
                return await self._settle(cid, length, status, data)
        if self._holds(cid, length):  # the file is bad
            self.stats.inc(f"chunks_{status}")
            log.warning("chunk %s is %s on disk: dropped, fetching again", cid.hex(), status)
            pinned = self.is_pinned(cid)
            await self.drop([cid])
            if pinned:  # a pinned data set stays pinned: its next fetch pins it again
                self._repin.add(cid)
        return None

    def touch(self, cid: bytes) -> None:
        """A read of chunk cid: last in the LRU order now, and in the index within a second
        (access times are written once a second, in one commit: one per chunk read was
        one synced commit each, 170 a second for warm reads at 1.4 GB/s)."""
        if cid in self.lru:
            self.lru.move_to_end(cid)
            now = time.time()
            self._touched[cid] = now
            if now - self._touches_sent >= TOUCH_EVERY:
                self.flush_touches(now)

    def flush_touches(self, now: float | None = None) -> None:
        """Queue the access times not yet written (also at a clean stop)."""
        self._touches_sent = time.time() if now is None else now
        if self._touched:
            touched, self._touched = self._touched, {}
            self.writer.submit(Index.op_touch_many(touched))

    # -- writes -----------------------------------------------------------------------

    async def reserve(self, size: int) -> bool:
        """Make room for ``size`` bytes; False if only pinned data is left to evict."""
        async with self._space_lock:
            if self._disk_limited and self.used + self.reserved + size > self.limit:
                self._regain_limit()
            while self.used + self.reserved + size > self.limit:
                if self.pinned_bytes + size > self.limit:
                    # it cannot fit, whatever is evicted: the cached data it would have
                    # evicted stays (a cache nearly full of pinned data lost all of its
                    # other data to each chunk that did not fit)
                    self.stats.inc("cache_full_uncached")
                    return False
                if self.lru and self.pinned_bytes + self.reserved + size <= self.limit:
                    await self._evict_some(self.used + self.reserved + size - self.limit)
                elif self.reserved:
                    # the room is taken by chunks being written, evictable once they are
                    # (unless pinned): a preload of 8 at a time into a cache with room for
                    # 5 refused the others as "full of pinned data"
                    await self._put_ended.wait()
                else:
                    self.stats.inc("cache_full_uncached")
                    return False
            self.reserved += size
        if self.used + self.reserved > self.high:
            self._evict_wakeup.set()
        return True

    def _write_file(self, cid: bytes, buf: ChunkBuf, ck: bytes) -> None:
        """Blocking: tmp file + rename. Raises OSError (ENOSPC...) to the caller."""
        tmp = self.tmp_dir / f"{cid.hex()}.{os.getpid()}.{next(self._tmp_seq)}"
        final = self.path(cid)
        buf.file[:HEADER_SIZE] = HEADER.pack(MAGIC, cid, buf.length, ck)
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                # tmp/ removed under us (it is empty most of the time, and cleaners of
                # empty directories, systemd-tmpfiles, `find -empty -delete`, take it):
                # made again, or every write failed until the next start
                self.tmp_dir.mkdir(mode=0o700, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                self._write_all(fd, tmp, buf)
            finally:
                os.close(fd)
            crash_point("chunk.tmp_written")
            try:
                os.rename(tmp, final)
            except FileNotFoundError:  # its directory was removed while we run
                final.parent.mkdir(mode=0o700, exist_ok=True)
                os.rename(tmp, final)
            crash_point("chunk.renamed")
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _write_all(self, fd: int, path: Path, buf: ChunkBuf) -> None:
        size = HEADER_SIZE + buf.length
        dfd = self._open_direct(path, os.O_WRONLY)
        if dfd is not None:
            try:
                _write_loop(dfd, buf.file)  # aligned and padded; the padding goes next
                os.ftruncate(dfd, size)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._no_odirect(e)
                os.ftruncate(fd, 0)
            finally:
                os.close(dfd)
        _write_loop(fd, buf.file[:size])

    def _open_direct(self, path: Path | str, flags: int) -> int | None:
        """path opened with O_DIRECT added to flags, or None where the file system
        refuses O_DIRECT (said once; later calls do not try again)."""
        if not self._odirect:
            return None
        try:
            return os.open(path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._no_odirect(e)
            return None

    def _no_odirect(self, e: OSError) -> None:
        if self._odirect:
            self._odirect = False
            log.info("the cache directory's file system refuses O_DIRECT (%s): chunk files "
                     "are read and written through the page cache", e.strerror)

    async def put(self, cid: bytes, data: ChunkBuf | bytes | memoryview, *,
                  pin: bool = False) -> bool:
        """Store a verified chunk: a ChunkBuf is written as it is, other bytes are copied
        into one first. Returns False when it could not be cached."""
        while True:
            if (gone := self._dropping.get(cid)) is not None:
                await gone.wait()
            elif (written := self._writing.get(cid)) is not None:
                await written.wait()
            else:
                break
        pin = pin or cid in self._repin
        if self.contains(cid):
            if pin:
                await self.set_pinned([cid], True)
                self._repin.discard(cid)
            return True
        written = self._writing[cid] = trio.Event()
        try:
            ok = await self._put(cid, data, pin)
        finally:
            del self._writing[cid]
            written.set()
        if ok:
            self._repin.discard(cid)
        return ok

    def was_refused(self, cid: bytes) -> bool:
        """Did the last attempt to store ``cid`` (among the recent ones) fail? Not the same
        as "not cached now": a chunk written moments ago may have been evicted since, to
        make room for the next ones of a data set larger than the room."""
        return cid in self._refused

    def _refuse(self, cid: bytes) -> bool:
        self._refused[cid] = None
        if len(self._refused) > REFUSED_KEPT:
            del self._refused[next(iter(self._refused))]
        return False

    async def _put(self, cid: bytes, data: ChunkBuf | bytes | memoryview, pin: bool) -> bool:
        size = data.length if isinstance(data, ChunkBuf) else len(data)
        disk = file_size(size)
        self._refused.pop(cid, None)
        if not await self.reserve(disk):
            return self._refuse(cid)
        try:
            with span("ssd.write", bytes=size) as sp:
                def work() -> bytes:
                    b = data if isinstance(data, ChunkBuf) else ChunkBuf.of(data)
                    ck = checksum(cid, b.data)
                    self._write_file(cid, b, ck)
                    return ck
                try:
                    ck = await self._on_disk(sp, work)
                except OSError as e:
                    self.stats.inc("ssd_write_errors")
                    self.last_write_error = (time.time(), str(e))
                    if e.errno == errno.ENOSPC:
                        self._disk_full()
                    else:
                        log.warning("chunk write failed: %s", e)
                    return self._refuse(cid)
                rec = ChunkRec(size, ck, time.time(), pin)
                # the file is in place: its record follows, or the file goes, even when
                # the stop cancels us (a clean stop left a file the index did not know,
                # adopted unpinned at the next start)
                with trio.CancelScope(shield=True):
                    try:
                        await self.writer.commit(Index.op_put_chunk(cid, rec))
                    except IndexCommitError:
                        # not in the index: the file must go too (or start-up adopts it)
                        self.stats.inc("index_commit_errors")
                        await trio.to_thread.run_sync(self._unlink, cid,
                                                      limiter=self._disk_limiter)
                        return self._refuse(cid)
        finally:
            self.reserved -= disk
            # (a reservation waiting on this goes on once this task yields, after the LRU
            # has this chunk)
            self._put_ended.set()
            self._put_ended = trio.Event()
        self.used += disk
        if pin:
            self.pinned[cid] = size
            self.pinned_bytes += disk
        else:
            self.lru[cid] = size
        self.stats.inc("ssd_writes")
        return True

    def _set_limit(self, limit: int) -> None:
        self.limit = limit
        self.high, self.low = (int(limit * f) for f in self._marks)

    def _disk_full(self) -> None:
        """A chunk write met ENOSPC: the file system holds less than the limit promised (it
        is smaller, or shared). The limit drops to 95% of the chunks it holds now, and
        eviction goes on from there, so new chunks are cached again in LRU order instead of
        none at all once the disk is full. Until the disk has room again (_regain_limit)."""
        new = int(self.used * DISK_FULL_SHARE)
        self._limit_checked = time.monotonic()  # not raised again at the next write
        if new < self.limit:
            log.warning("cache disk full with %d MiB of chunks: the cache limit drops from "
                        "%d to %d MiB until the disk has room again; this chunk is served "
                        "without caching",
                        self.used >> 20, self.limit >> 20, new >> 20)
            self._set_limit(new)
            self._disk_limited = True
            self.stats.inc("cache_limit_lowered")
        else:
            log.warning("cache disk full: serving a chunk without caching")
        self._evict_wakeup.set()

    def _regain_limit(self) -> None:
        """A limit lowered by a full disk goes up again as the disk gets room (another
        program sharing it removed its files): it stayed low until the daemon restarted,
        and with a disk filled by someone else right after start, caching stayed off."""
        now = time.monotonic()
        if now - self._limit_checked < DISK_RECHECK:
            return
        self._limit_checked = now
        try:
            free = self.disk_free()
        except OSError:
            return
        new = min(self.configured_limit, int((self.used + self.reserved + free)
                                             * DISK_FULL_SHARE))
        if new - self.limit >= RAISE_CHUNKS * (self.chunk_size or 8 << 20) or \
                new == self.configured_limit > self.limit:
            log.warning("the cache disk has room again: the cache limit rises from %d to "
                        "%d MiB", self.limit >> 20, new >> 20)
            self._set_limit(new)
            self._disk_limited = new < self.configured_limit
            self.stats.inc("cache_limit_raised")

    def _unlink(self, cid: bytes) -> None:
        self._unlink_paths([self._file(cid)])

    def _unlink_paths(self, paths: list[str]) -> None:
        """Blocking. A file that cannot be removed (the cache disk went read-only or
        failed) is counted and left behind: its record is gone from the index, so it
        costs disk space until a start-up adopts it again or it is evicted then; the
        daemon goes on serving, from S3 where the disk no longer takes chunks."""
        failed, why = 0, None
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                failed, why = failed + 1, e
        if failed:
            self.stats.inc("ssd_unlink_errors", failed)
            log.warning("could not remove %d chunk file%s from the cache disk: %s", failed,
                        "" if failed == 1 else "s", why)

    async def set_pinned(self, cids: list[bytes], pinned: bool) -> int:
        """Pin (or unpin) the cached ones of ``cids``; how many changed. When the index
        cannot record it, nothing changes (0): a pin kept in memory only was gone after a
        restart, its chunks evicted, while `preload --pin` had said they were pinned.
        Callers tell by ``is_pinned``."""
        ops, n, changed = [], 0, []
        for cid in cids:
            if pinned and cid in self.lru:
                size = self.lru.pop(cid)
                self.pinned[cid] = size
                self.pinned_bytes += file_size(size)
            elif not pinned and cid in self.pinned:
                size = self.pinned.pop(cid)
                self.pinned_bytes -= file_size(size)
                self.lru[cid] = size
                self.lru.move_to_end(cid, last=False)  # unpinned data goes first
            else:
                continue
            ops.append(Index.op_pin(cid, pinned))
            changed.append(cid)
            n += 1
        if ops:
            try:
                await self.writer.commit(*ops)
            except IndexCommitError as e:
                self.stats.inc("index_commit_errors")
                log.warning("could not record %d chunks as %s in the index: %s", len(ops),
                            "pinned" if pinned else "unpinned", e)
                for cid in changed:  # as the index has them (unless dropped meanwhile)
                    if pinned and cid in self.pinned:
                        size = self.pinned.pop(cid)
                        self.pinned_bytes -= file_size(size)
                        self.lru[cid] = size
                    elif not pinned and cid in self.lru:
                        size = self.lru.pop(cid)
                        self.pinned[cid] = size
                        self.pinned_bytes += file_size(size)
                return 0
        return n

    # -- removal ----------------------------------------------------------------------

    async def drop(self, cids: list[bytes]) -> int:
        """Remove chunks (index first, then files). Returns the chunks' bytes of data."""
        for fn in self.on_drop:
            fn(cids)
        freed, disk, ops, paths, victims = 0, 0, [], [], []
        for cid in cids:
            size = self.lru.pop(cid, None)
            if size is None:
                size = self.pinned.pop(cid, None)
                if size is None:
                    continue
                self.pinned_bytes -= file_size(size)
            freed += size
            disk += file_size(size)
            ops.append(Index.op_delete_chunk(cid))
            paths.append(self._file(cid))
            victims.append(cid)
        if not ops:
            return 0
        gone = trio.Event()
        dropping = [c for c in victims if c not in self._dropping]
        for cid in dropping:
            self._dropping[cid] = gone
        try:
            # shielded: the records are queued for deletion now, whatever happens to the
            # caller (a stopping evictor, a peer request's time-out), so the files must go
            # too, or a clean stop would leave files no record counts
            with trio.CancelScope(shield=True):
                try:
                    await self.writer.commit(*ops)
                except IndexCommitError:
                    # the records stay in the index without their files: start-up drops them
                    self.stats.inc("index_commit_errors")
                crash_point("evict.index_deleted")
                await trio.to_thread.run_sync(self._unlink_paths, paths,
                                              limiter=self._disk_limiter)
        finally:  # out of the index and of the LRU: out of the accounting too
            self.used -= disk
            for cid in dropping:
                del self._dropping[cid]
            gone.set()
        return freed

    async def _evict_some(self, nbytes: int) -> None:
        victims, disk, total = [], 0, 0
        for cid, size in self.lru.items():  # nbytes of disk, as used counts them
            victims.append(cid)
            disk += file_size(size)
            total += size
            if disk >= nbytes and len(victims) >= 1:
                break
        if victims:
            with span("evict", chunks=len(victims), bytes=total):
                await self.drop(victims)
            self.stats.inc("evictions", len(victims))
            self.stats.inc("evicted_bytes", total)  # of data, like every bytes counter

    async def evictor(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background: when use passes the high watermark, evict LRU down to the low one;
        and the access times waiting to be written go once a second."""
        task_status.started()
        while True:
            with trio.move_on_after(TOUCH_EVERY):
                await self._evict_wakeup.wait()
            if self._touched and time.time() - self._touches_sent >= TOUCH_EVERY:
                # the access times of reads that no read followed since: written within
                # a second all the same (a SIGKILL after a burst of reads lost them all)
                self.flush_touches()
            if not self._evict_wakeup.is_set():
                continue
            self._evict_wakeup = trio.Event()
            try:
                async with self._space_lock:
                    while self.used + self.reserved > self.low and self.lru:
                        await self._evict_some(min(self.used + self.reserved - self.low,
                                                   64 * 1024 * 1024))
            except Exception:  # the mount must outlive a failing cache disk
                self.stats.inc("eviction_errors")
                log.exception("eviction failed; trying again at the next wake-up")
                await trio.sleep(1)

    def kick(self) -> None:
        if self.used + self.reserved > self.high:
            self._evict_wakeup.set()

    def disk_free(self) -> int:
        return shutil.disk_usage(self.dir).free

    def statistics(self) -> dict:
        out = {"used_bytes": self.used, "reserved_bytes": self.reserved,
               "limit_bytes": self.limit, "pinned_bytes": self.pinned_bytes,
               "chunks": len(self.lru) + len(self.pinned),
               "pinned_chunks": len(self.pinned)}
        if self.last_write_error is not None:
            t, why = self.last_write_error
            out["last_write_error"] = {"seconds_ago": round(time.time() - t, 1),
                                       "error": why}
        return out
