import http.server
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from functools import partial

import pytest
import trio
import trio.testing

from cachefs.cluster.peer import PeerClient, PeerError, PeerHealth, parse_address, serve_peers
from cachefs.cluster.protocol import (
    MAC_SIZE,
    MAX_FIRST_REQUEST,
    MAX_REQUEST_HEADER,
    FrameReader,
    checksum,
    decode_hello,
    encode_hello,
    encode_request,
    encode_response,
    pad_first_request,
    request_mac,
)

pytestmark = pytest.mark.trio

SECRET = b"test-cluster-secret"
CHUNK = {"mount": "data", "key": "a/b.bin", "etag": '"abc"', "index": 3, "offset": 0, "length": 7}
TRACE = {"trace_id": "t-1", "parent": "s-9"}


async def start_server(nursery, handler, secret=SECRET, **kw):
    port = await nursery.start(partial(serve_peers, "127.0.0.1", 0, secret, handler, **kw))
    return f"127.0.0.1:{port}"


def counting_handler(data=b"hello!!", spans=None):
    calls = []

    async def handler(chunk, trace):
        calls.append((chunk, trace))
        return data, spans or []

    return handler, calls


@pytest.fixture
async def raw_connect():
    """Open raw protocol connections (closed at teardown): -> (stream, reader, nonce)."""
    streams = []

    async def connect(address):
        host, port = parse_address(address)
        stream = await trio.open_tcp_stream(host, port)
        streams.append(stream)
        reader = FrameReader(stream)
        size = await reader.read_u32()
        nonce = decode_hello(await reader.read_exactly(size))
        return stream, reader, nonce

    yield connect
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def read_response(reader):
    size = await reader.read_u32()
    mac = await reader.read_exactly(MAC_SIZE)
    return mac, json.loads(await reader.read_exactly(size))


async def assert_closed_by_server(stream):
    with trio.fail_after(5):
        try:
            assert await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            pass  # a reset is also a close


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------
# Happy path
# --------------------------------------------------------------------------


async def test_roundtrip_8mib_with_spans(nursery):
    data = os.urandom(8 * 1024 * 1024)
    spans = [{"name": "peer.serve", "dur": 0.001, "attrs": {"hit": True}}]
    handler, calls = counting_handler(data, spans)
    address = await start_server(nursery, handler)
    async with PeerClient(SECRET, request_timeout=30) as client:
        t0 = time.perf_counter()
        got, got_spans = await client.get(address, CHUNK, TRACE)
        first = time.perf_counter() - t0
        assert got == data
        assert isinstance(got, bytes)
        assert got_spans == spans
        assert calls == [(CHUNK, TRACE)]

        # Persistent connection: later requests reuse it.
        t0 = time.perf_counter()
        n = 5
        for _ in range(n):
            got, _ = await client.get(address, CHUNK, TRACE)
            assert got == data
        elapsed = time.perf_counter() - t0
        stats = client.statistics()["peers"][address]
        assert stats["connects"] == 1
        assert stats["requests"] == 1 + n
        assert stats["bytes_in"] == (1 + n) * len(data)
        assert stats["idle"] == 1
        mbps = n * len(data) / elapsed / 1e6
        print(f"\n8 MiB loopback: first {first * 1000:.1f} ms, warm {mbps:.0f} MB/s")


async def test_empty_chunk_and_ping(nursery):
    handler, _ = counting_handler(b"")
    address = await start_server(nursery, handler)
    async with PeerClient(SECRET) as client:
        assert await client.get(address, CHUNK, {}) == (b"", [])
        rtt = await client.ping(address)
        assert 0 <= rtt < 1
        assert client.statistics()["peers"][address]["connects"] == 1


async def test_handler_may_return_bytearray_or_memoryview(nursery):
    async def handler(chunk, trace):
        return memoryview(bytearray(b"xyz" * 1000)), [{"name": "s"}]

    address = await start_server(nursery, handler)
    async with PeerClient(SECRET) as client:
        assert await client.get(address, CHUNK, TRACE) == (b"xyz" * 1000, [{"name": "s"}])


# --------------------------------------------------------------------------
# Authentication and request limits
# --------------------------------------------------------------------------


async def test_wrong_secret_refused_handler_not_called(nursery):
    handler, calls = counting_handler()
    address = await start_server(nursery, handler)
    async with PeerClient(b"not-the-secret") as client:
        with pytest.raises(PeerError) as ei:
            await client.get(address, CHUNK, TRACE)
        assert ei.value.reason == "unauthorized"
        with pytest.raises(PeerError) as ei:
            await client.ping(address)
        assert ei.value.reason == "unauthorized"
        assert client.statistics()["peers"][address]["idle"] == 0
    assert calls == []


async def test_missing_secret_refused_and_connection_closed(nursery, raw_connect):
    handler, calls = counting_handler()
    address = await start_server(nursery, handler)
    stream, reader, nonce = await raw_connect(address)
    raw = json.dumps({"op": "get", "chunk": CHUNK, "trace": TRACE}).encode()
    await stream.send_all(struct.pack(">I", len(raw)) + bytes(MAC_SIZE) + raw)
    _, header = await read_response(reader)
    assert header["status"] == "error"
    assert header["code"] == "unauthorized"
    assert header["message"] == "unauthorized"
    await assert_closed_by_server(stream)
    assert calls == []
    # No secret at all cannot even be configured.
    with pytest.raises(ValueError):
        PeerClient(b"")
    with pytest.raises(ValueError):
        await serve_peers("127.0.0.1", 0, b"", handler)


