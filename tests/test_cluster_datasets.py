"""Cluster-wide `cachefs preload / free / status` (issue #4 point 5).

Three real daemons on 127.0.0.1 with a static ring n0..n2 (as in
tests/test_cluster.py), real FUSE mounts, real moto behind the counting proxy;
chunk size 64 KiB.  Where each chunk belongs is computed here, independently
of the daemons, from the chunk id and the ring; assertions are on GET counts,
bytes and the chunk files in each node's cache directory.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import random
import time

import pytest
from cachefs_env import cli, wait_for
from etcd_env import etcd_available, free_port, start_etcd
from test_cluster import (
    SECRET,
    cluster_stats,
    etcd_config,
    gets,
    read_all,
    start_all,
    start_cluster,
)
from test_datasets import assert_eta_counts_the_small_files_left

from cachefs.chunks.ids import chunk_id
from cachefs.cluster.ring import HashRing

CHUNK = 64 * 1024
NODES = ["n0", "n1", "n2"]
RING = HashRing(NODES)


def owners(bucket: str, files: dict[str, bytes]) -> dict[str, dict[str, int]]:
    """node -> {chunk id hex: length} for every chunk of ``files`` (single-part
    uploads: the ETag is the quoted MD5 of the body)."""
    out: dict[str, dict[str, int]] = {n: {} for n in NODES}
    for key, data in files.items():
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        for i in range(-(-len(data) // CHUNK)):
            cid = chunk_id(bucket, key, etag, CHUNK, i)
            out[RING.owner(cid)][cid.hex()] = min(CHUNK, len(data) - i * CHUNK)
    return out


def choose(s3, bucket: str, stem: str, sizes: list[int], ok) -> tuple[dict, dict]:
    """Files ``{stem}{salt}/{i}.bin`` whose chunk placement satisfies ``ok(owners)``:
    the bucket name is random, so placement is chosen, not left to chance."""
    for salt in range(1000):
        rnd = random.Random(salt)
        files = {f"{stem}{salt}/{i}.bin": rnd.randbytes(n) for i, n in enumerate(sizes)}
        own = owners(bucket, files)
        if ok(own):
            for key, data in files.items():
                s3.put_object(Bucket=bucket, Key=key, Body=data)
                assert s3.head_object(Bucket=bucket, Key=key)["ETag"] == \
                    f'"{hashlib.md5(data).hexdigest()}"'
            return files, own
    raise AssertionError("no placement found")


def counts(own) -> list[int]:
    return [len(own[n]) for n in NODES]


def on_disk(m) -> set[str]:
    d = m.cache_dir / "chunks"
    return {p.name for p in d.glob("*/*") if len(p.name) == 32}


def write_list(tmp_path, name: str, lines: list[str]) -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def run(m, cmd: str, lst: str, *args: str) -> tuple[dict, object]:
    r = cli(cmd, "--file-list", lst, "--mount", str(m.mp), *args, "--json")
    try:
        return json.loads(r.stdout), r
    except ValueError:
        raise AssertionError(f"no JSON from {cmd}: {r.returncode} {r.stderr}") from None


def read_everywhere(ms, files):
    with cf.ThreadPoolExecutor(len(ms)) as ex:
        for got in ex.map(lambda m: read_all(m, files), ms):
            assert got == files


def test_preload_status_free_across_the_cluster(mounts, bucket, s3, proxy, tmp_path):
    ds, own = choose(s3, bucket, "ds", [5 * CHUNK + 100, 7 * CHUNK, 3 * CHUNK + 5, 1000],
                     lambda o: min(counts(o)) >= 3)
    other, _ = choose(s3, bucket, "other", [2 * CHUNK], lambda o: True)
    total_chunks = sum(len(v) for v in own.values())
    total = sum(len(v) for v in ds.values())
    ms = start_cluster(mounts, bucket, 3)
    lst = write_list(tmp_path, "ds.txt", [next(iter(ds)).rsplit("/", 1)[0]])

    # preload on n0: each chunk fetched once, by its owner, and kept there only
    proxy.reset()
    res, r = run(ms[0], "preload", lst)
    assert r.returncode == 0, r.stderr
    assert proxy.gets() == total_chunks
    assert res["fetched_chunks"] == total_chunks and res["fetched_bytes"] == total
    assert res["cached_before_bytes"] == 0 and res["failed"] == [] and res["unreachable"] == []
    for i, n in enumerate(NODES):
        assert res["nodes"][n]["fetched_chunks"] == len(own[n])
        assert res["nodes"][n]["bytes"] == sum(own[n].values())
        assert on_disk(ms[i]) == set(own[n]), n
        assert ms[i].stats()["cache"]["chunks"] == len(own[n])

    # every node reads everything: no GET
    read_everywhere(ms, ds)
    assert proxy.gets() == total_chunks
    for i, n in enumerate(NODES):  # non-owners kept no copy
        assert on_disk(ms[i]) == set(own[n])

    # a second preload, from n1: nothing to fetch anywhere
    res, r = run(ms[1], "preload", lst)
    assert r.returncode == 0, r.stderr
    assert proxy.gets() == total_chunks
    assert res["cached_before_bytes"] == total and res["fetched_bytes"] == 0
    r = cli("preload", "--file-list", lst, "--mount", str(ms[1].mp))
    assert r.returncode == 0 and "node n2" in r.stdout, r.stderr

    # status from n2: per-node figures add up to the data set
    st, r = run(ms[2], "status", lst)
    assert r.returncode == 0, r.stderr
    assert st["total_bytes"] == st["cached_bytes"] == total and st["pinned_bytes"] == 0
    assert set(st["nodes"]) == set(NODES) and st["unreachable"] == []
    for n in NODES:
        row = st["nodes"][n]
        assert row["cached_bytes"] == row["owned_bytes"] == sum(own[n].values())
        assert row["pinned_bytes"] == 0
    assert sum(row["cached_bytes"] for row in st["nodes"].values()) == total
    r = cli("status", "--file-list", lst, "--mount", str(ms[2].mp))
    assert r.returncode == 0 and "node n0" in r.stdout and "(100.0%)" in r.stdout

    # free from n2: gone on every node; what is not listed stays
    assert read_all(ms[2], other) == other
    res, r = run(ms[2], "free", lst)
    assert r.returncode == 0, r.stderr
    assert res["freed_bytes"] == total and res["freed_chunks"] == total_chunks
    for i, n in enumerate(NODES):
        assert res["nodes"][n]["freed_chunks"] == len(own[n])
        assert not on_disk(ms[i]) & set(own[n])
    assert sum(m.stats()["cache"]["chunks"] for m in ms) == 2  # other0/0.bin
    st, _ = run(ms[0], "status", lst)
    assert st["cached_bytes"] == 0
    assert all(row["cached_bytes"] == 0 for row in st["nodes"].values())
    # a new preload fetches it all again, once (reads would hit the page cache now)
    proxy.reset()
    res, r = run(ms[1], "preload", lst)
    assert r.returncode == 0 and res["cached_before_bytes"] == 0, r.stderr
    assert proxy.gets() == total_chunks


def test_owners_fetch_no_more_at_once_than_s3_takes(mounts, bucket, s3, proxy, tmp_path):
    """A cluster preload's owners ran --parallel fetches whatever `[s3] max_concurrency`:
    the others queued for an S3 connection inside their retry budget, and failed once S3
    was slow (one node caps --parallel there). And an owner busy for longer than the
    call's timeout (the peer timeout plus a short S3 timeout: 5 s) answered after its
    usual 10 s, and the requester took it for unreachable."""
    ds, own = choose(s3, bucket, "cap", [15 * CHUNK], lambda o: min(counts(o)) >= 4)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[s3]\nmax_concurrency = 1\nmax_attempts = 1\nrequest_timeout = "3s"\n')
    ms = start_cluster(mounts, bucket, 3, config=str(cfg))
    lst = write_list(tmp_path, "cap.txt", list(ds))
    proxy.reset()
    # a slow S3: 4 chunks one after another take 4 s, past the 3 s budget of a request
    # (a loaded host's GET through the proxy must still end within it: 1 s, 2 s to spare)
    proxy.faults(delay=1.0, count=-1)
    res, r = run(ms[0], "preload", lst, "--parallel", "8")
    proxy.clear_faults()
    assert r.returncode == 0 and res["failed"] == [], r.stderr
    assert res["fetched_chunks"] == 15 and proxy.gets() == 15


def test_a_fetch_that_outlasts_an_owners_answer_is_reported_fetched(mounts, bucket, s3, proxy,
                                                                    tmp_path):
    """An owner answers a ds_fetch call within a window (10 s; 0.3 s here) and names the
    chunks still under way.  Sent again, such a chunk was joined and timed from then (the
    model learned 0.43 s for 1 s fetches), or, when its fetch had ended in between, taken
    for cached before: not fetched, not timed.  Now the owner follows each to its end."""
    ds, own = choose(s3, bucket, "late", [6 * CHUNK],
                     lambda o: counts(o)[1] >= 2 and counts(o)[2] >= 2)
    ms = start_cluster(mounts, bucket, 3, env_for={"n0": {"CACHEFS_TEST_FETCH_WAIT": "0.3"}})
    lst = write_list(tmp_path, "late.txt", list(ds))
    proxy.reset()
    proxy.faults(delay=1.0, count=-1)  # each GET outlasts three windows
    res, r = run(ms[0], "preload", lst)
    proxy.clear_faults()
    assert r.returncode == 0 and res["failed"] == [], r.stderr
    assert proxy.gets() == 6
    assert res["fetched_chunks"] == 6 and res["fetched_bytes"] == 6 * CHUNK
    for n in NODES:  # (a node that owns none of them has no row)
        assert res["nodes"].get(n, {}).get("fetched_chunks", 0) == len(own[n]), n
    # every fetch taught the model of the node that ran the preload, with its whole time
    tp = ms[0].request({"op": "throughput"})
    assert tp["throughput"]["samples"] == 6, tp
    secs = [b["chunk_seconds"] for b in tp["throughput"]["by_streams"]]
    assert secs and min(secs) >= 0.9, tp


def test_a_dry_runs_measurement_fetches_on_every_owner_at_once(mounts, bucket, s3, proxy,
                                                                tmp_path):
    """A cluster preload runs --parallel fetches on every owner at once; its dry run timed
    --parallel fetches in all, from the node it ran on, of an S3 less busy than the run
    makes it (an estimate up to one per owner times too short)."""
    ds, own = choose(s3, bucket, "probe", [24 * CHUNK], lambda o: min(counts(o)) >= 6)
    ms = start_cluster(mounts, bucket, 3)
    lst = write_list(tmp_path, "probe.txt", list(ds))
    proxy.reset()
    proxy.faults(delay=0.5, count=-1)
    res, r = run(ms[0], "preload", lst, "--dry-run", "--parallel", "2")
    proxy.clear_faults()
    assert r.returncode == 0, r.stderr
    assert proxy.stats()["max_inflight"] == 6  # 2 on each owner, at once (2 before)
    # each owner fetched from its own share, a quarter of it at most (4 at least), and
    # kept it; the fetches were timed
    for i, n in enumerate(NODES):
        got = on_disk(ms[i])
        assert got <= set(own[n]) and 1 <= len(got) <= max(4, len(own[n]) // 4), n
    probed = sum(len(on_disk(m)) for m in ms)
    assert res["fetched_chunks"] == probed == proxy.gets() == res["estimate"]["probed_chunks"]
    assert res["missing_chunks"] == 24 and res["estimate"]["basis"] == "measured", res
    # every owner fetches its 8 or so chunks 2 at a time, 0.5 s each: the slowest decides
    slowest = max(counts(own)) / 2 * 0.5
    assert slowest * 0.8 < res["estimate"]["seconds"] < slowest * 1.6, (res, counts(own))


def test_a_cluster_preloads_eta_counts_each_owners_round_trips_left(mounts, bucket, s3,
                                                                     proxy, tmp_path):
    """A large file, then many small ones, over three owners: with 99% of the bytes in, a
    cluster preload's ETA was the bytes left at the bytes' rate ("ETA 0s") while each owner
    had a round trip to S3 per small file still to make."""
    sizes = [20 * CHUNK] + [100] * 90
    ds, own = choose(s3, bucket, "eta", sizes, lambda o: min(counts(o)) >= 30)
    ms = start_cluster(mounts, bucket, 3)
    lst = write_list(tmp_path, "eta.txt", list(ds))
    proxy.faults(delay=0.15, count=-1)
    r = cli("preload", "--file-list", lst, "--mount", str(ms[0].mp), "--parallel", "1")
    proxy.clear_faults()
    assert_eta_counts_the_small_files_left(r)


def test_pins_on_owners_and_a_node_that_is_down(mounts, bucket, s3, proxy, tmp_path):
    # every node owns pinned chunks, more unpinned ones than it can hold, and
    # some of the chunks preloaded while n2 is down
    p, own_p = choose(s3, bucket, "p", [3 * CHUNK] * 2, lambda o: min(counts(o)) >= 1)
    u, own_u = choose(s3, bucket, "u", [5 * CHUNK] * 9, lambda o: min(counts(o)) >= 13)
    q, own_q = choose(s3, bucket, "q", [2 * CHUNK] * 3, lambda o: min(counts(o)) >= 1)
    part = {"p": p, "u": u, "q": q}
    # 30 chunks of cache in all, as the limit counts them (64 KiB of data + header: 68 KiB)
    ms = start_cluster(mounts, bucket, 3, extra_for={n: ("--cache-size", "680KiB")
                                                    for n in NODES})
    lp, lu, lq = (write_list(tmp_path, f"{x}.txt", [next(iter(part[x])).rsplit("/", 1)[0]])
                  for x in part)

    # pinned on each owner
    proxy.reset()
    res, r = run(ms[1], "preload", lp, "--pin")
    assert r.returncode == 0, r.stderr
    assert proxy.gets() == 6
    st, _ = run(ms[0], "status", lp)
    for n in NODES:
        assert st["nodes"][n]["pinned_bytes"] == sum(own_p[n].values())
    # eviction pressure on every node: 45 unpinned chunks for 30 chunks of cache
    res, r = run(ms[0], "preload", lu)
    assert r.returncode == 0, r.stderr
    read_all(ms[2], part["u"])
    assert all(m.counters().get("evictions", 0) > 0 for m in ms)
    st, _ = run(ms[2], "status", lp)
    assert st["cached_bytes"] == st["pinned_bytes"] == st["total_bytes"] == 6 * CHUNK
    for i, n in enumerate(NODES):
        assert st["nodes"][n]["pinned_bytes"] == sum(own_p[n].values())
        assert set(own_p[n]) <= on_disk(ms[i])
        assert ms[i].stats()["cache"]["used_bytes"] <= 680 * 1024
    # pinning all of u/ would overfill its owners: refused before any fetch
    before = proxy.gets()
    r = cli("preload", "--file-list", lu, "--mount", str(ms[0].mp), "--pin")
    assert r.returncode == 1 and "cannot pin on node n" in r.stderr, r.stderr
    assert proxy.gets() == before

    # n2 goes down: its chunks of q/ go to their successor, where readers look
    ms[2].kill()
    succ: dict[str, int] = {}
    for cid in own_q["n2"]:
        s = RING.preference(bytes.fromhex(cid), 2)[1]
        succ[s] = succ.get(s, 0) + 1
    proxy.reset()
    res, r = run(ms[0], "preload", lq)
    assert r.returncode == 0, r.stderr
    assert proxy.gets() == 6 and res["fetched_chunks"] == 6
    assert [u["node"] for u in res["unreachable"]] == ["n2"]
    assert any("n2 unreachable" in w for w in res["warnings"])
    for n in ("n0", "n1"):
        assert res["nodes"][n].get("fallback_for", {}).get("n2", 0) == succ.get(n, 0)
        assert res["nodes"][n]["fetched_chunks"] == len(own_q[n]) + succ.get(n, 0)
    read_everywhere(ms[:2], part["q"])
    assert proxy.gets() == 6
    # stats --nodes shows the others' figures and names the node that is down (exit 1)
    r = cli("stats", "--nodes", "--mount", str(ms[0].mp))
    assert r.returncode == 1 and r.stderr.startswith("cachefs: node n2 unreachable: "), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "    n2           error: " in r.stdout
    assert "    n1           " in r.stdout and " used of 680.0 KiB" in r.stdout, r.stdout
    # status and free name the node that is down (exit 1) and still do the rest
    st, r = run(ms[1], "status", lp)
    assert r.returncode == 1 and "n2 unreachable" in r.stderr
    assert "error" in st["nodes"]["n2"] and [u["node"] for u in st["unreachable"]] == ["n2"]
    assert st["nodes"]["n0"]["pinned_bytes"] == sum(own_p["n0"].values())
    res, r = run(ms[0], "free", lp)
    assert r.returncode == 1 and "n2 unreachable" in r.stderr
    assert res["pins_removed"] == len(own_p["n0"]) + len(own_p["n1"])
    st, _ = run(ms[1], "status", lp)
    assert st["nodes"]["n0"]["cached_bytes"] == st["nodes"]["n1"]["cached_bytes"] == 0
    # the summary counts the nodes that answered and names the one that did not (it said
    # "on 3 nodes" with n2 down)
    r = cli("free", "--file-list", lq, "--mount", str(ms[0].mp))
    assert r.returncode == 1 and "node n2 unreachable" in r.stderr, r.stderr
    assert r.stdout.splitlines()[0] == (
        f"freed 384.0 KiB (6 chunks, 0 pinned) of 3 files listed (384.0 KiB) in {ms[0].mp} "
        "on 2 of 3 nodes, not on n2"), r.stdout
    # trace --cold cannot drop n2's copies: the trace is shown, but it exits 1 and says so
    # (it exited 0)
    path = str(ms[0].path(next(iter(q))))
    for args in ((), ("--json",)):
        r = cli("trace", path, "--cold", *args)
        assert r.returncode == 1, (r.returncode, r.stderr)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            "cachefs: error: --cold could not drop the range's chunks on node n2 ("), r.stderr
        assert err[0].endswith("): the trace may show cached reads"), r.stderr
    assert set(json.loads(r.stdout)["cold"]["nodes"]) == set(NODES)
    assert "error" in json.loads(r.stdout)["cold"]["nodes"]["n2"]
    r = cli("trace", path, "--cold")
    assert "on 2 of 3 node(s)" in r.stdout and "--cold: node n2: " in r.stdout, r.stdout
    # a pinning preload cannot copy its pin records to n2: said, and the pins are made
    res, r = run(ms[0], "preload", lq, "--pin")
    assert r.returncode == 0, r.stderr
    assert any(w.startswith("pin records not copied (node n2 unreachable: ") and
               w.endswith("a free run on node n2 will not reach the versions S3 replaces "
                          "later, nor keep the files this data set shares with the list it "
                          "frees") for w in res["warnings"]), res["warnings"]


def test_a_frozen_node_is_given_up_after_five_peer_timeouts(mounts, bucket, s3, proxy, tmp_path):
    """status and free ask each node which chunks it holds (ds_probe) or to drop them
    (ds_drop), which never waits on S3: a node that does not answer (here SIGSTOP) is given
    up after 5 peer timeouts (10 s), not after the peer timeout plus the S3 timeout (32 s)."""
    import os
    import signal

    files, own = choose(s3, bucket, "z", [2 * CHUNK] * 3, lambda o: min(counts(o)) >= 1)
    ms = start_cluster(mounts, bucket, 3)
    lst = write_list(tmp_path, "z.txt", [next(iter(files)).rsplit("/", 1)[0]])
    res, r = run(ms[0], "preload", lst)
    assert r.returncode == 0, r.stderr
    os.kill(ms[1].proc.pid, signal.SIGSTOP)
    try:
        st, r = run(ms[0], "status", lst)
    finally:
        os.kill(ms[1].proc.pid, signal.SIGCONT)
    assert r.returncode == 1 and "n1 unreachable" in r.stderr, r.stderr
    assert "timed out after 10s" in r.stderr, r.stderr
    assert [u["node"] for u in st["unreachable"]] == ["n1"]
    assert "error" not in st["nodes"]["n0"] and "error" not in st["nodes"]["n2"]
    st, r = run(ms[0], "status", lst)  # n1 answers again
    assert r.returncode == 0 and st["cached_bytes"] == st["total_bytes"] == 6 * CHUNK, r.stderr


EVIL = "\x1b]0;owned\x07\x1b[2J"  # sets the terminal's title, clears the screen
SHOWN = "\\x1b]0;owned\\x07\\x1b[2J"  # what a terminal must get instead


class EvilPeer:
    """A "member" that answers every request with an unauthenticated error frame (all-zero
    MAC, as a node sends before a request is authenticated) whose message holds terminal
    control sequences: any host on the network can be this, no secret needed."""

    def __init__(self, message: str) -> None:
        import socket
        import threading

        self.message = message
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        import os
        import struct

        from cachefs.cluster.protocol import checksum, encode_hello, encode_response

        def exactly(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                got = conn.recv(n - len(buf))
                if not got:
                    raise EOFError
                buf += got
            return buf

        nonce = os.urandom(16)
        with conn:
            try:
                conn.sendall(encode_hello(nonce))
                for seq in range(1 << 30):
                    (size,) = struct.unpack(">I", exactly(4))
                    exactly(32 + size)  # MAC and header, ignored
                    conn.sendall(encode_response(None, nonce, seq, {
                        "status": "error", "code": "unauthorized", "message": self.message,
                        "length": 0, "checksum": checksum(b""), "spans": []}))
            except (EOFError, OSError):
                return

    def close(self) -> None:
        self.sock.close()


def test_a_peers_error_text_reaches_the_terminal_escaped(mounts, bucket, s3, tmp_path):
    """`stats --nodes`, `status` and `free` print each node's error; the text
    of a peer's error frame is printed with its control characters escaped."""
    import socket

    evil = EvilPeer(EVIL)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        peers = f"n0=127.0.0.1:{port},n1=127.0.0.1:{evil.port}"
        m = mounts(f"s3://{bucket}", name="n0", env={"CACHEFS_PEER_SECRET": SECRET},
                   extra=("--node-id", "n0", "--peer-listen", f"127.0.0.1:{port}",
                          "--peers", peers))
        s3.put_object(Bucket=bucket, Key="e/a.bin", Body=b"x" * 1000)
        why = f"peer 127.0.0.1:{evil.port}: {SHOWN}"

        r = cli("stats", "--nodes", "--mount", str(m.mp))
        assert r.returncode == 1, r.stderr
        assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout + r.stderr
        assert f"    n1           error: {why}" in r.stdout.splitlines(), r.stdout
        assert r.stderr.splitlines() == [f"cachefs: node n1 unreachable: {why}"]

        lst = write_list(tmp_path, "e.txt", ["e/a.bin"])
        for cmd in ("status", "free"):
            r = cli(cmd, "--file-list", lst, "--mount", str(m.mp))
            assert r.returncode == 1, (cmd, r.stderr)
            out = r.stdout + r.stderr
            assert "\x1b" not in out and "\x07" not in out, (cmd, out)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("  node n1 ")]
            assert lines == [f"  node n1           unreachable: {why}"], (cmd, r.stdout)
            assert r.stderr.splitlines() == [f"cachefs: node n1 unreachable: {why}"]
    finally:
        evil.close()


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (Debian etcd-server)")
def test_a_node_joining_during_a_pinning_preload_loses_no_pin(mounts, bucket, s3, proxy,
                                                             tmp_path):
    """A preload --pin gives each node its own chunks. A node joining half-way owns some
    of them now: the node that was given them read them from the newcomer and did not
    keep them (not kept, "the cache is full of pinned data"), and the newcomer kept them
    unpinned. The node that was given a chunk to pin now keeps it, pinned."""
    two, three = HashRing(["e0", "e1"]), HashRing(["e0", "e1", "e2"])

    def ring_owners(ring, files):
        out = {}
        for key, data in files.items():
            etag = f'"{hashlib.md5(data).hexdigest()}"'
            for i in range(-(-len(data) // CHUNK)):
                out[(key, i)] = ring.owner(chunk_id(bucket, key, etag, CHUNK, i))
        return out

    for salt in range(1000):  # e0 is busy for a while, then reads chunks e2 will own
        rnd = random.Random(salt)
        files = {f"j{salt}/first.bin": rnd.randbytes(40 * CHUNK),
                 f"j{salt}/last.bin": rnd.randbytes(8 * CHUNK)}
        o2, o3 = ring_owners(two, files), ring_owners(three, files)
        first = sum(1 for (k, _), n in o2.items() if k.endswith("first.bin") and n == "e0")
        moved = sum(1 for (k, i), n in o2.items()
                    if k.endswith("last.bin") and n == "e0" and o3[(k, i)] == "e2")
        if first >= 20 and moved >= 2:
            break
    else:
        raise AssertionError("no placement found")
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    etcd = start_etcd(tmp_path / "etcd")
    try:
        cfg = etcd_config(tmp_path, etcd, "/j/members/", 6, 30)

        def node(name):
            return mounts(f"s3://{bucket}", name=name, start=False, config=str(cfg),
                          env={"CACHEFS_PEER_SECRET": SECRET},
                          extra=("--node-id", name, "--peer-listen",
                                 f"127.0.0.1:{free_port()}"))

        ms = [node("e0"), node("e1")]
        start_all(ms)
        for m in ms:
            wait_for(lambda m=m: cluster_stats(m)["ring_size"] == 2, 10, "2 members")
        lst = write_list(tmp_path, "j.txt", list(files))
        proxy.reset()
        # e0's part of first.bin takes 12 s or more: e2 starts and joins meanwhile
        proxy.faults(delay=0.6, count=-1)
        with cf.ThreadPoolExecutor(1) as ex:
            pre = ex.submit(run, ms[0], "preload", lst, "--pin", "--parallel", "1")
            wait_for(lambda: gets(proxy) >= 1, 20, "the preload to start")
            node("e2").start()
            wait_for(lambda: cluster_stats(ms[0])["ring_size"] == 3, 10, "e2 to join")
            res, r = pre.result(timeout=120)
        assert r.returncode == 0, r.stderr
        assert res["uncached_bytes"] == 0 and "could not be kept" not in r.stderr
        assert cluster_stats(ms[0])["fetched_from_peers"] >= moved  # read from e2, and kept
        proxy.clear_faults()
        st, _ = run(ms[0], "status", lst)
        total = sum(len(d) for d in files.values())
        assert st["pinned_bytes"] == total, st["nodes"]
    finally:
        etcd.stop()


def test_a_free_on_any_node_reaches_the_pins_of_replaced_versions(mounts, bucket, s3, proxy,
                                                                  tmp_path):
    """A pinning preload recorded the versions it pinned on its own node only: a free run
    on another node found no record, and the chunks of a version S3 had since replaced or
    deleted stayed pinned on their owners for good. The records are copied to every
    member now, and a free removes them everywhere."""
    ds, own = choose(s3, bucket, "pv", [4 * CHUNK, 3 * CHUNK], lambda o: min(counts(o)) >= 1)
    ms = start_cluster(mounts, bucket, 3,
                       extra_for={n: ("--metadata-ttl", "1s") for n in NODES})
    lst = write_list(tmp_path, "pv.txt", [next(iter(ds)).rsplit("/", 1)[0] + "/"])
    res, r = run(ms[0], "preload", lst, "--pin")
    assert r.returncode == 0 and res["warnings"] == [], r.stderr
    for i, n in enumerate(NODES):
        assert ms[i].stats()["cache"]["pinned_chunks"] == len(own[n])
    replaced, deleted = list(ds)
    s3.put_object(Bucket=bucket, Key=replaced, Body=b"v2" * CHUNK)
    s3.delete_object(Bucket=bucket, Key=deleted)
    time.sleep(1.2)  # past the metadata TTL
    res, r = run(ms[1], "free", lst)
    assert r.returncode == 0, r.stderr
    assert res["superseded_versions"] == 2 and res["pins_removed"] == 7, res
    for m in ms:
        assert m.stats()["cache"]["pinned_bytes"] == 0
        assert not on_disk(m) & {c for n in NODES for c in own[n]}
    # the records went from every node: a free from a third finds no older version
    res, r = run(ms[2], "free", lst)
    assert r.returncode == 0 and res["superseded_versions"] == 0, (r.stderr, res)


def _two_lists_sharing_a_file(mounts, bucket, s3, tmp_path, stem: str):
    """Files x (3 chunks), y, z with chunks on every node, a cluster of 3, and lists
    a.txt (x, y) and b.txt (x, z): (files, owners, mounts, a, b)."""
    ds, own = choose(s3, bucket, stem, [3 * CHUNK, CHUNK, CHUNK],
                     lambda o: min(counts(o)) >= 1)
    x, y, z = list(ds)
    ms = start_cluster(mounts, bucket, 3)
    return (ds, own, ms, write_list(tmp_path, "a.txt", [x, y]),
            write_list(tmp_path, "b.txt", [x, z]))


def test_a_free_on_another_node_keeps_what_another_data_set_pins(mounts, bucket, s3, proxy,
                                                                   tmp_path):
    """Two data sets pinned from two nodes share a file; `free` of one, run on a third
    node, drops that data set's own file on its owners and keeps the shared one pinned
    on its owners: the third node knows who pins it from the records' copies."""
    ds, own, ms, a, b = _two_lists_sharing_a_file(mounts, bucket, s3, tmp_path, "ko")
    x, y, z = list(ds)
    for m, lst in ((ms[0], a), (ms[1], b)):
        res, r = run(m, "preload", lst, "--pin")
        assert r.returncode == 0 and res["warnings"] == [], (r.stderr, res)
    mine = {n: {c for c in own[n]} for n in NODES}
    z_chunks = owners(bucket, {z: ds[z]})
    res, r = run(ms[2], "free", b)
    assert r.returncode == 0, r.stderr
    assert res["freed_chunks"] == res["pins_removed"] == 1, res  # z's
    assert res["kept_files"] == 1 and res["kept_bytes"] == 3 * CHUNK, res
    assert list(res["kept_by"]) == [a], res
    for i, n in enumerate(NODES):
        keep = mine[n] - set(z_chunks[n])
        assert ms[i].stats()["cache"]["pinned_chunks"] == len(keep), n
        assert keep <= on_disk(ms[i]) and not set(z_chunks[n]) & on_disk(ms[i]), n
    st, r = run(ms[2], "status", a)  # (who pins: from the records' copy on n2)
    assert st["pinned_by"] == {a: {"files": 2, "bytes": 4 * CHUNK}}, st
    assert st["pinned_bytes"] == 4 * CHUNK, st
    proxy.reset()
    read_everywhere(ms, {x: ds[x], y: ds[y]})
    assert gets(proxy) == 0
    # a's own free, from another node: everything goes, and the records everywhere
    res, r = run(ms[1], "free", a)
    assert r.returncode == 0 and res["kept_files"] == 0 and res["pins_removed"] == 4, res
    for i, _n in enumerate(NODES):
        assert ms[i].stats()["cache"]["pinned_bytes"] == 0
    res, r = run(ms[0], "free", b)
    assert r.returncode == 0 and res["kept_files"] == 0, res


def test_a_member_that_does_not_let_go_of_a_data_sets_pins_is_reported(mounts, bucket, s3,
                                                                        proxy, tmp_path):
    """A member whose copy of the pin records could not be updated by a free (it failed
    after the chunks were dropped) was only logged: the free said nothing and exited 0,
    while a free run on that member went on keeping what this data set shared with its
    list. The free now warns, naming the member, and exits 1; run again, it succeeds."""
    ds, own = choose(s3, bucket, "rl", [CHUNK, CHUNK, CHUNK], lambda o: min(counts(o)) >= 1)
    flag = tmp_path / "n1-pins-fail"
    ms = start_cluster(mounts, bucket, 3,
                       env_for={"n1": {"CACHEFS_TEST_FAIL_COMMITS_WHILE": str(flag)}})
    lst = write_list(tmp_path, "a.txt", list(ds))
    res, r = run(ms[0], "preload", lst, "--pin")
    assert r.returncode == 0 and res["warnings"] == [], (r.stderr, res)
    flag.write_text("pins")  # n1 cannot write its copy of the pin records
    try:
        res, r = run(ms[0], "free", lst)
    finally:
        flag.unlink()
    assert r.returncode == 1, r.stderr
    assert res["pins_removed"] == 3 and len(res["warnings"]) == 1, res
    assert "a free run on node n1 keeps what this data set shares" in res["warnings"][0]
    assert "warning: pin records not updated" in r.stderr and "node n1" in r.stderr
    res, r = run(ms[0], "free", lst)
    assert r.returncode == 0 and res["warnings"] == [], (r.stderr, res)


def test_a_node_that_was_down_while_a_data_set_was_pinned_learns_its_pins(mounts, bucket,
                                                                          s3, proxy,
                                                                          tmp_path):
    """A member that was down when a data set was pinned (or joined later, or lost its
    index) lacked its pin records: a free of another list run on it dropped the file the
    two lists share, and the first data set's jobs went back to S3. A starting node now
    merges the other members' pin records into its own."""
    ds, _, ms, a, b = _two_lists_sharing_a_file(mounts, bucket, s3, tmp_path, "sy")
    x, y, z = list(ds)
    assert ms[2].stop() == 0
    res, r = run(ms[0], "preload", a, "--pin")  # n2 is down: its copy is not made
    assert r.returncode == 0 and any("not copied" in w for w in res["warnings"]), res
    ms[2].start()
    wait_for(lambda: "pin records: " in ms[2].log_text(), 30, "n2 merged the pin records")
    assert "merged from nodes n0, n1" in ms[2].log_text()
    res, r = run(ms[1], "preload", b, "--pin")
    assert r.returncode == 0 and res["warnings"] == [], (r.stderr, res)
    res, r = run(ms[2], "free", b)  # decided from n2's copy of the records
    assert r.returncode == 0, r.stderr
    assert res["kept_files"] == 1 and res["kept_bytes"] == 3 * CHUNK, res
    assert list(res["kept_by"]) == [a], res
    proxy.reset()
    read_everywhere(ms, {x: ds[x], y: ds[y]})
    assert gets(proxy) == 0
