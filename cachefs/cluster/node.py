"""ClusterNode: this daemon's place in the cluster.

* serves its chunks to peers (``serve_peers``): a request names a chunk by
  bucket/key/ETag/index; the owner answers from its SSD or reads it through
  from S3 (``reader.get(ref, local_only=True)``: never asks another peer, so
  requests cannot bounce) and sends its trace spans back;
* is the reader's peer tier (``fetch``): the chunk's owner on the ring, then
  the next healthy node of the preference list; ``None`` sends the reader to
  S3 (when we own the chunk, or when no peer could serve it);
* keeps the ring up to date from the static ``--peers`` list or from etcd
  (membership.py);
* offers hooks for cluster-wide commands: ``owner_of``, ``nodes``,
  ``register_op`` and ``forward``.

See docs/cluster.md for the decisions and their measurements.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .. import trace
from ..chunks.ids import ChunkRef, ObjectVersion
from ..errors import ConfigError, QuietError
from ..otlp import is_parent as is_otlp_parent
from ..otlp import linked as otlp_linked
from ..report import human
from .membership import EtcdMembership, advertise_address, resolve_self, static_members
from .peer import PeerClient, PeerError, PeerHealth, serve_peers
from .ring import HashRing

if TYPE_CHECKING:
    from ..vfs import MountCtx

log = logging.getLogger("cachefs.cluster")

__all__ = ["ClusterNode", "TEST_CORRUPT_ENV"]

#: Test-only: a peer server started with this set to "1" flips one byte of
#: every chunk it sends, after computing the checksum (tests/test_cluster.py).
TEST_CORRUPT_ENV = "CACHEFS_TEST_CORRUPT_PEER"
#: Overrides the address this node announces (e.g. a pod IP from the downward API).
ADVERTISE_ENV = "CACHEFS_PEER_ADVERTISE"

#: Nodes of the preference list tried per chunk (the owner, then its successor).
#: The successor is the node that owns the chunk if the owner leaves the ring.
PEER_CANDIDATES = 2
#: A peer that failed is skipped for this long (then tried again).
UNHEALTHY_FOR = 10.0
# a call that never waits on S3 (ds_probe, ds_drop: index lookups, unlinks) is given up
# after this many peer timeouts (10 s by default), not peer timeout + S3 timeout (32 s)
NO_S3_TIMEOUTS = 5
# ... and never less than this: such calls do disk work there (a ds_drop's unlinks and
# index commits, pin records merged), which a small peer timeout (0.5 s) does not shrink
NO_S3_MIN = 10.0
# a hand-off probe (a cached copy or nothing: never S3 there) is given up after this many
# peer timeouts: a read waits on it, and S3 is the way on (it waited the request timeout,
# 32 s, on a successor that accepts and then says nothing)
HANDOFF_TIMEOUTS = 2
#: Concurrent requests this node sends to one peer (pooled connections), as many as a
#: peer serves at once: 4 made 16 cold reads queue here behind each other's S3 reads (the
#: last after 41 s), and the wait counted against the peer, which was marked unhealthy.
#: A read that finds them all in use for a peer timeout reads S3 itself.
MAX_CONNS_PER_PEER = 16
# a peer that answered one of these is up: reading elsewhere once does not make readers skip it
_ANSWERED = ("remote", "busy", "queued")  # ("queued": this node's own connections were busy)
#: Peer requests served at once by this node (all peers together); the environment
#: variable is for tests only.
MAX_SERVING = int(os.environ.get("CACHEFS_TEST_PEER_SLOTS") or 16)


def max_peer_connections() -> int:
    """Connections this node serves: every other member pools up to MAX_CONNS_PER_PEER
    (256 was full in a cluster of 66, where it refused healthy peers, which then skipped
    this node and read S3), a quarter of the descriptors the process may open."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(256, min(8192, soft // 4))

_MAX_KEY = 1024  # S3's limit, in UTF-8 bytes
_MAX_ETAG = 256
_MAX_CHUNK = 256 * 1024 * 1024
_MAX_OBJECT = 5 * 1024**4  # S3's largest object

