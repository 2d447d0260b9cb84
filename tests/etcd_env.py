"""Run a real single-member etcd (Debian ``etcd-server``) for tests.

    etcd = start_etcd(tmp_dir)     # .url ("http://127.0.0.1:PORT"), .stop()
    etcd.pause(); etcd.restart()   # an outage: the same ports and data again

The server listens on free loopback ports, keeps its data in a fresh
directory, and is stopped by its own PID (SIGTERM, then SIGKILL); ``atexit``
stops it too if a test forgets.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"

_live: list[Etcd] = []


def etcd_available() -> bool:
    return os.path.exists(ETCD) and os.access(ETCD, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    def __init__(self, proc: subprocess.Popen, url: str, data_dir: Path, log: Path,
                 own_dir: bool) -> None:
        self.proc = proc
        self.url = url
        self.data_dir = data_dir
        self.log = log
        self._own_dir = own_dir
        self.argv: list[str] = []
        self.ctx: ssl.SSLContext | None = None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def call(self, path: str, body: dict, timeout: float = 5) -> dict:
        """POST one JSON request to the v3 gateway (for test assertions)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def restart(self, timeout: float = 20) -> None:
        """Start the stopped server again: same ports, same data (an etcd outage)."""
        assert self.proc.poll() is not None, "etcd is running"
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL)
        logf.close()
        _live.append(self)
        _wait_healthy(self, timeout, self.ctx)

    def pause(self) -> None:
        """SIGTERM, keeping the data for restart()."""
        own, self._own_dir = self._own_dir, False
        try:
            self.stop()
        finally:
            self._own_dir = own

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self in _live:
            _live.remove(self)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def start_etcd(base: Path | None = None, timeout: float = 20, tls=None) -> Etcd:
    """``tls``: a certs.CA: clients then talk https and must show a certificate it
    signed (etcd's --client-cert-auth); the server's own is issued as "etcd-server"."""
    own = base is None
    d = Path(tempfile.mkdtemp(prefix="etcd-")) if own else Path(base)
    d.mkdir(parents=True, exist_ok=True)
    data = d / "data"
    log = d / "etcd.log"
    client, peer = free_port(), free_port()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{client}"
    argv = [ETCD, "--name", "test", "--data-dir", str(data),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer}",
            "--initial-cluster-state", "new", "--log-level", "warn"]
    ctx = None
    if tls is not None:
        cert, key = tls.issue("etcd-server")
        argv += ["--cert-file", str(cert), "--key-file", str(key), "--client-cert-auth",
                 "--trusted-ca-file", str(tls.pem)]
        ctx = ssl.create_default_context(cafile=str(tls.pem))
        ctx.load_cert_chain(*tls.issue("etcd-health"))
    logf = open(log, "ab")
    proc = subprocess.Popen(argv, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
    logf.close()
    e = Etcd(proc, url, d, log, own)
    e.argv, e.ctx = argv, ctx
    _live.append(e)
    _wait_healthy(e, timeout, ctx)
    return e


def _wait_healthy(e: Etcd, timeout: float, ctx) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if e.proc.poll() is not None:
            e.stop()
            raise RuntimeError(f"etcd exited ({e.proc.returncode}): {e.log_text()}")
        try:
            with urllib.request.urlopen(e.url + "/health", timeout=1, context=ctx) as r:
                if json.loads(r.read()).get("health") in ("true", True):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    e.stop()
    raise RuntimeError(f"etcd did not become healthy in {timeout}s: {e.log_text()}")


@atexit.register
def _stop_all() -> None:
    for e in list(_live):
        try:
            e.stop()
        except Exception:
            pass
