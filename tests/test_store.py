"""The SSD chunk store on its own (no FUSE, no S3): chunk files as written, read back
and adopted after a restart, on a file system that takes O_DIRECT and on one that
refuses it."""

import functools
import os
import time

import pytest
import trio
import trio.testing

from cachefs.index import Index, IndexCommitError, IndexWriter
from cachefs.stats import Stats
from cachefs.store.chunkstore import HEADER_SIZE, BufferPool, ChunkBuf, ChunkStore, file_size

# lengths around the 4 KiB boundaries the O_DIRECT padding is cut back from
SIZES = (1, 4096 - HEADER_SIZE, 4096 - HEADER_SIZE + 1, 100 * 1024 + 3, 8 * 1024 * 1024)


async def _with_store(cache_dir, body, chunk_size=None):
    ix = Index(cache_dir / "index", 1 << 26)
    try:
        writer = IndexWriter(ix)
        store = ChunkStore(cache_dir, ix, writer, Stats(), limit=1 << 30, chunk_size=chunk_size)
        report = await trio.to_thread.run_sync(store.reconcile)
        async with trio.open_nursery() as n:
            await n.start(writer.run)
            out = await body(store, report)
            n.cancel_scope.cancel()
        return out
    finally:
        ix.close()


def _roundtrip(cache_dir):
    chunks = {os.urandom(16): os.urandom(n) for n in SIZES}

    async def write(store, report):
        for i, (cid, data) in enumerate(chunks.items()):
            if i % 2:  # as the chunk reader does: data in the memory it was fetched into
                buf = ChunkBuf.of(data)
                assert await store.put(cid, buf)
            else:  # as a peer hand-off does: plain bytes
                assert await store.put(cid, data)
        got = {cid: bytes(await store.get(cid, len(d))) for cid, d in chunks.items()}
        return store._odirect, got

    odirect, got = trio.run(_with_store, cache_dir, write)
    assert got == chunks
    for cid, data in chunks.items():  # the O_DIRECT padding is gone: header + data exactly
        assert (cache_dir / "chunks" / cid.hex()[:2] / cid.hex()).stat().st_size == \
            HEADER_SIZE + len(data)
    assert not any((cache_dir / "tmp").iterdir())

    async def reread(store, report):
        assert report == {"tmp_removed": 0, "orphans_adopted": 0, "orphans_removed": 0,
                          "records_dropped": 0}
        return {cid: bytes(await store.get(cid, len(d))) for cid, d in chunks.items()}

    assert trio.run(_with_store, cache_dir, reread) == chunks  # and after a restart
    return odirect


def test_chunk_files_written_with_odirect(tmp_path):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this system")
    assert _roundtrip(tmp_path / "cache") is True


def test_chunk_files_on_a_file_system_without_odirect(memory_fs):
    """ramfs refuses O_DIRECT: the store falls back to buffered writes, same files."""
    assert _roundtrip(memory_fs("64m", "ramfs") / "cache") is False


def test_chunkbuf_layout():
    for n in (0, 1, 4031, 4032, 4033, 8 << 20):
        b = ChunkBuf(n)
        assert len(b.data) == n and len(b.file) % 4096 == 0
        assert len(b.file) >= HEADER_SIZE + n > len(b.file) - 4096
        b.data[:] = b"\x07" * n
        assert bytes(b.file[HEADER_SIZE:HEADER_SIZE + n]) == b"\x07" * n


def test_pooled_chunk_memory_is_reused_only_once_no_view_refers_to_it():
    n = 1 << 20
    pool = BufferPool(file_size(n), keep=32, idle=4)
    a = ChunkBuf(n, pool)
    a.data[:] = b"a" * n
    view = a.data.toreadonly()  # a reader still holds the chunk
    del a
    b = ChunkBuf(n, pool)  # must be other memory
    b.data[:] = b"b" * n
    assert bytes(view) == b"a" * n and pool.statistics()["reused"] == 0
    del view
    c = ChunkBuf(n, pool)  # a's memory, nothing refers to it any more
    assert pool.statistics() == {"size": file_size(n), "held": 2, "idle_max": 4, "reused": 1,
                                 "created": 2}
    c.data[:] = b"c" * n
    assert bytes(b.data) == b"b" * n
    assert ChunkBuf(n - 8192, pool).length == n - 8192  # another size: not from the pool
    assert pool.statistics()["created"] == 2
    # a burst of readers left many free: at most `idle` of them stay behind
    burst = [ChunkBuf(n, pool) for _ in range(10)]
    del burst, b, c
    d = ChunkBuf(n, pool)
    assert pool.statistics()["held"] == 1 + 4
    del d


def test_store_reads_full_chunks_into_reused_memory(tmp_path):
    size = 1 << 20
    chunks = {os.urandom(16): os.urandom(size) for _ in range(3)}

    async def body(store, report):
        for cid, data in chunks.items():
            assert await store.put(cid, data)
        held = []
        for _ in range(3):
            for cid, data in chunks.items():
                got = await store.get(cid, size)
                assert bytes(got) == data
                # readers keep the last two chunks and let go of the others
                held = [*held[-1:], (got, data)]
                del got
                for g, d in held:  # memory handed out again never changes a kept chunk
                    assert bytes(g) == d
                del g
        return store.buffers.statistics()

    st = trio.run(_with_store, tmp_path / "cache", body, size)
    assert st["reused"] >= 5 and st["created"] <= 4, st


@pytest.mark.parametrize("fs", ["ext4", "ramfs"])
@pytest.mark.parametrize("damage", ["bitflip_last", "appended", "truncated", "header"])
def test_damage_found_on_read(tmp_path, memory_fs, fs, damage):
    """A chunk file damaged while the daemon runs is caught by the read that meets it
    (checked reading with O_DIRECT and without): dropped, counted, never returned."""
    cache_dir = (tmp_path if fs == "ext4" else memory_fs("64m", "ramfs")) / "cache"
    n = 100 * 1024 + 3  # the last data byte sits in the O_DIRECT padding's 4 KiB block
    cid, data = os.urandom(16), os.urandom(n)

    async def body(store, report):
        assert await store.put(cid, data)
        f = store.path(cid)
        raw = bytearray(f.read_bytes())
        if damage == "bitflip_last":
            raw[-1] ^= 0x80
        elif damage == "appended":
            raw += b"\0"
        elif damage == "truncated":
            raw = raw[:-1]
        else:
            raw[8] ^= 0x01  # the chunk id in the header
        f.write_bytes(raw)
        got = await store.get(cid, n)
        return got, store.contains(cid), f.exists(), store.stats.snapshot()

    got, contained, exists, counters = trio.run(_with_store, cache_dir, body)
    assert got is None and not contained and not exists
    assert counters.get("chunks_corrupt") == 1


