"""The read path through a real FUSE mount against a real S3 endpoint (moto)."""

from __future__ import annotations

import errno
import os
import random
import re
import threading
import time

import pytest
from cachefs_env import wait_for

from cachefs.prefetch import FilePrefetcher

CS = 64 * 1024  # the fixture's chunk size

pytestmark = pytest.mark.fuse


def put(s3, bucket, key, data):
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return data


SIZES = {"zero": 0, "one": 1, "cs-1": CS - 1, "cs": CS, "cs+1": CS + 1, "several": 5 * CS + 7}


def test_bytes_equal_s3(s3, bucket, mounts, proxy):
    rnd = random.Random(1)
    objs = {name: put(s3, bucket, f"sizes/{name}.bin", rnd.randbytes(n))
            for name, n in SIZES.items()}
    m = mounts(f"s3://{bucket}")
    for name, data in objs.items():
        p = m.path(f"sizes/{name}.bin")
        assert p.stat().st_size == len(data)
        # sequential, in odd-sized pieces
        with open(p, "rb", buffering=0) as f:
            got = bytearray()
            while piece := f.read(10_007):
                got += piece
        assert bytes(got) == data, name
        with open(p, "rb", buffering=0) as f:
            # random offsets and lengths, crossing chunk boundaries and past EOF
            for _ in range(40):
                off = rnd.randrange(0, len(data) + 10) if data else rnd.randrange(0, 10)
                n = rnd.choice([1, 2, 100, CS - 1, CS, CS + 3, 3 * CS])
                assert os.pread(f.fileno(), n, off) == data[off:off + n], (name, off, n)
            # 1-byte reads at chunk boundaries
            for b in range(0, len(data) + 1, CS):
                for off in (b - 1, b, b + 1):
                    if off >= 0:
                        assert os.pread(f.fileno(), 1, off) == data[off:off + 1]
            assert os.pread(f.fileno(), 100, len(data) + 5) == b""
    # one GET per chunk at most: every chunk was fetched once and then served locally
    total_chunks = sum((len(d) + CS - 1) // CS for d in objs.values())
    assert proxy.stats()["ops"].get("GetObject", 0) == total_chunks
    # once more past the page cache, from the SSD (and the daemon's memory), in 3-chunk
    # pieces: full chunks are read into memory used again (ChunkStore.new_buf), which
    # must never change bytes a reader still holds
    import mmap

    buf = mmap.mmap(-1, 3 * CS)
    for _ in range(2):
        for name, data in objs.items():
            assert read_direct(m.path(f"sizes/{name}.bin"), buf) == data, name
    buf.close()
    assert proxy.stats()["ops"].get("GetObject", 0) == total_chunks
    pool = m.stats()["chunk_buffers"]
    assert pool["size"] == -(-(64 + CS) // 4096) * 4096 and pool["reused"] > 0, pool


def read_direct(path, buf) -> bytes:
    """The whole file, read with O_DIRECT (past the page cache) in ``buf``-sized reads."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = bytearray()
        while n := os.readv(fd, [buf]):
            got += buf[:n]
    finally:
        os.close(fd)
    return bytes(got)


def test_chunk_memory_outlives_the_file_a_reader_read(s3, bucket, mounts):
    """A reader going through files one after another needs its read-ahead window of
    chunk memory (8 chunks) again for each file. The pool kept 4 free buffers, so every
    new file faulted in fresh memory for the rest, which this VM hands out slowly (warm
    4 x 1 GiB, alternating rounds: 1,720 -> 1,950 MB/s with the window kept; 217 -> 10
    buffers created in 8 passes)."""
    import mmap

    objs = {f"seq/f{i}.bin": put(s3, bucket, f"seq/f{i}.bin", random.randbytes(24 * CS))
            for i in range(4)}
    m = mounts(f"s3://{bucket}")
    buf = mmap.mmap(-1, CS)
    for k, d in objs.items():  # cold: every chunk on the SSD
        assert read_direct(m.path(k), buf) == d
    wait_for(lambda: m.stats()["readahead_bytes"] == 0, 10, "read-ahead budget returned")
    read_direct(m.path("seq/f0.bin"), buf)  # warm: the first file makes the window's buffers
    before = m.stats()["chunk_buffers"]["created"]
    for k in ("seq/f1.bin", "seq/f2.bin", "seq/f3.bin"):
        assert read_direct(m.path(k), buf) == objs[k]
    created = m.stats()["chunk_buffers"]["created"] - before
    assert created <= 2, created  # the next files use the window's memory again


def test_idle_chunk_memory_stays_within_the_read_ahead_budget(s3, bucket, mounts):
    """The pool keeps a reader's window of free chunk memory, but never more chunks than
    the read-ahead budget holds (+ 2): with 256 MiB chunks the window of 8 would have
    left 2.5 GiB idle behind a 256 MiB budget."""
    assert mounts(f"s3://{bucket}").stats()["chunk_buffers"]["idle_max"] == 8 + 2
    small = mounts(f"s3://{bucket}", name="small", extra=("--readahead-memory", str(3 * CS)))
    assert small.stats()["chunk_buffers"]["idle_max"] == 3 + 2


def test_listing_equals_s3(s3, bucket, mounts):
    keys = ["top.txt", "a/b/c/deep.txt", "a/b/side.txt", "a/x.txt",
            "ünïcødé/名前.txt", "emoji/🚀.bin", "dual", "dual/inside.txt",
            "marker/", "marker/real.txt"]
    for k in keys:
        put(s3, bucket, k, k.encode())
    for i in range(1100):
        put(s3, bucket, f"many/f{i:05d}", b"x")
    # names that cannot be POSIX names are skipped, never crash the daemon
    for k in ["bad/./dot", "bad/../up", "bad//empty", "bad/" + "l" * 300, "bad/ok"]:
        put(s3, bucket, k, b"bad")
    m = mounts(f"s3://{bucket}")
    assert sorted(os.listdir(m.mp)) == sorted(
        ["top.txt", "a", "ünïcødé", "emoji", "dual", "marker", "many", "bad"])
    assert sorted(os.listdir(m.path("a"))) == ["b", "x.txt"]
    assert sorted(os.listdir(m.path("a/b"))) == ["c", "side.txt"]
    assert m.path("a/b/c/deep.txt").read_bytes() == b"a/b/c/deep.txt"
    assert m.path("ünïcødé/名前.txt").read_bytes() == "ünïcødé/名前.txt".encode()
    assert os.listdir(m.path("emoji")) == ["🚀.bin"]
    # a key that is both an object and a prefix shows as the directory
    assert m.path("dual").is_dir()
    assert os.listdir(m.path("dual")) == ["inside.txt"]
    assert os.listdir(m.path("marker")) == ["real.txt"]
    many = os.listdir(m.path("many"))
    assert len(many) == 1100 and len(set(many)) == 1100
    assert sorted(os.listdir(m.path("bad"))) == ["ok"]
    assert m.path("empty").exists() is False
    c = m.counters()
    assert c["skipped_keys"] == 5  # and "dual", the object hidden by the directory
    log = m.log_text()
    assert "skipping S3 key 'dual': hidden by the directory 'dual'" in log
    assert "skipping the S3 keys under 'bad//': an empty path segment (a key starting with " \
        "'/', or '//' in it)" in log
    # zero-byte object reads as an empty file; size and mtime from S3
    put(s3, bucket, "zero", b"")
    m2 = mounts(f"s3://{bucket}", name="again")
    assert m2.path("zero").read_bytes() == b""
    head = s3.head_object(Bucket=bucket, Key="top.txt")
    st = m2.path("top.txt").stat()
    assert st.st_size == 7 and int(st.st_mtime) == int(head["LastModified"].timestamp())


def test_a_listing_that_names_entries_twice_makes_one_node_each(s3, bucket, mounts, proxy):
    """A store that repeats entries in a listing (a page's last one again on the next
    page): a second node was made for a repeated directory, the first one leaked in the
    inode table for good (and the index's inode number changed), and a repeated file was
    dropped as "hidden by the directory" of its own name."""
    for k in ("d/x", "d/y", "f", "g", "d2/z"):
        put(s3, bucket, k, b"x")
    proxy.faults(repeat_entries=True, ops=["ListObjects"])
    m = mounts(f"s3://{bucket}")
    assert sorted(os.listdir(m.mp)) == ["d", "d2", "f", "g"]
    assert sorted(os.listdir(m.path("d"))) == ["x", "y"]
    assert m.path("f").read_bytes() == b"x"
    st = os.statvfs(m.mp)
    assert st.f_files - st.f_ffree == 7  # root, d, d2, f, g, d/x, d/y
    assert "hidden by the directory" not in m.log_text()
    proxy.clear_faults()
    # a listing that says there is more and gives no token to ask for it: taken as whole,
    # the names on later pages were taken for deleted; it is now a failed listing
    proxy.faults(no_continuation=True, ops=["ListObjects"])
    with pytest.raises(OSError) as e:
        os.listdir(m.path("d2"))  # (d2/ not listed yet)
    proxy.clear_faults()
    assert e.value.errno == errno.EIO
    assert "is cut short: the store said there is more and gave no continuation token" \
        in m.log_text()
    assert os.listdir(m.path("d2")) == ["z"]


def test_a_listing_that_failed_part_way_goes_on_from_the_failed_page(s3, bucket, mounts,
                                                                      proxy):
    """A directory whose listing failed on a late page (its retries spent) was listed from
    page 1 again at the next lookup: minutes of LISTs again for a directory of millions of
    keys, and again at each failure. The pages it had are kept and it goes on from there."""
    names = [f"f{i:02d}" for i in range(25)]
    for n in names:
        put(s3, bucket, f"big/{n}", b"x")
        put(s3, bucket, f"big2/{n}", b"x")
    put(s3, bucket, "big2/a", b"x")
    m = mounts(f"s3://{bucket}", extra=("--s3-max-attempts", "2"),
               env={"CACHEFS_TEST_LIST_PAGE": "10"})  # 3 pages
    os.listdir(m.mp)
    proxy.reset()
    proxy.faults(status=500, ops=["ListObjects"], skip=1, count=2)  # page 2, both attempts
    with pytest.raises(OSError) as e:
        os.listdir(m.path("big"))
    assert e.value.errno == errno.EIO
    assert proxy.stats()["ops"]["ListObjects"] == 3
    assert f"the listing of s3://{bucket}/big/ failed on page 2: the next one goes on from " \
           "there (10 entries kept)" in m.log_text()
    # throttled on the page it goes on from: the pages stay kept (no new listing from 1)
    proxy.reset()
    proxy.faults(status=429, code="SlowDown", ops=["ListObjects"], count=2)
    with pytest.raises(OSError):
        os.listdir(m.path("big"))
    proxy.reset()
    assert sorted(os.listdir(m.path("big"))) == names
    assert proxy.stats()["ops"]["ListObjects"] == 2  # pages 2 and 3 (3 before)
    assert m.counters()["s3_list_resumed"] == 2
    # a store that refuses the kept token: listed from the start
    proxy.faults(status=500, ops=["ListObjects"], skip=1, count=2)
    with pytest.raises(OSError) as e:
        os.listdir(m.path("big2"))
    assert e.value.errno == errno.EIO
    proxy.reset()
    proxy.faults(status=400, code="InvalidArgument", ops=["ListObjects"], count=1)
    assert sorted(os.listdir(m.path("big2"))) == ["a", *names]
    assert proxy.stats()["ops"]["ListObjects"] == 4  # the refused page, then 3 pages
    assert "refused to go on from page 2" in m.log_text()


def test_a_prefix_gone_and_back_is_not_shown_its_old_listing(s3, bucket, mounts, tmp_path):
    """The listing of a directory kept in the index stayed when the directory went from S3:
    a prefix that came back within the TTL was listed from it, old names and all (a file
    put back under an old name would have had its old ETag), and the index kept the
    listing of every gone directory for good."""
    put(s3, bucket, "p/q/x", b"x")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[metadata]\nttl = "60s"\nnegative_ttl = "1s"\n')
    m = mounts(f"s3://{bucket}", config=str(cfg))
    assert os.listdir(m.path("p/q")) == ["x"]  # q's listing kept in the index
    s3.delete_object(Bucket=bucket, Key="p/q/x")
    time.sleep(1.1)
    assert not m.path("p/zz").exists()  # a missing name: p listed anew, q gone from it
    wait_for(lambda: not m.path("p/q").exists(), 10, "q gone")
    put(s3, bucket, "p/q/y", b"y")
    time.sleep(1.1)
    assert os.listdir(m.path("p/q")) == ["y"]  # (it was ["x"], and reading x failed)


def test_names_are_utf8_whatever_the_daemons_locale(s3, bucket, mounts):
    """A daemon started under an ASCII (or Latin-1) locale encoded names for the kernel
    with the locale's encoding: a readdir with a non-ASCII name in it failed with EIO,
    and a lookup of one found nothing. S3 keys are UTF-8, and so are the names now."""
    put(s3, bucket, "\u00e9t\u00e9.bin", b"e")
    put(s3, bucket, "\u65e5\u672c/\u30d5\u30ec\u30fc\u30e0.jpg", b"j")
    m = mounts(f"s3://{bucket}",
               env={"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"})
    assert sorted(os.listdir(m.mp)) == ["\u00e9t\u00e9.bin", "\u65e5\u672c"]
    assert os.listdir(m.path("\u65e5\u672c")) == ["\u30d5\u30ec\u30fc\u30e0.jpg"]
    assert m.path("\u00e9t\u00e9.bin").read_bytes() == b"e"
    assert m.path("\u65e5\u672c/\u30d5\u30ec\u30fc\u30e0.jpg").read_bytes() == b"j"


def test_directories_list_dot_entries_and_show_the_mount_time(s3, bucket, mounts):
    """`ls -a` shows "." and ".." (they were missing), "." is the directory itself, and a
    directory's times are the mount's, not 1970 (S3 keeps no time for a prefix)."""
    import subprocess
    import time

    for i in range(600):  # more than one kernel readdir buffer
        put(s3, bucket, f"d/f{i:04d}", b"x")
    before = time.time()
    m = mounts(f"s3://{bucket}")
    out = subprocess.run(["ls", "-a1i", m.path("d")], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    rows = [line.split(None, 1) for line in out if line]
    names = [name for _, name in rows]
    assert names[:2] == [".", ".."] and names[2:] == [f"f{i:04d}" for i in range(600)]
    assert int(rows[0][0]) == os.stat(m.path("d")).st_ino
    assert int(rows[1][0]) == os.stat(m.mp).st_ino
    top = subprocess.run(["ls", "-a1", m.mp], capture_output=True, text=True,
                         check=True).stdout.split()
    assert top == [".", "..", "d"]
    for p in (m.mp, m.path("d")):
        st = os.stat(p)
        assert before - 5 <= st.st_mtime <= time.time(), (p, st.st_mtime)
    assert os.listdir(m.path("d")) == [f"f{i:04d}" for i in range(600)]  # no dots here


def test_prefix_mount_and_errors(s3, bucket, mounts):
    put(s3, bucket, "train/x/1.bin", b"one")
    put(s3, bucket, "other/2.bin", b"two")
    m = mounts(f"s3://{bucket}/train")
    assert os.listdir(m.mp) == ["x"]
    assert m.path("x/1.bin").read_bytes() == b"one"
    with pytest.raises(FileNotFoundError):
        m.path("nope").stat()


def test_writes_are_erofs(s3, bucket, mounts, proxy):
    put(s3, bucket, "f.txt", b"data")
    m = mounts(f"s3://{bucket}")
    attempts = [
        lambda: open(m.path("new.txt"), "wb"),
        lambda: open(m.path("f.txt"), "r+b"),
        lambda: open(m.path("f.txt"), "ab"),
        lambda: os.mkdir(m.path("d")),
        lambda: os.unlink(m.path("f.txt")),
        lambda: os.rename(m.path("f.txt"), m.path("g.txt")),
        lambda: os.symlink("f.txt", m.path("l")),
        lambda: os.chmod(m.path("f.txt"), 0o777),
        lambda: os.truncate(m.path("f.txt"), 0),
        lambda: os.setxattr(m.path("f.txt"), "user.x", b"1"),
    ]
    for fn in attempts:
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), fn
    assert m.path("f.txt").read_bytes() == b"data"
    # O_APPEND moves only writes: a read-only open with it reads, as on any read-only file
    # system (it got EROFS)
    fd = os.open(m.path("f.txt"), os.O_RDONLY | os.O_APPEND)
    try:
        assert os.read(fd, 100) == b"data"
    finally:
        os.close(fd)
    ops = proxy.stats()["ops"]
    assert ops.get("PutObject", 0) == 0
    assert {k for k, v in ops.items() if v} <= {"GetObject", "ListObjects", "HeadObject"}


def test_concurrent_cold_readers_singleflight(s3, bucket, mounts, proxy):
    data = put(s3, bucket, "shared.bin", random.randbytes(12 * CS + 100))
    m = mounts(f"s3://{bucket}")
    m.path("shared.bin").stat()
    proxy.reset()
    results, errors = [], []

    def reader():
        try:
            results.append(m.path("shared.bin").read_bytes())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == data for r in results) and len(results) == 16
    assert proxy.stats()["ops"]["GetObject"] == 13  # one GET per chunk


def test_herd_of_readers_shares_chunks_in_memory(s3, bucket, mounts, proxy):
    """Readers of one cold file at once whose offsets jump (in a real herd the page
    cache serves each reader part of the file), so their own read-ahead stays off: a
    chunk one of them fetched must reach the others from memory (the shared memo),
    not through one SSD read per reader.  4 groups of 4 O_DIRECT readers; reader k of
    a group reads every 4th chunk from chunk k, and reads a chunk only once the group
    before has read it (so no reader joins another's fetch: the reads come after)."""
    import mmap

    cs, n = 256 * 1024, 48
    data = put(s3, bucket, "herd.bin", random.randbytes(n * cs))
    m = mounts(f"s3://{bucket}", chunk_size="256KiB")
    m.path("herd.bin").stat()
    proxy.reset()
    got: dict[tuple[int, int], bytes] = {}
    done: list[set[int]] = [set() for _ in range(4)]
    cond = threading.Condition()
    errors: list[BaseException] = []

    def reader(g: int, k: int) -> None:
        try:
            fd = os.open(m.path("herd.bin"), os.O_RDONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, cs)
            try:
                for i in range(k, n, 4):
                    if g:
                        with cond:
                            assert cond.wait_for(lambda i=i: i in done[g - 1], timeout=60)
                    assert os.preadv(fd, [buf], i * cs) == cs
                    got[g, i] = bytes(buf)
                    with cond:
                        done[g].add(i)
                        cond.notify_all()
            finally:
                os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            with cond:
                done[g].update(range(n))  # let the groups behind finish
                cond.notify_all()

    threads = [threading.Thread(target=reader, args=(g, k)) for g in range(4) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(got) == 4 * n
    assert all(b == data[i * cs:(i + 1) * cs] for (_, i), b in got.items())
    assert proxy.stats()["ops"]["GetObject"] == n  # one GET per chunk
    c = m.counters()
    # groups 1-3 read each chunk after group 0 fetched it: 3n reads that, without the
    # memo, were SSD reads
    assert c.get("memory_hits", 0) >= 2 * n, c
    assert c.get("ssd_hits", 0) <= n // 4, c
    # all handles closed (the kernel sends RELEASE after close() returns): the memo let
    # go of the file's chunks too
    wait_for(lambda: m.stats()["readahead_bytes"] == 0, 10, "read-ahead budget returned")


def test_a_saved_listing_is_as_old_as_its_list_request(s3, bucket, mounts, proxy):
    """The listing kept in the index for a restart was stamped when it had been received
    and encoded, not when it was asked for: a LIST that took 3.5 s gave a listing older
    than the 3 s TTL to a daemon started at once after, which used it as fresh."""
    put(s3, bucket, "s/a.bin", b"a")
    m = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "3s"))
    assert m.path("s").is_dir()
    proxy.faults(delay=3.5, count=1, ops=["ListObjects"])
    assert m.path("s/a.bin").stat().st_size == 1  # the listing of s/, 3.5 s
    proxy.clear_faults()
    assert m.stop() == 0
    m.start()
    assert m.path("s").is_dir()  # (the root: listed again or not, before the count)
    proxy.reset()
    assert m.path("s/a.bin").stat().st_size == 1
    assert proxy.stats()["ops"]["ListObjects"] == 1  # listed again (0: the old one was used)


def test_warm_restart_after_umount_and_sigkill(s3, bucket, mounts, proxy):
    objs = {f"w/{i}.bin": put(s3, bucket, f"w/{i}.bin", random.randbytes(3 * CS + i))
            for i in range(4)}
    m = mounts(f"s3://{bucket}")
    for k, d in objs.items():
        assert m.path(k).read_bytes() == d
    assert m.stop() == 0
    proxy.reset()
    m.start()
    for k, d in objs.items():
        assert m.path(k).read_bytes() == d
    assert proxy.stats()["ops"].get("GetObject", 0) == 0
    assert m.counters()["ssd_hits"] == 15  # 3 + 4 + 4 + 4 chunks
    # object metadata came from the index (listing younger than the TTL): the only LIST is
    # the bucket check at mount
    assert proxy.stats()["ops"]["ListObjects"] == 1
    assert m.counters()["dir_listings_from_index"] == 2
    # crash: SIGKILL leaves a stale mount; the next mount clears it and is still warm
    m.kill()
    with pytest.raises(OSError) as ei:
        os.listdir(m.mp / "w")  # stat may come from the kernel's attribute cache
    assert ei.value.errno == errno.ENOTCONN
    (m.cache_dir / "tmp" / "half-written.partial").write_bytes(b"junk")
    proxy.reset()
    m.start()
    for k, d in objs.items():
        assert m.path(k).read_bytes() == d
    assert proxy.stats()["ops"].get("GetObject", 0) == 0
    assert not (m.cache_dir / "tmp" / "half-written.partial").exists()
    assert "cleared a stale mount" in m.log_text()


def chunk_files(m):
    return sorted(p for p in (m.cache_dir / "chunks").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "zero", "delete", "swap"])
def test_corrupt_chunk_refetched(s3, bucket, mounts, proxy, damage):
    a = put(s3, bucket, "a.bin", random.randbytes(CS))
    b = put(s3, bucket, "b.bin", random.randbytes(CS))
    m = mounts(f"s3://{bucket}")
    assert m.path("a.bin").read_bytes() == a
    assert m.path("b.bin").read_bytes() == b
    m.stop()  # drop the kernel page cache for these files
    fa, fb = chunk_files(m)
    raw = bytearray(fa.read_bytes())
    if damage == "bitflip":
        raw[100] ^= 0x01
        fa.write_bytes(raw)
    elif damage == "truncate":
        fa.write_bytes(raw[: len(raw) // 2])
    elif damage == "zero":
        fa.write_bytes(bytes(len(raw)))
    elif damage == "delete":
        fa.unlink()
    elif damage == "swap":
        rb = fb.read_bytes()
        fa.write_bytes(rb)
        fb.write_bytes(raw)
    proxy.reset()
    m.start()
    assert m.path("a.bin").read_bytes() == a
    assert m.path("b.bin").read_bytes() == b
    gets = proxy.stats()["ops"].get("GetObject", 0)
    c = m.counters()
    if damage == "swap":
        assert gets == 2 and c.get("chunks_corrupt", 0) == 2
    elif damage in ("truncate", "delete"):
        # a file of the wrong size, or no file, is dropped from the index at start
        assert gets == 1
    else:
        assert gets == 1 and c.get("chunks_corrupt", 0) == 1
    # and now it is cached again, correctly
    m.stop()
    proxy.reset()
    m.start()
    assert m.path("a.bin").read_bytes() == a and m.path("b.bin").read_bytes() == b
    assert proxy.stats()["ops"].get("GetObject", 0) == 0


def test_eviction_lru_within_limit(s3, bucket, mounts, proxy):
    # cache of 10 chunks; 16 one-chunk files
    objs = {f"e/{i:02d}": put(s3, bucket, f"e/{i:02d}", random.randbytes(CS)) for i in range(16)}
    m = mounts(f"s3://{bucket}", cache_size=str(10 * CS))
    limit = 10 * CS
    for i in range(8):
        assert m.path(f"e/{i:02d}").read_bytes() == objs[f"e/{i:02d}"]
    # touch 0 and 1 again so that 2.. are the least recently used
    m.stop()
    m.start()
    for i in (0, 1):
        m.path(f"e/{i:02d}").read_bytes()
    used_max = 0
    for i in range(8, 12):
        m.path(f"e/{i:02d}").read_bytes()
        used_max = max(used_max, m.stats()["cache"]["used_bytes"])
    assert used_max <= limit + CS
    st = m.stats()
    assert st["cache"]["used_bytes"] <= limit
    assert st["counters"]["evictions"] >= 2
    # what survived: the recently used 0 and 1 and the newest, not 2 (least recent)
    m.stop()
    proxy.reset()
    m.start()
    for i in (0, 1, 11):
        assert m.path(f"e/{i:02d}").read_bytes() == objs[f"e/{i:02d}"]
    assert proxy.stats()["ops"].get("GetObject", 0) == 0
    assert m.path("e/02").read_bytes() == objs["e/02"]
    assert proxy.stats()["ops"].get("GetObject", 0) == 1


def test_eviction_many_concurrent_readers(s3, bucket, mounts):
    objs = {f"c/{i:02d}": put(s3, bucket, f"c/{i:02d}", random.randbytes(2 * CS)) for i in range(24)}
    m = mounts(f"s3://{bucket}", cache_size=str(8 * CS))
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], m.stats()["cache"]["used_bytes"])

    w = threading.Thread(target=watch)
    w.start()
    errs = []

    def read(k):
        if m.path(k).read_bytes() != objs[k]:
            errs.append(k)

    ts = [threading.Thread(target=read, args=(k,)) for k in objs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    w.join()
    assert not errs
    du = sum(p.stat().st_size - 64 for p in chunk_files(m))
    assert du <= 8 * CS + CS
    assert peak[0] <= 8 * CS + CS


def test_overwrite_new_bytes_after_ttl_never_mixed(s3, bucket, mounts, proxy):
    old = put(s3, bucket, "v.bin", b"A" * (4 * CS))
    m = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "1s"))
    f = open(m.path("v.bin"), "rb", buffering=0)
    assert os.pread(f.fileno(), CS, 0) == b"A" * CS  # chunk 0 cached, others not
    new = put(s3, bucket, "v.bin", b"B" * (4 * CS + 10))
    # the open handle: old bytes from the cache, or an error, never B
    try:
        rest = os.pread(f.fileno(), 3 * CS, CS)
        # read-ahead may already hold some old chunks; a short read is allowed (the
        # kernel splits the request and the later part fails), a B never is
        assert rest == old[CS:CS + len(rest)]
    except OSError as e:
        assert e.errno == errno.EIO
    assert os.pread(f.fileno(), CS, 0) == b"A" * CS
    f.close()
    import time
    time.sleep(1.5)
    assert m.path("v.bin").stat().st_size == len(new)
    assert m.path("v.bin").read_bytes() == new
    assert m.counters().get("objects_changed", 0) == 1


def test_what_the_kernel_keeps_expires_with_the_listing_it_came_from(s3, bucket, mounts):
    """Every answer gave the kernel the whole TTL, however old the listing it came from:
    a name looked up just before its listing expired was trusted for another TTL, and an
    object deleted (or overwritten) in S3 stayed visible for up to twice the TTL."""
    put(s3, bucket, "g/x", b"x" * 100)
    put(s3, bucket, "g/y", b"y")
    m = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "3s"))
    t0 = time.monotonic()
    assert m.path("g/y").stat().st_size == 1  # the listing of g/, made between t0 and t1
    t1 = time.monotonic()
    time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))
    assert m.path("g/x").stat().st_size == 100  # looked up with 1 s of the listing's TTL left
    s3.delete_object(Bucket=bucket, Key="g/x")
    time.sleep(max(0.0, t1 + 3.5 - time.monotonic()))  # (the listing expired by t1 + 3)
    assert os.listdir(m.path("g")) == ["y"]  # relisted
    with pytest.raises(FileNotFoundError):
        m.path("g/x").stat()  # was: 100 bytes, until t0 + 5 s
    with pytest.raises(FileNotFoundError):
        open(m.path("g/x"), "rb").close()


