"""The control server keeps serving whatever one request does: a handler's unexpected
error is answered as one line, and a client that hangs up mid-stream is let go."""

from __future__ import annotations

import socket

import pytest
import trio

from cachefs.control import ControlClient, ControlError, ControlServer
from cachefs.errors import QuietError


async def _boom(req, emit):
    return {"x": {}["missing"]}  # KeyError: a bug in a handler


async def _refuse(req, emit):
    raise ControlError("no such data set")


async def _stream(req, emit):
    # events until the client goes away; the send to a gone client fails
    for i in range(10_000):
        await emit({"i": i, "pad": "x" * 4096})
        await trio.lowlevel.checkpoint()
    return {"done": True}


async def _ping(req, emit):
    return {"pong": True}


def test_a_failing_request_leaves_the_server_up(tmp_path):
    path = tmp_path / "control.sock"
    server = ControlServer(path)
    for op, h in (("boom", _boom), ("refuse", _refuse), ("stream", _stream), ("ping", _ping)):
        server.register(op, h)
    client = ControlClient(path, "/mnt/x")
    seen: dict[str, object] = {}

    def hang_up_mid_stream() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.sendall(b'{"op": "stream"}\n')
        s.recv(100)  # the stream has begun
        s.close()

    def talk() -> None:
        for op in ("boom", "refuse"):
            with pytest.raises(QuietError) as e:
                client.request({"op": op})
            seen[op] = str(e.value)
        hang_up_mid_stream()
        seen["ping"] = client.request({"op": "ping"})

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(server.serve)
            with trio.fail_after(30):
                await trio.to_thread.run_sync(talk)
            n.cancel_scope.cancel()

    trio.run(main)
    assert seen["boom"] == "internal error: 'missing'"
    assert seen["refuse"] == "no such data set"
    assert seen["ping"] == {"ok": True, "pong": True}
