"""File prefetch: a reader opening a directory's files in name order gets the next ones
fetched ahead of it; other readers do not pay for it (S3 GETs counted at the proxy)."""

from __future__ import annotations

import errno
import os
import random
import time

import pytest
from cachefs_env import wait_for

pytestmark = pytest.mark.fuse

N = 40
SIZE = 3000  # one chunk (the fixture's chunk size is 64 KiB)


def frames(s3, bucket, n=N, size=SIZE, prefix="frames"):
    rnd = random.Random(7)
    data = {}
    for i in range(n):
        key = f"{prefix}/f{i:04d}.jpg"
        data[key] = rnd.randbytes(size)
        s3.put_object(Bucket=bucket, Key=key, Body=data[key])
    return data


def read_in(m, keys):
    return {k: m.path(k).read_bytes() for k in keys}


def gets(proxy):
    return proxy.stats()["ops"].get("GetObject", 0)


def settled_gets(proxy):
    """The GET count once prefetches still in flight have landed."""
    last = -1
    while True:
        n = gets(proxy)
        if n == last:
            return n
        last = n
        time.sleep(0.5)


def settled_counters(m):
    """The daemon's counters once no chunk fetch is in flight (prefetches started just
    before a pause land after the reader's last close returned: on a loaded machine,
    later than the next counters would be taken)."""
    last = None
    while True:
        s = m.stats()
        c = s["counters"]
        if s["in_flight_fetches"] == 0 and c == last:
            return c
        last = c
        time.sleep(0.3)


def test_in_order_reader_is_served_ahead(s3, bucket, mounts, proxy):
    data = frames(s3, bucket)
    m = mounts(f"s3://{bucket}")
    keys = sorted(data)
    assert read_in(m, keys) == data
    c = m.counters()
    # from the third open on, files arrive before they are read, and nothing is wasted
    assert c.get("prefetch_started", 0) >= N - 4, c
    assert c.get("prefetch_hits", 0) + c.get("prefetch_claims", 0) >= N - 4, c
    assert c.get("prefetch_unused", 0) == 0, c
    assert settled_gets(proxy) == N
    # the GETs went out on kept-alive connections: no more than S3's concurrency limit
    # (32) were ever opened, so some carried several GETs (20-21 for 40 GETs here)
    assert 1 <= c["s3_connections"] <= min(32, N - 1), c
    # warm: a second pass (page cache bypassed by a restart) is prefetched from the SSD
    m.stop()
    m.start()
    proxy.reset()
    assert read_in(m, keys) == data
    c = m.counters()
    assert gets(proxy) == 0
    assert c.get("prefetch_hits", 0) + c.get("prefetch_claims", 0) >= N - 4, c
    assert c.get("ssd_hits", 0) == N, c
    # the SSD reads went 8 files per worker-thread call (a full window is refilled 8 at a
    # time), not one call per open: a thread hop costs more than reading a small file
    assert c.get("prefetch_ssd_calls", 0) <= N // 8 + 3, c


def test_out_of_order_reader_prefetches_nothing(s3, bucket, mounts, proxy):
    data = frames(s3, bucket)
    m = mounts(f"s3://{bucket}")
    keys = sorted(data)
    order = [keys[(i * 17) % N] for i in range(N)]  # every step jumps 17 names
    assert read_in(m, order) == data
    c = m.counters()
    assert c.get("prefetch_started", 0) == 0, c
    assert gets(proxy) == N


def test_reader_that_stops_wastes_at_most_the_window(s3, bucket, mounts, proxy):
    data = frames(s3, bucket)
    more = frames(s3, bucket, prefix="more")
    m = mounts(f"s3://{bucket}", extra=("--prefetch-files", "4"),
               env={"CACHEFS_TEST_PREFETCH_HOLD": "3"})
    keys = sorted(data)
    assert read_in(m, keys[:10]) == {k: data[k] for k in keys[:10]}
    ahead = m.stats()["readahead_bytes"]  # (at once: they are held for 3 s)
    # the last open (position 9) fetched at most positions 10..13
    assert 10 < settled_gets(proxy) <= 10 + 4
    c = m.counters()
    assert c.get("prefetch_started", 0) <= 10 + 4 - 3, c
    # what it fetched ahead is dropped once held for the hold time, with no further open
    # (it stayed held, charged to the read-ahead budget, until the next open)
    held = c["prefetch_started"] - c.get("prefetch_hits", 0) - c.get("prefetch_claims", 0)
    assert held > 0 and ahead > 0
    wait_for(lambda: m.stats()["readahead_bytes"] == 0, 10, "the held bytes dropped")
    assert m.counters().get("prefetch_unused", 0) == held
    # with the default window (32 files), the bytes ahead stay within one chunk (64 KiB)
    m.stop()
    m.extra = ()
    m.start()
    proxy.reset()
    keys = sorted(more)[:10]
    assert read_in(m, keys) == {k: more[k] for k in keys}
    assert 10 + 4 < settled_gets(proxy) <= 10 + 64 * 1024 // SIZE


