"""cachefs.http1: the HTTP/1.1 client of ranged GETs, against real sockets.

The server side here is a plain trio TCP server that answers what each test scripts
(a status line, headers and a body, or a hang-up), so the client's framing,
keep-alive and stale-connection handling can be checked byte for byte.  The same client
talking to a real S3 endpoint (moto over http and https, behind the fault proxy) is
covered in test_reliability.py and test_tls.py."""

from __future__ import annotations

import collections
import functools

import pytest
import trio

from cachefs import http1

pytestmark = pytest.mark.trio


class Server:
    """Serves scripted answers, one per request: bytes; None to hang up instead; or
    ("close", bytes) to answer and then hang up.  ``requests``: each request head."""

    def __init__(self) -> None:
        self.answers: collections.deque = collections.deque()
        self.requests: list[bytes] = []
        self.conns = 0
        self.port = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.conns += 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.requests.append(head)
                answer = self.answers.popleft()
                if answer is None:  # hang up without answering
                    return
                if isinstance(answer, tuple):  # ("close", data): answer, then hang up
                    await stream.send_all(answer[1])
                    return
                await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away first
        finally:
            await stream.aclose()


@pytest.fixture
async def server(nursery):
    s = Server()
    listeners = await nursery.start(functools.partial(trio.serve_tcp, s.handle, 0,
                                                      host="127.0.0.1"))
    s.port = listeners[0].socket.getsockname()[1]
    return s


def pool(server: Server, counts: collections.Counter | None = None) -> http1.Pool:
    c = counts if counts is not None else collections.Counter()
    return http1.Pool("http", "127.0.0.1", server.port, f"127.0.0.1:{server.port}", None,
                      connect_timeout=2, count=lambda name: c.update([name]))


def ok(body: bytes, status: str = "206 Partial Content", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nETag: \"e\"\r\n{extra}\r\n"
            .encode() + body)


async def test_kept_alive_and_received_into_callers_memory(server):
    server.answers.extend([ok(b"a" * 5000), ok(b"b" * 5000), ok(b"c" * 3)])
    counts = collections.Counter()
    p = pool(server, counts)
    for ch in b"ab":
        mem = memoryview(bytearray(5000))
        status, hdrs, body, n, *_ = await p.get("/bkt/k", [("Range", "bytes=0-4999")], mem)
        assert (status, n, body.obj is mem.obj) == (206, 5000, True)
        assert bytes(mem) == bytes([ch]) * 5000 and hdrs["etag"] == '"e"'
    # a body of another length than asked is not read: the caller refuses it
    status, _, _, n, *_ = await p.get("/bkt/k", [], memoryview(bytearray(10)))
    assert (status, n) == (206, 3)
    assert server.conns == 1 and counts["s3_connections"] == 1
    assert server.requests[0].split(b"\r\n")[:3] == [
        b"GET /bkt/k HTTP/1.1", b"Range: bytes=0-4999", b"Host: 127.0.0.1:%d" % server.port]
    p.close()


async def test_server_hangs_up_on_a_kept_alive_connection(server):
    """A server closing a kept-alive connection just as a GET goes out: the GET is sent
    again on a new connection, once, and that is not an error; on a new connection the
    same hang-up is an error (the store retries it, counted)."""
    server.answers.extend([ok(b"x"), None, ok(b"y")])
    counts = collections.Counter()
    p = pool(server, counts)
    assert (await p.get("/k", [], None))[2] == b"x"
    assert (await p.get("/k", [], None))[2] == b"y"
    assert counts == {"s3_connections": 2, "s3_stale_resends": 1}
    server.answers.extend([None])
    p.close()
    with pytest.raises(http1.ProtocolError, match="closed the connection before answering"):
        await p.get("/k", [], None)
    assert counts == {"s3_connections": 3, "s3_stale_resends": 1}
    p.close()


async def test_idle_connection_closed_by_server_is_not_used(server):
    server.answers.extend([("close", ok(b"x")), ok(b"y")])
    counts = collections.Counter()
    p = pool(server, counts)
    assert (await p.get("/k", [], None))[2] == b"x"
    await trio.sleep(0.05)  # the server's FIN arrives while the connection is idle
    assert (await p.get("/k", [], None))[2] == b"y"
    assert counts == {"s3_connections": 2}  # dropped when taken, not a resend
    p.close()


async def test_framings_chunked_to_eof_1xx(server):
    chunked = (b"HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n<Erro\r\n3;ext=1\r\nr/>\r\n0\r\nTrailer: t\r\n\r\n")
    to_eof = ("close", b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 7)
    server.answers.extend([chunked, b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"q"), to_eof])
    p = pool(server)
    status, _, body, n, *_ = await p.get("/k", [], memoryview(bytearray(8)))
    assert (status, body, n) == (503, b"<Error/>", 8)
    status, _, body, *_ = await p.get("/k", [], None)  # same connection: kept alive
    assert (status, body) == (206, b"q")
    mem = memoryview(bytearray(7))
    status, _, body, n, *_ = await p.get("/k", [], mem)
    assert (status, body.obj is mem.obj, bytes(mem), n) == (200, True, b"z" * 7, 7)
    assert server.conns == 1
    p.close()


async def test_broken_answers_are_protocol_errors(server):
    server.answers.extend([
        ("close", b"HTTP/1.1 206 X\r\nContent-Length: 10\r\n\r\nabc"),  # short body
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 206 X\r\nContent-Length: 1x\r\n\r\n",
        b"HTTP/1.1 206 X\r\nbad header line\r\n\r\n",
        b"HTTP/1.1 206 X\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
    ])
    p = pool(server)
    server.answers.extend([  # a coding we would not undo
        b"HTTP/1.1 503 X\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ])
    for match in ("closed after 3 of 10 body bytes", "not an HTTP/1.x answer",
                  "bad Content-Length", "bad header line", "over 64 KiB",
                  "unsupported Transfer-Encoding"):
        with pytest.raises(http1.ProtocolError, match=match), trio.fail_after(5):
            await p.get("/k", [], memoryview(bytearray(10)))
    assert server.conns == 6  # none of these connections was kept
    # bytes past a chunked body: the answer stands (a 412 must stay a 412), the
    # connection is not used again
    server.answers.extend([
        b"HTTP/1.1 412 X\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\nHTTP/1.1",
        ok(b"y")])
    status, _, body, *_ = await p.get("/k", [], memoryview(bytearray(10)))
    assert (status, body) == (412, b"x")
    assert (await p.get("/k", [], None))[2] == b"y"
    assert server.conns == 8
    p.close()


async def test_header_injection_refused(server):
    p = pool(server)
    with pytest.raises(ValueError, match="refusing to send header"):
        await p.get("/k", [("If-Match", '"e"\r\nX-Evil: 1')], None)
    assert server.requests == [] and server.conns == 0


async def test_cancelled_exchange_never_reused(server):
    """A GET cancelled half-way through its body (the store's per-attempt timeout) closes
    its connection: the next GET must not read the rest of the old body as its answer."""
    server.answers.extend([b"HTTP/1.1 206 X\r\nContent-Length: 10\r\n\r\nabc", ok(b"fresh")])
    p = pool(server)
    with trio.move_on_after(0.2):
        await p.get("/k", [], memoryview(bytearray(10)))
    assert (await p.get("/k", [], None))[2] == b"fresh"
    assert server.conns == 2
    p.close()