def test_a_pinned_chunk_with_a_bad_file_is_pinned_again_when_fetched_again(tmp_path):
    """A pinned chunk whose file went bad is dropped, and the read fetches it again: it was
    cached unpinned then, and the data set silently lost that pin. It is pinned again;
    unless it was freed meanwhile."""
    a, b = os.urandom(16), os.urandom(16)
    data = os.urandom(100_000)

    async def body(store, report):
        for cid in (a, b):
            assert await store.put(cid, data, pin=True)
            f = store.path(cid)
            raw = bytearray(f.read_bytes())
            raw[-1] ^= 0x80
            f.write_bytes(raw)
            assert await store.get(cid, len(data)) is None  # dropped
        store.forget_repin([b])  # b is freed
        limit, store.limit = store.limit, 0  # a put that cannot cache keeps the intent
        assert not await store.put(a, data)
        store.limit = limit
        for cid in (a, b):  # as the reader does on a miss: fetched again, put unpinned
            assert await store.put(cid, data)
        return store.is_pinned(a), store.is_pinned(b), store.pinned_bytes

    assert trio.run(_with_store, tmp_path, body) == (True, False, file_size(len(data)))


def test_a_failed_fetch_remembered_holds_no_chunk_memory(tmp_path, monkeypatch):
    """A chunk whose fetch failed is remembered for a moment (its next reads fail at
    once). What was remembered was the exception itself, whose traceback held the failed
    fetch's frames and so its chunk memory: up to 1,024 chunks of memory kept out of the
    pool during an outage. A remembered error now holds no frame.  Nor does the flight's
    error its readers raised: its traceback held the flight, which held it, a cycle only a
    full garbage collection let go of (rare in a daemon with millions of live objects)."""
    import gc
    import weakref

    from cachefs.chunks.ids import ObjectVersion
    from cachefs.chunks.reader import ChunkReader
    from cachefs.config import MountSpec, S3Options
    from cachefs.objectstore import ObjectStore, S3Error

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    spec = MountSpec("", "bucket", "", endpoint_url="http://127.0.0.1:9")  # refused
    ref = None
    bufs = []

    async def body(store, report):
        nonlocal ref
        real = store.new_buf

        def new_buf(n):
            b = real(n)
            bufs.append(weakref.ref(b.file))  # its memory
            return b

        store.new_buf = new_buf
        async with ObjectStore(spec, S3Options(max_attempts=1), store.stats) as s3:
            ref = ObjectVersion("", "bucket", "k", "etag", 100_000, 1 << 20, s3).chunk(0)
            async with trio.open_nursery() as n:
                reader = ChunkReader(store, store.stats, n)
                with pytest.raises(S3Error):
                    await reader.get(ref)
                with pytest.raises(S3Error):  # remembered: fails at once
                    await reader.get(ref)
                return [b() is None for b in bufs], store.stats.c["fetch_failures_repeated"]

    gc.collect()
    gc.disable()  # (freed by reference counting, as soon as nothing holds it)
    try:
        assert trio.run(_with_store, tmp_path, body) == ([True], 1)
    finally:
        gc.enable()


def test_chunk_directory_removed_while_running(tmp_path):
    """The 256 chunk directories are made at start; one removed behind the daemon's back
    is made again by the next write into it."""
    cid, data = bytes.fromhex("ab" + "00" * 15), os.urandom(5000)

    async def body(store, report):
        d = store.chunk_dir / "ab"
        assert d.is_dir() and len(list(store.chunk_dir.iterdir())) == 256
        d.rmdir()
        assert await store.put(cid, data)
        return bytes(await store.get(cid, len(data)))

    assert trio.run(_with_store, tmp_path / "cache", body) == data


def test_index_commit_reaches_the_disk_within_the_sync_interval(tmp_path):
    """A commit that came within a second of the last sync is synced (fsync) once that
    second is over, even when nothing else is committed after it: a power loss then
    loses at most about a second of records, as docs/cache.md says."""

    async def body(store, report):
        w = store.writer
        w.sync_interval = 3.0  # (room for a slow fsync between the two commits below)
        await trio.sleep(w.sync_interval)  # the next commit syncs at once
        await w.commit(Index.op_pin(b"a" * 16, True))
        assert w.syncs == 1 and not w._unsynced
        await w.commit(Index.op_pin(b"b" * 16, True))  # within the second: not yet synced
        assert w.syncs == 1 and w._unsynced
        await trio.sleep(w.sync_interval + 0.3)  # nothing else comes
        return w.syncs, w._unsynced

    assert trio.run(_with_store, tmp_path, body) == (2, False)


def test_ops_the_writer_took_are_committed_when_it_is_cancelled(tmp_path):
    """Shutdown cancels the index writer.  Ops it had taken off its queue but not yet
    handed to its thread were lost: neither it nor drain_sync committed them (an inode
    number given out just before a stop changed at the next start)."""
    key = b"ino-key"

    async def main(ix):
        w = IndexWriter(ix)
        async with trio.open_nursery() as n:
            await n.start(w.run)
            await w._limiter.acquire()  # the writer's thread is busy with a batch
            w.submit(Index.op_put_ino(key, 7, 8))
            await trio.testing.wait_all_tasks_blocked()  # taken, waiting for its thread
            n.cancel_scope.cancel()  # the daemon stops
            w._limiter.release()
        w.drain_sync()
        return w.pending

    ix = Index(tmp_path / "index", 1 << 26)
    try:
        assert trio.run(main, ix) == 0
        assert ix.get_ino(key) == 7
    finally:
        ix.close()


def _watched(writer: IndexWriter):
    """(a task running ``writer``, an event set once it has stopped)."""
    stopped = trio.Event()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await writer.run(task_status=task_status)
        finally:
            stopped.set()

    return run, stopped


