"""LMDB index under <cache-dir>/index: chunk records, object metadata, inode numbers.

Sub-databases:
  chunks   chunk id (16 B) → ChunkRec (size, checksum, last access, pinned)
  inodes   blake2b(mount \\0 path) → inode number (stable across restarts)
  listings blake2b(mount \\0 endpoint, bucket, prefix, dir path) → the directory's last
           S3 listing (object metadata: names, sizes, ETags, mtimes) and when it was taken
  meta     "next_ino", "version", "chunk_size" (the one the cache was last started with),
           "started" (when)

The Index class is synchronous.  Reads are memory-mapped lookups of a few µs
and may run on the trio thread ("proven short").  Every write goes through
IndexWriter: one task that drains a queue of operations and commits them in one
transaction in a worker thread (group commit), so a burst of chunk inserts
costs one fsync, not one each.  ``MapFullError`` at commit grows the map and
retries the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import lmdb
import trio

from .errors import QuietError
from .faults import commit_fails, crash_point
from .index_check import DAMAGE_ERRORS as DAMAGE_ERRORS
from .index_check import NOT_DAMAGE

log = logging.getLogger("cachefs.index")

FORMAT_VERSION = b"1"
_REC = struct.Struct("<Q16sdB")  # size, checksum, last_access, pinned
INO_SLICE = 4096  # inode lookups per read transaction in get_inos


@dataclass(frozen=True)
class ChunkRec:
    size: int
    checksum: bytes
    last_access: float
    pinned: bool = False

    def pack(self) -> bytes:
        return _REC.pack(self.size, self.checksum, self.last_access, int(self.pinned))

    @classmethod
    def unpack(cls, b: bytes) -> ChunkRec:
        size, ck, la, pinned = _REC.unpack(b)
        return cls(size, ck, la, bool(pinned))


def path_key(mount: str, path: str) -> bytes:
    return hashlib.blake2b(f"{mount}\0{path}".encode("utf-8", "surrogateescape"),
                           digest_size=16).digest()


def _update(ix: Index, txn: lmdb.Transaction, cid: bytes, **changes) -> None:
    """Change fields of a chunk's record, if it has one (in a write transaction)."""
    b = txn.get(cid, db=ix.chunks)
    if b:
        txn.put(cid, replace(ChunkRec.unpack(b), **changes).pack(), db=ix.chunks)


