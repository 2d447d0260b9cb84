"""Where a running daemon can be found: one private directory per mountpoint.

<runtime root>/<hash of the mountpoint's real path>/
    lock           flock'ed by the mountpoint's daemon for its whole life (holds its pid)
    control.sock   the control API (mode 0600, in a 0700 directory)
    info.json      pid, mountpoint, cache dir

The runtime root is /run/cachefs for root.  Other users' daemons make theirs in
$XDG_RUNTIME_DIR/cachefs, or without one in /tmp/cachefs-<uid> (not in /run/user/<uid>:
logind removes that at the user's last logout, with a cron-started daemon's socket in
it).  A command looks for a mountpoint's directory in $XDG_RUNTIME_DIR/cachefs,
/run/user/<uid>/cachefs and /tmp/cachefs-<uid>, those owned by the user only: the shell
it runs in (cron, Slurm, sudo -u, ssh without a login session) may name another
$XDG_RUNTIME_DIR than the daemon's, or none.  Directories are created 0700 and must be
owned by us.

A daemon removes its directory when it exits; one whose daemon was killed is removed
by the next daemon to start, or by `cachefs umount` of its stale mount.  Only the
holder of the lock removes a directory, the lock file last (see remove_mount_dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .errors import EXIT_NO_DAEMON, EXIT_USAGE, QuietError

# a control socket's path (<root>/<16 hex>/control.sock) fits in sockaddr_un's 108 bytes
# with its NUL only for a root of at most this many bytes
MAX_ROOT = 107 - len("/0123456789abcdef/control.sock")


def runtime_root() -> Path:
    """Where a starting daemon makes its runtime dir."""
    override = os.environ.get("CACHEFS_RUNTIME_DIR")
    if override:
        # (a relative one would name one place for the daemon, which starts in /, and
        # another for each command run elsewhere)
        if not os.path.isabs(override):
            raise QuietError(f"CACHEFS_RUNTIME_DIR must be an absolute path, not "
                             f"{override!r}", EXIT_USAGE)
        if len(os.fsencode(override.rstrip("/"))) > MAX_ROOT:
            raise QuietError(f"CACHEFS_RUNTIME_DIR is too long for the control socket's "
                             f"path: at most {MAX_ROOT} bytes", EXIT_USAGE)
        return Path(override)
    uid = os.getuid()
    if uid == 0 and os.access("/run", os.W_OK):
        return Path("/run/cachefs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if (xdg and os.path.isabs(xdg) and os.access(xdg, os.W_OK)
            and len(os.fsencode(xdg.rstrip("/") + "/cachefs")) <= MAX_ROOT):
        return Path(xdg) / "cachefs"
    return Path(f"/tmp/cachefs-{uid}")


def runtime_roots() -> list[Path]:
    """Where runtime dirs may be: the daemon's own first, then the other places a daemon
    started from another shell may have used."""
    first = runtime_root()
    if os.environ.get("CACHEFS_RUNTIME_DIR") or first == Path("/run/cachefs"):
        return [first]
    uid = os.getuid()
    roots = [first]
    for p in (Path(f"/run/user/{uid}/cachefs"), Path(f"/tmp/cachefs-{uid}")):
        if p not in roots:
            roots.append(p)
    return roots


def proc_state(pid: int) -> tuple[str, int] | None:
    """Process ``pid``'s state letter ("Z": a zombie) and when it began (clock ticks after
    boot, /proc/PID/stat field 22: with its pid, it names one process, even after the pid
    is reused); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def proc_start(pid: int) -> int | None:
    st = proc_state(pid)
    return st[1] if st else None


def alive(pid: int, started: int | None = None) -> bool:
    """True while pid runs (a zombie waiting for its parent counts as exited); with
    ``started`` (its start time, proc_start), only the process that began then: a daemon
    that was killed may have its pid taken by another program since."""
    st = proc_state(pid)
    return st is not None and st[0] != "Z" and (started is None or st[1] == started)


def not_a_directory(p: Path) -> QuietError:
    given = os.environ.get("CACHEFS_RUNTIME_DIR")
    return QuietError(f"{p} is not a directory (the runtime directory"
                      + (": CACHEFS_RUNTIME_DIR)" if given else "; remove what is there)"),
                      EXIT_USAGE)


