"""Peer chunk server, client and health tracking (trio, TCP).

The frame format and authentication are described in protocol.py and
docs/cluster.md.  Nothing here is persistent: connections, health state and
counters live in memory only.
"""

from __future__ import annotations

import errno
import hmac
import logging
import math
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..trace import span
from ..waiting import Waiting
from .protocol import (
    MAC_SIZE,
    MAX_FIRST_REQUEST,
    MAX_REQUEST_HEADER,
    MAX_RESPONSE_HEADER,
    MAX_UNAUTHENTICATED_ERROR,
    NONCE_SIZE,
    ZERO_MAC,
    FrameReader,
    PeerError,
    checksum,
    decode_json,
    dump_request_header,
    encode_hello,
    encode_response,
    frame_request,
    pad_first_request,
    read_hello,
    request_mac,
    response_mac,
)

__all__ = ["PeerError", "PeerClient", "PeerHealth", "serve_peers", "Handler", "CallHandler",
           "parse_address"]

log = logging.getLogger(__name__)

Handler = Callable[[dict, dict], Awaitable[tuple[bytes, list[dict]]]]
#: ``call_handler(name, payload) -> result``: small JSON control calls between
#: nodes (cluster-wide preload/free/status); see ClusterNode.forward.
CallHandler = Callable[[str, dict], Awaitable[dict]]

