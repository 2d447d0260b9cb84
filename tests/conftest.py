import contextlib
import itertools
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from cachefs_env import Mount, fuse_available, unmount
from s3env import s3_client, start_moto, start_proxy

_bucket_seq = itertools.count()


@pytest.fixture(scope="session")
def moto():
    m = start_moto()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def proxy(moto):
    p = start_proxy(moto.url)
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def _no_fault_left(request):
    """The proxy lives for the session: a fault a test armed (a 60 s delay of every GET)
    must not reach the next test on the worker, which may not reset it."""
    # (taken before the test: a module's own proxy fixture is torn down before this one)
    proxy = request.getfixturevalue("proxy") if "proxy" in request.fixturenames else None
    yield
    if proxy is not None and proxy.alive():
        proxy.clear_faults()


@pytest.fixture(scope="session")
def s3(moto):
    """boto3 client straight to moto (setup traffic does not count at the proxy)."""
    return s3_client(moto.url)


@pytest.fixture
def memory_fs(tmp_path):
    """memory_fs(size, fstype="tmpfs") → a fresh in-memory file system mounted on a
    directory (a tmpfs: a disk that fills up; a ramfs: one that refuses O_DIRECT);
    unmounted after the test."""
    made = []

    def make(size: str, fstype: str = "tmpfs"):
        # a short path (it may be a runtime dir, whose socket paths must fit in 107 bytes:
        # a test's tmp_path under pytest-xdist is too long for that)
        d = Path(tempfile.mkdtemp(prefix=f"cf-{fstype}-"))
        made.append(d)
        r = subprocess.run(["mount", "-t", fstype, "-o", f"size={size},mode=0700", fstype,
                            str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a {fstype}: {r.stderr.strip()}")
        return d

    yield make
    for d in made:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
        with contextlib.suppress(OSError):
            d.rmdir()


@pytest.fixture
def bucket(s3, proxy):
    name = f"t{next(_bucket_seq)}-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    proxy.reset()
    return name


def _fuse_mounts_under(root: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype.startswith("fuse") and fields[4].startswith(root + "/"):
                out.append(fields[4])
    return out


@pytest.fixture(autouse=True)
def _no_mount_left(tmp_path):
    """A test that leaves a FUSE mount under its tmp_path (a `cachefs mount` outside the
    `mounts` fixture that should have failed, one whose umount failed) errors, and the
    mount goes (its daemon ends with it), not the rest of the session's tests."""
    yield
    left = _fuse_mounts_under(str(tmp_path))
    for mp in reversed(left):
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
    assert not left, f"the test left mounts behind: {left}"


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.mktemp("run")
    os.chmod(d, 0o700)
    monkeypatch.setenv("CACHEFS_RUNTIME_DIR", str(d))


@pytest.fixture
def mounts(tmp_path, proxy):
    """Factory: mounts(source, **kw) -> started Mount through the counting proxy."""
    if not fuse_available():
        pytest.skip("/dev/fuse is not available")
    started: list[Mount] = []

    def make(source: str, *, start: bool = True, endpoint: str | None = None, **kw) -> Mount:
        m = Mount(tmp_path, source, proxy.url if endpoint is None else endpoint,
                  name=kw.pop("name", f"m{len(started)}"), **kw)
        started.append(m)
        return m.start() if start else m

    yield make
    for m in started:
        try:
            m.stop()
        finally:
            unmount(m.mp)
