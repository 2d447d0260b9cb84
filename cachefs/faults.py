"""Test-only crash points: ``crash_point("name")`` kills the daemon with SIGKILL.

The daemon calls ``crash_point`` at the few places where a crash matters for the
cache's invariants (see docs/reliability.md):

  chunk.tmp_written      chunk file complete in tmp/, not yet renamed into chunks/
  chunk.renamed          chunk file renamed into chunks/, index record not yet committed
  index.commit           inside Index.apply: the batch is written, the txn not committed
  evict.index_deleted    eviction/free: records deleted from the index, files not unlinked

A test arms one point with the environment of the daemon process:

  CACHEFS_TEST_CRASH_AT=chunk.renamed     the point to crash at
  CACHEFS_TEST_CRASH_AFTER=N              let N hits pass first (default 0)

A test makes index commits fail (as on a disk too full for LMDB's new pages) for as long
as a file exists: every commit while it is empty, those writing the table it names
(``chunks``, ``pins``...) otherwise:

  CACHEFS_TEST_FAIL_COMMITS_WHILE=/path/to/flag

A test makes every job of the chunk store's disk threads take longer (a slow or busy
SSD), in seconds:

  CACHEFS_TEST_DISK_DELAY=0.3

The environment is read once, at import.  When nothing is armed,
``crash_point`` is a function that returns at once (one call, no lookup), so it
costs nothing measurable on the read path.
"""

from __future__ import annotations

import itertools
import os
import signal

_AT = os.environ.get("CACHEFS_TEST_CRASH_AT") or None
_AFTER = int(os.environ.get("CACHEFS_TEST_CRASH_AFTER") or 0)

POINTS = ("chunk.tmp_written", "chunk.renamed", "index.commit", "evict.index_deleted")


def _noop(name: str) -> None:
    return None


def _armed(name: str, _hits=itertools.count(1)) -> None:
    # itertools.count is atomic under the GIL: crash points run in worker threads too
    if name == _AT and next(_hits) > _AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


crash_point = _armed if _AT is not None else _noop

_FAIL_WHILE = os.environ.get("CACHEFS_TEST_FAIL_COMMITS_WHILE") or None


def _never(ops) -> bool:
    return False


def _while_flagged(ops) -> bool:
    try:
        with open(_FAIL_WHILE) as f:
            table = f.read().strip()
    except FileNotFoundError:
        return False
    return not table or any(getattr(op, "table", None) == table for op in ops)


commit_fails = _while_flagged if _FAIL_WHILE is not None else _never


DISK_DELAY = float(os.environ.get("CACHEFS_TEST_DISK_DELAY") or 0)
