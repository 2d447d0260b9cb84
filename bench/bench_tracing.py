"""What does tracing cost?  Warm-read throughput with tracing on vs off.

Two daemons mount the same bucket side by side (own cache dirs), one with
CACHEFS_TRACING=1 (the default) and one with CACHEFS_TRACING=0.  Both caches
are filled first; then passes alternate between the two mounts, each pass
reading the whole file with O_DIRECT (every block reaches the daemon: the
kernel page cache is bypassed) in BLOCK-sized requests.  Reported: the median
MB/s per mode and the relative cost, for 128 KiB requests (the most requests
per byte, where a per-request cost shows most) and 1 MiB requests.

The helpers (read_direct, alternate_passes, cost) are also used by
bench/bench.py's `tracing_cost` scenario.

Also an in-process micro-benchmark: the cost of one traced request
(``Tracer.start`` + 3 spans + recording) vs tracing off.

    sudo .venv/bin/python bench/bench_tracing.py [--size 64MiB] [--passes 7]

Needs /dev/fuse (root) and moto (tests/s3env.py starts it).  Warm reads never
reach S3, so the S3 server's speed does not matter here.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

MODES = {"on": "1", "off": "0"}  # mode -> CACHEFS_TRACING of the daemon


def read_direct(path: Path, block: int) -> tuple[int, float]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, block)
    got = 0
    t0 = time.perf_counter()
    try:
        while True:
            n = os.preadv(fd, [buf], got)
            if n <= 0:
                break
            got += n
    finally:
        dt = time.perf_counter() - t0
        os.close(fd)
        buf.close()
    return got, dt


def alternate_passes(paths: dict[str, Path], size: int, block: int,
                     passes: int) -> dict[str, list[float]]:
    """`passes` rounds of one O_DIRECT read of each path (mode -> path), the order
    alternating every round; MB/s per mode."""
    res: dict[str, list[float]] = {m: [] for m in paths}
    modes = list(paths)
    for i in range(passes):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            got, dt = read_direct(paths[mode], block)
            if got != size:
                raise RuntimeError(f"{paths[mode]}: read {got} bytes, expected {size}")
            res[mode].append(got / dt / 1e6)
    return res


def cost(res: dict[str, list[float]]) -> tuple[float, float, float]:
    """(median on, median off, cost % = (off - on) / off)."""
    on, off = statistics.median(res["on"]), statistics.median(res["off"])
    return on, off, 100 * (off - on) / off


def micro(n: int = 200_000) -> dict:
    import trio

    from cachefs.trace import Tracer, span

    def run(enabled: bool) -> float:
        t = Tracer(slow_threshold=0.05, enabled=enabled)

        async def main():
            t0 = time.perf_counter()
            for i in range(n):
                with t.start("read", ino=5, path="/d/f", offset=i, size=131072, pid=0):
                    with span("chunk", chunk=i, key="d/f", bytes=131072) as sp:
                        sp.set(tier="local")
                        with span("ssd.read", tier="local", bytes=131072):
                            pass
                    with span("readahead.wait", chunk=i):
                        pass
            return time.perf_counter() - t0
        return trio.run(main)

    on = min(run(True) for _ in range(3))
    off = min(run(False) for _ in range(3))
    return {"on_us": on / n * 1e6, "off_us": off / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--chunk-size", default="8MiB")
    a = ap.parse_args()

    from cachefs.config import parse_size

    size = parse_size(a.size, "--size")
    m = micro()
    print(f"micro: one traced request (root + 3 spans, recorded): {m['on_us']:.2f} µs; "
          f"tracing off: {m['off_us']:.2f} µs; cost {m['on_us'] - m['off_us']:.2f} µs/request")

    sys.path.insert(0, str(HERE.parent / "tests"))
    from cachefs_env import Mount, fuse_available
    from s3env import s3_client, start_moto

    if not fuse_available():
        sys.exit("bench_tracing: /dev/fuse is not available (run as root)")
    rt = tempfile.mkdtemp(prefix="cachefs-bench-rt-")
    os.chmod(rt, 0o700)
    os.environ["CACHEFS_RUNTIME_DIR"] = rt
    moto = start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="cachefs-bench-tracing-"))
    mounts = {}
    try:
        s3 = s3_client(moto.url)
        s3.create_bucket(Bucket="benchtrace")
        s3.put_object(Bucket="benchtrace", Key="f.bin", Body=os.urandom(size))
        for mode, val in MODES.items():
            mounts[mode] = Mount(tmp, "s3://benchtrace", moto.url, name=f"trace-{mode}",
                                 cache_size="4GiB", chunk_size=a.chunk_size,
                                 env={"CACHEFS_TRACING": val}).start()
        for mp in mounts.values():  # fill the caches (cold), then one warm-up pass
            read_direct(mp.path("f.bin"), 1 << 20)
            read_direct(mp.path("f.bin"), 1 << 20)
        for block in (128 << 10, 1 << 20):
            res = alternate_passes({m: mp.path("f.bin") for m, mp in mounts.items()},
                                   size, block, a.passes)
            on, off, pct = cost(res)
            print(f"warm O_DIRECT reads, {block >> 10} KiB requests, {a.passes} passes of "
                  f"{size >> 20} MiB: tracing on {on:.0f} MB/s, off {off:.0f} MB/s, "
                  f"cost {pct:+.1f}%  "
                  f"(on {min(res['on']):.0f}–{max(res['on']):.0f}, "
                  f"off {min(res['off']):.0f}–{max(res['off']):.0f})")
        st = mounts["on"].request({"op": "trace_stats"})["tracer"]
        print(f"tracer (on): {st['finished']} traces recorded, {st['recent_spans_kept']} spans "
              f"in the recent ring, {st['dropped_spans']} dropped")
    finally:
        for mp in mounts.values():
            mp.stop()
        moto.stop()


if __name__ == "__main__":
    main()