def test_a_commit_after_the_writer_stopped_returns_and_is_committed(tmp_path):
    """A task that shields its commit from shutdown (a drop keeping index and files
    consistent) and commits once the cancelled writer has stopped waited for it forever:
    the unmount hung. It now commits by itself."""
    key = b"ino-key"

    async def main(ix):
        w = IndexWriter(ix)
        done, outcome = trio.Event(), []
        writer, stopped = _watched(w)

        async def shielded_commit():
            with trio.CancelScope(shield=True) as sc:
                guard.append(sc)
                await stopped.wait()
                await w.commit(Index.op_put_ino(key, 7, 8))
                outcome.append("committed")
            done.set()

        async def watchdog():  # on the old code: lift the shield so that the test ends
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await done.wait()
            guard[0].shield = False

        guard: list[trio.CancelScope] = []
        async with trio.open_nursery() as n:
            await n.start(writer)
            n.start_soon(shielded_commit)
            n.start_soon(watchdog)
            await trio.testing.wait_all_tasks_blocked()
            n.cancel_scope.cancel()  # the daemon stops
        return outcome

    ix = Index(tmp_path / "index", 1 << 26)
    try:
        assert trio.run(main, ix) == ["committed"]
        assert ix.get_ino(key) == 7
    finally:
        ix.close()


def test_a_drop_cancelled_half_way_still_removes_its_files(tmp_path):
    """A drop (the evictor's, a peer request's under its time-out) cancelled while its
    index deletion was being committed: the records went, the files stayed, outside the
    cache's accounting, and a clean stop left them for the next start to adopt."""
    cid, data = os.urandom(16), os.urandom(100_000)

    async def body(store, report):
        assert await store.put(cid, data)
        async with trio.open_nursery() as n:
            with trio.CancelScope() as sc:
                async with store.writer._limiter:  # index commits wait meanwhile
                    n.start_soon(store.drop, [cid])
                    await trio.testing.wait_all_tasks_blocked()
                    n.cancel_scope.cancel()  # the drop is cancelled, we are not
            assert not sc.cancelled_caught
        return (store.contains(cid), store.used,
                await trio.to_thread.run_sync(os.path.exists, store.path(cid)))

    assert trio.run(_with_store, tmp_path, body) == (False, 0, False)


def test_a_commit_that_fails_with_a_bug_still_answers_its_waiters(tmp_path):
    """A batch whose commit raised something other than an LMDB error (a bug, a thread
    that could not start) ended the writer without telling its waiters: one that waited
    shielded from the stop (a drop) waited for ever, and the unmount with it."""
    def bad(ix, txn):
        raise RuntimeError("a bug")

    async def main(ix):
        w = IndexWriter(ix)
        heard = []

        async def shielded_commit():
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await w.commit(bad)
                except IndexCommitError as e:
                    heard.append(str(e))

        with pytest.raises(BaseExceptionGroup) as ei:  # as the daemon's nursery sees it
            async with trio.open_nursery() as n:
                await n.start(w.run)
                n.start_soon(shielded_commit)
        assert ei.value.subgroup(RuntimeError) is not None
        return heard

    ix = Index(tmp_path / "index", 1 << 26)
    try:
        assert trio.run(main, ix) == ["a bug"]
    finally:
        ix.close()


def test_an_index_that_cannot_be_opened_for_want_of_memory_is_left_as_it_is(tmp_path):
    """A start under an address-space limit (a scheduler's, ``ulimit -v``) failed to map
    the index: ENOMEM was taken for damage, the healthy index moved aside and rebuilt
    empty (its pins lost), and a second such start deleted the first one moved aside.
    Now the start fails on one line and the index stays, records and all."""
    import subprocess
    import sys

    from cachefs import index

    ix = Index(tmp_path / "index", 1 << 26)
    ix.apply([Index.op_put_chunk(b"c" * 16, index.ChunkRec(5, b"k" * 16, 1.0, True))])
    ix.close()
    script = f"""
import resource, sys
from cachefs.errors import QuietError
from cachefs.index import open_index
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (96 << 20),) * 2)
try:
    open_index(__import__("pathlib").Path({str(tmp_path / "index")!r}), 1 << 32)
except QuietError as e:
    print("QuietError:", e)
"""
    for _ in range(2):  # a restart does the same
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("QuietError: cannot open the cache "
                                                         "index "), (r.stdout, r.stderr)
        assert r.stdout.strip().endswith("Cannot allocate memory (the index is left as it "
                                         "is)"), r.stdout
    assert not list(tmp_path.glob("index.bad-*"))
    ix = index.open_index(tmp_path / "index", 1 << 26)
    try:
        assert [(k, rec.pinned) for k, rec in ix.iter_chunks()] == [(b"c" * 16, True)]
    finally:
        ix.close()


def test_an_index_whose_meta_pages_are_torn_is_rebuilt(tmp_path):
    """Damage does not always raise one of LMDB's corruption errors: torn meta pages (the
    index syncs without its meta pages) read as "LMDB data format v3238002689 is not
    supported", a plain lmdb.Error. Taken for "not the index's fault" like ENOMEM, it
    failed every start; it is moved aside and rebuilt."""
    from cachefs import index

    ix = Index(tmp_path / "index", 1 << 26)
    ix.apply([Index.op_put_chunk(b"c" * 16, index.ChunkRec(5, b"k" * 16, 1.0, True))])
    ix.close()
    f = tmp_path / "index" / "data.mdb"
    raw = bytearray(f.read_bytes())
    for meta in (0, 4096):  # both meta pages: the version field after the page header
        raw[meta + 20:meta + 24] = (3238002689).to_bytes(4, "little")
    f.write_bytes(raw)
    ix = index.open_index(tmp_path / "index", 1 << 26)
    try:
        assert list(ix.iter_chunks()) == []
    finally:
        ix.close()
    assert len(list(tmp_path.glob("index.bad-*"))) == 1