def test_a_file_uploaded_after_its_directory_was_listed_opens_by_name(s3, bucket, mounts,
                                                                      tmp_path):
    """A file written to S3 after its directory was listed was "no such file" for the
    metadata TTL (5 minutes) to a program that opened it by name (a training job reading
    the shards a manifest names). A lookup of a name the listing lacks lists the directory
    again once that listing is older than `[metadata] negative_ttl`: at most one listing
    per directory in that time, however many names are probed."""
    put(s3, bucket, "d/a", b"a")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[metadata]\nnegative_ttl = '3s'\n")
    m = mounts(f"s3://{bucket}", config=str(cfg))  # the TTL: 5 minutes
    assert m.path("d/a").stat().st_size == 1  # d/ listed

    def lists():
        return m.counters().get("dir_listings", 0)

    before = lists()
    put(s3, bucket, "d/new", b"new!")
    # probes within negative_ttl of the listing: no new listing (3 s: the put and 20
    # lookups on a loaded host)
    for i in range(20):
        assert not m.path(f"d/missing{i}").exists()
    assert lists() == before
    time.sleep(3.2)
    assert m.path("d/new").read_bytes() == b"new!"
    assert lists() == before + 1
    for i in range(20):  # and no more for a while
        assert not m.path(f"d/missing{i}").exists()
    assert lists() == before + 1
    assert m.counters()["dir_listings_for_missing_names"] == 1