# a new connection's first request (the client sends it as soon as it has the hello): a
# socket that sends nothing holds no connection slot longer, secret or not
FIRST_REQUEST_WAIT = 10.0
CALL_CONNS = 4  # a client's connections to one peer for control calls, besides its pool
CALL_SLOTS = 8  # control calls a server runs at once, besides its serving slots
# Errors that mean "this connection is unusable"; they never escape to callers.
_CONN_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6addr]:port"``) into (host, port)."""
    host, sep, port_s = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"peer address must be host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"bad port in peer address {address!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad port in peer address {address!r}")
    return host, port


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


def _error_header(code: str, message: str) -> dict[str, Any]:
    return {
        "status": "error",
        "code": code,
        "message": message,
        "length": 0,
        "checksum": checksum(b""),
        "spans": [],
    }


async def serve_peers(
    listen_host: str | None,
    listen_port: int,
    secret: bytes,
    handler: Handler,
    *,
    max_concurrent: int = 16,
    max_connections: int = 256,
    handler_timeout: float = 60.0,
    idle_timeout: float = 300.0,
    io_timeout: float = 30.0,
    call_handler: CallHandler | None = None,
    joins_work: Callable[[dict], bool] | None = None,
    slot_calls: frozenset[str] = frozenset(),
    corrupt_for_test: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve chunks to peers until cancelled.

    ``handler(chunk, trace)`` returns ``(data, spans)``; it may raise
    PeerError(msg) to send an error frame carrying ``msg``.  At most
    ``max_concurrent`` handler calls run at once (across all connections),
    each limited to ``handler_timeout`` seconds; a chunk request that
    ``joins_work(chunk)`` says only waits for work under way (a fetch of that
    chunk) takes no slot.  At most ``max_connections`` connections are served:
    when all are taken, the one that has waited longest for its next request
    is closed to make room (a client's pool opens it again when it needs it);
    a new connection is refused only when every one is busy.  A connection
    idle for ``idle_timeout`` is closed, and one that sends no request within
    ``FIRST_REQUEST_WAIT`` of connecting (before it could authenticate at all);
    reading one request frame or sending one response must finish within
    ``io_timeout``.

    ``call_handler(name, payload)``, if given, serves the ``call`` op (small
    JSON control requests; the result dict travels in the response header,
    limited to MAX_RESPONSE_HEADER).  Without it ``call`` is a bad request.  A call
    takes one of ``CALL_SLOTS`` slots of its own, so that a node whose serving slots
    all wait on S3 still answers a status or a drop; those named in ``slot_calls``
    (work that reads S3 itself) take a serving slot instead.

    ``corrupt_for_test`` is for tests only: it flips the first byte of every
    chunk *after* the checksum was computed, as a bad NIC or a buggy peer
    would, so clients must detect it.

    Calls ``task_status.started(port)`` with the bound port (useful with
    ``listen_port=0``), once the socket is listening.
    """
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("serve_peers needs a non-empty shared secret")
    secret = bytes(secret)
    limiter = trio.CapacityLimiter(max_concurrent)
    calls = _CallLimits(limiter, trio.CapacityLimiter(CALL_SLOTS), slot_calls)
    state = {"connections": 0, "warned": -math.inf}
    idle = Waiting()

    async def on_connection(stream: trio.SocketStream) -> None:
        if state["connections"] >= max_connections:
            if not idle.close_longest():  # (it closes, and this one takes its place)
                if trio.current_time() - state["warned"] > 60:
                    state["warned"] = trio.current_time()
                    log.warning("peer server: all %d connections are busy, refusing new ones",
                                max_connections)
                await trio.aclose_forcefully(stream)
                return
        state["connections"] += 1
        try:
            async with stream:
                await _serve_connection(
                    stream,
                    secret,
                    handler,
                    limiter,
                    handler_timeout=handler_timeout,
                    idle_timeout=idle_timeout,
                    io_timeout=io_timeout,
                    call_handler=call_handler,
                    calls=calls,
                    joins_work=joins_work,
                    idle=idle,
                    corrupt_for_test=corrupt_for_test,
                )
        except (*_CONN_ERRORS, PeerError, trio.TooSlowError):
            pass  # peer went away, sent garbage or was too slow: just drop it
        except Exception:
            log.exception("peer server: unexpected error on connection")
        finally:
            state["connections"] -= 1

    listeners = await trio.open_tcp_listeners(listen_port, host=listen_host or None)
    port = listeners[0].socket.getsockname()[1]
    task_status.started(port)
    await trio.serve_listeners(on_connection, listeners)


async def _serve_connection(
    stream: trio.SocketStream,
    secret: bytes,
    handler: Handler,
    limiter: trio.CapacityLimiter,
    *,
    handler_timeout: float,
    idle_timeout: float,
    io_timeout: float,
    call_handler: CallHandler | None = None,
    calls: _CallLimits | None = None,
    joins_work: Callable[[dict], bool] | None = None,
    idle: Waiting | None = None,
    corrupt_for_test: bool = False,
) -> None:
    nonce = secrets.token_bytes(NONCE_SIZE)
    reader = FrameReader(stream)
    with trio.fail_after(io_timeout):
        await stream.send_all(encode_hello(nonce))
    seq = 0
    waiting = Waiting() if idle is None else idle
    while True:
        if seq == 0:
            # Not authenticated yet: the whole first frame within FIRST_REQUEST_WAIT, and
            # the connection may be closed for a newcomer until then (one that sent a few
            # bytes and stalled held its connection for io_timeout, out of reach: a few
            # thousand of them refused every peer).
            with waiting.wait(min(FIRST_REQUEST_WAIT, idle_timeout)) as wait:
                got = None if await reader.at_eof() else await _read_request(reader, stream,
                                                                             nonce, seq)
            if wait.cancelled_caught or got is None:
                return
        else:
            with waiting.wait(idle_timeout) as wait:
                eof = await reader.at_eof()
            if wait.cancelled_caught or eof:
                return
            with trio.fail_after(io_timeout):
                got = await _read_request(reader, stream, nonce, seq)
            if got is None:
                return
        mac, raw = got
        # Authenticate before looking at the content at all.
        if not hmac.compare_digest(mac, request_mac(secret, nonce, seq, raw)):
            with trio.fail_after(io_timeout):
                await stream.send_all(
                    encode_response(None, nonce, seq, _error_header("unauthorized", "unauthorized"))
                )
            return

        data: bytes | bytearray | memoryview = b""
        try:
            header = decode_json(raw, "request header")
            op = header.get("op")
            if op == "ping":
                resp = _ok_header(b"")
            elif op == "get":
                chunk = header.get("chunk")
                trace = header.get("trace") or {}
                if not isinstance(chunk, dict) or not isinstance(trace, dict):
                    raise PeerError("get needs a 'chunk' object and a 'trace' object", "protocol")
                joins = joins_work is not None and joins_work(chunk)
                data, spans = await _call_handler(handler, None if joins else limiter, chunk,
                                                  trace, handler_timeout, _slot_wait(header))
                resp = _ok_header(data, spans, ck=await _checksum(data))
                if corrupt_for_test and data:
                    data = bytes([data[0] ^ 0xFF]) + bytes(data[1:])
            elif op == "call" and call_handler is not None:
                name = header.get("name")
                payload = header.get("payload") or {}
                if not isinstance(name, str) or not isinstance(payload, dict):
                    raise PeerError("call needs a 'name' string and a 'payload' object",
                                    "protocol")
                result = await _call_control(
                    call_handler, calls.limiter(name) if calls else limiter, name, payload,
                    handler_timeout, _slot_wait(header))
                resp = _ok_header(b"", result=result)
            else:
                raise PeerError(f"unknown op {op!r}", "protocol")
            try:
                frame = encode_response(secret, nonce, seq, resp)
            except (TypeError, ValueError):
                log.error("peer server: handler returned spans that are not JSON-serialisable")
                raise PeerError("internal error in chunk handler", "remote") from None
            if len(frame) > 4 + MAC_SIZE + MAX_RESPONSE_HEADER:
                log.error("peer server: response header of %d bytes is too large", len(frame))
                raise PeerError("response header too large", "remote")
        except PeerError as e:
            code = "bad_request" if e.reason == "protocol" else e.reason
            frame = encode_response(secret, nonce, seq, _error_header(code, str(e)))
            data = b""
        with trio.fail_after(io_timeout):
            await stream.send_all(frame)
            if data:
                await stream.send_all(data)
        seq += 1


async def _read_request(reader: FrameReader, stream: trio.SocketStream, nonce: bytes,
                        seq: int) -> tuple[bytes, bytes] | None:
    """A request frame's MAC and header; None when it is too large (answered so)."""
    size = await reader.read_u32()
    limit = MAX_FIRST_REQUEST if seq == 0 else MAX_REQUEST_HEADER
    if size > limit:
        await stream.send_all(encode_response(None, nonce, seq, _error_header(
            "too_large", f"{'first ' if seq == 0 else ''}request header {size} bytes "
                         f"exceeds {limit}")))
        return None
    mac = await reader.read_exactly(MAC_SIZE)
    return mac, await reader.read_exactly(size)


class _CallLimits:
    """The slots a control call takes: its own, or a serving slot for ``slot_calls``."""

    def __init__(self, serving: trio.CapacityLimiter, own: trio.CapacityLimiter,
                 slot_calls: frozenset[str]) -> None:
        self.serving, self.own, self.slot_calls = serving, own, slot_calls

    def limiter(self, name: str) -> trio.CapacityLimiter:
        return self.serving if name in self.slot_calls else self.own


def _ok_header(data: bytes | bytearray | memoryview, spans: list | None = None,
                ck: str | None = None, **extra: object) -> dict:
    """The header of a successful response carrying ``data`` (``ck``: its checksum)."""
    return {"status": "ok", "code": "ok", "message": "", "length": len(data),
            "checksum": checksum(data) if ck is None else ck, "spans": spans or [], **extra}


_HASH_LIMITER = trio.CapacityLimiter(2)


async def _checksum(data: bytes | bytearray | memoryview) -> str:
    """xxh3_128 of a chunk; from 1 MiB on in a worker thread (about 0.5 ms an 8 MiB chunk,
    every other request waiting meanwhile)."""
    if len(data) < 1 << 20:
        return checksum(data)
    return await trio.to_thread.run_sync(checksum, data, limiter=_HASH_LIMITER)


def _slot_wait(header: dict) -> float | None:
    """The ``wait`` of a request: how long it may queue for a serving slot (None: no limit,
    as from a client that does not send it)."""
    wait = header.get("wait")
    if wait is None:
        return None
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 < wait < 1e6:
        raise PeerError("'wait' must be a number of seconds", "protocol")
    return float(wait)


async def _guarded(fn, limiter: trio.CapacityLimiter | None, what: str,
                   handler_timeout: float, wait: float | None = None):
    """Run a local handler for a peer: bounded, timed, and only PeerError gets out.

    ``wait``: the longest the request queues for one of the ``limiter``'s slots; then it is
    answered ``busy`` (its client reads the chunk elsewhere rather than queue behind a
    saturated node, and nothing runs here for a client that has given up).  Without a
    limiter (a request that only joins work under way) it takes no slot."""
    wait = handler_timeout if wait is None else wait
    slot = limiter is None
    if not slot:
        with trio.move_on_after(wait):
            await limiter.acquire()
            slot = True
    if not slot:
        raise PeerError(f"busy: all {limiter.total_tokens:g} serving slots stayed in use "
                        f"for {wait:g}s", "busy")
    try:
        with trio.fail_after(handler_timeout):
            return await fn()
    except PeerError as e:
        raise PeerError(str(e), "remote") from None
    except trio.TooSlowError:
        raise PeerError(f"{what} timed out after {handler_timeout}s", "remote") from None
    except Exception:
        log.exception("peer server: %s failed", what)
        raise PeerError(f"internal error in {what}", "remote") from None
    finally:
        if limiter is not None:
            limiter.release()


async def _call_handler(
    handler: Handler,
    limiter: trio.CapacityLimiter | None,
    chunk: dict,
    trace: dict,
    handler_timeout: float,
    wait: float | None = None,
) -> tuple[bytes | bytearray | memoryview, list]:
    result = await _guarded(lambda: handler(chunk, trace), limiter, "chunk handler",
                            handler_timeout, wait)
    try:
        data, spans = result
    except (TypeError, ValueError):
        log.error("peer server: handler returned %r, not (data, spans)", type(result))
        raise PeerError("internal error in chunk handler", "remote") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        log.error("peer server: handler returned data of type %s", type(data).__name__)
        raise PeerError("internal error in chunk handler", "remote")
    return data, list(spans or [])


async def _call_control(
    call_handler: CallHandler,
    limiter: trio.CapacityLimiter,
    name: str,
    payload: dict,
    handler_timeout: float,
    wait: float | None = None,
) -> dict:
    result = await _guarded(lambda: call_handler(name, payload), limiter, f"call {name!r}",
                            handler_timeout, wait)
    if not isinstance(result, dict):
        log.error("peer server: call %r returned %r, not a dict", name, type(result))
        raise PeerError(f"internal error in call {name!r}", "remote")
    return result


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------


_PING = dump_request_header({"op": "ping"})


class _Conn:
    __slots__ = ("stream", "reader", "nonce", "seq", "first", "first_ping")

    def __init__(self, stream: trio.SocketStream, reader: FrameReader, nonce: bytes,
                 first: bytes, first_ping: bool) -> None:
        self.stream = stream
        self.reader = reader
        self.nonce = nonce
        self.seq = 0
        # the padded header of the first request, whose length went out before the hello
        self.first: bytes | None = first
        # that first request is a ping: the request is too large to be read before the
        # connection is authenticated (MAX_FIRST_REQUEST)
        self.first_ping = first_ping


@dataclass
class _Pool:
    slots: trio.Semaphore
    # control calls (status, probes, drops) have slots of their own: they never queue
    # behind chunk requests waiting on the peer's S3
    call_slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(CALL_CONNS))
    # calls that read S3 there (a preload's ds_fetch, held up to 10 s): apart again, or two
    # preloads took every call connection and a status queued behind them
    s3_call_slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(CALL_CONNS))
    idle: list[_Conn] = field(default_factory=list)
    open: int = 0
    connects: int = 0
    requests: int = 0
    bytes_in: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)
    # a connect that failed: until then, requests that need a new connection fail at
    # once with its error instead of each waiting out connect_timeout on a frozen host
    failed_until: float = 0.0
    failed: PeerError | None = None