def test_the_index_check_dies_with_its_daemon():
    """A daemon SIGKILLed during its start (a `cachefs mount` that gave up) left its index
    check reading the index for up to CHECK_TIMEOUT (600 s), with nobody to stop it."""
    import signal
    import subprocess
    import sys

    child = ("import os, sys, time; from cachefs import index_check; "
             "index_check._die_with_parent(int(sys.argv[1])); time.sleep(60)")
    daemon = subprocess.Popen(
        [sys.executable, "-c", "import os, subprocess, sys, time; "
         f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]); "
         "print(p.pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        pid = int(daemon.stdout.readline())
        time.sleep(0.5)  # (its prctl done)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] == "Z":
                        break  # (a zombie until init reaps it)
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            assert not os.path.exists(f"/proc/{pid}"), "the check outlived its daemon"
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()


def test_index_check_reads_records_as_the_index_writes_them(tmp_path):
    """The child-process walk of the index (index_check, which imports only lmdb) decodes
    records with its own copy of the layouts; they must be the index's."""
    from cachefs import index, index_check

    assert index_check.CHUNK_REC.format == index._REC.format
    ix = index.Index(tmp_path / "index", 1 << 26)
    ix.apply([index.Index.op_put_chunk(b"c" * 16, index.ChunkRec(5, b"k" * 16, 1.0))])
    ix.apply([index.Index.op_put_pin_record(b"p" * 20, b'{"key": "k", "versions": []}')])
    with ix.env.begin() as txn:  # every database the index has, the walk reads
        assert {bytes(k) for k, _ in txn.cursor()} == set(index_check.NAMED_DBS)
    ix.close()
    assert index.check_in_child(tmp_path / "index") is None
    # the chunk, the version and the pin record (pins were left out of the walk, so a
    # damaged page there passed the start-up check and could kill the daemon at `free`)
    assert index_check.walk(str(tmp_path / "index")) == 3


def test_small_chunks_stay_within_the_limit_on_disk(tmp_path):
    """The limit counts what chunk files take on disk (header, whole 4 KiB blocks), not
    bytes of data: 1 KiB objects (labels, JSON) took 4 KiB each, so a cache of them used
    4x its limit on disk."""
    limit = 1 << 20

    async def body(store, report):
        store._set_limit(limit)
        for i in range(1000):
            assert await store.put(i.to_bytes(16, "big"), os.urandom(1000))
        return store.statistics()

    st = trio.run(_with_store, tmp_path, body)
    files = [f for d in (tmp_path / "chunks").iterdir() for f in d.iterdir()]
    on_disk = sum(f.stat().st_blocks * 512 for f in files)
    assert on_disk <= limit, (on_disk, len(files))
    assert st["used_bytes"] == len(files) * file_size(1000) == on_disk
    assert st["chunks"] == len(files) >= 200


def test_a_chunk_put_while_its_drop_runs_keeps_its_file(tmp_path):
    """A drop takes the chunk out of the index, then unlinks its file. A put of the same
    chunk between the two (a reader fetched it again) wrote a new file that the drop then
    unlinked: the index said cached, the file was gone, and the next read fetched it once
    more. The put now waits for the drop to finish."""
    cid, data = os.urandom(16), os.urandom(100_000)

    async def body(store, report):
        assert await store.put(cid, data)
        async with trio.open_nursery() as n:
            async with store.writer._limiter:  # index commits wait meanwhile
                n.start_soon(store.drop, [cid])
                while store.contains(cid):  # the drop took it out, and waits for its commit
                    await trio.lowlevel.checkpoint()
                n.start_soon(store.put, cid, data)
                await trio.sleep(0.2)  # the put's file write, on the old code
        return store.contains(cid), bytes(await store.get(cid, len(data)) or b"")

    contains, got = trio.run(_with_store, tmp_path, body)
    assert contains and got == data


def test_a_second_put_of_a_chunk_being_written_leaves_no_record_without_its_file(tmp_path):
    """Two puts of one chunk at once (a read-ahead and a preload), and a drop once the
    first is cached: the second put's file, renamed over the first's, was unlinked by the
    drop, and its record committed after it, so the index said cached over no file. A
    second put now waits for the first and finds the chunk cached."""
    import threading

    cid, data = os.urandom(16), os.urandom(100_000)
    gate, renamed = threading.Event(), threading.Event()

    async def body(store, report):
        real, calls = store._write_file, []

        def write_file(*a):  # the first write waits at the gate, the others go on
            calls.append(1)
            if len(calls) == 1:
                gate.wait(10)
            real(*a)
            if len(calls) == 1 or gate.is_set():
                renamed.set()

        store._write_file = write_file
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(store.put, cid, data)  # held at the gate
                await trio.testing.wait_all_tasks_blocked()
                renamed.clear()
                n.start_soon(store.put, cid, data)  # the old code writes and caches it
                await trio.sleep(0.3)  # (its index commit included)
                async with store.writer._limiter:  # index commits wait meanwhile
                    gate.set()
                    # the first put's file is in place
                    assert await trio.to_thread.run_sync(renamed.wait, 10)
                    await trio.testing.wait_all_tasks_blocked()
                    n.start_soon(store.drop, [cid])  # drops what is cached
                    await trio.testing.wait_all_tasks_blocked()
        on_disk = await trio.to_thread.run_sync(os.path.exists, store.path(cid))
        return store.contains(cid), on_disk, len(calls), bytes(await store.get(cid, len(data))
                                                              or b"")

    contains, on_disk, writes, got = trio.run(_with_store, tmp_path, body)
    assert contains == on_disk
    assert writes == 1
    assert contains and got == data


def test_a_read_that_found_the_file_gone_keeps_the_chunk_put_again_meanwhile(tmp_path):
    """A read of a cached chunk whose file an eviction unlinked under it finds it missing.
    If a reader had fetched and put the chunk again meanwhile, the read dropped that good
    copy (a false "missing on disk" warning, another S3 fetch, and a pin lost). The file
    is now read once more before it is called bad."""
    import threading

    cid, data = os.urandom(16), os.urandom(100_000)
    opened, did_read, read = threading.Event(), threading.Event(), threading.Event()

    async def body(store, report):
        assert await store.put(cid, data)
        real, calls = store._read_file, []

        def read_file(*a):  # the first read waits before it opens the file and after
            calls.append(1)
            if len(calls) > 1:
                return real(*a)
            opened.wait(10)
            out = real(*a)
            did_read.set()
            read.wait(10)
            return out

        store._read_file = read_file
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                got = []

                async def get():
                    got.append(await store.get(cid, len(data)))

                n.start_soon(get)
                await trio.testing.wait_all_tasks_blocked()
                await store.drop([cid])  # evicted under the read
                opened.set()  # the read finds the file gone
                assert await trio.to_thread.run_sync(did_read.wait, 10)
                assert await store.put(cid, data, pin=True)  # fetched and pinned again
                read.set()
        return (bytes(got[0] or b""), store.is_pinned(cid), store.stats.c["chunks_missing"],
                await trio.to_thread.run_sync(os.path.exists, store.path(cid)))

    assert trio.run(_with_store, tmp_path, body) == (data, True, 0, True)


