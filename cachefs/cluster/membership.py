"""Cluster membership: who is in the ring, from a static list or from etcd.

Static (``--peers``): the ring is exactly the listed nodes and never changes.
A node that is down stays in the ring; readers mark it unhealthy and fall back
to the next node of the preference list until it is back.

etcd (``--etcd``): every node registers ``<prefix><node_id>`` = JSON
``{"address": "host:port"}`` under a lease that it keeps alive, and watches
the prefix.  A join is applied at once; a key that disappears (lease expired
or revoked at shutdown) keeps its node in the ring for ``grace_period`` more
seconds, so a restart or a short partition does not reshuffle ownership.
While etcd itself is unreachable the last known membership is kept.

A watch connection can die without a word (etcd's host loses power, a NAT or load
balancer forgets an idle flow): the watch stream asks etcd for progress notifications,
its sockets send TCP keepalives, and a stream silent for ``watch_idle`` seconds is
created again from the last revision seen (events of the silence included).  A node
whose id another node registered while its own lease had expired keeps serving with the
members it knows and tries again; only at start-up is that fatal.

etcd is spoken through its v3 JSON gateway (``/v3/...``, keys and values in
base64) with httpx, which runs natively under trio.  Only ``lease/grant``,
``lease/keepalive``, ``lease/revoke``, ``kv/put``, ``kv/range``, ``kv/txn`` and the
streaming ``watch`` are used (etcd >= 3.4).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from ..errors import ConfigError, QuietError, tls_failure
from .peer import parse_address

log = logging.getLogger("cachefs.cluster")

__all__ = ["parse_peer", "resolve_self", "advertise_address", "static_members",
           "EtcdMembership", "EtcdError"]

_WILDCARD = {"", "0.0.0.0", "::", "[::]"}


def parse_peer(entry: str, where: str = "--peers") -> tuple[str, str]:
    """``"host:port"`` → (``"host:port"``, ``"host:port"``); ``"id=host:port"`` → (id, addr).
    ``where``: what errors name (the flag, or the config key)."""
    entry = entry.strip()
    node, sep, addr = entry.partition("=")
    if not sep:
        node, addr = entry, entry
    node, addr = node.strip(), addr.strip()
    if not node:
        raise ConfigError(f"{where}: empty node id in {entry!r}")
    try:
        parse_address(addr)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return node, addr


def advertise_address(peer_listen: str, override: str | None = None) -> str:
    """The address other nodes use to reach us.

    ``override`` (``CACHEFS_PEER_ADVERTISE``) wins; a wildcard listen host
    (0.0.0.0, ::) is replaced by this machine's host name.
    """
    if override:
        parse_address(override)
        return override
    host, _, port = peer_listen.rpartition(":")
    if host in _WILDCARD:
        host = socket.gethostname()
    return f"{host}:{port}"


def resolve_self(
    node_id: str | None, peer_listen: str, advertise: str, peers: Iterable[str]
) -> tuple[str, dict[str, str]]:
    """This node's ring id and the static member map (empty if no --peers).

    Every node must derive the same ids from the same list, so when --peers
    is given this node's id is *the id of its entry in that list*.  Its entry
    is the one whose id equals --node-id, or whose address equals our
    advertised or listen address, or whose host is --node-id / our host name
    with our listen port (``--node-id gpu-07 --peers ...,gpu-07:7070``).
    """
    members: dict[str, str] = {}
    for e in peers:
        n, a = parse_peer(e)
        if n in members and members[n] != a:
            raise ConfigError(f"--peers: node id {n!r} is listed twice with different addresses")
        members[n] = a
    by_addr: dict[str, str] = {}
    for n, a in members.items():
        if a in by_addr:
            # one node under two ids: it would ask itself for the chunks of the other id
            raise ConfigError(f"--peers: node ids {by_addr[a]!r} and {n!r} have the same "
                              f"address {a}: list each node once")
        by_addr[a] = n
    if not members:
        return node_id or advertise, {}
    if node_id and node_id in members:
        return node_id, members
    listen_port = int(peer_listen.rpartition(":")[2])

    def matching(names: set) -> list[str]:
        out = []
        for n, a in members.items():
            host, port = parse_address(a)
            if a in (advertise, peer_listen) or (host in names and port == listen_port):
                out.append(n)
        return out

    names = {h for h in (node_id, socket.gethostname()) if h}
    matches = matching(names)
    if not matches:
        # (the fully qualified name asks DNS, which may hang for seconds: only if needed)
        matches = matching(names | {socket.getfqdn()})
    if len(matches) == 1:
        return matches[0], members
    if len(matches) > 1:
        raise ConfigError(f"this node matches several --peers entries ({', '.join(matches)}): "
                         "give --node-id equal to one entry's id (id=host:port)")
    raise ConfigError(f"this node ({node_id or advertise}) is not in --peers "
                     f"({', '.join(sorted(members))}): list every node, this one included, "
                     "and give it the same id (--node-id or its host:port)")


def static_members(self_id: str, self_addr: str, members: dict[str, str]) -> dict[str, str]:
    out = dict(members)
    out.setdefault(self_id, self_addr)
    return out


# ---------------------------------------------------------------------------
# etcd
# ---------------------------------------------------------------------------


class EtcdError(Exception):
    pass


class EtcdAuthError(EtcdError):
    """etcd refused our user, password or permissions: no other endpoint will differ."""


class NodeIdTaken(QuietError):
    """Another node (another address) holds our id in etcd."""


WATCH_IDLE = 60.0  # a watch stream silent this long is created again
KEEPALIVE_RETRY = 0.5  # seconds before a failed keepalive is sent again (times the failures)
# TCP keepalive on etcd connections: a peer gone without a FIN is seen within ~25 s, and
# a NAT or load balancer does not forget the idle watch flow
_KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, opt, val) for name, val in
    (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if (opt := getattr(socket, name, None)) is not None]


def _b64(s: str) -> str:
    return base64.b64encode(s.encode("utf-8")).decode("ascii")


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode("utf-8", "replace")


def prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with prefix"."""
    b = bytearray(prefix.encode("utf-8"))
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b).decode("utf-8", "surrogateescape")
        b.pop()
    return "\0"