async def test_replayed_request_refused(nursery, raw_connect):
    handler, calls = counting_handler()
    address = await start_server(nursery, handler)
    # A valid request on connection A...
    stream_a, reader_a, nonce_a = await raw_connect(address)
    frame = encode_request(SECRET, nonce_a, 0, {"op": "get", "chunk": CHUNK, "trace": TRACE})
    await stream_a.send_all(frame)
    _, header = await read_response(reader_a)
    assert header["status"] == "ok"
    await reader_a.read_exactly(header["length"])
    assert len(calls) == 1
    # ... replayed on the same connection (sequence number moved on) ...
    await stream_a.send_all(frame)
    _, header = await read_response(reader_a)
    assert header["code"] == "unauthorized"
    await assert_closed_by_server(stream_a)
    # ... or on another connection (different nonce) is refused.
    stream_b, reader_b, nonce_b = await raw_connect(address)
    assert nonce_b != nonce_a
    await stream_b.send_all(frame)
    _, header = await read_response(reader_b)
    assert header["code"] == "unauthorized"
    await assert_closed_by_server(stream_b)
    assert len(calls) == 1


async def test_oversized_header_refused(nursery, raw_connect):
    handler, calls = counting_handler()
    address = await start_server(nursery, handler)
    stream, reader, _ = await raw_connect(address)
    await stream.send_all(struct.pack(">I", MAX_REQUEST_HEADER + 1) + b"x" * 100)
    _, header = await read_response(reader)
    assert header["status"] == "error"
    assert header["code"] == "too_large"
    await assert_closed_by_server(stream)
    assert calls == []
    # a first request is read before anything is authenticated: it may be 8 KiB at most
    # (a client without the secret made the server hold 64 KiB and more per connection)
    stream, reader, _ = await raw_connect(address)
    await stream.send_all(struct.pack(">I", MAX_FIRST_REQUEST + 1) + bytes(MAC_SIZE)
                          + b" " * MAX_FIRST_REQUEST)
    _, header = await read_response(reader)
    assert header["code"] == "too_large", header
    assert header["message"] == f"first request header {MAX_FIRST_REQUEST + 1} bytes " \
                                f"exceeds {MAX_FIRST_REQUEST}"
    await assert_closed_by_server(stream)
    # The client refuses to build such a request in the first place.
    async with PeerClient(SECRET) as client:
        with pytest.raises(ValueError):
            await client.get(address, {"key": "k" * (MAX_REQUEST_HEADER + 1)}, {})
        assert client.statistics()["peers"] == {}


async def test_authenticated_garbage_is_a_bad_request(nursery, raw_connect):
    handler, calls = counting_handler()
    address = await start_server(nursery, handler)
    stream, reader, nonce = await raw_connect(address)
    raw = b"this is not json"
    await stream.send_all(struct.pack(">I", len(raw)) + request_mac(SECRET, nonce, 0, raw) + raw)
    _, header = await read_response(reader)
    assert header["status"] == "error"
    assert header["code"] == "bad_request"
    assert calls == []


# --------------------------------------------------------------------------
# Failures surface as PeerError; failed connections are discarded
# --------------------------------------------------------------------------


async def test_handler_peer_error_becomes_client_peer_error(nursery):
    async def handler(chunk, trace):
        raise PeerError("chunk not cached here")

    address = await start_server(nursery, handler)
    async with PeerClient(SECRET) as client:
        for _ in range(2):
            with pytest.raises(PeerError, match="chunk not cached here") as ei:
                await client.get(address, CHUNK, TRACE)
            assert ei.value.reason == "remote"
        stats = client.statistics()["peers"][address]
        # The error frame came with a valid MAC: the connection stays in use (a
        # reconnect per request before, to an owner whose answers were errors)
        assert stats["connects"] == 1
        assert stats["idle"] == 1
        assert stats["open"] == 1
        assert stats["errors"] == {"remote": 2}


async def test_handler_crash_is_internal_error_and_server_survives(nursery):
    fail = [True]

    async def handler(chunk, trace):
        if fail[0]:
            raise RuntimeError("boom")
        return b"fine", []

    address = await start_server(nursery, handler)
    async with PeerClient(SECRET) as client:
        with pytest.raises(PeerError, match="internal error") as ei:
            await client.get(address, CHUNK, TRACE)
        assert ei.value.reason == "remote"
        fail[0] = False
        assert await client.get(address, CHUNK, TRACE) == (b"fine", [])


async def test_connect_refused():
    async with PeerClient(SECRET, connect_timeout=2) as client:
        with pytest.raises(PeerError) as ei:
            await client.get(f"127.0.0.1:{free_port()}", CHUNK, TRACE)
        assert ei.value.reason == "connect"


