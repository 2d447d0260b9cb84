"""The control server keeps serving whatever one request does: a handler's unexpected
error is answered as one line, and a client that hangs up mid-stream is let go."""

from __future__ import annotations

import socket

import pytest
import trio

from cachefs.control import PROTOCOL, ControlClient, ControlError, ControlServer
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
    assert seen["ping"] == {"ok": True, "pong": True}  # (the protocol is the client's)


def _answering(tmp_path, replies):
    """A control socket that answers each connection with the next of ``replies`` (raw
    bytes), in a thread; (its path, a function that waits for it and closes it)."""
    import threading

    path = tmp_path / "control.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)

    def serve() -> None:
        for reply in replies:
            conn, _ = srv.accept()
            conn.recv(65536)
            conn.sendall(reply)
            conn.close()

    t = threading.Thread(target=serve)
    t.start()

    def done() -> None:
        t.join(10)
        srv.close()

    return path, done


def test_a_daemon_of_another_version_is_named_not_misread(tmp_path):
    """cachefs upgraded while its daemons run: the new command read the old daemon's
    replies as its own ("internal error: KeyError: 'file_count'" from `status`). Every line
    a daemon sends names its protocol, and a command refuses one it does not speak."""
    # answers as the daemons before the protocol field did
    path, done = _answering(tmp_path, (b'{"ok": true, "files": []}\n',
                                       b'{"event": true, "kind": "plan"}\n{"ok": true}\n'))
    client = ControlClient(path, "/mnt/x")
    seen = []
    for _ in range(2):
        with pytest.raises(QuietError) as e:
            client.request({"op": "status"}, on_event=seen.append)
        assert e.value.exitcode == 3
        assert str(e.value) == (
            "the cachefs daemon for /mnt/x runs another version of cachefs than this "
            f"command (control protocol 1, this command's {PROTOCOL}): remount to run this "
            "version (cachefs umount, then cachefs mount)")
    done()
    assert seen == []  # not even its events are read as ours


def test_a_reply_cut_short_or_not_json_is_one_line(tmp_path):
    """A daemon killed while it answered (a line cut short), or a socket of something else
    at the control path: the command ended in "internal error: JSONDecodeError"."""
    replies = (f'{{"protocol": {PROTOCOL}, "ok": tr'.encode(), b"HTTP/1.1 400 Bad\r\n",
               b"[1, 2]\n")
    path, done = _answering(tmp_path, replies)
    said = []
    for _ in replies:
        with pytest.raises(QuietError) as e:
            ControlClient(path, "/mnt/x").request({"op": "stats"})
        said.append((str(e.value), e.value.exitcode))
    done()
    assert said == [
        ("the cachefs daemon for /mnt/x closed the connection in the middle of its answer "
         "(did it exit? see its log)", 1),
        ("the control socket of /mnt/x did not answer in cachefs's protocol", 3),
        ("the control socket of /mnt/x did not answer in cachefs's protocol", 3)]
