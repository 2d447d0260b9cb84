"""Security: private cache files, FUSE permissions, no credential anywhere visible.

  - everything under the cache dir (chunk files, LMDB files, lock, log, tmp) is private to
    the daemon's user (mode & 0o077 == 0), even when the daemon starts with umask 0;
  - with --allow-other, the kernel enforces default_permissions: another user (uid 65534)
    reads the 0444 files and 0555 directories but cannot write; without --allow-other,
    another user cannot access the mount at all;
  - credentials (AWS keys, the peer secret) never appear in the daemon's argv
    (/proc/PID/cmdline), its logs (foreground stderr and the daemonized log file, at DEBUG),
    its traces, its stats or its Prometheus metrics.

Peer requests without the secret (or with a wrong one) are refused: covered by
tests/test_cluster.py::test_wrong_or_missing_secret_is_refused (real daemons) and
tests/test_peer.py::test_wrong_secret_refused_handler_not_called /
test_missing_secret_refused_and_connection_closed / test_replayed_request_refused
(protocol level); not repeated here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import socket
import stat
import time
import urllib.request
from pathlib import Path

import pytest
from cachefs_env import cli, is_mounted, unmount
from test_reliability import put, read_all

pytestmark = pytest.mark.fuse

CS = 64 * 1024
NOBODY = 65534


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def loose_modes(root: Path) -> list[str]:
    """Paths under root (root included) that group or others may access in any way."""
    bad = []
    for p in [root, *root.rglob("*")]:
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            bad.append(f"{p} is a symlink")
        elif mode & 0o077:
            bad.append(f"{p} {stat.filemode(mode)}")
    return bad


def test_cache_files_private_even_with_umask_0(s3, bucket, mounts, proxy):
    """Chunk files, tmp, index (data.mdb, lock.mdb), lock: no group/other bits, with the
    daemon started under umask 0 - after reads, an eviction, a free, a crash and a
    restart (orphans adopted, tmp files removed)."""
    rnd = random.Random(1)
    objs = {f"s/{i}": put(s3, bucket, f"s/{i}", rnd.randbytes(3 * CS)) for i in range(6)}
    m = mounts(f"s3://{bucket}", cache_size=str(12 * CS), start=False)
    with umask(0):
        m.start()
    for k, d in objs.items():
        assert read_all(m.path(k)) == d  # 18 chunks through a 12-chunk cache: evictions
    m.request({"op": "free", "entries": [[1, "s/0", "s/0"]]})
    assert m.counters()["evictions"] >= 1
    assert loose_modes(m.cache_dir) == []
    m.kill()
    with umask(0):
        m.start()
    assert read_all(m.path("s/5")) == objs["s/5"]
    m.stop()
    names = {p.name for p in m.cache_dir.rglob("*")}
    assert {"data.mdb", "lock.mdb", "lock", "chunks", "tmp", "index"} <= names
    assert loose_modes(m.cache_dir) == []
    # the runtime dir holding the control socket is private too
    assert loose_modes(Path(os.environ["CACHEFS_RUNTIME_DIR"])) == []


def test_daemonized_log_file_private_and_clean(s3, bucket, tmp_path, proxy):
    """`cachefs mount` without --foreground logs to <cache-dir>/cachefs.log: mode 0600 under
    umask 0, and no credential in it even at DEBUG."""
    secret = f"SeCrEt{random.randrange(1 << 60):x}"
    akid = f"AKIDTEST{random.randrange(1 << 40):X}"
    put(s3, bucket, "a.bin", b"x" * 1000)
    mp, cache = tmp_path / "mnt", tmp_path / "cache"
    mp.mkdir()
    env = {"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret}
    with umask(0):
        r = cli("mount", f"s3://{bucket}", str(mp), "--cache-dir", str(cache), "--cache-size",
                "64MiB", "--endpoint-url", proxy.url, "--log-level", "DEBUG", env=env)
    try:
        assert r.returncode == 0, r.stderr
        assert (mp / "a.bin").read_bytes() == b"x" * 1000
        assert (mp / "missing").exists() is False
    finally:
        cli("umount", str(mp), env=env)
        unmount(mp)
    logf = cache / "cachefs.log"
    assert logf.exists() and stat.S_IMODE(logf.stat().st_mode) == 0o600
    text = logf.read_text(errors="replace")
    assert " DEBUG " in text  # (the credentials are looked for in DEBUG lines too)
    for cred in (secret, akid):
        assert cred not in text and cred not in r.stderr and cred not in r.stdout
    assert loose_modes(cache) == []


def _as_nobody(cwd: Path, ops: list[tuple]) -> list:
    """Fork a child that enters cwd (as root), drops to uid/gid 65534 and runs ops.

    Each op is (name, relative path); the child reports, per op, "ok" or the errno name.
    Relative paths from a cwd inside the mount: the parents of the mountpoint (pytest's
    0700 tmp dirs) are not traversed, so only the FUSE permissions are tested.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only syscalls, then _exit
        try:
            os.close(r)
            out = []
            try:
                os.chdir(cwd)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as e:
                out.append(f"setup:{errno.errorcode[e.errno]}")
            for op, rel in ops:
                try:
                    if op == "listdir":
                        os.listdir(rel)
                    elif op == "stat":
                        os.stat(rel)
                    elif op == "read":
                        fd = os.open(rel, os.O_RDONLY)
                        try:
                            os.read(fd, 100)
                        finally:
                            os.close(fd)
                    elif op == "write":
                        fd = os.open(rel, os.O_WRONLY)
                        os.close(fd)
                    elif op == "create":
                        fd = os.open(rel, os.O_WRONLY | os.O_CREAT, 0o644)
                        os.close(fd)
                    elif op == "mkdir":
                        os.mkdir(rel)
                    elif op == "exec":  # 0444: the kernel refuses (ENOEXEC would mean
                        os.execv(rel, [rel])  # it asked the daemon, which allows all)
                    out.append("ok")
                except OSError as e:
                    out.append(errno.errorcode.get(e.errno, str(e.errno)))
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