def test_a_pinning_read_of_a_cached_chunk_keeps_it_through_an_eviction(tmp_path):
    """preload --pin of a chunk already cached: the chunk was pinned only once its read
    returned, and an eviction while it was read left nothing to pin (the data set was
    reported kept in part). It is now pinned before the read."""
    import threading

    from cachefs.chunks.ids import ObjectVersion
    from cachefs.chunks.reader import ChunkReader

    ref = ObjectVersion("", "bucket", "key", "etag", 100_000, 1 << 20).chunk(0)
    data = os.urandom(ref.length)
    did_read, go_on = threading.Event(), threading.Event()

    async def body(store, report):
        assert await store.put(ref.cid, data)
        real = store._read_file

        def read_file(*a):  # waits once it has read the file
            out = real(*a)
            did_read.set()
            go_on.wait(10)
            return out

        store._read_file = read_file
        got = []
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                reader = ChunkReader(store, store.stats, n)

                async def get():
                    got.append(bytes(await reader.get(ref, pin=True)))

                n.start_soon(get)
                assert await trio.to_thread.run_sync(did_read.wait, 10)
                await store._evict_some(1)  # the evictor picks the least recently used
                go_on.set()
        return got, store.is_pinned(ref.cid), store.contains(ref.cid)

    assert trio.run(_with_store, tmp_path, body) == ([data], True, True)


@pytest.mark.parametrize(("child", "damaged"), [
    ("kill -KILL $$", False),  # the OOM killer, an operator
    ("echo 'ModuleNotFoundError: No module named cachefs' >&2; exit 1", False),
    ("sleep 30", False),  # over the time limit: stopped
    ("kill -BUS $$", True),  # what a damaged branch page does to its reader
    ("echo 'CorruptedError: mdb_cursor_get: MDB_CORRUPTED' >&2; exit 3", True),
])
def test_only_damage_moves_the_index_aside(tmp_path, monkeypatch, child, damaged):
    """The index is moved aside (its pins, inode numbers and listings lost) only when its
    check in a child process finds damage. A child that could not run, was killed from
    outside or took too long says nothing about the index, which is then opened as it is;
    each of those moved a healthy index aside. (The interpreter the check runs is
    replaced by a script that behaves like each case.)"""
    import sys

    from cachefs import index

    ix = Index(tmp_path / "index", 1 << 26)
    ix.apply([Index.op_put_chunk(b"c" * 16, index.ChunkRec(5, b"k" * 16, 1.0))])
    ix.close()
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{child}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setattr(index, "CHECK_TIMEOUT", 1.0)
    ix = index.open_index(tmp_path / "index", 1 << 26)
    try:
        kept = dict(ix.iter_chunks())
    finally:
        ix.close()
    assert (kept == {}) == damaged, kept
    assert bool(list(tmp_path.glob("index.bad-*"))) == damaged


def test_an_orphan_with_a_bad_length_field_is_removed_and_the_others_adopted(tmp_path):
    """Chunk files without a record (all of them, after the index was rebuilt) are read to
    be adopted. A flipped bit in one header's length asked for exabytes: OverflowError or
    MemoryError, outside the OSError start-up handles, and every start of the daemon
    failed on that one file."""
    good = {os.urandom(16): os.urandom(n) for n in (5000, 70_000)}
    bad = {os.urandom(16): os.urandom(3000) for _ in range(3)}

    async def write(store, report):
        for cid, data in {**good, **bad}.items():
            assert await store.put(cid, data)
        return {cid: store.path(cid) for cid in bad}

    paths = trio.run(_with_store, tmp_path, write, 1 << 20)
    for f, length in zip(paths.values(), (1 << 62, (1 << 64) - 1, 4000), strict=True):
        raw = bytearray(f.read_bytes())
        raw[24:32] = length.to_bytes(8, "little")  # the header's length field
        f.write_bytes(raw)
    import shutil
    shutil.rmtree(tmp_path / "index")  # every file an orphan

    async def reread(store, report):
        got = {cid: bytes(await store.get(cid, len(d))) for cid, d in good.items()}
        return report, got, [f.exists() for f in paths.values()]

    report, got, exist = trio.run(_with_store, tmp_path, reread, 1 << 20)
    assert report["orphans_adopted"] == 2 and report["orphans_removed"] == 3
    assert got == good and exist == [False] * 3


def test_a_read_that_fails_for_want_of_descriptors_keeps_the_file(tmp_path):
    """Any error reading a chunk file counted as a bad file: out of descriptors (EMFILE),
    a read dropped the chunk and deleted its file, pinned or not. Only a bad file (its
    size, header or checksum, or EIO) is dropped now; the read misses and the file stays."""
    import resource

    cid, data = os.urandom(16), os.urandom(100_000)

    async def body(store, report):
        assert await store.put(cid, data, pin=True)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1, hard))
        filler = []
        try:
            while True:  # every descriptor below the limit taken
                try:
                    filler.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    break
            missed = await store.get(cid, len(data))
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        again = await store.get(cid, len(data))
        return (missed, store.is_pinned(cid), store.path(cid).exists(), bytes(again),
                store.stats.snapshot())

    missed, pinned, exists, again, counters = trio.run(_with_store, tmp_path, body)
    assert missed is None and pinned and exists and again == data
    assert counters.get("ssd_read_errors") == 1 and not counters.get("chunks_corrupt")