def test_missing_names_cost_one_listing_in_an_outage_and_for_data_set_commands(
        s3, bucket, mounts, proxy, tmp_path):
    """A relisting for a missing name that fails (S3 refusing LISTs) made the listing look
    expired, so every later probe listed again: one LIST per lookup while S3 asked clients
    to back off. And a data-set command's missing name cost two listings (the lookup's and
    the command's own)."""
    from cachefs_env import cli

    put(s3, bucket, "d/a", b"a")
    put(s3, bucket, "e/a", b"a")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[metadata]\nnegative_ttl = '3s'\n")
    m = mounts(f"s3://{bucket}", config=str(cfg))
    assert m.path("d/a").exists() and m.path("e/a").exists()  # d/ and e/ listed
    time.sleep(3.2)
    proxy.reset()
    proxy.faults(status=403, code="AccessDenied", ops=["ListObjects"], count=-1)
    for i in range(10):
        assert not m.path(f"d/missing{i}").exists()
    assert proxy.stats()["ops"].get("ListObjects", 0) == 1, proxy.stats()["ops"]
    assert m.path("d/a").read_bytes() == b"a"  # the listing it has is kept
    proxy.reset()
    lst = tmp_path / "l.txt"
    lst.write_text("e/missing\n")
    r = cli("status", "--file-list", str(lst), "--mount", str(m.mp))
    assert r.returncode == 2 and "e/missing: no such file" in r.stderr, r.stderr
    assert proxy.stats()["ops"].get("ListObjects", 0) == 1, proxy.stats()["ops"]


