"""What does tracing cost?  Warm-read CPU and throughput with tracing on vs off.

One daemon serves both modes: its cache is filled first, then rounds of passes
alternate tracing on and off in the running daemon (the control op
``trace_enable``), each pass reading the whole file with O_DIRECT (every block
reaches the daemon: the kernel page cache is bypassed) in BLOCK-sized requests.
One process for both modes means the same memory layout, the same threads, the
same cache and the same file: two daemons side by side (the first version of
this benchmark) measured ±11% apart with tracing off in both.

Reported, for 128 KiB requests (the most requests per byte, where a per-request
cost shows most) and 1 MiB requests:
  * the daemon's CPU time per request (schedstat of every thread), median per
    mode, and the cost as the median over rounds of on/off - 1 (a round's two
    passes run back to back): the headline figure, which the load swings of a
    shared machine disturb far less than wall-clock throughput;
  * the throughput per mode and its paired cost;
  * with py-spy, the share of the daemon's busy samples (tracing on) spent in
    cachefs/trace.py.
``BT_OFF=1`` runs an A/A comparison (tracing on in both "modes"): the spread it
shows is what this machine's noise alone gives.

The helpers (read_direct, alternate_passes, cost, ...) are also used by
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
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

# mode -> tracing on (True) or off in the daemon during that mode's passes; BT_OFF=1 gives an
# A/A run (on in both), which shows how far apart two identical modes measure on this machine
MODES = {"on": os.environ.get("BT_ON", "1") != "0", "off": os.environ.get("BT_OFF", "0") != "0"}


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


def switcher(request: Callable[[dict], dict]) -> Callable[[str], None]:
    """A ``before`` for alternate_passes: sets the daemon's tracing for a mode (MODES)
    through its control socket (``request`` sends one control op)."""
    def before(mode: str) -> None:
        request({"op": "trace_enable", "on": MODES[mode]})
    return before


def alternate_passes(paths: dict[str, Path], size: int, block: int, passes: int,
                     pids: dict[str, int] | None = None,
                     before: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """`passes` rounds of one O_DIRECT read of each path (mode -> path), the order
    alternating every round; ``before(mode)`` runs ahead of each pass (outside what is
    measured). Returns MB/s per mode (key = mode) and, given the daemons' pids, their
    CPU time per request in µs (key = mode + "_cpu_us")."""
    res: dict[str, list[float]] = {m: [] for m in paths}
    if pids:
        res.update({m + "_cpu_us": [] for m in paths})
    modes = list(paths)
    requests = -(-size // block)
    for i in range(passes):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            if before is not None:
                before(mode)
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
    """(median µs of daemon CPU per request on, off, extra %), or None without pids; the
    extra is the median over rounds of on/off - 1, like cost()."""
    if "on_cpu_us" not in res:
        return None
    return (statistics.median(res["on_cpu_us"]), statistics.median(res["off_cpu_us"]),
            statistics.median(_pairs(res)))


def _pairs(res: dict[str, list[float]]) -> list[float]:
    return [100 * (x / y - 1) for x, y in zip(res["on_cpu_us"], res["off_cpu_us"], strict=True)]


def interval(res: dict[str, list[float]], level: float = 0.9,
             resamples: int = 4000) -> tuple[float, float]:
    """A bootstrap confidence interval (``level``) of the median per-round CPU cost (%):
    the rounds are resampled with replacement, and the spread of their medians says how
    far the headline figure can be trusted on this machine."""
    import random

    pairs = _pairs(res)
    rng = random.Random(1)
    meds = sorted(statistics.median(rng.choices(pairs, k=len(pairs)))
                  for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def describe(res: dict[str, list[float]]) -> str:
    """One line for a block size's results: CPU per request, then throughput."""
    on, off, pct = cost(res)
    cpu = cpu_cost(res)
    head = ""
    if cpu:
        lo, hi = interval(res)
        head = (f"daemon CPU per request on {cpu[0]:.1f} µs, off {cpu[1]:.1f} µs "
                f"({cpu[2]:+.1f}%, 90% interval {lo:+.1f}% to {hi:+.1f}%); ")
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
    mp = None
    try:
        s3 = s3_client(moto.url)
        s3.create_bucket(Bucket="benchtrace")
        s3.put_object(Bucket="benchtrace", Key="f.bin", Body=os.urandom(size))
        mp = Mount(tmp, "s3://benchtrace", moto.url, name="trace", cache_size="4GiB",
                   chunk_size=a.chunk_size).start()
        path = mp.path("f.bin")
        read_direct(path, 1 << 20)  # fill the cache (cold), then one warm-up pass
        read_direct(path, 1 << 20)
        pid = mp.proc.pid
        paths, pids = {m: path for m in MODES}, {m: pid for m in MODES}
        before = switcher(mp.request)
        for block in (128 << 10, 1 << 20):
            res = alternate_passes(paths, size, block, a.passes, pids, before)
            print(f"warm O_DIRECT reads, {block >> 10} KiB requests, {a.passes} rounds of "
                  f"{size >> 20} MiB per mode: {describe(res)}")
        before("on")
        sh = trace_share(pid, lambda: [read_direct(path, 128 << 10)
                                       for _ in range(max(3, a.passes // 3))])
        if sh is None:
            print("py-spy not found: no profile of the tracing daemon")
        else:
            print(f"py-spy of the daemon, tracing on, 128 KiB requests: {sh['trace_samples']} "
                  f"of {sh['busy_samples']} busy samples in cachefs/trace.py = "
                  f"{sh['share_pct']:.1f}% of its CPU")
        st = mp.request({"op": "trace_stats"})["tracer"]
        print(f"tracer: {st['finished']} traces recorded, {st['recent_spans_kept']} spans "
              f"in the recent ring, {st['dropped_spans']} dropped")
    finally:
        if mp is not None:
            mp.stop()
        moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # (its cache: the whole file, 256 MiB)
        shutil.rmtree(rt, ignore_errors=True)


if __name__ == "__main__":
    main()
