"""Control API: JSON lines over a unix socket private to the daemon's owner.

The socket lives in a 0700 directory and is itself 0600 (see runtime.py), and
the server also checks the peer's uid with SO_PEERCRED: only the daemon's
user (or root) may talk to it.

Protocol: the client sends one JSON object (``{"op": ..., ...}``) on one line.
The server answers with zero or more event lines (``{"event": ...}``, used
for progress and live traces) and then one final line: ``{"ok": true, ...}``
or ``{"ok": false, "error": "one line"}``.  Every line the server sends also carries
``"protocol": PROTOCOL``; the client refuses a daemon that speaks another one.  Handlers are registered by name;
each is ``async def handler(req, emit) -> dict`` where ``emit(dict)`` sends an
event line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .errors import EXIT_NO_DAEMON, OutputClosed, QuietError, leaves
from .runtime import no_daemon_found

log = logging.getLogger("cachefs.control")

Emit = Callable[[dict], Awaitable[None]]
Handler = Callable[[dict, Emit], Awaitable[dict]]
# a request is one JSON line; a data-set command carries its whole file list (a million
# 60-character paths is about 70 MiB of it)
MAX_REQUEST = 1 << 30
BIG_REQUEST = 1 << 20  # parsed in a worker thread from this size on
BIG_REPLY_ITEMS = 64  # a reply with a longer list is encoded in a worker thread
# in every line the daemon sends; raised whenever a request or a reply changes, so that a
# command of one version never misreads a daemon of another (cachefs upgraded under
# running daemons): it says so instead
PROTOCOL = 2


class ControlError(Exception):
    """A request the daemon refuses; its message goes back to the client."""


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}

    def register(self, op: str, handler: Handler) -> None:
        self.handlers[op] = handler

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._conn, [listener])
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass

    async def _conn(self, stream: trio.SocketStream) -> None:
        """One connection.  Nothing it raises may reach serve_listeners' nursery: that
        would end the daemon, and with it the mount under every reader."""
        async with stream:
            try:
                await self._serve(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away (Ctrl-C on `cachefs trace --follow`)
            except Exception:  # noqa: BLE001 - logged, and the daemon stays up
                log.exception("control connection failed")

    async def _serve(self, stream: trio.SocketStream) -> None:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                         struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid not in (os.getuid(), 0):
            log.warning("control: refused a connection from uid %d", uid)
            await _send(stream, {"ok": False, "error": "permission denied"})
            return
        buf = bytearray()
        while True:
            data = await stream.receive_some(1 << 20)
            if not data:
                return
            end = data.find(b"\n")
            buf += data if end < 0 else data[:end]
            if len(buf) > MAX_REQUEST:
                await _send(stream, {"ok": False, "error": "request too large (over "
                                     f"{MAX_REQUEST >> 20} MiB): split the file list"})
                return
            if end >= 0:
                break
        try:
            req = (json.loads(buf) if len(buf) < BIG_REQUEST
                   else await trio.to_thread.run_sync(json.loads, buf))
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            await _send(stream, {"ok": False, "error": "malformed request"})
            return
        handler = self.handlers.get(str(req.get("op")))
        if handler is None:
            await _send(stream, {"ok": False, "error": f"unknown op {req.get('op')!r}"})
            return

        async def emit(ev: dict) -> None:
            await _send(stream, {"event": True, **ev})

        result = None
        try:
            async with trio.open_nursery() as n:
                n.start_soon(_watch_hangup, stream, n.cancel_scope)
                result = await handler(req, emit)
                n.cancel_scope.cancel()
        except BaseException as e:  # noqa: BLE001 - sorted below; the rest re-raised
            err = _only_error(e)
            if err is None:
                raise  # cancellation of the daemon, KeyboardInterrupt: not ours to keep
            if isinstance(err, ControlError):
                await _send(stream, {"ok": False, "error": str(err)})
            elif not isinstance(err, (trio.BrokenResourceError, trio.ClosedResourceError)):
                log.error("control op %s failed", req.get("op"), exc_info=err)
                await _send(stream, {"ok": False, "error": f"internal error: {err}"})
            return
        if result is None:
            return  # client hung up (handler cancelled)
        await _send(stream, {"ok": True, **result})


def _only_error(e: BaseException) -> Exception | None:
    """What a handler raised, out of trio's exception groups: the one Exception it
    comes to, or a group of Exceptions as one; None when any part of it is not an
    Exception (Cancelled, KeyboardInterrupt), which must go on up."""
    found = leaves(e)
    if not all(isinstance(x, Exception) for x in found):
        return None
    if len(found) == 1:
        return found[0]  # type: ignore[return-value]
    return e  # type: ignore[return-value]  # several errors: an ExceptionGroup


async def _watch_hangup(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Cancel the handler when the client goes away (Ctrl-C on `cachefs preload`)."""
    try:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                break
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


def _encode(obj: dict) -> bytes:
    return json.dumps(obj, default=str).encode() + b"\n"


PIECE_ITEMS = 16  # items of a long list encoded per json.dumps call