async def test_hanging_handler_times_out(nursery):
    async def handler(chunk, trace):
        await trio.sleep_forever()

    address = await start_server(nursery, handler)
    async with PeerClient(SECRET, request_timeout=0.3) as client:
        t0 = time.perf_counter()
        with pytest.raises(PeerError) as ei:
            await client.get(address, CHUNK, TRACE)
        elapsed = time.perf_counter() - t0
        assert ei.value.reason == "timeout"
        assert 0.25 < elapsed < 1.5
        assert client.statistics()["peers"][address]["open"] == 0


async def test_silent_server_connect_times_out(nursery):
    # Accepts TCP connections but never says hello.
    async def silent(stream):
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with PeerClient(SECRET, connect_timeout=0.2, request_timeout=5) as client:
        t0 = time.perf_counter()
        with pytest.raises(PeerError) as ei:
            await client.get(f"127.0.0.1:{port}", CHUNK, TRACE)
        assert ei.value.reason == "timeout"
        assert time.perf_counter() - t0 < 1.5


async def test_requests_queued_behind_a_failed_connect_fail_without_connecting(nursery):
    """A frozen host (it accepts TCP, never says hello): the requests that waited for a
    pool slot meanwhile fail at once with the connect's error, instead of each waiting
    out connect_timeout in turn (64 queued chunk reads took up to 32 s to fall back)."""
    accepted = []

    async def silent(stream):
        accepted.append(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    reasons = []
    async with PeerClient(SECRET, connect_timeout=0.3, request_timeout=30,
                          max_conns_per_peer=2) as client:

        async def one():
            try:
                await client.get(address, CHUNK, TRACE)
            except PeerError as e:
                reasons.append(e.reason)

        async with trio.open_nursery() as n:
            for _ in range(10):
                n.start_soon(one)
    assert reasons == ["timeout"] * 10
    assert len(accepted) == 2  # the two that held the pool's slots; 10 before


@pytest.fixture
def blackhole():
    """``blackhole(port)``: every packet to that local TCP port is dropped where it arrives
    (nftables), as for a host that lost power or its network: its sender hears nothing, not
    even a reset.  Lifted at teardown."""
    table = f"cachefs_test_{os.getpid()}"
    armed = []

    def arm(port: int):
        """Drop the packets to ``port``; returns what lifts that (at teardown otherwise)."""
        # a table a killed test run left (its process is gone) would drop packets to
        # that port for good: whatever listens there later (moto, etcd, a peer) is silent
        r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        for name in re.findall(r"table inet (cachefs_test_(\d+))", r.stdout):
            if not os.path.exists(f"/proc/{name[1]}"):
                subprocess.run(["nft", "delete", "table", "inet", name[0]], check=False)
        rules = (f"table inet {table} {{\n chain input {{\n"
                 f"  type filter hook input priority 0;\n"
                 f"  iifname lo tcp dport {port} drop\n }}\n}}\n")
        subprocess.run(["nft", "-f", "-"], input=rules.encode(), check=True)
        armed.append(port)
        return lift

    def lift() -> None:
        if armed:
            subprocess.run(["nft", "delete", "table", "inet", table], check=True)
            armed.clear()

    yield arm
    lift()


async def test_a_peer_host_gone_behind_pooled_connections_is_known_in_the_ack_timeout(
        nursery, blackhole):
    """A member's host goes away (power, network) while the client pools connections to it:
    a request sent on one waited out the whole request timeout (32 s in a daemon, which
    includes the owner's own S3 read), and then the next pooled connection did the same.
    Now the kernel gives up on data unacknowledged for ``ack_timeout``; the pool's other
    connections are closed, and the next request fails at once."""
    handler, calls = counting_handler()
    address = await start_server(nursery, handler)
    async with PeerClient(SECRET, connect_timeout=0.5, request_timeout=8,
                          ack_timeout=1) as client:
        async with trio.open_nursery() as n:  # two connections in the pool
            for _ in range(2):
                n.start_soon(client.get, address, CHUNK, TRACE)
        assert client.statistics()["peers"][address]["open"] == 2 and len(calls) == 2
        blackhole(parse_address(address)[1])
        reasons = []
        for _ in range(2):
            with pytest.raises(PeerError) as ei:
                await client.get(address, CHUNK, TRACE)
            reasons.append(ei.value.reason)
        assert reasons == ["unacknowledged"] * 2, reasons
        assert "acknowledged nothing for 1s" in str(ei.value) and "moments ago" in str(ei.value)
        assert client.statistics()["peers"][address]["open"] == 0
    assert len(calls) == 2


async def test_a_request_under_way_when_its_peers_host_goes_away_fails_in_the_ack_timeout(
        nursery, blackhole):
    """The request was sent and acknowledged, and the owner was reading S3 for it, when
    its host went away: nothing sent was left unacknowledged, so TCP_USER_TIMEOUT never
    fired and the request waited out its whole timeout (32 s in a daemon; 8 s here).
    Keepalive probes on the silent connection now go unacknowledged instead."""
    started = trio.Event()

    async def handler(chunk, trace):
        started.set()
        await trio.sleep_forever()  # the owner's S3 read, as long as it takes

    address = await start_server(nursery, handler)
    async with PeerClient(SECRET, connect_timeout=0.5, request_timeout=8,
                          ack_timeout=1) as client:
        reasons = []

        async def get():
            with pytest.raises(PeerError) as ei:
                await client.get(address, CHUNK, TRACE)
            reasons.append(ei.value.reason)

        async with trio.open_nursery() as n:
            n.start_soon(get)
            await started.wait()
            blackhole(parse_address(address)[1])
        assert reasons == ["unacknowledged"]  # ("timeout" at 8 s before)


async def test_a_pooled_connection_given_up_in_a_blip_is_not_a_host_gone(nursery, blackhole):
    """Idle pooled connections send keepalive probes: a network blip longer than the ack
    timeout makes the kernel give them up.  Once it is over, the first request on one
    failed as "unacknowledged", and the peer was taken for down (no connection tried
    for a while, readers sent elsewhere).  Such a connection is now let go of when taken."""
    handler, calls = counting_handler()
    address = await start_server(nursery, handler)
    async with PeerClient(SECRET, connect_timeout=0.5, request_timeout=8,
                          ack_timeout=1) as client:
        await client.get(address, CHUNK, TRACE)  # a pooled connection
        lift = blackhole(parse_address(address)[1])
        await trio.sleep(4)  # idle: its probes go unanswered, the kernel gives it up
        lift()
        data, _ = await client.get(address, CHUNK, TRACE)  # (PeerError "unacknowledged")
        assert data == b"hello!!" and len(calls) == 2


class _CountingHTTPHandler(http.server.BaseHTTPRequestHandler):
    def send_error(self, code, message=None, explain=None):
        self.server.answered.append(code)
        super().send_error(code, message, explain)

    def log_message(self, *args):
        pass


async def test_an_http_server_at_a_peer_address_is_known_in_a_round_trip():
    """A member address where an HTTP server listens (a typo in --peers, the S3 or etcd
    port): it waits for its client to speak, so every attempt waited out connect_timeout
    for a hello (2 s in a daemon).  The length of the first request now goes out before
    the hello, ending in a newline: the server answers that line at once, and the client
    calls it what it is, not a cachefs peer (a reason that counts as down)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHTTPHandler)
    srv.answered = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{srv.server_address[1]}"
    try:
        async with PeerClient(SECRET, connect_timeout=10) as client:
            for _ in range(3):
                with pytest.raises(PeerError, match="not a cachefs peer") as ei:
                    await client.call(address, "identity", {})
                assert ei.value.reason == "not_peer"
                assert f"connect to {address}: not a cachefs peer (it sent b'<!DOCTYPE HTML>" \
                    in str(ei.value)
            stats = client.statistics()["peers"][address]
        assert stats["errors"] == {"not_peer": 3} and stats["connects"] == 0
        assert srv.answered == [400, 400, 400]  # every attempt answered: none waited for a hello
    finally:
        await trio.to_thread.run_sync(srv.shutdown)
        srv.server_close()


async def test_a_banner_at_a_peer_address_is_not_a_peer(nursery):
    """Something that speaks first with another protocol (an SSH or SMTP banner) was a
    `protocol` error, which cluster-wide commands take for a node that answered: a preload
    failed the chunks it owns instead of sending them to its successor."""
    async def banner(stream):
        await stream.send_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
        await trio.sleep_forever()

    async def two_bytes(stream):  # reads a line, answers "?" and hangs up
        await stream.receive_some(4)
        await stream.send_all(b"?\n")
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, banner, 0, host="127.0.0.1"))
    address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    listeners = await nursery.start(partial(trio.serve_tcp, two_bytes, 0, host="127.0.0.1"))
    short = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    async with PeerClient(SECRET, connect_timeout=10) as client:
        with pytest.raises(PeerError) as ei:
            await client.get(address, CHUNK, TRACE)
        assert ei.value.reason == "not_peer"
        assert str(ei.value) == (f"connect to {address}: not a cachefs peer "
                                 "(it sent b'SSH-2.0-OpenSSH_9.2p1 Debian-2\\r\\n')")
        with pytest.raises(PeerError) as ei:
            await client.get(short, CHUNK, TRACE)
        assert ei.value.reason == "not_peer" and str(ei.value).endswith(
            "not a cachefs peer (connection closed after 2 of 4 bytes; it sent b'?\\n')")


async def test_the_first_requests_length_goes_out_before_the_hello(nursery):
    """A cachefs server reads the same bytes as before: the first request's u32 length,
    sent as soon as TCP connects (its last byte a newline: the header is padded with JSON
    whitespace), then, once the hello came, its MAC and header.  Checked against a server
    that sends its hello only after it has those 4 bytes, and against the real one with a
    header too large to pad (sent the old way)."""
    seen = {}

    async def serve(stream):
        reader = FrameReader(stream)
        head = await reader.read_exactly(4)  # before any hello
        nonce = os.urandom(16)
        await stream.send_all(encode_hello(nonce))
        (size,) = struct.unpack(">I", head)
        mac = await reader.read_exactly(MAC_SIZE)
        raw = await reader.read_exactly(size)
        assert mac == request_mac(SECRET, nonce, 0, raw)
        seen.update(head=head, header=json.loads(raw), raw=raw)
        await stream.send_all(encode_response(SECRET, nonce, 0, {
            "status": "ok", "code": "ok", "message": "", "length": 0,
            "checksum": checksum(b""), "spans": [], "result": {"ok": 1}}))
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    async with PeerClient(SECRET, connect_timeout=10) as client:
        assert await client.call(address, "x", {"k": "v"}) == {"ok": 1}
    assert seen["head"][3:] == b"\n" and seen["header"] == {
        "op": "call", "name": "x", "payload": {"k": "v"}}
    assert seen["raw"] == b'{"op":"call","name":"x","payload":{"k":"v"}}'.ljust(266)

    # too large to be read before the connection is authenticated: a ping goes first
    big = {"pad": "x" * (MAX_REQUEST_HEADER - 200)}
    raw = json.dumps({"op": "call", "name": "echo", "payload": big},
                     separators=(",", ":")).encode()
    assert len(raw) <= MAX_REQUEST_HEADER and pad_first_request(raw) is None

    async def echo(name, payload):
        return {"n": len(payload["pad"])}

    handler, _ = counting_handler()
    real = await start_server(nursery, handler, call_handler=echo)
    async with PeerClient(SECRET) as client:
        assert await client.call(real, "echo", big) == {"n": len(big["pad"])}
        assert await client.call(real, "echo", {"pad": ""}) == {"n": 0}
        assert client.statistics()["peers"][real]["connects"] == 1


async def test_server_side_handler_timeout(nursery):
    async def handler(chunk, trace):
        await trio.sleep_forever()

    address = await start_server(nursery, handler, handler_timeout=0.1)
    async with PeerClient(SECRET, request_timeout=5) as client:
        with pytest.raises(PeerError, match="timed out") as ei:
            await client.get(address, CHUNK, TRACE)
        assert ei.value.reason == "remote"


async def fake_server(nursery, respond):
    """A raw peer server speaking the protocol; ``respond(stream, nonce, seq)``
    writes whatever reply the test wants."""

    async def serve(stream):
        nonce = os.urandom(16)
        reader = FrameReader(stream)
        await stream.send_all(encode_hello(nonce))
        size = await reader.read_u32()
        await reader.read_exactly(MAC_SIZE + size)
        await respond(stream, nonce, 0)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def ok_header(data, **over):
    h = {
        "status": "ok",
        "code": "ok",
        "message": "",
        "length": len(data),
        "checksum": checksum(data),
        "spans": [],
    }
    h.update(over)
    return h


async def test_corrupted_data_fails_checksum(nursery):
    data = os.urandom(256 * 1024)

    async def respond(stream, nonce, seq):
        flipped = bytearray(data)
        flipped[12345] ^= 0x01
        await stream.send_all(encode_response(SECRET, nonce, seq, ok_header(data)))
        await stream.send_all(bytes(flipped))

    address = await fake_server(nursery, respond)
    async with PeerClient(SECRET, request_timeout=5) as client:
        with pytest.raises(PeerError) as ei:
            await client.get(address, CHUNK, TRACE)
        assert ei.value.reason == "checksum"
        assert client.statistics()["peers"][address]["idle"] == 0


async def test_short_read(nursery):
    data = os.urandom(1000)

    async def respond(stream, nonce, seq):
        await stream.send_all(encode_response(SECRET, nonce, seq, ok_header(data)))
        await stream.send_all(data[:10])
        await stream.aclose()

    address = await fake_server(nursery, respond)
    async with PeerClient(SECRET, request_timeout=5) as client:
        with pytest.raises(PeerError) as ei:
            await client.get(address, CHUNK, TRACE)
        assert ei.value.reason == "short_read"


async def test_response_without_valid_mac_rejected(nursery):
    data = b"attacker data"

    async def respond(stream, nonce, seq):
        # An impostor that does not know the secret.
        await stream.send_all(encode_response(b"guess", nonce, seq, ok_header(data)))
        await stream.send_all(data)

    address = await fake_server(nursery, respond)
    async with PeerClient(SECRET, request_timeout=5) as client:
        with pytest.raises(PeerError) as ei:
            await client.get(address, CHUNK, TRACE)
        assert ei.value.reason == "bad_response_mac"


async def test_oversized_body_rejected(nursery):
    async def respond(stream, nonce, seq):
        header = ok_header(b"", length=10**12)
        await stream.send_all(encode_response(SECRET, nonce, seq, header))

    address = await fake_server(nursery, respond)
    async with PeerClient(SECRET, request_timeout=5, max_body=1 << 20) as client:
        with pytest.raises(PeerError) as ei:
            await client.get(address, CHUNK, TRACE)
        assert ei.value.reason == "protocol"


async def test_nested_json_before_the_mac_is_a_protocol_error(nursery):
    """Whoever listens at a member's address speaks first (the hello) and may answer with
    an error frame before any MAC is checked: JSON nested deeper than the parser's
    recursion limit is a malformed frame (it was a RecursionError, which no caller
    expected: every read of a chunk that node owns failed with EIO)."""
    deep = b"[" * 2000 + b"]" * 2000  # under the hello size limit (4 KiB)

    async def hello(stream):
        await stream.send_all(struct.pack(">I", len(deep)) + deep)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, hello, 0, host="127.0.0.1"))
    bad_hello = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"

    async def respond(stream, nonce, seq):
        header = b'{"status": "error", "message": ' + deep + b"}"
        await stream.send_all(struct.pack(">I", len(header)) + b"\0" * MAC_SIZE + header)

    bad_response = await fake_server(nursery, respond)
    async with PeerClient(SECRET, request_timeout=5) as client:
        # a hello that is not a cachefs hello: no cachefs peer there
        for address, reason in ((bad_hello, "not_peer"), (bad_response, "protocol")):
            with pytest.raises(PeerError, match="nested too deep") as ei:
                await client.get(address, CHUNK, TRACE)
            assert ei.value.reason == reason


async def test_an_unauthenticated_error_message_is_cut_short(nursery):
    async def respond(stream, nonce, seq):
        header = {"status": "error", "code": "internal", "message": "x" * 3000}
        await stream.send_all(encode_response(None, nonce, seq, header))

    address = await fake_server(nursery, respond)
    async with PeerClient(SECRET, request_timeout=5) as client:
        with pytest.raises(PeerError) as ei:
            await client.get(address, CHUNK, TRACE)
        assert ei.value.reason == "remote" and len(str(ei.value)) < 300
        # an error frame without a valid MAC may come from anyone: its connection is closed
        assert not ei.value.answered
        assert client.statistics()["peers"][address]["open"] == 0


async def test_a_response_header_is_not_parsed_before_its_mac_is_checked(nursery):
    """Whoever answers at a member's address could make the client parse up to 1 MiB of
    JSON per request before its MAC was checked. Now only an all-zero-MAC error frame
    of at most 4 KiB is parsed unauthenticated; any other frame fails on its MAC (or
    its size) first. The headers below are not JSON: a parse would say so."""
    not_json = b"{" * 200_000
    frames = {
        "wrong_mac": struct.pack(">I", len(not_json)) + b"\1" * MAC_SIZE + not_json,
        "zero_mac": struct.pack(">I", len(not_json)) + b"\0" * MAC_SIZE + not_json,
    }

    async def respond_with(frame):
        async def respond(stream, nonce, seq):
            await stream.send_all(frame)
        return await fake_server(nursery, respond)

    async with PeerClient(SECRET, request_timeout=5) as client:
        for name, reason, text in (("wrong_mac", "bad_response_mac", "bad response MAC"),
                                   ("zero_mac", "protocol", "too large")):
            address = await respond_with(frames[name])
            with pytest.raises(PeerError) as ei:
                await client.get(address, CHUNK, TRACE)
            assert (ei.value.reason, text in str(ei.value)) == (reason, True), str(ei.value)


async def test_stale_pooled_connection_is_retried(nursery):
    handler, calls = counting_handler(b"data")
    address = await start_server(nursery, handler, idle_timeout=0.1)
    async with PeerClient(SECRET) as client:
        assert (await client.get(address, CHUNK, TRACE))[0] == b"data"
        await trio.sleep(0.4)  # the server drops the idle connection
        assert (await client.get(address, CHUNK, TRACE))[0] == b"data"
        stats = client.statistics()["peers"][address]
        assert stats["retries"] == 1
        assert stats["connects"] == 2
        assert stats["errors"] == {}
    assert len(calls) == 2


async def test_closed_client_refuses(nursery):
    handler, _ = counting_handler()
    address = await start_server(nursery, handler)
    client = PeerClient(SECRET)
    await client.get(address, CHUNK, TRACE)
    assert client.statistics()["peers"][address]["open"] == 1
    await client.aclose()
    assert client.statistics()["peers"][address]["open"] == 0
    with pytest.raises(PeerError) as ei:
        await client.get(address, CHUNK, TRACE)
    assert ei.value.reason == "closed"


# --------------------------------------------------------------------------
# Concurrency bounds
# --------------------------------------------------------------------------


def concurrency_probe():
    state = {"active": 0, "max": 0, "calls": 0}

    async def handler(chunk, trace):
        state["active"] += 1
        state["calls"] += 1
        state["max"] = max(state["max"], state["active"])
        try:
            await trio.sleep(0.05)
        finally:
            state["active"] -= 1
        return chunk["key"].encode(), []

    return handler, state


async def test_server_concurrency_limit(nursery):
    handler, state = concurrency_probe()
    address = await start_server(nursery, handler, max_concurrent=3)
    results = {}
    async with PeerClient(SECRET, max_conns_per_peer=12) as client:

        async def one(i):
            data, _ = await client.get(address, {"key": f"k{i}"}, {})
            results[i] = data

        async with trio.open_nursery() as n:
            for i in range(12):
                n.start_soon(one, i)
        assert client.statistics()["peers"][address]["connects"] == 12
    assert results == {i: f"k{i}".encode() for i in range(12)}
    assert state["calls"] == 12
    assert state["max"] == 3


async def test_a_slot_taking_call_queues_at_most_its_wait_then_hears_busy(nursery):
    """A ds_fetch call takes a serving slot. It queued for one up to the handler timeout
    (60 s), past its caller's timeout (5 s with a 3 s S3 timeout): the caller took the
    busy owner for unreachable. With a ``wait`` it hears busy after that long."""
    running, release = trio.Event(), trio.Event()

    async def handler(chunk, trace):
        running.set()
        await release.wait()
        return b"x", []

    async def call_handler(name, payload):
        return {"done": name}

    address = await start_server(nursery, handler, max_concurrent=1,
                                 call_handler=call_handler,
                                 slot_calls=frozenset({"ds_fetch"}))
    async with PeerClient(SECRET, request_timeout=30) as client:
        nursery.start_soon(client.get, address, {"key": "slow"}, {})
        await running.wait()  # the only serving slot is taken
        t0 = trio.current_time()
        with pytest.raises(PeerError, match="busy: all 1 serving slots stayed in use") as ei:
            await client.call(address, "ds_fetch", {}, s3=True, wait=0.3)
        assert ei.value.reason == "busy" and trio.current_time() - t0 < 5
        # a call that takes no serving slot is answered at once
        assert await client.call(address, "status", {}) == {"done": "status"}
        release.set()
        assert await client.call(address, "ds_fetch", {}, s3=True, wait=5) == \
            {"done": "ds_fetch"}


async def test_a_get_queues_for_a_serving_slot_at_most_its_wait_then_hears_busy(nursery):
    running, release = trio.Event(), trio.Event()

    async def handler(chunk, trace):
        if chunk["key"] == "slow":
            running.set()
            await release.wait()
        return chunk["key"].encode(), []

    address = await start_server(nursery, handler, max_concurrent=1)
    async with PeerClient(SECRET, request_timeout=30) as client:
        nursery.start_soon(client.get, address, {"key": "slow"}, {})
        await running.wait()  # the only slot is taken
        with pytest.raises(PeerError, match="busy: all 1 serving slots stayed in use") as ei:
            await client.get(address, {"key": "k1"}, {}, wait=0.2)
        assert ei.value.reason == "busy"
        with pytest.raises(PeerError) as ei:
            await client.get(address, {"key": "k1"}, {}, wait="soon")
        assert ei.value.reason == "protocol"
        got = {}

        async def queued():
            got["data"], _ = await client.get(address, {"key": "k2"}, {}, wait=20)

        async with trio.open_nursery() as n:
            n.start_soon(queued)
            await trio.sleep(0.3)
            release.set()  # a slot frees within the wait: the request is served
        assert got["data"] == b"k2"
        stats = client.statistics()["peers"][address]
        assert stats["errors"] == {"busy": 1, "protocol": 1}
        # the answers came in step: 2 connections (the slow get's and the others'), not 4
        assert stats["connects"] == 2


async def test_client_pool_limit(nursery):
    handler, state = concurrency_probe()
    address = await start_server(nursery, handler, max_concurrent=50)
    async with PeerClient(SECRET, max_conns_per_peer=2) as client:
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(client.get, address, {"key": f"k{i}"}, {})
        stats = client.statistics()["peers"][address]
        assert stats["connects"] == 2
        assert stats["requests"] == 8
    assert state["max"] == 2


async def test_a_wait_for_a_connection_to_a_peer_is_its_own_span(nursery):
    """A request queued here for one of the pool's connections to a peer: the wait was
    part of the `peer` span, shown as the peer's round trip."""
    from cachefs.trace import Tracer

    async def slow(chunk, trace):
        await trio.sleep(0.3)
        return b"ok", []

    address = await start_server(nursery, slow)
    tr = Tracer(slow_threshold=0.0, enabled=True)
    async with PeerClient(SECRET, max_conns_per_peer=1) as client:
        async def one(i):
            with tr.start("read", ino=i):
                assert (await client.get(address, CHUNK, TRACE))[0] == b"ok"

        async with trio.open_nursery() as n:
            for i in range(2):
                n.start_soon(one, i)
    waits = [s for d in tr.recent.last(2) for s in d.get("spans", ())
             if s["name"] == "peer.slot_wait"]
    assert len(waits) == 1 and waits[0]["duration_ms"] >= 250, tr.recent.last(2)


async def test_sockets_that_start_a_request_and_stall_still_make_room(nursery):
    """A socket that sent the first bytes of a request (no secret needed for that) and then
    nothing held its connection for the frame's io_timeout, out of reach of the room-making:
    eight of them, renewed every 30 s, refused every healthy peer of a full server."""
    handler, _ = counting_handler(b"ok")
    address = await start_server(nursery, handler, max_connections=8)
    host, port = parse_address(address)
    stalled = []
    for _ in range(8):
        st = await trio.open_tcp_stream(host, port)
        await st.send_all(b"\x00\x00\x00\x10")  # a length, then silence
        stalled.append(st)
    await trio.sleep(0.2)
    async with PeerClient(SECRET) as client:
        with trio.fail_after(5):
            assert (await client.get(address, CHUNK, TRACE))[0] == b"ok"
    for st in stalled:
        await st.aclose()


async def test_server_connection_limit(nursery, monkeypatch):
    """At most max_connections are served. A full server made room for nobody: a cluster of
    66 nodes, each pooling 4 connections to it, filled its 256, and healthy peers were
    refused (they then skipped it and read S3); so could anyone reaching the port with
    silent sockets, without the secret, for 300 s. Now the connection that has waited
    longest for a request is closed to make room (a client's pool connects again), one
    that sends nothing is closed after FIRST_REQUEST_WAIT, and a new connection is refused
    only when every one is busy."""
    from cachefs.cluster import peer

    release = trio.Event()

    async def handler(chunk, trace):
        if chunk.get("key") == "slow":
            await release.wait()
        return b"ok", []

    address = await start_server(nursery, handler, max_connections=2)
    host, port = parse_address(address)
    async with PeerClient(SECRET) as first, PeerClient(SECRET) as second:
        await first.get(address, CHUNK, TRACE)  # pooled, idle
        silent = await trio.open_tcp_stream(host, port)  # no secret, never a request
        assert (await second.get(address, CHUNK, TRACE))[0] == b"ok"  # made room
        assert (await first.get(address, CHUNK, TRACE))[0] == b"ok"  # connects again
        with trio.fail_after(5):  # the silent socket was the longest waiting
            while await silent.receive_some(4096):
                pass
        await silent.aclose()
        # every connection busy: a new one is refused
        async with trio.open_nursery() as n:
            n.start_soon(first.get, address, {"key": "slow"}, TRACE)
            n.start_soon(second.get, address, {"key": "slow"}, TRACE)
            await trio.sleep(0.3)
            async with PeerClient(SECRET) as third:
                with pytest.raises(PeerError) as ei:
                    await third.get(address, CHUNK, TRACE)
                assert ei.value.reason in ("closed", "short_read", "connect")
            release.set()
    # a burst of silent sockets: each closes the one that waited longest, and at most
    # max_connections stay (each new one closed the same one, and all 100 were let in)
    burst = []

    async def connect() -> None:
        burst.append(await trio.open_tcp_stream(host, port))

    async with trio.open_nursery() as n:
        for _ in range(100):
            n.start_soon(connect)
    await trio.sleep(1)
    still_open = 0
    for st in burst:
        with trio.move_on_after(0.05):
            while await st.receive_some(4096):
                pass
            continue  # closed by the server
        still_open += 1
    for st in burst:
        await st.aclose()
    assert still_open <= 2, still_open
    # a connection that sends nothing is closed, with room to spare
    monkeypatch.setattr(peer, "FIRST_REQUEST_WAIT", 0.3)
    silent = await trio.open_tcp_stream(host, port)
    with trio.fail_after(5):
        while await silent.receive_some(4096):
            pass
    await silent.aclose()


async def test_the_daemon_raises_its_descriptor_limit():
    """A daemon started from a shell had the shell's 1024 descriptors: below what a large
    cluster's peer connections alone hold."""
    import sys

    code = ("import resource\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))\n"
            "from cachefs.daemon import raise_fd_limit\n"
            "from cachefs.cluster.node import max_peer_connections\n"
            "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard,"
            " max_peer_connections())\n")
    out = (await trio.run_process([sys.executable, "-c", code], capture_stdout=True)
           ).stdout.decode().split()
    got, soft, hard, conns = (int(x) for x in out)
    want = min(1 << 16, hard)
    assert got == soft == want
    assert conns == max(256, min(8192, want // 4))


# --------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------


async def test_health_expiry(mock_clock):
    health = PeerHealth()
    assert health.bad_for == 10.0
    assert health.is_healthy("n1")
    health.mark_bad("n1", "timeout")
    health.mark_bad("n1", "timeout")
    health.mark_bad("n1", "checksum")
    assert not health.is_healthy("n1")
    assert health.is_healthy("n2")
    assert health.healthy(["n1", "n2", "n3"]) == ["n2", "n3"]
    mock_clock.jump(9.9)
    assert not health.is_healthy("n1")
    mock_clock.jump(0.2)
    assert health.is_healthy("n1")
    # Counters survive expiry.
    assert health.errors("n1") == {"timeout": 2, "checksum": 1}
    assert health.errors("n2") == {}
    stats = health.statistics()
    assert stats["n1"]["healthy"] is True
    assert stats["n1"]["errors"] == {"timeout": 2, "checksum": 1}


async def test_health_custom_period_extend_and_mark_good(mock_clock):
    health = PeerHealth(bad_for=2.0)
    health.mark_bad("n1", "connect")
    mock_clock.jump(1.5)
    health.mark_bad("n1", "connect")  # extends to t=3.5
    mock_clock.jump(1.0)
    assert not health.is_healthy("n1")
    assert health.statistics()["n1"]["unhealthy_for"] == pytest.approx(1.0)
    health.mark_good("n1")
    assert health.is_healthy("n1")
    assert health.errors("n1") == {"connect": 2}


async def test_parse_address():
    assert parse_address("10.0.0.1:7070") == ("10.0.0.1", 7070)
    assert parse_address("node-3.internal:80") == ("node-3.internal", 80)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    for bad in ("nohost", ":80", "host:", "host:x", "host:0", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)
