"""pyfuse3.Operations: decode, call the VFS, encode, map errors. No logic here.

Only FUSEError may leave an operation (anything else would stop pyfuse3.main):
VFS errors become their errno; anything unexpected is logged, counted and
answered with EIO.  Every operation that would modify answers EROFS.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable

import pyfuse3

from .stats import Stats
from .vfs import DIR_MODE, FILE_MODE, VFS, FSError, Node

log = logging.getLogger("cachefs.fuse")


def _boundary(fn):
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args):
        t0 = time.perf_counter()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            self.stats.inc("fuse_internal_errors")
            log.exception("internal error in %s", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.stats.inc(f"fuse_{name}")
            if name != "read":
                self.stats.observe(f"fuse_{name}", time.perf_counter() - t0)

    return wrapper


def _erofs(name):
    async def op(self, *args):
        self.stats.inc("fuse_erofs")
        raise pyfuse3.FUSEError(errno.EROFS)
    op.__name__ = name
    return op


INODE_ROOM = 1 << 32  # statfs: the inodes a mount reports (a nominal number)


def name_bytes(name: str) -> bytes:
    """A name as the kernel gets it: S3 keys are UTF-8, whatever the daemon's locale
    (os.fsencode under a Latin-1 or ASCII locale failed on every non-ASCII name, and a
    readdir with one in it answered EIO)."""
    return name.encode("utf-8", "surrogateescape")


def name_of(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: VFS, stats: Stats) -> None:
        super().__init__()
        self.vfs = vfs
        self.stats = stats
        self.on_init: Callable[[], None] | None = None

    def init(self) -> None:
        """FUSE INIT is being answered (pyfuse3 calls this on the trio thread)."""
        if self.on_init is not None:
            self.on_init()

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = self.vfs.kernel_timeout(node)
        if node.is_dir:  # S3 keeps no time for a prefix: the directory shows the mount's
            a.st_mode = DIR_MODE
            a.st_nlink = 2
            a.st_size = 0
            ns = self.vfs.started_ns
        else:
            a.st_mode = FILE_MODE
            a.st_nlink = 1
            a.st_size = node.size
            ns = int(node.mtime * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        a.st_uid = self.vfs.uid
        a.st_gid = self.vfs.gid
        a.st_blksize = 1 << 20
        a.st_blocks = (a.st_size + 511) // 512
        return a

    @_boundary
    async def lookup(self, parent_inode, name, ctx=None):
        return self.attrs(await self.vfs.lookup(parent_inode, name_of(name)))

    @_boundary
    async def getattr(self, inode, ctx=None):
        return self.attrs(self.vfs.get(inode))

    @_boundary
    async def opendir(self, inode, ctx):
        return await self.vfs.opendir(inode)

    @_boundary
    async def readdir(self, fh, start_id, token):
        for name, node, next_id in self.vfs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name_bytes(name), self.attrs(node), next_id):
                return
            if next_id > 2:  # the kernel takes no reference on "." and ".."
                node.lookups += 1

    @_boundary
    async def releasedir(self, fh):
        self.vfs.releasedir(fh)

    @_boundary
    async def open(self, inode, flags, ctx):
        fh = await self.vfs.open(inode, flags, ctx.pid)
        if not self.vfs.cfg.page_cache:  # every read comes to us, straight into the reader's buffer
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        # the object version is immutable for this handle: let the page cache keep it
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_boundary
    async def read(self, fh, off, size):
        return await self.vfs.read(fh, off, size)

    @_boundary
    async def release(self, fh):
        self.vfs.release(fh)

    async def forget(self, inode_list):
        try:
            self.vfs.forget(list(inode_list))
        except Exception:  # must never raise
            log.exception("forget failed")

    @_boundary
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        st = self.vfs.reader.store
        bs = 4096
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = st.limit // bs
        s.f_bfree = s.f_bavail = max(0, st.limit - st.used) // bs
        # inodes: those the daemon holds are "used" (df -i's IUsed); the rest of a nominal
        # 2^32 is "free". With none free, df -i said 100% and monitoring that alerts on
        # a full file system's inodes (node-exporter's rules) alerted on every mount.
        s.f_files = INODE_ROOM
        s.f_ffree = s.f_favail = max(0, INODE_ROOM - len(self.vfs.nodes))
        s.f_namemax = 255
        return s

    @_boundary
    async def getxattr(self, inode, name, ctx):
        # ENOSYS: the kernel stops asking (and answers EOPNOTSUPP itself). ENOATTR made
        # every `ls -l` ask twice per file (ACLs, SELinux labels): 40,000 requests for a
        # directory of 20,000 files, 1 s of its 1.05 s.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_boundary
    async def listxattr(self, inode, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_boundary
    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        self.vfs.get(inode)

    # flush and fsync are left to pyfuse3's defaults (ENOSYS): the kernel then stops
    # sending them and reports success itself, which saves a round trip on every close()

    setattr = _erofs("setattr")
    mknod = _erofs("mknod")
    mkdir = _erofs("mkdir")
    unlink = _erofs("unlink")
    rmdir = _erofs("rmdir")
    symlink = _erofs("symlink")
    rename = _erofs("rename")
    link = _erofs("link")
    create = _erofs("create")
    write = _erofs("write")
    setxattr = _erofs("setxattr")
    removexattr = _erofs("removexattr")
