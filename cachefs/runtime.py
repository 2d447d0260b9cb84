"""Where a running daemon can be found: one private directory per mountpoint.

<runtime root>/<hash of the mountpoint's real path>/
    control.sock   the control API (mode 0600, in a 0700 directory)
    info.json      pid, mountpoint, cache dir

The runtime root is /run/cachefs for root, else $XDG_RUNTIME_DIR/cachefs, else
/tmp/cachefs-<uid>.  Directories are created 0700 and must be owned by us.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from .errors import EXIT_NO_DAEMON, EXIT_USAGE, QuietError


def runtime_root() -> Path:
    override = os.environ.get("CACHEFS_RUNTIME_DIR")
    if override:
        return Path(override)
    uid = os.getuid()
    if uid == 0 and os.access("/run", os.W_OK):
        return Path("/run/cachefs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "cachefs"
    return Path(f"/tmp/cachefs-{uid}")


def _private_dir(p: Path) -> Path:
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = p.stat()
    if st.st_uid != os.getuid():
        raise QuietError(f"{p} is owned by another user; refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(p, 0o700)
    return p


def mount_dir(mountpoint: str | Path, *, create: bool = False, resolved: bool = False) -> Path:
    real = str(mountpoint) if resolved else resolve_mountpoint(mountpoint)
    h = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    root = runtime_root()
    if create:
        _private_dir(root)
        return _private_dir(root / h)
    return root / h


def write_info(mountpoint: Path, info: dict) -> Path:
    d = mount_dir(mountpoint, create=True, resolved=True)
    tmp = d / "info.json.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(info, f)
    os.replace(tmp, d / "info.json")
    return d


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


def mountinfo() -> list[MountEntry]:
    """The mounts of /proc/self/mountinfo, in mount order (a later one hides an earlier
    one at the same mountpoint).  Read from the kernel: never asks a mounted daemon."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                out.append(MountEntry(parts[2], _unescape(parts[4]), parts[sep + 1]))
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
    is resolved, and the name kept when that is a cachefs mountpoint."""
    a = os.path.abspath(path)
    here = os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))
    if here in cachefs_mounts(entries):
        return here
    return os.path.realpath(a)


def find_mount(mount: str | None) -> str:
    """The mountpoint to talk to: the given one, or the only cachefs mount."""
    if mount:
        return resolve_mountpoint(mount)
    mounts = cachefs_mounts()
    if not mounts:
        raise QuietError("no cachefs mount found (is `cachefs mount` running?)", EXIT_NO_DAEMON)
    if len(mounts) > 1:
        raise QuietError("several cachefs mounts: choose one with --mount "
                         f"({', '.join(mounts)})", EXIT_USAGE)
    return mounts[0]