async def _close_idle(pool: _Pool) -> None:
    idle, pool.idle = pool.idle, []
    for conn in idle:
        pool.open -= 1
        await trio.aclose_forcefully(conn.stream)


class PeerClient:
    """Fetches chunks from peers over pooled, authenticated connections.

    Every failure raises PeerError (with ``.reason``); a connection that saw
    an error is closed, never reused, unless the server answered the error with a
    valid MAC (``busy``, a failed handler: ``PeerError.answered``).
    ``request_timeout`` bounds a whole
    call once it has one of the pool's connections (connecting, request, response);
    ``connect_timeout`` additionally bounds connecting + the server hello.
    ``queue_timeout`` (None: the request timeout) bounds the wait for one of this
    client's ``max_conns_per_peer`` connections to a peer: past it the request fails
    with reason ``queued`` (the queue is this node's: it says nothing of the peer's
    health).  Control calls (``call``) have ``CALL_CONNS`` more connections of their own,
    and those that read S3 there ``CALL_CONNS`` more again; they queue for them within
    their request timeout.
    ``ack_timeout`` (default 5 connect timeouts) bounds how long a request sent
    may go unacknowledged by the peer's host (TCP_USER_TIMEOUT): a host that
    lost power or its network behind a pooled connection is known for what it
    is then, not after the request timeout (which includes the owner's own S3
    read); the pool's other connections to it are closed, and new ones are not
    tried for a connect timeout.  A live peer's kernel acknowledges at once,
    however busy the daemon.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        connect_timeout: float = 2.0,
        request_timeout: float = 10.0,
        ack_timeout: float | None = None,
        queue_timeout: float | None = None,
        max_conns_per_peer: int = 4,
        max_body: int = 256 * 1024 * 1024,
    ) -> None:
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("PeerClient needs a non-empty shared secret")
        if max_conns_per_peer < 1:
            raise ValueError("max_conns_per_peer must be >= 1")
        self._secret = bytes(secret)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.ack_timeout = 5 * connect_timeout if ack_timeout is None else ack_timeout
        self.queue_timeout = queue_timeout
        self.max_conns_per_peer = max_conns_per_peer
        self.max_body = max_body
        self._pools: dict[str, _Pool] = {}
        self._closed = False

    # -- public API ------------------------------------------------------
    async def get(self, address: str, chunk: dict, trace: dict,
                  wait: float | None = None, queue: float | None = None
                  ) -> tuple[bytes, list[dict]]:
        """Fetch one chunk from the peer at ``address`` ("host:port").

        Returns ``(data, spans)``; ``data`` matched the length and xxh3_128
        checksum in the authenticated response header.  ``wait``: the longest the
        request may queue there for a serving slot before the peer answers ``busy``;
        ``queue``: the longest it may wait here for a connection (default
        ``queue_timeout``; 0: only if one is free now).
        """
        header = {"op": "get", "chunk": chunk, "trace": trace}
        if wait is not None:
            header["wait"] = wait
        raw = dump_request_header(header)
        data, spans, _ = await self._request(address, raw, queue=queue)
        return data, spans

    async def call(self, address: str, name: str, payload: dict, *, s3: bool = False,
                   wait: float | None = None, request_limit: float | None = None) -> dict:
        """A control call (``call`` op) on the peer at ``address``; its result dict.
        ``s3``: the call reads S3 there (its connections are not the quick calls').
        ``wait``: the longest it may queue there for a slot before the peer answers
        ``busy`` (as for ``get``). ``request_limit``: instead of the request timeout.

        The request header, payload included, must stay under 64 KiB
        (ValueError otherwise): callers split large file lists.
        """
        header = {"op": "call", "name": name, "payload": payload}
        if wait is not None:
            header["wait"] = wait
        raw = dump_request_header(header)
        _, result, _ = await self._request(address, raw, want="result",
                                           call="s3" if s3 else "quick",
                                           request_limit=request_limit)
        return result

    async def ping(self, address: str) -> float:
        """Round-trip time in seconds of a ping on an established connection."""
        _, _, rtt = await self._request(address, dump_request_header({"op": "ping"}))
        return rtt

    def statistics(self) -> dict[str, Any]:
        return {
            "closed": self._closed,
            "peers": {
                addr: {
                    "open": p.open,
                    "idle": len(p.idle),
                    "connects": p.connects,
                    "requests": p.requests,
                    "retries": p.retries,
                    "bytes_in": p.bytes_in,
                    "errors": dict(p.errors),
                }
                for addr, p in self._pools.items()
            },
        }

    async def aclose(self) -> None:
        """Close idle connections; in-flight ones are closed when they finish."""
        self._closed = True
        for pool in self._pools.values():
            await _close_idle(pool)

    async def retain(self, addresses: set[str]) -> None:
        """Drop the pools of peers not in ``addresses`` (nodes that left the ring): their
        idle connections are closed now, busy ones when their request ends."""
        for addr in [a for a in self._pools if a not in addresses]:
            await _close_idle(self._pools.pop(addr))

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals -------------------------------------------------------
    def _pool(self, address: str) -> _Pool:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = _Pool(trio.Semaphore(self.max_conns_per_peer))
        return pool

    async def _request(
        self, address: str, header: bytes, want: str = "spans", *,
        queue: float | None = None, call: str = "", request_limit: float | None = None
    ) -> tuple[bytes, Any, float]:
        if self._closed:
            raise PeerError("peer client is closed", "closed")
        parse_address(address)  # ValueError early for a malformed address
        pool = self._pool(address)
        slots = {"": pool.slots, "quick": pool.call_slots, "s3": pool.s3_call_slots}[call]
        try:
            # (a control call queues within its request timeout: there is no S3 to go to)
            limit = None if call else self.queue_timeout if queue is None else queue
            await self._take(slots, address, limit)
            try:
                # from the moment a connection is ours: time spent queued here is not the
                # peer's, and must not make it look dead
                limit = self.request_timeout if request_limit is None else request_limit
                with trio.fail_after(limit):
                    return await self._request_on_pool(address, pool, header, want)
            except trio.TooSlowError:
                raise PeerError(
                    f"request to {address} timed out after {limit}s", "timeout"
                ) from None
            finally:
                slots.release()
        except PeerError as e:
            pool.errors[e.reason] += 1
            raise

    async def _take(self, slots: trio.Semaphore, address: str, limit: float | None) -> None:
        """One of this client's connections to ``address``, within ``limit`` seconds
        (None: the request timeout); else PeerError ``busy``."""
        limit = self.request_timeout if limit is None else limit
        try:
            slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        if limit > 0:
            # this node's own queue, not the peer's: the trace says so (the wait was shown
            # as the peer's round trip)
            with span("peer.slot_wait"), trio.move_on_after(limit):
                await slots.acquire()
                return
        raise PeerError(f"no connection to {address} came free here within {max(limit, 0):g}s "
                        "(all in use)", "queued")

    async def _request_on_pool(
        self, address: str, pool: _Pool, header: bytes, want: str
    ) -> tuple[bytes, Any, float]:
        while True:
            reused = bool(pool.idle)
            if not reused and pool.failed is not None \
                    and trio.current_time() < pool.failed_until:
                raise PeerError(f"{pool.failed} (moments ago; not tried again)",
                                pool.failed.reason)
            conn = pool.idle.pop() if reused else await self._connect(address, pool, header)
            if reused and conn.stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                # the kernel gave it up while it was idle (its keepalive probes went
                # unanswered during a blip that is over): not the host's state now
                pool.open -= 1
                await trio.aclose_forcefully(conn.stream)
                pool.retries += 1
                continue
            ok = False
            try:
                t0 = trio.current_time()
                data, spans = await self._exchange(address, conn, header, want)
                rtt = trio.current_time() - t0
                ok = True
            except PeerError as e:
                # A pooled connection the server has since closed (idle
                # timeout, restart): send again on the next idle connection, or
                # a new one.  Safe: every request is idempotent (docs/cluster.md).
                if reused and e.reason == "closed":
                    pool.retries += 1
                    continue
                if e.reason == "unacknowledged":  # the host is gone: so are its connections
                    pool.failed, pool.failed_until = e, trio.current_time() + self.connect_timeout
                    await _close_idle(pool)
                ok = e.answered
                raise
            finally:
                if ok and not self._closed and self._pools.get(address) is pool:
                    pool.idle.append(conn)
                else:
                    pool.open -= 1
                    await trio.aclose_forcefully(conn.stream)
            pool.requests += 1
            pool.bytes_in += len(data)
            return data, spans, rtt

    async def _connect(self, address: str, pool: _Pool, header: bytes) -> _Conn:
        try:
            conn = await self._open(address, pool, header)
        except PeerError as e:
            if e.reason == "timeout":  # a refused connect costs nothing to try again
                pool.failed, pool.failed_until = e, trio.current_time() + self.connect_timeout
            raise
        pool.failed = None
        return conn

    async def _open(self, address: str, pool: _Pool, header: bytes) -> _Conn:
        """A new connection, the hello read, for a first request of ``header``.

        The length of that request goes out at once, before the hello: a cachefs
        server reads it as the start of the request; something else that waits for
        its client (HTTP, etcd) gets a line ending in it and answers or closes, so
        it is known for what it is in a round trip, not after connect_timeout."""
        host, port = parse_address(address)
        first = pad_first_request(header)
        first_ping = first is None
        if first is None:
            first = pad_first_request(_PING)
            assert first is not None
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(host, port)
                try:
                    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                      max(1, int(self.ack_timeout * 1000)))
                    # a request sent and acknowledged, waiting for its answer, leaves
                    # nothing unacknowledged: probes on the silent connection do, when
                    # the peer's host is gone (a live one's kernel answers them)
                    probe = max(1, int(self.ack_timeout / 5))
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probe)
                    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe)
                    await stream.send_all(len(first).to_bytes(4, "big"))
                    reader = FrameReader(stream)
                    nonce = await read_hello(reader)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError:
            raise PeerError(
                f"connect to {address} timed out after {self.connect_timeout}s", "timeout"
            ) from None
        except _CONN_ERRORS as e:
            raise PeerError(f"connect to {address} failed: {e}", "connect") from None
        except PeerError as e:
            raise PeerError(f"connect to {address}: {e}", e.reason) from None
        pool.open += 1
        pool.connects += 1
        return _Conn(stream, reader, nonce, first, first_ping)

    async def _exchange(
        self, address: str, conn: _Conn, header: bytes, want: str = "spans"
    ) -> tuple[bytes, Any]:
        if conn.first is None:
            return await self._send(address, conn, header, want)
        first, conn.first = conn.first, None  # its length went out with the connect
        if not conn.first_ping:
            return await self._send(address, conn, first, want, sent_length=True)
        await self._send(address, conn, first, "spans", sent_length=True)
        return await self._send(address, conn, header, want)

    async def _send(self, address: str, conn: _Conn, header: bytes, want: str,
                    sent_length: bool = False) -> tuple[bytes, Any]:
        """One request on the connection, its answer read."""
        frame = frame_request(self._secret, conn.nonce, conn.seq, header)
        if sent_length:
            frame = frame[4:]
        reader = conn.reader
        try:
            await conn.stream.send_all(frame)
            size = await reader.read_u32(frame_start=True)
            if size > MAX_RESPONSE_HEADER:
                raise PeerError(f"response header from {address} too large ({size})", "protocol")
            mac = await reader.read_exactly(MAC_SIZE)
            if mac == ZERO_MAC and size > MAX_UNAUTHENTICATED_ERROR:
                # only a short error frame comes without a MAC: nothing more is parsed
                raise PeerError(f"unauthenticated response header from {address} too large "
                                f"({size})", "protocol")
            raw = await reader.read_exactly(size)
            # Authenticate before parsing: a frame that is neither authentic nor an
            # unauthenticated error frame (all-zero MAC) is not looked into.
            authentic = hmac.compare_digest(
                mac, response_mac(self._secret, conn.nonce, conn.seq, raw))
            if not authentic and mac != ZERO_MAC:
                raise PeerError(f"bad response MAC from {address}", "bad_response_mac")
            resp = decode_json(raw, "response header")
            if resp.get("status") != "ok":
                code = str(resp.get("code") or "remote")
                if code in ("unauthorized", "too_large", "busy"):
                    reason = code
                elif code == "bad_request":
                    reason = "protocol"
                else:
                    reason = "remote"
                # not authenticated: whoever answers at the address chose this text
                msg = str(resp.get("message") or code)[:200]
                err = PeerError(f"peer {address}: {msg}", reason)
                if reason in ("busy", "remote", "protocol") and authentic:
                    conn.seq += 1  # answered in step: the server reads the next request
                    err.answered = True
                raise err
            if not authentic:
                raise PeerError(f"bad response MAC from {address}", "bad_response_mac")
            length = resp.get("length")
            expected = resp.get("checksum")
            # "spans" (a list) for get/ping; "result" (a dict) for a control call
            spans = resp.get("result") if want == "result" else resp.get("spans", [])
            if (
                not isinstance(length, int)
                or isinstance(length, bool)
                or not 0 <= length <= self.max_body
                or not isinstance(expected, str)
                or not isinstance(spans, dict if want == "result" else list)
            ):
                raise PeerError(f"malformed response header from {address}", "protocol")
            data = await reader.read_body(length)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            if _timed_out(e):
                raise PeerError(f"{address} acknowledged nothing for {self.ack_timeout:g}s "
                                "(its host is down or unreachable)", "unacknowledged") from None
            # Broken before or during the response: treat like an EOF.
            raise PeerError(f"connection to {address} broken: {e}", "closed") from None
        except PeerError as e:
            if e.reason in ("closed", "short_read"):
                raise PeerError(f"peer {address}: {e}", e.reason) from None
            raise
        if await _checksum(data) != expected:
            raise PeerError(f"checksum mismatch on data from {address}", "checksum")
        conn.seq += 1
        return data, spans


def _timed_out(e: BaseException) -> bool:
    """The kernel gave up on the connection: sent data went unacknowledged
    (TCP_USER_TIMEOUT).  trio raises it as BrokenResourceError from the OSError."""
    return any(isinstance(x, OSError) and x.errno == errno.ETIMEDOUT
               for x in (e, e.__cause__, e.__context__))


# ---------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------


class PeerHealth:
    """Which peers to avoid for now, and error counters per peer and reason.

    ``mark_bad`` makes a node unhealthy for ``bad_for`` seconds of
    ``trio.current_time()`` (so trio's MockClock drives it in tests); marking
    it again extends the period.  Must be used from inside trio.
    """

    def __init__(self, bad_for: float = 10.0) -> None:
        self.bad_for = bad_for
        self._until: dict[str, float] = {}
        self._errors: dict[str, Counter] = {}
        self._last: dict[str, tuple[float, str]] = {}  # node → its last failure, and why

    def mark_bad(self, node: str, reason: str) -> None:
        self._until[node] = trio.current_time() + self.bad_for
        self._errors.setdefault(node, Counter())[reason] += 1
        self._last[node] = (trio.current_time(), reason)

    def last_failure(self, node: str) -> dict | None:
        """When ``node`` last failed and why: a dead member is "healthy" again (tried
        again) ``bad_for`` seconds after each failure, and only this tells it apart."""
        got = self._last.get(node)
        if got is None:
            return None
        return {"seconds_ago": round(trio.current_time() - got[0], 1), "reason": got[1]}

    def mark_good(self, node: str) -> None:
        """Forget an unhealthy mark early (e.g. after a successful request)."""
        self._until.pop(node, None)

    def is_healthy(self, node: str) -> bool:
        until = self._until.get(node)
        if until is None:
            return True
        if trio.current_time() >= until:
            del self._until[node]
            return True
        return False

    def healthy(self, nodes: Iterable[str]) -> list[str]:
        """``nodes`` filtered to the healthy ones, order preserved."""
        return [n for n in nodes if self.is_healthy(n)]

    def errors(self, node: str) -> dict[str, int]:
        return dict(self._errors.get(node, {}))

    def retain(self, nodes: set[str]) -> None:
        """Forget the nodes not in ``nodes`` (they left the cluster)."""
        for d in (self._until, self._errors, self._last):
            for n in [n for n in d if n not in nodes]:
                del d[n]

    def statistics(self) -> dict[str, Any]:
        now = trio.current_time()
        nodes = set(self._until) | set(self._errors)
        return {
            n: {
                "healthy": self.is_healthy(n),
                "unhealthy_for": max(0.0, self._until.get(n, now) - now),
                "errors": dict(self._errors.get(n, {})),
            }
            for n in sorted(nodes)
        }