OPS = [("listdir", "."), ("stat", "f.txt"), ("read", "f.txt"), ("read", "d/g.txt"),
       ("write", "f.txt"), ("create", "new.txt"), ("mkdir", "nd"), ("exec", "f.txt")]


def test_allow_other_enforces_default_permissions(s3, bucket, mounts):
    """--allow-other: uid 65534 can list and read (0555 dirs, 0444 files) but never write;
    without it, uid 65534 cannot even list or stat."""
    put(s3, bucket, "f.txt", b"hello")
    put(s3, bucket, "d/g.txt", b"world")
    shared = mounts(f"s3://{bucket}", name="shared", extra=("--allow-other",))
    assert stat.S_IMODE(shared.path("f.txt").stat().st_mode) == 0o444
    assert stat.S_IMODE(shared.path("d").stat().st_mode) == 0o555
    got = _as_nobody(shared.mp, OPS)
    assert got[:4] == ["ok"] * 4, got
    assert all(g in ("EACCES", "EROFS", "EPERM") for g in got[4:]), got
    assert got[-1] == "EACCES", got  # mode bits checked by the kernel: default_permissions
    private = mounts(f"s3://{bucket}", name="private")
    got = _as_nobody(private.mp, OPS)
    assert got[0] in ("EACCES", "EPERM") and got[1] in ("EACCES", "EPERM"), got
    assert "ok" not in got, got
    # root itself is unaffected, and nothing reached S3 as a write
    assert private.path("f.txt").read_bytes() == b"hello"