OnChange = Callable[[dict[str, str]], Awaitable[None]]


class EtcdMembership:
    """Register this node in etcd under a lease and follow the member prefix.

    ``members`` (id → address) is what the ring is built from: the live keys,
    plus departed nodes still within ``grace_period``, plus this node.
    ``on_change(members)`` is awaited after every change of that map.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        prefix: str,
        node_id: str,
        address: str,
        *,
        lease_ttl: int = 10,
        grace_period: float = 30.0,
        on_change: OnChange | None = None,
        request_timeout: float = 5.0,
        tls: tuple[str | None, str | None, str | None] = (None, None, None),
        auth: tuple[str, str] | None = None,
        watch_idle: float = WATCH_IDLE,
    ) -> None:
        self.endpoints = list(endpoints)  # URLs, normalised by the configuration
        if not self.endpoints:
            raise ValueError("EtcdMembership needs at least one endpoint")
        if not prefix.endswith("/"):
            prefix += "/"
        if "/" in node_id:
            raise ConfigError(f"node id {node_id!r} must not contain '/' (it is an etcd key)")
        self.prefix = prefix
        self.node_id = node_id
        self.address = address
        self.lease_ttl = max(2, int(lease_ttl))
        self.grace_period = grace_period
        self.on_change = on_change
        self.request_timeout = request_timeout
        self.watch_idle = watch_idle
        self.tls = tls  # (CA file, client certificate, its key): paths or None
        self._auth = auth  # (user, password) for etcd's --auth; never logged
        self._token: str | None = None
        self.alive: dict[str, str] = {}
        self.departing: dict[str, tuple[str, float]] = {}  # id -> (address, deadline)
        self.members: dict[str, str] = {node_id: address}
        self.lease_id: str | None = None
        self._renewed = 0.0  # (trio clock) when the lease was last granted or renewed
        self.revision = 0
        self._ep = 0
        self._client: Any = None
        self._wake_sweeper = trio.Event()
        self.counters = {"registrations": 0, "keepalive_failures": 0, "watch_restarts": 0,
                         "watch_renewals": 0, "joins": 0, "leaves": 0, "etcd_errors": 0,
                         "id_taken": 0}
        self._registering = trio.Lock()
        self.last_error: str | None = None  # of the last etcd call, until one succeeds
        # why we are out of etcd: another node registered our id while our lease had expired
        self._id_taken: str | None = None

    # -- HTTP ------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _authenticate(self, url: str) -> None:
        """A token for the user (etcd's simple tokens expire when unused; a call refused
        for its token authenticates again)."""
        assert self._auth is not None
        user, password = self._auth
        r = await self._client.post(url + "/v3/auth/authenticate",
                                    json={"name": user, "password": password},
                                    timeout=self.request_timeout)
        try:
            token = r.json().get("token") if r.status_code == 200 else None
        except ValueError:
            token = None
        if not token:
            self._token = None
            why = _error_text(r)
            raise EtcdAuthError(f"authentication as etcd user {user!r} failed: {why}")
        self._token = str(token)

    async def _call(self, path: str, body: dict, per_try: float | None = None) -> dict:
        """POST to the first endpoint that answers; rotates on failure.  ``per_try``: the
        timeout of each try, instead of the request timeout."""
        import httpx

        last: Exception | None = None
        timeout = self.request_timeout if per_try is None else per_try
        for _ in range(len(self.endpoints)):
            url = self.endpoints[self._ep] + path
            try:
                # (the whole try: httpx bounds each phase of a request, and an
                # authentication comes before it; a keepalive try took 2-3 times
                # its third of the TTL)
                with trio.fail_after(timeout):
                    if self._auth and not self._token:
                        await self._authenticate(self.endpoints[self._ep])
                    r = await self._client.post(url, json=body, timeout=timeout,
                                                headers=self._headers())
                    if self._auth and _token_refused(r):
                        await self._authenticate(self.endpoints[self._ep])
                        r = await self._client.post(url, json=body, timeout=timeout,
                                                    headers=self._headers())
                    if not self._auth and _token_refused(r):
                        raise EtcdAuthError("etcd has authentication enabled: give --etcd-user "
                                            "(and its password in CACHEFS_ETCD_PASSWORD)")
                    if r.status_code in (401, 403):
                        raise EtcdAuthError(f"etcd refused {path}: {_error_text(r)}")
                    if r.status_code != 200:
                        raise EtcdError(f"{url}: HTTP {r.status_code}: {r.text[:200]}")
                    out = r.json()
                    if not isinstance(out, dict):
                        raise EtcdError(f"{url}: unexpected reply {out!r:.200}")
                    if "error" in out and "header" not in out and "result" not in out:
                        raise EtcdError(f"{url}: {out.get('error') or out.get('message')}")
                    self.last_error = None  # etcd answers again: stats show no stale error
                    return out
            except EtcdAuthError:
                self.counters["etcd_errors"] += 1
                raise  # another endpoint of the same cluster says the same
            except (httpx.HTTPError, EtcdError, ValueError, trio.TooSlowError) as e:
                last = e if not isinstance(e, trio.TooSlowError) else EtcdError(
                    f"{url}: no answer in {timeout:g}s")
                self.counters["etcd_errors"] += 1
                self._ep = (self._ep + 1) % len(self.endpoints)
                # etcd 3.4's gateway answers a token it cannot parse by never answering:
                # a timeout may be a refused token, so the next try authenticates again
                self._token = None
        tls = tls_failure(last) if last is not None else None
        why = f"TLS: {tls}" if tls else (str(last) or type(last).__name__)
        if isinstance(last, httpx.ReadError) and not self.tls[1] and self._uses_tls:
            # etcd's --client-cert-auth hangs up on a client without a certificate
            why += (" (the connection was closed: if etcd wants client certificates, "
                    "give etcd_cert and etcd_key)")
        self.last_error = why
        raise EtcdError(f"etcd unreachable ({', '.join(self.endpoints)}): {why}")

    # -- registration ------------------------------------------------------------
    def _key(self, node: str) -> str:
        return self.prefix + node

    async def _register(self) -> None:
        # the lease's TTL runs from its grant: the first keepalive is timed from here, not
        # from the end of the put and snapshot (slow on a loaded host with a lease of 2 s)
        asked = trio.current_time()
        g = await self._call("/v3/lease/grant", {"TTL": self.lease_ttl})
        lease = g.get("ID")
        if not lease:
            raise EtcdError(f"lease grant failed: {g}")
        # Refuse to take over an id that another live node (other address) holds, in one
        # transaction: a look, then a put, let two nodes starting with one id at once both
        # register (25 times in 40), the second over the first, unseen by either.
        key = _b64(self._key(self.node_id))
        put = {"request_put": {"key": key, "value": _b64(json.dumps({"address": self.address})),
                               "lease": lease}}
        absent = {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        compare = absent
        for _ in range(5):
            r = await self._call("/v3/kv/txn", {"compare": [compare], "success": [put],
                                                "failure": [{"request_range": {"key": key}}]})
            if r.get("succeeded"):
                break
            kvs = ((r.get("responses") or [{}])[0].get("response_range") or {}).get("kvs") or []
            if not kvs:  # gone meanwhile: the key is free again
                compare = absent
                continue
            other = _parse_value(kvs[0].get("value", ""))
            if other and other != self.address:
                await self._revoke(lease)
                raise NodeIdTaken(f"node id {self.node_id!r} is already registered in etcd by a "
                                 f"node at {other}; give each node its own --node-id (if "
                                 f"that was this node before a crash, its key expires within "
                                 f"the lease TTL of {self.lease_ttl} s: mount again then)")
            # ours (this node before a restart): taken over unless it changed meanwhile
            compare = {"key": key, "target": "MOD", "result": "EQUAL",
                       "mod_revision": str(kvs[0].get("mod_revision", "0"))}
        else:
            await self._revoke(lease)
            raise EtcdError(f"could not register {self.node_id!r}: its key kept changing")
        self.lease_id = lease
        self._renewed = asked
        self.counters["registrations"] += 1
        log.info("etcd: registered %s at %s (lease %s, ttl %ds)", self.node_id, self.address,
                 lease, self.lease_ttl)

    async def _revoke(self, lease: str | None) -> None:
        if lease:
            try:
                await self._call("/v3/lease/revoke", {"ID": lease})
            except EtcdError as e:
                log.info("etcd: could not revoke lease: %s", e)

    async def _register_again(self) -> None:
        """Register after our lease expired or our key was deleted.  Another node may
        have taken our id meanwhile: that must not end a daemon serving reads, which
        keeps the members it knows and tries again at the next keepalive.  The watch,
        a snapshot and the keepalive may each find the key gone at once: one registers,
        and the others find it done (each granted a lease of its own, and the key kept
        the last one, which another's keepalive might not renew)."""
        seen = self.counters["registrations"]
        async with self._registering:
            if self.counters["registrations"] != seen and self.lease_id is not None:
                return
            await self._register_once()

    async def _register_once(self) -> None:
        try:
            await self._register()
        except NodeIdTaken as e:
            self.counters["id_taken"] += 1
            if self._id_taken is None:
                log.error("etcd: %s; this node keeps serving, out of etcd, and tries again", e)
            self._id_taken = str(e)
            self.lease_id = None
        else:
            if self._id_taken is not None:
                log.warning("etcd: node id %r is ours again", self.node_id)
            self._id_taken = None

    async def _keepalive_loop(self) -> None:
        # Each keepalive waits at most a third of the TTL, and one that failed is sent
        # again soon, on a new connection: one sent on a pooled connection that died
        # without a word waited the request timeout, the next came a third of the TTL
        # later, and the lease had expired (every node saw this one leave and come back).
        # A keepalive is due a third of the TTL after the lease was last renewed (asked
        # for), or granted.
        every = self.lease_ttl / 3
        pause, failures = every, 0
        while True:
            if failures:
                await trio.sleep(pause)
            else:
                await trio.sleep_until(self._renewed + every)
            try:
                if self.lease_id is None:  # our id was taken: try again
                    await self._register_again()
                    if self.lease_id is None:
                        self._renewed = trio.current_time()  # (try again in a third)
                    continue
                asked = trio.current_time()
                r = await self._call("/v3/lease/keepalive", {"ID": self.lease_id},
                                     per_try=min(self.request_timeout, every))
                self._renewed = asked
                failures = 0
                res = r.get("result")
                ttl = _int(res.get("TTL")) if isinstance(res, dict) else 0
                if ttl <= 0:
                    log.warning("etcd: lease %s expired; registering again", self.lease_id)
                    await self._register_again()
            except EtcdError as e:
                self.counters["keepalive_failures"] += 1
                failures += 1
                pause = min(every, KEEPALIVE_RETRY * failures)
                (log.warning if failures == 1 else log.debug)(
                    "etcd keepalive failed (membership kept as is): %s", e)

    # -- members -------------------------------------------------------------------
    async def _snapshot(self) -> None:
        end = prefix_end(self.prefix)
        r = await self._call("/v3/kv/range", {"key": _b64(self.prefix), "range_end": _b64(end)})
        alive = {}
        try:
            for kv in r.get("kvs") or []:
                node = _unb64(kv["key"])[len(self.prefix):]
                addr = _parse_value(kv.get("value", ""))
                if node and addr:
                    alive[node] = addr
            revision = int(r.get("header", {}).get("revision", 0))
        except (AttributeError, TypeError, KeyError, ValueError) as e:
            raise EtcdError(f"range: a malformed reply ({type(e).__name__}: {e})") from None
        self.revision = revision
        now = trio.current_time()
        for node, addr in list(self.alive.items()):
            if node not in alive:
                self._depart(node, addr, now)
        for node, addr in alive.items():
            self._join(node, addr)
        await self._publish()
        if self.node_id not in alive and self.lease_id is not None:
            # our key went while no watch saw it go (etcd unreachable, its history
            # compacted since): its lease lives on, so the keepalive never registers us
            # again, and every other node had left us out of its ring for good
            log.warning("etcd: our key is gone; registering again")
            await self._register_again()

    def _join(self, node: str, addr: str) -> None:
        if self.alive.get(node) != addr:
            if node not in self.alive and node not in self.departing and node != self.node_id:
                self.counters["joins"] += 1
                log.info("cluster: node %s joined at %s", node, addr)
            self.alive[node] = addr
        self.departing.pop(node, None)

    def _depart(self, node: str, addr: str, now: float) -> None:
        self.alive.pop(node, None)
        if node == self.node_id:
            return  # our own key: the keepalive loop registers again
        self.departing[node] = (addr, now + self.grace_period)
        log.info("cluster: node %s left etcd; it stays in the ring for %.0fs (grace period)",
                 node, self.grace_period)
        self._wake_sweeper.set()

    async def _publish(self) -> None:
        members = dict(self.alive)
        for node, (addr, _) in self.departing.items():
            members.setdefault(node, addr)
        members[self.node_id] = self.address
        if members != self.members:
            self.members = members
            if self.on_change is not None:
                await self.on_change(dict(members))

    async def _sweeper(self) -> None:
        while True:
            now = trio.current_time()
            expired = [n for n, (_, t) in self.departing.items() if t <= now]
            for n in expired:
                del self.departing[n]
                self.counters["leaves"] += 1
                log.info("cluster: node %s removed from the ring after the grace period", n)
            if expired:
                await self._publish()
            nxt = min((t for _, t in self.departing.values()), default=None)
            self._wake_sweeper = trio.Event()
            with trio.move_on_at(nxt if nxt is not None else float("inf")):
                await self._wake_sweeper.wait()

    async def _watch_loop(self) -> None:
        import httpx

        backoff = 0.2
        while True:
            url = self.endpoints[self._ep] + "/v3/watch"
            body = {"create_request": {"key": _b64(self.prefix),
                                       "range_end": _b64(prefix_end(self.prefix)),
                                       "start_revision": str(self.revision + 1),
                                       "progress_notify": True}}
            answered = False
            try:
                if self._auth and not self._token:
                    await self._authenticate(self.endpoints[self._ep])
                async with self._client.stream("POST", url, json=body, timeout=httpx.Timeout(
                        self.request_timeout, read=self.watch_idle),
                        headers=self._headers()) as r:
                    if r.status_code != 200:
                        raise EtcdError(f"watch: HTTP {r.status_code}")
                    self.last_error = None
                    async for line in r.aiter_lines():
                        if not line.strip():
                            continue
                        answered = True
                        if not await self._on_watch_message(json.loads(line)):
                            break
                        backoff = 0.2
                raise EtcdError("watch stream ended")
            except httpx.ReadTimeout as e:
                if not answered:  # not even the creation: an endpoint that hangs
                    self._watch_failed(e)
                else:
                    # silent for watch_idle: a dead flow, or only an idle one (etcd's
                    # progress notifications come every 10 minutes). Watched again from
                    # the last revision delivered, which brings the events of the silence.
                    self.counters["watch_renewals"] += 1
                    log.debug("etcd watch silent for %.0fs; watching again", self.watch_idle)
                    continue
            except (httpx.HTTPError, EtcdError, ValueError) as e:
                self._watch_failed(e)
            await trio.sleep(backoff * (1 + random.random()))
            backoff = min(backoff * 2, 5.0)
            try:
                await self._snapshot()
            except EtcdError as e:
                log.warning("etcd unreachable, keeping the last known members: %s", e)

    def _watch_failed(self, e: Exception) -> None:
        self.counters["watch_restarts"] += 1
        self.last_error = f"watch: {e or type(e).__name__}"
        log.info("etcd watch interrupted (%s); resyncing", e or type(e).__name__)
        self._ep = (self._ep + 1) % len(self.endpoints)
        self._token = None  # as in _call: the next endpoint gets a fresh token

    async def _on_watch_message(self, msg: dict) -> bool:
        """Apply one watch message; False means the watch must be re-created."""
        try:
            own_deleted = self._apply_watch(msg)
        except (AttributeError, TypeError, KeyError) as e:
            # a reply of another shape (a proxy in front of etcd, say): what JSON gave us
            # raised outside every handler, and the daemon stopped, unmounting
            raise EtcdError(f"watch: a malformed message ({type(e).__name__}: {e})") from None
        await self._publish()
        if own_deleted:
            log.warning("etcd: our key was deleted; registering again")
            try:
                await self._register_again()
            except EtcdError as e:
                log.warning("etcd: re-registration failed (will retry): %s", e)
        return True

    def _apply_watch(self, msg: dict) -> bool:
        """The joins and leaves of one watch message; whether our own key was deleted."""
        res = msg.get("result")
        if not isinstance(res, dict):
            raise EtcdError(f"watch error: {msg.get('error', msg)!r:.200}")
        if res.get("canceled") or res.get("compact_revision"):
            raise EtcdError(f"watch canceled: {res.get('cancel_reason') or 'compacted'}")
        # how far the events delivered go: a progress notification's header says it (no
        # events, not the creation); the header of the creation, or of a batch of events,
        # names the store's current revision, which events still on their way may precede
        # (watched again from there after a silence, they would be skipped for good)
        events = res.get("events", []) or []
        now_at = int(res.get("header", {}).get("revision", 0) or 0)
        if 0 < now_at < self.revision:
            # a store behind what we saw (etcd recreated empty, or restored from a backup):
            # watched from our revision, it would hold back every event until it got there
            raise EtcdError(f"etcd's revision went back from {self.revision} to {now_at} "
                            "(a new or restored store)")
        rev = 0
        if not events and not res.get("created"):
            rev = now_at
        now = trio.current_time()
        own_deleted = False
        for ev in events:
            kv = ev.get("kv", {})
            node = _unb64(kv.get("key", ""))[len(self.prefix):]
            if not node:
                continue
            if ev.get("type") == "DELETE":
                addr = self.alive.get(node)
                if node == self.node_id:
                    own_deleted = True
                elif addr is not None:
                    self._depart(node, addr, now)
            else:
                addr = _parse_value(kv.get("value", ""))
                if addr:
                    self._join(node, addr)
            rev = max(rev, int(kv.get("mod_revision", 0) or 0))
        self.revision = max(self.revision, rev)
        return own_deleted

    # -- lifecycle -------------------------------------------------------------------
    @property
    def _uses_tls(self) -> bool:
        return any(e.startswith("https://") for e in self.endpoints)

    def _ssl_context(self) -> ssl.SSLContext:
        """Verify etcd against the given CA (or the system's); show the client
        certificate, if any (etcd's --client-cert-auth)."""
        ca, cert, key = self.tls
        try:
            ctx = ssl.create_default_context(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise QuietError(f"etcd TLS: cannot load the CA file {ca} ({e})") from None
        if cert:
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as e:
                raise QuietError(f"etcd TLS: cannot load the client certificate {cert} "
                                 f"with key {key} ({e})") from None
        return ctx

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import httpx

        # TLS only where an endpoint asks for it: no CA store is loaded for plain http
        verify: ssl.SSLContext | bool = False
        if self._uses_tls:
            verify = await trio.to_thread.run_sync(self._ssl_context)
        transport = httpx.AsyncHTTPTransport(verify=verify, socket_options=_KEEPALIVE)
        async with httpx.AsyncClient(verify=verify, transport=transport) as client:
            self._client = client
            try:
                try:
                    await self._register()
                    await self._snapshot()
                except EtcdError as e:
                    raise QuietError(f"cluster membership: {e}") from None
                task_status.started()
                async with trio.open_nursery() as n:
                    n.start_soon(self._keepalive_loop)
                    n.start_soon(self._watch_loop)
                    n.start_soon(self._sweeper)
            finally:
                # Leave at once instead of after the lease TTL; others then
                # keep us in their ring for the grace period.
                with trio.move_on_after(2) as cs:
                    cs.shield = True
                    await self._revoke(self.lease_id)

    def statistics(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "endpoints": self.endpoints,
            "prefix": self.prefix,
            "lease": self.lease_id,
            "lease_ttl": self.lease_ttl,
            "grace_period": self.grace_period,
            "revision": self.revision,
            "departing": {n: round(max(0.0, t - now), 1) for n, (_, t) in self.departing.items()},
            "last_error": self._id_taken or self.last_error,
            "answering": self.last_error is None,  # (an id clash is etcd answering)
            **self.counters,
        }


def _error_text(r) -> str:
    """etcd's error message from a gateway reply (never the request: it holds secrets)."""
    try:
        d = r.json()
        msg = d.get("error") or d.get("message") if isinstance(d, dict) else None
    except ValueError:
        msg = None
    return str(msg or f"HTTP {r.status_code}").removeprefix("etcdserver: ")


def _token_refused(r) -> bool:
    """Is this reply etcd refusing the auth token (expired, or from before a restart)?"""
    if r.status_code == 200:
        return False
    text = _error_text(r)
    return "auth token" in text or "user name is empty" in text


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


def _parse_value(v: str) -> str | None:
    try:
        d = json.loads(_unb64(v))
        addr = d.get("address") if isinstance(d, dict) else None
        if isinstance(addr, str):
            parse_address(addr)
            return addr
    except (ValueError, TypeError):
        pass
    return None
