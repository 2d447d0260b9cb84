"""Run real `cachefs mount --foreground` daemons for tests and talk to them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1"}


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK)


def is_mounted(mp: Path) -> bool:
    mp = str(mp)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mp for line in f)


def unmount(mp: Path) -> None:
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


def cli(*args: str, env: dict | None = None, timeout: float = 120, input: str | None = None,
        check: bool = False, cwd: str | os.PathLike | None = None
        ) -> subprocess.CompletedProcess:
    e = {**os.environ, **CREDS, **(env or {})}
    r = subprocess.run([sys.executable, "-m", "cachefs", *args], capture_output=True, text=True,
                       env=e, timeout=timeout, input=input, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"cachefs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


class Mount:
    """One daemon: mountpoint, cache dir, process; stopped and unmounted at teardown."""

    def __init__(self, tmp: Path, source: str, endpoint: str, *, name: str = "m",
                 cache_size: str = "256MiB", chunk_size: str = "64KiB", extra: tuple = (),
                 env: dict | None = None, config: str | None = None) -> None:
        self.tmp = tmp
        self.mp = (tmp / f"{name}-mnt").resolve()
        self.cache_dir = tmp / f"{name}-cache"
        self.log = tmp / f"{name}.log"
        self.mp.mkdir(exist_ok=True)
        self.source = source
        self.endpoint = endpoint
        self.cache_size = cache_size
        self.chunk_size = chunk_size
        self.extra = tuple(extra)
        self.env = {**os.environ, **CREDS, **(env or {})}
        self.config = config
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        a = [sys.executable, "-m", "cachefs", "mount"]
        if self.config:
            a += ["--config", self.config]
        if self.source:
            a.append(self.source)
        a += [str(self.mp), "--foreground", "--cache-dir", str(self.cache_dir),
              "--cache-size", self.cache_size, "--chunk-size", self.chunk_size]
        if self.endpoint:
            a += ["--endpoint-url", self.endpoint]
        return a + list(self.extra)

    def start(self, timeout: float = 60) -> Mount:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv(), env=self.env, stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}): {self.log_text()}")
            if is_mounted(self.mp) and self.control_ready():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not mount in {timeout}s: {self.log_text()}")

    def control_ready(self) -> bool:
        try:
            self.request({"op": "info"})
            return True
        except Exception:
            return False

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def request(self, req: dict, **kw) -> dict:
        from cachefs import runtime
        from cachefs.control import ControlClient

        return ControlClient(runtime.socket_path(self.mp), str(self.mp)).request(req, **kw)

    def stats(self) -> dict:
        return self.request({"op": "stats"})["stats"]

    def counters(self) -> dict:
        return self.stats()["counters"]

    def stop(self, timeout: float = 30) -> int:
        """Clean stop: SIGTERM, wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        unmount(self.mp)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would; leaves a stale mount behind."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def path(self, rel: str) -> Path:
        return self.mp / rel

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_json(s: str) -> dict:
    return json.loads(s)


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