def test_a_chunk_size_change_on_an_index_larger_than_its_map(tmp_path):
    """An index reopened is mapped at its used size when that is larger than the map asked
    for. A chunk-size change rewrites every pinned record there, outside the writer that
    grows a full map: MapFullError, and the daemon could not start."""
    import time

    from cachefs.index import ChunkRec, open_index

    d = tmp_path / "index"
    ix = Index(d, 64 * 1024)
    ix.set_chunk_size(1 << 20)
    ix.apply([Index.op_put_chunk(os.urandom(16), ChunkRec(100, b"c" * 16, time.time(), True))
              for _ in range(3000)])  # grows the map
    ix.close()
    ix = open_index(d, 64 * 1024)
    try:
        assert ix.set_chunk_size(2 << 20) == (1 << 20, 3000, 300_000)
        assert not any(rec.pinned for _, rec in ix.iter_chunks())
    finally:
        ix.close()


def test_a_tmp_dir_removed_under_the_store_is_made_again(tmp_path):
    """The cache dir's tmp/ is empty most of the time, and cleaners of empty directories
    (systemd-tmpfiles, `find -empty -delete`) remove it: every chunk write then failed
    with ENOENT until the next start, and `stats` showed a cache that never warmed, with
    no word of why. The write makes tmp/ again; `stats` says when writes fail."""
    import shutil

    from cachefs.report import format_stats

    cid, data = os.urandom(16), os.urandom(70_000)

    async def body(store, report):
        shutil.rmtree(store.tmp_dir)
        kept = await store.put(cid, data)
        got = await store.get(cid, len(data))
        # a write that fails all the same (here: the cache dir's chunks/ made unwritable
        # by a file where the chunk's directory goes) is counted and said
        other = os.urandom(16)
        d = store.path(other).parent
        shutil.rmtree(d, ignore_errors=True)
        d.write_bytes(b"")
        refused = await store.put(other, data)
        return kept, bytes(got or b""), refused, store.stats.snapshot(), store.statistics()

    kept, got, refused, counters, cache = trio.run(_with_store, tmp_path, body)
    assert kept and got == data and not refused
    assert counters.get("ssd_write_errors") == 1 and cache["last_write_error"]["error"]
    text = format_stats("/m", {"counters": counters, "cache": cache, "uptime_s": 1,
                               "open_files": 0, "in_flight_fetches": 0})
    line = next(x for x in text.splitlines() if x.strip().startswith("not kept"))
    assert line.startswith("  not kept   1 chunk write failed, 0 chunks refused (the cache is "
                           "full of pinned data); last write error 0 s ago: "), line
    assert "Not a directory" in line or "File exists" in line, line


def test_directories_and_links_made_by_hand_in_the_cache_do_not_stop_the_start(tmp_path):
    """Start-up removes what it does not know in tmp/ and chunks/; a directory there
    (`mkdir chunks/ab/junk`) failed every start with IsADirectoryError, and a link in
    chunks/ to a directory was walked, its files taken for orphans and deleted."""
    cid, data = os.urandom(16), os.urandom(5000)

    async def write(store, report):
        assert await store.put(cid, data)

    trio.run(_with_store, tmp_path, write)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the cache's")
    (tmp_path / "chunks" / "ab" / "junk").mkdir()
    (tmp_path / "chunks" / "ab" / "junk" / "f").write_text("x")
    (tmp_path / "chunks" / "ab" / ("0" * 32)).mkdir()  # named like a chunk
    (tmp_path / "tmp" / "d").mkdir()
    (tmp_path / "chunks" / "zz").symlink_to(outside)

    async def reread(store, report):
        return report, bytes(await store.get(cid, len(data)))

    report, got = trio.run(_with_store, tmp_path, reread)
    assert got == data and report["orphans_removed"] == 2 and report["tmp_removed"] == 1
    assert not (tmp_path / "chunks" / "ab" / "junk").exists()
    assert not (tmp_path / "chunks" / "zz").exists()
    assert (outside / "keep.txt").read_text() == "not the cache's"


def test_strays_in_chunks_go_and_a_linked_tmp_or_chunks_is_refused(tmp_path):
    """A file where a chunk directory belongs (`chunks/fe`) failed every start
    (FileExistsError); a chunk file in another directory than its name's was adopted, never
    read, and its space counted at every start; a directory with a name no chunk directory
    has stayed. And `tmp/` or `chunks/` made a link (to faster storage, say) was followed:
    each start deleted what its target held. Such a link is refused now."""
    import shutil

    from cachefs.errors import QuietError

    cid = bytes.fromhex("ab" + "11" * 15)
    data = os.urandom(5000)

    async def write(store, report):
        assert await store.put(cid, data)

    trio.run(_with_store, tmp_path, write)
    chunks = tmp_path / "chunks"
    shutil.copy(chunks / "ab" / cid.hex(), chunks / "cd" / cid.hex())  # the wrong place
    (chunks / "fe").rmdir()
    (chunks / "fe").write_text("x")
    (chunks / "junk").mkdir()
    (chunks / "junk" / cid.hex()).write_text("x")

    async def reread(store, report):
        return report, bytes(await store.get(cid, len(data)))

    report, got = trio.run(_with_store, tmp_path, reread)
    assert got == data and report["orphans_removed"] == 1, report
    assert not (chunks / "cd" / cid.hex()).exists() and not (chunks / "junk").exists()
    assert (chunks / "fe").is_dir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the cache's")
    shutil.rmtree(tmp_path / "tmp")
    (tmp_path / "tmp").symlink_to(outside)
    with pytest.raises(QuietError, match="tmp is a link: cachefs keeps its files in the "
                                         "cache dir itself"):
        trio.run(_with_store, tmp_path, reread)
    assert (outside / "keep.txt").read_text() == "not the cache's"


