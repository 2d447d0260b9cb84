"""The `cachefs` command line.  Every user error is one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import click

from . import runtime
from .config import build_config
from .errors import EXIT_FAILED, EXIT_NO_DAEMON, EXIT_USAGE, OutputClosed, QuietError, leaves
from .report import human, printable

log = logging.getLogger("cachefs")

START_TIMEOUT = 180.0
# `umount`: a daemon still running this long after its file system was unmounted gets a
# SIGTERM (its FUSE requests under way then have the stop's grace, not S3's retry budget)
UMOUNT_TELL = 1.0


class RepeatLimit(logging.Filter):
    """At most BURST records per message template and WINDOW seconds.  A node whose
    cache disk is full said "serving chunk without caching" for every chunk read, a
    hundred lines a second into a log on that same disk.  The BURST-th record says
    that repeats are now counted; the first one after the window says how many were."""

    WINDOW = 60.0
    BURST = 10

    def __init__(self, clock=time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.seen: dict[tuple, list] = {}  # template -> [window start, records, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        key = (record.name, record.levelno, str(record.msg))
        st = self.seen.get(key)
        if st is None or now - st[0] >= self.WINDOW:
            if len(self.seen) > 10_000:
                self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.WINDOW}
            if st is not None and st[2]:
                record.msg = f"{record.msg} [{st[2]} more like this were not logged]"
            self.seen[key] = [now, 1, 0]
            return True
        st[1] += 1
        if st[1] < self.BURST:
            return True
        if st[1] == self.BURST:
            record.msg = (f"{record.msg} [more like this in the next "
                          f"{self.WINDOW - (now - st[0]):.0f}s are counted, not logged]")
            return True
        st[2] += 1
        return False


def setup_logging(level: str, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # botocore logs request headers (Authorization) at DEBUG: never let them through
    for noisy in ("botocore", "aiobotocore", "boto3", "urllib3", "httpx", "httpcore",
                  "pyfuse3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cachefs")
def cli() -> None:
    """cachefs: S3 data sets as a read-only POSIX tree, cached on the SSDs of your GPU nodes."""


# -- mount ----------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1, required=True, metavar="[s3://BUCKET[/PREFIX]] MOUNTPOINT")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with [[mount]] tables and settings (flags override it; its "
              "[[mount]] tables and an s3:// source on the command line exclude each other).")
@click.option("--endpoint-url", help="S3 endpoint, e.g. http://s3.internal:9000.")
@click.option("--region", help="S3 region (default: from the AWS configuration).")
@click.option("--profile", help="AWS profile for credentials.")
@click.option("--cache-dir", help="Directory on the SSD for cached chunks and the index "
              "(required, here or as [cache] dir in --config).")
@click.option("--cache-size", help="Cache limit, e.g. 500GiB (required, here or as [cache] "
              "size in --config; GiB = 1024^3 bytes, GB = 1000^3).")
@click.option("--chunk-size", help="Chunk size (default 8MiB).")
@click.option("--metadata-ttl", help="How long listings are trusted (default 300s).")
@click.option("--readahead-memory", help="Memory for read-ahead chunks (default 256MiB).")
@click.option("--readahead-chunks", type=int, help="Max chunks in flight per reader "
              "(default 8; 0: no read-ahead).")
@click.option("--prefetch-files", type=int, help="Files fetched ahead of a reader that opens a "
              "directory's files in name order (default 32; 0: off).")
@click.option("--page-cache/--no-page-cache", default=None,
              help="Keep read bytes in the kernel page cache (default), or bypass it: one copy "
              "less per byte and no page-cache memory for data sets far larger than RAM read "
              "in large requests; MAP_SHARED mmap then fails.")
@click.option("--high-watermark", help="Evict when use passes this: 0.9 or 90% (default).")
@click.option("--low-watermark", help="Evict down to this: 0.8 or 80% (default).")
@click.option("--s3-max-attempts", type=int, help="Attempts per S3 request (default 6).")
@click.option("--s3-timeout", help="Timeout of one S3 attempt (default 30s).")
@click.option("--allow-other/--no-allow-other", default=None,
              help="Let other users read the mount ([fuse] allow_other; default: no).")
@click.option("--node-id", help="This node's id in the cluster (default: its --peers entry, "
              "found by host name and port, or its HOST:PORT).")
@click.option("--peer-listen", help="HOST:PORT of this node's peer server.")
@click.option("--peer-advertise", help="HOST:PORT other nodes use to reach this one "
              "(default: --peer-listen, with a wildcard host replaced by the host name).")
@click.option("--peers", help="Static cluster members, comma-separated HOST:PORT or NODE=HOST:PORT.")
@click.option("--etcd", help="etcd endpoints for membership, comma-separated URLs.")
@click.option("--etcd-ca", help="CA file that signed etcd's certificate (https endpoints).")
@click.option("--etcd-cert", help="Client certificate for etcd (with --etcd-key).")
@click.option("--etcd-key", help="Private key of --etcd-cert.")
@click.option("--etcd-user", help="etcd user, when etcd has auth enabled (its password: "
              "CACHEFS_ETCD_PASSWORD).")
@click.option("--metrics-listen", help="HOST:PORT for Prometheus metrics (default off).")
@click.option("--slow-threshold", help="Traces slower than this are kept (default 50ms).")
@click.option("--otlp-endpoint", help="POST finished traces as OTLP/HTTP JSON to URL/v1/traces "
              "(default off; also CACHEFS_OTLP_ENDPOINT).")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
@click.option("--log-file", help="Daemon log (default <cache-dir>/cachefs.log).")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground (systemd, tests).")
@click.option("--ready-fd", type=int, hidden=True)
def mount(args, config_file, ready_fd, foreground, **flags) -> None:
    """Mount S3 (one bucket, or the mount table of --config) read-only at MOUNTPOINT.

    \b
    cachefs mount s3://datasets/train /mnt/train --endpoint-url http://s3:9000 \\
        --cache-dir /nvme/cachefs --cache-size 500GiB
    cachefs mount --config /etc/cachefs.toml /mnt/data
    """
    if len(args) == 2:
        source, mountpoint = args
    elif len(args) == 1:
        source, mountpoint = None, args[0]
        if mountpoint.startswith("s3://"):  # (not repeated: it may carry credentials)
            raise QuietError("no MOUNTPOINT after the s3:// source", EXIT_USAGE)
        if not config_file:
            raise QuietError("give s3://bucket[/prefix] MOUNTPOINT, or --config FILE MOUNTPOINT",
                             EXIT_USAGE)
    else:
        raise QuietError("too many arguments: expected [s3://bucket[/prefix]] MOUNTPOINT",
                         EXIT_USAGE)
    flags["foreground"] = foreground
    if config_file and not foreground and ready_fd is None and _not_a_file(config_file):
        raise QuietError(f"config file {printable(config_file)} is read from a pipe or "
                         "stdin: the daemon reads it again as it starts; write it to a file, "
                         "or mount with --foreground", EXIT_USAGE)
    cfg = build_config(mountpoint=mountpoint, source=source, config_file=config_file,
                       flags=flags)
    root = runtime.runtime_root()  # (a bad CACHEFS_RUNTIME_DIR: said before S3 is asked)
    if root.exists() and not root.is_dir():
        raise runtime.not_a_directory(root)
    if foreground or ready_fd is not None:
        _run_foreground(cfg, ready_fd)
    else:
        _daemonize(cfg)


def _not_a_file(path: str) -> bool:
    """A path the daemon cannot read again as this process did: this process's own file
    descriptors (stdin, a shell's <(...)), a pipe."""
    if path in ("-", "/dev/stdin") or path.startswith(("/dev/fd/", "/proc/self/fd/")):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # (what is missing gets its own error)
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _log_path(cfg) -> Path:
    return cfg.log_file or cfg.cache_dir / "cachefs.log"


_PATH_VARS = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE",
              "AWS_WEB_IDENTITY_TOKEN_FILE", "SSL_CERT_FILE", "SSL_CERT_DIR",
              "REQUESTS_CA_BUNDLE", "CACHEFS_RUNTIME_DIR")


