"""`cachefs demo`: a local S3 server, a sample data set, a mount, cold/warm/hot reads.

Everything runs on this machine: a moto S3 server in its own process on
127.0.0.1, a generated data set (a few large shard files and a few thousand
small "camera frame" files), and a real cachefs mount.  It prints throughput
and where the bytes came from (S3, local SSD, kernel page cache), then unmounts
and removes everything it created.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from .config import parse_size
from .errors import EXIT_USAGE, QuietError
from .report import human, plural
from .runtime import MAX_ROOT, python_module

CREDS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
         "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "cachefs-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(workdir: Path) -> tuple[subprocess.Popen, str]:
    try:
        import moto  # noqa: F401
    except ImportError:
        raise QuietError("the demo needs moto's S3 server: pip install 'moto[server]'") from None
    port = _free_port()
    log = open(workdir / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise QuietError("the local S3 server (moto) did not start; see " + str(workdir / "moto.log"))


def _generate(url: str, shards: int, shard_size: int, small: int, small_size: int) -> dict:
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=url, config=Config(max_pool_connections=16),
                      aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"],
                      region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    block = os.urandom(1 << 20)
    for i in range(shards):
        data = b"".join(block[j % 7:] + block[:j % 7] for j in range(shard_size >> 20))
        data += os.urandom(shard_size - len(data))
        s3.put_object(Bucket=BUCKET, Key=f"shards/shard-{i:04d}.tar", Body=data)

    def put_small(i: int) -> None:
        s3.put_object(Bucket=BUCKET, Key=f"frames/cam{i % 4}/{i:06d}.jpg",
                      Body=os.urandom(small_size))

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(put_small, range(small)))
    return {"bytes": shards * shard_size + small * small_size, "files": shards + small}


def _read_all(root: Path, threads: int = 8) -> tuple[int, int, float]:
    files = [p for p in root.rglob("*") if p.is_file()]
    t0 = time.perf_counter()

    def read(p: Path) -> int:
        n = 0
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
        return n

    with ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(read, files))
    return len(files), total, time.perf_counter() - t0


def _cachefs(*args: str, env: dict) -> subprocess.CompletedProcess:
    python, env = python_module("cachefs", env)
    return subprocess.run([*python, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _failed(r: subprocess.CompletedProcess, what: str) -> QuietError:
    """A cachefs command of the demo failed: its last line, without its own "cachefs:
    error:" (said once, not twice)."""
    lines = r.stderr.strip().splitlines()
    last = lines[-1].removeprefix("cachefs: error: ") if lines else f"{what} failed"
    return QuietError(last, r.returncode if r.returncode > 0 else 1)


def _stats(mp: Path, env: dict) -> dict:
    import json

    r = _cachefs("stats", "--mount", str(mp), "--json", env=env)
    if r.returncode != 0:
        raise _failed(r, "cachefs stats")
    return json.loads(r.stdout)["counters"]


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def run_demo(workdir: str | None, shards: int, shard_size: str, small: int,
             small_size: str) -> None:
    ssize = parse_size(shard_size, "--shard-size")
    fsize = parse_size(small_size, "--small-size")
    if shards < 0 or small < 0 or shards + small == 0:
        raise QuietError("--shards and --small-files: counts of 0 or more, not both 0",
                         EXIT_USAGE)
    total = shards * ssize + small * fsize
    room = _mem_available() // 2  # the demo's S3 server (moto) holds the data in memory
    if total > room:
        raise QuietError(f"the demo data set ({human(total)}) must fit in half of this "
                         f"machine's available memory ({human(room)}): the demo's S3 "
                         "server keeps it in memory", EXIT_USAGE)
    own = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="cachefs-demo-")).absolute()
    mp, cache = wd / "mnt", wd / "cache"
    try:
        mp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuietError(f"--workdir {wd}: cannot make {mp} there: {e.strerror}",
                         EXIT_USAGE) from None
    # the runtime dir in the work dir, unless its path is too long for a control socket's
    # (a deep --workdir failed with "CACHEFS_RUNTIME_DIR is too long")
    run = wd / "run"
    own_run = len(os.fsencode(str(run))) > MAX_ROOT
    if own_run:
        run = Path(tempfile.mkdtemp(prefix="cachefs-demo-run-"))
    env = {**os.environ, **CREDS, "CACHEFS_RUNTIME_DIR": str(run)}
    say = click.echo
    moto = None
    mounted = False
    try:
        say(f"cachefs demo in {wd}")
        moto, url = _start_moto(wd)
        say(f"  local S3 server (moto) at {url}")
        t0 = time.perf_counter()
        ds = _generate(url, shards, ssize, small, fsize)
        parts = [f"{plural(n, what)} of {human(size)}"
                 for n, what, size in ((shards, "shard", ssize), (small, "frame", fsize)) if n]
        say(f"  data set: {' + '.join(parts)} = {human(ds['bytes'])} "
            f"({time.perf_counter() - t0:.1f}s to upload)")

        def mount() -> None:
            nonlocal mounted
            r = _cachefs("mount", f"s3://{BUCKET}", str(mp), "--endpoint-url", url,
                         "--cache-dir", str(cache), "--cache-size", "2GiB", env=env)
            if r.returncode != 0:
                raise _failed(r, "cachefs mount")
            mounted = True

        def umount() -> None:
            nonlocal mounted
            r = _cachefs("umount", str(mp), env=env)
            if r.returncode != 0:
                raise _failed(r, "cachefs umount")
            mounted = False

        mount()
        say(f"  mounted s3://{BUCKET} at {mp}\n")
        say(f"  {'pass':<36}{'files':>7}{'MB/s':>10}{'from S3':>12}{'from SSD':>12}"
            f"{'page cache':>12}")
        passes = [("cold  (empty cache: S3)", False), ("hot   (same mount: page cache)", False),
                  ("warm  (after remount: local SSD)", True)]
        hot_ssd = 0
        for label, remount in passes:
            if remount:
                umount()
                mount()
            before = _stats(mp, env)
            n, nbytes, secs = _read_all(mp)
            after = _stats(mp, env)
            s3b = after.get("s3_bytes", 0) - before.get("s3_bytes", 0)
            ssdb = after.get("ssd_bytes", 0) - before.get("ssd_bytes", 0)
            fuseb = after.get("fuse_read_bytes", 0) - before.get("fuse_read_bytes", 0)
            pageb = max(0, nbytes - fuseb)
            say(f"  {label:<36}{n:>7}{nbytes / secs / 1e6:>10.0f}{human(s3b):>12}"
                f"{human(ssdb):>12}{human(pageb):>12}")
            if label.startswith("hot"):
                hot_ssd = ssdb
        say("")
        if hot_ssd:
            say(f"  (hot: the {human(hot_ssd)} from SSD are frames fetched ahead of the reader "
                "before cachefs saw that its opens were served from the page cache; it then "
                "pauses fetching ahead there)")
        say("  (moto reads the whole object for each ranged GET, so cold reads here are slower "
            "than against a real S3 endpoint; see bench/ for measurements)")
        umount()
        say("  unmounted; cleaning up")
    finally:
        if mounted:
            _cachefs("umount", str(mp), env=env)
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        if moto is not None:
            moto.terminate()
            try:
                moto.wait(10)
            except subprocess.TimeoutExpired:
                moto.kill()
        if own:
            shutil.rmtree(wd, ignore_errors=True)
        if own_run:
            shutil.rmtree(run, ignore_errors=True)