def test_a_chunk_that_cannot_fit_beside_the_pinned_ones_evicts_nothing(tmp_path):
    """A cache nearly full of pinned data: a chunk that could not fit even with every
    unpinned chunk gone evicted them all first, then was left uncached: each such chunk
    wiped the cache's other data."""
    n = 4096 - HEADER_SIZE  # a 4 KiB file
    ix = Index(tmp_path / "index", 1 << 26)

    async def main():
        writer = IndexWriter(ix)
        store = ChunkStore(tmp_path, ix, writer, Stats(), limit=10 * 4096, high=1.0, low=0.9)
        await trio.to_thread.run_sync(store.reconcile)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(8):
                assert await store.put(bytes([i]) * 16, os.urandom(n), pin=True)
            warm = b"w" * 16
            assert await store.put(warm, os.urandom(n))
            assert not await store.reserve(3 * 4096)  # 8 pinned + 3 > 10
            assert store.contains(warm) and store.stats.c["evictions"] == 0
            assert await store.reserve(2 * 4096)  # fits once the unpinned one goes
            assert not store.contains(warm)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        ix.close()


def test_access_times_reach_the_index_with_no_read_after_them(tmp_path):
    """Access times are written once a second, by the next read: after a burst of reads
    and then none, they waited in memory for good, and a SIGKILL lost them (a restart's
    eviction order then took the burst's chunks for cold)."""
    cid, data = os.urandom(16), os.urandom(5000)

    def last_access() -> float:
        return store_ix[0].get_chunk(cid).last_access

    store_ix = []

    async def body(store, report):
        store_ix.append(store.index)
        assert await store.put(cid, data)
        async with trio.open_nursery() as n:
            await n.start(store.evictor)
            await trio.sleep(1.1)
            store.flush_touches()  # (a second from now, the next read's touch would go)
            before = last_access()
            assert bytes(await store.get(cid, len(data))) == data  # its touch waits
            with trio.fail_after(5):
                while last_access() == before:  # noqa: ASYNC110 - an LMDB record
                    await trio.sleep(0.1)
            n.cancel_scope.cancel()

    trio.run(_with_store, tmp_path, body)


def test_pin_records_under_a_prefix_are_read_in_slices(tmp_path):
    """A free of a data set with a million pinned names read all of their records under
    the index's resize lock (about a second: the writer's map growth and the trio thread's
    inode lookups waited). Read 4096 at a time now: every record once, across slices."""
    ix = Index(tmp_path / "index", 1 << 26)
    try:
        recs = {f"a/{i:05d}".encode(): b"%d" % i for i in range(9000)}
        ix.apply([Index.op_put_pin_record(k, v)
                  for k, v in {**recs, b"a": b"x", b"b/1": b"y", b"a/": b"z"}.items()])
        got = ix.get_pin_records([b"b/1"], [b"a/"])
        assert got == {**recs, b"a/": b"z", b"b/1": b"y"}
        assert ix.get_pin_records([], [b"c/"]) == {}
    finally:
        ix.close()