def _has_long_list(obj: Any) -> bool:
    if isinstance(obj, list | tuple):
        return len(obj) > PIECE_ITEMS or any(_has_long_list(x) for x in obj)
    if isinstance(obj, dict):
        return any(_has_long_list(v) for v in obj.values())
    return False


def dumps_in_pieces(obj: Any, **kw: Any) -> str:
    """``json.dumps(obj, **kw)``, its long lists PIECE_ITEMS items per call, for a worker
    thread: one json.dumps call holds the GIL to its end, so a large document encoded in
    a thread still held the trio thread (every FUSE request) for as long (67-85 ms for
    1,024 traces); between two calls the GIL passes to it."""
    if isinstance(obj, list | tuple) and len(obj) > PIECE_ITEMS:
        return "[" + ", ".join(json.dumps(list(obj[i:i + PIECE_ITEMS]), **kw)[1:-1]
                               for i in range(0, len(obj), PIECE_ITEMS)) + "]"
    if not _has_long_list(obj):
        return json.dumps(obj, **kw)
    if isinstance(obj, dict):  # (a key as json writes it: True is "true", 3 is "3")
        return "{" + ", ".join(json.dumps({k: 0}, **kw)[1:-4] + ": " + dumps_in_pieces(v, **kw)
                               for k, v in obj.items()) + "}"
    return "[" + ", ".join(dumps_in_pieces(x, **kw) for x in obj) + "]"


def _encode_in_pieces(obj: dict) -> bytes:
    return dumps_in_pieces(obj, default=str).encode() + b"\n"


def _big(obj: dict) -> bool:
    """A reply with a long list (a thousand traces: 2.4 MB of JSON, 75 ms to encode)."""
    return any(isinstance(v, list) and len(v) > BIG_REPLY_ITEMS for v in obj.values())


async def _send(stream: trio.SocketStream, obj: dict) -> None:
    obj = {**obj, "protocol": PROTOCOL}  # (last: no handler's result can replace it)
    data = (await trio.to_thread.run_sync(_encode_in_pieces, obj) if _big(obj)
            else _encode(obj))
    await stream.send_all(data)


# -- client ---------------------------------------------------------------------------


def _reply(line: bytes, whose) -> dict:
    """One line the daemon sent, as JSON; a cut one (the daemon died while it wrote) or one
    not JSON (not a cachefs socket) is a one-line error, not a traceback."""
    if not line.endswith(b"\n"):
        raise QuietError(f"the cachefs daemon for {whose} closed the connection in the middle "
                         "of its answer (did it exit? see its log)")
    try:
        msg = json.loads(line)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        raise QuietError(f"the control socket of {whose} did not answer in cachefs's "
                         "protocol", EXIT_NO_DAEMON)
    return msg


class ControlClient:
    """Synchronous client used by the CLI (one request per connection)."""

    def __init__(self, path: Path, mountpoint: str = "") -> None:
        self.path = path
        self.mountpoint = mountpoint

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
        except FileNotFoundError:
            s.close()
            if self.mountpoint:
                raise no_daemon_found(str(self.mountpoint)) from None
            raise QuietError(f"no cachefs daemon is running for {self.path}",
                             EXIT_NO_DAEMON) from None
        except ConnectionRefusedError:
            s.close()
            raise QuietError(f"the cachefs daemon for {self.mountpoint} is not answering "
                             "(stale socket)", EXIT_NO_DAEMON) from None
        except PermissionError:
            s.close()
            raise QuietError(f"permission denied on the control socket of {self.mountpoint}: "
                             "it belongs to another user") from None
        return s

    def request(self, req: dict[str, Any], on_event: Callable[[dict], None] | None = None,
                timeout: float | None = 60.0) -> dict:
        s = self._connect()
        try:
            s.settimeout(timeout)
            try:
                s.sendall(json.dumps(req).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may have answered (refused) already: read its reply
            with s.makefile("rb") as f:  # closed with s, or the socket's fd stays open
                for line in f:
                    msg = _reply(line, self.mountpoint or self.path)
                    if msg.get("protocol") != PROTOCOL:
                        raise QuietError(
                            f"the cachefs daemon for {self.mountpoint or self.path} runs "
                            "another version of cachefs than this command (control protocol "
                            f"{msg.get('protocol', 1)}, this command's {PROTOCOL}): remount "
                            "to run this version (cachefs umount, then cachefs mount)",
                            EXIT_NO_DAEMON)
                    del msg["protocol"]  # (not part of what the command shows or prints)
                    if msg.get("event"):
                        if on_event:
                            try:
                                on_event(msg)
                            except BrokenPipeError:
                                raise OutputClosed from None
                        continue
                    if not msg.get("ok"):
                        raise QuietError(str(msg.get("error", "request failed")))
                    return msg
            raise QuietError("the cachefs daemon closed the connection")
        except TimeoutError:
            raise QuietError("the cachefs daemon did not answer in time") from None
        except (ConnectionResetError, BrokenPipeError):
            raise QuietError("the cachefs daemon closed the connection") from None
        finally:
            s.close()