def test_a_failed_prefetch_is_not_the_reads_failure(s3, bucket, mounts, proxy):
    """A prefetch that failed (S3 errors to the end of its retries) made the open's read
    of that file fail at once with EIO for 2 s, as if the read had failed; one that met a
    file replaced in S3 left the open to read the old version (EIO). The read now fetches
    anew, and the prefetcher marks a changed file stale, so its open asks S3 for it."""
    data = frames(s3, bucket, n=12)
    keys = sorted(data)
    m = mounts(f"s3://{bucket}", extra=("--s3-max-attempts", "2"))
    assert m.path(keys[0]).read_bytes() == data[keys[0]]  # listed: the ETags of all 12
    data[keys[6]] = b"replaced " * 100
    s3.put_object(Bucket=bucket, Key=keys[6], Body=data[keys[6]])
    proxy.faults(status=500, count=2, key_filter=keys[5])  # both attempts of its prefetch
    assert read_in(m, keys[1:3]) == {k: data[k] for k in keys[1:3]}  # prefetch 3..6 starts
    wait_for(lambda: proxy.gets(keys[5]) >= 2 and proxy.gets(keys[6]) >= 1, 20,
             "the prefetches of f0005 (failed) and f0006 (412)")
    # (ended in the daemon too: a read that joined the failing fetch would share its error)
    wait_for(lambda: m.stats()["in_flight_fetches"] == 0, 20, "the prefetches' end")
    for k in keys[3:7]:
        assert m.path(k).read_bytes() == data[k], k
    c = m.counters()
    assert c.get("read_errors", 0) == 0, c
    assert proxy.gets(keys[5]) == 3  # the two failed attempts, then the read's (or a new
    # prefetch's) GET


def test_a_read_that_claims_a_failing_prefetch_shares_its_failure(s3, bucket, mounts, proxy):
    """An open that claimed a prefetch under way waited for it, and when it failed (S3
    errors to the end of its retries), the read fetched anew: two S3 budgets before its
    EIO, about 6 minutes with the defaults. The read now shares the prefetch's failure."""
    data = frames(s3, bucket, n=8)
    keys = sorted(data)
    m = mounts(f"s3://{bucket}", extra=("--s3-max-attempts", "2", "--s3-timeout", "2s"))
    assert m.path(keys[0]).read_bytes() == data[keys[0]]  # listed
    # each attempt at f0003 stalls past the S3 timeout: its prefetch takes 4 s, then fails
    proxy.faults(stall_mid_body=30, count=-1, key_filter=keys[3])
    assert read_in(m, keys[1:3]) == {k: data[k] for k in keys[1:3]}  # prefetch 3.. starts
    wait_for(lambda: proxy.gets(keys[3], settle=0) >= 1, 10, "the prefetch of f0003")
    assert m.stats()["in_flight_fetches"] > 0  # (the open below claims it)
    with pytest.raises(OSError) as e:
        m.path(keys[3]).read_bytes()
    assert e.value.errno == errno.EIO
    assert proxy.gets(keys[3], settle=0) == 2  # the prefetch's two attempts, not the read's
    proxy.clear_faults()
    assert m.counters().get("prefetch_claims", 0) >= 1


def test_files_opened_and_held_unread_give_back_their_prefetched_bytes(s3, bucket, mounts):
    """Bytes the prefetcher handed to a handle at its open were out of idle trimming's
    reach until the file closed, when the handle never read (opened and held, or read from
    the page cache): 3,000 such files held the whole read-ahead budget, and chunk
    read-ahead was off for every other reader. Idle handles now give them back."""
    data = frames(s3, bucket, n=60, size=8000, prefix="held")
    s3.put_object(Bucket=bucket, Key="big.bin", Body=os.urandom(8 * 64 * 1024))
    m = mounts(f"s3://{bucket}", extra=("--readahead-memory", "512KiB"))
    fds = []
    try:
        for k in sorted(data):  # opened in order, none read
            fds.append(os.open(m.path(k), os.O_RDONLY))
        wait_for(lambda: m.stats()["in_flight_fetches"] == 0, 20, "the prefetches")
        held = m.stats()["readahead_bytes"]
        assert held >= 100 * 1024, held  # what the unread handles were handed
        time.sleep(1.2)  # (idle for more than IDLE_HANDLE)
        assert m.path("big.bin").read_bytes()[:1] is not None  # a reader needs the budget
        c = m.counters()
        assert c.get("idle_handle_chunks_released", 0) >= 10, c
        assert m.stats()["readahead_bytes"] < held, (held, m.stats()["readahead_bytes"])
    finally:
        for fd in fds:
            os.close(fd)