def test_no_credentials_in_argv_logs_traces_stats_metrics(s3, bucket, mounts, proxy):
    """Unique AWS keys and peer secret, DEBUG logging, S3 errors and retries, a one-node
    cluster: none of the secrets shows in /proc/PID/cmdline, the log, traces, stats or
    /metrics."""
    secret = f"SeCrEt{random.randrange(1 << 60):x}"
    akid = f"AKIDTEST{random.randrange(1 << 40):X}"
    peer_secret = f"PeErSeCrEt{random.randrange(1 << 60):x}"
    data = put(s3, bucket, "c.bin", random.randbytes(3 * CS))
    put(s3, bucket, "denied.bin", b"no")
    with socket.socket() as s1, socket.socket() as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        peer_port, metrics_port = s1.getsockname()[1], s2.getsockname()[1]
    m = mounts(f"s3://{bucket}", env={"AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret,
                                      "CACHEFS_PEER_SECRET": peer_secret},
               extra=("--log-level", "DEBUG", "--node-id", "n0",
                      "--peer-listen", f"127.0.0.1:{peer_port}",
                      "--peers", f"n0=127.0.0.1:{peer_port}",
                      "--metrics-listen", f"127.0.0.1:{metrics_port}",
                      "--s3-max-attempts", "2", "--slow-threshold", "0s"))
    proxy.faults(status=503, count=1)
    proxy.faults(persistent_status=403, key_filter="denied.bin")
    assert read_all(m.path("c.bin")) == data
    with pytest.raises(OSError):
        m.path("denied.bin").read_bytes()
    seen = {"cmdline": Path(f"/proc/{m.proc.pid}/cmdline").read_bytes().decode(errors="replace")}
    seen["stats"] = json.dumps(m.stats())
    with contextlib.suppress(Exception):  # trace ops come from cachefs/tracing.py
        seen["traces"] = json.dumps(m.request({"op": "trace_recent", "n": 0}))
        seen["slow"] = json.dumps(m.request({"op": "trace_recent", "n": 0, "slow": True}))
    deadline = time.monotonic() + 5
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=5) as resp:
                seen["metrics"] = resp.read().decode(errors="replace")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    m.stop()
    seen["log"] = m.log_text() + m.log.read_text(errors="replace")
    assert "DEBUG" in seen["log"] and "s3://" in seen["log"]
    assert "traces" in seen and "metrics" in seen
    for where, text in seen.items():
        for cred in (secret, akid, peer_secret):
            assert cred not in text, f"a credential shows in {where}"


