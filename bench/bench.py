#!/usr/bin/env python3
"""cachefs benchmark harness: cachefs side by side with direct S3, the disk,
a minimal pyfuse3 passthrough, s3fs-fuse and rclone mount.

Run it through bench/run.sh, which installs what it needs. See bench/README.md.

Layout of the code:
  * Profile           sizes of the data set and number of runs (--quick / full)
  * S3Server, Dataset the s3rver process and the generated data (local copy + bucket)
  * System classes    one small class per mounted system: mount()/unmount(),
                      wipe_cache(), reset_cold()/make_warm(), daemon_pids()
  * scenario functions read_files()/stat_tree() over a mounted root path, the
                      same for every system; the S3 and disk ceilings have their
                      own small functions since they are not mounts
  * Report            tables (median/min/max), ratios, targets, plots
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import importlib.metadata
import json
import mmap
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
NODE_DIR = BENCH / ".node"
S3RVER_JS = NODE_DIR / "node_modules" / "s3rver" / "bin" / "s3rver.js"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1e6
ACCESS_KEY = SECRET_KEY = "S3RVER"
REGION = "us-east-1"
READ_BUF = 1 * MiB


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    name: str
    shards: int  # large sequential files
    shard_size: int
    small: int  # 100 KiB files
    small_size: int
    meta: int  # keys in the metadata tree (multiple of 1000)
    medium: int  # files for the 8/32-reader concurrency scenarios
    medium_size: int
    herd_size: int  # the one file 32 readers read at once
    runs: int
    timeout: float  # per measurement

    def key(self) -> dict:
        d = asdict(self)
        d.pop("runs")
        d.pop("timeout")
        return d


QUICK = Profile("quick", shards=2, shard_size=256 * MiB, small=500, small_size=100 * KiB,
                meta=5000, medium=32, medium_size=4 * MiB, herd_size=64 * MiB,
                runs=1, timeout=90)
FULL = Profile("full", shards=4, shard_size=1 * GiB, small=3000, small_size=100 * KiB,
               meta=50000, medium=32, medium_size=32 * MiB, herd_size=256 * MiB,
               runs=3, timeout=900)


@dataclass
class Layout:
    """Relative paths (= S3 keys) of the data set."""
    shards: list[str]
    small: list[str]
    medium: list[str]
    herd: str
    meta: list[str]

    @classmethod
    def of(cls, p: Profile) -> Layout:
        # Every "directory" holds an object directly (hence meta/index): s3rver's
        # delimiter listing does not see prefixes that hold only deeper prefixes.
        meta = ["meta/index"] + [f"meta/d{a:03d}/f{c:03d}"
                                 for a in range(p.meta // 100) for c in range(100)]
        return cls(
            shards=[f"large/shard-{i:03d}.bin" for i in range(p.shards)],
            small=[f"small/f{i:05d}.bin" for i in range(p.small)],
            medium=[f"medium/m{i:02d}.bin" for i in range(p.medium)],
            herd="herd/herd.bin",
            meta=meta,
        )

    def sizes(self, p: Profile) -> dict[str, int]:
        s = {k: p.shard_size for k in self.shards}
        s.update({k: p.small_size for k in self.small})
        s.update({k: p.medium_size for k in self.medium})
        s[self.herd] = p.herd_size
        s.update({k: 16 for k in self.meta})
        return s


# --------------------------------------------------------------------------
# Small OS helpers
# --------------------------------------------------------------------------
def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fuse_mounted(mp: Path) -> bool:
    """Is a FUSE filesystem mounted at mp? Reads mountinfo: never blocks on a daemon."""
    target = str(mp)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == target and fields[sep + 1].startswith("fuse"):
                return True
    return False


def mount_devno(mp: Path) -> str | None:
    target, found = str(mp), None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                found = fields[2]
    return found


def read_ahead_kb(mp: Path) -> str:
    devno = mount_devno(mp)
    try:
        return Path(f"/sys/class/bdi/{devno}/read_ahead_kb").read_text().strip()
    except OSError:
        return "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def proc_status_kib(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Peak RSS of a process tree: polled VmRSS sum (20 Hz) and each VmHWM."""

    def __init__(self, pids_fn: Callable[[], list[int]]):
        self.pids_fn = pids_fn
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        pids = self.pids_fn()
        rss = sum(proc_status_kib(p, "VmRSS") for p in pids)
        hwm = max([proc_status_kib(p, "VmHWM") for p in pids] or [0])
        self.peak_kib = max(self.peak_kib, rss, hwm)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def cmd_output(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e.__class__.__name__})"