def test_files_a_reader_skips_are_let_go_once_it_is_past_them(s3, bucket, mounts, proxy):
    """A reader of every 2nd file (frame subsampling, the .jpg of .jpg/.json pairs) got
    the files it skipped fetched ahead too, and they stayed held for HOLD_TTL (30 s):
    prefetch's share of the budget filled, and prefetch stopped in every directory. Files
    the reader goes SLACK positions past are let go at once."""
    data = frames(s3, bucket, n=80)
    keys = sorted(data)[::2]
    m = mounts(f"s3://{bucket}")
    assert read_in(m, keys) == {k: data[k] for k in keys}
    wait_for(lambda: m.stats()["in_flight_fetches"] == 0, 20, "the prefetches")
    c = m.counters()
    # about one skipped file per file read was fetched ahead; those behind the reader
    # went at once (the hold time is 30 s)
    assert c.get("prefetch_unused", 0) >= 20, c
    assert m.stats()["readahead_bytes"] <= 40 * SIZE, m.stats()["readahead_bytes"]


def test_fetches_ahead_still_on_their_way_when_the_run_ends_are_let_go(s3, bucket, mounts,
                                                                         proxy):
    """A reader that jumps away ends its run, and what was fetched ahead for it goes; but
    fetches still on their way then arrived afterwards and were held for HOLD_TTL (30 s),
    charged to the read-ahead budget."""
    data = frames(s3, bucket)
    keys = sorted(data)
    m = mounts(f"s3://{bucket}")
    proxy.faults([{"delay": 1.0, "count": -1, "key_filter": k} for k in keys[3:9]])
    assert read_in(m, keys[:3]) == {k: data[k] for k in keys[:3]}  # prefetch 3.. starts
    assert m.path(keys[30]).read_bytes() == data[keys[30]]  # a jump: the run ends
    wait_for(lambda: m.stats()["in_flight_fetches"] == 0, 20, "the fetches ahead")
    proxy.clear_faults()
    c = m.counters()
    assert c.get("prefetch_started", 0) >= 3 and c.get("prefetch_unused", 0) >= 3, c
    assert m.stats()["readahead_bytes"] == 0, m.stats()["readahead_bytes"]


def test_worker_processes_reading_batches_side_by_side_are_each_served_ahead(s3, bucket,
                                                                             mounts):
    """A data loader with 4 worker processes, each reading a contiguous batch at the same
    time as the others: one run per directory saw their interleaved opens as jumps, and
    served none of the 80 files ahead. Each process has its run now."""
    import hashlib
    import subprocess
    import sys

    data = frames(s3, bucket, n=80)
    keys = sorted(data)
    m = mounts(f"s3://{bucket}")
    os.listdir(m.path("frames"))
    worker = ("import hashlib, sys, time\n"
              "for p in sys.argv[1:]:\n"
              "    print(hashlib.sha256(open(p, 'rb').read()).hexdigest(), flush=True)\n"
              "    time.sleep(0.01)\n")
    procs = [subprocess.Popen([sys.executable, "-c", worker,
                               *[str(m.path(k)) for k in keys[20 * w:20 * w + 20]]],
                              stdout=subprocess.PIPE, text=True) for w in range(4)]
    for w, p in enumerate(procs):
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        assert out.split() == [hashlib.sha256(data[k]).hexdigest()
                               for k in keys[20 * w:20 * w + 20]]
    wait_for(lambda: m.stats()["in_flight_fetches"] == 0, 20, "the prefetches")
    c = m.counters()
    assert c.get("prefetch_hits", 0) + c.get("prefetch_claims", 0) >= 4 * 12, c
    assert c.get("prefetch_unused", 0) <= 4 * 8, c


def test_off_and_large_files(s3, bucket, mounts, proxy):
    data = frames(s3, bucket, n=12)
    big = frames(s3, bucket, n=6, size=3 * 64 * 1024 + 5, prefix="shards")
    medium = frames(s3, bucket, n=8, size=20_000, prefix="medium")  # > chunk size / 8
    m = mounts(f"s3://{bucket}", extra=("--prefetch-files", "0"))
    assert read_in(m, sorted(data)) == data
    assert m.counters().get("prefetch_started", 0) == 0
    m.stop()
    m.extra = ()
    m.start()
    # files larger than a chunk have their own read-ahead, and files over chunk size / 8
    # are bandwidth-bound: neither is prefetched as files
    assert read_in(m, sorted(big)) == big
    assert read_in(m, sorted(medium)) == medium
    assert m.counters().get("prefetch_started", 0) == 0
    assert settled_gets(proxy) == 12 + 6 * 4 + 8