def _no_static_credentials(tmp_path: Path, **env: str) -> dict:
    """An environment where the only credentials are what ``env`` adds: no keys, no
    profile, shared files that do not exist."""
    return {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"), **env}


def test_instance_role_credentials(s3, bucket, mounts, moto, proxy, tmp_path):
    """On an EC2 node with an instance role the only credentials come from the instance
    metadata service (moto's, at AWS_EC2_METADATA_SERVICE_ENDPOINT): the mount starts,
    reads the bytes S3 holds, and the role's secret and session token show nowhere in
    its DEBUG log.  (The fetch used to need an asyncio loop: the mount failed with
    "no running event loop".)"""
    data = put(s3, bucket, "role.bin", random.randbytes(3 * CS))
    env = _no_static_credentials(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=moto.url + "/")
    m = mounts(f"s3://{bucket}", env=env, extra=("--log-level", "DEBUG"))
    assert read_all(m.path("role.bin")) == data
    assert proxy.gets("role.bin") == 3
    m.stop()
    log = m.log_text()
    assert "DEBUG" in log
    for secret in ("test-secret-key", "test-session-token"):  # moto's role credentials
        assert secret not in log


def test_no_credentials_is_one_line(s3, bucket, proxy, tmp_path):
    """No keys, no profile and no instance role: ``cachefs mount`` says so on one line,
    exits non-zero and leaves nothing mounted."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = _no_static_credentials(tmp_path, AWS_EC2_METADATA_DISABLED="true")
    r = cli("mount", f"s3://{bucket}", str(mp), "--endpoint-url", proxy.url,
            "--cache-dir", str(tmp_path / "cache"), "--cache-size", "64MiB", env=env)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "no AWS credentials found" in r.stderr
    assert "Traceback" not in r.stderr
    assert not is_mounted(mp)
    # a key id without its secret: said as such, a usage error like a wrong --profile
    env["AWS_ACCESS_KEY_ID"] = "AKIDEXAMPLE"
    r = cli("mount", f"s3://{bucket}", str(mp), "--endpoint-url", proxy.url,
            "--cache-dir", str(tmp_path / "cache"), "--cache-size", "64MiB", env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("cachefs: error: incomplete AWS credentials in the "
                                "environment: AWS_SECRET_ACCESS_KEY is missing"), r.stderr
    assert not is_mounted(mp)


def test_failed_credential_refresh_is_retried(s3, bucket, mounts, proxy, tmp_path):
    """Credentials that expire within botocore's mandatory refresh window (here from a
    credential_process, as an instance role's are from its metadata service) are fetched
    again at every request; a fetch that fails for a moment is retried like a 503, so
    the read still returns S3's bytes instead of EIO."""
    helper = tmp_path / "creds.sh"
    fail = tmp_path / "fail"
    calls = tmp_path / "calls"
    helper.write_text(f"""#!/bin/sh
echo x >> {calls}
if [ -s {fail} ] && [ "$(cat {fail})" -gt 0 ]; then
  echo $(( $(cat {fail}) - 1 )) > {fail}
  echo "the credential service blinked" >&2
  exit 1
fi
exp=$(date -u -d '+5 min' +%Y-%m-%dT%H:%M:%SZ)
printf '{{"Version": 1, "AccessKeyId": "procKey", "SecretAccessKey": "procSecret",
  "SessionToken": "procToken", "Expiration": "%s"}}' "$exp"
""")
    helper.chmod(0o700)
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\ncredential_process = {helper}\n")
    a = put(s3, bucket, "a.bin", random.randbytes(2 * CS))
    b = put(s3, bucket, "b.bin", random.randbytes(CS))  # one chunk: one fetch, the read's
    env = _no_static_credentials(tmp_path, AWS_CONFIG_FILE=str(config),
                                 AWS_EC2_METADATA_DISABLED="true")
    m = mounts(f"s3://{bucket}", env=env)
    assert read_all(m.path("a.bin")) == a
    before = len(calls.read_text().splitlines())
    assert before >= 2  # fetched at mount, and again for the reads
    fail.write_text("2")
    retries = m.counters().get("s3_retries", 0)
    assert read_all(m.path("b.bin")) == b
    assert fail.read_text().strip() == "0"  # both failures happened
    assert m.counters().get("s3_retries", 0) >= retries + 2
    log = m.log_text()
    for secret in ("procSecret", "procToken"):
        assert secret not in log


def test_error_text_from_a_daemon_is_printed_escaped():
    """The one error line `cachefs` prints for a failed command often carries text from
    the daemon (its control socket's error reply), and through it from a peer or S3: its
    control characters reach the terminal escaped, as in every other line."""
    import subprocess
    import sys

    prog = (
        "import sys\n"
        "from cachefs import cli\n"
        "from cachefs.errors import QuietError\n"
        "@cli.cli.command('boom')\n"
        "def boom():\n"
        "    raise QuietError('node n1: \\x1b]0;owned\\x07\\x1b[2J gone')\n"
        "sys.argv = ['cachefs', 'boom']\n"
        "cli.main()\n")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr == "cachefs: error: node n1: \\x1b]0;owned\\x07\\x1b[2J gone\n"


def test_node_names_and_errors_are_printed_escaped():
    """Node names (in etcd mode, the keys any etcd writer registers) and node errors
    (a peer's unauthenticated error frame) reach the terminal with control characters
    escaped, in `stats` and in the node lines of `status`/`free`/`preload`."""
    import click
    from click.testing import CliRunner

    from cachefs.cli_datasets import _node_lines, _on_nodes
    from cachefs.report import format_stats

    evil, shown = "\x1b]0;owned\x07", "\\x1b]0;owned\\x07"
    cache = {"used_bytes": 0, "limit_bytes": 1, "chunks": 0, "pinned_bytes": 0,
             "pinned_chunks": 0}
    s = {"counters": {}, "cache": cache, "uptime_s": 1, "open_files": 0,
         "in_flight_fetches": 0,
         "cluster": {"node_id": f"n0{evil}", "members": ["n0", "n1"],
                     "nodes_cache": {f"n1{evil}": {"error": f"peer h:1: {evil}"}}}}
    out = format_stats("/mnt/x", s).splitlines()
    assert out[-2:] == [f"  cluster    node n0{shown}, 2 members",
                        f"    n1{shown} error: peer h:1: {shown}"]
    # a member's last failure: its name and reason escaped too
    s["cluster"]["members"] = {"n0": {"healthy": True, "last_failure": None},
                               f"n1{evil}": {"healthy": False, "last_failure": {
                                   "seconds_ago": 3.2, "reason": f"x{evil}"}}}
    out = format_stats("/mnt/x", s).splitlines()
    assert out[-2] == f"    n1{shown} last failed 3 s ago (x{shown}); skipped by reads now"
    nodes = {f"n1{evil}": {"error": f"node n1{evil} unreachable: {evil}"},
             "n0": {"error": None, "x": 1}}
    assert _on_nodes(nodes) == f" on 1 of 2 nodes, not on n1{shown}"

    @click.command()
    def show() -> None:
        _node_lines(nodes, lambda r: f"x {r['x']}")

    r = CliRunner().invoke(show)
    assert r.output.splitlines() == ["  node n0           x 1",
                                     f"  node n1{shown} unreachable: {shown}"]
