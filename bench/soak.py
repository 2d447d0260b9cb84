#!/usr/bin/env python3
"""Soak: concurrent readers verify every byte under injected S3 faults and daemon crashes.

    sudo .venv/bin/python bench/soak.py --minutes 10          # the real soak
    sudo .venv/bin/python bench/soak.py --minutes 1           # smoke

Set-up: a moto server and the fault proxy (tests/s3proxy.py) as child processes, a
bucket of random objects (sizes from 0 to a few MiB, 64 KiB chunks), one `cachefs mount
--foreground` daemon with a cache smaller than the data set (evictions all the time).

Load, until the time is up:
  - --readers threads pick an object and read it whole (odd block sizes) or at random
    offsets, and compare every byte with the object's content;
  - the proxy fails --fault-rate of the GETs with 503 SlowDown (seeded), plus a few
    truncated bodies (--truncate-rate);
  - every --restart-every seconds the daemon is killed with SIGKILL (every third time:
    stopped cleanly), then mounted again over its stale mount.

Reads that overlap a restart may fail with ENOTCONN/EIO: they are counted as
"interrupted", not as EIO.  At the end the daemon is stopped and its index and chunk
files are checked against each other (tests/test_reliability.py::CacheState).

Prints reads verified, bytes verified, faults injected, restarts, wrong bytes (must be 0),
EIOs outside restarts (must be 0), and exits 1 if either is not 0 or the cache is not
consistent.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from cachefs_env import Mount, fuse_available, unmount  # noqa: E402
from s3env import s3_client, start_moto, start_proxy  # noqa: E402

CS = 64 * 1024


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c = {"reads_verified": 0, "bytes_verified": 0, "wrong_bytes": 0, "wrong_reads": 0,
                  "short_reads": 0, "eio": 0, "other_errors": 0, "interrupted": 0, "restarts": 0,
                  "kills": 0}
        self.examples: list[str] = []

    def add(self, k: str, n: int = 1) -> None:
        with self.lock:
            self.c[k] += n

    def check(self, what: str, got: bytes, want: bytes, stable: bool) -> None:
        """Count a read: verified, short (a prefix: an error mid-way), or wrong."""
        if got == want:
            with self.lock:
                self.c["reads_verified"] += 1
                self.c["bytes_verified"] += len(got)
            return
        if len(got) < len(want) and want.startswith(got):
            # the kernel turns an error after some pages into a short read
            with self.lock:
                if not stable:
                    self.c["interrupted"] += 1
                    return
                self.c["short_reads"] += 1
                if len(self.examples) < 20:
                    self.examples.append(f"short read {what}: {len(got)} of {len(want)}")
            return
        diff = [i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b]
        n = len(diff) + abs(len(got) - len(want))
        first = diff[0] if diff else min(len(got), len(want))
        bad = got[first:first + 4096]
        with self.lock:
            self.c["wrong_reads"] += 1
            self.c["wrong_bytes"] += n
            if len(self.examples) < 20:
                self.examples.append(
                    f"WRONG {what}: got {len(got)} of {len(want)} bytes, first difference at "
                    f"+{first}, {bad.count(0)}/{len(bad)} zero bytes there, restart overlap "
                    f"{not stable}")


class Generation:
    """Restart bookkeeping: a read is trusted only if no restart overlapped it."""

    def __init__(self) -> None:
        self.n = 0
        self.restarting = False
        self.cv = threading.Condition()

    def begin(self) -> int:
        with self.cv:
            while self.restarting:
                self.cv.wait()
            return self.n

    def stable(self, since: int) -> bool:
        with self.cv:
            return not self.restarting and self.n == since


def reader(m: Mount, objs: dict[str, bytes], gen: Generation, cnt: Counters, stop: threading.Event,
           seed: int) -> None:
    rnd = random.Random(seed)
    keys = list(objs)
    while not stop.is_set():
        key = rnd.choice(keys)
        want = objs[key]
        g = gen.begin()
        try:
            with open(m.path(key), "rb", buffering=0) as f:
                # drop this file's pages from the kernel page cache (keep_cache would serve
                # most reads without asking the daemon): every read reaches cachefs
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                if rnd.random() < 0.5:
                    block = rnd.choice([4096, 65_537, 131_072, 1 << 20])
                    parts = []
                    while piece := f.read(block):
                        parts.append(piece)
                    got = b"".join(parts)
                    cnt.check(f"{key} whole, {block}-byte reads", got, want, gen.stable(g))
                else:
                    for _ in range(8):
                        off = rnd.randrange(0, max(1, len(want) + 100))
                        n = rnd.choice([1, 100, CS - 1, CS + 1, 3 * CS, 1 << 20])
                        got = os.pread(f.fileno(), n, off)
                        cnt.check(f"{key} pread({n}, {off})", got, want[off:off + n],
                                  gen.stable(g))
        except OSError as e:
            if not gen.stable(g) or e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                cnt.add("interrupted")
                time.sleep(0.05)
            elif e.errno == errno.EIO:
                cnt.add("eio")
                with cnt.lock:
                    if len(cnt.examples) < 10:
                        cnt.examples.append(f"EIO {key}")
            else:
                cnt.add("other_errors")
                with cnt.lock:
                    if len(cnt.examples) < 10:
                        cnt.examples.append(f"{key}: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--objects", type=int, default=40)
    ap.add_argument("--max-object", type=int, default=3 << 20, help="bytes")
    ap.add_argument("--cache-size", default="6MiB", help="smaller than the data: evictions")
    ap.add_argument("--fault-rate", type=float, default=0.10)
    ap.add_argument("--truncate-rate", type=float, default=0.01)
    ap.add_argument("--restart-every", type=float, default=20.0, help="seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    if not fuse_available():
        print("soak: /dev/fuse is not available", file=sys.stderr)
        return 2

    rnd = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="cachefs-soak-"))
    os.environ.setdefault("CACHEFS_RUNTIME_DIR", str(work / "run"))
    (work / "run").mkdir(mode=0o700, exist_ok=True)
    moto = start_moto()
    proxy = start_proxy(moto.url)
    m = None
    try:
        s3 = s3_client(moto.url)
        s3.create_bucket(Bucket="soak")
        objs = {}
        for i in range(args.objects):
            size = rnd.choice([0, 1, CS - 1, CS, CS + 1, rnd.randrange(1, args.max_object)])
            objs[f"d{i % 4}/obj{i:03d}.bin"] = data = rnd.randbytes(size)
            s3.put_object(Bucket="soak", Key=f"d{i % 4}/obj{i:03d}.bin", Body=data)
        total = sum(len(d) for d in objs.values())
        m = Mount(work, "s3://soak", proxy.url, name="soak", cache_size=args.cache_size,
                  chunk_size=f"{CS // 1024}KiB")
        m.start()
        proxy.reset()
        proxy.faults([{"status": 503, "code": "SlowDown", "rate": args.fault_rate,
                       "seed": args.seed},
                      {"truncate": -1, "rate": args.truncate_rate, "seed": args.seed + 1}])
        print(f"soak: {len(objs)} objects, {total >> 20} MiB, cache {args.cache_size}, "
              f"{args.readers} readers, {args.fault_rate:.0%} 503s, restart every "
              f"{args.restart_every:.0f}s, {args.minutes:g} min; work dir {work}", flush=True)

        cnt, gen, stop = Counters(), Generation(), threading.Event()
        threads = [threading.Thread(target=reader, args=(m, objs, gen, cnt, stop, args.seed + i),
                                    daemon=True) for i in range(args.readers)]
        for t in threads:
            t.start()
        t_end = time.monotonic() + args.minutes * 60
        next_restart = time.monotonic() + args.restart_every
        last_report = time.monotonic()
        while time.monotonic() < t_end:
            time.sleep(0.2)
            now = time.monotonic()
            if now >= next_restart and now < t_end - 5:
                with gen.cv:
                    gen.restarting = True
                    gen.n += 1
                if cnt.c["restarts"] % 3 == 2:
                    m.stop()
                else:
                    m.kill()
                    cnt.add("kills")
                m.start()
                cnt.add("restarts")
                with gen.cv:
                    gen.restarting = False
                    gen.cv.notify_all()
                next_restart = time.monotonic() + args.restart_every
            if now - last_report >= 30:
                last_report = now
                print(f"  t+{now - (t_end - args.minutes * 60):5.0f}s {cnt.c} "
                      f"faults={proxy.stats()['faults_injected']}", flush=True)
        stop.set()
        for t in threads:
            t.join(120)
        pst = proxy.stats()
        counters = m.counters()
        assert m.stop() == 0
        from test_reliability import CacheState

        consistent = True
        try:
            CacheState(m.cache_dir).assert_consistent()
        except AssertionError as e:
            consistent = False
            cnt.examples.append(f"cache inconsistent: {e}")
        summary = {
            "minutes": args.minutes, **cnt.c,
            "faults_injected": pst["faults_injected"], "faults_by_kind": pst["faults_by_kind"],
            "s3_get_requests": pst["ops"].get("GetObject", 0),
            "daemon_retries_last_run": counters.get("s3_retries", 0),
            "evictions_last_run": counters.get("evictions", 0),
            "cache_consistent": consistent, "problems": cnt.examples,
        }
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"reads verified   {summary['reads_verified']} "
                  f"({summary['bytes_verified'] / 2**30:.2f} GiB)")
            print(f"faults injected  {summary['faults_injected']} {summary['faults_by_kind']} "
                  f"of {summary['s3_get_requests']} GETs")
            print(f"restarts         {summary['restarts']} ({summary['kills']} by SIGKILL)")
            print(f"wrong bytes      {summary['wrong_bytes']} in {summary['wrong_reads']} reads")
            print(f"short reads      {summary['short_reads']} (outside restarts)")
            print(f"EIOs             {summary['eio']} (+{summary['interrupted']} reads "
                  f"interrupted by a restart, {summary['other_errors']} other errors)")
            print(f"cache consistent {consistent}")
            for p in cnt.examples:
                print("  problem:", p)
        ok = (summary["wrong_bytes"] == 0 and summary["wrong_reads"] == 0
              and summary["eio"] == 0 and summary["short_reads"] == 0 and summary["other_errors"] == 0 and consistent)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"soak: work dir kept for inspection: {work}")
        return 0 if ok else 1
    finally:
        if m is not None:
            try:
                m.stop()
            finally:
                unmount(m.mp)
        proxy.stop()
        moto.stop()


if __name__ == "__main__":
    sys.exit(main())