Op = Callable[[dict], Awaitable[dict]]


@contextlib.contextmanager
def _within(limit: float, addr: str):
    """A caller's own, shorter bound on a peer request: it fails as the client's own
    request time-out does (PeerError, reason ``timeout``)."""
    try:
        with trio.fail_after(limit):
            yield
    except trio.TooSlowError:
        raise PeerError(f"request to {addr} timed out after {limit:g}s", "timeout") from None


class ClusterNode:
    def __init__(self, daemon: Any, mounts: list[MountCtx]) -> None:
        self.daemon = daemon
        self.mounts = mounts
        cfg = daemon.cfg.cluster
        self.opts = cfg
        if not cfg.peer_secret:
            raise ConfigError("a cluster needs a shared secret (CACHEFS_PEER_SECRET)")
        self.secret = cfg.peer_secret.encode("utf-8")
        self.listen = cfg.peer_listen
        self.address = advertise_address(cfg.peer_listen, os.environ.get(ADVERTISE_ENV)
                                         or getattr(cfg, "advertise", None))
        self.node_id, listed = resolve_self(cfg.node_id, cfg.peer_listen, self.address,
                                            cfg.peers)
        if listed:
            self.address = listed[self.node_id]
        self.mode = "etcd" if cfg.etcd else "static"
        self.members: dict[str, str] = static_members(self.node_id, self.address, listed)
        self.ring = HashRing(self.members)
        self.ring_changes = 0
        self._members_seq = 0  # membership changes seen: the latest one sets the ring
        self.health = PeerHealth(bad_for=UNHEALTHY_FOR)
        chunk_size = int(getattr(daemon.cfg, "chunk_size", _MAX_CHUNK))
        self.chunk_size = chunk_size
        s3_timeout = float(getattr(getattr(daemon.cfg, "s3", None), "request_timeout", 30.0))
        # connect: a dead host costs at most peer_timeout; the whole request may
        # include the owner's own S3 read, so it gets that much more.
        self.client = PeerClient(self.secret, connect_timeout=cfg.peer_timeout,
                                 request_timeout=cfg.peer_timeout + s3_timeout,
                                 queue_timeout=cfg.peer_timeout,
                                 max_conns_per_peer=MAX_CONNS_PER_PEER,
                                 max_body=max(chunk_size, 1))
        # how long this node, as an owner, keeps a peer waiting for its S3 read: answered
        # before that peer gives up (its request timeout, which counts one S3 attempt), so a
        # retry here is not taken there for a node gone silent
        # (it may have waited a peer timeout for a serving slot, and the requester as long
        # to connect, all within the requester's peer timeout + S3 timeout)
        self.serve_limit = max(s3_timeout - cfg.peer_timeout, s3_timeout / 2)
        self.membership: EtcdMembership | None = None
        if cfg.etcd:
            self.membership = EtcdMembership(
                cfg.etcd, cfg.etcd_prefix, self.node_id, self.address,
                lease_ttl=cfg.lease_ttl, grace_period=cfg.grace_period,
                on_change=self._on_members,
                tls=(cfg.etcd_ca, cfg.etcd_cert, cfg.etcd_key),
                auth=(cfg.etcd_user, cfg.etcd_password) if cfg.etcd_user else None)
        self.corrupt_for_test = os.environ.get(TEST_CORRUPT_ENV) == "1"
        self.instance = os.urandom(8).hex()  # tells this process from another of its node id
        self.port: int | None = None
        self._ops: dict[str, Op] = {"status": self._op_status, "cache": self._op_cache,
                                    "identity": self._op_identity}
        # counters
        self.served = 0
        self.bytes_served = 0
        self.serve_errors: Counter = Counter()
        self.fetched = 0
        self.bytes_fetched = 0
        self.handoff_hits = 0  # copies we handed to a new owner
        self.handoff_misses = 0
        self.handoff_hits_asked = 0  # chunks we own that a successor had
        self.handoff_misses_asked = 0
        self.s3_fallbacks = 0  # chunks a peer should have served but we read from S3
        self.skipped_unhealthy = 0
        self.budget_spent = 0  # reads that went to S3 when the peers' time for one was up
        self.peer_errors: dict[str, Counter] = {}

    # -- lifecycle ---------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host, _, port = self.listen.rpartition(":")
        if self.corrupt_for_test:
            log.warning("%s=1: this node CORRUPTS every chunk it serves to peers (tests only)",
                        TEST_CORRUPT_ENV)
        async with self.client, trio.open_nursery() as nursery:
            try:
                self.port = await nursery.start(partial(
                    serve_peers, host.strip("[]") or None, int(port), self.secret,
                    self._serve_chunk, max_concurrent=MAX_SERVING,
                    max_connections=max_peer_connections(), call_handler=self._serve_call,
                    joins_work=self._joins_fetch, slot_calls=frozenset({"ds_fetch"}),
                    # (as long as a requester waits: with an S3 timeout past 58 s, a
                    # chunk read here was cut at 60 s and its requester went to S3 too)
                    handler_timeout=max(60.0, self.client.request_timeout),
                    corrupt_for_test=self.corrupt_for_test))
            except OSError as e:
                msg = f"cannot listen for peers on {self.listen}: {e.strerror or e}"
                if isinstance(e, socket.gaierror) or e.errno in (errno.EADDRINUSE,
                                                                   errno.EADDRNOTAVAIL):
                    # the address may come (DHCP, DNS not up yet at boot) or the port be
                    # let go: a failure, which a service restarts, not a config error
                    # (exit 2, which the packaged unit does not restart)
                    raise QuietError(msg) from None
                raise ConfigError(msg) from None
            if self.membership is not None:
                await nursery.start(self.membership.run)
            await self._check_peers()
            log.info("cluster: node %s (%s) listening on %s, %s membership, %d node(s): %s",
                     self.node_id, self.address, self.listen, self.mode, len(self.ring),
                     ", ".join(sorted(self.members)))
            task_status.started()

    async def _on_members(self, members: dict[str, str]) -> None:
        self._members_seq = seq = self._members_seq + 1
        if set(members) != set(self.ring.nodes):
            ring = await trio.to_thread.run_sync(HashRing, list(members))
            if seq != self._members_seq:
                # a later change came while the ring was built, and is (or will be) applied:
                # this older one must not replace it
                return
            self.ring_changes += 1
            log.info("cluster: ring now has %d node(s): %s", len(ring),
                     ", ".join(sorted(members)))
        else:
            ring = self.ring
        self.members, self.ring = members, ring
        # what is kept per member goes with it: with node ids that change at every start
        # (a scheduler's pod names), the error counters and their /metrics series grew
        # without a bound
        for n in [n for n in self.peer_errors if n not in members]:
            del self.peer_errors[n]
        self.health.retain(set(members))
        await self.client.retain(set(members.values()))

    # -- serving peers ---------------------------------------------------------
    def _resolve(self, c: dict) -> ChunkRef:
        """The wire chunk dict → a ChunkRef on one of our mounts (PeerError if not)."""
        try:
            mount, bucket, key, etag = c["mount"], c["bucket"], c["key"], c["etag"]
            size, chunk_size, index = c["size"], c["chunk_size"], c["index"]
        except KeyError as e:
            raise PeerError(f"chunk request lacks {e.args[0]!r}", "protocol") from None
        if not all(isinstance(v, str) for v in (mount, bucket, key, etag)):
            raise PeerError("chunk request: mount, bucket, key, etag must be strings", "protocol")
        if not all(isinstance(v, int) and not isinstance(v, bool)
                   for v in (size, chunk_size, index)):
            raise PeerError("chunk request: size, chunk_size, index must be ints", "protocol")
        try:
            too_long = len(key.encode("utf-8", "surrogateescape")) > _MAX_KEY
            for v in (mount, bucket, etag):
                v.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in the JSON ("\ud800"): no S3 name
            raise PeerError("chunk request: a name that is not text", "protocol") from None
        if too_long or len(etag) > _MAX_ETAG:
            raise PeerError("chunk request: key or etag too long", "protocol")
        if not (0 < chunk_size <= _MAX_CHUNK and 0 <= size <= _MAX_OBJECT):
            raise PeerError("chunk request: size or chunk_size out of range", "protocol")
        if chunk_size != self.chunk_size:  # (the start-up check compares them once only)
            raise PeerError(f"chunk request: chunk size {human(chunk_size)}, this node's is "
                            f"{human(self.chunk_size)}: give every node the same "
                            "--chunk-size", "protocol")
        if not 0 <= index < max(1, -(-size // chunk_size)) or (size == 0 and index):
            raise PeerError("chunk request: index out of range", "protocol")
        ctx = None
        for m in self.mounts:  # the same mount name first, then any mount of that bucket
            if m.spec.name == mount and m.spec.bucket == bucket and key.startswith(m.spec.prefix):
                ctx = m
                break
        if ctx is None:
            for m in self.mounts:
                if m.spec.bucket == bucket and key.startswith(m.spec.prefix):
                    ctx = m
                    break
        if ctx is None:
            raise PeerError(f"node {self.node_id} does not mount s3://{bucket}/ for this key",
                            "remote")
        obj = ObjectVersion(ctx.spec.name, bucket, key, etag, size, chunk_size, ctx.store)
        return obj.chunk(index)

    def _joins_fetch(self, chunk: dict) -> bool:
        """A request for a chunk this node is fetching already: it only waits for that
        fetch, and takes no serving slot (40 nodes asking for one cold chunk took all 16,
        and 24 of them, answered busy, read it from S3 themselves)."""
        reader = self.daemon.reader
        if reader is None or not reader.in_flight or chunk.get("cached_only"):
            return False
        try:
            return self._resolve(chunk).cid in reader.flights
        except PeerError:
            return False

    async def _serve_chunk(self, chunk: dict, ctx: dict) -> tuple[bytes, list[dict]]:
        try:
            ref = self._resolve(chunk)
        except PeerError as e:
            self.serve_errors["bad_request"] += 1
            raise PeerError(str(e), e.reason) from None
        reader = self.daemon.reader
        if reader is None:
            # still starting (checking its peers: up to a peer timeout for a silent one). A
            # restarted owner's peers ask for its chunks at once, and "starting" sent each
            # of those reads to S3: what its SSD holds is served already
            data = await self.daemon.store.get(ref.cid, ref.length)
            if data is None:
                self.serve_errors["starting"] += 1
                raise PeerError(f"node {self.node_id} is still starting")
            self.served += 1
            self.bytes_served += len(data)
            return data, []
        cached_only = bool(chunk.get("cached_only"))
        slow = False
        tracer = self.daemon.tracer
        attrs = {"node": self.node_id, "chunk": ref.index, "key": ref.obj.key,
                 "peer": str(ctx.get("node", "?"))}
        parent_trace, parent_span = ctx.get("trace"), ctx.get("span")
        if is_otlp_parent(parent_trace, parent_span):
            attrs.update(parent_trace=parent_trace, parent_span=parent_span)
        try:
            with tracer.start("peer.serve", **attrs) as root:
                if cached_only:
                    # A hand-off probe from the chunk's new owner: answer from
                    # the SSD only, never from S3, never through a flight.
                    # A miss is an empty "ok" reply, not an error frame: the
                    # client closes a connection after any error.
                    data = await self.daemon.store.get(ref.cid, ref.length)
                    if data is None:
                        root.set(result="not_cached")
                        self.handoff_misses += 1
                        return b"", []
                else:
                    data = None
                    # a chunk of ours that we lack (we joined, or were away): the reader's
                    # hand-off asks the successor, its previous owner or stand-in, for its
                    # copy, one cached_only round trip, before S3; a chunk we stand in for
                    # (its owner is down for the asker): the SSD or S3 only
                    local_only = self.ring.owner(ref.cid) != self.node_id
                    with trio.move_on_after(self.serve_limit):
                        data = await reader.get(ref, local_only=local_only)
                    if data is None:  # (the fetch goes on, and keeps the chunk here)
                        root.set(result="slow")
                        self.serve_errors["slow"] += 1
                        slow = True
        except Exception as e:  # noqa: BLE001 - the owner's S3 read failed
            self.serve_errors["remote"] += 1
            raise PeerError(f"node {self.node_id}: {type(e).__name__}: {e}") from None
        if slow:
            raise PeerError(f"node {self.node_id}: its S3 read of this chunk took over "
                            f"{self.serve_limit:g}s (it goes on there): read it from S3",
                            "busy")
        self.served += 1
        self.bytes_served += len(data)
        if cached_only:
            self.handoff_hits += 1
        return data, [root.to_dict()]

    async def _serve_call(self, name: str, payload: dict) -> dict:
        op = self._ops.get(name)
        if op is None:
            raise PeerError(f"unknown cluster op {name!r}")
        return await op(payload)

    async def _op_status(self, payload: dict) -> dict:
        return self.statistics()

    async def _op_cache(self, payload: dict) -> dict:
        return {"cache": self.daemon.store.statistics()}

    def _is_self(self, node: str, addr: str | None) -> bool:
        """``node`` is this process: its id, or another id at its address (an etcd key a
        crash left behind before a restart with a new --node-id, or one address listed
        under two ids)."""
        return node == self.node_id or addr == self.address

    async def _op_identity(self, payload: dict) -> dict:
        return {"node_id": self.node_id, "chunk_size": self.chunk_size,
                "instance": self.instance, "mounts": self._mount_sources()}

    def _mount_sources(self) -> list[str]:
        return sorted(m.spec.source for m in self.mounts)

    async def _check_peers(self) -> None:
        """Refuse to start next to a member that answers with another chunk size (chunk
        ids include it: the nodes would cache every data set twice, and `free` or `status`
        from one node would not see the other's copies) or, with a static --peers list,
        with another node id (a wrong address in the list).  Members that are down, or do
        not answer within peer_timeout, are not checked."""
        problems: list[str] = []
        warnings: list[str] = []
        ours = self._mount_sources()

        async def one(node: str, addr: str) -> None:
            with trio.move_on_after(self.opts.peer_timeout):
                try:
                    r = await self.client.call(addr, "identity", {})
                except PeerError as e:
                    if e.reason in ("unauthorized", "bad_response_mac"):
                        warnings.append(
                            f"node {node} ({addr}) refuses this node's peer secret: give "
                            "every node the same CACHEFS_PEER_SECRET (until then the two "
                            "read from S3 what the other holds)")
                    return  # down, or a version without this op
                except ValueError:
                    return
                theirs = r.get("chunk_size")
                mounts = r.get("mounts")
                if isinstance(mounts, list) and sorted(map(str, mounts)) != ours:
                    warnings.append(
                        f"node {node} ({addr}) mounts {', '.join(map(str, mounts)) or 'nothing'}"
                        f", this node {', '.join(ours)}: a chunk of a bucket one of them does "
                        "not mount is read from S3 by every node that asks it")
                if isinstance(theirs, int) and theirs != self.chunk_size:
                    problems.append(
                        f"node {node} ({addr}) uses a chunk size of {human(theirs)}, this "
                        f"node {human(self.chunk_size)}: give every node of the cluster the "
                        "same --chunk-size")
                elif self.mode == "static" and r.get("node_id") not in (None, node):
                    problems.append(
                        f"--peers lists {node} at {addr}, but node {r.get('node_id')} answers "
                        "there: fix the address (give every node the same --peers)")

        async def me() -> None:
            """Our own address (as --peers lists it, or as advertised: behind a port
            mapping it is not --peer-listen's) must reach this process."""
            with trio.move_on_after(self.opts.peer_timeout) as cs:
                try:
                    r = await self.client.call(self.address, "identity", {})
                except (PeerError, ValueError) as e:
                    warnings.append(f"this node's address {self.address} does not reach it "
                                    f"({e}): peers cannot fetch from it")
                    return
                if r.get("instance") in (None, self.instance):
                    return
                if r.get("node_id") == self.node_id:
                    problems.append(f"another node answers as {self.node_id} at "
                                    f"{self.address}: give every node its own --node-id")
                else:
                    problems.append(f"node {r.get('node_id')} answers at {self.address}, "
                                    f"this node's address as {self.node_id}: fix --peers (or "
                                    "the advertised address)")
            if cs.cancelled_caught:
                warnings.append(f"this node's address {self.address} does not answer within "
                                f"{self.opts.peer_timeout:g}s: peers cannot fetch from it")

        async with trio.open_nursery() as n:
            n.start_soon(me)
            for node, addr in self.members.items():
                if not self._is_self(node, addr):
                    n.start_soon(one, node, addr)
        if problems:
            raise ConfigError(sorted(problems)[0])
        ready = getattr(self.daemon, "ready", None)
        for w in sorted(warnings):
            if ready is not None:
                ready.warn(w)
            else:
                log.warning("%s", w)

    async def cache_by_node(self) -> dict[str, dict]:
        """Every member's ``ChunkStore.statistics()`` (``{"error": ...}`` for a node
        that did not answer in time), asked concurrently. (It reads no S3 there: a node
        that does not answer is given up after ``no_s3_bound``; a fixed 2 s was less than
        a peer timeout of 2 s or more takes to connect.)"""
        out: dict[str, dict] = {}
        members = dict(self.members)

        async def one(node: str) -> None:
            try:  # (forward bounds it: "request to ADDR timed out after 10s")
                out[node] = (await self.forward(node, "cache", {}, no_s3=True))["cache"]
            except (PeerError, ValueError, KeyError, TypeError) as e:
                out[node] = {"error": str(e)}

        async with trio.open_nursery() as n:
            for node in sorted(members):
                n.start_soon(one, node)
        return dict(sorted(out.items()))

    # -- the reader's peer tier --------------------------------------------------
    def _count_error(self, node: str, reason: str) -> None:
        if node in self.members:  # (a request to a node that left meanwhile: not kept)
            self.peer_errors.setdefault(node, Counter())[reason] += 1

    def _mark_bad(self, node: str, reason: str) -> None:
        if node in self.members:
            self.health.mark_bad(node, reason)

    async def fetch(self, ref: ChunkRef) -> bytes | None:
        """The chunk from its owner (or the owner's successor), or None → S3."""
        ring, members = self.ring, self.members
        if len(ring) < 2:
            return None
        prefs = ring.preference(ref.cid, PEER_CANDIDATES)
        if prefs[0] == self.node_id:
            return await self._handoff(ref, prefs, members)
        desc = ref.describe()
        # the peers of one chunk get one request's time in all (its queue wait included),
        # then S3: an owner that timed out and then a successor that took as long made
        # a read wait twice the bound, 68 s instead of 34
        end = trio.current_time() + self.opts.peer_timeout + self.client.request_timeout
        for node in prefs:
            addr = members.get(node)
            if self._is_self(node, addr):
                # We are next in line: the chunk belongs here if the owner
                # leaves, so read it from S3 and keep it (asking ourselves
                # would wait on our own flight for this chunk).
                break
            if not self.health.is_healthy(node):
                self.skipped_unhealthy += 1
                continue
            if addr is None:
                continue
            left = end - trio.current_time()
            if left < self.opts.peer_timeout:
                # too little left for the successor to read S3 and answer: it would
                # start a GET only to be cut off, and this node would then GET it too
                self.budget_spent += 1
                break
            with trace.span("peer", node=node, tier="peer", bytes=ref.length) as sp:
                try:
                    with trio.move_on_after(left) as cut:
                        data, spans = await self.client.get(addr, desc, self._ctx(sp),
                                                            wait=self.opts.peer_timeout)
                    if cut.cancelled_caught:  # our bound, not the peer's fault
                        sp.set(error="budget")
                        self.budget_spent += 1
                        break
                except PeerError as e:
                    sp.set(error=e.reason)
                    self._count_error(node, e.reason)
                    if e.reason in _ANSWERED:
                        # The owner is up but its S3 read failed, or every serving slot
                        # stayed taken for peer_timeout: S3 is the quicker way now.
                        break
                    log.info("peer %s (%s) failed: %s; trying the next node", node, addr, e)
                    self._mark_bad(node, e.reason)
                    continue
                except ValueError as e:  # a malformed address announced by a member
                    sp.set(error="address")
                    self._count_error(node, "address")
                    self._mark_bad(node, "address")
                    log.warning("peer %s: %s", node, e)
                    continue
                except Exception as e:  # noqa: BLE001 - a peer failure never fails a read
                    sp.set(error="internal")
                    self.mark_unreachable(node, "internal")
                    log.error("peer %s (%s): unexpected %s: %s; trying the next node", node,
                              addr, type(e).__name__, e)
                    continue
                trace.attach(spans)
                if len(data) != ref.length:
                    sp.set(error="length")
                    self._count_error(node, "length")
                    self._mark_bad(node, "length")
                    continue
            self.fetched += 1
            self.bytes_fetched += len(data)
            return data
        self.s3_fallbacks += 1
        return None

    def _ctx(self, sp) -> dict:
        """What a chunk request tells its owner about itself: this node, and, in a trace,
        the trace and the id of the span ``sp`` that waits for the answer, under which
        the owner's OTLP export puts its ``peer.serve`` (docs/tracing.md)."""
        ctx: dict[str, Any] = {"node": self.node_id}
        root = trace.root()
        if root is not None:
            # the trace this one is exported in (itself, the read whose read-ahead it is,
            # the requester's of a peer.serve of ours: docs/tracing.md)
            ctx["trace"] = otlp_linked(root.owner.run_id, root.attrs, root.trace_id)[0]
            ctx["span"] = secrets.token_hex(8)
            sp.set(span_id=ctx["span"])
        return ctx

    async def _handoff(self, ref: ChunkRef, prefs: list[str],
                       members: dict[str, str]) -> bytes | None:
        """We own the chunk but do not have it: ask the successor (its owner
        before we joined, or the node that stood in while we were away) for
        a cached copy, then keep it.  One round trip; S3 if it is not there."""
        if len(prefs) < 2 or not self.health.is_healthy(prefs[1]):
            return None
        node = prefs[1]
        addr = members.get(node)
        if addr is None or self._is_self(node, addr):
            return None
        desc = {**ref.describe(), "cached_only": True}
        with trace.span("peer.handoff", node=node, tier="peer", bytes=ref.length) as sp:
            try:
                with _within(HANDOFF_TIMEOUTS * self.opts.peer_timeout, addr):
                    # (a shortcut only: not when every connection to it is in use)
                    data, spans = await self.client.get(
                        addr, desc, self._ctx(sp), wait=self.opts.peer_timeout, queue=0)
            except PeerError as e:
                sp.set(error=e.reason)
                self._count_error(node, e.reason)
                if e.reason not in _ANSWERED:
                    self._mark_bad(node, e.reason)
                return None
            except ValueError:
                return None
            except Exception as e:  # noqa: BLE001 - the hand-off is only a shortcut
                sp.set(error="internal")
                self.mark_unreachable(node, "internal")
                log.error("peer %s: unexpected %s in a hand-off: %s", node,
                          type(e).__name__, e)
                return None
            if not data and ref.length:
                sp.set(result="miss")
                self.handoff_misses_asked += 1
                return None
            trace.attach(spans)
            if len(data) != ref.length:
                self._count_error(node, "length")
                self._mark_bad(node, "length")
                return None
        self.handoff_hits_asked += 1
        await self.daemon.store.put(ref.cid, data)
        return data

    # -- hooks for cluster-wide commands (preload/free/status) ---------------------
    def resolve_chunk(self, desc: dict) -> ChunkRef:
        """A peer's chunk description (``ChunkRef.describe()``) → a ChunkRef on
        one of our mounts, validated like a ``get`` request (PeerError if not)."""
        return self._resolve(desc)

    def mark_unreachable(self, node: str, reason: str) -> None:
        """A cluster-wide command could not reach ``node``: readers skip it for a while."""
        if node != self.node_id:
            self._count_error(node, reason)
            self._mark_bad(node, reason)

    async def owner_of(self, ref: ChunkRef) -> str:
        """The id of the node that owns ``ref`` on the current ring."""
        return self.ring.owner(ref.cid)

    def nodes(self) -> dict[str, str]:
        """Current members: node id → peer address (this node included)."""
        return dict(self.members)

    def register_op(self, name: str, fn: Op) -> None:
        """Serve ``forward(node, name, payload)`` calls from peers with ``fn(payload)``."""
        self._ops[name] = fn

    async def forward(self, node: str, op: str, payload: dict, *, no_s3: bool = False,
                      wait: float | None = None) -> dict:
        """Run ``op`` on ``node`` (locally if it is us); its result dict.

        Raises PeerError if the node is unknown or unreachable, or if the op
        failed there (reason ``remote``).  The request, payload included,
        must stay under 64 KiB: split long file lists.  ``no_s3``: the op never
        waits on S3 there, so a node that does not answer (frozen, overloaded) is
        given up after ``NO_S3_TIMEOUTS`` peer timeouts rather than the peer timeout
        plus the S3 timeout. ``wait``: the longest the call may queue there for a
        serving slot (ops that take one) before the node answers ``busy``.
        """
        if node == self.node_id:
            return await self._serve_call(op, payload)
        addr = self.members.get(node)
        if addr is None:
            raise PeerError(f"unknown node {node!r}", "connect")
        if not no_s3:  # (work that reads S3 there: connections apart from the quick calls)
            return await self.client.call(addr, op, payload, s3=True, wait=wait)
        with _within(self.no_s3_bound, addr):
            # (the bound replaces the request timeout, which a short S3 timeout made less)
            return await self.client.call(addr, op, payload,
                                          request_limit=self.no_s3_bound + 1)

    @property
    def no_s3_bound(self) -> float:
        """How long a ``no_s3`` call waits for a node's answer."""
        return max(NO_S3_TIMEOUTS * self.opts.peer_timeout, NO_S3_MIN)

    # -- statistics ---------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        departing = self.membership.departing if self.membership else {}
        return {
            "node_id": self.node_id,
            "address": self.address,
            "listen": self.listen,
            "mode": self.mode,
            "ring_size": len(self.ring),
            "ring_changes": self.ring_changes,
            "members": {
                n: {"address": a, "healthy": n == self.node_id or self.health.is_healthy(n),
                    "state": "departing" if n in departing else "alive",
                    "last_failure": self.health.last_failure(n)}
                for n, a in sorted(self.members.items())
            },
            "peer_errors": {n: dict(c) for n, c in sorted(self.peer_errors.items())},
            "requests_served": self.served,
            "bytes_served": self.bytes_served,
            "serve_errors": dict(self.serve_errors),
            "fetched_from_peers": self.fetched,
            "bytes_from_peers": self.bytes_fetched,
            # as a new owner: copies a successor had / did not have; as a
            # successor: probes answered with a copy / with "not cached"
            "handoff": {"received": self.handoff_hits_asked,
                        "not_found": self.handoff_misses_asked,
                        "served": self.handoff_hits, "served_empty": self.handoff_misses},
            "s3_fallbacks": self.s3_fallbacks,
            "skipped_unhealthy": self.skipped_unhealthy,
            "budget_spent": self.budget_spent,
            "health": self.health.statistics(),
            "etcd": self.membership.statistics() if self.membership else None,
            "client": self.client.statistics(),
        }
