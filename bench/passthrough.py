#!/usr/bin/env python3
"""Minimal read-only pyfuse3 passthrough: the "Python FUSE ceiling" of the bench.

Usage: python bench/passthrough.py SOURCE_DIR MOUNTPOINT

Serves SOURCE_DIR read-only at MOUNTPOINT. Metadata comes from os.lstat in the
event loop, data from os.pread in trio.to_thread.run_sync. Attributes and
entries are cached by the kernel for 300 s and open files keep the page cache
(keep_cache), so it does nothing a real daemon could not also do. After
mounting, the FUSE bdi's read_ahead_kb is raised to 1024 (the value cachefs is
expected to use), which lets the kernel send 1 MiB read requests.

Runs in the foreground; stop it with `fusermount3 -u MOUNTPOINT`.
"""

from __future__ import annotations

import errno
import os
import sys

import pyfuse3
import trio

READ_AHEAD_KB = 1024
TIMEOUT = 300.0


def set_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> None:
    """Raise the read-ahead of the FUSE bdi of mountpoint.

    Must run after the FUSE INIT reply (the kernel resets ra_pages from it),
    so it is called from a worker thread once pyfuse3.main() is serving: the
    os.stat below blocks until then, then identifies the bdi by st_dev.
    """
    st = os.stat(mountpoint)
    devno = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open(f"/sys/class/bdi/{devno}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:
        print(f"passthrough: cannot set read_ahead_kb for {devno}: {e}", file=sys.stderr)


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = os.path.realpath(source)
        self.path_of: dict[int, str] = {pyfuse3.ROOT_INODE: self.source}
        self.ino_of: dict[str, int] = {self.source: pyfuse3.ROOT_INODE}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.dirs: dict[int, list[str]] = {}
        self.next_dh = 1

    # -- helpers -------------------------------------------------------------
    def _ino(self, path: str) -> int:
        ino = self.ino_of.get(path)
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.ino_of[path] = ino
            self.path_of[ino] = path
        return ino

    def _path(self, inode: int) -> str:
        try:
            return self.path_of[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    @staticmethod
    def _attrs(path: str, ino: int) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    # -- metadata ------------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        attrs = self._attrs(path, 0)  # raises ENOENT before allocating an inode
        attrs.st_ino = self._ino(path)
        return attrs

    async def getattr(self, inode, ctx=None):
        return self._attrs(self._path(inode), inode)

    async def opendir(self, inode, ctx):
        try:
            names = sorted(os.listdir(self._path(inode)))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        dh = self.next_dh
        self.next_dh += 1
        self.dirs[dh] = [self._path(inode), names]
        return dh

    async def readdir(self, fh, start_id, token):
        base, names = self.dirs[fh]
        for i in range(start_id, len(names)):
            path = os.path.join(base, names[i])
            try:
                attrs = self._attrs(path, 0)
            except pyfuse3.FUSEError:
                continue
            attrs.st_ino = self._ino(path)
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), attrs, i + 1):
                break

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    async def statfs(self, ctx):
        sv = os.statvfs(self.source)
        s = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                  "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(s, k, getattr(sv, k))
        return s

    # -- data ----------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            fd = os.open(self._path(inode), os.O_RDONLY)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh, off, size):
        return await trio.to_thread.run_sync(os.pread, fh, size, off)

    async def release(self, fh):
        os.close(fh)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    # Resolve before mounting: any stat of the mountpoint afterwards, until
    # pyfuse3.main() serves requests, would deadlock this process.
    source, mountpoint = os.path.realpath(sys.argv[1]), os.path.realpath(sys.argv[2])
    ops = Passthrough(source)
    options = set(pyfuse3.default_options)
    options.add("fsname=bench-passthrough")
    options.add("ro")
    pyfuse3.init(ops, mountpoint, options)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(trio.to_thread.run_sync, set_read_ahead, mountpoint)

    try:
        trio.run(serve)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close()


if __name__ == "__main__":
    main()
