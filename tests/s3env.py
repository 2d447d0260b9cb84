"""Helpers to run a real S3 endpoint (moto server) and the counting /
fault-injecting proxy (tests/s3proxy.py) as child processes.

Plain functions/classes; conftest.py wraps them into fixtures:

    moto = start_moto()                  # .url, .stop(), .reset_state()
    proxy = start_proxy(moto.url)        # .url, .stats(), .reset(), .faults(**kw), .stop()
    s3 = s3_client(proxy.url)            # boto3 client, dummy creds, path-style

Every process started here is stopped (by its own PID) by ``.stop()`` and, as
a safety net, at interpreter exit; the children also exit on their own when
their parent process goes away (``--parent-pid`` watchdog).
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
PROXY_SCRIPT = HERE / "s3proxy.py"

_live: list[Proc] = []
_live_lock = threading.Lock()


def _stop_all():
    with _live_lock:
        procs = list(_live)
    for p in procs:
        try:
            p.stop()
        except Exception:
            pass


atexit.register(_stop_all)

# Runs moto in a child process on a free port, prints READY <port>, and exits
# when its parent goes away.
_MOTO_BOOT = r"""
import logging, os, sys, time
parent = int(sys.argv[1])
if sys.argv[2] != "1":
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
srv.start()
print("READY %d" % srv.get_host_and_port()[1], flush=True)
try:
    while os.getppid() == parent:
        time.sleep(0.5)
except KeyboardInterrupt:
    pass
os._exit(0)
"""


class Proc:
    """A child process that announced ``READY <port>`` on stdout."""

    def __init__(self, argv: list[str], name: str, timeout: float = 30.0, env=None):
        self.name = name
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None,  # inherit: tracebacks show up in pytest's captured output
            env=env,
            text=True,
        )
        self.pid = self.popen.pid
        self._drainer: threading.Thread | None = None
        with _live_lock:
            _live.append(self)
        try:
            self.port = self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        # keep draining stdout so the child never blocks on a full pipe
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _wait_ready(self, timeout: float) -> int:
        result: list = []

        def reader():
            for line in self.popen.stdout:
                if line.startswith("READY "):
                    result.append(int(line.split()[1]))
                    return
            result.append(None)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if not result or result[0] is None:
            rc = self.popen.poll()
            raise RuntimeError(f"{self.name} did not become ready (rc={rc})")
        return result[0]

    def _drain(self):
        try:
            for _ in self.popen.stdout:
                pass
        except (ValueError, OSError):
            pass

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0):
        """Terminate the process we started (by PID) and wait for it."""
        p = self.popen
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
            except ProcessLookupError:
                pass
        # child gone -> the drain thread sees EOF; then release the pipe
        if self._drainer is not None:
            self._drainer.join(2.0)
        if p.stdout is not None and (self._drainer is None or not self._drainer.is_alive()):
            try:
                p.stdout.close()
            except Exception:
                pass
        with _live_lock:
            if self in _live:
                _live.remove(self)

    # small JSON-over-HTTP helper
    def _call(self, method: str, path: str, body=None, timeout: float = 30.0):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            raise RuntimeError(f"{self.name} {method} {path} -> {resp.status}: {raw[:500]!r}")
        return json.loads(raw) if raw else None

    def __repr__(self):
        return (
            f"<{type(self).__name__} {self.name} pid={self.pid} url={getattr(self, 'url', None)}>"
        )


class Moto(Proc):
    def reset_state(self):
        """Wipe all buckets/objects in the moto server."""
        self._call("POST", "/moto-api/reset")


class Proxy(Proc):
    upstream: str

    def stats(self, settle: float = 0.5) -> dict:
        """Counters, once no request is in flight (waiting at most ``settle`` s).

        The proxy records a response when its handler returns, which is just
        after the client has read the last byte: without the wait, a test that
        reads a body and then asks for ``get_bytes`` could see the count of the
        response before it.  A test that keeps a request stalled on purpose
        gets the counters after ``settle`` seconds, with ``inflight`` > 0."""
        deadline = time.monotonic() + settle
        while True:
            st = self._call("GET", "/__proxy__/stats")
            if st["inflight"] <= 0 or time.monotonic() >= deadline:
                return st
            time.sleep(0.01)

    def reset(self):
        """Zero all counters and disarm all faults."""
        self._call("POST", "/__proxy__/reset")

    def faults(self, spec: dict | list | None = None, **kw) -> list[dict]:
        """Arm a fault: ``proxy.faults(status=503, code="SlowDown", count=2)``.

        Either keyword arguments (one fault) or a dict / list of dicts.
        Returns descriptions of the armed faults.
        """
        if spec is None:
            spec = kw
        elif kw:
            raise TypeError("pass either a spec or keyword arguments")
        return self._call("POST", "/__proxy__/faults", spec)["armed"]

    def armed(self) -> list[dict]:
        return self._call("GET", "/__proxy__/faults")

    def clear_faults(self):
        """Disarm all faults, keep counters."""
        self._call("POST", "/__proxy__/faults/clear")

    def gets(self, key: str | None = None, settle: float = 0.5) -> int:
        """GetObject count (for ``key`` if given); ``settle`` as in stats()."""
        st = self.stats(settle)
        if key is None:
            return st["ops"]["GetObject"]
        return st["get_by_key"].get(key, 0)


def _wait_http(url: str, path: str, timeout: float = 20.0):
    u = urlsplit(url)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=2)
            c.request("GET", path)
            c.getresponse().read()
            c.close()
            return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise RuntimeError(f"{url} not answering: {last!r}")


def start_moto(timeout: float = 30.0, verbose: bool = False) -> Moto:
    """Start a moto S3 server on a free port; returns once it answers.

    ``verbose``: let moto/werkzeug log every request to stderr."""
    env = dict(os.environ)
    env.setdefault("AWS_ACCESS_KEY_ID", "testing")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    m = Moto(
        [sys.executable, "-c", _MOTO_BOOT, str(os.getpid()), "1" if verbose else "0"],
        "moto",
        timeout,
        env=env,
    )
    try:
        _wait_http(m.url, "/moto-api/", timeout)
    except BaseException:
        m.stop()
        raise
    return m


def start_proxy(upstream_url: str, timeout: float = 30.0, verbose: bool = False) -> Proxy:
    """Start tests/s3proxy.py in front of ``upstream_url``."""
    argv = [
        sys.executable,
        str(PROXY_SCRIPT),
        "--listen-port",
        "0",
        "--upstream",
        upstream_url,
        "--parent-pid",
        str(os.getpid()),
    ]
    if verbose:
        argv.append("--verbose")
    p = Proxy(argv, "s3proxy", timeout)
    p.upstream = upstream_url
    try:
        _wait_http(p.url, "/__proxy__/health", timeout)
    except BaseException:
        p.stop()
        raise
    return p


def s3_client(url: str, retries: int | None = None, **config_kw):
    """boto3 S3 client for ``url`` with dummy creds and path-style addressing.

    ``retries``: total attempts (1 = no retries); default botocore's.
    Extra keyword arguments go to ``botocore.config.Config``.
    """
    import boto3
    from botocore.config import Config

    cfg = dict(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        # keep requests/responses plain: no automatic CRC trailers/validation
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=60,
    )
    if retries is not None:
        cfg["retries"] = {"total_max_attempts": retries, "mode": "standard"}
    cfg.update(config_kw)
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(**cfg),
    )