def _run_foreground(cfg, ready_fd: int | None) -> None:
    import trio

    from .daemon import Daemon, Ready

    # every path is absolute by now (build_config): a daemon that stayed in the directory
    # it was started from kept that file system busy (`umount` of it failed) for good;
    # so are those the AWS SDK reads from the environment, later
    for var in _PATH_VARS:
        v = os.environ.get(var)
        if v and not os.path.isabs(v) and not v.startswith("~"):
            os.environ[var] = os.path.abspath(v)
    os.chdir("/")
    stream = None
    if ready_fd is None and cfg.log_file is not None:  # --foreground asked for a file
        if cfg.log_file.parent == cfg.cache_dir:
            from .daemon import prepare_cache_dir

            prepare_cache_dir(cfg.cache_dir, cfg.log_file)
        stream = _open_log(cfg.log_file)
    setup_logging(cfg.log_level, stream and io.TextIOWrapper(stream, line_buffering=True))
    # (systemd's socket is this process's to use: not passed on to children it starts)
    ready = Ready(ready_fd, os.environ.pop("NOTIFY_SOCKET", None) if ready_fd is None else None)
    try:
        trio.run(Daemon(cfg, ready).run)
    except BaseException as e:  # noqa: BLE001
        q = _find_quiet(e)
        if q is not None:
            ready.fail(q.msg, q.exitcode)
            if ready_fd is not None:
                # daemonized: `cachefs mount` says it; the log (another daemon's, when the
                # cache dir is in use) gets a dated line, not a bare "cachefs: error"
                log.error("not started: %s", printable(q.msg))
                raise SystemExit(q.exitcode) from None
            raise q from None
        if isinstance(e, KeyboardInterrupt):
            return
        why = daemon_failure(e)
        ready.fail(f"daemon failed: {why} (see {_log_path(cfg)})")
        log.exception("daemon failed")
        raise QuietError(f"daemon failed: {why}") from None
    finally:
        ready.close()


