"""Model-based test: random operations through a real mount, compared with a model of S3.

A Hypothesis RuleBasedStateMachine drives one daemon (a real FUSE mount over moto) with
random sequences of

  open / read(offset, size) / close / stat / readdir        through the mount
  overwrite / delete                                          by "another client" (boto3)
  free (the `cachefs free` control op)                        evicts a file's chunks
  restart (clean stop, or SIGKILL) and wait (past the TTL)

with a tiny cache (8 chunks of 16 KiB, so reads evict constantly) and a 1 s metadata TTL.

The model keeps every version of every key with the interval in which it was current in
S3.  The daemon may lag S3 by the metadata TTL plus the kernel's entry timeout (also the
TTL), so "possible" versions are those current at some moment of the last
``WINDOW = 2 * TTL + slack`` seconds (at open, for a handle).  The checks:

  - every read returns the bytes of ONE version: all reads through one handle match one
    single candidate version, never a mix, never zeros, never an error body;
  - a read fails (EIO) or comes back short only if the key changed while it could matter;
  - stat sizes and directory listings match a possible state of S3;
  - cache use stays within limit + one chunk, and after the final clean stop every index
    record has its verified chunk file and vice versa.

Bounded: the "cachefs-model" profile runs 10 examples of up to 25 steps (about a minute);
CACHEFS_MODEL_EXAMPLES / CACHEFS_MODEL_STEPS raise it for a longer hunt.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import time
import uuid
from dataclasses import dataclass, field

import pytest
from cachefs_env import Mount, fuse_available, unmount
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_reliability import CacheState

pytestmark = pytest.mark.fuse

CS = 16 * 1024
LIMIT = 8 * CS
TTL = 1.0  # (the least metadata TTL cachefs takes)
WINDOW = 2 * TTL + 2.0  # (slack for a listing or a moto answer slowed on a loaded host)
KEYS = ("a", "b", "d/c")

settings.register_profile(
    "cachefs-model",
    max_examples=int(os.environ.get("CACHEFS_MODEL_EXAMPLES", 10)),
    stateful_step_count=int(os.environ.get("CACHEFS_MODEL_STEPS", 25)),
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # shrinking a real mount takes minutes
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)

SIZES = st.one_of(st.sampled_from([0, 1, CS - 1, CS, CS + 1, 3 * CS]),
                  st.integers(0, 5 * CS + 100))


@dataclass
class Version:
    data: bytes | None  # None: the key does not exist
    start: float  # it may have been current from here (before the PUT/DELETE was sent)
    end: float | None = None  # until here (after the next PUT/DELETE returned)

    def possible_since(self, t: float) -> bool:
        return self.end is None or self.end >= t


@dataclass
class Handle:
    key: str
    fd: int
    candidates: list[Version]  # versions this handle may be reading
    reads: list = field(default_factory=list)
    next: int = 0  # where a sequential read continues

    def changed(self) -> bool:
        """A candidate version is no longer current: EIO (412/404) and short reads are legal."""
        return any(v.end is not None for v in self.candidates)


_seq = itertools.count()


def make_machine(s3, moto, tmp_path):
    class CacheModel(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            n = next(_seq)
            self.bucket = f"model{n}-{uuid.uuid4().hex[:8]}"
            s3.create_bucket(Bucket=self.bucket)
            self.history: dict[str, list[Version]] = {k: [] for k in KEYS}
            rnd = random.Random(n)
            for k in KEYS:
                self._put(k, rnd.randbytes(rnd.choice([0, CS // 2, 2 * CS + 7, 5 * CS + 3])))
            self.m = Mount(tmp_path, f"s3://{self.bucket}", moto.url, name=f"ex{n}",
                           cache_size=str(LIMIT), chunk_size=str(CS),
                           extra=("--metadata-ttl", f"{TTL}s", "--readahead-chunks", "2"))
            self.m.start()
            self.handles: list[Handle] = []
            self.steps = {"reads": 0, "restarts": 0, "kills": 0, "waits": 0}
            self.t_start = time.monotonic()

        # -- the model -------------------------------------------------------------------

        def _put(self, key: str, data: bytes | None) -> None:
            t0 = time.monotonic()
            if data is None:
                s3.delete_object(Bucket=self.bucket, Key=key)
            else:
                s3.put_object(Bucket=self.bucket, Key=key, Body=data)
            t1 = time.monotonic()
            hist = self.history[key]
            if hist:
                hist[-1].end = t1
            hist.append(Version(data, t0))

        def possible(self, key: str, since: float) -> list[Version]:
            return [v for v in self.history[key] if v.possible_since(since)]

        # -- S3 side: another client ---------------------------------------------------------

        @rule(key=st.sampled_from(KEYS), size=SIZES, seed=st.integers(0, 2**32))
        def overwrite(self, key, size, seed):
            self._put(key, random.Random(seed).randbytes(size))

        @rule(key=st.sampled_from(KEYS))
        def delete(self, key):
            if self.history[key][-1].data is not None:
                self._put(key, None)

        # -- the mount ------------------------------------------------------------------------

        def _open(self, key: str) -> None:
            t0 = time.monotonic()
            try:
                fd = os.open(self.m.path(key), os.O_RDONLY)
            except OSError as e:
                assert e.errno == errno.ENOENT, e
                assert any(v.data is None for v in self.possible(key, t0 - WINDOW)), \
                    f"open({key}) ENOENT but the key existed throughout"
                return
            cands = [v for v in self.possible(key, t0 - WINDOW) if v.data is not None]
            assert cands, f"open({key}) succeeded but the key did not exist"
            self.handles.append(Handle(key, fd, cands))

        @initialize()
        def open_all(self):
            for k in KEYS:
                self._open(k)

        @precondition(lambda self: len(self.handles) < 5)
        @rule(key=st.sampled_from(KEYS))
        def open(self, key):
            self._open(key)

        def _read(self, h: Handle, off: int, size: int) -> None:
            self.steps["reads"] += 1
            try:
                got = os.pread(h.fd, size, off)
            except OSError as e:
                assert e.errno == errno.EIO, e
                # legal only if the object changed (412/404 for the pinned ETag)
                assert h.changed(), f"EIO reading {h.key}, which did not change"
                return
            h.reads.append((off, size, got))
            h.next = off + len(got)
            # the versions consistent with every read through this handle so far
            exact = [v for v in h.candidates
                     if all(g == v.data[o:o + n] for o, n, g in h.reads)]
            if exact:
                h.candidates = exact
                return
            # short reads are legal after a change of size (the kernel's i_size moved)
            prefix = [v for v in h.candidates
                      if all(v.data[o:o + n].startswith(g) for o, n, g in h.reads)]
            assert prefix and h.changed(), (
                f"read({h.key}, off={off}, size={size}) returned {len(got)} bytes matching no "
                f"single version (candidates: {[len(v.data) for v in h.candidates]}; "
                f"zeros={got.count(0)})")
            h.candidates = prefix

        @precondition(lambda self: self.handles)
        @rule(data=st.data(), off=st.one_of(st.integers(0, 6 * CS), st.sampled_from([0, CS])),
              size=st.sampled_from([1, 100, CS - 1, CS, CS + 1, 2 * CS + 3, 4 * CS]))
        def read_random(self, data, off, size):
            self._read(data.draw(st.sampled_from(self.handles)), off, size)

        @precondition(lambda self: self.handles)
        @rule(data=st.data(), size=st.sampled_from([4096, CS, 3 * CS]))
        def read_sequential(self, data, size):
            h = data.draw(st.sampled_from(self.handles))
            self._read(h, h.next, size)

        @precondition(lambda self: self.handles)
        @rule(data=st.data())
        def read_whole(self, data):
            self._read(data.draw(st.sampled_from(self.handles)), 0, 6 * CS)

        @precondition(lambda self: self.handles)
        @rule(data=st.data())
        def close(self, data):
            h = data.draw(st.sampled_from(self.handles))
            self.handles.remove(h)
            os.close(h.fd)

        @rule(key=st.sampled_from(KEYS))
        def stat(self, key):
            t0 = time.monotonic()
            poss = self.possible(key, t0 - WINDOW)
            try:
                size = os.stat(self.m.path(key)).st_size
            except FileNotFoundError:
                assert any(v.data is None for v in poss), f"stat({key}): ENOENT, but it exists"
                return
            sizes = {len(v.data) for v in poss if v.data is not None}
            assert size in sizes, f"stat({key}) size {size} not in {sizes}"

        @rule(sub=st.sampled_from(["", "d"]))
        def readdir(self, sub):
            t0 = time.monotonic()
            try:
                names = set(os.listdir(self.m.path(sub)))
            except FileNotFoundError:
                assert sub == "d" and any(v.data is None for v in self.possible("d/c", t0 - WINDOW))
                return
            entries = {"": {"a": ["a"], "b": ["b"], "d": ["d/c"]}, "d": {"c": ["d/c"]}}[sub]
            for name, keys in entries.items():
                poss = [v for k in keys for v in self.possible(k, t0 - WINDOW)]
                if all(v.data is not None for v in poss):
                    assert name in names, f"{name} missing from {sub or '/'}: {names}"
                if all(v.data is None for v in poss):
                    assert name not in names, f"{name} listed in {sub or '/'} but deleted"
            assert names <= set(entries), names

        @rule(key=st.sampled_from(KEYS))
        def free(self, key):
            res = self.m.request({"op": "free", "entries": [[1, key, key]]})
            assert res["cache"]["used_bytes"] <= LIMIT

        # the two slow steps are capped per example: the suite stays about a minute
        @precondition(lambda self: self.steps["waits"] < 3)
        @rule()
        def wait_past_ttl(self):
            self.steps["waits"] += 1
            time.sleep(TTL + 0.1)

        @precondition(lambda self: self.steps["restarts"] < 2)
        @rule(kill=st.booleans())
        def restart(self, kill):
            for h in self.handles:
                try:
                    os.close(h.fd)
                except OSError:
                    pass
            self.handles.clear()
            if kill:
                self.m.kill()
                self.steps["kills"] += 1
            else:
                assert self.m.stop() == 0
            self.steps["restarts"] += 1
            self.m.start()
            for k in KEYS:
                self._open(k)

        @invariant()
        def cache_within_limit(self):
            assert self.m.stats()["cache"]["used_bytes"] <= LIMIT + CS

        def teardown(self):
            if os.environ.get("CACHEFS_MODEL_VERBOSE"):
                print(f"example: {time.monotonic() - self.t_start:.1f}s {self.steps} "
                      f"{self.m.counters() if self.m.proc else ''}", flush=True)
            for h in self.handles:
                try:
                    os.close(h.fd)
                except OSError:
                    pass
            if self.m.proc is not None and self.m.proc.poll() is None:
                code = self.m.stop()
                unmount(self.m.mp)
                assert code == 0, self.m.log_text()
                CacheState(self.m.cache_dir).assert_consistent()
            else:
                self.m.proc = None
                unmount(self.m.mp)

    return CacheModel


@pytest.mark.skipif(not fuse_available(), reason="/dev/fuse is not available")
def test_cache_model(s3, moto, tmp_path):
    from hypothesis.stateful import run_state_machine_as_test

    machine = make_machine(s3, moto, tmp_path)
    run_state_machine_as_test(machine, settings=settings.get_profile("cachefs-model"))
