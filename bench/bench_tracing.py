"""What does tracing cost?  Warm-read throughput with tracing on vs off.

Two daemons mount the same bucket side by side (own cache dirs), one with
CACHEFS_TRACING=1 (the default) and one with CACHEFS_TRACING=0.  Both caches
are filled first; then passes alternate between the two mounts, each pass
reading the whole file with O_DIRECT (every block reaches the daemon: the
kernel page cache is bypassed) in BLOCK-sized requests.  Reported, for 128 KiB
requests (the most requests per byte, where a per-request cost shows most) and
1 MiB requests: the median MB/s per mode; the cost, as the median over rounds
of 1 - on/off (a round's two passes run back to back); and the daemons' CPU time
per request (schedstat of every thread), which a shared machine's load swings
disturb far less than wall-clock throughput; and, with py-spy, the share of the
tracing daemon's busy samples spent in cachefs/trace.py (one process, one time
window: the most direct measure of what tracing costs).

The helpers (read_direct, alternate_passes, cost) are also used by
bench/bench.py's `tracing_cost` scenario.

Also an in-process micro-benchmark: the cost of one traced request
(``Tracer.start`` + 3 spans + recording) vs tracing off.

    sudo .venv/bin/python bench/bench_tracing.py [--size 256MiB] [--passes 21]

Needs /dev/fuse (root) and moto (tests/s3env.py starts it).  Warm reads never
reach S3, so the S3 server's speed does not matter here.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

# mode -> CACHEFS_TRACING of its daemon; BT_ON=0 gives an A/A run (both off), which shows
# how far apart two identical daemons measure on this machine
MODES = {"on": os.environ.get("BT_ON", "1"), "off": os.environ.get("BT_OFF", "0")}


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


def cpu_seconds(pid: int) -> float:
    """On-CPU time of every thread of process pid (ns-precise, from schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total / 1e9


def alternate_passes(paths: dict[str, Path], size: int, block: int, passes: int,
                     pids: dict[str, int] | None = None) -> dict[str, list[float]]:
    """`passes` rounds of one O_DIRECT read of each path (mode -> path), the order
    alternating every round. Returns MB/s per mode (key = mode) and, given the daemons'
    pids, their CPU time per request in µs (key = mode + "_cpu_us")."""
    res: dict[str, list[float]] = {m: [] for m in paths}
    if pids:
        res.update({m + "_cpu_us": [] for m in paths})
    modes = list(paths)
    requests = -(-size // block)
    for i in range(passes):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            c0 = cpu_seconds(pids[mode]) if pids else 0.0
            got, dt = read_direct(paths[mode], block)
            if pids:
                res[mode + "_cpu_us"].append((cpu_seconds(pids[mode]) - c0) / requests * 1e6)
            if got != size:
                raise RuntimeError(f"{paths[mode]}: read {got} bytes, expected {size}")
            res[mode].append(got / dt / 1e6)
    return res


def cost(res: dict[str, list[float]]) -> tuple[float, float, float]:
    """(median on, median off, cost %): the cost is the median over rounds of
    1 - on/off, each round's two passes run back to back (pairs cancel the drift of a
    shared machine's load better than a ratio of medians)."""
    on, off = statistics.median(res["on"]), statistics.median(res["off"])
    pairs = [100 * (1 - a / b) for a, b in zip(res["on"], res["off"], strict=True)]
    return on, off, statistics.median(pairs)


def cpu_cost(res: dict[str, list[float]]) -> tuple[float, float, float] | None:
    """(median µs of daemon CPU per request on, off, extra % on), or None without pids."""
    if "on_cpu_us" not in res:
        return None
    on, off = statistics.median(res["on_cpu_us"]), statistics.median(res["off_cpu_us"])
    return on, off, 100 * (on - off) / off


def describe(res: dict[str, list[float]]) -> str:
    """One line for a block size's results: CPU per request, then throughput."""
    on, off, pct = cost(res)
    cpu = cpu_cost(res)
    head = (f"daemon CPU per request on {cpu[0]:.1f} µs, off {cpu[1]:.1f} µs ({cpu[2]:+.1f}%); "
            if cpu else "")
    return (f"{head}throughput on {on:.0f} MB/s ({min(res['on']):.0f}–{max(res['on']):.0f}), "
            f"off {off:.0f} MB/s ({min(res['off']):.0f}–{max(res['off']):.0f}), "
            f"paired cost {pct:+.1f}%")


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def trace_share(pid: int, work, rate: int = 250) -> dict | None:
    """Sample daemon ``pid`` with py-spy while ``work()`` runs: the share of its busy
    samples (not waiting in epoll or in an idle worker thread) whose stack is in
    cachefs/trace.py.  The samples are taken in one process over one time window, so
    the machine's load swings, which dwarf a few-percent cost in wall-clock figures,
    cancel out.  None when py-spy is missing."""
    exe = py_spy()
    if exe is None:
        return None
    out = Path(tempfile.mkstemp(prefix="cachefs-spy-", suffix=".txt")[1])
    spy = subprocess.Popen([exe, "record", "-p", str(pid), "-o", str(out), "-f", "raw",
                            "-r", str(rate), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # py-spy attaches
        work()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    busy = traced = 0
    try:
        lines = out.read_text().splitlines()
    finally:
        out.unlink(missing_ok=True)
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if "get_events" in leaf or "_thread_cache.py" in leaf:  # idle: epoll, idle worker
            continue
        busy += int(n)
        if "cachefs/trace.py" in stack:
            traced += int(n)
    if busy == 0:
        return None
    return {"busy_samples": busy, "trace_samples": traced, "share_pct": 100 * traced / busy}


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
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--passes", type=int, default=21)
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
        pids = {m: mp.proc.pid for m, mp in mounts.items()}
        paths = {m: mp.path("f.bin") for m, mp in mounts.items()}
        for block in (128 << 10, 1 << 20):
            res = alternate_passes(paths, size, block, a.passes, pids)
            print(f"warm O_DIRECT reads, {block >> 10} KiB requests, {a.passes} passes of "
                  f"{size >> 20} MiB: {describe(res)}")
        sh = trace_share(pids["on"], lambda: [read_direct(paths["on"], 128 << 10)
                                              for _ in range(max(3, a.passes // 3))])
        if sh is None:
            print("py-spy not found: no profile of the tracing daemon")
        else:
            print(f"py-spy of the tracing daemon, 128 KiB requests: {sh['trace_samples']} of "
                  f"{sh['busy_samples']} busy samples in cachefs/trace.py = "
                  f"{sh['share_pct']:.1f}% of its CPU")
        st = mounts["on"].request({"op": "trace_stats"})["tracer"]
        print(f"tracer (on): {st['finished']} traces recorded, {st['recent_spans_kept']} spans "
              f"in the recent ring, {st['dropped_spans']} dropped")
    finally:
        for mp in mounts.values():
            mp.stop()
        moto.stop()


if __name__ == "__main__":
    main()