def tail(path: Path, n: int = 6) -> str:
    """Last n non-empty lines of a log, from the last "==== " (start) marker on."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    text = text.rsplit("\n==== ", 1)[-1]
    lines = [ln for ln in text.splitlines()[1:] if ln.strip()] if "\n" in text else []
    return " / ".join(lines[-n:])


class Timeout(Exception):
    pass


class Unavailable(Exception):
    """The system cannot be measured (not installed, does not mount)."""


class Skip(Exception):
    """This scenario does not apply to this system, or is a hook not yet filled."""


# --------------------------------------------------------------------------
# S3 server and data set
# --------------------------------------------------------------------------
class S3Server:
    def __init__(self, data_dir: Path, bucket: str, log_path: Path):
        self.data_dir, self.bucket, self.log_path = data_dir, bucket, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if not S3RVER_JS.exists():
            raise SystemExit(f"{S3RVER_JS} missing: run bench/run.sh (it installs s3rver)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # --openssl-legacy-provider: s3rver encrypts ListObjectsV2 continuation tokens
        # with DES, which OpenSSL 3 (node >= 17) refuses without it: every truncated
        # listing (MaxKeys reached) would answer 500 InternalError.
        argv = ["node", "--openssl-legacy-provider", str(S3RVER_JS), "-d", str(self.data_dir), "-a", "127.0.0.1",
                "-p", str(self.port), "--silent", "--configure-bucket", self.bucket]
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=NODE_DIR, stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"s3rver exited: {tail(self.log_path)}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise SystemExit("s3rver did not listen within 30 s")
            time.sleep(0.1)
        log(f"s3rver pid {self.proc.pid} on {self.url}, data in {self.data_dir}")

    def egress(self) -> int:
        """Bytes the server wrote (sockets + files): ~ the bytes it served."""
        if self.proc is None:
            return 0
        try:
            with open(f"/proc/{self.proc.pid}/io") as f:
                for line in f:
                    if line.startswith("wchar:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def s3_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
               AWS_DEFAULT_REGION=REGION)
    return env


def boto3_client(url: str):
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=url, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION,
                        config=Config(max_pool_connections=32, retries={"max_attempts": 5}))


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    tmp.rename(path)


LAYOUT_VERSION = 3


def dataset_manifest(ctx: Ctx) -> tuple[Path, dict]:
    return (ctx.work / f"dataset-{ctx.profile.name}.json",
            {"profile": ctx.profile.key(), "bucket": ctx.bucket, "layout": LAYOUT_VERSION})


def wipe_stale_dataset(ctx: Ctx) -> None:
    """Before s3rver starts: drop a data set generated with other parameters."""
    manifest, want = dataset_manifest(ctx)
    if manifest.exists() and json.loads(manifest.read_text()) == want:
        return
    manifest.unlink(missing_ok=True)
    shutil.rmtree(ctx.local, ignore_errors=True)
    shutil.rmtree(ctx.s3.data_dir / ctx.bucket, ignore_errors=True)


def ensure_dataset(ctx: Ctx) -> None:
    """Local copy (for the disk and passthrough ceilings) and the bucket, same bytes."""
    p, lay = ctx.profile, ctx.layout
    sizes = lay.sizes(p)
    manifest, want = dataset_manifest(ctx)
    s3 = boto3_client(ctx.s3.url)
    if manifest.exists() and json.loads(manifest.read_text()) == want:
        try:  # cheap spot check that the bucket still holds it
            for k in (lay.shards[-1], lay.small[-1], lay.meta[-1], lay.herd):
                assert s3.head_object(Bucket=ctx.bucket, Key=k)["ContentLength"] == sizes[k]
            log(f"data set present ({len(sizes)} objects, {sum(sizes.values()) / GiB:.2f} GiB)")
            return
        except Exception as e:  # noqa: BLE001
            log(f"data set check failed ({e!r}), regenerating")
    manifest.unlink(missing_ok=True)
    t0 = time.monotonic()
    log(f"generating {len(sizes)} files, {sum(sizes.values()) / GiB:.2f} GiB in {ctx.local}")
    for k, size in sizes.items():
        lp = ctx.local / k
        if not (lp.exists() and lp.stat().st_size == size):
            write_random(lp, size)
    log(f"uploading to s3://{ctx.bucket}")
    from boto3.s3.transfer import TransferConfig
    tc = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB,
                        max_concurrency=4)

    def put(k: str) -> None:
        if sizes[k] >= 64 * MiB:
            s3.upload_file(str(ctx.local / k), ctx.bucket, k, Config=tc)
        else:
            s3.put_object(Bucket=ctx.bucket, Key=k, Body=(ctx.local / k).read_bytes())

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        for fut in concurrent.futures.as_completed([ex.submit(put, k) for k in sizes]):
            fut.result()
    manifest.write_text(json.dumps(want))
    log(f"data set ready in {time.monotonic() - t0:.0f} s")


# --------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------
@dataclass
class Ctx:
    args: argparse.Namespace
    profile: Profile
    layout: Layout
    work: Path
    local: Path
    bucket: str
    s3: S3Server
    results: dict = field(default_factory=dict)  # scenario -> system -> entry
    notes: dict = field(default_factory=dict)  # system -> list of notes
    load_start: str = field(default_factory=lambda: f"{os.getloadavg()[0]:.2f}")
    memory_start: str = "not measured"  # memory_reporting(), set by main() before the runs
    disk_start: str = "?"  # free space of the work dir once the data set is there

    def record(self, scenario: str, system: str, value: float | None = None,
               status: str | None = None, extra: dict | None = None) -> None:
        e = self.results.setdefault(scenario, {}).setdefault(
            system, {"values": [], "status": None, "extra": []})
        if value is not None:
            e["values"].append(value)
        if status:
            e["status"] = status
        if extra:
            e["extra"].append(extra)


# --------------------------------------------------------------------------
# Mounted systems
# --------------------------------------------------------------------------
class System:
    """A mounted filesystem under test. Subclasses give the command line."""
    name = "?"
    role = "peer"  # "ceiling" | "cachefs" | "peer" | "variant" (of cachefs: no ratios)
    talks_to_s3 = True
    large_only = False  # only the large sequential scenarios
    unmount_timeout = 30.0
    mount_timeout = 45.0

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.mp = ctx.work / "mnt" / self.name
        self.cache = ctx.work / "cache" / self.name
        self.log_path = ctx.work / "logs" / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    # -- to override ---------------------------------------------------------
    def check(self) -> None:
        """Raise Unavailable if the system cannot run here."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def unmount_command(self) -> list[str] | None:
        return None

    def after_mount(self) -> None:
        pass

    def wipe_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True, exist_ok=True)

    # -- common --------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.mp

    def mount(self) -> None:
        self.mp.mkdir(parents=True, exist_ok=True)
        if fuse_mounted(self.mp):
            raise Unavailable(f"{self.mp} is already mounted")
        argv, env = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + self.mount_timeout
        while not (fuse_mounted(self.mp) and os.path.ismount(self.mp)):
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                raise Unavailable(f"`{' '.join(argv[:2])}` exited with {rc}: {tail(self.log_path, 4)}")
            if time.monotonic() > deadline:
                self.unmount()
                raise Unavailable(f"not mounted after {self.mount_timeout:.0f} s: {tail(self.log_path, 4)}")
            time.sleep(0.05)
        self.after_mount()

    def unmount(self) -> None:
        if fuse_mounted(self.mp):
            cmd = self.unmount_command()
            if cmd:
                self._run_unmount_command(cmd)
            for extra in ([], ["-z"]):
                if not fuse_mounted(self.mp):
                    break
                subprocess.run(["fusermount3", "-u", *extra, str(self.mp)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _ in range(50):
                    if not fuse_mounted(self.mp):
                        break
                    time.sleep(0.1)
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def _run_unmount_command(self, cmd: list[str]) -> None:
        """Run the system's own unmount command, reaping our daemon meanwhile: a
        command that waits for the daemon to exit would otherwise wait on a zombie."""
        try:
            um = subprocess.Popen(cmd, env=s3_env(), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return
        deadline = time.monotonic() + self.unmount_timeout
        while um.poll() is None and time.monotonic() < deadline:
            if self.proc is not None:
                self.proc.poll()
            time.sleep(0.05)
        if um.poll() is None:
            um.kill()
            um.wait()

    def reset_cold(self) -> None:
        """Empty every cache: unmount, wipe the disk cache, mount, drop page cache."""
        self.unmount()
        self.wipe_cache()
        self.mount()
        drop_page_cache()

    def make_warm(self) -> None:
        """Keep the daemon and its disk cache, drop the kernel page cache."""
        drop_page_cache()

    def daemon_pids(self) -> list[int]:
        return proc_tree(self.proc.pid) if self.proc else []


class Passthrough(System):
    name, role = "pyfuse3-passthrough", "ceiling"
    talks_to_s3 = False

    def command(self):
        return [sys.executable, str(BENCH / "passthrough.py"), str(self.ctx.local),
                str(self.mp)], dict(os.environ)

    def after_mount(self) -> None:
        for _ in range(100):  # passthrough.py raises read-ahead once serving
            if read_ahead_kb(self.mp) == "1024":
                return
            time.sleep(0.05)

    def wipe_cache(self) -> None:
        pass  # no cache of its own: cold == page cache dropped


C_PASSTHROUGH = BENCH / ".build" / "c-passthrough"  # built from c_passthrough.c by run.sh


class CPassthrough(Passthrough):
    """The same passthrough in C on libfuse's multithreaded loop: the least any FUSE
    daemon does per request, so the ceiling of a FUSE file system on this machine."""
    name, role = "c-passthrough", "ceiling"

    def check(self) -> None:
        if not os.access(C_PASSTHROUGH, os.X_OK):
            raise Unavailable(f"c-passthrough not available: {C_PASSTHROUGH} not built "
                              "(bench/run.sh builds it; needs gcc and libfuse3-dev)")

    def command(self):
        return [str(C_PASSTHROUGH), str(self.ctx.local), str(self.mp)], dict(os.environ)

    def after_mount(self) -> None:
        raise_read_ahead(self.mp)


def raise_read_ahead(mp: Path) -> None:
    """The kernel's read-ahead of a FUSE mount to 1 MiB, as cachefs and the pyfuse3
    passthrough set it for themselves: the peers ran with the default 128 KiB, and their
    large-file figures (and the ratios against them) with it."""
    os.stat(mp)  # returns once INIT is answered, which resets the read-ahead
    devno = mount_devno(mp)
    if devno:
        with contextlib.suppress(OSError), \
                open(f"/sys/class/bdi/{devno}/read_ahead_kb", "w") as f:
            f.write("1024")


def cachefs_argv0() -> list[str] | None:
    venv_bin = Path(sys.executable).parent / "cachefs"
    if venv_bin.exists():
        return [str(venv_bin)]
    if shutil.which("cachefs"):
        return [shutil.which("cachefs")]
    return None


class CacheFS(System):
    name, role = "cachefs", "cachefs"

    def check(self) -> None:
        if cachefs_argv0() is None:
            raise Unavailable("cachefs not available: no `cachefs` command")

    def command(self):
        argv = [*cachefs_argv0(), "mount", f"s3://{self.ctx.bucket}", str(self.mp),
                "--endpoint-url", self.ctx.s3.url, "--cache-dir", str(self.cache),
                "--cache-size", self.ctx.args.cachefs_cache_size, "--foreground",
                *self.ctx.args.cachefs_arg]
        return argv, s3_env()

    def unmount_command(self):
        return [*cachefs_argv0(), "umount", str(self.mp)]

    def mount(self) -> None:
        try:
            super().mount()
        except Unavailable as e:
            raise Unavailable(f"cachefs not available: {e}") from None


class CacheFSNoPageCache(CacheFS):
    """cachefs with --no-page-cache ([read] page_cache = false): reads bypass the kernel
    page cache, for the large sequential scenarios, where it saves a copy per byte."""
    name, role, large_only = "cachefs-no-page-cache", "variant", True

    def command(self):
        argv, env = super().command()
        return [*argv, "--no-page-cache"], env


class CacheFSNode(CacheFS):
    """A cachefs daemon of a hook (cluster node, tracing on/off): its own name
    (mountpoint, cache dir, log), extra `cachefs mount` arguments and environment."""

    def __init__(self, ctx: Ctx, name: str, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.name = name
        super().__init__(ctx)
        self.extra, self.env = tuple(extra), dict(env or {})

    def command(self):
        argv, env = super().command()
        env.update(self.env)
        return [*argv, *self.extra], env

    def stats(self) -> dict:
        """`cachefs stats --mount MP --json` (retried while the control socket comes up)."""
        err = ""
        for _ in range(50):
            r = subprocess.run([*cachefs_argv0(), "stats", "--mount", str(self.mp), "--json"],
                               capture_output=True, text=True, timeout=30, env=s3_env())
            if r.returncode == 0:
                return json.loads(r.stdout)
            err = (r.stderr or r.stdout).strip()
            time.sleep(0.1)
        raise RuntimeError(f"cachefs stats {self.mp}: {err[-200:]}")

    def request(self, req: dict) -> dict:
        """One control op on this daemon's socket (see cachefs/control.py)."""
        from cachefs import runtime
        from cachefs.control import ControlClient
        return ControlClient(runtime.socket_path(self.mp), str(self.mp)).request(req)

    def remove_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)


def cachefs_gets(sys_: System) -> int | None:
    """The S3 GETs a cachefs daemon made so far (None for other systems)."""
    if not sys_.name.startswith("cachefs"):
        return None
    r = subprocess.run([*cachefs_argv0(), "stats", "--mount", str(sys_.mp), "--json"],
                       capture_output=True, text=True, timeout=30, env=s3_env())
    if r.returncode != 0:
        return None
    return int(json.loads(r.stdout).get("counters", {}).get("s3_get_requests", 0))


def cachefs_chunk_size(ctx: Ctx) -> int:
    """The chunk size the cachefs daemons use (a --cachefs-arg may set it)."""
    from cachefs.config import DEFAULT_CHUNK_SIZE, parse_size
    a, val = ctx.args.cachefs_arg, None
    for i, x in enumerate(a):
        if x.startswith("--chunk-size="):
            val = x.split("=", 1)[1]
        elif x == "--chunk-size" and i + 1 < len(a):
            val = a[i + 1]
    return parse_size(val, "--chunk-size") if val else DEFAULT_CHUNK_SIZE


class S3fs(System):
    name = "s3fs"

    def check(self) -> None:
        if not shutil.which("s3fs"):
            raise Unavailable("s3fs not installed")

    def command(self):
        pw = self.ctx.work / "s3fs.passwd"
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        os.chmod(pw, 0o600)
        # kernel_cache: the page cache is kept between opens, as cachefs keeps it (without
        # it, s3fs's "hot" figure was a warm one)
        argv = ["s3fs", self.ctx.bucket, str(self.mp), "-f", "-o", "ro",
                "-o", f"url={self.ctx.s3.url}", "-o", "use_path_request_style",
                "-o", f"passwd_file={pw}", "-o", f"use_cache={self.cache}",
                "-o", f"endpoint={REGION}", "-o", "kernel_cache"]
        env = dict(os.environ)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.pop(k, None)
        return argv, env

    def after_mount(self) -> None:
        raise_read_ahead(self.mp)


class Rclone(System):
    name = "rclone"

    def check(self) -> None:
        if not shutil.which("rclone"):
            raise Unavailable("rclone not installed")

    def command(self):
        env = dict(os.environ)
        env.pop("AWS_CA_BUNDLE", None)  # rclone 1.60 fails to start with it set
        r = "RCLONE_CONFIG_BENCHS3_"
        env.update({r + "TYPE": "s3", r + "PROVIDER": "Other", r + "ENV_AUTH": "false",
                    r + "ENDPOINT": self.ctx.s3.url, r + "ACCESS_KEY_ID": ACCESS_KEY,
                    r + "SECRET_ACCESS_KEY": SECRET_KEY, r + "REGION": REGION,
                    r + "FORCE_PATH_STYLE": "true"})
        argv = ["rclone", "mount", f"benchs3:{self.ctx.bucket}", str(self.mp),
                "--vfs-cache-mode", "full", "--cache-dir", str(self.cache),
                "--read-only", "--log-level", "ERROR"]
        return argv, env

    def after_mount(self) -> None:
        raise_read_ahead(self.mp)


SYSTEMS: list[type[System]] = [Passthrough, CPassthrough, CacheFS, CacheFSNoPageCache, S3fs, Rclone]


# --------------------------------------------------------------------------
# Scenario primitives over a mounted root (shared by every system)
# --------------------------------------------------------------------------
def read_files(root: Path, rels: list[str], readers: int, timeout: float) -> tuple[int, float]:
    """`readers` threads read whole files off a shared queue. Returns (bytes, seconds)."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    for r in rels:
        q.put(root / r)
    deadline = time.monotonic() + timeout
    total = [0] * readers
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        buf = bytearray(READ_BUF)
        try:
            while True:
                try:
                    path = q.get_nowait()
                except queue.Empty:
                    return
                fd = os.open(path, os.O_RDONLY)
                try:
                    while n := os.readv(fd, [buf]):
                        total[i] += n
                        if time.monotonic() > deadline:
                            raise Timeout(f"timeout after {timeout:.0f} s")
                finally:
                    os.close(fd)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 30)
    secs = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        raise Timeout(f"readers stuck after {timeout:.0f} s")
    if errors:
        raise errors[0]
    return sum(total), secs


def stat_tree(top: Path, timeout: float) -> tuple[int, float]:
    """Walk top (readdir) and lstat every file. Returns (files, seconds)."""
    deadline = time.monotonic() + timeout
    n = 0
    t0 = time.perf_counter()
    todo = [top]
    while todo:
        d = todo.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if (st.st_mode & 0o170000) == 0o040000:
                    todo.append(Path(e.path))
                else:
                    n += 1
        if time.monotonic() > deadline:
            raise Timeout(f"timeout after {timeout:.0f} s")
    return n, time.perf_counter() - t0


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    id: str
    group: str  # table / plot group
    title: str
    unit: str
    ceiling: str | None  # system whose figure is this scenario's ceiling
    higher_is_better: bool = True
    target: str = ""


SCENARIOS = [
    Scenario("large_cold", "large", "Large sequential, cold (caches empty, page cache dropped)", "MB/s", "s3-direct",
             target="≥ 90% of s3-direct"),
    Scenario("large_warm", "large", "Large sequential, warm (on the system's disk cache, page cache dropped)", "MB/s",
             "pyfuse3-passthrough", target="≥ 90% of pyfuse3-passthrough and ≥ 2× rclone"),
    Scenario("large_hot", "large", "Large sequential, hot (page cache)", "MB/s", "pyfuse3-passthrough"),
    Scenario("small_cold_1", "small", "Small files (100 KiB), cold, 1 reader", "files/s", "s3-direct",
             target="≥ 90% of s3-direct (sequential GETs/s)"),
    Scenario("small_cold_8", "small", "Small files (100 KiB), cold, 8 readers", "files/s", "s3-direct"),
    Scenario("small_warm_1", "small", "Small files (100 KiB), warm, 1 reader", "files/s", "pyfuse3-passthrough",
             target="≥ 5× rclone"),
    Scenario("small_warm_8", "small", "Small files (100 KiB), warm, 8 readers", "files/s", "pyfuse3-passthrough",
             target="≥ 5× rclone"),
    Scenario("meta_cold", "meta", "Metadata: walk + lstat every file of the tree, cold", "stats/s",
             "pyfuse3-passthrough"),
    Scenario("meta_warm", "meta", "Metadata: walk + lstat every file of the tree, warm", "stats/s",
             "pyfuse3-passthrough"),
    Scenario("conc_8", "conc", "Concurrency: 8 readers, distinct cold files", "MB/s", "s3-direct"),
    Scenario("conc_32", "conc", "Concurrency: 32 readers, distinct cold files", "MB/s", "s3-direct"),
    Scenario("herd_32", "conc", "Concurrency: 32 readers of one cold file (file size / wall time)", "MB/s",
             "s3-direct"),
    Scenario("mem_32", "mem", "Daemon peak RSS during 32 sequential readers (conc_32)", "MiB", None,
             higher_is_better=False, target="≤ 512 MiB"),
    Scenario("large_warm_paired", "hooks", "Warm large sequential, paired: cachefs ÷ pyfuse3 "
             "passthrough in rounds that read through each in turn, the page cache dropped "
             "before each read", "%", None, target="≥ 90%"),
    Scenario("large_warm_rclone_paired", "hooks", "Warm large sequential, paired: cachefs ÷ "
             "rclone in rounds that read through each in turn, the page cache dropped before "
             "each read", "×", None, target="≥ 2×"),
    Scenario("large_cold_paired", "hooks", "Cold large sequential, paired: cachefs ÷ s3-direct "
             "in rounds that read through each in turn, cachefs's cache emptied and the page "
             "cache dropped before each read", "%", None, target="≥ 90%"),
    Scenario("cluster_3", "hooks", "Cluster of 3: S3 GET bytes (sum over the nodes) / data set bytes, "
             "every node reads the large data set at once, cold", "×", None,
             higher_is_better=False, target="≤ 1.05"),
    Scenario("cluster_peer_warm", "hooks", "Cluster of 3: warm read on node n0 of an object whose chunks "
             "a peer owns (peer SSD → TCP), page cache dropped", "MB/s", None),
    Scenario("cluster_local_warm", "hooks", "Cluster of 3: warm read on node n0 of an object whose chunks "
             "n0 owns (its own SSD), page cache dropped", "MB/s", None),
    Scenario("tracing_cost", "hooks", "Tracing on vs off: extra daemon CPU per warm 1 MiB request "
             "(the size buffered sequential reads reach the daemon in; throughput and a py-spy "
             "profile in the note)", "%", None, higher_is_better=False, target="< 5%"),
    Scenario("tracing_cost_128k", "hooks", "Tracing on vs off: extra daemon CPU per warm O_DIRECT "
             "128 KiB request (the worst case: eight times the requests per byte)", "%", None,
             higher_is_better=False, target="< 5%"),
]
SCEN = {s.id: s for s in SCENARIOS}


class Measurer:
    """Runs one measurement for one system, recording value, S3 egress and errors."""

    def __init__(self, ctx: Ctx, system: str, talks_to_s3: bool = True,
                 pids: Callable[[], list[int]] = list):
        self.ctx, self.system, self.talks_to_s3, self.pids = ctx, system, talks_to_s3, pids

    def __call__(self, scenario: str, fn: Callable[[], tuple[float, dict]],
                 logical_bytes: int | None = None) -> bool:
        ctx = self.ctx
        e0 = ctx.s3.egress()
        pids, s3_pid = self.pids(), ctx.s3.proc.pid if ctx.s3.proc else None
        c0 = cpu_snapshot(pids, s3_pid)
        try:
            value, extra = fn()
            c1 = cpu_snapshot(pids, s3_pid)
            extra["cpu"] = {k: round(c1[k] - c0[k], 3) for k in c0}
        except Skip as e:
            ctx.record(scenario, self.system, status=f"skipped: {e}")
            return False
        except Timeout as e:
            ctx.record(scenario, self.system, status=str(e))
            log(f"  {self.system} {scenario}: {e}")
            return False
        except Unavailable:
            raise
        except Exception as e:  # noqa: BLE001
            ctx.record(scenario, self.system, status=f"failed: {e.__class__.__name__}: {e}"[:300])
            log(f"  {self.system} {scenario}: FAILED {e!r}")
            if ctx.args.verbose:
                traceback.print_exc()
            return False
        if logical_bytes and self.talks_to_s3:
            extra["s3_amplification"] = (ctx.s3.egress() - e0) / logical_bytes
        ctx.record(scenario, self.system, value, extra=extra)
        unit = SCEN[scenario].unit
        amp = f"  (S3 bytes ×{extra['s3_amplification']:.2f})" if "s3_amplification" in extra else ""
        log(f"  {self.system:20s} {scenario:13s} {value:10.1f} {unit}{amp}")
        return True


def run_mounted_system(ctx: Ctx, sys_: System) -> None:
    """All mounted scenarios for one system, ctx.profile.runs times."""
    p, lay, to = ctx.profile, ctx.layout, ctx.profile.timeout
    root = sys_.root
    m = Measurer(ctx, sys_.name, talks_to_s3=sys_.talks_to_s3, pids=sys_.daemon_pids)
    large_bytes = p.shards * p.shard_size
    small_bytes = p.small * p.small_size
    medium_bytes = p.medium * p.medium_size

    def mbps(rels: list[str], readers: int) -> Callable[[], tuple[float, dict]]:
        def f():
            n, s = read_files(root, rels, readers, to)
            return n / s / MB, {"bytes": n, "seconds": s}
        return f

    def files_per_s(rels: list[str], readers: int) -> Callable[[], tuple[float, dict]]:
        def f():
            n, s = read_files(root, rels, readers, to)
            if n != len(rels) * p.small_size:
                raise RuntimeError(f"read {n} bytes, expected {len(rels) * p.small_size}")
            return len(rels) / s, {"seconds": s}
        return f

    def stats_per_s() -> tuple[float, dict]:
        n, s = stat_tree(root / "meta", to)
        if n != len(lay.meta):
            raise RuntimeError(f"saw {n} files, expected {len(lay.meta)}")
        return n / s, {"seconds": s}

    def herd() -> tuple[float, dict]:
        gets = cachefs_gets(sys_)
        n, s = read_files(root, [lay.herd] * 32, 32, to)
        if n != 32 * p.herd_size:
            raise RuntimeError(f"read {n} bytes, expected {32 * p.herd_size}")
        extra = {"seconds": s, "delivered_MBps": n / s / MB}
        if gets is not None:  # the S3 GETs of 32 readers of one cold file (cachefs counts)
            extra["s3_gets"] = cachefs_gets(sys_) - gets
            log(f"  {sys_.name}: 32 readers of one cold file made {extra['s3_gets']} S3 GETs "
                f"for {-(-p.herd_size // cachefs_chunk_size(ctx))} chunks")
        return p.herd_size / s / MB, extra

    for run in range(p.runs):
        log(f"{sys_.name}: run {run + 1}/{p.runs}")
        # large sequential: cold -> warm -> hot on the same files
        sys_.reset_cold()
        if m("large_cold", mbps(lay.shards, 1), large_bytes):
            sys_.make_warm()
            if m("large_warm", mbps(lay.shards, 1), large_bytes):
                m("large_hot", mbps(lay.shards, 1), large_bytes)
        if sys_.large_only:
            continue
        # small files
        sys_.reset_cold()
        if m("small_cold_1", files_per_s(lay.small, 1), small_bytes):
            sys_.make_warm()
            m("small_warm_1", files_per_s(lay.small, 1), small_bytes)
            sys_.make_warm()
            m("small_warm_8", files_per_s(lay.small, 8), small_bytes)
        sys_.reset_cold()
        m("small_cold_8", files_per_s(lay.small, 8), small_bytes)
        # metadata
        sys_.reset_cold()
        if m("meta_cold", stats_per_s):
            sys_.make_warm()
            m("meta_warm", stats_per_s)
        # concurrency + memory
        sys_.reset_cold()
        m("conc_8", mbps(lay.medium[:8], 8), 8 * p.medium_size)
        sys_.reset_cold()
        sampler = RssSampler(sys_.daemon_pids)
        with sampler:
            ok = m("conc_32", mbps(lay.medium[:32], 32), medium_bytes)
        if ok:
            ctx.record("mem_32", sys_.name, sampler.peak_kib / 1024)
            log(f"  {sys_.name:20s} {'mem_32':13s} {sampler.peak_kib / 1024:10.1f} MiB")
        sys_.reset_cold()
        m("herd_32", herd, p.herd_size)
    argv, _ = sys_.command()
    ctx.notes.setdefault(sys_.name, []).append(
        f"`{' '.join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv))}` "
        f"{'(credentials in the environment or a 0600 file); ' if sys_.talks_to_s3 else ''}"
        f"read_ahead_kb of the mount: "
        f"{read_ahead_kb(sys_.mp)}")


# -- ceilings that are not mounts -------------------------------------------
class S3Direct:
    """Plain aiobotocore (httpx backend) under trio: the S3 ceiling. Large objects are read
    with RANGE_PAR concurrent RANGE_SIZE ranged GETs each, small ones whole."""
    RANGE_SIZE, RANGE_PAR = 8 * MiB, 8

    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    async def _with_client(self, body):
        import aiobotocore.httpxsession
        import aiobotocore.session
        import trio
        from aiobotocore.config import AioConfig
        sess = aiobotocore.session.get_session()
        cfg = AioConfig(http_session_cls=aiobotocore.httpxsession.HttpxSession,
                        max_pool_connections=64, retries={"max_attempts": 3})
        async with sess.create_client("s3", endpoint_url=self.ctx.s3.url, region_name=REGION,
                                      aws_access_key_id=ACCESS_KEY,
                                      aws_secret_access_key=SECRET_KEY, config=cfg) as c:
            with trio.fail_after(self.ctx.profile.timeout):
                return await body(c)

    async def get(self, c, key: str, rng: str | None = None) -> int:
        kw = {"Range": rng} if rng else {}
        r = await c.get_object(Bucket=self.ctx.bucket, Key=key, **kw)
        n = 0
        async with r["Body"] as b:
            async for chunk in b.iter_chunks(READ_BUF):
                n += len(chunk)
        return n

    async def ranged(self, c, key: str, size: int) -> int:
        """One object with RANGE_PAR concurrent RANGE_SIZE ranged GETs."""
        import trio
        ranges = list(range(0, size, self.RANGE_SIZE))
        total = 0

        async def worker():
            nonlocal total
            while ranges:
                off = ranges.pop(0)
                # (not `total += await ...`: that reads `total` before awaiting)
                n = await self.get(c, key, f"bytes={off}-{min(off + self.RANGE_SIZE, size) - 1}")
                total += n

        async with trio.open_nursery() as n:
            for _ in range(self.RANGE_PAR):
                n.start_soon(worker)
        return total

    def objects(self, keys: list[str], par: int):
        """A body: whole-object GETs of ``keys`` by ``par`` tasks."""
        async def body(c):
            import trio
            todo = list(keys)
            total = 0

            async def worker():
                nonlocal total
                while todo:
                    n = await self.get(c, todo.pop(0))
                    total += n

            async with trio.open_nursery() as n:
                for _ in range(par):
                    n.start_soon(worker)
            return total
        return body

    async def shards(self, c) -> int:
        t = 0
        for k in self.ctx.layout.shards:
            t += await self.ranged(c, k, self.ctx.profile.shard_size)
        return t

    async def herd(self, c) -> int:
        return await self.ranged(c, self.ctx.layout.herd, self.ctx.profile.herd_size)

    def timed(self, body) -> tuple[int, float]:
        """Run ``body`` with a client: (bytes it read, seconds)."""
        import trio

        async def run(c):
            t0 = time.perf_counter()
            n = await body(c)
            return n, time.perf_counter() - t0

        try:
            return trio.run(self._with_client, run)
        except trio.TooSlowError:
            raise Timeout(f"timeout after {self.ctx.profile.timeout:.0f} s") from None


def s3_direct(ctx: Ctx) -> None:
    """The S3 ceiling's scenarios (S3Direct)."""
    p, lay = ctx.profile, ctx.layout
    name = "s3-direct"
    m = Measurer(ctx, name)
    d = S3Direct(ctx)

    def mbps(body, expect: int):
        def f():
            n, s = d.timed(body)
            if n != expect:
                raise RuntimeError(f"read {n} bytes, expected {expect}")
            return n / s / MB, {"bytes": n, "seconds": s}
        return f

    def fps(keys, par):
        def f():
            _, s = d.timed(d.objects(keys, par))
            return len(keys) / s, {"seconds": s}
        return f

    for run in range(p.runs):
        log(f"{name}: run {run + 1}/{p.runs} (aiobotocore+httpx under trio, "
            f"{d.RANGE_PAR}×{d.RANGE_SIZE // MiB} MiB ranged GETs)")
        large, medium8, medium32 = p.shards * p.shard_size, 8 * p.medium_size, 32 * p.medium_size
        # each from a dropped page cache, as the mounted systems' cold figures are: the S3
        # server's files too (without, s3rver served them from memory after the first run)
        for sid, fn, nbytes in (
                ("large_cold", mbps(d.shards, large), large),
                ("small_cold_1", fps(lay.small, 1), p.small * p.small_size),
                ("small_cold_8", fps(lay.small, 8), p.small * p.small_size),
                ("conc_8", mbps(d.objects(lay.medium[:8], 8), medium8), medium8),
                ("conc_32", mbps(d.objects(lay.medium[:32], 32), medium32), medium32),
                ("herd_32", mbps(d.herd, p.herd_size), p.herd_size)):
            drop_page_cache()
            m(sid, fn, nbytes)
    ctx.notes.setdefault(name, []).append(
        "large/herd: 8 concurrent 8 MiB ranged GETs per object; small files: whole-object GETs "
        "by 1 or 8 tasks; conc: one whole-object GET per task")


def disk_dd(ctx: Ctx) -> None:
    """dd of the same bytes from the local copy: the disk ceiling."""
    name = "disk-dd"
    p = ctx.profile
    m = Measurer(ctx, name, talks_to_s3=False)
    files = [str(ctx.local / k) for k in ctx.layout.shards]

    def dd() -> tuple[float, dict]:
        t0 = time.perf_counter()
        for f in files:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=1M"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=p.timeout)
        s = time.perf_counter() - t0
        return p.shards * p.shard_size / s / MB, {"seconds": s}

    for run in range(p.runs):
        log(f"{name}: run {run + 1}/{p.runs}")
        drop_page_cache()
        m("large_cold", dd)
        drop_page_cache()
        m("large_warm", dd)
        m("large_hot", dd)
    ctx.notes.setdefault(name, []).append("`dd bs=1M` of the shard files; cold and warm are the same thing here")


# -- cluster and tracing (cachefs only; helpers from cluster_peer.py / bench_tracing.py)
def scenario_cluster_of_3(ctx: Ctx) -> None:
    """Three cachefs nodes on loopback (own mountpoints, caches, peer ports, one
    secret). All three read the whole large data set at once, from cold; the S3 GET
    bytes of the three nodes (`cachefs stats --json` counter s3_bytes, summed) over
    the data set size is the figure (target ≤ 1.05×). Then, on n0: warm reads of an
    object a peer owns vs one n0 owns (cluster_peer.py's key picking and timed reads,
    page cache dropped before each read)."""
    import secrets

    import cluster_peer as cp

    from cachefs.cluster.ring import HashRing

    p, lay = ctx.profile, ctx.layout
    ids = ["n0", "n1", "n2"]
    ports = {n: free_port() for n in ids}
    env = {"CACHEFS_PEER_SECRET": secrets.token_hex(16)}
    nodes = [CacheFSNode(ctx, f"cluster-{n}", cp.cluster_args(n, ports), env) for n in ids]
    n0 = nodes[0]
    data_bytes = p.shards * p.shard_size
    chunk = cachefs_chunk_size(ctx)
    probe_size = 8 * chunk  # 8 chunks all on one owner: 1 key in 3^8 fits
    rounds = 3 if p.runs == 1 else 5
    m = Measurer(ctx, "cachefs")
    s3 = boto3_client(ctx.s3.url)
    probe_keys: list[str] = []

    def node_stats() -> list[dict]:
        return [n.stats() for n in nodes]

    def cold() -> tuple[float, dict]:
        before = node_stats()
        drop_page_cache()
        res: dict[str, tuple[int, float]] = {}
        errors: list[BaseException] = []

        def reader(n: CacheFSNode) -> None:
            try:
                res[n.name] = read_files(n.root, lay.shards, 1, p.timeout)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(p.timeout + 30)
        wall = time.perf_counter() - t0
        if any(t.is_alive() for t in threads):
            raise Timeout(f"cluster readers stuck after {p.timeout:.0f} s")
        if errors:
            raise errors[0]
        for name, (nb, _) in res.items():
            if nb != data_bytes:
                raise RuntimeError(f"{name} read {nb} bytes, expected {data_bytes}")
        after = node_stats()

        def delta(f: Callable[[dict], int]) -> int:
            return sum(f(a) - f(b) for a, b in zip(after, before, strict=True))

        s3_bytes = delta(lambda st: st["counters"].get("s3_bytes", 0))
        peer_bytes = delta(lambda st: st.get("cluster", {}).get("bytes_from_peers", 0))
        fallbacks = delta(lambda st: st.get("cluster", {}).get("s3_fallbacks", 0))
        errs = sum(sum(c.values()) for st in after
                   for c in st.get("cluster", {}).get("peer_errors", {}).values())
        per_node = {k: v[0] / v[1] / MB for k, v in res.items()}
        extra = {"s3_bytes": s3_bytes, "data_bytes": data_bytes, "seconds": wall,
                 "bytes_from_peers": peer_bytes, "s3_fallbacks": fallbacks,
                 "peer_errors": errs, "node_MBps": per_node}
        log(f"  cluster: 3 × {data_bytes / MB:.0f} MB in {wall:.1f} s "
            f"({3 * data_bytes / wall / MB:.0f} MB/s together); S3 GET bytes {s3_bytes / MB:.0f} MB, "
            f"from peers {peer_bytes / MB:.0f} MB, S3 fallbacks {fallbacks}, peer errors {errs}")
        return s3_bytes / data_bytes, extra

    def place_probes() -> tuple[str, str]:
        """Two objects of probe_size: every chunk of one owned by n1, of the other by n0."""
        body = os.urandom(probe_size)
        etag = s3.put_object(Bucket=ctx.bucket, Key="cluster/probe", Body=body)["ETag"]
        probe_keys.append("cluster/probe")
        ring = HashRing(ids)
        kp = cp.pick_key(ctx.bucket, etag, ring, "n1", "cluster/peer", probe_size, chunk)
        kl = cp.pick_key(ctx.bucket, etag, ring, "n0", "cluster/local", probe_size, chunk)
        for k in (kp, kl):
            s3.put_object(Bucket=ctx.bucket, Key=k, Body=body)
            probe_keys.append(k)
        return kp, kl

    try:
        # before the mounts: keys uploaded later may be hidden by cached listings
        kp, kl = place_probes()
        for run in range(p.runs):
            log(f"cachefs cluster of 3: run {run + 1}/{p.runs} (nodes {', '.join(ids)}, "
                f"peer ports {', '.join(map(str, ports.values()))})")
            for n in nodes:
                n.unmount()
                n.wipe_cache()
            for n in nodes:  # every node up before anyone reads: the ring is static
                n.mount()
            ok = m("cluster_3", cold, data_bytes)
            e = ctx.results["cluster_3"]["cachefs"]
            x = e["extra"][-1] if ok and e["extra"] else None
            if x:
                e["status"] = (f"S3 GET bytes {x['s3_bytes'] / MB:.0f} MB (s3_bytes of the 3 nodes) ÷ "
                               f"data set {data_bytes / MB:.0f} MB = {x['s3_bytes'] / data_bytes:.3f}×; "
                               f"3 nodes read it at once in {x['seconds']:.1f} s; "
                               f"{x['bytes_from_peers'] / MB:.0f} MB from peers, "
                               f"{x['s3_fallbacks']} S3 fallbacks, {x['peer_errors']} peer errors")
            # warm: peer-owned vs own chunks, read through n0
            cp.timed_read(nodes[1].root / kp, probe_size)  # cold, by their owners
            cp.timed_read(n0.root / kl, probe_size)
            st0 = n0.stats().get("cluster", {}).get("bytes_from_peers", 0)
            peer, local = cp.peer_vs_local(n0.root / kp, n0.root / kl, rounds, probe_size)
            got = n0.stats().get("cluster", {}).get("bytes_from_peers", 0) - st0
            for v in peer:
                ctx.record("cluster_peer_warm", "cachefs", v)
            for v in local:
                ctx.record("cluster_local_warm", "cachefs", v)
            pm, lm = statistics.median(peer), statistics.median(local)
            ctx.results["cluster_peer_warm"]["cachefs"]["status"] = (
                f"peer ÷ local = {pm / lm:.2f}× (local: {lm:.0f} MB/s); {rounds} rounds of "
                f"{probe_size // MiB} MiB; {got / MB:.0f} MB came from the peer")
            ctx.results["cluster_local_warm"]["cachefs"]["status"] = (
                f"{rounds} rounds of {probe_size // MiB} MiB, alternating with the peer reads")
            log(f"  cachefs {'cluster warm n0':20s} peer {pm:.0f} MB/s, local {lm:.0f} MB/s "
                f"(peer ÷ local {pm / lm:.2f}×; {got / MB:.0f} MB from peers)")
    except Unavailable as e:
        log(f"cluster of 3: {e}")
        for sc in ("cluster_3", "cluster_peer_warm", "cluster_local_warm"):
            ctx.record(sc, "cachefs", status=str(e)[:300])
    except Exception as e:  # noqa: BLE001
        log(f"cluster of 3: FAILED {e!r}")
        if ctx.args.verbose:
            traceback.print_exc()
        for sc in ("cluster_peer_warm", "cluster_local_warm"):
            ctx.record(sc, "cachefs", status=f"failed: {e.__class__.__name__}: {e}"[:300])
    finally:
        for n in nodes:
            n.unmount()
            n.remove_cache()
        for k in probe_keys:
            with contextlib.suppress(Exception):
                s3.delete_object(Bucket=ctx.bucket, Key=k)
    ctx.notes.setdefault("cachefs", []).append(
        f"cluster_3: 3 daemons `cachefs mount ... --node-id nI --peer-listen 127.0.0.1:PORT --peers "
        f"n0=...,n1=...,n2=...` (CACHEFS_PEER_SECRET in the environment), chunk size {chunk // MiB} MiB")


def scenario_tracing_overhead(ctx: Ctx) -> None:
    """One cachefs daemon, its cache filled with the herd file; then bench_tracing.py's
    rounds of warm O_DIRECT passes (the page cache is bypassed: every block reaches
    the daemon) alternating tracing on and off in that daemon (control op
    trace_enable), 128 KiB and 1 MiB requests. Figures: the extra daemon CPU time per
    request with tracing on, the median over rounds of on/off - 1, for 1 MiB requests
    (tracing_cost: buffered sequential reads reach the daemon as 1 MiB requests) and
    for 128 KiB requests (tracing_cost_128k: the most requests per byte, where a
    per-request cost shows most); CPU time, not wall-clock throughput, which this
    shared machine's load swings move by ±15%. The throughput cost, a 90% interval
    and a py-spy profile share go in the note. Target: < 5%."""
    import bench_tracing as bt

    p = ctx.profile
    # many short alternating passes pair better against a shared machine's load
    # swings than a few long ones
    rel, size = ctx.layout.herd, p.herd_size
    passes = 101  # ~30 s in all: enough rounds for a 90% interval of a few percent
    node = CacheFSNode(ctx, "tracing")
    m = Measurer(ctx, "cachefs", talks_to_s3=False)
    summary_parts: list[str] = []

    def measure() -> tuple[float, dict]:
        path, pid = node.root / rel, node.proc.pid
        paths, pids = {mode: path for mode in bt.MODES}, {mode: pid for mode in bt.MODES}
        bt.read_direct(path, MiB)  # fill the cache (cold), then one warm-up pass
        bt.read_direct(path, MiB)
        before = bt.switcher(node.request)
        extra, costs = {"passes": passes, "bytes": size}, {}
        for block in (128 * KiB, MiB):
            res = bt.alternate_passes(paths, size, block, passes, pids, before)
            _, _, pct_ = bt.cost(res)
            con, coff, cpct = bt.cpu_cost(res)
            costs[block] = cpct
            extra[f"{block // KiB}KiB"] = {"on_MBps": res["on"], "off_MBps": res["off"],
                                          "throughput_cost_pct": pct_,
                                          "cpu_us_per_request": {"on": con, "off": coff},
                                          "cpu_cost_pct": cpct,
                                          "cpu_cost_interval_pct": bt.interval(res)}
            line = bt.describe(res)
            summary_parts.append(f"{block // KiB} KiB requests: {line}")
            log(f"  cachefs {'tracing ' + str(block // KiB) + ' KiB':20s} {line} (median of {passes})")
        before("on")
        sh = bt.trace_share(pid, lambda: [bt.read_direct(path, 128 * KiB)
                                          for _ in range(max(3, passes // 3))])
        if sh is not None:
            extra["py_spy"] = sh
            summary_parts.append(f"py-spy of the daemon at 128 KiB, tracing on: "
                                 f"{sh['share_pct']:.1f}% of its busy samples in trace.py")
        ctx.record("tracing_cost_128k", "cachefs", costs[128 * KiB])
        return costs[MiB], extra

    try:
        node.unmount()
        node.wipe_cache()
        node.mount()
        log(f"cachefs tracing on vs off: {passes} rounds of warm O_DIRECT passes over "
            f"{rel} ({size // MiB} MiB), tracing switched in one daemon")
        if m("tracing_cost", measure):
            ctx.results["tracing_cost"]["cachefs"]["status"] = (
                "; ".join(summary_parts) + f" (median of {passes} rounds of {size // MiB} MiB "
                "per mode, one daemon)")
    except Unavailable as e:
        log(f"tracing on vs off: {e}")
        ctx.record("tracing_cost", "cachefs", status=str(e)[:300])
    finally:
        node.unmount()
        node.remove_cache()


def paired_rounds(ctx: Ctx, sid: str, what: str, rounds: int,
                  reads: dict[str, Callable[[], float]], scale: float = 100.0) -> None:
    """``rounds`` rounds of one read through cachefs and one through its baseline, the
    order flipped every round; ``reads`` maps the two names ("cachefs" first) to a
    callable that prepares (drops the page cache, empties a cache) and reads the large
    shards, giving MB/s. Records cachefs ÷ the baseline × ``scale`` per round as ``sid``.
    Medians of the two systems taken minutes apart compare this VM's speed at two moments
    (it swings by a fifth or more: how fast the host hands back memory after a page-cache
    drop, the other tenants); reads seconds apart compare the systems."""
    (cf, cf_read), (base, base_read) = reads.items()
    log(f"{what}: {rounds} rounds through {base} and cachefs in turn")
    for r in range(rounds):
        order = [(cf, cf_read), (base, base_read)]
        if r % 2 == 0:
            order.reverse()
        mbs = {name: read() for name, read in order}
        v = scale * mbs[cf] / mbs[base]
        ctx.record(sid, "cachefs", v, extra={"cachefs_MBps": round(mbs[cf], 1),
                                             f"{base}_MBps": round(mbs[base], 1),
                                             "first": order[0][0]})
        log(f"  round {r + 1}: cachefs {mbs[cf]:7.1f} MB/s, {base} {mbs[base]:7.1f} MB/s: "
            + (f"{v:.1f}%" if scale == 100 else f"{v:.2f}×"))


def read_shards(ctx: Ctx, s_: System, prepare: Callable[[], None]) -> Callable[[], float]:
    """A read of the large shards through ``s_`` after ``prepare``, in MB/s."""
    p = ctx.profile

    def read() -> float:
        prepare()
        n, secs = read_files(s_.root, ctx.layout.shards, 1, p.timeout)
        if n != p.shards * p.shard_size:
            raise RuntimeError(f"{s_.name}: read {n} bytes, expected {p.shards * p.shard_size}")
        return n / secs / MB
    return read


def paired_hook(ctx: Ctx, sid: str, what: str, needs: str, cheap: bool = True):
    """Run ``body(rounds)`` of a paired scenario when ``needs`` is among the systems; its
    failure is the scenario's status. The median needs many rounds: single rounds swing
    from 74% to 116% on this VM (fewer for scenarios that are not ``cheap``)."""
    wanted = {s.strip() for s in ctx.args.systems.split(",")}

    def run(body: Callable[[int], None]) -> None:
        if needs not in wanted:
            return
        runs = ctx.profile.runs
        rounds = 3 if runs == 1 else (4 * runs - 1 if cheap else 2 * runs + 1)
        try:
            body(rounds)
        except Exception as e:  # noqa: BLE001 - S3 errors from S3Direct's nursery too
            log(f"{what}: {e}")
            ctx.record(sid, "cachefs", status=str(e)[:300])
    return run


def warm_paired(ctx: Ctx, sid: str, what: str, base_cls: type[System],
                scale: float = 100.0) -> None:
    """cachefs against ``base_cls`` mounted beside it, both warm (their caches filled
    once, the base's last: this VM's host caches its virtual disk, and files written last
    read faster; with rclone's filled first, cachefs read at 2 GB/s against 1.2 GB/s
    beside the passthrough)."""
    def body(rounds: int) -> None:
        base, cf = base_cls(ctx), CacheFSNode(ctx, "paired")
        try:
            base.check()
            base.wipe_cache()
            base.mount()
            cf.wipe_cache()
            cf.mount()
            for s_ in (cf, base):  # fill both caches
                read_shards(ctx, s_, lambda: None)()
            paired_rounds(ctx, sid, what, rounds,
                          {"cachefs": read_shards(ctx, cf, drop_page_cache),
                           base.name: read_shards(ctx, base, drop_page_cache)}, scale=scale)
        finally:
            cf.unmount()
            base.unmount()
            cf.remove_cache()
            base.wipe_cache()
    paired_hook(ctx, sid, what, base_cls.name)(body)


def scenario_large_warm_paired(ctx: Ctx) -> None:
    """Judges the target "warm large ≥ 90% of the pyfuse3 passthrough"."""
    warm_paired(ctx, "large_warm_paired", "warm large, paired with pyfuse3-passthrough",
                Passthrough)


def scenario_large_warm_rclone_paired(ctx: Ctx) -> None:
    """Judges the target "warm large ≥ 2× rclone" (rclone's warm median moved between 232
    and 1,197 MB/s from one full run to the next)."""
    warm_paired(ctx, "large_warm_rclone_paired", "warm large, paired with rclone", Rclone,
                scale=1.0)


def scenario_large_cold_paired(ctx: Ctx) -> None:
    """cachefs cold (its cache emptied and the daemon restarted before each read) against
    s3-direct: judges the target "cold large ≥ 90% of the direct download"."""
    sid, what = "large_cold_paired", "cold large, paired with s3-direct"

    def body(rounds: int) -> None:
        cf, d = CacheFSNode(ctx, "paired"), S3Direct(ctx)
        expect = ctx.profile.shards * ctx.profile.shard_size

        def direct() -> float:
            drop_page_cache()
            n, secs = d.timed(d.shards)
            if n != expect:
                raise RuntimeError(f"s3-direct: read {n} bytes, expected {expect}")
            return n / secs / MB
        try:
            paired_rounds(ctx, sid, what, rounds,
                          {"cachefs": read_shards(ctx, cf, cf.reset_cold), "s3-direct": direct})
        finally:
            cf.unmount()
            cf.remove_cache()
    paired_hook(ctx, sid, what, "s3-direct", cheap=False)(body)  # (~40 s a round)


HOOKS = [scenario_large_warm_paired, scenario_large_warm_rclone_paired, scenario_large_cold_paired,
         scenario_cluster_of_3, scenario_tracing_overhead]


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------
def summary(entry: dict) -> dict | None:
    v = entry["values"]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.0f}%"


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU-seconds of these processes so far, all their threads included."""
    u = k = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        u, k = u + int(fields[11]), k + int(fields[12])
    return u / CLK_TCK, k / CLK_TCK


def cpu_snapshot(system_pids: list[int], s3_pid: int | None) -> dict[str, float]:
    """CPU-seconds so far: the system's processes (a mount's daemon), the S3 server, this
    process with its finished children (the readers; s3-direct's client; dd), and the
    machine (busy and all, over every core)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    su, ss = proc_cpu(system_pids)
    return {"system_user": su, "system_sys": ss, "s3": sum(proc_cpu([s3_pid] if s3_pid else [])),
            "readers": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "machine_busy": (sum(v) - v[3] - v[4]) / CLK_TCK, "machine_all": sum(v) / CLK_TCK}


def median_of(ctx: Ctx, scenario: str, system: str) -> float | None:
    e = ctx.results.get(scenario, {}).get(system)
    s = summary(e) if e else None
    return s["median"] if s else None


def best_peer(ctx: Ctx, sc: Scenario) -> tuple[str, float] | None:
    peers = [(s.name, median_of(ctx, sc.id, s.name)) for s in SYSTEMS if s.role == "peer"]
    peers = [(n, v) for n, v in peers if v is not None]
    if not peers:
        return None
    return (max if sc.higher_is_better else min)(peers, key=lambda t: t[1])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def memory_reporting() -> str:
    """Whether this (virtual) machine hands freed memory back to its host (free page
    reporting), and what touching memory costs right after the page cache is dropped.
    Where it does, each pass after a drop fills the page cache partly with memory the host
    must hand back first; a system that fills twice the page cache of another (its own
    cache files plus the mount's pages) pays twice."""
    order = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    if not order.exists():
        return "no (no free page reporting)"
    drop_page_cache()
    time.sleep(2)  # as long as reporting waits after a free
    size = 6 << 30
    t = time.perf_counter()
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    took = time.perf_counter() - t
    m.close()
    return (f"yes, free page reporting (page_reporting_order {order.read_text().strip()}): "
            f"touching 6 GiB right after a page-cache drop took {took:.1f} s "
            f"({size / took / MB:.0f} MB/s); figures vary with it")


def proactive_reclaim() -> str:
    """Whether DAMON pages out memory it sees as cold (a kdamond running a ``pageout``
    scheme): it evicts page cache a pass has just filled and read once, so the next
    (hot) pass finds holes and goes back to the system for them."""
    base = Path("/sys/kernel/mm/damon/admin/kdamonds")
    found = []
    for k in sorted(base.glob("[0-9]*")):
        with contextlib.suppress(OSError):
            if (k / "state").read_text().strip() != "on":
                continue
            for sch in sorted(k.glob("contexts/*/schemes/[0-9]*")):
                if (sch / "action").read_text().strip() == "pageout":
                    age = (sch / "access_pattern/age/min").read_text().strip()
                    found.append(f"kdamond {k.name}: pageout of regions idle for ≥ {age} "
                                 "aggregation intervals")
    return ("yes, " + "; ".join(found) + " (hot figures vary with it)") if found else "no"


def _free(path: Path) -> str:
    return f"{shutil.disk_usage(path).free / GiB:.0f} GiB"


def machine_facts(ctx: Ctx) -> list[tuple[str, str]]:
    def ver(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / (1 << 20):.1f} GiB"
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    s3rver_ver = "?"
    with contextlib.suppress(OSError, ValueError):
        s3rver_ver = json.loads((NODE_DIR / "node_modules/s3rver/package.json").read_text())["version"]
    work_fs = " ".join(cmd_output(["df", "-h", "--output=source,fstype,size,avail",
                                    str(ctx.work)]).splitlines()[-1].split())
    return [
        ("host", socket.gethostname()),
        ("cores", str(os.cpu_count())),
        ("cpu", cpu),
        ("memory", mem),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
        ("work dir fs (source type size avail)", work_fs),
        ("work dir free at start / end", f"{ctx.disk_start} / {_free(ctx.work)} (the systems' "
         "caches are written anew each run: figures taken on a nearly full disk are suspect)"),
        ("load average at start / end", f"{ctx.load_start} / {os.getloadavg()[0]:.2f} "
         "(other jobs on the machine skew figures)"),
        ("memory handed back to the host", ctx.memory_start),
        ("proactive reclaim (DAMON)", proactive_reclaim()),
        ("cachefs", ver("cachefs")),
        ("pyfuse3", ver("pyfuse3")),
        ("trio", ver("trio")),
        ("aiobotocore", ver("aiobotocore")),
        ("httpx", ver("httpx")),
        ("s3fs", cmd_output(["s3fs", "--version"]).splitlines()[0] if shutil.which("s3fs") else "not installed"),
        ("rclone", cmd_output(["rclone", "version"]).splitlines()[0] if shutil.which("rclone") else "not installed"),
        ("fusermount3", cmd_output(["fusermount3", "--version"])),
        ("node", cmd_output(["node", "--version"])),
        ("s3rver", s3rver_ver),
    ]


def plot_group(ctx: Ctx, group: str, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scs = [s for s in SCENARIOS if s.group == group]
    systems = [n for n in ALL_SYSTEM_NAMES if any(
        summary(ctx.results.get(s.id, {}).get(n, {"values": []})) for s in scs)]
    if not systems:
        return False
    units = sorted({s.unit for s in scs})
    fig, axes = plt.subplots(1, len(units), figsize=(6 + 2.5 * len(scs), 4.5), squeeze=False)
    for ax, unit in zip(axes[0], units, strict=True):
        us = [s for s in scs if s.unit == unit]
        width = 0.8 / len(systems)
        for i, n in enumerate(systems):
            med, lo, hi = [], [], []
            for s in us:
                sm = summary(ctx.results.get(s.id, {}).get(n, {"values": []}))
                med.append(sm["median"] if sm else float("nan"))
                lo.append(sm["median"] - sm["min"] if sm else 0)
                hi.append(sm["max"] - sm["median"] if sm else 0)
            xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(us))]
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=n)
        ax.set_xticks(range(len(us)))
        ax.set_xticklabels([s.id for s in us])
        vals = [v for s in us for n in systems
                for v in ctx.results.get(s.id, {}).get(n, {"values": []})["values"] if v > 0]
        if vals and max(vals) / min(vals) > 30:
            ax.set_yscale("log")
        ax.set_ylabel(unit + " (median, min–max)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"cachefs bench — {group} ({ctx.profile.name}, {ctx.profile.runs} run(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


ALL_SYSTEM_NAMES = ["s3-direct", "disk-dd", "pyfuse3-passthrough", "c-passthrough", "cachefs",
                    "cachefs-no-page-cache", "s3fs", "rclone"]
GROUP_TITLES = {"large": "Large sequential", "small": "Small files", "meta": "Metadata",
                "conc": "Concurrency", "mem": "Memory", "hooks": "Cluster of 3 and tracing cost (cachefs only)"}


def target_checks(ctx: Ctx) -> list[tuple[str, str, str]]:
    """(target, measured, verdict)"""
    out = []

    quick = ctx.profile.name == "quick"

    def check(label: str, value: float | None, ok: Callable[[float], bool], shown: str) -> None:
        if value is None:
            out.append((label, "—", "not measured"))
        elif quick:  # one run of a smaller data set: no verdict, a hint
            out.append((label, shown, "met (indicative)" if ok(value)
                        else "missed (indicative)"))
        else:
            out.append((label, shown, "PASS" if ok(value) else "FAIL"))

    c = lambda s: median_of(ctx, s, "cachefs")  # noqa: E731
    v = c("large_warm_paired")
    check("warm large sequential ≥ 90% of pyfuse3 passthrough (paired rounds)", v,
          lambda x: x >= 90, f"{v:.1f}%" if v is not None else "")  # 89.5 is not 90
    r = ratio(c("large_warm"), median_of(ctx, "large_warm", "pyfuse3-passthrough"))
    out.append(("the same from the large_warm medians (runs minutes apart)", pct(r),
                "for reference"))
    v = c("large_warm_rclone_paired")
    check("warm large sequential ≥ 2× rclone (paired rounds)", v, lambda x: x >= 2,
          f"{v:.2f}×" if v is not None else "")
    r = ratio(c("large_warm"), median_of(ctx, "large_warm", "rclone"))
    out.append(("the same from the large_warm medians (runs minutes apart)",
                f"{r:.2f}×" if r else "—", "for reference"))
    v = c("large_cold_paired")
    check("cold large sequential ≥ 90% of direct aiobotocore (paired rounds)", v,
          lambda x: x >= 90, f"{v:.1f}%" if v is not None else "")
    r = ratio(c("large_cold"), median_of(ctx, "large_cold", "s3-direct"))
    out.append(("the same from the large_cold medians (runs minutes apart)", pct(r),
                "for reference"))
    r = ratio(median_of(ctx, "large_cold", "cachefs-no-page-cache"), median_of(ctx, "large_cold", "s3-direct"))
    check("the same with --no-page-cache", r, lambda x: x >= 0.9, pct(r))
    r = ratio(c("small_cold_1"), median_of(ctx, "small_cold_1", "s3-direct"))
    check("cold small files, 1 reader ≥ 90% of sequential GETs/s", r, lambda x: x >= 0.9, pct(r))
    for s in ("small_warm_1", "small_warm_8"):
        r = ratio(c(s), median_of(ctx, s, "rclone"))
        check(f"warm small files ({s[-1]} reader{'s' if s[-1] != '1' else ''}) ≥ 5× rclone", r,
              lambda x: x >= 5, f"{r:.2f}×" if r else "")
    v = c("mem_32")
    check("daemon peak RSS ≤ 512 MiB with 32 readers", v, lambda x: x <= 512, f"{v:.0f} MiB" if v else "")
    v = c("cluster_3")
    check("cluster of 3: S3 bytes ≤ 1.05× data set", v, lambda x: x <= 1.05, f"{v:.3f}×" if v is not None else "")
    v = c("tracing_cost")
    check("tracing cost < 5% (1 MiB requests: buffered warm reads)", v, lambda x: x < 5,
          f"{v:+.1f}%" if v is not None else "")
    v = c("tracing_cost_128k")
    check("tracing cost < 5% (128 KiB O_DIRECT requests: worst case)", v, lambda x: x < 5,
          f"{v:+.1f}%" if v is not None else "")
    return out


# targets set as a multiple of a peer: (scenario, peer, factor)
PEER_TARGETS = (("large_warm", "rclone", 2.0), ("small_warm_1", "rclone", 5.0),
                ("small_warm_8", "rclone", 5.0))


def reach_section(ctx: Ctx) -> list[str]:
    """How far the two passthroughs (Python and C) get towards the targets set as a
    multiple of a peer: a target above the C passthrough is out of reach of any FUSE
    daemon on this machine, one above the pyfuse3 passthrough out of reach of Python."""
    rows = []
    for sid, peer, k in PEER_TARGETS:
        base = median_of(ctx, sid, peer)
        if not base:
            continue
        cells = []
        for name in ("cachefs", "pyfuse3-passthrough", "c-passthrough"):
            v = median_of(ctx, sid, name)
            cells.append(f"{v / base:.2f}×" if v else "—")
        rows.append(f"| {sid}: ≥ {k:g}× {peer} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["What the passthroughs reach on the targets set against a peer (median ÷ the peer's "
            "median): the C passthrough does the least any FUSE daemon does per request, the "
            "pyfuse3 one the least a Python daemon does.", "",
            "| target | cachefs | pyfuse3-passthrough | c-passthrough |", "|---|---:|---:|---:|",
            *rows, ""]


CPU_SCENARIOS = ("large_cold", "large_warm", "small_cold_1", "small_warm_1", "small_warm_8")


def cpu_section(ctx: Ctx) -> list[str]:
    """Where the CPU went in the scenarios whose ceilings are CPU-bound on a small machine:
    CPU-seconds per GB (or per 1000 files) of the system's own processes, the S3 server,
    the readers (this process: its reader threads, s3-direct's client, dd), and the rest."""
    L = ["## Where the CPU goes", "",
         "CPU-seconds per GB read (MB/s scenarios) or per 1000 files (files/s), medians over "
         "the runs: the system's own processes (user + sys), the S3 server (s3rver), the "
         "readers (the bench process: reader threads, s3-direct's client; dd), and the rest "
         "of the machine's busy time (kernel threads, other jobs). `busy` is the machine's "
         "busy share of all its cores during the measurement.", ""]
    for sid in CPU_SCENARIOS:
        rows = ctx.results.get(sid, {})
        sc = SCEN[sid]
        per_gb = sc.unit == "MB/s"
        lines = []
        for name in ALL_SYSTEM_NAMES:
            e = rows.get(name)
            if not e:
                continue
            cols: dict[str, list[float]] = {}
            for v, x in zip(e["values"], e["extra"], strict=False):
                c = x.get("cpu")
                amount = x.get("bytes", 0) / 1e9 if per_gb else v * x.get("seconds", 0) / 1000
                if not c or amount <= 0:
                    continue
                own = c["system_user"] + c["system_sys"]
                vals = {"busy": 100 * c["machine_busy"] / max(c["machine_all"], 1e-9),
                        "user": c["system_user"] / amount, "sys": c["system_sys"] / amount,
                        "s3": c["s3"] / amount, "readers": c["readers"] / amount,
                        "rest": max(0.0, c["machine_busy"] - own - c["s3"] - c["readers"]) / amount}
                for k, val in vals.items():
                    cols.setdefault(k, []).append(val)
            if cols:
                md = {k: statistics.median(v) for k, v in cols.items()}
                own = f"{md['user']:.2f} + {md['sys']:.2f}" if md["user"] + md["sys"] else "—"
                lines.append(f"| {name} | {md['busy']:.0f}% | {own} | "
                             f"{md['s3']:.2f} | {md['readers']:.2f} | {md['rest']:.2f} |")
        if lines:
            unit = "GB" if per_gb else "1000 files"
            L += [f"### {sc.title}", "",
                  f"| system | busy | own processes, user + sys (s/{unit}) | S3 server | readers | rest |",
                  "|---|---:|---:|---:|---:|---:|", *lines, ""]
    return L


def write_report(ctx: Ctx, started: float) -> Path:
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    p = ctx.profile
    # a quick (smoke) run never overwrites the day's full report
    stem = f"{dt.date.today().isoformat()}-{socket.gethostname()}" + (
        "-quick" if p.name == "quick" else "")
    md = out_dir / f"{stem}.md"
    L: list[str] = []
    L.append(f"# cachefs bench — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {socket.gethostname()}")
    L.append("")
    L.append(f"Command: `bench/run.sh{' --quick' if p.name == 'quick' else ''}` — profile **{p.name}**, "
             f"**{p.runs} run(s)** per figure" +
             (" (quick mode: one run, so min = median = max; figures are indicative only)" if p.runs == 1 else "")
             + f"; total time {(time.monotonic() - started) / 60:.1f} min.")
    L.append("")
    L.append(f"Data set: {p.shards} × {p.shard_size // MiB} MiB shards, {p.small} × {p.small_size // KiB} KiB "
             f"small files, {p.medium} × {p.medium_size // MiB} MiB files for concurrency, one "
             f"{p.herd_size // MiB} MiB file for the 32-reader herd, a {p.meta}-key metadata tree. "
             f"S3 is s3rver on loopback (node, single process). MB = 10^6 bytes.")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |\n|---|---|")
    for k, v in machine_facts(ctx):
        L.append(f"| {k} | {v} |")
    L.append("")
    L.append("## Targets (cachefs)")
    L.append("")
    L.append("| target | measured | verdict |\n|---|---|---|")
    for t, v, verdict in target_checks(ctx):
        L.append(f"| {t} | {v} | {verdict} |")
    L.append("")
    L.extend(reach_section(ctx))
    plots = {}
    for group in GROUP_TITLES:
        scs = [s for s in SCENARIOS if s.group == group]
        L.append(f"## {GROUP_TITLES[group]}")
        L.append("")
        if group in ("large", "small", "meta", "conc"):
            png = out_dir / f"{stem}-{group}.png"
            try:
                if plot_group(ctx, group, png):
                    plots[group] = png
                    L.append(f"![{group}]({png.name})")
                    L.append("")
            except Exception as e:  # noqa: BLE001
                L.append(f"(plot failed: {e})")
                L.append("")
        for sc in scs:
            rows = ctx.results.get(sc.id, {})
            L.append(f"### {sc.title}")
            L.append("")
            cel = f"ceiling: {sc.ceiling}" if sc.ceiling else "no ceiling"
            better = "higher is better" if sc.higher_is_better else "lower is better"
            L.append(f"Unit: {sc.unit} ({better}); {cel}" + (f"; target: {sc.target}" if sc.target else "") + ".")
            L.append("")
            L.append("| system | median | min | max | runs | cachefs ÷ this | S3 bytes ÷ logical | note |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---|")
            cval = median_of(ctx, sc.id, "cachefs")
            for name in ALL_SYSTEM_NAMES:
                e = rows.get(name)
                if e is None:
                    continue
                sm = summary(e)
                amps = [x["s3_amplification"] for x in e["extra"] if "s3_amplification" in x]
                amp = fmt(statistics.median(amps)) if amps else "—"
                vs = "—"
                if name != "cachefs" and sm and cval is not None:
                    vs = f"{cval / sm['median']:.2f}×"
                note = (e["status"] or "").replace("|", "/")
                if sm:
                    L.append(f"| {name} | {fmt(sm['median'])} | {fmt(sm['min'])} | {fmt(sm['max'])} | "
                             f"{sm['n']} | {vs} | {amp} | {note} |")
                else:
                    L.append(f"| {name} | — | — | — | 0 | — | — | {note} |")
            bp = best_peer(ctx, sc)
            parts = []
            if cval is not None and sc.ceiling:
                cv = median_of(ctx, sc.id, sc.ceiling)
                if cv:
                    parts.append(f"cachefs = **{pct(cval / cv)}** of its ceiling ({sc.ceiling})")
            if cval is not None and bp:
                parts.append(f"**{cval / bp[1]:.2f}×** the best peer ({bp[0]})")
            if parts:
                L.append("")
                L.append("; ".join(parts) + ".")
            L.append("")
    L += cpu_section(ctx)
    L.append("## Notes per system")
    L.append("")
    for name, notes in ctx.notes.items():
        for n in dict.fromkeys(notes):
            L.append(f"- **{name}**: {n}")
    L.append("")
    L.append("Raw figures: " + f"`{stem}.json`.")
    L.append("")
    md.write_text("\n".join(L))
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"profile": asdict(p), "results": ctx.results, "notes": ctx.notes,
         "machine": dict(machine_facts(ctx))}, indent=1))
    return md


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------
def cleanup_stale_mounts(work: Path) -> None:
    mnt = work / "mnt"
    if not mnt.exists():
        return
    for d in mnt.iterdir():
        if fuse_mounted(d):
            log(f"unmounting stale {d}")
            subprocess.run(["fusermount3", "-u", "-z", str(d)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data set, 1 run (< 5 min)")
    ap.add_argument("--runs", type=int, help="runs per figure (default: 3, quick: 1)")
    ap.add_argument("--systems", default="s3-direct,disk-dd,pyfuse3-passthrough,c-passthrough,"
                    "cachefs,cachefs-no-page-cache,s3fs,rclone",
                    help="comma-separated subset of: " + ",".join(ALL_SYSTEM_NAMES))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("CACHEFS_BENCH_WORK", BENCH / ".work")),
                    help="scratch dir: S3 data, local copy, caches, mountpoints (default bench/.work)")
    ap.add_argument("--cachefs-cache-size", default="64GiB")
    ap.add_argument("--cachefs-arg", action="append", default=[],
                    help="extra argument for `cachefs mount` (repeatable)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    profile = QUICK if args.quick else FULL
    if args.runs:
        profile = Profile(**{**asdict(profile), "runs": args.runs})
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(wanted) - set(ALL_SYSTEM_NAMES)
    if unknown:
        ap.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        ap.error("must run as root (drops the page cache, sets read_ahead_kb, mounts FUSE)")

    started = time.monotonic()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    cleanup_stale_mounts(work)
    bucket = f"bench-{profile.name}"
    s3 = S3Server(work / "s3", bucket, work / "logs" / "s3rver.log")
    ctx = Ctx(args=args, profile=profile, layout=Layout.of(profile), work=work,
              local=work / f"local-{profile.name}", bucket=bucket, s3=s3)
    ctx.memory_start = memory_reporting()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    mounted: list[System] = []
    try:
        wipe_stale_dataset(ctx)
        s3.start()
        ensure_dataset(ctx)
        ctx.disk_start = _free(work)
        if "s3-direct" in wanted:
            s3_direct(ctx)
        if "disk-dd" in wanted:
            disk_dd(ctx)
        for cls in SYSTEMS:
            if cls.name not in wanted:
                continue
            sys_ = cls(ctx)
            mounted.append(sys_)
            t0 = time.monotonic()
            try:
                sys_.check()
                run_mounted_system(ctx, sys_)
            except Unavailable as e:
                log(f"{sys_.name}: {e}")
                for sc in SCENARIOS:
                    if sc.group != "hooks" and (sc.group == "large" or not sys_.large_only):
                        ctx.record(sc.id, sys_.name, status=str(e)[:300])
            finally:
                sys_.unmount()
            log(f"{sys_.name}: done in {time.monotonic() - t0:.0f} s")
        if "cachefs" in wanted:
            for hook in HOOKS:
                hook(ctx)
    except (KeyboardInterrupt, BaseExceptionGroup) as e:
        # (an interrupt inside trio.run, as in s3-direct, arrives in an exception group)
        if isinstance(e, BaseExceptionGroup) and e.subgroup(KeyboardInterrupt) is None:
            raise
        log("interrupted: cleaning up")
        return 130
    finally:
        for sys_ in mounted:
            with contextlib.suppress(Exception):
                sys_.unmount()
        s3.stop()
        if ctx.results:
            md = write_report(ctx, started)
            log(f"report: {md}")
    log(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