def test_a_start_killed_while_adopting_a_lost_index_keeps_what_it_verified(tmp_path,
                                                                            monkeypatch):
    """After an index is lost, start-up verifies every chunk file before adopting it (45
    min for 8 TB at 3 GB/s) and committed the adoptions only at the end: a start killed
    meanwhile (a probe's time-out, a reboot) began again from nothing, every time. They are
    committed as they go now."""
    import shutil

    from cachefs.store import chunkstore

    chunks = {os.urandom(16): os.urandom(3000) for _ in range(7)}

    async def write(store, report):
        for cid, data in chunks.items():
            assert await store.put(cid, data)

    trio.run(_with_store, tmp_path, write)
    shutil.rmtree(tmp_path / "index")  # lost: every file an orphan
    monkeypatch.setattr(chunkstore, "ADOPT_BATCH", 2)
    verify, seen = chunkstore.ChunkStore._read_verify, []

    def killed_after_five(self, f, cid):
        if len(seen) == 5:
            raise KeyboardInterrupt  # the start is killed
        seen.append(cid)
        return verify(self, f, cid)

    monkeypatch.setattr(chunkstore.ChunkStore, "_read_verify", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        trio.run(_with_store, tmp_path, write)
    ix = Index(tmp_path / "index", 1 << 26)
    try:
        kept = {cid for cid, _ in ix.iter_chunks()}
    finally:
        ix.close()
    assert len(kept) == 4 and kept <= set(seen), kept  # two batches of two
    monkeypatch.setattr(chunkstore.ChunkStore, "_read_verify", verify)

    async def reread(store, report):
        return report, {cid: bytes(await store.get(cid, len(d))) for cid, d in chunks.items()}

    report, got = trio.run(_with_store, tmp_path, reread)
    assert got == chunks and report["orphans_adopted"] == 3


def test_a_put_the_stop_cancels_while_it_writes_leaves_its_file_with_its_record(tmp_path):
    """The stop cancelled a put whose chunk file was being written: the file was renamed
    into place, then its record's commit (made by the put itself once the writer had
    stopped) was cancelled before it reached the index. A clean stop left a file the
    index did not know, adopted unpinned at the next start even when the put pinned."""
    import threading

    cid, data = os.urandom(16), os.urandom(100_000)
    gate, entered = threading.Event(), threading.Event()

    async def main(ix):
        writer = IndexWriter(ix)
        store = ChunkStore(tmp_path, ix, writer, Stats(), limit=1 << 30)
        await trio.to_thread.run_sync(store.reconcile)
        real = store._write_file

        def write_file(*a):
            entered.set()
            gate.wait(10)
            real(*a)

        store._write_file = write_file

        run_writer, stopped = _watched(writer)

        async def open_gate_once_the_writer_stopped():
            await stopped.wait()
            gate.set()

        with trio.fail_after(20):
            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as daemon:
                    await daemon.start(run_writer)
                    daemon.start_soon(functools.partial(store.put, cid, data, pin=True))
                    await trio.to_thread.run_sync(entered.wait, 10)
                    outer.start_soon(open_gate_once_the_writer_stopped)
                    daemon.cancel_scope.cancel()  # the daemon stops
        return store.path(cid)

    ix = Index(tmp_path / "index", 1 << 26)
    try:
        path = trio.run(main, ix)
        rec = ix.get_chunk(cid)
    finally:
        ix.close()
    assert path.exists()
    assert rec is not None and rec.pinned


def test_orphans_the_index_cannot_take_are_removed_not_a_failed_start(tmp_path, monkeypatch):
    """A lost index's chunk files to adopt on a disk too full for the index to grow: the
    adoption commit failed and so did every start. The files that could not be adopted
    are removed (only their warmth is lost) and the start goes on; an adopted file is as
    recent as its mtime, not the start."""
    import shutil

    import cachefs.index

    chunks = {os.urandom(16): os.urandom(5000) for _ in range(3)}

    async def write(store, report):
        for cid, data in chunks.items():
            assert await store.put(cid, data)

    trio.run(_with_store, tmp_path, write)
    old = time.time() - 3600
    for cid in chunks:
        os.utime(tmp_path / "chunks" / cid.hex()[:2] / cid.hex(), (old, old))
    shutil.move(tmp_path / "index", tmp_path / "index.lost")
    real = cachefs.index.commit_fails
    monkeypatch.setattr(cachefs.index, "commit_fails",
                        lambda ops: any(getattr(op, "table", None) == "chunks" for op in ops))

    async def full(store, report):
        return report, store.statistics()["chunks"]

    report, n = trio.run(_with_store, tmp_path, full)
    assert (report["orphans_adopted"], report["orphans_removed"], n) == (0, 3, 0)
    assert not [p for p in (tmp_path / "chunks").rglob("*") if p.is_file()]
    # with room again: adopted, as old as their files
    monkeypatch.setattr(cachefs.index, "commit_fails", real)
    trio.run(_with_store, tmp_path, write)
    for cid in chunks:
        os.utime(tmp_path / "chunks" / cid.hex()[:2] / cid.hex(), (old, old))
    shutil.rmtree(tmp_path / "index")

    async def adopted(store, report):
        return report, [store.index.get_chunk(c).last_access for c in chunks]

    report, when = trio.run(_with_store, tmp_path, adopted)
    assert report["orphans_adopted"] == 3
    assert all(abs(w - old) < 1 for w in when), when


def test_room_made_for_the_index_on_a_full_disk_spares_pins_and_what_lies_outside(
        tmp_path, memory_fs):
    """make_room, on a disk another program filled: tmp/ first, then chunk files the
    index does not know and unpinned ones, the least recently used first, until 5% of the
    disk is free; never a pinned chunk, never a file through a link."""
    from cachefs.store.chunkstore import make_room

    d = memory_fs("4m") / "cache"
    a, b, c, orphan = (os.urandom(16) for _ in range(4))
    data = os.urandom(100_000)

    async def fill(store, report):
        for cid in (a, b, c, orphan):
            assert await store.put(cid, data)
        assert await store.set_pinned([a], True) == 1
        await store.writer.commit(Index.op_touch(a, 1000.0), Index.op_touch(b, 2000.0),
                                  Index.op_delete_chunk(orphan))
        return {cid: store.path(cid) for cid in (a, b, c, orphan)}

    paths = trio.run(_with_store, d, fill)
    os.utime(paths[orphan], (1500, 1500))  # older than b, newer than pinned a
    (d / "tmp" / "junk").write_bytes(b"x" * 8192)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    link = d / "chunks" / "fe"
    if not any(link.iterdir()):
        link.rmdir()
        link.symlink_to(outside)
    with open(d.parent / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    removed, nbytes = make_room(d)
    assert removed == 3 and nbytes > 200_000, (removed, nbytes)  # junk, orphan, b
    assert not (d / "tmp" / "junk").exists()
    assert not paths[orphan].exists() and not paths[b].exists()
    assert paths[a].exists() and paths[c].exists()
    assert (outside / "precious.txt").read_text() == "mine"
    assert make_room(d) == (0, 0)  # room enough now


def test_adopted_chunks_are_looked_at_for_pins_even_after_a_start_that_crashed(tmp_path):
    """The chunk files a start adopted are marked, in the adoption's commit, as still to
    be looked at for pins; a start killed before it pinned them again (pin_adopted) left
    them unpinned for good. The next start looks at every unpinned chunk then."""
    import shutil

    chunks = [os.urandom(16) for _ in range(3)]

    async def write(store, report):
        for cid in chunks:
            assert await store.put(cid, os.urandom(5000))

    trio.run(_with_store, tmp_path, write)
    shutil.rmtree(tmp_path / "index")

    async def state(store, report):
        return report["orphans_adopted"], store.repin_pending, store.repin_candidates()

    assert trio.run(_with_store, tmp_path, state) == (3, False, set(chunks))
    # that start ended before pin_adopted: the next one looks at every unpinned chunk
    assert trio.run(_with_store, tmp_path, state) == (0, True, set(chunks))

    async def pin_one(store, report):
        return store.pin_adopted(chunks[:1]), store.repin_pending

    assert trio.run(_with_store, tmp_path, pin_one) == (1, False)
    assert trio.run(_with_store, tmp_path, state) == (0, False, set())


def test_s3_errors_are_classified_for_what_a_retry_can_do():
    """TLS that fails verification is final, in words (it was "operation not permitted",
    errno 1 of ssl.SSLError, retried 6 times); a 408 from a load balancer is retried (it
    was final); S3 throttling waits from 0.5 s, not 0.1 s, between attempts."""
    import ssl

    import botocore.exceptions

    from cachefs.config import MountSpec, S3Options
    from cachefs.errors import S3Error
    from cachefs.objectstore import ObjectStore, _Retry

    s3 = ObjectStore(MountSpec("", "bkt", ""), S3Options(), Stats())
    bad = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                                          "verify failed: unable to get local issuer")
    bad.verify_message = "unable to get local issuer certificate"
    wrapped = botocore.exceptions.SSLError(endpoint_url="https://s3.example", error=bad)
    wrapped.__cause__ = bad
    c = s3._classify(wrapped)
    assert type(c) is S3Error and "certificate verify failed" in str(c), repr(c)
    assert "not permitted" not in str(c)

    def answer(status, code):
        return botocore.exceptions.ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get")

    assert isinstance(s3._classify(answer(408, "RequestTimeout")), _Retry)
    assert isinstance(s3._classify(answer(408, "408")), _Retry)
    slow = s3._classify(answer(503, "SlowDown"))
    five = s3._classify(answer(500, "InternalError"))
    tries = 2000
    assert max(s3._backoff(1, five) for _ in range(tries)) <= 0.1
    assert 0.3 < max(s3._backoff(1, slow) for _ in range(tries)) <= 0.5
    assert 1.5 < max(s3._backoff(3, slow) for _ in range(tries)) <= 2.0
