"""Walk every record of a cache index, in a child process of the daemon.

LMDB trusts its pages: a page damaged inside the file (a power loss with writes not yet
synced, a failing disk) can make a read raise ``MDB_CORRUPTED``, or kill the process with
SIGBUS or an assertion when a damaged branch points outside the file. The daemon cannot
survive the second kind in-process, so at every start it has this module read the whole
index first (``python -m cachefs.index_check PATH``): exit status 0 means every record was
read and decoded; DAMAGED (or death by SIGBUS, SIGSEGV, SIGABRT) means the index is moved
aside and rebuilt from the chunk files (``index.open_index``); anything else (the child
could not run, was killed from outside, or LMDB failed for want of memory or with an I/O
error: UNTOLD) says nothing about the index.

Only lmdb, struct and ctypes are imported, so the child starts in a few tens of
milliseconds. A second argument, the daemon's pid, makes the kernel kill the child with
the daemon (a SIGKILLed start left it reading the index for up to CHECK_TIMEOUT).
"""

from __future__ import annotations

import os
import struct
import sys

import lmdb

# the record layouts of cachefs.index (kept in step with it; a test checks both agree)
CHUNK_REC = struct.Struct("<Q16sdB")
INO = struct.Struct("<Q")
NAMED_DBS = (b"chunks", b"inodes", b"meta", b"listings", b"pins")
DAMAGED = 3  # exit status: a record did not read back
UNTOLD = 4  # exit status: the walk failed for a reason that is not the index's (ENOMEM, EIO)
# what damage to an index surely raises (the daemon takes it for damage at run time too)
DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError,
                 lmdb.InvalidError)
# what says nothing about the index: no memory (an address-space limit), an I/O error, a
# read-only file system, the lock file, reader slots; any other LMDB error at open or in
# the walk is damage (a torn meta page can read as "LMDB data format v3238002689 is not
# supported", a plain lmdb.Error)
NOT_DAMAGE = (lmdb.MemoryError, lmdb.DiskError, lmdb.ReadonlyError, lmdb.LockError,
              lmdb.ReadersFullError, lmdb.TlsFullError)


def walk(path: str) -> int:
    """Read every record of every database; returns how many. Raises on damage."""
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=8, subdir=True)
    try:
        n = 0
        with env.begin() as txn:
            names = {bytes(k) for k, _ in txn.cursor()}  # the main database: db names
            for name in NAMED_DBS:
                if name not in names:
                    continue
                db = env.open_db(name, txn=txn, create=False)
                for k, v in txn.cursor(db=db):
                    if name == b"chunks":
                        if len(k) != 16:
                            raise ValueError(f"a chunk id of {len(k)} bytes")
                        CHUNK_REC.unpack(v)
                    elif name == b"inodes":
                        INO.unpack(v)
                    n += 1
        return n
    finally:
        env.close()


def _die_with_parent(parent: int) -> None:
    """The daemon killed (SIGKILL: a start that timed out) must not leave this check
    reading its index for up to CHECK_TIMEOUT: the kernel kills it with its parent."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before that took effect
        sys.exit(UNTOLD)


def main() -> None:
    if len(sys.argv) > 2:
        _die_with_parent(int(sys.argv[2]))
    try:
        n = walk(sys.argv[1])
    except NOT_DAMAGE as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(UNTOLD)
    except (lmdb.Error, struct.error, ValueError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(DAMAGED)
    print(n)


if __name__ == "__main__":
    main()