class Index:
    def __init__(self, path: Path, map_size: int = 1 << 30) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Each commit (a group of operations, IndexWriter) syncs the pages it wrote, but
        # not the meta page that makes it current (LMDB's NOMETASYNC): after a power loss
        # the index is whole, less at most its last commit (whose chunk files are adopted
        # again at start); IndexWriter syncs the meta page within a second.  Without the
        # data sync (NOSYNC, until 2026-12) a power loss could leave pages of several
        # commits half on disk: the index was then moved aside, pins and inode numbers
        # with it, or opened and failed at the first write.  Chunk files are written with
        # O_DIRECT and leave no dirty pages for the sync to flush: 0.17 ms a commit here
        # (0.05 without it).
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=8, subdir=True,
                             mode=0o600, sync=True, metasync=False, lock=True)
        # set_mapsize needs no transaction open in this process: reads (any thread) and
        # the resize take this lock; commits do not (they run in the one writer thread)
        self._resize = threading.Lock()
        self.chunks = self.env.open_db(b"chunks")
        self.inodes = self.env.open_db(b"inodes")
        self.meta = self.env.open_db(b"meta")
        self.listings = self.env.open_db(b"listings")
        # object name → the versions of it a `preload --pin` pinned (datasets.py)
        self.pins = self.env.open_db(b"pins")
        with self.env.begin(write=True) as txn:
            v = txn.get(b"version", db=self.meta)
            if v is None:
                txn.put(b"version", FORMAT_VERSION, db=self.meta)
            elif v != FORMAT_VERSION:
                raise RuntimeError(f"cache index format {v!r} is not {FORMAT_VERSION!r}")

    def close(self) -> None:
        with contextlib.suppress(lmdb.Error):
            self.env.sync(True)
        self.env.close()

    def sync(self) -> None:
        self.env.sync(True)

    # -- reads (short) ---------------------------------------------------------------

    def get_chunk(self, cid: bytes) -> ChunkRec | None:
        with self._resize, self.env.begin() as txn:
            b = txn.get(cid, db=self.chunks)
        return ChunkRec.unpack(b) if b else None

    def iter_chunks(self) -> Iterator[tuple[bytes, ChunkRec]]:
        with self._resize, self.env.begin() as txn:
            items = [(bytes(k), ChunkRec.unpack(v)) for k, v in txn.cursor(db=self.chunks)]
        yield from items

    def get_ino(self, key: bytes) -> int | None:
        with self._resize, self.env.begin() as txn:
            b = txn.get(key, db=self.inodes)
        return struct.unpack("<Q", b)[0] if b else None

    def get_listing(self, key: bytes) -> bytes | None:
        with self._resize, self.env.begin() as txn:
            b = txn.get(key, db=self.listings)
        return bytes(b) if b is not None else None

    def get_pin_records(self, keys: list[bytes], prefixes: list[bytes] = ()
                        ) -> dict[bytes, bytes]:
        """The pin records of ``keys`` and of every key starting with one of ``prefixes``
        (in a worker thread)."""
        out = {}
        for i in range(0, len(keys), 4096):  # (the resize lock is the trio thread's too)
            with self._resize, self.env.begin() as txn:
                for k in keys[i:i + 4096]:
                    b = txn.get(k, db=self.pins)
                    if b is not None:
                        out[k] = bytes(b)
        for p in prefixes:  # 4096 records per hold of the lock, as above
            start, more = p, True
            while more:
                more = False
                with self._resize, self.env.begin() as txn:
                    cur = txn.cursor(db=self.pins)
                    if not cur.set_range(start):
                        break
                    n = 0
                    for k, v in cur:
                        if not k.startswith(p):
                            break
                        if n == 4096:  # go on from this key with the lock let go
                            start, more = bytes(k), True
                            break
                        out[bytes(k)] = bytes(v)
                        n += 1
        return out

    def pin_records_after(self, after: bytes, budget: int) -> tuple[list[tuple[bytes, bytes]],
                                                                    bool]:
        """Pin records in key order from the first key past ``after`` (b"": the first),
        keys and values of about ``budget`` bytes; and whether more follow (in a worker
        thread)."""
        out, size = [], 0
        with self._resize, self.env.begin() as txn:
            cur = txn.cursor(db=self.pins)
            if not cur.set_range(after):
                return out, False
            for k, v in cur:
                k = bytes(k)
                if k == after:
                    continue
                if out and size + len(k) + len(v) > budget:
                    return out, True
                out.append((k, bytes(v)))
                size += len(k) + len(v)
        return out, False

    def get_inos(self, keys: list[bytes]) -> dict[bytes, int]:
        """Many inode lookups (run in a thread for big listings), a slice of keys per read
        transaction: the resize lock it holds meanwhile is the one the trio thread's
        get_ino takes, which waited 349 ms behind a directory of 300,000 names."""
        out = {}
        for i in range(0, len(keys), INO_SLICE):
            with self._resize, self.env.begin() as txn:
                for k in keys[i:i + INO_SLICE]:
                    b = txn.get(k, db=self.inodes)
                    if b:
                        out[k] = struct.unpack("<Q", b)[0]
        return out

    def next_ino(self) -> int:
        with self._resize, self.env.begin() as txn:
            b = txn.get(b"next_ino", db=self.meta)
        return struct.unpack("<Q", b)[0] if b else 2

    def set_chunk_size(self, chunk_size: int) -> tuple[int, int, int] | None:
        """At start-up, before the writer runs: record the chunk size.  When the cache was
        last started with another one, its pinned chunks can no longer be read, freed or
        evicted (chunk ids include the chunk size): they are unpinned, for eviction to
        reclaim.  Returns (old chunk size, chunks unpinned, their bytes), or None."""
        new = struct.pack("<Q", chunk_size)
        got: list = []

        def op(ix: Index, txn: lmdb.Transaction) -> None:
            got.clear()
            # a write at every start: damage only a write meets (the free-page list, which
            # no record leads to) shows now, where the index can be rebuilt, and not at
            # every commit of the running daemon
            txn.put(b"started", struct.pack("<d", time.time()), db=ix.meta)
            old = txn.get(b"chunk_size", db=ix.meta)
            if old == new:
                return
            txn.put(b"chunk_size", new, db=ix.meta)
            if old is None:  # a new cache, or one from before the chunk size was recorded
                return
            n = nbytes = 0
            for k, v in list(txn.cursor(db=ix.chunks)):
                rec = ChunkRec.unpack(v)
                if rec.pinned:
                    txn.put(bytes(k), replace(rec, pinned=False).pack(), db=ix.chunks)
                    n, nbytes = n + 1, nbytes + rec.size
            got.append((struct.unpack("<Q", old)[0], n, nbytes))

        # through apply: a full map grows (an index reopened is mapped at its used size)
        self.apply([op], crash=False)
        return got[0] if got else None

    # -- writes: only through IndexWriter.commit (one writer thread) -----------------

    def apply(self, ops: list[Callable[[Index, lmdb.Transaction], None]],
              crash: bool = True) -> None:
        """Commit ``ops`` in one transaction (``crash``: the ``index.commit`` crash point of
        the tests, which start-up's own commit passes)."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for op in ops:
                        op(self, txn)
                    if crash:
                        crash_point("index.commit")
                        if commit_fails(ops):
                            raise lmdb.DiskError("injected by CACHEFS_TEST_FAIL_COMMITS_WHILE")
                return
            except lmdb.MapFullError:
                new = self.env.info()["map_size"] * 2
                log.info("index map full: growing to %d MiB", new >> 20)
                with self._resize:
                    self.env.set_mapsize(new)

    # op factories ----------------------------------------------------------------

    @staticmethod
    def _op_put(db: str, key: bytes, value: bytes):
        """An op that puts ``key`` → ``value`` in the named table (chunks, listings...)."""
        def op(ix: Index, txn: lmdb.Transaction) -> None:
            txn.put(key, value, db=getattr(ix, db))
        op.table = db  # (what a test's injected commit failure looks at)
        return op

    @staticmethod
    def _op_delete(db: str, key: bytes):
        def op(ix: Index, txn: lmdb.Transaction) -> None:
            txn.delete(key, db=getattr(ix, db))
        op.table = db
        return op

    @staticmethod
    def op_put_chunk(cid: bytes, rec: ChunkRec):
        return Index._op_put("chunks", cid, rec.pack())

    @staticmethod
    def op_delete_chunk(cid: bytes):
        return Index._op_delete("chunks", cid)

    @staticmethod
    def _op_update(cid: bytes, **changes):
        def op(ix: Index, txn: lmdb.Transaction) -> None:
            _update(ix, txn, cid, **changes)
        op.table = "chunks"
        return op

    @staticmethod
    def op_touch(cid: bytes, when: float):
        return Index.op_touch_many({cid: when})

    @staticmethod
    def op_touch_many(when: dict[bytes, float]):
        """One op for the access times of many chunks (chunk id → time): one op per chunk
        cost the trio thread 2.5 µs each, 25 ms of every second at 10k small files/s."""
        def op(ix: Index, txn: lmdb.Transaction) -> None:
            for cid, t in when.items():
                _update(ix, txn, cid, last_access=t)
        op.table = "chunks"
        return op

    def get_meta(self, key: bytes) -> bytes | None:
        with self._resize, self.env.begin() as txn:
            b = txn.get(key, db=self.meta)
            return None if b is None else bytes(b)

    @staticmethod
    def op_meta(key: bytes, value: bytes | None):
        """Set (or, with None, remove) a key of the meta table."""
        return Index._op_put("meta", key, value) if value is not None \
            else Index._op_delete("meta", key)

    @staticmethod
    def op_pin(cid: bytes, pinned: bool):
        return Index._op_update(cid, pinned=pinned)

    @staticmethod
    def op_put_listing(key: bytes, blob: bytes):
        return Index._op_put("listings", key, blob)

    @staticmethod
    def op_put_pin_record(key: bytes, blob: bytes):
        return Index._op_put("pins", key, blob)

    @staticmethod
    def op_delete_pin_record(key: bytes):
        return Index._op_delete("pins", key)

    @staticmethod
    def op_delete_listing(key: bytes):
        return Index._op_delete("listings", key)

    @staticmethod
    def op_put_ino(key: bytes, ino: int, next_ino: int):
        def op(ix: Index, txn: lmdb.Transaction) -> None:
            txn.put(key, struct.pack("<Q", ino), db=ix.inodes)
            cur = txn.get(b"next_ino", db=ix.meta)
            if cur is None or struct.unpack("<Q", cur)[0] < next_ino:
                txn.put(b"next_ino", struct.pack("<Q", next_ino), db=ix.meta)
        return op


class IndexCommitError(Exception):
    """A batch could not be committed (disk full, I/O error): its ops are lost."""


class _Waiter:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class IndexWriter:
    """Group commit: callers enqueue ops; one task commits them in batches off-thread.

    A batch that fails to commit (an ``lmdb.Error`` other than a full map: the disk
    is full, an I/O error) is lost and the daemon goes on: ``commit`` raises
    IndexCommitError to its callers; ``submit``ted ops (LRU touches, inode numbers)
    are dropped.  The index then lags the files, which start-up reconciles.
    """

    def __init__(self, index: Index, max_batch: int = 4096) -> None:
        self.index = index
        self.max_batch = max_batch
        self._send, self._recv = trio.open_memory_channel[tuple](float("inf"))
        self._limiter = trio.CapacityLimiter(1)
        self.commits = 0
        self.pending = 0
        self.errors = 0
        self.sync_interval = 1.0
        self.syncs = 0
        self._synced = time.monotonic()
        self._unsynced = False  # commits since the last sync
        self._stopped = False  # run() has ended: commit() commits by itself

    async def commit(self, *ops) -> None:
        """Enqueue ops and wait until they are durable in LMDB (or IndexCommitError).

        Once the writer has stopped (shutdown cancelled it), a commit from a task that
        shields itself from that (a drop keeping index and files consistent) is
        committed here: nobody would take it off the queue, and the shutdown would wait
        for that task forever."""
        w = _Waiter()
        self.pending += 1
        if self._stopped:
            await self._commit_batch([(list(ops), w)])
        else:
            self._send.send_nowait((list(ops), w))
            await w.done.wait()
        if w.error is not None:
            raise IndexCommitError(str(w.error))

    def submit(self, *ops) -> None:
        """Enqueue ops without waiting (LRU touches, inode numbers)."""
        self.pending += 1
        self._send.send_nowait((list(ops), None))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._run()
        finally:
            # stopped (cancelled at shutdown): commits from now on are made by their
            # callers; those already queued are taken off and committed here, so that
            # every commit() returns (submit()ted ops queued later: drain_sync)
            self._stopped = True
            with trio.CancelScope(shield=True):
                while batch := self._take([]):
                    await self._commit_batch(batch)

    async def _run(self) -> None:
        while True:
            # commits not yet synced are synced within sync_interval even if nothing follows
            wait = (max(0.0, self._synced + self.sync_interval - time.monotonic())
                    if self._unsynced else math.inf)
            first = None
            with trio.move_on_after(wait):
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    return
            if first is None:
                await trio.to_thread.run_sync(self._sync, limiter=self._limiter)
                continue
            batch = self._take([first])
            # a batch taken off the queue is committed even when shutdown cancels us: it
            # is no longer there for drain_sync (waiting for the limiter is a checkpoint)
            with trio.CancelScope(shield=True):
                await self._commit_batch(batch)

    def _take(self, batch: list[tuple]) -> list[tuple]:
        """``batch`` with what is queued added, up to max_batch entries."""
        while len(batch) < self.max_batch:
            try:
                batch.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch

    async def _commit_batch(self, batch: list[tuple]) -> None:
        ops = [op for ops, _ in batch for op in ops]
        error: BaseException | None = None
        try:
            await trio.to_thread.run_sync(self._apply, ops, limiter=self._limiter)
            self.commits += 1
        except lmdb.Error as e:  # MapFullError is handled inside apply
            error = e
            self.errors += 1
            log.warning("index commit of %d operations failed: %s", len(ops), e)
        except BaseException as e:  # a bug: the writer ends, and the daemon with it
            error = e
            raise
        finally:  # every waiter hears, or a shielded one would hold up the shutdown
            self.pending -= len(batch)
            for _, w in batch:
                if w is not None:
                    w.error = error
                    w.done.set()

    def _apply(self, ops: list) -> None:
        """Worker thread: commit, and make the index durable at most once a second."""
        self.index.apply(ops)
        self._unsynced = True
        if time.monotonic() - self._synced >= self.sync_interval:
            self._sync()

    def _sync(self) -> None:
        """Worker thread: what is committed reaches the disk (fsync)."""
        self._synced = time.monotonic()
        self._unsynced = False
        try:
            self.index.sync()
            self.syncs += 1
        except lmdb.Error as e:
            self.errors += 1
            log.warning("index sync failed: %s", e)

    def drain_sync(self) -> None:
        """At shutdown (no trio tasks left): commit whatever is still queued."""
        ops = []
        while True:
            try:
                o, _ = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            ops.extend(o)
        if ops:
            try:
                self.index.apply(ops)
            except lmdb.Error as e:
                log.warning("index: %d queued operations lost at shutdown: %s", len(ops), e)


CHECK_TIMEOUT = 600.0  # seconds the child may read the index (3M records: about 1.2 s)
# what a damaged page does to the process that reads it (besides index_check.DAMAGED)
DAMAGE_SIGNALS = (signal.SIGBUS, signal.SIGSEGV, signal.SIGABRT)


def open_index(path: Path, map_size: int = 1 << 30,
               progress: Callable[[str], None] | None = None,
               before_open: Callable[[], None] | None = None) -> Index:
    """Open the index; one that cannot be opened or read whole (damaged by a power loss
    or a failing disk, or of another format) is moved aside and started afresh: start-up
    then adopts every chunk file that verifies, so the cache stays warm.

    Every record is read first, in a child process (``index_check``): a page damaged
    inside the file can kill the process that reads it (SIGBUS), and that must not be
    the daemon, at every start. The walk is cheap beside start-up's own: 0.37 s for a
    million chunk records (an 8 TB cache), where reconciling them takes 2.8 s.
    ``progress(msg)`` hears every 10 s how long the check has taken; ``before_open()``
    runs once the index is checked (or moved aside), before it is opened for writes."""
    if (path / "data.mdb").exists():
        why = check_in_child(path, progress)
        if why is not None:
            _move_aside(path, why)
    if before_open is not None:
        before_open()
    try:
        return Index(path, map_size)
    except NOT_DAMAGE as e:
        # not the index's fault (no memory: an address-space limit; an I/O error): it is
        # left as it is, pins and all, and the start fails; a rebuild would lose the pins
        raise QuietError(f"cannot open the cache index {path}: {_lmdb_reason(e)} (the "
                         "index is left as it is)") from None
    except (lmdb.Error, RuntimeError, struct.error) as e:
        _move_aside(path, str(e))  # damaged, or of another format: it fails every start
        return Index(path, map_size)


def _lmdb_reason(e: lmdb.Error) -> str:
    """``mdb_env_open: Cannot allocate memory`` → ``Cannot allocate memory``."""
    return str(e).rpartition(": ")[2] or type(e).__name__


def reopen_damaged(index: Index, path: Path, map_size: int, err: Exception) -> Index:
    """An index that opened and passed the check but failed a write at start-up
    (``MDB_CORRUPTED``: damage on a page no record leads to) is moved aside and started
    afresh, as open_index does with one that fails the check: it failed every start."""
    with contextlib.suppress(lmdb.Error):
        index.env.close()
    _move_aside(path, f"{type(err).__name__}: {err}")
    return Index(path, map_size)


def check_in_child(path: Path, progress: Callable[[str], None] | None = None,
                   timeout: float | None = None) -> str | None:
    """Why the index at ``path`` is damaged, or None: every record read back, or the check
    could not tell. Only what damage does counts as damage: the child's DAMAGED exit
    status (LMDB reported a corrupt page, a record does not decode) or its death by
    SIGBUS, SIGSEGV or SIGABRT. A child that could not start, was killed from outside
    (SIGKILL by the OOM killer) or took longer than ``timeout`` says nothing about the
    index, which is then opened unchecked: moving a healthy index aside would lose its
    pins, inode numbers and listings. The child runs in a session of its own, so a
    Ctrl-C at the terminal that started the daemon does not reach it."""
    from .index_check import DAMAGED

    timeout = CHECK_TIMEOUT if timeout is None else timeout
    t0 = time.monotonic()
    from .runtime import python_module

    python, env = python_module("cachefs.index_check")  # the cachefs this process runs
    try:
        child = subprocess.Popen([*python, str(path), str(os.getpid())],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env,
                                 start_new_session=True)
    except OSError as e:
        log.warning("cannot check the cache index %s (%s): opening it unchecked", path, e)
        return None
    try:
        while True:
            try:
                out, err = child.communicate(
                    timeout=min(10.0, max(0.05, t0 + timeout - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                waited = time.monotonic() - t0
                if waited >= timeout:
                    _kill_group(child)
                    child.communicate()
                    log.warning("checking the cache index %s took over %.0f s: stopped; "
                                "opening it unchecked", path, timeout)
                    return None
                if progress is not None:
                    progress(f"checking the cache index: {waited:.0f} s so far")
    except BaseException:
        _kill_group(child)
        child.wait()
        raise
    rc = child.returncode
    last = (err.strip().splitlines() or [f"exit status {rc}"])[-1]
    if rc == 0:
        log.info("cache index %s: %s records read back in %.2f s", path, out.strip(),
                 time.monotonic() - t0)
        return None
    if rc == DAMAGED:
        return last
    if -rc in DAMAGE_SIGNALS:
        return f"reading it kills the reader with {signal.Signals(-rc).name}"
    why = f"killed by signal {-rc}" if rc < 0 else last
    log.warning("the check of the cache index %s failed (%s): opening it unchecked", path, why)
    return None


def _kill_group(child: subprocess.Popen) -> None:
    """The child and anything it started (its session is its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)


def _move_aside(path: Path, why: str) -> None:
    """The damaged index goes to ``index.bad-<time>`` (the one before it, if any, is
    removed: one is kept to look at, not one per damage)."""
    for old in path.parent.glob(f"{path.name}.bad-*"):
        shutil.rmtree(old, ignore_errors=True)
    aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
    log.warning("cache index %s cannot be used (%s): moved to %s, rebuilding from the "
                "chunk files", path, why, aside)
    path.rename(aside)