def daemon_failure(e: BaseException) -> str:
    """``Type: message`` of what stopped the daemon: for trio's exception groups, that
    of the first exception inside ("ValueError: bad port ...", not "ExceptionGroup:
    Exceptions from Trio nursery (1 sub-exception)"); on one line, control characters
    escaped."""
    leaf = leaves(e)[0] if isinstance(e, BaseExceptionGroup) and leaves(e) else e
    return printable(f"{type(leaf).__name__}: {leaf}")


def _daemonize(cfg) -> None:
    """Run this `cachefs mount` again with --ready-fd (which serves in the foreground),
    detached; return once the mount is live."""
    from .daemon import check_outside_mountpoint, prepare_cache_dir

    _start_timeout()  # (a bad one: said before a daemon starts)
    logp = _log_path(cfg)
    entries = runtime.mountinfo()
    mp = runtime.resolve_mountpoint(cfg.mountpoint, entries)
    check_outside_mountpoint(mp, cfg.cache_dir, cfg.log_file)  # before either is created
    # what this command creates, to be removed if it fails: the cache dir and the parents
    # it makes, or what it puts in a cache dir that was empty
    fresh = _first_missing(cfg.cache_dir)
    undo = fresh is not None or _is_empty_dir(cfg.cache_dir)
    try:
        prepare_cache_dir(cfg.cache_dir, logp)
        logf = _open_log(logp)
    except QuietError:
        if undo:
            _remove_fresh_cache_dir(cfg.cache_dir, fresh, logp)
        raise
    mounted_before = mp in runtime.cachefs_mounts(entries)  # only such a mount is ever cleaned up
    # a SIGTERM or SIGHUP (a closed terminal, a job scheduler) of this command while it
    # waits is a Ctrl-C: the starting daemon is stopped, not left to mount for nobody
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    r, w = os.pipe()
    args = sys.argv[1:]
    # before a "--" (after it, everything is an argument: a mountpoint named "-x")
    at = args.index("--") if "--" in args else len(args)
    python, env = runtime.python_module("cachefs")  # the cachefs this command runs
    argv = [*python, *args[:at], "--ready-fd", str(w), *args[at:]]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                            pass_fds=(w,), start_new_session=True, close_fds=True, env=env)
    os.close(w)
    logf.close()
    try:
        _wait_ready(cfg, proc, r, logp)
    except BaseException as e:  # gave up (timeout, Ctrl-C): nothing may stay mounted behind us
        _stop_starting_daemon(proc, mp, mounted_before)
        if undo and not (isinstance(e, QuietError) and str(logp) in e.msg):
            _remove_fresh_cache_dir(cfg.cache_dir, fresh, logp)
        raise


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def _open_log(logp: Path):
    """The daemon's log, appended to; a path that cannot be a log file is bad input."""
    try:
        return open(os.open(logp, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    except IsADirectoryError:
        raise QuietError(f"log file {logp} is a directory", EXIT_USAGE) from None
    except FileNotFoundError:
        raise QuietError(f"log file {logp}: directory {logp.parent} does not exist",
                         EXIT_USAGE) from None
    except NotADirectoryError:
        raise QuietError(f"log file {logp}: {logp.parent} is not a directory",
                         EXIT_USAGE) from None
    except OSError as e:
        # (a path this user cannot write is bad input, as for the cache dir: under
        # systemd's Restart=on-failure, exit 1 was a loop of failed starts)
        code = EXIT_USAGE if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else EXIT_FAILED
        raise QuietError(f"cannot open log file {logp}: {e.strerror}", code) from None


def _first_missing(d: Path) -> Path | None:
    """The outermost of d and its parents that does not exist (None: d exists)."""
    top = None
    p = d.absolute()
    while not os.path.lexists(p) and p != p.parent:
        top, p = p, p.parent
    return top


def _held(lock: Path) -> bool:
    """Does a process hold the flock of the cache dir's lock file?"""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _is_empty_dir(d: Path) -> bool:
    try:
        return d.is_dir() and not os.listdir(d)
    except OSError:
        return False


def _remove_fresh_cache_dir(d: Path, top: Path | None, logp: Path) -> None:
    """A mount that failed before its daemon used the cache dir this command created
    leaves no empty cache dir behind (nor the log in it that holds only the error the
    user was shown, nor the parents created for it).  A dir with anything else stays.
    ``top`` None: the cache dir was there, empty, and is left empty."""
    from .daemon import CACHEDIR_TAG

    with contextlib.suppress(OSError):
        # (the daemon's lock on the cache dir too: buckets are checked before the index
        # or any chunk dir is made)
        ours = {CACHEDIR_TAG, "lock"} | ({logp.name} if logp.parent == d else set())
        if _held(d / "lock"):
            return  # another daemon's cache dir now (two mounts started on it at once)
        if set(os.listdir(d)) <= ours:
            for name in ours:
                (d / name).unlink(missing_ok=True)
        if top is None:
            return
        p = d.absolute()
        while True:
            p.rmdir()  # fails on a dir that is not empty
            if p == top:
                return
            p = p.parent


def _start_timeout() -> float:
    """CACHEFS_START_TIMEOUT (seconds without a line from a starting daemon), or the
    default."""
    v = os.environ.get("CACHEFS_START_TIMEOUT")
    if not v:
        return START_TIMEOUT
    try:
        t = float(v)
    except ValueError:
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise QuietError(f"CACHEFS_START_TIMEOUT: expected seconds, more than 0, got {v!r}",
                         EXIT_USAGE)
    return t


def _wait_ready(cfg, proc: subprocess.Popen, r: int, logp: Path) -> None:
    """Relay the daemon's start-up lines until OK or ERR.  The deadline is START_TIMEOUT
    after the last line: a long start-up (a cache rebuilt from its chunk files) says how
    far it got, and is waited for while it does."""
    timeout = _start_timeout()
    deadline = time.monotonic() + timeout
    buf = b""
    stage = ""  # what the daemon said it was doing (STAGE lines, not shown)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                doing = f" (it was {stage})" if stage else ""
                raise QuietError(f"the daemon did not finish starting in {timeout:.0f}s"
                                 f"{doing} and was stopped (log {logp})")
            rl, _, _ = select.select([r], [], [], min(left, 1.0))
            if rl:
                data = os.read(r, 65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    deadline = time.monotonic() + timeout
                    kind, _, msg = line.decode(errors="replace").partition(" ")
                    if kind == "WARN":
                        click.echo(f"cachefs: warning: {msg}", err=True)
                    elif kind == "WAIT":
                        click.echo(f"cachefs: {msg}", err=True)
                    elif kind == "STAGE":
                        stage = msg
                    elif kind == "OK":
                        # the limit as read ("10GB" is 9.3 GiB): a GB/GiB mix-up shows
                        click.echo(f"cachefs: mounted at {cfg.mountpoint} (pid {proc.pid}, "
                                   f"cache limit {human(cfg.cache_size)}, log {logp})",
                                   err=True)
                        return
                    elif kind == "ERR":
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(timeout=30)  # (the error stands, whatever follows)
                        code, _, text = msg.partition(" ")
                        if code.isdigit():
                            raise QuietError(text, int(code))
                        raise QuietError(msg)
            elif proc.poll() is not None:
                break
    finally:
        os.close(r)  # from now on the daemon's OK finds nobody, and it unmounts
    code = proc.wait(timeout=30)
    raise QuietError(f"the daemon exited during start-up (status {code}); see {logp}")


def _stop_starting_daemon(proc: subprocess.Popen, mp: str, mounted_before: bool) -> None:
    """SIGTERM (a daemon already serving unmounts), then SIGKILL and a lazy unmount of
    the mount it left, never of one that was there before it (a second `mount` of a
    live mountpoint fails, and must not take the live one down with it)."""
    from .daemon import fusermount_unmount

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.returncode >= 0:
        # it exited by itself (an error, or our SIGTERM: it stops its start and undoes
        # it), its own mount removed: a cachefs mount there now is another daemon's (one
        # started at once from a shell with another runtime dir), never to be taken down
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if mp not in runtime.cachefs_mounts():
            return
        owner = (runtime.read_info(mp) or {}).get("pid")
        if owner == proc.pid or (not mounted_before and not (owner and runtime.alive(owner))):
            fusermount_unmount(Path(mp), lazy=True)


def _find_quiet(e: BaseException) -> QuietError | None:
    return next((x for x in leaves(e) if isinstance(x, QuietError)), None)


# -- umount ---------------------------------------------------------------------------


def _finite(v: float, what: str) -> float:
    if not math.isfinite(v):  # (nan passes click's range check)
        raise click.BadParameter(f"expected a number of seconds, got {v}", param_hint=what)
    return v


@cli.command()
@click.argument("mountpoint")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(0, min_open=True),
              callback=lambda ctx, p, v: _finite(v, "--timeout"),
              help="Seconds to wait for the daemon.")
def umount(mountpoint: str, timeout: float) -> None:
    """Unmount a cachefs mount and wait for its daemon to exit.

    \b
    cachefs umount /mnt/train
    """
    from .daemon import fusermount_unmount

    # nothing here touches the mount itself (a daemon that hangs would hang umount too):
    # mountinfo is read once, from the kernel; only a mount whose daemon this shell cannot
    # find is asked, by a child process killed if it hangs (runtime.mount_answers)
    if not mountpoint:  # ("$MNT" unset): not the current directory
        raise QuietError("MOUNTPOINT is empty", EXIT_USAGE)
    entries = runtime.mountinfo()
    mp = Path(runtime.resolve_mountpoint(mountpoint, entries))
    if str(mp) not in runtime.cachefs_mounts(entries):
        mounted = any(m.mountpoint == str(mp) for m in entries)
        raise QuietError(f"{mp} is not a cachefs mount" if mounted else f"{mp} is not mounted",
                         EXIT_NO_DAEMON)
    info = runtime.read_info(mp)
    pid = info.get("pid") if info else None
    started = info.get("pid_start") if info else None
    if pid:
        stale = not runtime.alive(pid, started)
    else:  # its runtime dir is not in this shell's places: a dead mount, or a live one?
        stale = runtime.mount_answers(
            mp, entry=runtime.mount_containing(str(mp), entries)) is False
    # the daemon is gone: detach even if busy (never a live one's: its readers would fail)
    ok, err = fusermount_unmount(mp, lazy=stale)
    if not ok:
        if "busy" in err.lower():
            raise QuietError(f"{mp} is busy: a process still uses it (close it, or see "
                             f"`fuser -m {mp}`)")
        raise QuietError(f"could not unmount {mp}: {err}")
    if pid:
        deadline = time.monotonic() + timeout
        told = time.monotonic() + UMOUNT_TELL
        while time.monotonic() < deadline:
            if not runtime.alive(pid, started):
                break
            if told is not None and time.monotonic() >= told:
                # Still in its FUSE loop: requests under way (the kernel's read-ahead of a
                # file closed since, say) wait for S3, and nothing bounds them, as nothing
                # told it to stop: up to S3's whole retry budget (183 s). A SIGTERM gives
                # them the stop's grace (STOP_GRACE), then cancels them.
                told = None
                with contextlib.suppress(OSError):
                    if runtime.alive(pid, started):
                        os.kill(pid, signal.SIGTERM)
            time.sleep(0.05)
        else:
            raise QuietError(f"unmounted {mp}, but daemon pid {pid} is still running (it "
                             f"hangs? `kill {pid}`)")
    elif not stale:
        click.echo(f"cachefs: unmounted {mp}; its daemon, whose runtime directory this shell "
                   "does not see (CACHEFS_RUNTIME_DIR, XDG_RUNTIME_DIR?), exits on its own",
                   err=True)
        return
    # a live daemon removes its runtime dir as it exits; a killed one's is left: remove
    # it (unless a new daemon for this mountpoint holds it already)
    runtime.remove_if_stale(runtime.mount_dir(mp, resolved=True))
    click.echo(f"cachefs: unmounted {mp}", err=True)


# -- stats ----------------------------------------------------------------------------


def client_for(mount: str | None):
    from .control import ControlClient

    mp = runtime.find_mount(mount)
    return ControlClient(runtime.socket_path(mp), mp), mp


@cli.command()
@click.option("--mount", help="The cachefs mountpoint (default: the only one).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--nodes", is_flag=True, help="In a cluster: every node's cache figures too.")
def stats(mount: str | None, as_json: bool, nodes: bool) -> None:
    """Cache size, use, pinned bytes, chunks, hits and misses per tier, evictions.

    \b
    cachefs stats --mount /mnt/train
    """
    client, mp = client_for(mount)
    s = client.request({"op": "stats", "nodes": nodes})["stats"]
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        from .report import format_stats

        click.echo(format_stats(mp, s))
    down = {n: c["error"] for n, c in (s.get("cluster", {}).get("nodes_cache") or {}).items()
            if "error" in c}
    if down:  # the figures of the others are above; exit 1 as status and free do
        for n, why in sorted(down.items()):
            click.echo(f"cachefs: node {printable(str(n))} unreachable: {printable(str(why))}",
                       err=True)
        raise SystemExit(EXIT_FAILED)


# -- demo -----------------------------------------------------------------------------


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where to put the S3 data, cache and mountpoint (default: a temp dir).")
@click.option("--shards", default=3, show_default=True, help="Number of large shard files.")
@click.option("--shard-size", default="32MiB", show_default=True,
              help="Size of each shard file.")
@click.option("--small-files", default=2000, show_default=True,
              help="Number of small \"camera frame\" files.")
@click.option("--small-size", default="64KiB", show_default=True,
              help="Size of each small file.")
def demo(workdir, shards, shard_size, small_files, small_size) -> None:
    """Local S3 server + sample data set, mounted, read cold, hot and warm; then cleaned up.

    \b
    cachefs demo
    """
    from .demo import run_demo

    run_demo(workdir, shards, shard_size, small_files, small_size)


def _add_plugins() -> None:
    """Commands that live in their own modules (file lists, tracing)."""
    from .plugins import optional_modules

    for mod in optional_modules("cachefs.cli_datasets", "cachefs.cli_trace"):
        for cmd in getattr(mod, "COMMANDS", ()):
            cli.add_command(cmd)


_add_plugins()


def _quiet_stdout() -> None:
    """stdout is a closed pipe: point it at /dev/null, so that the interpreter's last flush
    of what is still buffered does not print an error of its own."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main() -> None:
    try:
        rv = cli.main(standalone_mode=False, prog_name="cachefs")
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        click.echo("cachefs: interrupted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        if type(e).__name__ != "NoArgsIsHelpError":  # click >= 8.2: `cachefs` alone
            click.echo(f"cachefs: error: {e.format_message()}", err=True)
        elif e.ctx is not None:  # the help, as --help shows it, not as an error
            click.echo(e.ctx.get_help())
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        click.echo(f"cachefs: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code if e.exit_code else EXIT_USAGE)
    except QuietError as e:  # its text may come from a daemon, and from a peer through it
        click.echo(f"cachefs: error: {printable(e.msg)}", err=True)
        sys.exit(e.exitcode)
    except KeyboardInterrupt:
        click.echo("cachefs: interrupted", err=True)
        sys.exit(130)
    except BaseExceptionGroup as eg:
        q = _find_quiet(eg)
        if q is None:
            raise
        click.echo(f"cachefs: error: {printable(q.msg)}", err=True)
        sys.exit(q.exitcode)
    except (BrokenPipeError, OutputClosed):  # `cachefs ... | head`: nobody to tell
        _quiet_stdout()
        sys.exit(EXIT_FAILED)
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("CACHEFS_DEBUG"):
            raise
        click.echo(f"cachefs: internal error: {type(e).__name__}: {printable(str(e))} (CACHEFS_DEBUG=1 "
                   "shows where)", err=True)
        sys.exit(EXIT_FAILED)
