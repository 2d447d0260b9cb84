"""The chunk reader: one call, ``get(ref)``, returns a chunk's verified bytes.

Tiers, in order:
  1. the local SSD store (checksum verified; a bad file is dropped and refetched)
  2. the chunk's owner on the ring, when there is a cluster and it is not us
     (the owner reads its SSD or fetches from S3 once, and keeps the chunk)
  3. S3, by ranged GET with If-Match on the ETag; the chunk is written to the
     SSD store before the call returns (write-through)

Singleflight: concurrent ``get`` calls for one chunk id share one fetch.  The
fetch runs in a service nursery, not in the caller's task, so a caller that is
cancelled (an interrupted read) does not fail the others; it only stops
waiting.  Errors reach every waiter.  A chunk whose fetch failed fails again at once for
``FAILED_FOR`` seconds (the kernel retries a failed read-ahead read straight away, and
that retry would wait out a second S3 retry budget), and once S3 has answered that an
object version is gone (412), its chunks that are not cached fail at once for
``CHANGED_FOR`` seconds instead of one 412 per chunk of every read-ahead.  Cached chunks
of that version are still served.
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from collections.abc import Callable
from typing import Protocol

import trio

from ..errors import ObjectChanged, S3Error, chain
from ..stats import Stats
from ..store.chunkstore import ChunkStore
from ..trace import root as trace_root
from ..trace import span
from .ids import ChunkRef

log = logging.getLogger("cachefs.reader")

FAILED_FOR = 2.0  # seconds a chunk whose fetch failed fails again without a new fetch
CHANGED_FOR = 60.0  # seconds an object version S3 no longer has fails without a GET


def _unheld(e: BaseException) -> BaseException:
    """``e`` as a failed flight keeps it: its traceback without its first frame (the
    flight's task, which holds the flight), and the frames of it and of the exceptions it
    was raised from without their variables (a chunk's memory, the flight again).  Where
    it came from still shows in a log."""
    tb = e.__traceback__
    if tb is not None:
        e.__traceback__ = tb.tb_next
    for x in chain(e):
        if x.__traceback__ is not None:
            traceback.clear_frames(x.__traceback__)
    return e


def _version(ref: ChunkRef) -> tuple[str, str, str, int]:
    """The object version a chunk belongs to: bucket, key, ETag, and the size its reader
    takes it to have. The size is part of it because a GET that finds another size fails
    as a change: a peer that asks with a wrong one (a bug, a node of another version) made
    this node's own reads of that version fail without a GET for CHANGED_FOR."""
    return ref.obj.bucket, ref.obj.key, ref.obj.etag, ref.obj.size


class PeerTier(Protocol):
    async def fetch(self, ref: ChunkRef) -> bytes | None:
        """The chunk from its owner, or None when we own it or no peer could serve it."""


class _Flight:
    __slots__ = ("done", "data", "error", "pin", "holder", "remember")

    def __init__(self, pin: bool, holder: str, remember: bool = True) -> None:
        self.done = trio.Event()
        self.data: bytes | memoryview | None = None
        self.error: BaseException | None = None
        self.pin = pin  # cache the chunk pinned (cleared by a free of it meanwhile)
        self.holder = holder  # whose fetch it is: a trace, or an untraced caller's ``by``
        # a failure fails the next asks at once for FAILED_FOR: not when only speculative
        # callers (prefetch, the shared read-ahead) waited for it
        self.remember = remember


def _fetch_holder(by: str) -> str:
    """Who starts a fetch, for the traces of those who wait for it: the request of the
    trace it runs in ("read /a/b.bin (trace 3f2a-1c)", "peer.serve for n2 (trace …)"),
    else ``by`` ("preload")."""
    root = trace_root()
    if root is None:
        return by
    a = root.attrs
    what = a.get("path") or (f"for {a['peer']}" if a.get("peer") else "")
    return f"{root.name}{f' {what}' if what else ''} (trace {root.trace_id})"


class ChunkReader:
    def __init__(self, store: ChunkStore, stats: Stats, nursery: trio.Nursery,
                 peers: PeerTier | None = None) -> None:
        self.store = store
        self.stats = stats
        self.nursery = nursery
        self.peers = peers
        self._flights: dict[bytes, _Flight] = {}
        self.flights = self._flights.keys()  # chunk ids being fetched (read-only view)
        self._reading: dict[bytes, _Flight] = {}  # chunk id → its SSD read under way
        self._failed: dict[bytes, tuple[float, S3Error]] = {}  # chunk id → (until, error)
        self._changed: dict[tuple[str, str, str, int], tuple[float, S3Error]] = {}  # version

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def get(self, ref: ChunkRef, *, pin: bool = False, local_only: bool = False,
                  by: str = "", speculative: bool = False) -> bytes | memoryview:
        """The chunk's bytes.  ``by``: who asks, when not a traced request ("preload"),
        named in the traces of the readers who wait for this fetch.  ``speculative``: a
        fetch ahead of any reader (file prefetch, shared read-ahead); when it fails and no
        reader waited for it, the reader who then asks fetches anew (its failure was
        replayed to that reader as an immediate EIO for FAILED_FOR seconds)."""
        f = self._flights.get(ref.cid)
        if f is None and not pin:
            # fast path: a local hit without a flight (no await before registering below)
            data = await self._local(ref)
            if data is not None:
                return data
            f = self._flights.get(ref.cid)
        if f is None:
            self._fail_fast(ref)
            f = _Flight(pin, _fetch_holder(by), remember=not speculative)
            self._flights[ref.cid] = f
            self.nursery.start_soon(self._run, ref, f, local_only)
            leader = True
        else:
            leader = False
            self.stats.inc("singleflight_joins")
            if not speculative:
                f.remember = True
            if pin:  # the fetch keeps the chunk pinned, also when a peer serves it
                f.pin = True
        if leader:
            await f.done.wait()
        else:
            with span("singleflight.wait", chunk=ref.index,
                      **({"holder": f.holder} if f.holder else {})):
                await f.done.wait()
        if f.error is not None:
            # raised from a frame that holds neither it nor its flight: a traceback that
            # leads back to the error (this frame's f, err) is a cycle, and the failed
            # fetch's chunk memory waited for a full garbage collection
            err, f = f.error, None
            try:
                raise err
            finally:
                del err
        assert f.data is not None
        if pin and not leader and not self.store.is_pinned(ref.cid):
            await self.store.set_pinned([ref.cid], True)
        return f.data

    async def _local(self, ref: ChunkRef) -> bytes | memoryview | None:
        """The chunk from this node's SSD, or None. Reads of one chunk at once share one
        SSD read: the readers of one file in step (a job's ranks on a shard, handles whose
        reads jump within one chunk) each read the whole chunk, 8 MiB of disk and memory
        a reader, before the first had put it where the others look (the chunk memo)."""
        lf = self._reading.get(ref.cid)
        if lf is not None:
            self.stats.inc("ssd_read_joins")
            with span("chunk", chunk=ref.index, bytes=ref.length, joined=True) as sp:
                await lf.done.wait()
                sp.set(tier="local" if lf.data is not None else "miss")
            return lf.data  # (None: the read missed, or was cancelled: the caller goes on)
        if not self.store.contains(ref.cid):
            return None
        lf = self._reading[ref.cid] = _Flight(False, "")
        try:
            with span("chunk", chunk=ref.index, bytes=ref.length) as sp:
                lf.data = await self.store.get(ref.cid, ref.length)
                sp.set(tier="local" if lf.data is not None else "miss")
            return lf.data
        finally:
            del self._reading[ref.cid]
            lf.done.set()

    def _fail_fast(self, ref: ChunkRef) -> None:
        """Raise the error of a fetch of this chunk (or a 412 for its version) that failed
        moments ago."""
        if not (self._failed or self._changed):
            return
        now = time.monotonic()
        for memo, key in ((self._failed, ref.cid),
                          (self._changed, _version(ref))):
            got = memo.get(key)  # type: ignore[attr-defined]
            if got is not None:
                if got[0] > now:
                    self.stats.inc("fetch_failures_repeated")
                    raise copy.copy(got[1])
                del memo[key]  # type: ignore[attr-defined]

    def _remember(self, ref: ChunkRef, e: S3Error) -> None:
        # a copy, without the traceback and the exception it replaced: their frames hold
        # the failed fetch's chunk memory (8 MiB, kept from the pool) as long as the memo
        e = copy.copy(e)
        now = time.monotonic()
        for memo in (self._failed, self._changed):  # forget what has expired
            if len(memo) > 1024:
                for k in [k for k, (until, _) in memo.items() if until <= now]:
                    del memo[k]
        if isinstance(e, ObjectChanged):
            self._changed[_version(ref)] = (now + CHANGED_FOR, e)
        else:
            self._failed[ref.cid] = (now + FAILED_FOR, e)

    def version_current(self, bucket: str, key: str, etag: str) -> None:
        """S3 said this version is the object's again (put back, a rollback): reads of it
        no longer fail at once for the change a GET met."""
        for v in [v for v in self._changed if v[:3] == (bucket, key, etag)]:
            del self._changed[v]

    def listed(self, bucket: str, prefix: str, asked: float,
               etag_of: Callable[[str], str | None]) -> None:
        """A listing of ``prefix`` asked at monotonic time ``asked``, with ``etag_of(name)``
        the ETag it shows for a name: a version that a GET found replaced before then and
        that the listing shows again (a rollback) reads again; it failed with EIO for
        CHANGED_FOR when only a listing, no HEAD, saw it put back."""
        for v, (until, _) in list(self._changed.items()):
            bkt, key, etag, _ = v
            if (bkt == bucket and key.startswith(prefix) and until - CHANGED_FOR < asked
                    and etag_of(key[len(prefix):]) == etag):
                del self._changed[v]

    def unpin(self, cids) -> list[bytes]:
        """Fetches of these chunks still under way will cache them unpinned (a free of
        them: the preload that started them was stopped); returns their ids."""
        out = []
        for cid in cids:
            f = self._flights.get(cid)
            if f is not None:
                f.pin = False
                out.append(cid)
        return out

    def flight(self, cid: bytes) -> _Flight | None:
        """The fetch of this chunk under way (its ``done`` event and, once set, its
        ``error``), or None."""
        return self._flights.get(cid)

    async def wait_for(self, cids: list[bytes]) -> None:
        """Until the fetches of these chunks under way have ended."""
        for cid in cids:
            while (f := self._flights.get(cid)) is not None:
                await f.done.wait()

    async def _run(self, ref: ChunkRef, f: _Flight, local_only: bool) -> None:
        try:
            f.data = await self._fetch(ref, f, local_only)
        except Exception as e:  # noqa: BLE001 - handed to every waiter
            # without what its frames held: this flight (and the chunk's memory), which
            # will hold the error (a cycle, freed only by a full collection)
            f.error = _unheld(e)
            # (an object S3 no longer has at that version is a fact, whoever asked)
            if isinstance(e, S3Error) and (f.remember or isinstance(e, ObjectChanged)):
                self._remember(ref, e)
        finally:
            del self._flights[ref.cid]
            f.done.set()

    async def _fetch(self, ref: ChunkRef, f: _Flight, local_only: bool) -> bytes | memoryview:
        with span("chunk", chunk=ref.index, key=ref.obj.key, bytes=ref.length) as sp:
            if f.pin and self.store.contains(ref.cid):
                # pinned before the read: an eviction meanwhile would leave nothing to pin
                await self.store.set_pinned([ref.cid], True)
            data = await self.store.get(ref.cid, ref.length)
            if data is not None:
                sp.set(tier="local")
                return data
            if self.peers is not None and not local_only:
                data = await self.peers.fetch(ref)
                if data is not None:
                    sp.set(tier="peer")
                    self.stats.inc("peer_hits")
                    self.stats.inc("peer_bytes", len(data))
                    if f.pin:
                        # a preload gave this node the chunk to keep, and the ring has
                        # changed since (a node joined and owns it now): keep it here
                        await self.store.put(ref.cid, data, pin=True)
                    return data
            sp.set(tier="s3")
            obj = ref.obj
            assert obj.store is not None
            self.stats.inc("s3_misses")
            # the body lands in memory laid out like the chunk's file (ChunkBuf): the
            # write to the SSD goes straight from it, and readers share it read-only
            buf = self.store.new_buf(ref.length)
            await obj.store.get_range(obj.key, obj.etag, ref.offset, ref.length, obj.size,
                                      into=buf.data)
            await self.store.put(ref.cid, buf, pin=f.pin)
            return buf.data.toreadonly()