def _private_dir(p: Path) -> Path:
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise not_a_directory(p) from None
    st = p.stat()
    if st.st_uid != os.getuid():
        raise QuietError(f"{p} is owned by another user; refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(p, 0o700)
    return p


def mount_dir(mountpoint: str | Path, *, create: bool = False, resolved: bool = False) -> Path:
    real = str(mountpoint) if resolved else resolve_mountpoint(mountpoint)
    h = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    if create:
        root = runtime_root()
        _private_dir(root)
        return _private_dir(root / h)
    roots = runtime_roots()
    ours = [r for r in roots if _ours(r)]
    found = [r / h for r in ours if (r / h).is_dir()]
    for d in found:  # a live daemon's, before one a killed daemon left
        if _pid_alive(d):
            return d
    if found:
        return found[0]
    if ours or not roots[0].exists():
        return (ours or roots)[0] / h  # no such dir: no daemon
    if not roots[0].is_dir():
        raise not_a_directory(roots[0])
    raise QuietError(f"{roots[0]} is owned by another user; refusing to use it")


def _ours(root: Path) -> bool:
    """A runtime root to look in: a directory of ours (/tmp/cachefs-<uid> may have been
    made by another user, whose "daemon" a command would then talk to)."""
    try:
        st = root.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _pid_alive(d: Path) -> bool:
    """The daemon that wrote d's info.json still runs."""
    try:
        with open(d / "info.json") as f:
            info = json.load(f)
        return alive(int(info["pid"]), info.get("pid_start"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_info(mountpoint: Path, info: dict) -> Path:
    d = mount_dir(mountpoint, create=True, resolved=True)
    tmp = d / "info.json.tmp"
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(info, f)
        os.replace(tmp, d / "info.json")
    except OSError as e:  # a full /run: say where, not a bare errno
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise QuietError(f"cannot write {d / 'info.json'}: {e.strerror} (the runtime "
                         f"directory {d.parent} holds each mount's socket and state)"
                         ) from None
    return d


def sd_notify(address: str, state: str) -> None:
    """Send ``state`` (``READY=1``, ``STATUS=...``) to systemd's notification socket (the
    ``NOTIFY_SOCKET`` of a ``Type=notify`` unit; ``@name``: an abstract socket). A lost
    message costs nothing but the service state: never an error."""
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode("utf-8", "replace"), address)
    except OSError as e:
        import logging

        logging.getLogger("cachefs.daemon").warning("cannot tell systemd %r: %s",
                                                    state.partition("\n")[0], e)


LOCK = "lock"
_LOCK_TRIES = 100


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` is the pid it wrote there, or ""."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def _same_file(fd: int, path: Path) -> bool:
    """``fd`` is still the file at ``path`` (not one unlinked, or replaced, since)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def lock_file(where: Callable[[], Path]) -> int:
    """An exclusive flock on the file at ``where()`` (created 0600), as an open fd; the
    holder's pid is for the caller to write.  LockBusy if another process holds it.

    A lock file may be unlinked by its holder (remove_mount_dir) after we opened it: a
    lock on a file no longer at its path protects nothing, so it is let go and taken
    again on the path's new file (``where`` makes its directory again if need be)."""
    for tries in range(_LOCK_TRIES):
        path = where()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # its directory was just removed: make it again
            time.sleep(0.01)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _same_file(fd, path):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if (not holder or holder.isdigit() and not alive(int(holder))) \
                        and tries < _LOCK_TRIES - 1:
                    # no pid: a daemon that has just taken it, or another mount's start
                    # removing it as stale (remove_if_stale holds it while it unlinks):
                    # a moment later it is the other daemon's (with its pid) or gone.
                    # Two daemons started at once failed on this ("is busy"). A dead
                    # holder's pid: a killed daemon's file, held by a start removing it.
                    time.sleep(0.01)
                    continue
                raise LockBusy(holder) from None
            os.close(fd)  # its holder is removing it: try the new file
            continue
        if _same_file(fd, path):
            return fd
        os.close(fd)  # removed between our open and our lock
    raise LockBusy("")


def remove_mount_dir(d: Path, fd: int) -> None:
    """Remove the runtime dir ``d`` of a mount while holding its lock ``fd`` (closed by the
    caller afterwards): its files, then the lock file, then the directory.

    No daemon can be using the directory meanwhile: a daemon writes there only once it
    holds the lock.  One that opened the lock file before it was unlinked gets the lock
    only after ``fd`` is closed, sees that the file is no longer at its path and takes
    the lock again on a new file (lock_file), in a directory made again if this one is
    gone; if it created its lock file before our rmdir, the rmdir fails (not empty) and
    the directory is its."""
    if not _same_file(fd, d / LOCK):
        return
    for name in ("control.sock", "info.json", "info.json.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (d / name).unlink()
    (d / LOCK).unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


def remove_if_stale(d: Path) -> bool:
    """Remove the runtime dir ``d`` if no daemon holds its lock (it was killed, or exited
    before it could remove it).  A live daemon's directory is left alone."""
    def existing() -> Path:  # never makes d again
        if not d.is_dir():
            raise FileNotFoundError(d)
        return d / LOCK

    try:
        fd = lock_file(existing)
    except (LockBusy, OSError):
        return False
    try:
        remove_mount_dir(d, fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    return not d.exists()


def remove_stale_dirs(keep: Path | None = None) -> int:
    """Remove every stale mount dir under the runtime roots but ``keep``; how many."""
    dirs = []
    for root in runtime_roots():
        if not _ours(root):
            continue
        try:
            dirs += [p for p in root.iterdir()
                     if re.fullmatch(r"[0-9a-f]{16}", p.name) and p != keep and p.is_dir()
                     and not p.is_symlink()]
        except OSError:
            continue
    return sum(remove_if_stale(p) for p in dirs)


def read_info(mountpoint: str | Path) -> dict | None:
    try:
        with open(mount_dir(mountpoint) / "info.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def socket_path(mountpoint: str | Path) -> Path:
    return mount_dir(mountpoint) / "control.sock"


class MountEntry(NamedTuple):
    device: str  # major:minor
    mountpoint: str
    fstype: str
    options: str = ""  # the super block's options (a FUSE mount's user_id=UID among them)

    def number(self, option: str) -> int | None:
        """A numeric super block option (a FUSE mount's ``user_id``: the uid its daemon
        runs as; ``group_id``)."""
        m = re.search(rf"(?:^|,){option}=(\d+)(?:,|$)", self.options)
        return int(m[1]) if m else None


def mountinfo() -> list[MountEntry]:
    """The mounts of /proc/self/mountinfo, in mount order (a later one hides an earlier
    one at the same mountpoint).  Read from the kernel: never asks a mounted daemon."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                out.append(MountEntry(parts[2], _unescape(parts[4]), parts[sep + 1],
                                      parts[sep + 3] if len(parts) > sep + 3 else ""))
    except (OSError, ValueError, IndexError):
        pass
    return out


def cachefs_mounts(entries: list[MountEntry] | None = None) -> list[str]:
    """Mountpoints of cachefs file systems (of ``entries``, or of a fresh mountinfo)."""
    return [m.mountpoint for m in (mountinfo() if entries is None else entries)
            if m.fstype == "fuse.cachefs"]


def mount_containing(path: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount that `path` (a real, absolute path) lies on: the last mounted of those
    whose mountpoint is its longest prefix (of ``entries``, or of a fresh mountinfo)."""
    best = None
    for m in (mountinfo() if entries is None else entries):
        mp = m.mountpoint
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mountpoint):
                best = m
    return best


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash come as octal escapes."""
    b = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]),
               field.encode("utf-8", "surrogateescape"))
    return b.decode("utf-8", "surrogateescape")


def resolve_mountpoint(path: str | Path, entries: list[MountEntry] | None = None) -> str:
    """The real path of a mountpoint, found without asking the file system mounted there
    (a daemon that hangs would hang this process in the kernel): the parent directory
    is resolved, and the name kept when something is mounted there."""
    a = os.path.abspath(path)
    here = os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))
    if entries is None:
        entries = mountinfo()
    if any(e.mountpoint == here for e in entries):  # (any file system: one that hangs too)
        return here
    return os.path.realpath(a)


def find_mount(mount: str | None) -> str:
    """The mountpoint to talk to: the given one, or the only cachefs mount."""
    if mount == "":  # ("--mount $MNT" with MNT unset): never "the only mount"
        raise QuietError("--mount: the path is empty", EXIT_USAGE)
    if mount:
        entries = mountinfo()
        mp = resolve_mountpoint(mount, entries)
        if mp in cachefs_mounts(entries):
            return mp
        around = mount_containing(mp, entries)
        if around is not None and around.fstype == "fuse.cachefs":
            raise QuietError(f"{mp} is inside the cachefs mount {around.mountpoint}, not its "
                             f"mountpoint (--mount {around.mountpoint})", EXIT_USAGE)
        if not os.path.lexists(mp):
            raise QuietError(f"{mp} does not exist", EXIT_USAGE)
        there = cachefs_mounts(entries)
        raise QuietError(f"{mp} is not a cachefs mount (" + (
            f"cachefs mounts: {', '.join(there)})" if there else "none is mounted)"),
            EXIT_NO_DAEMON)
    mounts = cachefs_mounts()
    if not mounts:
        raise QuietError("no cachefs mount found (is `cachefs mount` running?)", EXIT_NO_DAEMON)
    if len(mounts) > 1:
        # a daemon killed outright leaves its mount behind (ENOTCONN): not a choice
        live = [m for m in mounts if _pid_alive(mount_dir(m, resolved=True))]
        if len(live) == 1:
            return live[0]
        raise QuietError("several cachefs mounts: choose one with --mount "
                         f"({', '.join(live or mounts)})", EXIT_USAGE)
    return mounts[0]


def mount_answers(mp: str | Path, timeout: float = 2.0,
                  entry: MountEntry | None = None) -> bool | None:
    """Whether the FUSE daemon behind ``mp`` still answers: False when the kernel says its
    connection is gone (ENOTCONN: the daemon died), True when it answered a statfs (never
    cached by the kernel), None when it did not answer within ``timeout`` (it hangs). For
    a mount whose daemon this shell cannot find (its runtime dir is elsewhere): the only
    way to tell a dead mount from a live one.

    The statfs runs in a child process, killed if it hangs: a thread of ours left inside
    the mount would keep it busy, and the unmount that follows would fail. The child runs
    as the mount's user (``entry``'s user_id=, group_id=): the kernel answers a statfs of a
    FUSE mount without asking its daemon for a caller the mount does not allow (root, on a
    user's mount without allow_other), and a dead mount would look alive."""
    import errno
    import signal

    uid = gid = None
    if entry is not None and os.getuid() == 0:
        uid, gid = entry.number("user_id"), entry.number("group_id")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            if uid is not None and uid != 0:
                os.setgroups([])
                if gid is not None:
                    os.setgid(gid)
                os.setuid(uid)
            os.statvfs(mp)
            code = 0
        except OSError as e:
            code = 1 if e.errno in (errno.ENOTCONN, errno.ECONNABORTED) else 2
        except BaseException:  # noqa: BLE001 - the child says "it answered something"
            code = 2
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) != 1
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)  # (a FUSE request ends with its process)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def no_daemon_found(mp: str) -> QuietError:
    """Why no control socket was found for the cachefs mountpoint ``mp``: the mount is
    another user's (its daemon's socket is in that user's runtime dir, which this user may
    not open), or its daemon keeps it where this shell does not look, or it is dead."""
    e = mount_containing(mp)
    if e is None or e.mountpoint != mp or e.fstype != "fuse.cachefs":
        return QuietError(f"no cachefs daemon is running for {mp}", EXIT_NO_DAEMON)
    uid = e.number("user_id")
    if uid is not None and uid != os.getuid():
        import pwd

        try:
            who = pwd.getpwuid(uid).pw_name
        except KeyError:
            who = f"uid {uid}"
        return QuietError(f"{mp} is served by a cachefs daemon of user {who}, whose control "
                          f"socket only that user may use: run this command as {who}"
                          + (" (sudo)" if uid == 0 else f" (sudo -u {who})"), EXIT_NO_DAEMON)
    answers = mount_answers(mp, entry=e)
    if answers is False:
        return QuietError(f"the cachefs daemon of {mp} is gone and left its mount behind "
                          f"(`cachefs umount {mp}`, then mount again)", EXIT_NO_DAEMON)
    return QuietError(f"the cachefs daemon of {mp} keeps its control socket where this shell "
                      f"does not look ({', '.join(map(str, runtime_roots()))}): run this "
                      "command with the CACHEFS_RUNTIME_DIR or XDG_RUNTIME_DIR it was "
                      "started with", EXIT_NO_DAEMON)


def python_module(module: str, env: dict[str, str] | None = None
                  ) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run ``python -m module`` of this very cachefs: ``-P``
    (a cachefs/ directory, an old checkout, or a trio.py where the command was started is
    never imported instead), and this cachefs's own directory on the path when only the
    current directory had put it there (a source checkout run as `python -m cachefs`)."""
    env = dict(os.environ if env is None else env)
    here = str(Path(__file__).resolve().parent.parent)
    if here not in (str(Path(p).resolve()) for p in sys.path[1:] if p):
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"]
                                    if env.get("PYTHONPATH") else "")
    return [sys.executable, "-P", "-m", module], env
