"""A lean HTTP/1.1 client for the ranged GETs of cold reads.

httpx and httpcore cost the trio thread about 1.2 ms of CPU per GET here: five layers of
request and response objects, h11's event machine, and a connection pool that polls
every idle connection's socket twice per request.  On cold small files the trio thread
is what limits the daemon, so the ranged GETs that ``objectstore._DirectGet`` already
builds and signs itself go out through this module: one GET per call, on a kept-alive
connection, the body received straight into the memory the caller gives (``recv_into``
on plain sockets; one copy out of TLS on https).

What it does not do is kept on httpx's way, decided once per store: proxies and
anything but ``http``/``https`` endpoints.  TLS uses the very SSLContext the botocore
client built (its verify setting, CA bundle and client certificate).

Connections:
  * idle ones are kept LIFO, at most ``max_idle``, each for ``keepalive`` seconds;
  * one taken from the pool is first polled: a readable idle socket means the server
    hung up (or sent junk), and it is dropped;
  * a server may still close a kept-alive connection just as a request goes out: when a
    reused connection ends before the first byte of the answer, the GET is sent once
    more on a new connection (GET is idempotent), and that is not an error;
  * a connection is put back only after a complete exchange: any error, a cancellation
    (the caller's timeout) or a body not read to its end closes it.

Errors are ``ProtocolError`` (an OSError, so the store retries them like a reset
connection); TLS and socket errors pass through as the OSErrors they are.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable

import trio

from .trace import span

MAX_HEAD = 64 * 1024  # a response head longer than this is refused
MAX_ERROR_BODY = 1 << 20  # a non-2xx body is read whole only up to this
RECV = 256 * 1024


class ProtocolError(OSError):
    """The server (or the connection) broke HTTP/1.1: transient."""


class _Stale(Exception):
    """A reused connection ended before the first byte of the answer."""


def _placed(body: bytes | bytearray, target: memoryview | None) -> bytes | memoryview:
    """A body read whole: in ``target`` (a 2xx's memory) when it is exactly that long,
    else as bytes (one of another length is refused by the caller)."""
    if target is not None and len(body) == len(target):
        target[:] = body
        return target
    return bytes(body)


class _Conn:
    """One connection: a trio socket, and the TLS stream over it on https."""

    __slots__ = ("sock", "tls", "idle_since", "used")

    def __init__(self, sock, tls: trio.SSLStream | None) -> None:
        self.sock = sock  # trio.socket.SocketType
        self.tls = tls
        self.idle_since = 0.0
        self.used = False  # has carried an exchange before (so it may have gone stale)

    async def send(self, data: bytes) -> None:
        try:
            if self.tls is not None:
                await self.tls.send_all(data)
                return
            view = memoryview(data)
            while view:
                view = view[await self.sock.send(view):]
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ProtocolError(f"connection lost while sending: {e}") from e

    async def recv(self, n: int = RECV) -> bytes:
        try:
            if self.tls is not None:
                return await self.tls.receive_some(n)
            return await self.sock.recv(n)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ProtocolError(f"connection lost: {e}") from e

    async def recv_into(self, view: memoryview) -> int:
        if self.tls is None:
            return await self.sock.recv_into(view)
        data = await self.recv(len(view))
        view[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.sock.close()  # no TLS close_notify: nothing more is read from it


class Pool:
    """Kept-alive connections to one origin (scheme, host, port)."""

    def __init__(self, scheme: str, host: str, port: int, host_header: str,
                 ssl_context: ssl.SSLContext | None, connect_timeout: float,
                 keepalive: float = 12.0, max_idle: int = 32,
                 count: Callable[[str], None] = lambda name: None) -> None:
        if scheme not in ("http", "https") or (scheme == "https") != (ssl_context is not None):
            raise ValueError(f"cannot serve {scheme}:// here")
        self.host, self.port, self.host_header = host, port, host_header
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.max_idle = max_idle
        self._idle: list[_Conn] = []
        self._count = count  # count("s3_connections") per connection opened,
        # count("s3_stale_resends") per GET sent again after a kept-alive connection went

    # -- connections -----------------------------------------------------------------

    async def _connect(self) -> _Conn:
        with trio.fail_after(self.connect_timeout):
            stream = await trio.open_tcp_stream(self.host, self.port)
            tls = None
            if self.ssl_context is not None:
                tls = trio.SSLStream(stream, self.ssl_context, server_hostname=self.host,
                                     https_compatible=True)
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as e:
                    stream.socket.close()
                    cause = e.__cause__
                    if isinstance(cause, OSError):
                        raise cause from None  # ssl.SSLCertVerificationError and kin
                    raise ProtocolError(f"TLS handshake with {self.host} failed") from e
                except BaseException:
                    stream.socket.close()
                    raise
        self._count("s3_connections")
        return _Conn(stream.socket, tls)

    def _take(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            c = self._idle.pop()
            if now - c.idle_since > self.keepalive or c.sock.is_readable():
                c.close()  # expired, or the server hung up (or sent what nobody asked for)
                continue
            return c
        return None

    def _give_back(self, c: _Conn) -> None:
        if len(self._idle) >= self.max_idle:
            c.close()
            return
        c.used = True
        c.idle_since = time.monotonic()
        self._idle.append(c)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    # -- one GET ---------------------------------------------------------------------

    async def get(self, target: str, headers: Iterable[tuple[str, str]],
                  into: memoryview | None
                  ) -> tuple[int, dict[str, str], bytes | memoryview, int, float, float]:
        """GET ``target``: (status, headers with lower-case names, body, body length,
        perf_counter when the request went out on its connection, and when the head
        arrived: their difference is the time to first byte, a new connection's setup
        not included).  With ``into`` (memory the size of the
        expected body), a 2xx body is received into it and returned as it; one of another
        length is not read, and its announced length is returned (the caller refuses it).
        A non-2xx body is returned as bytes."""
        lines = [f"GET {target} HTTP/1.1"]
        host = True
        for k, v in headers:
            v = str(v)
            if not v.isprintable() or not k.isprintable() or ":" in k:
                raise ValueError(f"refusing to send header {k!r}")
            lines.append(f"{k}: {v}")
            host = host and k.lower() != "host"
        if host:
            lines.append(f"Host: {self.host_header}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        c = self._take()
        if c is not None:
            try:
                return await self._exchange(c, request, into)
            except _Stale:
                self._count("s3_stale_resends")
        # a new connection (TCP, TLS) is its own span: it was the GET's ttfb, blamed on S3
        with span("s3.connect", tls=self.ssl_context is not None):
            c = await self._connect()
        return await self._exchange(c, request, into)

    async def _exchange(self, c: _Conn, request: bytes, into: memoryview | None
                        ) -> tuple[int, dict[str, str], bytes | memoryview, int, float, float]:
        keep = False
        try:
            t_sent = time.perf_counter()
            try:
                await c.send(request)
            except OSError:
                if c.used:
                    raise _Stale() from None
                raise
            status, hdrs, buf, version = await self._read_head(c)
            t_head = time.perf_counter()
            keep = version == "HTTP/1.1" and "close" not in hdrs.get("connection", "").lower()
            target = into if 200 <= status < 300 else None  # where a 2xx body goes
            te = hdrs.get("transfer-encoding", "").lower()
            if te and te != "identity":
                if te != "chunked":  # ("gzip, chunked": a body we would not decode)
                    raise ProtocolError(f"unsupported Transfer-Encoding {te!r}")
                # (a 2xx body as long as the range asked: up to 256 MiB, the largest chunk)
                body, extra = await self._read_chunked(
                    c, buf, len(target) if target is not None else MAX_ERROR_BODY * 64)
                if extra:  # bytes past the body: the next answer would start inside them
                    keep = False
                n = len(body)
                body = _placed(body, target)
            elif "content-length" in hdrs:
                cl = hdrs["content-length"]
                if not cl.isdigit():
                    raise ProtocolError(f"bad Content-Length {cl!r}")
                n = int(cl)
                if target is not None:
                    if n != len(target):
                        keep = False  # not read: the caller refuses a body of this length
                    else:
                        await self._read_exact(c, buf, target)
                    body = target
                elif n > MAX_ERROR_BODY:
                    keep = False
                    body = bytes(buf[:MAX_ERROR_BODY])
                else:
                    mem = bytearray(n)
                    await self._read_exact(c, buf, memoryview(mem))
                    body = bytes(mem)
            else:  # the body runs to the end of the connection
                keep = False
                got = bytearray(buf)
                limit = len(target) + 1 if target is not None else MAX_ERROR_BODY
                while len(got) < limit and (data := await c.recv()):
                    got += data
                n = len(got)
                del got[limit:]
                body = _placed(got, target)
            return status, hdrs, body, n, t_sent, t_head
        except BaseException:
            keep = False  # an error, a timeout: what is left on the connection is unknown
            raise
        finally:
            if keep:
                self._give_back(c)
            else:
                c.close()

    async def _read_head(self, c: _Conn) -> tuple[int, dict[str, str], bytes, str]:
        buf, seen = b"", False  # seen: a byte of the answer arrived
        while True:  # 1xx answers are skipped
            while (i := buf.find(b"\r\n\r\n")) < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("response head over 64 KiB")
                try:
                    data = await c.recv()
                except OSError:
                    if c.used and not seen:
                        raise _Stale() from None
                    raise
                if not data:
                    if c.used and not seen:
                        raise _Stale()
                    raise ProtocolError("server closed the connection before answering"
                                        if not buf else "connection closed inside the head")
                buf += data
                seen = True
            if i > MAX_HEAD:
                raise ProtocolError("response head over 64 KiB")
            head, buf = buf[:i].decode("latin-1"), buf[i + 4:]
            status_line, *fields = head.split("\r\n")
            version, _, rest = status_line.partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise ProtocolError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
            status = int(code)
            if 100 <= status < 200:
                continue
            hdrs: dict[str, str] = {}
            for f in fields:
                k, sep, v = f.partition(":")
                if not sep or not k or k != k.strip():
                    raise ProtocolError(f"bad header line {f[:80]!r}")
                k, v = k.lower(), v.strip()
                hdrs[k] = f"{hdrs[k]}, {v}" if k in hdrs else v
            return status, hdrs, buf, version

    @staticmethod
    async def _read_exact(c: _Conn, buf: bytes, into: memoryview) -> None:
        """Fill ``into``: first with what came after the head, then off the socket."""
        k = min(len(buf), len(into))
        into[:k] = buf[:k]
        if len(buf) > len(into):
            raise ProtocolError("more bytes than Content-Length before the next request")
        n, total = k, len(into)
        while n < total:
            got = await c.recv_into(into[n:])
            if not got:
                raise ProtocolError(f"connection closed after {n} of {total} body bytes")
            n += got

    @staticmethod
    async def _read_chunked(c: _Conn, buf: bytes, limit: int) -> tuple[bytes, bool]:
        """A chunked body, whole (only error documents and odd gateways send them), and
        whether bytes came after it."""
        out = bytearray()
        pending = bytearray(buf)

        async def line() -> bytes:
            while (i := pending.find(b"\r\n")) < 0:
                if len(pending) > MAX_HEAD:
                    raise ProtocolError("chunk-size line too long")
                if not (data := await c.recv()):
                    raise ProtocolError("connection closed inside a chunked body")
                pending.extend(data)
            s = bytes(pending[:i])
            del pending[:i + 2]
            return s

        while True:
            size_s = (await line()).split(b";")[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_s[:20]!r}") from None
            if size == 0:
                while await line():  # trailers up to the empty line
                    pass
                return bytes(out), bool(pending)
            if len(out) + size > limit:
                raise ProtocolError(f"chunked body longer than {limit} bytes")
            while len(pending) < size + 2:
                if not (data := await c.recv()):
                    raise ProtocolError("connection closed inside a chunked body")
                pending.extend(data)
            out += pending[:size]
            if pending[size:size + 2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            del pending[:size + 2]