def test_concurrent_readers_of_one_queue(s3, bucket, mounts, proxy):
    """8 threads draining one ordered list open files slightly out of order: still a run."""
    import queue
    import threading

    data = frames(s3, bucket, n=80)
    m = mounts(f"s3://{bucket}")
    q: queue.SimpleQueue = queue.SimpleQueue()
    for k in sorted(data):
        q.put(k)
    got: dict[str, bytes] = {}

    def worker():
        while True:
            try:
                k = q.get_nowait()
            except queue.Empty:
                return
            fd = os.open(m.path(k), os.O_RDONLY)
            try:
                got[k] = os.read(fd, 1 << 20)
            finally:
                os.close(fd)

    ts = [threading.Thread(target=worker) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert got == data
    wait_for(lambda: m.stats()["in_flight_fetches"] == 0, 20, "the prefetches")
    c = m.counters()
    assert c.get("prefetch_started", 0) >= 40, c
    # one run for the 8 threads of one process: FUSE names the thread, and a run per
    # thread served 58 of the 80 files ahead (72-74 as one run)
    assert c.get("prefetch_hits", 0) + c.get("prefetch_claims", 0) >= 62, c
    assert gets(proxy) == 80


def open_only(m, keys):
    """What a pass the page cache serves looks like to the daemon: opens and releases."""
    for k in keys:
        os.close(os.open(m.path(k), os.O_RDONLY))


def read_direct(m, key) -> bytes:
    """A read that reaches the daemon whatever the page cache holds (O_DIRECT)."""
    import mmap

    fd = os.open(m.path(key), os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    try:
        n = os.readv(fd, [buf])
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def test_page_cache_epoch_pauses_prefetch_and_a_dropped_cache_resumes_it(s3, bucket, mounts,
                                                                         proxy):
    """A second epoch over files the kernel's page cache still holds reaches the daemon
    only as opens: prefetching for it would read the SSD for nothing.  It pauses once few
    opens reach the daemon; a page cache that lost a quarter of the files does not resume
    it; once the page cache lets all the files go, a few reads that reach the daemon in a
    row resume it.  (What the page cache holds is played by the reader: opens alone for
    files it holds, O_DIRECT reads for files it lost; this VM's proactive reclaim lets
    page-cache pages go at its own pace.)"""
    from cachefs.prefetch import START_WINDOW

    data = frames(s3, bucket)
    m = mounts(f"s3://{bucket}")
    keys = sorted(data)
    assert read_in(m, keys) == data  # cold: fetched ahead from S3
    settled_gets(proxy)
    c1 = m.counters()
    open_only(m, keys)  # hot: the page cache serves every read
    c2 = settled_counters(m)
    assert c2.get("prefetch_paused", 0) == 1, c2
    # SSD reads for nothing: until the pause (closes reach the daemon after the process's
    # close returns, so a fast reader is a few files further by then), not for every file
    wasted = c2.get("ssd_hits", 0) - c1.get("ssd_hits", 0)
    assert wasted <= 7 + 2 * START_WINDOW, c2  # 7 unread closes pause it; 37 with no pause
    # the page cache lost every fourth file: those reads reach the daemon, one SSD read
    # each, and the others are no reason to fetch ahead again
    holes = set(keys[::4])
    for k in keys:
        if k in holes:
            assert read_direct(m, k) == data[k]
        else:
            open_only(m, [k])
    c3 = m.counters()
    assert c3.get("fuse_read", 0) - c2.get("fuse_read", 0) == len(holes), c3
    assert c3.get("prefetch_resumed", 0) == 0, c3  # 10 resumes and pauses before
    assert c3.get("ssd_hits", 0) - c2.get("ssd_hits", 0) == len(holes), c3
    # the page cache lets all the files go: reads reach the daemon again, prefetch resumes
    assert {k: read_direct(m, k) for k in keys} == data
    c4 = m.counters()
    assert c4.get("prefetch_resumed", 0) == 1, c4
    served = (c4.get("prefetch_hits", 0) + c4.get("prefetch_claims", 0)
              - c3.get("prefetch_hits", 0) - c3.get("prefetch_claims", 0))
    assert served >= N - 16, c4  # the reads that resume it, then the window's start
    assert gets(proxy) == N  # every pass after the first from this node's SSD