def _listed_again_for(tmp_path, m, name: str) -> None:
    """A data-set command's lookup of ``name``, new in S3 since its directory was listed:
    that directory is listed again at once, long before the TTL."""
    from cachefs_env import cli

    lst = tmp_path / "l.txt"
    lst.write_text(name + "\n")
    r = cli("status", "--file-list", str(lst), "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr


def test_a_name_a_relisting_drops_is_gone_from_the_kernel_too(s3, bucket, mounts, tmp_path):
    """A relisting that finds an object deleted (here the one a data-set command makes
    for a name its listing lacks, long before the TTL) left the kernel's entry: `stat`
    still showed the file, and an open failed with EIO (S3's 404) rather than ENOENT,
    which a data loader treats as fatal rather than as a file to skip."""

    put(s3, bucket, "g/x", b"x" * 100)
    m = mounts(f"s3://{bucket}")  # the default TTL, 5 minutes
    assert m.path("g/x").stat().st_size == 100
    s3.delete_object(Bucket=bucket, Key="g/x")
    put(s3, bucket, "g/new", b"n")
    _listed_again_for(tmp_path, m, "g/new")
    deadline = time.monotonic() + 5
    while True:
        try:
            m.path("g/x").stat()
        except FileNotFoundError:
            break
        assert time.monotonic() < deadline, "g/x still shown"
        time.sleep(0.05)
    with pytest.raises(FileNotFoundError):
        open(m.path("g/x"), "rb").close()
    assert m.counters().get("read_errors", 0) == 0


def _getdents(fd: int, size: int = 1024) -> list[str]:
    """One getdents64 call into a small buffer: a few names per FUSE readdir (a buffer as
    large as os.scandir's had the kernel take the whole directory in one)."""
    import ctypes
    import platform

    nr = {"x86_64": 217, "aarch64": 61}.get(platform.machine())  # SYS_getdents64
    if nr is None:
        pytest.skip(f"getdents64's number on {platform.machine()} is not known here")
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    n = libc.syscall(nr, fd, buf, size)
    assert n >= 0, os.strerror(ctypes.get_errno())
    names, raw, at = [], buf.raw[:n], 0
    while at < n:
        reclen = int.from_bytes(raw[at + 16:at + 18], "little")
        names.append(raw[at + 19:at + reclen].split(b"\0", 1)[0].decode())
        at += reclen
    return names


def test_a_readdir_under_way_shows_the_directory_as_a_relisting_left_it(s3, bucket, mounts,
                                                                        tmp_path):
    """A directory relisted while a reader was still going through it (a slow `ls`,
    `find`, a data loader's scandir): the rest of that readdir handed the kernel the
    names as they were at opendir, a deleted one with a fresh entry timeout, so `stat`
    showed it for the whole TTL again. Names that went since are now left out."""

    long = "a" * 200  # a few names fill a small readdir reply
    for i in range(40):
        put(s3, bucket, f"r/{long}{i:02}", b"x")
    put(s3, bucket, "r/zz", b"z")
    m = mounts(f"s3://{bucket}")  # the default TTL, 5 minutes
    held = open(m.path("r/zz"), "rb")  # (a reader has it open: its node stays)
    fd = os.open(m.path("r"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = _getdents(fd)
        assert 0 < len(first) < 20, first
        s3.delete_object(Bucket=bucket, Key="r/zz")
        put(s3, bucket, "r/new", b"n")
        _listed_again_for(tmp_path, m, "r/new")
        rest = []
        while got := _getdents(fd):
            rest += got
    finally:
        os.close(fd)
        held.close()
    names = [n for n in first + rest if n not in (".", "..")]
    assert names == [f"{long}{i:02}" for i in range(40)], names[-3:]  # no zz
    with pytest.raises(FileNotFoundError):
        m.path("r/zz").stat()


def test_an_open_handle_keeps_its_version_when_a_shorter_one_replaces_it(s3, bucket, mounts):
    """An object overwritten by a shorter one while a handle of the old version is open, then
    relisted by another lookup: the kernel keeps one size per inode, so the old handle's
    reads past the new size ended at EOF, a short read with no error.  The name now gets a
    new inode: the old handle keeps its size, and what it reads is the old version's or EIO."""
    import time

    old = put(s3, bucket, "s.bin", b"A" * (64 * CS))
    m = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "1s"))
    f = open(m.path("s.bin"), "rb", buffering=0)
    ino = os.fstat(f.fileno()).st_ino
    assert os.pread(f.fileno(), CS, 0) == old[:CS]
    new = put(s3, bucket, "s.bin", b"B" * (CS // 2))
    time.sleep(1.5)
    st = m.path("s.bin").stat()  # relisted: the name is the new version
    assert (st.st_size, st.st_ino != ino) == (len(new), True)
    assert m.path("s.bin").read_bytes() == new
    assert os.fstat(f.fileno()).st_size == len(old)
    assert os.pread(f.fileno(), CS, 0) == old[:CS]  # cached bytes of the old version
    with pytest.raises(OSError) as e:
        os.pread(f.fileno(), CS, 48 * CS)  # gone from S3: an error, not EOF
    assert e.value.errno == errno.EIO
    f.close()
    assert m.counters()["objects_changed"] == 1
    # the old inode goes once its last handle closed and the kernel forgot it
    with open("/proc/sys/vm/drop_caches", "w") as dc:
        dc.write("2\n")
    def used() -> int:  # (the kernel's FORGETs arrive when they do)
        st = os.statvfs(m.mp)
        return st.f_files - st.f_ffree

    wait_for(lambda: used() == 2, 10, "the root and s.bin only")
    st = os.statvfs(m.mp)
    assert st.f_ffree > 0  # (none free: df -i said 100%, and inode alerts fired)


def test_s3_faults_retried(s3, bucket, mounts, proxy):
    data = put(s3, bucket, "f.bin", random.randbytes(6 * CS))
    # 7 faults may all land on one chunk's consecutive attempts: give it 8
    m = mounts(f"s3://{bucket}", extra=("--s3-max-attempts", "8"))
    m.path("f.bin").stat()
    proxy.faults(status=503, code="SlowDown", count=3)
    proxy.faults(truncate=2)
    proxy.faults(error_body_200=2)
    assert m.path("f.bin").read_bytes() == data
    c = m.counters()
    st = proxy.stats()
    assert st["faults_injected"] == 7, st
    assert c["s3_retries"] == 7
    assert c.get("read_errors", 0) == 0
    # nothing bad was cached: a fresh mount serves the same bytes from the SSD
    m.stop()
    proxy.reset()
    m.start()
    assert m.path("f.bin").read_bytes() == data
    assert proxy.stats()["ops"].get("GetObject", 0) == 0


def test_persistent_failure_gives_eio_within_bound(s3, bucket, mounts, proxy):
    import time

    from cachefs.chunks.reader import FAILED_FOR

    put(s3, bucket, "p.bin", random.randbytes(CS))
    cached = put(s3, bucket, "cached.bin", random.randbytes(CS))
    m = mounts(f"s3://{bucket}", extra=("--s3-max-attempts", "3", "--s3-timeout", "2s"))
    assert m.path("cached.bin").read_bytes() == cached
    m.path("p.bin").stat()
    proxy.faults(persistent_status=500)
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        m.path("p.bin").read_bytes()
    assert ei.value.errno == errno.EIO
    # 3 attempts, backoff <= 0.1 + 0.2 s: well under the 3 × 2 s bound
    assert time.monotonic() - t0 < 3 * 2 + 1
    # cached files keep serving
    assert m.path("cached.bin").read_bytes() == cached
    proxy.reset()
    # a stalled server: each attempt times out; EIO, no hang
    proxy.faults(delay=30, count=-1)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        m.path("p.bin").read_bytes()
    assert time.monotonic() - t0 < 3 * 2 + 2
    proxy.reset()
    time.sleep(FAILED_FOR)  # a chunk whose fetch just failed fails again at once until then
    assert len(m.path("p.bin").read_bytes()) == CS


def test_listed_files_stay_readable_when_s3_fails_after_the_ttl(s3, bucket, mounts, proxy):
    """S3 down or stalled once the metadata TTL has run out: the relisting fails or hangs,
    and the directory's last listing goes on serving (cached files read, listed files
    stat) instead of EIO after each open waited out the retry budget."""
    import time

    from cachefs.vfs import STALE_WAIT

    cached = put(s3, bucket, "d/cached.bin", random.randbytes(CS))
    m = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "1s", "--s3-max-attempts", "2",
                                        "--s3-timeout", "20s"))
    assert m.path("d/cached.bin").read_bytes() == cached
    proxy.faults(persistent_status=500, ops=["ListObjects", "GetObject"])
    time.sleep(1.2)
    assert m.path("d/cached.bin").read_bytes() == cached  # EIO before
    assert m.counters().get("dir_listings_stale", 0) >= 1
    proxy.reset()
    time.sleep(1.2)  # past the TTL again (the retry after a failure waits min(TTL, 30 s))
    os.listdir(m.path("d"))  # relisted: the stall below starts from a fresh TTL
    proxy.faults(delay=60, count=-1, ops=["ListObjects", "GetObject"])  # stalled: 20 s a LIST
    time.sleep(1.2)
    t0 = time.monotonic()
    assert m.path("d/cached.bin").read_bytes() == cached
    first = time.monotonic() - t0
    t0 = time.monotonic()
    assert m.path("d/cached.bin").stat().st_size == CS
    again = time.monotonic() - t0
    # at most STALE_WAIT per directory level (the root, d); 80 s before (two attempts of
    # 20 s per level)
    assert first < 2 * STALE_WAIT + 5, first
    assert again < 1, again  # the relisting under way is not waited for again
    proxy.reset()


def test_a_stalled_read_fails_within_one_retry_budget(s3, bucket, mounts, proxy):
    """The kernel retries a failed read-ahead read of the same pages straight away: it gets
    the error at once, instead of waiting out a second retry budget (8.2 s before, here)."""
    import time

    put(s3, bucket, "big.bin", random.randbytes(32 * CS))
    m = mounts(f"s3://{bucket}", extra=("--s3-max-attempts", "2", "--s3-timeout", "2s"))
    m.path("big.bin").stat()
    proxy.faults(delay=30, count=-1)
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        with open(m.path("big.bin"), "rb") as f:
            while f.read(1 << 20):
                pass
    took = time.monotonic() - t0
    assert ei.value.errno == errno.EIO
    # one budget: 2 attempts of 2 s, and the backoff (8.2 s and 4 GETs of the first chunk
    # before: the kernel's retry waited out a second budget)
    first = [r for k, r in proxy.stats(settle=0)["get_ranges"]
             if k == "big.bin" and r.startswith("bytes=0-")]
    assert len(first) == 2, first
    assert took < 7, took
    assert m.counters().get("fetch_failures_repeated", 0) >= 1


def test_reads_queued_for_an_s3_connection_fail_within_one_retry_budget(s3, bucket, mounts,
                                                                         proxy, tmp_path):
    """While S3 does not answer, reads queued behind others for one of the S3 connections
    waited in the queue before each attempt: a read failed after several retry budgets
    (3 readers on one connection: 14 to 22 s here, 18 min with the defaults and 200 fetches
    queued). The queue now counts against the read's own budget."""
    import threading
    import time

    for i in range(3):
        put(s3, bucket, f"q{i}.bin", random.randbytes(2 * CS))
    cfg = tmp_path / "s3.toml"
    cfg.write_text("[s3]\nmax_concurrency = 1\n")
    m = mounts(f"s3://{bucket}", config=str(cfg),
               extra=("--s3-max-attempts", "2", "--s3-timeout", "2s"))
    for i in range(3):
        m.path(f"q{i}.bin").stat()
    proxy.faults(delay=30, count=-1)
    took, errs = {}, {}

    def read(i):
        t0 = time.monotonic()
        try:
            m.path(f"q{i}.bin").read_bytes()
        except OSError as e:
            errs[i] = e.errno
        took[i] = time.monotonic() - t0

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errs == {0: errno.EIO, 1: errno.EIO, 2: errno.EIO}
    assert max(took.values()) < 2 * 2 + 0.1 + 3, took  # one budget, and slack (14-22 s before)
    assert "for one of the 1 S3 connections" in m.log_text()


def test_readahead_sequential_not_random(s3, bucket, mounts, proxy):
    MiB = 1 << 20
    seq = put(s3, bucket, "seq.bin", random.randbytes(16 * MiB))
    rnd_data = put(s3, bucket, "rnd.bin", random.randbytes(16 * MiB))
    # kernel reads are 1 MiB: with 1 MiB chunks each read is one chunk, as with the default
    m = mounts(f"s3://{bucket}", chunk_size="1MiB", extra=("--readahead-chunks", "4"))
    m.path("seq.bin").stat()
    m.path("rnd.bin").stat()
    # sequential: the window grows and the reader finds chunks fetched ahead
    assert m.path("seq.bin").read_bytes() == seq
    c = m.counters()
    assert c["readahead_started"] >= 12
    # each read found its chunk in memory or already in flight
    assert c.get("readahead_hits", 0) + c.get("readahead_waits", 0) >= 12
    assert proxy.stats()["get_by_key"]["seq.bin"] == 16  # nothing fetched twice
    # random 4 KiB reads at distinct chunks: one GET per touched chunk, nothing wasted
    proxy.reset()
    before = m.counters().get("readahead_started", 0)
    rnd = random.Random(7)
    touched = rnd.sample(range(1, 16), 8)
    with open(m.path("rnd.bin"), "rb", buffering=0) as f:
        for i in touched:
            off = i * MiB + rnd.randrange(0, MiB - 4096)
            assert os.pread(f.fileno(), 4096, off) == rnd_data[off:off + 4096]
    gets = proxy.stats()["get_by_key"].get("rnd.bin", 0)
    started = m.counters().get("readahead_started", 0) - before
    # the first read of a handle looks sequential (offset 0 is "next"): at most one chunk
    # of read-ahead; after that, seeks keep the window at zero
    assert started <= 1, started
    assert gets <= len(touched) + 1, gets
    # all handles closed (RELEASE arrives after close() returns): budget fully returned
    wait_for(lambda: m.stats()["readahead_bytes"] == 0, 10, "read-ahead budget returned")


def test_a_peek_at_a_files_head_starts_no_read_ahead(s3, bucket, mounts, proxy):
    """Reading the header of each of many large files (an image's size, a format's magic)
    fetches the chunk the header is in and nothing more; it fetched the next chunk too."""
    MiB = 1 << 20
    objs = {f"p{i}/shard.bin": put(s3, bucket, f"p{i}/shard.bin", random.randbytes(3 * MiB))
            for i in range(4)}  # one a directory: the file prefetcher has no next file
    m = mounts(f"s3://{bucket}", chunk_size="1MiB")
    for k, d in objs.items():  # unbuffered, as C readers peek (Python's buffer is st_blksize)
        with open(m.path(k), "rb", buffering=0) as f:
            assert f.read(4096) == d[:4096]
    wait_for(lambda: m.stats()["readahead_bytes"] == 0, 10, "read-ahead budget returned")
    assert m.counters().get("readahead_started", 0) == 0
    assert proxy.stats()["get_by_key"] == {k: 1 for k in objs}
    # (that a streaming reader's read-ahead starts at once: test_readahead_sequential_not_random)
    assert m.path("p0/shard.bin").read_bytes() == objs["p0/shard.bin"]
    assert proxy.stats()["get_by_key"]["p0/shard.bin"] == 3


def _cached_then_stopped(s3, bucket, mounts):
    """Three objects (8 chunks) read through a mount, which is then stopped cleanly."""
    objs = {f"r/{i}.bin": put(s3, bucket, f"r/{i}.bin", random.randbytes(2 * CS + i))
            for i in range(3)}
    m = mounts(f"s3://{bucket}")
    for k, d in objs.items():
        assert m.path(k).read_bytes() == d
    m.stop()
    return m, objs


def test_damaged_index_rebuilt_from_chunk_files(s3, bucket, mounts, proxy):
    m, objs = _cached_then_stopped(s3, bucket, mounts)
    (m.cache_dir / "index" / "data.mdb").write_bytes(b"\x00garbage" * 512)
    proxy.reset()
    m.start()
    assert "rebuilding from the chunk files" in m.log_text()
    for k, d in objs.items():
        assert m.path(k).read_bytes() == d
    # every chunk file verified and adopted: still warm
    assert proxy.stats()["ops"].get("GetObject", 0) == 0
    assert m.stats()["cache"]["chunks"] == 8  # 2 + 3 + 3


def _damage_branch_pages(data_mdb, rnd: random.Random) -> int:
    """Overwrite the body of every branch page (LMDB page header: pgno u64, pad u16,
    flags u16; P_BRANCH = 1) with random bytes: the tree's pointers lead anywhere,
    inside the file or past its end, while the meta pages and the leaves stay intact."""
    import struct

    n = 0
    with open(data_mdb, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        for off in range(2 * 4096, size, 4096):
            f.seek(off)
            pgno, _, flags = struct.unpack("<QHH", f.read(12))
            if pgno == off // 4096 and flags == 0x01:
                f.seek(off + 16)
                f.write(rnd.randbytes(4096 - 16))
                n += 1
    return n


def test_index_damaged_inside_is_rebuilt(s3, bucket, mounts, proxy):
    """An index whose first pages are fine but whose tree is damaged inside (a power loss
    with records not yet synced, a failing disk) opens; reading its chunks then raised
    MDB_CORRUPTED or killed the daemon with SIGBUS, at every start. The index is now read
    whole in a child process before the daemon opens it, and rebuilt when that fails."""
    from cachefs.index import ChunkRec, Index

    m, objs = _cached_then_stopped(s3, bucket, mounts)
    # a real cache holds millions of records: make the chunk tree several levels deep
    ix = Index(m.cache_dir / "index")
    rnd = random.Random(5)
    with ix.env.begin(write=True) as txn:
        for _ in range(30_000):
            txn.put(rnd.randbytes(16), ChunkRec(CS, rnd.randbytes(16), 1.0).pack(),
                    db=ix.chunks)
    ix.close()
    assert _damage_branch_pages(m.cache_dir / "index" / "data.mdb", rnd) >= 1
    proxy.reset()
    m.start()
    log = m.log_text()
    assert "rebuilding from the chunk files" in log, log
    # the child's finding: an LMDB error, or the signal that killed it
    assert re.search(r"cannot be used \((\w+Error: mdb_|reading it kills the reader with SIG)",
                     log), log
    for k, d in objs.items():
        assert m.path(k).read_bytes() == d
    # every chunk file verified and adopted: still warm; the fake records are gone
    assert proxy.stats()["ops"].get("GetObject", 0) == 0
    assert m.stats()["cache"]["chunks"] == 8
    assert len(list(m.cache_dir.glob("index.bad-*"))) == 1


def test_index_that_passes_the_check_but_fails_its_first_write_is_rebuilt(s3, bucket, mounts,
                                                                         proxy):
    """Damage on a page no record leads to (the free-page list: a power loss, a failing
    disk) passes the check, which reads every record, and fails the first write at
    start-up with MDB_CORRUPTED: the daemon failed every start, and the cache stayed
    unusable until its index was deleted by hand. It is moved aside and rebuilt now."""
    import struct

    from cachefs.index import ChunkRec, Index, check_in_child

    m, objs = _cached_then_stopped(s3, bucket, mounts)
    ix = Index(m.cache_dir / "index")
    rnd = random.Random(6)
    fake = [rnd.randbytes(16) for _ in range(2000)]
    ix.apply([Index.op_put_chunk(c, ChunkRec(CS, rnd.randbytes(16), 1.0)) for c in fake])
    ix.apply([Index.op_delete_chunk(c) for c in fake])  # their pages go to the free list
    ix.close()
    data_mdb = m.cache_dir / "index" / "data.mdb"
    raw = bytearray(data_mdb.read_bytes())
    # the newer of the two meta pages (after the 16-byte page header: magic, version,
    # address, map size, then two 48-byte db records, free list first, each ending in its
    # root page number; then the last page and the transaction id)
    metas = [(struct.unpack_from("<Q", raw, pg * 4096 + 16 + 24 + 96 + 8)[0],
              struct.unpack_from("<Q", raw, pg * 4096 + 16 + 24 + 40)[0]) for pg in (0, 1)]
    free_root = max(metas)[1]
    assert 2 <= free_root < len(raw) // 4096
    raw[free_root * 4096 + 10:free_root * 4096 + 12] = b"\xff\xff"  # its page flags
    data_mdb.write_bytes(raw)
    assert check_in_child(m.cache_dir / "index") is None  # every record reads back
    proxy.reset()
    m.start()
    log = m.log_text()
    assert re.search(r"cannot be used \(CorruptedError: mdb_put: MDB_CORRUPTED", log), log
    for k, d in objs.items():
        assert m.path(k).read_bytes() == d
    assert proxy.stats()["ops"].get("GetObject", 0) == 0  # the chunk files adopted
    assert m.stats()["cache"]["chunks"] == 8
    assert len(list(m.cache_dir.glob("index.bad-*"))) == 1


def test_memory_charged_once_for_a_chunk_the_memo_shares(s3, bucket, mounts):
    """A chunk a handle fetched itself is kept in its buffer and shared through the memo:
    one copy in memory, charged to the read-ahead budget once, while the handle holds it
    and after (the memo takes the charge over); all of it returned once the file closes."""
    MiB = 1 << 20
    data = put(s3, bucket, "f.bin", random.randbytes(4 * MiB))
    m = mounts(f"s3://{bucket}", chunk_size="1MiB")
    fd = os.open(m.path("f.bin"), os.O_RDONLY | os.O_DIRECT)  # no kernel read-ahead
    try:
        # random reads: the handle's read-ahead stays off, each read fetches its chunk
        assert os.pread(fd, 4096, 2 * MiB + 4096) == data[2 * MiB + 4096:2 * MiB + 8192]
        st = m.stats()
        assert st["readahead_bytes"] == MiB and st["memo_bytes"] == MiB, st
        assert os.pread(fd, 4096, 5000) == data[5000:9096]  # chunk 2 leaves the buffer
        st = m.stats()
        assert st["readahead_bytes"] == 2 * MiB and st["memo_bytes"] == 2 * MiB, st
    finally:
        os.close(fd)
    wait_for(lambda: m.stats()["readahead_bytes"] == 0, 10, "read-ahead budget returned")
    assert m.stats()["memo_bytes"] == 0


def test_readers_of_one_chunk_at_once_share_one_ssd_read(s3, bucket, mounts):
    """Handles whose reads met one warm chunk at once each read it from the SSD (a job's
    ranks on one shard, O_DIRECT or --no-page-cache readers): 8 readers, 8 reads of the
    whole chunk, before the first had put it in the chunk memo. They share one now."""
    MiB = 1 << 20
    data = put(s3, bucket, "w.bin", random.randbytes(4 * MiB))
    m = mounts(f"s3://{bucket}", chunk_size="4MiB")
    assert m.path("w.bin").read_bytes() == data  # on the SSD
    wait_for(lambda: m.stats()["memo_bytes"] == 0, 10, "the memo let go of the closed file")
    before = m.counters().get("ssd_hits", 0)
    n = 8
    start, done = threading.Barrier(n), threading.Barrier(n)
    got = {}

    def reader(k: int) -> None:
        fd = os.open(m.path("w.bin"), os.O_RDONLY | os.O_DIRECT)  # every read reaches us
        try:
            start.wait(10)
            got[k] = os.pread(fd, 4096, k * 256 * 1024)
            done.wait(10)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {k: data[k * 256 * 1024:k * 256 * 1024 + 4096] for k in range(n)}
    c = m.counters()
    assert c.get("ssd_hits", 0) - before == 1
    # (how many joined depends on when each request came; the others found the memo)
    assert c.get("ssd_read_joins", 0) + c.get("memory_hits", 0) >= n - 1


def test_a_large_first_listing_keeps_the_trio_thread_free(tmp_path, monkeypatch):
    """The first listing of a directory hashes every new name into its inode key and
    applies the entries. For a million names the hashing took 2 s of the trio thread,
    every other FUSE request waiting, and the subdirectories were applied without a
    pause. Names are now hashed in a worker thread, and applying yields every
    APPLY_SLICE entries, subdirectories too."""
    from types import SimpleNamespace

    import trio

    from cachefs import vfs as vfsmod
    from cachefs.chunks.reader import ChunkReader
    from cachefs.index import Index, IndexWriter, path_key
    from cachefs.objectstore import Listing, ObjInfo
    from cachefs.stats import Stats
    from cachefs.vfs import VFS, MountCtx, Node

    hashed_on_trio = []

    def spy(mount: str, path: str) -> bytes:
        hashed_on_trio.append(trio.lowlevel.in_trio_run())
        return path_key(mount, path)

    monkeypatch.setattr(vfsmod, "path_key", spy)
    n = 3 * vfsmod.APPLY_SLICE
    listing = Listing([f"d/s{i}/" for i in range(n)],
                      [ObjInfo(f"d/f{i}", i, f"e{i}", 0.0) for i in range(n)])
    ix = Index(tmp_path / "index", 1 << 26)
    mount = MountCtx(SimpleNamespace(name="m", bucket="b"), None)
    ix.apply([Index.op_put_ino(path_key("m", "d/f7"), 77, 100)])  # known from before
    v = VFS.__new__(VFS)  # what listing uses: the index, its writer, the inode table
    v.prefetch = FilePrefetcher(v, 0)  # (told of relistings)
    v.index, v.writer, v.stats, v.nodes, v._warned = ix, IndexWriter(ix), Stats(), {}, set()
    v._next_ino, v.open_count, v.invalidate, v.invalidate_entry = 100, {}, None, None
    v._headed = {}
    v.reader = ChunkReader.__new__(ChunkReader)  # (what it remembers of changed versions)
    v.reader._changed = {}
    d = Node(5, 1, "d", True, mount, "d/")
    v.nodes[5] = d
    ticks = 0

    async def main():
        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            known = await v._known_inos(d, "d/", listing)
            before = ticks
            assert await v._apply_listing(d, "d/", listing, known, 0.0)
            nursery.cancel_scope.cancel()
        return known, ticks - before

    try:
        known, ticks_applying = trio.run(main)
    finally:
        ix.close()
    assert len(known) == 2 * n and known["d/f7"][1] == 77
    assert len(hashed_on_trio) == 2 * n and not any(hashed_on_trio)
    # 6 slices of entries (3 of subdirectories, 3 of files): other tasks ran between them
    assert ticks_applying >= 5, ticks_applying
    assert len(d.children) == 2 * n and v.nodes[d.children["f7"]].ino == 77


def _listing_vfs(tmp_path):
    """A VFS with only what applying a listing uses (the index, its writer, the inode
    table, the reader's memo of changed versions): (vfs, index, a mount)."""
    from types import SimpleNamespace

    from cachefs.chunks.reader import ChunkReader
    from cachefs.index import Index, IndexWriter
    from cachefs.stats import Stats
    from cachefs.vfs import VFS, MountCtx

    ix = Index(tmp_path / "index", 1 << 26)
    v = VFS.__new__(VFS)
    v.prefetch = FilePrefetcher(v, 0)  # (told of relistings)
    v.index, v.writer, v.stats, v._warned = ix, IndexWriter(ix), Stats(), set()
    v._next_ino, v.open_count, v.invalidate, v.invalidate_entry = 100, {}, None, None
    v._headed, v._head_retry_at, v._missed_at, v._first_failed = {}, {}, {}, {}
    v._relist_failed, v.nodes = {}, {}
    v.reader = ChunkReader.__new__(ChunkReader)  # (what it remembers of changed versions)
    v.reader._changed = {}
    return v, ix, MountCtx(SimpleNamespace(name="m", bucket="b"), None)


def test_an_unreadable_saved_listing_is_deleted_and_the_writer_goes_on(tmp_path):
    """A listing kept in the index that does not parse made every lookup in its directory
    EIO, for good (S3 was never asked); it is deleted now, from the trio thread (a submit
    from the worker thread that read it left the index writer asleep for good)."""
    from types import SimpleNamespace

    import trio

    from cachefs.index import Index, IndexWriter
    from cachefs.stats import Stats
    from cachefs.vfs import VFS, MountCtx, Node

    ix = Index(tmp_path / "index", 1 << 26)
    spec = SimpleNamespace(name="", bucket="b", prefix="", endpoint_url=None)
    v = VFS.__new__(VFS)
    v.prefetch = FilePrefetcher(v, 0)  # (told of relistings)
    v.index, v.writer, v.stats = ix, IndexWriter(ix), Stats()
    v.cfg = SimpleNamespace(metadata_ttl=60.0, single_root=True)
    d = Node(5, 1, "d", True, MountCtx(spec, None), "d/")
    v.nodes = {5: d}
    key = v._listing_key(d)
    ix.apply([Index.op_put_listing(key, b'{"t": %d, "p": [], "o": [[1]]}' % time.time())])

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(v.writer.run)
            assert await v._load_listing(d) is False
            with trio.fail_after(5):
                await v.writer.commit(Index.op_put_ino(b"k", 7, 8))  # the writer goes on
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert ix.get_listing(key) is None and ix.get_ino(b"k") == 7
    finally:
        ix.close()


def test_a_listing_given_up_half_applied_leaves_no_node(tmp_path):
    """A first listing cancelled while its entries were applied (the control request of a
    `preload` of the directory, Ctrl-C), or one whose directory was dropped meanwhile (gone
    from its parent's listing, forgotten by the kernel), left the nodes made so far in the
    inode table for good: 4,095 for one cancel, a whole directory for the other."""

    import trio

    from cachefs import vfs as vfsmod
    from cachefs.objectstore import Listing, ObjInfo
    from cachefs.vfs import Node

    n = 3 * vfsmod.APPLY_SLICE
    listing = Listing([], [ObjInfo(f"d/f{i}", i, f"e{i}", 0.0) for i in range(n)])
    v, ix, mount = _listing_vfs(tmp_path)
    d = Node(5, 1, "d", True, mount, "d/")

    async def main(step):
        async with trio.open_nursery() as nursery:
            got = []

            async def apply():
                got.append(await v._apply_listing(d, "d/", listing, {}, 0.0))

            nursery.start_soon(apply)
            for _ in range(3):  # into its second slice
                await trio.lowlevel.checkpoint()
            step(nursery)
        return got

    try:
        v.nodes = {5: d}
        assert trio.run(main, lambda nursery: nursery.cancel_scope.cancel()) == []
        assert v.nodes == {5: d} and d.children is None
        assert trio.run(main, lambda nursery: v.nodes.pop(5)) == [False]
        assert v.nodes == {} and d.children is None
    finally:
        ix.close()


def test_a_listing_asked_before_a_head_keeps_what_the_head_said(tmp_path):
    """A listing asked of S3 before a HEAD's answer: a name the HEAD found deleted is left
    out, one it found (changed) is kept even if that listing lacks it, the node keeps the
    HEAD's version, and the listing is reported as not S3's latest (not to be saved)."""

    import trio

    from cachefs.objectstore import Listing, ObjInfo
    from cachefs.vfs import Node

    v, ix, mount = _listing_vfs(tmp_path)
    d = Node(5, 1, "d", True, mount, "d/")
    v.nodes = {5: d}
    for ino, name, etag in ((10, "gone.bin", "e1"), (11, "new.bin", "e2"), (12, "same.bin", "s")):
        n = v.nodes[ino] = Node(ino, 5, name, False, mount, "d/" + name)
        n.size, n.etag = 1, etag
    d.children = {"gone.bin": 10, "new.bin": 11, "same.bin": 12}
    asked = time.monotonic()
    v._headed[10] = (asked + 1, None)  # deleted, said after the listing was asked
    v._headed[11] = (asked + 1, ObjInfo("d/new.bin", 2, "e2", 0.0))
    older = Listing([], [ObjInfo("d/gone.bin", 1, "e1", 0.0), ObjInfo("d/same.bin", 1, "s", 0.0)])
    latest = trio.run(v._apply_listing, d, "d/", older, {}, asked)
    assert latest is False
    assert d.children == {"new.bin": 11, "same.bin": 12}
    assert v.nodes[11].etag == "e2" and 10 not in v.nodes
    # a listing asked after the answers is S3's latest: it rules, and the answers are spent
    newer = Listing([], [ObjInfo("d/new.bin", 3, "e3", 0.0), ObjInfo("d/same.bin", 1, "s", 0.0)])
    assert trio.run(v._apply_listing, d, "d/", newer, {}, asked + 2) is True
    assert v.nodes[11].etag == "e3" and 11 not in v._headed
    ix.close()


def test_a_relisting_lets_the_prefetchers_run_go_of_the_old_order(tmp_path):
    """The file prefetcher's run of a directory kept the order it built of the listing it
    saw (a million names: about 100 MiB) after a relisting replaced it, until the next
    open there or until 1,024 other directories had runs. It lets go of it now, and keeps
    what it learned (a pause)."""

    import trio

    from cachefs.objectstore import Listing, ObjInfo
    from cachefs.prefetch import _Run
    from cachefs.vfs import Node

    v, ix, mount = _listing_vfs(tmp_path)
    d = Node(5, 1, "d", True, mount, "d/")
    v.nodes = {5: d}
    first = Listing([], [ObjInfo(f"d/f{i}", 1, f"e{i}", 0.0) for i in range(3)])
    trio.run(v._apply_listing, d, "d/", first, {}, time.monotonic())
    r = v.prefetch.runs[5] = _Run(d)
    r.paused = True
    assert r.children is d.children and len(r.entries) == 3
    same = Listing([], [ObjInfo(f"d/f{i}", 1, f"e{i}", 0.0) for i in range(3)])
    trio.run(v._apply_listing, d, "d/", same, {}, time.monotonic())
    assert r.children is d.children and len(r.entries) == 3  # the same names: kept
    other = Listing([], [ObjInfo(f"d/g{i}", 1, f"e{i}", 0.0) for i in range(2)])
    trio.run(v._apply_listing, d, "d/", other, {}, time.monotonic())
    assert (r.children, r.entries, r.paused) == (None, [], True)
    ix.close()


def test_the_kernel_keeps_a_listed_entry_and_the_root_for_their_ttl():
    """What the kernel may keep: an entry for what is left of its listing's TTL, the root of
    a single-bucket mount (its own parent) for what is left of its own listing's, an entry that is
    no longer its name's for no time.  The root got 0 for a while: with default_permissions
    every path walk through it asked the daemon for its attributes again."""
    from types import SimpleNamespace

    from cachefs.vfs import ROOT_INO, VFS, MountCtx, Node

    mount = MountCtx(SimpleNamespace(name="", bucket="b"), None)
    v = VFS.__new__(VFS)
    v.prefetch = FilePrefetcher(v, 0)  # (told of relistings)
    v.cfg = SimpleNamespace(attr_timeout=300.0, metadata_ttl=300.0)
    root = Node(ROOT_INO, ROOT_INO, "", True, mount, "")
    f = Node(2, ROOT_INO, "f", False, mount, "f")
    old = Node(3, ROOT_INO, "f", False, mount, "f")  # an older version kept open
    root.children, root.listed_at = {"f": 2}, time.monotonic()
    v.nodes = {ROOT_INO: root, 2: f, 3: old}
    assert 299.0 < v.kernel_timeout(root) <= 300.0
    assert 299.0 < v.kernel_timeout(f) <= 300.0
    assert v.kernel_timeout(old) == 0.0


def test_readdir_walks_only_the_entries_the_kernel_takes():
    """The kernel asks for a directory's entries a buffer at a time (a few hundred names),
    from the offset it reached.  Each readdir built the whole rest of the listing before
    its first reply, so listing a directory was quadratic: 200k names took 7.7 s of the
    daemon's one thread (0.57 s now), a million names minutes, every other request
    waiting.  A readdir now looks at the entries it hands over and no others."""
    import itertools

    from cachefs.vfs import VFS, FSError, Node

    class CountingNodes(dict):
        gets = 0

        def get(self, key, default=None):
            self.gets += 1
            return super().get(key, default)

    n = 100_000
    entries = [(f"f{i:06d}", i + 2) for i in range(n)]
    vfs = VFS.__new__(VFS)  # only the directory handles and the inode table are used
    vfs.prefetch = FilePrefetcher(vfs, 0)  # (told of relistings)
    vfs.nodes = CountingNodes({ino: Node(ino, 1, name, False, None, name)
                               for name, ino in entries})
    d = Node(1, 1, "", True, None, "")
    vfs.dir_handles = {7: (d, entries)}
    # offsets: "." 1, ".." 2, entry i at i + 3
    got = list(itertools.islice(vfs.readdir(7, 1002), 300))  # what one kernel buffer takes
    assert [(name, node.ino, nxt) for name, node, nxt in got] == [
        (entries[i][0], entries[i][1], i + 3) for i in range(1000, 1300)]
    assert vfs.nodes.gets == 300  # was 99,000: the rest of the directory, on every call
    assert [e[2] for e in vfs.readdir(7, n)] == [n + 1, n + 2]
    with pytest.raises(FSError) as ei:
        vfs.readdir(8, 0)
    assert ei.value.errno == errno.EBADF


def test_files_held_open_and_left_give_their_chunks_back(s3, bucket, mounts):
    """A loader that opens its shards, reads their headers and keeps them open: each handle
    kept the chunk it read (and its read-ahead) until its next read or its close, so memory
    grew by a chunk or two per open file, past the read-ahead budget (2.9 MB held against
    512 KiB for 40 files). Handles idle for a second now give them back once the budget
    is spent."""
    import mmap

    for i in range(40):
        s3.put_object(Bucket=bucket, Key=f"h/{i:02d}", Body=random.randbytes(4 * CS))
    m = mounts(f"s3://{bucket}", extra=("--readahead-memory", str(8 * CS)))
    buf = mmap.mmap(-1, 4096)
    fds = []
    try:
        for i in range(40):
            fd = os.open(m.path(f"h/{i:02d}"), os.O_RDONLY | os.O_DIRECT)
            fds.append(fd)
            assert os.preadv(fd, [buf], 0) == 4096
        wait_for(lambda: m.stats()["readahead_bytes"] > 8 * CS, 10, "the budget spent")
        time.sleep(1.2)  # every handle idle
        assert os.preadv(fds[0], [buf], CS) == 4096  # a read: the idle ones give back
        st = m.stats()
        assert st["readahead_bytes"] <= 8 * CS + 2 * CS, st["readahead_bytes"]
        assert st["counters"]["idle_handle_chunks_released"] >= 30
        for i, fd in enumerate(fds):  # and read on as before
            assert os.preadv(fd, [buf], 3 * CS) == 4096
            assert bytes(buf) == s3.get_object(Bucket=bucket, Key=f"h/{i:02d}",
                                               Range=f"bytes={3 * CS}-{3 * CS + 4095}")[
                                                   "Body"].read()
    finally:
        for fd in fds:
            os.close(fd)


def test_access_times_reach_the_index_in_one_commit_a_second(s3, bucket, mounts):
    """Each chunk read from the SSD queued its own access-time update, committed alone: 170
    synced commits a second for warm reads at 1.4 GB/s. They are written once a second in
    one commit now, and at a clean stop, so the LRU order survives a restart."""
    import mmap
    import time

    from cachefs.index import Index

    data = put(s3, bucket, "t.bin", random.randbytes(16 * CS))
    m = mounts(f"s3://{bucket}")
    assert m.path("t.bin").read_bytes() == data  # cached: 16 chunks on the SSD
    before = m.stats()["index_commits"]
    t0 = time.time()
    for _ in range(5):  # O_DIRECT: every pass reads the 16 chunks from the SSD
        fd = os.open(m.path("t.bin"), os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 16 * CS)
            assert os.preadv(fd, [buf], 0) == 16 * CS and bytes(buf) == data
        finally:
            os.close(fd)
    st = m.stats()
    assert st["counters"]["ssd_hits"] >= 5 * 16, st["counters"]
    assert st["index_commits"] - before <= 4, (st["index_commits"], before)  # was 80 or more
    assert m.stop() == 0
    ix = Index(m.cache_dir / "index")
    try:
        times = [rec.last_access for _, rec in ix.iter_chunks()]
    finally:
        ix.close()
    assert len(times) == 16 and min(times) >= t0  # the last second's too, at the stop


def test_extended_attributes_are_asked_for_once(s3, bucket, mounts):
    """cachefs has no extended attributes. Answered ENOATTR, the kernel asked again for
    every file and name: `ls -l` sent two requests per file (ACLs, SELinux labels), 1 s of
    its 1.05 s on a directory of 20,000 files. ENOSYS: the kernel stops asking."""
    for i in range(3):
        put(s3, bucket, f"x/{i}", b"z")
    m = mounts(f"s3://{bucket}")
    for i in range(3):
        for name in ("security.selinux", "system.posix_acl_access", "user.x"):
            with pytest.raises(OSError) as e:
                os.getxattr(m.path(f"x/{i}"), name)
            assert e.value.errno in (errno.EOPNOTSUPP, errno.ENODATA)
        with pytest.raises(OSError):
            os.listxattr(m.path(f"x/{i}"))
    c = m.counters()
    assert c.get("fuse_getxattr") == 1 and c.get("fuse_listxattr") == 1, c


def test_s3_timestamps_are_read_as_botocore_reads_them():
    """LIST pages are parsed on the trio thread, and reading their timestamps with
    dateutil took most of it (59 ms a page of 1000 keys; 22 ms with the stdlib's ISO
    8601 reader): the fast reader must give the very same instants, HTTP dates too."""
    import botocore.utils

    from cachefs.objectstore import _timestamp

    for v in ("2026-05-01T12:00:01.000Z", "2026-05-01T12:00:01Z",
              "2026-05-01T12:00:01.123456+02:00", "Wed, 12 Oct 2009 17:50:00 GMT",
              "2009-10-12T17:50:30.000Z"):
        got = _timestamp(v)
        assert got.tzinfo is not None
        assert got.timestamp() == botocore.utils.parse_timestamp(v).timestamp(), v
